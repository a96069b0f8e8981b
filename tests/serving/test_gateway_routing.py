"""The gateway's routing, streaming and errors against in-process fake engines (the real engines are
exercised in test_gateway.py)."""

from __future__ import annotations

import json

import httpx
from starlette.testclient import TestClient

from pangu_pi.serving.gateway import Gateway

ENGINES = {"base": "http://engine-a:1", "yunshan": "http://engine-b:2"}
SERVED = {"http://engine-a:1": ["base", "base-lora"], "http://engine-b:2": ["yunshan"]}


class Events(httpx.AsyncByteStream):
    """A response body that arrives in pieces, as an engine's server-sent events do."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    async def __aiter__(self):
        for piece in self.pieces:
            yield piece


def json_reply(status: int, body: dict) -> httpx.Response:
    # A streamed body, as from the network: the gateway reads it as it arrives.
    return httpx.Response(status, stream=Events([json.dumps(body).encode()]), headers={"content-type": "application/json"})


def fake_engines(seen: list):
    def handle(request: httpx.Request) -> httpx.Response:
        origin = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        seen.append((origin, request.url.path, request.headers.get("authorization")))
        if request.url.path == "/v1/models":
            return json_reply(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in SERVED[origin]]})
        body = json.loads(request.content)
        if body.get("max_tokens", 1) < 0:
            return json_reply(400, {"error": {"message": "max_tokens must be at least 1", "type": "BadRequestError",
                                                        "param": "max_tokens", "code": 400}})  # fmt: skip
        if body.get("stream"):
            events = [f"data: {json.dumps({'piece': i, 'engine': origin})}\n\n".encode() for i in range(3)]
            return httpx.Response(200, stream=Events([*events, b"data: [DONE]\n\n"]), headers={"content-type": "text/event-stream"})
        return json_reply(200, {"engine": origin, "model": body.get("model")})

    return httpx.MockTransport(handle)


def client(seen, api_key="outer-key"):
    gateway = Gateway(ENGINES, engine_key="inner-key", default_engine="base", transport=fake_engines(seen))
    return TestClient(gateway.app(api_key))


def test_routes_by_model_including_adapters_and_uses_the_inner_key():
    seen = []
    with client(seen) as c:
        auth = {"Authorization": "Bearer outer-key"}
        for model, engine in (("base", "http://engine-a:1"), ("base-lora", "http://engine-a:1"), ("yunshan", "http://engine-b:2")):
            answer = c.post("/v1/completions", json={"model": model, "prompt": "x"}, headers=auth)
            assert answer.status_code == 200 and answer.json() == {"engine": engine, "model": model}
        assert c.post("/v1/chat/completions", json={"messages": []}, headers=auth).json()["engine"] == "http://engine-a:1"
    assert {key for _, _, key in seen} == {"Bearer inner-key"}


def test_models_merges_every_engine():
    with client([]) as c:
        reply = c.get("/v1/models", headers={"Authorization": "Bearer outer-key"})
    assert [m["id"] for m in reply.json()["data"]] == ["base", "base-lora", "yunshan"]


def test_unknown_model_is_404_naming_the_known_ones():
    with client([]) as c:
        reply = c.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers={"Authorization": "Bearer outer-key"})
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "yunshan" in error["message"]


def test_non_string_model_is_400():
    with client([]) as c:
        reply = c.post("/v1/completions", json={"model": 7, "prompt": "x"}, headers={"Authorization": "Bearer outer-key"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "model"


def test_engine_errors_pass_through_unchanged():
    with client([]) as c:
        reply = c.post("/v1/completions", json={"model": "yunshan", "max_tokens": -1}, headers={"Authorization": "Bearer outer-key"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"


def test_streams_pass_through_as_server_sent_events():
    with client([]) as c:
        with c.stream("POST", "/v1/completions", json={"model": "yunshan", "stream": True},
                      headers={"Authorization": "Bearer outer-key"}) as reply:  # fmt: skip
            assert reply.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in reply.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert [json.loads(line[5:])["piece"] for line in lines[:-1]] == [0, 1, 2]


def test_outer_key_is_required():
    with client([]) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer inner-key"}).status_code == 401
        assert c.get("/health").status_code == 200


def test_an_engine_that_does_not_answer_is_a_502():
    def refuse(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base"}]})
        raise httpx.ConnectError("connection refused", request=request)

    gateway = Gateway({"base": "http://engine-a:1"}, "inner", "base", transport=httpx.MockTransport(refuse))
    with TestClient(gateway.app(None)) as c:
        reply = c.post("/v1/completions", json={"model": "base", "prompt": "x"})
    # Refused: the engine's process is gone, which is what 503 (not 502) says, and clients retry.
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_unavailable"
    assert "base" in reply.json()["error"]["message"]


# ------------------------------------------------------------------------------ engines going down


def test_a_dead_engine_gets_503_while_the_others_serve_and_health_names_it():
    seen = []
    gateway = Gateway(ENGINES, engine_key="inner-key", default_engine="base", transport=fake_engines(seen))
    auth = {"Authorization": "Bearer k"}
    with TestClient(gateway.app("k")) as c:
        assert c.get("/health").json()["status"] == "ok"
        gateway.mark_down("yunshan", "killed by SIGKILL")
        reply = c.post("/v1/completions", json={"model": "yunshan", "prompt": "x"}, headers=auth)
        assert reply.status_code == 503
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "engine_unavailable"
        assert "SIGKILL" in error["message"] and "restarting" in error["message"]
        assert c.post("/v1/completions", json={"model": "base", "prompt": "x"}, headers=auth).status_code == 200
        # Still listed (it comes back), and the engine that is down is not asked.
        assert "yunshan" in [m["id"] for m in c.get("/v1/models", headers=auth).json()["data"]]
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["down"] == ["yunshan"]
        assert health.json()["engines"]["yunshan"]["reason"] == "killed by SIGKILL"
        assert health.json()["engines"]["base"]["status"] == "up"
        gateway.mark_down("yunshan", "exit code 1", gave_up=True)
        assert "too many restarts" in c.post("/v1/completions", json={"model": "yunshan"}, headers=auth).json()["error"]["message"]


def test_a_restarted_engine_gets_its_runtime_adapters_back():
    loads = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/load_lora_adapter":
            loads.append(json.loads(request.content))
            return httpx.Response(200, text="Success")
        return httpx.Response(200, json={"data": [{"id": "base"}]})

    gateway = Gateway({"base": "http://engine-a:1"}, "inner", "base", transport=httpx.MockTransport(handle))
    with TestClient(gateway.app(None)) as c:
        gateway.engines["base"].loaded["live"] = "/adapters/live"
        gateway.mark_down("base", "killed by SIGKILL")
        assert c.get("/health").status_code == 503
        c.portal.call(gateway.engine_back, "base")
        assert loads == [{"lora_name": "live", "lora_path": "/adapters/live"}]
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["engines"]["base"]["restarts"] == 1


def test_a_stream_cut_by_a_dying_engine_ends_with_an_error_event():
    class Dies(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield b'data: {"piece": 0}\n\n'
            raise httpx.RemoteProtocolError("peer closed connection")

    def handle(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base"}]})
        return httpx.Response(200, stream=Dies(), headers={"content-type": "text/event-stream"})

    gateway = Gateway({"base": "http://engine-a:1"}, "inner", "base", transport=httpx.MockTransport(handle))
    with TestClient(gateway.app(None)) as c:
        with c.stream("POST", "/v1/completions", json={"model": "base", "stream": True}) as reply:
            lines = [line for line in reply.iter_lines() if line.startswith("data:")]
    assert json.loads(lines[0][5:]) == {"piece": 0}
    assert json.loads(lines[1][5:])["error"]["code"] == "engine_unavailable" and lines[-1] == "data: [DONE]"


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_merge_every_engine_labelled_by_engine():
    text = {
        "http://engine-a:1": '# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n'
                             'vllm:num_requests_running{model_name="base"} 2.0\nprocess_cpu_seconds_total 7.5\n',
        "http://engine-b:2": '# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n'
                             'vllm:num_requests_running{model_name="yunshan"} 0.0\n',
    }  # fmt: skip

    def handle(request):
        origin = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if request.url.path == "/metrics":
            assert request.headers["authorization"] == "Bearer inner"
            return httpx.Response(200, text=text[origin])
        return httpx.Response(200, json={"data": [{"id": "base" if origin.endswith("1") else "yunshan"}]})

    gateway = Gateway(ENGINES, "inner", "base", transport=httpx.MockTransport(handle))
    with TestClient(gateway.app("k")) as c:
        assert c.get("/metrics").status_code == 401
        body = c.get("/metrics", headers={"Authorization": "Bearer k"}).text
    lines = body.splitlines()
    assert lines.count("# TYPE vllm:num_requests_running gauge") == 1
    assert 'vllm:num_requests_running{engine="base",model_name="base"} 2.0' in lines
    assert 'vllm:num_requests_running{engine="yunshan",model_name="yunshan"} 0.0' in lines
    assert 'process_cpu_seconds_total{engine="base"} 7.5' in lines
    assert 'pangu_pi_engine_up{engine="yunshan"} 1' in lines
    # The family's samples follow its header, as Prometheus' text format requires.
    header = lines.index("# TYPE vllm:num_requests_running gauge")
    assert lines[header + 1].startswith("vllm:num_requests_running{") and lines[header + 2].startswith("vllm:num_requests_running{")


# ----------------------------------------------------------------------------- adapters at run time


def test_adapters_are_checked_then_loaded_on_the_named_engine_and_routed_there(tmp_path):
    import torch
    from safetensors.torch import save_file

    def model(path, hidden):
        path.mkdir()
        save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(hidden, hidden)}, str(path / "model.safetensors"))
        return path

    def lora(path, hidden, rank=8):
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({"r": rank}))
        prefix = "base_model.model.model.layers.0.self_attn.q_proj"
        save_file({f"{prefix}.lora_A.weight": torch.zeros(rank, hidden), f"{prefix}.lora_B.weight": torch.zeros(hidden, rank)},
                  str(path / "adapter_model.safetensors"))  # fmt: skip
        return path

    served = {"http://engine-a:1": ["base"], "http://engine-b:2": ["yunshan"]}
    asked = []

    def handle(request):
        origin = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": served[origin][0]}, *({"id": a, "parent": served[origin][0]} for a in served[origin][1:])]})
        body = json.loads(request.content)
        asked.append((origin, request.url.path, body))
        if request.url.path == "/v1/load_lora_adapter":
            served[origin].append(body["lora_name"])
            return httpx.Response(200, text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")
        if request.url.path == "/v1/unload_lora_adapter":
            served[origin].remove(body["lora_name"])
            return httpx.Response(200, text="Success")
        return json_reply(200, {"engine": origin})

    gateway = Gateway(ENGINES, "inner", "base", transport=httpx.MockTransport(handle),
                      model_dirs={"base": model(tmp_path / "m", 16), "yunshan": model(tmp_path / "y", 32)},
                      max_lora_rank={"base": 16, "yunshan": 16})  # fmt: skip
    auth = {"Authorization": "Bearer k"}
    with TestClient(gateway.app("k")) as c:
        load = lambda **body: c.post("/v1/load_lora_adapter", json=body, headers=auth)  # noqa: E731
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"}).status_code == 401

        def refused(reply, mentions, param="lora_path"):
            assert reply.status_code == 400, reply.text
            assert mentions in reply.json()["error"]["message"] and reply.json()["error"]["param"] == param

        refused(load(lora_name="a", lora_path=str(tmp_path / "nowhere")), "does not exist")
        refused(load(lora_name="a", lora_path=str(tmp_path)), "no adapter_config.json")
        refused(load(lora_name="a", lora_path=str(lora(tmp_path / "wide", 32))), "another shape")
        refused(load(lora_name="a", lora_path=str(lora(tmp_path / "big", 16, rank=64))), "--max-lora-rank 64")
        refused(load(lora_name="a", lora_path=str(tmp_path / "wide"), variant="nope"), "yunshan", param="variant")
        refused(load(lora_name="yunshan", lora_path=str(tmp_path / "wide")), "already served", param="lora_name")
        refused(load(lora_path=str(tmp_path / "wide")), "lora_name", param="lora_name")
        assert asked == [], "nothing invalid reaches an engine"

        assert load(lora_name="narrow", lora_path=str(lora(tmp_path / "narrow", 16))).status_code == 200
        assert load(lora_name="wide", lora_path=str(tmp_path / "wide"), variant="yunshan").status_code == 200
        assert asked[-1] == ("http://engine-b:2", "/v1/load_lora_adapter", {"lora_name": "wide", "lora_path": str(tmp_path / "wide")})
        ids = [m["id"] for m in c.get("/v1/models", headers=auth).json()["data"]]
        assert ids == ["base", "narrow", "yunshan", "wide"]
        for name, engine in (("narrow", "http://engine-a:1"), ("wide", "http://engine-b:2")):
            assert c.post("/v1/completions", json={"model": name, "prompt": "x"}, headers=auth).json() == {"engine": engine}
        assert gateway.engines["yunshan"].loaded == {"wide": str((tmp_path / "wide").resolve())}

        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "wide"}, headers=auth).status_code == 200
        assert asked[-1][:2] == ("http://engine-b:2", "/v1/unload_lora_adapter")
        missing = c.post("/v1/unload_lora_adapter", json={"lora_name": "wide"}, headers=auth)
        assert missing.status_code == 404 and "narrow" in missing.json()["error"]["message"]
        assert c.post("/v1/completions", json={"model": "wide", "prompt": "x"}, headers=auth).status_code == 404
        assert gateway.engines["yunshan"].loaded == {}


def test_an_engine_whose_core_died_is_a_503_other_server_errors_pass_through():
    def handle(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base"}]})
        if json.loads(request.content)["prompt"] == "dead":
            message = "EngineCore encountered an issue. See stack trace (above) for the root cause."
            return json_reply(500, {"error": {"message": message, "type": "InternalServerError", "param": None, "code": 500}})
        return json_reply(500, {"error": {"message": "something else", "type": "InternalServerError", "param": None, "code": 500}})

    gateway = Gateway({"base": "http://engine-a:1"}, "inner", "base", transport=httpx.MockTransport(handle))
    with TestClient(gateway.app(None)) as c:
        dead = c.post("/v1/completions", json={"model": "base", "prompt": "dead"})
        other = c.post("/v1/completions", json={"model": "base", "prompt": "x"})
    assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_unavailable"
    assert other.status_code == 500 and other.json()["error"]["message"] == "something else"


def test_adapters_with_embeddings_of_another_vocabulary_are_refused(tmp_path):
    import pytest
    import torch
    from safetensors.torch import save_file

    from pangu_pi.serving.adapters import AdapterProblem, check_adapter

    model = tmp_path / "model"
    model.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(100, 16), "lm_head.weight": torch.zeros(100, 16)}, str(model / "model.safetensors"))

    def adapter(name, tensors):
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({"r": 4}))
        save_file(tensors, str(path / "adapter_model.safetensors"))
        return path

    fits = adapter("fits", {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 100),
                            "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(16, 4)})  # fmt: skip
    check_adapter(fits, model, 16)
    wider_vocab = adapter("vocab", {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 120)})
    with pytest.raises(AdapterProblem, match="vocabulary of 120, the served model's has 100"):
        check_adapter(wider_vocab, model, 16)
    saved_head = adapter("head", {"base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(120, 16)})
    with pytest.raises(AdapterProblem, match="lm_head"):
        check_adapter(saved_head, model, 16)
