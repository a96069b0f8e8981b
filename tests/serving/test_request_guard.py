"""The middleware every endpoint runs behind: API key on every route but /health, JSON bodies checked."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.request_guard import API_KEY_ENV, RequestGuard


async def echo(request):
    return JSONResponse({"body": (await request.body()).decode(), "path": request.url.path})


def app(api_key):
    routes = [Route(p, echo, methods=["GET", "POST", "OPTIONS"]) for p in ("/health", "/metrics", "/v1/completions", "/v1/audio")]
    return TestClient(RequestGuard(Starlette(routes=routes), api_key=api_key))


def assert_error(reply, status, type_, code=None):
    assert reply.status_code == status
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_ and error["code"] == code


def test_missing_and_wrong_keys_are_401_on_every_route_but_health():
    client = app("k1")
    for path in ("/metrics", "/v1/completions"):
        assert_error(client.get(path), 401, "authentication_error")
        assert_error(client.get(path, headers={"Authorization": "Bearer k2"}), 401, "authentication_error", "invalid_api_key")
        assert_error(client.get(path, headers={"Authorization": "Basic k1"}), 401, "authentication_error", "invalid_api_key")
        assert client.get(path, headers={"Authorization": "Bearer k1"}).status_code == 200
    assert client.get("/health").status_code == 200


def test_preflight_passes_without_key():
    assert app("k1").options("/v1/completions").status_code == 200


def test_no_key_configured_means_open(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert app(None).get("/v1/completions").status_code == 200


def test_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    client = app(None)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer from-env"}).status_code == 200


@pytest.mark.parametrize(
    "body, mentions",
    [(b'{"prompt": ', "not valid JSON"), (b"", "empty"), (b"[1, 2]", "JSON object, got a JSON list"), (b"\xff\xfe", "not valid JSON")],
)
def test_bad_json_bodies_are_400_with_the_reason(body, mentions):
    reply = app(None).post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_error(reply, 400, "invalid_request_error")
    assert mentions in reply.json()["error"]["message"]


def test_a_good_body_reaches_the_app_intact():
    body = '{"model": "m", "prompt": "' + "x" * 100_000 + '"}'
    reply = app(None).post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 200 and reply.json()["body"] == body


def test_uploads_are_not_parsed_as_json():
    reply = app(None).post("/v1/audio", files={"file": ("a.wav", b"RIFF....", "audio/wav")})
    assert reply.status_code == 200
