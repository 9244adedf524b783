"""Benchmarks (issue 5): the runner returns every field, the preflight refuses with its message, a run past
its time limit is killed, concurrent requests are serialised, a cancel stops a run; and the pure parts
(ratios, the CLI's grid) against hand-derived values. Timing statistics: test_bench_timing.py; the time
model has its own tests (test_steptime_*.py).

Subprocess tests use the debug preset at short lengths; each costs a few seconds, mostly importing torch.
"""

import argparse
import csv
import io
import json
import math
import threading
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.build import build_model_from_config
from model.config import make_config
from planner.bench import (
    BenchProgress,
    BenchResult,
    BenchSpec,
    check_preflight,
    compare_to_dense,
    estimate_peak_bytes,
    export_results,
    lock_holder,
    run_benchmark,
)
from planner.bench.device import describe_device
from planner.bench.preflight import largest_fitting_batch
from planner.bench.timing import summarise_times
from planner.cli.bench import add_bench_subcommand, bench_specs, run_bench_command
from planner.measure import measure_saved_activation_bytes
from planner.steptime.device_cache import save_measured_device
from tests.steptime_fixtures import simple_measured_device

# A debug run that finishes in a second once torch is imported.
DEBUG = dict(size="debug", batch_size=2, context_length=32, prediction_length=8, num_samples=3, device="cpu",
             warmup=1, repeats=2, time_limit_s=120.0)
# Far beyond any machine's memory: refused by the preflight before anything is built.
OVERSIZED = BenchSpec(**{**DEBUG, "batch_size": 1_000_000}, mode="train")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Each test gets its own lock, cancel marker, trace and device-probe cache (subprocesses inherit it)."""
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(tmp_path))


# --- the spec ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("mode", "predict"), ("device", "tpu"), ("dtype", "int8"), ("repeats", 0), ("warmup", 0),
                                          ("time_limit_s", -1), ("top_k", 5), ("batch_size", 0), ("threads", 0)])
def test_spec_refuses_bad_setting_naming_the_field(field, value):
    settings = {"num_experts": 4, **{field: value}}
    with pytest.raises(ValueError, match=field):
        BenchSpec(**settings)


def test_spec_refuses_fp16_on_cpu_with_what_to_use():
    with pytest.raises(ValueError, match="fp16 is not supported on CPU.*use fp32 or bf16"):
        BenchSpec(device="cpu", dtype="fp16")


def test_spec_round_trips_through_json():
    spec = BenchSpec(**DEBUG, num_experts=4, architecture="token_ffn", mode="forecast")
    assert BenchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="unknown benchmark setting"):
        BenchSpec.from_dict({**spec.to_dict(), "colour": "red"})


# --- the preflight (pure) ---------------------------------------------------------------------------------


def test_preflight_refuses_an_oversized_run_and_says_which_batch_fits():
    spec = BenchSpec(**{**DEBUG, "batch_size": 64}, mode="train", num_experts=4)
    available = int(estimate_peak_bytes(BenchSpec(**{**DEBUG, "batch_size": 10}, mode="train", num_experts=4),
                                        "cpu") / 0.8) + 1
    verdict = check_preflight(spec, "cpu", available)
    assert not verdict.fits
    assert "refused" in verdict.message and "80%" in verdict.message and "Batch 10 fits" in verdict.message
    assert largest_fitting_batch(spec, "cpu", 0.8 * available) == 10
    assert check_preflight(BenchSpec(**{**DEBUG, "batch_size": 10}, mode="train", num_experts=4), "cpu", available).fits


def _instantiated_params(spec: BenchSpec) -> int:
    """Parameters of the real modules (meta device), apart from the planner's count."""
    return sum(p.numel() for p in build_model_from_config(spec.model_config(), device="meta").parameters())


def _saved_activation_bytes(spec: BenchSpec) -> int:
    """Bytes autograd saves for backward in one training forward of `spec`'s model on CPU (saved_tensors_hooks),
    at its shapes: B series of S = context + 1 and T = prediction + 1 tokens."""
    model = build_model_from_config(spec.model_config())
    input_ids = torch.randint(2, 4096, (spec.batch_size, spec.context_length + 1))
    labels = torch.randint(2, 4096, (spec.batch_size, spec.prediction_length + 1))
    return measure_saved_activation_bytes(model, input_ids, torch.ones_like(input_ids), labels)


@pytest.mark.parametrize("mode", ["forward", "forecast", "train"])
def test_predicted_peak_per_mode_derived_apart_from_the_planner(mode):
    """debug shared_then_expert E 4 (D 64, F 256, H 4 × Dk 16 = A 64, 2 + 2 blocks, V 4096), two series of
    S = 33 and T = 9 tokens, P 8, fp32 on CPU. Weights by instantiating the model; training activations by
    the saved-tensor bytes of a real forward; the forecast's terms from debug's dimensions."""
    spec = BenchSpec(**DEBUG, mode=mode, num_experts=4)
    params = _instantiated_params(spec)
    if mode == "train":
        # the saved activations, and at the start of the backward the (B, T, V) fp32 logits with log-softmax's
        # two fp32 gradients (measured to the byte under torch's MemTracker in tests/test_parallel.py)
        activations = _saved_activation_bytes(spec) + 2 * 9 * 4096 * (4 + 2 * 4)
        # fp32 AdamW: 4 weights + 4 gradients + 8 moments per parameter, and the saved activations.
        assert estimate_peak_bytes(spec, "cpu") == 16 * params + activations
        # A run that trained all but 1000 parameters: those keep their weights, not gradients and moments.
        assert estimate_peak_bytes(spec, "cpu", trained_params=params - 1000) == \
            4 * params + (4 + 8) * (params - 1000) + activations
        assert estimate_peak_bytes(spec, "cpu", trained_params=params) == 16 * params + activations
        return
    paths = 3 if mode == "forecast" else 1  # forward: a one-path forecast (planner.bench.preflight)
    caches = 2 * 2 * 64 * 4 * (8 + 33) * paths * 2  # Ld × keys and values × A × 4 bytes × (P + S) × N × B
    encoder_output = paths * 2 * 33 * 64 * 4  # repeated per sample path: N × B × S × D × 4 bytes
    attention = 2 * 4 * 33 * 33 * (4 + 4 + 4)  # B·H·S·S: position bias, scores, softmax
    ffn = 2 * 33 * 256 * 2 * 4  # B·S·F: wi and ReLU outputs
    sampling = 2 * paths * 4096 * (4 + 4 + 4 + 1)  # B·N rows of V: logits, two fp32 scores, a bool mask
    largest = {"forward": ffn, "forecast": sampling}[mode]
    assert largest == max(attention, ffn, sampling)
    assert estimate_peak_bytes(spec, "cpu") == 4 * params + caches + encoder_output + largest


def test_preflight_says_when_not_even_one_series_fits():
    verdict = check_preflight(BenchSpec(**DEBUG, mode="forecast"), "cpu", available_bytes=1000)
    assert not verdict.fits and "Not even one series fits" in verdict.message and "sample paths" in verdict.message


# --- the runner, through its subprocess ---------------------------------------------------------------------


def test_runner_returns_every_field():
    spec = BenchSpec(**DEBUG, mode="train", architecture="shared_then_expert", num_experts=4)
    # A cached device probe, as after the first run on a machine (the probe has its own test).
    cpu_name = describe_device("cpu")  # the worker keeps PyTorch's default threads, as this process does
    cached = simple_measured_device(cpu_name)
    save_measured_device(cached)
    stages = []
    result = run_benchmark(spec, progress=lambda update: stages.append(update.stage))
    assert result.status == "ok", result.message + result.traceback
    row = result.row()
    optional = {"expert_capacity", "message", "threads"}  # unset settings, and no message when all went well
    assert [key for key, value in row.items() if value is None and key not in optional] == []
    assert len(row["times_s"]) == spec.repeats and row["median_s"] > 0 and row["p95_s"] >= row["median_s"]
    assert row["device_resolved"] == "cpu"
    # FLOPs: the planner's, against FlopCounterMode on a forward and backward of the same model and shapes.
    model = build_model_from_config(spec.model_config())
    input_ids = torch.randint(2, 4096, (spec.batch_size, spec.context_length + 1))
    labels = torch.randint(2, 4096, (spec.batch_size, spec.prediction_length + 1))
    with FlopCounterMode(display=False) as counter:
        model(input_ids, torch.ones_like(input_ids), labels=labels).loss.backward()
    assert row["flops"] == counter.get_total_flops()
    # Peak memory predicted for what the run trained: every weight, gradients and AdamW moments for the
    # parameters that got a gradient (an expert no series chose gets none), the activations saved for backward.
    params, one_expert = _instantiated_params(spec), sum(p.numel() for p in model.experts[0].parameters())
    trained = row["trained_params"]
    assert (params - trained) % one_expert == 0 and params - 2 * one_expert <= trained <= params  # each series runs 2 different experts of 4
    loss_transient = spec.batch_size * (spec.prediction_length + 1) * 4096 * (4 + 2 * 4)  # B·T·V: logits, 2 grads
    assert row["predicted_peak_bytes"] == 4 * params + (4 + 8) * trained + _saved_activation_bytes(spec) + \
        loss_transient
    # The measured peak holds at least those weights, gradients and moments, which are alive after a step.
    assert row["peak_memory_bytes"] >= 4 * params + (4 + 8) * trained
    assert row["memory_ratio"] == row["peak_memory_bytes"] / row["predicted_peak_bytes"]
    assert row["time_ratio"] == row["median_s"] / row["predicted_time_s"]
    assert len(row["usage_counts"]) == 4 and sum(row["usage_counts"]) == spec.batch_size * spec.top_k
    assert result.device_model == {"name": cpu_name, "source": "probe", "measured_on": cached.measured_on}
    # The only note a quiet run may carry: the host's cores in another state than the cached probe's (1.8×)
    # (or, on a busy machine, the host's time per op re-timed far from the probe's)
    assert result.device_name == cpu_name and all(note.startswith(("the threads ran", "the host dispatched"))
                                                  for note in result.notes)
    # The threads' speedup is a timing: measured and reported, its size left to the machine's load (under load
    # from other processes it falls below 1), so no threshold here.
    assert row["probe_parallel_speedup"] == cached.parallel_speedup and 0 < row["parallel_speedup"] < math.inf
    assert 0 < row["gemm_state_ratio"] < math.inf  # a ratio of two medians of the same GEMM's timings
    # The host's time per op, re-timed after the run for its prediction, beside the cached probe's
    assert row["probe_host_s_per_op"] == cached.host_s_per_op["forward"] != row["host_s_per_op"] > 0
    assert result.predicted.total_s == pytest.approx(sum(result.predicted.split().values()))
    assert result.predicted.op_count > 100 and result.predicted.sync_count == 1  # one grouped dispatch
    assert {"torch", "transformers", "chronos-forecasting", "python"} <= set(result.versions)
    assert stages[0] == "starting" and stages[-1] == "done" and {"build", "warmup", "measure"} <= set(stages)
    exported = export_results([result], "csv").decode()
    table = list(csv.DictReader(line for line in io.StringIO(exported) if not line.startswith("#")))
    assert table[0]["status"] == "ok" and "# device: " in exported and "# version_torch: " in exported
    assert json.loads(export_results([result], "json"))[0]["metadata"]["device"] == result.device_name


def test_runner_refuses_an_oversized_run_with_the_preflight_message():
    result = run_benchmark(OVERSIZED)
    assert result.status == "refused"
    assert "more than 80% of the" in result.message and "fits" in result.message
    assert result.predicted_peak_bytes > 0.8 * result.available_memory_bytes


def test_run_past_its_time_limit_is_killed_and_reported():
    spec = BenchSpec(**{**DEBUG, "time_limit_s": 0.5}, mode="forward")
    result = run_benchmark(spec)
    assert result.status == "timeout" and "time limit of 0.5 s" in result.message
    assert result.timing is None and lock_holder() is None  # killed, and the lock is free again


def test_cancel_kills_the_run():
    cancel = threading.Event()

    def progress(update: BenchProgress) -> None:
        if update.stage == "starting":  # the worker has been started
            cancel.set()

    result = run_benchmark(BenchSpec(**DEBUG, mode="forward"), progress=progress, cancel_event=cancel)
    assert result.status == "cancelled" and lock_holder() is None


def test_concurrent_requests_are_serialised():
    intervals, waited = {}, []

    def request(name: str) -> None:
        def progress(update: BenchProgress) -> None:
            if update.stage == "waiting":
                waited.append(name)
            elif update.stage in ("starting", "done"):
                intervals.setdefault(name, []).append(time.monotonic())

        run_benchmark(OVERSIZED, progress=progress)

    threads = [threading.Thread(target=request, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (a_start, a_end), (b_start, b_end) = intervals["a"], intervals["b"]
    assert a_end <= b_start or b_end <= a_start  # never both inside the lock
    assert waited  # the later one saw the other running


# --- results and the CLI ---------------------------------------------------------------------------------


def _fake_result(num_experts: int, median_s: float, flops: int, dispatch: str = "sparse") -> BenchResult:
    spec = BenchSpec(**DEBUG, num_experts=num_experts, dispatch=dispatch)
    timing = summarise_times([median_s], [median_s], series=2, tokens=1, flops=flops)
    return BenchResult(spec=spec, status="ok", flops=flops, timing=timing, device_name="cpu")


def test_compare_to_dense_divides_by_the_matching_dense_run():
    rows = compare_to_dense([_fake_result(0, 2.0, 100), _fake_result(4, 3.0, 120), _fake_result(4, 5.0, 200, "dense")])
    assert [(r["dispatch"], r["time_vs_dense"], r["flops_vs_dense"]) for r in rows] == [("sparse", 1.5, 1.2),
                                                                                          ("dense", 2.5, 2.0)]
    assert rows[0]["time_ratio_over_flop_ratio"] == pytest.approx(1.25)
    assert rows[0]["cpu_time_vs_dense"] == 1.5 and rows[1]["cpu_time_ratio_over_flop_ratio"] == pytest.approx(1.25)


def test_cpu_time_ratio_is_against_the_predicted_cpu_time():
    """Measured CPU time (every thread) ÷ the prediction's CPU time: a step measured at 3 s of CPU time
    against 2 s predicted reads 1.5 whatever its threads; no predicted CPU time (a GPU), no ratio."""
    from dataclasses import replace as replace_field

    from planner.steptime.predict import StepTime

    result = replace_field(_fake_result(0, 2.0, 100), threads=4, device="cpu",
                           predicted=StepTime(1.0, 0.5, 0.0, 0.0, 10, 0, "cpu", cpu_s=2.0))
    result = replace_field(result, timing=summarise_times([2.0], [3.0], series=2, tokens=1, flops=100))
    assert result.cpu_time_ratio == pytest.approx(1.5) and result.time_ratio == pytest.approx(2.0 / 1.5)
    assert replace_field(result, predicted=replace_field(result.predicted, cpu_s=None)).cpu_time_ratio is None


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_subcommand(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_cli_grid_has_dense_once_then_every_variant():
    args = _parse("--sizes", "debug,tiny", "--modes", "forward,train", "--experts", "0,4,8",
                  "--architectures", "token_ffn,expert_only", "--dispatch", "sparse,dense")
    specs = bench_specs(args)
    assert len(specs) == 2 * 2 * (1 + 2 * 2 * 2)
    assert specs[0].num_experts == 0 and specs[1].num_experts == 4


def test_cli_predicts_for_a_preset_without_running(capsys):
    assert run_bench_command(_parse("--sizes", "small", "--predict-for", "a100-80gb", "--format", "json")) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(row["predicted_time_s"] > 0 for row in rows)  # the time model: test_steptime_*
    assert rows[0]["device_name"] == "NVIDIA A100 80GB SXM"
    # The dense small forward at the defaults (batch 8, S 513, P 64, fp32), a one-path forecast's memory:
    # weights (instantiated, meta) + KV cache + encoder output + the encoder attention's B·H·S·S tensors.
    dense = rows[0]
    assert (dense["num_experts"], dense["mode"], dense["batch_size"]) == (0, "forward", 8)
    params = sum(p.numel() for p in build_model_from_config(make_config("small"), device="meta").parameters())
    caches = 6 * 2 * 512 * 4 * (64 + 513) * 1 * 8  # Ld × keys and values × A × 4 bytes × (P + S) × N 1 × B
    encoder_output = 1 * 8 * 513 * 512 * 4
    attention = 8 * 8 * 513 * 513 * (4 + 4 + 4)  # above the FFN 8·513·2048·8 and sampling 8·4096·13
    assert dense["predicted_peak_bytes"] == 4 * params + caches + encoder_output + attention


def test_cli_bad_setting_exits_2_naming_the_field(capsys):
    assert run_bench_command(_parse("--experts", "4", "--top-k", "5")) == 2
    assert "top_k" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        _parse("--modes", "predict")
    assert exit_info.value.code == 2


def test_progress_piped_into_a_log_has_no_carriage_returns(tmp_path):
    """A benchmark piped into a file writes a line per stage, not thousands of rewritten lines."""
    import subprocess
    import sys

    save_measured_device(simple_measured_device(describe_device("cpu")))  # a cached probe (it has its own test)
    run = subprocess.run([sys.executable, "-m", "planner", "bench", "--sizes", "debug", "--experts", "0",
                          "--device", "cpu", "--repeats", "1", "--warmup", "1", "--batch-size", "1",
                          "--context-length", "16", "--prediction-length", "4", "--format", "csv"],
                         capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "CHRONOS_MOE_PLANNER_CACHE_DIR": str(tmp_path)})
    assert run.returncode in (0, 1), run.stderr
    assert "\r" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("[1/1]")]
    assert lines[0].endswith("starting") and lines[-1].endswith(": ok") and len(lines) <= 8


def test_the_dense_run_is_labelled_dense_in_exports():
    spec = BenchSpec(**DEBUG, mode="forward")
    row = BenchResult(spec=spec, status="refused").row()
    assert (row["architecture"], row["num_experts"], row["top_k"], row["router_hidden_dim"]) == ("dense", 0, 0, 0)
    moe = BenchResult(spec=BenchSpec(**DEBUG, mode="forward", architecture="token_ffn", num_experts=4), status="refused").row()
    assert (moe["architecture"], moe["top_k"]) == ("token_ffn", 2)


def test_cli_leaves_out_train_runs_with_nothing_to_train(capsys):
    args = _parse("--sizes", "debug", "--modes", "forward,train", "--experts", "0,4", "--architectures", "token_ffn",
                  "--trainable", "experts_and_router")
    specs = bench_specs(args)
    assert [(s.mode, s.num_experts) for s in specs] == [("forward", 0), ("forward", 4), ("train", 4)]
    assert specs[2].label == "debug MoE-4 (top-2, token_ffn, sparse) train (trainable experts_and_router)"
    assert run_bench_command(_parse("--sizes", "debug", "--modes", "train", "--experts", "0",
                                    "--trainable", "experts")) == 2
    assert "argument --trainable: trainable experts leaves nothing to train in dense" in capsys.readouterr().err
    assert run_bench_command(_parse("--sizes", "debug", "--trainable", "backbone")) == 2
    assert "argument --trainable: trainable must be one of" in capsys.readouterr().err


def test_a_cpus_name_tells_its_generations_apart():
    """Cloud VMs name Zen 3 and Zen 4 alike ('AMD EPYC'); the name a probe is cached under says the family,
    the model and the widest vector instructions of the first processor, so one is not priced with the
    other's probe."""
    from planner.bench.device import cpuinfo_processor_name

    def processor(number: int, model: int, flags: str) -> str:
        return (f"processor\t: {number}\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: {model}\n"
                f"flags\t\t: fpu {flags}\n")

    def cpuinfo(model: int, flags: str) -> str:  # a second processor after the first (never another model)
        return processor(0, model, flags) + "\n" + processor(1, 99, "sse")

    zen3, zen4 = cpuinfo(1, "sse avx avx2"), cpuinfo(17, "avx avx2 avx512f avx512bw")
    assert cpuinfo_processor_name(zen3) == "AMD EPYC, family 25 model 1, avx2"
    assert cpuinfo_processor_name(zen4) == "AMD EPYC, family 25 model 17, avx512"
    assert cpuinfo_processor_name("processor\t: 0\nflags\t: avx2\n") is None  # no name: the caller's fallback
