"""This machine's probe cache: exact GEMM timings kept once and merged, a busy machine's timings dropped, bad
entries refused and probed again (never used), and a probe that cannot be saved still used."""

import json
import math
from dataclasses import replace

import pytest

from planner.bench import BenchSpec, predict_row
from planner.steptime import device_cache
from planner.steptime.curves import GemmGrid
from planner.steptime.ops import OpRecord, StepTrace
from tests.steptime_fixtures import FLOPS_PER_S, simple_measured_device


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(tmp_path))


def test_exact_gemm_shapes_are_timed_once_and_kept(monkeypatch):
    """The shapes a prediction lacks are timed (real GEMMs, positive seconds), saved, and merged with what
    another process saved for the same probe; a new probe starts afresh."""
    import torch  # noqa: F401 - the timing runs real GEMMs

    small = OpRecord("aten.mm.default", "matmul", "forward", "float32", 2 * 3 * 16 * 8, 0, 0, (1, 3, 16, 8))
    batched = OpRecord("aten.bmm.default", "matmul", "forward", "float32", 2 * 2 * 5 * 4 * 6, 0, 0, (2, 5, 4, 6))
    # Grid rates far below this CPU's, so that no timing of a loaded machine reads as disturbed.
    slow = GemmGrid((1, 1024), (64, 4096), (64, 4096), (((1e6,) * 2,) * 2,) * 2)
    device = replace(simple_measured_device("Some CPU"), mm=slow, bmm=slow)
    device_cache.save_measured_device(replace(device, gemm_shape_s={"1,7,7,7": 1e-6}))  # another process's
    timed, notes = device_cache.with_gemm_shapes_of(device, StepTrace(((small, 1), (batched, 2))))
    assert notes == [] and set(timed.gemm_shape_s) == set(timed.gemm_shape_busy) == {"1,3,16,8", "2,5,4,6"}
    assert all(0 < seconds < 0.1 for seconds in timed.gemm_shape_s.values())
    assert all(0 < busy < 64 for busy in timed.gemm_shape_busy.values())
    saved, _ = device_cache.load_measured_device("Some CPU", "fp32")
    assert set(saved.gemm_shape_s) == {"1,3,16,8", "2,5,4,6", "1,7,7,7"}
    assert set(saved.gemm_shape_busy) == {"1,3,16,8", "2,5,4,6"}  # the other process timed no busy threads
    assert device_cache.with_gemm_shapes_of(saved, StepTrace(((small, 1),)))[0] is saved  # nothing to time
    reprobed = replace(device, measured_on="2026-02-02")
    device_cache.save_measured_device(reprobed)
    assert device_cache.load_measured_device("Some CPU", "fp32")[0].gemm_shape_s == {}


def test_shapes_a_run_has_just_timed_are_kept_without_timing_them_again(monkeypatch):
    """A benchmark re-times its step's shapes (remeasure_state) before caching the ones the probe lacked: those
    timings are saved as they are, nothing is timed twice, and shapes the cache already has keep theirs."""
    from planner.steptime import kernel_probes

    monkeypatch.setattr(kernel_probes, "time_gemm_shapes", lambda shapes, dtype: pytest.fail("timed twice"))
    known = OpRecord("aten.mm.default", "matmul", "forward", "float32", 2 * 3 * 16 * 8, 0, 0, (1, 3, 16, 8))
    new = OpRecord("aten.bmm.default", "matmul", "forward", "float32", 2 * 2 * 5 * 4 * 6, 0, 0, (2, 5, 4, 6))
    device = replace(simple_measured_device("Some CPU"), gemm_shape_s={"1,3,16,8": 1e-6},
                     gemm_shape_busy={"1,3,16,8": 1.0})
    retimed = replace(device, gemm_shape_s={"1,3,16,8": 3e-6, "2,5,4,6": 2e-6, "1,9,9,9": 5e-6},
                      gemm_shape_busy={"1,3,16,8": 1.5, "2,5,4,6": 1.25, "1,9,9,9": 1.0})
    kept, notes = device_cache.with_gemm_shapes_of(device, StepTrace(((known, 1), (new, 2))), timed=retimed)
    assert notes == []
    assert kept.gemm_shape_s == {"1,3,16,8": 1e-6, "2,5,4,6": 2e-6}  # the step's new shape only, as timed
    assert kept.gemm_shape_busy == {"1,3,16,8": 1.0, "2,5,4,6": 1.25}
    assert device_cache.load_measured_device("Some CPU", "fp32")[0].gemm_shape_s == kept.gemm_shape_s


def test_a_shape_below_the_grids_smallest_point_is_not_read_as_disturbed():
    """A decoding step's (1 × 1) · (1 × 64), 256 times, runs in tens of µs, as any call does; the grid
    (smallest point m 1, n 64, k 64 here, at 1e10 FLOP/s) reads its 33 KFLOPs as 3.3 ns. Held to the smallest
    point's time at its batch (256 × 2 × 64 × 64 FLOPs: 0.21 ms), a 63 µs timing is kept; 200 × that is not."""
    point_s = 256 * 2 * 64 * 64 / FLOPS_PER_S
    device = replace(simple_measured_device(), gemm_shape_s={"256,1,64,1": 63e-6, "256,1,64,2": 200 * point_s},
                     gemm_shape_busy={"256,1,64,1": 1.0, "256,1,64,2": 1.0})
    assert device.without_disturbed_gemm_shapes().gemm_shape_s == {"256,1,64,1": 63e-6}


@pytest.mark.parametrize("damage", [
    lambda entry: [1, 2, 3],
    lambda entry: {key: value for key, value in entry.items() if key != "mm"},
    lambda entry: {**entry, "host_s_per_view": 0},
    lambda entry: {**entry, "scatter_s_per_row": -1.0},
    lambda entry: {**entry, "fresh_page_s_per_byte": float("nan")},
    lambda entry: {**entry, "memory": {**entry["memory"], "softmax": {"sizes": [1, 2], "seconds": [0.0, 1.0]}}},
    lambda entry: {**entry, "gemm_in_model_factor": 1.2},  # a cache from before the factor was per phase
    lambda entry: {**entry, "gemm_in_model_factor": {"forecast": 1.2}},
    lambda entry: {**entry, "gemm_in_model_factor": {"forward": -1.0}},
    # probes from before the GEMMs' cost per weight byte was fitted, and damaged costs
    lambda entry: {key: value for key, value in entry.items() if key != "gemm_weight_s_per_byte"},
    lambda entry: {**entry, "gemm_weight_s_per_byte": {"forecast": 1e-10}},
    lambda entry: {**entry, "gemm_weight_s_per_byte": {"forward": -1e-10}},
    lambda entry: {**entry, "gemm_weight_s_per_byte": {"forward": float("nan")}},
    lambda entry: {**entry, "gemm_weight_s_per_byte": 1e-10},
    # probes from before the pool's spinning was measured, and damaged values
    lambda entry: {key: value for key, value in entry.items() if key != "spin_window_s"},
    lambda entry: {key: value for key, value in entry.items() if key != "pool_threads"},
    lambda entry: {**entry, "spin_window_s": -0.008},
    lambda entry: {**entry, "spin_window_s": float("nan")},
    lambda entry: {**entry, "pool_threads": 0},
    lambda entry: {**entry, "pool_threads": "two"},
    lambda entry: {**entry, "gemm_shape_s": [1e-3]},
    lambda entry: {**entry, "gemm_shape_s": {"1,4,64": 1e-3}},
    lambda entry: {**entry, "gemm_shape_s": {"1,4,64,0": 1e-3}},
    lambda entry: {**entry, "gemm_shape_s": {"1,4,64,64": 0.0}},
    lambda entry: {**entry, "gemm_shape_s": {"1,4,64,64": float("nan")}},
    # probes from before busy threads were measured, and damaged busy threads
    lambda entry: {**entry, "memory": {key: {k: v for k, v in curve.items() if k != "busy_threads"}
                                       for key, curve in entry["memory"].items()}},
    lambda entry: {key: value for key, value in entry.items() if key != "host_busy"},
    lambda entry: {key: value for key, value in entry.items() if key != "streamed_memory"},
    # probes from before the private caches were read, and damaged sizes
    lambda entry: {key: value for key, value in entry.items() if key != "private_cache_bytes"},
    lambda entry: {**entry, "private_cache_bytes": 0},
    lambda entry: {**entry, "private_cache_bytes": "512K"},
    lambda entry: {**entry, "host_busy": {"forward": 0.0}},
    lambda entry: {**entry, "scatter_busy": float("inf")},
    lambda entry: {**entry, "fresh_page_busy": 1e6},
    lambda entry: {**entry, "gemm_shape_busy": {"1,4,64": 1.0}},
    lambda entry: {**entry, "gemm_shape_busy": {"1,4,64,64": -2.0}},
])
def test_damaged_probe_cache_is_refused_and_probed_again(damage, monkeypatch):
    good = simple_measured_device("Some CPU (2 threads)")
    device_cache.save_measured_device(good)
    path = device_cache.cache_dir() / device_cache.DEVICE_MODEL_FILE
    values = json.loads(path.read_text())
    values[good.name]["fp32"] = damage(values[good.name]["fp32"])
    path.write_text(json.dumps(values))
    loaded, problem = device_cache.load_measured_device(good.name, "fp32")
    assert loaded is None and "refused" in problem and "\n" not in problem
    probed = simple_measured_device(good.name)
    monkeypatch.setattr("planner.steptime.probe.probe_device", lambda dtype, name: probed)
    device, notes = device_cache.measured_device(good.name, "fp32")
    assert device is probed and any("refused" in note for note in notes)
    assert device_cache.load_measured_device(good.name, "fp32") == (probed, None)  # the new probe was kept


def test_probe_cache_from_before_exact_shapes_is_used():
    good = simple_measured_device("Some CPU (2 threads)")
    device_cache.save_measured_device(good)
    path = device_cache.cache_dir() / device_cache.DEVICE_MODEL_FILE
    values = json.loads(path.read_text())
    del values[good.name]["fp32"]["gemm_shape_s"]
    path.write_text(json.dumps(values))
    assert device_cache.load_measured_device(good.name, "fp32") == (good, None)


def test_cache_keeps_the_probed_terms_not_a_steps():
    """Whether a step's optimizer states fit the cache is the step's (set by for_step), not the device's: the
    cache leaves it out, and a device read back prices every step as probed."""
    good = replace(simple_measured_device("Some CPU (2 threads)"), optimizer_in_cache=True)
    device_cache.save_measured_device(good)
    values = json.loads((device_cache.cache_dir() / device_cache.DEVICE_MODEL_FILE).read_text())
    assert "optimizer_in_cache" not in values[good.name]["fp32"]
    assert device_cache.load_measured_device(good.name, "fp32") == (replace(good, optimizer_in_cache=False), None)


def test_probe_cache_that_is_not_json_is_refused(monkeypatch):
    (device_cache.cache_dir() / device_cache.DEVICE_MODEL_FILE).write_text("{not json")
    loaded, problem = device_cache.load_measured_device("x", "fp32")
    assert loaded is None and "unreadable" in problem


def test_probe_that_cannot_be_saved_is_used_and_says_so(monkeypatch, tmp_path):
    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(blocked))
    probed = simple_measured_device("Some CPU")
    monkeypatch.setattr("planner.steptime.probe.probe_device", lambda dtype, name: probed)
    device, notes = device_cache.measured_device("Some CPU", "fp32")
    assert device is probed and len(notes) == 1 and "could not be saved" in notes[0]


def test_predict_row_says_when_this_machines_timings_could_not_be_saved(monkeypatch, tmp_path):
    """An unwritable cache: the probe and the step's exact GEMM timings are used, and the row says twice that
    they could not be kept. (The shapes' timings are the grid's own, so a busy machine cannot disturb them.)"""
    from planner.steptime import kernel_probes
    from planner.steptime.kernel_probes import Timed
    from planner.steptime.measured import gemm_key

    def grid_timings(shapes, dtype):
        return {gemm_key(*shape): Timed(2 * math.prod(shape) / FLOPS_PER_S, 1.0) for shape in shapes}

    monkeypatch.setattr(kernel_probes, "time_gemm_shapes", grid_timings)
    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(blocked))
    monkeypatch.setattr("planner.steptime.probe.probe_device", lambda dtype, name: simple_measured_device(name))
    row = predict_row(BenchSpec(size="debug", mode="forward", batch_size=1, context_length=16, prediction_length=4),
                      "this-machine")
    assert row["notes"].count("could not be saved") == 2 and row["predicted_cpu_s"] > 0


def test_gemm_timings_a_busy_machine_disturbed_are_neither_kept_nor_used(monkeypatch):
    """An exact timing more than DISTURBED_GEMM_FACTOR × the grid's price for its shape (here 1 s for a
    (64 × 64) · (64 × 64) product the grid prices at 52 µs) was taken on a busy machine: a step that times it
    prices the shape from the grid, says so in a note and does not save it; a cache that holds one drops it
    on loading; a timing 40× the grid's (a shape off the grid's axes) stays."""
    from planner.steptime import kernel_probes
    from planner.steptime.kernel_probes import Timed
    from planner.steptime.measured import DISTURBED_GEMM_FACTOR, MeasuredDevice

    device = simple_measured_device("Busy CPU")
    grid_s = 2 * 64**3 / FLOPS_PER_S
    mm = OpRecord("aten.mm.default", "matmul", "forward", "float32", 2 * 64**3, 2 * 64 * 64 * 4, 64 * 64 * 4,
                  (1, 64, 64, 64), fresh_bytes=0)
    monkeypatch.setattr(kernel_probes, "time_gemm_shapes",
                        lambda shapes, dtype: {"1,64,64,64": Timed(1.0, 1.0)})
    timed, notes = device_cache.with_gemm_shapes_of(device, StepTrace(((mm, 1),)))
    assert "1,64,64,64" not in timed.gemm_shape_s and timed.matmul_s(mm, "fp32") == pytest.approx(grid_s)
    assert len(notes) == 1 and "busy machine" in notes[0] and "\n" not in notes[0]
    assert "1,64,64,64" not in device_cache.load_measured_device("Busy CPU", "fp32")[0].gemm_shape_s
    values = replace(device, gemm_shape_s={"1,64,64,64": 1.0, "1,64,64,128": 40 * 2 * grid_s},
                     gemm_shape_busy={"1,64,64,64": 1.0, "1,64,64,128": 1.0}).to_dict()
    loaded = MeasuredDevice.from_dict(values)
    assert loaded.gemm_shape_s == {"1,64,64,128": 40 * 2 * grid_s} and set(loaded.gemm_shape_busy) == {"1,64,64,128"}
    assert 40 < DISTURBED_GEMM_FACTOR < 250
