"""Forecasting for every variant, and a short real training run (architecture.md §4)."""

import io

import pytest
import torch

from model import build_model
from model.training import synthetic_series, train_step, training_batch

from .conftest import ARCHITECTURES

VARIANTS = [("shared_then_expert", 0)] + [(architecture, 4) for architecture in ARCHITECTURES]


@pytest.mark.parametrize(("architecture", "experts"), VARIANTS)
def test_forecast_is_finite_with_the_right_shape(architecture, experts):
    model = build_model("debug", architecture=architecture, num_experts=experts)
    series = [torch.randn(40).cumsum(0) + 5, torch.randn(25).cumsum(0) + 5]  # different lengths
    forecast = model.forecast(series, prediction_length=6, num_samples=4, context_length=32)
    assert forecast.shape == (2, 4, 6)
    assert torch.isfinite(forecast).all()


def test_dense_decoding_matches_chronos_generate():
    """Our KV-cache loop against chronos-forecasting's ChronosModel (transformers' generate), greedy."""
    model = build_model("debug").eval()
    tokenizer = model.tokenizer(64, 8)
    input_ids, attention_mask, _ = tokenizer.context_input_transform(torch.randn(3, 50).cumsum(-1))
    ours = model.sample_tokens(input_ids, attention_mask, 8, 2, top_k=1)
    theirs = model.as_chronos_model(64, 8, num_samples=2, top_k=1)(input_ids, attention_mask)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("architecture", ["shared_then_expert", "expert_only"])
def test_routing_is_constant_across_decoding_steps(architecture):
    model = build_model("debug", architecture=architecture, num_experts=8, top_k=2)
    heads = model.experts if architecture == "shared_then_expert" else [e.lm_head for e in model.experts]
    calls = []
    for expert_id, head in enumerate(heads):
        head.register_forward_hook(lambda module, args, out, e=expert_id: calls.append((e, args[0].shape[0])))
    steps, samples = 5, 3
    model.forecast(torch.randn(2, 30).cumsum(-1) + 5, prediction_length=steps, num_samples=samples, context_length=32)
    per_step = len(calls) // steps
    assert len(calls) == per_step * steps
    first = sorted(calls[:per_step])
    assert all(sorted(calls[i * per_step:(i + 1) * per_step]) == first for i in range(steps))
    assert sum(rows for _, rows in first) == 2 * samples * 2  # every path visits its K = 2 experts


def test_forecast_values_are_in_the_series_units():
    model = build_model("debug")
    level = 1000.0
    forecast = model.forecast(torch.full((1, 20), level), prediction_length=3, num_samples=2, context_length=32)
    # Tokens decode to bin centres in [-15, 15] times the context's mean absolute value.
    assert forecast.abs().max() <= 15 * level + 1e-3


def test_forecast_refuses_bad_settings():
    model = build_model("debug")
    with pytest.raises(ValueError, match="num_samples"):
        model.forecast(torch.randn(1, 10), num_samples=0)
    with pytest.raises(ValueError, match="top_p"):
        model.forecast(torch.randn(1, 10), top_p=1.5)


def test_short_training_lowers_loss_and_trains_the_chosen_experts():
    torch.manual_seed(0)
    model = build_model("tiny", num_experts=4, top_k=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    batches = [training_batch(model, synthetic_series(8, 64 + 16, generator), 64, 16) for _ in range(4)]
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    first_losses, last_losses, chosen = [], [], set()
    steps = 12
    for step in range(steps):
        output = train_step(model, optimizer, batches[step % len(batches)])
        chosen.update(int(e) for e in output.routing[0].routing.expert_indices.reshape(-1))
        (first_losses if step < 4 else last_losses if step >= steps - 4 else []).append(output.lm_loss.item())
    assert sum(last_losses) / 4 < 0.9 * sum(first_losses) / 4
    for expert_id in chosen:
        changed = [not torch.equal(p, initial[f"experts.{expert_id}.{n}"])
                   for n, p in model.experts[expert_id].named_parameters()]
        assert all(changed), expert_id
    assert not torch.equal(model.router.output.weight, initial["router.output.weight"])

    # Save then load: identical outputs from a fresh model.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = build_model("tiny", num_experts=4, top_k=2)
    restored.load_state_dict(torch.load(buffer))
    model.eval(), restored.eval()
    batch = batches[0]
    torch.testing.assert_close(
        model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).logits,
        restored(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).logits,
        rtol=0, atol=0,
    )
