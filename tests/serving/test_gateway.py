"""Variants with their own tokenizer or weights: one engine each behind the routing gateway, all from
one `pangu-pi serve` invocation started as in a fresh shell (none of tools/env.sh's variables); an
engine killed and brought back; and the shutdown, which must leave no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving_fixtures import hf_greedy, start_server

pytestmark = pytest.mark.slow

KEY = "gateway-key-77"


@pytest.fixture(scope="module")
def plain_env() -> dict[str, str]:
    """A fresh shell's environment: the venv's python on PATH, and nothing tools/env.sh sets
    (no VLLM_CPU_KVCACHE_SPACE, VLLM_TARGET_DEVICE, DS_ACCELERATOR, TMPDIR, HF_HOME ...)."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    return env


@pytest.fixture(scope="module")
def gateway(base_dir, yunshan_dir, scalar_dir, plain_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "gateway.log"
    server = start_server(
        [
            str(base_dir),
            "--name",
            "pangu",
            "--variant",
            f"yunshan={yunshan_dir}",
            "--variant",
            f"scalar={scalar_dir}",
            "--max-model-len",
            "128",
            "--log-dir",
            str(log.parent / "engines"),
        ],
        plain_env,
        log,
        KEY,
    )
    yield server
    server.stop()
    server.kill_leftovers()


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.url, headers=gateway.headers(), timeout=300) as client:
        yield client


def test_models_lists_every_variant(http):
    reply = http.get("/v1/models")
    assert reply.status_code == 200
    assert {m["id"] for m in reply.json()["data"]} == {"pangu", "yunshan", "scalar"}


@pytest.mark.parametrize("name", ["pangu", "yunshan", "scalar"])
def test_each_model_is_routed_to_its_own_engine(http, name, base_dir, yunshan_dir, scalar_dir, hf_models):
    from pangu_pi.tokenizer import load_tokenizer

    path = {"pangu": base_dir, "yunshan": yunshan_dir, "scalar": scalar_dir}[name]
    prompt_ids = load_tokenizer(path)("def handler(request):\n").input_ids
    reply = http.post(
        "/v1/completions",
        json={
            "model": name,
            "prompt": prompt_ids,
            "max_tokens": 12,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        },
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == name
    served = [int(t.split(":")[1]) for t in reply.json()["choices"][0]["logprobs"]["tokens"]]
    assert served == hf_greedy(hf_models(path), prompt_ids, 12)


def test_the_yunshan_vocabulary_is_its_own(http, yunshan_dir, base_dir):
    from pangu_pi.tokenizer import load_tokenizer

    text = "for key, value in sorted(table.items()):"
    counts = {}
    for name in ("pangu", "yunshan"):
        reply = http.post("/tokenize", json={"model": name, "prompt": text})
        assert reply.status_code == 200, reply.text
        counts[name] = reply.json()["tokens"]
    assert counts["yunshan"] == load_tokenizer(yunshan_dir)(text).input_ids
    assert counts["pangu"] == load_tokenizer(base_dir)(text).input_ids
    assert counts["yunshan"] != counts["pangu"]


def test_chat_streaming_through_the_gateway(http):
    body = {"model": "yunshan", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "temperature": 0}
    whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    events = []
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=stream_body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                events.append(json.loads(line[5:]))
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
    assert len(pieces) > 3
    assert "".join(pieces) == whole
    assert events[-1]["usage"]["completion_tokens"] == 10


def test_unknown_model_is_a_404_in_openai_format(http):
    reply = http.post(
        "/v1/chat/completions", json={"model": "pangu-xl", "messages": [{"role": "user", "content": "x"}]}
    )
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "pangu-xl" in error["message"] and "yunshan" in error["message"]


def test_engine_errors_and_guard_errors_pass_through(gateway, http):
    assert http.post("/v1/completions", json={"model": "scalar", "prompt": "x", "max_tokens": -3}).status_code == 400
    assert http.post("/v1/chat/completions", json={"model": "scalar"}).status_code == 400
    bad = httpx.post(
        f"{gateway.url}/v1/completions",
        content=b"{oops",
        headers={**gateway.headers(), "Content-Type": "application/json"},
    )
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 401
    assert httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = http.post("/v1/completions", json={"model": "scalar", "prompt": "x", "max_tokens": 2, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_engines_refuse_requests_that_bypass_the_gateway(gateway):
    """The engines listen on Unix sockets in a folder only this user can enter, with a key only the
    gateway holds, and each socket's listener is the engine process itself."""
    import stat

    import psutil

    sockets = {}
    for child in psutil.Process(gateway.process.pid).children():
        cmd = child.cmdline()
        if "vllm.entrypoints.openai.api_server" in cmd:
            assert "--port" not in cmd and "--host" not in cmd
            sockets[Path(cmd[cmd.index("--uds") + 1])] = child.pid
    assert len(sockets) == 3
    for path, pid in sockets.items():
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and path.parent.stat().st_uid == os.geteuid()
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, base_url="http://engine", timeout=30) as engine:
            reply = engine.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
            # The engines hold requests to the gateway's limits too.
            internal = {"Authorization": f"Bearer {psutil.Process(pid).environ()['PANGU_PI_API_KEY']}"}
            limited = engine.post(
                "/v1/completions", json={"model": "pangu", "prompt": "x", "n": "5000"}, headers=internal
            )
            assert limited.status_code == 400 and limited.json()["error"]["code"] == "limit_exceeded"


def test_started_in_a_plain_shell_with_a_kv_cache_it_chose(gateway):
    text = gateway.log_text()
    chosen = re.search(r"KV cache (\d+) GiB per engine worker \(VLLM_CPU_KVCACHE_SPACE=(\d+)", text)
    assert chosen and chosen[1] == chosen[2], text[:3000]
    logs = gateway.log.parent / "engines"
    assert f"engine logs in {logs}" in text
    assert {p.name for p in logs.iterdir()} >= {"pangu.log", "yunshan.log", "scalar.log"}
    engine_log = (logs / "scalar.log").read_text()
    assert engine_log.startswith("==== pangu-pi serve: engine scalar starting") and "non-default args" in engine_log


def _engine_process(gateway, name: str):
    import psutil

    for child in psutil.Process(gateway.process.pid).children():
        cmd = child.cmdline()
        if "vllm.entrypoints.openai.api_server" in cmd and cmd[cmd.index("--served-model-name") + 1] == name:
            return child
    raise AssertionError(f"no engine process serves {name}")


def test_a_killed_engine_is_a_503_at_once_and_comes_back_with_its_adapters(gateway, http, base_dir, lora_dir):
    import psutil

    greedy = {
        "model": "scalar",
        "prompt": "def handler(request):\n",
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
    }
    before = http.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
    # An adapter loaded at run time on the variant's engine, which a restart must load again.
    loaded = http.post(
        "/v1/load_lora_adapter", json={"lora_name": "scalar-live", "lora_path": str(lora_dir), "variant": "scalar"}
    )
    assert loaded.status_code == 200, loaded.text
    adapted = {**greedy, "model": "scalar-live"}
    adapted_before = http.post("/v1/completions", json=adapted).json()["choices"][0]["text"]
    assert adapted_before != before

    engine = _engine_process(gateway, "scalar")
    family = [engine, *engine.children(recursive=True)]
    assert len(family) >= 3  # API server, engine core, worker
    engine.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    reply = http.post("/v1/completions", json=greedy, timeout=5)
    assert time.monotonic() - killed < 2.0
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "scalar" in error["message"]
    assert http.post("/v1/completions", json={**greedy, "model": "pangu"}).status_code == 200  # the others serve on

    deadline = killed + 5
    while time.monotonic() < deadline and "scalar" not in httpx.get(f"{gateway.url}/health").json().get("down", []):
        time.sleep(0.2)
    health = httpx.get(f"{gateway.url}/health")
    assert health.status_code == 503 and health.json()["down"] == ["scalar"], health.text
    assert health.json()["engines"]["yunshan"]["status"] == "up"

    while time.monotonic() < killed + 120:
        reply = http.post("/v1/completions", json=greedy)
        if reply.status_code == 200:
            break
        assert reply.status_code == 503, reply.text
        time.sleep(1.0)
    assert reply.status_code == 200, f"not back 120 s after the kill:\n{gateway.log_text()[-3000:]}"
    assert reply.json()["choices"][0]["text"] == before
    assert http.post("/v1/completions", json=adapted).json()["choices"][0]["text"] == adapted_before
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in family), "leftovers of the dead engine"
    text = gateway.log_text()
    assert "engine 'scalar' died (killed by SIGKILL)" in text and "engine 'scalar' is back" in text
    assert httpx.get(f"{gateway.url}/health").json()["engines"]["scalar"]["restarts"] == 1


def test_metrics_of_every_engine_labelled_by_engine(gateway, http):
    assert httpx.get(f"{gateway.url}/metrics").status_code == 401
    lines = http.get("/metrics").text.splitlines()
    running = [x for x in lines if x.startswith("vllm:num_requests_running{")]
    assert {re.search(r'engine="(\w+)"', x)[1] for x in running} == {"pangu", "yunshan", "scalar"}
    assert sum(x.startswith("# TYPE vllm:num_requests_running ") for x in lines) == 1


def test_sigterm_stops_every_process(gateway):
    import psutil

    code = gateway.stop()
    assert code == 0, gateway.log_text()[-3000:]
    survivors = [p for p in gateway.descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert len(gateway.descendants) >= 9  # three engines: server, engine core, worker each
    assert not survivors, [p.pid for p in survivors]
