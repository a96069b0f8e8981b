"""The embedded default corpus: the Python standard library's own source files.

Every machine that runs this project has them, they are real text written by many people, and
reading them needs no download. Tools fall back to this corpus when no `--input` is given.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(limit_bytes: int | None = None) -> list[Path]:
    """The stdlib's `.py` files in a fixed order (tests and site-packages left out), up to `limit_bytes`."""
    root = stdlib_dir()
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    if limit_bytes is not None:
        kept, total = [], 0
        for f in files:
            total += f.stat().st_size
            if total > limit_bytes:
                break
            kept.append(f)
        files = kept
    if not files:
        raise FileNotFoundError(f"no Python source files under {root}; pass --input with your own text")
    return files


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by paths, directories (searched recursively) and globs, in a stable order.

    Raises FileNotFoundError naming the first input that matches nothing.
    """
    files: list[Path] = []
    for item in inputs:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"input {item!r} does not exist or matches no files; check the path")
        files.extend(found)
    return files


def read_documents(files: Iterable[Path]) -> Iterator[str]:
    """Each file's text as one document; undecodable bytes are replaced rather than fatal."""
    for f in files:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text
