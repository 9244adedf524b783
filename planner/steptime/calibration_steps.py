"""The probe's calibration steps: small real steps of the debug model whose timings, less their modelled kernels,
give the host's time per dispatched op, phase by phase (`probe`).

A benchmark run times them again for its own prediction (`probe.remeasure_state`), and best alternately with
its own timed steps, one of each calibration step after each timed step (`CalibrationStep.time_once`): this
2-core VM's speed moves by ±20 % from one second to the next (its cores are hyperthreads whose siblings the
host lends out), so a debug forward at batch 1 timed for a second, then its calibration step for a second,
read 1.13 to 2.06 × the calibration in twelve such pairs; alternated step by step, 1.33 to 1.42.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from model.build import build_model_from_config
from model.config import ChronosMoEConfig, make_config
from planner.bench.device import TORCH_DTYPES
from planner.measure import token_batch
from planner.steptime.kernel_probes import MAX_REPEATS, MIN_REPEATS, Timed, median_timing, time_after_untimed_run
from planner.steptime.ops import StepTrace, first_phase
from planner.steptime.trace import record_step, run_step
from planner.workload import Workload

# The debug model at a small workload: its step is mostly dispatch, so its time less its kernels is the host's.
CALIBRATION_WORKLOAD = Workload(batch_size=1, context_length=16, prediction_length=4, num_samples=2)
CALIBRATION_TIME_S = 0.3  # per calibration step timed on its own: milliseconds each, so dozens of repeats


@dataclass
class CalibrationStep:
    """One calibration step: the host phase its timing fits, the step, its trace, and its timings so far."""

    phase: str
    run: Callable[[], None]
    trace: StepTrace
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    def time_once(self) -> None:
        """One timing, after an untimed run: a benchmark's step leaves the caches to its own code and data
        (after a tiny training step at batch 16, context 512 the debug forward's first run took 1.64× its
        second; after a debug expert_only training step at batch 1, 1.11×)."""
        time_after_untimed_run(self.run, self.wall_s, self.cpu_s)

    def timed(self) -> Timed:
        """The median wall time of its timings, with the threads they kept busy (as `typical_time` reports)."""
        if not self.wall_s:
            raise ValueError(f"the {self.phase} calibration step has not been timed")
        return median_timing(self.wall_s, self.cpu_s)


def model_and_batch(config: ChronosMoEConfig, workload: Workload, dtype: str):
    """A seeded model of `config` in `dtype` and a random token batch (ids, mask, labels) at `workload`."""
    torch.manual_seed(0)
    model = build_model_from_config(config, dtype=None if dtype == "fp32" else TORCH_DTYPES[dtype])
    return model, token_batch(config, workload, torch.Generator().manual_seed(0))


def debug_variant(config: ChronosMoEConfig) -> ChronosMoEConfig:
    """The debug model of `config`'s architecture: its MoE settings on debug's backbone (MoE blocks at their
    default, every odd block: a config's own may not exist in debug's). A step's ops cost the host more or
    less per op with its architecture (a debug forward at batch 1, context 64 took 1.29–1.32× the dense
    calibration step's CPU time per op with MoE-16 shared_then_expert, 1.07–1.14× dense, in four processes):
    its host terms are fitted on its own mix of ops."""
    return replace(config, dims=make_config("debug").dims, encoder_moe_blocks=None, decoder_moe_blocks=None)


def calibration_run(config: ChronosMoEConfig, workload: Workload, dtype: str,
                    mode: str) -> tuple[Callable[[], None], StepTrace]:
    """A calibration step of `mode` (forward or forecast) on a seeded model of `config` at `workload`, run once,
    and its trace."""
    model, batch = model_and_batch(config, workload, dtype)
    run = lambda: run_step(model, batch, workload, mode, generator=torch.Generator().manual_seed(0))  # noqa: E731
    run()
    return run, record_step(model, batch, workload, mode, generator=torch.Generator().manual_seed(0))


def training_steps(dtype: str, config: ChronosMoEConfig | None = None) -> list[CalibrationStep]:
    """The training step's calibration steps on a debug model (`config`, the dense one by default), each on
    its own copy: its forward and backward (phase "backward": the forward's part is priced apart), and its
    AdamW step, on gradients made once (the forward and backward leaves none behind, so the two can
    alternate)."""
    config = config or make_config("debug")
    backward_model, batch = model_and_batch(config, CALIBRATION_WORKLOAD, dtype)
    train_trace = record_step(backward_model, batch, CALIBRATION_WORKLOAD, "train")

    def forward_backward():
        run_step(backward_model, batch, CALIBRATION_WORKLOAD, "train")
        backward_model.zero_grad(set_to_none=True)

    optimizer_model, _ = model_and_batch(config, CALIBRATION_WORKLOAD, dtype)
    optimizer = torch.optim.AdamW(optimizer_model.parameters(), lr=0.0)
    run_step(optimizer_model, batch, CALIBRATION_WORKLOAD, "train")
    optimizer.step()  # the first step creates the moments: the timed ones are steady-state steps
    return [CalibrationStep("backward", forward_backward, train_trace),
            CalibrationStep("optimizer", optimizer.step, train_trace)]


def state_steps(mode: str, dtype: str, config: ChronosMoEConfig | None = None) -> list[CalibrationStep]:
    """The calibration steps of the phases a `mode` step dispatches: its first phase's dispatch-bound step, and
    for a training step its backward's and its optimizer's, on a debug model (`config`: the dense one by
    default, or the priced step's own architecture's, `debug_variant`)."""
    config = config or make_config("debug")
    phase = first_phase(mode)
    run, trace = calibration_run(config, CALIBRATION_WORKLOAD, dtype, phase)
    return [CalibrationStep(phase, run, trace)] + (training_steps(dtype, config) if mode == "train" else [])


def time_alternately(steps: list[CalibrationStep], min_time_s: float = CALIBRATION_TIME_S) -> None:
    """Time `steps` one after another, round after round, until each has MIN_REPEATS timings and all of them
    together `min_time_s` per step (MAX_REPEATS rounds at most)."""
    rounds = 0
    while rounds < MAX_REPEATS and (rounds < MIN_REPEATS or
                                    sum(sum(step.wall_s) for step in steps) < min_time_s * len(steps)):
        for step in steps:
            step.time_once()
        rounds += 1
