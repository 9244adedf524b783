"""build_model: every member of the family from its config alone; no weights are downloaded, ever.

The models are randomly initialised: sizes, FLOPs, memory and speed do not depend on the weights' values.
"""

from __future__ import annotations

import contextlib

from typing import Any, Optional, Union

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
from .trainable import set_trainable


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
    trainable: str = "all",
) -> ChronosMoEModel:
    """Build on `device` directly ("meta" gives exact sizes at zero cost: nothing data-dependent runs), with
    `requires_grad` set by the fine-tuning regime `trainable` (model.trainable)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        backbone = T5ForConditionalGeneration(t5_config(config.dims))
        model = ChronosMoEModel(config, backbone)
    if dtype is not None:
        model = model.to(dtype)
    set_trainable(model, trainable)
    return model


def build_model(
    size: str,
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    trainable: str = "all",
    **settings: Any,
) -> ChronosMoEModel:
    """A Chronos-MoE model: `make_config(size, **settings)` (the MoE settings and T5 overrides, with their
    defaults and checks there), built on `device` in `dtype`, training the parameters `trainable` names.
    `num_experts=0` (the default) is the dense Chronos-T5; `size` is a preset name, or "custom" with the T5
    dimensions as settings."""
    return build_model_from_config(make_config(size, **settings), device=device, dtype=dtype, trainable=trainable)
