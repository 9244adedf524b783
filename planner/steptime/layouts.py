"""How an elementwise op walks its operands, read off the tensors the tracer sees: the stride at which it reads
an input along its output's contiguous dimension (`OpRecord.inner_stride`), and the elements of its kernel's
innermost loop (`OpRecord.inner_run`). Inputs align with the output from the right, as broadcasting does."""

from __future__ import annotations

import torch


def _output_dims(output: torch.Tensor) -> list[int]:
    """The output's dimensions longer than one, from its smallest stride up."""
    return sorted((d for d in range(output.dim()) if output.shape[d] > 1), key=lambda d: abs(output.stride(d)))


def _aligned_stride(tensor: torch.Tensor, output: torch.Tensor, d: int) -> int:
    """`tensor`'s stride along the output's dimension `d`; 0 where it is broadcast (absent, or of length one)."""
    aligned = d - (output.dim() - tensor.dim())
    return tensor.stride(aligned) if 0 <= aligned < tensor.dim() and tensor.shape[aligned] > 1 else 0


def inner_stride(inputs: list[torch.Tensor], output: torch.Tensor) -> int:
    """The largest stride, in elements, at which an input is read along the dimension `output` is written
    contiguously in (its smallest stride among its dimensions longer than one): 1 when every input is walked
    contiguously there or broadcast."""
    dims = _output_dims(output)
    if not dims:
        return 1
    return max([1, *(abs(_aligned_stride(tensor, output, dims[0])) for tensor in inputs)])


def inner_run(inputs: list[torch.Tensor], output: torch.Tensor) -> int:
    """The elements of the innermost loop an elementwise kernel runs over `output`: its dimensions longer than
    one from the smallest stride up, merged while every operand steps through the next as one run with the
    last (TensorIterator's coalescing; a broadcast dimension, stride 0, merges with another broadcast one)."""
    dims = _output_dims(output)
    if not dims:
        return 1
    operands = [output, *inputs]
    run = output.shape[dims[0]]
    for inner, outer in zip(dims, dims[1:]):
        if any(_aligned_stride(t, output, outer) != _aligned_stride(t, output, inner) * output.shape[inner]
               for t in operands):
            break
        run *= output.shape[outer]
    return run
