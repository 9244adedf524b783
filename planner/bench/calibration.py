"""Calibrating the roofline on this device: the probe's rates, then the share of them a real forward reaches.

A roofline of matmuls and bytes leaves out what a transformer also spends time on: the softmax over the
attention scores, norms, residual adds, the copies that make q, k, v contiguous, and matmuls too small to
run at full speed. Rather than model each, the calibration times one reference forward (tiny, dense, the
Chronos context and prediction lengths, batch 4: a second or two on a laptop CPU, milliseconds on a GPU) and
keeps efficiency = roofline time ÷ measured time, which then divides every prediction on this device.
The reference is not a size the targets are checked on, so the check is not circular. Like the probe it is
timed on `device.busy_clock` (on CPU: CPU time ÷ threads), so neighbours on a shared machine do not leak
into the calibration.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from model.build import build_model_from_config
from planner.bench.device import TORCH_DTYPES, busy_clock
from planner.bench.phases import estimate_step_time_s
from planner.bench.roofline import DeviceRoofline, measure_best_time_s, measure_roofline
from planner.bench.spec import BenchSpec
from planner.bench.steps import make_step

REFERENCE = dict(size="tiny", num_experts=0, mode="forward", batch_size=4, context_length=512, prediction_length=64)


def calibrate_roofline(device: str, dtype: str, device_name: str, synchronize: Callable[[], None]) -> DeviceRoofline:
    """Probe the device, then time the reference forward (best repeat) and set the roofline's efficiency."""
    clock = busy_clock(device)
    clock_name = "cpu time / threads" if device == "cpu" else "wall"
    roofline = measure_roofline(device, dtype, device_name, synchronize, clock, clock_name)
    reference = BenchSpec(**REFERENCE, device=device, dtype=dtype)
    model = build_model_from_config(reference.model_config(), device=device, dtype=TORCH_DTYPES[dtype])
    reference_s = measure_best_time_s(make_step(reference, model, device), synchronize, clock)
    return dataclasses.replace(roofline, efficiency=estimate_step_time_s(reference, roofline) / reference_s)
