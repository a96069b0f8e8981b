"""End to end on CPU with 2 gloo processes: the tiny model on the embedded default corpus under ZeRO
1, 2 and 3, export and reload with identical logits, exact resume after SIGKILL (mid-training and
mid-save), and the non-finite guard.

Each 2-process run pays ~20 s of start-up, so runs are shared: the ZeRO-2 run is both a stage under
test and the uninterrupted reference the resumed run must reproduce.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
# What the `pangu-pi` console script runs (`python -m pangu_pi.cli` would load the CLI twice, as __main__ too).
PANGU_PI = [sys.executable, "-c", "import sys; from pangu_pi.cli import main; sys.exit(main())"]
STEPS = 12

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_data_cache(tmp_path_factory) -> Path:
    """The default-corpus tokenizer and shards, made once here the way a run would make them."""
    from pangu_pi.training.config import build_config
    from pangu_pi.training.recipes.pretrain import default_data

    cache = tmp_path_factory.mktemp("default-data")
    default_data(build_config(_base(cache, stage=2)), cache, progress=False)
    return cache


def _base(cache: Path, stage: int, **train) -> dict:
    # No datasets: the run uses the embedded default corpus (a 1 MB slice), tokenized into `cache`.
    return {
        "model": {"preset": "tiny", "siaf_backend": "reference"},
        "data": {"seq_len": 64, "default_corpus_bytes": 1_000_000, "tokenizer_vocab_size": 1024,
                 "cache_dir": str(cache), "val_fraction": 0.02},
        "batch": {"global_batch_size": 16, "micro_batch_size": 4},  # grad_accum 2 on 2 processes
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "train": {"max_steps": STEPS, "precision": "fp32", "zero_stage": stage, **train},
        "checkpoint": {"save_every": 4},
        "eval": {"every": 6, "samples": 8},
    }


def _env(tmp: Path, **extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "TMPDIR": str(tmp), **extra}
    env.pop("OMP_NUM_THREADS", None)  # the launcher gives each rank its share of the cores
    return env


def _start(config: dict, out: Path, *, nproc: int | None = 2, **env: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [*PANGU_PI, "pretrain", "--config", str(path), "--out", str(out), "--no-progress"]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    log = open(out.parent / f"{out.name}.log", "a")
    # A session of its own, so a test can SIGKILL the whole job (launcher and ranks) at once.
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(out.parent, **env),
                            start_new_session=True)


def _finish(proc: subprocess.Popen, out: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"run timed out; log:\n{_log(out)}") from None


def _log(out: Path) -> str:
    path = out.parent / f"{out.name}.log"
    return path.read_text()[-4000:] if path.exists() else ""


def _losses(out: Path) -> dict[int, float]:
    from pangu_pi.training.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def _val_losses(out: Path) -> dict[int, float]:
    from pangu_pi.training.metrics import read_metrics

    return {r["step"]: r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r}


_RUNS: dict[int, Path] = {}


@pytest.fixture(scope="module")
def trained(default_data_cache, tmp_path_factory):
    """trained(stage) -> run folder of an uninterrupted run (made once per stage)."""

    def run(stage: int) -> Path:
        if stage not in _RUNS:
            out = tmp_path_factory.mktemp(f"zero{stage}") / "run"
            # ZeRO-3 also runs with activation checkpointing, which re-gathers weights in the recompute.
            config = _base(default_data_cache, stage, activation_checkpointing=stage == 3)
            proc = _start(config, out, PANGU_PI_TEST_DUMP_LOGITS=str(out.parent / "logits.pt"))
            assert _finish(proc, out) == 0, _log(out)
            _RUNS[stage] = out
        return _RUNS[stage]

    return run


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_exports_and_reloads(trained, stage, tmp_path):
    import pangu_pi  # noqa: F401 - registers the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pangu_pi.training.export import export_checkpoint

    out = trained(stage)
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.5, losses
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss" in r]
    assert all(not r["skipped"] and r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in step_rows)
    assert sorted(_val_losses(out)) == [6, 12]
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_12", "step_4", "step_8"]
    assert (root / "latest").read_text().strip() == "step_12"
    assert (root / "loss_curves.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    saved = yaml.safe_load((root / "step_12" / "config.yaml").read_text())
    assert saved["train"]["zero_stage"] == stage and saved["batch"]["grad_accum"] == 2

    export = export_checkpoint(out, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert len(tokenizer) == model.config.vocab_size == 1024
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == [2, 5]
    dumped = torch.load(out.parent / "logits.pt")
    with torch.no_grad():
        logits = model(input_ids=dumped["input_ids"]).logits
    # The engine's own forward at the end of training against the exported weights reloaded.
    torch.testing.assert_close(logits, dumped["logits"], rtol=0, atol=1e-5)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (code {proc.returncode}) before step {step}; log:\n{_log(out)}")
        if max(_losses(out), default=0) >= step:
            return
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no step {step} within {timeout} s; log:\n{_log(out)}")


def test_sigkill_mid_save_and_mid_training_then_resume_reproduces_the_losses(trained, default_data_cache, tmp_path):
    reference = _losses(trained(2))
    reference_val = _val_losses(trained(2))
    config = _base(default_data_cache, stage=2)
    out = tmp_path / "run"
    root = out / "checkpoints"

    # 1. Killed (the whole process group, SIGKILL) in the middle of writing the step-8 checkpoint.
    proc = _start(config, out, PANGU_PI_TEST_KILL_DURING_SAVE="8")
    assert _finish(proc, out) == -signal.SIGKILL, _log(out)
    assert (root / "step_8.tmp").is_dir() and not (root / "step_8").exists()
    assert (root / "latest").read_text().strip() == "step_4"

    # 2. Resumed from step 4 (the half-written step 8 is discarded), then killed mid-training.
    proc = _start(config, out)
    _wait_for_step(proc, out, 10)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    log = _log(out)
    assert "removed unfinished checkpoint" in log and "step_8.tmp" in log
    assert "resumed from" in log and "(step 4)" in log

    # 3. Resumed from step 8, to the end.
    proc = _start(config, out)
    assert _finish(proc, out) == 0, _log(out)
    assert "(step 8)" in _log(out).rsplit("resumed from", 1)[-1]

    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(losses[step] - reference[step]) <= 1e-6, (step, losses[step], reference[step])
    val = _val_losses(out)
    assert sorted(val) == sorted(reference_val)
    assert all(abs(val[s] - reference_val[s]) <= 1e-6 for s in val)


def test_non_finite_gradients_skip_the_step_and_stop_after_k_in_a_row(default_data_cache, tmp_path):
    # One process, started without a launcher; NaN gradients at steps 3, 5 and 6, at most 2 in a row.
    config = _base(default_data_cache, stage=1, max_steps=8, max_bad_steps=2)
    config["checkpoint"] = {"save_every": 100}
    config["eval"] = {"every": 0}
    out = tmp_path / "run"
    proc = _start(config, out, nproc=None, PANGU_PI_TEST_NONFINITE_GRAD_STEPS="3,5,6")
    assert _finish(proc, out) == 2, _log(out)
    log = _log(out)
    assert "error: stopped at step 6: 2 optimizer steps in a row had a non-finite loss or gradient norm" in log
    assert "Traceback" not in log
    from pangu_pi.training.metrics import read_metrics

    rows = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert [rows[s]["skipped"] for s in range(1, 7)] == [False, False, True, False, True, True]
    # DeepSpeed discarded step 3's update, so the LR schedule did not move either; step 4's did.
    assert rows[3]["lr"] == rows[4]["lr"] == pytest.approx(3e-3)
    assert rows[5]["lr"] < rows[4]["lr"]
    assert rows[4]["grad_norm"] > 0 and rows[3]["loss"] > 0  # the loss itself stayed finite: the gradient tripped it
