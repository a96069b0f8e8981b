"""The main job's pieces, end to end on a short schedule and a slice of the default corpus."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pangu_pi.corpus import default_corpus_files
from pangu_pi.net import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_main_job_trains_exports_serves_and_summarises(tmp_path):
    files = [str(f) for f in default_corpus_files(limit_bytes=1_500_000)]
    port = free_port()
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "main_job.py"), "--run", str(tmp_path / "run"), "--max-steps", "12",
         "--vocab-size", "1024", "--port", str(port), "--input", *files],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 16 * 128
    assert summary["val_ppl_final"] < 0.8 * summary["val_ppl_untrained"]
    assert summary["loss_curve_png"] and (tmp_path / "run").joinpath(summary["loss_curve_png"]).stat().st_size > 0
    assert isinstance(summary["chat_answer"], str) and isinstance(summary["streamed_completion"], str)
    assert "Validation perplexity fell" in out.stdout
    with socket.socket() as s:  # the server was stopped: its port is free again
        assert s.connect_ex(("127.0.0.1", port)) != 0
