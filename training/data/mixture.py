"""`PackedMixture`: fixed-length training samples from several prepared datasets, mixed by weight.

Each dataset's shards, read in manifest order, form one stream of tokens in which every document
already ends with EOS. The stream is cut into consecutive, non-overlapping chunks of `seq_len + 1`
tokens (input = chunk[:-1], target = chunk[1:]); a final partial chunk is dropped. A few chunks,
chosen from the seed and the dataset's content, are held out for validation; the rest are shuffled
anew every epoch of that dataset.

The global stream interleaves datasets in blocks: every block of `BLOCK` samples holds each
dataset in proportion to its weight, spread evenly through the block, so even a small batch
carries the mixture. Sample i is therefore a pure function of (seed, datasets, seq_len, i): rank r
of W with micro-batch b at global offset s reads `batch(s + r*b, b)`, and resuming needs nothing
but the count of samples consumed.
"""

from __future__ import annotations

import hashlib
import os
from bisect import bisect_right
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .shards import DataError, DatasetInfo, open_tokens, verify_dataset

BLOCK = 10_000  # samples per mixing block: weights are honoured to within 1/BLOCK
_STATE_VERSION = 1


class _Source:
    """One dataset seen as an array of chunks, split into held-out and training chunk ids."""

    def __init__(self, info: DatasetInfo, weight: float, position: int, seq_len: int, seed: int,
                 val_fraction: float):
        self.info = info
        self.weight = weight
        self.position = position  # in the datasets list: two entries of one folder still shuffle apart
        self.stride = seq_len + 1
        self.seed = seed
        self.content_seed = int(info.fingerprint, 16)
        self.cum = [0]  # token offset of each shard in the dataset's stream; a list, as bisect is fastest on one
        for s in info.shards:
            self.cum.append(self.cum[-1] + s.n_tokens)
        self.n_chunks = self.cum[-1] // self.stride
        n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * self.n_chunks))
        if self.n_chunks - n_val < 1 or self.n_chunks < 1:
            need = (n_val + 1) * self.stride
            raise DataError(
                f"dataset {info.path} has {self.cum[-1]} tokens, too few for {n_val} validation and 1 training "
                f"sample of seq_len + 1 = {self.stride} tokens (needs {need}); add text or lower seq_len")
        # the held-out chunks depend on the dataset's content and the seed, not on what it is mixed with,
        # so a dataset's validation loss stays comparable between mixtures
        rng = np.random.default_rng([seed, self.content_seed])
        self.val_ids = np.sort(rng.choice(self.n_chunks, size=n_val, replace=False)).astype(np.int64)
        mask = np.ones(self.n_chunks, dtype=bool)
        mask[self.val_ids] = False
        self.train_ids = np.flatnonzero(mask).astype(np.int64)
        self._tokens: list[np.ndarray | None] = [None] * len(info.shards)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def tokens(self, s: int) -> np.ndarray:
        # mapped on first use: a large corpus has thousands of shards, and maps are a limited resource
        if self._tokens[s] is None:
            # a plain ndarray view slices faster than the memmap subclass; it keeps the map alive
            self._tokens[s] = open_tokens(self.info.shards[s].bin_path, self.info.shards[s].header).view(np.ndarray)
        return self._tokens[s]

    def chunk(self, c: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk c as int64 ids, written into `out` when given."""
        start = int(c) * self.stride
        end = start + self.stride
        if out is None:
            out = np.empty(self.stride, dtype=np.int64)
        s = bisect_right(self.cum, start) - 1
        filled = 0
        while filled < self.stride:  # a chunk may run across the end of a shard into the next
            lo = start + filled - self.cum[s]
            hi = min(end, self.cum[s + 1]) - self.cum[s]
            out[filled : filled + hi - lo] = self.tokens(s)[lo:hi]
            filled += hi - lo
            s += 1
        return out

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed, self.content_seed, self.position, epoch])
            perm = rng.permutation(len(self.train_ids))
            self._perms[epoch] = perm
            while len(self._perms) > 2:  # reads move forward; the previous epoch only matters at the seam
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(epoch)
        return perm

    def train_chunk(self, k: int) -> tuple[int, int]:
        """(epoch, chunk id) of this dataset's k-th training sample."""
        epoch, r = divmod(int(k), len(self.train_ids))
        return epoch, int(self.train_ids[self.permutation(epoch)[r]])

    def drop_maps(self) -> None:
        self._tokens = [None] * len(self._tokens)


def _block_layout(weights: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-dataset count per block, dataset of each block slot, rank of the slot among its dataset's)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    size = 1 if len(w) == 1 else BLOCK
    exact = w * size
    counts = np.floor(exact).astype(np.int64)
    # largest remainders get the slots left over, ties to the earlier dataset
    for d in np.argsort(-(exact - counts), kind="stable")[: size - counts.sum()]:
        counts[d] += 1
    slot_ds = np.empty(size, dtype=np.int64)
    slot_rank = np.empty(size, dtype=np.int64)
    taken = np.zeros(len(w), dtype=np.int64)
    for j in range(size):
        # the dataset furthest behind its share so far goes next: every prefix of a block is balanced
        d = int(np.argmax((j + 1) * counts / size - taken))
        slot_ds[j], slot_rank[j] = d, taken[d]
        taken[d] += 1
    return counts, slot_ds, slot_rank


def _normalise_entries(datasets) -> list[tuple[str, float]]:
    if isinstance(datasets, (str, os.PathLike, dict)):
        datasets = [datasets]
    if not datasets:
        raise DataError("no datasets given; configure `datasets: [{path: DIR, weight: 1.0}]`")
    entries = []
    for n, entry in enumerate(datasets):
        if isinstance(entry, (str, os.PathLike)):
            entry = {"path": entry}
        if not isinstance(entry, dict) or "path" not in entry:
            raise DataError(f"datasets[{n}] is {entry!r}; each entry needs a path: {{path: DIR, weight: 1.0}}")
        unknown = set(entry) - {"path", "weight"}
        if unknown:
            raise DataError(f"datasets[{n}] has unknown key(s) {', '.join(sorted(map(repr, unknown)))}; "
                            f"an entry holds only `path` and `weight`")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
            raise DataError(f"datasets[{n}] ({entry['path']}) has weight {weight!r}; weights must be positive numbers")
        entries.append((str(entry["path"]), float(weight)))
    return entries


class PackedMixture:
    """Samples of `seq_len + 1` token ids, drawn from weighted datasets; see the module docstring.

    `split="train"`: an endless stream addressed by global sample index (`sample`, `batch`,
    `next_batch`), whose position is `samples_consumed`, saved by `state_dict`.
    `split="val"`: the fixed held-out samples of every dataset, in order (`len`, `[i]`, `batch`).
    """

    def __init__(
        self,
        datasets: list[dict],
        *,
        seq_len: int,
        eos_id: int,
        vocab_size: int,
        tokenizer_hash: str | None,
        split: str = "train",
        val_fraction: float = 0.005,
        seed: int = 0,
    ):
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
        if not 0 <= val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if split == "val" and val_fraction == 0:
            raise DataError("a validation split was asked for with val_fraction = 0; set val_fraction > 0")
        self.split = split
        self.seq_len = seq_len
        self.seed = int(seed)
        self.val_fraction = val_fraction
        self.samples_consumed = 0
        self._sources = []
        for position, (path, weight) in enumerate(_normalise_entries(datasets)):
            info = verify_dataset(path, vocab_size=vocab_size, tokenizer_hash=tokenizer_hash)
            if info.eos_id != eos_id:
                raise DataError(f"dataset {path} separates documents with EOS id {info.eos_id}, the model's EOS id "
                                f"is {eos_id}; prepare the data with the model's tokenizer")
            self._sources.append(_Source(info, weight, position, seq_len, self.seed, val_fraction))
        self._counts, self._slot_ds, self._slot_rank = _block_layout([s.weight for s in self._sources])
        for src, count in zip(self._sources, self._counts):
            if split == "train" and count == 0:
                raise DataError(f"dataset {src.info.path} has weight {src.weight}, under 1/{BLOCK} of the total, "
                                f"so it would never be sampled; raise its weight or drop it")
        # validation: every dataset's held-out chunks, dataset by dataset
        self._val = [(d, int(c)) for d, src in enumerate(self._sources) for c in src.val_ids]
        self.fingerprint = hashlib.sha256(
            repr([(s.info.fingerprint, s.weight) for s in self._sources]).encode()
        ).hexdigest()[:16]

    # ---- addressing -------------------------------------------------------------------------------
    def locate(self, i: int) -> tuple[int, int, int]:
        """(dataset index, epoch of that dataset, chunk id) of global sample i (train) or val item i."""
        if self.split == "val":
            d, c = self._val[i]
            return d, 0, c
        if i < 0:
            raise IndexError(f"sample index {i} is negative")
        block, slot = divmod(int(i), len(self._slot_ds))
        d = int(self._slot_ds[slot])
        epoch, chunk = self._sources[d].train_chunk(block * int(self._counts[d]) + int(self._slot_rank[slot]))
        return d, epoch, chunk

    def sample(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Sample i as int64 token ids, `seq_len + 1` of them (written into `out` when given)."""
        d, _, chunk = self.locate(i)
        return self._sources[d].chunk(chunk, out)

    def batch(self, start: int, n: int):
        """Samples start … start+n-1 as a LongTensor of shape (n, seq_len + 1)."""
        import torch

        if self.split == "val" and not (0 <= start and start + n <= len(self)):
            raise IndexError(f"validation samples {start}..{start + n - 1} requested, there are {len(self)}")
        out = np.empty((n, self.seq_len + 1), dtype=np.int64)
        for j in range(n):
            self.sample(start + j, out[j])
        return torch.from_numpy(out)

    def next_batch(self, n: int, rank: int = 0, world_size: int = 1):
        """This rank's `n` samples of the next global step of `n * world_size` samples; advances the position."""
        if self.split != "train":
            raise DataError("next_batch reads the training stream; index the validation split instead")
        out = self.batch(self.samples_consumed + rank * n, n)
        self.samples_consumed += n * world_size
        return out

    # ---- validation split -------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.split == "train":
            raise TypeError("the training stream is endless; use num_samples for the samples in one pass")
        return len(self._val)

    def __getitem__(self, i: int):
        import torch

        if self.split == "val" and not -len(self._val) <= i < len(self._val):
            raise IndexError(f"validation sample {i} requested, there are {len(self._val)}")
        return torch.from_numpy(self.sample(i % len(self._val) if self.split == "val" else i))

    # ---- sizes ------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples in the split: the held-out ones (val), or one pass over every dataset's training chunks."""
        if self.split == "val":
            return len(self._val)
        return sum(len(s.train_ids) for s in self._sources)

    @property
    def num_tokens(self) -> int:
        return self.num_samples * (self.seq_len + 1)

    @property
    def datasets(self) -> list[DatasetInfo]:
        return [s.info for s in self._sources]

    # ---- position ---------------------------------------------------------------------------------
    def epochs(self, i: int | None = None) -> list[int]:
        """Each dataset's epoch at global sample i (default: the current position)."""
        i = self.samples_consumed if i is None else i
        block, slot = divmod(int(i), len(self._slot_ds))
        out = []
        for d, src in enumerate(self._sources):
            before = block * int(self._counts[d]) + int(np.count_nonzero(self._slot_ds[:slot] == d))
            out.append(before // len(src.train_ids))
        return out

    def state_dict(self) -> dict:
        epochs = self.epochs() if self.split == "train" else [0] * len(self._sources)
        return {
            "version": _STATE_VERSION,
            "samples_consumed": int(self.samples_consumed),
            "epoch": min(epochs),
            "epochs": epochs,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "samples_consumed" not in state:
            raise DataError(f"data state {state!r} has no samples_consumed; pass the dict state_dict() returned")
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("fingerprint", self.fingerprint)):
            if key in state and state[key] != mine:
                # deliberate (a new data mix mid-run) as often as not; the position still carries over
                warnings.warn(f"resuming data with a different {key} ({state[key]!r} saved, {mine!r} now): "
                              f"the samples after the resume point differ from the original run's", stacklevel=2)
        consumed = int(state["samples_consumed"])
        if consumed < 0:
            raise DataError(f"data state has samples_consumed = {consumed}; it must not be negative")
        self.samples_consumed = consumed

    # memory maps are reopened on first use in a new process rather than pickled (which would copy them)
    def __getstate__(self):
        for src in self._sources:
            src.drop_maps()
        return self.__dict__.copy()

    def __repr__(self) -> str:
        paths = ", ".join(f"{Path(s.info.path).name}×{s.weight:g}" for s in self._sources)
        return f"PackedMixture({paths}; seq_len={self.seq_len}, split={self.split!r}, seed={self.seed})"
