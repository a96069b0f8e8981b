"""The memory-bandwidth measurement that the serving benchmark puts beside decode's weight traffic."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_membw", ROOT / "tools" / "bench_membw.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_reports_read_and_copy_for_one_and_all_threads():
    import os

    import torch

    threads_before = torch.get_num_threads()
    result = _load().measure(gib=1 / 64, repeats=1)
    assert result["tensor_bytes"] == 2**24
    tags = ["1t"] + (["all"] if (os.cpu_count() or 1) > 1 else [])
    for tag in tags:
        # A 16 MiB pass takes well under a second anywhere: 1e7 B/s is a floor no real memory misses.
        assert 1e7 < result[f"read_bytes_per_s_{tag}"] < 1e13
        assert 1e7 < result[f"copy_bytes_per_s_{tag}"] < 1e13
    assert torch.get_num_threads() == threads_before  # the caller's thread setting is left as it was


def test_main_prints_json_last(capsys, monkeypatch):
    module = _load()
    monkeypatch.setattr("sys.argv", ["bench_membw.py", "--gib", "0.015625", "--repeats", "1"])
    assert module.main() == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["read_bytes_per_s_1t"] > 0 and last["threads"][0] == 1
