"""What each multi-device strategy sends per training step, and how long it takes on a link.

Per device and per step, each strategy (planner.parallel) runs these collectives:
- data_parallel: an all-reduce of every gradient, once per optimizer step (gradient accumulation runs the
  micro-steps under DDP's `no_sync`), one call per DDP bucket (`ddp_bucket_bytes`);
- zero1: the same volume as a reduce-scatter of the gradients and an all-gather of the updated weights, once
  per step (each device updates its shard of the optimizer states);
- zero2: a reduce-scatter of the gradients every micro-step (a device keeps only its gradient shard), an
  all-gather of the weights once per step (FSDP2 `reshard_after_forward=False`: in the forward, kept until
  the backward);
- zero3 (FSDP): an all-gather of the weights in the forward and again in the backward, and a reduce-scatter
  of the gradients, every micro-step.
  In PyTorch's layout (every regime but mixed_fp16) these are FSDP2's per-unit buffers: n padded dim-0 chunks
  of each parameter (planner.parallel.fsdp_shard_numel), the all-gathers of every parameter, the
  reduce-scatters of those that learn, in the units that have any;
- expert_parallel, as model.expert_parallel issues it: one all-reduce of a has-gradient flag per shared
  trainable tensor (4 bytes each) and one of the shared (non-expert) gradients in one flat buffer, once per
  step (none when nothing shared learns); at every MoE layer (each token_ffn block; shared_then_expert's heads;
  expert_only's encoders and heads) one all-gather of the per-expert row counts (E + the row's dims + 1 int64
  per rank), and `all_to_all` of what is routed: series' decoder states out to the expert heads and the heads'
  logits back (shared_then_expert); series' token embeddings (and their attention masks, int64, forward only)
  out to the expert encoders and their outputs back, then decoder states out and logits back (expert_only);
  tokens out to the expert FFNs and back at every MoE block (token_ffn). The backward sends both exchanges'
  gradients back, unless neither the routed input nor the experts learn (a frozen regime,
  model.trainable): then no rank builds them into its graph. Experts are not replicated (n > E leaves the
  last ranks without experts). The bytes are per device with balanced routing; summed over the ranks they
  are exact whatever the routing.

Time on a link (α-β model, ring algorithms as NCCL runs them over n devices, `bytes` the full buffer, in
`calls` separate calls):
- all-reduce: 2(n−1)/n · bytes / bandwidth + calls · 2(n−1) · α;
- reduce-scatter, all-gather: (n−1)/n · bytes / bandwidth + calls · (n−1) · α;
- all-to-all: (n−1)/n · bytes / bandwidth + calls · (n−1) · α.
Data parallel's gradients go in DDP's buckets: torch's `_compute_bucket_assignment_by_size` with a first bucket
of `_DEFAULT_FIRST_BUCKET_BYTES` (1 MiB) and then `bucket_cap_mb` (25 MiB), each bucket closed once it reaches
its limit; a dense model's buckets are rebuilt after the first step in the order gradients become ready
(the reverse of registration), an MoE model's (`find_unused_parameters=True`, as sparse MoE is run under
DDP; DDP does not rebuild buckets with it) stay in registration order, and DDP all-reduces its map of used parameters (an int32 per parameter
tensor) once per step beside them. ZeRO-1 keeps the 25 MiB buckets; ZeRO-2/3 (FSDP-style) communicate one
unit at a time: each T5 block
(every expert encoder's blocks for expert_only) and one unit for the rest (embedding, routers, heads).
Bandwidth is the link's rate times its achievable share (NCCL's bus bandwidth). Inside one node the link is
the node's GPU interconnect; a ring over several nodes is as fast as its slowest hop: the lesser of the
GPU link and the node's network (every device's share of it summed, as NCCL spreads a ring's channels
over the node's NICs).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from model.checks import SettingError
from model.config import ChronosMoEConfig
from model.trainable import EXPERT_COMPONENTS, trainable_components
from planner.params import (ParamBreakdown, ParamTensor, count_params, fsdp_shard_numel, parameter_tensors,
                             split_trainable_params)
from planner.workload import Workload

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")
# Bytes per gradient element and per gathered weight element, by precision regime (planner.memory's regimes;
# tf32 keeps fp32 storage; mixed_fp16 is DeepSpeed's fp16 weights and gradients).
GRADIENT_BYTES = {"fp32": 4, "tf32": 4, "amp_bf16": 4, "amp_fp16": 4, "bf16": 2, "mixed_fp16": 2}
WEIGHT_BYTES = GRADIENT_BYTES
# Bytes per routed activation element: autocast and half-precision regimes compute in 2 bytes.
ACTIVATION_BYTES = {"fp32": 4, "tf32": 4, "amp_bf16": 2, "amp_fp16": 2, "bf16": 2, "mixed_fp16": 2}
DDP_BUCKET_BYTES = 25 * 2**20  # torch.nn.parallel.DistributedDataParallel's bucket_cap_mb default
DDP_FIRST_BUCKET_BYTES = 2**20  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
INDEX_BYTES = 8  # int64: expert parallel's row counts and attention masks
FLAG_BYTES = 4  # expert parallel's has-gradient flags, fp32
USED_MAP_BYTES = 4  # DDP's local_used_map (find_unused_parameters): one int32 per parameter


def buckets(buffer_bytes: int) -> int:
    return max(1, math.ceil(buffer_bytes / DDP_BUCKET_BYTES))


def ddp_bucket_bytes(tensor_bytes: list[int], limits: tuple[int, ...] = (DDP_FIRST_BUCKET_BYTES, DDP_BUCKET_BYTES)
                     ) -> list[int]:
    """DDP's buckets over tensors of these sizes, in the order given: torch's
    `_compute_bucket_assignment_by_size` for one dtype and device (a bucket takes tensors until it holds at
    least its limit; the limits are used in turn, the last one for every further bucket)."""
    sizes, current, limit_index = [], 0, 0
    for size in tensor_bytes:
        current += size
        if current >= limits[limit_index]:
            sizes.append(current)
            current, limit_index = 0, min(limit_index + 1, len(limits) - 1)
    return sizes + ([current] if current else [])


def ddp_buckets(config: ChronosMoEConfig, workload: Workload, precision: str) -> list[int]:
    """The bytes of each of DDP's gradient buckets in steady state (see the module docstring)."""
    learns = trainable_components(workload.trainable)
    sizes = [t.numel * GRADIENT_BYTES[precision] for t in parameter_tensors(config) if t.component in learns]
    return ddp_bucket_bytes(sizes if config.is_moe else sizes[::-1])


def sharding_units(config: ChronosMoEConfig) -> int:
    """FSDP-style units: every T5 block (each expert encoder's for expert_only) and one for the rest."""
    dims = config.dims
    encoders = config.num_experts if config.is_moe and config.architecture == "expert_only" else 1
    return dims.num_layers * encoders + dims.num_decoder_layers + 1


_BLOCK = re.compile(r"^((?:experts\.\d+\.encoder|backbone\.encoder|backbone\.decoder)\.block\.\d+)\.")


def fsdp_unit(tensor: ParamTensor) -> str:
    """The FSDP unit a parameter is sharded in: its T5 block (planner.fsdp_check wraps each), else the root."""
    match = _BLOCK.match(tensor.name)
    return match.group(1) if match else ""


def _fsdp_collectives(config: ChronosMoEConfig, workload: Workload, strategy: str, n: int, grad: int,
                      weight: int) -> list[Collective]:
    """FSDP2's all-gathers and reduce-scatters, unit by unit, with its padded dim-0 chunks."""
    learns = trainable_components(workload.trainable)
    gathered: dict[str, int] = {}
    reduced: dict[str, int] = {}
    for tensor in parameter_tensors(config):
        unit = fsdp_unit(tensor)
        padded = n * fsdp_shard_numel(tensor.shape, n)[0]
        gathered[unit] = gathered.get(unit, 0) + padded
        if tensor.component in learns:
            reduced[unit] = reduced.get(unit, 0) + padded
    weights, gradients = sum(gathered.values()) * weight, sum(reduced.values()) * grad
    scatter = Collective("reduce_scatter", "gradients", "backward", gradients, n, True, len(reduced))
    if strategy == "zero2":
        return [scatter, Collective("all_gather", "updated weights", "optimizer", weights, n, False, len(gathered))]
    return [Collective("all_gather", "weights (forward)", "forward", weights, n, True, len(gathered)),
            Collective("all_gather", "weights (backward)", "backward", weights, n, True, len(gathered)), scatter]


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


def bytes_sent_per_step(collectives: list[Collective], micro_steps: int = 1) -> int:
    """Bytes one device sends in one optimizer step of `micro_steps` micro-steps (gradient accumulation): each
    collective's `bytes_sent`, once per micro-step if it runs every micro-step, else once."""
    return sum(c.bytes_sent() * (micro_steps if c.per_micro_step else 1) for c in collectives)


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


@dataclass(frozen=True)
class ExpertDispatch:
    """One MoE layer's exchange under expert parallelism (model.expert_parallel.expert_parallel_dispatch), per
    device at its own batch with balanced routing: `slots` rows (K per routed series or token) of `in_elements`
    out to the experts and of `out_elements` back; `row_dims` the routed tensor's dims after the first (what the
    row-count all-gather carries); `argument_bytes` a per-row tensor sent along (expert_only's attention mask);
    `needs_grad` whether the exchanges enter the graph (the backward sends their gradients back)."""

    name: str
    slots: int
    in_elements: int
    out_elements: int
    row_dims: int
    argument_bytes: int
    needs_grad: bool


def _block_and_layer(name: str, stack: str) -> tuple[int, int] | None:
    match = re.match(rf"^backbone\.{stack}\.block\.(\d+)\.layer\.(\d+)\.", name)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def _feeds_token_layer(name: str, decoder: bool, block: int) -> bool:
    """Whether parameter `name` is upstream of the input of the token MoE FFN in `block` (the FFN layer's
    normalised input): the embedding, earlier blocks (and for the decoder the whole encoder), this block's
    attention layers and its FFN layer's norm."""
    stack = "decoder" if decoder else "encoder"
    if name == "backbone.shared.weight" or (decoder and name.startswith("backbone.encoder.")):
        return True
    position = _block_and_layer(name, stack)
    if position is None or position[0] > block:
        return False
    if position[0] < block:
        return True
    ffn_layer = 2 if decoder else 1
    return position[1] < ffn_layer or name == f"backbone.{stack}.block.{block}.layer.{ffn_layer}.layer_norm.weight"


def expert_dispatches(config: ChronosMoEConfig, workload: Workload) -> list[ExpertDispatch]:
    """Every MoE layer's exchange of one forward, in order (see ExpertDispatch)."""
    if not config.is_moe:
        return []
    dims, batch, k = config.dims, workload.batch_size, config.top_k
    source, target = workload.encoder_tokens, workload.decoder_tokens
    learns = trainable_components(workload.trainable)
    tensors = parameter_tensors(config)
    experts_learn = bool(learns & set(EXPERT_COMPONENTS))

    def needs_grad(feeds) -> bool:  # model.expert_parallel: the input requires grad, or the experts learn
        return experts_learn or any(t.component in learns for t in tensors if feeds(t.name))

    if config.architecture == "token_ffn":
        layers = []
        for decoder, blocks, tokens in ((False, config.token_moe_encoder_blocks, source),
                                        (True, config.token_moe_decoder_blocks, target)):
            for block in blocks:
                layers.append(ExpertDispatch(
                    f"{'decoder' if decoder else 'encoder'} tokens", batch * tokens * k, dims.d_model, dims.d_model,
                    1, 0, needs_grad(lambda name, d=decoder, b=block: _feeds_token_layer(name, d, b))))
        return layers
    backbone = needs_grad(lambda name: name.startswith("backbone."))
    if config.architecture == "shared_then_expert":
        return [ExpertDispatch("decoder states", batch * k, target * dims.d_model, target * dims.vocab_size, 2, 0,
                               backbone)]
    encoders = needs_grad(lambda name: name == "backbone.shared.weight")
    # The decoder reads the encoders' mix: the expert encoders and the router's weights feed its states too.
    decoder = backbone or needs_grad(lambda name: name.startswith(("router.", "experts.")) and ".lm_head." not in name)
    return [ExpertDispatch("token embeddings", batch * k, source * dims.d_model, source * dims.d_model, 2,
                           source * INDEX_BYTES, encoders),
            ExpertDispatch("decoder states", batch * k, target * dims.d_model, target * dims.vocab_size, 2, 0,
                           decoder)]


_DESTINATIONS = {"encoder tokens": ("encoder tokens to experts", "encoder expert outputs back"),
                 "decoder tokens": ("decoder tokens to experts", "decoder expert outputs back"),
                 "token embeddings": ("token embeddings to expert encoders", "expert encoder outputs back"),
                 "decoder states": ("decoder states to expert heads", "expert head logits back")}


def routed_bytes_per_micro_step(config: ChronosMoEConfig, workload: Workload, precision: str) -> list[tuple[str, int]]:
    """(purpose, bytes) of each expert-parallel all-to-all of the routed tensors in one forward, per device at
    the workload's batch (its per-device batch); the backward sends the same tensors' gradients the other way."""
    width = ACTIVATION_BYTES[precision]
    moves = []
    for dispatch in expert_dispatches(config, workload):
        out, back = _DESTINATIONS[dispatch.name]
        moves += [(out, dispatch.slots * dispatch.in_elements * width),
                  (back, dispatch.slots * dispatch.out_elements * width)]
    return moves


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
        collectives = [Collective("all_reduce", "gradients", "backward", learning * grad, n, False,
                                  len(ddp_buckets(config, workload, precision)))]
        if config.is_moe:  # find_unused_parameters: DDP all-reduces its map of used parameters, an int32 each
            learns = trainable_components(workload.trainable)
            tensors = sum(1 for t in parameter_tensors(config) if t.component in learns)
            collectives.append(Collective("all_reduce", "used-parameter map", "backward", USED_MAP_BYTES * tensors,
                                          n, False))
        return collectives
    if strategy == "zero1":
        return [Collective("reduce_scatter", "gradients", "backward", learning * grad, n, False,
                           buckets(learning * grad)),
                Collective("all_gather", "updated weights", "optimizer", learning * weight, n, False,
                           buckets(learning * weight))]
    if strategy in ("zero2", "zero3") and precision != "mixed_fp16":  # PyTorch's FSDP2 (planner.parallel)
        return _fsdp_collectives(config, workload, strategy, n, grad, weight)
    if strategy == "zero2":
        return [Collective("reduce_scatter", "gradients", "backward", learning * grad, n, True, units),
                Collective("all_gather", "updated weights", "optimizer", learning * weight, n, False, units)]
    if strategy == "zero3":
        return [Collective("all_gather", "weights (forward)", "forward", total * weight, n, True, units),
                Collective("all_gather", "weights (backward)", "backward", total * weight, n, True, units),
                Collective("reduce_scatter", "gradients", "backward", learning * grad, n, True, units)]
    if strategy == "expert_parallel":
        learns = trainable_components(workload.trainable)
        shared_tensors = sum(1 for t in parameter_tensors(config) if t.expert is None and t.component in learns)
        collectives = []
        if shared_tensors:  # nothing shared trains when only the experts do
            collectives += [
                Collective("all_reduce", "shared gradients", "backward", trainable.shared * grad, n, False),
                Collective("all_reduce", "has-gradient flags", "backward", FLAG_BYTES * shared_tensors, n, False)]
        width = ACTIVATION_BYTES[precision]
        for dispatch in expert_dispatches(config, workload):
            out, back = _DESTINATIONS[dispatch.name]
            collectives.append(Collective("all_gather", f"row counts ({dispatch.name})", "forward",
                                          n * (params.num_experts + dispatch.row_dims + 1) * INDEX_BYTES, n, True))
            moves = [(out, dispatch.slots * dispatch.in_elements * width)]
            if dispatch.argument_bytes:
                collectives.append(Collective("all_to_all", "attention masks to expert encoders", "forward",
                                              dispatch.slots * dispatch.argument_bytes, n, True))
            moves.append((back, dispatch.slots * dispatch.out_elements * width))
            for purpose, size in moves:
                collectives.append(Collective("all_to_all", purpose, "forward", size, n, True))
                if dispatch.needs_grad:
                    collectives.append(Collective("all_to_all", f"gradient of {purpose}", "backward", size, n, True))
        return collectives
    raise SettingError("strategy", f"strategy must be one of data_parallel, zero1, zero2, zero3, expert_parallel, got {strategy!r}")
