"""Gradient reachability: a regime whose trainable parameters the loss cannot move is named (architecture.md §6)."""

import pytest
import torch
from torch import nn

import planner.gradients as gradients
from model import make_config
from planner.gradients import check_reachability
from planner.verify import verify_reachability


@pytest.mark.parametrize("moe,regime", [
    ({}, "all"), ({}, "decoder_ffn"), ({}, "encoder_position_bias"),
    (dict(architecture="shared_then_expert", num_experts=8), "experts_and_router"),
    (dict(architecture="shared_then_expert", num_experts=8), "router"),
    (dict(architecture="expert_only", num_experts=16, top_k=4), "experts"),
    (dict(architecture="token_ffn", num_experts=16), "router"),
    (dict(architecture="token_ffn", num_experts=1024), "experts_and_router"),
])
def test_every_regime_of_the_family_reaches_its_parameters(moe, regime):
    reach = check_reachability(make_config("base", **moe), regime)
    assert reach.ok, reach.summary()
    assert reach.reached_params == reach.trainable_params > 0


def test_a_top_1_router_without_balance_loss_never_learns():
    """With K = 1 the renormalised weight is p / p = 1 whatever the router says, and with no balance loss
    nothing else reads its probabilities: the gradient is zero, so the router cannot train."""
    config = make_config("tiny", architecture="shared_then_expert", num_experts=8, top_k=1, load_balancing_weight=0.0)
    reach = check_reachability(config, "experts_and_router")
    assert not reach.ok
    assert set(reach.zero_gradient) == {"router.hidden.weight", "router.hidden.bias", "router.output.weight",
                                        "router.output.bias"}
    assert "cannot train: the gradient is zero for router.hidden.weight" in reach.summary()
    with_balance = make_config("tiny", architecture="shared_then_expert", num_experts=8, top_k=1)
    assert check_reachability(with_balance, "experts_and_router").ok  # the balance loss moves it


def test_a_parameter_off_the_loss_path_is_named(monkeypatch):
    """An expert parameter no forward reads (as when experts sit where no gradient flows) gets no gradient."""
    build = gradients.build_model_from_config

    def with_a_stray_parameter(config, **options):
        model = build(config, **options)
        model.experts[0].stray = nn.Parameter(torch.zeros(3))
        return model

    monkeypatch.setattr(gradients, "build_model_from_config", with_a_stray_parameter)
    reach = check_reachability(make_config("debug", architecture="shared_then_expert", num_experts=4), "experts")
    assert reach.unreached == ("experts.0.stray",)
    assert reach.reached_params == reach.trainable_params - 3
    assert reach.summary().startswith("trainable experts cannot train: no gradient reaches experts.0.stray")


def test_verify_reports_reachability_as_a_check():
    config = make_config("tiny", architecture="shared_then_expert", num_experts=4, top_k=1, load_balancing_weight=0.0)
    check = verify_reachability("tiny", config, "router")
    assert (check.quantity, check.ok) == ("trainable_params_reached", False)
    assert "the gradient is zero for router" in check.reason
    assert verify_reachability("tiny", make_config("tiny"), "all").ok
