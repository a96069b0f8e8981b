"""The tool-use demo's data: seeded, consistent with its calculators, trainable, held-out cases apart."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest

from pangu_pi.tokenizer import load_tokenizer
from pangu_pi.training.sft_data import IGNORE_INDEX, check_messages, read_chat_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("tool_use_demo", ROOT / "tools" / "tool_use_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_set_is_seeded_and_its_calls_are_right(demo, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    demo.generate(a, seed=3, train=200, heldout=30)
    demo.generate(b, seed=3, train=200, heldout=30)
    assert (a / "train.jsonl").read_bytes() == (b / "train.jsonl").read_bytes()
    assert (a / "heldout.jsonl").read_bytes() == (b / "heldout.jsonl").read_bytes()
    rows = read(a / "train.jsonl")
    assert len(rows) == 200
    with_calls = [r for r in rows if r["messages"][2].get("tool_calls")]
    assert 0.7 * len(rows) < len(with_calls) < len(rows)  # some questions need no tool
    for row in with_calls:
        check_messages(row)  # what the fine-tuning reader accepts
        call = row["messages"][2]["tool_calls"][0]["function"]
        args = json.loads(call["arguments"])
        jsonschema.validate(args, demo.SCHEMAS[call["name"]])
        # The tool message is the calculator's result for those arguments; the answer quotes it.
        assert json.loads(row["messages"][3]["content"]) == demo.CALCULATORS[call["name"]](**args)
        result = json.loads(row["messages"][3]["content"])
        assert row["messages"][4]["content"] == demo.final_answer(call["name"], result)


def test_heldout_cases_and_phrasings_stay_out_of_training(demo, tmp_path):
    demo.generate(tmp_path, seed=0, train=400, heldout=40)
    train, held = read(tmp_path / "train.jsonl"), read(tmp_path / "heldout.jsonl")
    trained_calls = {
        json.dumps(r["messages"][2]["tool_calls"][0]["function"], sort_keys=True)
        for r in train if r["messages"][2].get("tool_calls")
    }  # fmt: skip
    for item in held:
        if item["expected"] is None:
            continue
        call = {"name": item["expected"]["name"], "arguments": json.dumps(item["expected"]["arguments"])}
        assert json.dumps(call, sort_keys=True) not in trained_calls
    questions = {r["messages"][1]["content"] for r in train}
    unseen = [h for h in held if h["set"] == "new_phrasing"]
    assert len(unseen) == 20  # the glossary questions (no tool) may repeat; the tool questions never do
    assert not {h["messages"][1]["content"] for h in held if h["expected"]} & questions
    assert demo.income_tax(60_000) == {"tax": 0.2 * 38_000 + 0.4 * 10_000}
    assert demo.percent_change(80, 100) == {"percent_change": 25.0}


def test_loss_falls_on_the_calls_and_answers_only(demo, tmp_path, tokenizer_dir):
    demo.generate(tmp_path, seed=1, train=20, heldout=6)
    tok = load_tokenizer(tokenizer_dir)
    examples, stats = read_chat_jsonl(tmp_path / "train.jsonl", tok, max_len=2048)
    assert stats.kept == 20
    rows = read(tmp_path / "train.jsonl")
    for ex, row in zip(examples, rows):
        learned = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])
        assert learned.endswith(row["messages"][-1]["content"] + "<|im_end|>")
        if row["messages"][2].get("tool_calls"):
            assert learned.startswith("<tool_call>\n{\"name\": ")
            assert row["messages"][3]["content"] not in learned  # the tool's result is read, not learned
