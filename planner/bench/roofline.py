"""A calibrated roofline: the predicted time of a phase is max(FLOPs ÷ matmul throughput, bytes ÷ bandwidth),
divided by the device's measured efficiency.

On this device, a short probe (`measure_roofline`: a square matmul and a large copy, in the run's dtype)
gives the throughput and the bandwidth; then `calibration.calibrate_roofline` times a reference forward
and keeps the share of the roofline a real model reaches (softmax, norms, copies and small matmuls are what
a roofline of matmuls alone leaves out). Both are cached per device and dtype in roofline.json under the
cache folder. `DEVICE_PRESETS` hold datasheet peaks to predict for a device one does not have; with no
model measured there, their efficiency is 1 and their predictions are lower bounds on time.

The probe alone imports torch, lazily: the presets and the predictions are plain Python.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

from planner.bench.cache import cache_dir

ROOFLINE_FILE = "roofline.json"
PROBE_MIN_TIME_S = 0.3  # per quantity: long enough to average out timer noise, short enough to feel instant
PROBE_MIN_REPEATS, PROBE_MAX_REPEATS = 3, 50
# Square matmul side and copy size by device: large enough to run at full speed, small enough to take < 1 s.
PROBE_MATMUL_SIDE = {"cpu": 1024, "mps": 4096, "cuda": 8192}
PROBE_COPY_BYTES = {"cpu": 64 * 2**20, "mps": 256 * 2**20, "cuda": 2**30}


@dataclass(frozen=True)
class DeviceRoofline:
    """What one device reaches in one dtype: `source` is "probe" (measured here) or "preset" (datasheet).
    `efficiency` is the share of the roofline a reference forward reached here (1 for a preset).
    Predictions from a CPU probe are of the time with the cores to oneself."""

    device_name: str
    dtype: str
    matmul_flops_per_s: float
    bandwidth_bytes_per_s: float
    efficiency: float
    source: str
    clock: str  # what the probe timed: "wall" (GPU, presets) or "cpu time / threads" (CPU, see device.busy_clock)

    @classmethod
    def from_dict(cls, values: dict) -> "DeviceRoofline":
        return cls(**values)


@dataclass(frozen=True)
class DevicePreset:
    """Datasheet peaks: dense (no 2:4 sparsity) matmul FLOP/s per dtype, and memory bandwidth.

    fp32 is the non-tensor-core rate, since PyTorch leaves TF32 matmuls off by default; a dtype the device
    cannot compute in natively is absent.
    """

    name: str
    flops_per_s: dict[str, float]
    bandwidth_bytes_per_s: float


def _same_rate(flops_per_s: float) -> dict[str, float]:
    """Apple GPUs run fp16/bf16 at their fp32 rate."""
    return {"fp32": flops_per_s, "bf16": flops_per_s, "fp16": flops_per_s}


DEVICE_PRESETS: dict[str, DevicePreset] = {
    "h100-sxm": DevicePreset("NVIDIA H100 SXM", {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12}, 3.35e12),
    "h100-pcie": DevicePreset("NVIDIA H100 PCIe", {"fp32": 51e12, "bf16": 756e12, "fp16": 756e12}, 2.0e12),
    "a100-40gb": DevicePreset("NVIDIA A100 40GB SXM", {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12}, 1.555e12),
    "a100-80gb": DevicePreset("NVIDIA A100 80GB SXM", {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12}, 2.039e12),
    "l4": DevicePreset("NVIDIA L4", {"fp32": 30.3e12, "bf16": 121e12, "fp16": 121e12}, 300e9),
    "t4": DevicePreset("NVIDIA T4", {"fp32": 8.1e12, "fp16": 65e12}, 320e9),
    "rtx-4090": DevicePreset("NVIDIA GeForce RTX 4090", {"fp32": 82.6e12, "bf16": 165.2e12, "fp16": 165.2e12}, 1.008e12),
    "apple-m1": DevicePreset("Apple M1 (8-core GPU)", _same_rate(2.6e12), 68.25e9),
    "apple-m1-max": DevicePreset("Apple M1 Max (32-core GPU)", _same_rate(10.4e12), 400e9),
    "apple-m2": DevicePreset("Apple M2 (10-core GPU)", _same_rate(3.6e12), 100e9),
    "apple-m2-max": DevicePreset("Apple M2 Max (38-core GPU)", _same_rate(13.6e12), 400e9),
    "apple-m2-ultra": DevicePreset("Apple M2 Ultra (76-core GPU)", _same_rate(27.2e12), 800e9),
}


def preset_roofline(preset: str, dtype: str) -> DeviceRoofline:
    """The datasheet roofline of a preset device (a key of DEVICE_PRESETS) in `dtype`."""
    if preset not in DEVICE_PRESETS:
        raise ValueError(f"device preset must be one of {', '.join(DEVICE_PRESETS)}, got {preset!r}")
    device = DEVICE_PRESETS[preset]
    if dtype not in device.flops_per_s:
        raise ValueError(f"dtype {dtype} is not supported natively by {device.name}; "
                         f"use one of {', '.join(device.flops_per_s)}")
    return DeviceRoofline(device.name, dtype, device.flops_per_s[dtype], device.bandwidth_bytes_per_s, 1.0, "preset",
                          "wall")


@dataclass(frozen=True)
class Phase:
    """A stretch of work the roofline prices at once, repeated `count` times (decoding steps)."""

    name: str
    flops: int  # per occurrence, the planner's FLOPs
    bytes: int  # per occurrence: weights read, caches read, outputs written
    count: int = 1


def estimate_phase_time_s(phase: Phase, roofline: DeviceRoofline) -> float:
    """One occurrence: bound by compute or by memory traffic, whichever takes longer, at the device's efficiency."""
    bound_s = max(phase.flops / roofline.matmul_flops_per_s, phase.bytes / roofline.bandwidth_bytes_per_s)
    return bound_s / roofline.efficiency


def estimate_time_s(phases: Iterable[Phase], roofline: DeviceRoofline) -> float:
    """The whole step: its phases one after another."""
    return sum(phase.count * estimate_phase_time_s(phase, roofline) for phase in phases)


# --- the cache ---------------------------------------------------------------------------------------------


def _cache_file():
    return cache_dir() / ROOFLINE_FILE


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):  # absent or damaged: probe again
        return {}


def load_cached_roofline(device_name: str, dtype: str) -> Optional[DeviceRoofline]:
    entry = _read_cache().get(device_name, {}).get(dtype)
    try:
        return DeviceRoofline.from_dict(entry) if entry else None
    except TypeError:  # written by an older version, without a field: calibrate again
        return None


def save_roofline(roofline: DeviceRoofline) -> None:
    """Store a probe's result (atomically: another process may be reading the file)."""
    cache = _read_cache()
    cache.setdefault(roofline.device_name, {})[roofline.dtype] = asdict(roofline)
    path = _cache_file()
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(cache, indent=2) + "\n")
    temporary.replace(path)


# --- the probe ---------------------------------------------------------------------------------------------


def measure_best_time_s(run: Callable[[], object], synchronize: Callable[[], None], clock: Callable[[], float]) -> float:
    """The shortest time of `run` on `clock`, after one untimed call, over at least PROBE_MIN_REPEATS repeats
    and PROBE_MIN_TIME_S.

    The best repeat, not the median: other processes can only slow a repeat down, and the roofline is
    meant to describe the device, not whatever else was running while it was probed.
    """
    run()
    synchronize()
    times_s: list[float] = []
    while len(times_s) < PROBE_MIN_REPEATS or (sum(times_s) < PROBE_MIN_TIME_S and len(times_s) < PROBE_MAX_REPEATS):
        start = clock()
        run()
        synchronize()
        times_s.append(clock() - start)
    return max(min(times_s), 1e-9)  # a coarse CPU clock can read 0 for a fast repeat


def measure_roofline(device: str, dtype: str, device_name: str, synchronize: Callable[[], None],
                     clock: Callable[[], float], clock_name: str) -> DeviceRoofline:
    """Probe this device: FLOP/s of an n×n×n matmul and bytes/s of a large copy (read + write), in `dtype`
    (efficiency 1: `calibration.calibrate_roofline` measures it)."""
    import torch  # only the probe needs torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    side = PROBE_MATMUL_SIDE[device]
    left = torch.randn(side, side, device=device, dtype=torch_dtype)
    right = torch.randn(side, side, device=device, dtype=torch_dtype)
    flops_per_s = 2 * side**3 / measure_best_time_s(lambda: left @ right, synchronize, clock)
    del left, right
    elements = PROBE_COPY_BYTES[device] // (torch.finfo(torch_dtype).bits // 8)
    source = torch.ones(elements, device=device, dtype=torch_dtype)
    target = torch.empty_like(source)
    copy_bytes = 2 * source.numel() * source.element_size()  # read and written
    bandwidth = copy_bytes / measure_best_time_s(lambda: target.copy_(source), synchronize, clock)
    return DeviceRoofline(device_name, dtype, flops_per_s, bandwidth, 1.0, "probe", clock_name)
