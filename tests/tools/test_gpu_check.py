"""The prepared GPU check keeps working where there is no GPU.

`tools/gpu_check.sh --dry-run` runs the GPU script's steps on CPU with tiny shapes and the Triton
kernels under the interpreter. It does not cover CUDA code generation, CUDA graphs, GPU timings or the
1B/7B shapes: those only run on a GPU machine (without --dry-run).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


@pytest.mark.slow
def test_gpu_check_dry_run_passes_and_reports_every_step(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dry_run"] is True and result["ok"] is True
    assert result["kernel_tests"]["passed"] > 10 and result["kernel_tests"]["failed"] == 0
    assert set(result["exit"]) == {"kernel_tests", "bench_kernels", "decode_7b", "decode_1b"}
    # Every figure the acceptance lists is a key of the final line; the GPU-only ones are null here
    # (the dry run's decode has no graphed loop).
    assert result["siaf_fwd_bw_fraction"] > 0 and result["siaf_vs_compile_fwd_bwd"] > 0
    assert result["siaf_call_cpu_us_decode"] > 0 and result["kernel_errors"]["float32_64x96"]["worst"] < 1e-5
    assert result["pangu_vs_llama_decode_eager_7b"] > 0 and result["pangu_vs_llama_decode_graphed_7b"] is None
    assert result["targets_met"]["decode_bw_fraction_7b >= 0.70"] is None
    assert all(s is not None for s in result["step_seconds"].values())


def test_gpu_check_refuses_an_unknown_argument():
    proc = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


def test_gpu_check_step_limits_fit_six_minutes_with_the_training_slot():
    # The real run's limits (not the dry run's) plus the install and the 90 s reserved for the
    # training-speed step stay within 6 minutes.
    text = SCRIPT.read_text()
    real_run = text.split("unset TRITON_INTERPRET")[1].split("\nfi\n")[0]
    limits = [int(x) for x in re.findall(r"LIMIT_\w+=(\d+)", real_run)]
    assert len(limits) == 4
    install = int(re.search(r"timeout (\d+) \"\$PY\" -m pip install", text).group(1))
    assert sum(limits) + install + 90 <= 360, (limits, install)
    assert "tools/bench_train_gpu.py" in text  # the marked place for the training step


def test_bench_model_reports_both_ratios(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_model", ROOT / "tools" / "bench_model.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--batch", "1", "--seq-len", "32", "--repeats", "1", "--warmup", "1",
                         "--siaf-backend", "reference", "--device", "cpu"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == pytest.approx(result)
    assert last["pangu_vs_llama_time"] > 0 and last["pangu_vs_llama_forward"] > 0
    assert last["pangu_tokens_per_s"] > 0 and "pangu_mfu" not in last  # no known peak on CPU
