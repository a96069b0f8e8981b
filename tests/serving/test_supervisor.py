"""The supervisor of `pangu-pi serve` against stand-in engines (a few lines of Python answering
/health on the engine's Unix socket), so that dying, restarting with backoff, stopping leftovers,
giving up and refusing an impostor on an engine's socket are checked in seconds; a real vLLM engine
killed and brought back is in test_gateway.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from pangu_pi.serving import engines as engines_module
from pangu_pi.serving.config import parse_args
from pangu_pi.serving.engines import (
    Launch,
    describe_exit,
    plan_engines,
    private_folder,
    start_engine,
    stop_engines,
    wait_until_healthy,
)
from pangu_pi.serving.supervisor import Supervisor

FAKE_ENGINE = """
import http.server, os, socketserver, subprocess, sys, time
path = sys.argv[sys.argv.index("--uds") + 1]
# A child in the engine's process group, as vLLM's engine core and workers are: a leftover once
# the engine itself is killed.
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.environ["FAKE_ENGINE_PIDS"], "a") as f:
    f.write(f"{os.getpid()} {child.pid}\\n")
time.sleep(float(os.environ.get("FAKE_ENGINE_DELAY", "0")))  # loading weights
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def address_string(self):
        return "unix"
    def log_message(self, *args):
        pass
print("fake engine up", flush=True)
socketserver.UnixStreamServer(path, Health).serve_forever()
"""

# Listens where the engine should, as another local program could; writes down whatever it is sent.
IMPOSTOR = """
import socket, sys
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[1]); server.listen(8)
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    conn.settimeout(2.0)
    try:
        data = conn.recv(65536)
    except OSError:
        data = b""
    if data:
        open(sys.argv[2], "ab").write(data)
    conn.close()
"""

FAILING_ENGINE = "import sys; print('ValueError: the stand-in cannot start', flush=True); sys.exit(3)"


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """One planned engine whose command is the stand-in (or `command["argv"]` when set)."""
    ckpt = tmp_path / "model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "tokenizer.json").write_text("{}")
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    monkeypatch.setenv("FAKE_ENGINE_PIDS", str(tmp_path / "pids"))
    command = {"argv": None}
    monkeypatch.setattr(
        engines_module,
        "engine_command",
        lambda engine, config: command["argv"] or [sys.executable, str(script), "--uds", str(engine.socket)],
    )
    sockets = private_folder("pangu-pi-test-")
    made = []

    def make(*flags):
        config = parse_args([str(ckpt), "--name", "m", "--log-dir", str(tmp_path / "logs"), *flags])
        engines = plan_engines(config, sockets)
        made.extend(engines)
        return engines, Launch(config, "cpu", "k", tmp_path / "logs")

    (tmp_path / "logs").mkdir()
    yield make, command, tmp_path
    stop_engines([e for e in made if e.process is not None])
    import shutil

    shutil.rmtree(sockets, ignore_errors=True)


def test_a_dead_engine_is_restarted_with_its_leftovers_stopped_then_given_up(stand_in, capsys):
    make, command, tmp_path = stand_in
    engines, launch = make("--max-restarts", "2")
    engine = engines[0]
    pids = tmp_path / "pids"
    start_engine(engine, launch)
    supervisor = None
    try:
        wait_until_healthy(engines, 30)
        assert engine.state.status == "up"
        supervisor = Supervisor(engines, launch)
        supervisor.start()
        wait_for(lambda: len(pids.read_text().splitlines()) == 1)
        first_pid, leftover = map(int, pids.read_text().split())

        engine.process.send_signal(signal.SIGKILL)
        wait_for(lambda: engine.state.health == "restarting", 5)
        assert "killed by SIGKILL" in engine.state.reason
        wait_for(lambda: engine.state.status == "up" and engine.process.pid != first_pid)
        assert engine.state.restarts == 1
        assert not psutil.pid_exists(leftover) or psutil.Process(leftover).status() == psutil.STATUS_ZOMBIE
        assert engine.failures == 1

        # From now on it cannot start: restarted after 2 s once (--max-restarts 2), then given up.
        command["argv"] = [sys.executable, "-c", FAILING_ENGINE]
        engine.process.send_signal(signal.SIGKILL)
        wait_for(lambda: engine.state.status == "failed", 30)
        assert supervisor.all_failed and engine.state.health == "failed"
    finally:
        if supervisor is not None:
            supervisor.stop()
    err = capsys.readouterr().err
    assert (
        "engine 'm' died (killed by SIGKILL)" in err and "restarting it in 1 s" in err and "restarting it in 2 s" in err
    )
    assert "ValueError: the stand-in cannot start" in err and "giving up after 2 restarts" in err
    log = (tmp_path / "logs" / "m.log").read_text()
    assert log.count("==== pangu-pi serve: engine m starting") == 3 and "fake engine up" in log


def test_a_foreign_listener_on_a_restarting_engines_socket_never_gets_a_request(stand_in, monkeypatch, capsys):
    make, _, tmp_path = stand_in
    engines, launch = make("--max-restarts", "3")
    engine = engines[0]
    start_engine(engine, launch)
    wait_until_healthy(engines, 30)
    supervisor = Supervisor(engines, launch)
    supervisor.start()
    received = tmp_path / "received"
    impostor = None
    try:
        # The restart loads for a while before it listens; another program binds the path first.
        monkeypatch.setenv("FAKE_ENGINE_DELAY", "3")
        engine.process.send_signal(signal.SIGKILL)
        wait_for(lambda: engine.state.status == "starting", 10)
        impostor = subprocess.Popen(
            [sys.executable, "-c", IMPOSTOR, str(engine.socket), str(received)], stdout=subprocess.PIPE, text=True
        )
        assert impostor.stdout.readline().strip() == "listening"
        wait_for(lambda: "was refused" in engine.state.reason, 10)
        assert engine.state.status != "up" and f"process {impostor.pid}" in engine.state.reason
        # Started again on a fresh socket: the engine's own process is what answers now.
        monkeypatch.setenv("FAKE_ENGINE_DELAY", "0")
        wait_for(lambda: engine.state.status == "up", 30)
        _, pid = engines_module.listener_pid(engine.socket)
        assert pid == engine.process.pid
    finally:
        supervisor.stop()
        if impostor is not None:
            impostor.kill()
            impostor.wait()
    assert not received.exists(), "the impostor was sent " + received.read_bytes().decode(errors="replace")
    assert "was refused: process" in capsys.readouterr().err


@pytest.mark.parametrize("code, text", [(-9, "killed by SIGKILL"), (1, "exit code 1"), (None, "still running")])
def test_exits_are_described(code, text):
    assert describe_exit(code) == text
