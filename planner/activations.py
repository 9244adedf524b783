"""Activation bytes saved for backward in one training step (conventions.md, Memory: Activations).

A teacher-forced forward with labels, `model.train()` (Chronos trains with dropout 0.1), eager attention.
The analytic count follows Korthikanti et al. 2022 (arXiv:2205.05198) per-layer bookkeeping for one stack,
adds the encoder-decoder cross-attention terms, and is written term by term from what each op of the real
modules saves (transformers' modeling_t5.py and model/):

- T5LayerNorm saves its input (and an fp32 copy when it is half), the fp32 rsqrt statistic and the
  normalised tensor; its output is saved by the linear layers that read it.
- Eager attention saves copies of q, kᵀ and v (reshaped for bmm), the fp32 softmax, the dropout mask and
  the dropped probabilities (three B·H·Lq·Lk tensors), and the input of the output projection.
- Dropout saves a mask: a bool on CUDA (native_dropout), a tensor of the data's dtype on CPU.
- Sparse dispatch saves, per routing slot, two int64 indices (the slot's place in the expert-sorted order, which
  gathers its weight, and its row, which gathers the input and adds the output back), the gathered input,
  the expert output (multiplied by its weight) and the weighted output (index_add keeps its source).
- Cross-entropy over (B·T, V) keeps the fp32 log-probabilities: often the largest single tensor.

`planner.measure.measure_saved_activation_bytes` counts what the hooks see: every distinct storage saved for backward,
once, excluding parameters and buffers (those are weights). The analytic count equals it on CPU in fp32,
pure bf16 and autocast (tests/test_activations.py); on CUDA it assumes bool dropout masks and fp32
LayerNorm statistics (what those kernels save), which no test here can measure without a GPU.

Data-dependent parts are bounded from above: the experts that run (each running expert encoder keeps its
own S×S position buckets; under AMP each keeps half copies of its weights) are taken as min(E, B·K), or
min(E, tokens·K) per token_ffn block; with a capacity factor every expert is taken as filled to capacity,
min(tokens·K, E·capacity) slots. With one series (the Chronos default) sample-level routing runs exactly
K experts, and the count is exact.

Letters: B series, S encoder tokens, T decoder tokens, D d_model, F d_ff, H heads, A = H·Dk attention
width, V vocabulary, E experts, K active experts, R router hidden width, n rows or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from model.checks import SettingError
from model.config import ChronosMoEConfig
from planner.flops import count_expert_slots
from model.presets import BackboneDims
from planner.params import (
    attention_linears,
    context_router_linears,
    count_embedding_params,
    expert_head_linears,
    ffn_linears,
    lm_head_linear,
    token_router_linear,
)
from planner.workload import PRECISION_REGIMES, Workload

INDEX_BYTES = 8  # int64: token ids, labels, position buckets, top-k indices, sorted slot order and rows
FLOAT32_BYTES = 4  # what the modules compute in fp32 on purpose: softmaxes, norm statistics, log-probs
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class ActivationWidths:
    """Bytes per saved element, by the role a tensor plays, for one precision regime on one device.

    stream: the residual stream and what T5LayerNorm saves (fp32 under AMP: fp32 + half adds promote);
    compute: matmul outputs and what follows them (half under AMP and pure bf16);
    amp: autocast, where each matmul reading an fp32 tensor keeps its own half copy of it;
    device: "cuda" or "cpu", whose kernels save dropout masks and norm statistics differently.
    """

    stream: int
    compute: int
    amp: bool
    device: str

    def mask(self, data_bytes: int) -> int:
        """Dropout mask bytes per element: CUDA's fused kernel keeps a bool, CPU keeps a scaled copy."""
        return 1 if self.device == "cuda" else data_bytes

    def layer_norm_statistics(self) -> int:
        """nn.LayerNorm's saved mean and rstd: fp32 on CUDA, the input's dtype on CPU."""
        return FLOAT32_BYTES if self.device == "cuda" else self.stream

    def matmul_inputs(self, data_bytes: int, readers: int) -> int:
        """Bytes per element saved for `readers` matmuls reading one tensor: one shared storage, or
        under AMP one half copy each (autocast caches casts of parameters only)."""
        if self.amp and data_bytes != self.compute:
            return readers * self.compute
        return data_bytes


def activation_widths(precision: str, device: str = "cuda") -> ActivationWidths:
    """The widths of a precision regime (planner.workload.PRECISION_REGIMES) on a device."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if precision == "fp32":
        return ActivationWidths(stream=4, compute=4, amp=False, device=device)
    if precision in ("amp_bf16", "amp_fp16"):
        return ActivationWidths(stream=4, compute=2, amp=True, device=device)
    if precision == "bf16":
        return ActivationWidths(stream=2, compute=2, amp=False, device=device)
    raise SettingError("precision", f"precision must be one of {', '.join(PRECISION_REGIMES)}, got {precision!r}")


@dataclass(frozen=True)
class ActivationBreakdown:
    """Bytes saved for backward by each part of one training step."""

    inputs_bytes: int  # token ids and labels (embedding and loss indices)
    encoder_bytes: int  # the shared T5 encoder (0 for expert_only)
    decoder_bytes: int  # the shared T5 decoder, cross-attention included
    router_bytes: int  # sample-level router, token routers and balance losses
    experts_bytes: int  # expert heads / expert encoders / token expert FFNs, with their dispatch
    lm_head_bytes: int  # the dense tied head's input
    loss_bytes: int  # fp32 log-probabilities of the cross-entropy
    amp_weight_copies_bytes: int  # AMP only: the half copies of matmul weights autocast casts and keeps

    @property
    def total_bytes(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


# --- T5 pieces --------------------------------------------------------------------------------------------


def _t5_norm_bytes(tokens: int, d_model: int, w: ActivationWidths) -> int:
    """T5LayerNorm: its input and the normalised tensor, the fp32 copy of a half input, the fp32 rsqrt."""
    per_element = 2 * w.stream + (FLOAT32_BYTES if w.stream < FLOAT32_BYTES else 0)
    return tokens * d_model * per_element + tokens * FLOAT32_BYTES


def _attention_bytes(rows: int, q_len: int, kv_len: int, dims: BackboneDims, w: ActivationWidths,
                     *, cross: bool) -> int:
    """One T5LayerSelfAttention / T5LayerCrossAttention, without the cross-attention's k/v inputs."""
    c, heads, width = w.compute, dims.num_heads, dims.attention_width
    scores = rows * heads * q_len * kv_len
    norm_bytes = _t5_norm_bytes(rows * q_len, dims.d_model, w)
    projection_inputs_bytes = rows * q_len * dims.d_model * w.matmul_inputs(w.stream, 1 if cross else 3)
    qkv_copies_bytes = rows * (q_len + 2 * kv_len) * width * c  # q, kᵀ, v reshaped for bmm
    probs_bytes = scores * FLOAT32_BYTES  # softmax(scores.float())
    probs_dropout_bytes = scores * (w.mask(c) + c)  # mask, and the dropped probabilities bmm keeps
    output_projection_input_bytes = rows * q_len * width * c
    residual_mask_bytes = rows * q_len * dims.d_model * w.mask(c)
    return (norm_bytes + projection_inputs_bytes + qkv_copies_bytes + probs_bytes + probs_dropout_bytes
            + output_projection_input_bytes + residual_mask_bytes)


def _ffn_bytes(tokens: int, dims: BackboneDims, w: ActivationWidths) -> int:
    """T5LayerFF with the dense T5DenseActDense: norm, wi input, ReLU output, mask, wo input, residual mask."""
    c = w.compute
    return (_t5_norm_bytes(tokens, dims.d_model, w)
            + tokens * dims.d_model * w.matmul_inputs(w.stream, 1)  # wi input
            + tokens * dims.d_ff * (c + w.mask(c) + c)  # ReLU output, dropout mask, wo input
            + tokens * dims.d_model * w.mask(c))  # residual dropout mask


def _stack_ends_bytes(tokens: int, dims: BackboneDims, w: ActivationWidths) -> int:
    """A T5Stack's embedding dropout mask, final norm and final dropout mask."""
    return (tokens * dims.d_model * w.mask(w.stream) + _t5_norm_bytes(tokens, dims.d_model, w)
            + tokens * dims.d_model * w.mask(w.stream))


def _position_buckets_bytes(length_q: int, length_k: int) -> int:
    """Relative-position bucket ids the bias embedding keeps (block 0 of a stack computes them once)."""
    return length_q * length_k * INDEX_BYTES


def _encoder_blocks_bytes(rows: int, seq: int, dims: BackboneDims, w: ActivationWidths,
                          moe_blocks: tuple[int, ...]) -> int:
    """Encoder blocks and stack ends; the FFN of `moe_blocks` is counted with the experts instead."""
    tokens = rows * seq
    attention = dims.num_layers * _attention_bytes(rows, seq, seq, dims, w, cross=False)
    ffn = (dims.num_layers - len(moe_blocks)) * _ffn_bytes(tokens, dims, w)
    return attention + ffn + _stack_ends_bytes(tokens, dims, w) + _position_buckets_bytes(seq, seq)


def _decoder_bytes(config: ChronosMoEConfig, rows: int, seq: int, dec: int, w: ActivationWidths) -> int:
    """The shared decoder: self- and cross-attention, FFNs, stack ends, and the encoder output its k/v read."""
    dims = config.dims
    per_block = (_attention_bytes(rows, dec, dec, dims, w, cross=False)
                 + _attention_bytes(rows, dec, seq, dims, w, cross=True))
    dense_ffns = dims.num_decoder_layers - len(config.token_moe_decoder_blocks)
    # The encoder output (or expert mixture), read by the 2·Ld cross-attention k/v projections.
    encoder_output_bytes = rows * seq * dims.d_model * w.matmul_inputs(w.stream, 2 * dims.num_decoder_layers)
    return (dims.num_decoder_layers * per_block + dense_ffns * _ffn_bytes(rows * dec, dims, w)
            + _stack_ends_bytes(rows * dec, dims, w) + _position_buckets_bytes(dec, dec) + encoder_output_bytes)


# --- routing and dispatch ---------------------------------------------------------------------------------


def _top_k_bytes(rows: int, num_experts: int, top_k: int) -> int:
    """route_top_k: fp32 softmax output, top-K indices, the K probabilities and their sum (the division)."""
    return rows * (num_experts * FLOAT32_BYTES + top_k * INDEX_BYTES + top_k * FLOAT32_BYTES + FLOAT32_BYTES)


def _balance_loss_bytes(num_experts: int) -> int:
    """Each MoE layer's balance loss keeps its slot shares fᵢ (E floats) for the product with P̄ᵢ."""
    return num_experts * FLOAT32_BYTES


def _context_router_bytes(config: ChronosMoEConfig, rows: int, length: int, w: ActivationWidths) -> int:
    """ContextRouter: masked-mean pooling, Linear → ReLU → Dropout → Linear, top-K, and its balance loss."""
    c, d, hidden = w.compute, config.dims.d_model, config.router_hidden_dim
    pooling_bytes = rows * length * w.stream + rows * w.stream  # the float mask (B, L, 1) and the count (B, 1)
    hidden_input_bytes = rows * d * w.matmul_inputs(w.stream, 1)
    hidden_bytes = rows * hidden * (c + w.mask(c) + c)  # ReLU output, dropout mask, output-layer input
    return (pooling_bytes + hidden_input_bytes + hidden_bytes
            + _top_k_bytes(rows, config.num_experts, config.top_k) + _balance_loss_bytes(config.num_experts))


def _combine_bytes(config: ChronosMoEConfig, rows: int, slots: int, output_elements: int, output_bytes: int) -> int:
    """Weighting and summing the expert outputs (`dispatch`), given `slots` expert runs of one row each.

    Sparse: per slot the two int64 indices (sorted slot order, row), the gathered weight, the expert output the product
    keeps and the weighted output index_add keeps. Dense: every expert's output and the (rows, E) weights.
    """
    if config.dispatch == "dense":
        return config.num_experts * rows * (output_elements + 1) * output_bytes
    return slots * (2 * INDEX_BYTES + output_bytes + 2 * output_elements * output_bytes)


def _sample_slots(config: ChronosMoEConfig, batch: int) -> int:
    """Expert runs of one series each: B·K sparse (K distinct experts per series), B·E dense."""
    return batch * (config.num_experts if config.dispatch == "dense" else config.top_k)


def _running_experts(config: ChronosMoEConfig, batch: int) -> int:
    """How many experts run at least once: all E dense; at most min(E, B·K) sparse (an upper bound)."""
    return config.num_experts if config.dispatch == "dense" else min(config.num_experts, batch * config.top_k)


def _expert_inputs_bytes(config: ChronosMoEConfig, rows: int, slots: int, elements_per_row: int,
                         w: ActivationWidths) -> int:
    """The input the experts' first matmul keeps: the gathered rows of every slot (sparse), or the one
    ungathered tensor every expert reads (dense; AMP keeps a half copy per expert)."""
    if config.dispatch == "dense":
        return rows * elements_per_row * w.matmul_inputs(w.stream, config.num_experts)
    return slots * elements_per_row * w.matmul_inputs(w.stream, 1)


# --- the three kinds of experts ---------------------------------------------------------------------------


def _expert_heads_bytes(config: ChronosMoEConfig, batch: int, dec: int, w: ActivationWidths) -> int:
    """shared_then_expert: each slot runs a MoEExpertHead on one series' T decoder positions."""
    c, d, dims = w.compute, config.dims.d_model, config.dims
    slots = _sample_slots(config, batch)
    hidden = config.expert_head_hidden_dim
    per_slot = dec * (
        hidden * (c + w.mask(c) + c)  # ReLU output, dropout mask, fc2 input
        + d * w.mask(c)  # second dropout mask
        + d * w.stream + 2 * w.layer_norm_statistics()  # nn.LayerNorm input (the residual sum), mean, rstd
        + d * w.matmul_inputs(w.stream, 1)  # the head's input (the norm's output)
    )
    fc1_inputs = _expert_inputs_bytes(config, batch, slots, dec * d, w)
    combine = _combine_bytes(config, batch, slots, dec * dims.vocab_size, c)
    return slots * per_slot + fc1_inputs + combine


def _expert_encoders_bytes(config: ChronosMoEConfig, batch: int, seq: int, dec: int, w: ActivationWidths) -> int:
    """expert_only: each slot runs an expert's T5 encoder on one series, then its LM head on the decoder output."""
    dims = config.dims
    slots = _sample_slots(config, batch)
    encoders = _encoder_blocks_bytes(slots, seq, dims, w, ()) - _position_buckets_bytes(seq, seq)
    buckets = _running_experts(config, batch) * _position_buckets_bytes(seq, seq)
    encoder_combine = _combine_bytes(config, batch, slots, seq * dims.d_model, w.stream)
    head_inputs = _expert_inputs_bytes(config, batch, slots, dec * dims.d_model, w)
    head_combine = _combine_bytes(config, batch, slots, dec * dims.vocab_size, w.compute)
    return encoders + buckets + encoder_combine + head_inputs + head_combine


def _token_expert_layer_bytes(config: ChronosMoEConfig, tokens: int, w: ActivationWidths) -> int:
    """token_ffn: one T5LayerFF whose FFN is a TokenExpertFFN (K experts per token, combine), less its router.

    The router's input is the norm's output; dense dispatch feeds that same tensor to every expert.
    """
    c, dims, experts = w.compute, config.dims, config.num_experts
    dense = config.dispatch == "dense"
    slots = count_expert_slots(config, tokens)
    norm_bytes = _t5_norm_bytes(tokens, dims.d_model, w)
    shared_input_bytes = tokens * dims.d_model * w.matmul_inputs(w.stream, 1 + (experts if dense else 0))
    gathered_bytes = 0 if dense else slots * dims.d_model * w.matmul_inputs(w.stream, 1)
    expert_ffn_bytes = slots * dims.d_ff * (c + w.mask(c) + c)  # ReLU output, dropout mask, wo input
    combine = _combine_bytes(config, tokens, slots, dims.d_model, c)
    residual_mask_bytes = tokens * dims.d_model * w.mask(c)
    return norm_bytes + shared_input_bytes + gathered_bytes + expert_ffn_bytes + combine + residual_mask_bytes


def _token_router_bytes(config: ChronosMoEConfig, tokens: int) -> int:
    """A TokenExpertFFN's router (its input is counted with the layer) and its balance loss."""
    return _top_k_bytes(tokens, config.num_experts, config.top_k) + _balance_loss_bytes(config.num_experts)


# --- AMP's weight copies ---------------------------------------------------------------------------------


def _weights(linears) -> int:
    return sum(linear.weight_params for linear in linears)


def _matmul_weight_elements(config: ChronosMoEConfig, batch: int, seq: int, dec: int) -> int:
    """Elements of the matmul weights one forward reads (biases, norms and bias embeddings are not cast):
    under autocast each is cast to half once, and the copy is saved by its matmuls."""
    dims, experts = config.dims, config.num_experts
    architecture = config.architecture if config.is_moe else "dense"
    encoder_moe, decoder_moe = len(config.token_moe_encoder_blocks), len(config.token_moe_decoder_blocks)
    attention, ffn = _weights(attention_linears(dims)), _weights(ffn_linears(dims))
    shared_encoder = 0 if architecture == "expert_only" else (
        dims.num_layers * attention + (dims.num_layers - encoder_moe) * ffn)
    decoder = 2 * dims.num_decoder_layers * attention + (dims.num_decoder_layers - decoder_moe) * ffn
    if architecture in ("dense", "token_ffn"):
        decoder += count_embedding_params(dims)  # the tied LM head
    routed = 0
    if architecture in ("shared_then_expert", "expert_only"):
        if architecture == "shared_then_expert":
            per_expert = _weights(expert_head_linears(config))
        else:
            per_expert = dims.num_layers * (attention + ffn) + lm_head_linear(dims).weight_params
        routed = _weights(context_router_linears(config)) + _running_experts(config, batch) * per_expert
    elif architecture == "token_ffn":
        for count, tokens in ((encoder_moe, batch * seq), (decoder_moe, batch * dec)):
            running = min(experts, count_expert_slots(config, tokens))
            routed += count * (token_router_linear(config).weight_params + running * ffn)
    return shared_encoder + decoder + routed


# --- the whole step ---------------------------------------------------------------------------------------


def estimate_activation_breakdown(config: ChronosMoEConfig, workload: Workload,
                                  *, device: str = "cuda") -> ActivationBreakdown:
    """Bytes saved for backward by one teacher-forced training step, by part, in the workload's precision.

    `device` fixes the dropout masks' width: "cuda" (bool masks) or "cpu" (masks of the data's dtype).
    """
    w = activation_widths(workload.precision, device)
    dims, batch = config.dims, workload.batch_size
    seq, dec = workload.encoder_tokens, workload.decoder_tokens
    architecture = config.architecture if config.is_moe else "dense"

    encoder_bytes = 0 if architecture == "expert_only" else _encoder_blocks_bytes(
        batch, seq, dims, w, config.token_moe_encoder_blocks)
    router_bytes = experts_bytes = lm_head_bytes = 0
    if architecture == "dense" or architecture == "token_ffn":
        lm_head_bytes = batch * dec * dims.d_model * w.matmul_inputs(w.stream, 1)  # the D^-0.5-scaled output
    if architecture == "shared_then_expert":
        router_bytes = _context_router_bytes(config, batch, seq, w)
        experts_bytes = _expert_heads_bytes(config, batch, dec, w)
    elif architecture == "expert_only":
        router_bytes = _context_router_bytes(config, batch, seq, w)
        experts_bytes = _expert_encoders_bytes(config, batch, seq, dec, w)
    elif architecture == "token_ffn":
        layers = ((len(config.token_moe_encoder_blocks), batch * seq),
                  (len(config.token_moe_decoder_blocks), batch * dec))
        router_bytes = sum(count * _token_router_bytes(config, tokens) for count, tokens in layers)
        experts_bytes = sum(count * _token_expert_layer_bytes(config, tokens, w) for count, tokens in layers)

    return ActivationBreakdown(
        inputs_bytes=batch * (seq + 2 * dec) * INDEX_BYTES,  # encoder ids, decoder ids, targets
        encoder_bytes=encoder_bytes,
        decoder_bytes=_decoder_bytes(config, batch, seq, dec, w),
        router_bytes=router_bytes,
        experts_bytes=experts_bytes,
        lm_head_bytes=lm_head_bytes,
        loss_bytes=batch * dec * dims.vocab_size * FLOAT32_BYTES + FLOAT32_BYTES,  # log-probs, NLL total weight
        amp_weight_copies_bytes=_matmul_weight_elements(config, batch, seq, dec) * w.compute if w.amp else 0,
    )


def estimate_activation_bytes(config: ChronosMoEConfig, workload: Workload, *, device: str = "cuda") -> int:
    """Total bytes saved for backward by one training step (see `estimate_activation_breakdown`)."""
    return estimate_activation_breakdown(config, workload, device=device).total_bytes
