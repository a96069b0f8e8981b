"""`pangu-pi pretrain` refuses a run that cannot work before it starts any process or spends compute,
with one line naming the problem and the fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pangu_pi import cli

ROOT = Path(__file__).resolve().parents[2]
# What the `pangu-pi` console script runs (`python -m pangu_pi.cli` would load the CLI twice, as __main__ too).
PANGU_PI = [sys.executable, "-c", "import sys; from pangu_pi.cli import main; sys.exit(main())"]


@pytest.fixture(scope="session")
def small_files(tmp_path_factory) -> list[str]:
    from pangu_pi.corpus import default_corpus_files

    return [str(f) for f in default_corpus_files(limit_bytes=300_000)]


@pytest.fixture(scope="session")
def dataset(tokenizer_dir, small_files, tmp_path_factory) -> Path:
    from pangu_pi.training.data import prepare_shards

    return prepare_shards(tokenizer_dir, small_files, tmp_path_factory.mktemp("pretrain-ds") / "ds", progress=False,
                          shard_bytes=100_000)


def _config(tmp_path: Path, tokenizer: Path, dataset: Path, **sections) -> Path:
    values = {
        "model": {"preset": "tiny", "siaf_backend": "reference"},
        "data": {"tokenizer": str(tokenizer), "datasets": [{"path": str(dataset), "weight": 1.0}], "seq_len": 64},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "train": {"max_steps": 2, "precision": "fp32"},
    }
    for name, extra in sections.items():
        values[name] = {**values.get(name, {}), **extra}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _refused(capsys, config: Path, out: Path, *extra: str) -> str:
    code = cli.main(["pretrain", "--config", str(config), "--out", str(out), "--nproc", "2", "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("pangu-pi pretrain: error: "), err
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    return err[0]


def _copy(dataset: Path, dest: Path) -> Path:
    shutil.copytree(dataset, dest)
    return dest


def test_truncated_shard(capsys, tmp_path, tokenizer_dir, dataset):
    bad = _copy(dataset, tmp_path / "ds")
    shard = sorted(bad.glob("*.bin"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    line = _refused(capsys, _config(tmp_path, tokenizer_dir, bad), tmp_path / "run")
    assert "truncated" in line and shard.name in line


def test_shard_from_another_tokenizer(capsys, tmp_path, tokenizer_dir, small_files):
    from pangu_pi.tokenizer import train_tokenizer
    from pangu_pi.training.data import prepare_shards

    other = train_tokenizer(small_files[:20], tmp_path / "other-tok", vocab_size=400, progress=False)
    foreign = prepare_shards(other, small_files[:20], tmp_path / "foreign", progress=False)
    line = _refused(capsys, _config(tmp_path, tokenizer_dir, foreign), tmp_path / "run")
    assert "another tokenizer" in line


def test_token_ids_outside_the_vocabulary(capsys, tmp_path, tokenizer_dir, dataset):
    from pangu_pi.training.data.shards import HEADER_SIZE

    bad = _copy(dataset, tmp_path / "ds")
    shard = sorted(bad.glob("*.bin"))[0]
    tokens = np.memmap(shard, dtype="<u2", mode="r+", offset=HEADER_SIZE)
    tokens[5] = 60_000
    tokens.flush()
    del tokens
    line = _refused(capsys, _config(tmp_path, tokenizer_dir, bad), tmp_path / "run")
    assert "token id 60000" in line and "vocab_size" in line


def test_unknown_config_key_suggests_the_nearest(capsys, tmp_path, tokenizer_dir, dataset):
    line = _refused(capsys, _config(tmp_path, tokenizer_dir, dataset, optim={"learning_rate": 1e-3}), tmp_path / "run")
    assert "unknown config key 'optim.learning_rate'" in line
    line = _refused(capsys, _config(tmp_path, tokenizer_dir, dataset), tmp_path / "run", "--set", "train.max_step=3")
    assert "did you mean 'train.max_steps'" in line


def test_impossible_batch_split(capsys, tmp_path, tokenizer_dir, dataset):
    config = _config(tmp_path, tokenizer_dir, dataset, batch={"global_batch_size": 12, "micro_batch_size": 4})
    line = _refused(capsys, config, tmp_path / "run")
    assert "global_batch_size 12 is not divisible by micro_batch_size 4 × 2 processes" in line


def test_model_vocabulary_smaller_than_the_tokenizer(capsys, tmp_path, tokenizer_dir, dataset):
    config = _config(tmp_path, tokenizer_dir, dataset, model={"preset": "tiny", "vocab_size": 1000})
    assert "smaller than the tokenizer's 2048 tokens" in _refused(capsys, config, tmp_path / "run")


def test_resume_none_will_not_reuse_a_run_folder(capsys, tmp_path, tokenizer_dir, dataset):
    done = tmp_path / "run" / "checkpoints" / "step_4"
    done.mkdir(parents=True)
    (done / "COMPLETE").write_text("{}")
    code = cli.main(["pretrain", "--config", str(_config(tmp_path, tokenizer_dir, dataset)), "--out",
                     str(tmp_path / "run"), "--nproc", "2", "--resume", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "already holds checkpoints (newest step_4)" in err and "--resume auto" in err


def test_the_command_prints_one_line_without_traceback(tmp_path, tokenizer_dir, dataset):
    config = _config(tmp_path, tokenizer_dir, dataset, trian={"max_steps": 3})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*PANGU_PI, "pretrain", "--config", str(config), "--nproc", "2"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pangu-pi pretrain: error: unknown config key 'trian'; did you mean 'train'?"


def test_python_dash_m_cli_reports_a_library_error_in_one_line(tmp_path, tokenizer_dir, dataset):
    # The error class lives in the library (pangu_pi.errors), so the CLI run as __main__ still knows it.
    done = tmp_path / "run" / "checkpoints" / "step_4"
    done.mkdir(parents=True)
    (done / "COMPLETE").write_text("{}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pangu_pi.cli", "pretrain", "--config",
                           str(_config(tmp_path, tokenizer_dir, dataset)), "--out", str(tmp_path / "run"),
                           "--nproc", "1", "--resume", "none"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pangu-pi pretrain: error: ") and "--resume auto" in lines[0]
