"""Data pipeline throughput, side by side in one run.

Writing: `prepare_shards` on the embedded default corpus with 1 and N workers, against the bare
tokenizer encoding the same files in one process and writing nothing: the ratio is what reading,
packing and writing shards cost on top of tokenization, and what workers win back.

Reading: `PackedMixture.batch` against the simplest possible reader, random slices of one flat
memory map stacked into a tensor, for the same sample length and batch size.

Prints a table, ratios, and one line of JSON last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: on a busy machine, steadier than wall time."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn):
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def encode_only(tokenizer_dir: Path, files: list[Path]) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))


def bench_write(tokenizer_dir: Path, work: Path, workers: int) -> dict:
    from pangu_pi.corpus import default_corpus_files
    from pangu_pi.training.data import prepare_shards, verify_dataset

    files = default_corpus_files()
    mb = sum(f.stat().st_size for f in files) / 2**20
    rows = {}
    n_tokens, wall, cpu = timed(lambda: encode_only(tokenizer_dir, files))
    rows["encode only (1 process)"] = (wall, cpu)
    for w in sorted({1, workers}):
        out = work / f"shards-w{w}"
        shutil.rmtree(out, ignore_errors=True)
        _, wall, cpu = timed(lambda: prepare_shards(tokenizer_dir, None, out, workers=w, progress=False))  # noqa: B023 (called here)
        rows[f"prepare_shards, {w} worker{'s' * (w > 1)}"] = (wall, cpu)
        info = verify_dataset(out, vocab_size=2**32, tokenizer_hash=None)
        assert info.num_tokens == n_tokens + info.num_docs, "shards hold the encoded text plus one EOS per document"

    base = rows["encode only (1 process)"][0]
    print(f"\nwriting: default corpus, {len(files)} files, {mb:.1f} MiB, {n_tokens:,} tokens")
    print(f"{'':34s} {'wall s':>8s} {'CPU s':>8s} {'MiB/s':>8s} {'speed vs encode only':>21s}")
    for name, (wall, cpu) in rows.items():
        print(f"{name:34s} {wall:8.2f} {cpu:8.2f} {mb / wall:8.2f} {base / wall:20.2f}x")
    w1 = rows["prepare_shards, 1 worker"][0]
    wn = rows[f"prepare_shards, {workers} worker{'s' * (workers > 1)}"][0]
    return {
        "corpus_mib": round(mb, 2),
        "corpus_tokens": n_tokens,
        "encode_only_mib_per_s": round(mb / base, 3),
        "prepare_w1_mib_per_s": round(mb / w1, 3),
        f"prepare_w{workers}_mib_per_s": round(mb / wn, 3),
        "prepare_w1_vs_encode_only": round(base / w1, 3),
        f"prepare_w{workers}_vs_encode_only": round(base / wn, 3),
        f"prepare_w{workers}_vs_w1": round(w1 / wn, 3),
    }


def bench_read(tokenizer_dir: Path, dataset: Path, seq_len: int, batch: int, steps: int) -> dict:
    import numpy as np
    import torch

    from pangu_pi.tokenizer import tokenizer_hash
    from pangu_pi.training.data import PackedMixture, iter_documents, verify_dataset

    digest = tokenizer_hash(tokenizer_dir)
    info = verify_dataset(dataset, vocab_size=2**32, tokenizer_hash=digest)
    flat_path = dataset.parent / "flat.bin"
    np.concatenate(list(iter_documents(info))).tofile(flat_path)
    flat = np.memmap(flat_path, dtype=info.dtype, mode="r")
    rng = np.random.default_rng(0)

    def memmap_slices():
        for _ in range(steps):
            ix = rng.integers(0, len(flat) - seq_len - 1, size=batch)
            torch.stack([torch.from_numpy(flat[i : i + seq_len + 1].astype(np.int64)) for i in ix])

    mix = PackedMixture([{"path": str(dataset), "weight": 1.0}], seq_len=seq_len, eos_id=info.eos_id,
                        vocab_size=info.vocab_size, tokenizer_hash=digest)

    def mixture():
        for _ in range(steps):
            mix.next_batch(batch)

    memmap_slices(), mixture()  # first touches: page cache and the epoch's permutation
    rows = {}
    for name, fn in (("random memmap slices", memmap_slices), ("PackedMixture.next_batch", mixture)):
        _, wall, cpu = timed(fn)
        rows[name] = wall
    tokens = steps * batch * (seq_len + 1)
    print(f"\nreading: batches of {batch} × {seq_len + 1} tokens, {steps} batches")
    print(f"{'':34s} {'µs/batch':>10s} {'Mtokens/s':>10s}")
    for name, wall in rows.items():
        print(f"{name:34s} {wall / steps * 1e6:10.0f} {tokens / wall / 1e6:10.2f}")
    ratio = rows["random memmap slices"] / rows["PackedMixture.next_batch"]
    print(f"PackedMixture speed vs random memmap slices: {ratio:.2f}x")
    return {
        "read_tokens_per_s": round(tokens / rows["PackedMixture.next_batch"]),
        "read_us_per_batch": round(rows["PackedMixture.next_batch"] / steps * 1e6, 1),
        "read_vs_memmap_slices": round(ratio, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(".cache/bench_data"), help="scratch folder")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: train one on the corpus)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer
    if tokenizer is None:
        from pangu_pi.tokenizer import train_tokenizer

        tokenizer = train_tokenizer(None, args.work / "tokenizer", vocab_size=8192, progress=False)
    print(f"tokenizer {tokenizer}, {args.workers} workers, TOKENIZERS_PARALLELISM="
          f"{os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}", file=sys.stderr)
    result = bench_write(tokenizer, args.work, args.workers)
    result.update(bench_read(tokenizer, args.work / "shards-w1", args.seq_len, args.batch, args.steps))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
