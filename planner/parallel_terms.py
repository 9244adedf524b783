"""What a sharding scheme adds to one device beside its share of the model states (planner.parallel): the
unit ZeRO-3 gathers at once (DeepSpeed's largest layer; FSDP2's root and blocks), FSDP2's Python-side state on
CPU ranks, the temporaries of expert parallelism's exchange at the end of the forward, and the load a rank's
experts can receive."""

from __future__ import annotations

import math
import re

from model.checks import SettingError
from model.config import ChronosMoEConfig
from planner.activations import FLOAT32_BYTES, activation_widths
from planner.params import (
    attention_linears,
    context_router_linears,
    count_embedding_params,
    expert_head_linears,
    experts_of_device,
    ffn_linears,
    fsdp_shard_numel,
    lm_head_linear,
    parameter_tensors,
    token_router_linear,
)
from planner.workload import Workload

# FSDP2's Python-side state on a rank (torch 2.13, tracemalloc, FSDP2 minus DDP after three training steps, 2
# gloo ranks; debug dense, token_ffn, shared_then_expert, expert_only and tiny dense: 47 to 109 parameter tensors,
# 2.11 to 2.64 MiB, fitted to 0.1 MiB): a fixed part, most of it the source text linecache keeps once DTensor's
# sharding propagation builds a FakeTensorMode (whose constructor calls traceback.extract_stack), and per
# parameter tensor its FSDPParam, DTensor and hooks.
FSDP2_HOST_FIXED_BYTES = 1_780_000
FSDP2_HOST_PER_TENSOR_BYTES = 8_500


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
