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

    total = None
    for expert_id, expert in enumerate(experts):
        # nonzero walks row-major, so rows come in order and a capacity keeps the earliest ones.
        rows, slots = torch.nonzero(routing.expert_indices == expert_id, as_tuple=True)
        if capacity is not None:
            rows, slots = rows[:capacity], slots[:capacity]
        if rows.numel() == 0:
            continue  # an expert nobody chose does not run, and gets no gradient
        outputs = expert(inputs[rows], *(argument[rows] for argument in row_arguments))
        scaled = _scale_rows(outputs, routing.expert_weights[rows, slots])
        if total is None:
            total = inputs.new_zeros((inputs.shape[0], *outputs.shape[1:]), dtype=outputs.dtype)
        total = total.index_add(0, rows, scaled)
    # Every row has K ≥ 1 slots and a capacity is at least 1, so some expert always ran.
    return total
