"""PyTorch's own operator-level estimator as a peer: `torch.distributed._tools.RuntimeEstimator`.

Its "operator-level-cost-model" runs a step under FakeTensorMode and prices each op as
max(bytes ÷ DRAM bandwidth, FLOPs ÷ 2 ÷ (0.75 × peak)) (`torch.utils._runtime_estimation`), reading the peak
and the bandwidth from the CUDA device. Here they are supplied from a GPU preset's datasheet numbers, so it
runs on any machine. Where it cannot run, `estimate_with_runtime_estimator` says why instead of a number:
an MoE's routing reads values (`.tolist()` of the group sizes) that fake tensors do not have.
"""

from __future__ import annotations

import contextlib
import io
from typing import Optional
from unittest import mock

from model.config import ChronosMoEConfig
from planner.steptime.devices import DTYPE_NAMES
from planner.steptime.gpu_presets import GpuPreset
from planner.workload import Workload



def estimate_with_runtime_estimator(config: ChronosMoEConfig, workload: Workload, mode: str, preset: GpuPreset,
                                    dtype: str = "fp32") -> tuple[Optional[float], str]:
    """(RuntimeEstimator's seconds for one step of `mode`, or None, and why not)."""
    import torch
    import torch.utils._runtime_estimation as estimation
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.runtime_estimator import RuntimeEstimator

    from model.build import build_model_from_config
    from planner.measure import token_batch
    from planner.steptime.trace import run_step

    peaks = {getattr(torch, DTYPE_NAMES[key]): rate for key, rate in preset.matmul_peaks.items() if key in DTYPE_NAMES}
    specs = [mock.patch.object(estimation, "get_device_tflops", lambda d: peaks.get(d, peaks[torch.float32]) / 1e12),
             mock.patch.object(estimation, "get_gpu_dram_gbps", lambda: preset.bandwidth_bytes_per_s / 1e9),
             mock.patch("torch.cuda.is_available", lambda: True)]
    estimator = RuntimeEstimator()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), contextlib.ExitStack() as stack:
            model = build_model_from_config(config, dtype=None if dtype == "fp32" or mode == "train"
                                            else getattr(torch, DTYPE_NAMES[dtype]))
            batch = token_batch(config, workload)
            for patch in specs:
                stack.enter_context(patch)
            with contextlib.redirect_stdout(io.StringIO()), estimator("operator-level-cost-model"):
                run_step(model, batch, workload, mode, dtype)  # it prints its total; the caller reports it
    except Exception as error:  # noqa: BLE001 - its refusal is the answer: say it
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return estimator.total_runtime / 1e3, ""  # it sums milliseconds
