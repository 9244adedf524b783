"""The MoE settings of the Chronos-MoE family (architecture.md §2–3), validated once, torch-free.

The planner and the modules both read this object, so a configuration that builds is exactly one the
planner can size, and every bad value is refused here with a message naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from .checks import SettingError, check_int
from .presets import BackboneDims, resolve_dims

ARCHITECTURES = ("shared_then_expert", "expert_only", "token_ffn")
DISPATCH_MODES = ("sparse", "dense")
MAX_EXPERTS = 1_024
MAX_ROUTER_HIDDEN_DIM = 65_536
# A capacity factor of E already lets every routed row through (capacity = factor × rows × K / E ≥ rows × K),
# so larger ones mean the same; the bound keeps capacity arithmetic finite.
MAX_CAPACITY_FACTOR = float(MAX_EXPERTS)


def capacity_limit(capacity_factor: Optional[float], tokens: int, top_k: int, num_experts: int) -> Optional[int]:
    """Switch-style per-expert capacity: ceil(factor × tokens × K / E); None means no limit. The one formula:
    the token_ffn module enforces it, the planner counts with it."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def default_token_moe_blocks(num_blocks: int) -> tuple[int, ...]:
    """Every second block, zero-based odd indices (architecture.md §3, token_ffn)."""
    return tuple(range(1, num_blocks, 2))


@dataclass(frozen=True)
class ChronosMoEConfig:
    """One member of the family: a backbone plus its MoE settings.

    `num_experts == 0` is the dense Chronos-T5 (top_k and the router settings are then ignored).
    `expert_capacity` is a Switch-style capacity *factor* (token_ffn only): each expert takes at most
    ceil(capacity × tokens × K / E) tokens of a batch; None drops no token.
    `encoder_moe_blocks` / `decoder_moe_blocks` pick the token_ffn blocks; None means every odd block.
    """

    dims: BackboneDims
    architecture: str = "shared_then_expert"
    num_experts: int = 0
    top_k: int = 2
    router_hidden_dim: int = 256  # design documents' default
    load_balancing_weight: float = 0.01  # Switch Transformer's default
    expert_capacity: Optional[float] = None
    dispatch: str = "sparse"
    encoder_moe_blocks: Optional[tuple[int, ...]] = None
    decoder_moe_blocks: Optional[tuple[int, ...]] = None
    shared_layers: Optional[int] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.shared_layers is not None:
            raise ValueError(
                "shared_layers is not part of the Chronos-MoE family: every encoder and decoder block is shared; "
                "remove it (use architecture to choose what the experts replace)"
            )
        if self.architecture not in ARCHITECTURES:
            raise SettingError("architecture",
                               f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.dispatch not in DISPATCH_MODES:
            raise SettingError("dispatch",
                               f"dispatch must be one of {', '.join(DISPATCH_MODES)}, got {self.dispatch!r}")
        check_int("num_experts", self.num_experts, 0, MAX_EXPERTS)
        check_int("router_hidden_dim", self.router_hidden_dim, 1, MAX_ROUTER_HIDDEN_DIM)
        if self.is_moe:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
                raise SettingError("top_k",
                                   f"top_k must be an integer from 1 to num_experts ({self.num_experts}), "
                                   f"got {self.top_k!r}")
        lbw = self.load_balancing_weight
        if isinstance(lbw, bool) or not isinstance(lbw, (int, float)) or not math.isfinite(lbw) or lbw < 0:
            raise SettingError("load_balancing_weight",
                               f"load_balancing_weight must be a finite number ≥ 0, got {lbw!r}")
        if self.expert_capacity is not None:
            cap = self.expert_capacity
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap <= MAX_CAPACITY_FACTOR:
                raise SettingError("expert_capacity",
                                   f"expert_capacity must be a capacity factor > 0 and ≤ {MAX_CAPACITY_FACTOR:g} "
                                   f"(or None for no limit), got {str(cap)[:40]}")
            if self.architecture != "token_ffn":
                raise SettingError("expert_capacity",
                                   "expert_capacity applies only to architecture token_ffn (sample-level routing "
                                   "drops nothing)")
        for name, blocks, count in (
            ("encoder_moe_blocks", self.encoder_moe_blocks, self.dims.num_layers),
            ("decoder_moe_blocks", self.decoder_moe_blocks, self.dims.num_decoder_layers),
        ):
            if blocks is None:
                continue
            if not isinstance(blocks, tuple) or any(isinstance(b, bool) or not isinstance(b, int) for b in blocks):
                raise SettingError(name, f"{name} must be a tuple of block indices, got {blocks!r}")
            if any(not 0 <= b < count for b in blocks) or len(set(blocks)) != len(blocks):
                raise SettingError(name, f"{name} must hold distinct block indices from 0 to {count - 1}, got {blocks!r}")
            if self.architecture != "token_ffn":
                raise SettingError(name, f"{name} applies only to architecture token_ffn")
        if self.is_moe and self.architecture == "token_ffn" and not (self.token_moe_encoder_blocks
                                                                       or self.token_moe_decoder_blocks):
            raise SettingError("encoder_moe_blocks",
                               "encoder_moe_blocks and decoder_moe_blocks leave no block with experts; name at least "
                             "one block, or set num_experts to 0 for a dense model")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_head_hidden_dim(self) -> int:
        """Hidden width of a MoEExpertHead FFN: 4·D as in the reference implementation."""
        return 4 * self.dims.d_model

    @property
    def token_moe_encoder_blocks(self) -> tuple[int, ...]:
        """Encoder blocks whose FFN is a token-level MoE (empty unless token_ffn with experts)."""
        if not (self.is_moe and self.architecture == "token_ffn"):
            return ()
        if self.encoder_moe_blocks is not None:
            return tuple(sorted(self.encoder_moe_blocks))
        return default_token_moe_blocks(self.dims.num_layers)

    @property
    def token_moe_decoder_blocks(self) -> tuple[int, ...]:
        """Decoder blocks whose FFN is a token-level MoE (empty unless token_ffn with experts)."""
        if not (self.is_moe and self.architecture == "token_ffn"):
            return ()
        if self.decoder_moe_blocks is not None:
            return tuple(sorted(self.decoder_moe_blocks))
        return default_token_moe_blocks(self.dims.num_decoder_layers)

    @property
    def label(self) -> str:
        """Short human name without the size, e.g. 'MoE-8 (top-2, token_ffn)' or 'dense'."""
        return self.describe()

    def describe(self, *, with_dispatch: bool = False) -> str:
        """The variant's name in text (tables, progress lines, exports): 'dense' or 'MoE-8 (top-2, token_ffn)',
        with the dispatch ('MoE-8 (top-2, token_ffn, sparse)') where runs of both dispatches stand together.
        The app's selectors key variants by their own 'size · MoE-8 top-2 · token_ffn' (share links carry it)."""
        if not self.is_moe:
            return "dense"
        dispatch = f", {self.dispatch}" if with_dispatch else ""
        return f"MoE-{self.num_experts} (top-{self.top_k}, {self.architecture}{dispatch})"


def _block_tuple(name: str, blocks: object) -> Optional[tuple[int, ...]]:
    if blocks is None:
        return None
    try:
        return tuple(blocks)  # type: ignore[call-overload]
    except TypeError:
        raise SettingError(name, f"{name} must be a sequence of block indices, got {str(blocks)[:40]}") from None


def make_config(
    size: str,
    *,
    architecture: str = "shared_then_expert",
    num_experts: int = 0,
    top_k: int = 2,
    router_hidden_dim: int = 256,
    vocab_size: int = 4096,
    expert_capacity: Optional[float] = None,
    dispatch: str = "sparse",
    load_balancing_weight: float = 0.01,
    encoder_moe_blocks: Optional[tuple[int, ...]] = None,
    decoder_moe_blocks: Optional[tuple[int, ...]] = None,
    shared_layers: Optional[int] = None,
    **t5_overrides: int,
) -> ChronosMoEConfig:
    """A validated config from a size name (or 'custom' with T5 dimensions) and MoE settings."""
    check_int("vocab_size", vocab_size, 4, 1_048_576)  # 2 special tokens + at least two bins
    return ChronosMoEConfig(
        dims=resolve_dims(size, vocab_size=vocab_size, **t5_overrides),
        architecture=architecture,
        num_experts=num_experts,
        top_k=top_k,
        router_hidden_dim=router_hidden_dim,
        load_balancing_weight=load_balancing_weight,
        expert_capacity=expert_capacity,
        dispatch=dispatch,
        encoder_moe_blocks=_block_tuple("encoder_moe_blocks", encoder_moe_blocks),
        decoder_moe_blocks=_block_tuple("decoder_moe_blocks", decoder_moe_blocks),
        shared_layers=shared_layers,
    )
