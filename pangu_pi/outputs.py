"""Folders the commands write: a stranger's folder is never touched, a command's own output is
replaced only when asked, and a re-run with other settings is refused, never silently skipped.

Every folder that `tokenizer train`, `tokenizer extend`, `init`, `convert-llama`, `resize` and
`export` write carries a marker, `.pangu-pi-output.json`: the command, the settings it ran with and
the folder entries it wrote. Before any work, `claim_output` decides:

- a missing or empty folder: "new";
- a folder with the same command's complete marker and the same settings: "same" (the command may
  reuse it, as `tokenizer train` does, or write it again: the result is the same);
- the same command with other settings: refused, unless `force`, then "replace";
- an output from before markers (nothing but the command's file names, and pangu-pi's by its
  content): refused, unless `force`, since its settings are unknown;
- anything else (no marker: a folder the user or another tool made; another command's output):
  refused whatever `force` says, because replacing it would delete files pangu-pi did not write.

`staged_output` then writes into a sibling temporary folder and moves the result in: a new folder
by one rename, an existing one entry by entry, replacing only the entries its marker lists and
leaving every other file where it is. A file in the way that the marker does not list stops the
move before anything is replaced.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

MARKER = ".pangu-pi-output.json"
_DIGEST = re.compile(r"[0-9a-f]{16,}")


class OutputRefused(UserError, FileExistsError):
    """An output folder a command will not write into; the message names the folder and the way out."""


@dataclass(frozen=True)
class Claim:
    out: Path
    command: str  # as the user types it after `pangu-pi`, e.g. "tokenizer train"
    settings: dict[str, Any]
    state: str  # "new", "same" or "replace"
    earlier: tuple[str, ...] = ()  # the entries of an output from before markers, taken as the command's own


# What the commands wrote before they left a marker, as glob patterns. A folder holding nothing else,
# and holding what makes it pangu-pi's (see _EARLIER), is taken as an earlier output of its command, so
# `--force` can replace it; a downloaded model or tokenizer, whose files have the same names, is not.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "spm.model", "tokenizer.model", "chat_template.jinja", "chat_template.previous.jinja",
                   "extension.json")
CHECKPOINT_FILES = (*TOKENIZER_FILES, "config.json", "generation_config.json", "model.safetensors",
                    "model-*-of-*.safetensors", "model.safetensors.index.json", "README.md",
                    "configuration_pangu_pi.py", "modeling_pangu_pi.py")


def _pangu_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() and (folder / "spm.model").is_file()


def _pangu_checkpoint(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == "pangu_pi"
    except (OSError, ValueError, AttributeError):
        return False


_EARLIER = {"tokenizer": (TOKENIZER_FILES, _pangu_tokenizer), "checkpoint": (CHECKPOINT_FILES, _pangu_checkpoint)}


def add_force_argument(parser, output: str) -> None:
    """`--force`, worded the same in every command that writes a folder; `output` names what it writes."""
    parser.add_argument("--force", action="store_true",
                        help=f"replace {output} this command wrote there before, with other inputs or settings "
                             "(only its own files; a folder it did not write is always refused)")


def normalise(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as the marker stores them (JSON types: paths as strings, tuples as lists)."""
    return json.loads(json.dumps(settings, default=str, sort_keys=True))


def inputs_fingerprint(files) -> str:
    """A digest of a command's input files (resolved paths, sizes and modification times), to tell a
    re-run on other inputs, or on inputs changed since, from a re-run on the same."""
    digest = hashlib.sha256()
    for f in files:
        path = Path(f).resolve()
        st = path.stat()
        digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """`inputs_fingerprint` of the files at the top of `folder` (a checkpoint read as an input)."""
    return inputs_fingerprint(sorted(p for p in Path(folder).iterdir() if p.is_file()))


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of a folder a pangu-pi command wrote; None when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("command"), str):
        return None
    if not isinstance(data.get("files"), list):
        return None
    # Entries are plain names inside the folder: a marker naming "../x" must not reach outside it.
    if not all(isinstance(f, str) and f not in ("", ".", "..") and "/" not in f and "\\" not in f
               for f in data["files"]):
        return None
    return data


def _readable(value) -> bool:
    return value is None or isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 24
                                                                     and not _DIGEST.fullmatch(value))


def _changes(before: dict, after: dict) -> str:
    keys = sorted(set(before) | set(after))
    changed = [k for k in keys if before.get(k) != after.get(k)]
    shown = []
    for key in changed[:3]:
        old, new = before.get(key), after.get(key)
        if _readable(old) and _readable(new):
            shown.append(f"{key} {old} -> {new}")
        else:  # a digest of files, a path, a mapping: the name says enough
            shown.append(key)
    return ", ".join(shown) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")


def claim_output(out: str | os.PathLike, command: str, settings: dict[str, Any], *, force: bool = False,
                 earlier: str | None = None, adopt_earlier: bool = False, force_flag: str = "--force") -> Claim:
    """Decide, before any work, whether `pangu-pi COMMAND` may write `out` (see the module docstring).
    Raises OutputRefused with the reason and the fix.

    `earlier` ("tokenizer" or "checkpoint"): what the command wrote before it left a marker. Such a
    folder is refused unless `force` (its settings are unknown), or with `adopt_earlier` taken as
    made with these settings ("same")."""
    out = Path(out)
    settings = normalise(settings)
    if out.exists() and not out.is_dir():
        raise OutputRefused(f"{out} is a file; `pangu-pi {command}` writes a folder there: choose another path")
    if not out.exists() or not any(out.iterdir()):
        return Claim(out, command, settings, "new")
    marker = read_marker(out)
    names = tuple(sorted(p.name for p in out.iterdir()))
    patterns, made_by_us = _EARLIER[earlier] if earlier else ((), None)
    if marker is None and made_by_us is not None and made_by_us(out) and \
            all(any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in names):
        if adopt_earlier:
            return Claim(out, command, settings, "same", earlier=names)
        if force:
            return Claim(out, command, settings, "replace", earlier=names)
        raise OutputRefused(f"{out} holds an output of `pangu-pi {command}` from before it recorded its settings: "
                            f"pass {force_flag} to replace it, or choose another folder")
    if marker is None:
        raise OutputRefused(
            f"{out} is not empty and was not written by `pangu-pi {command}`: choose a new or empty folder "
            f"({force_flag} replaces only a folder `pangu-pi {command}` wrote, never other files)"
        )
    if marker["command"] != command:
        raise OutputRefused(
            f"{out} holds the output of `pangu-pi {marker['command']}`: choose another folder for "
            f"`pangu-pi {command}`"
        )
    if marker.get("complete") and marker.get("settings") == settings:
        return Claim(out, command, settings, "same")
    if not force:
        what = (f"holds an unfinished output of `pangu-pi {command}`" if not marker.get("complete") else
                f"was written by `pangu-pi {command}` with other settings "
                f"({_changes(marker.get('settings') or {}, settings)})")
        raise OutputRefused(f"{out} {what}: pass {force_flag} to replace it, or choose another folder")
    return Claim(out, command, settings, "replace")


def _write_marker(folder: Path, data: dict) -> None:
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)


def _default_permissions(folder: Path) -> None:
    """What a plain mkdir and open would give: mkdtemp makes the folder private to its owner."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def staged_output(claim: Claim) -> Iterator[Path]:
    """A temporary folder beside `claim.out` to write the whole output into; on leaving the block
    without an error its entries become `claim.out`'s (see the module docstring). On an error
    nothing in `claim.out` changes."""
    out = claim.out
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield staged
        _commit(claim, staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _commit(claim: Claim, staged: Path) -> None:
    from . import __version__

    out = claim.out
    (staged / MARKER).unlink(missing_ok=True)  # a copied folder may bring the marker of its own command
    entries = sorted(p.name for p in staged.iterdir())
    marker = {"command": claim.command, "settings": claim.settings, "files": entries, "complete": True,
              "pangu_pi_version": __version__}
    _default_permissions(staged)
    if not out.exists():
        _write_marker(staged, marker)
        try:
            os.rename(staged, out)  # fails, deleting nothing, if a folder with files appeared there meanwhile
            return
        except OSError:
            if not out.is_dir():
                raise
            (staged / MARKER).unlink()
            if any(out.iterdir()) and read_marker(out) is None:
                raise OutputRefused(f"{out} appeared while `pangu-pi {claim.command}` ran, holding files it did "
                                    "not write; nothing was written there") from None
    # An existing folder: empty, or this command's own output. Look again (time has passed since the
    # claim): only entries the marker lists may be replaced.
    before = read_marker(out)
    if before is not None and before["command"] != claim.command:
        raise OutputRefused(f"{out} now holds the output of `pangu-pi {before['command']}`; nothing was replaced")
    own = set(before["files"]) if before is not None else set(claim.earlier)
    in_the_way = sorted({p.name for p in out.iterdir()} & set(entries) - own)
    if in_the_way:
        raise OutputRefused(
            f"{out / in_the_way[0]} was not written by `pangu-pi {claim.command}`; move it out of {out} "
            "(nothing was replaced)"
        )
    # Claim the union first: a move cut short leaves a folder still marked as this command's, unfinished.
    _write_marker(out, {**marker, "files": sorted(own | set(entries)), "complete": False})
    for name in entries:
        _remove(out / name)
        os.replace(staged / name, out / name)
    for name in sorted(own - set(entries)):  # its own entries from before that this output does not have
        _remove(out / name)
    _write_marker(out, marker)
