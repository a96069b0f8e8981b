"""A checkpoint written by N processes resumes on M (DeepSpeed's universal checkpoint): 2 → 1 and
1 → 2 under ZeRO-2 and ZeRO-3 reproduce the unbroken 2-process run's losses (fp32, same global
batch); a global batch the new process count cannot keep is refused before training."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PANGU_PI = [sys.executable, "-c", "import sys; from pangu_pi.cli import main; sys.exit(main())"]
STEPS = 12

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from pangu_pi.training.config import build_config
    from pangu_pi.training.recipes.pretrain import default_data

    cache = tmp_path_factory.mktemp("elsewhere-data")
    default_data(build_config(_config(cache, 2)), cache, progress=False)
    return cache


def _config(cache: Path, stage: int) -> dict:
    return {
        "model": {"preset": "tiny", "siaf_backend": "reference"},
        "data": {"seq_len": 32, "default_corpus_bytes": 400_000, "tokenizer_vocab_size": 512,
                 "cache_dir": str(cache), "val_fraction": 0.02},
        # micro 2 everywhere: grad_accum 2 on 2 processes, 4 on 1; the global batch stays 8.
        "batch": {"global_batch_size": 8, "micro_batch_size": 2},
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "train": {"max_steps": STEPS, "precision": "fp32", "zero_stage": stage},
        "checkpoint": {"save_every": 3},
        "eval": {"every": 0},
        "log": {"tensorboard": False, "plot": False},
    }


def _run(config: dict, out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run([*PANGU_PI, "pretrain", "--config", str(path), "--out", str(out), "--nproc", str(nproc),
                           "--no-progress", *extra], capture_output=True, text=True, env=env, timeout=400)


def _losses(out: Path) -> dict[int, float]:
    from pangu_pi.training.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def _resume_copy(src: Path, step: int, dest: Path) -> Path:
    """A run folder holding only src's step-N checkpoint and its metrics up to N (as if it had
    stopped there)."""
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"step_{step}", dest / "checkpoints" / f"step_{step}")
    shutil.copy2(src / "metrics.jsonl", dest / "metrics.jsonl")  # the logger cuts it back to step N
    return dest


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_another_process_count_reproduces_the_losses(cache, tmp_path, stage):
    config = _config(cache, stage)
    ref = tmp_path / "ref"
    proc = _run(config, ref, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = _losses(ref)
    assert sorted(reference) == list(range(1, STEPS + 1))

    # 2 → 1: the 2-process step-6 checkpoint, resumed by one process to the end.
    one = _resume_copy(ref, 6, tmp_path / "one")
    proc = _run(config, one, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written by 2 processes, through its universal form" in proc.stdout + proc.stderr
    assert (one / "checkpoints" / "step_6" / "universal" / "engine" / "zero").is_dir()
    losses = _losses(one)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(7, STEPS + 1):
        assert abs(losses[step] - reference[step]) <= 1e-4, (step, losses[step], reference[step])
    # Not trivially equal: training moved the loss (a fresh optimizer would take other steps).
    assert abs(losses[STEPS] - losses[7]) > 1e-2

    # 1 → 2: the step-9 checkpoint that one process wrote, resumed by two.
    two = _resume_copy(one, 9, tmp_path / "two")
    proc = _run(config, two, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written by 1 processes, through its universal form" in proc.stdout + proc.stderr
    losses = _losses(two)
    for step in range(10, STEPS + 1):
        assert abs(losses[step] - reference[step]) <= 1e-4, (step, losses[step], reference[step])

    if stage == 2:
        # A global batch that cannot be kept is refused before any rank starts, with the settings that work.
        three = _resume_copy(ref, 6, tmp_path / "three")
        proc = _run(config, three, 3)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "global batch of 8 sequences" in lines[0] and "1, 2, 4 or 8 processes" in lines[0]
        proc = _run({**config, "batch": {"micro_batch_size": 2, "grad_accum": 1}}, three, 2)
        assert proc.returncode == 2
        line = proc.stderr.strip()
        assert "global batch of 8 sequences" in line and "batch.global_batch_size=8" in line
        assert "batch.micro_batch_size=2 batch.grad_accum=2" in line and "\n" not in line
        assert not (three / "checkpoints" / "step_6" / "universal").exists()
