"""Step time from the ops a step dispatches (issue: "Step time you can trust"; performance.md).

- `trace.trace_step` / `trace_cache.load_or_trace`: every ATen op of a forward, training step or forecast,
  with FLOPs, bytes, dtype and kind, by shape-only execution of the real modules (torch; cached on disk);
- `devices`: the interface of a device model and how ops are classed for it; this machine's
  (`measured.MeasuredDevice`, from `probe.probe_device`, cached by `device_cache`, its curves in `curves`) and
  GPUs' (`gpu_presets.GPU_PRESETS`, datasheets and published measurements, each cited);
- `predict.predict_step_time(trace, device)` -> `StepTime`: seconds split into matmul, memory-bound,
  overhead and sync, and what bounds the step.

`predict_spec` ties them to a benchmark's settings. Only tracing and probing import torch.
"""

from __future__ import annotations

from typing import Optional

from planner.steptime.devices import DeviceModel
from planner.steptime.gpu_presets import GPU_PRESETS, GpuPreset, gpu_preset
from planner.steptime.measured import MeasuredDevice
from planner.steptime.predict import TERMS, StepTime, predict_step_time

__all__ = ["GPU_PRESETS", "TERMS", "DeviceModel", "GpuPreset", "MeasuredDevice", "StepTime", "gpu_preset",
           "predict_spec", "predict_step_time"]


def predict_spec(spec, device: DeviceModel, *, compiled: bool = False, tf32: bool = False,
                 notes: Optional[list[str]] = None) -> StepTime:
    """The predicted step of a BenchSpec on `device` (its trace is made once, then read from the cache).
    What the user should know (exact GEMM timings that could not be saved) is appended to `notes`."""
    from planner.steptime.trace_cache import load_or_trace

    trace = load_or_trace(spec.model_config(), spec.workload(), spec.mode, spec.dtype,
                          foreach_optimizer=device.overlaps_host)  # GPUs: PyTorch's foreach AdamW
    if isinstance(device, MeasuredDevice):  # this machine: its GEMMs timed at the step's exact shapes
        from planner.steptime.device_cache import with_gemm_shapes_of

        device, shape_notes = with_gemm_shapes_of(device, trace)
        if notes is not None:
            notes.extend(shape_notes)
    return predict_step_time(trace, device, compiled=compiled, tf32=tf32)
