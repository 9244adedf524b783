"""The Budget, Devices and Benchmark tabs through AppTest: shown numbers against the planner's, computed here.

The benchmark test runs one real (debug, tiny lengths) run in a subprocess; it costs what importing torch
costs. Every other test is planner arithmetic, under AppTest's 3 s default.
"""

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from model.config import make_config
from planner.bench import BenchResult, BenchSpec, compare_to_dense
from planner.bench.device import describe_device
from planner.bench.lock import BenchLock
from planner.steptime.device_cache import save_measured_device
from planner.steptime.predict import StepTime
from tests.steptime_fixtures import HOST_S, simple_measured_device
from planner.bench.timing import summarise_times
from planner.cli import main
from planner.parallel import GPU_MEMORY_BYTES, plan_all_strategies
from planner.solver import Budget, SearchSpace, solve
from planner.workload import Workload
from tests.test_app import APP, ARCHITECTURES, error_texts, run_app, shown_grid
from ui.bench_figures import measured_figure, ratio_figure, time_split_figure
from ui.bench_tab import RESULT_COLUMNS, results_frame
from ui.devices_tab import FIT_LABELS
from planner.units import format_seconds

SMALL_SPACE = dict(budget_max_experts=8, budget_max_top_k=2)


@pytest.fixture(autouse=True)
def _private_bench_cache(tmp_path, monkeypatch):
    """Each test gets its own benchmark lock, trace and device-probe cache (the worker subprocess inherits it)."""
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(tmp_path))


@pytest.mark.parametrize("tab", ["Budget", "Devices", "Benchmark"])
def test_tab_renders_on_the_default_sidebar(tab):
    at = AppTest.from_file(APP)
    at.query_params["tab"] = tab
    at.run()
    assert not at.exception and not at.error


def solve_small(at: AppTest, target_m: float = 20.0, blocks: tuple[str, ...] = ("every_second",)):
    for key, value in SMALL_SPACE.items():
        at.number_input(key=key).set_value(value)
    at.multiselect(key="budget_router_widths").set_value(["64", "256"])
    at.multiselect(key="budget_blocks").set_value(list(blocks))
    at.number_input(key="budget_target_m").set_value(target_m)
    at.button(key="budget_solve").click().run()
    assert not at.exception and not at.error
    return solve(make_config("tiny"), round(target_m * 1e6), Budget("active_params", 50e6),
                 architectures=ARCHITECTURES, workload=Workload(),
                 space=SearchSpace(max_experts=8, max_top_k=2, router_widths=(64, 256),
                                   token_block_patterns=blocks))


def test_budget_starts_from_the_solver_cli_and_gives_its_answer(capsys):
    """With no narrowing the Budget tab asks what `python -m planner solve` asks by default, and answers the
    same: the README's question (mini, 200M total, at most 50M active) as the README and the CLI answer it."""
    at = run_app(tab="Budget")  # the default sidebar holds five sizes: the tab starts from solve's size
    assert at.selectbox(key="budget_size").value == "mini"
    assert (at.number_input(key="budget_target_m").value, at.number_input(key="budget_limit_active_params").value) \
        == (200.0, 50.0)
    at.button(key="budget_solve").click().run(timeout=60)
    assert not at.exception and not at.error
    app_top = at.dataframe[0].value.iloc[0]
    assert main(["solve", "--size", "mini", "--target-total", "200M", "--budget", "active_params", "--limit", "50M",
                 "--top", "1", "--format", "json"]) == 0
    (cli_top,) = json.loads(capsys.readouterr().out)
    assert (app_top["Architecture"], app_top["E"], app_top["K"], app_top["MoE blocks"], app_top["Total params"]) == (
        cli_top["architecture"], cli_top["num_experts"], cli_top["top_k"], cli_top["token_moe_blocks"],
        cli_top["total_params"])
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert (f"{cli_top['architecture']} with {cli_top['num_experts']} experts, {cli_top['top_k']} active, in "
            f"{cli_top['token_moe_blocks']} ({cli_top['total_params']:,} total, {cli_top['active_params']:,} active)"
            in " ".join(readme.split()))
    assert at.query_params.get("budget_solved") in ("1", ["1"])  # the share link holds the solved view


def test_budget_starts_from_the_sidebars_size_when_it_names_one():
    at = run_app(sizes="small", tab="Budget")
    assert at.selectbox(key="budget_size").value == "small"


def test_budget_solves_behind_the_button_and_ranks_like_the_solver():
    at = run_app(sizes="tiny", tab="Budget")
    assert not at.dataframe and not at.get("plotly_chart")  # nothing solved until the button
    expected = solve_small(at)
    shown = at.dataframe[0].value
    best = expected.candidates[0]
    top = shown.iloc[0]
    assert (top["Configuration"], top["E"], top["K"]) == (best.describe, best.config.num_experts, best.config.top_k)
    assert (top["Total params"], top["Active params"]) == (best.total_params, best.active_params)
    assert list(shown["Configuration"]) == [c.describe for c in expected.candidates]  # the solver's 20, in order
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert spec["layout"]["title"]["text"] and "(M)" in spec["layout"]["xaxis"]["title"]["text"]
    front = next(trace for trace in spec["data"] if trace["name"].startswith("Pareto front"))
    assert front["y"] == pytest.approx([c.total_params / 1e6 for c in expected.pareto_front])

    at.number_input(key="budget_target_m").set_value(30.0).run()  # a stale result is not shown as current
    assert not at.dataframe and "Solve again" in at.info[0].value


def test_budget_open_in_plan_fills_the_sidebar_and_opens_plan():
    at = run_app(sizes="tiny", tab="Budget", dispatch="dense")
    expected = solve_small(at)
    choice = expected.candidates[1]
    at.selectbox(key="budget_candidate").set_value(f"2. {choice.describe}")
    at.button(key="budget_open").click().run()
    assert not at.exception and not at.error
    config = choice.config
    assert at.multiselect(key="sizes").value == ["tiny"]
    assert at.multiselect(key="architectures").value == [config.architecture]
    assert at.text_input(key="experts").value == f"0, {config.num_experts}"
    assert at.number_input(key="top_k").value == config.top_k
    assert at.number_input(key="router_hidden_dim").value == config.router_hidden_dim
    assert at.selectbox(key="dispatch").value == "sparse"  # as solved
    assert at.session_state["tab"] == "Plan"
    values, _ = shown_grid(at)  # the Plan tab is drawn: its grid holds the candidate beside dense
    assert list(values["E"]) == [0, config.num_experts]
    assert (values["Total params"][1], values["Active"][1]) == (choice.total_params, choice.active_params)


def test_budget_candidate_with_other_blocks_cannot_open_in_plan():
    at = run_app(sizes="tiny", tab="Budget", budget_architectures="token_ffn")
    solve_small(at, blocks=("every_block",))
    assert at.button(key="budget_open").disabled
    assert any("every_block" in caption.value for caption in at.caption)


@pytest.mark.parametrize(("key", "value", "field"), [
    ("budget_limit_active_params", 0.0, "budget limit"),
    ("budget_target_m", 0.0, "target total parameters"),
])
def test_budget_bad_input_is_one_error_naming_the_field(key, value, field):
    at = run_app(sizes="tiny", tab="Budget")
    at.number_input(key="budget_max_experts").set_value(8)
    at.number_input(key=key).set_value(value)
    at.button(key="budget_solve").click().run()
    assert not at.exception
    (message,) = error_texts(at)
    assert field in message


def test_devices_totals_equal_plan_all_strategies():
    at = run_app(sizes="small", architectures="token_ffn", experts="0, 8", tab="Devices")
    assert at.selectbox(key="devices_variant").value == "small · MoE-8 top-2 · token_ffn"
    at.number_input(key="devices_count").set_value(4)
    at.selectbox(key="devices_gpu").set_value("T4 16GB")
    at.selectbox(key="devices_precision").set_value("mixed_fp16")
    at.number_input(key="batch_size").set_value(64).run()
    assert not at.exception and not at.error
    expected = plan_all_strategies(make_config("small", architecture="token_ffn", num_experts=8),
                                   Workload(batch_size=64), 4, device_memory_bytes=GPU_MEMORY_BYTES["T4 16GB"],
                                   precision="mixed_fp16")
    shown = at.dataframe[0].value
    assert list(shown["Total"]) == [row["total_bytes"] for row in expected]
    assert list(shown["Activations"]) == [row["activations_bytes"] for row in expected]
    assert list(shown["Fits"]) == [FIT_LABELS[row["fit_status"]] for row in expected]
    assert list(shown["Headroom"]) == [row["headroom_bytes"] for row in expected]
    assert {FIT_LABELS["fits"], FIT_LABELS["does not fit"]} <= set(shown["Fits"])  # this case has both
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert [trace["name"] for trace in spec["data"]] == ["Weights", "Gradients", "Optimizer states",
                                                         "Gathered layer", "Activations"]
    assert spec["layout"]["shapes"][0]["y0"] == pytest.approx(GPU_MEMORY_BYTES["T4 16GB"] / 2**30)  # the limit


@pytest.mark.parametrize(("key", "value", "field"), [("devices_memory_gib", 0.0, "device memory")])
def test_devices_bad_input_is_one_error_naming_the_field(key, value, field):
    at = run_app(sizes="tiny", tab="Devices")
    at.selectbox(key="devices_gpu").set_value("custom").run()
    at.number_input(key=key).set_value(value).run()
    assert not at.exception
    (message,) = error_texts(at)
    assert field in message


def test_benchmark_runs_behind_the_button_and_shows_every_field():
    # A cached probe of this CPU, so the run skips probing (tested in test_steptime_probe).
    save_measured_device(simple_measured_device(describe_device("cpu")))
    at = run_app(sizes="tiny", tab="Benchmark", bench_experts="4", bench_device="cpu")
    assert not at.dataframe  # nothing runs until the button
    for key, value in dict(bench_context_length=16, bench_prediction_length=4, bench_repeats=2).items():
        at.number_input(key=key).set_value(value)
    at.button(key="bench_run").click().run(timeout=180)  # a subprocess that imports torch
    assert not at.exception and not at.error
    # The only warning a quiet run may carry: the host's cores in another state than the cached probe's
    assert all("the threads ran" in w.value or "the host dispatched" in w.value for w in at.warning)
    (row,) = at.dataframe[0].value.to_dict("records")
    assert row["Run"] == "debug MoE-4 (top-2, token_ffn, sparse) forward"
    assert all(row[column] is not None and row[column] == row[column] for column in RESULT_COLUMNS), row
    assert row["Predicted"] > 0 and row["Bound by"] in ("matmul", "memory-bound", "overhead", "sync")
    assert at.session_state["bench_results"][0].device_model["measured_on"] == "2026-01-01"  # the cached probe
    assert len(row["Expert usage"]) == 4 and sum(row["Expert usage"]) > 0
    charts = {chart.proto.id.split("-")[-1] for chart in at.get("plotly_chart")}
    assert {"bench_measured", "bench_split", "bench_usage"} <= charts
    assert {button.proto.label for button in at.get("download_button")} == {"CSV", "JSON"}
    assert any("E = 0" in caption.value for caption in at.caption)  # no dense run: no ratio to dense
    # Where the prediction comes from: the cached probe's source and age, the threads' state, the load
    (calibration,) = [c.value for c in at.caption if "Predicted with" in c.value]
    assert "probe of 2026-01-01" in calibration and "days old" in calibration and "when probed" in calibration
    assert f"and {HOST_S['forward'] * 1e6:.1f} µs when probed" in calibration  # the host's time per op
    state = at.session_state["bench_results"][0].gemm_state_ratio  # the GEMMs' state, steps against pricing
    assert f"a reference GEMM took {state:.2f}–{state:.2f}× as long during the timed steps" in calibration
    assert "load now" in calibration and at.checkbox(key="bench_recalibrate").value is False


def test_benchmark_predicts_without_running_on_a_gpu_preset():
    at = run_app(sizes="tiny", tab="Benchmark", bench_experts="0, 4", bench_predict_device="a100-80gb")
    at.button(key="bench_predict").click().run(timeout=180)  # traces in this process, once
    assert not at.exception and not at.error
    frame = at.dataframe[0].value
    assert list(frame["Run"]) == ["debug dense forward", "debug MoE-4 (top-2, token_ffn, sparse) forward"]
    assert set(frame["Device"]) == {"NVIDIA A100 80GB SXM"}
    assert (frame["Predicted"] - frame[["Matmul", "Memory-bound", "Overhead", "Sync"]].sum(axis=1)).abs().max() < 1e-12
    charts = {chart.proto.id.split("-")[-1] for chart in at.get("plotly_chart")}
    assert "bench_predicted_split" in charts
    assert any(button.proto.label == "Predictions CSV" for button in at.get("download_button"))


def test_benchmark_prediction_refuses_a_dtype_the_gpu_lacks():
    at = run_app(sizes="tiny", tab="Benchmark", bench_predict_device="t4", bench_dtype="bf16")
    at.button(key="bench_predict").click().run(timeout=180)
    assert not at.exception
    (message,) = error_texts(at)
    assert "bf16 is not supported natively by NVIDIA T4" in message


def test_benchmark_says_when_another_benchmark_runs():
    with BenchLock("someone else's run") as lock:
        assert lock.acquired
        at = run_app(sizes="tiny", tab="Benchmark")
    assert "someone else's run" in at.info[0].value
    # Another session's run is not this session's to stop: no button cancels it.
    assert not [button for button in at.button if button.key == "bench_cancel_other"]


@pytest.mark.parametrize(("key", "value", "field"), [("bench_experts", "4x", "experts"),
                                                     ("bench_modes", [], "modes")])
def test_benchmark_bad_input_is_one_error_naming_the_field(key, value, field):
    at = run_app(sizes="tiny", tab="Benchmark")
    widget = at.text_input(key=key) if key == "bench_experts" else at.multiselect(key=key)
    widget.set_value(value).run()
    assert not at.exception
    (message,) = error_texts(at)
    assert message.startswith(field)


def _result(num_experts: int, median_s: float, flops: int) -> BenchResult:
    spec = BenchSpec(size="debug", architecture="token_ffn", num_experts=num_experts, batch_size=2,
                     context_length=16, prediction_length=4, device="cpu")
    timing = summarise_times([median_s] * 3, [median_s] * 3, series=2, tokens=100, flops=flops)
    # Predicted: half the median, a quarter in matmuls, a quarter in overhead.
    predicted = StepTime(median_s / 4, 0.0, median_s / 4, 0.0, op_count=500, sync_count=0, device_name="test CPU")
    return BenchResult(spec=spec, status="ok", flops=flops, device="cpu", device_name="test CPU", timing=timing,
                       peak_memory_bytes=3 * 2**20, predicted_peak_bytes=2 * 2**20, predicted=predicted)


def test_benchmark_charts_plot_the_results():
    results = [_result(0, 0.02, 1_000_000), _result(4, 0.03, 1_200_000)]
    assert list(results_frame(results)["Time ×pred"]) == [2.0, 2.0]
    measured = measured_figure(results).data
    assert list(measured[1].y) == pytest.approx([0.02, 0.03]) and list(measured[3].x) == pytest.approx([2.0, 2.0])
    (moe,) = ratio_figure(compare_to_dense(results)).data[1:]
    assert (moe.x[0], moe.y[0]) == pytest.approx((1.2, 1.5))
    split = time_split_figure([r.spec.label for r in results], [r.predicted.split() for r in results],
                              [r.timing.median_s for r in results]).data
    assert [bar.name for bar in split[:4]] == ["matmul", "memory-bound", "overhead", "sync"]
    assert list(split[0].x) == pytest.approx([0.005, 0.0075]) and list(split[4].x) == pytest.approx([0.02, 0.03])


def test_format_seconds_three_digits():
    assert [format_seconds(v) for v in (12.34, 1.234, 0.04567, 0.00078, 0.0009996)] == \
        ["12.3 s", "1.23 s", "45.7 ms", "780 µs", "1.00 ms"]


@pytest.mark.parametrize("query", [dict(context_length="99999999999"), dict(experts="2", sizes="debug", top_k="3")])
def test_an_invalid_sidebar_keeps_every_tab_reachable(query):
    at = run_app(**query, tab="Budget")
    assert at.error  # the sidebar's problem, named once
    assert [tab.label for tab in at.tabs] == ["Plan", "Breakdown", "Charts", "Verify", "Budget", "Devices",
                                             "Benchmark", "Cost"]
    assert at.button(key="budget_solve")  # Budget asks its own question, so it still works
    at = run_app(**query, tab="Plan")
    assert any("Fix it there" in info.value for info in at.info)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_device_count_below_one_is_named_not_taken(value):
    at = run_app(tab="Devices", devices_count=value)
    assert any(f"devices_count={value} is not allowed" in w.value for w in at.warning)
    assert at.number_input(key="devices_count").value == 8
