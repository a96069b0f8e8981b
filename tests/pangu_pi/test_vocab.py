"""Tokenizer extension and model resizing (YunShan's vocabulary growth)."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

import pangu_pi
from pangu_pi import PanGuPiConfig, PanGuPiForCausalLM
from pangu_pi.cli import UserError
from pangu_pi.tokenizer import load_tokenizer
from pangu_pi.vocab import extend_main, extend_tokenizer, resize_main, resize_model

TERMS = ["amortization", "indemnification", "collateralized", "arbitration", "fiduciary"]
TERMS += ["债券收益率", "诉讼时效"]  # Chinese terms: characters the base vocabulary lacks
FILLER = ["the", "loan", "clause", "court", "bank", "rate", "party", "deposit", "contract", "claim"]


@pytest.fixture(scope="session")
def base_tokenizer(tokenizer_dir):
    return tokenizer_dir


@pytest.fixture(scope="session")
def domain_file(tmp_path_factory):
    rng = random.Random(0)
    lines = []
    for _ in range(1500):
        words = rng.sample(TERMS, 2) + rng.sample(FILLER, 4)
        rng.shuffle(words)
        lines.append(" ".join(words) + f" {rng.randint(1, 999)}%。")
    path = tmp_path_factory.mktemp("domain") / "domain.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def extended(base_tokenizer, domain_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ext") / "tokenizer"
    report = extend_tokenizer(base_tokenizer, [domain_file], 60, out, progress=False)
    return out, report


def test_extension_keeps_every_old_id_and_special(base_tokenizer, extended):
    out, report = extended
    old, new = load_tokenizer(base_tokenizer), load_tokenizer(out)
    assert report.new_size == report.base_size + 60 == len(new)
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    assert all(new_vocab[piece] == i for piece, i in old_vocab.items())
    for name in ("unk", "bos", "eos", "pad"):
        assert getattr(new, f"{name}_token_id") == getattr(old, f"{name}_token_id")
    assert new.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [4, 5]
    # Text the base already knew (code) splits exactly as before.
    code = "def f(x):\n    return x * 2  # doubled\n"
    assert new(code)["input_ids"] == old(code)["input_ids"]


def test_extension_makes_domain_terms_single_tokens(base_tokenizer, extended):
    out, _ = extended
    old, new = load_tokenizer(base_tokenizer), load_tokenizer(out)
    for term in TERMS:
        text = " " + term
        assert len(old(text, add_special_tokens=False)["input_ids"]) > 1, term
        assert len(new(text, add_special_tokens=False)["input_ids"]) == 1, term


def test_extension_lowers_tokens_per_char_and_round_trips(base_tokenizer, domain_file, extended):
    out, report = extended
    assert report.tokens_per_char_after < 0.7 * report.tokens_per_char_before
    assert report.roundtrip_ok
    # Measured independently of the report, on lines it may or may not have held out.
    old, new = load_tokenizer(base_tokenizer), load_tokenizer(out)
    sample = domain_file.read_text(encoding="utf-8").splitlines()[:50]
    n_old = sum(len(old(s)["input_ids"]) for s in sample)
    n_new = sum(len(new(s)["input_ids"]) for s in sample)
    assert n_new < n_old
    for s in sample + ["债券 unseen 字符 ünïcödé\ttabs  and   spaces"]:
        assert new.decode(new(s)["input_ids"]) == s
    saved = json.loads((out / "extension.json").read_text())
    assert saved["added"] == report.added and saved["base_size"] == report.base_size


def test_spm_model_grows_in_step(extended):
    import sentencepiece as spm

    out, report = extended
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    new = load_tokenizer(out)
    assert sp.get_piece_size() == len(new)
    assert [sp.id_to_piece(i) for i in range(report.base_size, len(new))] == report.added


def test_second_extension_keeps_the_first(extended, tmp_path):
    out, report = extended
    more = tmp_path / "more.txt"
    more.write_text("\n".join(f"hypothecation rehypothecation clause {i}" for i in range(200)), encoding="utf-8")
    again = extend_tokenizer(out, [more], 5, tmp_path / "again", progress=False)
    first, second = load_tokenizer(out).get_vocab(), load_tokenizer(tmp_path / "again").get_vocab()
    assert all(second[p] == i for p, i in first.items())
    assert again.base_size == report.new_size and again.new_size == report.new_size + 5


def test_extend_cli_refuses_bad_input(base_tokenizer, domain_file, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extend_main(
            [
                "--base",
                str(base_tokenizer),
                "--input",
                str(tmp_path / "nope.txt"),
                "--add",
                "5",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    with pytest.raises(UserError, match="at least 1"):
        extend_main(
            ["--base", str(base_tokenizer), "--input", str(domain_file), "--add", "0", "--out", str(tmp_path / "o")]
        )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="taken is not empty and was not written by `pangu-pi tokenizer extend`"):
        extend_main(
            ["--base", str(base_tokenizer), "--input", str(domain_file), "--add", "5", "--out", str(tmp_path / "taken")]
        )


@pytest.fixture(scope="module")
def small_model(base_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    tok = load_tokenizer(base_tokenizer)
    model = PanGuPiForCausalLM(
        PanGuPiConfig.from_preset("tiny", vocab_size=len(tok), num_hidden_layers=2, siaf_backend="reference")
    )
    path = tmp_path_factory.mktemp("model") / "base"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_resized_model_keeps_logits_and_starts_new_rows_at_the_mean(small_model, base_tokenizer, extended, tmp_path):
    from transformers import AutoModelForCausalLM

    out, report = extended
    info = resize_model(small_model, out, tmp_path / "resized", progress=False)
    old_model = AutoModelForCausalLM.from_pretrained(small_model).eval()
    new_model = AutoModelForCausalLM.from_pretrained(tmp_path / "resized").eval()
    assert new_model.config.vocab_size == report.new_size
    assert new_model.lm_head.weight.shape[0] == report.new_size

    text = "import os\nfor name in os.listdir(path):\n    print(name)\n"
    ids = torch.tensor([load_tokenizer(base_tokenizer)(text)["input_ids"]])
    assert load_tokenizer(tmp_path / "resized")(text)["input_ids"] == ids[0].tolist()  # old tokens only
    with torch.no_grad():
        before, after = old_model(ids).logits, new_model(ids).logits
    torch.testing.assert_close(after[..., : report.base_size], before, rtol=0, atol=1e-5)

    old_tok = load_tokenizer(base_tokenizer)
    new_tok = load_tokenizer(tmp_path / "resized")
    for term in ("arbitration", "债券收益率"):
        piece_id = new_tok(" " + term, add_special_tokens=False)["input_ids"]
        assert len(piece_id) == 1
        parts = old_tok(" " + term, add_special_tokens=False)["input_ids"]
        assert info["spelled"][new_tok.convert_ids_to_tokens(piece_id[0])] == parts
        for weight, old_weight in (
            (new_model.model.embed_tokens.weight, old_model.model.embed_tokens.weight),
            (new_model.lm_head.weight, old_model.lm_head.weight),
        ):
            torch.testing.assert_close(weight[piece_id[0]], old_weight[parts].mean(0))


def test_resize_refuses_a_tokenizer_that_is_not_an_extension(small_model, extended, tmp_path, capsys):
    out, _ = extended
    foreign = tmp_path / "foreign"
    shutil.copytree(out, foreign)
    data = json.loads((foreign / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    a, b = "▁the", "▁return"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (foreign / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError, match="does not extend the model's tokenizer"):
        resize_model(small_model, foreign, tmp_path / "out", progress=False)

    # Through the command line: one line naming the problem, no traceback.
    assert (
        pangu_pi.cli.main(["resize", str(tmp_path / "missing"), "--tokenizer", str(out), "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("pangu-pi resize: error:") and "config.json" in err and len(err.splitlines()) == 1


def test_resize_cli_writes_a_loadable_checkpoint(small_model, extended, tmp_path, capsys):
    out, report = extended
    assert resize_main([str(small_model), "--tokenizer", str(out), "--out", str(tmp_path / "r")]) == 0
    assert f"{report.base_size} -> {report.new_size}" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    tok = load_tokenizer(tmp_path / "r")
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
