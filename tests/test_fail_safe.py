"""Hostile and careless input, one test (or a few) per reproduced failure: each now gets one line naming the
flag, field or key and what is allowed (CLI exit 2), never a traceback, a hang, or lost or overwritten data.
The numbers in the comments are the failures' numbers in the fail-safe issue; the benchmark lock and its
worker (4, 5, 18), which need processes to kill and stop, are in test_bench_lock.py."""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import openpyxl
import pandas as pd
import pytest

from model.config import make_config
from planner.bench.lock import lock_holder
from planner.cli import main
from planner.config_import import import_hf_config_json, import_training_yaml
from planner.export import render
from planner.memory import estimate_memory
from planner.params import count_params
from planner.solver import Budget, SearchSpace, solve
from planner.steptime.device_cache import DEVICE_MODEL_FILE, load_measured_device, save_measured_device
from planner.steptime.ops import StepTrace
from planner.workload import Workload
from tests.steptime_fixtures import simple_measured_device
from ui.uploads import read_upload

PROJECT = Path(__file__).resolve().parents[1]
TRAINING_YAML = "model_id: amazon/chronos-t5-tiny\ncontext_length: 64\nprediction_length: 16\n"
BILLION_LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]\n"
    for previous, name in zip("abcdefgh", "bcdefghi")) + "model_id: *i\n"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(tmp_path / "cache"))


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr of `python -m planner ARGV` run in-process."""
    try:
        status = main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def one_line_error(message: str, *fragments: str) -> None:
    assert message.count("\n") == 1 and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# --- 1. a YAML alias bomb --------------------------------------------------------------------------------------


def test_yaml_aliases_are_refused_at_once_everywhere(tmp_path, capsys):
    config = tmp_path / "bomb.yaml"
    config.write_text(BILLION_LAUGHS)
    start = time.perf_counter()
    status, err = cli(capsys, "plan", "--config", str(config))
    assert status == 2 and time.perf_counter() - start < 5
    one_line_error(err, "--config", "anchor or alias", "line 1")
    with pytest.raises(ValueError, match="anchor or alias"):
        read_upload("bomb.yaml", BILLION_LAUGHS.encode())  # the app's upload handler


def test_echoed_values_are_cut_short():
    with pytest.raises(ValueError) as error:
        import_training_yaml(f"model_id: {'x' * 100_000}\n")
    assert len(str(error.value)) < 400


# --- 2, 3. the report's path ----------------------------------------------------------------------------------


def test_the_report_never_overwrites_its_input(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(TRAINING_YAML)
    status, err = cli(capsys, "plan", "--config", str(config), "--output", str(config))
    assert status == 2 and config.read_text() == TRAINING_YAML
    one_line_error(err, "--output", "--config reads")


@pytest.mark.parametrize("make_path, says", [
    (lambda tmp: tmp / "missing" / "out.csv", "does not exist"),
    (lambda tmp: tmp, "is a folder"),
    (lambda tmp: Path("/dev/full"), "not a regular file"),
    (lambda tmp: Path(""), "give a file name"),
])
def test_a_bad_output_path_is_refused_before_any_work(tmp_path, capsys, make_path, says):
    for command in (["table", "--sizes", "debug"], ["bench", "--sizes", "debug", "--device", "cpu"]):
        status, err = cli(capsys, *command, "--output", str(make_path(tmp_path)))
        assert status == 2
        one_line_error(err, "--output", says)
    assert lock_holder() is None  # the benchmark never started


def test_a_place_that_cannot_be_written_is_one_line(capsys):
    # /proc refuses new files even to root, whom permission bits do not stop
    status, err = cli(capsys, "table", "--sizes", "debug", "--output", "/proc/version")
    assert status in (1, 2)
    one_line_error(err, "--output", "/proc/version")
    assert Path("/proc/version").read_text()  # untouched


def test_a_write_that_fails_after_the_benchmarks_keeps_the_results(tmp_path, capsys, monkeypatch):
    import planner.output_path

    def disk_full(data, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(planner.output_path, "write_output", disk_full)
    monkeypatch.setattr("planner.cli.commands.write_output", disk_full)
    status = main(["bench", "--sizes", "debug", "--experts", "0", "--predict-for", "h100-sxm", "--format", "csv",
                   "--output", str(tmp_path / "out.csv")])
    captured = capsys.readouterr()
    assert status == 1 and "No space left on device" in captured.err and "the report follows" in captured.err
    assert "predicted_time_s" in captured.out  # the results, on stdout instead
    assert not list(tmp_path.glob("*out.csv*"))  # no partial file left behind


# --- 6, 7. bounded searches and verification --------------------------------------------------------------------


def test_a_huge_search_space_is_refused_at_once(capsys):
    start = time.perf_counter()
    status, err = cli(capsys, "solve", "--size", "mini", "--target-total", "200M", "--limit", "100G", "--budget",
                      "train_memory", "--max-experts", "1024", "--max-top-k", "1024")
    assert status == 2 and time.perf_counter() - start < 5
    one_line_error(err, "--max-experts", "11,264 shapes")


def test_a_large_allowed_search_finishes_quickly_and_a_slow_one_stops_at_its_limit(capsys):
    start = time.perf_counter()
    status, _ = cli(capsys, "solve", "--size", "mini", "--target-total", "200M", "--limit", "100G", "--budget",
                    "train_memory", "--max-experts", "1024", "--max-top-k", "1024", "--architectures", "expert_only",
                    "--router-widths", "64")
    assert status == 0 and time.perf_counter() - start < 30
    result = solve(make_config("mini"), 200_000_000, Budget("train_memory", 1e11), architectures=("expert_only",),
                   space=SearchSpace(1024, 1024, (64, 128, 256)), time_limit_s=0.2)
    assert not result.complete and 0 < result.evaluated < 3 * 1024


def test_verify_refuses_what_cannot_fit_and_too_many_workers(capsys):
    status, err = cli(capsys, "verify", "--sizes", "tiny", "--experts", "0", "--context-length", "100000")
    assert status == 2
    one_line_error(err, "--context-length", "GiB")
    status, err = cli(capsys, "verify", "--sizes", "debug", "--experts", "0", "--workers", "1000")
    assert status == 2
    one_line_error(err, "--workers", "cores")


# --- 8. non-finite and overflowing numbers ----------------------------------------------------------------------


@pytest.mark.parametrize("argv, flag", [
    (["table", "--sizes", "debug", "--expert-capacity", "1e308"], "--expert-capacity"),
    (["table", "--sizes", "debug", "--expert-capacity", "nan"], "--expert-capacity"),
    (["bench", "--sizes", "debug", "--predict-for", "h100-sxm", "--expert-capacity", "1e308"], "--expert-capacity"),
    (["solve", "--target-total", "inf", "--limit", "1"], "--target-total"),
    (["solve", "--target-total", "1M", "--limit", "nan"], "--limit"),
])
def test_non_finite_and_overflowing_flags_are_refused(capsys, argv, flag):
    status, err = cli(capsys, *argv)
    assert status == 2
    one_line_error(err, flag)


def test_plan_refuses_an_infinite_device_memory(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(TRAINING_YAML)
    status, err = cli(capsys, "plan", "--config", str(config), "--strategies", "--device-memory-gib", "inf")
    assert status == 2
    one_line_error(err, "--device-memory-gib")


def test_a_yaml_capacity_factor_out_of_range_is_named():
    text = "model_id: amazon/chronos-t5-tiny\nuse_moe: true\nmoe_architecture: token_ffn\nexpert_capacity: 1e308\n"
    with pytest.raises(ValueError, match="expert_capacity must be a capacity factor > 0 and ≤ 1024"):
        import_training_yaml(text)


# --- 9. config.json with nulls --------------------------------------------------------------------------------

T5_JSON = {"model_type": "t5", "d_model": 256, "d_ff": 1024, "d_kv": 64, "num_heads": 4, "num_layers": 4}


@pytest.mark.parametrize("field", ["num_layers", "d_model"])
def test_a_null_dimension_is_named(field):
    data = json.dumps({**T5_JSON, field: None}).encode()
    with pytest.raises(ValueError, match=f"config.json lacks {field}"):
        import_hf_config_json(data)
    with pytest.raises(ValueError, match=field):
        read_upload("config.json", data)


def test_null_decoder_layers_and_vocabulary_take_t5s_defaults():
    imported = import_hf_config_json(json.dumps({**T5_JSON, "num_decoder_layers": None, "vocab_size": None}))
    assert imported.config.dims.num_decoder_layers == 4 and imported.config.dims.vocab_size == 4096


# --- 12. damaged caches -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", [
    lambda entry: [entry],
    lambda entry: {**entry, "host_s_per_view": "fast"},
    lambda entry: {**entry, "fresh_page_s_per_byte": 0},
    lambda entry: {**entry, "scatter_s_per_row": -1e-9},
    lambda entry: {**entry, "host_s_per_op": {"forward": math.nan}},
])
def test_a_damaged_device_probe_is_refused_not_used(damage):
    path = Path(os.environ["CHRONOS_MOE_PLANNER_CACHE_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    entry = simple_measured_device("this CPU").to_dict()
    (path / DEVICE_MODEL_FILE).write_text(json.dumps({"this CPU": {"fp32": damage(entry)}}, allow_nan=True))
    device, problem = load_measured_device("this CPU", "fp32")
    assert device is None and "probing again" in problem and "\n" not in problem


def test_a_cache_that_cannot_be_written_keeps_the_measurement(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(blocker / "cache"))
    problem = save_measured_device(simple_measured_device("this CPU"))
    assert "was used for this run but could not be saved" in problem


def test_a_trace_with_negative_sizes_is_refused():
    record = ["aten::mm", "matmul", "forward", "float32", -1, 0, 0, None, False, 0, 1]
    with pytest.raises(ValueError, match="negative"):
        StepTrace.from_dict({"ops": [record]})


# --- 13. YAML misreads ------------------------------------------------------------------------------------------


def test_a_string_boolean_is_refused():
    with pytest.raises(ValueError, match="bf16 must be true or false, got 'false'"):
        import_training_yaml(TRAINING_YAML + 'bf16: "false"\n')


def test_8bit_adamw_is_sized_as_8bit():
    assert import_training_yaml(TRAINING_YAML + "optim: adamw_bnb_8bit\n").workload.optimizer == "adamw_8bit"


def test_a_duplicate_key_is_refused():
    with pytest.raises(ValueError, match="sets 'context_length' twice"):
        import_training_yaml(TRAINING_YAML + "context_length: 512\n")


def test_moe_without_experts_is_refused():
    with pytest.raises(ValueError, match="num_experts must be ≥ 1 when use_moe is true"):
        import_training_yaml(TRAINING_YAML + "use_moe: true\nnum_experts: 0\n")


def test_a_5000_digit_number_is_named():
    with pytest.raises(ValueError, match="5000-digit number at line 4"):
        import_training_yaml(TRAINING_YAML + f"num_samples: {'9' * 5000}\n")
    with pytest.raises(ValueError, match="5000-digit number"):
        import_hf_config_json(json.dumps(T5_JSON)[:-1] + f', "vocab_size": {"9" * 5000}}}')


# --- 14. exports ------------------------------------------------------------------------------------------------


def test_a_formula_in_the_metadata_stays_text_and_huge_integers_stay_exact():
    huge = 2**53 + 1
    data = render([{"name": "=1+1", "bytes": huge}], "xlsx", {"=HYPERLINK(\"http://x\")": "=2+2"})
    workbook = openpyxl.load_workbook(io.BytesIO(data))
    rows, metadata = workbook["rows"], workbook["metadata"]
    cells = [cell for sheet in (rows, metadata) for row in sheet.iter_rows() for cell in row]
    assert all(cell.data_type != "f" for cell in cells)
    assert rows["A2"].value == "=1+1" and rows["B2"].value == str(huge)
    assert metadata["A2"].value == "=HYPERLINK(\"http://x\")"


def test_a_newline_in_the_metadata_keeps_the_csv_readable():
    text = render([{"a": 1, "b": 2}], "csv", {"key\nwith newline": "value\r\nsecond line", "experts": "0,\n4"})
    frame = pd.read_csv(io.StringIO(text.decode()), comment="#")
    assert list(frame.columns) == ["a", "b"] and frame.iloc[0].tolist() == [1, 2]


def test_repeated_grid_values_give_each_row_once(capsys):
    assert main(["table", "--sizes", "debug,debug", "--experts", "0,0,4,4", "--architectures",
                 "token_ffn,token_ffn", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["size"], r["num_experts"]) for r in rows] == [("debug", 0), ("debug", 4)]


# --- 15. the Python API -----------------------------------------------------------------------------------------


def test_another_configs_parameter_counts_are_refused():
    small, tiny = make_config("small"), make_config("tiny")
    with pytest.raises(ValueError, match="params: these parameter counts"):
        estimate_memory(small, Workload(), count_params(tiny))
    assert estimate_memory(small, Workload(), count_params(small)) == estimate_memory(small, Workload())


def test_moe_blocks_that_leave_no_experts_are_refused():
    with pytest.raises(ValueError, match="leave no block with experts"):
        make_config("debug", architecture="token_ffn", num_experts=8, encoder_moe_blocks=(), decoder_moe_blocks=())
    with pytest.raises(ValueError, match="encoder_moe_blocks must be a sequence"):
        make_config("debug", architecture="token_ffn", num_experts=8, encoder_moe_blocks=5)


# --- 16, 17. messages and silent drops --------------------------------------------------------------------------


@pytest.mark.parametrize("argv, flag, says", [
    (["bench", "--sizes", "debug", "--top-k", "0", "--predict-for", "h100-sxm"], "--top-k", "top_k"),
    (["bench", "--sizes", ",", "--predict-for", "h100-sxm"], "--sizes", "give comma-separated"),
    (["solve", "--target-total", "1M", "--limit", "1", "--router-widths", "abc"], "--router-widths", "integers"),
    (["solve", "--target-total", "1M", "--limit", "1", "--top", "-1"], "--top", "≥ 1"),
    (["solve", "--target-total", "1M", "--limit", "1", "--top", "0"], "--top", "≥ 1"),
    (["table", "--sizes", "debug", "--architectures", "shared_then_expert", "--expert-capacity", "-5"],
     "--expert-capacity", "> 0"),
])
def test_bad_flags_are_named_even_when_unused(capsys, argv, flag, says):
    status, err = cli(capsys, *argv)
    assert status == 2
    one_line_error(err, f"argument {flag}", says)


def test_plan_names_the_config_file_and_its_key_not_a_flag_it_lacks(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(TRAINING_YAML + "per_device_train_batch_size: 0\n")
    status, err = cli(capsys, "plan", "--config", str(config))
    assert status == 2
    one_line_error(err, "argument --config", str(config))
    assert "--batch-size" not in err


@pytest.mark.parametrize("flags", [["--devices", "0"], ["--devices", "4"], ["--gpu", "H100 80GB"]])
def test_plan_refuses_device_flags_it_would_ignore(tmp_path, capsys, flags):
    config = tmp_path / "train.yaml"
    config.write_text(TRAINING_YAML)
    status, err = cli(capsys, "plan", "--config", str(config), *flags)
    assert status == 2
    one_line_error(err, flags[0])


def test_a_byte_order_mark_is_read_the_same_in_json_and_yaml():
    bom = b"\xef\xbb\xbf"
    assert import_hf_config_json(bom + json.dumps(T5_JSON).encode()).config.dims.d_model == 256
    assert import_training_yaml(bom + TRAINING_YAML.encode()).workload.context_length == 64


# --- 10, 11, 17. the app's share links ----------------------------------------------------------------------------


def run_app(**query):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(PROJECT / "app.py"), default_timeout=60)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.mark.parametrize("query, name", [
    ({"top_k": "inf"}, "top_k"), ({"batch_size": "inf"}, "batch_size"),
    ({"tab": "Devices", "devices_count": "inf"}, "devices_count"), ({"expert_capacity": "1e308"}, "expert_capacity"),
    ({"sizes": ["debug", "huge"]}, "sizes"), ({"sizes": "debug,huge"}, "sizes"), ({"top_k": "-3"}, "top_k"),
    ({"tab": "Nowhere"}, "tab"), ({"tab": "Cost", "cost_gpu": "h999"}, "cost_gpu"),
    ({"tab": "Benchmark", "bench_modes": ["forward", "sleep"]}, "bench_modes"),
    ({"tab": "Budget", "budget_kind": "happiness"}, "budget_kind"),
])
def test_a_bad_share_link_value_is_named_and_the_page_still_works(query, name):
    at = run_app(**query)
    (warning,) = [w.value for w in at.warning if w.value.startswith("Share link:")]
    assert f"{name}=" in warning and "not allowed" in warning and "\n" not in warning
    assert len(at.tabs) == 8 and not at.error  # the page drew from the defaults
    assert name not in at.query_params


def test_byte_counts_beyond_int64_are_drawn():
    at = run_app(sizes="large", context_length="100000", batch_size="10000", experts="0,16")
    assert at.dataframe and not at.error
