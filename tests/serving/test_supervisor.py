"""The supervisor of `pangu-pi serve` against stand-in engines (a few lines of Python answering
/health), so that dying, restarting with backoff, stopping leftovers and giving up are checked in
seconds; a real vLLM engine killed and brought back is in test_gateway.py."""

from __future__ import annotations

import signal
import sys
import time

import psutil
import pytest

from pangu_pi.serving import server
from pangu_pi.serving.gateway import Gateway

FAKE_ENGINE = """
import http.server, os, subprocess, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
# A child in the engine's process group, as vLLM's engine core and workers are: a leftover once
# the engine itself is killed.
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.environ["FAKE_ENGINE_PIDS"], "a") as f:
    f.write(f"{os.getpid()} {child.pid}\\n")
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
print("fake engine up", flush=True)
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""

FAILING_ENGINE = "import sys; print('ValueError: the stand-in cannot start', flush=True); sys.exit(3)"


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_dead_engine_is_restarted_with_its_leftovers_stopped_then_given_up(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "tokenizer.json").write_text("{}")
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    pids = tmp_path / "pids"
    monkeypatch.setenv("FAKE_ENGINE_PIDS", str(pids))
    command = {"argv": None}
    monkeypatch.setattr(
        server, "engine_command", lambda engine, args: command["argv"] or [sys.executable, str(script), "--port", str(engine.port)]
    )
    args = server.parse_args([str(ckpt), "--name", "m", "--max-restarts", "2", "--log-dir", str(tmp_path / "logs")])
    args.kv_cache_gib = None
    engines, _ = server.plan_engines(args)
    engine = engines[0]
    gateway = Gateway({engine.name: engine.url}, "k", engine.name)
    server.start_engine(engine, args, "cpu", "k")
    supervisor = None
    try:
        server.wait_until_healthy(engines, 30)
        supervisor = server.Supervisor(engines, args, "cpu", "k", gateway)
        supervisor.start()
        wait_for(lambda: len(pids.read_text().splitlines()) == 1)
        first_pid, leftover = map(int, pids.read_text().split())

        engine.process.send_signal(signal.SIGKILL)
        wait_for(lambda: gateway.engines["m"].status == "restarting", 5)
        assert "killed by SIGKILL" in gateway.engines["m"].reason
        wait_for(lambda: engine.state == "up" and engine.process.pid != first_pid)
        assert gateway.engines["m"].status == "up" and gateway.engines["m"].restarts == 1
        assert not psutil.pid_exists(leftover) or psutil.Process(leftover).status() == psutil.STATUS_ZOMBIE
        assert engine.failures == 1

        # From now on it cannot start: restarted after 2 s once (--max-restarts 2), then given up.
        command["argv"] = [sys.executable, "-c", FAILING_ENGINE]
        engine.process.send_signal(signal.SIGKILL)
        wait_for(lambda: engine.state == "failed", 30)
        assert supervisor.all_failed
        assert gateway.engines["m"].status == "failed"
    finally:
        if supervisor is not None:
            supervisor.stop()
        server.stop_engines(engines)
    err = capsys.readouterr().err
    assert "engine 'm' died (killed by SIGKILL)" in err and "restarting it in 1 s" in err and "restarting it in 2 s" in err
    assert "ValueError: the stand-in cannot start" in err and "giving up after 2 restarts" in err
    log = (tmp_path / "logs" / "m.log").read_text()
    assert log.count("==== pangu-pi serve: engine m starting") == 3 and "fake engine up" in log


@pytest.mark.parametrize("code, text", [(-9, "killed by SIGKILL"), (1, "exit code 1"), (None, "still running")])
def test_exits_are_described(code, text):
    assert server.describe_exit(code) == text
