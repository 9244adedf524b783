"""Multi-device training plans: what one device holds under the usual sharding schemes, and whether it fits.

Model states per parameter split into weights, gradients and optimizer states (planner.memory); a scheme
decides which of them each device keeps whole and which it keeps a 1/n shard of:
- data_parallel: everything replicated (ZeRO stage 0);
- zero1 / zero2 / zero3: ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054) shards optimizer states, then
  gradients, then weights; ZeRO-3 (= FSDP full sharding) also gathers one unit at a time (DeepSpeed: the
  largest layer's weights and gradients resident whole; FSDP2: see PyTorch's layout below);
- expert_parallel: the E experts are split across the n devices (ceil(E/n) per device) and the shared
  parameters replicated; tokens travel to their experts, so with balanced routing each device processes as
  many expert slots as on one device, and its activations are those of its own batch; `expert_load_factor`
  prices a device whose experts receive more (or fewer) slots than that, up to every row of every device.
Gradients and optimizer states exist for the trainable parameters only (the workload's fine-tuning regime,
model.trainable); weights for all. The workload's batch is per device. Activation checkpointing (per block) keeps only each block's input and
recomputes one block at a time; routers, heads and the loss are kept as without it. Whether a plan fits a
GPU is planner.headroom's rule: its bytes plus the CUDA context, the allocator's reserve and communication
buffers.

Two layouts of the same states:
- PyTorch's (every regime but `mixed_fp16`), as the engines this project runs allocate them
  (planner.bench.distributed measures them on real ranks, planner.fsdp_check under FSDPMemTracker), tensor by
  tensor from planner.params.parameter_tensors:
  - zero2 / zero3 are FSDP2 (`fully_shard`): each parameter is sharded on dim 0 in chunks of ceil(dim0/n) rows,
    and every rank allocates the padded chunk (ceil(dim0/n) × the other dims) for its weights and gradients;
    AdamW's moments are `zeros_like` the rank's own rows (unpadded: rank r holds
    max(0, min(ceil(dim0/n), dim0 − r·ceil(dim0/n))) rows, so the last ranks may hold fewer). ZeRO-2 is
    `reshard_after_forward=False`: between steps only the padded shard is resident (`weights_bytes`), and from
    each unit's forward to its backward the whole unit is gathered, n padded chunks per parameter
    (`gathered_layer_bytes`: all units at once at the end of the forward). ZeRO-3 is `reshard_after_forward=True`:
    the root unit stays gathered for the whole step (FSDP2 does not reshard the root after forward) beside one
    all-gather output of the larger of the root and the largest block
    (parallel_terms.estimate_fsdp_zero3_gathered_bytes);
  - Adam/AdamW keep a `step` counter per parameter tensor with state, a 4-byte fp32 scalar
    (`ADAMW_STEP_BYTES`), in the optimizer states;
  - data_parallel is DDP: its gradient buckets are a second copy of the gradients (`bucket_bytes`,
    `gradient_as_bucket_view=False`, the default);
  - expert_parallel is model.expert_parallel: rank r holds experts [r·c, min(E, (r+1)·c)), c = ceil(E/n).
    shared_then_expert's and expert_only's heads send their (rows, T, V) logits back through the exchange, whose
    temporaries at the end of the forward can outgrow the loss's backward
    (parallel_terms.estimate_expert_exchange_transient_bytes);
  - on CPU ranks (`backend="gloo"`) the plan's memory is the host's, so it holds FSDP2's Python-side state too
    (parallel_terms.estimate_fsdp_host_state_bytes); gloo's own collective buffers are transient and come after
    the step's peak (see that function).
  Values that depend on the rank are given for `rank` (default 0: the largest shard and the most experts).
- DeepSpeed's (`mixed_fp16`, the regime its estimators assume): fp16 weights and gradients, with an fp32 copy
  of the gradients, fp32 master weights and fp32 Adam moments (2 + 2 + 16 bytes per parameter), partitions of
  the flat count (ceil(P/n)), ZeRO-2 keeping the fp16 weights whole. The tests check it against DeepSpeed's
  own `estimate_zero2/3_model_states_mem_needs_all_live`. zero1, which no PyTorch engine here runs, uses
  this flat layout in every regime.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from model.checks import SettingError, check_int
from model.config import ChronosMoEConfig
from planner.activations import (activation_widths, estimate_activation_breakdown,
                                 estimate_loss_backward_transient_bytes)
from planner.headroom import Headroom, check_headroom, communication_buffer_bytes
from planner.memory import OPTIMIZER_STATE_BYTES, WEIGHT_AND_GRADIENT_BYTES
from planner.parallel_terms import (check_expert_load_factor, count_largest_layer_params,
                                    estimate_expert_exchange_transient_bytes, estimate_fsdp_host_state_bytes,
                                    estimate_fsdp_zero3_gathered_bytes)
from planner.params import (
    ParamBreakdown,
    count_params,
    experts_of_device,
    fsdp_shard_numel,
    parameter_tensors,
    split_trainable_params,
)
from model.trainable import trainable_components
from planner.workload import Workload
from planner.units import GIB

STRATEGIES = ("data_parallel", "zero1", "zero2", "zero3", "expert_parallel")
_ZERO_STAGE = {"data_parallel": 0, "zero1": 1, "zero2": 2, "zero3": 3, "expert_parallel": 0}
ADAMW_STEP_BYTES = 4  # torch.optim.Adam/AdamW's `step`: one fp32 scalar tensor per parameter with state
STEP_COUNTER_OPTIMIZERS = ("adam", "adamw")
DEEPSPEED_REGIME = "mixed_fp16"
BACKENDS = ("gloo", "nccl")

# Memory a program can allocate, as torch.cuda reports it (a little under the marketed size), by the GPU
# presets' keys (planner.steptime.gpu_presets) with the label the Devices tab and `plan --gpu` show. The H200's is
# what the H200 of this project's GPU check reports (about 139 GiB).
DEVICE_MEMORY: dict[str, tuple[str, int]] = {
    "h100-sxm": ("H100 80GB", int(79.1 * GIB)),
    "h100-pcie": ("H100 PCIe 80GB", int(79.1 * GIB)),
    "h200": ("H200 141GB", int(139.0 * GIB)),
    "a100-80gb": ("A100 80GB", int(79.1 * GIB)),
    "a100-40gb": ("A100 40GB", int(39.4 * GIB)),
    "a10g": ("A10G 24GB", int(22.0 * GIB)),
    "l4": ("L4 24GB", int(22.0 * GIB)),
    "t4": ("T4 16GB", int(14.6 * GIB)),
    "rtx-4090": ("RTX 4090 24GB", int(23.6 * GIB)),
}
GPU_MEMORY_BYTES = {label: memory for label, memory in DEVICE_MEMORY.values()}  # by label


@dataclass(frozen=True)
class StateBytesPerParam:
    """Bytes each parameter costs in weights, gradients and optimizer states."""

    weights: int
    gradients: int
    optimizer: int


def state_bytes_per_param(precision: str, optimizer: str) -> StateBytesPerParam:
    """The workload regimes of planner.memory, plus `mixed_fp16` (DeepSpeed's mixed precision)."""
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATE_BYTES)}, got {optimizer!r}")
    if precision == "mixed_fp16":
        # fp32 gradient copy (4) and fp32 master weights (4) belong to the optimizer's side.
        return StateBytesPerParam(2, 2, 4 + 4 + OPTIMIZER_STATE_BYTES[optimizer])
    if precision not in WEIGHT_AND_GRADIENT_BYTES:
        allowed = ", ".join([*WEIGHT_AND_GRADIENT_BYTES, "mixed_fp16"])
        raise SettingError("precision", f"precision must be one of {allowed}, got {precision!r}")
    weights, gradients = WEIGHT_AND_GRADIENT_BYTES[precision]
    return StateBytesPerParam(weights, gradients, OPTIMIZER_STATE_BYTES[optimizer])


@dataclass(frozen=True)
class DevicePlan:
    """What one of `num_devices` devices (the one of rank `rank`) holds during a training step, in bytes.

    `weights_bytes` are resident between steps (ZeRO-2/3: the shard); `gathered_layer_bytes` what is gathered
    whole during the step on top of it (ZeRO-3: DeepSpeed's largest layer's weights and gradients, or in PyTorch's
    layout FSDP2's root unit and one all-gather output; ZeRO-2 in PyTorch's layout: every unit's weights,
    gathered from its forward to its backward). `bucket_bytes` are DDP's
    gradient buckets: allocated beside the gradients, part of `peak_bytes`, left out of `total_bytes` because
    planner.headroom adds them with the other communication buffers when it decides whether a plan fits.
    `loss_transient_bytes` are the logits and the loss's backward temporaries beside the saved activations
    (planner.activations.estimate_loss_backward_transient_bytes), also part of `peak_bytes` only; so are
    `exchange_transient_bytes` (expert parallel: the heads' exchange at the end of the forward, which comes
    before the loss, so the peak holds the larger of the two) and `host_state_bytes` (CPU ranks: FSDP2's
    Python-side state)."""

    strategy: str
    num_devices: int
    activation_checkpointing: bool
    weights_bytes: int
    gradients_bytes: int
    optimizer_states_bytes: int
    gathered_layer_bytes: int
    activations_bytes: int
    rank: int = 0
    bucket_bytes: int = 0
    loss_transient_bytes: int = 0
    exchange_transient_bytes: int = 0
    host_state_bytes: int = 0

    @property
    def model_states_bytes(self) -> int:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_states_bytes + self.gathered_layer_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_states_bytes + self.activations_bytes

    @property
    def peak_bytes(self) -> int:
        """Everything the process allocates for the step: the model states, activations, DDP's buckets,
        the larger of the loss's backward temporaries and the expert exchange's, and the host-side state."""
        transient = max(self.loss_transient_bytes, self.exchange_transient_bytes)
        return self.total_bytes + self.bucket_bytes + transient + self.host_state_bytes


def estimate_checkpointed_activation_bytes(config: ChronosMoEConfig, workload: Workload, *, device: str = "cuda") -> int:
    """Per-block activation checkpointing: each block keeps its input; one block's saved tensors live at a
    time during recomputation; everything outside the blocks (token ids, routers, heads, the loss) is kept
    as without checkpointing. An estimate: the blocks of a stack are taken as equal."""
    full = estimate_activation_breakdown(config, workload, device=device)
    dims, batch = config.dims, workload.batch_size
    architecture = config.architecture if config.is_moe else "dense"
    # Where the block activations sit: expert_only's encoders are its experts (K per series); token_ffn's
    # expert FFNs live inside the blocks.
    encoder_copies = config.top_k if architecture == "expert_only" else 1
    expert_bytes = full.experts_bytes + full.expert_combine_bytes
    encoder_blocks_bytes = full.encoder_bytes + (expert_bytes if architecture == "expert_only" else 0)
    token_expert_bytes = expert_bytes if architecture == "token_ffn" else 0
    in_blocks_bytes = encoder_blocks_bytes + full.decoder_bytes + token_expert_bytes
    encoder_blocks = dims.num_layers * encoder_copies
    largest_block_bytes = max(encoder_blocks_bytes / encoder_blocks,
                              (full.decoder_bytes + token_expert_bytes) / dims.num_decoder_layers)
    stream_bytes = activation_widths(workload.precision, device).stream
    block_inputs_bytes = (encoder_blocks * workload.encoder_tokens + dims.num_decoder_layers
                          * workload.decoder_tokens) * batch * dims.d_model * stream_bytes
    return int(full.total_bytes - in_blocks_bytes + block_inputs_bytes + largest_block_bytes)


def plan_devices(
    config: ChronosMoEConfig,
    workload: Workload,
    strategy: str,
    num_devices: int,
    *,
    activation_checkpointing: bool = False,
    precision: Optional[str] = None,
    params: Optional[ParamBreakdown] = None,
    device: str = "cuda",
    rank: int = 0,
    expert_load_factor: float = 1.0,
    backend: Optional[str] = None,
) -> DevicePlan:
    """Per-device memory of one training step, on device `rank` (default 0, the one that holds the most).
    `precision` defaults to the workload's regime; the layout is PyTorch's, or DeepSpeed's for mixed_fp16.
    `expert_load_factor` (expert_parallel only): the routing slots the rank's experts receive relative to the
    balanced figure (1.0: as many as its own batch routes; at most parallel_terms.max_expert_load_factor); the
    activations the experts save scale with it (series-slots for shared_then_expert / expert_only, token-slots
    for token_ffn), and so do the heads' exchange temporaries. A fresh router is far from balanced:
    planner.bench.distributed measures each rank's load. `backend`: the process group's, for real ranks; "gloo"
    (CPU ranks, whose memory is the host's) adds FSDP2's Python-side state (estimate_fsdp_host_state_bytes)."""
    if strategy not in STRATEGIES:
        raise SettingError("strategy", f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    check_int("num_devices", num_devices, 1, 1_000_000)
    check_int("rank", rank, 0, num_devices - 1)
    if backend is not None and backend not in BACKENDS:
        raise SettingError("backend", f"backend must be one of {', '.join(BACKENDS)} (or None), got {backend!r}")
    if strategy == "expert_parallel" and not config.is_moe:
        raise SettingError("strategy", "strategy expert_parallel needs experts (num_experts > 0); use data_parallel or zero*")
    if strategy == "expert_parallel" and experts_of_device(config.num_experts, num_devices, rank):
        expert_load_factor = check_expert_load_factor(config, num_devices, rank, expert_load_factor)
    else:
        expert_load_factor = 1.0
    params = count_params(config) if params is None else params
    regime = precision or workload.precision
    per_param = state_bytes_per_param(regime, workload.optimizer)
    # mixed_fp16 computes in half precision, so its activations are autocast's.
    activation_workload = dataclasses.replace(workload, precision="amp_fp16" if regime == "mixed_fp16" else regime)
    n = num_devices

    trainable = split_trainable_params(params, workload.trainable, config.label)  # gradients and moments
    learns = trainable_components(workload.trainable)
    tensors = parameter_tensors(config)
    torch_layout = regime != DEEPSPEED_REGIME
    step_bytes = ADAMW_STEP_BYTES if torch_layout and workload.optimizer in STEP_COUNTER_OPTIMIZERS else 0
    gathered = bucket = 0
    if strategy == "expert_parallel":
        held_experts = set(experts_of_device(params.num_experts, n, rank))
        held = [t for t in tensors if t.expert is None or t.expert in held_experts]
        learning = [t for t in held if t.component in learns]
        weights = sum(t.numel for t in held) * per_param.weights
        gradients = sum(t.numel for t in learning) * per_param.gradients
        optimizer = sum(t.numel for t in learning) * per_param.optimizer + step_bytes * len(learning)
    elif strategy in ("zero2", "zero3") and torch_layout:
        shards = [(fsdp_shard_numel(t.shape, n, rank), t.component in learns) for t in tensors]
        padded = sum(pad for (pad, _), _ in shards)
        learning_padded = sum(pad for (pad, _), learn in shards if learn)
        learning_held = sum(own for (_, own), learn in shards if learn)
        weights = padded * per_param.weights
        gradients = learning_padded * per_param.gradients
        optimizer = learning_held * per_param.optimizer + step_bytes * sum(learn for _, learn in shards)
        if strategy == "zero2" and n > 1:
            gathered = n * padded * per_param.weights
    else:
        stage = _ZERO_STAGE[strategy]

        def shard(count: int, first_stage: int) -> int:
            return math.ceil(count / n) if stage >= first_stage else count

        learning_tensors = sum(t.component in learns for t in tensors)
        weights = shard(params.total_params, 3) * per_param.weights
        gradients = shard(trainable.total, 2) * per_param.gradients
        optimizer = shard(trainable.total, 1) * per_param.optimizer
        if strategy == "data_parallel":
            optimizer += step_bytes * learning_tensors
            bucket = gradients if n > 1 else 0  # DDP's buckets: a copy of every gradient it reduces
    if strategy == "zero3" and n > 1 and torch_layout:
        gathered = estimate_fsdp_zero3_gathered_bytes(config, n, per_param.weights)
    elif strategy == "zero3" and n > 1:  # DeepSpeed: the largest module's weights and gradients
        gathered = count_largest_layer_params(config) * (per_param.weights + per_param.gradients)
    breakdown = estimate_activation_breakdown(config, activation_workload, device=device)
    if activation_checkpointing:
        activations = estimate_checkpointed_activation_bytes(config, activation_workload, device=device)
    else:
        activations = breakdown.total_bytes
    # Expert parallel: the experts' saved activations follow the slots they receive (the balanced figure × the
    # load); weighting and summing the outputs stays with the rows' own batch (expert_combine_bytes). With
    # checkpointing this scales the whole, un-checkpointed expert part (an upper bound).
    activations += round(breakdown.experts_bytes * (expert_load_factor - 1))
    exchange = 0
    if strategy == "expert_parallel":
        exchange = estimate_expert_exchange_transient_bytes(config, activation_workload, n, rank, expert_load_factor,
                                                            device=device)
    fsdp = strategy in ("zero2", "zero3") and torch_layout and n > 1
    host = estimate_fsdp_host_state_bytes(config) if fsdp and backend == "gloo" else 0
    return DevicePlan(
        strategy=strategy,
        num_devices=num_devices,
        activation_checkpointing=activation_checkpointing,
        weights_bytes=weights,
        gradients_bytes=gradients,
        optimizer_states_bytes=optimizer,
        gathered_layer_bytes=gathered,
        activations_bytes=activations,
        rank=rank,
        bucket_bytes=bucket,
        loss_transient_bytes=estimate_loss_backward_transient_bytes(config, activation_workload, device=device),
        exchange_transient_bytes=exchange,
        host_state_bytes=host,
    )


def device_plan_headroom(plan: DevicePlan, config: ChronosMoEConfig, workload: Workload, device_memory_bytes: int, *,
                         precision: Optional[str] = None, params: Optional[ParamBreakdown] = None) -> Headroom:
    """Whether `plan` fits a GPU of `device_memory_bytes`, by planner.headroom's rule (context, allocator
    reserve and communication buffers beside the plan's bytes)."""
    params = count_params(config) if params is None else params
    buffers = communication_buffer_bytes(config, workload, plan.strategy, plan.num_devices,
                                         precision or workload.precision, params, count_largest_layer_params(config))
    return check_headroom(plan.total_bytes, device_memory_bytes, buffers)


def plan_all_strategies(config: ChronosMoEConfig, workload: Workload, num_devices: int, *,
                        device_memory_bytes: int, precision: Optional[str] = None,
                        expert_load_factor: float = 1.0) -> list[dict]:
    """One row per strategy × activation checkpointing, with whether it fits the given GPU memory
    (planner.headroom: 'fits', 'tight' or 'does not fit', and the bytes beside the plan). `expert_load_factor`:
    expert parallel's routing load on device 0 (plan_devices), which needs experts."""
    if not config.is_moe and expert_load_factor != 1.0:
        raise SettingError("expert_load_factor", f"expert_load_factor applies to expert parallelism, which needs "
                           f"experts (num_experts > 0); got {expert_load_factor!r} for a dense model")
    params = count_params(config)
    rows = []
    for strategy in STRATEGIES:
        if strategy == "expert_parallel" and not config.is_moe:
            continue
        for checkpointing in (False, True):
            plan = plan_devices(config, workload, strategy, num_devices, activation_checkpointing=checkpointing,
                                precision=precision, params=params, expert_load_factor=expert_load_factor)
            headroom = device_plan_headroom(plan, config, workload, device_memory_bytes, precision=precision,
                                            params=params)
            rows.append({
                "strategy": strategy,
                "num_devices": num_devices,
                "activation_checkpointing": checkpointing,
                "weights_bytes": plan.weights_bytes,
                "gradients_bytes": plan.gradients_bytes,
                "optimizer_states_bytes": plan.optimizer_states_bytes,
                "gathered_layer_bytes": plan.gathered_layer_bytes,
                "activations_bytes": plan.activations_bytes,
                "total_bytes": plan.total_bytes,
                **headroom.row(),
            })
    return rows
