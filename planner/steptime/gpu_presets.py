"""GPUs one does not have, from their datasheets and published measurements (cited beside each number): the
matmul rate is the datasheet peak × the measured achievable fraction (MAMF) × the share of the GPU a GEMM's
128×128 output tiles fill (wave quantisation); memory-bound ops run at the datasheet bandwidth × an achievable
fraction; every kernel takes at least a minimum duration; the host's time per op is this machine's probe (or a
stated default) plus the CUDA launch call. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional

from planner.steptime.ops import OpRecord

# Default host time per dispatched op when no probe of this machine exists: the order this CPU measures
# (tests/test_steptime_probe.py keeps the default within 5x of a fresh, reduced probe; the full probe of a
# 2-core Zen 3 VM read 28 µs for the forward).
DEFAULT_HOST_S_PER_OP = {"forward": 12e-6, "forecast": 12e-6, "backward": 6e-6, "optimizer": 6e-6}
DEFAULT_HOST_S_PER_VIEW = 2e-6
# The next three are assumptions, not measurements: public write-ups put a CUDA kernel launch at a few to
# tens of µs of host time, and a host sync (.item(), .tolist()) at tens of µs. scripts/device_check.sh
# measures what a real GPU gives, and its results replace these once a GPU has been lent.
CUDA_LAUNCH_S = 5e-6  # cudaLaunchKernel's host cost per kernel
KERNEL_FLOOR_S = 2.5e-6  # the shortest a kernel occupies the GPU, however little it does
CUDA_SYNC_S = 15e-6  # cudaStreamSynchronize + a small device-to-host copy (the queued work is device time)
GEMM_TILE = 128  # cuBLAS's common output tile for large half/TF32 GEMMs (CUTLASS default 128×128)
# Achievable share of the datasheet bandwidth for streaming kernels: an assumption (copy kernels typically
# reach 80–90% of HBM peaks); device_check.sh measures it on a lent GPU.
BANDWIDTH_EFFICIENCY = 0.85
# Share of the datasheet matmul peak the best cuBLAS GEMM reaches (Bekman, "Machine Learning Engineering",
# compute/accelerator, "Maximum Achievable Matmul FLOPS comparison table", bf16, torch 2.5–2.7):
# A100 SXM 86.9%, A100 PCIe 81.1%, H100 SXM 80.3% ("H200 is the same"). Cards absent from the table take
# 0.80, stated as an assumption.
MAMF_FRACTION_ASSUMED = 0.80


@dataclass(frozen=True)
class GpuPreset:
    """A GPU from its datasheet: dense matmul FLOP/s per math mode (no 2:4 sparsity), memory bandwidth,
    SM count. `matmul_peaks` keys: fp32 (CUDA cores), tf32, bf16, fp16. `sources` cites every number."""

    name: str
    matmul_peaks: dict[str, float]
    bandwidth_bytes_per_s: float
    sm_count: int
    mamf_fraction: float
    sources: dict[str, str]
    host_s_per_op: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_HOST_S_PER_OP))
    host_s_per_view: float = DEFAULT_HOST_S_PER_VIEW
    source: str = "preset"
    overlaps_host: bool = True

    def with_host(self, host_s_per_op: Mapping[str, float], host_s_per_view: float) -> "GpuPreset":
        """The same GPU driven by a host whose per-op time was measured (this machine's probe)."""
        return replace(self, host_s_per_op=dict(host_s_per_op), host_s_per_view=host_s_per_view)

    def wave_efficiency(self, batch: int, m: int, n: int) -> float:
        """Share of the SMs busy over a GEMM's waves of 128×128 output tiles (wave quantisation)."""
        tiles = batch * math.ceil(m / GEMM_TILE) * math.ceil(n / GEMM_TILE)
        waves = math.ceil(tiles / self.sm_count)
        return tiles / (waves * self.sm_count)

    def matmul_s(self, op: OpRecord, matmul_dtype: str) -> float:
        if matmul_dtype not in self.matmul_peaks:
            raise ValueError(f"{self.name} has no {matmul_dtype} matmul rate; use one of {', '.join(self.matmul_peaks)}")
        rate = self.matmul_peaks[matmul_dtype] * self.mamf_fraction
        if op.gemm is not None:
            batch, m, n, _ = op.gemm
            rate *= self.wave_efficiency(batch, m, n)
        compute_s = op.flops / rate
        memory_s = op.bytes / (self.bandwidth_bytes_per_s * BANDWIDTH_EFFICIENCY)
        return max(compute_s, memory_s, KERNEL_FLOOR_S)

    def memory_s(self, op: OpRecord) -> float:
        return max(op.bytes / (self.bandwidth_bytes_per_s * BANDWIDTH_EFFICIENCY), KERNEL_FLOOR_S)

    def host_s(self, op: OpRecord) -> float:
        if op.kind == "view":
            return self.host_s_per_view
        return self.host_s_per_op.get(op.phase, self.host_s_per_op["forward"]) + CUDA_LAUNCH_S

    def sync_s(self) -> float:
        return CUDA_SYNC_S

    def kernel_cpu_s(self, op: OpRecord, kernel_s: float) -> Optional[float]:
        return None  # a GPU's kernels are not the host's CPU time

    def host_cpu_s(self, op: OpRecord) -> Optional[float]:
        return None


def _nvidia(name: str, peaks: dict[str, float], bandwidth: float, sms: int, datasheet: str,
            mamf: Optional[tuple[float, str]] = None) -> GpuPreset:
    fraction, mamf_source = mamf or (MAMF_FRACTION_ASSUMED, "assumed 0.80 (not in the MAMF table)")
    return GpuPreset(name, peaks, bandwidth, sms, fraction,
                     {"peaks, bandwidth, SMs": datasheet, "achievable matmul fraction": mamf_source})


MAMF_TABLE = "Bekman, Machine Learning Engineering, MAMF comparison table (bf16)"
GPU_PRESETS: dict[str, GpuPreset] = {
    "h100-sxm": _nvidia("NVIDIA H100 SXM", {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
                        3.35e12, 132, "NVIDIA H100 Tensor Core GPU datasheet (SXM5)", (0.803, MAMF_TABLE)),
    "h100-pcie": _nvidia("NVIDIA H100 PCIe", {"fp32": 51.2e12, "tf32": 378e12, "bf16": 756e12, "fp16": 756e12},
                         2.0e12, 114, "NVIDIA H100 Tensor Core GPU datasheet (PCIe)"),
    "h200": _nvidia("NVIDIA H200 SXM", {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
                    4.8e12, 132, "NVIDIA H200 Tensor Core GPU datasheet (SXM)",
                    (0.803, MAMF_TABLE + ": H100 SXM 80.3%, 'H200 is the same'")),
    "a100-40gb": _nvidia("NVIDIA A100 40GB SXM", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
                         1.555e12, 108, "NVIDIA A100 Tensor Core GPU datasheet (40GB SXM)", (0.869, MAMF_TABLE)),
    "a100-80gb": _nvidia("NVIDIA A100 80GB SXM", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
                         2.039e12, 108, "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)", (0.869, MAMF_TABLE)),
    "a10g": _nvidia("NVIDIA A10G", {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},
                    600e9, 80, "NVIDIA A10 datasheet (AWS A10G: same GA102 configuration)"),
    "l4": _nvidia("NVIDIA L4", {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12},
                  300e9, 58, "NVIDIA L4 Tensor Core GPU datasheet"),
    "t4": _nvidia("NVIDIA T4", {"fp32": 8.1e12, "fp16": 65e12}, 320e9, 40,
                  "NVIDIA T4 Tensor Core GPU datasheet (no bf16 or TF32)"),
    "rtx-4090": _nvidia("NVIDIA GeForce RTX 4090", {"fp32": 82.6e12, "tf32": 82.6e12, "bf16": 165.2e12,
                                                     "fp16": 165.2e12},
                        1.008e12, 128, "NVIDIA Ada Lovelace architecture whitepaper (RTX 4090, FP32 accumulate)"),
}


def apple_preset(name: str, flops: float, bandwidth: float, cores: int, source: str) -> GpuPreset:
    """Apple GPUs (MPS) run fp16/bf16 at their fp32 rate and have no TF32; their GPU cores stand for SMs."""
    return GpuPreset(name, {"fp32": flops, "bf16": flops, "fp16": flops}, bandwidth, cores,
                     MAMF_FRACTION_ASSUMED, {"peaks, bandwidth, cores": source,
                                             "achievable matmul fraction": "assumed 0.80"})


GPU_PRESETS.update({
    "apple-m1": apple_preset("Apple M1 (8-core GPU)", 2.6e12, 68.25e9, 8, "Apple M1 product page"),
    "apple-m1-max": apple_preset("Apple M1 Max (32-core GPU)", 10.4e12, 400e9, 32, "Apple M1 Max announcement"),
    "apple-m2": apple_preset("Apple M2 (10-core GPU)", 3.6e12, 100e9, 10, "Apple M2 announcement"),
    "apple-m2-max": apple_preset("Apple M2 Max (38-core GPU)", 13.6e12, 400e9, 38, "Apple M2 Max announcement"),
    "apple-m2-ultra": apple_preset("Apple M2 Ultra (76-core GPU)", 27.2e12, 800e9, 76,
                                   "Apple M2 Ultra announcement"),
})


def gpu_preset(name: str) -> GpuPreset:
    """A preset by key, or a ValueError listing the valid ones."""
    if name not in GPU_PRESETS:
        raise ValueError(f"unknown device {name!r}; valid devices: {', '.join(GPU_PRESETS)}")
    return GPU_PRESETS[name]


# Substrings of torch.cuda.get_device_name() -> preset, most specific first.
_PRESET_BY_DEVICE_NAME = (("H200", "h200"), ("H100 PCIe", "h100-pcie"), ("H100", "h100-sxm"),
                          ("A100-SXM4-80GB", "a100-80gb"), ("A100 80GB", "a100-80gb"), ("A100", "a100-40gb"),
                          ("A10G", "a10g"), ("L4", "l4"), ("T4", "t4"), ("RTX 4090", "rtx-4090"))


def preset_for_device_name(device_name: str) -> Optional[str]:
    """The preset of a CUDA device by the name torch reports ('NVIDIA H100 80GB HBM3' -> 'h100-sxm'), if any."""
    return next((preset for part, preset in _PRESET_BY_DEVICE_NAME if part in device_name), None)
