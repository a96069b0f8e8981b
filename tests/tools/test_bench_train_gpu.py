"""tools/bench_train_gpu.py on CPU with the tiny preset: both runs go through the trainer and the last
line carries the figures the GPU run reports. (The 1B figures themselves need a GPU.)"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train_gpu", ROOT / "tools" / "bench_train_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_smoke_reports_every_key(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "bench_train_gpu.py"), "--preset", "tiny", "--vocab-size", "8192",
           "--steps", "3", "--warmup-steps", "1", "--seq-len", "64", "--micro-batch", "2", "--precision", "fp32",
           "--corpus-bytes", "300000", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"),
           "--peak-flops", "1e11", "--set", "model.siaf_backend=reference"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("mfu", "tokens_per_s_per_gpu", "pangu_vs_llama_step_time", "peak_mem_gib", "peak_mem_vs_estimate"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["pangu"]["steps_measured"] == 2 and result["llama"]["steps_measured"] == 2
    assert result["pangu_vs_llama_step_time"] == pytest.approx(
        result["pangu"]["step_time_s"] / result["llama"]["step_time_s"])
    # MFU is the trainer's: tokens/s per GPU × FLOPs per token / the given peak
    from pangu_pi import PanGuPiConfig
    from pangu_pi.training.flops import flops_per_token

    fpt = flops_per_token(PanGuPiConfig.from_preset("tiny"), 64)
    assert result["mfu"] == pytest.approx(result["tokens_per_s_per_gpu"] * fpt / 1e11, rel=0.05)
    # the LLaMA run trained the identity-configured model: no shortcut, one SIAF term
    saved = (tmp_path / "runs" / "llama" / "config.yaml").read_text()
    assert "shortcut_count: 0" in saved and "siaf_terms: 1" in saved


def test_measure_averages_the_steps_after_warmup():
    bench = _bench()
    rows = [{"step": 1, "loss": 9.0, "tokens_per_s": 10.0, "tokens_per_s_per_gpu": 10.0, "mfu": 0.01},
            {"step": 2, "loss": 8.0, "tokens_per_s": 100.0, "tokens_per_s_per_gpu": 100.0, "mfu": 0.1},
            {"step": 2, "val_loss": 8.5},
            {"step": 3, "loss": 7.0, "tokens_per_s": 300.0, "tokens_per_s_per_gpu": 300.0, "mfu": 0.3}]
    out = bench.measure(rows, warmup=1)
    assert out["steps_measured"] == 2 and out["final_loss"] == 7.0
    assert out["tokens_per_s_per_gpu"] == pytest.approx(2 / (1 / 100 + 1 / 300))  # equal tokens a step
    assert out["mfu"] == pytest.approx(out["tokens_per_s_per_gpu"] * 0.001)  # the rows' MFU per token/s


def test_the_llama_is_the_identity_configured_model():
    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM

    bench = _bench()
    overrides = {k.split(".", 1)[1]: v for k, v in bench.LLAMA.items()}
    model = PanGuPiForCausalLM(PanGuPiConfig.from_preset("tiny", siaf_backend="reference", **overrides))
    mlp = model.model.layers[0].mlp
    assert not list(model.model.layers[0].augmented_shortcuts)
    assert mlp.siaf.scale.tolist() == [1.0] and mlp.siaf.shift.tolist() == [0.0] and mlp.siaf.coef is None
