"""The Cost tab through AppTest: a training run's figures, the comparisons, the plan search and a forecasting
service against planner.cost's, computed here; bad input is one error and the other tabs still work."""

import pytest

from model.config import make_config
from planner.cost.search import SearchSpace, search_plans
from planner.cost.service import ForecastService, plan_service
from planner.cost.training import TrainingRun, price_training_run
from streamlit.testing.v1 import AppTest

from tests.test_app import APP, error_texts

QUERY = dict(sizes="tiny", architectures="token_ffn", experts="0, 4", tab="Cost", context_length="64",
             prediction_length="16", num_samples="4")


@pytest.fixture(autouse=True)
def _shared_cache(shared_cache_dir, monkeypatch):
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(shared_cache_dir))


def run_app(**query) -> AppTest:
    """The app on `query`, with time to trace a step (seconds, once per cache)."""
    at = AppTest.from_file(APP, default_timeout=120)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metrics(at) -> dict[str, str]:
    return {metric.label: metric.value for metric in at.metric}


def test_training_run_figures_equal_the_planner():
    at = run_app(**QUERY, cost_variant="tiny · MoE-4 top-2 · token_ffn", cost_gpu="h100-sxm", cost_devices="4",
                 cost_global_batch="32", cost_accumulation="2", cost_steps="10000", cost_strategy="expert_parallel",
                 cost_precision="amp_bf16")
    assert not at.error
    expected = price_training_run(TrainingRun(make_config("tiny", architecture="token_ffn", num_experts=4),
                                              "h100-sxm", num_devices=4, per_device_batch=4, gradient_accumulation=2,
                                              steps=10_000, context_length=64, prediction_length=16,
                                              strategy="expert_parallel", precision="amp_bf16"))
    shown = metrics(at)
    assert shown["Step time"] == f"{expected.step_time_s * 1000:,.1f} ms"
    assert shown["Cost"] == f"${expected.cost_usd:,.2f}"
    assert shown["MFU"] == f"{expected.mfu:.1%}"
    split = next(c for c in at.get("plotly_chart") if c.proto.id.endswith("cost_split"))
    assert f"bound by {expected.bound}" in split.proto.spec
    collectives = at.dataframe[0].value
    # expert parallel: the shared gradients' all-reduce, each MoE layer's row counts (all_gather) before its
    # routed rows travel (all_to_all), as model.expert_parallel issues them
    assert set(collectives["collective"]) == {"all_reduce", "all_gather", "all_to_all"}
    assert collectives["seconds_per_step"].sum() == pytest.approx(expected.communication_s)


def test_sweeps_and_search_equal_the_planner():
    at = run_app(**QUERY, cost_variant="tiny dense", cost_gpu="l4", cost_devices="2", cost_global_batch="8",
                 cost_steps="1000")
    at.button(key="cost_sweep_devices").click().run(timeout=120)
    assert not at.exception and not at.error
    charts = {chart.proto.id.split("-")[-1] for chart in at.get("plotly_chart")}
    assert "cost_sweep_devices_chart" in charts
    at.multiselect(key="cost_search_counts").set_value([1, 2])
    at.button(key="cost_search").click().run(timeout=120)
    assert not at.exception and not at.error
    template = TrainingRun(make_config("tiny"), "l4", num_devices=2, per_device_batch=4, steps=1000,
                           context_length=64, prediction_length=16)
    result = search_plans(template, 8, SearchSpace(("l4",), (1, 2)))
    front = next(frame.value for frame in at.dataframe if "pick" in frame.value.columns)
    assert list(front["hours"]) == pytest.approx([e.hours for e in result.pareto_front])
    assert list(front["cost_usd"]) == pytest.approx([e.cost_usd for e in result.pareto_front])
    assert "cost_pareto" in {chart.proto.id.split("-")[-1] for chart in at.get("plotly_chart")}


def test_forecasting_service_equals_the_planner():
    at = run_app(**QUERY, cost_section="Forecasting service", serve_variant="tiny dense", serve_gpu="l4",
                 serve_batch="8")
    at.button(key="serve_run").click().run(timeout=120)
    assert not at.exception and not at.error
    expected = plan_service(ForecastService(make_config("tiny"), "l4", num_samples=4, context_length=64,
                                            prediction_length=16, batch_size=8))
    shown = metrics(at)
    assert shown["Devices needed"] == f"{expected.devices_needed:,}"
    assert shown["Latency"] == f"{expected.chosen.latency_s * 1000:,.0f} ms"
    assert shown["Per million"] == f"${expected.cost_per_million_usd:,.2f}"


@pytest.mark.parametrize("query, field", [
    (dict(cost_global_batch="100"), "global_batch 100 is not divisible"),
    (dict(cost_devices="2", cost_per_node="4"), "devices_per_node"),
    (dict(cost_price="-1"), "price_per_device_hour"),
    (dict(cost_gpu="t4", cost_precision="amp_bf16"), "precision"),
])
def test_bad_input_is_one_error_and_other_tabs_still_work(query, field):
    at = run_app(**{**QUERY, **query})
    (message,) = error_texts(at)
    assert field in message and "\n" not in message
    elsewhere = run_app(**{**QUERY, **query, "tab": "Plan"})  # the same link, another tab
    assert not elsewhere.error and elsewhere.dataframe


@pytest.mark.parametrize("key", ["cost_devices", "cost_steps", "cost_global_batch"])
def test_a_count_below_one_in_a_link_is_named_and_not_taken(key):
    at = run_app(**{**QUERY, key: "0"})
    assert any(f"{key}=0 is not allowed" in warning.value for warning in at.warning)
    assert not at.error
