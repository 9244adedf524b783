"""The Streamlit app driven through AppTest: every tab, widgets set by key, shown numbers against the planner's.

Expected values come from the planner itself (planner.plan, planner.memory), computed here, never from the app.
AppTest keeps its 3 s default timeout: first render and reruns must fit in it.
"""

import json
from pathlib import Path

import pandas as pd
import pytest
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

from model.config import make_config
from planner.memory import estimate_memory
from planner.params import count_params
from planner.plan import Plan, plan, plan_grid
from planner.workload import Workload
from planner.units import byte_unit, format_bytes, format_count, format_ratio, format_signed_count

APP = str(Path(__file__).resolve().parents[1] / "app.py")
DEFAULT_SIZES = ["tiny", "mini", "small", "base", "large"]
ARCHITECTURES = ["shared_then_expert", "expert_only", "token_ffn"]


def expected_row(p: Plan) -> dict:
    """What the grid must show for one plan, straight from the planner."""
    memory = estimate_memory(p.config, p.workload, p.params)
    return {
        "Size": p.size, "Architecture": p.architecture, "E": p.config.num_experts,
        "K": p.config.top_k if p.config.is_moe else 0,
        "Total params": p.params.total_params, "Active": p.params.active_params,
        "+ vs dense": p.params.total_params - p.dense_params.total_params,
        "Fwd FLOPs": p.flops.forward_flops,
        "Fwd ×dense": p.flops.forward_flops / p.dense_flops.forward_flops,
        "Train FLOPs": p.flops.train_flops,
        "Fcst FLOPs": p.flops.forecast_flops,
        "Fcst ×dense": p.flops.forecast_flops / p.dense_flops.forecast_flops,
        "Weights": memory.weights.fp32_bytes,
        "Train mem": memory.training.total_bytes, "Fcst mem": memory.forecast.total_bytes,
    }


def expected_text(row: dict, units: dict) -> dict:
    """The same row as the screen shows it (planner.units, tested in test_units); `units` holds each memory
    column's unit: its largest value's."""
    counts = ("Total params", "Active", "Fwd FLOPs", "Train FLOPs", "Fcst FLOPs")
    ratios = ("Fwd ×dense", "Fcst ×dense")
    memory = ("Weights", "Train mem", "Fcst mem")
    return {
        **{c: format_count(row[c]) for c in counts}, **{c: format_ratio(row[c]) for c in ratios},
        **{c: format_bytes(row[c], units[c]) for c in memory}, "+ vs dense": format_signed_count(row["+ vs dense"]),
    }


def shown_grid(at: AppTest) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(exact values, display strings) of the comparison grid."""
    grid = next(df for df in at.dataframe if "Total params" in df.value.columns)
    display = dataframe_util.convert_arrow_bytes_to_pandas_df(grid.proto.arrow_data.styler.display_values)
    return grid.value, display


def assert_grid_matches(at: AppTest, plans: list[Plan]) -> None:
    values, display = shown_grid(at)
    assert len(values) == len(plans)
    rows = [expected_row(p) for p in plans]
    units = {c: byte_unit(max(row[c] for row in rows))
             for c in ("Weights", "Train mem", "Fcst mem")}
    for i, expected in enumerate(rows):
        for column, value in expected.items():
            assert values[column][i] == pytest.approx(value, rel=1e-12), (i, column)
        for column, text in expected_text(expected, units).items():
            assert display[column][i] == text, (i, column)


def run_app(**query) -> AppTest:
    at = AppTest.from_file(APP)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def error_texts(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def test_app_default_grid_equals_planner():
    at = run_app()
    assert not at.error
    assert at.multiselect(key="sizes").value == DEFAULT_SIZES
    assert at.multiselect(key="architectures").value == ARCHITECTURES
    assert at.text_input(key="experts").value == "0, 4, 8, 16"
    assert (at.number_input(key="top_k").value, at.number_input(key="router_hidden_dim").value) == (2, 256)
    assert at.selectbox(key="dtype").value == "fp32" and at.selectbox(key="optimizer").value == "adamw"
    assert_grid_matches(at, plan_grid(DEFAULT_SIZES, ARCHITECTURES, [0, 4, 8, 16]))


def test_app_widget_changes_replan_the_grid():
    at = run_app()
    at.multiselect(key="sizes").set_value(["small"])
    at.multiselect(key="architectures").set_value(["token_ffn", "expert_only"])
    at.text_input(key="experts").input("0, 2, 8")
    at.number_input(key="top_k").set_value(1)
    at.number_input(key="router_hidden_dim").set_value(64)
    at.number_input(key="context_length").set_value(256)
    at.number_input(key="prediction_length").set_value(24)
    at.number_input(key="batch_size").set_value(4)
    at.number_input(key="num_samples").set_value(5)
    at.selectbox(key="dtype").set_value("bf16")
    at.selectbox(key="optimizer").set_value("sgd_momentum")
    at.selectbox(key="precision").set_value("amp_bf16")
    at.run()
    assert not at.exception and not at.error
    workload = Workload(batch_size=4, context_length=256, prediction_length=24, num_samples=5, dtype="bf16",
                        optimizer="sgd_momentum", precision="amp_bf16")
    plans = plan_grid(["small"], ["token_ffn", "expert_only"], [0, 2, 8], workload, top_k=1, router_hidden_dim=64)
    assert_grid_matches(at, plans)


def test_app_exact_values_toggle_shows_integers():
    at = run_app(sizes="tiny", experts="0, 4")
    at.toggle(key="exact").set_value(True).run()
    grid = next(df for df in at.dataframe if "Total params" in df.value.columns)
    assert not grid.proto.arrow_data.styler.display_values  # no Styler: the integers themselves
    total = count_params(make_config("tiny", architecture="expert_only", num_experts=4)).total_params
    assert total in list(grid.value["Total params"])


def test_app_top_k_above_experts_names_the_field_and_keeps_the_rest():
    at = run_app(sizes="tiny")
    at.number_input(key="top_k").set_value(8).run()
    assert not at.exception
    (message,) = error_texts(at)
    assert "top_k" in message and "MoE-4" in message
    assert_grid_matches(at, plan_grid(["tiny"], ARCHITECTURES, [0, 8, 16], top_k=8))


@pytest.mark.parametrize(("key", "value", "field"), [
    ("experts", "4x", "experts"),
    ("experts", "", "experts"),
    ("experts", "0, 2000", "experts"),
    ("vocab_size", 2_000_000, "vocab_size"),
    ("context_length", 2_000_000, "context_length"),
])
def test_app_invalid_input_is_an_error_naming_the_field(key, value, field):
    at = run_app(sizes="tiny")
    widget = at.text_input(key=key) if key == "experts" else at.number_input(key=key)
    widget.set_value(value).run()
    assert not at.exception
    assert any(field in text for text in error_texts(at)), error_texts(at)
    widget.set_value("0, 4" if key == "experts" else 512 if key == "context_length" else 4096).run()
    assert not at.error and shown_grid(at)[0].shape[0] > 0  # and the app keeps working


def test_app_no_size_chosen_says_so():
    at = run_app()
    at.multiselect(key="sizes").set_value([]).run()
    assert not at.exception
    assert any(text.startswith("sizes:") for text in error_texts(at))


def test_app_custom_dimensions_add_a_custom_size():
    at = run_app(sizes="tiny", experts="0, 4", architectures="token_ffn")
    at.checkbox(key="custom").check().run()  # the dimension inputs are enabled once it is on
    for name, value in dict(d_model=192, d_ff=640, d_kv=24, num_heads=6, num_layers=3, num_decoder_layers=2).items():
        at.number_input(key=name).set_value(value)
    at.run()
    dims = dict(d_model=192, d_ff=640, d_kv=24, num_heads=6, num_layers=3, num_decoder_layers=2)
    custom = [plan(make_config("custom", **dims), size="custom"),
              plan(make_config("custom", architecture="token_ffn", num_experts=4, **dims), size="custom")]
    assert_grid_matches(at, plan_grid(["tiny"], ["token_ffn"], [0, 4]) + custom)


def test_app_share_link_reopens_the_same_view():
    at = run_app(sizes=["mini", "base"], architectures="expert_only", experts="0, 16", top_k="4",
                 batch_size="3", tab="Breakdown", variant="base · MoE-16 top-4 · expert_only")
    assert at.multiselect(key="sizes").value == ["mini", "base"]
    assert at.number_input(key="top_k").value == 4 and at.number_input(key="batch_size").value == 3
    assert at.selectbox(key="variant").value == "base · MoE-16 top-4 · expert_only"
    expected = plan(make_config("base", architecture="expert_only", num_experts=16, top_k=4), Workload(batch_size=3),
                    "base")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Total params"] == format_count(expected.params.total_params)


def test_app_breakdown_tab_shows_the_planner_components_and_memory():
    at = run_app(sizes="small", architectures="token_ffn", experts="0, 8", tab="Breakdown")
    assert at.selectbox(key="variant").value == "small · MoE-8 top-2 · token_ffn"  # the first MoE variant
    config = make_config("small", architecture="token_ffn", num_experts=8)
    p = plan(config, size="small")
    memory = estimate_memory(config, Workload(), p.params)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {
        "Total params": format_count(p.params.total_params), "Active params": format_count(p.params.active_params),
        "Forward FLOPs": format_count(p.flops.forward_flops, "FLOP"),
        "Training memory": format_bytes(memory.training.total_bytes),
        "Forecast memory": format_bytes(memory.forecast.total_bytes),
    }
    params_shown, flops_shown, memory_shown = (df.value for df in at.dataframe)
    params = dict(zip(params_shown["Component"], params_shown["Parameters"]))
    assert params == {k.replace("_", " "): v for k, v in p.params.components().items() if v}
    flops = flops_shown.set_index("Component")
    assert flops["Forward"].sum() == p.flops.forward_flops and flops["Forecast"].sum() == p.flops.forecast_flops
    training = memory_shown[memory_shown["Phase"] == "Training step"].set_index("Part")["Bytes"]
    assert training.to_dict() == {
        "weights": memory.training.weights_bytes, "gradients": memory.training.gradients_bytes,
        "optimizer states": memory.training.optimizer_states_bytes, "activations": memory.training.activations_bytes}
    forecast = memory_shown[memory_shown["Phase"] == "Forecast"]["Bytes"]
    assert forecast.sum() == memory.forecast.total_bytes

    at.selectbox(key="variant").set_value("small · dense").run()
    assert {m.label: m.value for m in at.metric}["Total params"] == format_count(p.dense_params.total_params)


def plotly_specs(at: AppTest) -> dict[str, dict]:
    return {el.proto.id.split("-")[-1]: json.loads(el.proto.spec) for el in at.get("plotly_chart")}


def test_app_charts_tab_draws_the_planner_values():
    at = run_app(sizes=["tiny", "small"], experts="0, 4, 16", tab="Charts")
    at.selectbox(key="chart_architecture").set_value("expert_only").run()
    assert not at.exception
    specs = plotly_specs(at)
    assert set(specs) == {"chart_architectures", "chart_params", "chart_flop_ratios", "chart_memory"}
    for spec in specs.values():
        assert spec["layout"]["title"]["text"] and spec["layout"]["yaxis"]["title"]["text"]
        assert spec["layout"]["legend"]["orientation"] == "h"  # below the panels: every item shows
    # tiny panel (first trace per series), expert encoders vs E = 0, 4, 16
    encoders = next(t for t in specs["chart_params"]["data"] if t["name"] == "expert encoder")
    expected = [count_params(make_config("tiny", architecture="expert_only", num_experts=e)).expert_encoder_params
                for e in (0, 4, 16)]
    assert encoders["customdata"] == [f"{v:,}" for v in expected]
    forecast = next(t for t in specs["chart_flop_ratios"]["data"] if t["name"] == "forecast")
    plans = [plan(make_config("tiny", architecture="expert_only", num_experts=e)) for e in (0, 4, 16)]
    # The dense point stands alone: a gap (None) keeps the line from joining E = 0 to the MoE points
    assert forecast["x"] == [0, None, 4, 16] and forecast["y"][1] is None
    assert [forecast["y"][0], *forecast["y"][2:]] == pytest.approx(
        [p.flops.forecast_flops / p.dense_flops.forecast_flops for p in plans])
    weights = next(t for t in specs["chart_memory"]["data"] if t["name"] == "weights fp32")
    assert [weights["customdata"][0], *weights["customdata"][2:]] == [f"{4 * p.params.total_params:,}" for p in plans]
    # The architectures side by side (total parameters by default): one line per architecture, dense at E = 0
    compared = {t["name"]: t for t in specs["chart_architectures"]["data"][:4]}  # the tiny panel
    assert set(compared) == {*ARCHITECTURES, "dense"}
    totals = {e: count_params(make_config("tiny", architecture="token_ffn", num_experts=e)).total_params
              for e in (0, 4, 16)}
    assert compared["token_ffn"]["x"][1:] == [4, 16] and compared["token_ffn"]["customdata"][1:] == [
        f"{totals[4]:,}", f"{totals[16]:,}"]
    assert compared["dense"]["x"] == [0] and compared["dense"]["customdata"] == [f"{totals[0]:,}"]


def test_app_conventions_expander_states_what_is_counted():
    at = run_app(sizes="tiny")
    text = " ".join(m.value for m in at.expander[0].markdown)
    for phrase in ("2 × multiply-accumulates", "GiB = 2³⁰", "tied embedding", "every expert is resident"):
        assert phrase in text


def test_app_rerun_after_widget_change_is_fast():
    at = run_app()
    at.number_input(key="batch_size").set_value(8).run(timeout=1)  # raises if the rerun takes longer
    assert not at.exception


def test_app_verify_tab_runs_planner_verify_behind_the_button():
    query = dict(sizes="debug", architectures="token_ffn", experts="0, 4", context_length="24",
                 prediction_length="4", num_samples="2", tab="Verify")
    at = run_app(**query)
    assert at.multiselect(key="verify_variants").value == ["debug · dense", "debug · MoE-4 top-2 · token_ffn"]
    assert not at.dataframe  # nothing runs until the button is pressed
    at.checkbox(key="verify_fvcore").uncheck()
    at.button(key="verify_run").click().run(timeout=120)  # loads torch and builds the modules
    assert not at.exception
    assert at.success and "agree" in at.success[0].value
    results = at.dataframe[0].value
    workload = Workload(context_length=24, prediction_length=4, num_samples=2)
    for e in (0, 4):
        p = plan(make_config("debug", architecture="token_ffn", num_experts=e), workload, "debug")
        mine = results[results["E"] == e].set_index(["Quantity", "Counter"])
        assert mine.loc[("total_params", "meta build"), "Analytic"] == p.params.total_params
        assert mine.loc[("forward_flops", "FlopCounterMode"), "Analytic"] == p.flops.forward_flops
        assert mine.loc[("forecast_flops", "counted forecast"), "Analytic"] == p.flops.forecast_flops
        assert (mine["Measured"] - mine["Analytic"] == mine["Difference"]).all()
    assert "fvcore (MACs x 2)" not in set(results["Counter"])
    assert results["Agrees"].all()

    at.number_input(key="num_samples").set_value(3).run()  # results of other settings are not shown as current
    assert not at.dataframe and "again" in at.info[0].value


def test_exact_values_beyond_2_to_the_53_are_drawn_digit_for_digit():
    """A double holds integers exactly only up to 2^53: larger ones are drawn as their digits, not rounded."""
    at = run_app(sizes="large", experts="0, 16", architectures="token_ffn", batch_size="4096", exact="true")
    grid = next(df for df in at.dataframe if "Fcst FLOPs" in df.value.columns).value
    workload = Workload(batch_size=4096)
    expected = [plan(make_config("large", **moe), workload).flops.forecast_flops
                for moe in ({}, dict(architecture="token_ffn", num_experts=16))]
    assert all(flops > 2**53 for flops in expected)
    assert list(grid["Fcst FLOPs"]) == [f"{flops:,}" for flops in expected]
    assert list(grid["E"]) == [0, 16]  # small integers stay numbers


def test_app_trainable_regime_counts_only_what_learns():
    """Fine-tuning with the backbone frozen: the grid gains a Trainable column equal to the parameters that
    require grad in the built model, training memory follows, and the dense model (nothing to train) is left
    out with a line saying why."""
    from model import build_model

    at = run_app(sizes="tiny", experts="0, 4", trainable="experts_and_router")
    values, _ = shown_grid(at)
    assert list(values["Architecture"]) == ARCHITECTURES
    for i, architecture in enumerate(ARCHITECTURES):
        model = build_model("tiny", device="meta", architecture=architecture, num_experts=4,
                            trainable="experts_and_router")
        assert values["Trainable"][i] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        workload = Workload(trainable="experts_and_router")
        config = make_config("tiny", architecture=architecture, num_experts=4)
        assert values["Train mem"][i] == estimate_memory(config, workload).training.total_bytes
    assert [i.value for i in at.info][0].startswith("Trainable experts_and_router: nothing to train in tiny dense, "
                                                    "so it is left out")

    at = run_app(sizes="tiny", experts="0", trainable="components", trainable_components=["decoder_ffn"])
    values, _ = shown_grid(at)
    assert list(values["Trainable"]) == [4 * 2 * 256 * 1024]  # Ld blocks × wi, wo of D × F
    assert "Trainable" not in shown_grid(run_app(sizes="tiny", experts="0"))[0].columns  # everything trains


def test_breakdown_says_whether_every_trainable_parameter_gets_a_gradient():
    """A real backward (planner.gradients; torch loads on first use, hence the longer timeout)."""
    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in dict(sizes="tiny", experts="4", architectures="shared_then_expert", trainable="router",
                           tab="Breakdown").items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.success[0].value.startswith("Trainable router: every trainable parameter receives a gradient")
