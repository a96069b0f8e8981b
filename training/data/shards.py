"""The on-disk shard format, and the checks that refuse a dataset the model cannot train on.

A prepared dataset is a folder holding `manifest.json` and, per shard, two files:

- `NAME.bin`: a 64-byte header, then every document's token ids followed by EOS, back to back;
- `NAME.idx`: `n_docs + 1` little-endian int64 offsets (in tokens) where each document starts.

The header is what lets a trainer refuse a shard cheaply: a size that disagrees with it means a
truncated file, a tokenizer hash that disagrees with the model's means the ids mean other words.
The layout is documented for other tools in docs/data.md.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"PGPITOK\x00"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "pangu-pi-shards"
# magic, version, itemsize, reserved, vocab_size, eos_id, n_tokens, n_docs, tokenizer_hash; padded to 64
_HEADER = struct.Struct("<8sHBBIIQQ16s12x")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 64
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
PREPARE_HINT = "rebuild it with `pangu-pi data prepare` (re-running skips the shards that are still good)"


class DataError(ValueError):
    """A shard or dataset that cannot be trained on; the message names the file, the problem and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id: half the disk and page cache for vocabularies ≤ 65535."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return _DTYPES[2] if vocab_size <= 65535 else _DTYPES[4]


@dataclass(frozen=True)
class ShardHeader:
    itemsize: int
    vocab_size: int
    eos_id: int
    n_tokens: int
    n_docs: int
    tokenizer_hash: str
    version: int = FORMAT_VERSION

    @property
    def dtype(self) -> np.dtype:
        return _DTYPES[self.itemsize]

    def pack(self) -> bytes:
        digest = self.tokenizer_hash.encode("ascii")
        if len(digest) > 16:
            raise ValueError(f"tokenizer hash {self.tokenizer_hash!r} is longer than 16 characters")
        return _HEADER.pack(
            MAGIC, self.version, self.itemsize, 0, self.vocab_size, self.eos_id, self.n_tokens, self.n_docs, digest
        )

    @classmethod
    def read(cls, path: Path) -> ShardHeader:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE:
            raise DataError(f"shard {path} is truncated: {len(raw)} bytes, shorter than its {HEADER_SIZE}-byte header; "
                            f"{PREPARE_HINT}")
        magic, version, itemsize, _, vocab, eos, n_tokens, n_docs, digest = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise DataError(f"{path} is not a pangu-pi token shard (magic {magic!r}, expected {MAGIC!r}); "
                            f"point the dataset path at a folder made by `pangu-pi data prepare`")
        if version != FORMAT_VERSION:
            raise DataError(f"shard {path} has format version {version}, this code reads version {FORMAT_VERSION}; "
                            f"{PREPARE_HINT}")
        if itemsize not in _DTYPES:
            raise DataError(f"shard {path} declares {itemsize}-byte token ids (only 2 or 4 exist); {PREPARE_HINT}")
        return cls(itemsize, vocab, eos, n_tokens, n_docs, digest.rstrip(b"\x00").decode("ascii"), version)

    def expected_bin_size(self) -> int:
        return HEADER_SIZE + self.n_tokens * self.itemsize

    def expected_idx_size(self) -> int:
        return (self.n_docs + 1) * 8


def bin_path(dataset_dir: Path, name: str) -> Path:
    return Path(dataset_dir) / f"{name}.bin"


def idx_path(dataset_dir: Path, name: str) -> Path:
    return Path(dataset_dir) / f"{name}.idx"


def open_tokens(path: Path, header: ShardHeader) -> np.ndarray:
    """The shard's tokens as a read-only memory map: nothing is read until a slice is touched."""
    if header.n_tokens == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.n_tokens,))


def open_offsets(path: Path, header: ShardHeader) -> np.ndarray:
    return np.memmap(path, dtype="<i8", mode="r", shape=(header.n_docs + 1,))


def shard_is_intact(dataset_dir: Path, name: str, n_tokens: int, n_docs: int) -> bool:
    """True when both files exist with exactly the sizes a complete shard of these counts has."""
    b, i = bin_path(dataset_dir, name), idx_path(dataset_dir, name)
    try:
        header = ShardHeader.read(b)
    except (OSError, DataError):
        return False
    return (
        header.n_tokens == n_tokens
        and header.n_docs == n_docs
        and b.stat().st_size == header.expected_bin_size()
        and i.exists()
        and i.stat().st_size == header.expected_idx_size()
    )


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary name and rename, so a reader never sees half a file, even after a crash."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_manifest(dataset_dir: Path) -> dict:
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST
    if not dataset_dir.is_dir():
        raise DataError(f"dataset {dataset_dir} does not exist; make it with "
                        f"`pangu-pi data prepare --tokenizer DIR --input ... --out {dataset_dir}`")
    if not path.exists():
        raise DataError(f"{dataset_dir} is not a prepared dataset ({MANIFEST} missing); make it with "
                        f"`pangu-pi data prepare --tokenizer DIR --input ... --out {dataset_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); {PREPARE_HINT}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path} is not a pangu-pi shard manifest; point the dataset path at a folder made by "
                        f"`pangu-pi data prepare`")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {manifest.get('version')}, this code reads version "
                        f"{FORMAT_VERSION}; {PREPARE_HINT}")
    return manifest


@dataclass(frozen=True)
class ShardInfo:
    name: str
    bin_path: Path
    idx_path: Path
    header: ShardHeader

    @property
    def n_tokens(self) -> int:
        return self.header.n_tokens

    @property
    def n_docs(self) -> int:
        return self.header.n_docs


@dataclass(frozen=True)
class DatasetInfo:
    """A verified dataset: its shards in order, with the counts and identity a trainer logs."""

    path: Path
    shards: tuple[ShardInfo, ...]
    vocab_size: int  # of the tokenizer that made the shards
    eos_id: int
    tokenizer_hash: str
    dtype: str
    fingerprint: str  # changes whenever any shard's content could have
    num_tokens: int = field(init=False)
    num_docs: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "num_tokens", sum(s.n_tokens for s in self.shards))
        object.__setattr__(self, "num_docs", sum(s.n_docs for s in self.shards))


# Verification reads every token once; a trainer that builds a train and a val view of the same data
# should not pay twice, so results are kept while the files are unchanged.
_VERIFIED: dict[tuple, DatasetInfo] = {}


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def verify_dataset(
    path: str | os.PathLike,
    *,
    vocab_size: int,
    tokenizer_hash: str | None,
    check_ids: bool = True,
) -> DatasetInfo:
    """Open every shard of a prepared dataset and refuse one that cannot be trained on.

    Refused with DataError: a missing or unfinished dataset, a wrong magic or format version, a
    truncated file (size ≠ header), a shard from another tokenizer (hash ≠ `tokenizer_hash`; None
    skips this check but still requires all shards to agree), a vocabulary larger than the model's,
    and token ids ≥ `vocab_size` (a vectorised max over the memory map).
    """
    root = Path(path)
    manifest = read_manifest(root)
    if not manifest.get("complete"):
        done, total = len(manifest.get("shards", [])), manifest.get("planned_shards", "?")
        raise DataError(f"dataset {root} is unfinished ({done} of {total} shards written); re-run the same "
                        f"`pangu-pi data prepare` command to finish it (finished shards are kept)")
    entries = manifest.get("shards", [])
    if not entries:
        raise DataError(f"dataset {root} holds no shards (its inputs had no text); prepare it from non-empty inputs")
    try:
        key = (root.resolve(), vocab_size, tokenizer_hash, check_ids, _stat_key(root / MANIFEST),
               tuple((e["name"], _stat_key(bin_path(root, e["name"])), _stat_key(idx_path(root, e["name"])))
                     for e in entries))
    except FileNotFoundError:
        key = None  # a missing file is reported below with its name
    if key is not None and key in _VERIFIED:
        return _VERIFIED[key]

    expected_hash = tokenizer_hash if tokenizer_hash is not None else manifest.get("tokenizer_hash")
    shards = []
    for entry in entries:
        name = entry["name"]
        b, i = bin_path(root, name), idx_path(root, name)
        for f in (b, i):
            if not f.exists():
                raise DataError(f"shard file {f} is missing; {PREPARE_HINT}")
        header = ShardHeader.read(b)
        if header.tokenizer_hash != expected_hash:
            raise DataError(
                f"shard {b} was tokenized with another tokenizer (hash {header.tokenizer_hash}, the model's "
                f"tokenizer has hash {expected_hash}); re-run `pangu-pi data prepare --tokenizer DIR` with the "
                f"model's tokenizer into a fresh --out folder")
        if header.vocab_size > vocab_size:
            raise DataError(
                f"shard {b} comes from a tokenizer of {header.vocab_size} tokens, more than the model's "
                f"vocab_size {vocab_size}; prepare the data with the model's tokenizer or raise vocab_size")
        size = b.stat().st_size
        if size != header.expected_bin_size():
            raise DataError(
                f"shard {b} is truncated or damaged: {size} bytes, its header promises "
                f"{header.expected_bin_size()} ({header.n_tokens} tokens); {PREPARE_HINT}")
        size = i.stat().st_size
        if size != header.expected_idx_size():
            raise DataError(
                f"index {i} is truncated or damaged: {size} bytes, the shard header promises "
                f"{header.expected_idx_size()} ({header.n_docs} documents); {PREPARE_HINT}")
        if (entry.get("n_tokens"), entry.get("n_docs")) != (header.n_tokens, header.n_docs):
            raise DataError(f"shard {b} does not match {root / MANIFEST} (the files were replaced); {PREPARE_HINT}")
        offsets = open_offsets(i, header)
        tokens = open_tokens(b, header)
        if offsets[0] != 0 or offsets[-1] != header.n_tokens or np.any(np.diff(offsets) <= 0):
            raise DataError(f"index {i} has document offsets out of order or out of range; {PREPARE_HINT}")
        if header.n_docs and np.any(tokens[offsets[1:] - 1] != header.eos_id):
            raise DataError(f"shard {b} has a document that does not end with EOS id {header.eos_id}; {PREPARE_HINT}")
        if check_ids and header.n_tokens:
            top = int(tokens.max())
            if top >= vocab_size:
                where = int(np.argmax(tokens >= vocab_size))
                raise DataError(
                    f"shard {b} holds token id {top} (first bad id at token {where}), outside the model's "
                    f"vocab_size {vocab_size}; prepare the data with the model's tokenizer or raise vocab_size")
        shards.append(ShardInfo(name, b, i, header))

    eos = {s.header.eos_id for s in shards}
    if len(eos) != 1:
        raise DataError(f"the shards of {root} disagree on the EOS id ({sorted(eos)}); {PREPARE_HINT}")
    info = DatasetInfo(
        path=root,
        shards=tuple(shards),
        vocab_size=max(s.header.vocab_size for s in shards),
        eos_id=eos.pop(),
        tokenizer_hash=expected_hash,
        dtype=str(shards[0].header.dtype.name),
        fingerprint=manifest_fingerprint(manifest),
    )
    if key is not None:
        _VERIFIED[key] = info
    return info


def manifest_fingerprint(manifest: dict) -> str:
    """Identity of a dataset's content: the keys of its shards, which hash their inputs and tokenizer."""
    import hashlib

    blob = json.dumps([e["key"] for e in manifest.get("shards", [])])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def iter_documents(info: DatasetInfo):
    """Every document's token ids (its trailing EOS included), shard by shard, in input order."""
    for shard in info.shards:
        tokens = open_tokens(shard.bin_path, shard.header)
        offsets = open_offsets(shard.idx_path, shard.header)
        for a, b in zip(offsets[:-1], offsets[1:]):
            yield np.asarray(tokens[a:b])
