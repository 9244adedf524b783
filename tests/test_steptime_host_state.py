"""The machine's state a probe and a benchmark run share: the threads' speedup on a reference GEMM."""

import pytest
import torch

from planner.steptime.host_state import SPEEDUP_TOLERANCE, host_drift_note, parallel_speedup, state_note


def test_one_thread_has_no_speedup_to_measure(one_thread):
    assert parallel_speedup() == 1.0


def test_speedup_is_one_thread_time_over_all_threads_time_and_leaves_the_thread_count_alone(two_threads, monkeypatch):
    """The timer is replaced by one that reads the thread count it runs under (4 ms on one thread, 2.5 ms on
    all): the speedup is 1.6, and the thread count is restored even when the one-thread timing raises."""
    from planner.steptime import kernel_probes

    threads = torch.get_num_threads()
    timed_under: list[int] = []

    def fake_typical_time_s(run, min_time_s):
        timed_under.append(torch.get_num_threads())
        return 0.004 if torch.get_num_threads() == 1 else 0.0025

    monkeypatch.setattr(kernel_probes, "typical_time_s", fake_typical_time_s)
    assert parallel_speedup() == 0.004 / 0.0025
    assert timed_under == [threads, 1] and torch.get_num_threads() == threads

    def failing_on_one_thread(run, min_time_s):
        if torch.get_num_threads() == 1:
            raise RuntimeError("timer failed")
        return 0.0025

    monkeypatch.setattr(kernel_probes, "typical_time_s", failing_on_one_thread)
    with pytest.raises(RuntimeError):
        parallel_speedup()
    assert torch.get_num_threads() == threads


def test_a_run_in_the_probes_state_has_no_note_and_another_state_is_named():
    assert state_note(1.9, 1.9) is None and state_note(1.9 * (1 + SPEEDUP_TOLERANCE * 0.9), 1.9) is None
    note = state_note(1.5, 1.9)
    assert note is not None and "1.50×" in note and "1.90×" in note and "\n" not in note


def test_a_host_time_far_from_the_probes_is_a_busy_machine_and_named():
    """Within a fifth to five times the probe's time per op a run's re-timed host time is used (a quiet
    machine's drift: 2.2× was seen); beyond, the note names both times and says the probe's is kept."""
    assert host_drift_note(7e-6, 7e-6) is None and host_drift_note(13e-6, 7e-6) is None
    assert host_drift_note(3.6e-6, 7e-6) is None and host_drift_note(15.6e-6, 7e-6) is None
    assert host_drift_note(34e-6, 7e-6) is None and host_drift_note(1.5e-6, 7e-6) is None
    for run_s in (2.4e-3, 36e-6, 1.3e-6):
        note = host_drift_note(run_s, 7e-6)
        assert note is not None and f"{run_s * 1e6:.1f} µs" in note and "7.0 µs" in note and "\n" not in note
        assert "keeps the probe's" in note


def test_a_cached_probe_without_the_speedup_is_refused(tmp_path, monkeypatch):
    import json

    from planner.steptime.device_cache import DEVICE_MODEL_FILE, load_measured_device
    from tests.steptime_fixtures import simple_measured_device

    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(tmp_path))
    entry = simple_measured_device("old CPU").to_dict()
    del entry["parallel_speedup"]  # a probe cached before the speedup was recorded
    (tmp_path / DEVICE_MODEL_FILE).write_text(json.dumps({"old CPU": {"fp32": entry}}))
    device, problem = load_measured_device("old CPU", "fp32")
    assert device is None and "parallel_speedup" in problem and "probing again" in problem


def test_the_reference_gemms_state_ratio_is_the_median_during_the_steps_over_the_median_beside_pricing():
    """Three timings after steps (3, 9, 4 ms: median 4) against five on each side of the pricing (2, 2, 2, 8,
    8 and 2, 2, 2, 2, 9 ms: median 2) read 2.0; with no timings on either side there is no ratio."""
    from planner.steptime.host_state import ReferenceGemm

    gemm = ReferenceGemm()
    assert gemm.state_ratio() is None
    timings = iter([0.003, 0.009, 0.004] + [0.002, 0.002, 0.002, 0.008, 0.008] + [0.002] * 4 + [0.009])
    gemm._time_once = lambda: next(timings)
    for _ in range(3):
        gemm.during_steps()
    assert gemm.state_ratio() is None
    gemm.beside_pricing()
    gemm.beside_pricing()
    assert len(gemm.pricing_s) == 10 and gemm.state_ratio() == 2.0
    real = ReferenceGemm()
    real.during_steps()
    real.beside_pricing(repeats=1)
    assert 0 < real.steps_s[0] < 1 and 0 < real.state_ratio() < 1000  # a few milliseconds each here
