"""`prepare_shards`: tokenize inputs into a dataset folder, in parallel and resumably.

The manifest is rewritten (atomically) after every finished shard and lists only finished ones, so
a run killed at any moment leaves a folder from which the next run continues: shards whose inputs,
tokenizer and files are unchanged are kept, everything else is redone.

The manifest also records the plan (a digest of every shard's key: inputs, their sizes and times,
tokenizer, text field, shard size). A re-run with another plan is refused rather than turned into
another dataset, unless `force`; a folder without a manifest of ours is never written into, and
nothing but shard files and the manifest is ever deleted.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from .encode import EncodeSpec, encode_unit, init_worker
from .shards import (
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_FORMAT,
    DataError,
    bin_path,
    idx_path,
    shard_is_intact,
    token_dtype,
    write_json_atomic,
)
from .sources import Unit, plan_units

log = logging.getLogger(__name__)

# Input bytes per shard. A shard is also the unit of parallel work, so a small corpus is cut into about
# 16 shards to keep the workers busy, while a large one gets big shards: fewer files and memory maps.
MAX_SHARD_BYTES = 64 << 20  # about 16M tokens, 32 MB of uint16
MIN_SHARD_BYTES = 1 << 20


def auto_shard_bytes(total_bytes: int) -> int:
    """The shard size for a corpus of `total_bytes`: depends on the inputs alone, never on the worker count."""
    return max(MIN_SHARD_BYTES, min(MAX_SHARD_BYTES, total_bytes // 16))


def plan_digest(units: list[Unit]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(u.key for u in units).encode()).hexdigest()[:16]


def _read_manifest(out: Path) -> dict | None:
    import json

    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def check_out(out: Path, units: list[Unit], force: bool) -> None:
    """Refuse (DataError) a folder `prepare_shards` must not write: one it did not make, or (without
    `force`) one it made from other inputs or settings."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; name a folder for the dataset")
    entries = [f.name for f in out.iterdir()] if out.is_dir() else []
    if not entries:
        return
    manifest = _read_manifest(out)
    if manifest is None:
        raise DataError(f"--out {out} is not empty and holds no dataset `pangu-pi data prepare` wrote: choose a new "
                        "or empty folder (--force replaces only a dataset of its own, never other files)")
    if force:
        return
    planned = {u.key for u in units}
    if "plan" in manifest:
        other = manifest["plan"] != plan_digest(units)
    else:  # a manifest from before the plan was recorded: its finished shards must all be planned again
        other = any(e.get("key") not in planned for e in manifest.get("shards", []))
    if other:
        raise DataError(f"--out {out} holds a dataset prepared from other inputs or settings (input files, their "
                        "sizes or times, tokenizer, --text-field or --shard-mb changed): pass --force to replace "
                        "it, or choose another --out")


def _load_done(out: Path, units: list[Unit]) -> dict[str, dict]:
    """Manifest entries of a previous run whose shard files are still whole and whose unit is still planned."""
    import json

    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # a foreign or damaged manifest: redo everything rather than trust it
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != FORMAT_VERSION:
        return {}
    planned = {u.key for u in units}
    return {
        e["key"]: e
        for e in manifest.get("shards", [])
        if e.get("key") in planned and shard_is_intact(out, e["name"], e["n_tokens"], e["n_docs"])
    }


def _remove_leftovers(out: Path, keep: set[str]) -> None:
    """Delete temporaries of killed runs and shards no longer planned, so the folder holds only the dataset."""
    for f in out.iterdir():
        hidden_tmp = f.name.startswith(".shard-") and ".tmp." in f.name
        stale = f.name.startswith("shard-") and f.suffix in (".bin", ".idx") and f.stem not in keep
        if hidden_tmp or stale:
            f.unlink(missing_ok=True)


def prepare_shards(
    tokenizer_dir: str | os.PathLike,
    inputs: list[str] | None,
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    text_field: str = "text",
    progress: bool = True,
    shard_bytes: int | None = None,
    force: bool = False,
) -> Path:
    """Tokenize `inputs` (files, directories, globs; None = the embedded default corpus) into `out_dir`.

    Each document's tokens are followed by EOS. Shards are planned from the inputs alone (about
    `shard_bytes` of input each; by default a sixteenth of the inputs, within 1 to 64 MiB), so any
    number of `workers` produces the same files.
    Re-running with the same inputs and settings skips shards already finished; with others it is
    refused unless `force` (see `check_out`). Returns `out_dir`.
    """
    from pangu_pi.corpus import default_corpus_files, expand_inputs
    from pangu_pi.tokenizer import tokenizer_facts

    import multiprocessing.process

    if getattr(multiprocessing.process.current_process(), "_inheriting", False):
        # a worker re-importing a script whose prepare call is unguarded would wait forever on the lock
        raise DataError("prepare_shards was called while a worker process was importing the main script; "
                        "put the call under `if __name__ == \"__main__\":`")
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    if shard_bytes is not None and shard_bytes < 1:
        raise DataError(f"shard size must be positive, got {shard_bytes} bytes")
    files = expand_inputs(inputs) if inputs else default_corpus_files()
    if shard_bytes is None:
        shard_bytes = auto_shard_bytes(sum(f.stat().st_size for f in files))
    tok = tokenizer_facts(tokenizer_dir)
    tokenizer_json, vocab_size, eos_id, digest = str(tok.path), tok.vocab_size, tok.require_eos(), tok.hash
    units = plan_units(files, shard_bytes, text_field=text_field, tokenizer_hash=digest)
    out = Path(out_dir)
    check_out(out, units, force)  # before any work; again under the lock, where it counts
    out.mkdir(parents=True, exist_ok=True)

    # ranks of one job may all call this on the same folder: one works, the others then find it finished
    with FileLock(str(out) + ".lock"):
        check_out(out, units, force)
        return _prepare_locked(out, units, tokenizer_json, vocab_size, eos_id, digest, text_field, workers, progress)


def _prepare_locked(out: Path, units: list[Unit], tokenizer_json: str, vocab_size: int, eos_id: int, digest: str,
                    text_field: str, workers: int, progress: bool) -> Path:
    done = _load_done(out, units)
    _remove_leftovers(out, keep={u.name for u in units if u.key in done})
    todo = [u for u in units if u.key not in done]
    if done:
        log.info("%s: %d of %d shards already finished, skipping them", out, len(done), len(units))

    def save(complete: bool) -> None:
        write_json_atomic(out / MANIFEST, {
            "format": MANIFEST_FORMAT,
            "version": FORMAT_VERSION,
            "complete": complete,
            "planned_shards": len(units),
            "plan": plan_digest(units),
            "tokenizer_hash": digest,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "dtype": token_dtype(vocab_size).name,
            "text_field": text_field,
            "shards": [done[u.key] for u in units if u.key in done],  # in input order, whatever finished first
        })

    save(complete=not todo)
    spec = EncodeSpec(tokenizer_json, str(out), eos_id, vocab_size, digest, text_field)
    bar = tqdm(total=sum(u.size for u in todo), desc=f"tokenizing into {out.name}", unit="B", unit_scale=True,
               disable=not progress or not todo)
    try:
        _run_units(todo, units, done, spec, workers, bar, save)
    except BaseException:
        bar.leave = False  # the error message, not a half-full bar, is what the user should see last
        raise
    finally:
        bar.close()
    for u in units:
        if not (bin_path(out, u.name).exists() and idx_path(out, u.name).exists()):
            raise DataError(f"shard {u.name} in {out} vanished while preparing; is another process writing there?")
    return out



def _run_units(todo: list[Unit], units: list[Unit], done: dict, spec: EncodeSpec, workers: int, bar, save) -> None:
    """Encode the units not yet done, recording each in the manifest as it finishes."""
    if workers == 1 or len(todo) <= 1:
        for unit in todo:
            done[unit.key] = encode_unit(unit, spec, on_bytes=bar.update)
            save(complete=len(done) == len(units))
        return
    # spawn, not fork: the parent may hold threads (torch, the tokenizer's pool) that fork would break
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("spawn"),
                             initializer=init_worker, initargs=(spec.tokenizer_json,)) as pool:
        pending = {pool.submit(encode_unit, unit, spec): unit for unit in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                unit = pending.pop(fut)
                try:
                    done[unit.key] = fut.result()
                except BrokenProcessPool:
                    raise DataError("a tokenizing worker process died (its own error is printed above; out of "
                                    "memory, or a script calling prepare_shards without an "
                                    "`if __name__ == \"__main__\":` guard); fix that and re-run") from None
                except BaseException:
                    for other in pending:
                        other.cancel()
                    raise
                bar.update(unit.size)
            save(complete=len(done) == len(units))
