"""The breakdown's components and which real parameter belongs to which (architecture.md §3,
conventions.md "Parameters"). Torch-free: the planner counts by these names, the model freezes by them.
"""

from __future__ import annotations

import re
from typing import Optional

# Breakdown components, in display order; each is a `<name>_params` field of ParamBreakdown.
COMPONENTS = (
    "embedding",
    "encoder_attention",
    "encoder_ffn",
    "encoder_norm",
    "encoder_position_bias",
    "decoder_self_attention",
    "decoder_cross_attention",
    "decoder_ffn",
    "decoder_norm",
    "decoder_position_bias",
    "router",
    "expert_encoder",
    "expert_ffn",
    "expert_head",
)


# Real parameter name → component, first match wins (the modules' names; see model/).
_COMPONENT_PATTERNS = (
    (r"^backbone\.(shared|lm_head|encoder\.embed_tokens|decoder\.embed_tokens)\.weight$", "embedding"),
    (r"^router\.", "router"),
    (r"^experts\.\d+\.encoder\.", "expert_encoder"),
    (r"^experts\.\d+\.", "expert_head"),
    (r"\.DenseReluDense\.router\.", "router"),
    (r"\.DenseReluDense\.experts\.", "expert_ffn"),
    (r"^backbone\.encoder\..*relative_attention_bias\.", "encoder_position_bias"),
    (r"^backbone\.encoder\..*layer_norm\.", "encoder_norm"),
    (r"^backbone\.encoder\..*\.SelfAttention\.", "encoder_attention"),
    (r"^backbone\.encoder\..*\.DenseReluDense\.", "encoder_ffn"),
    (r"^backbone\.decoder\..*relative_attention_bias\.", "decoder_position_bias"),
    (r"^backbone\.decoder\..*layer_norm\.", "decoder_norm"),
    (r"^backbone\.decoder\..*\.SelfAttention\.", "decoder_self_attention"),
    (r"^backbone\.decoder\..*\.EncDecAttention\.", "decoder_cross_attention"),
    (r"^backbone\.decoder\..*\.DenseReluDense\.", "decoder_ffn"),
)
_COMPILED_PATTERNS = tuple((re.compile(pattern), component) for pattern, component in _COMPONENT_PATTERNS)


def component_of_param(name: str) -> Optional[str]:
    """The breakdown component a real parameter name belongs to, or None if the planner does not know it."""
    for pattern, component in _COMPILED_PATTERNS:
        if pattern.search(name):
            return component
    return None
