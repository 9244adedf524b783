"""Files into and out of the Streamlit app: a training YAML or a config JSON fills the sidebar, a bad one is
one clear error that changes nothing, and the exports carry the grid exactly with its metadata."""

import csv
import io
import json

import pandas as pd
import pytest

from model.config import make_config
from planner.plan import plan, plan_grid
from planner.workload import Workload
from tests.test_app import assert_grid_matches, error_texts, expected_row, run_app, shown_grid

YAML = b"""
model_id: google/t5-efficient-mini
context_length: 384
prediction_length: 48
use_moe: true
num_experts: 6
num_active_experts: 3
router_hidden_dim: 128
expert_capacity: null
shared_layers: null
per_device_train_batch_size: 2
learning_rate: 0.0008
"""


def test_app_training_yaml_upload_fills_the_sidebar():
    at = run_app()
    at.file_uploader(key="upload").set_value(("train.yaml", YAML, "application/x-yaml")).run()
    assert not at.exception and not at.error
    assert at.multiselect(key="sizes").value == ["mini"]
    assert at.text_input(key="experts").value == "0, 6"
    assert "learning_rate" in at.success[0].value  # unknown keys are listed as ignored
    workload = Workload(batch_size=2, context_length=384, prediction_length=48)
    assert_grid_matches(at, plan_grid(["mini"], ["shared_then_expert"], [0, 6], workload, top_k=3,
                                      router_hidden_dim=128))


@pytest.mark.parametrize(("name", "data", "field"), [
    ("train.yaml", YAML.replace(b"shared_layers: null", b"shared_layers: 4"), "shared_layers"),
    ("train.yaml", b"model_id: [unclosed", "could not be parsed"),
    ("config.json", b"{\"d_model\": 64,", "not valid JSON"),
])
def test_app_bad_upload_is_one_clear_error(name, data, field):
    at = run_app(sizes="tiny")
    at.file_uploader(key="upload").set_value((name, data, "text/plain")).run()
    assert not at.exception
    (message,) = error_texts(at)
    assert field in message and name in message and "Traceback" not in message
    assert at.multiselect(key="sizes").value == ["tiny"]  # nothing was changed by the bad file
    assert shown_grid(at)[0].shape[0] == 10


def test_app_config_json_upload_plans_the_custom_size():
    dims = dict(d_model=96, d_ff=384, d_kv=16, num_heads=6, num_layers=3, num_decoder_layers=3)
    at = run_app(experts="0, 4", architectures="shared_then_expert")
    at.file_uploader(key="upload").set_value(("config.json", json.dumps(dims).encode(), "application/json")).run()
    assert not at.exception and not at.error
    plans = [plan(make_config("custom", **dims), size="custom"),
             plan(make_config("custom", num_experts=4, **dims), size="custom")]
    assert_grid_matches(at, plans)


def test_exports_carry_the_grid_exactly_with_metadata():
    from ui.compute import export_rows, plan_table
    from ui.exports import export_bytes
    from ui.sidebar import Settings

    settings = Settings(sizes=("tiny",), custom_dims=None, architectures=("token_ffn",), experts="0, 4", top_k=2,
                        router_hidden_dim=256, vocab_size=4096, context_length=512, prediction_length=64,
                        batch_size=1, num_samples=20, dtype="fp32", optimizer="adamw", precision="fp32",
                        dispatch="sparse", expert_capacity=None)
    rows = export_rows(plan_table(settings))
    expected = [expected_row(p) for p in plan_grid(["tiny"], ["token_ffn"], [0, 4])]

    text = export_bytes(rows, "csv", settings, "grid").decode()
    assert "# convention_flops" in text and "# streamlit" in text and "# setting_batch_size: 1" in text
    parsed = list(csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#")))
    assert [int(r["total_params"]) for r in parsed] == [e["Total params"] for e in expected]
    assert [int(r["forecast_memory_bytes"]) for r in parsed] == [e["Fcst mem"] for e in expected]

    records = json.loads(export_bytes(rows, "json", settings, "grid"))
    assert [r["train_flops"] for r in records] == [e["Train FLOPs"] for e in expected]
    assert records[0]["metadata"]["setting_sizes"] == "tiny"  # plain values, not Python reprs

    sheets = pd.read_excel(io.BytesIO(export_bytes(rows, "xlsx", settings, "grid")), sheet_name=None)
    assert list(sheets["rows"]["weights_fp16_bytes"]) == [e["Weights"] // 2 for e in expected]
    assert "convention_memory" in set(sheets["metadata"]["key"])

    markdown = export_bytes(rows, "md", settings, "grid").decode()
    assert f"{expected[1]['Total params']:,}" in markdown
