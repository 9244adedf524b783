"""A whole training run in hours and money: the step time model's micro-steps, communication, the optimizer.

One optimizer step on each of n devices (planner.parallel's strategies; the micro-batch is per device):
- compute: `accumulation` micro-steps, each the traced forward and backward at the micro-batch priced on the
  GPU preset (planner.steptime), plus one more forward per micro-step under activation checkpointing (every
  block is recomputed in the backward);
- optimizer: the traced AdamW step; ZeRO-1/2/3 step a 1/n shard of the states (their kernels' time / n, the
  dispatch overhead whole); expert parallel the parameters a device holds;
- communication: planner.communication's collectives on the run's link. With overlap on, the collectives
  of the backward hide behind the backward's compute and ZeRO-3's forward all-gathers behind the forward's
  (bucketed, prefetched: what DDP and FSDP do), only what exceeds that compute shows; expert parallel's
  all-to-alls and the optimizer's all-gather never hide (the next compute waits for them);
- data: an optional input-pipeline ceiling in series/s sets a floor of global batch ÷ ceiling per step.

step = max(compute + optimizer + exposed communication, data); hours = steps × step / 3600; device-hours =
hours × n; cost = device-hours × price per device-hour. MFU = the step's model FLOPs (planner.flops: 3 ×
forward per series, no recomputation) ÷ (step × n × the GPU's datasheet peak in the run's matmul dtype).
What bounds the step is the largest of: compute (matmul kernels), memory traffic (memory-bound kernels),
overhead (dispatch and syncs the GPU waits for), communication (exposed), data.

Precision: fp32 (fp32 matmuls on CUDA cores), tf32 (fp32 storage, TF32 matmuls: what Chronos' training
configs set), amp_bf16 / amp_fp16 (autocast over fp32 weights), bf16 (pure bf16 weights; priced with the
autocast bf16 trace, its memory with bf16 weights and gradients).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from model.checks import SettingError, check_int
from model.config import ChronosMoEConfig
from planner.communication import Collective, Link, collective_time_s, step_collectives
from planner.cost.links import run_link
from planner.cost.prices import PRICES
from planner.flops import count_flops
from planner.headroom import Headroom
from planner.parallel import DEVICE_MEMORY, STRATEGIES, device_plan_headroom, plan_devices
from planner.params import count_params, count_trainable_params, experts_per_device
from planner.steptime import StepTime, gpu_preset, predict_step_time
from planner.steptime.ops import StepTrace
from planner.workload import CONTEXT_LENGTH, OPTIMIZERS, PREDICTION_LENGTH, Workload

PRECISIONS = ("fp32", "tf32", "amp_bf16", "amp_fp16", "bf16")
TRACE_DTYPE = {"fp32": "fp32", "tf32": "fp32", "amp_bf16": "bf16", "amp_fp16": "fp16", "bf16": "bf16"}
MEMORY_REGIME = {"fp32": "fp32", "tf32": "fp32", "amp_bf16": "amp_bf16", "amp_fp16": "amp_fp16", "bf16": "bf16"}
MATMUL_PEAK = {"fp32": "fp32", "tf32": "tf32", "amp_bf16": "bf16", "amp_fp16": "fp16", "bf16": "bf16"}
BOUNDS = ("compute", "memory traffic", "overhead", "communication", "data")
MAX_STEPS = 10**12
PRICED_GPUS = tuple(key for key in PRICES if key in DEVICE_MEMORY)  # the presets with a price and a memory size
MAX_DEVICES = 100_000
DEFAULT_NODE_SIZE = 8  # the usual GPU server (DGX/HGX, p4d/p5)


@dataclass(frozen=True)
class TrainingRun:
    """What a user plans: a variant, a workload per series, devices, a strategy, a precision, a price."""

    config: ChronosMoEConfig
    gpu: str  # a GPU preset key (planner.steptime.GPU_PRESETS) with a price and a memory size
    num_devices: int = 1
    devices_per_node: Optional[int] = None  # None: a node of 8 (fewer when the run has fewer devices)
    per_device_batch: int = 32
    gradient_accumulation: int = 1
    steps: int = 1000
    context_length: int = CONTEXT_LENGTH
    prediction_length: int = PREDICTION_LENGTH
    strategy: str = "data_parallel"
    activation_checkpointing: bool = False
    precision: str = "tf32"
    optimizer: str = "adamw"
    trainable: str = "all"  # which parameters learn (model.trainable): fine-tuning prices fewer gradients
    compiled: bool = False
    overlap_communication: bool = True
    data_series_per_s: Optional[float] = None  # the input pipeline's ceiling; None: unlimited
    price_per_device_hour: Optional[float] = None  # None: the preset's on-demand list price
    intra_link: Optional[str] = None  # None: the GPU's usual interconnect (planner.cost.interconnects)
    inter_link: Optional[str] = None

    def __post_init__(self) -> None:
        validate_run(self)

    @property
    def node_size(self) -> int:
        return self.devices_per_node or min(DEFAULT_NODE_SIZE, self.num_devices)

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.num_devices * self.gradient_accumulation

    def micro_workload(self) -> Workload:
        return Workload(batch_size=self.per_device_batch, context_length=self.context_length,
                        prediction_length=self.prediction_length, optimizer=self.optimizer,
                        precision=MEMORY_REGIME[self.precision], trainable=self.trainable)

    def price(self) -> float:
        return PRICES[self.gpu].usd_per_device_hour if self.price_per_device_hour is None else self.price_per_device_hour


def check_count(name: str, value, limit: int) -> None:
    check_int(name, value, 1, limit)


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SettingError(name, f"{name} must be a finite number above 0, got {value!r}")


def check_gpu(gpu: str) -> None:
    if gpu not in PRICED_GPUS:
        raise ValueError(f"gpu must be one of {', '.join(PRICED_GPUS)}, got {gpu!r}")


def validate_run(run: TrainingRun) -> None:
    """ValueError naming the field and what it allows."""
    check_gpu(run.gpu)
    check_count("num_devices", run.num_devices, MAX_DEVICES)
    if run.devices_per_node is not None:
        check_count("devices_per_node", run.devices_per_node, 64)
        if run.devices_per_node > run.num_devices:
            raise SettingError("devices_per_node", f"devices_per_node ({run.devices_per_node}) must not exceed num_devices "
                             f"({run.num_devices})")
    check_count("per_device_batch", run.per_device_batch, 1_000_000)
    check_count("gradient_accumulation", run.gradient_accumulation, 100_000)
    check_count("steps", run.steps, MAX_STEPS)
    if run.strategy not in STRATEGIES:
        raise SettingError("strategy", f"strategy must be one of {', '.join(STRATEGIES)}, got {run.strategy!r}")
    if run.strategy == "expert_parallel" and not run.config.is_moe:
        raise SettingError("strategy", "strategy expert_parallel needs experts (num_experts > 0); use data_parallel or zero*")
    if run.precision not in PRECISIONS:
        raise SettingError("precision", f"precision must be one of {', '.join(PRECISIONS)}, got {run.precision!r}")
    if run.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {run.optimizer!r}")
    preset = gpu_preset(run.gpu)
    if MATMUL_PEAK[run.precision] not in preset.matmul_peaks:
        raise SettingError("precision", f"precision {run.precision} needs {MATMUL_PEAK[run.precision]} matmuls, which "
                         f"{preset.name} lacks; use one of {', '.join(p for p in PRECISIONS if MATMUL_PEAK[p] in preset.matmul_peaks)}")
    if run.data_series_per_s is not None:
        check_positive("data_series_per_s", run.data_series_per_s)
    if run.price_per_device_hour is not None:
        check_positive("price_per_device_hour", run.price_per_device_hour)
    workload = run.micro_workload()  # the workload's own checks (lengths, trainable)
    object.__setattr__(run, "trainable", workload.trainable)  # one spelling of each regime
    count_trainable_params(count_params(run.config), run.trainable, run.config.label)  # refused if nothing learns


def global_batch_split(global_batch: int, num_devices: int, gradient_accumulation: int = 1) -> int:
    """The per-device micro-batch of a global batch, or a ValueError when it does not divide."""
    check_count("global_batch", global_batch, 100_000_000)
    check_count("num_devices", num_devices, MAX_DEVICES)
    check_count("gradient_accumulation", gradient_accumulation, 100_000)
    if global_batch % (num_devices * gradient_accumulation):
        raise SettingError("global_batch", f"global_batch {global_batch} is not divisible by devices × accumulation "
                         f"({num_devices} × {gradient_accumulation} = {num_devices * gradient_accumulation})")
    return global_batch // (num_devices * gradient_accumulation)


def steps_for(global_batch: int, *, tokens: Optional[float] = None, epochs: Optional[float] = None,
              series: Optional[int] = None, context_length: int = CONTEXT_LENGTH,
              prediction_length: int = PREDICTION_LENGTH) -> int:
    """Optimizer steps to see `tokens` tokens (encoder + decoder tokens per series), or `epochs` passes over
    `series` series, at `global_batch` series per step (rounded up)."""
    if tokens is not None:
        check_positive("tokens", tokens)
        per_series = (context_length + 1) + (prediction_length + 1)
        return max(1, math.ceil(tokens / (global_batch * per_series)))
    if epochs is None or series is None:
        raise SettingError("steps", "steps: give steps, tokens, or epochs with series")
    check_positive("epochs", epochs)
    check_positive("series", series)
    return max(1, math.ceil(epochs * series / global_batch))


@dataclass(frozen=True)
class MicroStep:
    """The time model's pieces of one training step at the micro-batch, on one GPU."""

    forward: StepTime
    backward: StepTime
    optimizer: StepTime


def _phase(trace: StepTrace, phase: str) -> StepTrace:
    return StepTrace(tuple((op, count) for op, count in trace.ops if op.phase == phase))


def micro_step(run: TrainingRun) -> MicroStep:
    """Forward, backward and optimizer of one micro-step, priced on the run's GPU preset."""
    from planner.steptime.trace_cache import load_or_trace  # torch loads only when a trace must be made

    preset = gpu_preset(run.gpu)
    trace = load_or_trace(run.config, run.micro_workload(), "train", TRACE_DTYPE[run.precision],
                          foreach_optimizer=True)
    tf32 = run.precision == "tf32"
    return MicroStep(*(predict_step_time(_phase(trace, phase), preset, compiled=run.compiled, tf32=tf32)
                       for phase in ("forward", "backward", "optimizer")))


@dataclass(frozen=True)
class RunEstimate:
    """A training run's prediction. Seconds are per optimizer step unless named otherwise."""

    run: TrainingRun
    compute_s: float
    optimizer_s: float
    communication_s: float  # every collective's time
    exposed_communication_s: float  # what compute does not hide
    data_s: float
    step_time_s: float
    split_s: dict[str, float]  # BOUNDS -> seconds
    model_flops_per_step: int
    mfu: float
    headroom: Headroom
    link: Link
    collectives: tuple[tuple[Collective, float], ...] = field(default=())  # with each one's seconds per step

    @property
    def hours(self) -> float:
        return self.run.steps * self.step_time_s / 3600

    @property
    def device_hours(self) -> float:
        return self.hours * self.run.num_devices

    @property
    def cost_usd(self) -> float:
        return self.device_hours * self.run.price()

    @property
    def bound(self) -> str:
        return max(self.split_s, key=self.split_s.get)

    def row(self) -> dict[str, object]:
        run = self.run
        return {
            "gpu": run.gpu, "devices": run.num_devices, "devices_per_node": run.node_size,
            "strategy": run.strategy, "activation_checkpointing": run.activation_checkpointing,
            "precision": run.precision, "compiled": run.compiled, "per_device_batch": run.per_device_batch,
            "gradient_accumulation": run.gradient_accumulation, "global_batch": run.global_batch,
            "steps": run.steps, "step_time_s": self.step_time_s, "compute_s": self.compute_s,
            "optimizer_s": self.optimizer_s, "communication_s": self.communication_s,
            "exposed_communication_s": self.exposed_communication_s, "data_s": self.data_s,
            "hours": self.hours, "device_hours": self.device_hours, "price_per_device_hour": run.price(),
            "cost_usd": self.cost_usd, "mfu": self.mfu, "bound": self.bound,
            **{f"bound_{name.replace(' ', '_')}_s": seconds for name, seconds in self.split_s.items()},
            "peak_bytes": self.headroom.peak_bytes, **self.headroom.row(), "link": self.link.name,
        }


def _optimizer_share(step: StepTime, run: TrainingRun) -> StepTime:
    """The optimizer step on one device: ZeRO-1/2/3 run its kernels on a 1/n shard of the states, expert
    parallel on the parameters the device holds; the dispatch overhead stays whole (as many tensors)."""
    share = 1.0
    if run.strategy in ("zero1", "zero2", "zero3"):
        share = 1 / run.num_devices
    elif run.strategy == "expert_parallel":
        params = count_params(run.config)
        share = params.with_experts(experts_per_device(params.num_experts, run.num_devices)) / params.total_params
    return dataclasses.replace(step, matmul_s=step.matmul_s * share, memory_s=step.memory_s * share)


def price_training_run(run: TrainingRun, micro: Optional[MicroStep] = None) -> RunEstimate:
    """The run's step time, hours, cost, MFU, bound and headroom (see the module docstring). `micro` may be
    passed when the same micro-step prices many runs (the search)."""
    link = run_link(run.gpu, run.num_devices, run.node_size, run.intra_link, run.inter_link)  # checked first
    micro = micro_step(run) if micro is None else micro
    a = run.gradient_accumulation
    recompute = micro.forward if run.activation_checkpointing else None
    per_micro = [micro.forward, micro.backward] + ([recompute] if recompute else [])
    forward_s = a * (micro.forward.total_s + (recompute.total_s if recompute else 0.0))
    backward_s = a * micro.backward.total_s
    compute_s = forward_s + backward_s
    optimizer = _optimizer_share(micro.optimizer, run)
    optimizer_s = optimizer.total_s

    collectives = step_collectives(run.config, run.micro_workload(), run.strategy, run.num_devices,
                                   MEMORY_REGIME[run.precision])
    timed = tuple((c, collective_time_s(c, link) * (a if c.per_micro_step else 1)) for c in collectives)
    communication_s = sum(seconds for _, seconds in timed)
    by_phase = {phase: sum(s for c, s in timed if c.phase == phase and c.kind != "all_to_all")
                for phase in ("forward", "backward", "optimizer")}
    all_to_all_s = sum(s for c, s in timed if c.kind == "all_to_all")
    if run.overlap_communication:
        exposed = (max(0.0, by_phase["forward"] - forward_s) + max(0.0, by_phase["backward"] - backward_s)
                   + by_phase["optimizer"] + all_to_all_s)
    else:
        exposed = communication_s
    data_s = run.global_batch / run.data_series_per_s if run.data_series_per_s else 0.0
    busy_s = compute_s + optimizer_s + exposed
    step_s = max(busy_s, data_s)

    pieces = per_micro * a + [optimizer]
    split = {"compute": sum(p.matmul_s for p in pieces), "memory traffic": sum(p.memory_s for p in pieces),
             "overhead": sum(p.overhead_s + p.sync_s for p in pieces), "communication": exposed,
             "data": data_s if data_s > busy_s else 0.0}

    flops = count_flops(run.config, Workload(batch_size=run.global_batch, context_length=run.context_length,
                                             prediction_length=run.prediction_length,
                                             trainable=run.trainable)).train_flops
    peak = gpu_preset(run.gpu).matmul_peaks[MATMUL_PEAK[run.precision]]
    mfu = flops / (step_s * run.num_devices * peak)

    plan = plan_devices(run.config, run.micro_workload(), run.strategy, run.num_devices,
                        activation_checkpointing=run.activation_checkpointing,
                        precision=MEMORY_REGIME[run.precision])
    headroom = device_plan_headroom(plan, run.config, run.micro_workload(), DEVICE_MEMORY[run.gpu][1],
                                    precision=MEMORY_REGIME[run.precision])
    return RunEstimate(run, compute_s, optimizer_s, communication_s, exposed, data_s, step_s, split, flops, mfu,
                       headroom, link, timed)
