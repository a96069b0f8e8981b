"""Checkpoints that a crash cannot damage.

Layout under `OUT/checkpoints/` (every name from pangu_pi/run_layout.py):

    step_N/                 one complete checkpoint (never modified once it has this name)
        engine/             DeepSpeed's engine state: model, optimizer and scheduler, per rank
        zero_to_fp32.py     DeepSpeed's consolidation script, usable without this package
        trainer/rank_R.pt   per rank: data position and RNG states (python, numpy, torch)
        trainer/state.json  step, samples and tokens consumed, process count, the run's id
        config.yaml         the resolved run config
        model/config.json   the model config (what `pangu-pi export` builds the model from)
        tokenizer/          the tokenizer the data was made with
        COMPLETE            written last, after every file above is on disk
        universal/          made on demand when the run resumes on another process count: the
                            engine state as DeepSpeed's universal checkpoint (`ds_to_universal`),
                            one file per parameter and optimizer moment, loadable by any count
    step_N.tmp/             a save in progress; a crash leaves it behind and resume deletes it
    latest                  the name of the newest complete checkpoint, replaced atomically

A save writes everything into `step_N.tmp/`, fsyncs it, writes `COMPLETE`, renames the folder to
`step_N/` and only then points `latest` at it. Resume takes the newest folder that has `COMPLETE`,
so a process killed at any instant leaves the previous checkpoint as the one to resume from.
Pruning (`checkpoint.keep_last`) takes a checkpoint's `COMPLETE` away before any of its files, so a
kill halfway through a deletion leaves no folder that counts as complete.
The checkpoint folder must be on a filesystem every node sees (rank 0 renames what all ranks wrote).

Resuming on M processes a checkpoint that N wrote: rank 0 converts the engine state once with
DeepSpeed's `ds_to_universal` (into `universal.tmp/`, renamed to `universal/` when done, so an
interrupted conversion is redone), and every rank loads it with DeepSpeed's universal loader
(`"checkpoint": {"load_universal": true}`): weights, AdamW moments and step counts, re-partitioned
for M. The LR scheduler comes from the same files. The data position is global (samples consumed by
all ranks together), so the stream continues at the exact sample; the global batch must be the same,
which `check_resume_batch` makes sure of before any process starts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pangu_pi import run_layout as layout
from pangu_pi.errors import UserError
from pangu_pi.run_layout import COMPLETE, ENGINE, LATEST, TMP_SUFFIX, UNIVERSAL, checkpoint_root, step_dir_name

from .config import BatchSplit, RunConfig, resolve_batch


def is_complete(path: Path) -> bool:
    return layout.step_of(path) is not None and (path / COMPLETE).is_file()


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=layout.step_of)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint. The folders themselves are the truth; `latest` is a convenience."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return layout.step_of(path)


def remove_incomplete(root: str | Path) -> list[Path]:
    """Delete saves that never finished (`*.tmp`, or step folders without COMPLETE). Rank 0 only."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if p.is_dir() and (p.name.endswith(TMP_SUFFIX) or (layout.step_of(p) is not None and not is_complete(p))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a `checkpoints/` folder or a run folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass a run folder or OUT/checkpoints/step_N")
    if is_complete(path):
        return path
    if layout.step_of(path) is not None or path.name.endswith(TMP_SUFFIX):
        raise FileNotFoundError(
            f"{path} is an unfinished checkpoint (no {COMPLETE} marker: the save was interrupted); "
            "use an earlier step_N folder"
        )
    for root in (path, checkpoint_root(path)):
        newest = latest_checkpoint(root)
        if newest is not None:
            return newest
    raise FileNotFoundError(f"no complete checkpoint under {path}; train with `pangu-pi pretrain` first")


# ------------------------------------------------------------------------------------------------
# Durability helpers


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems refuse to fsync a directory; the rename is still atomic there
        pass


def fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace path's content in one step: write a sibling, fsync it, rename over."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------
# Save and load (called on every rank, collectively)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def save_checkpoint(
    engine,
    root: str | Path,
    step: int,
    *,
    rank: int,
    world_size: int,
    rank_state: dict[str, Any],
    trainer_state: dict[str, Any],
    files: dict[str, Path | str | bytes] | None = None,
    keep_last: int | None = None,
    callbacks=None,
) -> Path:
    """Write checkpoint `step_N` atomically; every rank calls this together. Returns the final folder.

    `rank_state` is this rank's own (data position; RNG states are added here); `trainer_state` is
    rank 0's JSON summary; `files` maps relative names to contents (str/bytes) or to a Path to copy.
    `callbacks` (training/callbacks.py) hear `on_save_midway` on rank 0 once the engine state is written.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + TMP_SUFFIX)
    already = _broadcast(is_complete(final) if rank == 0 else None)
    if already:  # the same step saved before (e.g. the last step of a resumed run that was already done)
        return final
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()

    engine.save_checkpoint(str(tmp), tag=ENGINE, client_state={"step": step}, save_latest=False)
    own = tmp / layout.rank_state(rank)
    own.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**rank_state, "rng": rng_state(), "rank": rank, "world_size": world_size}, own)
    _fsync_file(own)
    _barrier()

    if rank == 0:
        if callbacks is not None:
            callbacks.on_save_midway(step)
        for name, content in (files or {}).items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, (bytes, str)):
                dest.write_bytes(content.encode() if isinstance(content, str) else content)
            elif content.is_dir():
                shutil.copytree(content, dest, ignore=shutil.ignore_patterns("*.lock"))
            else:
                shutil.copy2(content, dest)
        state = {**trainer_state, "step": step, "world_size": world_size, "saved_at": time.time()}
        (tmp / layout.TRAINER_STATE).write_text(json.dumps(state, indent=2))
        fsync_tree(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"step": step}) + "\n")
        _fsync_file(tmp / COMPLETE)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_atomic(root / LATEST, final.name + "\n")
        if keep_last:
            prune(root, keep_last)
    _barrier()
    return final


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints. Each loses its COMPLETE marker
    first (made durable before anything else goes), so a process killed halfway through leaves a
    folder that no longer counts as a checkpoint (resume removes it) rather than a "complete" one
    with files missing."""
    removed = []
    for old in complete_checkpoints(root)[:-keep_last]:
        (old / COMPLETE).unlink()
        _fsync_dir(old)
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


def read_state(path: str | Path) -> dict:
    """A checkpoint's trainer/state.json: step, samples and tokens consumed, process count, run id."""
    return json.loads((Path(path) / layout.TRAINER_STATE).read_text())


def saved_batch(path: str | Path) -> dict | None:
    """The batch section a checkpoint was trained with (from its resolved config.yaml)."""
    import yaml

    config = Path(path) / layout.RUN_CONFIG
    if not config.is_file():
        return None
    return (yaml.safe_load(config.read_text()) or {}).get("batch")


def check_resume_batch(path: str | Path, global_batch: int | None, world_size: int) -> None:
    """Refuse, before any process starts, a resume whose global batch differs from the checkpoint's
    (the data position and the LR schedule count its samples and steps), or that `world_size`
    processes cannot split (`global_batch` None), with the batch settings that would work."""
    saved = saved_batch(path)
    if not saved or not saved.get("global_batch_size"):
        return
    g = int(saved["global_batch_size"])
    if g == global_batch:
        return
    n = read_state(path).get("world_size", "?")
    name = Path(path).name
    if g % world_size:
        counts = [k for k in range(1, g + 1) if g % k == 0]
        raise UserError(
            f"{name} was trained with a global batch of {g} sequences, which {world_size} processes cannot split "
            f"evenly; resume it on {', '.join(map(str, counts[:-1]))} or {counts[-1]} processes"
        )
    per = g // world_size
    pairs = [(m, per // m) for m in range(1, per + 1) if per % m == 0]
    ways = " or ".join(f"batch.micro_batch_size={m} batch.grad_accum={a}" for m, a in pairs[::-1][:3])
    now = f"this run would take {global_batch}" if global_batch else "this batch section cannot split it"
    raise UserError(
        f"{name} was trained with a global batch of {g} sequences on {n} processes and {now}; keep it with "
        f"--set batch.global_batch_size={g} (on {world_size} processes: {ways})"
    )


def universal_folder(path: str | Path) -> Path:
    """The checkpoint's engine state as a DeepSpeed universal checkpoint, converted once (rank 0 only)."""
    path = Path(path)
    done = path / UNIVERSAL
    if (done / ENGINE).is_dir():
        return done
    tmp = path / (UNIVERSAL + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    # Its own process: the converter starts worker pools, which do not belong inside a rank that
    # holds a process group. --inject_missing_state: an engine without pipeline or tensor
    # parallelism records no universal-checkpoint info, and needs none.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path / ENGINE),
           "--output_folder", str(tmp / ENGINE), "--inject_missing_state", "--num_extract_workers", "2",
           "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"converting {path} to a universal checkpoint failed: {tail[0]}")
    fsync_tree(tmp)
    os.replace(tmp, done)
    _fsync_dir(path)
    return done


def _param_groups(engine) -> list[dict]:
    optimizer = getattr(engine, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside DeepSpeed's ZeRO wrapper
    return list(getattr(inner, "param_groups", None) or [])


def _optimizer_states(engine) -> list[dict]:
    optimizer = getattr(engine, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)
    state = getattr(inner, "state", None)
    return [s for s in state.values() if isinstance(s, dict)] if state else []


def load_checkpoint(engine, path: str | Path, *, rank: int, world_size: int,
                    universal: bool = False) -> tuple[dict, dict]:
    """Restore engine state and this rank's RNG; returns (rank_state, trainer_state).

    A checkpoint from another process count loads only through its universal form (`universal=True`,
    with the engine built with `"checkpoint": {"load_universal": true}`)."""
    path = Path(path)
    trainer_state = read_state(path)
    saved_world = trainer_state["world_size"]
    if saved_world != world_size and not universal:
        raise UserError(
            f"checkpoint {path} was written by {saved_world} processes and this run has {world_size}; "
            "the engine must load its universal form (the trainer does this on resume)"
        )
    source = path / UNIVERSAL if universal else path
    # DeepSpeed's ZeRO-3 universal loader gives every parameter group the first group's settings, so
    # the no-decay group (norms, SIAF coefficients) would start decaying. The groups' settings come
    # from the run config, which a resume keeps: put them back after the load.
    groups = _param_groups(engine) if universal else []
    kept = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
    load_path, _ = engine.load_checkpoint(
        str(source), tag=ENGINE, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    for group, settings in zip(_param_groups(engine) if universal else [], kept):
        group.update(settings)
    if universal:
        # The same loader hands one `step` tensor to every group's state; torch's AdamW increments it
        # in place, so each group would count the others' steps too (wrong bias correction).
        for state in _optimizer_states(engine):
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no engine state in {source / ENGINE}; the checkpoint is damaged")
    own = path / layout.rank_state(rank)
    if saved_world == world_size:
        rank_state = torch.load(own, weights_only=False)
        set_rng_state(rank_state["rng"])
    else:
        # Every rank's data position is the same global sample count; rank 0's file carries it.
        rank_state = torch.load(path / layout.rank_state(0), weights_only=False)
        if own.is_file():
            set_rng_state(torch.load(own, weights_only=False)["rng"])
        else:  # a rank the old run did not have: a fresh stream of its own
            seed = 1_000_003 * int(trainer_state["step"]) + rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
    return rank_state, trainer_state


def check_resume(config: RunConfig, world_size: int) -> BatchSplit:
    """The batch split on `world_size` processes, refusing a resume that cannot continue the run in
    OUT: checkpoints there with --resume none, or a global batch other than the checkpoint's."""
    from pangu_pi.config import ConfigError

    newest = latest_checkpoint(checkpoint_root(config.out))
    if newest is None:
        return resolve_batch(config.batch, world_size)
    if config.checkpoint.resume == "none":
        raise UserError(
            f"{config.out} already holds checkpoints (newest {newest.name}) and --resume is none; "
            "pass --resume auto to continue that run, --force to start it over, or choose another --out"
        )
    try:
        split = resolve_batch(config.batch, world_size)
    except ConfigError:
        # Say what would continue this run, not only what is wrong with the batch section.
        check_resume_batch(newest, None, world_size)
        raise
    check_resume_batch(newest, split.global_batch_size, world_size)
    return split


def consolidated_state_dict(path: str | Path, expected: set[str] | None = None) -> dict:
    """The whole model's fp32 weights from a checkpoint's engine state, gathered from the ZeRO
    partitions of every rank by DeepSpeed's own zero_to_fp32 (any stage, any process count). With
    `expected` (the model's state-dict keys), a checkpoint of another model is refused. The one
    gather of `pangu-pi export` and of fine-tuning's final model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=ENGINE)
    if expected is not None:
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise UserError(
                f"{path} does not match its model config: missing {sorted(missing)[:5]}, unexpected "
                f"{sorted(unexpected)[:5]}; the checkpoint is damaged or from another model"
            )
    return state
