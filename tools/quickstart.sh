#!/usr/bin/env bash
# Set up (or reuse) .venv, then run the main job on the embedded default corpus: tokenizer → shards →
# pretraining in 2 DeepSpeed processes → export → OpenAI-compatible server → a chat and a streamed
# completion → summary. Everything goes under one run folder (RUN_DIR, default runs/quickstart).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup.sh"
source "$ROOT/tools/env.sh"
cd "$ROOT"
exec python tools/main_job.py --run "${RUN_DIR:-$ROOT/runs/quickstart}" "$@"
