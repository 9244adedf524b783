"""Memory: weights, training state, KV cache and forecast totals, by hand and against a real forecast's cache."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import model.chronos_moe as chronos_moe
from model import build_model, make_config
from planner.memory import (
    estimate_kv_cache_bytes,
    estimate_largest_forecast_activation_bytes,
    estimate_memory,
    estimate_weights_memory,
    WeightsMemory,
)
from planner.params import count_params
from planner.workload import OPTIMIZERS, PRECISION_REGIMES, Workload

from .conftest import ARCHITECTURES

TINY_DENSE_PARAMS = 8_394_496  # hand-derived in test_model_build


def test_weights_memory_hand_derived():
    weights = estimate_weights_memory(TINY_DENSE_PARAMS)
    assert weights.fp32_bytes == 4 * 8_394_496 == 33_577_984
    assert weights.fp16_bytes == weights.bf16_bytes == 2 * 8_394_496
    assert weights.int8_bytes == 8_394_496
    # estimate_memory counts tiny's parameters itself: the same bytes, against the hand-derived count.
    assert estimate_memory(make_config("tiny")).weights == WeightsMemory(
        fp32_bytes=33_577_984, fp16_bytes=16_788_992, bf16_bytes=16_788_992, int8_bytes=8_394_496)


@pytest.mark.parametrize("dtype, bytes_per_param", [("fp32", 4), ("fp16", 2), ("bf16", 2), ("int8", 1)])
def test_forecast_weights_are_stored_in_the_workload_dtype(dtype, bytes_per_param):
    forecast = estimate_memory(make_config("tiny"), Workload(dtype=dtype)).forecast
    assert forecast.weights_bytes == bytes_per_param * TINY_DENSE_PARAMS


@pytest.mark.parametrize(
    "precision, optimizer, weight_bytes, gradient_bytes, moment_bytes",
    [
        ("fp32", "adamw", 4, 4, 8),  # two fp32 moments
        ("fp32", "adam", 4, 4, 8),
        ("amp_bf16", "adamw", 4, 4, 8),  # fp32 master weights and gradients: only activations shrink
        ("amp_fp16", "adamw", 4, 4, 8),
        ("bf16", "adamw", 2, 2, 8),  # fp32 moments
        ("fp32", "sgd_momentum", 4, 4, 4),  # one fp32 momentum
        ("bf16", "sgd_momentum", 2, 2, 4),
        ("fp32", "adamw_8bit", 4, 4, 2),  # two one-byte moments
    ],
)
def test_training_state_bytes_per_parameter(precision, optimizer, weight_bytes, gradient_bytes, moment_bytes):
    config = make_config("tiny")
    workload = Workload(precision=precision, optimizer=optimizer)
    training = estimate_memory(config, workload).training
    # Each part on its own, so a byte moved from one to another is caught (activations: against saved
    # tensors in test_activations).
    assert training.weights_bytes == weight_bytes * TINY_DENSE_PARAMS
    assert training.gradients_bytes == gradient_bytes * TINY_DENSE_PARAMS
    assert training.optimizer_states_bytes == moment_bytes * TINY_DENSE_PARAMS


def test_kv_cache_hand_derived():
    # tiny: Ld 4 blocks × keys and values × A 256 × 4 bytes × (S 513 + P 64) tokens × N 20 paths × B 1.
    self_cache, cross_cache = estimate_kv_cache_bytes(make_config("tiny"), Workload())
    assert self_cache == 4 * 2 * 256 * 4 * 64 * 20
    assert cross_cache == 4 * 2 * 256 * 4 * 513 * 20
    assert self_cache + cross_cache == 94_535_680


def test_kv_cache_of_large_is_about_two_gib_per_series():
    # conventions.md: large in fp32 at N = 20 keeps about 2 GiB of cross-attention cache per series.
    _, cross_cache = estimate_kv_cache_bytes(make_config("large"), Workload())
    assert cross_cache == 24 * 2 * 1024 * 4 * 513 * 20 == 2_017_198_080  # 1.88 GiB


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_kv_cache_int8_weights_cache_in_fp16(dtype):
    # int8 weights compute in fp16: 2 bytes an element, as fp16. tiny: Ld 4 × k and v × A 256 × (P 64 | S 513) × N 20.
    assert estimate_kv_cache_bytes(make_config("tiny"), Workload(dtype=dtype)) == (
        4 * 2 * 256 * 2 * 64 * 20, 4 * 2 * 256 * 2 * 513 * 20)


@pytest.mark.parametrize("architecture, num_experts", [("shared_then_expert", 0), *((a, 4) for a in ARCHITECTURES)])
def test_kv_cache_matches_a_real_forecast(monkeypatch, architecture, num_experts):
    # mini's attention width (8·64 = 512) differs from its d_model (384): the cache must use H·Dk.
    caches = []

    class RecordingCache(chronos_moe.EncoderDecoderCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(chronos_moe, "EncoderDecoderCache", RecordingCache)
    workload = Workload(batch_size=2, context_length=12, prediction_length=5, num_samples=3)
    model = build_model("mini", architecture=architecture, num_experts=num_experts).eval()
    input_ids = torch.randint(2, 4096, (workload.batch_size, workload.encoder_tokens))
    model.sample_tokens(input_ids, torch.ones_like(input_ids), workload.prediction_length, workload.num_samples)

    def cache_bytes(cache):
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    measured = (cache_bytes(caches[0].self_attention_cache), cache_bytes(caches[0].cross_attention_cache))
    config = make_config("mini", architecture=architecture, num_experts=num_experts)
    assert estimate_kv_cache_bytes(config, workload) == measured


def test_largest_forecast_activation_hand_derived():
    # tiny fp32, one series: the encoder's attention dominates: position bias, scores, softmax (B·H·S·S).
    attention = 1 * 4 * 513 * 513 * (4 + 4 + 4)
    ffn = 1 * 513 * 1024 * 2 * 4
    sampling = 20 * 4096 * (4 + 4 + 4 + 1)
    assert estimate_largest_forecast_activation_bytes(make_config("tiny"), Workload()) == max(attention, ffn, sampling)
    assert max(attention, ffn, sampling) == attention == 12_632_112


def test_forecast_total_hand_derived():
    """Every term derived apart from the planner: weights by instantiating the model (meta device), the rest
    from small's dimensions (Ld 6, A 8·64 = 512, D 512, H 8) at S 513, P 64, N 20, one series, fp32."""
    forecast = estimate_memory(make_config("small", architecture="token_ffn", num_experts=8)).forecast
    model = build_model("small", architecture="token_ffn", num_experts=8, device="meta")
    weights = 4 * sum(parameter.numel() for parameter in model.parameters())  # the tied embedding once
    caches = 6 * 2 * 512 * 4 * (64 + 513) * 20  # Ld × keys and values × A × 4 bytes × (P self + S cross) × N
    encoder_output = 20 * 513 * 512 * 4  # repeated per sample path: N × S × D × 4 bytes
    largest = 8 * 513 * 513 * (4 + 4 + 4)  # the encoder's attention: position bias, scores, softmax (H·S·S)
    assert largest > 513 * 2048 * 2 * 4 and largest > 20 * 4096 * (4 + 4 + 4 + 1)  # not the FFN, not sampling
    assert forecast.total_bytes == weights + caches + encoder_output + largest


def test_active_experts_what_if_hand_derived():
    """tiny shared_then_expert, E 8, K 2, one series at S 513, P 64, N 20, fp32: two expert heads of eight
    stay resident in the what-if. Weights by instantiating the model; the rest from tiny's dimensions."""
    config = make_config("tiny", num_experts=8)
    model = build_model("tiny", num_experts=8, device="meta")
    weights = 4 * sum(parameter.numel() for parameter in model.parameters())
    # One expert head: fc1 (256·1024 + 1024) + fc2 (1024·256 + 256) + LayerNorm 2·256 + lm_head 256·4096.
    per_expert = (256 * 1024 + 1024) + (1024 * 256 + 256) + 2 * 256 + 256 * 4096
    assert per_expert == sum(parameter.numel() for parameter in model.experts[0].parameters())
    caches = 4 * 2 * 256 * 4 * (64 + 513) * 20  # Ld × keys and values × A × 4 bytes × (P + S) × N
    encoder_output = 20 * 513 * 256 * 4  # N × S × D × 4 bytes
    largest = 4 * 513 * 513 * (4 + 4 + 4)  # encoder attention H·S·S: above the FFN 513·1024·8 and sampling 20·4096·13
    forecast = estimate_memory(config).forecast
    assert forecast.weights_bytes == weights
    assert forecast.active_experts_weights_bytes == weights - 6 * per_expert * 4  # 6 idle heads
    assert forecast.what_if_active_experts_total_bytes == weights - 6 * per_expert * 4 + caches + encoder_output + largest


def test_active_experts_what_if_saves_nothing_for_token_routing():
    # 513 tokens × K 2 routing slots per MoE block reach every one of the 8 experts: all stay resident.
    forecast = estimate_memory(make_config("tiny", architecture="token_ffn", num_experts=8)).forecast
    weights = 4 * sum(p.numel() for p in build_model("tiny", architecture="token_ffn", num_experts=8,
                                                     device="meta").parameters())
    assert forecast.active_experts_weights_bytes == forecast.weights_bytes == weights


def test_estimate_memory_accepts_only_its_own_params():
    config = make_config("mini", architecture="expert_only", num_experts=4)
    weights = 4 * sum(p.numel() for p in build_model("mini", architecture="expert_only", num_experts=4,
                                                     device="meta").parameters())
    assert estimate_memory(config, params=count_params(config)).weights.fp32_bytes == weights
    with pytest.raises(ValueError, match="params"):  # another config's counts would size the wrong model
        estimate_memory(config, params=count_params(make_config("mini")))


@settings(max_examples=40, deadline=None)
@given(
    size=st.sampled_from(["debug", "tiny", "mini", "small", "base", "large"]),
    architecture=st.sampled_from(["dense", *ARCHITECTURES]),
    num_experts=st.sampled_from([1, 4, 8, 16]),
    batch=st.integers(1, 64),
    context=st.integers(1, 4096),
    prediction=st.integers(1, 512),
    samples=st.integers(1, 100),
    dtype=st.sampled_from(["fp32", "fp16", "bf16", "int8"]),
    precision=st.sampled_from(PRECISION_REGIMES),
    optimizer=st.sampled_from(OPTIMIZERS),
)
def test_memory_properties(size, architecture, num_experts, batch, context, prediction, samples, dtype,
                           precision, optimizer):
    moe = {} if architecture == "dense" else dict(architecture=architecture, num_experts=num_experts, top_k=1)
    config = make_config(size, **moe)
    workload = Workload(batch_size=batch, context_length=context, prediction_length=prediction,
                        num_samples=samples, dtype=dtype, precision=precision, optimizer=optimizer)
    memory = estimate_memory(config, workload)
    assert memory.forecast.active_experts_weights_bytes <= memory.forecast.weights_bytes
    # More series: more activations and cache, the same weights; more sample paths: a forecast never shrinks.
    larger = estimate_memory(config, dataclasses.replace(workload, batch_size=batch + 1))
    assert larger.training.total_bytes > memory.training.total_bytes
    assert larger.forecast.total_bytes > memory.forecast.total_bytes
    assert (larger.weights, larger.training.weights_bytes) == (memory.weights, memory.training.weights_bytes)
    more_paths = estimate_memory(config, dataclasses.replace(workload, num_samples=samples + 1))
    assert more_paths.forecast.total_bytes > memory.forecast.total_bytes
    # The KV cache grows linearly with sample paths and with series.
    kv = sum(estimate_kv_cache_bytes(config, workload))
    assert sum(estimate_kv_cache_bytes(config, dataclasses.replace(workload, num_samples=2 * samples))) == 2 * kv
    assert sum(estimate_kv_cache_bytes(config, dataclasses.replace(workload, batch_size=3 * batch))) == 3 * kv


def test_dense_dispatch_keeps_every_expert_resident_in_the_active_experts_what_if():
    """Dense dispatch runs every expert on every series, so paging experts in saves nothing: the what-if's
    weights are all the parameters, counted on the built model."""
    from model import build_model

    config = make_config("tiny", architecture="shared_then_expert", num_experts=8, dispatch="dense")
    forecast = estimate_memory(config, Workload(batch_size=1)).forecast
    every = sum(p.numel() for p in build_model("tiny", device="meta", architecture="shared_then_expert",
                                               num_experts=8).parameters())
    assert forecast.active_experts_weights_bytes == 4 * every


def test_the_probes_high_water_mark_restarts_with_its_baseline_kept():
    """A step's own peak: after 200 MB were touched and freed, restarting the CPU probe's high-water mark drops
    its peak to what is resident now; touching 100 MB then reads ~100 MB above the same baseline."""
    import ctypes
    import gc
    import mmap

    import numpy as np

    from planner.bench.memory_probe import PeakMemoryProbe

    def touched_pages(size: int) -> mmap.mmap:
        # Its own mapping, given back to the system on close() whatever malloc's thresholds are left at by
        # earlier tests (one CI run read a freed 200 MB numpy block still resident)
        block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        np.frombuffer(block, dtype=np.uint8)[:: mmap.PAGESIZE] = 1
        return block

    # The baseline is what is resident at start: earlier tests' garbage freed after it would leave the process
    # below it, where a 100 MB block need not rise above it (one full-suite run in several read 0)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    probe = PeakMemoryProbe("cpu")
    probe.start()
    touched_pages(200 * 10**6).close()
    assert probe.peak_bytes() >= 190 * 10**6
    assert probe.restart_peak()
    assert probe.peak_bytes() < 50 * 10**6
    block = touched_pages(100 * 10**6)
    assert 90 * 10**6 <= probe.peak_bytes() < 150 * 10**6
    block.close()
