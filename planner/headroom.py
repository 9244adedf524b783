"""Whether a plan fits a GPU: its predicted peak plus what a real process holds beside its tensors.

A CUDA process holds more than the tensors the planner counts (planner.memory, planner.parallel):
- the CUDA context (driver state and the kernels of the loaded libraries), outside PyTorch's allocator:
  CUDA_CONTEXT_BYTES, an assumption — several hundred MiB with CUDA's lazy module loading, PyTorch's default
  since CUDA 11.7; `scripts/device_check.sh` measures it on a lent GPU;
- the caching allocator's reserve: PyTorch keeps freed blocks and rounds requests up, so what it reserves
  from the device exceeds the peak it allocates; ALLOCATOR_RESERVE_FRACTION of the peak, an assumption
  (device_check.sh reports reserved ÷ allocated);
- communication buffers on more than one device: NCCL's own (NCCL_BUFFSIZE, 4 MiB by NCCL's documented
  default, for each of NCCL_CHANNELS_ASSUMED channels and both ring neighbours); DDP's gradient buckets, a
  second copy of the gradients it reduces (PyTorch's DDP documents that `gradient_as_bucket_view=True`
  saves "the total gradients size"; the default is False); ZeRO's reduce-scatter of one layer's gradients
  at a time; expert parallel's all-to-all send and receive buffers of the largest routed tensor.

A plan fits when the sum stays within the device's memory, and is "tight" when less than TIGHT_FRACTION of
the device is left: fragmentation or a longer series can tip it over. The Devices tab, `plan --strategies`
and `run` all decide with `check_headroom`.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ChronosMoEConfig
from planner.communication import GRADIENT_BYTES, routed_bytes_per_micro_step
from planner.params import ParamBreakdown, split_trainable_params
from planner.workload import Workload

MIB = 2**20
CUDA_CONTEXT_BYTES = 512 * MIB
ALLOCATOR_RESERVE_FRACTION = 0.10
NCCL_BUFFER_BYTES = 4 * MIB  # NCCL_BUFFSIZE's default
NCCL_CHANNELS_ASSUMED = 16
TIGHT_FRACTION = 0.10
FITS, TIGHT, DOES_NOT_FIT = "fits", "tight", "does not fit"


@dataclass(frozen=True)
class Headroom:
    """A plan's peak and what the process holds beside it, against one device's memory (bytes)."""

    peak_bytes: int
    context_bytes: int
    allocator_reserve_bytes: int
    communication_bytes: int
    device_memory_bytes: int

    @property
    def needed_bytes(self) -> int:
        return self.peak_bytes + self.context_bytes + self.allocator_reserve_bytes + self.communication_bytes

    @property
    def headroom_bytes(self) -> int:
        """What is left on the device (negative: how much is missing)."""
        return self.device_memory_bytes - self.needed_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    @property
    def tight(self) -> bool:
        return self.fits and self.headroom_bytes < TIGHT_FRACTION * self.device_memory_bytes

    @property
    def status(self) -> str:
        return DOES_NOT_FIT if not self.fits else TIGHT if self.tight else FITS

    def row(self) -> dict[str, object]:
        return {"context_bytes": self.context_bytes, "allocator_reserve_bytes": self.allocator_reserve_bytes,
                "communication_buffer_bytes": self.communication_bytes, "needed_bytes": self.needed_bytes,
                "headroom_bytes": self.headroom_bytes, "fits": self.fits, "tight": self.tight,
                "fit_status": self.status}


def communication_buffer_bytes(config: ChronosMoEConfig, workload: Workload, strategy: str, num_devices: int,
                               precision: str, params: ParamBreakdown, largest_layer_params: int) -> int:
    """The communication buffers one device holds during a training step (see the module docstring)."""
    if num_devices <= 1:
        return 0
    nccl = NCCL_BUFFER_BYTES * NCCL_CHANNELS_ASSUMED * 2
    grad = GRADIENT_BYTES[precision]
    trainable = split_trainable_params(params, workload.trainable, config.label)  # what gets a gradient
    if strategy == "data_parallel":
        return nccl + trainable.total * grad
    if strategy in ("zero1", "zero2", "zero3"):
        return nccl + largest_layer_params * grad
    shared = trainable.shared
    routed = max((size for _, size in routed_bytes_per_micro_step(config, workload, precision)), default=0)
    return nccl + shared * grad + 2 * routed


def check_headroom(peak_bytes: int, device_memory_bytes: int, communication_bytes: int = 0) -> Headroom:
    """A GPU plan's headroom: the peak plus the context, the allocator's reserve and communication buffers."""
    return Headroom(int(peak_bytes), CUDA_CONTEXT_BYTES, round(ALLOCATOR_RESERVE_FRACTION * peak_bytes),
                    int(communication_bytes), int(device_memory_bytes))
