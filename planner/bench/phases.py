"""The work of one benchmark step, as phases the roofline prices: FLOPs from the planner, bytes moved.

Phases per mode (B series, S encoder and T decoder tokens, P prediction steps, N sample paths):
- forward: `encode` (encoder or expert encoders, router) and `decode` (teacher-forced decoder and heads);
- forecast: `encode` once, then P × `decode step` on B·N rows (their mean FLOPs and cache reads);
- train: the forward's phases, `backward` (2 × the forward's FLOPs), `optimizer` (AdamW, memory-bound).

Bytes a phase moves, a deliberate lower bound: the weights it reads (only the experts the batch routes to
with sparse dispatch: at most min(E, rows·K) of them), the KV cache a decoding step reads, and the phase's
output (encoder states or logits). Activations that stay in cache between kernels are not charged.
The backward reads the weights and writes their gradients; AdamW reads weights, gradients and two moments
and writes weights and moments (7 fp32 words per parameter it updates: experts nobody chose have no gradient
and are skipped).
"""

from __future__ import annotations

from model.config import ChronosMoEConfig
from planner.bench.roofline import DeviceRoofline, Phase, estimate_time_s
from planner.bench.spec import BenchSpec
from planner.flops import count_encoding_flops, count_flops
from planner.params import (
    count_encoder_stack_params,
    count_expert_head_params,
    count_ffn_params,
    count_params,
    count_token_router_params,
)
from planner.workload import DTYPE_BYTES, Workload

FP32_BYTES = 4
ADAMW_WORDS_PER_PARAM = 7  # reads weight, gradient, two moments; writes weight, two moments


def count_running_experts(config: ChronosMoEConfig, routed_rows: int) -> int:
    """Experts that run on `routed_rows` rows (series or tokens): all E with dense dispatch, else at most
    min(E, rows·K) (an upper bound: rows may share experts)."""
    if config.dispatch == "dense":
        return config.num_experts
    return min(config.num_experts, routed_rows * config.top_k)


def count_encode_params(config: ChronosMoEConfig, batch: int, encoder_tokens: int) -> int:
    """Parameters the encoding reads for `batch` series of S tokens (the embedding is only gathered)."""
    params, dims = count_params(config), config.dims
    shared = (params.encoder_attention_params + params.encoder_ffn_params + params.encoder_norm_params
              + params.encoder_position_bias_params)  # 0 for expert_only
    if not config.is_moe:
        return shared
    if config.architecture == "expert_only":
        return params.router_params + count_running_experts(config, batch) * count_encoder_stack_params(dims)
    if config.architecture == "shared_then_expert":
        return shared + params.router_params
    running = count_running_experts(config, batch * encoder_tokens)
    blocks = len(config.token_moe_encoder_blocks)
    return shared + blocks * (count_token_router_params(config) + running * count_ffn_params(dims))


def _decoder_stack_params(config: ChronosMoEConfig) -> int:
    """The shared decoder's blocks (dense FFNs only), norms and position bias."""
    params = count_params(config)
    return (params.decoder_self_attention_params + params.decoder_cross_attention_params
            + params.decoder_ffn_params + params.decoder_norm_params + params.decoder_position_bias_params)


def count_decode_params(config: ChronosMoEConfig, batch: int, decoder_tokens_per_call: int) -> int:
    """Parameters one decoder call reads: the decoder, its token experts, and the LM head or expert heads.

    `decoder_tokens_per_call` is B·T teacher-forced, or B·N in a decoding step (one token per row).
    """
    dims = config.dims
    stack = _decoder_stack_params(config)
    lm_head = dims.vocab_size * dims.d_model
    if not config.is_moe:
        return stack + lm_head
    if config.architecture == "token_ffn":
        running = count_running_experts(config, decoder_tokens_per_call)
        blocks = len(config.token_moe_decoder_blocks)
        return stack + lm_head + blocks * (count_token_router_params(config) + running * count_ffn_params(dims))
    per_head = count_expert_head_params(config) if config.architecture == "shared_then_expert" else lm_head
    return stack + count_running_experts(config, batch) * per_head


def _forward_phases(config: ChronosMoEConfig, workload: Workload, act_bytes: int, weight_bytes: int) -> list[Phase]:
    b, s, t = workload.batch_size, workload.encoder_tokens, workload.decoder_tokens
    encode_flops = count_encoding_flops(config, b, s).total_flops
    forward_flops = count_flops(config, workload).forward_flops
    dims = config.dims
    return [
        Phase("encode", encode_flops, count_encode_params(config, b, s) * weight_bytes + b * s * dims.d_model * act_bytes),
        Phase("decode", forward_flops - encode_flops,
              count_decode_params(config, b, b * t) * weight_bytes + b * t * dims.vocab_size * act_bytes),
    ]


def _forecast_phases(config: ChronosMoEConfig, workload: Workload, element_bytes: int) -> list[Phase]:
    b, s, p = workload.batch_size, workload.encoder_tokens, workload.prediction_length
    rows, dims = b * workload.num_samples, config.dims
    encode_flops = count_encoding_flops(config, b, s).total_flops
    step_flops = (count_flops(config, workload).forecast_flops - encode_flops) // p
    mean_cached_tokens = s + (p + 1) / 2  # cross-attention over S, self-attention over the steps so far
    cache_bytes = int(dims.num_decoder_layers * 2 * dims.attention_width * element_bytes * mean_cached_tokens * rows)
    step_bytes = count_decode_params(config, b, rows) * element_bytes + cache_bytes + rows * dims.vocab_size * element_bytes
    return [
        Phase("encode", encode_flops, count_encode_params(config, b, s) * element_bytes + b * s * dims.d_model * element_bytes),
        Phase("decode step", step_flops, step_bytes, count=p),
    ]


def estimate_phases(spec: BenchSpec) -> list[Phase]:
    """The phases of one measured step of `spec` (see the module docstring)."""
    config, workload = spec.model_config(), spec.workload()
    element_bytes = DTYPE_BYTES[spec.dtype]
    if spec.mode == "forecast":
        return _forecast_phases(config, workload, element_bytes)
    if spec.mode == "forward":
        return _forward_phases(config, workload, element_bytes, element_bytes)
    # Training keeps fp32 weights (AMP's master copy in half precision); activations take the dtype.
    forward = _forward_phases(config, workload, element_bytes, FP32_BYTES)
    b = workload.batch_size
    updated_params = (count_encode_params(config, b, workload.encoder_tokens)
                      + count_decode_params(config, b, b * workload.decoder_tokens)
                      + (0 if not config.is_moe or config.architecture == "token_ffn"
                         else config.dims.vocab_size * config.dims.d_model))  # the embedding, only gathered
    backward = Phase("backward", 2 * sum(phase.flops for phase in forward), 2 * updated_params * FP32_BYTES)
    optimizer = Phase("optimizer", 0, ADAMW_WORDS_PER_PARAM * updated_params * FP32_BYTES)
    return [*forward, backward, optimizer]


def count_step_flops(spec: BenchSpec) -> int:
    """The planner's FLOPs of one measured step (forward, forecast, or training step = 3 × forward)."""
    flops = count_flops(spec.model_config(), spec.workload())
    return {"forward": flops.forward_flops, "forecast": flops.forecast_flops, "train": flops.train_flops}[spec.mode]


def count_step_tokens(spec: BenchSpec) -> int:
    """Tokens one step handles: B·(S + T) encoder and decoder positions, or B·N·P sampled in a forecast."""
    workload = spec.workload()
    if spec.mode == "forecast":
        return workload.batch_size * workload.num_samples * workload.prediction_length
    return workload.batch_size * (workload.encoder_tokens + workload.decoder_tokens)


def estimate_step_time_s(spec: BenchSpec, roofline: DeviceRoofline) -> float:
    """The roofline's time for one step of `spec`, with this device's probe or a preset for another device."""
    return estimate_time_s(estimate_phases(spec), roofline)
