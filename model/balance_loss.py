"""Switch-style load-balancing loss (architecture.md §4; Fedus et al. 2021, arXiv:2101.03961).

Letters: rows (series or tokens), E experts, K active experts.
"""

from __future__ import annotations

import torch
from torch import nn

from .routing import RoutingDecision


class LoadBalancingLoss(nn.Module):
    """E · Σᵢ fᵢ · P̄ᵢ: fᵢ the share of the rows·K routing slots given to expert i, P̄ᵢ its mean probability.

    1.0 when routing is uniform; up to E when every row goes to one expert with certainty. fᵢ counts
    hard assignments (no gradient); the gradient reaches the router through P̄ᵢ, as in Switch.
    """

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    def forward(self, routing: RoutingDecision) -> torch.Tensor:
        slots = routing.expert_indices.reshape(-1)
        counts = torch.bincount(slots, minlength=self.num_experts).to(routing.router_probs.dtype)
        slot_share = counts / slots.numel()  # fᵢ
        mean_prob = routing.router_probs.mean(dim=0)  # P̄ᵢ
        return self.num_experts * torch.sum(slot_share * mean_prob)
