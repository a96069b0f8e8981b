"""Atomic checkpoints: what a crash at any point leaves behind, and what resume picks."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pangu_pi.training import checkpoint as ckpt


class FakeEngine:
    """Stands in for a DeepSpeed engine: one file of state under save_dir/tag."""

    def __init__(self, value: float = 0.0):
        self.value = value

    def save_checkpoint(self, save_dir, tag, client_state=None, save_latest=True):
        from pathlib import Path

        (Path(save_dir) / tag).mkdir(parents=True)
        torch.save({"value": self.value, **(client_state or {})}, Path(save_dir) / tag / "state.pt")

    def load_checkpoint(self, load_dir, tag, **kwargs):
        from pathlib import Path

        self.value = torch.load(Path(load_dir) / tag / "state.pt")["value"]
        return str(Path(load_dir) / tag), {}


def _save(root, step, value=0.0, **kw):
    return ckpt.save_checkpoint(
        FakeEngine(value), root, step, rank=0, world_size=1, rank_state={"data": {"samples_consumed": step * 8}},
        trainer_state={"bad_steps": 0}, files={"config.yaml": "seed: 0\n"}, **kw,
    )


def test_save_is_complete_and_pointed_at(tmp_path):
    root = tmp_path / "checkpoints"
    path = _save(root, 5)
    assert path == root / "step_5" and ckpt.is_complete(path)
    assert (root / "latest").read_text().strip() == "step_5"
    assert (path / "config.yaml").read_text() == "seed: 0\n"
    assert json.loads((path / "trainer" / "state.json").read_text())["step"] == 5
    assert not list(root.glob("*.tmp"))


def test_resume_takes_the_newest_complete_and_cleans_unfinished(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    _save(root, 4)
    # A save killed midway: files written, no COMPLETE marker, still under its temporary name.
    broken = root / "step_6.tmp"
    (broken / "engine").mkdir(parents=True)
    (broken / "engine" / "state.pt").write_bytes(b"half")
    # A step folder without the marker (renamed by something else) is not trusted either.
    (root / "step_8").mkdir()
    assert ckpt.latest_checkpoint(root) == root / "step_4"
    removed = ckpt.remove_incomplete(root)
    assert sorted(p.name for p in removed) == ["step_6.tmp", "step_8"]
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_2", "step_4"]


def test_keep_last_prunes_old_ones(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        _save(root, step, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_3", "step_4"]


def test_saving_a_step_again_keeps_the_first(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 3, value=1.0)
    _save(root, 3, value=2.0)
    engine = FakeEngine()
    ckpt.load_checkpoint(engine, root / "step_3", rank=0, world_size=1)
    assert engine.value == 1.0


def test_load_restores_engine_data_position_and_rng(tmp_path):
    root = tmp_path / "checkpoints"
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    _save(root, 7, value=3.5)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    engine = FakeEngine()
    rank_state, trainer_state = ckpt.load_checkpoint(engine, root / "step_7", rank=0, world_size=1)
    assert engine.value == 3.5
    assert rank_state["data"] == {"samples_consumed": 56}
    assert trainer_state["step"] == 7
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_load_refuses_another_process_count(tmp_path):
    from pangu_pi.cli import UserError

    root = tmp_path / "checkpoints"
    _save(root, 1)
    with pytest.raises(UserError, match="written by 1 processes and this run has 2"):
        ckpt.load_checkpoint(FakeEngine(), root / "step_1", rank=0, world_size=2)


def test_resolve_checkpoint_from_run_folder_and_errors(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _save(root, 1)
    _save(root, 3)
    assert ckpt.resolve_checkpoint(tmp_path / "run") == root / "step_3"
    assert ckpt.resolve_checkpoint(root) == root / "step_3"
    assert ckpt.resolve_checkpoint(root / "step_1") == root / "step_1"
    (root / "step_9.tmp").mkdir()
    with pytest.raises(FileNotFoundError, match="unfinished checkpoint"):
        ckpt.resolve_checkpoint(root / "step_9.tmp")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "empty")


def test_a_kill_during_pruning_leaves_no_complete_checkpoint_with_files_missing(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(root, step)
    real_rmtree = shutil.rmtree

    def killed_halfway(path, *args, **kwargs):
        (Path(path) / "engine" / "state.pt").unlink()  # one file gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 4, keep_last=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    for path in ckpt.complete_checkpoints(root):
        assert (path / "engine" / "state.pt").is_file(), f"{path.name} counts as complete with its engine state gone"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_2", "step_3", "step_4"]
    assert ckpt.latest_checkpoint(root) == root / "step_4"
    assert root / "step_1" in ckpt.remove_incomplete(root)  # the next run's resume clears what is left
