"""Analytic parameter counts: hand derivations from architecture.md, and equality with the real modules
built on the meta device for every preset × architecture × E."""

import pytest

from model.config import ARCHITECTURES, make_config
from model.presets import PRESETS
from model.components import COMPONENTS, component_of_param
from planner.params import ParamBreakdown, count_params

# tiny: D 256, F 1024, H 4 × Dk 64 (A 256), 4 + 4 blocks, V 4096.
TINY_EMBEDDING = 4096 * 256
TINY_ATTENTION = 4 * 256 * 256  # q, k, v, o
TINY_FFN = 2 * 256 * 1024  # wi, wo
TINY_ENCODER_STACK = 4 * (TINY_ATTENTION + TINY_FFN + 2 * 256) + 256 + 32 * 4  # blocks, final norm, bias
TINY_DECODER_STACK = 4 * (2 * TINY_ATTENTION + TINY_FFN + 3 * 256) + 256 + 32 * 4
TINY_EXPERT_HEAD = (256 * 1024 + 1024) + (1024 * 256 + 256) + 2 * 256 + 256 * 4096  # fc1, fc2, LayerNorm, lm_head


def test_count_params_tiny_dense_is_hand_derived():
    assert TINY_EMBEDDING + TINY_ENCODER_STACK + TINY_DECODER_STACK == 8_394_496
    assert count_params(make_config("tiny")).total_params == 8_394_496


def test_count_params_mini_attention_is_wider_than_d_model():
    # mini: 8 heads × 64 = 512 attention width over d_model 384.
    params = count_params(make_config("mini"))
    assert params.encoder_attention_params == 4 * (4 * 384 * 512)
    assert params.decoder_cross_attention_params == 4 * (4 * 384 * 512)


def test_count_params_shared_then_expert_router_and_heads():
    params = count_params(make_config("tiny", architecture="shared_then_expert", num_experts=8, top_k=2))
    assert params.router_params == 256 * 256 + 256 + 256 * 8 + 8  # 67,848
    assert params.expert_head_params == 8 * TINY_EXPERT_HEAD
    assert params.total_params == 8_394_496 + 67_848 + 8 * TINY_EXPERT_HEAD
    assert params.active_params == params.total_params - 6 * TINY_EXPERT_HEAD


def test_count_params_expert_only_replaces_the_encoder():
    params = count_params(make_config("tiny", architecture="expert_only", num_experts=4, top_k=1))
    expert = (TINY_ENCODER_STACK) + 256 * 4096  # encoder copy + own LM head
    assert params.encoder_attention_params == params.encoder_ffn_params == params.encoder_norm_params == 0
    assert params.expert_encoder_params == 4 * TINY_ENCODER_STACK
    assert params.total_params == TINY_EMBEDDING + TINY_DECODER_STACK + (256 * 256 + 256 + 256 * 4 + 4) + 4 * expert
    assert params.active_params == params.total_params - 3 * expert


def test_count_params_token_ffn_odd_blocks_hold_the_experts():
    params = count_params(make_config("tiny", architecture="token_ffn", num_experts=4, top_k=2))
    moe_blocks = 2 + 2  # blocks 1 and 3 of each stack
    assert params.router_params == moe_blocks * 256 * 4
    assert params.expert_ffn_params == moe_blocks * 4 * TINY_FFN
    assert params.encoder_ffn_params == 2 * TINY_FFN
    assert params.active_params == params.total_params - moe_blocks * 2 * TINY_FFN


def test_component_patterns_cover_every_component():
    assert [f"{c}_params" for c in COMPONENTS] == list(ParamBreakdown.__dataclass_fields__)[: len(COMPONENTS)]
    names = {
        "backbone.shared.weight": "embedding",
        "backbone.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "encoder_position_bias",
        "backbone.decoder.block.2.layer.1.EncDecAttention.k.weight": "decoder_cross_attention",
        "backbone.decoder.block.1.layer.2.DenseReluDense.experts.3.wi.weight": "expert_ffn",
        "backbone.encoder.block.1.layer.1.DenseReluDense.router.weight": "router",
        "experts.5.encoder.block.0.layer.0.SelfAttention.q.weight": "expert_encoder",
        "experts.5.fc1.bias": "expert_head",
        "router.output.weight": "router",
        "something.else": None,
    }
    for name, component in names.items():
        assert component_of_param(name) == component, name


@pytest.mark.parametrize("size", list(PRESETS))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_count_params_equals_meta_modules(size, architecture):
    from planner.measure import measure_params

    for num_experts in (0, 4, 8, 16):
        if num_experts == 0 and architecture != ARCHITECTURES[0]:
            continue  # the dense model is one model, checked once
        config = make_config(size, architecture=architecture, num_experts=num_experts)
        analytic = count_params(config)
        measured, one_expert = measure_params(config)
        expected = {c: n for c, n in analytic.components().items() if n}
        assert measured == expected, (size, architecture, num_experts)
        assert one_expert == analytic.params_per_expert


@pytest.mark.parametrize("size", ["debug", "tiny"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("num_experts", [0, 4])
def test_parameter_tensors_are_the_built_models_in_registration_order(size, architecture, num_experts):
    from model import build_model
    from planner.params import parameter_tensors

    model = build_model(size, device="meta", architecture=architecture, num_experts=num_experts)
    expected = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert [(t.name, t.shape) for t in parameter_tensors(model.config)] == expected
    assert sum(t.numel for t in parameter_tensors(model.config)) == count_params(model.config).total_params


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_parameter_tensors_of_the_larger_sizes(size):
    from model import build_model
    from planner.params import parameter_tensors

    for architecture in ARCHITECTURES:
        model = build_model(size, device="meta", architecture=architecture, num_experts=8)
        expected = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
        assert [(t.name, t.shape) for t in parameter_tensors(model.config)] == expected, architecture


def test_a_parameter_tensor_knows_its_component_and_expert():
    from planner.params import parameter_tensors

    tensors = {t.name: t for t in parameter_tensors(make_config("debug", architecture="token_ffn", num_experts=4))}
    expert = tensors["backbone.decoder.block.1.layer.2.DenseReluDense.experts.3.wo.weight"]
    assert (expert.component, expert.expert, expert.shape, expert.numel) == ("expert_ffn", 3, (64, 256), 64 * 256)
    router = tensors["backbone.encoder.block.1.layer.1.DenseReluDense.router.weight"]
    assert (router.component, router.expert) == ("router", None)
