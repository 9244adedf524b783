"""The GPU check's code path, run on CPU at debug size (the GPU run itself needs a lent GPU)."""

import json
import subprocess
import sys
from pathlib import Path

from planner.device_check import MODES, QUICK_VARIANTS


def test_device_check_quick_on_cpu_writes_measured_runs(tmp_path):
    output = tmp_path / "cpu.json"
    env_root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "planner.device_check", "--device", "cpu", "--quick",
                           "--output", str(output)], capture_output=True, text=True, cwd=env_root, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(output.read_text())
    runs = result["runs"]
    assert len(runs) == len(QUICK_VARIANTS) * len(MODES) * 2  # fp32 and bf16 (no TF32 on a CPU)
    assert all("error" not in run and run["measured_time_s"] > 0 and run["predicted_peak_bytes"] > 0 for run in runs)
    assert {run["precision"] for run in runs} == {"fp32", "bf16"}
    terms = result["terms"]
    assert terms["host_s_per_tiny_op"] > 0 and terms["copy_bytes_per_s"] > 0 and terms["gemm_bf16_flops_per_s"] > 0
    assert result["torch"] and result["transformers"] and result["workload"]["batch_size"] == 2
