"""Measuring the real modules: parameters on the meta device, FLOPs with FlopCounterMode and fvcore.

The analytic counting modules (params, flops, memory, activations) never import torch; what they count is
measured here, for verify.py and the tests.

Shape-only execution. Counting FLOPs needs the real code path (real routing, real dispatch, real KV cache),
but FLOP counters read only the shapes of the matrix products, never their values. `build_shape_only`
builds the modules on the meta device and gives every parameter a single broadcast number (so even large
with 16 expert encoders takes no memory), and `ShapeOnlyMatmuls` runs every op for real except the matrix
products FlopCounterMode counts, whose outputs are random numbers of the exact shape and dtype. Routing,
gather/scatter and sampling then run on real (random) values, at a small fraction of the arithmetic.
The tests check that counts taken this way equal counts of fully computed runs, for every architecture.

Counters: FlopCounterMode for the forward and the training step (it counts the real backward), with dropout
off (elementwise; its mask draws cost more than the counting); fvcore for the forward (MACs × 2, its norm
handles off); for the forecast, whose thousands of small decoder ops FlopCounterMode's per-op decomposition
and module tracking make slow, `MatmulFlopCounter` (or, shape-only, `ShapeOnlyMatmuls`), which apply
FlopCounterMode's own per-op formulas (`torch.utils.flop_counter.flop_registry`); the tests check they agree.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, ContextManager, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from model.build import build_model_from_config
from model.chronos_moe import ChronosMoEModel
from model.config import ChronosMoEConfig
from model.components import component_of_param
from planner.workload import Workload

# fvcore's FlopCountAnalysis counts one fused multiply-add as one "flop"; the project counts 2 (conventions.md).
FVCORE_FLOPS_PER_MAC = 2
# fvcore also counts normalisations (5 per element for an affine LayerNorm); the convention counts matrix
# products only, so these handles are switched off (MoEExpertHead's LayerNorm is the one that runs here).
FVCORE_NORM_OPS = ("aten::batch_norm", "aten::group_norm", "aten::instance_norm", "aten::layer_norm")
UNKNOWN_COMPONENT = "unknown"


def measure_params(config: ChronosMoEConfig) -> tuple[dict[str, int], int]:
    """Parameters of the real modules built on the meta device, by breakdown component (unique tensors:
    `named_parameters` yields a tied tensor once; names the planner does not know count as "unknown"),
    and the parameters of one expert (expert 0; of every token-MoE block together for token_ffn)."""
    model = build_model_from_config(config, device="meta")
    counts: Counter[str] = Counter()
    for name, parameter in model.named_parameters():
        counts[component_of_param(name) or UNKNOWN_COMPONENT] += parameter.numel()
    if model.experts is not None:
        expert_modules = [model.experts[0]]
    else:
        expert_modules = [layer.experts[0] for _, layer in model.token_moe_layers()]
    one_expert = sum(p.numel() for module in expert_modules for p in module.parameters())
    return dict(counts), one_expert


def build_shape_only(config: ChronosMoEConfig) -> ChronosMoEModel:
    """The real modules with every parameter a broadcast scalar (stride 0) and zero buffers.

    Meant for `ShapeOnlyMatmuls`: the values never reach a counted product. Tied parameters stay tied.
    Gradients are dropped as soon as they are accumulated, so a training step holds one at a time.
    """
    model = build_model_from_config(config, device="meta")
    replacements: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            if id(parameter) not in replacements:
                value = torch.full((), 0.02, dtype=parameter.dtype).expand(parameter.shape)
                replacement = nn.Parameter(value, requires_grad=parameter.requires_grad)
                replacement.register_post_accumulate_grad_hook(_drop_grad)
                replacements[id(parameter)] = replacement
            module._parameters[name] = replacements[id(parameter)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)
    return model


def _drop_grad(parameter: torch.Tensor) -> None:
    parameter.grad = None


class MatmulFlopCounter(TorchDispatchMode):
    """FLOPs of every op by FlopCounterMode's own formulas (flop_registry), without its module tracking."""

    def __init__(self) -> None:
        super().__init__()
        self.total_flops = 0

    def _count(self, func, args, kwargs, out) -> None:
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            self.total_flops += formula(*args, **kwargs, out_val=out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._count(func, args, kwargs, out)
        return out


def _meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


class ShapeOnlyMatmuls(MatmulFlopCounter):
    """Every op runs for real except the products FlopCounterMode counts, which return random N(0, 1)
    numbers of the shape and dtype their meta kernel gives (and are counted, as MatmulFlopCounter does),
    and dropout's mask draws, which keep everything.

    Under FlopCounterMode, enter this mode first (outside), so the counter sees each product with its real
    arguments before this mode answers it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pool = torch.randn(1 << 20)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.bernoulli_.float:
            return args[0].fill_(1.0)  # a dropout mask: its random draws cost more than the rest of dropout
        if func.overloadpacket not in flop_registry:
            return func(*args, **kwargs)
        shaped = func(*tree_map(_meta, args), **tree_map(_meta, kwargs))
        self._count(func, args, kwargs, shaped)
        if shaped.numel() > self._pool.numel():
            self._pool = torch.randn(max(shaped.numel(), 2 * self._pool.numel()))
        # A copy, not a view of the pool: autograd tracks in-place updates per tensor.
        return self._pool[: shaped.numel()].to(shaped.dtype).view(shaped.shape).clone()


def execution(shape_only: bool) -> ContextManager:
    """The mode to run a measurement in: shape-only execution, or plain (fully computed) execution."""
    return ShapeOnlyMatmuls() if shape_only else contextlib.nullcontext()


def token_batch(config: ChronosMoEConfig, workload: Workload, generator: Optional[torch.Generator] = None):
    """Random (input_ids, attention_mask, labels) at the training shapes: (B, S), (B, S), (B, T)."""
    b, s, t, v = workload.batch_size, workload.encoder_tokens, workload.decoder_tokens, config.dims.vocab_size
    input_ids = torch.randint(2, v, (b, s), generator=generator)  # ids 0, 1 are pad and EOS
    labels = torch.randint(2, v, (b, t), generator=generator)
    return input_ids, torch.ones_like(input_ids), labels


def measure_forward_and_train_flops(model: ChronosMoEModel, batch, shape_only: bool = False) -> tuple[int, int]:
    """FlopCounterMode totals after the teacher-forced forward with labels and after its backward."""
    input_ids, attention_mask, labels = batch
    model.eval()  # dropout is elementwise (not counted) and its random masks cost more than the counting
    with execution(shape_only), FlopCounterMode(display=False) as counter:
        loss = model(input_ids, attention_mask, labels=labels).loss
        forward_flops = counter.get_total_flops()
        loss.backward()
        train_flops = counter.get_total_flops()
    return forward_flops, train_flops


def measure_forecast_flops(model: ChronosMoEModel, workload: Workload, generator: Optional[torch.Generator] = None,
                           shape_only: bool = False) -> int:
    """FLOPs of one real `model.forecast` over B random series of the workload's context length."""
    context = torch.rand(workload.batch_size, workload.context_length, generator=generator) * 10 + 1
    with ShapeOnlyMatmuls() if shape_only else MatmulFlopCounter() as counter:
        model.forecast(
            context,
            prediction_length=workload.prediction_length,
            num_samples=workload.num_samples,
            context_length=workload.context_length,
            generator=generator,
        )
    return counter.total_flops


class _LogitsOnly(nn.Module):
    """What fvcore traces: the forward returning one tensor (jit.trace cannot return the output object)."""

    def __init__(self, model: ChronosMoEModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        return self.model(input_ids, attention_mask, labels=labels).logits


def _not_counted(inputs: Any, outputs: Any) -> int:
    return 0


def measure_fvcore_forward_flops(model: ChronosMoEModel, batch, shape_only: bool = False) -> tuple[int, dict[str, int], set[str]]:
    """fvcore's forward count converted to FLOPs, its unsupported ops (name → calls) and uncalled modules."""
    from fvcore.nn import FlopCountAnalysis

    model.eval()  # dropout is elementwise either way; eval keeps the trace deterministic
    analysis = FlopCountAnalysis(_LogitsOnly(model), batch)
    # A handle of None would not do: fvcore 0.1.5 then still runs its built-in norm handle.
    analysis.set_op_handle(**{op: _not_counted for op in FVCORE_NORM_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with execution(shape_only):
        macs = analysis.total()  # traces (runs) the model
    return FVCORE_FLOPS_PER_MAC * macs, dict(analysis.unsupported_ops()), set(analysis.uncalled_modules())


def measure_saved_activation_bytes(model, input_ids, attention_mask, labels) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward with labels.

    Counted once per storage (a tensor saved by several ops, or views of one buffer, count once);
    parameters and buffers are excluded (they are weights, not activations). Everything else counts:
    activations, dropout masks, index tensors, and under autocast the half copies of the weights.
    The model runs in train mode (dropout active) and is put back in its previous mode; wrap the call in
    `torch.autocast` to measure an AMP step. No backward is run.
    """
    weights = {(t.device, t.untyped_storage().data_ptr()) for t in [*model.parameters(), *model.buffers()]}
    saved_bytes: dict[tuple, int] = {}
    kept_alive = []  # while the forward runs, no counted storage may be freed and its address reused

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if key not in weights and key not in saved_bytes:
            saved_bytes[key] = storage.nbytes()
            kept_alive.append(tensor)
        # Detached: a saved tensor that is the graph's own output would keep the graph (and with it every
        # saved tensor) alive in a cycle Python cannot collect; no backward runs, so nothing needs the link.
        return tensor.detach()

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    finally:
        model.train(was_training)
        kept_alive.clear()
    return sum(saved_bytes.values())
