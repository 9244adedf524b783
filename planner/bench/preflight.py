"""Preflight: refuse a run whose predicted peak memory exceeds 80% of the memory available, and say what fits.

The predicted peak comes from planner.memory:
- train: the training step (weights, gradients, AdamW moments, activations saved for backward, and the loss's
  logits and two B·T·V fp32 backward gradients, planner.activations.estimate_loss_backward_transient_bytes),
  with the CPU's dropout masks on CPU; after a run, for the parameters it trained (see `estimate_peak_bytes`);
- forecast: weights (every expert resident), the KV cache, the encoder output per sample path, the largest
  live activation;
- forward: the same as a one-path forecast: a teacher-forced forward holds the same kinds of tensors (weights,
  the encoder output, each block's cross-attention keys and values, the largest transient).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from planner.bench.spec import BenchSpec
from planner.activations import estimate_loss_backward_transient_bytes
from planner.memory import estimate_memory
from planner.params import count_params, count_trainable_params
from planner.units import GIB

MEMORY_FRACTION = 0.8  # the rest is for the allocator's slack, the runtime and whatever else runs


def estimate_peak_bytes(spec: BenchSpec, device: str, trained_params: Optional[int] = None) -> int:
    """The planner's peak memory of one step of `spec` on `device` ("cpu", "cuda" or "mps").

    Training: the planner gives every trainable parameter (the spec's regime) a gradient and AdamW moments,
    as a long run trains every expert. A short run trains only the experts its series were routed to (a fresh
    router often sends a whole batch to the same few); given `trained_params` (what the run's optimizer holds
    moments for), gradients and moments are counted for those alone.
    """
    config, workload = spec.model_config(), spec.workload()
    activation_device = "cpu" if device == "cpu" else "cuda"  # the dropout masks' width
    if spec.mode == "forward":
        workload = dataclasses.replace(workload, num_samples=1)
    params = count_params(config)
    memory = estimate_memory(config, workload, params, device=activation_device)
    if spec.mode != "train":
        return memory.forecast.total_bytes
    training = memory.training
    loss_transient = estimate_loss_backward_transient_bytes(config, workload, device=activation_device)
    if trained_params is None:
        return training.total_bytes + loss_transient
    trained_share = trained_params / count_trainable_params(params, workload.trainable, config.label)
    return (training.weights_bytes + training.activations_bytes + loss_transient
            + round((training.gradients_bytes + training.optimizer_states_bytes) * trained_share))


def largest_fitting_batch(spec: BenchSpec, device: str, limit_bytes: float) -> int:
    """The largest batch (≤ the spec's) whose predicted peak is within `limit_bytes`; 0 if not even one series.

    Memory grows with the batch, so a bisection finds it.
    """
    low, high = 0, spec.batch_size
    while low < high:
        middle = (low + high + 1) // 2
        if estimate_peak_bytes(dataclasses.replace(spec, batch_size=middle), device) <= limit_bytes:
            low = middle
        else:
            high = middle - 1
    return low


@dataclass(frozen=True)
class PreflightVerdict:
    fits: bool
    predicted_peak_bytes: int
    available_bytes: int
    message: str  # empty when the run fits


def check_preflight(spec: BenchSpec, device: str, available_bytes: int) -> PreflightVerdict:
    """Whether `spec` fits in MEMORY_FRACTION of `available_bytes`; if not, a message saying what would."""
    predicted = estimate_peak_bytes(spec, device)
    limit = MEMORY_FRACTION * available_bytes
    if predicted <= limit:
        return PreflightVerdict(True, predicted, available_bytes, "")
    message = (f"refused: {spec.label} at batch {spec.batch_size} needs a predicted {predicted / GIB:.2f} GiB, "
               f"more than {MEMORY_FRACTION:.0%} of the {available_bytes / GIB:.2f} GiB available on {device} "
               f"({limit / GIB:.2f} GiB). ")
    batch = largest_fitting_batch(spec, device, limit)
    if batch > 0:
        fitting = estimate_peak_bytes(dataclasses.replace(spec, batch_size=batch), device)
        message += f"Batch {batch} fits (predicted {fitting / GIB:.2f} GiB)."
    else:
        message += ("Not even one series fits: choose a smaller size, fewer experts, a shorter context"
                    + (", fewer sample paths" if spec.mode == "forecast" else "") + " or a half-precision dtype.")
    return PreflightVerdict(False, predicted, available_bytes, message)
