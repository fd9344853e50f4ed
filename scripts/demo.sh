#!/usr/bin/env bash
# The README's main-job command: set up the environment (idempotent), then run the demo on the embedded default.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$ROOT/.venv/bin/ctreasoner" demo "$@"
