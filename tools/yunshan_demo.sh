#!/usr/bin/env bash
# The YunShan recipe on the tiny model and the generated finance/law set: base → tokenizer extend +
# resize → continued pretraining (domain : general = 1 : 1) → instruction tuning → held-out
# multiple-choice accuracy before and after. Everything under one run folder (--run, default
# runs/yunshan_demo); stages already there are reused. Options: python tools/yunshan_demo.py --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
cd "$ROOT"
exec python tools/yunshan_demo.py "$@"
