"""`pangu-pi finetune` on the training core: mid-run checkpoints, SIGKILL and `--resume auto`
reproducing the unbroken run's losses (LoRA with dropout, and full), and W&B logging in offline mode."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
PANGU_PI = [sys.executable, "-c", "import sys; from pangu_pi.cli import main; sys.exit(main())"]
STEPS = 8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_and_chat(tokenizer_dir, tmp_path_factory) -> tuple[Path, Path]:
    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = PanGuPiConfig.from_preset("tiny", vocab_size=len(tokenizer), siaf_backend="reference")
    work = tmp_path_factory.mktemp("ft-resume")
    PanGuPiForCausalLM(config).save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    rng = random.Random(1)
    lines = []
    for _ in range(64):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                              {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}))
    (work / "chat.jsonl").write_text("\n".join(lines) + "\n")
    return work / "base", work / "chat.jsonl"


def _run(base: Path, chat: Path, out: Path, mode: str, *, env: dict | None = None, extra: tuple = ()) -> int:
    config = {
        "model": {"init_from": str(base)},
        "data": {"datasets": [{"path": str(chat), "weight": 1.0}], "seq_len": 64},
        "batch": {"global_batch_size": 4, "micro_batch_size": 2},  # 2 accumulation steps
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "finetune": {"mode": mode, "lora": {"r": 4, "dropout": 0.1}},  # dropout: the RNG state must resume too
        "log": {"tensorboard": False},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [*PANGU_PI, "finetune", "--config", str(path), "--out", str(out), "--max-steps", str(STEPS),
           "--save-every", "3", "--no-progress", *extra]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", **(env or {})}
    with open(out.parent / f"{out.name}.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, timeout=400,
                              start_new_session=True)  # the kill hook takes down its own group only
    return proc.returncode


def _log(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()[-3000:]


def _losses(out: Path) -> dict[int, float]:
    from pangu_pi.training.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sigkill_then_resume_auto_reproduces_the_losses(base_and_chat, tmp_path, mode):
    base, chat = base_and_chat
    ref = tmp_path / "ref"
    wandb_env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"} if mode == "lora" else {}
    extra = ("--set", "log.wandb=pangu-pi-test") if mode == "lora" else ()
    assert _run(base, chat, ref, mode, env=wandb_env, extra=extra) == 0, _log(ref)
    reference = _losses(ref)
    assert sorted(reference) == list(range(1, STEPS + 1))

    out = tmp_path / "run"
    # SIGKILL of the whole job right after step 5: the newest checkpoint is step 3's.
    code = _run(base, chat, out, mode, env={"PANGU_PI_TEST_KILL_AFTER_STEP": "5"})
    assert code == -signal.SIGKILL, _log(out)
    assert not (out / "adapter").exists() and not (out / "model").exists()
    assert [p.name for p in sorted((out / "checkpoints").glob("step_*"))] == ["step_3"]
    assert _run(base, chat, out, mode, extra=("--resume", "auto")) == 0, _log(out)
    assert "resumed from" in _log(out) and "(step 3)" in _log(out)

    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(losses[step] - reference[step]) <= 1e-6, (step, losses[step], reference[step])
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["final_loss"] == pytest.approx(reference[STEPS], abs=1e-6)
    if mode == "lora":
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        # W&B, offline: the run's history written under OUT/wandb, with the steps' losses.
        runs = list((ref / "wandb").glob("offline-run-*/run-*.wandb"))
        assert runs and runs[0].stat().st_size > 0, list((ref / "wandb").rglob("*"))
        assert (ref / "wandb_id").is_file()
    else:
        assert (out / "model" / "model.safetensors").is_file()
        from safetensors.torch import load_file

        tuned, unbroken = load_file(out / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors")
        assert tuned.keys() == unbroken.keys()
        assert all(torch.allclose(tuned[k], unbroken[k], atol=1e-6) for k in tuned)
