"""ASGI middleware in front of every endpoint we serve (vLLM's own server and the variant gateway):
API-key check on every route but /health, and a clear 400 for a body that is not JSON, both answered
in OpenAI's error format so OpenAI clients raise their usual exceptions.

vLLM's own `--api-key` guards only /v1 and answers `{"error": "Unauthorized"}`, which OpenAI clients
cannot parse; `pangu-pi serve` passes the key to this middleware instead (`--middleware`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_KEY_ENV = "PANGU_PI_API_KEY"  # never on the command line, where `ps` would show it to every user
OPEN_PATHS = frozenset({"/health"})  # liveness probes and our own startup wait carry no key
JSON_METHODS = frozenset({"POST", "PUT", "PATCH"})


def openai_error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
    """A JSONResponse shaped as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class RequestGuard:
    """Checks `Authorization: Bearer KEY` and that JSON request bodies parse, before the app sees them."""

    def __init__(self, app: ASGIApp, api_key: str | None = None) -> None:
        self.app = app
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.key_digest = _digest(key) if key else None

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
            body, receive = await _buffer_body(receive)
            if (refusal := _check_json(body)) is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _declares_json(headers: Headers) -> bool:
    # Uploads (multipart audio, files) are not ours to parse; a JSON body may come unlabelled.
    content_type = headers.get("content-type", "")
    return not content_type or "json" in content_type


async def _buffer_body(receive: Receive) -> tuple[bytes, Receive]:
    """Read the whole request body and return a `receive` that replays it, then reads on.

    Reading on (instead of stopping) keeps `http.disconnect` visible, which vLLM uses to abort the
    generation of a client that went away.
    """
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
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


def _check_json(body: bytes) -> JSONResponse | None:
    if not body.strip():
        return openai_error(400, "The request body is empty; send a JSON object, e.g. {\"model\": ..., \"prompt\": ...}.")
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return openai_error(400, f"The request body is not valid JSON ({err}); send a JSON object.")
    if not isinstance(parsed, dict):
        return openai_error(400, f"The request body must be a JSON object, got a JSON {type(parsed).__name__}.")
    return None
