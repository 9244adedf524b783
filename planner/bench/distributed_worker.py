"""The distributed benchmark's subprocess, started by `distributed.run_distributed`, never by hand.

`python -m planner.bench.distributed_worker` reads a DistributedSpec as JSON on stdin, spawns its N ranks
(`torch.multiprocessing.start_processes`, spawn: fresh interpreters, so each rank's memory baseline is clean;
all in this process's group, so the runner's kill reaches every rank) and writes events on stdout, as
planner.bench.worker does: progress, then exactly one of {"event": "measured", "ranks": [...]} or
{"event": "error", "message", "traceback"}. A rank that raises ends the run: the others are terminated and
the message names the rank and its error. Every rank dies with this process (PR_SET_PDEATHSIG), which dies
with the runner.

Each rank (gloo on CPU, nccl on CUDA, one device per rank): builds the variant with the same seed, wraps it
(DDP; FSDP2 `fully_shard` of every T5 block, every expert encoder's blocks and the root, with
`reshard_after_forward` False for zero2 and True for zero3; or `make_expert_parallel` + `average_gradients`),
runs `warmup + repeats` AdamW training steps on its own batch of synthetic series (timed: the repeats), then
one more under CommDebugMode whose collectives it counts, and reports the bytes it holds, measured from its
local tensors' storages (each storage once: FSDP2's padded shards, DDP's full tensors, the expert-parallel
rank's held parameters), its peak memory above its baseline, each step's peak, and its step times.

Peak memory on CPU: the peak resident set (VmHWM) minus the resident set at the baseline, less the file-backed
pages mapped since (RssFile: the code of libtorch, gloo and the kernels' libraries, paged in the first time
each op runs, about 17 MB a rank, which is not memory the step allocates). The baseline is taken after the
process group is up and every collective kind the strategy uses has run once on a tiny tensor (gloo's own
set-up is not the step's). The high-water mark is reset at the start of every step and read at its end, so
each step has its own peak (less the file-backed pages mapped by then); the rank's peak is the highest of
them and of the set-up before the first step. File-backed pages stop growing after the first step
(`file_backed_after_warmup_bytes` says by how much they grew later). On CUDA the same with
`max_memory_allocated` and `reset_peak_memory_stats`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

from planner.bench.rank_memory import StepPeaks, peak_step, status_bytes
from planner.bench.worker import PR_SET_PDEATHSIG, open_protocol

RANK_TIMEOUT_S = 120  # a rank stuck in a collective fails (gloo's timeout) rather than waiting for the runner


def _die_with(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


# --- collectives: counts from CommDebugMode, bytes from the tensors passed -------------------------------------

# c10d op name -> (collective kind, which argument holds the full buffer). The buffer is step_collectives'
# convention: all-reduce and reduce-scatter their (full) input, all-gather its (full) output, all-to-all what
# it sends.
C10D_BUFFERS = {
    "allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0),
    "_allgather_base_": ("all_gather", 0), "allgather_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0), "allgather_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1), "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "alltoall_base_": ("all_to_all", 1), "alltoall_": ("all_to_all", 1),
    "broadcast_": ("broadcast", 0), "gather_": ("gather", 1), "scatter_": ("scatter", 1), "reduce_": ("reduce", 0),
}


def _tensor_bytes(value: Any) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def make_comm_mode():
    """CommDebugMode counting every collective in its `comm_counts` (what `get_comm_counts` returns, keyed by op,
    the same op sets and native-to-legacy mapping as CommDebugMode) and, beside them, the count and bytes of
    each kind. Two departures from CommDebugMode, both measured on torch 2.13: it records counts only
    (`comm_counts[op] += 1`, no sizes), so the bytes are read here from the tensors each c10d op is passed;
    and its per-module tracker (ModTracker hooks) raises IndexError in `_fw_set_module_hook` on the T5 stack,
    so it is not entered: the counting is the dispatch-level part alone."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.debug._comm_mode import NATIVE_TO_PY_MAPPING, c10d_collective_ops
    from torch.utils._python_dispatch import TorchDispatchMode

    class ByteCountingCommMode(CommDebugMode):
        def __init__(self) -> None:
            super().__init__()
            self.kind_counts: dict[str, int] = defaultdict(int)
            self.kind_bytes: dict[str, int] = defaultdict(int)

        def __enter__(self):
            self.comm_counts.clear()
            TorchDispatchMode.__enter__(self)
            return self

        def __exit__(self, *args):
            TorchDispatchMode.__exit__(self, *args)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(t == DTensor for t in types):
                return NotImplemented  # DTensor desugars into plain ops (and collectives) seen next
            out = func(*args, **(kwargs or {}))
            packet = getattr(func, "_overloadpacket", None)
            if packet in self.comm_registry or packet in c10d_collective_ops:
                self.comm_counts[NATIVE_TO_PY_MAPPING.get(packet, packet)] += 1
                name = getattr(packet, "__name__", "")
                if name in C10D_BUFFERS:
                    kind, index = C10D_BUFFERS[name]
                    self.kind_counts[kind] += 1
                    self.kind_bytes[kind] += _tensor_bytes(args[index]) if len(args) > index else 0
                else:  # functional collectives (not used by DDP, FSDP2 or expert parallel here): input bytes
                    kind = name.split(".")[-1]
                    self.kind_counts[kind] += 1
                    self.kind_bytes[kind] += _tensor_bytes(args[0]) if args else 0
            return out

    return ByteCountingCommMode()


# --- bytes held, from the local tensors' storages --------------------------------------------------------------

def _local(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors` (local shards for DTensors), each storage once."""
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None:
            continue
        storage = _local(tensor).untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def local_numel(tensors) -> int:
    return sum(_local(t).numel() for t in tensors if t is not None)


# --- one rank ------------------------------------------------------------------------------------------------

def _wrap(model, spec: dict, config, device: str):
    import torch

    strategy = spec["strategy"]
    if strategy == "data_parallel":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(device).index] if device.startswith("cuda") else None
        # MoE: as users of sparse MoE set it (before a training step ran every expert, one no series reached
        # had no gradient). The planner counts what it costs: the used-parameter map's all-reduce, and buckets
        # kept in registration order (DDP does not rebuild them with it).
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=config.is_moe), model
    if strategy in ("zero2", "zero3"):
        from torch.distributed.device_mesh import init_device_mesh

        from planner.fsdp_check import _shard

        mesh = init_device_mesh(device.split(":")[0], (spec["ranks"],))
        _shard(model, config, mesh, reshard_after_forward=strategy == "zero3")
        return model, model
    from model.expert_parallel import make_expert_parallel

    return make_expert_parallel(model), model


def _warm_up_collectives(strategy: str, device: str) -> None:
    """One tiny call of every collective kind `strategy` issues, before the memory baseline: gloo's (or
    NCCL's) first use of each sets up buffers that belong to the process group, not to the step."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    one = torch.ones(world, device=device)
    dist.all_reduce(one)
    dist.all_gather([torch.empty_like(one) for _ in range(world)], one)
    if strategy in ("zero2", "zero3"):
        dist.all_gather_into_tensor(torch.empty(world * world, device=device), one)
        dist.reduce_scatter_tensor(torch.empty(1, device=device), one)
    if strategy == "expert_parallel":
        dist.all_to_all_single(torch.empty_like(one), one)


def rank_main(rank: int, spec: dict, port: int, results: str, launcher_pid: int) -> None:
    _die_with(launcher_pid)
    import torch
    import torch.distributed as dist
    from datetime import timedelta

    bench = spec["bench"]
    torch.set_num_threads(bench.get("threads") or 1)
    cuda = spec["device"] == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=spec["ranks"],
                            timeout=timedelta(seconds=RANK_TIMEOUT_S))
    try:
        _run_rank(rank, spec, device, Path(results))
    finally:
        dist.destroy_process_group()


def _run_rank(rank: int, spec: dict, device: str, results: Path) -> None:
    import warnings

    import torch
    import torch.distributed as dist

    from model.build import build_model_from_config
    from model.expert_parallel import average_gradients
    from model.training import synthetic_series, training_batch
    from planner.bench.memory_probe import PeakMemoryProbe, pin_allocator
    from planner.bench.spec import BenchSpec
    from planner.bench.steps import LEARNING_RATE
    from planner.fsdp_check import fsdp_padded_numel

    warnings.simplefilter("ignore")  # FSDP2's "returned a view tensor" on every T5 block
    bench = BenchSpec.from_dict(spec["bench"])
    config = bench.model_config()
    probe = PeakMemoryProbe(device.split(":")[0])
    pin_allocator()
    _warm_up_collectives(spec["strategy"], device)
    dist.barrier()
    probe.start()  # after the imports, the process group and its first collectives: everything but the run
    file_backed = status_bytes("RssFile").get("RssFile")
    step_peaks = StepPeaks(probe)
    torch.manual_seed(bench.seed)  # every rank builds the same model
    model = build_model_from_config(config, device=device, trainable=bench.trainable)
    padded_numel = fsdp_padded_numel(model, spec["ranks"])  # FSDP2's per-rank shard, dim 0 padded
    wrapped, inner = _wrap(model, spec, config, device)
    param_tensors = sum(1 for _ in inner.parameters())  # after the wrap: expert parallel drops experts
    parameters = [p for p in inner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE, foreach=False)
    generator = torch.Generator().manual_seed(bench.seed + 1 + rank)  # each rank its own series
    series = synthetic_series(bench.batch_size, bench.context_length + bench.prediction_length, generator)
    batch = {name: tensor.to(device) for name, tensor in
             training_batch(inner, series, bench.context_length, bench.prediction_length).items()}
    wrapped.train()
    expert_parallel = spec["strategy"] == "expert_parallel"

    def step():
        optimizer.zero_grad(set_to_none=True)
        output = wrapped(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        output.loss.backward()
        if expert_parallel:
            average_gradients(inner)
        optimizer.step()
        return float(output.loss.detach())

    def synchronize():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times, losses = [], []
    file_backed_after_first = None
    routed = []  # expert parallel: per step, (slots this rank's experts received, slots its batch sent)
    for index in range(bench.warmup + bench.repeats):
        dist.barrier()  # every rank starts the step together: the time is the step's, not a wait for a peer
        step_peaks.close()  # the set-up's or the previous step's peak; the high-water mark starts again
        if expert_parallel:
            inner.placement.routed_slots.clear()
        started = time.perf_counter()
        losses.append(step())
        synchronize()
        if expert_parallel:
            routed.append(tuple(map(sum, zip(*inner.placement.routed_slots))))
        if index >= bench.warmup:
            times.append(time.perf_counter() - started)
        if index == 0:
            file_backed_after_first = status_bytes("RssFile").get("RssFile")
    # Sizes after a step: FSDP2 has resharded, the gradients are the reduced (sharded) ones.
    measured = {
        "param_bytes": storage_bytes(inner.parameters()),
        "grad_bytes": storage_bytes(p.grad for p in inner.parameters()),
        "optimizer_bytes": storage_bytes(value for state in optimizer.state.values() for value in state.values()
                                         if isinstance(value, torch.Tensor)),
        "param_numel": local_numel(inner.parameters()),
        "grad_numel": local_numel(p.grad for p in inner.parameters()),
        "moment_numel": local_numel(state["exp_avg"] for state in optimizer.state.values()),
        "step_tensors": sum(1 for state in optimizer.state.values() if isinstance(state.get("step"), torch.Tensor)),
        "param_tensors": param_tensors, "padded_numel": padded_numel,
        "grad_tensors": sum(1 for p in inner.parameters() if p.grad is not None),
    }
    step_peaks.close()  # the last step's
    peak, method = probe.peak_bytes(), probe.method
    file_backed_end = status_bytes("RssFile").get("RssFile")
    file_growth = later_growth = None
    if probe.method.startswith("cpu") and None not in (file_backed, file_backed_end, file_backed_after_first):
        file_growth = file_backed_end - file_backed
        later_growth = file_backed_end - file_backed_after_first
        peak = max(0, peak - file_growth)
        method += ", less the file-backed pages mapped since the baseline"
    if step_peaks.peaks is not None:  # the high-water mark was reset at each step: the highest step's
        peak = max(step_peaks.peaks)
        method += ", highest of the set-up's and each step's (high-water mark reset per step)"
    comm = make_comm_mode()
    dist.barrier()
    with comm:
        step()
    synchronize()
    result = {
        "rank": rank, "device": device, "threads": torch.get_num_threads(), **measured,
        "peak_memory_bytes": peak, "memory_method": method, "baseline_bytes": probe.baseline_bytes,
        "file_backed_growth_bytes": file_growth, "file_backed_after_warmup_bytes": later_growth,
        "times_s": times, "losses": losses,
        "step_peak_bytes": step_peaks.peaks[1:] if step_peaks.peaks is not None else None,
        "setup_peak_bytes": step_peaks.peaks[0] if step_peaks.peaks else None,
        "collective_counts": dict(comm.kind_counts), "collective_bytes": dict(comm.kind_bytes),
        "comm_debug_counts": {str(op): count for op, count in comm.get_comm_counts().items()},
    }
    if expert_parallel:
        result["held_experts"] = list(inner.placement.held)
        result["expert_slots_received_steps"] = [received for received, _ in routed]
        result["expert_slots_sent_steps"] = [sent for _, sent in routed]
        result["peak_step"] = peak_step(routed, result["step_peak_bytes"])
        result["expert_slots_received"], result["expert_slots_sent"] = routed[result["peak_step"]]
    (results / f"rank-{rank}.json").write_text(json.dumps(result))


# --- the launcher --------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_failure(error: BaseException) -> str:
    """One line: which rank ended the run, and how."""
    import torch.multiprocessing as mp

    if isinstance(error, mp.ProcessRaisedException):
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        return f"rank {error.error_index} failed: {lines[-1].strip() if lines else 'error'}"
    if isinstance(error, mp.ProcessExitedException):
        how = f"killed by signal {error.signal_name}" if error.signal_name else f"exited with status {error.exit_code}"
        return f"rank {error.error_index} {how} (out of memory, or killed from outside)"
    return f"{type(error).__name__}: {error}"


def run(spec: dict, emit) -> None:
    import torch.multiprocessing as mp

    from planner.bench.distributed_worker import rank_main as target  # by its module's name, not __main__'s

    ranks = spec["ranks"]
    emit("progress", stage="build", done=0, total=1)
    with tempfile.TemporaryDirectory(prefix="planner-distributed-") as results:
        try:
            mp.start_processes(target, args=(spec, _free_port(), results, os.getpid()), nprocs=ranks, join=True,
                               start_method="spawn")
        except Exception as error:  # noqa: BLE001 - a rank's failure is the run's result
            emit("error", message=_rank_failure(error), traceback=str(error)[-4000:])
            return
        rows = [json.loads((Path(results) / f"rank-{rank}.json").read_text()) for rank in range(ranks)]
    emit("measured", ranks=rows)


def main() -> None:
    emit = open_protocol()
    try:
        run(json.loads(sys.stdin.read()), emit)
    except Exception as error:  # noqa: BLE001
        emit("error", message=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())


if __name__ == "__main__":
    main()
