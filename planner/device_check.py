"""The GPU check (`scripts/device_check.sh`): measured beside predicted for a fixed list of variants.

For each variant × mode (forward, train, forecast) × precision (fp32, tf32, bf16): the step time (median of
synchronised repeats after warm-up, the benchmark's own step code) and CUDA's peak memory (allocated and
reserved), beside the planner's predicted step time (the GPU preset of this device's name) and peak memory.
It also measures the terms the presets assume rather than cite (kernel launch host cost, the shortest kernel,
a host sync, copy bandwidth, the bf16 and TF32 GEMM rates), so the presets can be corrected from them.
Writes docs/measurements/<device>.json (or --output). Runs in one process, under 8 minutes on one H100/H200.

`--device cpu --quick` runs a debug-sized version anywhere (the tests do), so the code path is checked
without a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

PRECISIONS = ("fp32", "tf32", "bf16")
MODES = ("forward", "train", "forecast")
# (size, architecture, experts): the dense backbone and each MoE architecture at small, and base dense.
VARIANTS = (("small", "dense", 0), ("small", "shared_then_expert", 16), ("small", "expert_only", 8),
            ("small", "token_ffn", 16), ("base", "dense", 0))
WORKLOAD = dict(batch_size=8, context_length=512, prediction_length=64, num_samples=20)
QUICK_VARIANTS = (("debug", "dense", 0), ("debug", "token_ffn", 4))
QUICK_WORKLOAD = dict(batch_size=2, context_length=32, prediction_length=4, num_samples=2)
WARMUP, REPEATS = 2, 5


def _time_s(run: Callable[[], object], synchronize: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_terms(device: str) -> dict[str, float]:
    """What the presets assume: per-op host cost, shortest kernel, host sync, copy bandwidth, GEMM rates."""
    import torch

    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    one = torch.ones(1, device=device)
    ops = 2000

    def many_adds():
        for _ in range(ops):
            one.add_(1.0)

    terms = {"host_s_per_tiny_op": _time_s(many_adds, synchronize, 3) / ops}
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        many_adds()
        end.record()
        synchronize()
        terms["kernel_floor_s"] = start.elapsed_time(end) / 1e3 / ops  # the GPU side of the same tiny ops
    terms["sync_s"] = _time_s(lambda: [one.sum().item() for _ in range(100)], synchronize, 3) / 100
    size = (1 << 28) if device == "cuda" else (1 << 22)
    source, target = torch.ones(size, device=device), torch.empty(size, device=device)
    terms["copy_bytes_per_s"] = 2 * source.numel() * 4 / _time_s(lambda: target.copy_(source), synchronize, 5)
    side = 8192 if device == "cuda" else 512
    for name, dtype, tf32 in (("gemm_bf16_flops_per_s", torch.bfloat16, False),
                              ("gemm_tf32_flops_per_s", torch.float32, True),
                              ("gemm_fp32_flops_per_s", torch.float32, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(side, side, device=device, dtype=dtype)
        a @ a
        terms[name] = 2 * side**3 / _time_s(lambda: a @ a, synchronize, 5)
    torch.backends.cuda.matmul.allow_tf32 = False
    return terms


def check_variant(size: str, architecture: str, experts: int, mode: str, precision: str, device: str,
                  workload: dict[str, int], preset: Any) -> dict[str, Any]:
    """One measured run beside its prediction (the benchmark's spec, step and peak-memory model)."""
    import torch

    from model.build import build_model_from_config
    from planner.bench.device import TORCH_DTYPES
    from planner.bench.preflight import estimate_peak_bytes
    from planner.bench.spec import BenchSpec
    from planner.bench.steps import make_step
    from planner.steptime import predict_spec

    dtype = "bf16" if precision == "bf16" else "fp32"
    spec = BenchSpec(size=size, architecture="shared_then_expert" if architecture == "dense" else architecture,
                     num_experts=experts, top_k=2, mode=mode, device=device, dtype=dtype, **workload)
    row: dict[str, Any] = {"label": spec.label, "size": size, "architecture": architecture, "num_experts": experts,
                           "mode": mode, "precision": precision, **workload}
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        torch.manual_seed(0)
        model = build_model_from_config(spec.model_config(), device=device,
                                        dtype=None if mode == "train" else TORCH_DTYPES[dtype])
        step = make_step(spec, model, device)
        for _ in range(WARMUP):
            step()
        synchronize()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step()
        synchronize()
        if device == "cuda":
            row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        row["measured_time_s"] = _time_s(step, synchronize, REPEATS)
    except Exception as error:  # noqa: BLE001 - one failed variant is reported; the others still run
        row["error"] = f"{type(error).__name__}: {error}"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if device == "cuda":
            torch.cuda.empty_cache()
    row["predicted_peak_bytes"] = estimate_peak_bytes(spec, "cuda" if device == "cuda" else "cpu")
    if preset is not None:
        predicted = predict_spec(spec, preset, tf32=tf32)
        row.update(predicted.row())
        if "measured_time_s" in row:
            row["time_ratio"] = row["measured_time_s"] / predicted.total_s
    return row


def _device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def run(device: str, quick: bool, output: Optional[Path], log=sys.stderr) -> Path:
    import torch
    import transformers

    from planner.steptime.gpu_presets import gpu_preset, preset_for_device_name

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is visible (use --device cpu --quick to try the script)")
    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    preset_key = preset_for_device_name(name) if device == "cuda" else None
    preset = gpu_preset(preset_key) if preset_key else None
    variants, workload = (QUICK_VARIANTS, QUICK_WORKLOAD) if quick else (VARIANTS, WORKLOAD)
    started = time.monotonic()
    rows = []
    for size, architecture, experts in variants:
        for mode in MODES:
            for precision in PRECISIONS:
                if device == "cpu" and precision == "tf32":
                    continue  # no TF32 on a CPU
                row = check_variant(size, architecture, experts, mode, precision, device, workload, preset)
                rows.append(row)
                ratio = row.get("time_ratio")
                print(f"[{time.monotonic() - started:6.1f} s] {row['label']} {precision}: "
                      f"{row.get('measured_time_s', float('nan')):.4g} s measured"
                      + (f", x{ratio:.2f} predicted" if ratio else "") + (f"; {row['error']}" if "error" in row else ""),
                      file=log, flush=True)
    result = {"device": name, "preset": preset_key, "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "workload": workload,
              "warmup": WARMUP, "repeats": REPEATS, "terms": measure_terms(device), "runs": rows,
              "wall_s": time.monotonic() - started}
    path = output or Path(__file__).resolve().parents[1] / "docs" / "measurements" / f"{_device_slug(name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/device_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="debug-sized variants and workload (seconds)")
    parser.add_argument("--output", type=Path, default=None, help="the JSON file to write")
    args = parser.parse_args(argv)
    print(f"wrote {run(args.device, args.quick, args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
