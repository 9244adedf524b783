"""The benchmark's subprocess: one measured run, started by `runner.run_benchmark`, never by hand.

`python -m planner.bench.worker` reads a BenchSpec as JSON on stdin and writes events, one JSON object per
line, on stdout: {"event": "progress", "stage", "done", "total"} while it runs, then exactly one of
{"event": "measured", ...}, {"event": "refused", "message"} or {"event": "error", "message", "traceback"}.
Everything else the libraries print goes to stderr, so stdout carries only the protocol.

Order matters: the device is resolved and the preflight passes before the model code is even imported
(a refusal comes in seconds); the memory baseline is taken before the model is built; the peak is read
after the warm-up steps (see memory_probe for why the allocator is set differently then and for timing);
the prediction comes last (one more step with its ops recorded, then this device's cached probe, or a new
one), so its buffers are not counted.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
import traceback
from typing import Any, Callable, TextIO

from planner.bench.spec import BenchSpec

Emit = Callable[..., None]
PARENT_PID_ENV = "CHRONOS_MOE_BENCH_PARENT_PID"  # the runner's pid: the worker must not outlive it
PR_SET_PDEATHSIG = 1
# On a CPU the timings beside each timed step (below) leave the caches full of their own operands (weight copies
# that pass the last-level cache twice), where a loop of steps finds the step's weights and code: debug's
# training step at batch 1, context 64 took 10.2 ms after them, 8.7 back to back and 9.6 with an untimed step
# between (its forward 1.86, 1.64 and 1.69 ms). One untimed step after them restores a loop's caches; a step
# this long refills them in a share of its time no timing resolves (debug's at batch 16, context 512: 641 ms
# after them, 646 back to back).
WARM_STEP_LIMIT_S = 1.0


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the runner that started it dies (Linux), and exit now if it
    is already gone: an orphaned worker would hold the benchmark lock and measure beside the next run."""
    parent = os.environ.get(PARENT_PID_ENV)
    if parent is None:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if str(os.getppid()) != parent:  # the parent died before the line above took effect
        os._exit(1)


def run(spec: BenchSpec, emit: Emit) -> None:
    # torch and the model code load here, not at import: the spec is parsed before they cost anything.
    import torch

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    from planner.bench.device import available_memory_bytes, check_dtype_supported, describe_device, \
        resolve_device, synchronize
    from planner.bench.preflight import check_preflight

    emit("progress", stage="preflight", done=0, total=1)
    try:
        device = resolve_device(spec.device)
        check_dtype_supported(device, spec.dtype)
    except ValueError as error:  # the device is absent or cannot compute in the dtype: the message says why
        emit("refused", message=str(error))
        return
    available = available_memory_bytes(device)
    verdict = check_preflight(spec, device, available)
    if not verdict.fits:
        emit("refused", message=verdict.message, device=device, predicted_peak_bytes=verdict.predicted_peak_bytes,
             available_memory_bytes=available)
        return

    from model.build import build_model_from_config
    from planner.bench.device import TORCH_DTYPES
    from planner.bench.memory_probe import PeakMemoryProbe, pin_allocator, settle_allocator
    from planner.bench.steps import library_versions, make_step, summarise_usage
    from planner.steptime import MeasuredDevice, predict_step_time
    from planner.steptime.device_cache import with_gemm_shapes_of
    from planner.bench.timing import measure_step_times
    from planner.steptime.host_state import ReferenceGemm, host_drift_note, parallel_speedup, state_note
    from planner.steptime.ops import first_phase
    from planner.steptime.calibration_steps import debug_variant, state_steps
    from planner.steptime.gemms_beside import GemmsBeside
    from planner.steptime.probe import remeasure_state

    probe = PeakMemoryProbe(device)
    pin_allocator()
    probe.start()
    torch.manual_seed(spec.seed)
    emit("progress", stage="build", done=0, total=1)
    dtype = None if spec.mode == "train" else TORCH_DTYPES[spec.dtype]  # training: AMP keeps fp32 weights
    model = build_model_from_config(spec.model_config(), device=device, dtype=dtype,
                                    trainable=spec.trainable if spec.mode == "train" else "all")
    step = make_step(spec, model, device)
    last_output: list[Any] = [None]

    step_seconds: list[float] = []

    def timed_step() -> None:
        start = time.perf_counter()
        last_output[0] = step()  # only the last is kept: its routing gives the usage
        step_seconds.append(time.perf_counter() - start)

    # On a CPU, the calibration steps its prediction fits the host's terms on and the step's heaviest GEMM
    # shapes, timed one of each after each timed step: the step and its prices then see the same seconds of a
    # machine whose speed moves (calibration_steps, gemms_beside).
    # And a reference GEMM after each, timed again beside the prediction's own timings (ReferenceGemm).
    calibration: list = []
    gemms: list = []
    reference: list = []  # made after the warm-up, whose peak memory is the run's

    def on_step(stage: str, done: int, total: int) -> None:
        probe.sample()
        if stage == "measure":
            for beside in (*calibration, *gemms):
                beside.time_once()
            for gemm in reference:
                gemm.during_steps()
            if (calibration or gemms) and done < total and step_seconds[-1] < WARM_STEP_LIMIT_S:
                timed_step()  # untimed: the next timed step finds the caches as a loop of steps leaves them
        emit("progress", stage=stage, done=done, total=total)

    peak: list[int] = []
    speedups: list[float] = []

    def after_warmup() -> None:  # the warm-up measured the memory; the timed steps run as a long run would
        peak.append(probe.peak_bytes())
        if device == "cpu":  # the machine's state for the timed steps (host_state)
            speedups.append(parallel_speedup())
            with torch.random.fork_rng(devices=[]):  # the timed steps draw as they would alone
                calibration.extend(state_steps(spec.mode, spec.dtype, debug_variant(spec.model_config())))
                gemms.append(GemmsBeside(step.record(), spec.dtype))  # the shapes of one more step, recorded
            reference.append(ReferenceGemm())
        settle_allocator()
        timed_step()  # untimed: the heap grows to the settled allocator's steady state in this step
        synchronize(device)

    times = measure_step_times(timed_step, warmup=spec.memory_steps, repeats=spec.repeats,
                               synchronize=lambda: synchronize(device), on_step=on_step, after_warmup=after_warmup)
    usage = summarise_usage(last_output[0], spec.num_experts)
    trained_params = step.trained_params()
    emit("progress", stage="predict", done=0, total=1)
    trace = step.record()  # one more step, its ops recorded: the prediction sees this run's routing
    if device == "cpu":  # ... and its timed steps' new pages, which vary from step to step more than ops do
        trace = trace.with_fresh_bytes(int(statistics.median(times.fault_bytes)))
    del model, step, last_output

    device_name = describe_device(device)
    device_model, notes = _device_model(device, device_name, spec)
    host_s_per_op = probe_host_s_per_op = None
    if isinstance(device_model, MeasuredDevice):  # this CPU: the step's GEMMs timed at their exact shapes
        reference[0].beside_pricing()
        retimed = remeasure_state(device_model, spec.mode, trace, calibration,  # this process's speeds
                                  gemms[0] if gemms else None)
        reference[0].beside_pricing()
        device_model, shape_notes = with_gemm_shapes_of(device_model, trace, timed=retimed)  # cached for later
        notes += shape_notes
        dispatch_phase = first_phase(spec.mode)
        probe_host_s_per_op = device_model.host_s_per_op.get(dispatch_phase, device_model.host_s_per_op["forward"])
        host_s_per_op = retimed.host_s_per_op[dispatch_phase]
        busy_note = host_drift_note(host_s_per_op, probe_host_s_per_op)
        notes += [busy_note] if busy_note else []
        device_model = device_model if busy_note else retimed
    predicted = predict_step_time(trace, device_model) if device_model is not None else None
    speedup, probe_speedup = (speedups or [None])[0], getattr(device_model, "parallel_speedup", None)
    if speedup is not None and probe_speedup is not None:
        notes += [note] if (note := state_note(speedup, probe_speedup)) else []
    emit("measured", device=device, device_name=device_name, threads=torch.get_num_threads(),
         versions=library_versions(), times_s=times.wall_s, cpu_times_s=times.cpu_s, peak_memory_bytes=peak[0],
         memory_method=probe.method, available_memory_bytes=available, trained_params=trained_params,
         predicted=predicted.to_dict() if predicted else None, device_model=_describe_model(device_model),
         notes=notes, parallel_speedup=speedup, probe_parallel_speedup=probe_speedup, host_s_per_op=host_s_per_op,
         probe_host_s_per_op=probe_host_s_per_op, gemm_state_ratio=reference[0].state_ratio() if reference else None, **usage)


def _device_model(device: str, device_name: str, spec: BenchSpec):
    """This CPU's probed model (cached, or probed now: after the measurement, so its buffers are not
    counted), or on a GPU the preset of its name. (model or None, notes for the user)."""
    from planner.steptime.device_cache import measured_device
    from planner.steptime.gpu_presets import gpu_preset, preset_for_device_name

    if device == "cpu":
        return measured_device(device_name, spec.dtype, spec.recalibrate)
    preset = preset_for_device_name(device_name)
    if preset is None:
        return None, [f"no device preset matches {device_name}: no prediction"]
    return gpu_preset(preset), [f"predicted with the {preset} preset (datasheet and published measurements)"]


def _describe_model(device_model) -> dict[str, Any] | None:
    if device_model is None:
        return None
    return {"name": device_model.name, "source": device_model.source,
            "measured_on": getattr(device_model, "measured_on", "")}


def open_protocol() -> Callable[..., None]:
    """The worker's end of the runner's protocol: `emit(event, **fields)` writes one JSON line to a private
    copy of stdout; fd 1 then points at stderr, so whatever torch, transformers or C extensions print cannot
    corrupt it. Also makes this process die with its parent (die_with_parent)."""
    die_with_parent()
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(event: str, **fields: Any) -> None:
        protocol.write(json.dumps({"event": event, **fields}) + "\n")
        protocol.flush()

    return emit


def main(stdin: TextIO = sys.stdin) -> None:
    emit = open_protocol()
    try:
        spec = BenchSpec.from_dict(json.loads(stdin.read()))
    except ValueError as error:
        emit("refused", message=str(error))
        return
    try:
        run(spec, emit)
    except Exception as error:  # noqa: BLE001 - any failure is reported to the caller, who keeps working
        emit("error", message=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())


if __name__ == "__main__":
    main()
