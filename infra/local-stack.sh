#!/usr/bin/env bash
# Stand up the real parts on one machine: a Prefect server (SQLite), a process work pool,
# every deployment from deployments/prefect.yaml, and a worker. Ctrl-C stops them all.
# Open http://127.0.0.1:4200 to trigger runs, watch them, and retry failed ones.
#   infra/local-stack.sh            (uses .venv from `make run` / `make test`)
# Optional: MYCELIUM_STORAGE_ROOT=s3://... and AWS_* (see .env.example; infra/s3-local.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export MYCELIUM_PROJECT_DIR="$PWD"
export PATH="$PWD/.venv/bin:$PATH"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false

prefect server start --host 127.0.0.1 --port 4200 > .prefect-server.log 2>&1 &
server=$!
trap 'kill $server ${worker:-} 2>/dev/null || true' EXIT
until curl -sf "$PREFECT_API_URL/health" > /dev/null; do sleep 1; done
echo "Prefect server up: http://127.0.0.1:4200"

prefect work-pool create --type process mycelium-local --overwrite > /dev/null
# The GPU pool exists so its deployment is valid; start GPU workers on GPU machines (infra/README.md).
prefect work-pool create --type process mycelium-gpu --overwrite > /dev/null
prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml
prefect worker start --pool mycelium-local &
worker=$!
wait $worker
