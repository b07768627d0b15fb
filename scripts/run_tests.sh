#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
if [ -x scripts/slurm_local.sh ]; then
  bash scripts/slurm_local.sh start || echo "local Slurm could not be started; Slurm tests will skip"
fi
exec python -m pytest -q "$@"
