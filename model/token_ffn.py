"""token_ffn: a token-level MoE FFN that takes the place of T5's DenseReluDense (architecture.md §3).

As in Switch and Mixtral: router Linear(D→E, no bias) → softmax → top-K → renormalise, then each token
runs its K experts. Every position is routed (T5 computes padded positions too).

Letters: B series, L positions, D d_model, F d_ff, E experts, K active experts.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .dispatch import dispatch
from .experts import ExpertFFN
from .config import capacity_limit
from .routing import RoutingDecision, route_top_k


class TokenExpertFFN(nn.Module):
    """Drop-in for T5DenseActDense: (B, L, D) -> (B, L, D).

    T5's block cannot return extra outputs, so the layer keeps its last routing decision in
    `last_routing`; the assembly collects it (and clears it) after each forward.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        *,
        capacity_factor: Optional[float] = None,
        dispatch_mode: str = "sparse",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.dispatch_mode = dispatch_mode
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(ExpertFFN(d_model, d_ff, dropout) for _ in range(num_experts))
        self.last_routing: Optional[RoutingDecision] = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.reshape(-1, hidden.shape[-1])  # (B·L, D)
        routing = route_top_k(self.router(tokens), self.top_k)  # (B·L, K)
        capacity = capacity_limit(self.capacity_factor, tokens.shape[0], self.top_k, len(self.experts))
        mixed = dispatch(tokens, routing, list(self.experts), mode=self.dispatch_mode, capacity=capacity)
        self.last_routing = routing
        return mixed.view_as(hidden)
