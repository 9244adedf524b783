"""The device a run uses: resolving "auto", what its dtypes support, its name, free memory, synchronisation.

Imported only inside the benchmark's subprocess (it loads torch, and asking CUDA anything creates a context
that would otherwise stay in the app's process holding GPU memory).
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Optional

import psutil
import torch

from model.checks import SettingError
from planner.bench.spec import refuse_fp16_on_cpu_message

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> str:
    """'auto' becomes cuda, then mps, then cpu, whichever is present; an absent device is refused."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise ValueError(f"device {name} is not available on this machine (torch {torch.__version__}); use auto or cpu")
    return name


def check_dtype_supported(device: str, dtype: str) -> None:
    """Refuse a dtype the device cannot compute in natively, with what to use instead."""
    if device == "cpu" and dtype == "fp16":
        raise ValueError(refuse_fp16_on_cpu_message())
    if device == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise SettingError("dtype", f"dtype bf16 is not supported natively by {torch.cuda.get_device_name()} "
                         "(it needs compute capability 8.0 or newer); use fp16 or fp32")


VECTOR_FLAGS = (("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"), ("asimd", "asimd"))  # widest first


def cpuinfo_processor_name(cpuinfo: str) -> Optional[str]:
    """The first processor of a /proc/cpuinfo text: its marketing name, its family and model, and its widest
    vector instructions. A cloud VM's name is often only 'AMD EPYC' for every generation, and a probe cached
    on one must not price another: small's forward at batch 16, context 512 ran 3.6 s on one 2-thread 'AMD
    EPYC' VM and 7.3 s on another (family 25 model 1, a Zen 3 without AVX-512)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block ends
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return None
    flags = set(fields.get("flags", "").split())
    vector = next((name for flag, name in VECTOR_FLAGS if flag in flags), None)
    details = [f"family {fields['cpu family']} model {fields['model']}"] if {"cpu family", "model"} <= set(fields) \
        else []
    details += [vector] if vector else []
    return ", ".join([name, *details])


def _processor_name() -> str:
    """The CPU's name (cpuinfo_processor_name; on Apple silicon the chip's, which is the GPU's too: 'Apple M2
    Pro')."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and (name := cpuinfo_processor_name(cpuinfo.read_text())):
        return name
    if platform.system() == "Darwin":
        result = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    return platform.processor() or platform.machine()


def describe_device(device: str) -> str:
    """A name that identifies the hardware, and on CPU the thread count (throughput depends on it)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    if device == "mps":
        return f"{_processor_name()} (MPS)"
    threads = torch.get_num_threads()
    return f"{_processor_name()} ({threads} thread{'s' if threads > 1 else ''})"


def available_memory_bytes(device: str) -> int:
    """Memory a run may still take: free GPU memory, or the host's available memory (unified on Apple)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    host = psutil.virtual_memory().available
    if device == "mps":
        return min(host, torch.mps.recommended_max_memory())
    return host


def synchronize(device: str) -> None:
    """Wait for queued kernels, so a timer read afterwards sees the work done (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()
