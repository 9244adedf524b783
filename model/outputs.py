"""What a forward returns (Hugging Face style) and expert-usage summaries (architecture.md §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .routing import RoutingDecision


def usage_entropy(counts: list[int]) -> float:
    """Entropy (nats) of the shares of routing slots per expert `counts`; log(E) when perfectly even."""
    total = sum(counts)
    return float(-sum(c / total * math.log(c / total) for c in counts if c > 0))


@dataclass
class RoutingRecord:
    """One MoE layer's decision in one forward: `layer` is 'router' (sample level) or a block path."""

    layer: str
    routing: RoutingDecision
    balance_loss: torch.Tensor

    def usage_counts(self, num_experts: int) -> torch.Tensor:
        """How many routing slots each expert received: (E,)."""
        return torch.bincount(self.routing.expert_indices.reshape(-1), minlength=num_experts)

    def usage_entropy(self, num_experts: int) -> float:
        """Entropy (nats) of the slot shares; log(E) when usage is perfectly even."""
        return usage_entropy(self.usage_counts(num_experts).tolist())


@dataclass
class MoEOutput:
    """`.logits` (B, T, V); `.loss` = cross-entropy + load_balancing_weight × `.aux_loss` when labels given."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    routing: list[RoutingRecord] = field(default_factory=list)
