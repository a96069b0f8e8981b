"""Shared fixtures. Caches live inside the checkout, so a run leaves nothing outside it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The scripts in tools/ are not installed; tests import them by name, as the scripts import each other.
sys.path.insert(0, str(ROOT / "tools"))
CACHE = ROOT / ".cache"
for var, sub in (
    ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
    ("TORCH_EXTENSIONS_DIR", "torch_extensions"),
    ("TRITON_CACHE_DIR", "triton"),
    ("HF_HOME", "hf"),
    ("VLLM_CACHE_ROOT", "vllm"),
    ("MPLCONFIGDIR", "matplotlib"),
):
    os.environ.setdefault(var, str(CACHE / sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer trained once per session on a slice of the embedded default corpus."""
    from pangu_pi.corpus import default_corpus_files
    from pangu_pi.tokenizer import train_tokenizer

    files = default_corpus_files(limit_bytes=3_000_000)
    return train_tokenizer(files, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=2048, progress=False)
