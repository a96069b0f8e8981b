"""Starting the trainer's processes.

Three ways in, one trainer: it reads the torchrun-style environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) that every launcher sets.

- A laptop or CPU box: `pangu-pi pretrain --config configs/tiny.yaml --nproc 2` spawns the
  processes itself (`spawn_local` below), on the gloo backend.
- One GPU node: `torchrun --nproc_per_node 8 -m pangu_pi.training.pretrain --config ...`, or
  `deepspeed --num_gpus 8 --module pangu_pi.training.pretrain --config ...` (which adds `--local_rank`).
- Several nodes: DeepSpeed's launcher with a hostfile (`node-1 slots=8` per line), run on the first
  node; it starts the same command on every node over ssh (pdsh when installed):
      deepspeed --hostfile hostfile --master_addr node-1 --module pangu_pi.training.pretrain \
          --config configs/pangu-pi-7b.yaml --out /shared/runs/7b
  The run folder must be on a filesystem that every node sees. docs/training.md has the recipe.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from pangu_pi.net import free_port

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def in_distributed_launch() -> bool:
    """True inside a process started by torchrun, deepspeed or `spawn_local`."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def single_process_env() -> dict[str, str | None]:
    """The environment of a one-process group, for a plain `pangu-pi pretrain` without a launcher.
    Returns the variables as they were, for `restore_env` once the group is gone."""
    before = {k: os.environ.get(k) for k in GROUP_ENV}
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return before


def restore_env(before: dict[str, str | None]) -> None:
    """Put back what `single_process_env` changed: a later run in this process (a notebook, a test
    session) picks a fresh port, and child processes do not inherit a finished group's rank."""
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def rank_env(rank: int, nproc: int, port: int, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        # Each process gets its share of the cores; more threads than cores slows every rank down.
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)),
    )
    return env


PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(parent: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when the thread that started it dies (prctl
    PR_SET_PDEATHSIG), so ranks never outlive a launcher that was SIGKILLed. With `parent`, exit at
    once if that process is already gone (it died before the request was made)."""
    if _LIBC is None:
        return
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def spawn_local(nproc: int, command: list[str], *, poll_s: float = 0.2, env: dict[str, str] | None = None) -> int:
    """Run `command` as ranks 0..nproc-1 on this machine; wait for all; return the first failure's code.

    When one rank fails the others are stopped, so a crash does not leave ranks waiting forever in a
    collective. Ctrl-C (or SIGTERM) is passed on to every rank, and every rank dies with this
    process, however it dies (a parent-death signal). `env` adds variables for the ranks.
    """
    if nproc < 1:
        from pangu_pi.errors import UserError

        raise UserError(f"--nproc must be at least 1, got {nproc}")
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    me = os.getpid()
    procs = [subprocess.Popen(command, env={**rank_env(r, nproc, port, threads), **(env or {})},
                              preexec_fn=lambda: die_with_parent(me)) for r in range(nproc)]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed = 0
        while True:
            codes = [p.poll() for p in procs]
            bad = [c for c in codes if c not in (None, 0)]
            if bad and not failed:
                failed = bad[0]
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            if all(c is not None for c in codes):
                return failed or 0
            time.sleep(poll_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()


def rank_command(argv: list[str], command: str = "pretrain") -> list[str]:
    """What each spawned rank runs: `pangu_pi.training.COMMAND` with the same arguments minus --nproc."""
    return [sys.executable, "-m", f"pangu_pi.training.{command}", *strip_nproc(argv)]


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out
