"""Tokenize one unit of input into one shard. Runs in worker processes, so it imports only what it needs.

Output goes to hidden temporary names and is renamed into place once complete: a killed worker
leaves only a temporary file behind, which the next run deletes and redoes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .shards import HEADER_SIZE, ShardHeader, bin_path, idx_path, token_dtype
from .sources import Unit, read_part

# Documents are encoded in batches: large enough for the Rust tokenizer to use its threads well,
# small enough that a unit of many short documents never holds all their encodings at once.
BATCH_CHARS = 1 << 20
BATCH_DOCS = 1024


@dataclass(frozen=True)
class EncodeSpec:
    tokenizer_json: str
    out_dir: str
    eos_id: int
    vocab_size: int
    tokenizer_hash: str
    text_field: str


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        from tokenizers import Tokenizer

        _TOKENIZERS[path] = Tokenizer.from_file(path)
    return _TOKENIZERS[path]


def init_worker(tokenizer_json: str) -> None:
    # each worker is one of several processes already; the tokenizer's own threads would oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _tokenizer(tokenizer_json)


def _batches(unit: Unit, text_field: str, on_bytes: Callable[[int], None] | None):
    batch, chars = [], 0
    for part in unit.parts:
        for doc in read_part(part, text_field):
            batch.append(doc)
            chars += len(doc)
            if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
                yield batch
                batch, chars = [], 0
        if on_bytes is not None:
            on_bytes(part.size)
    if batch:
        yield batch


def encode_unit(unit: Unit, spec: EncodeSpec, on_bytes: Callable[[int], None] | None = None) -> dict:
    """Write the shard for `unit` and return its manifest entry."""
    tok = _tokenizer(spec.tokenizer_json)
    dtype = token_dtype(spec.vocab_size)
    out = Path(spec.out_dir)
    final_bin, final_idx = bin_path(out, unit.name), idx_path(out, unit.name)
    tmp_bin = final_bin.with_name(f".{final_bin.name}.tmp.{os.getpid()}")
    tmp_idx = final_idx.with_name(f".{final_idx.name}.tmp.{os.getpid()}")
    offsets = [0]
    n_tokens = 0
    try:
        with open(tmp_bin, "wb") as fb:
            fb.write(b"\x00" * HEADER_SIZE)  # filled in once the counts are known
            for batch in _batches(unit, spec.text_field, on_bytes):
                encodings = tok.encode_batch_fast(batch, add_special_tokens=False)
                lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
                flat = np.empty(int(lengths.sum()), dtype=dtype)
                ends = np.cumsum(lengths)
                for e, end, n in zip(encodings, ends, lengths):
                    flat[end - n : end - 1] = e.ids
                flat[ends - 1] = spec.eos_id
                flat.tofile(fb)
                offsets.extend((n_tokens + ends).tolist())
                n_tokens += int(ends[-1])
            header = ShardHeader(dtype.itemsize, spec.vocab_size, spec.eos_id, n_tokens, len(offsets) - 1,
                                 spec.tokenizer_hash)
            fb.seek(0)
            fb.write(header.pack())
        np.asarray(offsets, dtype="<i8").tofile(tmp_idx)
        os.replace(tmp_idx, final_idx)
        os.replace(tmp_bin, final_bin)
    finally:
        for tmp in (tmp_bin, tmp_idx):
            tmp.unlink(missing_ok=True)
    return {
        "name": unit.name,
        "key": unit.key,
        "n_tokens": n_tokens,
        "n_docs": len(offsets) - 1,
        "sources": [{"path": p.path, "kind": p.kind, "start": p.start, "end": p.end} for p in unit.parts],
    }
