#!/usr/bin/env python
"""Tool use you can train: a tiny model fine-tuned to call finance calculators, measured through a
real `pangu-pi serve` endpoint with the stock openai client.

    python tools/tool_use_demo.py [--run runs/tool_use_demo] [--steps 300] [--train 2000] [--heldout 120]
    python tools/tool_use_demo.py generate --out DIR [--seed 0]      # the data set alone

The tools are the domain demo's finance rules (tools/domain_demo.py) made callable: simple
interest, percentage change and income tax. Each training conversation is a system prompt with the
three tools, a user's question in one of several phrasings, the assistant's call with the numbers
from the question, the tool's result, and the assistant's answer quoting it; some questions (terms
from the domain glossary) need no tool and are answered directly. Held-out prompts share no case
(tool and numbers) with the training ones; a second held-out set also uses phrasings never seen in
training.

Stages, each kept in the run folder and reused when there:

    data/        train.jsonl (chat records with tools), heldout.jsonl, manifest.json
    tokenizer/   `pangu-pi tokenizer train` on the conversations' text and a slice of the default corpus
    base/        `pangu-pi init --preset tiny`: the random starting point
    sft/         `pangu-pi finetune --config configs/tool_use_tiny.yaml` (loss on the assistant's turns)
    eval.json    per prompt: the call made, for the fine-tuned model and for the base
    summary.json the rates; the last line printed is the same, as one JSON object

Measured: with `tool_choice: "auto"` (nothing constrains the output, the hermes parser reads what
the model wrote), the share of held-out prompts where the first call names the right function and
its arguments validate against that function's schema; also the share with the exact arguments,
the share of no-tool questions answered without a call, and the share of conversations whose final
answer, given the tool's result, quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from domain_demo import GLOSSARY, NAMES, money  # noqa: E402  (tools/, beside this script)

from pangu_pi.folders import is_checkpoint  # noqa: E402
from pangu_pi.net import free_port  # noqa: E402

CONTEXT = 1024  # tokens: the model's context and the rows fine-tuning packs
SYSTEM = "You are a finance assistant. Use a calculator for any arithmetic, then give the result."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "simple_interest",
            "description": "Interest on a principal at a yearly rate in percent over whole years, not compounded.",
            "parameters": {
                "type": "object",
                "properties": {
                    "principal": {"type": "number"},
                    "rate_percent": {"type": "number"},
                    "years": {"type": "integer"},
                },
                "required": ["principal", "rate_percent", "years"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "percent_change",
            "description": "Percentage change from an old value to a new value.",
            "parameters": {
                "type": "object",
                "properties": {"old": {"type": "number"}, "new": {"type": "number"}},
                "required": ["old", "new"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "income_tax",
            "description": "Tax on a yearly income: 0% up to $12,000, 20% up to $50,000, 40% above.",
            "parameters": {
                "type": "object",
                "properties": {"income": {"type": "number"}},
                "required": ["income"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# Phrasings per tool; the last of each is never used in training (the "new phrasing" held-out set).
PHRASINGS = {
    "simple_interest": [
        "{name} deposits {p} at {r}% simple interest per year. How much interest is earned after {t} years?",
        "What is the simple interest on a {p} loan at {r}% a year for {t} years?",
        "A bond pays {r}% simple interest a year on {p}. What interest does it pay over {t} years?",
        "{name} lends {p} for {t} years at {r}% simple interest. How much interest is due?",
        "Find the simple interest on {p} at {r}% per year over {t} years.",
        "{name} wants to know the interest on {p} at a yearly rate of {r}%, simple, after {t} years.",
        "Calculate the simple interest for a principal of {p}, a rate of {r}% and {t} years.",
        "How much simple interest does {p} earn in {t} years at a rate of {r}% a year?",
    ],
    "percent_change": [
        "The {thing} moved from {a} to {b}. What is the percentage change?",
        "A {thing} was {a} last year and is {b} now. By what percentage did it change?",
        "{name}'s {thing} went from {a} to {b}. What is the change in percent?",
        "Find the percentage change of a {thing} that went from {a} to {b}.",
        "Calculate the percent change from {a} to {b} for the {thing}.",
        "{name} saw the {thing} change from {a} to {b}. What percentage change is that?",
        "If a {thing} goes from {a} to {b}, what is the percentage change?",
    ],
    "income_tax": [
        "How much income tax does {name} owe on an income of {i}?",
        "What is the tax on a yearly income of {i}?",
        "{name} earned {i} this year. How much tax is owed?",
        "Find the income tax on earnings of {i}.",
        "Calculate the tax owed by someone who earns {i} a year.",
        "{name} makes {i} a year. What income tax does {name} pay?",
        "Compute the income tax for someone who earns {i} a year.",
    ],
}
THINGS = ["share price", "monthly revenue", "fund's unit price", "rent", "bond price", "salary"]
GLOSSARY_QUESTIONS = ["What does {term} mean?", "Define {term}.", "In finance or law, what is {term}?"]


# --- the calculators -------------------------------------------------------------------------------


def simple_interest(principal: float, rate_percent: float, years: int) -> dict:
    return {"interest": round(principal * rate_percent * years / 100, 2)}


def percent_change(old: float, new: float) -> dict:
    return {"percent_change": round(100 * (new - old) / old, 2)}


def income_tax(income: float) -> dict:
    tax = 0.2 * max(0.0, min(income, 50_000) - 12_000) + 0.4 * max(0.0, income - 50_000)
    return {"tax": round(tax, 2)}


CALCULATORS = {"simple_interest": simple_interest, "percent_change": percent_change, "income_tax": income_tax}


def final_answer(tool: str, result: dict) -> str:
    if tool == "simple_interest":
        return f"The interest is {money(result['interest'])}."
    if tool == "percent_change":
        return f"The percentage change is {result['percent_change']:+g}%."
    return f"The tax owed is {money(result['tax'])}."


# --- the data set ----------------------------------------------------------------------------------


def draw_case(tool: str, rng: random.Random) -> tuple[tuple, dict, dict]:
    """(case key, arguments, text fields) for one question to `tool`."""
    if tool == "simple_interest":
        p, r, t = rng.randrange(100, 10_001, 100), rng.randint(1, 15), rng.randint(1, 10)
        return (tool, p, r, t), {"principal": p, "rate_percent": r, "years": t}, {"p": money(p), "r": r, "t": t}
    if tool == "percent_change":
        a = rng.randrange(20, 2001, 10)
        b = rng.randrange(10, 3001, 10)
        while b == a:
            b = rng.randrange(10, 3001, 10)
        return (tool, a, b), {"old": a, "new": b}, {"a": money(a), "b": money(b), "thing": rng.choice(THINGS)}
    i = rng.randrange(5_000, 200_001, 500)
    return (tool, i), {"income": i}, {"i": money(i)}


def tool_conversation(tool: str, args: dict, fields: dict, phrasing: str, rng: random.Random) -> dict:
    question = phrasing.format(name=rng.choice(NAMES), **fields)
    call_id = f"call_{rng.randrange(100)}"
    result = CALCULATORS[tool](**args)
    call = {"id": call_id, "type": "function", "function": {"name": tool, "arguments": json.dumps(args)}}
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
            {"role": "assistant", "content": final_answer(tool, result)},
        ],
    }


def glossary_conversation(term: str, rng: random.Random) -> dict:
    question = rng.choice(GLOSSARY_QUESTIONS).format(term=term)
    answer = f"{term[0].upper() + term[1:]} is {GLOSSARY[term]}."
    return {
        "tools": TOOLS,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
    }


def generate(out_dir: str | Path, seed: int = 0, train: int = 2000, heldout: int = 120) -> dict:
    """Write train.jsonl, heldout.jsonl (prompts with the expected call) and manifest.json."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tools = list(PHRASINGS)
    # Held-out cases first, so training never draws them; the first half uses training phrasings,
    # the second half phrasings kept out of training.
    taken: set = set()
    held: list[dict] = []
    for k in range(heldout):
        tool = tools[k % len(tools)]
        while True:
            key, args, fields = draw_case(tool, rng)
            if key not in taken:
                break
        taken.add(key)
        unseen = k >= heldout // 2
        phrasing = PHRASINGS[tool][-1] if unseen else rng.choice(PHRASINGS[tool][:-1])
        record = tool_conversation(tool, args, fields, phrasing, rng)
        held.append({
            "set": "new_phrasing" if unseen else "seen_phrasing",
            "messages": record["messages"][:2],
            "expected": {"name": tool, "arguments": args},
            "tool_result": record["messages"][3]["content"],
            "final_answer": record["messages"][4]["content"],
        })  # fmt: skip
    terms = sorted(GLOSSARY)
    for k in range(max(1, heldout // 10)):
        held.append({
            "set": "no_tool",
            "messages": glossary_conversation(terms[k % len(terms)], rng)["messages"][:2],
            "expected": None,
        })  # fmt: skip

    rows, counts = [], {t: 0 for t in tools}
    counts["no_tool"] = 0
    while len(rows) < train:
        if rng.random() < 0.15:
            rows.append(glossary_conversation(rng.choice(terms), rng))
            counts["no_tool"] += 1
            continue
        tool = rng.choice(tools)
        key, args, fields = draw_case(tool, rng)
        if key in taken:
            continue
        rows.append(tool_conversation(tool, args, fields, rng.choice(PHRASINGS[tool][:-1]), rng))
        counts[tool] += 1

    def write(name: str, items: list[dict]) -> None:
        with open(out / name, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")

    write("train.jsonl", rows)
    write("heldout.jsonl", held)
    manifest = {"seed": seed, "train": counts, "heldout": {s: sum(h["set"] == s for h in held) for s in
                                                           ("seen_phrasing", "new_phrasing", "no_tool")}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    # The text a tokenizer should know: every message and call as it will be written.
    with open(out / "text.txt", "w", encoding="utf-8") as f:
        f.write(json.dumps(TOOLS) + "\n")
        for row in rows:
            for m in row["messages"]:
                calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                         for c in m.get("tool_calls", [])]  # fmt: skip
                f.write((m["content"] or " ".join(map(json.dumps, calls))) + "\n")
    return manifest


# --- the stages ------------------------------------------------------------------------------------


def run(args: list[str], log: Path) -> None:
    """A `pangu-pi` command, its output kept in `log`; a failure stops the demo."""
    cmd = [str(Path(sys.executable).with_name("pangu-pi")), *args]
    print("$ pangu-pi " + " ".join(args), flush=True)
    with open(log, "ab") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        raise SystemExit(f"tool-use demo: `pangu-pi {args[0]}` failed (exit {code}); see {log}")


class Server:
    """`pangu-pi serve` of the fine-tuned model (and the base as a variant) while in a `with`."""

    def __init__(self, model: Path, base: Path, log: Path, key: str):
        self.port, self.key, self.log = free_port(), key, log
        cmd = [str(Path(sys.executable).with_name("pangu-pi")), "serve", str(model), "--name", "tuned",
               "--variant", f"base={base}", "--port", str(self.port), "--max-model-len", str(CONTEXT),
               "--api-key", key, "--dtype", "float32", "--", "--enforce-eager"]  # fmt: skip
        self.handle = open(log, "wb")
        self.process = subprocess.Popen(cmd, stdout=self.handle, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self):
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if "ready at http://" in self.log.read_text(errors="replace"):
                return self
            if self.process.poll() is not None:
                raise SystemExit(f"tool-use demo: pangu-pi serve exited ({self.process.returncode}); see {self.log}")
            time.sleep(1)
        raise SystemExit(f"tool-use demo: pangu-pi serve not ready after 900 s; see {self.log}")

    def __exit__(self, *exc):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.handle.close()


def _valid(arguments: dict, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(arguments, schema)
        return True
    except jsonschema.ValidationError:
        return False


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        isinstance(a[k], int | float) and abs(float(a[k]) - float(b[k])) < 1e-6 for k in a
    )


def ask(client, model: str, item: dict) -> dict:
    """One held-out prompt under tool_choice "auto"; then, if the right call came, the tool's result."""
    reply = client.chat.completions.create(
        model=model, messages=item["messages"], tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=96
    )
    message = reply.choices[0].message
    calls = message.tool_calls or []
    out = {"set": item["set"], "content": message.content, "calls": [
        {"name": c.function.name, "arguments": c.function.arguments} for c in calls]}  # fmt: skip
    expected = item["expected"]
    if expected is None:
        out["ok"] = not calls
        return out
    out["right_function"] = bool(calls) and calls[0].function.name == expected["name"]
    try:
        arguments = json.loads(calls[0].function.arguments) if calls else None
    except json.JSONDecodeError:
        arguments = None
    out["ok"] = out["right_function"] and isinstance(arguments, dict) and _valid(arguments, SCHEMAS[expected["name"]])
    out["exact"] = out["ok"] and _same(arguments, expected["arguments"])
    if out["ok"]:
        # Second turn: the call and the true result go back; the answer should quote the result.
        follow = item["messages"] + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": calls[0].id, "type": "function",
                 "function": {"name": calls[0].function.name, "arguments": calls[0].function.arguments}}]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": item["tool_result"]},
        ]  # fmt: skip
        answer = client.chat.completions.create(
            model=model, messages=follow, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=48
        ).choices[0].message.content or ""
        number = re.search(r"[-+]?\$?[\d,]+(?:\.\d+)?%?", item["final_answer"]).group(0)
        out["answer"] = answer
        out["quotes_result"] = number in answer
    return out


def rates(results: list[dict]) -> dict:
    def share(items, key):
        return round(sum(bool(r.get(key)) for r in items) / len(items), 4) if items else None

    tool_items = [r for r in results if r["set"] != "no_tool"]
    by_set = {s: [r for r in results if r["set"] == s] for s in ("seen_phrasing", "new_phrasing")}
    return {
        "right_function_valid_args": share(tool_items, "ok"),
        "right_function": share(tool_items, "right_function"),
        "exact_args": share(tool_items, "exact"),
        "by_set": {s: share(items, "ok") for s, items in by_set.items()},
        "no_tool_without_call": share([r for r in results if r["set"] == "no_tool"], "ok"),
        "answer_quotes_result": share([r for r in tool_items if r["ok"]], "quotes_result"),
        "prompts": len(tool_items),
    }


def evaluate(run_dir: Path, log: Path) -> dict:
    import openai

    held = [json.loads(line) for line in (run_dir / "data" / "heldout.jsonl").read_text().splitlines()]
    key = "tool-demo-" + os.urandom(6).hex()
    with Server(run_dir / "sft" / "model", run_dir / "base", run_dir / "serve.log", key) as server:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0, timeout=300)
        results = {}
        for model in ("tuned", "base"):
            with ThreadPoolExecutor(8) as pool:
                results[model] = list(pool.map(lambda item: ask(client, model, item), held))  # noqa: B023 (mapped here)
    (run_dir / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
    return {model: rates(r) for model, r in results.items()}


def demo(run_dir: Path, steps: int, train: int, heldout: int, seed: int) -> dict:
    from pangu_pi.corpus import default_corpus_files

    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "demo.log"
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    data = run_dir / "data"
    if not (data / "manifest.json").is_file():
        print(json.dumps(generate(data, seed, train, heldout)), flush=True)
    tokenizer = run_dir / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        corpus = [str(f) for f in default_corpus_files(limit_bytes=1_500_000)]
        run(["tokenizer", "train", "--input", str(data / "text.txt"), *corpus, "--vocab-size", "4096",
             "--out", str(tokenizer)], log)  # fmt: skip
    base = run_dir / "base"
    if not is_checkpoint(base):
        # The tiny preset with a context of 1024: three tool schemas alone take ~350 tokens.
        run(["init", "--preset", "tiny", "--tokenizer", str(tokenizer), "--seed", str(seed), "--out", str(base),
             "--set", f"model.max_position_embeddings={CONTEXT}"], log)  # fmt: skip
    seconds["prepare"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    sft = run_dir / "sft"
    if not is_checkpoint(sft / "model"):
        run(["finetune", "--config", "configs/tool_use_tiny.yaml", "--nproc", "2", "--out", str(sft), "--no-progress",
             "--max-steps", str(steps), "--set", f"model.init_from={base}", "--set", f"seed={seed}",
             "--set", f"data.datasets=[{{path: {data / 'train.jsonl'}, weight: 1.0}}]"], log)  # fmt: skip
    seconds["finetune"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    figures = evaluate(run_dir, log)
    seconds["serve_and_eval"] = round(time.perf_counter() - t0, 1)
    summary = {
        "metric": "tool_choice=auto, held-out prompts: first call names the right function and its arguments "
        "validate against its schema",
        "tuned": figures["tuned"],
        "base": figures["base"],
        "steps": steps,
        "train_conversations": train,
        "seconds": seconds,
        "run": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:
        p = argparse.ArgumentParser(prog="tool_use_demo.py generate", description="Write the tool-use data set.")
        p.add_argument("--out", required=True)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--train", type=int, default=2000)
        p.add_argument("--heldout", type=int, default=120)
        a = p.parse_args(argv[1:])
        print(json.dumps(generate(a.out, a.seed, a.train, a.heldout)))
        return 0
    p = argparse.ArgumentParser(prog="tool_use_demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "tool_use_demo", help="run folder")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    p.add_argument("--train", type=int, default=2000, help="training conversations")
    p.add_argument("--heldout", type=int, default=120, help="held-out prompts that need a tool")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    summary = demo(a.run, a.steps, a.train, a.heldout, a.seed)
    t, b = summary["tuned"], summary["base"]
    print(f"right function + schema-valid arguments (tool_choice auto, {t['prompts']} held-out prompts): "
          f"fine-tuned {t['right_function_valid_args']:.1%}, base {b['right_function_valid_args']:.1%}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
