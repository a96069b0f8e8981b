"""Tokenized training data: shards on disk (`prepare_shards`), their checks (`verify_dataset`) and the
packed, weighted, resumable sample stream a trainer reads (`PackedMixture`). See docs/data.md.

Nothing here imports torch or transformers at import time, so worker processes start quickly.
"""

from .mixture import PackedMixture
from .prepare import prepare_shards
from .shards import DataError, DatasetInfo, ShardInfo, iter_documents, token_dtype, verify_dataset

__all__ = [
    "DataError",
    "DatasetInfo",
    "PackedMixture",
    "ShardInfo",
    "iter_documents",
    "prepare_shards",
    "token_dtype",
    "verify_dataset",
]
