"""The device models and the prediction: hand-priced ops, the GPU presets' wave quantisation, the compiled
what-if, and predictions without running (CLI and API); the probe's cache is test_steptime_device_cache."""

import math
import subprocess
import sys
from dataclasses import replace

import pytest

from planner.bench import BenchSpec, predict_row
from planner.steptime import GPU_PRESETS, gpu_preset, predict_step_time
from planner.steptime.curves import GemmGrid, SizeCurve
from planner.steptime.gpu_presets import preset_for_device_name
from planner.steptime.ops import OpRecord, StepTrace
from tests.steptime_fixtures import (BYTES_PER_S, FRESH_PAGE_BUSY, FRESH_S_PER_BYTE, HOST_BUSY, HOST_S, SCATTER_S_PER_ROW, VIEW_S,
                                     simple_measured_device)

MM = OpRecord("aten.mm.default", "matmul", "forward", "float32", 2 * 10**9, 10**6, 10**6, (1, 1000, 1000, 1000))
ADD = OpRecord("aten.add.Tensor", "memory", "forward", "float32", 0, 2 * 10**8, 10**8, pointwise=True)
SOFTMAX_BACKWARD = OpRecord("aten._softmax_backward_data.default", "memory", "backward", "float32", 0,
                            2 * 10**8, 10**8)
VIEW = OpRecord("aten.view.default", "view", "forward", "float32", 0, 0, 0)
SYNC = OpRecord("Tensor.tolist", "sync", "forward", "int64", 0, 128, 0)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(tmp_path))


def test_cpu_prediction_hand_priced():
    """1e10 FLOP/s and 1e10 B/s: each mm 0.2 s; each add and the softmax backward 0.03 s, plus fresh pages
    for their 100 MB outputs (above 32 MiB); the sync reads 128 bytes; host 1e-5 s a forward op, 5e-6 s a
    backward op, 1e-6 s a view; a CPU adds host and kernel time."""
    trace = StepTrace(((MM, 2), (ADD, 3), (SOFTMAX_BACKWARD, 1), (VIEW, 10), (SYNC, 1)))
    step = predict_step_time(trace, simple_measured_device())
    fresh = 10**8 * FRESH_S_PER_BYTE
    assert step.matmul_s == pytest.approx(2 * 0.2)
    assert step.memory_s == pytest.approx(3 * (0.03 + fresh) + (0.03 + fresh) + 128 / 1e10)
    assert step.overhead_s == pytest.approx(2 * HOST_S["forward"] + 3 * HOST_S["forward"] + HOST_S["backward"]
                                            + 10 * VIEW_S + HOST_S["forward"])
    assert step.sync_s == 0 and step.sync_count == 1 and step.op_count == 17 and step.bound == "matmul"
    assert step.total_s == pytest.approx(step.matmul_s + step.memory_s + step.overhead_s)


def test_cpu_time_hand_priced():
    """The step's CPU time, every thread: each kernel × the threads it keeps busy, each dispatch × the
    phase's. The mm: 0.2 s, timed exactly here, busy 1.9. Each add and the softmax backward: 0.03 s moving
    300 MB, busy 2 − log(3e5)/log(1e6) ≈ 1.087 (the curve goes from 2 threads at 1 kB to 1 at 1 GB, linear in
    log size), plus their fresh pages at 1.5. The dispatch: the forward's ops and views at 1.25, the softmax
    backward's at the backward's 1.5."""
    mm = replace(MM, gemm=(1, 1000, 1000, 1000))
    device = replace(simple_measured_device(), gemm_shape_s={"1,1000,1000,1000": 0.2},
                     gemm_shape_busy={"1,1000,1000,1000": 1.9})
    trace = StepTrace(((mm, 2), (ADD, 3), (SOFTMAX_BACKWARD, 1), (VIEW, 10)))
    step = predict_step_time(trace, device)
    fresh_s = 10**8 * FRESH_S_PER_BYTE
    add_busy = 2.0 - math.log(3 * 10**8 / 1e3) / math.log(1e9 / 1e3)  # linear in log size between 2 and 1
    kernels = 2 * 0.2 * 1.9 + 4 * (0.03 * add_busy + fresh_s * FRESH_PAGE_BUSY)
    host = ((2 + 3) * HOST_S["forward"] + 10 * VIEW_S) * HOST_BUSY["forward"] + HOST_S["backward"] * HOST_BUSY["backward"]
    assert step.cpu_s == pytest.approx(kernels + host)
    assert step.row()["predicted_cpu_s"] == step.cpu_s


def test_idle_threads_spin_through_a_kernel_up_to_the_window():
    """In a step the pool's threads a kernel leaves idle spin on through it, up to the probed window (10 ms
    here, a pool of 2): each mm (0.2 s, busy 1.9) adds 0.1 thread × 10 ms; each add moving 3 MB (3e-4 s, busy
    2 − log(3e3)/log(1e6) ≈ 1.42 on the curve) adds its 0.58 idle threads × its whole 3e-4 s. The wall time
    is not touched; a pool of one thread has none idle."""
    small_add = OpRecord("aten.add.Tensor", "memory", "forward", "float32", 0, 2 * 10**6, 10**6, pointwise=True)
    mm = replace(MM, gemm=(1, 1000, 1000, 1000))
    device = replace(simple_measured_device(), gemm_shape_s={"1,1000,1000,1000": 0.2},
                     gemm_shape_busy={"1,1000,1000,1000": 1.9})
    trace = StepTrace(((mm, 2), (small_add, 3)))
    alone = predict_step_time(trace, device)
    spinning = predict_step_time(trace, replace(device, pool_threads=2, spin_window_s=0.01))
    add_busy = 2.0 - math.log(3 * 10**6 / 1e3) / math.log(1e9 / 1e3)
    assert spinning.cpu_s - alone.cpu_s == pytest.approx(2 * 0.1 * 0.01 + 3 * (2 - add_busy) * 3e-4)
    assert spinning.total_s == alone.total_s
    assert predict_step_time(trace, replace(device, pool_threads=1, spin_window_s=0.01)).cpu_s == alone.cpu_s


def test_optimizer_streams_its_first_touches_only_beyond_the_cache():
    """An optimizer moving 2 × 100 MB (above 64 MiB) prices the bytes its ops touch first in the step on the
    streamed curve (1e9 B/s) and the rest in the cache (1e10 B/s): an update that reads only first touches
    takes 0.1 s, one that reads half 0.055 s (its bytes half streamed, half cached), one on operands an earlier
    op touched 0.01 s. One moving 2 × 1 MB finds even its first touches in the cache. Each op's dispatch is
    priced beside it."""
    first = OpRecord("aten.lerp_.Scalar", "memory", "optimizer", "float32", 0, 6 * 10**7, 4 * 10**7,
                     first_touch_bytes=6 * 10**7)
    half, later = replace(first, first_touch_bytes=3 * 10**7), replace(first, first_touch_bytes=0)
    device = simple_measured_device()
    for op, seconds in ((first, 0.1), (half, 0.055), (later, 0.01)):
        assert predict_step_time(StepTrace(((op, 2),)), device).memory_s == pytest.approx(2 * seconds)
    small = replace(first, bytes_read=6 * 10**5, bytes_written=4 * 10**5, first_touch_bytes=6 * 10**5)
    cached = predict_step_time(StepTrace(((small, 2),)), device)
    assert cached.memory_s == pytest.approx(2 * 10**6 / 1e10)
    assert cached.overhead_s == predict_step_time(StepTrace(((first, 2),)), device).overhead_s \
        == pytest.approx(2 * HOST_S["optimizer"])


def test_a_compute_bound_optimizer_op_is_priced_on_its_class_when_slower_than_streaming():
    """AdamW's square root of the second moments computes longer than its bytes stream (on this CPU a 4 MiB
    sqrt takes 450 µs hot, its bytes 190 µs streamed): where it touches them first, the slower of its class
    (here transcendental at 1e8 B/s) and the streamed curve (1e9 B/s) prices it; an elementwise update stays
    on the streamed curve."""
    device = replace(simple_measured_device(),
                     memory={**simple_measured_device().memory,
                             "transcendental": SizeCurve((1e3, 1e9), (1e3 / 1e8, 1e9 / 1e8), (1.0, 1.0))})
    sqrt = OpRecord("aten.sqrt.default", "memory", "optimizer", "float32", 0, 3 * 10**7, 2 * 10**7,
                    first_touch_bytes=3 * 10**7)  # no fresh pages
    lerp = OpRecord("aten.lerp_.Scalar", "memory", "optimizer", "float32", 0, 6 * 10**7, 4 * 10**7,
                    first_touch_bytes=6 * 10**7)
    step = predict_step_time(StepTrace(((sqrt, 1), (lerp, 1))), device)
    assert step.memory_s == pytest.approx(5 * 10**7 / 1e8 + 10**8 / 1e9)
    # the CPU time follows the bounding curve's busy threads: 1 for the class, 1 for the streamed curve
    assert step.cpu_s == pytest.approx(step.memory_s + 2 * HOST_S["optimizer"] * HOST_BUSY["optimizer"])


def test_an_op_moving_more_than_the_private_caches_streams_its_operands():
    """With 1 MiB of private caches, a forward add moving 3 MB is priced on the streamed curve (1e9 B/s, slower
    than its class's 1e10 B/s) and one moving 600 kB on its class; a softmax whose class (1e8 B/s) is slower
    than streaming keeps its class; a device that has not measured its private caches prices every op on its
    class. No fresh pages: the outputs are below the mmap threshold."""
    add = OpRecord("aten.add.Tensor", "memory", "forward", "float32", 0, 2 * 10**6, 10**6, pointwise=True)
    small_add = replace(add, bytes_read=4 * 10**5, bytes_written=2 * 10**5)
    softmax = OpRecord("aten._softmax.default", "memory", "forward", "float32", 0, 2 * 10**6, 2 * 10**6)
    plain = simple_measured_device()
    device = replace(plain, private_cache_bytes=2**20,
                     memory={**plain.memory, "softmax": SizeCurve((1e3, 1e9), (1e3 / 1e8, 1e9 / 1e8), (1.0, 1.0))})
    assert device.memory_s(add) == pytest.approx(3 * 10**6 / 1e9)
    assert device.memory_s(small_add) == pytest.approx(6 * 10**5 / BYTES_PER_S)
    assert device.memory_s(softmax) == pytest.approx(4 * 10**6 / 1e8)
    assert plain.memory_s(add) == pytest.approx(3 * 10**6 / BYTES_PER_S)
    # the streamed curve's busy threads (1) price the streamed add's CPU time, the class's (2 at 1 kB to 1 at
    # 1 GB, linear in log size) the small one's
    small_busy = 2.0 - math.log(6 * 10**5 / 1e3) / math.log(1e9 / 1e3)
    step = predict_step_time(StepTrace(((add, 1), (small_add, 1))), device)
    assert step.cpu_s == pytest.approx(3 * 10**6 / 1e9 + 6 * 10**5 / BYTES_PER_S * small_busy
                                       + 2 * HOST_S["forward"] * HOST_BUSY["forward"])


def test_fresh_pages_counted_in_the_step_replace_the_threshold_rule():
    """A 20 MB output under the 32 MiB mmap threshold that faulted 8 MB of new pages in the recorded step pays
    those 8 MB (a heap trimmed between steps hands out new pages below the threshold); a 100 MB output that
    faulted none pays none; a shape-only record (None) keeps the rule (100 MB above the threshold: all new)."""
    device = simple_measured_device()
    small = OpRecord("aten.add.Tensor", "memory", "forward", "float32", 0, 4 * 10**7, 2 * 10**7, fresh_bytes=8 * 10**6)
    big = replace(small, bytes_read=2 * 10**8, bytes_written=10**8, fresh_bytes=0)
    assert device.memory_s(small) == pytest.approx(6 * 10**7 / BYTES_PER_S + 8 * 10**6 * FRESH_S_PER_BYTE)
    assert device.memory_s(big) == pytest.approx(3 * 10**8 / BYTES_PER_S)
    assert device.memory_s(replace(big, fresh_bytes=None)) == pytest.approx(3 * 10**8 / BYTES_PER_S + 10**8 * FRESH_S_PER_BYTE)
    assert device.memory_s(replace(small, fresh_bytes=None)) == pytest.approx(6 * 10**7 / BYTES_PER_S)


def test_a_recorded_steps_fresh_pages_take_the_timed_steps_total():
    """A benchmark replaces the one recorded step's new pages by its timed steps' median, each op keeping its
    share (an add that faulted 8 MB of 10 MB gets 80 % of 30 MB); where the recording faulted none, the total
    goes to the computing ops by the bytes each writes (a 20 MB add takes 2/3 of 30 MB beside a 10 MB GEMM
    output, a view nothing); a shape-only trace has no count to replace."""
    add = OpRecord("aten.add.Tensor", "memory", "forward", "float32", 0, 4 * 10**7, 2 * 10**7, fresh_bytes=8 * 10**6)
    mm = replace(MM, fresh_bytes=10**6, bytes_written=10**7)
    view = OpRecord("aten.view.default", "view", "forward", "float32", 0, 0, 0, fresh_bytes=0)
    recorded = StepTrace(((add, 1), (mm, 2), (view, 3)))
    assert recorded.fresh_bytes == 10**7
    scaled = recorded.with_fresh_bytes(3 * 10**7)
    assert [op.fresh_bytes for op, _ in scaled.ops] == [24 * 10**6, 3 * 10**6, 0] and scaled.fresh_bytes == 3 * 10**7
    assert [(replace(op, fresh_bytes=None), n) for op, n in scaled.ops] == \
        [(replace(op, fresh_bytes=None), n) for op, n in recorded.ops]  # nothing else changes
    none_counted = StepTrace(tuple((replace(op, fresh_bytes=0), n) for op, n in ((add, 1), (replace(mm, fresh_bytes=0), 1), (view, 3))))
    assert [op.fresh_bytes for op, _ in none_counted.with_fresh_bytes(3 * 10**7).ops] == [2 * 10**7, 10**7, 0]
    by_shape = StepTrace(((replace(add, fresh_bytes=None), 1),))
    assert by_shape.fresh_bytes is None and by_shape.with_fresh_bytes(10**6) == by_shape


def test_cpu_time_unknown_where_a_term_was_not_measured():
    """A GEMM read off the grid (no exact timing, so no busy threads), a GPU, and the compiled what-if have
    no CPU time."""
    device = simple_measured_device()
    assert predict_step_time(StepTrace(((MM, 1), (ADD, 1))), device).cpu_s is None
    assert predict_step_time(StepTrace(((ADD, 1),)), device).cpu_s is not None
    assert predict_step_time(StepTrace(((ADD, 1),)), device, compiled=True).cpu_s is None
    assert predict_step_time(StepTrace(((ADD, 1),)), gpu_preset("a100-80gb")).cpu_s is None


def test_gemm_in_model_factor_is_per_phase():
    """A forecast's GEMMs at factor 1.5 cost 1.5 × 0.2 s; a backward GEMM has no factor of its own and takes
    the forward's (1.0)."""
    device = replace(simple_measured_device(), gemm_in_model_factor={"forward": 1.0, "forecast": 1.5})
    assert device.matmul_s(MM, "fp32") == pytest.approx(0.2)
    assert device.matmul_s(replace(MM, phase="forecast"), "fp32") == pytest.approx(0.3)
    assert device.matmul_s(replace(MM, phase="backward"), "fp32") == pytest.approx(0.2)


def test_a_product_pays_per_byte_of_its_weight_beside_its_factor():
    """MM multiplies 1000 rows by a 1000 × 1000 fp32 weight: 4 MB. At 1e-10 s a byte of weight and factor 1.2
    it costs 0.2 s × 1.2 + 4e6 × 1e-10 = 0.2404 s in the forward; a forecast has its own cost (2e-10: 0.2408 s
    at factor 1.0), a backward the forward's. A batched product (batch 8, 64 × 32 per problem, bf16) pays for
    its 8 × 64 × 32 × 2 bytes; an op of unknown shape pays only its factor."""
    device = replace(simple_measured_device(), gemm_in_model_factor={"forward": 1.2, "forecast": 1.0},
                     gemm_weight_s_per_byte={"forward": 1e-10, "forecast": 2e-10})
    assert device.matmul_s(MM, "fp32") == pytest.approx(0.2404)
    assert device.matmul_s(replace(MM, phase="forecast"), "fp32") == pytest.approx(0.2008)
    assert device.matmul_s(replace(MM, phase="backward"), "fp32") == pytest.approx(0.2404)
    bmm = OpRecord("aten.bmm.default", "matmul", "forward", "bfloat16", 2 * 8 * 16 * 32 * 64, 10**3, 10**3,
                   (8, 16, 32, 64))
    plain = replace(device, gemm_weight_s_per_byte={"forward": 0.0})
    assert device.matmul_s(bmm, "bf16") - plain.matmul_s(bmm, "bf16") == pytest.approx(8 * 64 * 32 * 2 * 1e-10)
    unknown = replace(MM, gemm=None)
    assert device.matmul_s(unknown, "fp32") == pytest.approx(plain.matmul_s(unknown, "fp32"))


def test_exact_gemm_shape_replaces_the_grid():
    """A shape timed exactly (1 ms) costs that time × the phase's factor, whatever its FLOPs; another shape
    is still read off the grid (2e9 FLOPs at 1e10 FLOP/s)."""
    timed = replace(MM, gemm=(1, 4, 64, 64), flops=2 * 4 * 64 * 64)
    device = replace(simple_measured_device(), gemm_shape_s={"1,4,64,64": 1e-3}, gemm_shape_busy={"1,4,64,64": 2.0},
                     gemm_in_model_factor={"forward": 1.0, "forecast": 1.5})
    assert device.matmul_s(timed, "fp32") == pytest.approx(1e-3)
    assert device.matmul_s(replace(timed, phase="forecast"), "fp32") == pytest.approx(1.5e-3)
    assert device.matmul_s(MM, "fp32") == pytest.approx(0.2)
    trace = StepTrace(((timed, 3), (MM, 1), (ADD, 1)))
    assert device.missing_gemm_shapes(trace) == [(1, 1000, 1000, 1000)]
    # A shape timed before busy threads were measured is timed again.
    assert replace(device, gemm_shape_busy={}).missing_gemm_shapes(trace) == [(1, 4, 64, 64), (1, 1000, 1000, 1000)]


def test_scatter_costs_its_rows():
    scatter = OpRecord("aten.embedding_dense_backward.default", "memory", "backward", "float32", 0, 6 * 10**6,
                       512, index_rows=10**6)
    device = simple_measured_device()
    assert device.memory_s(scatter) == pytest.approx((6 * 10**6 + 512) / 1e10 + 10**6 * SCATTER_S_PER_ROW)


def test_gpu_wave_quantisation_hand_derived():
    h100 = gpu_preset("h100-sxm")  # 132 SMs, 128×128 output tiles
    assert h100.wave_efficiency(1, 1536, 1536) == pytest.approx(144 / 264)  # 144 tiles: two waves, the second short
    assert h100.wave_efficiency(1, 128 * 12, 128 * 11) == pytest.approx(1.0)  # 132 tiles: one full wave
    big = OpRecord("aten.mm.default", "matmul", "forward", "bfloat16", 2 * 128 * 12 * 128 * 11 * 8192, 1, 1,
                   (1, 128 * 12, 128 * 11, 8192))
    assert h100.matmul_s(big, "bf16") == pytest.approx(big.flops / (989.4e12 * 0.803))
    assert h100.matmul_s(big, "tf32") == pytest.approx(big.flops / (494.7e12 * 0.803))
    with pytest.raises(ValueError, match="no bf16 matmul rate"):
        gpu_preset("t4").matmul_s(big, "bf16")


def test_gpu_host_runs_ahead_until_the_kernels_are_slower():
    """A GPU hides host time behind kernels: the step is max(host, kernels) + syncs × latency."""
    a100 = gpu_preset("a100-80gb")
    tiny_add = OpRecord("aten.add.Tensor", "memory", "forward", "float32", 0, 8, 4)
    host_bound = predict_step_time(StepTrace(((tiny_add, 1000),)), a100)
    per_op_host = a100.host_s(tiny_add)
    assert host_bound.total_s == pytest.approx(1000 * per_op_host) and host_bound.bound == "overhead"
    assert host_bound.memory_s == pytest.approx(1000 * 2.5e-6)  # each tiny kernel takes the floor
    heavy = predict_step_time(StepTrace(((MM, 100), (SYNC, 2))), a100)
    assert heavy.overhead_s == 0 and heavy.sync_s == pytest.approx(2 * a100.sync_s()) and heavy.bound == "matmul"


def test_compiled_what_if_drops_pointwise_ops_and_views():
    trace = StepTrace(((MM, 1), (ADD, 4), (VIEW, 10)))
    device = simple_measured_device()
    eager, compiled = predict_step_time(trace, device), predict_step_time(trace, device, compiled=True)
    assert compiled.memory_s == 0 and compiled.matmul_s == eager.matmul_s
    assert compiled.overhead_s == pytest.approx(HOST_S["backward"])  # the mm alone, dispatched without Python


def test_gemm_grid_interpolates_in_log_space():
    grid = GemmGrid((1, 4), (64, 256), (64, 256), (((1e9, 1e9), (1e9, 1e9)), ((4e9, 4e9), (4e9, 4e9))))
    assert grid.rate(1, 64, 64) == pytest.approx(1e9) and grid.rate(4, 256, 256) == pytest.approx(4e9)
    assert grid.rate(2, 100, 100) == pytest.approx(2e9)  # halfway in log2(m): the geometric mean
    assert grid.rate(4096, 8192, 8192) == pytest.approx(4e9)  # beyond the grid: its edge


def test_size_curve_log_log_inside_throughput_outside():
    curve = SizeCurve((1e3, 1e5), (1e-6, 1e-5))
    assert curve(1e4) == pytest.approx(math.sqrt(1e-6 * 1e-5))
    assert curve(1e7) == pytest.approx(1e-5 * 100) and curve(0) == 0


def test_presets_cite_every_number_and_match_cuda_names():
    for preset in GPU_PRESETS.values():
        assert preset.sources and all(preset.sources.values())
        assert preset.bandwidth_bytes_per_s > 0 and all(rate > 0 for rate in preset.matmul_peaks.values())
    assert {"h100-sxm", "h100-pcie", "h200", "a100-40gb", "a100-80gb", "a10g", "l4", "t4", "rtx-4090"} <= set(GPU_PRESETS)
    assert "tf32" in gpu_preset("a100-80gb").matmul_peaks and "tf32" not in gpu_preset("t4").matmul_peaks
    assert preset_for_device_name("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert preset_for_device_name("NVIDIA H200") == "h200"
    assert preset_for_device_name("NVIDIA A100-SXM4-80GB") == "a100-80gb"
    assert preset_for_device_name("Tesla T4") == "t4" and preset_for_device_name("Some GPU") is None


def test_predict_row_carries_the_workload_and_refuses_bad_devices():
    spec = BenchSpec(size="debug", architecture="token_ffn", num_experts=4, mode="forecast", batch_size=3,
                     context_length=32, prediction_length=8, num_samples=5)
    row = predict_row(spec, "a100-80gb", tf32=True)
    assert (row["mode"], row["batch_size"], row["context_length"], row["prediction_length"], row["num_samples"],
            row["tf32"]) == ("forecast", 3, 32, 8, 5, True)
    assert row["predicted_time_s"] == pytest.approx(row["predicted_matmul_s"] + row["predicted_memory_bound_s"]
                                                    + row["predicted_overhead_s"] + row["predicted_sync_s"])
    assert row["predicted_sync_count"] == 1 + 8  # the encoder's token-MoE block, then one per decoding step
    with pytest.raises(ValueError, match="unknown device 'tpu-v9'; valid devices: this-machine, h100-sxm"):
        predict_row(spec, "tpu-v9")
    with pytest.raises(ValueError, match="bf16 is not supported natively by NVIDIA T4"):
        predict_row(BenchSpec(size="debug", dtype="bf16"), "t4")


def test_cli_predicts_without_running_and_lists_devices_for_a_bad_name():
    command = [sys.executable, "-m", "planner", "bench", "--sizes", "debug", "--experts", "0", "--modes", "train",
               "--batch-size", "2", "--context-length", "32", "--prediction-length", "8"]
    bad = subprocess.run([*command, "--predict-for", "tpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and "h100-sxm" in bad.stderr and "this-machine" in bad.stderr
    good = subprocess.run([*command, "--predict-for", "h200", "--format", "csv"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    header = next(line for line in good.stdout.splitlines() if not line.startswith("#"))
    assert {"mode", "batch_size", "context_length", "prediction_length", "num_samples", "dtype",
            "predicted_matmul_s", "predicted_bound"} <= set(header.split(","))
