"""build_model: every member of the family from its config alone; no weights are downloaded, ever.

The models are randomly initialised: sizes, FLOPs, memory and speed do not depend on the weights' values.
"""

from __future__ import annotations

import contextlib

from typing import Optional, Union

import torch
from transformers import T5Config, T5ForConditionalGeneration

from .chronos_moe import DECODER_START_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, ChronosMoEModel
from .config import ChronosMoEConfig, make_config
from .presets import (
    DROPOUT_RATE,
    LAYER_NORM_EPSILON,
    RELATIVE_ATTENTION_MAX_DISTANCE,
    RELATIVE_ATTENTION_NUM_BUCKETS,
    BackboneDims,
)


def t5_config(dims: BackboneDims) -> T5Config:
    """The Chronos-T5 T5Config for these dimensions (architecture.md §1)."""
    config = T5Config(
        vocab_size=dims.vocab_size,
        d_model=dims.d_model,
        d_ff=dims.d_ff,
        d_kv=dims.d_kv,
        num_heads=dims.num_heads,
        num_layers=dims.num_layers,
        num_decoder_layers=dims.num_decoder_layers,
        relative_attention_num_buckets=RELATIVE_ATTENTION_NUM_BUCKETS,
        relative_attention_max_distance=RELATIVE_ATTENTION_MAX_DISTANCE,
        dropout_rate=DROPOUT_RATE,
        layer_norm_epsilon=LAYER_NORM_EPSILON,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        decoder_start_token_id=DECODER_START_TOKEN_ID,  # generation fails without it
        pad_token_id=PAD_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    # Eager attention: the only kind T5 has, and the one FLOP counters can see.
    config._attn_implementation = "eager"
    return config


def build_model_from_config(
    config: ChronosMoEConfig,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> ChronosMoEModel:
    """Build on `device` directly ("meta" gives exact sizes at zero cost: nothing data-dependent runs)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        backbone = T5ForConditionalGeneration(t5_config(config.dims))
        model = ChronosMoEModel(config, backbone)
    if dtype is not None:
        model = model.to(dtype)
    return model


def build_model(
    size: str,
    *,
    architecture: str = "shared_then_expert",
    num_experts: int = 0,
    top_k: int = 2,
    router_hidden_dim: int = 256,
    vocab_size: int = 4096,
    expert_capacity: Optional[float] = None,
    dispatch: str = "sparse",
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    load_balancing_weight: float = 0.01,
    encoder_moe_blocks: Optional[tuple[int, ...]] = None,
    decoder_moe_blocks: Optional[tuple[int, ...]] = None,
    shared_layers: Optional[int] = None,
    **t5_overrides: int,
) -> ChronosMoEModel:
    """A Chronos-MoE model. `num_experts=0` gives the dense Chronos-T5; `size` is a preset name, or
    "custom" with d_model, d_ff, d_kv, num_heads, num_layers (and num_decoder_layers) as overrides."""
    config = make_config(
        size,
        architecture=architecture,
        num_experts=num_experts,
        top_k=top_k,
        router_hidden_dim=router_hidden_dim,
        vocab_size=vocab_size,
        expert_capacity=expert_capacity,
        dispatch=dispatch,
        load_balancing_weight=load_balancing_weight,
        encoder_moe_blocks=encoder_moe_blocks,
        decoder_moe_blocks=decoder_moe_blocks,
        shared_layers=shared_layers,
        **t5_overrides,
    )
    return build_model_from_config(config, device=device, dtype=dtype)
