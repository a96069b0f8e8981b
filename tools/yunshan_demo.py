"""The YunShan recipe end to end on the tiny model and the generated finance/law set.

    tools/yunshan_demo.sh [--run runs/yunshan_demo]      (or python tools/yunshan_demo.py)

Each stage is the `pangu-pi` command a user would run, and each leaves its result in the run folder,
where a later run finds and reuses it (delete a stage's folder to redo it):

    0. base/, base-hf/           pretrain `tiny` briefly on the embedded corpus, export
    1. demo/                     the seeded domain set (tools/domain_demo.py)
       tokenizer-domain/         `pangu-pi tokenizer extend` with the domain prose
       base-resized/             `pangu-pi resize`: new rows = mean of the old pieces that spell them
    2. data/{domain,general}/    shards with the extended tokenizer: domain prose, general text
       continued/, continued-hf/ continued pretraining from base-resized, domain : general = 1 : 1
    3. general_chat.jsonl        general instructions (what a standard-library function does)
       sft/                      `pangu-pi finetune`: domain instructions mixed with the general ones
    4. dpo/                      `pangu-pi finetune` with finetune.mode: dpo from sft/model, on
                                 demo/preference.jsonl: the right answer against a plausible wrong
                                 one of the same family (configs/yunshan_dpo_tiny.yaml)
    5. grpo/                     `pangu-pi finetune` with finetune.mode: grpo from dpo/model, on
                                 demo/grpo_prompts.jsonl: the training questions, each with the rule's
                                 answer and a plausible wrong one; rewarded when the written answer is
                                 nearer the right one, and when it ends with the right number
                                 (configs/yunshan_grpo_tiny.yaml)
    6. eval/*.json               held-out multiple-choice accuracy (and bits per character on the
                                 held-out domain prose) before (the base) and after each stage;
                                 eval/generated_*.json: the held-out questions answered by generation
                                 after SFT, DPO and GRPO (the nearest of the four choices)
    7. data/long/, long/, long-hf/
                                 the long-context stage: the domain model (continued-hf) extended 4x
                                 with YaRN (128 -> 512 tokens) and pretrained further on long documents
                                 (demo/long.jsonl : general text = 1 : 1, configs/yunshan_long_tiny.yaml,
                                 sequence parallelism over the 2 processes); eval/passkey_*.json:
                                 passkey retrieval at 1x, 2x and 4x the original context, before
                                 (as it was, and with YaRN but no training) and after
    summary.json                 the figures, also printed as a table
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHANCE = 0.25


def _pangu_pi() -> list[str]:
    script = Path(sys.executable).with_name("pangu-pi")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pangu_pi.cli"]


def run(args: list[str], log: Path) -> None:
    """Run a `pangu-pi` command, its output shown and kept in `log`; a failure stops the demo."""
    cmd = _pangu_pi() + args
    shown = args if len(args) <= 40 else [*args[:12], f"... ({len(args) - 14} more)", *args[-2:]]
    print("$ pangu-pi " + " ".join(shown), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        for line in proc.stdout:
            f.write(line)
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
    if proc.wait() != 0:
        raise SystemExit(f"yunshan demo: `pangu-pi {args[0]}` failed (exit {proc.returncode}); see {log}")


def general_chat(out: Path, n: int, seed: int = 0) -> Path:
    """General instructions from the embedded corpus: 'What does NAME do?' answered by the first
    line of its docstring, so the tuned model keeps following plain instructions too."""
    from pangu_pi.corpus import default_corpus_files

    pairs = []
    for path in default_corpus_files():
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                line = doc.strip().split("\n")[0].strip() if doc else ""
                if 20 <= len(line) <= 160:
                    pairs.append((f"{Path(path).stem}.{node.name}", line))
        if len(pairs) >= 20 * n:
            break
    rng = random.Random(seed)
    rng.shuffle(pairs)
    with open(out, "w", encoding="utf-8") as f:
        for name, line in pairs[:n]:
            record = {"messages": [{"role": "user", "content": f"What does the Python function {name} do?"},
                                   {"role": "assistant", "content": line}]}
            f.write(json.dumps(record) + "\n")
    return out


def _done(path: Path, marker: str = "config.json") -> bool:
    return (path / marker).is_file()


def evaluate(model: Path, demo: Path, out: Path, log: Path, limit: int | None) -> dict:
    if not out.is_file():
        args = ["eval", str(model), "--task", str(demo / "heldout_mc.jsonl"), "--chat",
                "--ppl", str(demo / "domain_heldout.txt"), "--out", str(out), "--device", "cpu"]
        run(args + (["--limit", str(limit)] if limit else []), log)
    results = json.loads(out.read_text())
    task = results["tasks"]["heldout_mc"]
    ppl = results["perplexity"]["domain_heldout"]
    return {"acc": task["acc"], "acc_norm": task["acc_norm"], "n": task["n"], "bits_per_char": ppl["bits_per_char"]}


def preference_pairs(demo_dir: Path, seed: int) -> Path:
    """demo/preference.jsonl; a demo folder written before the pairs existed gets them from the same
    seed (the generator is deterministic, so they are built on the same training cases)."""
    path = demo_dir / "preference.jsonl"
    if not path.is_file():
        import shutil
        import tempfile

        from domain_demo import generate  # tools/, beside this script

        manifest = json.loads((demo_dir / "manifest.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            generate(tmp, seed=manifest.get("seed", seed), train=manifest["train"], heldout=manifest["heldout"])
            shutil.copy2(Path(tmp) / "preference.jsonl", path)
    return path


# Families whose rule ends the answer with the figure asked for (an amount, a rate, a year): their
# prompts also carry that number, for the exact-answer reward. (marginal_rate's answer ends with the
# bracket bound, not the rate; the verdict families end with no figure.)
NUMERIC_FAMILIES = {"simple_interest", "compound_interest", "percent_change", "tax_owed", "filing_deadline",
                    "inheritance"}


def grpo_prompts(demo_dir: Path, seed: int, limit: int = 2000) -> Path:
    """demo/grpo_prompts.jsonl from the training cases' preference pairs (the held-out questions stay
    unseen): `{"prompt", "chosen": the rule's answer, "rejected": the pair's plausible wrong one,
    "family"}`, and `"answer": NUMBER` for the numeric families. The rewards (closer_to_chosen,
    numeric_answer) check what the policy writes against them. A file from an earlier layout (two-option
    letter questions, which a model never taught to answer with a letter scores 0 on) is rewritten."""
    from pangu_pi.training.rewards import last_number

    path = demo_dir / "grpo_prompts.jsonl"
    if path.is_file() and '"chosen"' in path.read_text(encoding="utf-8").split("\n", 1)[0]:
        return path
    rows = []
    for line in preference_pairs(demo_dir, seed).read_text(encoding="utf-8").splitlines()[:limit]:
        pair = json.loads(line)
        right, wrong = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        row = {"prompt": pair["prompt"], "chosen": right, "rejected": wrong, "family": pair["family"]}
        if pair["family"] in NUMERIC_FAMILIES:
            row["answer"] = last_number(right)
        rows.append(row)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


def nearest_choice(text: str, choices: list[str]) -> int:
    """The choice a written answer is nearest to: by last number where the choices all end in different
    numbers, else by character similarity (the closer_to_chosen reward's rule, over all the choices)."""
    from difflib import SequenceMatcher

    from pangu_pi.training.rewards import last_number

    numbers = [last_number(c) for c in choices]
    got = last_number(text)
    if None not in numbers and len(set(numbers)) == len(numbers) and got is not None:
        return min(range(len(choices)), key=lambda i: abs(got - numbers[i]))
    return max(range(len(choices)), key=lambda i: SequenceMatcher(None, text, choices[i], autojunk=False).ratio())


def generative_accuracy(model: Path, demo_dir: Path, out: Path, limit: int, max_new_tokens: int = 96) -> dict:
    """Held-out accuracy of what the model writes (what GRPO trains): its greedy answer to each held-out
    question (a user turn) is right when it is nearer the right choice than every distractor, and
    `exact` when it ends with the right number (numeric families)."""
    if out.is_file():
        return json.loads(out.read_text())
    import math

    import torch
    from transformers import AutoModelForCausalLM

    import pangu_pi  # noqa: F401  (registers the model)
    from pangu_pi.tokenizer import load_tokenizer
    from pangu_pi.training.rewards import last_number

    tok = load_tokenizer(model)
    net = AutoModelForCausalLM.from_pretrained(model).eval()
    items = [json.loads(x) for x in (demo_dir / "heldout_mc.jsonl").read_text(encoding="utf-8").splitlines()][:limit]
    right = exact = numeric = 0
    print(f"generating answers to {len(items)} held-out questions with {model}", flush=True)
    for item in items:
        text = tok.apply_chat_template([{"role": "user", "content": item["question"]}], tokenize=False,
                                       add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            gen = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=net.generation_config.eos_token_id,
                               pad_token_id=tok.pad_token_id or tok.eos_token_id)
        answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        right += nearest_choice(answer, item["choices"]) == item["answer"]
        if item["family"] in NUMERIC_FAMILIES:
            numeric += 1
            want, got = last_number(item["choices"][item["answer"]]), last_number(answer)
            exact += got is not None and want is not None and math.isclose(got, want, rel_tol=1e-3)
    result = {"n": len(items), "acc": right / len(items), "exact_numeric": exact / max(1, numeric),
              "n_numeric": numeric}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


ORIGINAL_CONTEXT = 128  # tokens: what the demo's base and continued pretraining train at
LONG_FACTOR = 4


def with_yarn(model: Path, out: Path, factor: int, original: int) -> Path:
    """A copy of `model` whose config extends its context `factor`x by YaRN; the weights unchanged."""
    import shutil

    from pangu_pi import PanGuPiConfig

    if not _done(out):
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model, tmp)
        config = PanGuPiConfig.from_pretrained(tmp)
        config.max_position_embeddings = factor * original
        config.rope_parameters = {"rope_type": "yarn", "factor": float(factor),
                                  "original_max_position_embeddings": original,
                                  "rope_theta": config.rope_parameters.get("rope_theta", 10000.0)}
        config.save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def passkey(model: Path, filler: Path, out: Path, log: Path, trials: int, seed: int) -> dict:
    lengths = [ORIGINAL_CONTEXT * k for k in (1, 2, LONG_FACTOR)]
    if not out.is_file():
        run(["eval", str(model), "--passkey", *map(str, lengths), "--passkey-trials", str(trials),
             "--passkey-filler", str(filler), "--seed", str(seed), "--out", str(out), "--device", "cpu",
             "--no-card"], log)
    got = json.loads(out.read_text())["passkey"]
    return {f"{n // ORIGINAL_CONTEXT}x": got[str(n)]["acc"] for n in lengths}


def long_context(run_dir: Path, demo_dir: Path, tok_dom: Path, continued_hf: Path, general_data: Path, *,
                 steps: int, trials: int, seed: int, log: Path) -> dict:
    """Stage 7: YaRN 4x and continued pretraining on long documents; passkey before and after."""
    from domain_demo import long_documents  # tools/, beside this script

    docs = demo_dir / "long.jsonl"
    if not docs.is_file():
        long_documents(demo_dir / "domain.txt", docs.with_suffix(".tmp"), n_docs=6000, seed=seed)
        os.replace(docs.with_suffix(".tmp"), docs)
    long_data = run_dir / "data" / "long"
    if not (long_data / "manifest.json").is_file():
        run(["data", "prepare", "--tokenizer", str(tok_dom), "--input", str(docs), "--out", str(long_data),
             "--quiet"], log)
    long_hf = run_dir / "long-hf"
    if not _done(long_hf):
        run(["pretrain", "--config", "configs/yunshan_long_tiny.yaml", "--nproc", "2", "--out", str(run_dir / "long"),
             "--max-steps", str(steps), "--no-progress", "--set", f"model.init_from={continued_hf}",
             "--set", f"data.tokenizer={tok_dom}", "--set", f"seed={seed}",
             "--set", f"data.datasets=[{{path: {long_data}, weight: 1}}, {{path: {general_data}, weight: 1}}]"], log)
        run(["export", str(run_dir / "long"), str(long_hf), "--force"], log)
    yarn_only = with_yarn(continued_hf, run_dir / "continued-yarn", LONG_FACTOR, ORIGINAL_CONTEXT)
    filler = demo_dir / "domain_heldout.txt"  # prose the long documents never used
    ev = run_dir / "eval"
    return {
        "before": passkey(continued_hf, filler, ev / "passkey_before.json", log, trials, seed),
        "before_yarn": passkey(yarn_only, filler, ev / "passkey_before_yarn.json", log, trials, seed),
        "after": passkey(long_hf, filler, ev / "passkey_after.json", log, trials, seed),
        "trials": trials, "original_context": ORIGINAL_CONTEXT, "factor": LONG_FACTOR,
    }


def demo(run_dir: Path, *, base_steps: int, continue_steps: int, sft_steps: int, dpo_steps: int, add_pieces: int,
         eval_limit: int | None, seed: int, grpo_steps: int = 120, long_steps: int | None = None,
         passkey_trials: int | None = None, gen_limit: int | None = None) -> dict:
    from pangu_pi.corpus import default_corpus_files

    # Sized from the other settings unless given, so a shortened demo is shortened throughout: the
    # long-context stage trains 3x the continued-pretraining steps (300 by default), and --eval-limit
    # caps the generated answers (120) and the passkey prompts per length (40).
    long_steps = 3 * continue_steps if long_steps is None else long_steps
    gen_limit = min(120, eval_limit or 120) if gen_limit is None else gen_limit
    passkey_trials = (40 if not eval_limit else max(5, min(40, eval_limit // 4))) if passkey_trials is None \
        else passkey_trials
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "demo.log"
    timings: dict[str, float] = {}

    def stage(name: str):
        timings[name] = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)

    def end(name: str):
        timings[name] = round(time.perf_counter() - timings[name], 1)

    # 0. A base model: the tiny preset pretrained briefly on the embedded corpus.
    stage("base")
    base_hf = run_dir / "base-hf"
    if not _done(base_hf):
        run(["pretrain", "--config", "configs/tiny.yaml", "--nproc", "2", "--out", str(run_dir / "base"),
             "--max-steps", str(base_steps), "--no-progress", "--set", "data.default_corpus_bytes=3000000",
             "--set", "eval.every=0", "--set", "log.tensorboard=false", "--set", f"seed={seed}"], log)
        run(["export", str(run_dir / "base"), str(base_hf), "--force"], log)
    end("base")

    # 1. The domain set; the tokenizer grown on its prose; the base resized to it.
    stage("extend")
    demo_dir = run_dir / "demo"
    if not (demo_dir / "manifest.json").is_file():
        from domain_demo import generate  # tools/, beside this script

        generate(demo_dir, seed=seed)
    tok_dom = run_dir / "tokenizer-domain"
    if not (tok_dom / "tokenizer.json").is_file():
        run(["tokenizer", "extend", "--base", str(base_hf), "--input", str(demo_dir / "domain.txt"),
             "--add", str(add_pieces), "--out", str(tok_dom), "--overwrite"], log)
    resized = run_dir / "base-resized"
    if not _done(resized):
        run(["resize", str(base_hf), "--tokenizer", str(tok_dom), "--out", str(resized)], log)
    end("extend")

    # 2. Continued pretraining: domain prose and general text, 1 : 1, from the resized base.
    stage("continue")
    domain_data, general_data = run_dir / "data" / "domain", run_dir / "data" / "general"
    if not (domain_data / "manifest.json").is_file():
        run(["data", "prepare", "--tokenizer", str(tok_dom), "--input", str(demo_dir / "domain.txt"),
             "--out", str(domain_data), "--quiet"], log)
    if not (general_data / "manifest.json").is_file():
        general_files = [str(f) for f in default_corpus_files(limit_bytes=2_000_000)]
        run(["data", "prepare", "--tokenizer", str(tok_dom), "--input", *general_files,
             "--out", str(general_data), "--workers", "2", "--quiet"], log)
    continued_hf = run_dir / "continued-hf"
    if not _done(continued_hf):
        run(["pretrain", "--config", "configs/yunshan_tiny.yaml", "--nproc", "2", "--out", str(run_dir / "continued"),
             "--max-steps", str(continue_steps), "--no-progress",
             "--set", f"model.init_from={resized}", "--set", f"data.tokenizer={tok_dom}",
             "--set", f"data.datasets=[{{path: {domain_data}, weight: 1}}, {{path: {general_data}, weight: 1}}]"], log)
        run(["export", str(run_dir / "continued"), str(continued_hf), "--force"], log)
    end("continue")

    # 3. Instruction tuning: the domain instructions with a little general chat mixed in.
    stage("instruct")
    chat = run_dir / "general_chat.jsonl"
    if not chat.is_file():
        general_chat(chat, 400, seed)
    sft = run_dir / "sft"
    if not _done(sft / "model"):
        run(["finetune", "--config", "configs/yunshan_finetune_tiny.yaml", "--nproc", "2", "--out", str(sft),
             "--no-progress", "--set", f"model.init_from={continued_hf}", "--max-steps", str(sft_steps),
             "--set",
             f"data.datasets=[{{path: {demo_dir / 'train.jsonl'}, weight: 0.9}}, {{path: {chat}, weight: 0.1}}]",
             "--set", f"seed={seed}"],
            log)
    end("instruct")

    # 4. Preference tuning: the right answer preferred to a plausible wrong one, from the SFT model.
    stage("prefer")
    pairs = preference_pairs(demo_dir, seed)
    dpo = run_dir / "dpo"
    if not _done(dpo / "model"):
        run(["finetune", "--config", "configs/yunshan_dpo_tiny.yaml", "--nproc", "2", "--out", str(dpo),
             "--no-progress", "--set", f"model.init_from={sft / 'model'}", "--max-steps", str(dpo_steps),
             "--set", f"data.datasets=[{{path: {pairs}, weight: 1.0}}]", "--set", f"seed={seed}"], log)
    dpo_summary = json.loads((dpo / "finetune_summary.json").read_text())
    end("prefer")

    # 5. Online RL with verifiable rewards: the rule's number, or the right option, from the DPO model.
    stage("reinforce")
    prompts = grpo_prompts(demo_dir, seed)
    grpo = run_dir / "grpo"
    if not _done(grpo / "model"):
        run(["finetune", "--config", "configs/yunshan_grpo_tiny.yaml", "--nproc", "2", "--out", str(grpo),
             "--no-progress", "--set", f"model.init_from={dpo / 'model'}", "--max-steps", str(grpo_steps),
             "--set", f"data.datasets=[{{path: {prompts}, weight: 1.0}}]", "--set", f"seed={seed}"], log)
    grpo_summary = json.loads((grpo / "finetune_summary.json").read_text())
    end("reinforce")

    # 6. Held-out accuracy before and after.
    stage("eval")
    figures = {
        "base": evaluate(base_hf, demo_dir, run_dir / "eval" / "base.json", log, eval_limit),
        "continued": evaluate(continued_hf, demo_dir, run_dir / "eval" / "continued.json", log, eval_limit),
        "instruct": evaluate(sft / "model", demo_dir, run_dir / "eval" / "instruct.json", log, eval_limit),
        "preference": evaluate(dpo / "model", demo_dir, run_dir / "eval" / "preference.json", log, eval_limit),
        "grpo": evaluate(grpo / "model", demo_dir, run_dir / "eval" / "grpo.json", log, eval_limit),
    }
    generated = {name: generative_accuracy(path, demo_dir, run_dir / "eval" / f"generated_{name}.json", gen_limit)
                 for name, path in (("instruct", sft / "model"), ("preference", dpo / "model"),
                                    ("grpo", grpo / "model"))} if gen_limit else {}
    end("eval")

    # 7. Long context: YaRN 4x, continued pretraining on long documents, passkey before and after.
    stage("long")
    long_figures = None
    if long_steps:
        long_figures = long_context(run_dir, demo_dir, tok_dom, continued_hf, general_data, steps=long_steps,
                                    trials=passkey_trials, seed=seed, log=log)
    end("long")
    summary = {
        "chance": CHANCE,
        "seed": seed,
        "before_acc": figures["base"]["acc"],
        "after_acc": figures["instruct"]["acc"],
        "sft_acc": figures["instruct"]["acc"],
        "dpo_acc": figures["preference"]["acc"],
        "grpo_acc": figures["grpo"]["acc"],
        "dpo_heldout_pairs": {k: dpo_summary.get(k) for k in ("val_loss", "val_accuracy", "val_margin")},
        "grpo_rewards": {k: grpo_summary.get("grpo", {}).get(k) for k in ("first_reward", "final_reward")}
        | {"val_reward": grpo_summary.get("val_reward")},
        "stages": figures,
        "generated": generated,
        "passkey": long_figures,
        "seconds": timings,
        "steps": {"base": base_steps, "continue": continue_steps, "sft": sft_steps, "dpo": dpo_steps,
                  "grpo": grpo_steps, "long": long_steps},
        "run": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(report(summary))
    return summary


def report(summary: dict) -> str:
    s = summary["stages"]
    n = s["base"]["n"]
    lines = [
        f"\nheld-out multiple choice ({n} questions, 4 options; chance {100 * summary['chance']:.0f}%):",
        f"  {'model':<40} {'acc':>6} {'acc_norm':>9} {'bits/char':>10}",
    ]
    names = {"base": "before: base", "continued": "after continued pretraining", "instruct": "after instruction tuning",
             "preference": "after preference tuning (DPO)", "grpo": "after RL with verifiable rewards (GRPO)"}
    for key, label in names.items():
        if key not in s:  # a summary written before the stage existed
            continue
        r = s[key]
        lines.append(f"  {label:<40} {100 * r['acc']:5.1f}% {100 * r['acc_norm']:8.1f}% {r['bits_per_char']:10.3f}")
    clear_win = summary["after_acc"] > max(summary["before_acc"], summary["chance"]) + 0.05
    verdict = "beats" if clear_win else "does NOT clearly beat"
    lines.append(f"after {100 * summary['after_acc']:.1f}% {verdict} before {100 * summary['before_acc']:.1f}% "
                 "and chance 25%")
    if "dpo_acc" in summary:
        change = summary["dpo_acc"] - summary["sft_acc"]
        word = "rose" if change > 0 else "fell" if change < 0 else "stayed"
        pairs = summary.get("dpo_heldout_pairs") or {}
        held = (f"; held-out pairs: preference accuracy {100 * pairs['val_accuracy']:.1f}%, "
                f"margin {pairs['val_margin']:.3f}"
                if pairs.get("val_accuracy") is not None else "")
        lines.append(f"preference tuning: accuracy {word} from {100 * summary['sft_acc']:.1f}% (SFT) to "
                     f"{100 * summary['dpo_acc']:.1f}% (DPO){held}")
    if "grpo_acc" in summary:
        r = summary.get("grpo_rewards") or {}
        rewards = (f"; training reward {r['first_reward']:.3f} → {r['final_reward']:.3f}"
                   if r.get("first_reward") is not None else "")
        lines.append(f"GRPO: accuracy {100 * summary['dpo_acc']:.1f}% (DPO) → {100 * summary['grpo_acc']:.1f}%"
                     f"{rewards}")
    if summary.get("generated"):
        g = summary["generated"]
        n = next(iter(g.values()))["n"]
        lines.append(f"\nheld-out answers written by the model ({n} questions, greedy; nearest of the 4 choices; "
                     "chance 25%):")
        for key, label in (("instruct", "after SFT"), ("preference", "after DPO"), ("grpo", "after GRPO")):
            if key in g:
                lines.append(f"  {label:<12} {100 * g[key]['acc']:5.1f}%   exact number (numeric families, "
                             f"{g[key]['n_numeric']}): {100 * g[key]['exact_numeric']:5.1f}%")
    if summary.get("passkey"):
        p = summary["passkey"]
        lines.append(f"\npasskey retrieval ({p['trials']} prompts per length; original context "
                     f"{p['original_context']} tokens):")
        lines.append(f"  {'model':<44} {'1x':>6} {'2x':>6} {'4x':>6}")
        for key, label in (("before", "before: the domain model as it is"),
                           ("before_yarn", "before: with YaRN 4x, not trained"),
                           ("after", "after long-context continued pretraining")):
            lines.append(f"  {label:<44} " + " ".join(f"{100 * p[key][k]:5.1f}%" for k in ("1x", "2x", "4x")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/yunshan_demo.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(ROOT / "runs" / "yunshan_demo"), help="run folder (default runs/yunshan_demo)")
    p.add_argument("--base-steps", type=int, default=150, help="pretraining steps of the base model")
    p.add_argument("--continue-steps", type=int, default=100, help="continued-pretraining steps")
    p.add_argument("--sft-steps", type=int, default=120, help="instruction-tuning steps")
    p.add_argument("--dpo-steps", type=int, default=60, help="preference-tuning (DPO) steps after instruction tuning")
    p.add_argument("--grpo-steps", type=int, default=120, help="GRPO steps after preference tuning")
    p.add_argument("--long-steps", type=int,
                   help="long-context continued-pretraining steps (default 3 × --continue-steps; 0: skip the stage)")
    p.add_argument("--passkey-trials", type=int,
                   help="passkey prompts per length (default 40; with --eval-limit N, N/4 between 5 and 40)")
    p.add_argument("--gen-limit", type=int, help="held-out questions answered by generation after SFT, DPO and "
                   "GRPO (default 120, at most --eval-limit; 0: skip)")
    p.add_argument("--add", type=int, default=500, help="new tokenizer pieces to learn (at most)")
    p.add_argument("--eval-limit", type=int, help="score only the first N held-out questions")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    summary = demo(Path(args.run), base_steps=args.base_steps, continue_steps=args.continue_steps,
                   sft_steps=args.sft_steps, dpo_steps=args.dpo_steps, add_pieces=args.add, eval_limit=args.eval_limit,
                   seed=args.seed, grpo_steps=args.grpo_steps, long_steps=args.long_steps,
                   passkey_trials=args.passkey_trials, gen_limit=args.gen_limit)
    print(json.dumps({"before_acc": round(summary["before_acc"], 4), "after_acc": round(summary["after_acc"], 4),
                      "sft_acc": round(summary["sft_acc"], 4), "dpo_acc": round(summary["dpo_acc"], 4),
                      "grpo_acc": round(summary["grpo_acc"], 4),
                      "chance": CHANCE}
                     | {f"generated_{k}_acc": round(v["acc"], 4) for k, v in (summary["generated"] or {}).items()}
                     | {f"passkey_{k}_{x}": v for k, row in (summary["passkey"] or {}).items()
                        if isinstance(row, dict) for x, v in row.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
