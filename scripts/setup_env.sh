#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv.
# Idempotent: a stamp records the hash of the install inputs; when it matches, nothing is installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CTREASONER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.ctreasoner-installed"
HASH="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && [ -x "$VENV/bin/python" ]; then
  echo "[setup] environment up to date: $VENV"
  exit 0
fi

echo "[setup] creating environment in $VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade "pip>=24" setuptools wheel
# torch/torchvision first, as a pair that imports together (see shared ARCHITECTURE.md §4).
echo "[setup] installing torch 2.14.1 + torchvision 0.29.1"
"${PIP[@]}" install torch==2.14.1 torchvision==0.29.1
# sam2 builds against the torch above; without these flags pip pulls a second torch and tries CUDA.
echo "[setup] installing sam2 (no CUDA extension)"
SAM2_BUILD_CUDA=0 "${PIP[@]}" install --no-build-isolation sam2==1.1.0
echo "[setup] installing CTReasonerLib with backend and test extras"
"${PIP[@]}" install -e "$ROOT[backend,test]"
echo "$HASH" > "$STAMP"
echo "[setup] done"
