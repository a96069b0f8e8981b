import json
import multiprocessing as mp

import pytest
from transformers import AutoTokenizer

from pangu_pi.corpus import default_corpus_files
from pangu_pi.tokenizer import (
    EOS,
    IM_END,
    IM_START,
    generation_config,
    load_tokenizer,
    stop_token_ids,
    tokenizer_facts,
    train_tokenizer,
)


def test_loads_with_auto_tokenizer_and_knows_its_specials(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 2048
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids([IM_START, IM_END]) == [4, 5]
    assert "chat_template" in json.loads((tokenizer_dir / "tokenizer_config.json").read_text()) or (
        tokenizer_dir / "chat_template.jinja"
    ).exists()


def test_source_code_round_trips_exactly(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    # Files the tokenizer was not trained on (the tail of the corpus), plus text it has never seen.
    samples = [f.read_text(errors="replace") for f in default_corpus_files()[-40:]]
    samples += ["tabs\tand  double  spaces\n\n\ntrailing   ", "ünïcödé, 中文, emoji 🚀, nul-free"]
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


def test_special_tokens_are_single_ids_and_skippable(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    text = f"{IM_START}user\nhello{IM_END}\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == 4 and 5 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhello\n"


def test_stop_ids_are_eos_and_end_of_turn_from_either_tokenizer_class(tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer

    tok = load_tokenizer(tokenizer_dir)
    want = tok.convert_tokens_to_ids([EOS, IM_END])
    assert stop_token_ids(tok) == want and len(set(want)) == 2
    assert stop_token_ids(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))) == want
    # A vocabulary without <|im_end|> (as an imported tokenizer may be) stops at EOS alone, not at <unk>.
    text = (tokenizer_dir / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(text.replace(json.dumps(IM_END), json.dumps("<|end|>")))
    assert stop_token_ids(Tokenizer.from_file(str(tmp_path / "tokenizer.json"))) == want[:1]


def test_generation_config_stops_at_both_ends_from_either_tokenizer_class(tokenizer_dir):
    from tokenizers import Tokenizer

    tok = load_tokenizer(tokenizer_dir)
    for source in (tok, Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))):
        config = generation_config(source)
        assert config.eos_token_id == tok.convert_tokens_to_ids([EOS, IM_END])
        assert (config.bos_token_id, config.pad_token_id) == (tok.bos_token_id, tok.pad_token_id)
    assert generation_config(tok, bos_token_id=7).bos_token_id == 7


def test_tokenizer_facts_name_what_is_missing(tokenizer_dir, tmp_path):
    from pangu_pi.errors import UserError
    from pangu_pi.tokenizer import tokenizer_hash

    facts = tokenizer_facts(tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    assert (facts.vocab_size, facts.require_eos(), facts.hash) == (len(tok), tok.eos_token_id,
                                                                   tokenizer_hash(tokenizer_dir))
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*pangu-pi tokenizer train --out"):
        tokenizer_facts(tmp_path)
    text = (tokenizer_dir / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(text.replace(json.dumps(EOS), json.dumps("<end>")))
    with pytest.raises(UserError, match="has no end-of-document token"):
        tokenizer_facts(tmp_path).require_eos()


def test_chat_template_renders_chatml(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHi{IM_END}\n{IM_START}assistant\n"


def _train(out, files, queue):
    train_tokenizer(files, out, vocab_size=600, max_bytes=300_000, progress=False)
    queue.put(str(out))


def test_concurrent_training_into_one_folder_is_safe(tmp_path):
    files = default_corpus_files(limit_bytes=400_000)
    out = tmp_path / "tok"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_train, args=(out, files, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    assert queue.qsize() == 2
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("x = 1\n", add_special_tokens=False)) == "x = 1\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tok.")]  # no staging folder left


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "tok")
