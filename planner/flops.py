"""FLOPs of every Chronos-MoE variant: teacher-forced forward, training step, forecast (conventions.md "FLOPs").

FLOPs = 2 × multiply-accumulates, matrix products only (linear layers, attention scores and weighted sums):
what torch's FlopCounterMode counts. Softmax, norms, activations, the D^-0.5 output scaling, the masked
mean that feeds the context router and the routing weights' multiply are elementwise and not counted.
Decoder self-attention scores are counted in full (no halving for the causal mask), as the counters do.

Letters: B series, S = context + 1 encoder tokens, T = prediction + 1 decoder tokens, P prediction steps,
N sample paths, D d_model, F d_ff, A = H·Dk, V vocabulary, E experts, K top-k, R router hidden width,
Le/Ld encoder/decoder blocks, X = K experts run (sparse dispatch) or E (dense dispatch).

Routing granularity: shared_then_expert and expert_only route once per series (X expert heads or X expert
encoders + heads per series); token_ffn routes every position of its MoE blocks (padding included) through
a Linear(D→E) router and X expert FFNs. With `expert_capacity` c each expert takes at most
ceil(c·tokens·K/E) tokens per call; the count assumes balanced routing, so processed slots are
min(tokens·K, E·capacity) — an upper bound when routing is unbalanced.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

from model.config import ChronosMoEConfig, capacity_limit
from planner.workload import Workload

@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of one pass by component. Token-level routers count as `router`, expert FFNs as `experts`,
    expert encoders (expert_only) and expert heads as `experts`; `head` is the dense tied LM head."""

    encoder_flops: int = 0
    decoder_flops: int = 0
    router_flops: int = 0
    expert_flops: int = 0
    head_flops: int = 0

    def __add__(self, other: "FlopBreakdown") -> "FlopBreakdown":
        return FlopBreakdown(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def components(self) -> dict[str, int]:
        return {"encoder": self.encoder_flops, "decoder": self.decoder_flops, "router": self.router_flops,
                "expert": self.expert_flops, "head": self.head_flops}

    @cached_property
    def total_flops(self) -> int:
        return sum(self.components().values())


def count_linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    """A Linear layer over `tokens` rows (bias not counted)."""
    return 2 * tokens * in_features * out_features


def count_attention_core_flops(config: ChronosMoEConfig, rows: int, query_len: int, key_len: int) -> int:
    """Scores Q·Kᵀ and weighted sum P·V, each 2·Tq·Tk·Dk per head: 4·Tq·Tk·A per row."""
    return 4 * rows * query_len * key_len * config.dims.attention_width


def count_projection_flops(config: ChronosMoEConfig, tokens: int) -> int:
    """One of q, k, v (D→A) or o (A→D)."""
    return count_linear_flops(tokens, config.dims.d_model, config.dims.attention_width)


def count_dense_ffn_flops(config: ChronosMoEConfig, tokens: int) -> int:
    """DenseReluDense wi (D→F) and wo (F→D); also one token-level expert FFN per token it processes."""
    return 2 * count_linear_flops(tokens, config.dims.d_model, config.dims.d_ff)


def experts_run(config: ChronosMoEConfig) -> int:
    """X: experts executed per routed series/token: K with sparse dispatch, all E with dense dispatch."""
    return config.top_k if config.dispatch == "sparse" else config.num_experts


def count_running_experts(config: ChronosMoEConfig, rows: int) -> int:
    """Experts that run at least once on `rows` routed series or tokens: every E with dense dispatch; at
    most min(E, rows·K) sparse (an upper bound: rows may share experts). A capacity factor keeps at least
    one slot per expert, so it does not lower this."""
    return config.num_experts if config.dispatch == "dense" else min(config.num_experts, rows * config.top_k)


def count_expert_slots(config: ChronosMoEConfig, tokens: int) -> int:
    """(token, expert) pairs a token_ffn block processes in one call over `tokens` tokens.

    Dense dispatch runs every expert on every token. Sparse: tokens·K, capped per expert by the capacity
    factor at ceil(c·tokens·K/E), assuming balanced routing.
    """
    if config.dispatch == "dense":
        return tokens * config.num_experts
    slots = tokens * config.top_k
    capacity = capacity_limit(config.expert_capacity, tokens, config.top_k, config.num_experts)
    return slots if capacity is None else min(slots, config.num_experts * capacity)


def count_ffn_layers_flops(config: ChronosMoEConfig, tokens: int, num_blocks: int, moe_blocks: int) -> tuple[int, int, int]:
    """(dense FFN, token router, expert FFN) FLOPs of a stack's FFN sublayers for one call over `tokens`."""
    dense = (num_blocks - moe_blocks) * count_dense_ffn_flops(config, tokens)
    if moe_blocks == 0:
        return dense, 0, 0
    router = moe_blocks * count_linear_flops(tokens, config.dims.d_model, config.num_experts)
    experts = moe_blocks * count_dense_ffn_flops(config, count_expert_slots(config, tokens))
    return dense, router, experts


def count_encoder_stack_flops(config: ChronosMoEConfig, rows: int, encoder_len: int) -> tuple[int, int, int]:
    """(attention + dense FFN, token router, expert FFN) FLOPs of one T5 encoder stack over rows × S."""
    tokens = rows * encoder_len
    attention = 4 * count_projection_flops(config, tokens) + count_attention_core_flops(config, rows, encoder_len, encoder_len)
    dense, router, experts = count_ffn_layers_flops(config, tokens, config.dims.num_layers, len(config.token_moe_encoder_blocks))
    return config.dims.num_layers * attention + dense, router, experts


def count_context_router_flops(config: ChronosMoEConfig, rows: int) -> int:
    """ContextRouter on one pooled vector per series: D→R→E."""
    d, r, e = config.dims.d_model, config.router_hidden_dim, config.num_experts
    return count_linear_flops(rows, d, r) + count_linear_flops(rows, r, e)


def count_head_flops_per_position(config: ChronosMoEConfig) -> tuple[int, int]:
    """(dense head, expert heads) FLOPs for one decoder position of one row."""
    d, v = config.dims.d_model, config.dims.vocab_size
    lm_head = count_linear_flops(1, d, v)
    if not config.is_moe or config.architecture == "token_ffn":
        return lm_head, 0  # the tied LM head
    if config.architecture == "expert_only":
        return 0, experts_run(config) * lm_head
    hidden = config.expert_head_hidden_dim  # shared_then_expert: fc1, fc2, lm_head per chosen head
    return 0, experts_run(config) * (count_linear_flops(1, d, hidden) + count_linear_flops(1, hidden, d) + lm_head)


def count_encoding_flops(config: ChronosMoEConfig, rows: int, encoder_len: int) -> FlopBreakdown:
    """Everything that reads the context once per series: shared encoder or expert encoders, context router."""
    stack, token_router, token_experts = count_encoder_stack_flops(config, rows, encoder_len)
    if not config.is_moe or config.architecture == "token_ffn":
        return FlopBreakdown(encoder_flops=stack, router_flops=token_router, expert_flops=token_experts)
    router = count_context_router_flops(config, rows)
    if config.architecture == "expert_only":
        return FlopBreakdown(router_flops=router, expert_flops=experts_run(config) * stack)
    return FlopBreakdown(encoder_flops=stack, router_flops=router)


def count_forward_flops(config: ChronosMoEConfig, workload: Workload) -> FlopBreakdown:
    """Teacher-forced forward of one batch: B series, S encoder and T decoder tokens."""
    b, s, t = workload.batch_size, workload.encoder_tokens, workload.decoder_tokens
    tokens = b * t
    self_attention = 4 * count_projection_flops(config, tokens) + count_attention_core_flops(config, b, t, t)
    cross_attention = (
        2 * count_projection_flops(config, tokens)  # q, o over the decoder tokens
        + 2 * count_projection_flops(config, b * s)  # k, v over the encoder output
        + count_attention_core_flops(config, b, t, s)
    )
    dense, token_router, token_experts = count_ffn_layers_flops(
        config, tokens, config.dims.num_decoder_layers, len(config.token_moe_decoder_blocks)
    )
    dense_head, expert_heads = count_head_flops_per_position(config)
    decoder = FlopBreakdown(
        decoder_flops=config.dims.num_decoder_layers * (self_attention + cross_attention) + dense,
        router_flops=token_router,
        expert_flops=token_experts + tokens * expert_heads,
        head_flops=tokens * dense_head,
    )
    return count_encoding_flops(config, b, s) + decoder


def count_forecast_flops(config: ChronosMoEConfig, workload: Workload) -> FlopBreakdown:
    """`model.forecast` of one batch: encode B series once, then P cached decoder steps on B·N rows.

    Step i (0-based) feeds one token per row; self-attention reads i + 1 cached keys; cross-attention's
    k, v over the S encoder positions are computed at step 0 only (then cached); routing is decided once
    per series, so every step runs the X chosen heads.
    """
    b, s, p = workload.batch_size, workload.encoder_tokens, workload.prediction_length
    rows = b * workload.num_samples  # encoder output repeated per sample path
    self_keys = p * (p + 1) // 2  # Σ over steps of (i + 1)
    per_block = (
        p * 4 * count_projection_flops(config, rows)  # self q, k, v, o of the new token
        + count_attention_core_flops(config, rows, 1, self_keys)
        + p * 2 * count_projection_flops(config, rows)  # cross q, o
        + 2 * count_projection_flops(config, rows * s)  # cross k, v once
        + p * count_attention_core_flops(config, rows, 1, s)
    )
    dense, token_router, token_experts = count_ffn_layers_flops(
        config, rows, config.dims.num_decoder_layers, len(config.token_moe_decoder_blocks)
    )
    dense_head, expert_heads = count_head_flops_per_position(config)
    decoding = FlopBreakdown(
        decoder_flops=config.dims.num_decoder_layers * per_block + p * dense,
        router_flops=p * token_router,
        expert_flops=p * (token_experts + rows * expert_heads),
        head_flops=p * rows * dense_head,
    )
    return count_encoding_flops(config, b, s) + decoding


@dataclass(frozen=True)
class FlopCounts:
    """The three FLOP figures of one variant at one workload, per batch (ratios to dense live in plan.py)."""

    forward: FlopBreakdown
    forecast: FlopBreakdown
    batch_size: int
    backward_flops: int  # of a training step, under the workload's fine-tuning regime

    @property
    def forward_flops(self) -> int:
        return self.forward.total_flops

    @property
    def train_flops(self) -> int:
        """Forward + backward: 3 × the forward when everything trains (a matrix product's backward computes
        an input and a weight gradient, each as costly as the product), less when parts are frozen."""
        return self.forward_flops + self.backward_flops

    @property
    def forecast_flops(self) -> int:
        return self.forecast.total_flops


def count_flops(config: ChronosMoEConfig, workload: Workload) -> FlopCounts:
    """Forward, training-step and forecast FLOPs of one batch of `workload`."""
    from planner.backward import count_backward_flops  # it walks the forward with this module's pieces

    return FlopCounts(
        forward=count_forward_flops(config, workload),
        forecast=count_forecast_flops(config, workload),
        batch_size=workload.batch_size,
        backward_flops=count_backward_flops(config, workload),
    )
