"""Check the package's import layers with import-linter (contracts in .importlinter).

The checkout keeps training/ and serving/ beside pangu_pi/, but they are installed as
pangu_pi.training and pangu_pi.serving (pyproject.toml). import-linter reads a package from one
folder on disk, so the package is first laid out as it is installed, in a scratch folder (plain
copies of the sources: a few hundred kB), and the contracts are checked there.

    python tools/check_imports.py                 # exit 0 when every contract holds
    python tools/check_imports.py --plant pangu_pi/config.py "from pangu_pi import cli"

`--plant FILE LINE` appends LINE to FILE in the scratch copy only: a way to see a contract break
(the tests use it to show that an upward import fails the check).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# checkout folder -> where the install puts it
LAYOUT = {"pangu_pi": "pangu_pi", "training": "pangu_pi/training", "serving": "pangu_pi/serving"}


def stage(dest: Path, plant: tuple[str, str] | None = None) -> Path:
    """Copy the sources into DEST in the installed layout; returns the folder to put on sys.path."""
    for src, rel in LAYOUT.items():
        shutil.copytree(ROOT / src, dest / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                        dirs_exist_ok=True)
    if plant is not None:
        file, line = plant
        target = dest / _installed_path(file)
        with open(target, "a", encoding="utf-8") as f:
            f.write(f"\n{line}\n")
    return dest


def _installed_path(file: str) -> str:
    head, _, rest = file.partition("/")
    return f"{LAYOUT[head]}/{rest}" if head in LAYOUT else file


def check(plant: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run lint-imports over a staged copy; returns the finished process (stdout holds the report)."""
    with tempfile.TemporaryDirectory(prefix="pangu-pi-imports-") as tmp:
        staged = stage(Path(tmp), plant)
        env = {**os.environ, "PYTHONPATH": str(staged)}
        lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
        return subprocess.run([lint, str(ROOT / ".importlinter"), "--no-cache"],
                              cwd=staged, env=env, capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plant", nargs=2, metavar=("FILE", "LINE"),
                   help="append LINE to FILE (a checkout path) in the scratch copy before checking")
    args = p.parse_args(argv)
    done = check(tuple(args.plant) if args.plant else None)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
