"""On a CPU a benchmark run times what its prediction prices beside its own timed steps (bench.worker): the
calibration steps and the step's GEMM shapes, one timing of each after each timed step. In a process of its
own, whose allocator settings stay there."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from planner.bench import BenchSpec
from planner.bench.device import describe_device
from planner.steptime.device_cache import save_measured_device
from tests.steptime_fixtures import simple_measured_device
from tests.test_bench import DEBUG


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """The device-probe cache of each test its own (the worker's subprocess inherits it)."""
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(tmp_path))


# Runs the worker on a spec (stdin, JSON) with remeasure_state wrapped to print, as JSON, the timings each
# calibration step it is handed holds: in a process of its own, whose allocator settings stay there.
_CALIBRATION_COUNTS = """
import json, sys
from planner.bench import worker
from planner.bench.spec import BenchSpec
from planner.steptime import probe
real = probe.remeasure_state
def remeasure(device, mode, trace, steps=None, gemms=None):
    print(json.dumps({"steps": [[step.phase, len(step.wall_s), len(step.cpu_s)] for step in steps],
                      "ops": steps[0].trace.op_count,
                      "gemms": [len(gemms.wall_s[shape]) for shape in gemms.shapes]}), file=sys.stderr)
    return real(device, mode, trace, steps, gemms)
probe.remeasure_state = remeasure
worker.run(BenchSpec.from_dict(json.loads(sys.stdin.read())), lambda event, **fields: None)
"""


@pytest.mark.parametrize("mode, phases, experts", [("forecast", ["forecast"], 0),
                                                   ("train", ["forward", "backward", "optimizer"], 4)])
def test_the_worker_times_its_calibration_steps_one_of_each_after_each_timed_step(mode, phases, experts):
    """On a CPU the host's terms of a run's prediction are fitted on calibration steps timed beside its own
    steps (probe.remeasure_state), and its GEMM shapes priced at timings made there too: one timing of each
    step and each shape after each of its `repeats` timed steps, none during the warm-up, handed over. The
    calibration steps are of the debug model of the run's architecture: the first dispatches the ops of that
    model's step at the calibration workload, recorded here."""
    from model.build import build_model_from_config
    from model.config import make_config
    from planner.measure import token_batch
    from planner.steptime.calibration_steps import CALIBRATION_WORKLOAD
    from planner.steptime.ops import first_phase
    from planner.steptime.trace import record_step

    save_measured_device(simple_measured_device(describe_device("cpu")))
    spec = BenchSpec(**{**DEBUG, "repeats": 3}, mode=mode, architecture="token_ffn", num_experts=experts, top_k=1)
    config = make_config("debug", architecture="token_ffn", num_experts=experts, top_k=1)
    batch = token_batch(config, CALIBRATION_WORKLOAD, torch.Generator().manual_seed(0))
    calibration = record_step(build_model_from_config(config), batch, CALIBRATION_WORKLOAD, first_phase(mode))
    done = subprocess.run([sys.executable, "-c", _CALIBRATION_COUNTS], input=json.dumps(spec.to_dict()),
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    counts = json.loads(done.stderr.strip().splitlines()[-1])
    assert counts["steps"] == [[phase, spec.repeats, spec.repeats] for phase in phases], done.stderr[-2000:]
    assert counts["gemms"] and set(counts["gemms"]) == {spec.repeats}  # the debug model's are fewer than MAX_SHAPES
    assert counts["ops"] == calibration.op_count


# Runs the worker with the step and the GEMM timings beside it wrapped to print, as JSON, the order of their
# calls: "step" for a run of the benchmark's step, "beside" for one round of its GEMM shapes' timings.
_STEP_ORDER = """
import json, sys
from planner.bench import steps, worker
from planner.bench.spec import BenchSpec
from planner.steptime import gemms_beside
calls = []
real_make_step, real_time_once = steps.make_step, gemms_beside.GemmsBeside.time_once
def make_step(*args):
    step = real_make_step(*args)
    def run():
        calls.append("step")
        return step.run()
    return steps.BenchStep(run, step.record, step.optimizer)
def time_once(self):
    calls.append("beside")
    real_time_once(self)
steps.make_step, gemms_beside.GemmsBeside.time_once = make_step, time_once
worker.run(BenchSpec.from_dict(json.loads(sys.stdin.read())), lambda event, **fields: None)
print(json.dumps(calls), file=sys.stderr)
"""


def test_each_timed_step_but_the_first_follows_an_untimed_one_after_the_timings_beside():
    """The timings beside a timed step leave the caches full of their operands; a short step is run once,
    untimed, after them, so the next timed one finds the caches as a loop of steps leaves them: after the
    warm-up and its one untimed step, timed steps and rounds of timings alternate, an untimed step between a
    round and the next timed step, none after the last round."""
    save_measured_device(simple_measured_device(describe_device("cpu")))
    spec = BenchSpec(**{**DEBUG, "repeats": 3}, mode="forward")
    done = subprocess.run([sys.executable, "-c", _STEP_ORDER], input=json.dumps(spec.to_dict()),
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    calls = json.loads(done.stderr.strip().splitlines()[-1])
    first_round = calls.index("beside")
    assert calls[:first_round] == ["step"] * (spec.memory_steps + 2), done.stderr[-2000:]
    assert calls[first_round:] == ["beside", "step", "step", "beside", "step", "step", "beside"]
