"""What one timed repetition does in each mode, and what its last output says about expert usage.

- forward: teacher-forced inference (eval, no_grad) on a tokenized batch of synthetic series;
- forecast: N sample paths per series through `model.sample_tokens` (encoder once, cached decoding);
- train: `model.training.train_step` (cross-entropy + weighted balance loss, backward, AdamW step); in
  bf16/fp16 under autocast with fp32 weights (AMP), the regime the planner's training memory counts. The timed
  steps run on second moments as a long run leaves them (STEADY_SECOND_MOMENT).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from model.outputs import MoEOutput, usage_entropy
from model.training import synthetic_series, train_step, training_batch
from planner.bench.device import TORCH_DTYPES
from planner import export
from planner.bench.spec import BenchSpec

LEARNING_RATE = 1e-4  # any small rate: the step's cost does not depend on it
# The floor of AdamW's second moments once the first step has made them, as a long run leaves them: every
# expert routed some time, every token seen. A benchmark starts from none, so an expert no series reached in its
# few steps keeps exactly zero moments (and so does an unseen token's embedding row), and this CPU's vectorised
# square root takes 342 µs for 256 Ki zeros against 63 µs for ordinary values: tiny expert_only's training step at
# batch 1 (83 % of its moments zero) ran 345 ms, 227 ms on settled moments, a cost of the benchmark's first steps
# rather than of training. Far below any squared gradient a step adds (1e-12 is a gradient of 1e-6), so routed
# parameters' updates barely move.
STEADY_SECOND_MOMENT = 1e-12


def library_versions() -> dict[str, str]:
    """The run's Python and libraries (planner.export's list, for a benchmark's rows)."""
    return {"python": platform.python_version(), **export.library_versions()}


def summarise_usage(output: Any, num_experts: int) -> dict[str, Any]:
    """Expert usage of one forward, summed over its MoE layers: slots per expert, the entropy of their shares
    (log E when even), the balance loss (summed over layers, as the training loss adds it) and the loss.
    Empty for a forecast (it reports no routing) and for the dense model."""
    if not isinstance(output, MoEOutput):
        return {}
    summary: dict[str, Any] = {"loss": float(output.loss.detach())} if output.loss is not None else {}
    if not output.routing:
        return summary
    counts = sum(record.usage_counts(num_experts).cpu() for record in output.routing)
    return {
        **summary,
        "usage_counts": counts.tolist(),
        "usage_entropy_nats": usage_entropy(counts.tolist()),
        "balance_loss": float(output.aux_loss.detach()),
        "moe_layers": len(output.routing),
    }


@dataclass(frozen=True)
class BenchStep:
    """`run()` does one repetition; in train mode `optimizer` is the AdamW it steps; `record()` runs one more
    and returns the ops it dispatched (planner.steptime.trace), routing included, for the prediction."""

    run: Callable[[], Any]
    record: Callable[[], Any]
    optimizer: Optional[torch.optim.Optimizer] = None

    def __call__(self) -> Any:
        return self.run()

    def trained_params(self) -> Optional[int]:
        """Parameters AdamW holds moments for: those that received a gradient in some step. Experts no
        series was routed to get none (their gradient stays None), so they carry no moments either."""
        if self.optimizer is None:
            return None
        state = self.optimizer.state
        return sum(p.numel() for group in self.optimizer.param_groups for p in group["params"] if p in state)


def settle_second_moments(optimizer: torch.optim.Optimizer) -> None:
    """Raise every AdamW second moment to at least STEADY_SECOND_MOMENT: the timed steps run on moments as a
    long run leaves them, not on the zeros of parameters the benchmark's first step gave no gradient."""
    with torch.no_grad():
        for state in optimizer.state.values():
            if "exp_avg_sq" in state:
                state["exp_avg_sq"].clamp_(min=STEADY_SECOND_MOMENT)


def make_step(spec: BenchSpec, model: torch.nn.Module, device: str) -> BenchStep:
    """The work of one timed repetition, on a fixed tokenized batch of synthetic series."""
    generator = torch.Generator().manual_seed(spec.seed)
    series = synthetic_series(spec.batch_size, spec.context_length + spec.prediction_length, generator)
    batch = {name: tensor.to(device) for name, tensor in
             training_batch(model, series, spec.context_length, spec.prediction_length).items()}
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=LEARNING_RATE) if spec.mode == "train" else None

    def record():
        from planner.steptime.trace import record_step  # the tracer, only once the timing is done

        if optimizer is not None:  # as train_step starts: the backward makes each gradient, not adds into it
            optimizer.zero_grad(set_to_none=True)
        return record_step(model, inputs, spec.workload(), spec.mode, spec.dtype,
                           generator=torch.Generator(device=device).manual_seed(spec.seed),
                           count_fresh_pages=device == "cpu")  # the pages this run's allocator hands out

    if optimizer is not None:
        model.train()
        autocast = spec.dtype != "fp32"
        moments_settled = [False]

        def train() -> MoEOutput:
            with torch.autocast(device_type=device, dtype=TORCH_DTYPES[spec.dtype], enabled=autocast):
                output = train_step(model, optimizer, batch)
            if not moments_settled[0]:  # once, after the first (warm-up) step made the moments
                settle_second_moments(optimizer)
                moments_settled[0] = True
            return output

        return BenchStep(train, record, optimizer)
    model.eval()
    if spec.mode == "forward":
        def forward() -> MoEOutput:
            with torch.no_grad():
                return model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])

        return BenchStep(forward, record)
    sampler = torch.Generator(device=device).manual_seed(spec.seed)

    def forecast() -> torch.Tensor:
        with torch.no_grad():
            return model.sample_tokens(batch["input_ids"], batch["attention_mask"], spec.prediction_length,
                                       spec.num_samples, generator=sampler)

    return BenchStep(forecast, record)
