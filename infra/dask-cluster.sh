#!/usr/bin/env bash
# A Dask scheduler and N workers on this machine, for fanning extraction chunks out.
# Point the pipeline at it with:  mycelium run --set extraction.dask_address=tcp://127.0.0.1:8786
# On several machines, start `dask worker tcp://SCHEDULER:8786` on each (GPU machines: one
# worker per GPU with CUDA_VISIBLE_DEVICES set). Needs: pip install -e '.[dask]'
set -euo pipefail
cd "$(dirname "$0")/.."
workers="${1:-2}"
.venv/bin/dask scheduler --host 127.0.0.1 --port 8786 &
trap 'kill 0' EXIT
sleep 3
for _ in $(seq "$workers"); do
  .venv/bin/dask worker tcp://127.0.0.1:8786 --nthreads 1 &
done
wait
