"""What the model is asked to do: batch, lengths, sample paths, number formats (conventions.md).

Letters: B batch of series, S = context + 1 encoder tokens, T = prediction + 1 decoder tokens (the Chronos
tokenizer appends EOS to both), P prediction steps, N sample paths per series.
"""

from __future__ import annotations

from dataclasses import dataclass
from model.checks import SettingError, check_int
from model.trainable import normalize_trainable

# Bytes per element of each number format.
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}

# Training precision regimes (conventions.md, Memory):
#   fp32     - fp32 weights, gradients, optimizer states and activations;
#   amp_bf16 / amp_fp16 - PyTorch autocast: fp32 master weights and gradients, half-precision activations;
#   bf16     - pure bf16 weights and gradients, fp32 optimizer moments.
PRECISION_REGIMES = ("fp32", "amp_bf16", "amp_fp16", "bf16")
OPTIMIZERS = ("adamw", "adam", "sgd_momentum", "adamw_8bit")

# Far above any real Chronos workload; they stop a typo from asking for an absurd plan.
WORKLOAD_LIMITS = {
    "batch_size": 1_000_000,
    "context_length": 1_000_000,
    "prediction_length": 100_000,
    "num_samples": 100_000,
}


# Chronos' defaults (its training configs and pipeline), the one place every default workload reads.
CONTEXT_LENGTH = 512
PREDICTION_LENGTH = 64
NUM_SAMPLES = 20


@dataclass(frozen=True)
class Workload:
    """Chronos defaults: context 512, prediction 64, 20 sample paths, one series."""

    batch_size: int = 1
    context_length: int = CONTEXT_LENGTH
    prediction_length: int = PREDICTION_LENGTH
    num_samples: int = NUM_SAMPLES
    dtype: str = "fp32"  # weights' format for inference memory
    optimizer: str = "adamw"
    precision: str = "fp32"  # training regime
    trainable: str = "all"  # which parameters learn (model.trainable): a regime or a set of components

    def __post_init__(self) -> None:
        for field, limit in WORKLOAD_LIMITS.items():
            check_int(field, getattr(self, field), 1, limit)
        if self.dtype not in DTYPE_BYTES:
            raise SettingError("dtype", f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise SettingError("optimizer", f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.precision not in PRECISION_REGIMES:
            raise SettingError("precision",
                               f"precision must be one of {', '.join(PRECISION_REGIMES)}, got {self.precision!r}")
        object.__setattr__(self, "trainable", normalize_trainable(self.trainable))

    @property
    def encoder_tokens(self) -> int:
        """S: context values plus the EOS the tokenizer appends."""
        return self.context_length + 1

    @property
    def decoder_tokens(self) -> int:
        """T: prediction values plus EOS, the teacher-forced decoder length."""
        return self.prediction_length + 1
