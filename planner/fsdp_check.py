"""FSDP2 cross-check: one training step of a sharded model, measured by PyTorch's own FSDPMemTracker on a fake
process group of any world size, against planner.parallel.plan_devices (zero2 / zero3).

How it runs (the recipe of torchtitan's memory estimation):
- `torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=n)`: one process plays
  rank 0 of n; collectives do nothing but give outputs of the right shape.
- The model is built on the meta device, each T5 block is `fully_shard`-ed (for expert_only also each expert
  encoder's blocks), then the root; `to_empty` then gives it storage. ZeRO-2 is `reshard_after_forward=False`,
  ZeRO-3 `True`.
- `tensors="fake"` (the default) does all of it under `FakeTensorMode`: no byte is allocated and no FLOP
  computed, so every size runs at any batch and length, and the tracker still sees every storage's size.
  `tensors="real"` uses real CPU tensors (the same bytes, slower); `tensors="meta"` stops at FSDP's own check
  (`FSDP parameters should be materialized from meta device before training`): FSDP2 will not train, nor the
  tracker measure, meta parameters.
- AdamW's state is created first by a step on zero gradients (outside the tracker), so the tracked step is a
  steady-state one: its moments exist from the start, as the planner counts them.

Limits of the fake-tensor path: sparse dispatch reads its group sizes from data (`bincount(...).tolist()`),
which fake tensors do not have, so MoE variants run with `dispatch="dense"` (every expert on every row; the
planner is asked about the same config, and every expert gets a gradient). The load-balancing loss's
`bincount` is swapped, on the instance only, for the same count written as `scatter_add` (E numbers, the
same value, nothing saved for backward).

What is compared (rank 0's bytes, which the planner's default `rank=0` describes):
- sharded parameters, gradients, optimizer states: equal to plan_devices' exactly. The planner shards each
  parameter tensor (planner.params.parameter_tensors) as FSDP2 does, on dim 0 in padded chunks of
  ceil(dim0 / n) rows, and counts AdamW's `step` counter, one fp32 scalar per parameter tensor; ZeRO-2's
  weights are the resident shard plus every unit gathered after the forward (`gathered_layer_bytes`).
- the peak, term by term (see compare_with_plan).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
import types
import warnings
from typing import Iterator, Optional

import torch

from model.build import build_model_from_config
from model.config import ChronosMoEConfig, make_config
from planner.activations import INDEX_BYTES
from planner.parallel import DevicePlan, plan_devices
from planner.params import count_params
from planner.workload import Workload

STRATEGIES = {"zero2": False, "zero3": True}  # strategy -> reshard_after_forward
TENSOR_MODES = ("fake", "real", "meta")
MATRIX_SIZES = ("tiny", "mini", "small", "base", "large")
MATRIX_VARIANTS = (("dense", 0), ("shared_then_expert", 16), ("expert_only", 16), ("token_ffn", 16))
MATRIX_WORLD_SIZES = (8, 64)
# Fake tensors cost nothing per element, so the matrix keeps Chronos' lengths at batch 8 for every size.
MATRIX_WORKLOAD = Workload(batch_size=8)
FP32_BYTES = 4
LOSS_BYTES = 4  # the fp32 scalar loss

# The tracker's categories (torch.distributed._tools.fsdp2_mem_tracker._FSDPRefType values).
CATEGORIES = ("Sharded Param", "Unsharded Param", "Buffer", "Sharded Grad", "Unsharded Grad", "Activation", "Temp",
              "All Gather", "Reduce Scatter", "OptState", "Inputs")


def moe_config(size: str, architecture: str, num_experts: int, **settings) -> ChronosMoEConfig:
    """The config a check runs: dense when E = 0 (architecture irrelevant), else dense dispatch (see above)."""
    if num_experts == 0:
        return make_config(size, **settings)
    return make_config(size, architecture=architecture, num_experts=num_experts, dispatch="dense", **settings)


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """The default process group as a fake one of `world_size` ranks (this process is rank 0), for the block."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a default process group already exists; the FSDP check needs its own fake one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fsdp_padded_numel(model: torch.nn.Module, world_size: int) -> int:
    """Elements of rank 0's (padded) FSDP2 shards: Σ over parameters of ceil(dim0 / n) · (numel / dim0)."""
    total = 0
    for param in model.parameters():
        shape = tuple(param.shape)
        rows = shape[0] if shape else 1
        total += math.ceil(rows / world_size) * (param.numel() // max(rows, 1))
    return total


def _balance_loss_without_bincount(self, routing):
    """LoadBalancingLoss.forward with the slot counts as scatter_add (fake tensors have no data for bincount)."""
    slots = routing.expert_indices.reshape(-1)
    dtype = routing.router_probs.dtype
    counts = torch.zeros(self.num_experts, dtype=dtype, device=slots.device).scatter_add(
        0, slots, torch.ones(slots.shape, dtype=dtype, device=slots.device))
    slot_share = counts / slots.numel()
    mean_prob = routing.router_probs.mean(dim=0)
    return self.num_experts * torch.sum(slot_share * mean_prob)


def _shard(model: torch.nn.Module, config: ChronosMoEConfig, mesh, reshard_after_forward: bool) -> int:
    """fully_shard every T5 block (and every expert encoder's), then the root; returns the number of units."""
    from torch.distributed.fsdp import fully_shard

    stacks = [model.backbone.encoder, model.backbone.decoder]
    if config.is_moe and config.architecture == "expert_only":
        stacks += [expert.encoder for expert in model.experts]
    units = 0
    for stack in stacks:
        if stack is None:
            continue
        for block in stack.block:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
            units += 1
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return units + 1


def _unit_params(model: torch.nn.Module) -> tuple[int, int]:
    """(largest block unit, root unit) in elements, unpadded: what one all-gather brings whole."""
    from torch.distributed.fsdp import FSDPModule

    largest_block, root = 0, 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        numel = sum(fp.sharded_param.numel() for fp in group.fsdp_params) if group else 0  # DTensor: global size
        if module is model:
            root = numel
        else:
            largest_block = max(largest_block, numel)
    return largest_block, root


def _categories(snapshot: dict) -> dict[str, int]:
    values = {category: 0 for category in CATEGORIES}
    values["Total"] = 0
    for device_snapshot in snapshot.values():
        for key, value in device_snapshot.items():
            name = getattr(key, "value", key)
            values[name] = values.get(name, 0) + value
    return values


def simulate_fsdp_step(size: str, architecture: str = "dense", num_experts: int = 0, world_size: int = 8,
                       strategy: str = "zero3", workload: Workload = MATRIX_WORKLOAD, *, tensors: str = "fake",
                       config: Optional[ChronosMoEConfig] = None) -> dict:
    """One FSDP2 training step (forward, backward, AdamW) of rank 0 of `world_size`, under FSDPMemTracker.

    Returns per-rank bytes: `sharded_params`, `optimizer_states` (at the step's start), `sharded_grads` (after
    backward), `activations` (the tracker's Activation after forward), `peak` and `peak_<category>` (the
    tracker's peak snapshot), plus the element counts the comparison needs (`params`, `padded_params`,
    `param_tensors`, `largest_block_params`, `root_params`, `units`). Only fp32 AdamW on all parameters.
    """
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if tensors not in TENSOR_MODES:
        raise ValueError(f"tensors must be one of {', '.join(TENSOR_MODES)}, got {tensors!r}")
    if (workload.precision, workload.optimizer, workload.trainable) != ("fp32", "adamw", "all"):
        raise ValueError("the FSDP check runs fp32 AdamW training every parameter")
    config = moe_config(size, architecture, num_experts) if config is None else config
    device = "meta" if tensors == "meta" else "cpu"
    started = time.perf_counter()
    with fake_process_group(world_size), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP2's "returned a view tensor" on every T5 block
        mesh = init_device_mesh("cpu", (world_size,))
        with FakeTensorMode() if tensors == "fake" else contextlib.nullcontext():
            model = build_model_from_config(config, device="meta")
            if model.balance_loss is not None and tensors == "fake":
                model.balance_loss.forward = types.MethodType(_balance_loss_without_bincount, model.balance_loss)
            params = sum(p.numel() for p in model.parameters())
            param_tensors = sum(1 for _ in model.parameters())
            padded = fsdp_padded_numel(model, world_size)
            units = _shard(model, config, mesh, STRATEGIES[strategy])
            largest_block, root = _unit_params(model)
            model.to_empty(device=device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
            if tensors != "meta":  # steady state: the moments exist before the tracked step
                for param in model.parameters():
                    param.grad = torch.zeros_like(param)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batch, source, target = workload.batch_size, workload.encoder_tokens, workload.decoder_tokens
            vocab = config.dims.vocab_size
            input_ids = torch.randint(2, vocab, (batch, source), device=device)
            attention_mask = torch.ones(batch, source, dtype=torch.long, device=device)
            labels = torch.randint(2, vocab, (batch, target), device=device)
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs((input_ids, attention_mask, labels))
            try:
                with tracker:
                    at_start = _categories(tracker.get_tracker_snapshot())
                    optimizer.zero_grad(set_to_none=True)
                    output = model(input_ids, attention_mask, labels=labels)
                    after_forward = _categories(tracker.get_tracker_snapshot())
                    output.loss.backward()
                    after_backward = _categories(tracker.get_tracker_snapshot())
                    optimizer.step()
                    del output
            except (DynamicOutputShapeException, DataDependentOutputException) as error:
                raise NotImplementedError(
                    "fake tensors have no data: sparse dispatch reads its expert group sizes from the routing "
                    "(bincount(...).tolist()); run the check with dispatch='dense' or tensors='real'") from error
            peak = _categories(tracker.get_tracker_snapshot("peak"))
    result = {
        "size": size, "variant": config.describe(with_dispatch=True), "world_size": world_size, "strategy": strategy,
        "tensors": tensors, "batch_size": workload.batch_size, "encoder_tokens": workload.encoder_tokens,
        "decoder_tokens": workload.decoder_tokens, "units": units, "params": params, "param_tensors": param_tensors,
        "padded_params": padded, "largest_block_params": largest_block, "root_params": root,
        "sharded_params": at_start["Sharded Param"], "optimizer_states": at_start["OptState"],
        "sharded_grads": after_backward["Sharded Grad"], "activations": after_forward["Activation"],
        "unsharded_params_after_forward": after_forward["Unsharded Param"], "peak": peak["Total"],
        **{f"peak_{name}": peak[name] for name in CATEGORIES},
        "seconds": round(time.perf_counter() - started, 2),
    }
    return result


# --- comparison with the planner -------------------------------------------------------------------------------

def planner_workload(measured: dict) -> Workload:
    return Workload(batch_size=measured["batch_size"], context_length=measured["encoder_tokens"] - 1,
                    prediction_length=measured["decoder_tokens"] - 1)


def planner_plan(measured: dict, config: ChronosMoEConfig) -> DevicePlan:
    workload = planner_workload(measured)
    # CPU: the simulated tensors are CPU tensors (dropout masks and norm statistics as the CPU kernels keep them).
    return plan_devices(config, workload, measured["strategy"], measured["world_size"], device="cpu")


def compare_with_plan(measured: dict, config: ChronosMoEConfig) -> list[dict]:
    """Term-by-term rows: FSDP's bytes, the planner's, the difference and what explains it.

    `explained` is the difference the documented causes predict (None where the terms are compared as a ratio);
    `exact` says whether difference == explained.
    """
    plan = planner_plan(measured, config)
    n, strategy = measured["world_size"], measured["strategy"]
    planner_params = count_params(config).total_params
    padding = measured["padded_params"] - math.ceil(measured["params"] / n)
    rows = []

    def row(term, fsdp, planner, explained, cause):
        rows.append({"term": term, "fsdp_bytes": fsdp, "planner_bytes": planner, "difference": fsdp - planner,
                     "explained": explained, "exact": explained is not None and fsdp - planner == explained,
                     "residual": None if explained is None else fsdp - planner - explained,
                     "cause": cause})

    row("parameter count", measured["params"], planner_params, 0, "the planner counts the built module's parameters")
    layout = (f"the planner shards every parameter tensor as FSDP2 does (dim 0 in chunks of ceil(dim0/{n}) rows, "
              f"padded: {padding} elements beyond ceil(total/{n}) on rank 0)")
    if strategy == "zero3":
        row("sharded weights", measured["sharded_params"], plan.weights_bytes, 0, layout)
    else:
        row("weights: resident shard", measured["sharded_params"], plan.weights_bytes, 0, layout)
        row("weights: units gathered after forward", measured["unsharded_params_after_forward"],
            plan.gathered_layer_bytes, 0, f"ZeRO-2 (reshard_after_forward=False) keeps every unit gathered from its "
            f"forward to its backward: {n} padded chunks of each parameter")
    row("sharded gradients", measured["sharded_grads"], plan.gradients_bytes, 0, layout)
    row("optimizer states", measured["optimizer_states"], plan.optimizer_states_bytes, 0,
        layout + f"; both moments, and AdamW's fp32 step counter per parameter tensor ({measured['param_tensors']})")
    batch, source, target = measured["batch_size"], measured["encoder_tokens"], measured["decoder_tokens"]
    logits = batch * target * config.dims.vocab_size * FP32_BYTES
    tracked_inputs = batch * (source + target) * INDEX_BYTES
    row("activations (after forward)", measured["activations"], plan.activations_bytes,
        logits + LOSS_BYTES - tracked_inputs,
        f"the tracker files the encoder token ids and the labels under Inputs ({tracked_inputs} B, int64, that the "
        f"planner counts as activations) and counts as Activation the logits the returned output holds ({logits} B, "
        "B·T·V fp32, not saved for backward) and the fp32 loss; MoE variants' residual is the routing decisions and "
        "loss scalars the output keeps")
    gathered_fsdp = sum(measured[f"peak_{name}"] for name in
                        ("Unsharded Param", "Unsharded Grad", "All Gather", "Reduce Scatter"))
    row("at peak: gathered units and collective buffers", gathered_fsdp, plan.gathered_layer_bytes, None,
        f"FSDP2 gathers whole units (a block: {measured['largest_block_params']} params; the root, never resharded "
        f"after forward: {measured['root_params']}) with their all-gather / reduce-scatter buffers; the planner "
        "the root and one all-gather output of the largest unit (ZeRO-3) or every unit's gathered weights (ZeRO-2)")
    row("at peak: activations, temporaries and inputs",
        measured["peak_Activation"] + measured["peak_Temp"] + measured["peak_Inputs"],
        plan.activations_bytes + plan.loss_transient_bytes, None,
        "the planner: the saved activations with the logits and the loss's two B·T·V fp32 backward gradients "
        "(loss_transient_bytes); at the peak part of the activations may be freed and other backward "
        "temporaries (activation gradients) live")
    row("at peak: model states held", measured["peak_Sharded Param"] + measured["peak_Sharded Grad"]
        + measured["peak_OptState"], plan.weights_bytes + plan.gradients_bytes + plan.optimizer_states_bytes, None,
        "at the peak only the gradients of units already reduced exist; the planner counts them all")
    row("peak", measured["peak"], plan.peak_bytes, None, "the tracker's peak against DevicePlan.peak_bytes")
    return rows


def matrix_row(measured: dict, config: ChronosMoEConfig) -> dict:
    """One line of the matrix: the exact checks and the ratios."""
    rows = {r["term"]: r for r in compare_with_plan(measured, config)}
    exact = [r for term, r in rows.items() if r["explained"] is not None and not term.startswith("activations")]
    return {
        "size": measured["size"], "variant": measured["variant"].replace(", dense)", ")"),
        "n": measured["world_size"], "strategy": measured["strategy"],
        "params": measured["params"], "padding_params": measured["padded_params"]
        - math.ceil(measured["params"] / measured["world_size"]),
        "states_exact": all(r["exact"] for r in exact),
        "sharded_params_MiB": measured["sharded_params"] / 2**20,
        "act_fsdp_MiB": measured["activations"] / 2**20,
        "act_ratio": measured["activations"] / rows["activations (after forward)"]["planner_bytes"],
        "act_residual_B": rows["activations (after forward)"]["residual"],
        "peak_fsdp_MiB": measured["peak"] / 2**20,
        "plan_peak_MiB": rows["peak"]["planner_bytes"] / 2**20,
        "peak_ratio": measured["peak"] / rows["peak"]["planner_bytes"],
        "gathered_peak_MiB": rows["at peak: gathered units and collective buffers"]["fsdp_bytes"] / 2**20,
        "seconds": measured["seconds"],
    }


def run_matrix(sizes=MATRIX_SIZES, variants=MATRIX_VARIANTS, world_sizes=MATRIX_WORLD_SIZES,
               strategies=tuple(STRATEGIES), workload: Workload = MATRIX_WORKLOAD, out=sys.stdout) -> list[dict]:
    """The full matrix as a markdown table on `out`, one line as each case finishes."""
    lines = []
    header = None
    for size in sizes:
        for architecture, experts in variants:
            config = moe_config(size, architecture, experts)
            for n in world_sizes:
                for strategy in strategies:
                    measured = simulate_fsdp_step(size, architecture, experts, n, strategy, workload, config=config)
                    line = matrix_row(measured, config)
                    if header is None:
                        header = list(line)
                        print("| " + " | ".join(header) + " |", file=out)
                        print("|" + "---|" * len(header), file=out)
                    print("| " + " | ".join(_cell(line[k]) for k in header) + " |", file=out, flush=True)
                    lines.append(line)
    return lines


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m planner.fsdp_check", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(MATRIX_SIZES))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=list(MATRIX_WORLD_SIZES))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--batch-size", type=int, default=MATRIX_WORKLOAD.batch_size)
    parser.add_argument("--context-length", type=int, default=MATRIX_WORKLOAD.context_length)
    parser.add_argument("--prediction-length", type=int, default=MATRIX_WORKLOAD.prediction_length)
    args = parser.parse_args(argv)
    workload = dataclasses.replace(MATRIX_WORKLOAD, batch_size=args.batch_size, context_length=args.context_length,
                                   prediction_length=args.prediction_length)
    started = time.perf_counter()
    run_matrix(args.sizes, MATRIX_VARIANTS, args.world_sizes, args.strategies, workload)
    print(f"\n{time.perf_counter() - started:.0f} s; batch {workload.batch_size}, context {workload.context_length}, "
          f"prediction {workload.prediction_length}, fp32 AdamW, fake tensors, MoE with dense dispatch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
