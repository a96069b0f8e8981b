#!/usr/bin/env bash
# Set up (or reuse) .venv and run the main job on the embedded default corpus, all under one run folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup.sh"
source "$ROOT/tools/env.sh"
RUN="${RUN_DIR:-$ROOT/runs/quickstart}"
mkdir -p "$RUN"
echo "[quickstart] run folder: $RUN"
pangu-pi tokenizer train --out "$RUN/tokenizer"
[ -f "$RUN/init/config.json" ] || pangu-pi init --preset tiny --tokenizer "$RUN/tokenizer" --out "$RUN/init"
pangu-pi generate "$RUN/init" --prompt "def " --max-new-tokens 24
