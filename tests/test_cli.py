"""`python -m planner`: every format, exports that parse back, one-line errors with exit status 2."""

import io
import json
import subprocess
import sys

import pandas as pd
import pytest

from model.config import make_config
from planner.cli import commands as cli
from planner.params import count_params
from planner.plan import plan_grid, plan_row

SMALL_GRID = ["--sizes", "tiny,mini", "--experts", "0,8"]


def _run(args, capsys):
    status = cli.main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _expected_rows():
    return [plan_row(p) for p in plan_grid(["tiny", "mini"], cli.ARCHITECTURES, [0, 8])]


def test_table_json_is_a_list_of_documented_rows(capsys):
    status, out, _ = _run(["table", *SMALL_GRID, "--format", "json"], capsys)
    rows = json.loads(out)
    assert status == 0 and isinstance(rows, list) and len(rows) == 2 * (1 + 3)
    required = {"size", "architecture", "num_experts", "top_k", "total_params", "active_params", "forward_flops",
                "train_flops", "forecast_flops", "weights_fp32_bytes", "weights_fp16_bytes", "train_memory_bytes",
                "forecast_memory_bytes"}
    assert required <= set(rows[0])
    assert rows[0]["metadata"]["workload_context_length"] == 512
    assert [{k: v for k, v in row.items() if k != "metadata"} for row in rows] == _expected_rows()
    documented = open("README.md").read()
    assert all(f"`{key}`" in documented for key in rows[0])


def test_table_csv_parses_back_to_the_same_table(capsys):
    status, out, _ = _run(["table", *SMALL_GRID, "--format", "csv"], capsys)
    parsed = pd.read_csv(io.StringIO(out), comment="#")
    pd.testing.assert_frame_equal(parsed, pd.DataFrame(_expected_rows()), check_dtype=False)
    assert status == 0 and out.startswith("# convention_flops: FLOPs = 2 x multiply-accumulates")


def test_table_xlsx_parses_back_to_the_same_table(tmp_path, capsys):
    path = tmp_path / "grid.xlsx"
    status, _, _ = _run(["table", *SMALL_GRID, "--format", "xlsx", "--output", str(path)], capsys)
    parsed = pd.read_excel(path, sheet_name="rows")
    pd.testing.assert_frame_equal(parsed, pd.DataFrame(_expected_rows()), check_dtype=False)
    metadata = pd.read_excel(path, sheet_name="metadata")
    assert status == 0 and "convention_memory" in set(metadata["key"])


@pytest.mark.parametrize("fmt", ["table", "md"])
def test_table_human_formats_show_the_summary(fmt, capsys):
    status, out, _ = _run(["table", *SMALL_GRID, "--format", fmt], capsys)
    assert status == 0 and "convention_flops" in out
    header = next(line for line in out.splitlines() if "total_params" in line)
    assert all(column in header for column in cli.SUMMARY_COLUMNS)
    assert "8,394,496" in out  # tiny dense, hand-derived in test_params.py


def test_breakdown_components_sum_to_the_totals(capsys):
    status, out, _ = _run(["breakdown", "--sizes", "tiny", "--experts", "8", "--architectures", "expert_only",
                           "--format", "json"], capsys)
    rows = json.loads(out)
    row = plan_row(plan_grid(["tiny"], ["expert_only"], [8])[0])
    for quantity, total in (("params", row["total_params"]), ("forward_flops", row["forward_flops"]),
                            ("forecast_flops", row["forecast_flops"])):
        assert sum(r["value"] for r in rows if r["quantity"] == quantity) == total
    assert status == 0


def test_output_writes_the_file(tmp_path, capsys):
    path = tmp_path / "grid.md"
    status, out, _ = _run(["table", *SMALL_GRID, "--format", "md", "--output", str(path)], capsys)
    assert status == 0 and out == "" and path.read_text().count("\n| tiny |") == 4


@pytest.mark.parametrize("args, flag", [
    (["table", "--sizes", "huge"], "--sizes"),
    (["table", "--architectures", "mixture"], "--architectures"),
    (["table", "--experts", "4,x"], "--experts"),
    (["table", "--experts", "1", "--top-k", "2"], "--top-k"),
    (["table", "--router-hidden-dim", "0"], "--router-hidden-dim"),
    (["table", "--vocab-size", "2"], "--vocab-size"),
    (["table", "--context-length", "0"], "--context-length"),
    (["table", "--batch-size", "-3"], "--batch-size"),
    (["table", "--format", "pdf"], "--format"),
    (["table", "--dtype", "fp8"], "--dtype"),
    (["table", "--precision", "fp64"], "--precision"),
    (["table", "--expert-capacity", "-1", "--architectures", "token_ffn"], "--expert-capacity"),
    (["table", "--format", "xlsx"], "--output"),
    (["verify", "--workers", "0"], "--workers"),
])
def test_bad_flags_exit_2_with_one_line(args, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and flag in err and "Traceback" not in err


def test_verify_exits_1_on_a_mismatch(monkeypatch, capsys):
    import planner.verify as verify_module

    args = ["verify", "--sizes", "debug", "--experts", "0", "--context-length", "24", "--prediction-length", "4",
            "--num-samples", "2", "--workers", "1", "--format", "json"]
    status, out, _ = _run(args, capsys)
    rows = json.loads(out)
    assert status == 0 and rows and all(row["ok"] for row in rows)
    assert {"quantity", "counter", "analytic", "measured", "difference", "reason"} <= set(rows[0])
    monkeypatch.setattr(verify_module, "count_params", lambda config: count_params(make_config("tiny")))
    status, out, _ = _run(args, capsys)
    assert status == 1 and not all(row["ok"] for row in json.loads(out))


def test_python_dash_m_planner_runs():
    result = subprocess.run([sys.executable, "-m", "planner", "table", "--sizes", "debug", "--experts", "0",
                             "--format", "csv"], capture_output=True, text=True, check=True)
    assert "debug,dense,0,0" in result.stdout


def test_units_human_shows_readable_units_and_exports_stay_exact(capsys):
    status, out, _ = _run(["table", "--sizes", "tiny", "--experts", "0", "--units", "human", "--format", "md"], capsys)
    row = dict(zip(*[[cell.strip() for cell in line.strip("|").split("|")]
                     for line in out.splitlines() if line.startswith("| ") and "---" not in line]))
    # tiny dense: 8,394,496 parameters (hand-derived in test_model_build); fp32 weights 4 bytes each
    assert status == 0 and row["total_params"] == "8.39 M" and row["total_params_vs_dense"] == "1.00×"
    assert row["weights_fp32_bytes"] == f"{4 * 8_394_496 / 2**20:.2f} MiB" == "32.02 MiB"  # the column's unit
    with pytest.raises(SystemExit) as exit_:
        cli.main(["table", "--sizes", "tiny", "--units", "human", "--format", "csv"])
    assert exit_.value.code == 2 and "--units" in capsys.readouterr().err


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["table", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--vocab-size VOCAB_SIZE (default: 4096)" in help_text  # an option without help text of its own
    assert "(default: 512)" in help_text and "(default: tiny,mini,small,base,large)" in help_text


def test_distributed_bench_csv_writes_an_error_row_beside_measured_rows(tmp_path, monkeypatch, capsys):
    """One run measured (one row per rank), the next failed (one row with a message): the CSV holds both,
    the measured rows' columns first and `message` after them, each row's missing cells empty; exit 1."""
    from planner.bench import distributed

    def fake_run(spec, progress=None, cancel_event=None):  # no processes: only the writing is under test
        if spec.bench.num_experts == 0:
            rows = [{"label": spec.label, "strategy": spec.strategy, "ranks": spec.ranks, "rank": rank,
                     "status": "ok", "states_exact": True, "collectives_exact": True, "memory_ratio": 1.0 + rank / 10,
                     "step_time_s": 0.1, "collective_bytes": 8, "predicted_collective_bytes": 8}
                    for rank in range(spec.ranks)]
            return distributed.DistributedResult(spec, "ok", rows=rows)
        return distributed.DistributedResult(spec, "error", "rank 1 failed: boom")

    monkeypatch.setattr(distributed, "run_distributed", fake_run)
    path = tmp_path / "runs.csv"
    status, _, _ = _run(["bench", "--modes", "train", "--sizes", "debug", "--experts", "0,4",
                         "--architectures", "token_ffn", "--strategy", "data_parallel", "--ranks", "2",
                         "--format", "csv", "--output", str(path)], capsys)
    assert status == 1
    table = pd.read_csv(path, comment="#")
    assert list(table.columns) == ["label", "strategy", "ranks", "rank", "status", "states_exact", "collectives_exact",
                                   "memory_ratio", "step_time_s", "collective_bytes", "predicted_collective_bytes",
                                   "message"]
    assert list(table["status"]) == ["ok", "ok", "error"]
    assert list(table["memory_ratio"][:2]) == [1.0, 1.1] and pd.isna(table["memory_ratio"][2])
    assert table["message"][:2].isna().all() and table["message"][2] == "rank 1 failed: boom"
    assert pd.isna(table["rank"][2])
