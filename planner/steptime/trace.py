"""The ops one step dispatches, recorded from the real code path by shape-only execution (performance.md).

`trace_step(config, workload, mode)` runs one step of the real modules — a teacher-forced forward, a
training step (forward, balance loss, backward, AdamW step) or a forecast (the encoder once, then every
decoding step with the KV cache and the sampling) — under `OpRecorder`, a TorchDispatchMode that sees every
ATen op after autograd, the ops the backward runs included. Each op is recorded with its FLOPs (by
FlopCounterMode's own formulas), the bytes it reads and writes, its dtype and its kind:

- `matmul`: the products FlopCounterMode counts (mm, addmm, bmm, baddbmm, ...), with their GEMM shape;
- `memory`: everything else that touches data: elementwise, reductions, softmax, copies, cat,
  index/gather/scatter, factories;
- `view`: metadata only (view, transpose, expand, slice, ...): no bytes, only the dispatch;
- `sync`: the host waits for the device: `nonzero`, `.item()`, `.tolist()`, boolean-mask indexing;
- `collective`: torch.distributed's ops (none in one process).

Execution is shape-only (`planner.measure.ShapeOnlyMatmuls`: products answered with random numbers of the
right shape, parameters broadcast scalars; `LeanShapeOnly`: outputs above 32 MiB, and every output of the
backward, made, not computed; what the forward saves for the backward kept as shapes only), so large sizes
trace in seconds and under a GB at any batch, and the trace does not depend on the device. Bytes are what a kernel addresses: a parameter counts in full (in a real model it is a full
tensor), an index op reads only the rows it gathers, a broadcast input only its distinct elements, an
`empty` writes nothing.

The optimizer step is traced on meta tensors of the shapes that received gradients (AdamW, single-tensor
implementation: PyTorch's default for CPU tensors; its step counter lives on the host, so its `.item()` is
not a device sync). Identical ops are merged with a count; traces are cached per variant and workload
(`load_or_trace`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Callable, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

from model.checks import SettingError
from model.config import ChronosMoEConfig
from model.trainable import set_trainable
from planner.bench.device import TORCH_DTYPES
from planner.bench.memory_probe import pin_allocator, settle_allocator
from planner.bench.timing import PAGE_BYTES, minor_faults
from planner.measure import ShapeOnlyMatmuls, _meta, build_shape_only, token_batch
from planner.steptime.devices import SCATTER_OPS, in_elementwise_class
from planner.steptime.layouts import inner_run, inner_stride
from planner.steptime.ops import OpRecord, StepTrace, first_phase

MODES = ("forward", "train", "forecast")
# Ops that make the host wait for the device's values (data-dependent output shapes or a value to Python).
SYNC_OPS = frozenset({"nonzero", "_local_scalar_dense", "masked_select", "unique_consecutive", "_unique",
                      "_unique2", "unique_dim", "equal", "is_nonzero", "allclose"})
# Index ops read only what they gather: their output and their indices, not the whole source.
GATHER_OPS = frozenset({"embedding", "index", "index_select", "gather", "take"})
# Metadata-only ops PyTorch does not tag as views (and the profiler's range markers, namespace "profiler").
METADATA_OPS = frozenset({"_unsafe_view"})
# Counted fresh pages: a page fault maps one base page (transparent huge pages are only used on request, and
# PyTorch's CPU allocator does not ask by default); a few faults are the Python objects around an op, not it.
FRESH_COUNT_FLOOR_BYTES = 64 * 2**10
# What a shape-only step runs at most, to stop a runaway trace (the largest Chronos forecast runs ~60,000).
MAX_TRACED_OPS = 5_000_000


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _gemm_shape(name: str, args: tuple) -> Optional[tuple[int, int, int, int]]:
    """(batch, m, n, k) of a product: m×k times k×n, `batch` times."""
    if name in ("mm", "addmm"):
        left, right = (args[0], args[1]) if name == "mm" else (args[1], args[2])
        return 1, left.shape[0], right.shape[1], left.shape[1]
    if name in ("bmm", "baddbmm"):
        left, right = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        return left.shape[0], left.shape[1], right.shape[2], left.shape[2]
    return None


class OpRecorder(TorchDispatchMode):
    """Records every op it sees as an OpRecord (merged with a count at the end); `phase` labels them.

    Enter it inside ShapeOnlyMatmuls (this mode sees each op first, with its real arguments)."""

    def __init__(self, full_size_storages: set[int], count_fresh_pages: bool = False,
                 backward_layouts: bool = True) -> None:
        super().__init__()
        # Whether the backward's tensors are laid out as in a real step. In a shape-only one they are not: a
        # parameter is a broadcast scalar (all strides 0), so autograd's product formulas, which choose how to
        # lay out a weight's gradient by the weight's strides, transpose where a real step does not.
        self.backward_layouts = backward_layouts
        self.phase = "forward"
        # A real step: count the pages each op touches first (what the allocator hands out as new memory,
        # whatever its size: a heap trimmed between steps hands out new pages below the mmap threshold too).
        self.count_fresh_pages = count_fresh_pages
        self.records: Counter[OpRecord] = Counter()
        self.sync_exempt_phases: set[str] = set()
        self._full_size = full_size_storages  # storages of broadcast parameters: count them in full
        self._touched_in_optimizer: set[int] = set()  # storages an optimizer op has read or written

    def _bytes(self, tensor: torch.Tensor) -> int:
        """Bytes a kernel addresses in `tensor`: its distinct elements (a broadcast counts once)."""
        if tensor.device.type != "meta" and tensor.untyped_storage().data_ptr() in self._full_size:
            return tensor.numel() * tensor.element_size()
        distinct = 1
        for size, stride in zip(tensor.shape, tensor.stride()):
            if stride != 0:
                distinct *= size
        return distinct * tensor.element_size() if tensor.numel() else 0

    def _kind(self, func, name: str, args: tuple) -> str:
        if func.overloadpacket in flop_registry:
            return "matmul"
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            return "collective"
        if name in SYNC_OPS or (name == "index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))):
            return "memory" if self.phase in self.sync_exempt_phases else "sync"
        if func.is_view or name in METADATA_OPS or func.namespace == "profiler":
            return "view"
        return "memory"

    def record(self, func, args: tuple, kwargs: dict, out: Any, fresh_bytes: Optional[int] = None) -> None:
        name = func.overloadpacket.__name__
        kind = self._kind(func, name, args)
        outputs = _tensors(out)
        flops, read, written, gemm, index_rows, stride, run = 0, 0, 0, None, 0, 1, 0
        if kind == "matmul":
            flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
            gemm = _gemm_shape(name, args)
        if kind not in ("view",):
            inputs = _tensors((args, kwargs))
            indices = [t for t in inputs[1:] if not (t.is_floating_point() or t.dtype == torch.bool)]
            index_rows = sum(t.numel() for t in indices) if name in GATHER_OPS | SCATTER_OPS else 0
            if name in GATHER_OPS:
                read = sum(map(self._bytes, indices)) + sum(map(self._bytes, outputs))
            else:
                read = sum(map(self._bytes, inputs))
            written = 0 if "empty" in name else sum(map(self._bytes, outputs))
            if kind == "memory" and outputs and name not in GATHER_OPS | SCATTER_OPS and in_elementwise_class(name) \
                    and (self.phase != "backward" or self.backward_layouts):
                stride, run = inner_stride(inputs, outputs[0]), inner_run(inputs, outputs[0])
        first_touch = min(self._first_touch_bytes(inputs, outputs), read) \
            if self.phase == "optimizer" and kind != "view" else 0
        dtype = _dtype_name(outputs[0].dtype) if outputs else "none"
        pointwise = kind == "memory" and torch.Tag.pointwise in func.tags
        self.records[OpRecord(str(func), kind, self.phase, dtype, flops, read, written, gemm, pointwise,
                              index_rows, fresh_bytes, first_touch, stride, run)] += 1
        if sum(self.records.values()) > MAX_TRACED_OPS:
            raise RuntimeError(f"the step dispatched more than {MAX_TRACED_OPS:,} ops; refusing to trace further")

    def _first_touch_bytes(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> int:
        """Bytes of `inputs` whose storage no earlier optimizer op touched; then marks inputs and outputs touched
        (storages by their StorageImpl, which meta tensors have too)."""
        first = 0
        for tensor in inputs:
            storage = tensor.untyped_storage()._cdata
            if storage not in self._touched_in_optimizer:
                first += self._bytes(tensor)
                self._touched_in_optimizer.add(storage)
        self._touched_in_optimizer.update(tensor.untyped_storage()._cdata for tensor in outputs)
        return first

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.count_fresh_pages:
            out = func(*args, **kwargs)
            self.record(func, args, kwargs, out)
            return out
        faults = minor_faults()
        out = func(*args, **kwargs)
        fresh = (minor_faults() - faults) * PAGE_BYTES
        self.record(func, args, kwargs, out, fresh if fresh >= FRESH_COUNT_FLOOR_BYTES else 0)
        return out


class HostReads(TorchFunctionMode):
    """`.tolist()` reads a whole tensor to the host without an ATen op the dispatch mode could see."""

    def __init__(self, recorder: OpRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.tolist:
            tensor = args[0]
            size = tensor.numel() * tensor.element_size()
            counted = 0 if self.recorder.count_fresh_pages else None  # a read to Python makes no tensor
            self.recorder.records[OpRecord("Tensor.tolist", "sync", self.recorder.phase, _dtype_name(tensor.dtype),
                                           0, size, 0, None, fresh_bytes=counted)] += 1
        return out


def _shape_only_model(config: ChronosMoEConfig, dtype: str):
    model = build_shape_only(config)
    if dtype != "fp32":
        # Broadcast scalars cast at no cost; the step then runs in the inference dtype.
        for module in model.modules():
            for key, parameter in list(module._parameters.items()):
                if parameter is not None and parameter.is_floating_point():
                    module._parameters[key] = torch.nn.Parameter(
                        torch.full((), 0.02, dtype=TORCH_DTYPES[dtype]).expand(parameter.shape), requires_grad=False)
    return model


# Outputs larger than this are made, not computed, in a trace: glibc's settled mmap threshold, so they are new
# pages, which read as zeros and take no memory until written.
LEAN_ABOVE_BYTES = 32 * 2**20


def _tensor_bytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _untouched_like(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cpu")


class LeanShapeOnly(ShapeOnlyMatmuls):
    """ShapeOnlyMatmuls that also leaves large work undone, so a trace of a large model at a large batch
    takes seconds and little memory: an op whose largest output exceeds LEAN_ABOVE_BYTES — in the backward,
    any op — gets new, untouched tensors of the shapes its meta kernel gives (zeros when read above the
    threshold), and an in-place op on such a tensor returns it unchanged. Small tensors are computed: routing, sampling and every index come from them, so
    the ops a step dispatches, their shapes and their counts are those of full shape-only execution. Zeros
    are safe where large tensors feed decisions: a valid index, a uniform softmax, a finite loss; where they
    are not (multinomial refuses all-zero probabilities), tokens are drawn uniformly."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if func is torch.ops.aten.multinomial.default and _tensor_bytes(args[0]) > LEAN_ABOVE_BYTES:
            # Made probabilities are zeros, which multinomial refuses: draw the tokens uniformly instead.
            probabilities, draws = args[0], args[1]
            return torch.randint(0, probabilities.shape[-1], (*probabilities.shape[:-1], draws),
                                 generator=kwargs.get("generator"))
        # In the backward nothing is decided by values (routing happened in the forward): make every output.
        above = 0 if torch._C._current_autograd_node() is not None else LEAN_ABOVE_BYTES
        if schema.is_mutable:
            written = [value for value, argument in zip(args, schema.arguments)
                       if argument.alias_info is not None and argument.alias_info.is_write]
            written += [kwargs[argument.name] for argument in schema.arguments
                        if argument.name in kwargs and argument.alias_info is not None and argument.alias_info.is_write]
            if len(written) == 1 and len(schema.returns) == 1 and _tensor_bytes(written[0]) > above:
                return written[0]
            return super().__torch_dispatch__(func, types, args, kwargs)
        if any(r.alias_info is not None for r in schema.returns):
            return super().__torch_dispatch__(func, types, args, kwargs)  # views: no data
        if func.overloadpacket in flop_registry:
            shaped = func(*tree_map(_meta, args), **tree_map(_meta, kwargs))
            if _tensor_bytes(shaped) <= above:
                return super().__torch_dispatch__(func, types, args, kwargs)
            self._count(func, args, kwargs, shaped)
            return _untouched_like(shaped)
        try:
            shaped = func(*tree_map(_meta, args), **tree_map(_meta, kwargs))
        except (NotImplementedError, RuntimeError):  # no meta kernel, or a data-dependent shape: run it
            return super().__torch_dispatch__(func, types, args, kwargs)
        outputs, _ = tree_flatten(shaped)
        if max((_tensor_bytes(o) for o in outputs), default=0) <= above:
            return super().__torch_dispatch__(func, types, args, kwargs)
        return tree_map(_untouched_like, shaped)


def _full_size_storages(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def _trace_optimizer(recorder: OpRecorder, trained_shapes: list[torch.Size], foreach: bool) -> None:
    """One steady-state AdamW step (the second: the first also creates the moments) on meta tensors, in
    PyTorch's default implementation for the device: a loop over the parameters on CPU, `foreach` (a few
    multi-tensor kernels for all of them) on CUDA."""
    params = [torch.nn.Parameter(torch.empty(shape, device="meta")) for shape in trained_shapes]
    if not params:
        return
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=foreach)
    for param in params:
        param.grad = torch.empty_like(param)
    optimizer.step()
    recorder.phase = "optimizer"
    recorder.sync_exempt_phases.add("optimizer")
    recorder.count_fresh_pages = False  # meta tensors: no pages; the device's rule prices the optimizer's
    with recorder:
        optimizer.step()


def trace_step(config: ChronosMoEConfig, workload, mode: str, dtype: str = "fp32", seed: int = 0,
               foreach_optimizer: bool = False) -> StepTrace:
    """Trace one step of `mode` for `config` at `workload` by shape-only execution (see the module docstring).
    Random routing stands for a trained, balanced router. `foreach_optimizer`: AdamW as on a GPU."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if dtype not in TORCH_DTYPES:
        raise SettingError("dtype", f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = _shape_only_model(config, "fp32" if mode == "train" else dtype)
    if mode == "train":
        set_trainable(model, workload.trainable)  # frozen parameters: no gradient, no optimizer step
    batch = token_batch(config, workload, generator)
    parameters = _full_size_storages(model)

    def forget_values(tensor: torch.Tensor) -> torch.Tensor:
        """What the forward saves for the backward, kept as shapes only: the backward makes its outputs
        without reading them (LeanShapeOnly), so a step's activations never take memory. Parameters (their
        bytes are counted by storage) and integer tensors (indices) are kept."""
        if not tensor.is_floating_point() or tensor.untyped_storage().data_ptr() in parameters:
            return tensor
        with _disable_current_modes():  # not an op of the step: the recorder must not see it
            return _untouched_like(tensor)

    # Every block from 128 KiB up is its own mapping while tracing: a made tensor then stays untouched pages,
    # never a freed, resident block that a computed one would have reused.
    pin_allocator()
    try:
        with LeanShapeOnly(), torch.autograd.graph.saved_tensors_hooks(forget_values, lambda tensor: tensor):
            return record_step(model, batch, workload, mode, dtype, generator, foreach_optimizer,
                               backward_layouts=False)
    finally:
        settle_allocator()


def run_step(model, batch, workload, mode: str, dtype: str = "fp32", generator: Optional[torch.Generator] = None,
             on_backward: Callable[[], None] = lambda: None) -> None:
    """One step of `mode` on `model` for `batch` = (ids, mask, labels), as the bench runs it, less the
    optimizer: a no-grad forward with labels, a forward and backward of the loss (in `dtype` under
    autocast), or `sample_tokens`. `on_backward` is called between the forward and the backward."""
    input_ids, attention_mask, labels = batch
    train = mode == "train"
    autocast = contextlib.nullcontext()
    if train and dtype != "fp32":
        autocast = torch.autocast(next(model.parameters()).device.type, dtype=TORCH_DTYPES[dtype])
    if model.training != train:  # a walk over every module: with many experts it costs milliseconds
        model.train(train)
    with torch.no_grad() if not train else contextlib.nullcontext(), autocast:
        if mode == "forecast":
            model.sample_tokens(input_ids, attention_mask, workload.prediction_length, workload.num_samples,
                                generator=generator)
            return
        output = model(input_ids, attention_mask, labels=labels)
        if train:
            on_backward()
            output.loss.backward()


def record_step(model, batch, workload, mode: str, dtype: str = "fp32",
                generator: Optional[torch.Generator] = None, foreach_optimizer: Optional[bool] = None,
                count_fresh_pages: bool = False, backward_layouts: bool = True) -> StepTrace:
    """Record the ops of one step of `mode` on `model` (shape-only or real; see `run_step`), the training
    step's AdamW step included (traced on meta tensors of the parameters that received a gradient).
    `count_fresh_pages` (a real step on the CPU): each op's first-touched pages, as OpRecord.fresh_bytes.
    `backward_layouts`: False for a shape-only model, whose backward's inner strides are not a real step's
    (OpRecorder)."""
    recorder = OpRecorder(_full_size_storages(model), count_fresh_pages, backward_layouts)
    recorder.phase = first_phase(mode)
    trained: dict[int, torch.Size] = {}

    def note_trained(parameter: torch.Tensor) -> None:
        trained[id(parameter)] = parameter.shape

    def start_backward() -> None:
        recorder.phase = "backward"

    train = mode == "train"
    handles = [p.register_post_accumulate_grad_hook(note_trained) for p in model.parameters()
               if p.requires_grad] if train else []
    try:
        with recorder, HostReads(recorder):
            run_step(model, batch, workload, mode, dtype, generator, on_backward=start_backward)
    finally:
        for handle in handles:
            handle.remove()
    if train:
        if foreach_optimizer is None:
            foreach_optimizer = next(model.parameters()).device.type == "cuda"
        _trace_optimizer(recorder, list(trained.values()), foreach_optimizer)
    return StepTrace.from_counter(recorder.records)
