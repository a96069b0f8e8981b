"""What a folder on disk holds: a transformers checkpoint, a tokenizer.

Each command words its own refusal (which flag, which command writes the folder); the tests of what
counts are these, written once.
"""

from __future__ import annotations

import os
from pathlib import Path


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A transformers checkpoint folder: `save_pretrained`, `pangu-pi export` or `pangu-pi init` wrote it."""
    return (Path(path) / "config.json").is_file()


def has_tokenizer(path: str | os.PathLike) -> bool:
    """A folder with a saved transformers tokenizer (a tokenizer folder, or a checkpoint with its own)."""
    path = Path(path)
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
