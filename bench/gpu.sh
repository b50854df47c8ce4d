#!/usr/bin/env bash
# GPU throughput at the paper's resolutions (one command, at most ~8 minutes).
# Usage on a CUDA machine, from the repository root:  bash bench/gpu.sh
# Uses the machine's python3 with torch/torchvision; installs captum from a wheel folder
# (.gpu-wheels/) when it is missing, since GPU images often lack it. Results go to $OUT
# when set, else bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import captum" 2>/dev/null; then
  if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install --no-deps --no-index --target /tmp/gpu-site .gpu-wheels/*.whl >/dev/null
    export PYTHONPATH="/tmp/gpu-site:${PYTHONPATH:-}"
  else
    echo "captum is missing: pip install captum (or put its wheel in .gpu-wheels/)" >&2; exit 2
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
timeout 480 $PY -m bench.gpu "$@"
