"""Importing Chronos training YAMLs and Hugging Face config.json files."""

import json

import pytest

from planner.config_import import import_config_file, import_hf_config_json, import_training_yaml

GOOD_YAML = """
model_id: google/t5-efficient-mini
model_type: seq2seq
context_length: 256
prediction_length: 32
n_tokens: 4096
use_moe: true
num_experts: 12
num_active_experts: 3
router_hidden_dim: 128
load_balancing_weight: 0.02
expert_capacity: null
shared_layers: null
per_device_train_batch_size: 16
gradient_accumulation_steps: 2
learning_rate: 0.0008
bf16: true
"""


def test_training_yaml_fills_size_lengths_and_moe_settings():
    imported = import_training_yaml(GOOD_YAML)
    config, workload = imported.config, imported.workload
    assert imported.size == "mini" and config.dims.d_model == 384
    assert (config.num_experts, config.top_k, config.router_hidden_dim) == (12, 3, 128)
    assert config.load_balancing_weight == 0.02
    assert (workload.context_length, workload.prediction_length, workload.batch_size) == (256, 32, 16)
    assert workload.precision == "amp_bf16" and imported.gradient_accumulation_steps == 2
    assert imported.ignored_keys == ("learning_rate",)


def test_dense_yaml_ignores_expert_settings():
    imported = import_training_yaml("model_id: amazon/chronos-t5-small\nuse_moe: false\nnum_experts: 8\n")
    assert imported.size == "small" and imported.config.num_experts == 0


@pytest.mark.parametrize(("text", "message"), [
    ("model_id: [unclosed", "could not be parsed"),
    ("- a\n- b\n", "mapping"),
    ("context_length: 5\n", "needs model_id"),
    ("model_id: google/t5-efficient-huge\n", "tiny, mini, small, base, large"),
    ("model_id: t5-efficient-mini\nuse_moe: true\nshared_layers: 4\n", "shared_layers"),
    ("model_id: t5-efficient-mini\nuse_moe: true\nnum_experts: 4\nnum_active_experts: 6\n", "top_k"),
    ("model_id: t5-efficient-mini\ncontext_length: -1\n", "context_length"),
    ("model_id: t5-efficient-mini\ncontext_length: many\n", "context_length"),
    ("model_id: t5-efficient-mini\nmodel_type: causal\n", "model_type"),
    ("model_id: t5-efficient-mini\nuse_moe: true\nmoe_architecture: everything\n", "moe_architecture"),
    ("!!python/object/apply:os.system ['true']", "could not be parsed"),
])
def test_bad_training_yaml_gets_one_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        import_training_yaml(text)


def test_deeply_nested_files_are_a_clear_error():
    with pytest.raises(ValueError, match="nested too deeply"):
        import_hf_config_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        import_training_yaml("[" * 100_000 + "]" * 100_000)


def test_oversized_upload_is_refused():
    with pytest.raises(ValueError, match="larger than"):
        import_training_yaml("a: 1\n" * 300_000)


def test_hf_config_json_gives_custom_dimensions(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "t5", "d_model": 96, "d_ff": 384, "d_kv": 32, "num_heads": 3,
                                "num_layers": 2, "num_decoder_layers": 3, "vocab_size": 1024, "dropout_rate": 0.1}))
    imported = import_config_file(path, architecture="token_ffn", num_experts=4)
    dims = imported.config.dims
    assert (dims.d_model, dims.num_decoder_layers, dims.vocab_size) == (96, 3, 1024)
    assert imported.config.architecture == "token_ffn" and imported.ignored_keys == ("dropout_rate",)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"model_type": "t5", "d_model": 64}', "lacks d_ff"),
    ('{"model_type": "bert", "d_model": 64}', "model_type"),
    ('{"d_model": 0, "d_ff": 8, "d_kv": 8, "num_heads": 1, "num_layers": 1}', "d_model"),
])
def test_bad_config_json_gets_one_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        import_hf_config_json(text)


def test_unknown_extension_is_refused(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("x = 1")
    with pytest.raises(ValueError, match=".json"):
        import_config_file(path)
