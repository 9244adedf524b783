"""What one benchmark step does, in the planner's units: its FLOPs and the tokens it handles."""

from __future__ import annotations

from planner.bench.spec import BenchSpec
from planner.flops import count_flops


def count_step_flops(spec: BenchSpec) -> int:
    """The planner's FLOPs of one measured step (forward, forecast, or training step = 3 × forward)."""
    flops = count_flops(spec.model_config(), spec.workload())
    return {"forward": flops.forward_flops, "forecast": flops.forecast_flops, "train": flops.train_flops}[spec.mode]


def count_step_tokens(spec: BenchSpec) -> int:
    """Tokens one step handles: B·(S + T) encoder and decoder positions, or B·N·P sampled in a forecast."""
    workload = spec.workload()
    if spec.mode == "forecast":
        return workload.batch_size * workload.num_samples * workload.prediction_length
    return workload.batch_size * (workload.encoder_tokens + workload.decoder_tokens)
