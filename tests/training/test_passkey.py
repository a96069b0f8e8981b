"""Passkey retrieval (training/passkey.py, `pangu-pi eval --passkey`): the prompts are the length
asked for with the key at the depth asked for, the scoring reads the first number of the answer, and
the accuracy by depth tells a model that reads its whole context from one that reads only its end."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pangu_pi.errors import UserError
from pangu_pi.tokenizer import load_tokenizer
from pangu_pi.training.passkey import ANSWER_TOKENS, build_trials, first_number, score


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_prompts_have_the_length_and_the_key_at_its_depth(tok):
    trials = build_trials(tok, 300, 10, seed=3)
    assert len({t.key for t in trials}) == 10
    assert [t.depth for t in trials] == pytest.approx([(i + 0.5) / 10 for i in range(10)])
    for t in trials:
        assert len(t.ids) == 300 - ANSWER_TOKENS
        text = tok.decode(t.ids)
        assert text.count(str(t.key)) == 2 and text.rstrip().endswith("The pass key is")
        # where the key sentence starts, as a fraction of the filler around it
        start = next(i for i in range(len(t.ids)) if str(t.key) in tok.decode(t.ids[:i + 1]))
        assert abs(start / len(t.ids) - t.depth) < 0.15
    again = build_trials(tok, 300, 10, seed=3)
    assert [t.ids for t in again] == [t.ids for t in trials]
    assert [t.key for t in build_trials(tok, 300, 10, seed=4)] != [t.key for t in trials]


def test_a_length_too_short_for_the_question_is_refused(tok):
    with pytest.raises(UserError, match="too short to hold the key sentence"):
        build_trials(tok, 20, 1)


def test_scoring_by_depth_separates_whole_context_from_its_end(tok):
    trials = build_trials(tok, 400, 20, seed=0)

    def reads_all(ids):  # finds the key anywhere in the prompt
        return tok.encode(" " + re.search(r"pass key is (\d+)", tok.decode(ids)).group(1), add_special_tokens=False)

    def reads_the_last_half(ids):  # finds it only in the prompt's second half
        found = re.search(r"pass key is (\d+)", tok.decode(ids[len(ids) // 2:]))
        return tok.encode(" " + found.group(1) if found else " 0", add_special_tokens=False)

    assert score(trials, reads_all, tok)["acc"] == 1.0
    half = score(trials, reads_the_last_half, tok)
    assert 0.3 <= half["acc"] <= 0.7
    assert half["acc_by_depth"][0] == 0.0 and half["acc_by_depth"][-1] == 1.0
    assert first_number(" 12345. Remember") == 12345 and first_number(" none") is None


def test_the_eval_command_scores_passkey_lengths(tok, tokenizer_dir, tmp_path):
    from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
    from pangu_pi.training.evaluate import main

    torch.manual_seed(0)
    model = PanGuPiForCausalLM(PanGuPiConfig.from_preset("tiny", vocab_size=len(tok), num_hidden_layers=1,
                                                         siaf_backend="reference"))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    filler = tmp_path / "filler.txt"
    filler.write_text("A contract signed by a minor is void. Simple interest is principal times rate times years. ")
    out = tmp_path / "r.json"
    assert main([str(tmp_path / "m"), "--passkey", "64", "128", "--passkey-trials", "3", "--passkey-filler",
                 str(filler), "--device", "cpu", "--out", str(out), "--no-card"]) == 0
    got = json.loads(out.read_text())["passkey"]
    assert sorted(got) == ["128", "64"] and all(r["n"] == 3 and 0 <= r["acc"] <= 1 for r in got.values())
    with pytest.raises(Exception, match="drop --url"):
        main([str(tmp_path / "m"), "--passkey", "64", "--url", "http://localhost:1"])
    with pytest.raises(Exception, match="nothing to evaluate"):
        main([str(tmp_path / "m")])
