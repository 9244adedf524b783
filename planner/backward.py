"""Backward FLOPs of one training step under a fine-tuning regime (architecture.md §6, conventions.md "FLOPs").

Autograd computes, for each matrix product of the forward, only the gradients something needs:
- the weight gradient of a Linear whose weight trains (as costly as the forward product);
- the gradient of an input that *requires grad*, i.e. that depends on some trainable parameter upstream
  (as costly again), so that the loss reaches that parameter;
- for the attention products Q·Kᵀ and P·V, the gradient of each operand that requires grad.
With every parameter trainable that is 2 × the forward (a training step is 3 × the forward); with a
frozen backbone the layers below the lowest trainable one compute no gradient at all, and frozen layers
above it only pass input gradients down.

The walk below follows the forward of each architecture (model/chronos_moe.py and transformers' T5) layer
by layer, carrying one flag per tensor, "requires grad", and adds the backward FLOPs of each product with
the same per-layer FLOP functions the forward count uses (planner.flops). Elementwise work (norms, softmax,
ReLU, dropout, the routing weights' multiply) only carries flags: a parameter in it (a norm's weight, the
position-bias table) makes its output require grad when that parameter trains.

Letters as in planner.flops: B series, S encoder tokens, T decoder tokens, D, F, A, V, E, K, R, X.
"""

from __future__ import annotations

from model.config import ChronosMoEConfig
from model.trainable import trainable_components
from planner.flops import (
    count_attention_core_flops,
    count_expert_slots,
    count_linear_flops,
    count_projection_flops,
    experts_run,
)
from planner.workload import Workload


class _GradientWalk:
    """Flags and backward FLOPs over a forward, for one set of trainable components."""

    def __init__(self, config: ChronosMoEConfig, trainable: frozenset[str]) -> None:
        self.config, self.trainable, self.flops = config, trainable, 0

    def trains(self, component: str) -> bool:
        return component in self.trainable

    def linear(self, x: bool, component: str, flops: int) -> bool:
        """A Linear of `component` whose forward costs `flops`: weight gradient if it trains, input gradient
        if its input requires grad. Its output requires grad if either does."""
        weight = self.trains(component)
        self.flops += flops * (int(weight) + int(x))
        return x or weight

    def product(self, a: bool, b: bool, flops: int) -> bool:
        """A product of two activations (attention): the gradient of each operand that requires grad."""
        self.flops += flops * (int(a) + int(b))
        return a or b

    def with_parameter(self, x: bool, component: str) -> bool:
        """Elementwise work with a parameter of `component` (a norm's weight, a bias)."""
        return x or self.trains(component)

    # --- T5 pieces ----------------------------------------------------------------------------------------

    def attention(self, h: bool, rows: int, q_len: int, kv_len: int, attention: str, norm: str,
                  bias: bool, kv_input: bool | None = None) -> bool:
        """A T5 attention sublayer (pre-norm, residual); `kv_input` is the encoder output for cross-attention."""
        n = self.with_parameter(h, norm)
        q = self.linear(n, attention, count_projection_flops(self.config, rows * q_len))
        source, kv_tokens = (n, rows * q_len) if kv_input is None else (kv_input, rows * kv_len)
        k = self.linear(source, attention, count_projection_flops(self.config, kv_tokens))
        v = self.linear(source, attention, count_projection_flops(self.config, kv_tokens))
        half = count_attention_core_flops(self.config, rows, q_len, kv_len) // 2  # Q·Kᵀ, then P·V
        probabilities = self.product(q, k, half) or bias
        out = self.linear(self.product(probabilities, v, half), attention,
                          count_projection_flops(self.config, rows * q_len))
        return h or out

    def ffn(self, h: bool, tokens: int, ffn: str, norm: str) -> bool:
        n = self.with_parameter(h, norm)
        half = count_linear_flops(tokens, self.config.dims.d_model, self.config.dims.d_ff)
        out = self.linear(self.linear(n, ffn, half), ffn, half)  # evaluated first: it adds its FLOPs
        return h or out

    def token_experts(self, h: bool, tokens: int, norm: str) -> bool:
        """A token_ffn MoE FFN: router Linear(D→E), the expert FFNs on their slots, the weighted sum."""
        config = self.config
        n = self.with_parameter(h, norm)
        weights = self.linear(n, "router", count_linear_flops(tokens, config.dims.d_model, config.num_experts))
        half = count_linear_flops(count_expert_slots(config, tokens), config.dims.d_model, config.dims.d_ff)
        experts = self.linear(self.linear(n, "expert_ffn", half), "expert_ffn", half)
        return h or experts or weights

    def stack(self, h: bool, rows: int, length: int, prefix: str, moe_blocks: tuple[int, ...], *,
              encoder: tuple[bool, int] | None = None, expert: bool = False) -> bool:
        """A T5 stack after its embedding: blocks and the final norm. A decoder gets `encoder` = (whether the
        encoder output requires grad, its length); `expert` names every parameter `expert_encoder` (the
        expert_only experts' encoder stacks)."""
        def part(name: str) -> str:
            return "expert_encoder" if expert else f"{prefix}_{name}"

        dims = self.config.dims
        bias = self.trains(part("position_bias"))  # computed in block 0, added in every block
        self_attention = part("attention" if encoder is None else "self_attention")
        for block in range(dims.num_layers if encoder is None else dims.num_decoder_layers):
            h = self.attention(h, rows, length, length, self_attention, part("norm"), bias)
            if encoder is not None:  # cross-attention: no position bias; k and v read the encoder output
                encoder_output, encoder_len = encoder
                h = self.attention(h, rows, length, encoder_len, part("cross_attention"), part("norm"),
                                   False, kv_input=encoder_output)
            tokens = rows * length
            h = self.token_experts(h, tokens, part("norm")) if block in moe_blocks \
                else self.ffn(h, tokens, part("ffn"), part("norm"))
        return self.with_parameter(h, part("norm"))  # the final norm

    # --- the three architectures and the dense model ------------------------------------------------------

    def context_router(self, pooled: bool, rows: int) -> bool:
        config = self.config
        hidden = self.linear(pooled, "router", count_linear_flops(rows, config.dims.d_model, config.router_hidden_dim))
        return self.linear(hidden, "router", count_linear_flops(rows, config.router_hidden_dim, config.num_experts))

    def training_forward(self, workload: Workload) -> bool:
        """Walk one teacher-forced forward; True when the loss requires grad (something trainable reaches it)."""
        config, dims = self.config, self.config.dims
        b, s, t = workload.batch_size, workload.encoder_tokens, workload.decoder_tokens
        architecture = config.architecture if config.is_moe else "dense"
        embedded = self.trains("embedding")
        weights = False
        if architecture == "expert_only":
            weights = self.context_router(embedded, b)
            encoded = self.stack(embedded, b * experts_run(config), s, "encoder", (), expert=True)
            encoder_output = encoded or weights
        else:
            encoder_output = self.stack(embedded, b, s, "encoder", config.token_moe_encoder_blocks)
            if architecture == "shared_then_expert":
                weights = self.context_router(encoder_output, b)
        decoded = self.stack(embedded, b, t, "decoder", config.token_moe_decoder_blocks, encoder=(encoder_output, s))
        tokens, slots = b * t, b * t * experts_run(config)
        if architecture in ("dense", "token_ffn"):
            return self.linear(decoded, "embedding", count_linear_flops(tokens, dims.d_model, dims.vocab_size))
        if architecture == "expert_only":
            heads = self.linear(decoded, "expert_head", count_linear_flops(slots, dims.d_model, dims.vocab_size))
            return heads or weights
        hidden = config.expert_head_hidden_dim
        x = self.linear(decoded, "expert_head", count_linear_flops(slots, dims.d_model, hidden))
        x = self.linear(x, "expert_head", count_linear_flops(slots, hidden, dims.d_model))
        x = self.with_parameter(decoded or x, "expert_head")  # residual, LayerNorm
        heads = self.linear(x, "expert_head", count_linear_flops(slots, dims.d_model, dims.vocab_size))
        return heads or weights  # the routing weights mix the heads' logits (and feed the balance loss)


def count_backward_flops(config: ChronosMoEConfig, workload: Workload) -> int:
    """FLOPs of the backward of one training step under `workload.trainable` (see the module docstring)."""
    walk = _GradientWalk(config, trainable_components(workload.trainable))
    walk.training_forward(workload)
    return walk.flops
