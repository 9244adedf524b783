"""Gradient reachability: a real backward shows which trainable parameters the loss reaches (architecture.md §6).

A fine-tuning regime is only useful if every parameter it trains receives a gradient: experts placed where
no gradient reaches them never learn, and nothing in a parameter count reveals it. The check runs one
training forward and backward of the variant with the regime's `requires_grad` and lists

- trainable parameters with no gradient at all (`grad is None`: not on any path to the loss), and
- trainable parameters outside the experts whose gradient is zero up to rounding (e.g. a top-1 router
  without a balance loss: its renormalised weight is always 1, so the loss never moves it). "Zero" is every
  element below ZERO_GRADIENT in magnitude: such a router's gradient comes out as 0 or ~1e-9 (rounding in
  p / p), while a router that learns gets 1e-3 and more at initialisation.

Reachability is structural, the same at every width, so the check runs the variant's layer counts and MoE
settings at the debug width (d_model 64) with dense dispatch, which puts every expert on the path; experts
are capped at max(K, 4), as each expert's path is the same. It takes about a second on a CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from model.build import build_model_from_config
from model.components import component_of_param
from model.config import ChronosMoEConfig
from model.presets import PRESETS
from model.trainable import EXPERT_COMPONENTS, normalize_trainable
from planner.measure import token_batch
from planner.workload import Workload

CHECK_WORKLOAD = Workload(batch_size=4, context_length=16, prediction_length=4)
MIN_EXPERTS_CHECKED = 4
ZERO_GRADIENT = 1e-6


@dataclass(frozen=True)
class Reachability:
    """What one real backward reached, in parameters of the checked (narrow) model."""

    trainable: str
    trainable_params: int
    reached_params: int
    unreached: tuple[str, ...]  # trainable parameters with no gradient
    zero_gradient: tuple[str, ...]  # trainable non-expert parameters whose gradient is zero up to rounding

    @property
    def ok(self) -> bool:
        return not self.unreached and not self.zero_gradient

    def summary(self) -> str:
        """One line for tables and the app."""
        if self.ok:
            return ("every trainable parameter receives a gradient (a real backward of this variant's layers "
                    "at the debug width)")
        parts = []
        if self.unreached:
            parts.append(f"no gradient reaches {_names(self.unreached)}")
        if self.zero_gradient:
            parts.append(f"the gradient is zero for {_names(self.zero_gradient)}")
        return f"trainable {self.trainable} cannot train: " + "; ".join(parts)


def _names(names: tuple[str, ...], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def reachability_config(config: ChronosMoEConfig) -> ChronosMoEConfig:
    """The variant at the debug width with its layer counts and MoE settings, dense dispatch, experts capped."""
    debug = PRESETS["debug"]
    dims = dataclasses.replace(debug, num_layers=config.dims.num_layers,
                               num_decoder_layers=config.dims.num_decoder_layers, vocab_size=debug.vocab_size)
    if not config.is_moe:
        return dataclasses.replace(config, dims=dims)
    experts = min(config.num_experts, max(config.top_k, MIN_EXPERTS_CHECKED))
    return dataclasses.replace(config, dims=dims, num_experts=experts, dispatch="dense", expert_capacity=None,
                               router_hidden_dim=min(config.router_hidden_dim, 32))


def check_reachability(config: ChronosMoEConfig, trainable: str, *, seed: int = 0) -> Reachability:
    """One training step's backward under `trainable`; which trainable parameters got a gradient."""
    trainable = normalize_trainable(trainable)
    narrow = reachability_config(config)
    torch.manual_seed(seed)
    model = build_model_from_config(narrow, trainable=trainable)
    model.train()
    input_ids, attention_mask, labels = token_batch(narrow, CHECK_WORKLOAD, torch.Generator().manual_seed(seed))
    model(input_ids, attention_mask, labels=labels).loss.backward()
    total = reached = 0
    unreached, zero = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        total += parameter.numel()
        if parameter.grad is None:
            unreached.append(name)
            continue
        reached += parameter.numel()
        if component_of_param(name) not in EXPERT_COMPONENTS and parameter.grad.abs().max() < ZERO_GRADIENT:
            zero.append(name)
    return Reachability(trainable, total, reached, tuple(unreached), tuple(zero))
