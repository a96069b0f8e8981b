"""The gateway's routing, streaming and errors against in-process fake engines (the real engines are
exercised in test_gateway.py)."""

from __future__ import annotations

import json

import httpx
from starlette.testclient import TestClient

from serving.gateway import Gateway

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
    assert reply.status_code == 502 and "did not answer" in reply.json()["error"]["message"]
