"""ASGI middleware in front of every endpoint we serve (the gateway and each vLLM engine behind it):
API-key check on every route but /health, a clear 400 for a body that is not JSON, and limits on what
one request may ask (body size, `n`, `stop` strings, tools, chat roles), all answered in OpenAI's
error format so OpenAI clients raise their usual exceptions.

vLLM's own `--api-key` guards only /v1 and answers `{"error": "Unauthorized"}`, which OpenAI clients
cannot parse; `pangu-pi serve` passes the key to this middleware instead (`--middleware`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_KEY_ENV = "PANGU_PI_API_KEY"  # never on the command line, where `ps` would show it to every user
OPEN_PATHS = frozenset({"/health"})  # liveness probes and our own startup wait carry no key
JSON_METHODS = frozenset({"POST", "PUT", "PATCH"})
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # what OpenAI's chat API accepts


@dataclass(frozen=True)
class Limits:
    """What one request may ask; None = no limit. Each has a `pangu-pi serve` flag that raises it.

    The defaults keep one request from taking the whole server (ten thousand sequences, a body of
    megabytes that has to be parsed) while staying above what OpenAI's own API allows a request.
    """

    max_n: int | None = 16
    max_body_bytes: int | None = 2 * 1024 * 1024
    max_stop: int | None = 16
    max_tools: int | None = 128

    @classmethod
    def none(cls) -> "Limits":
        return cls(None, None, None, None)


# The flag that raises each limit, named in its refusal so the operator knows what to change.
LIMIT_FLAGS = {"max_n": "--max-n", "max_body_bytes": "--max-body-bytes", "max_stop": "--max-stop", "max_tools": "--max-tools"}


def openai_error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
    """A JSONResponse shaped as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class RequestGuard:
    """Checks `Authorization: Bearer KEY` and that JSON request bodies parse, before the app sees them."""

    def __init__(self, app: ASGIApp, api_key: str | None = None, limits: Limits | None = None) -> None:
        self.app = app
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.key_digest = _digest(key) if key else None
        # The engines' own guard (vLLM's --middleware) runs behind the gateway, which has checked
        # the limits already: by default it checks none.
        self.limits = limits if limits is not None else Limits.none()

    def _authorised(self, headers: Headers) -> JSONResponse | None:
        value = headers.get("authorization")
        if not value:
            return openai_error(
                401,
                "You didn't provide an API key. Send it in an 'Authorization: Bearer KEY' header.",
                "authentication_error",
            )
        scheme, _, key = value.partition(" ")
        # Compare digests in constant time, so the response time says nothing about the key.
        if scheme.lower() != "bearer" or not hmac.compare_digest(_digest(key.strip()), self.key_digest):
            return openai_error(401, "Incorrect API key provided.", "authentication_error", code="invalid_api_key")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":  # CORS preflights carry no key
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        headers = Headers(scope=scope)
        if self.key_digest is not None and path not in OPEN_PATHS:
            if (refusal := self._authorised(headers)) is not None:
                await refusal(scope, receive, send)
                return
        if scope["method"] in JSON_METHODS and path.startswith("/v1/") and _declares_json(headers):
            body, receive = await _buffer_body(receive, self.limits.max_body_bytes)
            if body is None:
                await _too_big(self.limits.max_body_bytes)(scope, receive, send)
                return
            parsed, refusal = _parse_json(body)
            if refusal is None:
                refusal = _check_limits(parsed, self.limits)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            # The gateway routes by the body's `model`: it reads what was parsed here, not the bytes again.
            scope.setdefault("state", {})["json_body"] = parsed
        await self.app(scope, receive, send)


def _declares_json(headers: Headers) -> bool:
    # Uploads (multipart audio, files) are not ours to parse; a JSON body may come unlabelled.
    content_type = headers.get("content-type", "")
    return not content_type or "json" in content_type


async def _buffer_body(receive: Receive, max_bytes: int | None = None) -> tuple[bytes | None, Receive]:
    """Read the whole request body and return a `receive` that replays it, then reads on.

    Reading on (instead of stopping) keeps `http.disconnect` visible, which vLLM uses to abort the
    generation of a client that went away. A body over `max_bytes` is not kept: None is returned as
    soon as it is known to be too big, so a huge upload never sits in memory whole.
    """
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            return None, receive
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def _limit_error(what: str, value: int, limit: int, name: str, param: str | None) -> JSONResponse:
    flag = LIMIT_FLAGS[name]
    return openai_error(
        400,
        f"{what} is {value}, over this server's limit of {limit}; ask for less, or start the server with "
        f"a higher `pangu-pi serve {flag}`.",
        param=param,
        code="limit_exceeded",
    )


def _too_big(limit: int) -> JSONResponse:
    return openai_error(
        400,
        f"The request body is over this server's limit of {limit} bytes; send less, or start the server "
        f"with a higher `pangu-pi serve --max-body-bytes`.",
        code="limit_exceeded",
    )


def _check_limits(body: dict, limits: Limits) -> JSONResponse | None:
    n = body.get("n")
    if limits.max_n is not None and isinstance(n, int) and not isinstance(n, bool) and n > limits.max_n:
        return _limit_error("`n` (choices per request)", n, limits.max_n, "max_n", "n")
    stop = body.get("stop")
    if limits.max_stop is not None and isinstance(stop, list) and len(stop) > limits.max_stop:
        return _limit_error("The number of `stop` strings", len(stop), limits.max_stop, "max_stop", "stop")
    tools = body.get("tools")
    if limits.max_tools is not None and isinstance(tools, list) and len(tools) > limits.max_tools:
        return _limit_error("The number of `tools`", len(tools), limits.max_tools, "max_tools", "tools")
    messages = body.get("messages")
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if isinstance(role, str) and role not in CHAT_ROLES:
                return openai_error(
                    400,
                    f"messages[{i}].role is {json.dumps(role)}, which is not a chat role; use one of "
                    f"{', '.join(CHAT_ROLES)}.",
                    param=f"messages.[{i}].role",
                    code="invalid_role",
                )
    return None


def _parse_json(body: bytes) -> tuple[dict | None, JSONResponse | None]:
    if not body.strip():
        return None, openai_error(400, "The request body is empty; send a JSON object, e.g. {\"model\": ..., \"prompt\": ...}.")
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, openai_error(400, f"The request body is not valid JSON ({err}); send a JSON object.")
    if not isinstance(parsed, dict):
        return None, openai_error(400, f"The request body must be a JSON object, got a JSON {type(parsed).__name__}.")
    return parsed, None


def _check_json(body: bytes, limits: Limits | None = None) -> JSONResponse | None:
    parsed, refusal = _parse_json(body)
    if refusal is None and limits is not None:
        refusal = _check_limits(parsed, limits)
    return refusal
