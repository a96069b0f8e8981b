"""verify_dataset: a dataset the model cannot train on is refused with one message naming the file,
the problem and the fix; a good one is described."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pangu_pi.tokenizer import tokenizer_hash
from pangu_pi.training.data import DataError, prepare_shards, verify_dataset
from pangu_pi.training.data.shards import HEADER_SIZE, MANIFEST, ShardHeader


@pytest.fixture
def dataset(prepared, tmp_path) -> Path:
    """A copy of the prepared dataset that a test may damage."""
    return Path(shutil.copytree(prepared, tmp_path / "ds"))


@pytest.fixture
def digest(tokenizer_dir) -> str:
    return tokenizer_hash(tokenizer_dir)


def first_shard(path: Path) -> Path:
    return path / f"{json.loads((path / MANIFEST).read_text())['shards'][0]['name']}.bin"


def test_a_good_dataset_is_described(dataset, digest):
    info = verify_dataset(dataset, vocab_size=2048, tokenizer_hash=digest)
    manifest = json.loads((dataset / MANIFEST).read_text())
    assert [s.name for s in info.shards] == [e["name"] for e in manifest["shards"]]
    assert info.num_tokens == sum(e["n_tokens"] for e in manifest["shards"]) > 0
    assert info.num_docs == 10 and info.eos_id == 2 and info.dtype == "uint16" and info.tokenizer_hash == digest


def test_a_truncated_shard_is_refused(dataset, digest):
    shard = first_shard(dataset)
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(DataError, match=rf"shard {shard} is truncated.*promises.*pangu-pi data prepare"):
        verify_dataset(dataset, vocab_size=2048, tokenizer_hash=digest)


def test_a_shard_shorter_than_its_header_is_refused(dataset, digest):
    shard = first_shard(dataset)
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(DataError, match=rf"shard {shard} is truncated: 10 bytes, shorter than its 64-byte header"):
        verify_dataset(dataset, vocab_size=2048, tokenizer_hash=digest)


def test_a_truncated_index_is_refused(dataset, digest):
    index = first_shard(dataset).with_suffix(".idx")
    index.write_bytes(index.read_bytes()[:-8])
    with pytest.raises(DataError, match=rf"index {index} is truncated"):
        verify_dataset(dataset, vocab_size=2048, tokenizer_hash=digest)


def test_a_shard_from_another_tokenizer_is_refused(big_vocab_tokenizer, tmp_path, digest):
    (tmp_path / "a.txt").write_text("w1 w2 w3")
    other = prepare_shards(big_vocab_tokenizer, [str(tmp_path / "a.txt")], tmp_path / "other", progress=False)
    with pytest.raises(DataError, match=rf"{other}/shard-\w+\.bin was tokenized with another tokenizer "
                                        rf"\(hash {tokenizer_hash(big_vocab_tokenizer)}.*{digest}\).*--tokenizer"):
        verify_dataset(other, vocab_size=100_000, tokenizer_hash=digest)


def test_token_ids_outside_the_vocabulary_are_refused(dataset, digest):
    shard = first_shard(dataset)
    tokens = np.memmap(shard, dtype="<u2", mode="r+", offset=HEADER_SIZE)
    tokens[5] = 3000
    tokens.flush()
    del tokens
    with pytest.raises(DataError, match=rf"{shard} holds token id 3000 \(first bad id at token 5\), outside the "
                                        rf"model's vocab_size 2048"):
        verify_dataset(dataset, vocab_size=2048, tokenizer_hash=digest)


def test_a_tokenizer_larger_than_the_model_is_refused(dataset, digest):
    with pytest.raises(DataError, match=r"tokenizer of 2048 tokens, more than the model's vocab_size 1000"):
        verify_dataset(dataset, vocab_size=1000, tokenizer_hash=digest)


def test_a_file_that_is_not_a_shard_is_refused(dataset, digest):
    shard = first_shard(dataset)
    shard.write_bytes(b"GARBAGE!" + shard.read_bytes()[8:])
    with pytest.raises(DataError, match=r"is not a pangu-pi token shard"):
        verify_dataset(dataset, vocab_size=2048, tokenizer_hash=digest)


def test_a_shard_of_another_format_version_is_refused(dataset, digest):
    shard = first_shard(dataset)
    header = ShardHeader.read(shard)
    raw = shard.read_bytes()
    shard.write_bytes(ShardHeader(**{**header.__dict__, "version": 99}).pack() + raw[HEADER_SIZE:])
    with pytest.raises(DataError, match=r"format version 99, this code reads version 1"):
        verify_dataset(dataset, vocab_size=2048, tokenizer_hash=digest)


def test_a_folder_that_is_not_a_dataset_is_refused(tmp_path, digest):
    with pytest.raises(DataError, match=r"does not exist; make it with `pangu-pi data prepare"):
        verify_dataset(tmp_path / "nowhere", vocab_size=2048, tokenizer_hash=digest)
    with pytest.raises(DataError, match=r"is not a prepared dataset \(manifest.json missing\)"):
        verify_dataset(tmp_path, vocab_size=2048, tokenizer_hash=digest)


def test_a_missing_shard_file_is_refused(dataset, digest):
    shard = first_shard(dataset)
    shard.unlink()
    with pytest.raises(DataError, match=rf"shard file {shard} is missing"):
        verify_dataset(dataset, vocab_size=2048, tokenizer_hash=digest)


def test_damage_after_a_successful_check_is_still_caught(dataset, digest):
    verify_dataset(dataset, vocab_size=2048, tokenizer_hash=digest)
    shard = first_shard(dataset)
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        verify_dataset(dataset, vocab_size=2048, tokenizer_hash=digest)
