"""What each multi-device strategy sends per training step, and how long it takes on a link.

Per device and per step, each strategy (planner.parallel) runs these collectives:
- data_parallel: an all-reduce of every gradient, once per optimizer step (gradient accumulation runs the
  micro-steps under DDP's `no_sync`);
- zero1: the same volume as a reduce-scatter of the gradients and an all-gather of the updated weights, once
  per step (each device updates its shard of the optimizer states);
- zero2: a reduce-scatter of the gradients every micro-step (a device keeps only its gradient shard), an
  all-gather of the updated weights once per step;
- zero3 (FSDP): an all-gather of the weights in the forward and again in the backward, and a reduce-scatter
  of the gradients, every micro-step;
- expert_parallel: an all-reduce of the shared (non-expert) gradients once per step, of an expert's gradients
  among its replicas when there are more devices than experts, and `all_to_all` of what is routed, forward
  and backward, every micro-step: series' decoder states out to the expert heads and the heads' logits back
  (shared_then_expert); series' token embeddings out to the expert encoders and their outputs back, then
  decoder states out and logits back (expert_only); tokens out to the expert FFNs and back at every MoE block
  (token_ffn). With balanced routing a device keeps 1/n of what it routes and sends the rest.

Time on a link (α-β model, ring algorithms as NCCL runs them over n devices, `bytes` the full buffer, in
`calls` separate calls):
- all-reduce: 2(n−1)/n · bytes / bandwidth + calls · 2(n−1) · α;
- reduce-scatter, all-gather: (n−1)/n · bytes / bandwidth + calls · (n−1) · α;
- all-to-all: (n−1)/n · bytes / bandwidth + calls · (n−1) · α.
Gradient reductions of data parallel, ZeRO-1 and expert parallel's shared part go in DDP's buckets
(`bucket_cap_mb`, 25 MiB by default); ZeRO-2/3 (FSDP-style) communicate one unit at a time: each T5 block
(every expert encoder's blocks for expert_only) and one unit for the rest (embedding, routers, heads).
Bandwidth is the link's rate times its achievable share (NCCL's bus bandwidth). Inside one node the link is
the node's GPU interconnect; a ring over several nodes is as fast as its slowest hop: the lesser of the
GPU link and the node's network (every device's share of it summed, as NCCL spreads a ring's channels
over the node's NICs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model.checks import SettingError
from model.config import ChronosMoEConfig
from planner.params import ParamBreakdown, count_params, experts_per_device, split_trainable_params
from planner.workload import Workload

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")
# Bytes per gradient element and per gathered weight element, by precision regime (planner.memory's regimes;
# tf32 keeps fp32 storage; mixed_fp16 is DeepSpeed's fp16 weights and gradients).
GRADIENT_BYTES = {"fp32": 4, "tf32": 4, "amp_bf16": 4, "amp_fp16": 4, "bf16": 2, "mixed_fp16": 2}
WEIGHT_BYTES = GRADIENT_BYTES
# Bytes per routed activation element: autocast and half-precision regimes compute in 2 bytes.
ACTIVATION_BYTES = {"fp32": 4, "tf32": 4, "amp_bf16": 2, "amp_fp16": 2, "bf16": 2, "mixed_fp16": 2}
DDP_BUCKET_BYTES = 25 * 2**20  # torch.nn.parallel.DistributedDataParallel's bucket_cap_mb default


def buckets(buffer_bytes: int) -> int:
    return max(1, math.ceil(buffer_bytes / DDP_BUCKET_BYTES))


def sharding_units(config: ChronosMoEConfig) -> int:
    """FSDP-style units: every T5 block (each expert encoder's for expert_only) and one for the rest."""
    dims = config.dims
    encoders = config.num_experts if config.is_moe and config.architecture == "expert_only" else 1
    return dims.num_layers * encoders + dims.num_decoder_layers + 1


@dataclass(frozen=True)
class Collective:
    """One collective of a training step, on each device of its group."""

    kind: str  # one of COLLECTIVES
    purpose: str  # what travels, e.g. "gradients", "weights (forward)", "routed tokens (out)"
    phase: str  # "forward", "backward" or "optimizer": what compute it could overlap with
    buffer_bytes: int  # the full buffer: all-reduce/reduce-scatter input, all-gather output, all-to-all send
    group_size: int
    per_micro_step: bool  # runs every micro-step (else once per optimizer step)
    calls: int = 1  # separate calls it is split into (buckets, units), each paying the ring's latency

    def bytes_sent(self) -> int:
        """Bytes each device sends, by the ring algorithm (all-to-all: what leaves the device)."""
        share = (self.group_size - 1) / self.group_size
        return round(self.buffer_bytes * share * (2 if self.kind == "all_reduce" else 1))

    def ring_steps(self) -> int:
        return (self.group_size - 1) * (2 if self.kind == "all_reduce" else 1)


@dataclass(frozen=True)
class Link:
    """What a collective's ring runs over: bus bandwidth (bytes/s, the achievable share included) and the
    latency of one ring step."""

    bytes_per_s: float
    latency_s: float
    name: str = ""


def collective_time_s(collective: Collective, link: Link) -> float:
    """The α-β ring time of one call (see the module docstring)."""
    if collective.group_size <= 1:
        return 0.0
    return collective.bytes_sent() / link.bytes_per_s + collective.calls * collective.ring_steps() * link.latency_s


def routed_bytes_per_micro_step(config: ChronosMoEConfig, workload: Workload, precision: str) -> list[tuple[str, int]]:
    """(purpose, bytes) of each expert-parallel all-to-all of one forward, per device at the workload's batch
    (its per-device batch); the backward sends the same tensors' gradients the other way."""
    if not config.is_moe:
        return []
    dims, batch, k = config.dims, workload.batch_size, config.top_k
    width = ACTIVATION_BYTES[precision]
    encoder_rows = batch * workload.encoder_tokens * k  # every series goes to K experts
    decoder_rows = batch * workload.decoder_tokens * k
    if config.architecture == "token_ffn":
        moves = []
        for name, rows, blocks in (("encoder", batch * workload.encoder_tokens * k, config.token_moe_encoder_blocks),
                                   ("decoder", batch * workload.decoder_tokens * k, config.token_moe_decoder_blocks)):
            for _ in blocks:
                moves += [(f"{name} tokens to experts", rows * dims.d_model * width),
                          (f"{name} expert outputs back", rows * dims.d_model * width)]
        return moves
    head = [("decoder states to expert heads", decoder_rows * dims.d_model * width),
            ("expert head logits back", decoder_rows * dims.vocab_size * width)]
    if config.architecture == "expert_only":
        return [("token embeddings to expert encoders", encoder_rows * dims.d_model * width),
                ("expert encoder outputs back", encoder_rows * dims.d_model * width), *head]
    return head


def step_collectives(config: ChronosMoEConfig, workload: Workload, strategy: str, num_devices: int, precision: str,
                     params: ParamBreakdown | None = None) -> list[Collective]:
    """Every collective of one training step of `strategy` on `num_devices` (see the module docstring).
    `workload.batch_size` is the per-device micro-batch."""
    if num_devices <= 1:
        return []
    params = count_params(config) if params is None else params
    n, grad, weight = num_devices, GRADIENT_BYTES[precision], WEIGHT_BYTES[precision]
    total = params.total_params
    # Only trainable parameters have gradients to reduce and updated weights to gather (model.trainable).
    trainable = split_trainable_params(params, workload.trainable, config.label)
    learning = trainable.total
    units = sharding_units(config)
    if strategy == "data_parallel":
        return [Collective("all_reduce", "gradients", "backward", learning * grad, n, False,
                           buckets(learning * grad))]
    if strategy == "zero1":
        return [Collective("reduce_scatter", "gradients", "backward", learning * grad, n, False,
                           buckets(learning * grad)),
                Collective("all_gather", "updated weights", "optimizer", learning * weight, n, False,
                           buckets(learning * weight))]
    if strategy == "zero2":
        return [Collective("reduce_scatter", "gradients", "backward", learning * grad, n, True, units),
                Collective("all_gather", "updated weights", "optimizer", learning * weight, n, False, units)]
    if strategy == "zero3":
        return [Collective("all_gather", "weights (forward)", "forward", total * weight, n, True, units),
                Collective("all_gather", "weights (backward)", "backward", total * weight, n, True, units),
                Collective("reduce_scatter", "gradients", "backward", learning * grad, n, True, units)]
    if strategy == "expert_parallel":
        shared = trainable.shared * grad
        collectives = [Collective("all_reduce", "shared gradients", "backward", shared, n, False, buckets(shared))
                       ] if shared else []  # nothing shared trains when only the experts do
        replicas = n // params.num_experts if n > params.num_experts else 1
        if replicas > 1 and trainable.per_expert:
            local = experts_per_device(params.num_experts, n) * trainable.per_expert
            collectives.append(Collective("all_reduce", "expert gradients (replicas)", "backward", local * grad,
                                          replicas, False, buckets(local * grad)))
        for purpose, size in routed_bytes_per_micro_step(config, workload, precision):
            collectives.append(Collective("all_to_all", purpose, "forward", size, n, True))
            collectives.append(Collective("all_to_all", f"gradient of {purpose}", "backward", size, n, True))
        return collectives
    raise SettingError("strategy", f"strategy must be one of data_parallel, zero1, zero2, zero3, expert_parallel, got {strategy!r}")
