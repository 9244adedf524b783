"""The op trace: its FLOPs equal the planner's, its op count equals torch.profiler's, its bytes equal hand
derivations, it sees one host sync per MoE call, and it is cached."""

import collections
from dataclasses import replace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from model.build import build_model_from_config
from model.config import make_config
from planner.flops import count_flops
from planner.measure import token_batch
from planner.steptime import trace_cache
from planner.steptime.ops import StepTrace
from planner.steptime.trace import record_step, run_step, trace_step
from planner.workload import Workload

ARCHITECTURES = ("dense", "shared_then_expert", "expert_only", "token_ffn")
WORKLOAD = Workload(batch_size=2, context_length=16, prediction_length=4, num_samples=2)


def config_of(architecture: str, size: str = "debug", experts: int = 4):
    if architecture == "dense":
        return make_config(size)
    return make_config(size, architecture=architecture, num_experts=experts, top_k=2)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(tmp_path))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("mode", ["forward", "train", "forecast"])
def test_trace_flops_equal_count_flops(architecture, mode):
    config = config_of(architecture)
    flops = count_flops(config, WORKLOAD)
    expected = {"forward": flops.forward_flops, "train": flops.train_flops, "forecast": flops.forecast_flops}[mode]
    assert trace_step(config, WORKLOAD, mode).flops == expected


def test_trace_flops_exact_at_tiny_with_sixteen_experts():
    config = config_of("token_ffn", "tiny", 16)
    workload = Workload(batch_size=3, context_length=64, prediction_length=8, num_samples=4)
    flops = count_flops(config, workload)
    assert trace_step(config, workload, "forecast").flops == flops.forecast_flops
    assert trace_step(config, workload, "train").flops == flops.train_flops


def _expected_syncs(config, mode: str) -> int:
    """One grouped dispatch (one host read of the group sizes) per MoE call, derived from the architecture."""
    if not config.is_moe:
        return 0
    steps = WORKLOAD.prediction_length
    if config.architecture == "shared_then_expert":  # the expert heads: once, or once per decoding step
        return steps if mode == "forecast" else 1
    if config.architecture == "expert_only":  # the expert encoders once, then the heads
        return 1 + (steps if mode == "forecast" else 1)
    encoder, decoder = len(config.token_moe_encoder_blocks), len(config.token_moe_decoder_blocks)
    return encoder + decoder * (steps if mode == "forecast" else 1)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("mode", ["forward", "train", "forecast"])
def test_trace_counts_one_host_sync_per_moe_call(architecture, mode):
    config = config_of(architecture)
    trace = trace_step(config, WORKLOAD, mode)
    assert trace.count("sync") == _expected_syncs(config, mode)
    assert {op.name for op, _ in trace.ops if op.kind == "sync"} <= {"Tensor.tolist"}  # no nonzero, no .item()


def _composite(op: str) -> bool:
    """Does some overload of aten::op decompose above autograd (CompositeImplicitAutograd)?"""
    packet = getattr(torch.ops.aten, op, None)
    found = False
    for overload in packet.overloads() if packet is not None else ():
        try:
            found |= torch._C._dispatch_has_kernel_for_dispatch_key(getattr(packet, overload).name(),
                                                                    "CompositeImplicitAutograd")
        except RuntimeError:
            pass
    return found


def profiler_op_counts(events) -> collections.Counter:
    """The profiler's ATen events a dispatch mode sees: composite ops are replaced by what they call (a
    no-op composite such as eval-mode dropout, or `.to` to the same dtype, by nothing); an op whose children
    are only its own allocations is one op. Two records never reach a dispatch mode: `detach_` and the
    top-level `empty` of `torch.tensor(...)` from Python data; PyTorch's eager `reshape` calls
    `_reshape_alias` where a mode sees `view`."""
    counts: collections.Counter = collections.Counter()

    def visit(event, root: bool) -> None:
        if event.name.startswith("aten::"):
            op = event.name[len("aten::"):]
            children = {child.name[len("aten::"):] for child in event.cpu_children if child.name.startswith("aten::")}
            if op == "detach_" or (root and op == "empty"):
                return
            if not _composite(op) or (children and children <= {"empty", "empty_strided", "resize_"}):
                counts["view" if op == "_reshape_alias" else op] += 1
                return
        for child in event.cpu_children:
            visit(child, False)

    for event in events:
        if event.cpu_parent is None:
            visit(event, True)
    return counts


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("mode", ["forward", "forecast"])
def test_trace_op_count_equals_the_profilers(architecture, mode):
    config = config_of(architecture)
    torch.manual_seed(0)
    model = build_model_from_config(config)
    batch = token_batch(config, WORKLOAD, torch.Generator().manual_seed(0))
    run_step(model, batch, WORKLOAD, mode, generator=torch.Generator().manual_seed(0))  # warm-up
    trace = record_step(model, batch, WORKLOAD, mode, generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        run_step(model, batch, WORKLOAD, mode, generator=torch.Generator().manual_seed(0))
    traced = collections.Counter()
    for op, count in trace.ops:
        if op.name.startswith("aten."):
            traced[op.name.split(".")[1]] += count
    assert traced == profiler_op_counts(profiler.events())


def test_training_trace_op_count_within_three_percent_of_the_profilers():
    """Under a dispatch mode autograd accumulates gradients differently (`add` where it would `add_`, more
    `detach`), so the training step's count differs a little from the profiler's; FLOPs are still exact."""
    config = config_of("token_ffn")
    torch.manual_seed(0)
    model = build_model_from_config(config)
    batch = token_batch(config, WORKLOAD, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, foreach=False)  # lr 0: the routing stays

    def step():
        torch.manual_seed(1)
        run_step(model, batch, WORKLOAD, "train")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.manual_seed(1)
    trace = record_step(model, batch, WORKLOAD, "train")
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    traced = sum(count for op, count in trace.ops if op.name.startswith("aten."))
    assert traced == pytest.approx(sum(profiler_op_counts(profiler.events()).values()), rel=0.03)


def test_trace_bytes_hand_derived():
    """debug: D 64, F 256, H 4, V 4096; B 2, S 17, T 5 tokens; fp32 (4 bytes), ids int64 (8 bytes)."""
    trace = trace_step(make_config("debug"), WORKLOAD, "forward")
    ops = collections.defaultdict(list)
    for op, count in trace.ops:
        ops[op.name].append((op, count))
    b, s, t, d, f, h, v = 2, 17, 5, 64, 256, 4, 4096
    # The token embedding of the encoder: gathers B·S rows of D; reads those rows and the ids.
    encoder_embedding = next(op for op, _ in ops["aten.embedding.default"] if op.bytes_written == b * s * d * 4)
    assert encoder_embedding.bytes_read == b * s * d * 4 + b * s * 8
    # The encoder FFN's first matmul: (B·S, D) × (D, F): reads both, writes (B·S, F); 2·B·S·D·F FLOPs.
    (wi, count), = [(op, c) for op, c in ops["aten.mm.default"] if op.gemm == (1, b * s, f, d)]
    assert (wi.bytes_read, wi.bytes_written, wi.flops, count) == ((b * s * d + d * f) * 4, b * s * f * 4,
                                                                  2 * b * s * d * f, 2)
    # The ReLU after it reads and writes (B·S, F) once per encoder block.
    relu = next(op for op, c in ops["aten.relu.default"] if op.bytes_written == b * s * f * 4)
    assert relu.bytes_read == relu.bytes_written and relu.pointwise
    # Encoder self-attention softmax over (B, H, S, S) scores; the LM head writes (B·T, V) logits.
    assert any(op.bytes_read == op.bytes_written == b * h * s * s * 4 for op, _ in ops["aten._softmax.default"])
    (head, _), = [(op, c) for op, c in ops["aten.mm.default"] if op.gemm == (1, b * t, v, d)]
    assert head.bytes_written == b * t * v * 4 and head.bytes_read == (b * t * d + d * v) * 4
    # Views move nothing.
    assert all(op.bytes == 0 for op, _ in trace.ops if op.kind == "view")


def test_trace_is_cached_and_a_damaged_cache_is_traced_again(monkeypatch, tmp_path):
    config = config_of("shared_then_expert")
    first = trace_cache.load_or_trace(config, WORKLOAD, "forward")
    (path,) = (tmp_path / "traces").glob("*.json")

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced again although cached")

    monkeypatch.setattr("planner.steptime.trace.trace_step", no_tracing)
    assert trace_cache.load_or_trace(config, WORKLOAD, "forward") == first
    path.write_text('{"ops": [["aten.mm.default", "matmul", "forward", "float32", -1]]}')
    monkeypatch.undo()
    monkeypatch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(tmp_path))
    assert trace_cache.load_or_trace(config, WORKLOAD, "forward") == first


LARGE_WORKLOAD = Workload(batch_size=16, context_length=512, prediction_length=16, num_samples=4)


@pytest.mark.parametrize("architecture, mode", [("dense", "train"), ("expert_only", "forward"),
                                                ("token_ffn", "train"), ("shared_then_expert", "forecast")])
def test_lean_trace_records_what_full_shape_only_execution_does(architecture, mode):
    """Above 32 MiB (tiny's attention scores at batch 16, context 512: 16·4·513·513·4 bytes ≈ 67 MB) a trace
    makes outputs instead of computing them. The ops it records are those full shape-only execution records:
    identical for a dense model and expert_only (whose routing reads small tensors only); for token_ffn and
    shared_then_expert the random routing draws differ (the products' random numbers are consumed
    differently), so the same ops with the same FLOPs (count_flops') and counts. One difference is the lean
    trace's own: autograd detaches each saved tensor it hands back through saved_tensors_hooks (which keep
    the saved activations as shapes only), so `detach` (a view: no kernel, a microsecond of dispatch) is
    compared apart, its count within the number of saved tensors."""
    from planner.measure import ShapeOnlyMatmuls
    from planner.steptime.trace import _shape_only_model

    config = config_of(architecture, "tiny", experts=8)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = _shape_only_model(config, "fp32")
    with ShapeOnlyMatmuls():
        full = record_step(model, token_batch(config, LARGE_WORKLOAD, generator), LARGE_WORKLOAD, mode, "fp32",
                           generator, False, backward_layouts=False)
    lean = trace_step(config, LARGE_WORKLOAD, mode)
    flops = count_flops(config, LARGE_WORKLOAD)
    assert lean.flops == full.flops == {"forward": flops.forward_flops, "train": flops.train_flops,
                                        "forecast": flops.forecast_flops}[mode]

    def without_detach(trace):
        return StepTrace(tuple((op, n) for op, n in trace.ops if op.name != "aten.detach.default"))

    detaches = [sum(n for op, n in t.ops if op.name == "aten.detach.default") for t in (lean, full)]
    assert (detaches[0] == detaches[1]) if mode != "train" else (0 <= detaches[0] - detaches[1] < lean.op_count / 5)
    assert without_detach(lean).op_count == without_detach(full).op_count
    assert lean.count("sync") == full.count("sync")
    if architecture in ("dense", "expert_only"):
        assert without_detach(lean) == without_detach(full)


def test_trace_key_follows_the_traced_code(tmp_path, monkeypatch):
    """A change to the model code or the tracer traces again: the key holds a digest of their source."""
    from model.config import make_config
    from planner.steptime import trace_cache
    from planner.workload import Workload

    source = tmp_path / "model"
    source.mkdir()
    (source / "experts.py").write_text("A = 1\n")
    monkeypatch.setattr(trace_cache, "_CODE_TRACED", (source,))
    trace_cache._code_digest.cache_clear()
    arguments = (make_config("debug"), Workload(batch_size=1), "train", "fp32", False)
    before = trace_cache.trace_key(*arguments)
    (source / "experts.py").write_text("A = 2\n")
    trace_cache._code_digest.cache_clear()
    assert trace_cache.trace_key(*arguments) != before
    trace_cache._code_digest.cache_clear()


def test_a_real_step_counts_the_pages_each_op_touches_first():
    """Recorded in a real step, each op carries the new pages it touched (page faults × page size): filling
    64 MiB of newly mapped memory counts its 64 MiB, a small copy none; a step recorded without counting, a
    shape-only trace and the optimizer's meta-tensor step carry None (the device's rule stands in), and the
    counted bytes survive the trace's round trip."""
    import mmap

    from planner.steptime.trace import OpRecorder

    region = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # no page touched yet
    untouched = torch.frombuffer(region, dtype=torch.float32)
    recorder = OpRecorder(set(), count_fresh_pages=True)
    with recorder:
        untouched.fill_(1.0)
        untouched[:16].clone()
    fresh = {op.name: op.fresh_bytes for op in recorder.records}
    assert 64 * 2**20 <= fresh["aten.fill_.Scalar"] <= 65 * 2**20
    assert fresh["aten.clone.default"] == 0
    del untouched
    region.close()

    config = config_of("expert_only")
    model = build_model_from_config(config)
    batch = token_batch(config, WORKLOAD, torch.Generator().manual_seed(0))
    counted = record_step(model, batch, WORKLOAD, "train", count_fresh_pages=True)
    assert all(op.fresh_bytes is not None for op, _ in counted.ops if op.phase in ("forward", "backward"))
    assert all(op.fresh_bytes is None for op, _ in counted.ops if op.phase == "optimizer")
    assert StepTrace.from_dict(counted.to_dict()) == counted
    assert all(op.fresh_bytes is None for op, _ in record_step(model, batch, WORKLOAD, "forward").ops)
    assert all(op.fresh_bytes is None for op, _ in trace_step(config, WORKLOAD, "forward").ops)


def test_a_trace_saved_before_fresh_pages_first_touches_strides_or_loops_were_counted_still_reads():
    trace = trace_step(config_of("dense"), WORKLOAD, "forward")
    # Saved before any inner stride was recorded, every op read contiguously; before inner loops, none known.
    unknown_loops = StepTrace(tuple((replace(op, inner_run=0), n) for op, n in trace.ops))
    contiguous = StepTrace(tuple((replace(op, inner_stride=1), n) for op, n in unknown_loops.ops))
    assert contiguous != unknown_loops != trace
    for fields, read_as in ((10, contiguous), (11, contiguous), (12, contiguous), (13, unknown_loops)):
        saved = trace.to_dict()  # before fresh pages; first touches; inner strides; inner loops
        saved["fields"] = saved["fields"][:fields] + ["count"]
        saved["ops"] = [row[:fields] + row[-1:] for row in saved["ops"]]
        assert StepTrace.from_dict(saved) == read_as


def test_an_adamw_step_touches_each_parameter_gradient_and_moment_first_once():
    """The optimizer's first touches, by hand: AdamW (single-tensor, torch's CPU default) on a (256, 256)
    parameter of 256 KiB first touches the parameter in its weight decay (param.mul_), the first moment and the
    gradient in exp_avg.lerp_(grad) and the second moment in exp_avg_sq.mul_; its addcmul_, sqrt, div, add_ and
    addcdiv_ find them touched. Beside them only the 4-byte step counter (add_) is touched first."""
    from planner.steptime.trace import OpRecorder, _trace_optimizer

    recorder = OpRecorder(set())
    _trace_optimizer(recorder, [torch.Size([256, 256])], foreach=False)
    first = collections.Counter()
    for op, count in recorder.records.items():
        first[op.name] += op.first_touch_bytes * count
    size = 256 * 256 * 4
    assert first["aten.mul_.Tensor"] == 2 * size and first["aten.lerp_.Scalar"] == 2 * size
    assert first["aten.add_.Tensor"] == 4
    assert sum(first.values()) == 4 * size + 4
    assert all(op.first_touch_bytes == 0 for op in recorder.records if op.phase != "optimizer")


def test_the_benchmarks_recorded_training_step_makes_its_gradients_afresh():
    """A benchmark records one more training step after its timed ones, whose gradients are still set; the
    timed step starts from none (train_step's zero_grad(set_to_none=True)), so the recording must too: its
    backward dispatches what the recording of a model that never stepped does (each gradient made, not
    added into the last step's)."""
    from planner.bench.spec import BenchSpec
    from planner.bench.steps import make_step

    spec = BenchSpec(size="debug", mode="train", batch_size=2, context_length=16, prediction_length=4, device="cpu")

    def backward_of_recording(timed_steps: int) -> collections.Counter:
        torch.manual_seed(0)
        step = make_step(spec, build_model_from_config(spec.model_config()), "cpu")
        for _ in range(timed_steps):
            step()
        return collections.Counter({op.name: n for op, n in step.record().ops if op.phase == "backward"})

    assert backward_of_recording(2) == backward_of_recording(0)
