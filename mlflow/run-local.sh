#!/usr/bin/env bash
# Local MLflow tracking server + model registry for MarrowScope (one machine).
#
#   bash mlflow/run-local.sh            # or: make mlflow
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#
# Same store as the embedded default (sqlite:///<project>/mlflow.db, artifacts under
# <project>/mlruns), so runs logged without a server show up in the UI. Artifacts are
# proxied by the server (--serve-artifacts): clients never need the artifact path.
# Overrides (env): MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS, MLFLOW_BACKEND_STORE_URI,
# MLFLOW_ARTIFACTS_DESTINATION, PYTHON. Extra arguments go to `mlflow server`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$ROOT/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$ROOT/mlruns}"

if [[ ! -x "$PY" ]]; then
  echo "error: $PY not found; run 'make setup' or set PYTHON" >&2
  exit 2
fi
mkdir -p "$ARTIFACTS"
echo "MLflow on http://$HOST:$PORT  (backend $BACKEND, artifacts $ARTIFACTS)" >&2
echo "  export MLFLOW_TRACKING_URI=http://$HOST:$PORT" >&2

exec "$PY" -m mlflow server \
  --backend-store-uri "$BACKEND" \
  --serve-artifacts \
  --artifacts-destination "$ARTIFACTS" \
  --host "$HOST" \
  --port "$PORT" \
  --workers "${MLFLOW_WORKERS:-2}" \
  "$@"
