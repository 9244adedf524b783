"""Sending rows to their experts (architecture.md §4).

Sparse (the default): group rows by expert, gather, run only the chosen experts on only their rows, scale
by the routing weight and scatter-add back, so compute follows K, not E. Dense (reference only, to show what
sparse saves): every expert runs on every row and the non-chosen outputs are multiplied by 0.

Letters: rows (series or tokens), K active experts, E experts, "..." the per-row trailing shape.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .routing import RoutingDecision, routing_as_dense_weights

Expert = Callable[..., torch.Tensor]


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
    outputs = []
    start = 0
    for expert, size in zip(experts, group_sizes):
        if size:  # an expert nobody chose does not run, and gets no gradient
            outputs.append(expert(gathered[start:start + size], *(a[start:start + size] for a in arguments)))
        start += size
    # Every row has K ≥ 1 slots and a capacity is at least 1, so some expert always ran.
    stacked = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    scaled = _scale_rows(stacked, routing.expert_weights.reshape(-1)[order])
    total = inputs.new_zeros((inputs.shape[0], *stacked.shape[1:]), dtype=stacked.dtype)
    return total.index_add(0, rows, scaled)
