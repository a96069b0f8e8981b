"""`train.sequence_parallel` (DeepSpeed Ulysses, training/sequence_parallel.py) on CPU with gloo:
pretraining and SFT split over 2 ranks reproduce the unsplit run's per-step losses (fp32, packed
documents, GQA, the SIAF FFN and the augmented shortcut of the tiny preset); a run stopped under
SP=2 resumes under SP=1 at the exact sample; what SP cannot take is refused before compute."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pangu_pi.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
PANGU_PI = [sys.executable, "-c", "import sys; from pangu_pi.cli import main; sys.exit(main())"]
STEPS = 10


# ------------------------------------------------------------------------------------------------
# Refusals: one line, before any compute


def _run_config(**train):
    from pangu_pi.training.config import build_config

    return build_config({"model": {"preset": "tiny"}, "data": {"seq_len": 32},
                         "train": {"max_steps": 1, **train}})


@pytest.mark.parametrize("n, world, seq, where", [
    (4, 4, 32, "KV heads"),  # tiny: 4 heads, 2 KV heads
    (3, 3, 33, "attention heads"),
    (2, 3, 32, "processes"),
    (2, 2, 33, "data.seq_len"),
])
def test_sizes_sequence_parallel_cannot_split_are_refused(n, world, seq, where):
    from pangu_pi.training import sequence_parallel as sp
    from pangu_pi.training.config import build_config

    config = build_config({"model": {"preset": "tiny"}, "data": {"seq_len": seq},
                           "train": {"max_steps": 1, "sequence_parallel": n}})
    with pytest.raises(UserError) as err:
        sp.check(config, world, config.model_config())
    assert where in str(err.value) and "\n" not in str(err.value)


def test_recipes_and_attention_sequence_parallel_cannot_take_are_refused(tmp_path):
    from pangu_pi.training import sequence_parallel as sp
    from pangu_pi.training.config import build_config

    config = _run_config(sequence_parallel=2)
    model = config.model_config()
    sp.check(config, 2, model)  # sdpa, 2 | 4 heads, 2 | 2 KV heads, 2 | 32 tokens: accepted
    model._attn_implementation = "eager"
    with pytest.raises(UserError, match="'eager' attention"):
        sp.check(config, 2, model)
    base = tmp_path / "base"
    config_for = lambda mode: build_config(  # noqa: E731
        {"model": {"init_from": str(base)}, "data": {"seq_len": 512, "datasets": ["chat.jsonl"]},
         "train": {"sequence_parallel": 2, "max_steps": 1},
         "finetune": {"mode": mode, "grpo": {"rewards": [{"function": "numeric_answer", "weight": 1.0}]}}},
        recipe="finetune", check_paths=False)
    with pytest.raises(UserError, match="the grpo recipe cannot split"):
        sp.check(config_for("grpo"), 2, config.model_config())
    sp.check(config_for("dpo"), 2, config.model_config())  # DPO sums each sequence's slices over the group
    with pytest.raises(UserError, match="does not run with train.zero_stage 3") as err:
        sp.check(_run_config(sequence_parallel=2, zero_stage=3), 2, config.model_config())
    assert "\n" not in str(err.value)


def test_sequence_parallel_must_be_a_positive_whole_number():
    from pangu_pi.config import ConfigError

    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="train.sequence_parallel"):
            _run_config(sequence_parallel=bad)


# ------------------------------------------------------------------------------------------------
# Two processes: the losses of the unsplit run


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    env.pop("OMP_NUM_THREADS", None)
    return env


def _run(command: str, config: dict, out: Path, nproc: int) -> subprocess.CompletedProcess:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([*PANGU_PI, command, "--config", str(path), "--out", str(out), "--nproc", str(nproc),
                           "--no-progress"], capture_output=True, text=True, env=_env(), timeout=600)


def _losses(out: Path) -> dict[int, float]:
    from pangu_pi.training.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def _close(a: dict, b: dict, tol: float) -> None:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    worst = max(abs(a[s] - b[s]) for s in a)
    print(f"steps {min(a)}-{max(a)}: largest per-step loss difference {worst:.2e}")
    assert worst <= tol, f"largest per-step loss difference {worst:.3g} > {tol}: {a} vs {b}"


def _split_matches_unsplit(command: str, config, tmp_path: Path, steps: int) -> None:
    """`config(sp)` run unsplit on 1 process and split on 2: the same per-step losses (≤ 1e-5)."""
    ref, split = tmp_path / "sp1", tmp_path / "sp2"
    for out, sp in ((ref, 1), (split, 2)):
        proc = _run(command, config(sp), out, sp)
        assert proc.returncode == 0, proc.stderr[-3000:]
    reference = _losses(ref)
    assert sorted(reference) == list(range(1, steps + 1))
    _close(_losses(split), reference, 1e-5)


@pytest.fixture(scope="module")
def pretrain_cache(tmp_path_factory) -> Path:
    from pangu_pi.training.config import build_config
    from pangu_pi.training.recipes.pretrain import default_data

    cache = tmp_path_factory.mktemp("sp-data")
    default_data(build_config(_pretrain_config(cache, 1)), cache, progress=False)
    return cache


def _pretrain_config(cache: Path, sp: int) -> dict:
    return {
        # tiny: 4 heads over 2 KV heads (GQA), the SIAF FFN, one augmented shortcut.
        "model": {"preset": "tiny", "siaf_backend": "reference"},
        # 64 tokens of EOS-separated documents per row; the global batch (2 × 2) is the same for
        # 1 process (SP 1, DP 1) and 2 (SP 2, DP 1).
        "data": {"seq_len": 64, "default_corpus_bytes": 400_000, "tokenizer_vocab_size": 512,
                 "cache_dir": str(cache), "val_fraction": 0.02},
        "batch": {"global_batch_size": 4, "micro_batch_size": 2},
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "train": {"max_steps": STEPS, "precision": "fp32", "zero_stage": 2, "sequence_parallel": sp},
        "checkpoint": {"save_every": 5},
        # evaluation scores whole sequences on every rank (SP is off in eval): the same held-out loss
        "eval": {"every": 5, "samples": 8},
        "log": {"tensorboard": False, "plot": False},
    }


@pytest.mark.slow
def test_pretraining_split_over_two_ranks_reproduces_the_losses_and_resumes_unsplit(pretrain_cache, tmp_path):
    ref, split = tmp_path / "sp1", tmp_path / "sp2"
    proc = _run("pretrain", _pretrain_config(pretrain_cache, 1), ref, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run("pretrain", _pretrain_config(pretrain_cache, 2), split, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sequence parallel: 2 ranks per sequence" in proc.stdout + proc.stderr
    from pangu_pi.training.metrics import read_metrics

    rows = [r for r in read_metrics(split / "metrics.jsonl") if "loss" in r]
    assert rows and all(r["sequence_parallel"] == 2 for r in rows)
    # every rank holds half of each sequence's tokens; the run counts them all (4 × 64 a step)
    assert rows[-1]["tokens"] == STEPS * 4 * 64
    reference = _losses(ref)
    assert sorted(reference) == list(range(1, STEPS + 1))
    _close(_losses(split), reference, 1e-5)
    val = {r["step"]: r["val_loss"] for r in read_metrics(ref / "metrics.jsonl") if r.get("val_loss") is not None}
    assert sorted(val) == [5, 10]
    # 1e-4: a held-out loss reads the weights after that step's update, one update beyond the last
    # training loss compared (fp32 sums in another order drift by ~2e-5 over 10 updates at lr 3e-3).
    _close({r["step"]: r["val_loss"] for r in read_metrics(split / "metrics.jsonl") if r.get("val_loss") is not None},
           val, 1e-4)

    # Stopped under SP 2 after step 5 (only that checkpoint and the metrics up to it survive),
    # resumed under SP 1 on one process: DeepSpeed's universal checkpoint, the same next sample.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(split / "checkpoints" / "step_5", resumed / "checkpoints" / "step_5")
    shutil.copy2(split / "metrics.jsonl", resumed / "metrics.jsonl")
    from pangu_pi.training.checkpoint import read_state

    assert read_state(split / "checkpoints" / "step_5")["samples_consumed"] == 5 * 4  # global samples
    proc = _run("pretrain", _pretrain_config(pretrain_cache, 1), resumed, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "through its universal form" in proc.stdout + proc.stderr
    after = {s: v for s, v in _losses(resumed).items() if s > 5}
    _close(after, {s: v for s, v in reference.items() if s > 5}, 1e-4)


def _chat_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


@pytest.fixture(scope="module")
def sft_inputs(tokenizer_dir, tmp_path_factory) -> tuple[Path, Path]:
    import torch

    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = PanGuPiConfig.from_preset("tiny", vocab_size=len(tokenizer), siaf_backend="reference")
    base = tmp_path_factory.mktemp("sp-base") / "base"
    PanGuPiForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    chat = base.parent / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in _chat_records(64)))
    return base, chat


@pytest.mark.slow
@pytest.mark.parametrize("mode, zero_stage", [("full", 2), ("lora", 2)])
def test_sft_split_over_two_ranks_reproduces_the_losses(sft_inputs, tmp_path, mode, zero_stage):
    """Full weights, and LoRA adapters (peft's wrapped attention under DeepSpeed's Ulysses wrapper; LoRA
    dropout off, whose masks are drawn per process and would differ between the runs by design)."""
    base, chat = sft_inputs

    def config(sp: int) -> dict:
        # 128-token rows pack several chats each (per-document positions, block-causal masks).
        return {"model": {"init_from": str(base)},
                "data": {"datasets": [{"path": str(chat), "weight": 1.0}], "seq_len": 128},
                "train": {"max_steps": STEPS, "precision": "fp32", "sequence_parallel": sp,
                          "zero_stage": zero_stage},
                "batch": {"global_batch_size": 4, "micro_batch_size": 2},
                "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 2},
                "finetune": {"mode": mode, "lora": {"dropout": 0.0}}, "eval": {"every": 0},
                "checkpoint": {"save_every": 100}, "log": {"tensorboard": False, "plot": False}}

    _split_matches_unsplit("finetune", config, tmp_path, STEPS)


def test_memory_estimate_counts_one_slice_of_each_sequence_per_rank():
    from pangu_pi.training.config import build_config
    from pangu_pi.training.memory import estimate_memory

    def config(sp: int):
        return build_config({"model": {"preset": "tiny"}, "data": {"seq_len": 512},
                             "batch": {"global_batch_size": 4, "micro_batch_size": 2},
                             "train": {"max_steps": 1, "sequence_parallel": sp, "fused_loss": False}})

    whole, split = estimate_memory(config(1), 2), estimate_memory(config(2), 4)  # 2 DP ranks in both
    assert split.sequence_parallel == 2 and whole.sequence_parallel == 1
    assert split.activations == pytest.approx(whole.activations / 2)
    assert split.logits == pytest.approx(whole.logits / 2)
    with pytest.raises(Exception, match="global_batch_size"):
        estimate_memory(config(2), 8)  # 4 DP ranks cannot split the 4 sequences in micro-batches of 2
    with pytest.raises(Exception, match="does not divide the 3 GPUs"):
        estimate_memory(config(2), 3)


# ------------------------------------------------------------------------------------------------
# One process: the pieces SP runs on


def test_document_attention_masks_packed_documents_as_the_unsplit_model_does():
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pangu_pi.training.sequence_parallel import _document_attention
    from pangu_pi.training.sft_data import block_causal_mask

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 2, False
    q, k, v = torch.randn(2, 4, 24, 8), torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8)
    packed = torch.tensor([list(range(10)) + list(range(14)), list(range(24))])  # row 0: two documents
    got, _ = _document_attention(module, q, k, v, None, scaling=8**-0.5, position_ids=packed)
    want, _ = sdpa_attention_forward(module, q, k, v, block_causal_mask(packed), scaling=8**-0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    joined, _ = sdpa_attention_forward(module, q, k, v, None, scaling=8**-0.5)  # documents that see each other
    assert (got[0, 10:] - joined[0, 10:]).abs().max() > 1e-3
    single = torch.arange(24).expand(2, 24)  # one document per row: the causal path, no mask
    got, _ = _document_attention(module, q, k, v, None, scaling=8**-0.5, position_ids=single)
    torch.testing.assert_close(got, joined, rtol=0, atol=1e-6)


def test_tiled_ffn_and_shortcut_give_the_plain_loss_and_gradients():
    import torch

    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.training.tiled_compute import tile_token_wise_modules

    config = PanGuPiConfig.from_preset("tiny", vocab_size=256, hidden_size=32, intermediate_size=88,
                                       num_hidden_layers=2, siaf_backend="reference")
    torch.manual_seed(0)
    plain = PanGuPiForCausalLM(config)
    for module in plain.modules():  # a trained-looking shortcut (W2 starts at zero)
        if hasattr(module, "expand"):
            torch.nn.init.normal_(module.expand.weight, std=0.05)
    tiled = PanGuPiForCausalLM(config)
    tiled.load_state_dict(plain.state_dict())
    assert tile_token_wise_modules(tiled) == 2 * (1 + config.shortcut_count)
    ids = torch.randint(0, 256, (2, 129), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (plain, tiled):
        loss = model(input_ids=ids[:, :-1], shift_labels=ids[:, 1:]).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for (name, a), b in zip(plain.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_launcher_refuses_a_process_count_sequence_parallel_cannot_split(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "data": {"seq_len": 32},
                                      "train": {"max_steps": 1, "sequence_parallel": 2}}))
    proc = subprocess.run([*PANGU_PI, "pretrain", "--config", str(config), "--out", str(tmp_path / "run"),
                           "--nproc", "3", "--no-progress"], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "train.sequence_parallel 2 does not divide the 3 processes" in errors[0], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_dpo_split_over_two_ranks_reproduces_the_losses(sft_inputs, tmp_path):
    base, _ = sft_inputs
    rng = random.Random(1)
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for _ in range(48):
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                                "chosen": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
                                "rejected": [{"role": "assistant", "content": rng.choice(["No idea.", "Ask else."])}]})
                    + "\n")

    def config(sp: int) -> dict:
        # Right-padded pairs of odd widths (padded again to a multiple of 2 under SP); the
        # reference log-probs computed once by the starting model, on whole sequences.
        return {"model": {"init_from": str(base)},
                "data": {"datasets": [{"path": str(pairs), "weight": 1.0}], "seq_len": 64},
                "train": {"max_steps": 6, "precision": "fp32", "sequence_parallel": sp},
                "batch": {"global_batch_size": 4, "micro_batch_size": 2},
                "optim": {"lr": 2e-3}, "schedule": {"warmup_steps": 0, "kind": "constant"},
                "finetune": {"mode": "dpo", "dpo": {"beta": 0.1}}, "eval": {"every": 0},
                "checkpoint": {"save_every": 100}, "log": {"tensorboard": False, "plot": False}}

    _split_matches_unsplit("finetune", config, tmp_path, 6)
