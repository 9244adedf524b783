"""Memory-bound ops by the layout of their operands: the stride at which they read an input and the loops
their kernel runs, as the tracer records them, and their price."""

from dataclasses import replace

import pytest
import torch

from model.build import build_model_from_config
from model.config import make_config
from planner.measure import token_batch
from planner.steptime import predict_step_time
from planner.steptime.curves import SizeCurve
from planner.steptime.ops import OpRecord, StepTrace
from planner.steptime.trace import OpRecorder, record_step, trace_step
from planner.workload import Workload
from tests.steptime_fixtures import BYTES_PER_S, simple_measured_device


def recorded(run, field: str = "inner_stride") -> dict[str, int]:
    """Each op `run` dispatches: its name -> the `field` recorded for it."""
    recorder = OpRecorder(set())
    with recorder:
        run()
    return {op.name: getattr(op, field) for op in recorder.records}


def test_the_inner_stride_is_the_stride_an_input_is_read_at_along_the_outputs_contiguous_dimension():
    """By hand: scores (B, H, L, L) are contiguous, so they are written along the last L; a position bias
    laid out heads innermost, (B, L, L, H) permuted to (B, H, L, L), is read there at a stride of H. The same
    add with the bias contiguous, or broadcast over the batch and the rows, reads every input at stride 1 or
    0; making a transposed (a, b) matrix contiguous reads it at a stride of b along the rows it writes."""
    b, h, length = 2, 8, 16
    scores = torch.rand(b, h, length, length)
    heads_innermost = torch.rand(b, length, length, h).permute(0, 3, 1, 2)
    assert recorded(lambda: scores.add_(heads_innermost)) == {"aten.add_.Tensor": h}
    contiguous = heads_innermost.contiguous()
    assert recorded(lambda: scores.add_(contiguous)) == {"aten.add_.Tensor": 1}
    row, per_head = torch.rand(length), torch.rand(1, h, 1, length)
    assert recorded(lambda: scores.add_(row)) == {"aten.add_.Tensor": 1}
    assert recorded(lambda: scores + per_head) == {"aten.add.Tensor": 1}
    transposed = torch.rand(5, 7).t()
    assert recorded(lambda: transposed.contiguous()) == {"aten.clone.default": 7}
    # An op of another class (a reduction) is priced by its own curve: no stride is recorded for it.
    assert recorded(lambda: heads_innermost.sum(-1)) == {"aten.sum.dim_IntList": 1}


def test_a_t5_step_reads_its_position_bias_at_a_stride_of_its_head_count():
    """HF T5 lays its position bias out heads innermost (compute_bias permutes an (L, L, H) table) and adds
    it into each encoder block's scores: in debug (4 heads, 2 encoder blocks) at batch 2, context 64, two
    in-place adds of (2, 4, 65, 65) read it at stride 4, in a real step and in a shape-only trace alike."""
    config, workload = make_config("debug"), Workload(batch_size=2, context_length=64, prediction_length=4)
    torch.manual_seed(0)
    model = build_model_from_config(config)
    real = record_step(model, token_batch(config, workload, torch.Generator().manual_seed(0)), workload, "forward")
    elements = 2 * 4 * 65 * 65
    for trace in (real, trace_step(config, workload, "forward")):
        strided = [(op, count) for op, count in trace.ops if op.inner_stride == 4 and op.name == "aten.add_.Tensor"
                   and op.bytes_written == elements * 4]
        assert sum(count for _, count in strided) == 2
        assert all(op.bytes_read == 2 * elements * 4 for op, _ in strided)


def test_a_shape_only_backward_records_no_strides():
    """A shape-only model's parameters are broadcast scalars (strides 0), and autograd lays out a weight's
    gradient by its weight's strides: its backward's strides are not a real step's, so none are recorded."""
    trace = trace_step(make_config("debug"), Workload(batch_size=2, context_length=16, prediction_length=4), "train")
    assert all(op.inner_stride == 1 for op, _ in trace.ops if op.phase == "backward")
    assert any(op.inner_stride > 1 for op, _ in trace.ops if op.phase == "forward")


def test_a_strided_op_costs_the_contiguous_op_plus_the_probed_strides_extra_by_wasted_cache_lines():
    """By hand, on a device whose contiguous elementwise ops run at 1e10 B/s and whose strided probe (stride
    8) at 2.5e9 B/s (0.4 s per GB against 0.1: 0.3 s extra): at stride 4, 3 of 7 of the extra, at stride 8 all
    of it, at any stride from a line's elements up (16 in fp32, 32 in bf16) 15 / 7 or 31 / 7 of it; an op at
    stride 1, or of another class, as before. The strided probe's busy threads are the op's."""
    device = simple_measured_device()
    device = replace(device, memory={**device.memory, "strided": SizeCurve((1e3, 1e10), (1e3 / 2.5e9, 1e10 / 2.5e9),
                                                                            (1.0, 1.0))})
    add = OpRecord("aten.add_.Tensor", "memory", "forward", "float32", 0, 6 * 10**8, 4 * 10**8, fresh_bytes=0)
    contiguous_s, extra_s = 1e9 / BYTES_PER_S, 0.3
    for stride, dtype, share in ((1, "float32", 0), (4, "float32", 3 / 7), (8, "float32", 1), (16, "float32", 15 / 7),
                                 (512, "float32", 15 / 7), (512, "bfloat16", 31 / 7)):
        op = replace(add, inner_stride=stride, dtype=dtype)
        assert device.memory_s(op) == pytest.approx(contiguous_s + share * extra_s)
    softmax = replace(add, name="aten._softmax.default", inner_stride=8)
    assert device.memory_s(softmax) == pytest.approx(contiguous_s)
    strided = replace(add, inner_stride=8)
    kernel_s = device.memory_s(strided)
    assert predict_step_time(StepTrace(((strided, 1),)), device).cpu_s == pytest.approx(
        kernel_s * 1.0 + device.host_cpu_s(strided))


def test_a_trace_with_a_stride_below_one_or_a_negative_loop_is_refused():
    op = OpRecord("aten.add_.Tensor", "memory", "forward", "float32", 0, 8, 4, inner_stride=4, inner_run=2)
    saved = StepTrace(((op, 1),)).to_dict()
    assert StepTrace.from_dict(saved).ops[0][0] == op
    stride_at, run_at = saved["fields"].index("inner_stride"), saved["fields"].index("inner_run")
    for at, value, message in ((stride_at, 0, "inner stride"), (run_at, -1, "negative inner loop")):
        damaged = {**saved, "ops": [[*saved["ops"][0][:at], value, *saved["ops"][0][at + 1:]]]}
        with pytest.raises(ValueError, match=message):
            StepTrace.from_dict(damaged)


def test_the_inner_loop_is_the_outputs_contiguous_run_every_operand_walks_in_step():
    """By hand: T5's position bias (1, H, L, L), laid out heads innermost, plus its mask (B, 1, 1, L) comes out
    heads innermost too, and the mask steps along L where the output steps along H: loops of H. Added in place
    into contiguous scores, the bias steps through L·L as one run with them (stride H, then L·H): loops of
    L·L. Two contiguous tensors are one loop; a per-head bias (1, H, 1, L) broadcast over rows, loops of L; a
    transposed (5, 7) made contiguous, loops of 5 (its rows are read 7 apart)."""
    b, h, length = 2, 4, 16
    bias, mask = torch.rand(length, length, h).permute(2, 0, 1).unsqueeze(0), torch.rand(b, 1, 1, length)
    assert recorded(lambda: bias + mask, "inner_run") == {"aten.add.Tensor": h}
    scores = torch.rand(b, h, length, length)
    assert recorded(lambda: scores.add_(bias), "inner_run") == {"aten.add_.Tensor": length * length}
    assert recorded(lambda: scores + scores, "inner_run") == {"aten.add.Tensor": b * h * length * length}
    per_head, transposed = torch.rand(1, h, 1, length), torch.rand(5, 7).t()
    assert recorded(lambda: scores + per_head, "inner_run") == {"aten.add.Tensor": length}
    assert recorded(lambda: transposed.contiguous(), "inner_run") == {"aten.clone.default": 5}


def test_a_t5_step_adds_its_position_bias_and_mask_in_loops_of_its_head_count():
    """debug (4 heads) at batch 2, context 64: the encoder's bias plus mask, (2, 4, 65, 65) written, runs loops
    of 4 elements, once a step, in a real step and in a shape-only trace alike."""
    config, workload = make_config("debug"), Workload(batch_size=2, context_length=64, prediction_length=4)
    torch.manual_seed(0)
    model = build_model_from_config(config)
    real = record_step(model, token_batch(config, workload, torch.Generator().manual_seed(0)), workload, "forward")
    for trace in (real, trace_step(config, workload, "forward")):
        scores_sized = [(op, count) for op, count in trace.ops if op.bytes_written == 2 * 4 * 65 * 65 * 4]
        short = [(op.name, count) for op, count in scores_sized if op.inner_run == 4]
        assert short == [("aten.add.Tensor", 1)]


def test_an_elementwise_op_costs_the_contiguous_op_plus_the_short_loop_probes_extra_per_loop():
    """By hand, on a device whose contiguous elementwise ops run at 1e10 B/s and whose short-loop probe (loops
    of 4) at 2.5e9 B/s (0.3 s extra per GB): loops of 4 add all the extra, of 2 twice it, of 8 half, of 400 a
    hundredth; an op whose loops were not recorded, or of another class, none. A strided op in loops of 4 adds
    both extras (the strided probe here at 5e9 B/s: 0.1 s extra per GB at stride 8)."""
    device = simple_measured_device()
    curve = lambda rate: SizeCurve((1e3, 1e10), (1e3 / rate, 1e10 / rate), (1.0, 1.0))  # noqa: E731
    device = replace(device, memory={**device.memory, "short_loop": curve(2.5e9), "strided": curve(5e9)})
    add = OpRecord("aten.add.Tensor", "memory", "forward", "float32", 0, 5 * 10**8, 5 * 10**8, fresh_bytes=0)
    contiguous_s, extra_s = 1e9 / BYTES_PER_S, 0.3
    for run, share in ((0, 0), (4, 1), (2, 2), (8, 0.5), (400, 0.01)):
        assert device.memory_s(replace(add, inner_run=run)) == pytest.approx(contiguous_s + share * extra_s)
    reduction = replace(add, name="aten.sum.dim_IntList", inner_run=4)
    assert device.memory_s(reduction) == pytest.approx(contiguous_s)
    both = replace(add, inner_stride=8, inner_run=4)
    assert device.memory_s(both) == pytest.approx(contiguous_s + 0.1 + extra_s)
