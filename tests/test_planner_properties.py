"""Properties of the analytic planner over random configurations and workloads (hypothesis)."""

import dataclasses

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from model.config import ARCHITECTURES, make_config
from model.presets import PRESETS
from planner.params import count_params
from planner.plan import plan, plan_row
from planner.workload import DTYPE_BYTES, OPTIMIZERS, PRECISION_REGIMES, Workload

custom_dims = st.fixed_dictionaries({
    "d_model": st.integers(1, 2048), "d_ff": st.integers(1, 8192), "d_kv": st.integers(1, 256),
    "num_heads": st.integers(1, 32), "num_layers": st.integers(1, 48), "num_decoder_layers": st.integers(1, 48),
})


@st.composite
def configs(draw, num_experts=st.integers(0, 64)):
    size = draw(st.sampled_from([*PRESETS, "custom"]))
    dims = draw(custom_dims) if size == "custom" else {}
    architecture = draw(st.sampled_from(ARCHITECTURES))
    experts = draw(num_experts)
    top_k = draw(st.integers(1, max(experts, 1)))
    capacity = draw(st.none() | st.floats(0.01, 8.0)) if architecture == "token_ffn" else None
    if architecture == "token_ffn" and experts and dims and max(dims["num_layers"], dims.get("num_decoder_layers", 0)) < 2:
        dims = {**dims, "num_layers": 2}  # the default MoE blocks (odd indices) need a second block somewhere
    return make_config(
        size, architecture=architecture, num_experts=experts, top_k=top_k,
        router_hidden_dim=draw(st.integers(1, 2048)), vocab_size=draw(st.integers(4, 65_536)),
        expert_capacity=capacity, dispatch=draw(st.sampled_from(["sparse", "dense"])), **dims,
    )


workloads = st.builds(
    Workload, batch_size=st.integers(1, 64), context_length=st.integers(1, 4096), prediction_length=st.integers(1, 256),
    num_samples=st.integers(1, 100), dtype=st.sampled_from(list(DTYPE_BYTES)), optimizer=st.sampled_from(OPTIMIZERS),
    precision=st.sampled_from(PRECISION_REGIMES),
)


@settings(max_examples=150, deadline=None)
@given(configs(), workloads)
def test_plan_never_raises_and_stays_consistent(config, workload):
    p = plan(config, workload)
    row = plan_row(p)
    assert 0 < row["active_params"] <= row["total_params"]
    if not config.is_moe:  # the dense model: every parameter is active, and it is its own dense baseline
        assert row["active_params"] == row["total_params"] and row["params_increase_over_dense"] == 0
    assert row["train_flops"] > row["forward_flops"] > 0 and row["forecast_flops"] > 0
    assert row["train_memory_bytes"] > row["train_weights_bytes"] >= row["total_params"] * 2
    # Stored weights lie between int8 and fp32 (the per-dtype bytes are hand-derived in test_memory).
    assert row["weights_int8_bytes"] <= row["forecast_weights_bytes"] <= row["weights_fp32_bytes"]
    assert row["forecast_memory_bytes"] > row["forecast_weights_bytes"]


@settings(max_examples=100, deadline=None)
@given(configs(num_experts=st.integers(1, 63)))
def test_total_params_grow_with_experts(config):
    # token_ffn puts experts in every second block: a one-block stack has none, and nothing to grow.
    assume(config.architecture != "token_ffn" or config.token_moe_encoder_blocks or config.token_moe_decoder_blocks)
    more = dataclasses.replace(config, num_experts=config.num_experts + 1)
    assert count_params(more).total_params > count_params(config).total_params


@settings(max_examples=100, deadline=None)
@given(configs(num_experts=st.integers(1, 63)).filter(lambda c: c.architecture != "token_ffn"))
def test_sample_level_active_params_grow_only_by_the_router(config):
    # K experts stay active whatever E is; one more expert adds one router output row (R weights) and its bias.
    more = dataclasses.replace(config, num_experts=config.num_experts + 1)
    assert count_params(more).active_params - count_params(config).active_params == config.router_hidden_dim + 1


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts=-1), "num_experts"),
    (dict(num_experts=4, top_k=5), "top_k"),
    (dict(num_experts=4, top_k=0), "top_k"),
    (dict(num_experts=4, router_hidden_dim=0), "router_hidden_dim"),
    (dict(vocab_size=3), "vocab_size"),
    (dict(architecture="moe"), "architecture"),
    (dict(dispatch="all"), "dispatch"),
    (dict(num_experts=4, expert_capacity=1.0), "expert_capacity"),
    (dict(num_experts=4, architecture="token_ffn", expert_capacity=0.0), "expert_capacity"),
    (dict(d_model=0), "d_model"),
])
def test_invalid_configs_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_config("tiny", **kwargs)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["batch_size", "context_length", "prediction_length", "num_samples"]),
       st.one_of(st.integers(max_value=0), st.integers(min_value=10**7), st.just(1.5), st.just("8")))
def test_invalid_workloads_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Workload(**{field: value})
