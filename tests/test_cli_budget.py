"""`python -m planner solve` and `python -m planner plan --config`, end to end through main()."""

import json

import pytest

from model import make_config
from planner.cli import main
from planner.parallel import GPU_MEMORY_BYTES, plan_all_strategies
from planner.params import count_params
from planner.solver import Budget, SearchSpace, solve
from planner.workload import Workload

TRAINING_YAML = """\
model_id: amazon/chronos-t5-tiny
context_length: 128
prediction_length: 16
use_moe: true
num_experts: 6
num_active_experts: 2
moe_architecture: token_ffn
per_device_train_batch_size: 4
warmup_ratio: 0.1
"""


def run_json(capsys, argv):
    assert main([*argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_solve_lists_the_solver_ranking(capsys):
    rows = run_json(capsys, ["solve", "--size", "tiny", "--target-total", "40M", "--budget", "flop_ratio",
                             "--limit", "1.5", "--max-experts", "20", "--max-top-k", "4", "--top", "5",
                             "--context-length", "128", "--prediction-length", "16"])
    expected = solve(make_config("tiny"), 40_000_000, Budget("flop_ratio", 1.5),
                     workload=Workload(context_length=128, prediction_length=16),
                     space=SearchSpace(max_experts=20, max_top_k=4), limit=5).candidates
    assert [(r["architecture"], r["num_experts"], r["top_k"], r["total_params"]) for r in rows] == [
        (c.config.architecture, c.config.num_experts, c.config.top_k, c.total_params) for c in expected]
    assert all(r["budget_flop_ratio"] <= 1.5 for r in rows)


def test_solve_pareto_front_is_monotone(capsys):
    rows = run_json(capsys, ["solve", "--size", "tiny", "--target-total", "40M", "--limit", "12M",
                             "--max-experts", "16", "--max-top-k", "3", "--pareto"])
    assert [r["active_params"] for r in rows] == sorted(r["active_params"] for r in rows)
    assert [r["total_params"] for r in rows] == sorted(r["total_params"] for r in rows)


def test_plan_reads_a_training_yaml_and_lists_ignored_keys(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(TRAINING_YAML)
    rows = run_json(capsys, ["plan", "--config", str(path)])
    config = make_config("tiny", architecture="token_ffn", num_experts=6, top_k=2)
    assert rows[0]["total_params"] == count_params(config).total_params
    assert (rows[0]["batch_size"], rows[0]["context_length"]) == (4, 128)
    assert rows[0]["metadata"]["ignored_keys"] == "warmup_ratio"


def test_plan_strategies_match_the_parallel_planner(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(TRAINING_YAML)
    rows = run_json(capsys, ["plan", "--config", str(path), "--strategies", "--devices", "4", "--gpu", "T4 16GB"])
    config = make_config("tiny", architecture="token_ffn", num_experts=6, top_k=2)
    workload = Workload(batch_size=4, context_length=128, prediction_length=16)
    expected = plan_all_strategies(config, workload, 4, device_memory_bytes=GPU_MEMORY_BYTES["T4 16GB"])
    assert [(r["strategy"], r["total_bytes"], r["fits"]) for r in rows] == [
        (r["strategy"], r["total_bytes"], r["fits"]) for r in expected]


@pytest.mark.parametrize(("argv", "flag"), [
    (["solve", "--target-total", "lots", "--limit", "5M"], "--target-total"),
    (["solve", "--target-total", "100M", "--limit", "-3"], "--limit"),
    (["solve", "--target-total", "100M", "--limit", "5M", "--budget", "speed"], "--budget"),
    (["solve", "--target-total", "100M", "--limit", "5M", "--architectures", "everything"], "--architectures"),
    (["plan", "--config", "missing.yaml"], "does not exist"),
    (["plan", "--config", "x.yaml", "--gpu", "V100"], "--gpu"),
])
def test_bad_flags_exit_2_with_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert flag in error and "\n" not in error


def test_plan_expert_load_scales_expert_parallel_and_is_bounded(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(TRAINING_YAML)
    argv = ["plan", "--config", str(path), "--strategies", "--devices", "4"]
    balanced = run_json(capsys, argv)
    loaded = run_json(capsys, argv + ["--expert-load", "3"])
    # token_ffn E=6, K=2 on 4 devices: device 0 holds c = ceil(6/4) = 2 experts; at most 4·min(2, 2)/2 = 4
    for before, after in zip(balanced, loaded):
        if before["strategy"] == "expert_parallel":
            assert after["activations_bytes"] > before["activations_bytes"]
        else:
            assert {k: v for k, v in after.items() if k != "metadata"} == {
                k: v for k, v in before.items() if k != "metadata"}
    assert loaded[0]["metadata"]["expert_load_factor"] == 3.0
    for value in ("4.5", "-1", "nan", "lots"):
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--expert-load", value])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert "--expert-load" in error and "\n" not in error
    with pytest.raises(SystemExit):
        main(["plan", "--config", str(path), "--expert-load", "2"])
    assert "applies only with --strategies" in capsys.readouterr().err
