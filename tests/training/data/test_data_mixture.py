"""PackedMixture: samples are exact slices of the EOS-joined stream, datasets mix by weight, the
validation split is disjoint and fixed, and the stream is a pure function of its index."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pangu_pi.tokenizer import tokenizer_hash
from pangu_pi.training.data import DataError, PackedMixture, iter_documents, prepare_shards, verify_dataset

SEQ = 31  # samples of 32 tokens


@pytest.fixture(scope="module")
def digest(tokenizer_dir) -> str:
    return tokenizer_hash(tokenizer_dir)


@pytest.fixture(scope="module")
def second(tokenizer_dir, tmp_path_factory) -> Path:
    """A small dataset unlike the first: short JSONL records."""
    root = tmp_path_factory.mktemp("second")
    lines = [json.dumps({"text": f"item {i} = {i * i} # square\n"}) + "\n" for i in range(300)]
    (root / "d.jsonl").write_text("".join(lines))
    return prepare_shards(tokenizer_dir, [str(root / "d.jsonl")], root / "ds", progress=False)


def stream(path: Path) -> np.ndarray:
    """The dataset's documents joined: each already ends with EOS."""
    info = verify_dataset(path, vocab_size=2048, tokenizer_hash=None)
    return np.concatenate(list(iter_documents(info))).astype(np.int64)


def mixture(datasets, digest, **kw) -> PackedMixture:
    if not isinstance(datasets, list):
        datasets = [{"path": str(datasets), "weight": 1.0}]
    kw = {"seq_len": SEQ, "eos_id": 2, "vocab_size": 2048, "tokenizer_hash": digest, **kw}
    return PackedMixture(datasets, **kw)


def test_samples_are_exact_slices_of_the_eos_joined_stream(prepared, digest):
    joined = stream(prepared)
    n = len(joined) // (SEQ + 1)
    assert len(verify_dataset(prepared, vocab_size=2048, tokenizer_hash=None).shards) > 1  # chunks cross shards
    m = mixture(prepared, digest, val_fraction=0)
    assert m.num_samples == n and m.num_tokens == n * (SEQ + 1)
    seen = []
    for i in range(n):
        d, epoch, c = m.locate(i)
        assert (d, epoch) == (0, 0)
        np.testing.assert_array_equal(m.sample(i), joined[c * (SEQ + 1) : (c + 1) * (SEQ + 1)])
        seen.append(c)
    assert sorted(seen) == list(range(n)), "one epoch visits every chunk exactly once"
    assert seen != sorted(seen), "chunks are shuffled"

    second_epoch = [m.locate(n + i)[2] for i in range(n)]
    assert m.locate(n)[1] == 1 and sorted(second_epoch) == list(range(n)) and second_epoch != seen
    assert m.state_dict()["epoch"] == 0
    m.samples_consumed = n
    assert m.state_dict()["epoch"] == 1


def test_a_batch_is_a_long_tensor_of_samples(prepared, digest):
    m = mixture(prepared, digest)
    batch = m.batch(10, 4)
    assert batch.dtype == torch.long and batch.shape == (4, SEQ + 1)
    assert torch.equal(batch[2], torch.from_numpy(m.sample(12)))
    assert int(batch.max()) < 2048


def test_validation_is_disjoint_from_training_and_fixed(prepared, digest):
    joined = stream(prepared)
    train = mixture(prepared, digest, val_fraction=0.02)
    val = mixture(prepared, digest, val_fraction=0.02, split="val")
    n = len(joined) // (SEQ + 1)
    assert len(val) == round(0.02 * n) >= 2
    val_chunks = {val.locate(i)[2] for i in range(len(val))}
    train_chunks = {train.locate(i)[2] for i in range(train.num_samples)}
    assert not val_chunks & train_chunks and val_chunks | train_chunks == set(range(n))
    for i in range(len(val)):
        c = val.locate(i)[2]
        assert torch.equal(val[i], torch.from_numpy(joined[c * (SEQ + 1) : (c + 1) * (SEQ + 1)]))

    again = mixture(prepared, digest, val_fraction=0.02, split="val")
    assert torch.equal(again.batch(0, len(again)), val.batch(0, len(val)))
    reseeded = mixture(prepared, digest, val_fraction=0.02, split="val", seed=1)
    assert {reseeded.locate(i)[2] for i in range(len(reseeded))} != val_chunks
    with pytest.raises(IndexError):
        val[len(val)]
    with pytest.raises(TypeError, match="endless"):
        len(train)


def test_datasets_mix_in_proportion_to_their_weights(prepared, second, digest):
    m = mixture([{"path": str(prepared), "weight": 3.0}, {"path": str(second), "weight": 1.0}], digest)
    which = np.array([m.locate(i)[0] for i in range(4000)])
    for end in (8, 100, 1000, 4000):  # every prefix is balanced, not just the long run
        assert abs(np.count_nonzero(which[:end] == 0) - 0.75 * end) <= 1
    assert abs(np.count_nonzero(which[4000 - 8 :] == 0) - 6) <= 1
    # the small dataset is repeated: it starts new epochs while the large one is still in its first
    small = m.datasets[1].num_tokens // (SEQ + 1)
    assert small < 300 and m.epochs(1200) == [0, 1]  # 900 of ~1100 chunks, and 300 of ~160
    data = m.batch(0, 16)
    for i in range(16):
        d, _, c = m.locate(i)
        joined = stream([prepared, second][d])
        assert torch.equal(data[i], torch.from_numpy(joined[c * (SEQ + 1) : (c + 1) * (SEQ + 1)]))


def test_the_stream_is_a_pure_function_of_seed_and_index(prepared, second, digest):
    spec = [{"path": str(prepared), "weight": 2.0}, {"path": str(second), "weight": 1.0}]
    a, b = mixture(spec, digest), mixture(spec, digest)
    assert torch.equal(a.batch(500, 32), b.batch(500, 32))
    assert torch.equal(a.batch(500, 32)[7], torch.from_numpy(b.sample(507)))
    assert not torch.equal(mixture(spec, digest, seed=1).batch(0, 32), a.batch(0, 32))


def test_ranks_read_disjoint_slices_of_one_global_stream(prepared, digest):
    whole = mixture(prepared, digest)
    ranks = [mixture(prepared, digest) for _ in range(2)]
    for step in range(3):
        got = torch.cat([ranks[r].next_batch(4, rank=r, world_size=2) for r in range(2)])
        assert torch.equal(got, whole.batch(step * 8, 8))
    assert all(r.samples_consumed == 24 for r in ranks)


def test_resuming_from_a_state_dict_continues_the_same_samples(prepared, second, digest):
    spec = [{"path": str(prepared), "weight": 1.0}, {"path": str(second), "weight": 1.0}]
    run = mixture(spec, digest)
    for _ in range(5):
        run.next_batch(8)
    state = json.loads(json.dumps(run.state_dict()))
    assert state["samples_consumed"] == 40 and {"epoch", "seed", "seq_len"} <= set(state)

    resumed = mixture(spec, digest)
    resumed.load_state_dict(state)
    for _ in range(3):
        assert torch.equal(resumed.next_batch(8), run.next_batch(8))

    other = mixture(spec, digest, seed=3)
    with pytest.warns(UserWarning, match="different seed"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="no samples_consumed"):
        other.load_state_dict({"epoch": 1})


def test_a_pickled_mixture_reopens_its_files_instead_of_copying_them(prepared, digest):
    m = mixture(prepared, digest)
    first = m.batch(0, 4)
    blob = pickle.dumps(m)
    token_bytes = verify_dataset(prepared, vocab_size=2048, tokenizer_hash=None).num_tokens * 2
    assert len(blob) < token_bytes / 2
    assert torch.equal(pickle.loads(blob).batch(0, 4), first)


@pytest.mark.parametrize(
    "datasets, kw, message",
    [
        ([{"path": "DS", "weight": 0}], {}, r"weight 0; weights must be positive"),
        ([{"path": "DS", "weight": "heavy"}], {}, r"weight 'heavy'"),
        ([{"path": "DS", "wieght": 1}], {}, r"unknown key\(s\) 'wieght'.*`path` and `weight`"),
        ([{"weight": 1}], {}, r"needs a path"),
        ([], {}, r"no datasets given"),
        ([{"path": "DS"}], {"eos_id": 5}, r"EOS id 2, the model's EOS id is 5"),
        ([{"path": "DS"}], {"seq_len": 100_000}, r"too few for 1 validation and 1 training sample.*lower seq_len"),
        ([{"path": "DS"}], {"split": "test"}, r"split must be 'train' or 'val'"),
        ([{"path": "DS"}], {"split": "val", "val_fraction": 0}, r"val_fraction = 0"),
        ([{"path": "DS"}], {"tokenizer_hash": "0123456789abcdef"}, r"another tokenizer"),
        ([{"path": "DS"}, {"path": "DS", "weight": 1e-6}], {}, r"never be sampled"),
    ],
)
def test_a_bad_dataset_spec_is_refused(prepared, digest, datasets, kw, message):
    datasets = [{k: (str(prepared) if v == "DS" else v) for k, v in d.items()} for d in datasets]
    with pytest.raises(DataError, match=message):
        mixture(datasets, digest, **kw)
