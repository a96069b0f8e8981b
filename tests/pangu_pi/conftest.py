"""Checkpoints written the ways a user writes them, made once per session for the tests that load them.

Nothing from pangu_pi (nor transformers) is imported at module level: this file loads before
kernels/conftest.py, which must set TRITON_INTERPRET before Triton is first imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def cli(argv: list[str]) -> int:
    from pangu_pi.cli import main

    return main(argv)


@pytest.fixture(scope="session")
def checkpoints(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("remote")
    init = root / "init"
    assert cli(["init", "--tokenizer", str(tokenizer_dir), "--out", str(init), "--set", "siaf_backend=reference"]) == 0

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}))
    llama.save_pretrained(root / "llama")
    assert cli(["convert-llama", str(root / "llama"), str(root / "converted")]) == 0

    from pangu_pi.training.finetune import finetune
    from pangu_pi.net import free_port

    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                                                     {"role": "assistant", "content": f"{2 * a}."}]}) + "\n"
                            for a in range(24)))
    mp = pytest.MonkeyPatch()
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        mp.setenv(key, value)
    try:
        finetune({"model": {"init_from": str(init)}, "out": str(root / "ft"),
                  "data": {"datasets": [{"path": str(chat), "weight": 1.0}], "seq_len": 64, "val_fraction": 0.2},
                  "train": {"max_steps": 3}, "eval": {"every": 3}, "batch": {"micro_batch_size": 4},
                  "optim": {"lr": 3e-3},
                  "schedule": {"warmup_steps": 1}, "log": {"tensorboard": False, "plot": False}}, progress=False)
    finally:
        mp.undo()
    return {"init": init, "converted": root / "converted", "finetuned": root / "ft" / "model"}


@pytest.fixture(scope="session")
def pretrained_export(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, `pangu-pi export` of its last checkpoint) of a few-step single-process pretraining."""
    import yaml

    root = tmp_path_factory.mktemp("pt")
    config = {
        "model": {"preset": "tiny", "siaf_backend": "reference", "num_hidden_layers": 2},
        "data": {"seq_len": 32, "default_corpus_bytes": 300_000, "tokenizer_vocab_size": 512, "val_fraction": 0.05},
        "batch": {"global_batch_size": 4, "micro_batch_size": 4},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 1},
        "train": {"max_steps": 4, "precision": "fp32", "zero_stage": 1, "log_every": 1},
        "checkpoint": {"save_every": 4},
        "eval": {"every": 2, "samples": 4},
        "log": {"tensorboard": False},
        "out": str(root / "run"),
    }
    # A process of its own: DeepSpeed keeps process-group state between runs in one process.
    (root / "pt.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-c", "import sys; from pangu_pi.cli import main; sys.exit(main())",
                             "pretrain", "--config", str(root / "pt.yaml"), "--no-progress"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(root)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert cli(["export", str(root / "run"), str(root / "hf")]) == 0
    return root / "run", root / "hf"
