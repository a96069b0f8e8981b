"""One run per run folder: a second run on a locked OUT is refused naming the holder, a folder the
command did not make is left untouched (with or without --force), --force replaces only the run's own
outputs, and a launcher's ranks die with it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pangu_pi import cli
from pangu_pi import run_layout as layout
from pangu_pi.errors import UserError
from pangu_pi.training import run_folder

PANGU_PI = [sys.executable, "-c", "import sys; from pangu_pi.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def pretrain_config(tokenizer_dir, tmp_path_factory) -> Path:
    from pangu_pi.corpus import default_corpus_files
    from pangu_pi.training.data import prepare_shards

    work = tmp_path_factory.mktemp("run-folder")
    shards = prepare_shards(tokenizer_dir, [str(f) for f in default_corpus_files(limit_bytes=200_000)],
                            work / "ds", progress=False)
    path = work / "pretrain.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "siaf_backend": "reference"},
        "data": {"tokenizer": str(tokenizer_dir), "datasets": [{"path": str(shards), "weight": 1.0}], "seq_len": 64},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "train": {"max_steps": 2, "precision": "fp32"},
        "eval": {"every": 0},
    }))
    return path


@pytest.fixture(scope="module")
def finetune_config(tmp_path_factory) -> Path:
    from pangu_pi import PanGuPiConfig

    work = tmp_path_factory.mktemp("run-folder-ft")
    PanGuPiConfig.from_preset("tiny").save_pretrained(work / "base")  # a config.json is all the refusal reads
    path = work / "finetune.yaml"
    path.write_text(yaml.safe_dump({"model": {"init_from": str(work / "base")},
                                    "data": {"datasets": [str(work / "chat.jsonl")]}, "finetune": {"mode": "full"}}))
    return path


def test_a_second_run_on_a_locked_out_is_refused_naming_the_holder(pretrain_config, tmp_path):
    out = tmp_path / "run"
    holder = run_folder.claim(out, "pretrain")  # this test process is "the other run"
    try:
        proc = subprocess.run([*PANGU_PI, "pretrain", "--config", str(pretrain_config), "--out", str(out),
                               "--nproc", "2", "--no-progress"], capture_output=True, text=True, timeout=300)
    finally:
        holder.release()
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and "in use by another run" in err[0], err
    assert f"pid {os.getpid()} on {socket.gethostname()}" in err[0]
    assert not (out / layout.CHECKPOINTS).exists() and not (out / layout.METRICS).exists()
    # Once the holder is gone the folder is free again.
    run_folder.claim(out, "pretrain").release()


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    first = run_folder.claim(tmp_path / "run", "finetune")
    try:
        with pytest.raises(UserError, match=f"pid {os.getpid()} on "):
            run_folder.claim(tmp_path / "run", "finetune")
    finally:
        first.release()


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_folder_the_command_did_not_make_is_left_untouched(command, pretrain_config, finetune_config, tmp_path,
                                                             capsys):
    config = pretrain_config if command == "pretrain" else finetune_config
    out = tmp_path / "mine"
    out.mkdir()
    (out / "important.txt").write_text("keep me\n")
    for extra in ([], ["--force"]):
        code = cli.main([command, "--config", str(config), "--out", str(out), "--nproc", "2", "--no-progress", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and f"pangu-pi {command} did not make it" in err[0] and "important.txt" in err[0], err
    assert sorted(os.listdir(out)) == ["important.txt"]
    assert (out / "important.txt").read_text() == "keep me\n"


def test_force_replaces_only_the_runs_own_outputs_and_another_recipe_is_refused(tmp_path):
    out = tmp_path / "run"
    run_folder.claim(out, "pretrain").release()
    first = run_folder.read_marker(out)["run_id"]
    (out / layout.CHECKPOINTS / "step_1").mkdir(parents=True)
    (out / layout.METRICS).write_text("{}\n")
    (out / "data").mkdir()  # the default-corpus cache: kept for the next run
    (out / "notes.txt").write_text("a user's own file\n")
    run_folder.claim(out, "pretrain").release()  # its own folder: resumable, nothing removed
    assert (out / layout.CHECKPOINTS / "step_1").is_dir() and run_folder.read_marker(out)["run_id"] == first

    run_folder.claim(out, "pretrain", force=True).release()
    assert sorted(os.listdir(out)) == sorted([layout.RUN_MARKER, layout.RUN_LOCK, "data", "notes.txt"])
    assert run_folder.read_marker(out)["run_id"] != first
    with pytest.raises(UserError, match="is a `pangu-pi pretrain` run folder"):
        run_folder.claim(out, "finetune", force=True)


def test_a_run_folder_from_before_the_marker_is_adopted(tmp_path):
    out = tmp_path / "old"
    (out / layout.CHECKPOINTS / "step_4").mkdir(parents=True)
    (out / layout.METRICS).write_text("{}\n")
    (out / layout.RUN_CONFIG).write_text(yaml.safe_dump({"finetune": {"mode": "full"}}))
    with pytest.raises(UserError, match="is a `pangu-pi finetune` run folder"):
        run_folder.claim(out, "pretrain")
    run_folder.claim(out, "finetune").release()
    assert json.loads((out / layout.RUN_MARKER).read_text())["recipe"] == "finetune"


def _state(pid: int) -> str | None:
    """A process's state letter (Z: a zombie, dead but not yet reaped), None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    return next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ranks_die_with_a_launcher_that_is_sigkilled(tmp_path):
    rank = f"import os, time; open(os.path.join({str(tmp_path)!r}, str(os.getpid())), 'w').close(); time.sleep(120)"
    launcher = ("import sys; from pangu_pi.training import launch; "
                f"launch.spawn_local(2, [sys.executable, '-c', {rank!r}])")
    proc = subprocess.Popen([sys.executable, "-c", launcher], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        ranks = [int(name) for name in os.listdir(tmp_path)]
        assert len(ranks) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_state(pid) not in (None, "Z") for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_state(pid) in (None, "Z") for pid in ranks)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the session
        except ProcessLookupError:
            pass
