"""The generated finance/law demo set: seeded, rule-following, held-out split disjoint from training."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest

from domain_demo import FAMILIES, LIMITATION, generate, generate_main
from pangu_pi.training.sft_data import check_messages


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _amount(text: str) -> float:
    """The last dollar amount in a sentence."""
    return float(re.findall(r"\$([\d,]+(?:\.\d+)?)", text)[-1].replace(",", ""))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    manifest = generate(out, seed=0, train=450, heldout=72, text_lines=200)
    return out, manifest


def test_same_seed_same_files_other_seed_other_files(demo, tmp_path):
    out, _ = demo
    generate(tmp_path / "again", seed=0, train=450, heldout=72, text_lines=200)
    generate(tmp_path / "other", seed=1, train=450, heldout=72, text_lines=200)
    for name in ("train.jsonl", "heldout_mc.jsonl", "domain.txt"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
        assert (out / name).read_bytes() != (tmp_path / "other" / name).read_bytes()


def test_heldout_is_well_formed_balanced_and_disjoint_from_training(demo):
    out, manifest = demo
    held = _read_jsonl(out / "heldout_mc.jsonl")
    train = _read_jsonl(out / "train.jsonl")
    assert len(held) == manifest["heldout"] == 72 and len(train) == manifest["train"] == 450
    assert {r["family"] for r in held} == set(FAMILIES) == {r["family"] for r in train}
    for r in held:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert 0 <= r["answer"] < 4
    slots = Counter(r["answer"] for r in held)
    assert set(slots.values()) == {18}  # the right answer sits in every slot equally often

    train_questions = {m["content"] for r in train for m in r["messages"] if m["role"] == "user"}
    assert not train_questions & {r["question"] for r in held}
    domain_text = (out / "domain.txt").read_text(encoding="utf-8")
    assert not any(r["question"] in domain_text for r in held)
    heldout_text = (out / "domain_heldout.txt").read_text(encoding="utf-8")
    assert all(r["question"] in heldout_text for r in held)


def test_training_records_are_clean_chat(demo):
    out, _ = demo
    for record in _read_jsonl(out / "train.jsonl"):
        messages = check_messages(record)  # raises on anything the SFT reader would reject
        assert messages[-1]["role"] == "assistant" and messages[-2]["role"] == "user"


def test_answers_follow_their_rules(demo):
    out, _ = demo
    held = _read_jsonl(out / "heldout_mc.jsonl")
    train = [
        {"family": r["family"], "question": r["messages"][-2]["content"], "answer": r["messages"][-1]["content"]}
        for r in _read_jsonl(out / "train.jsonl")
    ]
    cases = train + [
        {"family": r["family"], "question": r["question"], "answer": r["choices"][r["answer"]]} for r in held
    ]
    checked = Counter()
    for c in cases:
        q, a = c["question"], c["answer"]
        if c["family"] == "simple_interest":
            p = _amount(re.search(r"\$[\d,]+", q).group(0))
            rate = int(re.search(r"(\d+)%", q).group(1))
            years = int(re.search(r"(\d+) years", q).group(1))
            assert _amount(a) == pytest.approx(p * rate * years / 100), q
        elif c["family"] == "percent_change":
            old, new = (float(x.replace(",", "")) for x in re.findall(r"\$([\d,]+)", q)[:2])
            assert float(re.search(r"= ([+-][\d.]+)%", a).group(1)) == pytest.approx(100 * (new - old) / old), q
        elif c["family"] == "contract_validity":
            ages = [int(x) for x in re.findall(r"aged (\d+)", q)]
            if min(ages) < 18:
                assert "under 18" in a, q
            elif "threatened" in q:
                assert "duress" in a, q
            elif any(s in q for s in ("stolen", "smuggled", "counterfeit")):
                assert "illegal" in a, q
            elif "land" in q or "field" in q:
                assert ("must be in writing" in a) == ("orally" in q), q
            else:
                assert a.startswith("The contract is valid"), q
        elif c["family"] == "limitation":
            claim = next(k for k in LIMITATION if k in q)
            start, filed = (int(x) for x in re.findall(r"in (\d{4})", q))
            barred = filed - start > LIMITATION[claim]
            assert a.startswith(f"{filed - start} years passed"), q
            assert a.endswith("time-barred.") == barred, q
        elif c["family"] == "inheritance":
            estate, k = _amount(q), int(re.search(r"(\d) children", q).group(1))
            share = estate / 2 / k if "a spouse" in q else estate / k
            assert _amount(a) == pytest.approx(share), q
        else:
            continue
        checked[c["family"]] += 1
    assert len(checked) == 5 and min(checked.values()) >= 10


def test_cli_writes_the_set_and_refuses_too_small_counts(tmp_path, capsys):
    assert generate_main(["--out", str(tmp_path / "d"), "--train", "90", "--heldout", "18", "--text-lines", "30"]) == 0
    assert "90 training records, 18 held-out questions" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["seed"] == 0 and sum(manifest["heldout_families"].values()) == 18
    with pytest.raises(SystemExit):
        generate_main(["--out", str(tmp_path / "e"), "--heldout", "3"])
    assert "at least 9" in capsys.readouterr().err


def test_the_old_command_name_says_where_it_moved_and_still_runs(tmp_path):
    args = ["--out", str(tmp_path / "d"), "--train", "90", "--heldout", "18", "--text-lines", "30"]
    out = subprocess.run([sys.executable, "-m", "pangu_pi.training.domain_demo", *args],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.splitlines()[0] == "moved: run python tools/domain_demo.py " + " ".join(args)
    assert "90 training records" in out.stdout and (tmp_path / "d" / "manifest.json").is_file()


def test_the_old_command_name_without_a_checkout_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from pangu_pi.training import _moved

    monkeypatch.setattr(_moved, "TOOLS", tmp_path)  # an installed copy: no tools/ beside the package
    monkeypatch.setattr(sys, "argv", ["main_job", "--run", "r"])
    assert _moved.run_moved("main_job") == 2
    assert capsys.readouterr().err == "moved: run python tools/main_job.py --run r\n"


def test_long_documents_ask_for_facts_they_state_earlier(demo, tmp_path):
    from domain_demo import long_documents

    folder, _ = demo
    path = long_documents(folder / "domain.txt", tmp_path / "long.jsonl", n_docs=50, seed=1)
    docs = [r["text"] for r in _read_jsonl(path)]
    assert len(docs) == 50 and docs == [r["text"] for r in _read_jsonl(
        long_documents(folder / "domain.txt", tmp_path / "again.jsonl", n_docs=50, seed=1))]
    counts = Counter()
    for text in docs:
        body, *questions = text.split("\nWhat is the ")
        assert 1 <= len(questions) <= 3
        counts[len(questions)] += 1
        for q in questions:
            name, key = re.fullmatch(r"(.+)\? The \1 is (\d{5})\.", q).groups()
            assert re.search(rf"the {name}( of this [a-z ]+)? is {key}", body, re.IGNORECASE), (name, key)
    assert len(counts) == 3  # one, two and three facts all occur


def test_with_yarn_extends_the_context_and_keeps_the_weights(tmp_path):
    import yunshan_demo
    from safetensors.torch import load_file

    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM

    PanGuPiForCausalLM(PanGuPiConfig.from_preset("tiny", vocab_size=64)).save_pretrained(tmp_path / "m")
    out = yunshan_demo.with_yarn(tmp_path / "m", tmp_path / "yarn", factor=4, original=128)
    config = PanGuPiConfig.from_pretrained(out)
    assert config.max_position_embeddings == 512
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 4.0
    assert config.rope_parameters["original_max_position_embeddings"] == 128
    a, b = load_file(tmp_path / "m" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_grpo_prompts_carry_both_answers_and_the_nearest_choice_reads_a_written_answer(demo):
    import yunshan_demo

    from pangu_pi.training.rewards import last_number

    folder, _ = demo
    rows = _read_jsonl(yunshan_demo.grpo_prompts(folder, seed=0))
    assert rows and all({"prompt", "chosen", "rejected", "family"} <= set(r) for r in rows)
    numeric = [r for r in rows if r["family"] in yunshan_demo.NUMERIC_FAMILIES]
    assert numeric and all(r["answer"] == last_number(r["chosen"]) for r in numeric)
    choices = ["Interest = $600 × 6% × 7 = $252.", "Interest = $600 × 6% × 6 = $216.", "It is $36.", "$2,000."]
    assert yunshan_demo.nearest_choice("I think it is $220", choices) == 1
    assert yunshan_demo.nearest_choice("The contract is void.", ["The contract is valid.", "The contract is void.",
                                                                   "The contract is valid.", "No claim."]) == 1
