"""prepare_shards: what goes in comes out as the tokenizer's ids, from every input kind, in order,
the same with any number of workers, and a re-run or a killed run redoes only what is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pangu_pi.training.data import DataError, iter_documents, prepare_shards, token_dtype, verify_dataset
from pangu_pi.training.data.shards import HEADER_SIZE, MANIFEST, ShardHeader
from pangu_pi.training.data.sources import Part, read_part, split_file


def documents(path: Path) -> list[list[int]]:
    info = verify_dataset(path, vocab_size=2**32, tokenizer_hash=None)
    return [d.tolist() for d in iter_documents(info)]


def expected_documents(tokenizer_dir: Path, texts: list[str]) -> list[list[int]]:
    from pangu_pi.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    return [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]


def dataset_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.name != MANIFEST}


def test_tokens_round_trip_to_the_tokenizers_ids_in_input_order(prepared, text_files, tokenizer_dir):
    manifest = json.loads((prepared / MANIFEST).read_text())
    assert manifest["complete"] and len(manifest["shards"]) >= 3, "the fixture should span several shards"
    texts = [f.read_text() for f in text_files]
    assert documents(prepared) == expected_documents(tokenizer_dir, texts)

    from pangu_pi.tokenizer import tokenizer_hash

    header = ShardHeader.read(prepared / f"{manifest['shards'][0]['name']}.bin")
    assert (header.itemsize, header.vocab_size, header.eos_id) == (2, 2048, 2)
    assert header.tokenizer_hash == tokenizer_hash(tokenizer_dir) == manifest["tokenizer_hash"]


def test_token_width_follows_the_vocabulary_size():
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


def test_a_vocabulary_over_65535_is_stored_as_uint32(big_vocab_tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("w69995 w5 w65540\nw0")
    out = prepare_shards(big_vocab_tokenizer, [str(tmp_path / "a.txt")], tmp_path / "ds", progress=False)
    info = verify_dataset(out, vocab_size=70_000, tokenizer_hash=None)
    assert info.dtype == "uint32" and info.shards[0].header.itemsize == 4
    assert (out / f"{info.shards[0].name}.bin").stat().st_size == HEADER_SIZE + 5 * 4
    assert documents(out) == [[69999, 9, 65544, 4, 2]]


def _jsonl_line(i: int) -> str:
    # 50 bytes a line, so some split points fall exactly on a line start
    return json.dumps({"text": f"doc {i:04d}" + "x" * 29}) + "\n"


@pytest.mark.parametrize("shard_bytes", [50, 100, 137, 1000, 10**6])
def test_jsonl_split_at_byte_offsets_loses_and_repeats_no_line(tmp_path, shard_bytes):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(_jsonl_line(i) for i in range(40)))
    parts = split_file(path, shard_bytes)
    assert len(parts) == -(-path.stat().st_size // shard_bytes)
    got = [doc for part in parts for doc in read_part(part, "text")]
    assert got == [json.loads(_jsonl_line(i))["text"] for i in range(40)]


def test_gzipped_jsonl_is_read_whole(tmp_path):
    import gzip

    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(_jsonl_line(i) for i in range(40)))
    parts = split_file(path, 100)
    assert len(parts) == 1 and parts[0].kind == "jsonl"
    assert list(read_part(parts[0], "text")) == [json.loads(_jsonl_line(i))["text"] for i in range(40)]


def test_jsonl_with_a_named_field(tokenizer_dir, tmp_path):
    records = [{"id": i, "body": f"def f{i}(x):\n    return x * {i}\n", "text": "not this"} for i in range(60)]
    records.insert(7, {"id": -1, "body": "   "})  # blank: no document
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    out = prepare_shards(tokenizer_dir, [str(tmp_path / "d.jsonl")], tmp_path / "ds", text_field="body",
                         progress=False, shard_bytes=500)
    assert len(verify_dataset(out, vocab_size=2048, tokenizer_hash=None).shards) > 1
    bodies = [r["body"] for r in records if r["body"].strip()]
    assert documents(out) == expected_documents(tokenizer_dir, bodies)


def test_jsonl_without_the_field_names_it_and_the_option(tokenizer_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl.*no field 'text'.*'content'.*--text-field"):
        prepare_shards(tokenizer_dir, [str(tmp_path / "d.jsonl")], tmp_path / "ds", progress=False)
    (tmp_path / "e.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"e\.jsonl \(byte offset 17\) is not valid JSON"):
        prepare_shards(tokenizer_dir, [str(tmp_path / "e.jsonl")], tmp_path / "ds2", progress=False)


def test_parquet_split_by_row_groups_with_a_named_column(tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"class C{i}:\n    value = {i}\n" for i in range(30)]
    column = texts[:10] + [None] + texts[10:]  # a null row: no document
    pq.write_table(pa.table({"content": column, "n": list(range(31))}), tmp_path / "d.parquet", row_group_size=8)
    assert len(split_file(tmp_path / "d.parquet", 1)) == 4
    out = prepare_shards(tokenizer_dir, [str(tmp_path / "d.parquet")], tmp_path / "ds", text_field="content",
                         progress=False, shard_bytes=1)
    assert len(verify_dataset(out, vocab_size=2048, tokenizer_hash=None).shards) == 4
    assert documents(out) == expected_documents(tokenizer_dir, texts)
    with pytest.raises(DataError, match=r"no column 'text' \(it has: content, n\).*--text-field"):
        prepare_shards(tokenizer_dir, [str(tmp_path / "d.parquet")], tmp_path / "ds2", progress=False)


def test_directories_and_globs_expand_in_order_and_skip_binary_files(tokenizer_dir, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha = 1\n")
    (src / "sub" / "c.md").write_text("# gamma\n")
    (src / "b.png").write_bytes(b"\x89PNG\x00\x00\x01")
    (tmp_path / "z1.txt").write_text("zeta = 1\n")
    (tmp_path / "z2.txt").write_text("zeta = 2\n")
    out = prepare_shards(tokenizer_dir, [str(src), str(tmp_path / "z*.txt")], tmp_path / "ds", progress=False)
    texts = ["alpha = 1\n", "# gamma\n", "zeta = 1\n", "zeta = 2\n"]
    assert documents(out) == expected_documents(tokenizer_dir, texts)


def test_no_inputs_means_the_embedded_corpus(tokenizer_dir, text_files, tmp_path, monkeypatch):
    import pangu_pi.corpus

    monkeypatch.setattr(pangu_pi.corpus, "default_corpus_files", lambda limit_bytes=None: text_files[:2])
    out = prepare_shards(tokenizer_dir, None, tmp_path / "ds", progress=False)
    assert documents(out) == expected_documents(tokenizer_dir, [f.read_text() for f in text_files[:2]])


def test_two_workers_write_the_same_shards_as_one(prepared, tokenizer_dir, text_files, tmp_path):
    out = prepare_shards(tokenizer_dir, [str(f) for f in text_files], tmp_path / "ds", workers=2,
                         progress=False, shard_bytes=30_000)
    assert dataset_bytes(out) == dataset_bytes(prepared)
    assert json.loads((out / MANIFEST).read_text()) == json.loads((prepared / MANIFEST).read_text())


KILL_MID_SHARD = textwrap.dedent("""
    import os, signal, sys
    import pangu_pi.training.data.encode as encode
    from pangu_pi.training.data import prepare_shards

    encode.BATCH_DOCS = 1  # one document per write, so a shard is written in several steps
    real_batches, units = encode._batches, []

    def batches_then_die(unit, *args):
        units.append(unit)
        for n, batch in enumerate(real_batches(unit, *args)):
            if len(units) == 3 and n == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # the third shard is half written
            yield batch

    encode._batches = batches_then_die
    tokenizer, out, *inputs = sys.argv[1:]
    prepare_shards(tokenizer, inputs, out, progress=False, shard_bytes=30_000)
""")


def test_a_killed_run_resumes_redoing_only_the_unfinished_shard(prepared, tokenizer_dir, text_files, tmp_path):
    out = tmp_path / "ds"
    run = subprocess.run([sys.executable, "-c", KILL_MID_SHARD, str(tokenizer_dir), str(out), *map(str, text_files)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    assert any(f.name.startswith(".shard-") and ".tmp." in f.name for f in out.iterdir()), "no partial output left"
    with pytest.raises(DataError, match=r"unfinished \(2 of 4 shards written\).*re-run"):
        verify_dataset(out, vocab_size=2048, tokenizer_hash=None)

    first = out / f"{manifest['shards'][0]['name']}.bin"
    before = first.stat().st_mtime_ns
    prepare_shards(tokenizer_dir, [str(f) for f in text_files], out, progress=False, shard_bytes=30_000)
    assert first.stat().st_mtime_ns == before, "a finished shard was redone"
    assert dataset_bytes(out) == dataset_bytes(prepared)  # the partial file is gone, the rest is whole


def test_a_rerun_skips_finished_shards_and_rebuilds_a_truncated_one(tokenizer_dir, text_files, tmp_path):
    inputs = [str(f) for f in text_files]
    out = prepare_shards(tokenizer_dir, inputs, tmp_path / "ds", progress=False, shard_bytes=30_000)
    good = dataset_bytes(out)
    shards = sorted(out.glob("shard-*.bin"))
    mtimes = {f: f.stat().st_mtime_ns for f in shards}
    victim = shards[1]
    os.truncate(victim, victim.stat().st_size - 10)

    prepare_shards(tokenizer_dir, inputs, out, progress=False, shard_bytes=30_000)
    assert dataset_bytes(out) == good
    assert victim.stat().st_mtime_ns != mtimes[victim]
    assert all(f.stat().st_mtime_ns == mtimes[f] for f in shards if f != victim)


def test_other_inputs_are_refused_and_with_force_replace_only_the_old_shards(tokenizer_dir, text_files, tmp_path):
    out = prepare_shards(tokenizer_dir, [str(text_files[0])], tmp_path / "ds", progress=False)
    (out / "important.txt").write_text("mine")
    with pytest.raises(DataError, match=r"ds holds a dataset prepared from other inputs or settings.*--force"):
        prepare_shards(tokenizer_dir, [str(text_files[1])], out, progress=False)
    with pytest.raises(DataError, match="other inputs or settings"):
        prepare_shards(tokenizer_dir, [str(text_files[0])], out, progress=False, text_field="body")
    assert documents(out) == expected_documents(tokenizer_dir, [text_files[0].read_text()])
    prepare_shards(tokenizer_dir, [str(text_files[1])], out, progress=False, force=True)
    assert (out / "important.txt").read_text() == "mine"
    assert len(list(out.glob("shard-*"))) == 2  # one .bin and one .idx: the first input's shard was removed
    assert documents(out) == expected_documents(tokenizer_dir, [text_files[1].read_text()])


def test_a_folder_it_did_not_write_is_refused_even_with_force(tokenizer_dir, text_files, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "important.txt").write_text("mine")
    (theirs / "shard-0000000000000000.bin").write_bytes(b"not ours")
    for force in (False, True):
        with pytest.raises(DataError, match=r"theirs is not empty and holds no dataset `pangu-pi data prepare` wrote"):
            prepare_shards(tokenizer_dir, [str(text_files[0])], theirs, progress=False, force=force)
    assert sorted(f.name for f in theirs.iterdir()) == ["important.txt", "shard-0000000000000000.bin"]


def test_a_missing_tokenizer_is_named(tmp_path, text_files):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*pangu-pi tokenizer train"):
        prepare_shards(tmp_path / "nothing", [str(text_files[0])], tmp_path / "ds", progress=False)


def test_parts_are_planned_from_inputs_alone(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(_jsonl_line(i) for i in range(10)))
    parts = split_file(tmp_path / "a.jsonl", 200)
    assert [(p.start, p.end) for p in parts] == [(0, 200), (200, 400), (400, 500)]
    assert all(isinstance(p, Part) and p.kind == "jsonl" for p in parts)


def test_the_default_shard_size_follows_the_input_size_alone():
    from pangu_pi.training.data.prepare import MAX_SHARD_BYTES, MIN_SHARD_BYTES, auto_shard_bytes

    assert auto_shard_bytes(11_000_000) == MIN_SHARD_BYTES  # the embedded corpus: about 11 shards
    assert auto_shard_bytes(320 << 20) == 20 << 20
    assert auto_shard_bytes(100 << 30) == MAX_SHARD_BYTES


@pytest.mark.slow  # three interpreters start, two of them spawned workers: ~30 s on a busy 2-core machine
def test_an_unguarded_script_with_workers_fails_fast_instead_of_hanging(tokenizer_dir, text_files, tmp_path):
    # spawned workers re-import the main script; its unguarded call must not wait forever on the lock
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from pangu_pi.training.data import prepare_shards\n"
        f"prepare_shards({str(tokenizer_dir)!r}, {[str(f) for f in text_files]!r}, {str(tmp_path / 'ds')!r}, "
        "workers=2, progress=False, shard_bytes=30_000)\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 1
    assert "called while a worker process was importing the main script" in run.stderr
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line.startswith("pangu_pi.training.data.shards.DataError: a tokenizing worker")
