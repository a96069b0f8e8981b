"""The middleware every endpoint runs behind: API key on every route but /health, JSON bodies checked."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from pangu_pi.serving.request_guard import API_KEY_ENV, CHAT_ROLES, LIMITS_ENV, Limits, RequestGuard


async def echo(request):
    return JSONResponse({"body": (await request.body()).decode(), "path": request.url.path})


def app(api_key, limits=None):
    routes = [
        Route(p, echo, methods=["GET", "POST", "OPTIONS"])
        for p in ("/health", "/metrics", "/v1/completions", "/v1/audio")
    ]
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
        assert_error(
            client.get(path, headers={"Authorization": "Bearer k2"}), 401, "authentication_error", "invalid_api_key"
        )
        assert_error(
            client.get(path, headers={"Authorization": "Basic k1"}), 401, "authentication_error", "invalid_api_key"
        )
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
    [
        (b'{"prompt": ', "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "JSON object, got a JSON list"),
        (b"\xff\xfe", "not valid JSON"),
    ],
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
def test_each_limit_is_a_4xx_naming_it_and_its_flag(body, param, flag):
    client = app(None, Limits())
    reply = client.post("/v1/completions", json={"model": "m", **body})
    assert_error(reply, 413 if flag == "--max-body-bytes" else 400, "invalid_request_error", "limit_exceeded")
    assert reply.json()["error"]["param"] == param and flag in reply.json()["error"]["message"]
    # At the limit itself, the request passes.
    at_limit = {"n": 16, "stop": ["a"] * 16, "tools": [{}] * 128, "unknown": "x" * 1000}
    key = next(iter(body))
    assert client.post("/v1/completions", json={"model": "m", key: at_limit[key]}).status_code == 200


def test_raised_limits_let_the_request_through():
    client = app(None, Limits(max_n=20000, max_body_bytes=8 << 20, max_stop=100, max_tools=1000))
    assert (
        client.post("/v1/completions", json={"n": 10000, "stop": ["x"] * 50, "pad": "y" * (5 << 20)}).status_code == 200
    )


def test_a_body_over_the_limit_is_refused_without_a_content_length_too():
    def chunks():
        for _ in range(40):
            yield b" " * 100_000

    reply = app(None, Limits(max_body_bytes=1_000_000)).post(
        "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 413 and "--max-body-bytes" in reply.json()["error"]["message"]


def test_unknown_chat_roles_are_400_naming_the_allowed_ones():
    client = app(None, Limits())
    messages = [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"}]
    reply = client.post("/v1/completions", json={"messages": messages})
    assert_error(reply, 400, "invalid_request_error", "invalid_role")
    assert '"wizard"' in reply.json()["error"]["message"] and "messages[1]" in reply.json()["error"]["message"]
    assert all(role in reply.json()["error"]["message"] for role in CHAT_ROLES)
    every_role = [{"role": r, "content": "x"} for r in CHAT_ROLES]
    assert client.post("/v1/completions", json={"messages": every_role}).status_code == 200


def test_the_engines_guard_takes_the_gateways_limits_from_the_environment(monkeypatch):
    # vLLM builds the middleware with no arguments: the limits come in the environment.
    monkeypatch.setenv(LIMITS_ENV, Limits(max_n=3).to_env())
    assert app(None).post("/v1/completions", json={"n": 4}).status_code == 400
    assert app(None).post("/v1/completions", json={"n": 3}).status_code == 200
    monkeypatch.delenv(LIMITS_ENV)
    assert app(None).post("/v1/completions", json={"n": 17}).status_code == 400  # the defaults otherwise
    assert (
        app(None, Limits.none()).post("/v1/completions", json={"n": 10**6, "pad": "y" * (3 << 20)}).status_code == 200
    )
    assert app(None, Limits.none()).post("/v1/completions", json={"messages": [{"role": "wizard"}]}).status_code == 400


@pytest.mark.parametrize(
    "content_type",
    [
        "Application/JSON",
        "APPLICATION/JSON; charset=UTF-8",
        "application/json;charset=utf-8",
        " application/vnd.api+json ",
        None,
    ],
)
def test_json_media_types_are_parsed_as_the_standard_says(content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    reply = app(None, Limits()).post("/v1/completions", content=b'{"n": 5000}', headers=headers)
    assert_error(reply, 400, "invalid_request_error", "limit_exceeded")


@pytest.mark.parametrize("n", [5000.0, "5000", "5000.0", " 5000 ", "5_000"])
def test_numbers_are_counted_as_vllm_will_read_them(n):
    reply = app(None, Limits()).post("/v1/completions", json={"n": n})
    assert_error(reply, 400, "invalid_request_error", "limit_exceeded")
    assert "5000" in reply.json()["error"]["message"]


def test_numbers_vllm_would_not_read_are_a_400_and_a_lone_stop_string_counts_one():
    for n in ('"many"', "2.5", "[1]", "1e400", "NaN"):
        reply = app(None, Limits()).post(
            "/v1/completions", content=f'{{"n": {n}}}', headers={"Content-Type": "application/json"}
        )
        assert_error(reply, 400, "invalid_request_error")
    assert app(None, Limits(max_stop=1)).post("/v1/completions", json={"stop": "x"}).status_code == 200
    assert app(None, Limits(max_stop=1)).post("/v1/completions", json={"stop": ["x", "y"]}).status_code == 400


@pytest.mark.parametrize(
    "content_type", ["text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"]
)
def test_a_body_that_is_not_json_on_a_json_route_is_415(content_type):
    reply = app(None, Limits()).post("/v1/completions", content=b'{"n": 5000}', headers={"Content-Type": content_type})
    assert_error(reply, 415, "invalid_request_error", "unsupported_media_type")


def test_every_body_meets_the_size_limit_whatever_its_type_and_route():
    client = app(None, Limits(max_body_bytes=1000))
    for path, content_type in (("/v1/audio", "audio/wav"), ("/v1/audio", None), ("/metrics", "text/plain")):
        headers = {"Content-Type": content_type} if content_type else {}
        assert client.post(path, content=b"x" * 2000, headers=headers).status_code == 413
        assert client.post(path, content=b"x" * 900, headers=headers).status_code == 200


@pytest.mark.parametrize("depth", [65, 5000, 200_000])
def test_deep_nesting_is_a_400_not_a_crash(depth):
    body = b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
    reply = app(None, Limits(max_body_bytes=None)).post(
        "/v1/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert_error(reply, 400, "invalid_request_error", "limit_exceeded")
    assert "--max-json-depth" in reply.json()["error"]["message"]
    shallow = b'{"x": ' + b"[" * 60 + b"]" * 60 + b"}"
    assert (
        app(None, Limits())
        .post("/v1/completions", content=shallow, headers={"Content-Type": "application/json"})
        .status_code
        == 200
    )


def test_a_body_that_arrives_too_slowly_is_a_408():
    import asyncio

    async def run():
        pieces = [b'{"prompt": "', b'x"}']
        sent = []

        async def receive():
            if len(pieces) == 1:
                await asyncio.sleep(1.0)  # a client that stalls mid-body
            return {"type": "http.request", "body": pieces.pop(0), "more_body": bool(pieces)}

        async def send(message):
            sent.append(message)

        async def never(scope, receive, send):
            raise AssertionError("the app must not see a body that never arrived")

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/completions",
            "headers": [(b"content-type", b"application/json")],
        }
        await RequestGuard(never, api_key="", limits=Limits(body_timeout_s=0.3))(scope, receive, send)
        return sent

    sent = asyncio.run(run())
    assert sent[0]["status"] == 408
    error = __import__("json").loads(sent[1]["body"])["error"]
    assert error["code"] == "request_timeout" and "--body-timeout" in error["message"]


def test_the_admin_key_alone_opens_the_adapter_routes():
    routes = [Route(p, echo, methods=["POST"]) for p in ("/v1/load_lora_adapter", "/v1/completions")]
    client = TestClient(RequestGuard(Starlette(routes=routes), api_key="user", admin_key="admin", limits=Limits()))
    body = {"lora_name": "a", "lora_path": "/x"}
    assert client.post("/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer admin"}).status_code == 200
    assert_error(
        client.post("/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer user"}),
        403,
        "permission_error",
        "admin_key_required",
    )
    assert_error(client.post("/v1/load_lora_adapter", json=body), 401, "authentication_error")
    assert client.post("/v1/completions", json={}, headers={"Authorization": "Bearer user"}).status_code == 200
    assert client.post("/v1/completions", json={}, headers={"Authorization": "Bearer admin"}).status_code == 401
