#!/usr/bin/env bash
# Reproduce CTReasoner-Tiny: build the phantom dataset, train, and merge into a standalone model folder.
#   bash scripts/train_tiny.sh [CONFIG] [OUT_MODEL_DIR]
# CONFIG defaults to configs/tiny_gpu.yaml (the committed weights' recipe); configs/tiny_cpu.yaml is the
# 2-core CPU recipe. The ctreasoner command comes from the project's venv, or PYTHON (for a GPU host
# whose python already has torch).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${1:-configs/tiny_gpu.yaml}"
OUT_MODEL="${2:-Resources/Models/CTReasoner-Tiny}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT"
ctr() { "$PY" -m CTReasonerLib.cli "$@"; }
read -r DATA PHANTOMS SEED OUTDIR < <("$PY" - "$CONFIG" <<'PY'
import sys
from CTReasonerLib.train.config import load_train_config
c = load_train_config(sys.argv[1])
print(c.data.root, c.data.phantoms, c.data.phantom_seed, c.output_dir)
PY
)
if [ ! -f "$DATA/dataset.json" ]; then
  ctr curate --phantoms "$PHANTOMS" --seed "$SEED" --out "$DATA" --workers "$(nproc)"
fi
shift $(( $# > 2 ? 2 : $# )) || true
ctr train "$CONFIG" "$@"
ctr merge "$OUTDIR/final" --out "$OUT_MODEL" --dtype bfloat16
echo "model written to $OUT_MODEL"
