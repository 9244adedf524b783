"""What a benchmark's timed repetition does in each mode (planner.bench.steps): usage reported from the step's
own routing, a frozen backbone left as it was, training on second moments as a long run leaves them."""

import pytest
import torch

from model.build import build_model_from_config
from model.training import synthetic_series, training_batch
from planner.bench import BenchSpec
from planner.bench.steps import make_step, summarise_usage
from tests.test_bench import DEBUG


@pytest.mark.parametrize("mode", ["forward", "forecast", "train"])
def test_steps_run_every_mode_and_report_usage(mode):
    spec = BenchSpec(**DEBUG, mode=mode, architecture="token_ffn", num_experts=4)
    model = build_model_from_config(spec.model_config())
    step = make_step(spec, model, "cpu")
    output = step()
    usage = summarise_usage(output, spec.num_experts)
    total = sum(p.numel() for p in model.parameters())
    if mode == "forecast":
        assert output.shape == (spec.batch_size, spec.num_samples, spec.prediction_length) and usage == {}
        assert step.trained_params() is None
        return
    # debug has 2 blocks per stack: block 1 of each is MoE; K = 2 slots per token, S + T tokens per series.
    tokens = spec.batch_size * (spec.context_length + 1 + spec.prediction_length + 1)
    assert sum(usage["usage_counts"]) == 2 * tokens and usage["moe_layers"] == len(output.routing) == 2
    # Slots per expert, counted from each layer's chosen indices (one-hot sums), summed over the layers.
    per_layer = [torch.nn.functional.one_hot(record.routing.expert_indices.reshape(-1), 4).sum(0)
                 for record in output.routing]
    counts = sum(per_layer)
    assert usage["usage_counts"] == counts.tolist()
    assert usage["usage_entropy_nats"] == pytest.approx(
        float(torch.distributions.Categorical(probs=counts.double() / counts.sum()).entropy()))
    # Switch's balance loss per layer, E · Σᵢ (slot share of i) · (mean router probability of i), summed.
    balance = sum(4 * float((layer_counts.double() / layer_counts.sum()
                             * record.routing.router_probs.detach().double().mean(0)).sum())
                  for layer_counts, record in zip(per_layer, output.routing))
    assert usage["balance_loss"] == pytest.approx(balance, rel=1e-6)
    # The loss: cross-entropy of the logits against the step's targets (rebuilt as make_step builds them),
    # plus the 0.01-weighted balance loss.
    series = synthetic_series(spec.batch_size, spec.context_length + spec.prediction_length,
                              torch.Generator().manual_seed(spec.seed))
    labels = training_batch(model, series, spec.context_length, spec.prediction_length)["labels"]
    logits = output.logits.detach().reshape(-1, 4096).float()
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels.reshape(-1))
    assert usage["loss"] == pytest.approx(float(cross_entropy) + 0.01 * balance, rel=1e-5)
    if mode == "forward":
        assert step.trained_params() is None
        return
    # AdamW holds moments for what got a gradient: everything but the experts a layer routed no token to.
    idle = sum(p.numel() for layer_counts, record in zip(per_layer, output.routing)
               for expert, count in enumerate(layer_counts.tolist()) if count == 0
               for p in model.get_submodule(record.layer).experts[expert].parameters())
    assert step.trained_params() == total - idle

def test_a_frozen_backbone_training_step_moves_only_the_experts_and_routers():
    """experts_and_router: AdamW holds the trainable parameters that received a gradient, the backbone keeps
    its weights, and the traced step's optimizer updates only those shapes."""
    spec = BenchSpec(**DEBUG, mode="train", architecture="token_ffn", num_experts=4, trainable="experts_and_router")
    model = build_model_from_config(spec.model_config(), trainable=spec.trainable)
    backbone = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    step = make_step(spec, model, "cpu")
    output = step()
    step()
    assert all(torch.equal(p, backbone[name]) for name, p in model.named_parameters() if name in backbone)
    learning = sum(p.numel() for p in model.parameters() if p.requires_grad)
    idle = sum(p.numel() for record in output.routing
               for expert, used in enumerate(torch.bincount(record.routing.expert_indices.reshape(-1), minlength=4))
               if used == 0 for p in model.get_submodule(record.layer).experts[expert].parameters())
    assert step.trained_params() == learning - idle
    assert learning == 4 * 2 * (2 * 64 * 256) + 2 * 64 * 4  # 2 MoE blocks × E × (wi, wo) + their routers


def test_timed_training_steps_run_on_second_moments_a_long_run_leaves():
    """After its first step a benchmark's AdamW holds no second moment below STEADY_SECOND_MOMENT, where plain
    AdamW keeps exact zeros for every parameter that step gave a zero gradient (16 experts at batch 2: most
    are routed no token), and this CPU's square root of zeros runs several times slower than of ordinary values."""
    from model.training import train_step
    from planner.bench.steps import STEADY_SECOND_MOMENT

    spec = BenchSpec(**DEBUG, mode="train", architecture="expert_only", num_experts=16)
    torch.manual_seed(0)
    model = build_model_from_config(spec.model_config())
    plain_model = build_model_from_config(spec.model_config())
    plain_model.load_state_dict(model.state_dict())
    step = make_step(spec, model, "cpu")
    torch.manual_seed(1)  # dropout's draws, as the plain step below gets them
    first, _ = step(), step()
    settled = [state["exp_avg_sq"] for state in step.optimizer.state.values()]
    # the second step decays the floor by AdamW's beta2 (0.999) where its gradient is zero: no zero is left
    assert settled and all(bool((moment >= 0.999 * STEADY_SECOND_MOMENT).all()) for moment in settled)

    plain_optimizer = torch.optim.AdamW([p for p in plain_model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(spec.seed)  # make_step's batch
    series = synthetic_series(spec.batch_size, spec.context_length + spec.prediction_length, generator)
    plain_model.train()
    plain_batch = training_batch(plain_model, series, spec.context_length, spec.prediction_length)
    torch.manual_seed(1)
    plain_first = train_step(plain_model, plain_optimizer, plain_batch)
    zeros = sum(int((state["exp_avg_sq"] == 0).sum()) for state in plain_optimizer.state.values())
    assert zeros > 0
    # the same first step
    assert float(first.loss.detach()) == pytest.approx(float(plain_first.loss.detach()), rel=1e-6)
