"""Building the family: published sizes, tied embedding, custom sizes, and refusal of bad configs."""

import json

import pytest
import torch

from model import PRESETS, build_model, dims_from_hf_config, make_config
from model.presets import PUBLISHED_SIZES

from .conftest import ARCHITECTURES


def rounds_to(count: int, published: str) -> bool:
    """True if `count` rounds to the published size at the precision it is written with (200M: hundreds)."""
    millions = int(published.rstrip("M"))
    precision = 10 ** (len(str(millions)) - len(str(millions).rstrip("0")))
    return round(count / 1e6 / precision) * precision == millions


@pytest.mark.parametrize("size", list(PUBLISHED_SIZES))
def test_dense_preset_rounds_to_published_size(size):
    model = build_model(size, device="meta")
    unique = sum(p.numel() for p in model.parameters())
    assert rounds_to(unique, PUBLISHED_SIZES[size]), (size, unique)


def test_tied_embedding_counts_once():
    model = build_model("tiny", device="meta")
    assert model.backbone.lm_head.weight is model.backbone.shared.weight
    every_name = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    unique = sum(p.numel() for p in model.parameters())
    # Hand derivation for tiny (D 256, F 1024, H·Dk 256, 4+4 blocks, V 4096):
    d, f, a, v = 256, 1024, 256, 4096
    encoder = 4 * (4 * d * a + 2 * d * f + 2 * d) + 32 * 4 + d
    decoder = 4 * (8 * d * a + 2 * d * f + 3 * d) + 32 * 4 + d
    assert unique == v * d + encoder + decoder == 8_394_496
    # The embedding is reachable under four names (shared, encoder and decoder embed_tokens, lm_head): three
    # extra V·D under named_parameters(remove_duplicate=False), none in the unique count.
    assert every_name == unique + 3 * v * d


def test_custom_size_and_hf_config_json(tmp_path):
    custom = build_model("custom", d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=1, device="meta")
    assert custom.config.dims.num_decoder_layers == 1  # defaults to num_layers, as in T5Config
    # Hand count (D 32, F 64, A = 2·8 = 16, one block per stack, V 4096 by default):
    # encoder block: q, k, v, o 4·D·A + wi, wo 2·D·F + two norms 2·D; + position buckets 32·H + final norm D;
    # decoder block: self and cross 8·D·A + 2·D·F + three norms 3·D; + 32·H + D; the tied embedding V·D once.
    d, f, a, h, v = 32, 64, 16, 2, 4096
    encoder = (4 * d * a + 2 * d * f + 2 * d) + 32 * h + d
    decoder = (8 * d * a + 2 * d * f + 3 * d) + 32 * h + d
    assert sum(p.numel() for p in custom.parameters()) == v * d + encoder + decoder == 145_760
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 2, "num_layers": 1,
                                "num_decoder_layers": 3, "vocab_size": 512, "model_type": "t5"}))
    dims = dims_from_hf_config(path)
    assert (dims.d_model, dims.num_decoder_layers, dims.vocab_size) == (32, 3, 512)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("size", ["debug", "large"])
def test_builds_on_meta_device(size, architecture):
    model = build_model(size, architecture=architecture, num_experts=16, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_expert_only_has_no_shared_encoder():
    model = build_model("debug", architecture="expert_only", num_experts=4, device="meta")
    assert model.backbone.encoder is None
    assert not any(name.startswith("backbone.encoder.") for name, _ in model.named_parameters())


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"num_experts": 4, "top_k": 0}, "top_k"),
        ({"num_experts": -1}, "num_experts"),
        ({"architecture": "everything"}, "architecture"),
        ({"shared_layers": 2, "num_experts": 4}, "shared_layers"),
        ({"architecture": "token_ffn", "num_experts": 4, "expert_capacity": 0}, "expert_capacity"),
        ({"architecture": "token_ffn", "num_experts": 4, "expert_capacity": -1.5}, "expert_capacity"),
        ({"d_model": 0}, "d_model"),
        ({"num_heads": -2}, "num_heads"),
        ({"d_model": 10**9}, "d_model"),
        ({"dispatch": "all"}, "dispatch"),
        ({"router_hidden_dim": 0, "num_experts": 4}, "router_hidden_dim"),
        ({"vocab_size": 1}, "vocab_size"),
    ],
)
def test_bad_config_names_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        build_model("tiny", device="meta", **settings)


def test_unknown_size_lists_the_presets():
    with pytest.raises(ValueError, match="size must be one of debug, tiny"):
        make_config("huge")


def test_debug_preset_token_ffn_hand_counted():
    # debug: D 64, F 256, A = 4·16 = 64, H 4, 2 + 2 blocks, V 4096. token_ffn puts experts in block 1 of each
    # stack: its FFN (wi, wo: 2·D·F) becomes a router D·E (no bias) and E expert FFNs of 2·D·F each.
    assert "debug" in PRESETS
    model = build_model("debug", architecture="token_ffn", num_experts=4, device="meta")
    d, f, a, h, v, e = 64, 256, 64, 4, 4096, 4
    encoder = 2 * (4 * d * a + 2 * d * f + 2 * d) + 32 * h + d
    decoder = 2 * (8 * d * a + 2 * d * f + 3 * d) + 32 * h + d
    dense = v * d + encoder + decoder
    assert dense == 492_544  # "a few hundred thousand parameters"
    moe = dense + 2 * (-2 * d * f + d * e + e * 2 * d * f)
    assert sum(p.numel() for p in model.parameters()) == moe == 689_664


def test_dense_and_sparse_dispatch_compute_the_same_logits():
    for architecture in ARCHITECTURES:
        torch.manual_seed(1)
        sparse = build_model("debug", architecture=architecture, num_experts=4).eval()
        dense = build_model("debug", architecture=architecture, num_experts=4, dispatch="dense").eval()
        dense.load_state_dict(sparse.state_dict())
        ids = torch.randint(2, 4096, (3, 12))
        labels = torch.randint(2, 4096, (3, 5))
        mask = torch.ones_like(ids)
        torch.testing.assert_close(sparse(ids, mask, labels=labels).logits, dense(ids, mask, labels=labels).logits)
