"""Training on synthetic series: the data, the token batches and the optimizer step (architecture.md §4).

Used by the tests (a short run must lower the loss) and by the benchmark's train mode.
Letters: B series, L context values, P prediction values.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .chronos_moe import ChronosMoEModel


def synthetic_series(count: int, length: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(count, length) series: a random linear trend + a seasonal sine of random period + Gaussian noise,
    shifted to a positive level so the mean scaling of the tokenizer is well defined."""
    time = torch.arange(length, dtype=torch.float32)
    slope = torch.randn(count, 1, generator=generator) * 0.05
    period = torch.randint(6, 48, (count, 1), generator=generator).float()
    phase = torch.rand(count, 1, generator=generator) * 2 * math.pi
    amplitude = torch.rand(count, 1, generator=generator) * 3 + 0.5
    noise = torch.randn(count, length, generator=generator) * 0.3
    return 10 + slope * time + amplitude * torch.sin(2 * math.pi * time / period + phase) + noise


def training_batch(
    model: ChronosMoEModel, series: torch.Tensor, context_length: int, prediction_length: int
) -> dict[str, torch.Tensor]:
    """Split (B, L + P) series into context and target and tokenize them as Chronos training does:
    the target is scaled by the context's scale, padded/missing targets become -100 (ignored by the loss)."""
    context, target = series[:, :context_length], series[:, context_length:context_length + prediction_length]
    tokenizer = model.tokenizer(context_length, prediction_length)
    input_ids, attention_mask, scale = tokenizer.context_input_transform(context)
    labels, labels_mask = tokenizer.label_input_transform(target, scale)
    labels = labels.masked_fill(~labels_mask, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask.long(), "labels": labels}


def train_step(model: ChronosMoEModel, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]):
    """One forward (cross-entropy + weighted balance loss), backward and optimizer step; returns the output."""
    if not model.training:  # a walk over every module: with many experts it costs milliseconds a step
        model.train()
    optimizer.zero_grad(set_to_none=True)
    output = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    output.loss.backward()
    optimizer.step()
    return output
