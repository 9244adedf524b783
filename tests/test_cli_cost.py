"""`python -m planner run` and `python -m planner serve`, end to end through main(): rows equal planner.cost's,
a Chronos YAML fills a run, bad input is one line naming the flag (exit 2), and `run`, `plan --strategies`
and the Devices tab agree on what fits."""

import json

import pytest

from model.build import build_model_from_config

from model import make_config
from planner.cli import main
from planner.cost.service import ForecastService, plan_service
from planner.cost.training import TrainingRun, price_training_run
from planner.params import count_params

YAML = """\
model_id: amazon/chronos-t5-tiny
context_length: 64
prediction_length: 16
use_moe: true
num_experts: 4
num_active_experts: 2
moe_architecture: token_ffn
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
max_steps: 200000
tf32: true
torch_compile: true
optim: adamw_bnb_8bit
"""


@pytest.fixture(autouse=True)
def _shared_cache(shared_cache_dir, monkeypatch):
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(shared_cache_dir))


def run_json(capsys, argv):
    assert main([*argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_run_rows_equal_the_planner(capsys):
    (row,) = run_json(capsys, ["run", "--size", "tiny", "--gpu", "h100-sxm", "--devices", "2", "--global-batch",
                               "16", "--accumulation", "2", "--steps", "5K", "--context-length", "64",
                               "--prediction-length", "16", "--strategy", "zero2", "--precision", "amp_bf16"])
    expected = price_training_run(TrainingRun(make_config("tiny"), "h100-sxm", num_devices=2, per_device_batch=4,
                                              gradient_accumulation=2, steps=5000, context_length=64,
                                              prediction_length=16, strategy="zero2", precision="amp_bf16"))
    assert row["step_time_s"] == pytest.approx(expected.step_time_s)
    assert row["cost_usd"] == pytest.approx(expected.cost_usd) and row["hours"] == pytest.approx(expected.hours)
    assert (row["per_device_batch"], row["gradient_accumulation"], row["global_batch"]) == (4, 2, 16)
    for key in ("step_time_s", "hours", "device_hours", "cost_usd", "mfu", "bound", "fits", "headroom_bytes"):
        assert key in row


def test_training_yaml_fills_the_run(tmp_path, capsys):
    """max_steps, the batch and accumulation, tf32, torch_compile and 8-bit AdamW (2 bytes of moments a
    parameter: weights 4 + gradients 4 + 2) come from the file."""
    path = tmp_path / "train.yaml"
    path.write_text(YAML)
    (row,) = run_json(capsys, ["run", "--config", str(path), "--gpu", "a100-80gb"])
    assert (row["steps"], row["per_device_batch"], row["gradient_accumulation"]) == (200_000, 4, 2)
    assert row["precision"] == "tf32" and row["compiled"] is True
    params = count_params(make_config("tiny", architecture="token_ffn", num_experts=4, top_k=2)).total_params
    config = make_config("tiny", architecture="token_ffn", num_experts=4, top_k=2)
    estimate = price_training_run(TrainingRun(config, "a100-80gb", per_device_batch=4, gradient_accumulation=2,
                                              steps=200_000, context_length=64, prediction_length=16,
                                              precision="tf32", optimizer="adamw_8bit", compiled=True))
    assert row["peak_bytes"] == estimate.headroom.peak_bytes
    states = estimate.headroom.peak_bytes - price_training_run(
        TrainingRun(config, "a100-80gb", per_device_batch=4, steps=1, context_length=64, prediction_length=16,
                    precision="tf32", optimizer="adamw")).headroom.peak_bytes
    # 8-bit moments instead of fp32 ones; torch's AdamW also keeps a 4-byte `step` tensor per parameter tensor,
    # bitsandbytes' 8-bit AdamW a Python int
    tensors = len(list(build_model_from_config(config, device="meta").parameters()))
    assert states == (2 - 8) * params - 4 * tensors


def test_an_8bit_optimizer_other_than_adamw_is_refused(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(YAML.replace("adamw_bnb_8bit", "lion_8bit"))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(path)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "optim 'lion_8bit'" in message and "\n" not in message


def test_serve_rows_equal_the_planner(capsys):
    rows = run_json(capsys, ["serve", "--size", "tiny", "--gpu", "l4,h100-sxm", "--series", "1M", "--num-samples",
                             "4", "--context-length", "64", "--prediction-length", "16", "--batch-size", "8"])
    for row, gpu in zip(rows, ("l4", "h100-sxm")):
        expected = plan_service(ForecastService(make_config("tiny"), gpu, num_samples=4, context_length=64,
                                                prediction_length=16, batch_size=8))
        assert row["gpu"] == gpu and row["devices_needed"] == expected.devices_needed
        assert row["cost_per_million_usd"] == pytest.approx(expected.cost_per_million_usd)
        assert row["latency_s"] == pytest.approx(expected.chosen.latency_s)
        for key in ("series_per_s_per_device", "batch_size"):
            assert key in row


def test_run_search_lists_a_pareto_front(capsys):
    rows = run_json(capsys, ["run", "--size", "tiny", "--gpu", "l4,a10g", "--devices", "1,2", "--global-batch",
                             "8", "--context-length", "64", "--prediction-length", "16", "--search"])
    assert [r["hours"] for r in rows] == sorted(r["hours"] for r in rows)
    assert [r["cost_usd"] for r in rows] == sorted((r["cost_usd"] for r in rows), reverse=True)
    picks = " ".join(r["pick"] for r in rows)
    assert "fastest" in picks and "cheapest" in picks


@pytest.mark.parametrize("argv, flag", [
    (["run", "--steps", "0"], "--steps"),
    (["run", "--steps", "nan"], "--steps"),
    (["run", "--global-batch", "100", "--devices", "8"], "--global-batch"),
    (["run", "--devices", "2", "--devices-per-node", "4"], "--devices-per-node"),
    (["run", "--devices", "0"], "--devices"),
    (["run", "--price-per-hour", "-3"], "--price-per-hour"),
    (["run", "--price-per-hour", "inf"], "--price-per-hour"),
    (["run", "--gpu", "b200"], "--gpu"),
    (["run", "--inter-link", "carrier-pigeon"], "--inter-link"),
    (["run", "--gpu", "l4", "--devices", "16"], "--inter-link"),
    (["run", "--per-device-batch", "-1"], "--per-device-batch"),
    (["run", "--experts", "0", "--strategy", "expert_parallel"], "--strategy"),
    (["run", "--experts", "4", "--top-k", "9"], "--top-k"),
    (["run", "--epochs", "2"], "--steps"),
    (["serve", "--series", "0"], "--series"),
    (["serve", "--deadline-hours", "-1"], "--deadline-hours"),
    (["serve", "--gpu", "t4", "--dtype", "bf16"], "--dtype"),
    (["serve", "--batch-size", "0"], "--batch-size"),
])
def test_bad_input_is_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert flag in message and "\n" not in message


def test_devices_tab_plan_strategies_and_run_agree_on_fits(tmp_path, capsys):
    """The same variant, per-device batch, devices, GPU and precision: the Devices tab, `plan --strategies`
    and `run` give every strategy × checkpointing the same status and headroom."""
    from streamlit.testing.v1 import AppTest

    from tests.test_app import APP
    from ui.devices_tab import FIT_LABELS

    path = tmp_path / "train.yaml"
    path.write_text(YAML.replace("per_device_train_batch_size: 4", "per_device_train_batch_size: 512")
                    .replace("context_length: 64", "context_length: 512").replace("tf32: true", "tf32: false"))
    plans = run_json(capsys, ["plan", "--config", str(path), "--devices", "4", "--gpu", "T4 16GB", "--strategies"])
    statuses = set()
    for plan in plans:
        argv = ["run", "--config", str(path), "--devices", "4", "--gpu", "t4", "--strategy", plan["strategy"],
                "--precision", "fp32", "--optimizer", "adamw_8bit"]
        (row,) = run_json(capsys, argv + (["--checkpointing"] if plan["activation_checkpointing"] else []))
        assert (row["fit_status"], row["headroom_bytes"]) == (plan["fit_status"], plan["headroom_bytes"])
        statuses.add(row["fit_status"])
    assert "does not fit" in statuses and len(statuses) > 1
    at = AppTest.from_file(APP)
    for key, value in dict(sizes="tiny", architectures="token_ffn", experts="4", batch_size="512",
                           context_length="512", prediction_length="16", optimizer="adamw_8bit",
                           tab="Devices", devices_count="4", devices_gpu="T4 16GB", devices_precision="fp32").items():
        at.query_params[key] = value
    at.run()
    shown = at.dataframe[0].value
    assert list(shown["Fits"]) == [FIT_LABELS[plan["fit_status"]] for plan in plans]
    assert list(shown["Headroom"]) == [plan["headroom_bytes"] for plan in plans]
