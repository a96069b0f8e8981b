"""Input files → documents, and the plan that splits them into shard-sized units of work.

Three kinds of input are read: plain text (a whole file is one document), JSONL (one document per
line, taken from a named string field) and Parquet (one document per row of a named column). Big
JSONL files are split at byte offsets and Parquet files at row groups, so one large file still
spreads over several workers; the split depends only on the inputs, never on the worker count, so
the shards come out the same however many workers make them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .shards import FORMAT_VERSION, DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
_SNIFF_BYTES = 8192


def input_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


@dataclass(frozen=True)
class Part:
    """A piece of one input file: a byte range of a JSONL file, row groups of a Parquet file, or a whole file."""

    path: str
    kind: str
    start: int
    end: int
    size: int  # bytes of input it covers (uncompressed estimate for Parquet), for progress and planning
    mtime_ns: int


@dataclass(frozen=True)
class Unit:
    """Consecutive parts that become one shard; `key` names its content so a re-run can skip it."""

    parts: tuple[Part, ...]
    key: str

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def name(self) -> str:
        return f"shard-{self.key[:16]}"


def split_file(path: Path, shard_bytes: int) -> list[Part]:
    path = Path(path)
    st = path.stat()
    kind = input_kind(path)
    if kind == "parquet":
        return _parquet_parts(path, st.st_mtime_ns, shard_bytes)
    # gzip streams cannot be entered mid-way, and a text file is a single document
    if kind == "text" or path.name.lower().endswith(".gz") or st.st_size <= shard_bytes:
        return [Part(str(path), kind, 0, st.st_size, st.st_size, st.st_mtime_ns)]
    bounds = list(range(0, st.st_size, shard_bytes)) + [st.st_size]
    return [Part(str(path), kind, a, b, b - a, st.st_mtime_ns) for a, b in zip(bounds, bounds[1:])]


def _parquet_parts(path: Path, mtime_ns: int, shard_bytes: int) -> list[Part]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path} cannot be read as Parquet ({err}); check the file or rename it if it is not "
                        f"Parquet") from None
    parts, start, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= shard_bytes or g == meta.num_row_groups - 1:
            parts.append(Part(str(path), "parquet", start, g + 1, size, mtime_ns))
            start, size = g + 1, 0
    return parts


def plan_units(files: list[Path], shard_bytes: int, *, text_field: str, tokenizer_hash: str) -> list[Unit]:
    """Group the inputs' parts, in order, into units of about `shard_bytes` of input each."""
    groups: list[list[Part]] = []
    size = 0
    for f in files:
        for part in split_file(f, shard_bytes):
            if not groups or size + part.size > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(part)
            size += part.size
    units = []
    for parts in groups:
        blob = json.dumps({"v": FORMAT_VERSION, "field": text_field, "tokenizer": tokenizer_hash,
                           "parts": [asdict(p) for p in parts]})
        units.append(Unit(tuple(parts), hashlib.sha256(blob.encode()).hexdigest()))
    return units


def read_part(part: Part, text_field: str) -> Iterator[str]:
    """The documents of one part, empty ones left out."""
    if part.kind == "text":
        yield from _text_docs(Path(part.path))
    elif part.kind == "jsonl":
        yield from _jsonl_docs(part, text_field)
    elif part.kind == "parquet":
        yield from _parquet_docs(part, text_field)
    else:
        raise ValueError(f"unknown input kind {part.kind!r}")


def _text_docs(path: Path) -> Iterator[str]:
    raw = path.read_bytes()
    # directories and globs sweep up images and archives too; a NUL byte marks a file that is not text
    if b"\x00" in raw[:_SNIFF_BYTES]:
        return
    text = raw.decode("utf-8", errors="replace")
    if text.strip():
        yield text


def _jsonl_lines(part: Part) -> Iterator[tuple[int, bytes]]:
    """(line number or byte offset, line) for the lines that *start* inside [start, end)."""
    if part.path.lower().endswith(".gz"):
        with gzip.open(part.path, "rb") as f:
            for n, line in enumerate(f, 1):
                yield n, line
        return
    with open(part.path, "rb") as f:
        if part.start > 0:
            # a line that began before `start` belongs to the previous part; skip its remainder
            f.seek(part.start - 1)
            f.readline()
        pos = f.tell()
        while pos < part.end:
            line = f.readline()
            if not line:
                break
            yield pos, line
            pos += len(line)


def _jsonl_docs(part: Part, text_field: str) -> Iterator[str]:
    where = "line" if part.path.lower().endswith(".gz") else "byte offset"
    for at, line in _jsonl_lines(part):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{part.path} ({where} {at}) is not valid JSON: {err.msg}; "
                            f"fix the line, or remove it") from None
        except UnicodeDecodeError:
            raise DataError(f"{part.path} ({where} {at}) is not UTF-8 text; re-encode the file as UTF-8") from None
        if not isinstance(record, dict) or text_field not in record:
            fields = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{part.path} ({where} {at}) has no field {text_field!r} (it has: {fields}); "
                            f"name the text field with --text-field")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(f"{part.path} ({where} {at}) field {text_field!r} holds {type(value).__name__}, "
                            f"not text; name a text field with --text-field")
        if value.strip():
            yield value


def _parquet_docs(part: Part, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(part.path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{part.path} has no column {text_field!r} (it has: {', '.join(names)}); "
                        f"name the text column with --text-field")
    for g in range(part.start, part.end):
        column = pf.read_row_group(g, columns=[text_field]).column(0)
        for value in column.to_pylist():
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{part.path} column {text_field!r} holds {type(value).__name__}, not text; "
                                f"name a text column with --text-field")
            if value.strip():
                yield value
