"""The speed settings through the trainer itself (`pangu-pi pretrain`'s library call, tiny model, fp32,
CPU): each setting trains the same losses as the run without it, and the run reports its throughput.
Under ZeRO-3 with 2 gloo processes the fused loss reproduces the plain loss's run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pangu_pi.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PANGU_PI = [sys.executable, "-c", "import sys; from pangu_pi.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    """The default-corpus tokenizer and shards, made once for every run of this module."""
    from pangu_pi.training.config import build_config
    from pangu_pi.training.recipes.pretrain import default_data

    cache = tmp_path_factory.mktemp("speed-data")
    default_data(build_config(_config(cache, 1)), cache, progress=False)
    return cache


def _config(cache: Path, steps: int, stage: int = 1, micro: int = 2, **train) -> dict:
    return {
        "model": {"preset": "tiny", "siaf_backend": "reference", "num_hidden_layers": 2},
        "data": {"seq_len": 32, "default_corpus_bytes": 300_000, "tokenizer_vocab_size": 512,
                 "cache_dir": str(cache), "val_fraction": 0.02},
        "batch": {"micro_batch_size": micro, "grad_accum": 2},
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "constant", "warmup_steps": 1},
        "train": {"max_steps": steps, "precision": "fp32", "zero_stage": stage, **train},
        "checkpoint": {"save_every": 10**6},
        "eval": {"every": 0},
        "log": {"tensorboard": False, "plot": False, "peak_flops_per_device": 1e11},
        "seed": 3,
    }


def _train(cache: Path, out: Path, steps: int, **train) -> tuple[list[float], dict]:
    from pangu_pi.training.config import build_config
    from pangu_pi.training.pretrain import pretrain

    config = build_config({**_config(cache, steps, **train), "out": str(out)}, recipe="pretrain")
    summary = pretrain(config, progress=False)
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r], summary


@pytest.mark.slow  # two 6-step runs (~35 s)
def test_fused_and_plain_loss_train_the_same_run_and_the_summary_reports_throughput(data_cache, tmp_path):
    plain, _ = _train(data_cache, tmp_path / "plain", 6, fused_loss=False)
    fused, summary = _train(data_cache, tmp_path / "fused", 6, fused_loss=True)
    assert len(plain) == len(fused) == 6 and plain[0] > plain[-1]
    assert max(abs(a - b) for a, b in zip(plain, fused)) <= 1e-4, (plain, fused)
    assert summary["tokens_per_s_per_gpu"] > 0
    assert summary["mfu"] == pytest.approx(summary["tokens_per_s_per_gpu"] * _fpt() / 1e11, rel=1e-6)
    row = read_metrics(tmp_path / "fused" / "metrics.jsonl")[-1]
    assert row["tokens_per_s_per_gpu"] == row["tokens_per_s"]  # one process


def _fpt() -> float:
    from pangu_pi import PanGuPiConfig
    from pangu_pi.training.flops import flops_per_token

    return flops_per_token(PanGuPiConfig.from_preset("tiny", vocab_size=512, num_hidden_layers=2), 32)


@pytest.mark.slow  # three 4-step runs (~45 s)
def test_activation_checkpointing_trains_the_same_losses_as_none(data_cache, tmp_path):
    none, _ = _train(data_cache, tmp_path / "none", 4, activation_checkpointing="none")
    for mode in ("selective", True):  # true is full
        checkpointed, _ = _train(data_cache, tmp_path / f"ac-{mode}", 4, activation_checkpointing=mode)
        assert max(abs(a - b) for a, b in zip(none, checkpointed)) <= 1e-5, (mode, none, checkpointed)


@pytest.mark.slow  # two 20-step runs, one of them compiling the blocks (~1 min on two cores)
def test_compiled_blocks_reproduce_the_eager_losses_over_20_steps(data_cache, tmp_path):
    eager, _ = _train(data_cache, tmp_path / "eager", 20, compile=False)
    compiled, _ = _train(data_cache, tmp_path / "compiled", 20, compile=True)
    assert len(eager) == len(compiled) == 20 and eager[0] > eager[-1]
    assert max(abs(a - b) for a, b in zip(eager, compiled)) <= 1e-4, (eager, compiled)


def _spawn(config: dict, out: Path) -> list[float]:
    out.mkdir(parents=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "TMPDIR": str(out.parent)}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([*PANGU_PI, "pretrain", "--config", str(path), "--out", str(out), "--nproc", "2",
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r], proc.stdout + proc.stderr


@pytest.mark.slow  # two 2-process ZeRO-3 runs
def test_fused_loss_under_zero3_on_two_processes_reproduces_the_plain_run(data_cache, tmp_path):
    runs = {}
    for fused in (False, True):
        config = _config(data_cache, 4, stage=3, fused_loss=fused)
        runs[fused], output = _spawn(config, tmp_path / f"fused-{fused}")
        assert ("fused loss" if fused else "plain loss") in output  # the trainer's own account of the setting
    assert len(runs[True]) == len(runs[False]) == 4
    assert max(abs(a - b) for a, b in zip(runs[True], runs[False])) <= 1e-4, runs
