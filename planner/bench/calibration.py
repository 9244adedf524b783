"""Calibrating the roofline on this device: the probe's rates, then the share of them a real forward reaches.

A roofline of matmuls and bytes leaves out what a transformer also spends time on: the softmax over the
attention scores, norms, residual adds, the copies that make q, k, v contiguous, and matmuls too small to
run at full speed. Rather than model each, the calibration times one reference forward (tiny, dense, the
Chronos context and prediction lengths, batch 4: a second or two on a laptop CPU, milliseconds on a GPU) and
keeps efficiency = roofline time ÷ measured time, which then divides every prediction on this device.
The reference is not a size the targets are checked on, so the check is not circular.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from model.build import build_model_from_config
from planner.bench.device import TORCH_DTYPES
from planner.bench.phases import estimate_step_time_s
from planner.bench.roofline import DeviceRoofline, measure_roofline
from planner.bench.spec import BenchSpec
from planner.bench.steps import make_step
from planner.bench.timing import measure_step_times

REFERENCE = dict(size="tiny", num_experts=0, mode="forward", batch_size=4, context_length=512, prediction_length=64)
REFERENCE_REPEATS = 3  # the best of three, like the probe: other processes can only slow a repeat down


def calibrate_roofline(device: str, dtype: str, device_name: str, synchronize: Callable[[], None]) -> DeviceRoofline:
    """Probe the device, then time the reference forward and set the roofline's efficiency from it."""
    roofline = measure_roofline(device, dtype, device_name, synchronize)
    reference = BenchSpec(**REFERENCE, device=device, dtype=dtype)
    model = build_model_from_config(reference.model_config(), device=device, dtype=TORCH_DTYPES[dtype])
    times = measure_step_times(make_step(reference, model, device), warmup=1, repeats=REFERENCE_REPEATS,
                               synchronize=synchronize)
    return dataclasses.replace(roofline, efficiency=estimate_step_time_s(reference, roofline) / min(times.wall_s))
