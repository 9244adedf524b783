#!/usr/bin/env bash
# The GPU check: measured beside predicted step time and CUDA peak memory for a fixed list of variants in
# fp32, tf32 and bf16, written to docs/measurements/<device>.json (planner/device_check.py). One command,
# under 8 minutes on one H100/H200. The GPU machine has its own PyTorch and transformers and reaches no
# package registry: pure-Python packages it lacks (chronos-forecasting) travel as wheels in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 -m planner.device_check "$@"
