"""Fixtures for the data pipeline: small inputs of every kind, and a tokenizer too big for uint16."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> list[Path]:
    """A few stdlib sources copied into a folder of their own (so their paths and mtimes stay put)."""
    from pangu_pi.corpus import default_corpus_files

    root = tmp_path_factory.mktemp("text")
    files = []
    for n, src in enumerate(default_corpus_files(limit_bytes=120_000)[:12]):
        dst = root / f"{n:02d}_{src.name}"
        dst.write_bytes(src.read_bytes())
        files.append(dst)
    return files


@pytest.fixture(scope="session")
def prepared(tokenizer_dir, text_files, tmp_path_factory) -> Path:
    """A dataset of several shards made from `text_files`."""
    from pangu_pi.training.data import prepare_shards

    return prepare_shards(tokenizer_dir, [str(f) for f in text_files], tmp_path_factory.mktemp("ds") / "ds",
                          progress=False, shard_bytes=30_000)


@pytest.fixture(scope="session")
def big_vocab_tokenizer(tmp_path_factory) -> Path:
    """A word-level tokenizer of 70,000 entries, whose ids need uint32; its words are w0 … w69995."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(70_000 - 4)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    out = tmp_path_factory.mktemp("bigtok")
    tok.save(str(out / "tokenizer.json"))
    return out

