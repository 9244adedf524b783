"""Sparse dispatch, gradients, balance loss and routing invariants (architecture.md §3–4)."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import build_model
from model.balance_loss import LoadBalancingLoss
from model.routing import RoutingDecision

from .conftest import ARCHITECTURES, token_batch


def forward_flops(model, batch) -> int:
    input_ids, attention_mask, labels = batch
    with FlopCounterMode(display=False) as counter:
        model(input_ids, attention_mask, labels=labels)
    return counter.get_total_flops()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sparse_flops_grow_with_experts_only_through_the_router(architecture):
    batch = token_batch(4, 33, 9)
    flops = {e: forward_flops(build_model("debug", architecture=architecture, num_experts=e).eval(), batch)
             for e in (4, 16)}
    d, r, extra_columns = 64, 256, 16 - 4
    if architecture == "token_ffn":
        # One token router Linear(D→E) per MoE block; debug has one MoE block in each stack (block 1).
        routed_tokens = 4 * 33 + 4 * 9
        expected = routed_tokens * 2 * d * extra_columns
    else:
        expected = 4 * 2 * r * extra_columns  # one sample router Linear(R→E) per series
    assert flops[16] - flops[4] == expected


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_dense_dispatch_flops_grow_with_experts(architecture):
    batch = token_batch(4, 33, 9)
    flops = {e: forward_flops(build_model("debug", architecture=architecture, num_experts=e,
                                          dispatch="dense").eval(), batch) for e in (4, 16)}
    router_only = 4 * 2 * 256 * 12 if architecture != "token_ffn" else (4 * 33 + 4 * 9) * 2 * 64 * 12
    assert flops[16] - flops[4] > 10 * router_only


def _expert_parameters(model):
    """(layer name, expert id) -> the expert's parameters, for sample-level and token-level layers."""
    groups = {}
    if model.experts is not None:
        for expert_id, expert in enumerate(model.experts):
            groups[("router", expert_id)] = list(expert.parameters())
    for name, layer in model.token_moe_layers():
        for expert_id, expert in enumerate(layer.experts):
            groups[(name, expert_id)] = list(expert.parameters())
    return groups


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_gradients_reach_router_and_exactly_the_chosen_experts(architecture):
    model = build_model("debug", architecture=architecture, num_experts=16, top_k=1)
    batch = token_batch(2, 3, 2) if architecture == "token_ffn" else token_batch(1, 8, 4)
    output = model(*batch[:2], labels=batch[2])
    output.loss.backward()
    chosen = {(record.layer, int(e)) for record in output.routing for e in record.routing.expert_indices.reshape(-1)}
    for key, parameters in _expert_parameters(model).items():
        has_gradient = any(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)
        assert has_gradient == (key in chosen), key
    assert len(chosen) < 16 * len(output.routing)  # some experts were left out, so the check bites
    routers = [model.router] if model.router is not None else [layer.router for _, layer in model.token_moe_layers()]
    for router in routers:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())


def _rows_seen(model):
    """(layer name, expert id) -> the row counts the expert was called with, by forward hooks (on an expert
    encoder's first block: the encoder stack itself takes its rows by keyword)."""
    seen, hooks = {}, []
    for key in _expert_parameters(model):
        expert = _expert_module(model, key)
        first = expert.encoder.block[0] if hasattr(expert, "encoder") else expert
        seen[key] = []
        hooks.append(first.register_forward_hook(lambda m, args, out, key=key: seen[key].append(args[0].shape[0])))
    return seen, hooks


def _expert_module(model, key):
    layer, expert_id = key
    if layer == "router":
        return model.experts[expert_id]
    return dict(model.token_moe_layers())[layer].experts[expert_id]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_training_runs_every_expert_and_unreached_ones_get_zero_gradients(architecture):
    """In a training step an expert no row was routed to runs on zero rows, so it has a gradient, all zeros
    (what DDP, FSDP and expert parallel need: the same gradients on every rank); the loss is the one the
    same model computes without recording gradients, where unreached experts do not run at all."""
    torch.manual_seed(0)
    model = build_model("debug", architecture=architecture, num_experts=16, top_k=1).train()
    for module in model.modules():  # no dropout, so the two forwards below compute the same thing
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):  # T5 attention's dropout rate
            module.dropout = 0.0
    batch = token_batch(2, 3, 2) if architecture == "token_ffn" else token_batch(1, 8, 4)
    seen, hooks = _rows_seen(model)
    with torch.no_grad():
        inference = model(*batch[:2], labels=batch[2])
    skipped = {key: list(rows) for key, rows in seen.items()}
    for rows in seen.values():
        rows.clear()
    output = model(*batch[:2], labels=batch[2])
    output.loss.backward()
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(output.loss, inference.loss)
    torch.testing.assert_close(output.logits, inference.logits)
    chosen = {(record.layer, int(e)) for record in output.routing for e in record.routing.expert_indices.reshape(-1)}
    assert len(chosen) < len(seen)  # some experts were left out, so the check bites
    for key, parameters in _expert_parameters(model).items():
        if key in chosen:
            assert all(rows > 0 for rows in seen[key]) and skipped[key], key
            assert any(p.grad.abs().sum() > 0 for p in parameters), key
        else:
            assert skipped[key] == [] and seen[key] and all(rows == 0 for rows in seen[key]), key
            assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in parameters), key
    # Evaluation with gradients on (eval mode) skips them too: only a training step runs every expert.
    model.eval()
    seen, hooks = _rows_seen(model)
    model(*batch[:2], labels=batch[2])
    for hook in hooks:
        hook.remove()
    assert all(seen[key] == [] for key in seen if key not in chosen)


def test_balance_loss_is_one_for_uniform_routing():
    experts, rows = 4, 8
    probs = torch.full((rows, experts), 1 / experts)
    indices = torch.arange(rows).remainder(experts).unsqueeze(1)  # each expert gets 2 of 8 slots
    routing = RoutingDecision(indices, torch.ones(rows, 1), probs)
    assert LoadBalancingLoss(experts)(routing).item() == pytest.approx(1.0)


def test_balance_loss_is_num_experts_for_collapsed_routing():
    experts, rows = 4, 8
    probs = torch.zeros(rows, experts)
    probs[:, 0] = 1.0
    routing = RoutingDecision(torch.zeros(rows, 1, dtype=torch.long), torch.ones(rows, 1), probs)
    # f = (1, 0, 0, 0), P̄ = (1, 0, 0, 0): E · 1 · 1
    assert LoadBalancingLoss(experts)(routing).item() == pytest.approx(4.0)


def test_balance_loss_with_two_slots_hand_case():
    # E = 4, K = 2, two rows both choosing experts 0 and 1: f = (½, ½, 0, 0); P̄ = (0.4, 0.3, 0.2, 0.1).
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    routing = RoutingDecision(torch.tensor([[0, 1], [0, 1]]), torch.full((2, 2), 0.5), probs)
    assert LoadBalancingLoss(4)(routing).item() == pytest.approx(4 * (0.5 * 0.4 + 0.5 * 0.3))


@pytest.mark.parametrize("architecture", ["shared_then_expert", "expert_only"])
def test_router_pooling_ignores_left_padding(architecture):
    model = build_model("debug", architecture=architecture, num_experts=8).eval()
    series = torch.randn(1, 30).cumsum(-1)
    padded = torch.cat([torch.full((1, 7), float("nan")), series], dim=1)
    tokenizer = model.tokenizer()
    decisions = []
    for context in (series, padded):
        input_ids, attention_mask, _ = tokenizer.context_input_transform(context)
        with torch.no_grad():
            decisions.append(model._encode(input_ids, attention_mask)[1])
    assert torch.equal(decisions[0].expert_indices, decisions[1].expert_indices)
    torch.testing.assert_close(decisions[0].router_probs, decisions[1].router_probs)


def test_expert_capacity_drops_overflow_tokens_and_large_capacity_drops_none():
    torch.manual_seed(3)
    free = build_model("debug", architecture="token_ffn", num_experts=4, top_k=1).eval()
    roomy = build_model("debug", architecture="token_ffn", num_experts=4, top_k=1, expert_capacity=4.0).eval()
    tight = build_model("debug", architecture="token_ffn", num_experts=4, top_k=1, expert_capacity=0.25).eval()
    roomy.load_state_dict(free.state_dict())
    tight.load_state_dict(free.state_dict())
    input_ids, attention_mask, labels = token_batch(2, 16, 5)
    reference = free(input_ids, attention_mask, labels=labels).logits
    # capacity 4·tokens·1/4 = tokens: no expert can overflow.
    torch.testing.assert_close(roomy(input_ids, attention_mask, labels=labels).logits, reference)
    assert not torch.allclose(tight(input_ids, attention_mask, labels=labels).logits, reference)


def test_usage_counts_and_entropy():
    model = build_model("debug", architecture="token_ffn", num_experts=4)
    output = model(*token_batch(2, 10, 4)[:2], labels=token_batch(2, 10, 4)[2])
    record = output.routing[0]
    counts = record.usage_counts(4)
    assert counts.sum().item() == record.routing.expert_indices.numel()
    assert 0 <= record.usage_entropy(4) <= math.log(4) + 1e-9
