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
    all-gather output of the larger of the root and the largest block (estimate_fsdp_zero3_gathered_bytes);
  - Adam/AdamW keep a `step` counter per parameter tensor with state, a 4-byte fp32 scalar
    (`ADAMW_STEP_BYTES`), in the optimizer states;
  - data_parallel is DDP: its gradient buckets are a second copy of the gradients (`bucket_bytes`,
    `gradient_as_bucket_view=False`, the default);
  - expert_parallel is model.expert_parallel: rank r holds experts [r·c, min(E, (r+1)·c)), c = ceil(E/n).
    shared_then_expert's and expert_only's heads send their (rows, T, V) logits back through the exchange, whose
    temporaries at the end of the forward can outgrow the loss's backward (estimate_expert_exchange_transient_bytes);
  - on CPU ranks (`backend="gloo"`) the plan's memory is the host's, so it holds FSDP2's Python-side state too
    (estimate_fsdp_host_state_bytes); gloo's own collective buffers are transient and come after the step's peak
    (see that function).
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
import re
from dataclasses import dataclass
from typing import Optional

from model.checks import SettingError, check_int
from model.config import ChronosMoEConfig
from planner.activations import (FLOAT32_BYTES, activation_widths, estimate_activation_breakdown,
                                 estimate_loss_backward_transient_bytes)
from planner.headroom import Headroom, check_headroom, communication_buffer_bytes
from planner.memory import OPTIMIZER_STATE_BYTES, WEIGHT_AND_GRADIENT_BYTES
from planner.params import (
    ParamBreakdown,
    attention_linears,
    context_router_linears,
    count_embedding_params,
    count_params,
    expert_head_linears,
    experts_per_device,
    ffn_linears,
    experts_of_device,
    fsdp_shard_numel,
    parameter_tensors,
    split_trainable_params,
    lm_head_linear,
    token_router_linear,
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
# FSDP2's Python-side state on a rank (torch 2.13, tracemalloc, FSDP2 minus DDP after three training steps, 2
# gloo ranks; debug dense, token_ffn, shared_then_expert, expert_only and tiny dense: 47 to 109 parameter tensors,
# 2.11 to 2.64 MiB, fitted to 0.1 MiB): a fixed part, most of it the source text linecache keeps once DTensor's
# sharding propagation builds a FakeTensorMode (whose constructor calls traceback.extract_stack), and per
# parameter tensor its FSDPParam, DTensor and hooks.
FSDP2_HOST_FIXED_BYTES = 1_780_000
FSDP2_HOST_PER_TENSOR_BYTES = 8_500

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


def count_largest_layer_params(config: ChronosMoEConfig) -> int:
    """Parameters of the largest single module (its own tensors, not its children's), the unit ZeRO-3
    gathers at once; the same quantity DeepSpeed's model_to_params reports."""
    dims = config.dims
    linears = [*attention_linears(dims), *ffn_linears(dims)]
    if config.is_moe and config.architecture in ("shared_then_expert", "expert_only"):
        linears += [*context_router_linears(config), lm_head_linear(dims)]
    if config.is_moe and config.architecture == "shared_then_expert":
        linears += expert_head_linears(config)
    if config.is_moe and config.architecture == "token_ffn":
        linears.append(token_router_linear(config))
    return max(count_embedding_params(dims), *(linear.params for linear in linears))


# FSDP2's units as this project wraps them (planner.fsdp_check._shard, planner.bench.distributed_worker): every
# T5 block of the encoder and the decoder, and of every expert encoder (expert_only), then the root (the rest).
_FSDP_BLOCK = re.compile(r"^(backbone\.(encoder|decoder)|experts\.\d+\.encoder)\.block\.\d+\.")


def count_fsdp_unit_params(config: ChronosMoEConfig, num_devices: int) -> tuple[int, int]:
    """(root unit, largest block unit) in elements as FSDP2 gathers them on `num_devices` ranks: n padded dim-0
    chunks of every parameter of the unit (planner.params.parameter_tensors, grouped by name)."""
    root, blocks = 0, {}
    for tensor in parameter_tensors(config):
        gathered = num_devices * fsdp_shard_numel(tensor.shape, num_devices)[0]
        match = _FSDP_BLOCK.match(tensor.name)
        if match is None:
            root += gathered
        else:
            blocks[match.group(0)] = blocks.get(match.group(0), 0) + gathered
    return root, max(blocks.values(), default=0)


def estimate_fsdp_zero3_gathered_bytes(config: ChronosMoEConfig, num_devices: int, weight_bytes: int) -> int:
    """What FSDP2's ZeRO-3 (`reshard_after_forward=True`) holds gathered at the step's peak, beside the shards:
    the root unit (embedding, final norms, routers, heads), which FSDP2 never reshards after forward, and one
    all-gather output of the larger of the root and the largest block (FSDPMemTracker's peak snapshot: the
    root's for shared_then_expert and expert_only, whose root is the largest unit, a block's for dense and
    token_ffn)."""
    root, largest_block = count_fsdp_unit_params(config, num_devices)
    return (root + max(root, largest_block)) * weight_bytes


def estimate_fsdp_host_state_bytes(config: ChronosMoEConfig) -> int:
    """Host memory FSDP2 (zero2 / zero3) adds on a rank beside its tensors: Python objects, measured with
    tracemalloc on 2 gloo ranks as what an FSDP2 rank holds after training steps beyond a DDP rank of the same
    model (tests/test_parallel_host.py measures it again). A fixed FSDP2_HOST_FIXED_BYTES, most of it (1.3 MB)
    source text: the first DTensor op whose sharding is not cached builds a FakeTensorMode, whose constructor
    calls `traceback.extract_stack()`, and linecache then keeps the whole source of every file on that stack;
    the rest DTensor's sharding caches. And FSDP2_HOST_PER_TENSOR_BYTES per parameter tensor (its FSDPParam,
    the DTensor and sharded views, the hooks). On CUDA ranks it is host memory, not the device's, so only CPU
    ranks (gloo) count it.

    Not counted, because it does not coincide with the step's peak: gloo has no native reduce-scatter or
    all-gather into one tensor. Its `_allgather_base` gathers into a new flat tensor (the unit's unsharded
    size) and copies it out; its `_reduce_scatter_base` clones the whole unsharded gradient, all-reduces the
    clone and copies out the rank's chunk (the high-water mark of one call on 2 and 4 ranks, 1–8 MiB buffers:
    0.75–0.98× and 1.07–1.47× the unsharded buffer).
    Both run in FSDP2's forward and after each unit's backward, when the loss's backward temporaries, the
    step's peak, are gone (a per-op high-water trace of debug zero2 / zero3 puts the peak at log-softmax's
    backward)."""
    return FSDP2_HOST_FIXED_BYTES + FSDP2_HOST_PER_TENSOR_BYTES * len(parameter_tensors(config))


def estimate_expert_exchange_transient_bytes(config: ChronosMoEConfig, workload: Workload, num_devices: int,
                                             rank: int = 0, expert_load_factor: float = 1.0, *,
                                             device: str = "cuda") -> int:
    """Expert parallel, shared_then_expert and expert_only: what the heads' exchange holds when it returns (the
    end of the forward: model.expert_parallel.expert_parallel_dispatch) beyond the saved activations, less the
    loss's fp32 log-probabilities, which the activations count and which do not exist yet. V-wide, per (T, V)
    row of logits (measured op by op on 2 gloo ranks):
    - per slot the rank's experts received (load × B·K): the heads' outputs, their concatenation (only when
      the rank holds more than one expert), the cast to the input's dtype (only when it differs) and the copy
      in the order received that goes back;
    - per slot the rank's batch sent (B·K): the weighted outputs (the outputs themselves are saved for the
      routing weights' gradient: expert_combine_bytes);
    - per series: the zeros the weighted outputs are summed into and the sum, the logits.
    In the backward the gradients take the same way back (two received-wide copies beside the sent-wide
    gradients), after the loss's backward has freed its temporaries; not priced (the lightly loaded ranks of
    the distributed benchmark, where it weighs most against the forward's, read 0.96–1.07). 0 for other
    architectures (token_ffn's exchanges are D-wide) and other strategies."""
    if not (config.is_moe and config.architecture in ("shared_then_expert", "expert_only")):
        return 0
    widths = activation_widths(workload.precision, device)
    held = len(experts_of_device(config.num_experts, num_devices, rank))
    sent = workload.batch_size * config.top_k
    received = round(expert_load_factor * sent) if held else 0
    received_copies = (widths.compute + (widths.compute if held > 1 else 0)
                       + (widths.stream if widths.compute != widths.stream else 0) + widths.stream)
    row = workload.decoder_tokens * config.dims.vocab_size  # elements of one row's logits
    held_bytes = row * (received * received_copies + sent * widths.stream + 2 * workload.batch_size * widths.stream)
    return held_bytes - workload.batch_size * row * FLOAT32_BYTES


def max_expert_load_factor(config: ChronosMoEConfig, num_devices: int, rank: int = 0) -> float:
    """The most routing slots rank `rank`'s experts can receive under expert parallelism, relative to the
    balanced figure (as many as its own batch routes, B·K per row kind): every row of every rank sends
    min(K, c) of its K slots to the c experts the rank holds, so n·min(K, c)/K."""
    held = len(experts_of_device(config.num_experts, num_devices, rank))
    return num_devices * min(config.top_k, held) / config.top_k


def check_expert_load_factor(config: ChronosMoEConfig, num_devices: int, rank: int, factor: float) -> float:
    """`factor` if it is a load the rank's experts can receive (0 … max_expert_load_factor), else SettingError."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
        raise SettingError("expert_load_factor", f"expert_load_factor must be a number, got {factor!r}")
    most = max_expert_load_factor(config, num_devices, rank)
    if not 0 <= factor <= most:
        raise SettingError("expert_load_factor", f"expert_load_factor must be between 0 and {most:g} (every row of "
                           f"every one of {num_devices} devices routed to the experts of device {rank}), got {factor:g}")
    return float(factor)


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
    balanced figure (1.0: as many as its own batch routes; at most max_expert_load_factor); the activations
    the experts save scale with it (series-slots for shared_then_expert / expert_only, token-slots for
    token_ffn), and so do the heads' exchange temporaries. A fresh router is far from balanced:
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
