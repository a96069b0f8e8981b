"""Preference tuning (`finetune.mode: dpo`) on the training core: the loss against an independent
float64 computation, the starting point (loss log 2, zero margins), LoRA without a second model,
malformed pairs counted, a short run raising held-out preference accuracy, and exact resume.

The loss is checked twice on fixed logits: against a float64 computation written in this file, term
by term from the DPO and IPO papers, and against TRL's own `DPOTrainer` loss code (TRL installs
beside the project's pins as a test dependency), called on the same per-token log-probabilities with
a stand-in for the parts of a trainer it reads (accelerator gathers of one process). What the TRL
check does not cover is the log-probabilities themselves: TRL computes them in its fused LM head,
which needs a model TRL wraps; the float64 check covers ours."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pangu_pi.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PANGU_PI = [sys.executable, "-c", "import sys; from pangu_pi.cli import main; sys.exit(main())"]
REFUSALS = ["I cannot say.", "No idea, sorry.", "Ask someone else.", "That is not something I know."]


def _pairs(n: int, seed: int) -> list[dict]:
    """Sums answered (chosen) against refusals (rejected): a preference a tiny model can pick up."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        out.append({"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                    "chosen": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
                    "rejected": [{"role": "assistant", "content": rng.choice(REFUSALS)}]})
    return out


MALFORMED = [
    ('{"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}',
     "no_prompt"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "same"}], '
     '"rejected": [{"role": "assistant", "content": "same"}]}', "identical_answers"),
    ('{"prompt": [{"role": "user", "content": "' + "word " * 300 + '"}], "chosen": "yes", "rejected": "no"}',
     "too_long"),
    ('{"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}]}', "no_answer"),
    ('{"prompt": [ not json', "bad_json"),
]


@pytest.fixture(scope="module")
def work(tokenizer_dir, tmp_path_factory) -> Path:
    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = PanGuPiConfig.from_preset("tiny", vocab_size=len(tokenizer), siaf_backend="reference")
    work = tmp_path_factory.mktemp("dpo")
    PanGuPiForCausalLM(config).save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    lines = [json.dumps(p) for p in _pairs(96, seed=1)]
    for i, (bad, _) in enumerate(MALFORMED):
        lines.insert(3 + 5 * i, bad)
    (work / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return work


def _config(work: Path, out: Path, *, lora: bool = False, steps: int = 6, **extra) -> dict:
    config = {
        "model": {"init_from": str(work / "base")},
        "out": str(out),
        "data": {"datasets": [{"path": str(work / "pairs.jsonl"), "weight": 1.0}], "seq_len": 64, "val_fraction": 0.2},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "optim": {"lr": 2e-3},
        "schedule": {"warmup_steps": 0, "kind": "constant"},
        "train": {"max_steps": steps},
        "eval": {"every": steps},
        "finetune": {"mode": "dpo", "dpo": {"beta": 0.1, "lora": lora}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "log": {"tensorboard": False},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def _rows(out: Path) -> list[dict]:
    from pangu_pi.training.metrics import read_metrics

    return read_metrics(out / "metrics.jsonl")


# ------------------------------------------------------------------------------------------------
# The loss, on fixed logits


def _float64_dpo(logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor, beta: float,
                 loss_type: str, smoothing: float) -> dict:
    """DPO/IPO from the papers' definitions, in Python floats (float64), one pair at a time."""

    def logp(row_logits, row_labels, average):
        total, count = 0.0, 0
        for t in range(1, len(row_labels)):
            if row_labels[t] == -100:
                continue
            z = [float(x) for x in row_logits[t - 1]]
            top = max(z)
            lse = top + math.log(sum(math.exp(x - top) for x in z))
            total += z[int(row_labels[t])] - lse
            count += 1
        return total / count if average else total

    n = logits.shape[0] // 2
    losses, chosen_r, rejected_r, wins = [], [], [], []
    average = loss_type == "ipo"
    for i in range(n):
        pc, pr = logp(logits[i], labels[i], average), logp(logits[n + i], labels[n + i], average)
        rc, rr = logp(ref_logits[i], labels[i], average), logp(ref_logits[n + i], labels[n + i], average)
        h = (pc - pr) - (rc - rr)
        if loss_type == "sigmoid":
            log_sig = lambda x: -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))  # noqa: E731
            losses.append(-(1 - smoothing) * log_sig(beta * h) - smoothing * log_sig(-beta * h))
        else:
            losses.append((h - 1 / (2 * beta)) ** 2)
        chosen_r.append(beta * (pc - rc))
        rejected_r.append(beta * (pr - rr))
        wins.append(1.0 if chosen_r[-1] > rejected_r[-1] else 0.5 if chosen_r[-1] == rejected_r[-1] else 0.0)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"loss": mean(losses), "rewards_chosen": mean(chosen_r), "rewards_rejected": mean(rejected_r),
            "margin": mean([c - r for c, r in zip(chosen_r, rejected_r)]), "accuracy": mean(wins)}


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_loss_rewards_and_accuracy_match_an_independent_float64_computation(loss_type, smoothing):
    from pangu_pi.training.recipes.dpo import dpo_loss, sequence_logps

    g = torch.Generator().manual_seed(3)
    pairs, T, V = 5, 9, 13
    logits = torch.randn(2 * pairs, T, V, generator=g) * 3
    ref_logits = logits + torch.randn(2 * pairs, T, V, generator=g)
    labels = torch.randint(0, V, (2 * pairs, T), generator=g)
    labels[:, :3] = -100  # the prompt
    labels[1, 6:] = -100  # a shorter answer, right-padded
    labels[7, 5:] = -100

    sums, counts = sequence_logps(logits, labels)
    ref_sums, ref_counts = sequence_logps(ref_logits, labels)
    sums, ref_sums = sums.double(), ref_sums.double()
    if loss_type == "ipo":
        sums, ref_sums = sums / counts, ref_sums / ref_counts
    loss, m = dpo_loss(*sums.chunk(2), *ref_sums.chunk(2), beta=0.25, loss_type=loss_type, label_smoothing=smoothing)

    want = _float64_dpo(logits, labels, ref_logits, 0.25, loss_type, smoothing)
    assert loss.item() == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
    for key in ("rewards_chosen", "rewards_rejected", "margin", "accuracy"):
        assert m[key].mean().item() == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert 0 < want["accuracy"] < 1  # the fixed batch has pairs on both sides


def _trl_loss(per_token, ref_logps, completion_mask, beta: float, loss_type: str) -> tuple[float, dict]:
    """TRL's DPOTrainer._compute_loss on given per-token log-probs (policy) and summed reference log-probs."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DPOTrainer

    rows, width = per_token.shape
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(rows, width),
                              mean_logits=torch.zeros(rows, width), is_top1=torch.zeros(rows, width, dtype=torch.bool))
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                           use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
                           _tp_size=1, args=SimpleNamespace())
    n = rows // 2
    inputs = {"input_ids": torch.zeros(rows, width + 1, dtype=torch.long),
              "attention_mask": torch.ones(rows, width + 1, dtype=torch.long),
              "completion_mask": torch.cat([torch.zeros(rows, 1, dtype=torch.long), completion_mask], dim=1),
              "ref_chosen_logps": ref_logps[:n], "ref_rejected_logps": ref_logps[n:]}
    loss = DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in fake._metrics["train"].items()}
    return float(loss), metrics


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_rewards_equal_trls_dpo_trainer_on_the_same_batch(loss_type):
    from pangu_pi.training.recipes.dpo import dpo_loss, sequence_logps

    g = torch.Generator().manual_seed(11)
    pairs, T, V = 6, 10, 17
    logits = torch.randn(2 * pairs, T, V, generator=g, dtype=torch.float64) * 2
    ref_logits = logits + torch.randn(2 * pairs, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2 * pairs, T), generator=g)
    labels[:, :4] = -100
    labels[2, 7:] = -100
    sums, counts = sequence_logps(logits, labels)
    ref_sums, ref_counts = sequence_logps(ref_logits, labels)
    # TRL's inputs: per-token log-probs of the policy (0 off the completion) and the completion mask.
    targets = labels[:, 1:]
    mask = (targets != -100).long()
    per_token = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
    trl_loss, trl = _trl_loss(per_token, ref_sums, mask, beta=0.3, loss_type=loss_type)

    sums, ref_sums = sums.double(), ref_sums.double()
    if loss_type == "ipo":
        sums, ref_sums = sums / counts, ref_sums / ref_counts
    loss, m = dpo_loss(*sums.chunk(2), *ref_sums.chunk(2), beta=0.3, loss_type=loss_type)
    assert loss.item() == pytest.approx(trl_loss, rel=1e-6)
    if loss_type == "sigmoid":  # TRL logs rewards from summed log-ratios; IPO's are per-token averages here
        assert m["rewards_chosen"].mean().item() == pytest.approx(trl["rewards/chosen"], rel=1e-6)
        assert m["rewards_rejected"].mean().item() == pytest.approx(trl["rewards/rejected"], rel=1e-6)
        assert m["margin"].mean().item() == pytest.approx(trl["rewards/margins"], rel=1e-6)
        assert m["accuracy"].mean().item() == pytest.approx(trl["rewards/accuracies"], rel=1e-6)


def test_policy_equal_to_reference_gives_log2_and_zero_margins():
    from pangu_pi.training.recipes.dpo import dpo_loss

    logps = torch.tensor([-12.0, -3.5, -40.0], dtype=torch.float64)
    loss, m = dpo_loss(logps, logps - 2, logps, logps - 2, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert torch.all(m["margin"] == 0) and torch.all(m["accuracy"] == 0.5)


# ------------------------------------------------------------------------------------------------
# Data and config


def test_preference_records_render_with_the_chat_template_and_malformed_ones_are_counted(work, tokenizer_dir):
    from pangu_pi.tokenizer import load_tokenizer
    from pangu_pi.training.preference_data import PreferenceDataset

    tokenizer = load_tokenizer(work / "base")
    data = PreferenceDataset([str(work / "pairs.jsonl")], tokenizer, 64)
    assert len(data) == 96
    assert dict(data.records.malformed) == {reason: 1 for _, reason in MALFORMED}
    item = data[0]
    # The same prompt on both sides; only the answer (and its end-of-turn token) carries loss.
    chosen = tokenizer.decode([t for t, lab in zip(item["chosen_ids"], item["chosen_labels"]) if lab != -100])
    prompt_len = next(i for i, lab in enumerate(item["chosen_labels"]) if lab != -100)
    assert item["chosen_ids"][:prompt_len] == item["rejected_ids"][:prompt_len]
    assert "plus" in chosen and "<|im_end|>" in chosen and "What is" not in chosen
    text = tokenizer.decode(item["chosen_ids"])
    assert text.startswith("<|im_start|>user") and "<|im_start|>assistant" in text


def test_dpo_config_keys_are_checked_before_any_compute(work, tmp_path):
    from pangu_pi.training.config import build_config

    values = _config(work, tmp_path / "x")
    config = build_config(values, recipe="finetune")
    assert config.finetune.mode == "dpo" and config.finetune.dpo.beta == 0.1
    with pytest.raises(ConfigError, match="finetune.dpo.beta"):
        build_config(values, ["finetune.dpo.beta=0"], recipe="finetune")
    with pytest.raises(ConfigError, match="finetune.dpo.loss_type"):
        build_config(values, ["finetune.dpo.loss_type=hinge"], recipe="finetune")
    with pytest.raises(ConfigError, match="did you mean 'finetune.dpo.beta'"):
        build_config(values, ["finetune.dpo.betta=0.2"], recipe="finetune")
    with pytest.raises(ConfigError, match="finetune.dpo.lora=true"):
        build_config(values, ["finetune.mode=dpo_lora"], recipe="finetune")
    # LoRA when the config sets finetune.lora and says nothing of dpo.lora; full weights otherwise.
    del values["finetune"]["dpo"]["lora"]
    assert build_config(values, recipe="finetune").finetune.uses_lora
    del values["finetune"]["lora"]
    assert not build_config(values, recipe="finetune").finetune.uses_lora


# ------------------------------------------------------------------------------------------------
# Runs


def _run_in_process(config: dict) -> dict:
    from pangu_pi.training.finetune import finetune

    return finetune(config, progress=False)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_first_step_starts_at_log2_and_lora_holds_one_model(work, tmp_path, monkeypatch, lora):
    from pangu_pi import PanGuPiForCausalLM

    built = []
    original = PanGuPiForCausalLM.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(PanGuPiForCausalLM, "__init__", counting_init)
    from pangu_pi.training.recipes.dpo import PreferenceTuning

    while_training = []
    original_finish = PreferenceTuning.finish

    def finish(self, *args, **kwargs):
        while_training.append(len(built))  # models built before the outputs are written
        return original_finish(self, *args, **kwargs)

    monkeypatch.setattr(PreferenceTuning, "finish", finish)
    out = tmp_path / "run"
    summary = _run_in_process(_config(work, out, lora=lora, steps=1, eval__every=0))
    first = _rows(out)[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first["margin"]) < 1e-5 and abs(first["rewards_chosen"]) < 1e-5
    assert first["accuracy"] == pytest.approx(0.5, abs=0.2)
    # One model in memory while training: no frozen copy for the reference.
    assert while_training == [1]
    if lora:
        # The reference is the same weights with the adapters off.
        base_params = sum(p.numel() for p in built[0].parameters() if not p.requires_grad)
        assert summary["trainable_parameters"] < 0.2 * base_params
        assert not (out / "dpo_reference.pt").exists()
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert summary["dpo"]["reference"] == "the model with its adapters disabled"
    else:
        # Full weights: the reference is stored with the run (4 float64 per pair), not a second model.
        stored = torch.load(out / "dpo_reference.pt", weights_only=True)
        assert stored["logps"].shape == (summary["dpo"]["pairs"], 4)
        assert (out / "checkpoints" / "step_1" / "dpo_reference.pt").is_file()
        assert (out / "model" / "model.safetensors").is_file()


def test_short_dpo_run_raises_heldout_preference_accuracy_and_margin(work, tmp_path):
    out = tmp_path / "run"
    summary = _run_in_process(_config(work, out, lora=False, steps=24, eval__every=12))
    val = [r for r in _rows(out) if "val_loss" in r]
    assert [r["step"] for r in val] == [12, 24]
    # The starting model's held-out accuracy is 0.5 (every reward 0, a tie counts half), its margin 0.
    assert val[-1]["val_accuracy"] >= 0.9, val
    assert val[-1]["val_margin"] > 1.0, val
    assert val[-1]["val_loss"] < 0.5 * math.log(2), val
    steps = [r for r in _rows(out) if "margin" in r]
    assert steps[-1]["margin"] > steps[0]["margin"] + 1.0
    assert summary["val_accuracy"] == val[-1]["val_accuracy"]
    assert (out / "loss_curves.png").stat().st_size > 0
    assert summary["records"]["malformed"]["identical_answers"] == 1


def _subprocess_run(work: Path, out: Path, *, lora: bool, env: dict | None = None, extra: tuple = ()) -> int:
    config = _config(work, out, lora=lora, steps=6, eval__every=0)
    config["batch"] = {"global_batch_size": 4, "micro_batch_size": 2}
    config["finetune"]["lora"]["dropout"] = 0.1  # the RNG state must resume too
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [*PANGU_PI, "finetune", "--config", str(path), "--out", str(out), "--save-every", "2", "--no-progress",
           *extra]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", **(env or {})}
    with open(out.parent / f"{out.name}.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, timeout=400,
                              start_new_session=True)
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("lora,resume_procs", [(False, 2), (True, 1)], ids=["full-1to2", "lora"])
def test_dpo_killed_and_resumed_reproduces_the_losses(work, tmp_path, lora, resume_procs):
    """SIGKILL after step 3 (newest checkpoint: step 2), then --resume auto. Full weights resume on 2
    processes where 1 wrote the checkpoint (DeepSpeed's universal checkpoint; the stored reference
    log-probs travel with it): losses within float reduction order. LoRA: same count, exactly."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert _subprocess_run(work, ref, lora=lora) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    code = _subprocess_run(work, out, lora=lora, env={"PANGU_PI_TEST_KILL_AFTER_STEP": "3"})
    assert code == -signal.SIGKILL
    resume = ("--resume", "auto") + (("--nproc", str(resume_procs)) if resume_procs > 1 else ())
    assert _subprocess_run(work, out, lora=lora, extra=resume) == 0, (tmp_path / "run.log").read_text()[-3000:]
    log = (tmp_path / "run.log").read_text()
    assert "resumed from" in log and "(step 2)" in log
    if resume_procs > 1:
        assert "written by 1 processes" in log
    tolerance = 1e-6 if resume_procs == 1 else 1e-4
    want = {r["step"]: r for r in _rows(ref) if "loss" in r}
    got = {r["step"]: r for r in _rows(out) if "loss" in r}
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(got[step]["loss"] - want[step]["loss"]) <= tolerance, step
        assert abs(got[step]["margin"] - want[step]["margin"]) <= tolerance, step


def test_the_domain_demo_writes_pairs_of_the_right_answer_against_a_wrong_one_of_its_family(tmp_path, tokenizer_dir):
    from domain_demo import generate  # tools/

    from pangu_pi.tokenizer import load_tokenizer
    from pangu_pi.training.preference_data import PreferenceDataset

    manifest = generate(tmp_path / "demo", seed=2, train=90, heldout=18, text_lines=30)
    records = [json.loads(line) for line in (tmp_path / "demo" / "preference.jsonl").read_text().splitlines()]
    chats = [json.loads(line) for line in (tmp_path / "demo" / "train.jsonl").read_text().splitlines()]
    assert len(records) == manifest["preference_pairs"] == len(chats) == 90
    # The chosen answer is the training case's own; the rejected one differs but comes from its family.
    for pair, chat in zip(records, chats):
        assert pair["family"] == chat["family"]
        assert pair["prompt"][-1]["content"] == chat["messages"][-2]["content"]
        assert pair["chosen"][0]["content"] == chat["messages"][-1]["content"] != pair["rejected"][0]["content"]
    data = PreferenceDataset([str(tmp_path / "demo" / "preference.jsonl")], load_tokenizer(tokenizer_dir), 512)
    assert len(data) == 90 and not data.records.malformed
