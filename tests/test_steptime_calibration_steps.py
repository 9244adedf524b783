"""The calibration steps a benchmark run times beside its own (steptime.calibration_steps)."""

import time

import pytest

from planner.steptime.calibration_steps import CalibrationStep, time_alternately
from planner.steptime.kernel_probes import MIN_REPEATS
from planner.steptime.ops import StepTrace


def _sleeping_step(phase: str, seconds: float, calls: list[str]) -> CalibrationStep:
    def run():
        calls.append(phase)
        time.sleep(seconds)
    return CalibrationStep(phase, run, StepTrace(()))


def test_steps_timed_on_their_own_alternate_round_by_round_until_the_time_is_spent():
    """One of each step per round, each timing after an untimed run of the same step, until every step has
    MIN_REPEATS timings and all of them together the time asked per step."""
    calls: list[str] = []
    steps = [_sleeping_step("forward", 0.004, calls), _sleeping_step("backward", 0.001, calls)]
    time_alternately(steps, min_time_s=0.05)
    rounds = len(steps[0].wall_s)
    assert [len(step.wall_s) for step in steps] == [rounds, rounds] and rounds >= MIN_REPEATS
    assert calls == ["forward", "forward", "backward", "backward"] * rounds
    assert sum(sum(step.wall_s) for step in steps) >= 0.05 * len(steps)
    assert all(seconds >= 0.004 for seconds in steps[0].wall_s)


def test_a_steps_timing_is_the_median_with_the_threads_it_kept_busy():
    """The median wall time of its timings, and CPU time ÷ wall time over all of them (as typical_time)."""
    step = CalibrationStep("forward", lambda: None, StepTrace(()))
    step.wall_s[:], step.cpu_s[:] = [0.010, 0.030, 0.020], [0.020, 0.060, 0.010]
    timed = step.timed()
    assert timed.seconds == pytest.approx(0.020) and timed.busy_threads == pytest.approx(0.090 / 0.060)


def test_an_untimed_step_has_no_timing_to_give():
    with pytest.raises(ValueError, match="forward calibration step has not been timed"):
        CalibrationStep("forward", lambda: None, StepTrace(())).timed()
