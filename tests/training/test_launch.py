"""Local process spawning: the torchrun-style environment and what happens when a rank fails."""

from __future__ import annotations

import json
import os
import sys
import time

from pangu_pi.training import launch


def test_strip_nproc():
    argv = ["--config", "c.yaml", "--nproc", "2", "--set", "a=1"]
    assert launch.strip_nproc(argv) == ["--config", "c.yaml", "--set", "a=1"]
    assert launch.strip_nproc(["--nproc=4", "--out", "x"]) == ["--out", "x"]


def test_every_rank_gets_its_environment(tmp_path):
    code = (
        "import json, os, sys;"
        "keys = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'OMP_NUM_THREADS');"
        f"open(r'{tmp_path}/' + os.environ['RANK'], 'w').write(json.dumps({{k: os.environ[k] for k in keys}}))"
    )
    assert launch.spawn_local(3, [sys.executable, "-c", code]) == 0
    envs = [json.loads((tmp_path / str(r)).read_text()) for r in range(3)]
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"}
    assert len({e["MASTER_PORT"] for e in envs}) == 1


def test_one_failing_rank_stops_the_others():
    # Rank 1 fails at once; rank 0 would sleep for a minute if it were not stopped.
    code = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(60)"
    start = time.monotonic()
    assert launch.spawn_local(2, [sys.executable, "-c", code]) == 3
    assert time.monotonic() - start < 30


def test_a_one_process_group_environment_is_put_back_afterwards(monkeypatch):
    from pangu_pi.training import launch

    for key in launch.GROUP_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")  # a user's own value survives
    before = launch.single_process_env()
    assert launch.in_distributed_launch() and os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"]
    launch.restore_env(before)
    assert not launch.in_distributed_launch()
    assert "MASTER_PORT" not in os.environ and os.environ["MASTER_ADDR"] == "10.0.0.7"
