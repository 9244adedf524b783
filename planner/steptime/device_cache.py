"""This machine's probed device model, cached per device name and dtype with the probe's date.

A cache entry that is not a valid probe (not an object, a field missing, a rate zero, negative or not a
number: a damaged or hand-edited file) is refused with a one-line reason and probed again, never used.
A probe that cannot be saved is still used for the run at hand; the caller is told why it was not kept.

The exact GEMM shapes a prediction meets are timed once (`with_gemm_shapes_of`, or by a benchmark's re-timing
of its step) and kept in the same entry, merged with what other processes added to the same probe meanwhile;
a new probe starts them afresh.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Optional

from planner.bench.cache import cache_dir
from planner.steptime.measured import DISTURBED_GEMM_FACTOR, MeasuredDevice

DEVICE_MODEL_FILE = "device_model.json"


def _read() -> tuple[dict, Optional[str]]:
    try:
        path = cache_dir() / DEVICE_MODEL_FILE
    except OSError:  # no cache folder can be made: nothing cached (saving will say so)
        return {}, None
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as error:
        return {}, f"the cached device probe {path} is unreadable ({type(error).__name__}); probing again"
    if not isinstance(values, dict):
        return {}, f"the cached device probe {path} is not a JSON object; probing again"
    return values, None


def load_measured_device(device_name: str, dtype: str) -> tuple[Optional[MeasuredDevice], Optional[str]]:
    """(the cached probe of this device and dtype or None, a one-line reason when an entry was refused)."""
    values, problem = _read()
    entry = values.get(device_name, {})
    entry = entry.get(dtype) if isinstance(entry, dict) else entry
    if entry is None:
        return None, problem
    try:
        device = MeasuredDevice.from_dict(entry)
    except ValueError as error:
        return None, f"the cached device probe for {device_name} ({dtype}) was refused: {error}; probing again"
    if device.name != device_name or device.dtype != dtype:
        return None, f"the cached device probe for {device_name} ({dtype}) describes another device; probing again"
    return device, problem


def _same_probe(a: MeasuredDevice, b: MeasuredDevice) -> bool:
    return ((a.measured_on, a.host_s_per_op, a.gemm_in_model_factor, a.gemm_weight_s_per_byte)
            == (b.measured_on, b.host_s_per_op, b.gemm_in_model_factor, b.gemm_weight_s_per_byte))


def save_measured_device(device: MeasuredDevice) -> Optional[str]:
    """Keep a probe (atomically: another process may be reading); a one-line reason if it could not be.
    Exact GEMM timings another process saved for the same probe are kept beside this one's."""
    values, _ = _read()
    entry = values.get(device.name)
    saved = entry.get(device.dtype) if isinstance(entry, dict) else None
    try:
        saved_device = MeasuredDevice.from_dict(saved) if saved is not None else None
    except ValueError:
        saved_device = None
    if saved_device is not None and _same_probe(saved_device, device):
        device = replace(device, gemm_shape_s={**saved_device.gemm_shape_s, **device.gemm_shape_s},
                         gemm_shape_busy={**saved_device.gemm_shape_busy, **device.gemm_shape_busy})
    values[device.name] = {**(entry if isinstance(entry, dict) else {}), device.dtype: device.to_dict()}
    try:
        path = cache_dir() / DEVICE_MODEL_FILE
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(values, indent=1) + "\n")
        temporary.replace(path)
    except OSError as error:
        return f"the device probe was used for this run but could not be saved ({error.strerror or error})"
    return None


def measured_device(device_name: str, dtype: str, recalibrate: bool = False) -> tuple[MeasuredDevice, list[str]]:
    """This machine's device model in `dtype`: the cached probe, or a new one (a few seconds), saved.
    Returns it with notes for the user (a refused cache entry, a probe that could not be kept)."""
    notes: list[str] = []
    device = None
    if not recalibrate:
        device, problem = load_measured_device(device_name, dtype)
        notes += [problem] if problem else []
    if device is None:
        from planner.steptime.probe import probe_device  # torch, only when a probe must run

        device = probe_device(dtype, device_name)
        problem = save_measured_device(device)
        notes += [problem] if problem else []
    return device, notes


def with_gemm_shapes_of(device: MeasuredDevice, trace, timed: Optional[MeasuredDevice] = None
                        ) -> tuple[MeasuredDevice, list[str]]:
    """`device` with every GEMM shape of `trace` (a StepTrace) timed exactly: those it lacks are measured
    now (a second or a few; torch), or taken from `timed` when this process has just timed them there (a
    benchmark's `remeasure_state`: timing them twice would double the run's wait), and saved. Returns it
    with notes for the user."""
    missing = device.missing_gemm_shapes(trace)
    if not missing:
        return device, []
    if timed is not None:
        device = device.with_gemm_timings_of(timed, missing)
    else:
        from planner.steptime.kernel_probes import with_exact_gemms  # torch, only when shapes must be timed

        device = with_exact_gemms(device, trace)
    problem = save_measured_device(device)
    notes = [problem] if problem else []
    if disturbed := device.missing_gemm_shapes(trace):
        notes.append(f"{len(disturbed)} GEMM shape(s) of this step timed more than {DISTURBED_GEMM_FACTOR:g}× slower "
                     f"than this device's probed rates (a busy machine) were not kept: priced from the probed grid")
    return device, notes
