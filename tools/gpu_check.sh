#!/usr/bin/env bash
# One prepared check of the GPU paths, for a one-GPU machine with PyTorch and Triton but without
# DeepSpeed, vLLM or flash-attn, and without network. Runs in a checkout, without installing it.
#
#   bash tools/gpu_check.sh              # on the GPU machine: ~3-5 min on an H100/H200
#   bash tools/gpu_check.sh --dry-run    # anywhere: the same steps on CPU, tiny shapes, Triton interpreted
#
# Steps, each with its own time limit so one hang cannot eat the others' time:
#   1. the SIAF kernel tests on CUDA: Triton fwd+bwd in fp32, bf16 and fp16, all five gradients
#      against the float64 reference (tests/pangu_pi/kernels/test_siaf.py);
#   2. tools/bench_kernels.py's device section: Triton vs reference vs a device-to-device copy, GB/s,
#      in bf16 and fp32;
#   3. a bf16 training step (autocast, fp32 master weights, fused AdamW) of the 1B preset against the
#      same-shaped LLaMA, SDPA attention: tokens/s, MFU, ratio (tools/bench_model.py);
#   4. the same comparison through the trainer itself (`pangu-pi pretrain`'s library call, DeepSpeed
#      ZeRO-1, the full 100,883 vocabulary, 4 × 4096 tokens): tokens/s per GPU, MFU, peak memory
#      against training/memory.py's estimate (tools/bench_train_gpu.py). It needs DeepSpeed: where it
#      is not installed, its wheels are taken from .cache/gpu-wheels (../shared/GPU.md).
# The last line of stdout is one JSON object with every step's figures.
#
# pytest is the only package it needs beyond torch, triton and transformers. Where it is missing, put
# its wheels in .cache/gpu-wheels beforehand (pip download pytest -d .cache/gpu-wheels) and they are
# installed from there, with no network.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (only --dry-run is accepted)" >&2; exit 2 ;;
  esac
done

if [ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then PY="$ROOT/.venv/bin/python"; else PY="${PYTHON:-python3}"; fi
OUT="${GPU_CHECK_OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT" "$ROOT/.cache"
rm -f "$OUT"/*.rc "$OUT"/*.log "$OUT"/*.xml  # figures of an earlier run must not pass for this one
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$ROOT/.cache/triton}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)

if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  TEST_SELECT=(-k "triton and (fp32_matches or half_precision or bf16_activations)")
  KERNEL_ARGS=(--tokens 64 --width 96 --repeats 2 --warmup 1 --gpu-only --triton-on-cpu)
  KERNEL_DTYPES=(float32)
  MODEL_ARGS=(--preset tiny --device cpu --dtype fp32 --batch 2 --seq-len 64 --repeats 2 --warmup 1 --optimizer)
  TRAIN_ARGS=(--preset tiny --vocab-size 8192 --steps 3 --warmup-steps 1 --seq-len 64 --micro-batch 2
              --precision fp32 --corpus-bytes 300000 --peak-flops 1e11 --set model.siaf_backend=reference)
  LIMIT_TESTS=300 LIMIT_KERNELS=120 LIMIT_MODEL=120 LIMIT_TRAIN=240
else
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device visible to $PY; run with --dry-run for the CPU smoke test" >&2
    exit 1
  fi
  unset TRITON_INTERPRET
  TEST_SELECT=()
  "$PY" -c 'import deepspeed' 2>/dev/null || TEST_SELECT=(-k "not deepspeed")
  KERNEL_ARGS=(--gpu-only --repeats 20 --warmup 3)
  KERNEL_DTYPES=(bfloat16 float32)
  MODEL_ARGS=(--preset pangu-pi-1b --device cuda --dtype bf16 --batch 4 --seq-len 2048 --repeats 10 --warmup 3 --optimizer)
  # Two 1B runs: ~15 s of start-up each (imports, the model built on the host, DeepSpeed), then 8 steps.
  TRAIN_ARGS=(--steps 8 --warmup-steps 3)
  LIMIT_TESTS=240 LIMIT_KERNELS=60 LIMIT_MODEL=180 LIMIT_TRAIN=120
fi

if ! "$PY" -c 'import pytest' 2>/dev/null; then
  if [ -d "$ROOT/.cache/gpu-wheels" ]; then
    "$PY" -m pip install -q --no-index --find-links "$ROOT/.cache/gpu-wheels" pytest || true
  fi
  "$PY" -c 'import pytest' 2>/dev/null || {
    echo "gpu_check.sh: pytest is not installed; put its wheels in .cache/gpu-wheels (pip download pytest -d .cache/gpu-wheels)" >&2
    exit 1
  }
fi

step() {  # step NAME LIMIT_S CMD...: run with a time limit, keep its output, report its status
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "$rc" > "$OUT/$name.rc"
  echo "== $name: exit $rc"
}

step kernel_tests "$LIMIT_TESTS" "$PY" -m pytest tests/pangu_pi/kernels/test_siaf.py -q -p no:cacheprovider \
  "${TEST_SELECT[@]}" --junitxml="$OUT/kernel_tests.xml"
for dtype in "${KERNEL_DTYPES[@]}"; do
  step "bench_kernels_$dtype" "$LIMIT_KERNELS" "$PY" tools/bench_kernels.py --dtype "$dtype" "${KERNEL_ARGS[@]}"
done
step bench_model "$LIMIT_MODEL" "$PY" tools/bench_model.py "${MODEL_ARGS[@]}" --no-forward
if ! "$PY" -c 'import deepspeed' 2>/dev/null && ls "$ROOT"/.cache/gpu-wheels/deepspeed-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target "$OUT/site" "$ROOT"/.cache/gpu-wheels/*.whl \
    && export PYTHONPATH="$OUT/site:$PYTHONPATH"
fi
step bench_train_gpu "$LIMIT_TRAIN" "$PY" tools/bench_train_gpu.py "${TRAIN_ARGS[@]}" --cache "$ROOT/.cache/bench_train_gpu"

"$PY" - "$OUT" "$DRY" "$START" <<'PY'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

out, dry, start = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])

def last_json(name):
    log = out / f"{name}.log"
    for line in reversed(log.read_text(errors="replace").splitlines() if log.exists() else []):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return None

import torch
result = {"dry_run": dry, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
          "torch": torch.__version__, "ok": True}
try:
    import triton
    result["triton"] = triton.__version__
except ImportError:
    result["triton"] = None
xml = out / "kernel_tests.xml"
if xml.exists():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    result["kernel_tests"] = {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                              "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"]}
else:
    result["kernel_tests"] = None
for rc_file in sorted(out.glob("*.rc")):
    name = rc_file.stem
    rc = int(rc_file.read_text())
    if name.startswith("bench_"):
        result[name] = last_json(name)
    result.setdefault("exit", {})[name] = rc
    result["ok"] = result["ok"] and rc == 0
result["seconds"] = int(time.time()) - start
print(json.dumps(result))
sys.exit(0 if result["ok"] else 1)
PY
