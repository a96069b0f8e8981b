"""Checkpoints that a crash cannot damage.

Layout under `OUT/checkpoints/`:

    step_N/                 one complete checkpoint (never modified once it has this name)
        engine/             DeepSpeed's engine state: model, optimizer and scheduler, per rank
        zero_to_fp32.py     DeepSpeed's consolidation script, usable without this package
        trainer/rank_R.pt   per rank: data position and RNG states (python, numpy, torch)
        trainer/state.json  step, samples and tokens consumed, process count
        config.yaml         the resolved run config
        model/config.json   the model config (what `pangu-pi export` builds the model from)
        tokenizer/          the tokenizer the data was made with
        COMPLETE            written last, after every file above is on disk
    step_N.tmp/             a save in progress; a crash leaves it behind and resume deletes it
    latest                  the name of the newest complete checkpoint, replaced atomically

A save writes everything into `step_N.tmp/`, fsyncs it, writes `COMPLETE`, renames the folder to
`step_N/` and only then points `latest` at it. Resume takes the newest folder that has `COMPLETE`,
so a process killed at any instant leaves the previous checkpoint as the one to resume from.
The checkpoint folder must be on a filesystem every node sees (rank 0 renames what all ranks wrote).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

COMPLETE = "COMPLETE"
LATEST = "latest"
TMP_SUFFIX = ".tmp"
ENGINE_TAG = "engine"  # DeepSpeed's tag (its sub-folder) inside each checkpoint folder
_STEP_DIR = re.compile(r"^step_(\d+)$")

# Test hook: SIGKILL the whole process group halfway through writing the checkpoint of this step,
# to prove that such a crash leaves the previous checkpoint usable.
KILL_DURING_SAVE_ENV = "PANGU_PI_TEST_KILL_DURING_SAVE"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def is_complete(path: Path) -> bool:
    return _STEP_DIR.match(path.name) is not None and (path / COMPLETE).is_file()


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint. The folders themselves are the truth; `latest` is a convenience."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def remove_incomplete(root: str | Path) -> list[Path]:
    """Delete saves that never finished (`*.tmp`, or step folders without COMPLETE). Rank 0 only."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if p.is_dir() and (p.name.endswith(TMP_SUFFIX) or (_STEP_DIR.match(p.name) and not is_complete(p))):
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
    if _STEP_DIR.match(path.name) or path.name.endswith(TMP_SUFFIX):
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


def _kill_if_asked(step: int) -> None:
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
        os.killpg(os.getpgid(0), signal.SIGKILL)


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
) -> Path:
    """Write checkpoint `step_N` atomically; every rank calls this together. Returns the final folder.

    `rank_state` is this rank's own (data position; RNG states are added here); `trainer_state` is
    rank 0's JSON summary; `files` maps relative names to contents (str/bytes) or to a Path to copy.
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

    engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, client_state={"step": step}, save_latest=False)
    own = tmp / "trainer" / f"rank_{rank}.pt"
    own.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**rank_state, "rng": rng_state(), "rank": rank, "world_size": world_size}, own)
    _fsync_file(own)
    _barrier()

    if rank == 0:
        _kill_if_asked(step)
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
        (tmp / "trainer" / "state.json").write_text(json.dumps(state, indent=2))
        fsync_tree(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"step": step}) + "\n")
        _fsync_file(tmp / COMPLETE)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_atomic(root / LATEST, final.name + "\n")
        if keep_last:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine, path: str | Path, *, rank: int, world_size: int) -> tuple[dict, dict]:
    """Restore engine state and this rank's RNG; returns (rank_state, trainer_state)."""
    path = Path(path)
    trainer_state = json.loads((path / "trainer" / "state.json").read_text())
    if trainer_state["world_size"] != world_size:
        from pangu_pi.cli import UserError

        raise UserError(
            f"checkpoint {path} was written by {trainer_state['world_size']} processes and this run has "
            f"{world_size}; resume with the same process count, or export it (`pangu-pi export`) and start anew"
        )
    load_path, _ = engine.load_checkpoint(
        str(path), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no engine state in {path / ENGINE_TAG}; the checkpoint is damaged")
    rank_state = torch.load(path / "trainer" / f"rank_{rank}.pt", weights_only=False)
    set_rng_state(rank_state["rng"])
    return rank_state, trainer_state
