"""Activation bytes saved for backward in one training step (conventions.md, Memory: Activations).

A teacher-forced forward with labels, `model.train()` (Chronos trains with dropout 0.1), eager attention.
The analytic count follows Korthikanti et al. 2022 (arXiv:2205.05198) per-layer bookkeeping for one stack,
adds the encoder-decoder cross-attention terms, and is written term by term from what each op of the real
modules saves (transformers' modeling_t5.py and model/). The ops and their rules are planner.backward's
walk, the one place that decides which tensors require grad; this module gives each saved tensor its width.
With every parameter training (`all`):

- T5LayerNorm saves its input (and an fp32 copy when it is half), the fp32 rsqrt statistic and the
  normalised tensor; its output is saved by the linear layers that read it.
- Eager attention saves copies of q, kᵀ and v (reshaped for bmm), the fp32 softmax, the dropout mask and
  the dropped probabilities (three B·H·Lq·Lk tensors), and the input of the output projection.
- Dropout saves a mask: a bool on CUDA (native_dropout), a tensor of the data's dtype on CPU.
- Sparse dispatch saves, per routing slot, two int64 indices (the slot's place in the expert-sorted order, which
  gathers its weight, and its row, which gathers the input and adds the output back), the gathered input,
  the expert output (multiplied by its weight) and the weighted output (index_add keeps its source).
- Cross-entropy over (B·T, V) keeps the fp32 log-probabilities: often the largest single tensor.
- Under autocast, every matmul weight's half copy.

Fine-tuning regimes (`workload.trainable`): an op saves only when some input requires grad, i.e. depends on a
trainable parameter, and only what the gradients it computes read. So:
- ops on no path from a trainable parameter to the loss (below the lowest trainable one) save nothing;
- a Linear keeps its input only when its weight trains; the embedding keeps the token ids only when it
  trains (the loss keeps the targets always);
- frozen ops downstream keep only what passes the gradient down: ReLU and softmax outputs, dropout masks,
  a norm's input and rsqrt (its normalised tensor only when its weight trains), the other operand of each
  attention product, and under autocast the half copy of each matmul weight whose input requires grad
  (frozen or not; none where the input requires no grad);
- weighting the experts keeps their outputs only when the routing weights require grad.
Hence, under `experts`: on shared_then_expert only the expert heads, their dispatch and the loss save (under
`experts_and_router` the router too: its Linears keep their inputs, its pooling nothing, the frozen encoder
output needing no gradient); on expert_only the expert encoders, the heads and the shared decoder's
gradient-passing tensors (not the encoder output its frozen cross-attention reads); on token_ffn nothing
before the first MoE FFN. Under `router`: the routers and what lies between them and the loss, on the
sample-level architectures the frozen experts' outputs the weights' gradient reads (the heads' logits,
B·K·T·V). `all` is the count above, unchanged.

`planner.measure.measure_saved_activation_bytes` counts what the hooks see: every distinct storage saved for backward,
once, excluding parameters and buffers (those are weights). The analytic count equals it on CPU in fp32,
pure bf16 and autocast, for every regime (tests/test_activations.py); on CUDA it assumes bool dropout masks
and fp32 LayerNorm statistics (what those kernels save), which no test here can measure without a GPU.

Data-dependent parts are bounded from above: the experts that run (each running expert encoder keeps its
own S×S position buckets when the expert encoders train; under AMP each keeps half copies of its weights
where their inputs require grad) are taken as min(E, B·K), or min(E, tokens·K) per token_ffn block; with a
capacity factor every expert is taken as filled to capacity, min(tokens·K, E·capacity) slots. With one
series (the Chronos default) sample-level routing runs exactly K experts, and the count is exact. (In a
training step the experts nobody chose are called too, on zero rows, so that they get zero gradients; they
compute nothing and save nothing: model.experts.empty_rows.)

Letters: B series, S encoder tokens, T decoder tokens, D d_model, F d_ff, H heads, A = H·Dk attention
width, V vocabulary, E experts, K active experts, R router hidden width, n rows or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from model.checks import SettingError
from model.config import ChronosMoEConfig
from model.trainable import trainable_components
from planner import backward
from planner.backward import GradientWalk
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
    experts_bytes: int  # expert heads / expert encoders / token expert FFNs on the slots routed to them
    expert_combine_bytes: int  # weighting and summing each row's K expert outputs (where the row's batch is)
    lm_head_bytes: int  # the dense tied head's input
    loss_bytes: int  # fp32 log-probabilities of the cross-entropy
    amp_weight_copies_bytes: int  # AMP only: the half copies of matmul weights autocast casts and keeps

    @property
    def total_bytes(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


# --- the whole step ---------------------------------------------------------------------------------------


class _SavedBytesWalk(GradientWalk):
    """planner.backward's walk, adding up the bytes of what each op saves, by part."""

    def __init__(self, config: ChronosMoEConfig, trainable: frozenset[str], widths: ActivationWidths) -> None:
        super().__init__(config, trainable)
        w = widths
        self.widths = w
        self.bytes_per_element = {
            backward.INDEX: INDEX_BYTES,
            backward.FLOAT32: FLOAT32_BYTES,
            backward.STREAM: w.stream,
            backward.COMPUTE: w.compute,
            backward.STREAM_MASK: w.mask(w.stream),
            backward.COMPUTE_MASK: w.mask(w.compute),
            backward.STREAM_FP32_COPY: FLOAT32_BYTES if w.stream < FLOAT32_BYTES else 0,
            backward.NORM_STATISTICS: w.layer_norm_statistics(),
            backward.WEIGHT_COPY: w.compute if w.amp else 0,
        }
        self.bytes = {f.name.removesuffix("_bytes"): 0 for f in fields(ActivationBreakdown)}

    def keep(self, part: str, role: str, elements: int, readers: int = 1) -> None:
        if role == backward.MATMUL_INPUT:
            per_element = self.widths.matmul_inputs(self.widths.stream, readers)
        else:
            per_element = self.bytes_per_element[role]
        self.bytes[part] += elements * per_element


def estimate_activation_breakdown(config: ChronosMoEConfig, workload: Workload,
                                  *, device: str = "cuda") -> ActivationBreakdown:
    """Bytes saved for backward by one teacher-forced training step, by part, in the workload's precision,
    with the parameters `workload.trainable` names learning (see the module docstring).

    `device` fixes the dropout masks' width: "cuda" (bool masks) or "cpu" (masks of the data's dtype).
    """
    walk = _SavedBytesWalk(config, trainable_components(workload.trainable),
                           activation_widths(workload.precision, device))
    walk.training_forward(workload)
    return ActivationBreakdown(**{f"{part}_bytes": value for part, value in walk.bytes.items()})


def estimate_activation_bytes(config: ChronosMoEConfig, workload: Workload, *, device: str = "cuda") -> int:
    """Total bytes saved for backward by one training step (see `estimate_activation_breakdown`)."""
    return estimate_activation_breakdown(config, workload, device=device).total_bytes


def estimate_loss_backward_transient_bytes(config: ChronosMoEConfig, workload: Workload,
                                           *, device: str = "cuda") -> int:
    """Bytes the loss holds at the start of the backward beyond what is saved for it: the step's peak for
    the activations, when every saved tensor is still alive.

    The (B, T, V) logits (in the compute width; the step's output keeps them, none of the ops saves them),
    and while log-softmax runs its backward both the gradient of the fp32 log-probabilities (nll_loss's
    backward writes it, B·T·V fp32) and the fp32 gradient of the logits it computes from it: B·T·V ×
    (compute + 2 × 4) bytes (12 in fp32). The fp32 log-probabilities themselves are saved (`loss_bytes`).
    Under autocast or bf16 the fp32 copy of the logits that the loss reads is freed after the forward, and
    the cast's half gradient comes after the fp32 one's peak. Checked against torch's memory tracker in
    tests/test_parallel.py."""
    elements = workload.batch_size * workload.decoder_tokens * config.dims.vocab_size
    return elements * (activation_widths(workload.precision, device).compute + 2 * FLOAT32_BYTES)
