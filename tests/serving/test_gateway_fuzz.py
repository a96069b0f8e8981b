"""The gateway under hostile traffic: hypothesis generates malformed and hostile requests (media types
in any case or missing, numbers as floats and strings, deep nesting, oversized and slow bodies, on
every route) against a gateway served by uvicorn with its production protocol, in front of a
stand-in engine on a Unix socket that checks every request it receives against the limits. Floods
past --max-concurrency, a connection flood, slow headers and an abandoned stream follow. Nothing may
answer 5xx, no limit may be crossed at the engine, and a normal request works afterwards."""

from __future__ import annotations

import asyncio
import atexit
import json
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fake_engines import FakeEngine, models_reply, state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from pydantic import TypeAdapter, ValidationError
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse

from pangu_pi.net import free_port
from pangu_pi.serving.backpressure import protocol_class
from pangu_pi.serving.gateway import FORWARDED, Gateway
from pangu_pi.serving.request_guard import CHAT_ROLES, Limits

# Hypothesis keeps caches in ./.hypothesis by default: a scratch folder of its own instead.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
KEY = "outer-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = Limits(max_n=4, max_body_bytes=32 * 1024, max_stop=4, max_tools=4, max_json_depth=16, body_timeout_s=0.2)
MAX_CONCURRENCY, ENGINE_SLOTS, MAX_CONNECTIONS, HEADER_TIMEOUT_S = 8, 4, 24, 0.5
ROUTES = [
    *FORWARDED,
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/v1/models",
    "/health",
    "/metrics",
    "/v1/nope",
]
JSON_TYPES = [
    None,
    "application/json",
    "Application/JSON",
    "APPLICATION/JSON; charset=utf-8",
    "application/json;charset=UTF-8",
    "application/vnd.pangu+json",
]
OTHER_TYPES = [
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "",
    "garbage",
    "application/xml",
]
_INT = TypeAdapter(int | None)


def _depth(value, depth=1) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return max([depth, *(_depth(c, depth + 1) for c in children if isinstance(c, (dict, list)))])


class Engine:
    """The stand-in engine: answers like vLLM, and writes down every limit a request crossed."""

    def __init__(self):
        self.violations, self.running, self.most_running = [], 0, 0
        self.release = threading.Event()
        self.streams_closed = 0

    def check(self, body: bytes) -> None:
        if len(body) > LIMITS.max_body_bytes:
            self.violations.append(f"body of {len(body)} bytes")
        try:
            payload = json.loads(body)
        except ValueError:
            self.violations.append(f"not JSON: {body[:80]!r}")
            return
        if not isinstance(payload, dict):
            self.violations.append(f"not an object: {body[:80]!r}")
            return
        if _depth(payload) > LIMITS.max_json_depth:
            self.violations.append("nested too deep")
        try:
            n = _INT.validate_python(payload.get("n"))
            if n is not None and n > LIMITS.max_n:
                self.violations.append(f"n {payload['n']!r}")
        except ValidationError:
            self.violations.append(f"n unreadable {payload['n']!r}")
        stop = payload.get("stop")
        if isinstance(stop, list) and len(stop) > LIMITS.max_stop:
            self.violations.append(f"{len(stop)} stops")
        if isinstance(payload.get("tools"), list) and len(payload["tools"]) > LIMITS.max_tools:
            self.violations.append("tools")

    async def handle(self, request, body):
        path = request.url.path
        if path == "/v1/models":
            return models_reply("base", "ada")
        if path == "/metrics":
            return PlainTextResponse("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0.0\n")
        self.check(body)
        payload = json.loads(body)
        if path.endswith("lora_adapter"):
            return PlainTextResponse("Success")
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if payload.get("prompt") == "hold":
                while not self.release.is_set():
                    await asyncio.sleep(0.01)
            if payload.get("prompt") == "forever":

                async def events():
                    try:
                        while True:
                            yield b'data: {"piece": 0}\n\n'
                            await asyncio.sleep(0.05)
                    finally:
                        self.streams_closed += 1

                return StreamingResponse(events(), media_type="text/event-stream")
        finally:
            self.running -= 1
        return JSONResponse({"id": "cmpl-1", "choices": [{"text": "ok"}]})


@pytest.fixture(scope="module")
def served():
    folder = Path(tempfile.mkdtemp(prefix="fuzz-", dir="/tmp"))
    engine = Engine()
    with FakeEngine(folder / "a.sock", engine.handle) as fake:
        gateway = Gateway(
            [state("base", fake.socket, max_lora_rank=16)],
            "inner",
            limits=LIMITS,
            max_concurrency=MAX_CONCURRENCY,
            engine_concurrency=ENGINE_SLOTS,
            queue_timeout_s=0.3,
        )
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                gateway.app(KEY),
                host="127.0.0.1",
                port=port,
                log_level="critical",
                http=protocol_class(MAX_CONNECTIONS, HEADER_TIMEOUT_S, gateway.counters.reject),
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30) as client:
            yield SimpleNamespace(client=client, port=port, gateway=gateway, engine=engine)
        server.should_exit = True
        thread.join(timeout=10)
    shutil.rmtree(folder, ignore_errors=True)


def assert_normal_request_works(served) -> None:
    reply = served.client.post("/v1/completions", json={"model": "base", "prompt": "hello", "n": 2})
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "ok"


# ------------------------------------------------------------------------------------ generators

numbers = st.one_of(
    st.integers(-5, 10**6),
    st.floats(-1e6, 1e6, allow_nan=False),
    st.integers(0, 10**6).map(str),
    st.integers(0, 10**6).map(lambda i: f"{i}.0"),
    st.integers(0, 10**6).map(lambda i: f" {i} "),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(
            st.sampled_from(["base", "ada", "nope"]), st.integers(), st.lists(st.integers(), max_size=2)
        ),
        "n": numbers,
        "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=3), max_size=8), numbers),
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function")}), max_size=8),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.one_of(st.sampled_from(CHAT_ROLES), st.text(max_size=6)), "content": st.text(max_size=8)}
            ),
            max_size=4,
        ),
        "prompt": st.text(max_size=16),
        "lora_name": st.one_of(st.text(max_size=6), st.integers()),
        "lora_path": st.one_of(st.sampled_from(["/etc", "/etc/passwd", "/nonexistent", ".", ""]), st.text(max_size=8)),
        "variant": st.one_of(st.sampled_from(["base", "other"]), st.integers()),
    },
)
bodies = st.one_of(
    fields.map(lambda d: ("json", json.dumps(d).encode())),
    st.integers(LIMITS.max_json_depth + 1, 20_000).map(
        lambda d: ("deep", b'{"model": "base", "x": ' + b"[" * d + b"]" * d + b"}")
    ),
    st.integers(1, 4000).map(
        lambda extra: (
            "oversized",
            json.dumps({"model": "base", "prompt": "x" * (LIMITS.max_body_bytes + extra)}).encode(),
        )
    ),
    st.binary(max_size=64).map(lambda b: ("bytes", b)),
)
requests_ = st.tuples(
    st.sampled_from(ROUTES),
    st.sampled_from(["POST"] * 6 + ["GET", "PUT"]),
    st.sampled_from(JSON_TYPES + OTHER_TYPES),
    bodies,
    st.sampled_from([False] * 15 + [True]),  # one in 16 slow: each costs the body deadline
)


def send_slowly(port: int, method: str, path: str, content_type: str | None, body: bytes) -> int:
    """Headers at once, then half the body, then a pause longer than the body deadline."""
    head = [
        f"{method} {path} HTTP/1.1",
        "Host: gateway",
        f"Authorization: Bearer {KEY}",
        f"Content-Length: {len(body)}",
    ]
    if content_type is not None:
        head.append(f"Content-Type: {content_type}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body[: len(body) // 2])
        time.sleep(LIMITS.body_timeout_s + 0.15)
        try:
            sock.sendall(body[len(body) // 2 :])
        except OSError:
            pass  # the gateway may have answered and closed already
        return int(sock.recv(65536).split(b" ", 2)[1])


# ------------------------------------------------------------------------------------------ tests


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(request=requests_)
def test_generated_hostile_requests_get_no_5xx_and_cross_no_limit(served, request):
    path, method, content_type, (kind, body), slow = request
    slow = slow and len(body) > 1 and method != "GET"  # half a body, then a pause
    if slow:
        status = send_slowly(served.port, method, path, content_type, body)
    else:
        headers = {"Content-Type": content_type} if content_type is not None else {}
        status = served.client.request(method, path, content=body, headers=headers).status_code
    assert status < 500, (path, method, content_type, kind, body[:200])
    reads_body = method in ("POST", "PUT")
    json_route = path in (*FORWARDED, "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
    declared_json = content_type in JSON_TYPES or content_type == ""  # an empty Content-Type is no Content-Type
    if reads_body and json_route and not declared_json:
        assert status == 415
    elif reads_body and len(body) > LIMITS.max_body_bytes:
        assert status == 413
    elif reads_body and slow:
        assert status == 408
    elif reads_body and json_route and kind == "deep":
        assert status == 400
    assert served.engine.violations == []


def test_after_the_fuzz_the_counters_are_clean_and_a_normal_request_works(served):
    assert served.gateway.counters.in_flight == 0
    assert_normal_request_works(served)


def test_a_flood_past_max_concurrency_is_told_to_retry_and_no_engine_holds_more_than_its_slots(served):
    engine, counters = served.engine, served.gateway.counters
    engine.release.clear()
    before = counters.rejected_count("concurrency"), counters.rejected_count("engine_busy")
    flood = 3 * MAX_CONCURRENCY

    def hold(_):
        reply = served.client.post("/v1/completions", json={"model": "base", "prompt": "hold"})
        return (
            reply.status_code,
            reply.headers.get("retry-after"),
            reply.json()["error"]["code"] if reply.status_code != 200 else None,
        )

    with ThreadPoolExecutor(flood) as pool:
        futures = [pool.submit(hold, i) for i in range(flood)]
        time.sleep(1.0)  # every request has arrived; the engine holds its slots' worth
        assert engine.running == ENGINE_SLOTS
        engine.release.set()
        results = [f.result() for f in futures]
    codes = [status for status, _, _ in results]
    assert set(codes) <= {200, 429} and codes.count(200) >= ENGINE_SLOTS
    assert all(retry == "1" for status, retry, _ in results if status == 429)
    assert {code for status, _, code in results if status == 429} <= {"too_many_requests", "engine_busy"}
    assert engine.most_running <= ENGINE_SLOTS
    assert counters.rejected_count("concurrency") > before[0] and counters.rejected_count("engine_busy") > before[1]
    metrics = served.client.get("/metrics").text
    assert 'pangu_pi_rejected_requests_total{reason="concurrency"}' in metrics
    assert counters.in_flight == 0
    assert_normal_request_works(served)


def test_connections_past_the_limit_and_slow_headers_are_refused(served):
    sockets = [socket.create_connection(("127.0.0.1", served.port), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as extra:
            answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 429") and b"retry-after: 1" in answer.lower()
    finally:
        for sock in sockets:
            sock.close()
    time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\n")  # and never the rest
        started = time.monotonic()
        answer = slow.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < HEADER_TIMEOUT_S + 2
    assert served.gateway.counters.rejected_count("connections") >= 1
    assert served.gateway.counters.rejected_count("header_timeout") >= 1
    assert_normal_request_works(served)


def test_an_abandoned_stream_frees_its_slot_and_the_engine_stream(served):
    engine, gateway = served.engine, served.gateway
    closed = engine.streams_closed
    with httpx.stream(
        "POST",
        f"http://127.0.0.1:{served.port}/v1/completions",
        headers=AUTH,
        timeout=10,
        json={"model": "base", "prompt": "forever", "stream": True},
    ) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()  # kept: dropping the iterator would close the stream here already
        assert next(lines) == 'data: {"piece": 0}'
        assert gateway.counters.in_flight == 1
    deadline = time.monotonic() + 10
    while (gateway.counters.in_flight or engine.streams_closed == closed) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.counters.in_flight == 0 and engine.streams_closed == closed + 1
    assert gateway.slots["base"]._value == ENGINE_SLOTS  # every engine slot is free again
    assert_normal_request_works(served)
