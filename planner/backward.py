"""The backward of one training step under a fine-tuning regime (architecture.md §6, conventions.md "FLOPs"
and "Memory: Activations"): the FLOPs autograd computes and the tensors it saves for them.

Autograd computes, for each matrix product of the forward, only the gradients something needs:
- the weight gradient of a Linear whose weight trains (as costly as the forward product);
- the gradient of an input that *requires grad*, i.e. that depends on some trainable parameter upstream
  (as costly again), so that the loss reaches that parameter;
- for the attention products Q·Kᵀ and P·V, the gradient of each operand that requires grad.
With every parameter trainable that is 2 × the forward (a training step is 3 × the forward); with a
frozen backbone the layers below the lowest trainable one compute no gradient at all, and frozen layers
above it only pass input gradients down.

An op records a graph node only when some input requires grad, and saves only what the gradients it must
compute need (measured against saved_tensors_hooks, tests/test_activations.py):
- a Linear keeps its input when its weight trains (the weight gradient reads it), and its weight when its
  input requires grad (a parameter, not an activation; under autocast the half copy of the weight, which
  is a new tensor, trained or not);
- a product of two activations keeps each operand when the *other* requires grad;
- ReLU and softmax keep their output, dropout its mask, an index gather its indices, when their input
  requires grad; an embedding keeps its ids when its weight trains;
- T5LayerNorm keeps its input and rsqrt statistic when its input requires grad, the normalised tensor when
  its weight trains; nn.LayerNorm keeps input, mean and rstd when its input or its parameters do;
- weighting the expert outputs keeps the gathered weights when the outputs require grad and the outputs
  when the weights do; the scatter-add back keeps its source and row indices when the source does.

`GradientWalk` follows the forward of each architecture (model/chronos_moe.py and transformers' T5) op by
op, carrying one flag per tensor, "requires grad". It adds the backward FLOPs of each product with the same
per-layer FLOP functions the forward count uses (planner.flops), and reports every tensor an op saves to
`keep(part, role, elements)`: a no-op here; planner.activations turns roles into bytes. Elementwise work
(norms, softmax, ReLU, dropout, the routing weights' multiply) costs no counted FLOPs: a parameter in it (a
norm's weight, the position-bias table) makes its output require grad when that parameter trains.

Letters as in planner.flops: B series, S encoder tokens, T decoder tokens, D, F, A, V, E, K, R, X.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

from model.config import ChronosMoEConfig
from model.trainable import trainable_components
from planner.flops import (
    count_attention_core_flops,
    count_expert_slots,
    count_linear_flops,
    count_running_experts,
    experts_run,
)
from planner.workload import Workload

# Roles of saved tensors: what fixes their element width (planner.activations.ActivationWidths).
INDEX = "index"  # int64 ids, labels, position buckets, top-k indices, slot order and rows
FLOAT32 = "fp32"  # computed in fp32 on purpose: softmaxes, norm statistics, log-probabilities
STREAM = "stream"  # the residual stream's dtype
COMPUTE = "compute"  # a matmul output's dtype (half under autocast)
STREAM_MASK = "stream_mask"  # a dropout mask over stream data
COMPUTE_MASK = "compute_mask"  # a dropout mask over compute data
STREAM_FP32_COPY = "stream_fp32_copy"  # T5LayerNorm's fp32 copy of a half input (none when the stream is fp32)
NORM_STATISTICS = "norm_statistics"  # nn.LayerNorm's mean and rstd
MATMUL_INPUT = "matmul_input"  # a stream tensor `readers` matmuls keep (one storage; autocast: a copy each)
WEIGHT_COPY = "weight_copy"  # autocast's half copy of a matmul weight (nothing outside autocast)

# Parts of the step (planner.activations.ActivationBreakdown's fields, less "_bytes").
INPUTS, ENCODER, DECODER, ROUTER, EXPERTS, EXPERT_COMBINE, LM_HEAD, LOSS = (
    "inputs", "encoder", "decoder", "router", "experts", "expert_combine", "lm_head", "loss")
AMP_WEIGHT_COPIES = "amp_weight_copies"


class GradientWalk:
    """Flags, backward FLOPs and saved tensors over a forward, for one set of trainable components."""

    def __init__(self, config: ChronosMoEConfig, trainable: frozenset[str]) -> None:
        self.config, self.trainable, self.flops = config, trainable, 0
        self._recording: Optional[Counter] = None

    def keep(self, part: str, role: str, elements: int, readers: int = 1) -> None:
        """An op saves a tensor of `elements` for backward (`readers` matmuls, for MATMUL_INPUT). Counted by
        subclasses (planner.activations); the FLOP count ignores it. Linear in `elements`."""

    def _save(self, part: str, role: str, elements: int, readers: int = 1) -> None:
        if self._recording is None:
            self.keep(part, role, elements, readers)
        else:
            self._recording[(part, role, readers)] += elements

    def _record(self, run: Callable[[], bool]) -> tuple[bool, int, Counter]:
        """Run part of the walk apart: (its result, its FLOPs, its saved elements by (part, role, readers))."""
        flops, self.flops, self._recording = self.flops, 0, Counter()
        try:
            return run(), self.flops, self._recording
        finally:
            self.flops, self._recording = flops, None

    def _replay(self, recorded: tuple[bool, int, Counter], times: int) -> None:
        _, flops, saved = recorded
        self.flops += times * flops
        for (part, role, readers), elements in saved.items():
            self.keep(part, role, times * elements, readers)

    def trains(self, component: str) -> bool:
        return component in self.trainable

    # --- ops ----------------------------------------------------------------------------------------------

    def linear(self, x: bool, component: str, rows: int, d_in: int, d_out: int, part: str, *,
               saves: Optional[str] = MATMUL_INPUT, weights: int = 1) -> bool:
        """A Linear of `component` (`weights` copies: the running experts) over `rows` rows: weight gradient
        if it trains, input gradient if its input requires grad. It keeps its input (of role `saves`; None:
        the caller keeps an input several matmuls share) when the weight trains, and autocast's half copy of
        its weight when its input requires grad. Its output requires grad if either does."""
        weight = self.trains(component)
        self.flops += count_linear_flops(rows, d_in, d_out) * (int(weight) + int(x))
        if weight and saves is not None:
            self._save(part, saves, rows * d_in)
        if x:
            self._save(AMP_WEIGHT_COPIES, WEIGHT_COPY, weights * d_in * d_out)
        return x or weight

    def product(self, a: bool, b: bool, flops: int, part: str, a_elements: int, b_elements: int) -> bool:
        """A batched product of two activations (attention): the gradient of each operand that requires grad,
        which reads the other operand; bmm keeps (a copy of) each operand the other's gradient needs."""
        self.flops += flops * (int(a) + int(b))
        if b:
            self._save(part, COMPUTE, a_elements)
        if a:
            self._save(part, COMPUTE, b_elements)
        return a or b

    def with_parameter(self, x: bool, component: str) -> bool:
        """Elementwise work with a parameter of `component` (a norm's weight, a bias)."""
        return x or self.trains(component)

    def unary(self, x: bool, part: str, role: str, elements: int) -> bool:
        """ReLU (keeps its output), softmax (its fp32 output), dropout (its mask): only on a graph node."""
        if x:
            self._save(part, role, elements)
        return x

    def t5_norm(self, x: bool, tokens: int, component: str, part: str) -> bool:
        """T5LayerNorm: input, fp32 copy of a half input and rsqrt for the input's gradient; the normalised
        tensor for its weight's."""
        d = self.config.dims.d_model
        if x:
            self._save(part, STREAM, tokens * d)
            self._save(part, STREAM_FP32_COPY, tokens * d)
            self._save(part, FLOAT32, tokens)
        if self.trains(component):
            self._save(part, STREAM, tokens * d)
        return self.with_parameter(x, component)

    def top_k(self, logits: bool, rows: int, part: str) -> bool:
        """route_top_k and the layer's balance loss: the fp32 softmax, the top-K indices, the K probabilities
        and their sum (the renormalising division), and the E slot shares fᵢ (the product with P̄ᵢ)."""
        config = self.config
        if logits:
            self._save(part, FLOAT32, rows * config.num_experts + rows * config.top_k + rows + config.num_experts)
            self._save(part, INDEX, rows * config.top_k)
        return logits

    def combine(self, outputs: bool, weights: bool, rows: int, slots: int, elements: int, role: str,
                part: str) -> bool:
        """Weighting and summing the experts' outputs of `elements` each (model.dispatch) over `slots` expert
        runs of one row each. Sparse: the gathered weights (kept when the outputs require grad), the slot
        order gathering them and the outputs (when the weights do), the row indices of the gather and the
        scatter-add and its weighted source (when that does). Dense: every expert's output, and the (rows, E)
        weights' columns (a copy per expert once cast)."""
        mixed = outputs or weights
        if self.config.dispatch == "dense":
            experts = self.config.num_experts
            if weights:
                self._save(part, role, experts * rows * elements)
            if outputs:
                self._save(part, role, experts * rows)
            return mixed
        if outputs:
            self._save(part, role, slots)
        if weights:
            self._save(part, INDEX, slots)
            self._save(part, role, slots * elements)
        if mixed:
            self._save(part, INDEX, slots)
            self._save(part, role, slots * elements)
        return mixed

    # --- T5 pieces ----------------------------------------------------------------------------------------

    def attention(self, h: bool, rows: int, q_len: int, kv_len: int, attention: str, norm: str, bias: bool,
                  part: str, *, kv_input: Optional[bool] = None, weights: int = 1) -> bool:
        """A T5 attention sublayer (pre-norm, residual); `kv_input` is the encoder output for cross-attention
        (its k and v keep it: the decoder counts it once)."""
        dims = self.config.dims
        d, width = dims.d_model, dims.attention_width
        q_tokens, kv_tokens = rows * q_len, rows * kv_len
        scores = rows * dims.num_heads * q_len * kv_len
        n = self.t5_norm(h, q_tokens, norm, part)
        if self.trains(attention):  # q, k and v (q alone for cross-attention) keep the norm's output
            self._save(part, MATMUL_INPUT, q_tokens * d, readers=3 if kv_input is None else 1)
        q = self.linear(n, attention, q_tokens, d, width, part, saves=None, weights=weights)
        source = n if kv_input is None else kv_input
        k = self.linear(source, attention, kv_tokens, d, width, part, saves=None, weights=weights)
        v = self.linear(source, attention, kv_tokens, d, width, part, saves=None, weights=weights)
        half = count_attention_core_flops(self.config, rows, q_len, kv_len) // 2  # Q·Kᵀ, then P·V
        logits = self.product(q, k, half, part, q_tokens * width, kv_tokens * width) or bias
        probabilities = self.unary(self.unary(logits, part, FLOAT32, scores), part, COMPUTE_MASK, scores)
        context = self.product(probabilities, v, half, part, scores, kv_tokens * width)
        out = self.linear(context, attention, q_tokens, width, d, part, saves=COMPUTE, weights=weights)
        return self.unary(out, part, COMPUTE_MASK, q_tokens * d) or h

    def ffn(self, h: bool, tokens: int, ffn: str, norm: str, part: str, weights: int = 1) -> bool:
        """T5LayerFF with T5DenseActDense: norm, wi, ReLU, dropout, wo, dropout, residual."""
        dims = self.config.dims
        n = self.t5_norm(h, tokens, norm, part)
        hidden = self.linear(n, ffn, tokens, dims.d_model, dims.d_ff, part, weights=weights)
        hidden = self.unary(self.unary(hidden, part, COMPUTE, tokens * dims.d_ff), part, COMPUTE_MASK,
                            tokens * dims.d_ff)
        out = self.linear(hidden, ffn, tokens, dims.d_ff, dims.d_model, part, saves=COMPUTE, weights=weights)
        return self.unary(out, part, COMPUTE_MASK, tokens * dims.d_model) or h

    def token_experts(self, h: bool, tokens: int, norm: str) -> bool:
        """A token_ffn MoE FFN: router Linear(D→E), the expert FFNs on their slots, the weighted sum."""
        config, dims = self.config, self.config.dims
        dense = config.dispatch == "dense"
        n = self.t5_norm(h, tokens, norm, EXPERTS)
        readers = int(self.trains("router")) + (config.num_experts * int(self.trains("expert_ffn")) if dense else 0)
        if readers:  # the router (and, dense, every expert) reads the norm's output
            self._save(EXPERTS, MATMUL_INPUT, tokens * dims.d_model, readers=readers)
        logits = self.linear(n, "router", tokens, dims.d_model, config.num_experts, ROUTER, saves=None)
        weights = self.top_k(logits, tokens, ROUTER)
        slots = count_expert_slots(config, tokens)
        running = count_running_experts(config, tokens)
        hidden = self.linear(n, "expert_ffn", slots, dims.d_model, dims.d_ff, EXPERTS,
                             saves=None if dense else MATMUL_INPUT, weights=running)  # sparse: the gathered rows
        hidden = self.unary(self.unary(hidden, EXPERTS, COMPUTE, slots * dims.d_ff), EXPERTS, COMPUTE_MASK,
                            slots * dims.d_ff)
        outputs = self.linear(hidden, "expert_ffn", slots, dims.d_ff, dims.d_model, EXPERTS, saves=COMPUTE,
                              weights=running)
        mixed = self.combine(outputs, weights, tokens, slots, dims.d_model, COMPUTE, EXPERT_COMBINE)
        return self.unary(mixed, EXPERTS, COMPUTE_MASK, tokens * dims.d_model) or h

    def stack(self, h: bool, rows: int, length: int, prefix: str, moe_blocks: tuple[int, ...], part: str, *,
              encoder: tuple[bool, int] | None = None, expert: bool = False, copies: int = 1) -> bool:
        """A T5 stack from its embedding's output `h`: dropout, blocks, the final norm and dropout. A decoder
        gets `encoder` = (whether the encoder output requires grad, its length); `expert` names every
        parameter `expert_encoder` (the expert_only experts' encoder stacks, `copies` of them running)."""
        def component(name: str) -> str:
            return "expert_encoder" if expert else f"{prefix}_{name}"

        dims = self.config.dims
        tokens = rows * length
        h = self.unary(h, part, STREAM_MASK, tokens * dims.d_model)
        bias = self.trains(component("position_bias"))  # computed in block 0, added in every block
        if bias:  # the bias embedding keeps its bucket ids, once per stack
            self._save(part, INDEX, copies * length * length)
        if encoder is not None and self.trains(component("cross_attention")):
            # The encoder output, read by the k and v projections of every block's cross-attention.
            self._save(part, MATMUL_INPUT, rows * encoder[1] * dims.d_model, readers=2 * dims.num_decoder_layers)
        self_attention = component("attention" if encoder is None else "self_attention")
        norm = component("norm")

        def block(moe: bool, h: bool) -> bool:
            h = self.attention(h, rows, length, length, self_attention, norm, bias, part, weights=copies)
            if encoder is not None:  # cross-attention: no position bias; k and v read the encoder output
                encoder_output, encoder_len = encoder
                h = self.attention(h, rows, length, encoder_len, component("cross_attention"), norm, False, part,
                                   kv_input=encoder_output)
            return self.token_experts(h, tokens, norm) if moe \
                else self.ffn(h, tokens, component("ffn"), norm, part, weights=copies)

        # A block depends only on its FFN's kind and on whether its input requires grad: walk each distinct
        # one once, and count it as many times as it occurs (large has 24 blocks a stack, at most 4 distinct).
        blocks: dict[tuple[bool, bool], tuple[bool, int, Counter]] = {}
        occurrences: Counter = Counter()
        for index in range(dims.num_layers if encoder is None else dims.num_decoder_layers):
            key = (index in moe_blocks, h)
            if key not in blocks:
                blocks[key] = self._record(lambda: block(*key))
            occurrences[key] += 1
            h = blocks[key][0]
        for key, times in occurrences.items():
            self._replay(blocks[key], times)
        return self.unary(self.t5_norm(h, tokens, norm, part), part, STREAM_MASK, tokens * dims.d_model)

    # --- the three architectures and the dense model ------------------------------------------------------

    def context_router(self, x: bool, rows: int, length: int) -> bool:
        """ContextRouter: masked-mean pooling (keeps the float mask and the count), Linear → ReLU → Dropout
        → Linear, top-K; True when the routing weights require grad."""
        config, d, hidden = self.config, self.config.dims.d_model, self.config.router_hidden_dim
        if x:
            self._save(ROUTER, STREAM, rows * length + rows)
        h = self.linear(x, "router", rows, d, hidden, ROUTER)
        h = self.unary(self.unary(h, ROUTER, COMPUTE, rows * hidden), ROUTER, COMPUTE_MASK, rows * hidden)
        logits = self.linear(h, "router", rows, hidden, config.num_experts, ROUTER, saves=COMPUTE)
        return self.top_k(logits, rows, ROUTER)

    def expert_inputs(self, x: bool, component: str, rows: int, elements: int) -> Optional[str]:
        """What the experts' first matmuls keep of their input: sparse, each the rows gathered for it (the
        Linear keeps them: role returned); dense, every expert reads the one ungathered tensor (kept here)."""
        if self.config.dispatch == "sparse":
            return MATMUL_INPUT
        if self.trains(component):
            self._save(EXPERTS, MATMUL_INPUT, rows * elements, readers=self.config.num_experts)
        return None

    def training_forward(self, workload: Workload) -> bool:
        """Walk one teacher-forced forward; True when the loss requires grad (something trainable reaches it)."""
        config, dims = self.config, self.config.dims
        b, s, t = workload.batch_size, workload.encoder_tokens, workload.decoder_tokens
        architecture = config.architecture if config.is_moe else "dense"
        embedded = self.trains("embedding")
        if embedded:  # the embedding keeps the encoder's and the decoder's token ids
            self._save(INPUTS, INDEX, b * (s + t))
        # Sample-level routing: B·X expert runs of one series each, on at most `running` distinct experts.
        slots, running = (b * experts_run(config), count_running_experts(config, b)) if config.is_moe else (0, 0)
        weights = False
        if architecture == "expert_only":
            weights = self.context_router(embedded, b, s)
            encoded = self.stack(embedded, slots, s, "encoder", (), EXPERTS, expert=True, copies=running)
            encoder_output = self.combine(encoded, weights, b, slots, s * dims.d_model, STREAM, EXPERT_COMBINE)
        else:
            encoder_output = self.stack(embedded, b, s, "encoder", config.token_moe_encoder_blocks, ENCODER)
            if architecture == "shared_then_expert":
                weights = self.context_router(encoder_output, b, s)
        decoded = self.stack(embedded, b, t, "decoder", config.token_moe_decoder_blocks, DECODER,
                             encoder=(encoder_output, s))
        if architecture in ("dense", "token_ffn"):  # the tied head reads the output scaled by D^-0.5
            logits = self.linear(decoded, "embedding", b * t, dims.d_model, dims.vocab_size, LM_HEAD)
        elif architecture == "expert_only":
            saves = self.expert_inputs(decoded, "expert_head", b, t * dims.d_model)
            heads = self.linear(decoded, "expert_head", slots * t, dims.d_model, dims.vocab_size, EXPERTS,
                                saves=saves, weights=running)
            logits = self.combine(heads, weights, b, slots, t * dims.vocab_size, COMPUTE, EXPERT_COMBINE)
        else:
            logits = self.combine(self.expert_heads(decoded, b, t, slots, running), weights, b, slots,
                                  t * dims.vocab_size, COMPUTE, EXPERT_COMBINE)
        if logits:  # the cross-entropy keeps the fp32 log-probabilities, the NLL's total weight, the targets
            self._save(LOSS, FLOAT32, b * t * dims.vocab_size + 1)
            self._save(INPUTS, INDEX, b * t)
        return logits  # the routing weights also feed the balance losses, which keep what top_k counts

    def expert_heads(self, decoded: bool, batch: int, dec: int, slots: int, running: int) -> bool:
        """shared_then_expert's MoEExpertHead on every slot's T decoder positions: fc1 → ReLU → Dropout →
        fc2 → Dropout → + input → LayerNorm → lm_head."""
        dims, hidden = self.config.dims, self.config.expert_head_hidden_dim
        tokens = slots * dec
        saves = self.expert_inputs(decoded, "expert_head", batch, dec * dims.d_model)
        x = self.linear(decoded, "expert_head", tokens, dims.d_model, hidden, EXPERTS, saves=saves, weights=running)
        x = self.unary(self.unary(x, EXPERTS, COMPUTE, tokens * hidden), EXPERTS, COMPUTE_MASK, tokens * hidden)
        x = self.linear(x, "expert_head", tokens, hidden, dims.d_model, EXPERTS, saves=COMPUTE, weights=running)
        x = self.unary(x, EXPERTS, COMPUTE_MASK, tokens * dims.d_model) or decoded  # residual
        if self.with_parameter(x, "expert_head"):  # nn.LayerNorm: input, mean and rstd
            self._save(EXPERTS, STREAM, tokens * dims.d_model)
            self._save(EXPERTS, NORM_STATISTICS, 2 * tokens)
        x = self.with_parameter(x, "expert_head")
        return self.linear(x, "expert_head", tokens, dims.d_model, dims.vocab_size, EXPERTS, weights=running)


def count_backward_flops(config: ChronosMoEConfig, workload: Workload) -> int:
    """FLOPs of the backward of one training step under `workload.trainable` (see the module docstring)."""
    walk = GradientWalk(config, trainable_components(workload.trainable))
    walk.training_forward(workload)
    return walk.flops
