"""Routers: the sample-level ContextRouter and the shared top-k step (architecture.md §3).

Letters: B series, L positions, D d_model, R router hidden width, E experts, K active experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RoutingDecision:
    """Which experts each row (a series, or a token) uses, and with what weight.

    expert_indices (rows, K) and expert_weights (rows, K) sum to 1 per row; router_probs (rows, E) is the
    full softmax, kept for the balance loss and for usage reports.
    """

    expert_indices: torch.Tensor
    expert_weights: torch.Tensor
    router_probs: torch.Tensor

    def repeat_rows(self, repeats: int) -> "RoutingDecision":
        """Each row repeated `repeats` times in place (series -> its N sample paths, as forecasting lays them out)."""
        return RoutingDecision(
            self.expert_indices.repeat_interleave(repeats, dim=0),
            self.expert_weights.repeat_interleave(repeats, dim=0),
            self.router_probs.repeat_interleave(repeats, dim=0),
        )


def route_top_k(router_logits: torch.Tensor, top_k: int) -> RoutingDecision:
    """softmax (in fp32, so bf16 routing ties do not flip choices) -> top-K -> renormalise the K weights."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    top_probs, top_indices = torch.topk(probs, top_k, dim=-1)
    weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return RoutingDecision(top_indices, weights, probs)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions only: (B, L, D), (B, L) -> (B, D). Padding must not move the routing.

    Written as multiply-and-sum (not a matmul) so the pooling is elementwise work, like a norm.
    """
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    count = mask.sum(dim=1).clamp(min=1.0)  # (B, 1)
    return (hidden * mask).sum(dim=1) / count


class ContextRouter(nn.Module):
    """Sample-level router: one decision per series, reused at every decoding step.

    masked mean (B, L, D) -> Linear(D→R) -> ReLU -> Dropout -> Linear(R→E) -> softmax -> top-K -> renormalise.
    """

    def __init__(self, d_model: int, hidden_dim: int, num_experts: int, top_k: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.top_k = top_k
        self.hidden = nn.Linear(d_model, hidden_dim)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, num_experts)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> RoutingDecision:
        pooled = masked_mean(hidden, attention_mask)  # (B, D)
        logits = self.output(self.dropout(self.activation(self.hidden(pooled))))  # (B, E)
        return route_top_k(logits, self.top_k)


def routing_as_dense_weights(routing: RoutingDecision, num_experts: int) -> torch.Tensor:
    """(rows, E) combine weights: the routing weight for chosen experts, 0 elsewhere (dense dispatch)."""
    rows = routing.expert_indices.shape[0]
    dense = torch.zeros(rows, num_experts, dtype=routing.expert_weights.dtype, device=routing.expert_weights.device)
    return dense.scatter(1, routing.expert_indices, routing.expert_weights)


