"""GRPO (`finetune.mode: grpo`) on the training core: config and input refusals before compute,
malformed prompts counted per reason, a failing reward counted and the run going on, a short run
raising the held-out mean reward of an arithmetic task, and exact resume after SIGKILL.

The model is the tiny preset, first taught the answer format (one number, then the end of the turn)
by a few plain-torch SFT steps whose answers are random numbers from 2 to 6: a policy that samples
the right sum about a fifth of the time. Every prompt asks for a sum that is 5 (other pairs and
phrasings in the held-out prompts): a model this small does not learn addition in a CI-sized run,
but it does learn, from `numeric_answer`'s reward alone, to give the answer these sums share, which
is what the learning test checks. The run counts prompts: `batch.global_batch_size` prompts × G
completions a step."""

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

from pangu_pi.config import ConfigError
from pangu_pi.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
PANGU_PI = [sys.executable, "-c", "import sys; from pangu_pi.cli import main; sys.exit(main())"]
TEMPLATES = ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "{a} plus {b} makes?",
             "Sum of {a} and {b}?", "{a} + {b} = ?"]
MALFORMED = [
    ('{"answer": 3}', "no_prompt"),
    ('{"prompt": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}], "answer": 4}',
     "prompt_ends_with_answer"),
    ('{"prompt": [{"role": "wizard", "content": "hi"}]}', "unknown_role"),
    ('{"prompt": "' + "word " * 300 + '", "answer": 1}', "too_long"),
    ('{"prompt": [ not json', "bad_json"),
]


def arithmetic_prompts() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": t.format(a=a, b=b)}], "answer": a + b}
            for t in TEMPLATES for a in range(6) for b in (5 - a,)]


def warm_start(tokenizer_dir: Path, dest: Path, steps: int = 60, right: float = 0.0, seed: int = 0) -> None:
    """A tiny model that answers these prompts with one number in 2..6 and stops: the right sum with
    probability `right`, else a random one (plain torch, no trainer: this only sets the start)."""
    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.tokenizer import load_tokenizer
    from pangu_pi.training.sft_data import render_example

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    model = PanGuPiForCausalLM(PanGuPiConfig.from_preset("tiny", vocab_size=len(tokenizer), siaf_backend="reference"))
    rng = random.Random(seed)
    records = arithmetic_prompts()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = []
        for _ in range(16):
            r = rng.choice(records)
            answer = r["answer"] if rng.random() < right else rng.randint(2, 6)
            batch.append(render_example(tokenizer, r["prompt"] + [{"role": "assistant", "content": str(answer)}]))
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for i, e in enumerate(batch):
            ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[i, :len(e.labels)] = torch.tensor(e.labels)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


@pytest.fixture(scope="module")
def work(tokenizer_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("grpo")
    warm_start(tokenizer_dir, work / "base")
    lines = [json.dumps(r) for r in arithmetic_prompts()]
    for i, (bad, _) in enumerate(MALFORMED):
        lines.insert(2 + 4 * i, bad)
    (work / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return work


def _config(work: Path, out: Path, *, steps: int = 4, **grpo) -> dict:
    return {
        "model": {"init_from": str(work / "base")},
        "out": str(out),
        "data": {"datasets": [str(work / "prompts.jsonl")], "seq_len": 64, "val_fraction": 0.25},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "optim": {"lr": 1e-3},
        "schedule": {"warmup_steps": 0, "kind": "constant"},
        "train": {"max_steps": steps},
        "eval": {"every": 0},
        "finetune": {"mode": "grpo", "grpo": {"num_generations": 8, "max_completion_length": 6,
                                              "rewards": [{"function": "numeric_answer"}], **grpo}},
        "log": {"tensorboard": False},
    }


def _rows(out: Path) -> list[dict]:
    from pangu_pi.training.metrics import read_metrics

    return read_metrics(out / "metrics.jsonl")


def _run(config: dict) -> dict:
    from pangu_pi.training.finetune import finetune

    return finetune(config, progress=False)


# ------------------------------------------------------------------------------------------------
# Refused before compute


def test_grpo_config_keys_are_checked_with_one_line_each(tmp_path):
    from pangu_pi.training.config import build_config

    values = _config(Path("/nonexistent"), tmp_path / "x")
    values["model"] = {"preset": "tiny", "init_from": str(tmp_path)}
    kw = dict(recipe="finetune", check_paths=False)
    config = build_config(values, **kw)
    assert config.finetune.mode == "grpo" and config.finetune.grpo.num_generations == 8
    assert not config.finetune.uses_lora
    for override, message in [
        ("finetune.grpo.num_generations=1", "num_generations (G) must be at least 2"),
        ("finetune.grpo.loss_type=ppo", "loss_type must be grpo, dr_grpo, dapo"),
        ("finetune.grpo.beta=-1", "beta must be >= 0"),
        ("finetune.grpo.epsilon=0", "epsilon must be in"),
        ("finetune.grpo.num_iterations=0", "num_iterations must be at least 1"),
        ("finetune.grpo.top_p=0", "top_p must be in"),
        ("finetune.grpo.max_completion_length=64", "below data.seq_len"),
        ("finetune.grpo.generator=sglang", "generator must be hf or vllm"),
        ("finetune.grpo.rewards=[]", "rewards is empty"),
        ("train.zero_stage=3", "use train.zero_stage 1 or 2"),
        ("finetune.grpo.num_generation=4", "did you mean 'finetune.grpo.num_generations'"),
    ]:
        with pytest.raises(ConfigError, match=override.split("=")[0] if "did you" not in message else "num_gen") as err:
            build_config(values, [override], **kw)
        assert message in str(err.value) and "\n" not in str(err.value), override
    # LoRA when the config sets finetune.lora and says nothing of grpo.lora.
    values["finetune"]["lora"] = {"r": 4}
    assert build_config(values, **kw).finetune.uses_lora


def _no_model_built(monkeypatch):
    from pangu_pi import PanGuPiForCausalLM

    built = []
    original = PanGuPiForCausalLM.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(PanGuPiForCausalLM, "__init__", counting)
    return built


def test_a_prompt_file_without_prompts_and_an_unimportable_reward_are_refused_before_compute(work, tmp_path,
                                                                                              monkeypatch):
    built = _no_model_built(monkeypatch)
    empty = tmp_path / "none.jsonl"
    empty.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"answer": 2}\n')
    config = _config(work, tmp_path / "a")
    config["data"]["datasets"] = [str(empty)]
    with pytest.raises(UserError, match="no usable prompts") as err:
        _run(config)
    assert "no_prompt: 2" in str(err.value) and "\n" not in str(err.value)
    config = _config(work, tmp_path / "b", rewards=[{"function": "no_such_rewards_module:score"}])
    with pytest.raises(UserError, match="cannot import module 'no_such_rewards_module'") as err:
        _run(config)
    assert "\n" not in str(err.value)
    assert built == []  # neither run built a model
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


def test_prompt_records_render_with_the_chat_template_and_malformed_ones_are_counted(work):
    from pangu_pi.tokenizer import load_tokenizer
    from pangu_pi.training.prompt_data import PromptDataset

    tokenizer = load_tokenizer(work / "base")
    data = PromptDataset([str(work / "prompts.jsonl")], tokenizer, 64 - 6)
    assert len(data) == 36
    assert dict(data.records.malformed) == {reason: 1 for _, reason in MALFORMED}
    text = tokenizer.decode(data[0].prompt_ids)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert isinstance(data[0].fields["answer"], int)


def test_the_yunshan_demo_grpo_prompts_score_the_rules_answer_1_and_a_wrong_one_0(tmp_path, tokenizer_dir):
    """The demo's GRPO stage: its prompts (from the training cases) load with no malformed record, and
    the rewards of configs/yunshan_grpo_tiny.yaml give the rule's answer full marks (nearer the right
    answer: 1, plus the exact figure: 1 for the numeric families) and the pair's wrong one 0."""
    from domain_demo import generate  # tools/
    from yunshan_demo import NUMERIC_FAMILIES, grpo_prompts

    from pangu_pi.tokenizer import load_tokenizer
    from pangu_pi.training.config import load_config
    from pangu_pi.training.prompt_data import PromptDataset
    from pangu_pi.training.rewards import resolve_rewards, score

    generate(tmp_path / "demo", seed=3, train=90, heldout=18, text_lines=30)
    path = grpo_prompts(tmp_path / "demo", seed=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 90 and all({"prompt", "chosen", "rejected"} <= set(r) for r in records)
    assert {r["family"] for r in records if "answer" in r} == NUMERIC_FAMILIES
    data = PromptDataset([str(path)], load_tokenizer(tokenizer_dir), 256)
    assert len(data) == 90 and not data.records.malformed
    config = load_config(ROOT / "configs" / "yunshan_grpo_tiny.yaml", recipe="finetune", check_paths=False)
    rewards = resolve_rewards(config.finetune.grpo.rewards)
    fields = {k: [r.get(k) for r in records] for k in ("answer", "chosen", "rejected")}
    as_chat = lambda texts: [[{"role": "assistant", "content": t}] for t in texts]  # noqa: E731
    prompts = [r["prompt"] for r in records]
    _, good, _ = score(rewards, prompts, as_chat(fields["chosen"]), [[1]] * 90, fields, list(range(90)))
    _, bad, _ = score(rewards, prompts, as_chat(fields["rejected"]), [[1]] * 90, fields, list(range(90)))
    assert good == [2.0 if "answer" in r else 1.0 for r in records]
    assert sum(bad) <= 0.1 * 90  # a wrong answer of a numeric family can end with the right figure only by chance


def test_the_prompt_stream_gives_a_step_the_same_prompts_on_any_process_count_and_resumes():
    """A step takes the same global positions (hence prompts and sampling seeds) whether one process
    runs its micro-batches or two share them; the position survives a change of accumulation steps;
    rollouts saved mid-cycle refuse another process count."""
    from pangu_pi.training.recipes.grpo import PromptStream, Rollout

    rows = list(range(20))
    one = PromptStream(None, rows, seed=5, accum=2, iterations=1, world=1)
    two = [PromptStream(None, rows, seed=5, accum=1, iterations=1, world=2) for _ in range(2)]
    for _ in range(3):  # three optimizer steps of 4 prompts
        plan = one.next_batch(2, 0, 1)["prompts"]
        assert one.next_batch(2, 0, 1) == {"micro": 1}
        shared = [two[r].next_batch(2, r, 2)["prompts"][0] for r in range(2)]
        assert sorted(sum(plan, [])) == sorted(sum(shared, []))
    assert one.samples_consumed == two[0].samples_consumed == 12
    moved = PromptStream(None, rows, seed=5, accum=1, iterations=1, world=2)
    moved.load_state_dict(one.state_dict())
    assert moved.samples_consumed == 12 and moved.calls == 3
    cycle = PromptStream(None, rows, seed=5, accum=1, iterations=2, world=1)
    cycle.next_batch(4, 0, 1)
    cycle.buffer = [Rollout(*(torch.zeros(2, 3) for _ in range(5)))]
    state = cycle.state_dict()
    assert len(state["buffer"]) == 1  # mid-cycle: the completions travel with the checkpoint
    with pytest.raises(UserError, match="resume on 1 processes, or from a checkpoint at a step that is a multiple"):
        PromptStream(None, rows, seed=5, accum=1, iterations=2, world=2).load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# Runs


def test_a_failing_reward_is_reported_counted_and_left_out_and_the_run_goes_on(work, tmp_path, monkeypatch, capfd):
    (tmp_path / "flaky_rewards.py").write_text(
        "def flaky(prompts, completions, **kw):\n"
        "    if any('plus' in p[-1]['content'] for p in prompts):\n"
        "        raise ValueError('cannot score a plus')\n"
        "    return [0.0 for _ in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    summary = _run(_config(work, out, steps=2, rewards=[{"function": "numeric_answer"},
                                                         {"function": "flaky_rewards:flaky", "weight": 0.5}]))
    err = capfd.readouterr().err
    rows = [r for r in _rows(out) if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2]
    failed = summary["grpo"]["reward_errors"]
    assert failed > 0 and failed % 8 == 0  # every completion of a prompt that says "plus"
    assert err.count("reward 'flaky' failed on prompt") == failed and "ValueError: cannot score a plus" in err
    assert sum(r["reward_error_fraction"] for r in rows) > 0
    assert summary["records"]["malformed"] == {reason: 1 for _, reason in MALFORMED}
    # A NaN-scored group has no mean to compare with: counted neither as signal nor as zero spread.
    assert all(0 <= r["zero_std_fraction"] <= 1 for r in rows)


def test_metrics_of_every_step_and_the_full_reference_cost(work, tmp_path):
    out = tmp_path / "run"
    summary = _run(_config(work, out, steps=2, beta=0.04, num_iterations=2, loss_type="grpo"))
    rows = [r for r in _rows(out) if "loss" in r]
    for key in ("reward", "reward_std", "reward_numeric_answer", "reward_numeric_answer_std", "completion_length",
                "truncated_fraction", "zero_std_fraction", "clip_fraction", "kl", "reward_error_fraction"):
        assert all(key in r for r in rows), key
    # First step: policy = reference = sampler, so KL and clipping are 0; the second reuses the
    # completions after one update: the ratio and the KL move away from 1 and 0.
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-6) and rows[0]["clip_fraction"] == 0
    assert rows[1]["kl"] > 0
    assert summary["grpo"]["reference_bytes"] == 4 * summary["trainable_parameters"]  # fp32, every weight
    assert "frozen copy of the starting model" in summary["grpo"]["reference"]
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "loss_curves.png").stat().st_size > 0  # loss, and the mean reward in the second panel


def test_lora_takes_its_reference_from_the_adapters_switched_off(work, tmp_path, monkeypatch):
    built = _no_model_built(monkeypatch)
    out = tmp_path / "run"
    config = _config(work, out, steps=2, beta=0.1, num_iterations=2, loss_type="dr_grpo")
    config["finetune"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    summary = _run(config)
    rows = [r for r in _rows(out) if "loss" in r]
    assert built == [1]  # one model: no frozen copy
    assert summary["grpo"]["reference"] == "the model with its adapters disabled"
    assert summary["grpo"]["weights"] == "lora" and summary["grpo"]["reference_bytes"] == 0
    # Adapters start at zero (B = 0): the policy is the reference at step 1, not after an update.
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-7) and rows[1]["kl"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_short_grpo_run_raises_the_heldout_mean_reward(work, tmp_path):
    out = tmp_path / "run"
    config = _config(work, out, steps=12)
    config["eval"]["every"] = 6
    summary = _run(config)
    start = _run_eval_only(work, tmp_path / "start")
    val = [r for r in _rows(out) if "val_reward" in r]
    assert [r["step"] for r in val] == [6, 12]
    # Measured (seed 0): held-out 0.19 at the start (about a fifth of random answers 2..6 are right),
    # 0.79 after 6 steps, 0.96 after 12; the training batches' reward 0.31 → 0.94. About 10 s on 1 core.
    assert start < 0.45 and val[-1]["val_reward"] >= start + 0.4, (start, val)
    train = [r["reward"] for r in _rows(out) if "reward" in r]
    assert sum(train[-3:]) / 3 > sum(train[:3]) / 3 + 0.3, train
    assert summary["val_reward"] == val[-1]["val_reward"]


def _run_eval_only(work: Path, out: Path) -> float:
    """The starting model's held-out mean reward: the same evaluation after a step at learning rate ~0."""
    config = _config(work, out, steps=1)
    config["optim"]["lr"] = 1e-12
    config["eval"]["every"] = 1
    return _run(config)["val_reward"]


def _subprocess_run(work: Path, out: Path, *, env: dict | None = None, extra: tuple = (), **grpo) -> int:
    config = _config(work, out, steps=6, **grpo)
    config["batch"] = {"global_batch_size": 4, "micro_batch_size": 2}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [*PANGU_PI, "finetune", "--config", str(path), "--out", str(out), "--save-every", "3", "--no-progress",
           *extra]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(out.parent / f"{out.name}.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, timeout=600,
                              start_new_session=True)
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("iterations,resume_procs", [(2, 1), (1, 2)], ids=["mid-cycle", "full-1to2"])
def test_grpo_killed_and_resumed_reproduces_losses_and_rewards(work, tmp_path, iterations, resume_procs):
    """SIGKILL after step 4; the newest checkpoint is step 3, then --resume auto. With 2 iterations
    that checkpoint is half-way through a cycle (each process's completions are saved with it); same
    process count: losses, rewards and KL equal the uninterrupted run's within 1e-6. Full weights
    written by 1 process resume on 2 (DeepSpeed's universal checkpoint; completions are seeded by
    data position, so the same ones are drawn): within float reduction order, 1e-4."""
    grpo = dict(num_iterations=iterations, beta=0.04, loss_type="dapo")
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert _subprocess_run(work, ref, **grpo) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    code = _subprocess_run(work, out, env={"PANGU_PI_TEST_KILL_AFTER_STEP": "4"}, **grpo)
    assert code == -signal.SIGKILL
    extra = ("--resume", "auto") + (("--nproc", str(resume_procs)) if resume_procs > 1 else ())
    code = _subprocess_run(work, out, extra=extra, **grpo)
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]
    log = (tmp_path / "run.log").read_text()
    assert "resumed from" in log and "(step 3)" in log
    if resume_procs > 1:
        assert "written by 1 processes" in log
    tolerance = 1e-6 if resume_procs == 1 else 1e-4
    want = {r["step"]: r for r in _rows(ref) if "loss" in r}
    got = {r["step"]: r for r in _rows(out) if "loss" in r}
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        for key in ("loss", "reward", "kl", "clip_fraction", "completion_length"):
            assert abs(got[step][key] - want[step][key]) <= tolerance, (step, key, got[step][key], want[step][key])
    assert any(abs(r["loss"]) > 1e-4 for r in want.values())  # the losses compared are not all 0
