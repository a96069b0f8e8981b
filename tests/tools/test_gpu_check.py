"""The prepared GPU check and the model benchmark keep working where there is no GPU.

`tools/gpu_check.sh --dry-run` runs the GPU script's steps on CPU with tiny shapes and the Triton
kernels under the interpreter. It does not cover CUDA code generation, GPU timings or the 1B shape:
those only run on a GPU machine (without --dry-run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_and_reports_every_step(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dry_run"] is True and result["ok"] is True
    assert result["kernel_tests"]["passed"] > 10 and result["kernel_tests"]["failed"] == 0
    assert result["bench_kernels_float32"]["triton_ms"] > 0
    assert result["bench_model"]["pangu_vs_llama_time"] > 0
    assert result["bench_train_gpu"]["tokens_per_s_per_gpu"] > 0 and result["bench_train_gpu"]["mfu"] > 0
    assert set(result["exit"]) == {"kernel_tests", "bench_kernels_float32", "bench_model", "bench_train_gpu"}


def test_gpu_check_refuses_an_unknown_argument():
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


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
