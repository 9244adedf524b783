"""Sending rows to their experts (architecture.md §4).

Sparse (the default): group rows by expert, gather, run only the chosen experts on only their rows, scale
by the routing weight and scatter-add back, so compute follows K, not E. While a training step records
gradients, the experts nobody chose run too, on zero rows, so every expert gets a gradient, zero for those
(`records_expert_gradients`). Dense (reference only, to show what sparse saves): every expert runs on every
row and the non-chosen outputs are multiplied by 0.

Letters: rows (series or tokens), K active experts, E experts, "..." the per-row trailing shape.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .routing import RoutingDecision, routing_as_dense_weights

Expert = Callable[..., torch.Tensor]


def _expert_module(expert: Expert):
    """The module behind an expert callable (a module, or a bound method such as ExpertEncoder.encode)."""
    return getattr(expert, "__self__", expert)


def records_expert_gradients(experts: Sequence[Expert]) -> bool:
    """Whether a dispatch must run every expert, on zero rows if none were routed to it: while autograd
    records a training step (grad enabled, the experts in training mode). An expert left out of the graph
    gets no gradient (None) where the others get one, and what runs beside the gradients then depends on the
    batch: DDP's and FSDP's per-rank reduce-scatters stop matching (FSDP2 aborts), and the gradient and
    optimizer bytes differ from rank to rank. Run on zero rows it gets a zero gradient, the same set on every
    rank. Inference (no grad, or eval mode) keeps skipping experts nobody chose."""
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(module, torch.nn.Module) and module.training
               for module in map(_expert_module, experts))


def _scale_rows(outputs: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """Multiply each row of (rows, ...) by its weight (rows,)."""
    return outputs * row_weights.to(outputs.dtype).view(-1, *([1] * (outputs.dim() - 1)))


def dispatch(
    inputs: torch.Tensor,
    routing: RoutingDecision,
    experts: Sequence[Expert],
    *,
    row_arguments: Sequence[torch.Tensor] = (),
    mode: str = "sparse",
    capacity: Optional[int] = None,
) -> torch.Tensor:
    """Σ over each row's chosen experts of weight × expert(row): (rows, ...) -> (rows, ...out).

    `row_arguments` are further per-row tensors an expert needs (an attention mask), gathered alike.
    `capacity` caps the rows one expert takes (first come, in row order); the rest skip that expert.
    """
    if mode == "dense":
        combine_weights = routing_as_dense_weights(routing, len(experts))  # (rows, E)
        total = None
        for expert_id, expert in enumerate(experts):
            scaled = _scale_rows(expert(inputs, *row_arguments), combine_weights[:, expert_id])
            total = scaled if total is None else total + scaled
        return total

    return _grouped_dispatch(inputs, routing, experts, row_arguments, capacity)


def _grouped_dispatch(inputs, routing, experts, row_arguments, capacity):
    """Sparse dispatch with one host sync: the (row, slot) pairs sorted by expert, the group sizes read once.

    A stable sort keeps each expert's rows in row order, so a capacity keeps the earliest ones, as Switch
    does. One gather brings every routed row, the experts run on consecutive groups, one product weights
    them and one index_add sums them back per row.
    """
    top_k = routing.expert_indices.shape[1]
    flat_experts = routing.expert_indices.reshape(-1)  # (rows·K,) in row-major order
    order = torch.argsort(flat_experts, stable=True)  # (rows·K,) slots grouped by expert, rows in order
    group_sizes = torch.bincount(flat_experts, minlength=len(experts)).tolist()  # the one host sync
    if capacity is not None:
        kept = [group[:capacity] for group in order.split(group_sizes)]
        order = torch.cat(kept)
        group_sizes = [len(group) for group in kept]
    rows = order // top_k  # (slots,)
    gathered = inputs[rows]
    arguments = [argument[rows] for argument in row_arguments]
    every_expert = records_expert_gradients(experts)
    outputs = []
    start = 0
    for expert, size in zip(experts, group_sizes):
        if size or every_expert:
            outputs.append(expert(gathered[start:start + size], *(a[start:start + size] for a in arguments)))
        start += size
    # Every row has K ≥ 1 slots and a capacity is at least 1, so some expert always ran (with rows).
    stacked = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    scaled = _scale_rows(stacked, routing.expert_weights.reshape(-1)[order])
    total = inputs.new_zeros((inputs.shape[0], *stacked.shape[1:]), dtype=stacked.dtype)
    return total.index_add(0, rows, scaled)
