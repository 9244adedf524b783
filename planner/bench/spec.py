"""BenchSpec: what one benchmark run measures, validated once, torch-free (it crosses a process boundary as JSON).

A spec names one variant (size, architecture, E, K, dispatch), one mode and one workload, and where and how
to run it. The model settings are validated by `model.make_config`, the workload by `planner.Workload`,
so a spec that validates is one both the modules and the planner accept.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from model.checks import SettingError, check_int
from model.config import ChronosMoEConfig, make_config
from planner.params import count_params, count_trainable_params
from planner.workload import CONTEXT_LENGTH, NUM_SAMPLES, PREDICTION_LENGTH, Workload

MODES = ("forward", "forecast", "train")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("fp32", "bf16", "fp16")

# Training in half precision runs PyTorch AMP (fp32 master weights), the regime people train in and the one
# whose bytes the planner counts; inference runs with the weights themselves in that dtype.
TRAIN_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp_fp16"}

MAX_REPEATS = 1_000
MAX_TIME_LIMIT_S = 24 * 3600.0


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingError(name, f"{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class BenchSpec:
    """One measured run. Defaults: the Chronos workload (context 512, prediction 64, 20 sample paths) at
    batch 8 on small, dense, fp32, on the best device present."""

    size: str = "small"
    architecture: str = "shared_then_expert"
    num_experts: int = 0  # 0 = the dense Chronos-T5
    top_k: int = 2
    dispatch: str = "sparse"
    router_hidden_dim: int = 256
    expert_capacity: Optional[float] = None  # token_ffn only
    mode: str = "forward"
    batch_size: int = 8
    context_length: int = CONTEXT_LENGTH
    prediction_length: int = PREDICTION_LENGTH
    num_samples: int = NUM_SAMPLES  # forecast mode only
    device: str = "auto"
    dtype: str = "fp32"
    threads: Optional[int] = None  # PyTorch's CPU threads; None keeps its default (one per core)
    warmup: int = 1  # untimed: first calls pay one-off costs (allocator growth, kernel selection)
    repeats: int = 5
    time_limit_s: float = 600.0  # the whole subprocess: start-up, build, warm-up and repeats
    seed: int = 0
    recalibrate: bool = False  # re-run the device probe even when a cached one exists
    trainable: str = "all"  # train mode: which parameters learn (model.trainable)

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("device", self.device, DEVICES)
        _check_choice("dtype", self.dtype, DTYPES)
        if self.device == "cpu" and self.dtype == "fp16":
            raise ValueError(refuse_fp16_on_cpu_message())
        check_int("warmup", self.warmup, 1, MAX_REPEATS)
        check_int("repeats", self.repeats, 1, MAX_REPEATS)
        check_int("seed", self.seed, 0, 2**31 - 1)
        if self.threads is not None:
            check_int("threads", self.threads, 1, 1024)
        limit = self.time_limit_s
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) \
                or not 0 < limit <= MAX_TIME_LIMIT_S:
            raise ValueError(f"time_limit_s must be a number of seconds in (0, {MAX_TIME_LIMIT_S:g}], got {limit!r}")
        config, workload = self.model_config(), self.workload()  # validated by the config and the workload
        object.__setattr__(self, "trainable", workload.trainable)  # one spelling of each regime
        if self.mode == "train":
            count_trainable_params(count_params(config), self.trainable, config.label)  # refused if nothing learns

    @property
    def memory_steps(self) -> int:
        """Warm-up steps actually run: they also measure the peak memory, and a training step reaches its
        peak from the second step on (AdamW's moments exist only after the first)."""
        return max(self.warmup, 2 if self.mode == "train" else 1)

    def model_config(self) -> ChronosMoEConfig:
        moe = self.num_experts > 0
        return make_config(
            self.size,
            architecture=self.architecture,
            num_experts=self.num_experts,
            top_k=self.top_k if moe else 2,
            router_hidden_dim=self.router_hidden_dim,
            expert_capacity=self.expert_capacity if moe else None,
            dispatch=self.dispatch if moe else "sparse",
        )

    def workload(self) -> Workload:
        """The planner's workload for this run (inference dtype, or the training precision regime)."""
        return Workload(
            batch_size=self.batch_size,
            context_length=self.context_length,
            prediction_length=self.prediction_length,
            num_samples=self.num_samples,
            dtype=self.dtype,
            optimizer="adamw",
            precision=TRAIN_PRECISION[self.dtype],
            trainable=self.trainable,
        )

    @property
    def label(self) -> str:
        """Short human name, e.g. 'small MoE-16 (top-2, token_ffn, sparse) forward'."""
        regime = f" (trainable {self.trainable})" if self.mode == "train" and self.trainable != "all" else ""
        return f"{self.size} {self.model_config().describe(with_dispatch=True)} {self.mode}{regime}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "BenchSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown benchmark setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**values)


def refuse_fp16_on_cpu_message() -> str:
    return ("dtype fp16 is not supported on CPU (PyTorch's CPU kernels for fp16 matmuls are slow or missing); "
            "use fp32 or bf16 on CPU, or fp16 on cuda/mps")
