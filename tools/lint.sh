#!/usr/bin/env bash
# Static checks, as CI runs them: ruff over the checkout, then the import layers (.importlinter).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
cd "$ROOT"
echo "[lint] ruff check"
ruff check .
echo "[lint] import layers (lint-imports)"
python tools/check_imports.py
