"""One run per run folder, and no run in a folder it did not make.

`claim(out, recipe)` is called once per run, before anything is written into OUT:
- OUT must be empty or missing, or a run folder this command made (its `.pangu-pi-run.json` names
  the same recipe, or, for a folder from before that marker, every entry is something a run writes).
  A folder holding anything else is refused in one line and left untouched; `--force` replaces only
  a run's own outputs (pangu_pi.run_layout.RUN_OUTPUTS), never other files, never the data caches.
- The run holds an exclusive lock (flock) on OUT/.pangu-pi-run.lock for its lifetime. A second run
  on the same OUT is refused in one line naming the holder's pid and host. The kernel drops the
  lock when the holder dies, however it dies, so a crashed run never blocks its resume.
- A launcher that spawns the ranks itself (`--nproc`) holds the lock for them and says so in
  PANGU_PI_RUN_LOCK; its rank 0 then does not lock again.

The lock works wherever flock does: local filesystems, and NFS v4 (which maps flock onto its own
locks). On a filesystem that ignores locks, two runs are not kept apart.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pangu_pi import run_layout as layout
from pangu_pi.errors import UserError

LOCK_ENV = "PANGU_PI_RUN_LOCK"  # set by a launcher that holds OUT's lock for the ranks it spawns


@dataclass
class Claim:
    out: Path
    run_id: str
    fd: int | None = None  # the open, flocked lock file; None when a launcher holds the lock

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def _is_run_output(name: str) -> bool:
    patterns = (*layout.RUN_OUTPUTS, *layout.RUN_CACHES, layout.RUN_MARKER, layout.RUN_LOCK, layout.RUN_MARKER + ".tmp")
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def read_marker(out: str | os.PathLike) -> dict | None:
    path = Path(out) / layout.RUN_MARKER
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _legacy_recipe(out: Path) -> str:
    """The recipe of a run folder written before the marker existed."""
    import yaml

    try:
        saved = yaml.safe_load((out / layout.RUN_CONFIG).read_text()) or {}
    except (FileNotFoundError, yaml.YAMLError):
        saved = {}
    finetuned = "finetune" in saved or any((out / n).exists() for n in (layout.FINETUNE_SUMMARY, layout.ADAPTER))
    return "finetune" if finetuned else "pretrain"


def check_owner(out: str | os.PathLike, recipe: str) -> dict | None:
    """Refuse (UserError) a non-empty OUT that `pangu-pi RECIPE` did not make. Returns its marker
    (None for an empty, missing or older run folder)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder for the run")
    names = [n for n in _entries(out) if n not in (layout.RUN_LOCK, layout.RUN_MARKER + ".tmp")]
    if not names:
        return None
    marker = read_marker(out)
    if marker is None:
        foreign = [n for n in names if not _is_run_output(n)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UserError(f"--out {out} is not empty and pangu-pi {recipe} did not make it (it holds {shown}); "
                            "choose a new or empty folder (--force replaces only a run folder of its own)")
        made_by = _legacy_recipe(out)
    else:
        made_by = marker.get("recipe")
    if made_by != recipe:
        raise UserError(f"--out {out} is a `pangu-pi {made_by}` run folder; pangu-pi {recipe} will not write into "
                        "it: choose another --out")
    return marker


def _lock(out: Path) -> int:
    path = out / layout.RUN_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncated here: it names the holder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "a process that has not yet said its pid"
        raise UserError(f"--out {out} is in use by another run ({who}); wait for it to end or choose another "
                        "--out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    os.fsync(fd)
    return fd


def launcher_holds(out: str | os.PathLike) -> bool:
    """True in a rank whose launcher (its parent) holds OUT's lock for it."""
    lock = Path(out) / layout.RUN_LOCK
    if os.environ.get(LOCK_ENV) != str(lock.resolve()):
        return False
    try:
        holder = lock.read_text().split()
    except FileNotFoundError:
        return False
    return bool(holder) and holder[0] == str(os.getppid())


def _remove_outputs(out: Path) -> list[str]:
    """Delete what a run wrote at the top of OUT (not the caches, not anything else)."""
    removed = []
    for name in _entries(out):
        if any(fnmatch.fnmatchcase(name, p) for p in layout.RUN_OUTPUTS):
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(name)
    return removed


def claim(out: str | os.PathLike, recipe: str, *, force: bool = False) -> Claim:
    """Make OUT this run's: refuse a foreign folder, lock it, with `force` clear the previous run's
    outputs, and mark it. Returns the claim (release it when the run ends)."""
    out = Path(out)
    if launcher_holds(out):
        return Claim(out, (read_marker(out) or {}).get("run_id", ""))
    check_owner(out, recipe)
    out.mkdir(parents=True, exist_ok=True)
    fd = _lock(out)
    try:
        marker = check_owner(out, recipe)  # again, holding the lock: another run may have just made it
        if force:
            _remove_outputs(out)
            marker = None
        if marker is None or "run_id" not in marker:
            marker = {"recipe": recipe, "run_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            tmp = out / (layout.RUN_MARKER + ".tmp")
            tmp.write_text(json.dumps(marker, indent=2) + "\n")
            os.replace(tmp, out / layout.RUN_MARKER)
    except BaseException:
        os.close(fd)
        raise
    return Claim(out, marker["run_id"], fd)


def launcher_env(out: str | os.PathLike) -> dict[str, str]:
    """The variable a launcher holding OUT's lock passes to the ranks it spawns."""
    return {LOCK_ENV: str((Path(out) / layout.RUN_LOCK).resolve())}
