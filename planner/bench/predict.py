"""Predictions without running: a BenchSpec's step time and peak memory on a device one names.

Devices: `this-machine` (this CPU's probed model: cached, or probed once, a few seconds) or a GPU preset
(`planner.steptime.GPU_PRESETS`: datasheets and published measurements, cited in devices.py). Every row
carries the workload it predicts (variant, mode, batch, lengths, samples, dtype, compile and TF32 what-ifs),
so an export says what was asked.
"""

from __future__ import annotations

from typing import Any

from model.checks import SettingError
from planner.bench.preflight import estimate_peak_bytes
from planner.bench.spec import BenchSpec
from planner.steptime import GPU_PRESETS, DeviceModel, gpu_preset, predict_spec

LOCAL_DEVICE = "this-machine"
PREDICTION_DEVICES = (LOCAL_DEVICE, *GPU_PRESETS)
WORKLOAD_KEYS = ("size", "architecture", "num_experts", "top_k", "dispatch", "mode", "batch_size", "context_length",
                 "prediction_length", "num_samples", "dtype")


def prediction_device(name: str, dtype: str) -> tuple[DeviceModel, list[str]]:
    """The device model `name` stands for (a ValueError listing the valid names otherwise), with notes."""
    if name == LOCAL_DEVICE:
        from planner.bench.device import describe_device  # torch: only for this machine's probe
        from planner.steptime.device_cache import measured_device

        return measured_device(describe_device("cpu"), dtype)
    if name not in GPU_PRESETS:
        raise ValueError(f"unknown device {name!r}; valid devices: {', '.join(PREDICTION_DEVICES)}")
    preset = gpu_preset(name)
    if dtype not in preset.matmul_peaks:
        raise SettingError("dtype", f"dtype {dtype} is not supported natively by {preset.name}; "
                         f"use one of {', '.join(d for d in preset.matmul_peaks if d != 'tf32')}")
    return preset, []


def predict_row(spec: BenchSpec, device_name: str, *, compiled: bool = False, tf32: bool = False) -> dict[str, Any]:
    """One prediction as a flat row: the workload, the device, the split of the predicted step, peak memory."""
    if tf32 and spec.dtype != "fp32":
        raise ValueError(f"tf32 applies to fp32 matmuls; the dtype is {spec.dtype}")
    model, notes = prediction_device(device_name, spec.dtype)
    if tf32 and "tf32" not in getattr(model, "matmul_peaks", {}):
        raise ValueError(f"{model.name} has no TF32 matmul rate; drop tf32")
    predicted = predict_spec(spec, model, compiled=compiled, tf32=tf32, notes=notes)
    memory_device = "cpu" if device_name == LOCAL_DEVICE else "mps" if device_name.startswith("apple") else "cuda"
    return {
        "label": spec.label,
        **{key: getattr(spec, key) for key in WORKLOAD_KEYS},
        "device": device_name,
        "device_name": model.name,
        "device_model_source": model.source,
        "compiled": compiled,
        "tf32": tf32,
        **predicted.row(),
        "predicted_peak_bytes": estimate_peak_bytes(spec, memory_device),
        "notes": "; ".join(notes),
    }
