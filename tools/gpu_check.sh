#!/usr/bin/env bash
# One prepared check of the GPU paths, for a one-GPU machine with PyTorch, Triton and transformers but
# without vLLM or flash-attn, and without network. Runs in a checkout, without installing it.
#
#   bash tools/gpu_check.sh              # on the GPU machine: fits 6 minutes on an H200 from a bare machine
#   bash tools/gpu_check.sh --dry-run    # anywhere: the same steps on CPU, tiny shapes, Triton interpreted
#
# Only what CPU CI does not cover runs here, each step under its own `timeout` so one hang cannot eat
# the others' time. Limits (seconds) and what they hold, on an H200 (estimates until measured there):
#   install          10  the wheels carried in .cache/gpu-wheels (DeepSpeed and what it needs) → /tmp/site
#   kernel_tests     45  real Triton kernels on CUDA: fwd+bwd in bf16/fp16 against float64 (fp32 through
#                        the other tests), opcheck of the triton_ops, fullgraph tracing, bf16 error at
#                        1024 rows, bitwise-equal parameter gradients; CUDA-graph capture of a vLLM-style
#                        decode step replaying to the eager result, inductor inlining the op
#                        (tests/pangu_pi/kernels/test_cuda_graph.py)
#   bench_kernels    55  bf16 SIAF at 8192×5632, 4096×11008, 16384×11008: fractions of copy bandwidth,
#                        ratio to torch.compile, host µs per call (decode, prefill), errors vs float64
#                        per dtype and shape (333×1001, 4096×5632; bf16 and fp32)
#   decode_7b       110  PanGu-π-7B vs the LLaMA-2-7B shape, bf16, batch 1: eager (both), then graphed
#                        (static cache + torch.compile mode="reduce-overhead"); each graphed figure costs
#                        a whole-model compilation, the one unknown here: the bench prints a partial JSON
#                        line after every figure, so an overrun loses the last graphed figure only
#   decode_1b        40  the 1B preset vs the same-shaped LLaMA (12 layers, one vocabulary), same loops
#   [training]       90  reserved: one step for tools/bench_train_gpu.py goes at the marked place below
# Sum 350 s of limits with the training slot (+ a few seconds of start-up and summary): under the
# 6 minutes of one run; the steps' actual times (`step_seconds` in the JSON) are what a retry can use.
# The last line of stdout is one JSON object with every figure (null where a step did not produce it).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,28p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (only --dry-run is accepted)" >&2; exit 2 ;;
  esac
done

if [ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then PY="$ROOT/.venv/bin/python"; else PY="${PYTHON:-python3}"; fi
OUT="${GPU_CHECK_OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT" "$ROOT/.cache"
rm -f "$OUT"/*.rc "$OUT"/*.log "$OUT"/*.xml  # figures of an earlier run must not pass for this one
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$ROOT/.cache/triton}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)

# Tests CPU CI does not cover: the Triton kernels themselves (CPU runs them interpreted), the
# triton_op registration (CPU registers custom ops), CUDA graphs. The compiled backend, the auto
# table and the fp32 all-activations sweep run on CPU already (interpreted: same arithmetic, masks, strides).
TEST_SELECT="(triton or cuda_graph or inlines) and not fp32_matches and not trains and not frozen"
TEST_FILES=(tests/pangu_pi/kernels/test_siaf.py tests/pangu_pi/kernels/test_cuda_graph.py)
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  TEST_SELECT="$TEST_SELECT and not bf16_error and not opcheck and not graph_breaks"
  KERNEL_ARGS=(--quick --cpu-only --gpu-only --error-shapes 64x96 --error-dtypes float32 --prefill-tokens 64
               --figure-shapes 128x96)
  DECODE_7B=(--quick --no-graphed)
  DECODE_1B=(--quick --no-graphed)
  LIMIT_TESTS=300 LIMIT_KERNELS=300 LIMIT_7B=200 LIMIT_1B=200
else
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device visible to $PY; run with --dry-run for the CPU smoke test" >&2
    exit 1
  fi
  unset TRITON_INTERPRET
  if compgen -G "$ROOT/.cache/gpu-wheels/*.whl" > /dev/null; then
    echo "== install (limit 10s)"
    timeout 10 "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "$ROOT"/.cache/gpu-wheels/*.whl \
      && export PYTHONPATH="/tmp/site:$PYTHONPATH"
  fi
  KERNEL_ARGS=(--gpu-only --dtype bfloat16 --repeats 10 --warmup 2 --tokens 8192 --width 5632)
  DECODE_7B=(--preset pangu-pi-7b --dtype bf16 --tokens 16 --warmup 3)
  DECODE_1B=(--preset pangu-pi-1b --llama-like-pangu --llama-layers 12 --vocab 100883 --dtype bf16 --tokens 16 --warmup 3)
  LIMIT_TESTS=45 LIMIT_KERNELS=55 LIMIT_7B=110 LIMIT_1B=40
fi

"$PY" -c 'import pytest' 2>/dev/null || {
  echo "gpu_check.sh: pytest is not installed; put its wheels in .cache/gpu-wheels (pip download pytest -d .cache/gpu-wheels)" >&2
  exit 1
}

step() {  # step NAME LIMIT_S CMD...: run with a time limit, keep its output, report its status
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit}s)"
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "$rc" > "$OUT/$name.rc"
  echo "$(( $(date +%s) - t0 ))" > "$OUT/$name.seconds"
  echo "== $name: exit $rc in $(cat "$OUT/$name.seconds") s"
}

step kernel_tests "$LIMIT_TESTS" "$PY" -m pytest "${TEST_FILES[@]}" -q -p no:cacheprovider -k "$TEST_SELECT" \
  --junitxml="$OUT/kernel_tests.xml"
step bench_kernels "$LIMIT_KERNELS" "$PY" tools/bench_kernels.py "${KERNEL_ARGS[@]}"
step decode_7b "$LIMIT_7B" "$PY" tools/bench_decode.py "${DECODE_7B[@]}"
step decode_1b "$LIMIT_1B" "$PY" tools/bench_decode.py "${DECODE_1B[@]}"
# ---- training speed: one step for tools/bench_train_gpu.py goes here, ~90 s of limit, e.g.
# step bench_train "$LIMIT_TRAIN" "$PY" tools/bench_train_gpu.py ...
# (its last JSON line is collected below under "bench_train" like every step's).

"$PY" - "$OUT" "$DRY" "$START" <<'PY'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

out, dry, start = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])

def last_json(name):
    """The step's last JSON line (a bench cut short by its limit still leaves its partial lines)."""
    log = out / f"{name}.log"
    for line in reversed(log.read_text(errors="replace").splitlines() if log.exists() else []):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
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
    if name != "kernel_tests":
        result[name] = last_json(name)
    result.setdefault("exit", {})[name] = rc
    seconds = out / f"{name}.seconds"
    result.setdefault("step_seconds", {})[name] = int(seconds.read_text()) if seconds.exists() else None
    result["ok"] = result["ok"] and rc == 0

# Every figure the acceptance lists, at the top level (null where its step did not produce it).
kernels = result.get("bench_kernels") or {}
for key in ("siaf_fwd_bw_fraction", "siaf_fwd_bwd_bw_fraction", "siaf_vs_compile_fwd_bwd", "siaf_vs_compile_fwd",
            "siaf_call_cpu_us_decode", "siaf_call_cpu_us_prefill", "siaf_call_cpu_us", "kernel_errors",
            "siaf_figures", "copy_gbps_large"):
    result[key] = kernels.get(key)
for size in ("7b", "1b"):
    decode = result.get(f"decode_{size}") or {}
    for key in ("pangu_vs_llama_decode_eager", "pangu_vs_llama_decode_graphed", "decode_bw_fraction",
                "pangu_ms_per_token", "llama_ms_per_token", "pangu_graphed_ms_per_token", "llama_graphed_ms_per_token"):
        result[f"{key}_{size}"] = decode.get(key)
bf16_4096 = (result["kernel_errors"] or {}).get("bfloat16_4096x5632", {}).get("worst")
targets = {  # the acceptance's numbers; None where the figure is missing
    "siaf_fwd_bw_fraction >= 0.85": result["siaf_fwd_bw_fraction"], "siaf_fwd_bwd_bw_fraction >= 0.70":
    result["siaf_fwd_bwd_bw_fraction"], "siaf_vs_compile_fwd_bwd >= 1.5": result["siaf_vs_compile_fwd_bwd"],
    "bf16 error 4096x5632 <= 5e-3": bf16_4096, "pangu_vs_llama_decode_eager_7b <= 0.95":
    result["pangu_vs_llama_decode_eager_7b"], "pangu_vs_llama_decode_graphed_7b <= 1.00":
    result["pangu_vs_llama_decode_graphed_7b"], "decode_bw_fraction_7b >= 0.70": result["decode_bw_fraction_7b"],
}
def met(name, value):
    if value is None:
        return None
    bound = float(name.split()[-1])
    return value >= bound if ">=" in name else value <= bound
result["targets_met"] = {name: met(name, value) for name, value in targets.items()}
result["seconds"] = int(time.time()) - start
print(json.dumps(result))
sys.exit(0 if result["ok"] else 1)
PY
