"""A forecasting service in devices and money: latency per batch, throughput, devices for a deadline.

Each device runs forecasts of `batch_size` series at a time, N sample paths each (planner.steptime's traced
forecast: the encoder once, then every decoding step with the KV cache and the sampling, priced on the GPU
preset). Then:
- latency = the predicted forecast time of one batch; series/s per device = batch ÷ latency;
- devices needed = ceil(series ÷ (series/s per device × deadline));
- cost per million forecasts = price per device-hour ÷ (series/s per device × 3600) × 10⁶ (busy devices;
  idle time is not priced), and the whole job's cost = devices × the hours they run × price.
The batch that maximises throughput is searched over powers of two (1 … max_batch) among those whose
forecast memory (planner.memory: weights, KV cache, encoder copies, the largest activation) fits the device
with headroom (planner.headroom: CUDA context and allocator reserve); it stops once doubling the batch gains
under STOP_GAIN (the throughput has levelled off: larger batches only add latency).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from model.checks import SettingError
from model.config import ChronosMoEConfig
from planner.cost.prices import PRICES
from planner.cost.training import check_count, check_gpu, check_positive
from planner.headroom import Headroom, check_headroom
from planner.memory import estimate_forecast_memory
from planner.parallel import DEVICE_MEMORY
from planner.params import count_params
from planner.steptime import StepTime, gpu_preset, predict_step_time
from planner.workload import CONTEXT_LENGTH, NUM_SAMPLES, PREDICTION_LENGTH, Workload

SERVICE_DTYPES = ("fp32", "bf16", "fp16")
MAX_BATCH = 1024  # 20,480 sample paths at once: past every GPU's throughput knee for Chronos sizes
STOP_GAIN = 0.03
MAX_SERIES = 10**13


@dataclass(frozen=True)
class ForecastService:
    """Forecast `series` series within `deadline_hours` on GPUs of preset `gpu`."""

    config: ChronosMoEConfig
    gpu: str
    series: int = 1_000_000
    deadline_hours: float = 24.0
    num_samples: int = NUM_SAMPLES
    context_length: int = CONTEXT_LENGTH
    prediction_length: int = PREDICTION_LENGTH
    dtype: str = "bf16"
    batch_size: Optional[int] = None  # None: the throughput-maximising batch that fits
    max_batch: int = MAX_BATCH  # the largest batch the search tries
    compiled: bool = False
    tf32: bool = False
    price_per_device_hour: Optional[float] = None

    def __post_init__(self) -> None:
        check_gpu(self.gpu)
        check_count("series", self.series, MAX_SERIES)
        check_positive("deadline_hours", self.deadline_hours)
        if self.price_per_device_hour is not None:
            check_positive("price_per_device_hour", self.price_per_device_hour)
        if self.dtype not in SERVICE_DTYPES:
            raise SettingError("dtype", f"dtype must be one of {', '.join(SERVICE_DTYPES)}, got {self.dtype!r}")
        peaks = gpu_preset(self.gpu).matmul_peaks
        if self.dtype != "fp32" and self.dtype not in peaks:
            raise SettingError("dtype", f"dtype {self.dtype}: {gpu_preset(self.gpu).name} has no {self.dtype} matmuls; "
                             f"use one of {', '.join(d for d in SERVICE_DTYPES if d in peaks)}")
        if self.batch_size is not None:
            check_count("batch_size", self.batch_size, MAX_BATCH)
        check_count("max_batch", self.max_batch, MAX_BATCH)
        self.workload(1)  # the lengths' and samples' own checks

    def workload(self, batch_size: int) -> Workload:
        return Workload(batch_size=batch_size, context_length=self.context_length,
                        prediction_length=self.prediction_length, num_samples=self.num_samples, dtype=self.dtype)

    def price(self) -> float:
        return PRICES[self.gpu].usd_per_device_hour if self.price_per_device_hour is None else self.price_per_device_hour


@dataclass(frozen=True)
class BatchOption:
    """One batch size on one device: its predicted forecast and its memory."""

    batch_size: int
    step: StepTime
    headroom: Headroom

    @property
    def latency_s(self) -> float:
        return self.step.total_s

    @property
    def series_per_s(self) -> float:
        return self.batch_size / self.latency_s


@dataclass(frozen=True)
class ServiceEstimate:
    service: ForecastService
    chosen: BatchOption
    options: tuple[BatchOption, ...]  # every batch tried, ascending

    @property
    def devices_needed(self) -> int:
        return max(1, math.ceil(self.service.series / (self.chosen.series_per_s * self.service.deadline_hours * 3600)))

    @property
    def cost_per_million_usd(self) -> float:
        return self.service.price() / (self.chosen.series_per_s * 3600) * 1e6

    @property
    def job_hours(self) -> float:
        """Wall hours for the series on `devices_needed` devices."""
        return self.service.series / (self.chosen.series_per_s * self.devices_needed) / 3600

    @property
    def cost_usd(self) -> float:
        return self.service.series / 1e6 * self.cost_per_million_usd

    def row(self) -> dict[str, object]:
        s, chosen = self.service, self.chosen
        return {
            "gpu": s.gpu, "dtype": s.dtype, "series": s.series, "deadline_hours": s.deadline_hours,
            "num_samples": s.num_samples, "context_length": s.context_length,
            "prediction_length": s.prediction_length, "compiled": s.compiled, "batch_size": chosen.batch_size,
            "latency_s": chosen.latency_s, "series_per_s_per_device": chosen.series_per_s,
            "devices_needed": self.devices_needed, "job_hours": self.job_hours,
            "price_per_device_hour": s.price(), "cost_per_million_usd": self.cost_per_million_usd,
            "cost_usd": self.cost_usd, "bound": chosen.step.bound, "peak_bytes": chosen.headroom.peak_bytes,
            **chosen.headroom.row(),
        }


def price_batch(service: ForecastService, batch_size: int) -> BatchOption:
    """The predicted forecast of one batch on the service's GPU, and whether its memory fits."""
    from planner.steptime.trace_cache import load_or_trace  # torch loads only when a trace must be made

    workload = service.workload(batch_size)
    memory = estimate_forecast_memory(service.config, workload, count_params(service.config))
    headroom = check_headroom(memory.total_bytes, DEVICE_MEMORY[service.gpu][1])
    trace = load_or_trace(service.config, workload, "forecast", service.dtype, foreach_optimizer=True)
    step = predict_step_time(trace, gpu_preset(service.gpu), compiled=service.compiled, tf32=service.tf32)
    return BatchOption(batch_size, step, headroom)


def plan_service(service: ForecastService) -> ServiceEstimate:
    """The service's estimate at its batch, or at the throughput-maximising batch that fits (see the module
    docstring). ValueError when not even one series fits the device."""
    if service.batch_size is not None:
        option = price_batch(service, service.batch_size)
        return ServiceEstimate(service, option, (option,))
    options: list[BatchOption] = []
    batch = 1
    while batch <= service.max_batch:
        option = price_batch(service, batch)
        if not option.headroom.fits:
            break
        levelled = bool(options) and option.series_per_s < options[-1].series_per_s * (1 + STOP_GAIN)
        options.append(option)
        if levelled:
            break
        batch *= 2
    if not options:
        raise SettingError("batch_size", f"batch_size: one series with {service.num_samples} sample paths does not fit "
                         f"{DEVICE_MEMORY[service.gpu][0]} with headroom; use a larger GPU or fewer samples")
    best = max(options, key=lambda o: o.series_per_s)
    return ServiceEstimate(service, best, tuple(options))
