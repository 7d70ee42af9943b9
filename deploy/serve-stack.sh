#!/usr/bin/env bash
# Local production-like stack: Prefect server (SQLite) + process work pool + worker + deployments.
# Everything stays on 127.0.0.1 and under .modelforge/; `deploy/stop-stack.sh` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PREFECT_PORT:-4200}"
export PREFECT_HOME="$PWD/.modelforge/prefect-server"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
LOGS=.modelforge/logs
mkdir -p "$LOGS" "$PREFECT_HOME"

.venv/bin/prefect server start --host 127.0.0.1 --port "$PORT" >"$LOGS/prefect-server.log" 2>&1 &
echo $! >.modelforge/stack.pids
for _ in $(seq 1 120); do
  curl -sf "$PREFECT_API_URL/health" >/dev/null && break
  sleep 1
done
curl -sf "$PREFECT_API_URL/health" >/dev/null || { echo "Prefect server did not start: see $LOGS/prefect-server.log"; exit 1; }

.venv/bin/modelforge deploy
.venv/bin/prefect worker start --pool modelforge-process >"$LOGS/prefect-worker.log" 2>&1 &
echo $! >>.modelforge/stack.pids

cat <<MSG
Prefect UI:     http://127.0.0.1:$PORT   (deployments optimize/nightly and optimize/on-new-data)
In your shell:  export PREFECT_API_URL=$PREFECT_API_URL PREFECT_HOME=$PREFECT_HOME
New data:       change files under data/, then  .venv/bin/modelforge data-changed   (emits the trigger event)
Run now:        .venv/bin/prefect deployment run optimize/nightly
Logs:           $LOGS/    Stop: deploy/stop-stack.sh
MSG
