"""Chronos-T5 backbone sizes (architecture.md §1), as plain data so the planner can read them without torch.

Letters: D d_model, F d_ff, Dk d_kv, H num_heads, Le/Ld encoder/decoder blocks, V vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from .checks import check_int

# Common to every Chronos-T5 size (architecture.md §1).
CHRONOS_VOCAB_SIZE = 4096
RELATIVE_ATTENTION_NUM_BUCKETS = 32
RELATIVE_ATTENTION_MAX_DISTANCE = 128
DROPOUT_RATE = 0.1
LAYER_NORM_EPSILON = 1e-6

# Limits that keep a typo from asking for an absurd model; far above anything trainable today.
DIMENSION_LIMITS = {
    "d_model": 65_536,
    "d_ff": 262_144,
    "d_kv": 4_096,
    "num_heads": 1_024,
    "num_layers": 512,
    "num_decoder_layers": 512,
    "vocab_size": 1_048_576,
}


@dataclass(frozen=True)
class BackboneDims:
    """The T5 dimensions that fix every parameter and FLOP count of the backbone."""

    d_model: int
    d_ff: int
    d_kv: int
    num_heads: int
    num_layers: int  # encoder blocks (Le)
    num_decoder_layers: int  # decoder blocks (Ld)
    vocab_size: int = CHRONOS_VOCAB_SIZE

    def __post_init__(self) -> None:
        for field, limit in DIMENSION_LIMITS.items():
            check_int(field, getattr(self, field), 1, limit)

    @property
    def attention_width(self) -> int:
        """H·Dk: the width of q, k, v (wider than d_model for mini)."""
        return self.num_heads * self.d_kv

    def with_vocab(self, vocab_size: int) -> "BackboneDims":
        return BackboneDims(**{**self.__dict__, "vocab_size": vocab_size})


# Size name -> T5 dimensions (architecture.md §1). `debug` is a few hundred thousand parameters, for tests.
PRESETS: dict[str, BackboneDims] = {
    "debug": BackboneDims(d_model=64, d_ff=256, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2),
    "tiny": BackboneDims(d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=4, num_decoder_layers=4),
    "mini": BackboneDims(d_model=384, d_ff=1536, d_kv=64, num_heads=8, num_layers=4, num_decoder_layers=4),
    "small": BackboneDims(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6, num_decoder_layers=6),
    "base": BackboneDims(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12),
    "large": BackboneDims(d_model=1024, d_ff=4096, d_kv=64, num_heads=16, num_layers=24, num_decoder_layers=24),
}

# The sizes Chronos publishes (for users' orientation; tests check the presets round to these).
PUBLISHED_SIZES = {"tiny": "8M", "mini": "20M", "small": "46M", "base": "200M", "large": "710M"}

CUSTOM_SIZE = "custom"
DIMENSION_FIELDS = ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers")


def resolve_dims(size: str, vocab_size: int = CHRONOS_VOCAB_SIZE, **overrides: Any) -> BackboneDims:
    """Dimensions for a preset name (optionally overridden) or for `custom` (all dimensions given).

    `num_decoder_layers` defaults to `num_layers`, as in T5Config.
    """
    unknown = sorted(set(overrides) - set(DIMENSION_FIELDS))
    if unknown:
        raise ValueError(f"unknown T5 dimension(s) {', '.join(unknown)}; allowed: {', '.join(DIMENSION_FIELDS)}")
    if size == CUSTOM_SIZE:
        required = [f for f in DIMENSION_FIELDS if f != "num_decoder_layers" and f not in overrides]
        if required:
            raise ValueError(f"size 'custom' needs {', '.join(required)}")
        dims = dict(overrides)
        dims.setdefault("num_decoder_layers", dims["num_layers"])
        return BackboneDims(**dims, vocab_size=vocab_size)
    if size not in PRESETS:
        allowed = ", ".join([*PRESETS, CUSTOM_SIZE])
        raise ValueError(f"size must be one of {allowed}, got {size!r}")
    base = PRESETS[size].__dict__
    return BackboneDims(**{**base, **overrides, "vocab_size": vocab_size})


def dims_from_hf_config(config: Mapping[str, Any] | str | Path) -> BackboneDims:
    """T5 dimensions from a Hugging Face `config.json` (a path, JSON text or a parsed dict)."""
    if isinstance(config, Path) or (isinstance(config, str) and not config.lstrip().startswith("{")):
        config = Path(config).read_text()
    if isinstance(config, (str, bytes)):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as error:
            raise ValueError(f"config.json is not valid JSON: {error.msg} (line {error.lineno})") from None
    if not isinstance(config, Mapping):
        raise ValueError("config.json must hold a JSON object of T5 settings")
    missing = [f for f in DIMENSION_FIELDS if f != "num_decoder_layers" and config.get(f) is None]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)} (a T5 config.json has them, each a number)")
    dims = {f: config[f] for f in DIMENSION_FIELDS if config.get(f) is not None}
    dims.setdefault("num_decoder_layers", dims["num_layers"])  # null or absent: as many as the encoder, as T5Config
    vocab_size = config.get("vocab_size")
    return BackboneDims(**dims, vocab_size=CHRONOS_VOCAB_SIZE if vocab_size is None else vocab_size)
