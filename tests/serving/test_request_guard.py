"""The middleware every endpoint runs behind: API key on every route but /health, JSON bodies checked."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from pangu_pi.serving.request_guard import API_KEY_ENV, CHAT_ROLES, Limits, RequestGuard


async def echo(request):
    return JSONResponse({"body": (await request.body()).decode(), "path": request.url.path})


def app(api_key, limits=None):
    routes = [Route(p, echo, methods=["GET", "POST", "OPTIONS"]) for p in ("/health", "/metrics", "/v1/completions", "/v1/audio")]
    return TestClient(RequestGuard(Starlette(routes=routes), api_key=api_key, limits=limits))


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


@pytest.mark.parametrize(
    "body, param, flag",
    [
        ({"n": 17}, "n", "--max-n"),
        ({"stop": [str(i) for i in range(17)]}, "stop", "--max-stop"),
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools", "--max-tools"),
        ({"unknown": "x" * (2 * 1024 * 1024)}, None, "--max-body-bytes"),
    ],
)
def test_each_limit_is_a_400_naming_it_and_its_flag(body, param, flag):
    client = app(None, Limits())
    reply = client.post("/v1/completions", json={"model": "m", **body})
    assert_error(reply, 400, "invalid_request_error", "limit_exceeded")
    assert reply.json()["error"]["param"] == param and flag in reply.json()["error"]["message"]
    # At the limit itself, the request passes.
    at_limit = {"n": 16, "stop": ["a"] * 16, "tools": [{}] * 128, "unknown": "x" * 1000}
    key = next(iter(body))
    assert client.post("/v1/completions", json={"model": "m", key: at_limit[key]}).status_code == 200


def test_raised_limits_let_the_request_through():
    client = app(None, Limits(max_n=20000, max_body_bytes=8 << 20, max_stop=100, max_tools=1000))
    assert client.post("/v1/completions", json={"n": 10000, "stop": ["x"] * 50, "pad": "y" * (5 << 20)}).status_code == 200


def test_a_body_over_the_limit_is_refused_without_a_content_length_too():
    def chunks():
        for _ in range(40):
            yield b" " * 100_000

    reply = app(None, Limits(max_body_bytes=1_000_000)).post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and "--max-body-bytes" in reply.json()["error"]["message"]


def test_unknown_chat_roles_are_400_naming_the_allowed_ones():
    client = app(None, Limits())
    messages = [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"}]
    reply = client.post("/v1/completions", json={"messages": messages})
    assert_error(reply, 400, "invalid_request_error", "invalid_role")
    assert '"wizard"' in reply.json()["error"]["message"] and "messages[1]" in reply.json()["error"]["message"]
    assert all(role in reply.json()["error"]["message"] for role in CHAT_ROLES)
    every_role = [{"role": r, "content": "x"} for r in CHAT_ROLES]
    assert client.post("/v1/completions", json={"messages": every_role}).status_code == 200


def test_without_limits_only_roles_are_checked():
    # The engines' own guard, behind the gateway that has checked the limits already.
    assert app(None).post("/v1/completions", json={"n": 10**6, "stop": ["x"] * 99, "pad": "y" * (3 << 20)}).status_code == 200
    assert app(None).post("/v1/completions", json={"messages": [{"role": "wizard"}]}).status_code == 400
