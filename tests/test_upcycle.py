"""Upcycling a dense Chronos-T5 checkpoint (architecture.md §6): saved with save_pretrained into tmp_path,
read back, compared with the dense model; and every bad input refused in one line naming its field."""

import json

import pytest
import torch
import torch.nn.functional as F

from model import build_model, upcycle
from model.checks import SettingError

E, K = 4, 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """size -> (dense model in eval mode, the directory its backbone was saved to)."""
    saved = {}
    for size in ("debug", "tiny"):
        torch.manual_seed(1)
        dense = build_model(size).eval()
        directory = tmp_path_factory.mktemp(f"chronos-t5-{size}")
        dense.backbone.save_pretrained(directory)
        saved[size] = (dense, directory)
    return saved


def batch(vocab=4096):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, vocab, (3, 24), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :9] = 0  # a shorter series, padded on the left as Chronos does
    decoder_input_ids = torch.randint(2, vocab, (3, 6), generator=generator)
    return input_ids, attention_mask, decoder_input_ids


def logits(model):
    return model.eval()(*batch()[:2], decoder_input_ids=batch()[2]).logits


@pytest.mark.parametrize("architecture", ["token_ffn", "expert_only"])
@pytest.mark.parametrize("size", ["debug", "tiny"])
def test_upcycle_logits_equal_the_dense_model(checkpoints, size, architecture):
    dense, directory = checkpoints[size]
    moe = upcycle(directory, architecture=architecture, num_experts=E, top_k=K, size=size)
    assert moe.config.num_experts == E and moe.config.dims == dense.config.dims
    torch.testing.assert_close(logits(moe), logits(dense))
    for record in moe.eval()(*batch()[:2], decoder_input_ids=batch()[2]).routing:
        assert record.routing.router_probs.std() > 0  # the default router (small random) is not uniform


@pytest.mark.parametrize("architecture", ["token_ffn", "expert_only"])
def test_upcycle_zero_router_is_uniform_and_equal(checkpoints, architecture):
    dense, directory = checkpoints["debug"]
    moe = upcycle(directory, architecture=architecture, num_experts=E, router_init="zero")
    output = moe.eval()(*batch()[:2], decoder_input_ids=batch()[2])
    torch.testing.assert_close(output.logits, logits(dense))
    for record in output.routing:
        torch.testing.assert_close(record.routing.router_probs, torch.full_like(record.routing.router_probs, 1 / E))


def test_upcycle_copies_each_weight_into_its_place(checkpoints):
    dense, directory = checkpoints["debug"]
    dense_weights = {name: p.detach().clone() for name, p in dense.backbone.named_parameters()}
    moe = upcycle(directory, architecture="token_ffn", num_experts=E, encoder_moe_blocks=(0,), decoder_moe_blocks=(1,))
    ffn = moe.backbone.encoder.block[0].layer[1].DenseReluDense
    for expert in ffn.experts:
        assert torch.equal(expert.wi.weight, dense_weights["encoder.block.0.layer.1.DenseReluDense.wi.weight"])
        assert torch.equal(expert.wo.weight, dense_weights["encoder.block.0.layer.1.DenseReluDense.wo.weight"])
    assert torch.equal(moe.backbone.encoder.block[1].layer[1].DenseReluDense.wi.weight,
                       dense_weights["encoder.block.1.layer.1.DenseReluDense.wi.weight"])  # a dense block stays
    assert ffn.router.weight.abs().max() < 0.2 and ffn.router.weight.std().item() == pytest.approx(0.02, rel=0.2)
    # Copies, not shared storage: training the MoE leaves the dense model alone.
    moe.backbone.shared.weight.data.add_(1.0)
    assert torch.equal(dense.backbone.shared.weight, dense_weights["shared.weight"])

    only = upcycle(directory, architecture="expert_only", num_experts=E)
    scale = dense.config.dims.d_model**-0.5
    for expert in only.experts:
        assert torch.equal(expert.encoder.final_layer_norm.weight, dense_weights["encoder.final_layer_norm.weight"])
        torch.testing.assert_close(expert.lm_head.weight, dense_weights["shared.weight"] * scale)


def test_upcycle_takes_a_dense_model_in_memory_or_pickled_weights(checkpoints, tmp_path):
    dense, directory = checkpoints["debug"]
    dense.backbone.save_pretrained(tmp_path, safe_serialization=False)  # pytorch_model.bin, as older checkpoints
    assert (tmp_path / "pytorch_model.bin").is_file()
    models = [upcycle(source, architecture="expert_only", num_experts=E, router_init="zero")
              for source in (directory, str(directory), tmp_path, dense, dense.backbone)]
    reference = models[0].state_dict()
    for model in models[1:]:  # all but the ContextRouter's hidden layer, which keeps its random init
        assert all(torch.equal(reference[name], tensor) for name, tensor in model.state_dict().items()
                   if not name.startswith("router.hidden."))


@pytest.mark.parametrize("size", ["debug", "tiny"])
def test_upcycle_shared_then_expert_differs_only_by_the_heads_layer_norm(checkpoints, size):
    dense, directory = checkpoints[size]
    moe = upcycle(directory, architecture="shared_then_expert", num_experts=E, top_k=K).eval()
    input_ids, attention_mask, decoder_input_ids = batch()
    dense_weights = dense.backbone.state_dict()
    assert all(torch.equal(tensor, dense_weights[name]) for name, tensor in moe.backbone.state_dict().items())
    encoded = dense.backbone.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(moe.backbone.encoder(input_ids=input_ids, attention_mask=attention_mask)
                               .last_hidden_state, encoded)
    hidden = dense.backbone.decoder(input_ids=decoder_input_ids, encoder_hidden_states=encoded,
                                    encoder_attention_mask=attention_mask).last_hidden_state  # (B, T, D)
    d_model = dense.config.dims.d_model
    for head in moe.experts:
        assert not head.fc2.weight.any() and not head.fc2.bias.any()
    # As the docstring says: the dense LM head applied to LayerNorm(h) instead of h.
    expected = dense.backbone.lm_head(F.layer_norm(hidden, (d_model,)) * d_model**-0.5)
    torch.testing.assert_close(logits(moe), expected)
    difference = (logits(moe) - logits(dense)).abs().max()
    assert difference > 1e-2  # not the dense logits: T5's head reads h, this one LN(h)


@pytest.mark.parametrize("architecture", ["token_ffn", "expert_only", "shared_then_expert"])
def test_save_upcycle_forecast_round_trip(tmp_path, architecture):
    dense = build_model("debug").eval()
    dense.backbone.save_pretrained(tmp_path)
    moe = upcycle(tmp_path, architecture=architecture, num_experts=E, top_k=K)
    series = [torch.randn(40).cumsum(0) + 5, torch.randn(25).cumsum(0) + 5]
    forecast = moe.forecast(series, prediction_length=4, num_samples=3, context_length=32,
                            generator=torch.Generator().manual_seed(0))
    assert forecast.shape == (2, 3, 4) and torch.isfinite(forecast).all()
    if architecture != "shared_then_expert":  # equal logits: the same samples from the same generator
        expected = dense.forecast(series, prediction_length=4, num_samples=3, context_length=32,
                                  generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(forecast, expected)


def write_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def bad_directory(tmp_path, checkpoints, damage):
    """A copy of the debug checkpoint, damaged by `damage`."""
    _, directory = checkpoints["debug"]
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    damage(tmp_path)
    return tmp_path


BAD_DIRECTORIES = {
    "no config.json": (lambda d: (d / "config.json").unlink(), "source"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "source"),
    "damaged weights": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "source"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{d_model: 64"), "source"),
    "not a T5": (lambda d: write_config(d, model_type="bert"), "model_type"),
    "gated FFN": (lambda d: write_config(d, feed_forward_proj="gated-gelu"), "feed_forward_proj"),
    "untied head": (lambda d: write_config(d, tie_word_embeddings=False), "tie_word_embeddings"),
    "weights of other dimensions": (lambda d: write_config(d, d_ff=512), "source"),
}


def assert_one_line_naming(error, field):
    assert isinstance(error.value, SettingError) and error.value.field == field
    message = str(error.value)
    assert field in message and "\n" not in message and len(message) < 300, message


@pytest.mark.parametrize("case", list(BAD_DIRECTORIES))
def test_upcycle_refuses_a_bad_checkpoint_in_one_line(tmp_path, checkpoints, case):
    damage, field = BAD_DIRECTORIES[case]
    directory = bad_directory(tmp_path, checkpoints, damage)
    with pytest.raises(ValueError) as error:
        upcycle(directory, architecture="token_ffn", num_experts=E)
    assert_one_line_naming(error, field)


BAD_SETTINGS = {
    "missing directory": ({"source": "nowhere"}, "source"),
    "not a model": ({"source": 42}, "source"),
    "size differs": ({"size": "tiny"}, "size"),
    "unknown size": ({"size": "huge"}, "size"),
    "no experts": ({"num_experts": 0}, "num_experts"),
    "negative experts": ({"num_experts": -2}, "num_experts"),
    "top_k above experts": ({"top_k": E + 1}, "top_k"),
    "unknown architecture": ({"architecture": "moe_everywhere"}, "architecture"),
    "unknown router init": ({"router_init": "xavier"}, "router_init"),
    "a dimension": ({"d_model": 128}, "d_model"),
    "unknown setting": ({"num_active_experts": 2}, "num_active_experts"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_upcycle_refuses_bad_settings_in_one_line(tmp_path, checkpoints, case):
    _, directory = checkpoints["debug"]
    changes, field = BAD_SETTINGS[case]
    settings = {"source": directory, "architecture": "token_ffn", "num_experts": E, **changes}
    if changes.get("source") == "nowhere":
        settings["source"] = tmp_path / "nowhere"
    with pytest.raises(ValueError) as error:
        upcycle(settings.pop("source"), **settings)
    assert_one_line_naming(error, field)


def test_upcycle_refuses_an_moe_source(checkpoints):
    _, directory = checkpoints["debug"]
    moe = upcycle(directory, architecture="token_ffn", num_experts=E)
    with pytest.raises(ValueError) as error:
        upcycle(moe, architecture="token_ffn", num_experts=E)
    assert_one_line_naming(error, "source")


def test_upcycle_then_fine_tune_only_the_experts_and_router(checkpoints):
    """The usual recipe: upcycle, freeze the copied backbone, train routers and experts; one AdamW step moves
    them and leaves every copied backbone weight as the checkpoint had it."""
    dense, directory = checkpoints["debug"]
    moe = upcycle(directory, architecture="token_ffn", num_experts=E, trainable="experts_and_router")
    frozen = {name: p.detach().clone() for name, p in moe.named_parameters() if not p.requires_grad}
    assert frozen and all(".experts." not in name and ".router." not in name for name in frozen)
    optimizer = torch.optim.AdamW([p for p in moe.parameters() if p.requires_grad], lr=1e-2)
    input_ids, attention_mask, decoder_input_ids = batch()
    moe.train()(input_ids, attention_mask, labels=decoder_input_ids).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[name]) for name, p in moe.named_parameters() if name in frozen)
    assert any(not torch.equal(p, dense.get_parameter(name.replace(".experts.0", "")))
               for name, p in moe.named_parameters() if ".experts.0.wi" in name)
