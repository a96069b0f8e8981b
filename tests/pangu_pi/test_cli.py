"""The `pangu-pi` command as a user runs it: in a subprocess, reading stdout and stderr."""

import json
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "pangu_pi.cli", *args], capture_output=True, text=True, timeout=300)


def test_info_json_reports_the_parameter_count():
    out = run("info", "--preset", "pangu-pi-7b", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert 6.5e9 <= data["parameters"] <= 7.0e9
    assert data["config"]["num_hidden_layers"] == 29


@pytest.mark.parametrize(
    "args, expected",
    [
        (("info", "--preset", "pangu-pi-2b"), "unknown preset"),
        (("info", "--preset", "tiny", "--set", "num_attention_heads=3"), "not divisible"),
        (("tokenizer", "train", "--input", "/no/such/file.txt", "--out", "/tmp/never"), "does not exist"),
        (("pretrian",), "did you mean 'pretrain'"),
    ],
)
def test_bad_input_is_one_clear_line(args, expected):
    out = run(*args)
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
