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


def test_a_steps_debug_variant_is_the_debug_model_of_its_architecture():
    """The host's terms of a step are fitted on the debug model with the step's own MoE settings: built from
    it, small's MoE-16 token_ffn top-3 (its MoE block at one debug lacks) has the parameters of debug's own
    MoE-16 token_ffn top-3, counted on the built modules, and more than dense debug's."""
    from model.build import build_model_from_config
    from model.config import make_config
    from planner.steptime.calibration_steps import debug_variant

    def parameters(config):
        return sum(p.numel() for p in build_model_from_config(config).parameters())

    small = make_config("small", architecture="token_ffn", num_experts=16, top_k=3, decoder_moe_blocks=(5,))
    variant = debug_variant(small)
    by_hand = make_config("debug", architecture="token_ffn", num_experts=16, top_k=3)
    assert parameters(variant) == parameters(by_hand) > parameters(make_config("debug"))
    assert debug_variant(make_config("tiny")) == make_config("debug")
