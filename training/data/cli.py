"""`pangu-pi data prepare|verify`: the command-line face of prepare_shards and verify_dataset."""

from __future__ import annotations

import argparse

from .prepare import MAX_SHARD_BYTES, MIN_SHARD_BYTES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pangu-pi data", description="tokenized training shards")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    prep = sub.add_parser("prepare", help="tokenize text, JSONL or Parquet into shards",
                          description="Tokenize inputs into shards; re-running skips finished shards.")
    prep.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer folder (tokenizer.json)")
    prep.add_argument("--input", action="extend", nargs="+", metavar="PATH", default=[],
                      help="files, directories or globs (default: the embedded corpus, the Python stdlib)")
    prep.add_argument("--out", required=True, metavar="DIR", help="dataset folder to write")
    prep.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizing processes (default 1)")
    prep.add_argument("--text-field", default="text", metavar="NAME",
                      help="JSONL field / Parquet column holding the text (default: text)")
    prep.add_argument("--shard-mb", type=float, metavar="MB",
                      help=f"input MiB per shard (default: a sixteenth of the input, within "
                           f"{MIN_SHARD_BYTES / 2**20:g} to {MAX_SHARD_BYTES / 2**20:g})")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.add_argument("--force", action="store_true",
                      help="replace a dataset this command wrote into --out from other inputs or settings (only "
                           "its shards and manifest; a folder it did not write is always refused)")

    ver = sub.add_parser("verify", help="check a prepared dataset against a tokenizer",
                         description="Check every shard (sizes, tokenizer, token ids) and print a summary.")
    ver.add_argument("dataset", metavar="DIR")
    ver.add_argument("--tokenizer", required=True, metavar="DIR", help="the tokenizer the model uses")
    ver.add_argument("--vocab-size", type=int, metavar="N",
                     help="the model's vocab_size (default: the tokenizer's)")
    return parser


def main(argv: list[str]) -> int:
    from pangu_pi.errors import UserError

    from .shards import DataError

    args = _parser().parse_args(argv)
    try:
        if args.action == "prepare":
            return _prepare(args)
        return _verify(args)
    except DataError as err:
        raise UserError(str(err)) from None


def _prepare(args) -> int:
    from .prepare import prepare_shards
    from .shards import verify_dataset

    out = prepare_shards(args.tokenizer, args.input or None, args.out, workers=args.workers,
                         text_field=args.text_field, progress=not args.quiet, force=args.force,
                         shard_bytes=None if args.shard_mb is None else max(1, int(args.shard_mb * 2**20)))
    info = verify_dataset(out, vocab_size=2**32, tokenizer_hash=None, check_ids=False)
    print(f"{out}: {len(info.shards)} shards, {info.num_docs:,} documents, {info.num_tokens:,} tokens ({info.dtype})")
    return 0


def _verify(args) -> int:
    from pangu_pi.tokenizer import tokenizer_facts

    from .shards import verify_dataset

    tok = tokenizer_facts(args.tokenizer)
    info = verify_dataset(args.dataset, vocab_size=args.vocab_size or tok.vocab_size, tokenizer_hash=tok.hash)
    print(f"{info.path}: OK, {len(info.shards)} shards, {info.num_docs:,} documents, {info.num_tokens:,} tokens "
          f"({info.dtype}, tokenizer {info.tokenizer_hash})")
    return 0
