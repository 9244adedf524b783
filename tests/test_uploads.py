"""Uploaded config files -> sidebar widget values (ui.uploads); parsing itself is tested in test_config_import."""

import json

import pytest

from model.presets import PRESETS
from planner.config_import import MAX_CONFIG_BYTES
from ui.uploads import read_upload

MOE_YAML = b"""
model_id: google/t5-efficient-mini
context_length: 256
prediction_length: 32
use_moe: true
num_experts: 12
num_active_experts: 3
router_hidden_dim: 128
moe_architecture: token_ffn
expert_capacity: 1.5
shared_layers: null
per_device_train_batch_size: 16
gradient_accumulation_steps: 2
learning_rate: 0.0008
bf16: true
"""

T5_CONFIG = {"model_type": "t5", "d_model": 320, "d_ff": 1280, "d_kv": 40, "num_heads": 8, "num_layers": 5,
             "num_decoder_layers": 3, "vocab_size": 2048, "dropout_rate": 0.1}


def test_upload_training_yaml_fills_size_lengths_and_moe_widgets():
    result = read_upload("train.yaml", MOE_YAML)
    assert result.values == {
        "sizes": ["mini"], "custom": False, "vocab_size": 4096, "context_length": 256, "prediction_length": 32,
        "batch_size": 16, "num_samples": 20, "optimizer": "adamw", "precision": "amp_bf16",
        "architectures": ["token_ffn"], "experts": "0, 12", "top_k": 3, "router_hidden_dim": 128,
        "expert_capacity": 1.5,
    }
    assert "learning_rate" in result.summary and "Ignored" in result.summary
    assert "gradient accumulation 2" in result.summary


def test_upload_dense_yaml_leaves_moe_widgets_alone():
    result = read_upload("dense.yml", b"model_id: amazon/chronos-t5-small\nuse_moe: false\n", num_samples=7)
    assert result.values["sizes"] == ["small"] and result.values["experts"] == "0"
    assert result.values["num_samples"] == 7  # the user's choice survives a YAML that does not set it
    assert "top_k" not in result.values and "architectures" not in result.values


def test_upload_config_json_becomes_the_custom_size():
    result = read_upload("config.json", json.dumps(T5_CONFIG).encode())
    assert result.values == {"custom": True, "sizes": [], "vocab_size": 2048, "d_model": 320, "d_ff": 1280,
                             "d_kv": 40, "num_heads": 8, "num_layers": 5, "num_decoder_layers": 3}
    assert "dropout_rate" in result.summary


def test_upload_preset_config_json_matches_its_preset():
    small = PRESETS["small"]
    config = {name: getattr(small, name) for name in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers")}
    values = read_upload("config.json", json.dumps(config).encode()).values
    assert values["num_decoder_layers"] == small.num_decoder_layers  # T5Config's default: as many as encoder


@pytest.mark.parametrize(("name", "data", "field"), [
    ("train.yaml", b"model_id: google/t5-efficient-mini\nuse_moe: true\nshared_layers: 4\n", "shared_layers"),
    ("train.yaml", b"model_id: [unclosed", "could not be parsed"),
    ("train.yaml", b"model_id: google/t5-efficient-huge\n", "model_id"),
    ("train.yaml", b"model_id: t5-efficient-mini\nuse_moe: true\nnum_experts: 4\nnum_active_experts: 6\n",
     "top_k"),
    ("train.yml", b"\xff\xfe not text", "UTF-8"),
    ("config.json", b"{\"d_model\": 64", "not valid JSON"),
    ("config.json", json.dumps({**T5_CONFIG, "d_model": 0}).encode(), "d_model"),
    ("config.json", json.dumps({"d_model": 64}).encode(), "d_ff"),
    ("config.json", json.dumps({**T5_CONFIG, "model_type": "llama"}).encode(), "model_type"),
    ("weights.bin", b"\x00", "config.json or a training"),
    pytest.param("config.json", b"[" * 5_000 + b"]" * 5_000, "nested too deeply", id="deep-json"),
    pytest.param("train.yaml", b"[" * 5_000 + b"]" * 5_000, "nested too deeply", id="deep-yaml"),
    pytest.param("big.yaml", b"#" * (MAX_CONFIG_BYTES + 1), f"{MAX_CONFIG_BYTES:,} bytes", id="too-big"),
])
def test_bad_upload_is_one_value_error_naming_the_problem(name, data, field):
    with pytest.raises(ValueError, match=field) as error:
        read_upload(name, data)
    assert "\n" not in str(error.value)
