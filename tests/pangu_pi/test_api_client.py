"""The openai client set up for the project's commands: its errors become one-line UserErrors; and
the local-server helpers (a free port, waiting until a URL answers)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pangu_pi.api_client import api_base, connect, user_errors
from pangu_pi.errors import UserError
from pangu_pi.net import free_port, wait_until_ready


class Fake(BaseHTTPRequestHandler):
    """/v1/models lists one model unless the key is wrong; chat streams two pieces, then fails
    mid-answer when the user says "fail"."""

    def log_message(self, *args):
        pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.headers.get("Authorization") == "Bearer wrong":
            return self._json(401, {"error": {"message": "Incorrect API key", "type": "invalid_request_error"}})
        self._json(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in ("Hel", "lo"):
            choices = [{"index": 0, "delta": {"content": piece}}]
            chunk = {"id": "c", "object": "chat.completion.chunk", "choices": choices}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if body["messages"][-1]["content"] == "fail":
            self.wfile.write(b'data: {"error": {"message": "the engine died"}}\n\n')
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_answers_stream_and_errors_become_one_line(url):
    assert api_base(url) == api_base(url + "/v1/") == url + "/v1"
    client = connect(url)
    with user_errors(url):
        assert [m.id for m in client.models.list().data] == ["tiny"]

    def chat(text):
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], stream=True)
        return [c.choices[0].delta.content for c in stream]

    with user_errors(url):
        assert chat("hi") == ["Hel", "lo"]
    with pytest.raises(UserError, match=r"failed mid-answer: the engine died$"), user_errors(url):
        chat("fail")
    refused = pytest.raises(UserError, match=r"/v1/models answered 401: Incorrect API key$")
    with refused, user_errors(f"{url}/v1/models"):
        connect(url, api_key="wrong").models.list()
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=r"^cannot reach .*; is it up\?$"), user_errors(nobody, "is it up?"):
        connect(nobody).models.list()


def test_wait_until_ready_polls_until_the_url_answers_and_not_past_an_exited_process(url):
    assert wait_until_ready(f"{url}/v1/models", timeout=5)
    nobody = f"http://127.0.0.1:{free_port()}/health"
    assert not wait_until_ready(nobody, timeout=0.3, interval=0.1)
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    start = time.monotonic()
    assert not wait_until_ready(nobody, timeout=60, process=exited)
    assert time.monotonic() - start < 10  # it gave up when the process had gone, not at the timeout
