"""ASGI middleware in front of every endpoint we serve (the gateway and each vLLM engine behind it):
API-key check on every route but /health (and an admin key for adapter load/unload, when set), and
limits on what one request may send or ask (body size and read time, JSON nesting, `n`, `stop`
strings, tools, chat roles), all answered in OpenAI's error format so OpenAI clients raise their
usual exceptions.

The limits hold on every path a body can take: the media type is parsed as RFC 9110 says (case
does not matter, parameters are ignored), every body is read against the size limit and the read
deadline whatever its type, a JSON route refuses a body that is not JSON (415), and the fields the
limits read are coerced with pydantic exactly as vLLM's request models will coerce them (`5000.0`
and `"5000"` are an `n` of 5000), so what is checked is what the engine would run.

vLLM's own `--api-key` guards only /v1 and answers `{"error": "Unauthorized"}`, which OpenAI clients
cannot parse; `pangu-pi serve` loads this middleware into each engine instead (`--middleware`), with
the engine key and the same limits passed in the environment (vLLM builds it with no arguments).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable

from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_KEY_ENV = "PANGU_PI_API_KEY"  # never on the command line, where `ps` would show it to every user
ADMIN_KEY_ENV = "PANGU_PI_ADMIN_API_KEY"
LIMITS_ENV = "PANGU_PI_LIMITS"  # the gateway's limits, as JSON, for the guard inside each engine
OPEN_PATHS = frozenset({"/health"})  # liveness probes and our own startup wait carry no key
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Routes whose body is a JSON object: a body of another media type there is a 415.
JSON_ROUTES = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/tokenize", "/detokenize",
    *ADMIN_PATHS,
})  # fmt: skip
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # what OpenAI's chat API accepts

log = logging.getLogger("pangu_pi.serving")

# vLLM's request models declare `n: int | None`; pydantic's lax mode turns 5000.0, "5000" and
# "5000.0" into 5000. The same adapter here gives the number the engine would use.
_INT = TypeAdapter(int | None)


@dataclass(frozen=True)
class Limits:
    """What one request may send or ask; None = no limit. Each has a `pangu-pi serve` flag.

    The defaults keep one request from taking the whole server (ten thousand sequences, a body of
    megabytes that has to be parsed, a JSON nested ten thousand deep, a client that sends a byte a
    minute) while staying above what OpenAI's own API allows a request.
    """

    max_n: int | None = 16
    max_body_bytes: int | None = 2 * 1024 * 1024
    max_stop: int | None = 16
    max_tools: int | None = 128
    max_json_depth: int | None = 64  # a tool's JSON schema nests a few levels per object
    body_timeout_s: float | None = 30.0  # the whole body, from the first receive to the last

    @classmethod
    def none(cls) -> "Limits":
        return cls(None, None, None, None, None, None)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "Limits":
        """The limits `pangu-pi serve` gave an engine; this class's defaults where none were given."""
        text = os.environ.get(LIMITS_ENV)
        return cls(**json.loads(text)) if text else cls()


# The flag that raises each limit, named in its refusal so the operator knows what to change.
LIMIT_FLAGS = {
    "max_n": "--max-n",
    "max_body_bytes": "--max-body-bytes",
    "max_stop": "--max-stop",
    "max_tools": "--max-tools",
    "max_json_depth": "--max-json-depth",
    "body_timeout_s": "--body-timeout",
}


def openai_error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                 headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    """A JSONResponse shaped as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def media_type(headers: Headers) -> str | None:
    """`Application/JSON; charset=utf-8` → `application/json`; None when there is no Content-Type."""
    value = headers.get("content-type")
    if value is None or not value.strip():
        return None
    return value.split(";", 1)[0].strip().lower()


def is_json_type(kind: str | None) -> bool:
    # What FastAPI (vLLM's server) parses as JSON: application/json and the +json suffix types.
    return kind is not None and (
        kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))
    )


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Refusal(Exception):
    """A request refused before the app sees it; `reason` labels it in the gateway's metrics."""

    def __init__(self, response: JSONResponse, reason: str):
        super().__init__(reason)
        self.response, self.reason = response, reason


class RequestGuard:
    """Checks the key(s), then reads and checks the body, before the app sees the request.

    `on_refusal(reason)` is told of every refusal (the gateway counts them on /metrics).
    """

    def __init__(self, app: ASGIApp, api_key: str | None = None, limits: Limits | None = None,
                 admin_key: str | None = None, on_refusal: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.app = app
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.key_digest = _digest(key) if key else None
        admin = admin_key if admin_key is not None else os.environ.get(ADMIN_KEY_ENV)
        self.admin_digest = _digest(admin) if admin else None
        # The engines' guard (vLLM builds it with no arguments) reads the gateway's limits from the
        # environment, so a request that reached an engine some other way meets the same limits.
        self.limits = limits if limits is not None else Limits.from_env()
        self.on_refusal = on_refusal

    def _presented(self, headers: Headers) -> bytes | None | JSONResponse:
        value = headers.get("authorization")
        if not value:
            return openai_error(
                401,
                "You didn't provide an API key. Send it in an 'Authorization: Bearer KEY' header.",
                "authentication_error",
            )
        scheme, _, key = value.partition(" ")
        if scheme.lower() != "bearer":
            return _wrong_key()
        return _digest(key.strip())

    def _authorised(self, headers: Headers, path: str) -> JSONResponse | None:
        if path in ADMIN_PATHS and self.admin_digest is not None:
            presented = self._presented(headers)
            if isinstance(presented, JSONResponse):
                return presented
            if hmac.compare_digest(presented, self.admin_digest):
                return None
            if self.key_digest is not None and hmac.compare_digest(presented, self.key_digest):
                return openai_error(
                    403,
                    "Loading and unloading adapters needs the admin key (`pangu-pi serve --admin-api-key`), "
                    "not the inference key.",
                    "permission_error",
                    code="admin_key_required",
                )
            return _wrong_key()
        if self.key_digest is None or path in OPEN_PATHS:
            return None
        presented = self._presented(headers)
        if isinstance(presented, JSONResponse):
            return presented
        # Compare digests in constant time, so the response time says nothing about the key.
        if not hmac.compare_digest(presented, self.key_digest):
            return _wrong_key()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":  # CORS preflights carry no key
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        headers = Headers(scope=scope)
        refusal = self._authorised(headers, path)
        if refusal is not None:
            self._refused("unauthorised")
            await refusal(scope, receive, send)
            return
        if scope["method"] in BODY_METHODS:
            try:
                receive = await self._check_body(scope, receive, headers, path)
            except Refusal as refused:
                self._refused(refused.reason)
                await refused.response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refused(self, reason: str) -> None:
        if self.on_refusal is not None:
            self.on_refusal(reason)

    async def _check_body(self, scope: Scope, receive: Receive, headers: Headers, path: str) -> Receive:
        """Read the body within the limits; parse and check it if it is JSON. Returns a `receive`
        that replays the body to the app. Raises Refusal."""
        kind = media_type(headers)
        json_route = path in JSON_ROUTES
        if json_route and kind is not None and not is_json_type(kind):
            raise Refusal(
                openai_error(
                    415,
                    f"This route takes a JSON body; the request's Content-Type is {kind!r}. "
                    "Send `Content-Type: application/json`.",
                    code="unsupported_media_type",
                ),  # fmt: skip
                "media_type",
            )
        limit = self.limits.max_body_bytes
        declared = headers.get("content-length")
        if limit is not None and declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise Refusal(_too_big(limit), "body_too_large")  # refused before a byte of it is read
        body, receive = await read_body(receive, limit, self.limits.body_timeout_s)
        if json_route or (is_json_type(kind) and body.strip()):
            parsed = _parse_json(body, self.limits.max_json_depth)
            _check_limits(parsed, self.limits)
            # The gateway routes by the body's `model`: it reads what was parsed here, not the bytes again.
            scope.setdefault("state", {})["json_body"] = parsed
        return receive


def _wrong_key() -> JSONResponse:
    return openai_error(401, "Incorrect API key provided.", "authentication_error", code="invalid_api_key")


async def read_body(
    receive: Receive, max_bytes: int | None = None, timeout_s: float | None = None
) -> tuple[bytes, Receive]:
    """Read the whole request body and return it with a `receive` that replays it, then reads on.

    Reading on (instead of stopping) keeps `http.disconnect` visible, which vLLM uses to abort the
    generation of a client that went away. A body over `max_bytes` is not kept: Refusal is raised as
    soon as it is known to be too big, so a huge upload never sits in memory whole; a body that has
    not all arrived `timeout_s` after the first read is refused too (a slow client holds memory and
    a connection for as long as it likes otherwise).
    """
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise Refusal(_too_big(max_bytes), "body_too_large")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise Refusal(
            openai_error(
                408,
                f"The request body did not arrive within {timeout_s:g} s; send it faster, or start the server "
                f"with a higher `pangu-pi serve --body-timeout`.",
                code="request_timeout",
            ),
            "body_timeout",
        ) from None
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def _limit_error(what: str, value: int, limit: int, name: str, param: str | None) -> Refusal:
    flag = LIMIT_FLAGS[name]
    return Refusal(
        openai_error(
            400,
            f"{what} is {value}, over this server's limit of {limit}; ask for less, or start the server with "
            f"a higher `pangu-pi serve {flag}`.",
            param=param,
            code="limit_exceeded",
        ),
        "limit",
    )


def _too_big(limit: int) -> JSONResponse:
    return openai_error(
        413,
        f"The request body is over this server's limit of {limit} bytes; send less, or start the server "
        f"with a higher `pangu-pi serve --max-body-bytes`.",
        code="limit_exceeded",
    )


def _bad(message: str, param: str | None = None, code: str | None = None) -> Refusal:
    return Refusal(openai_error(400, message, param=param, code=code), "invalid")


def _count(value) -> int | None:
    """How many items a `stop` or `tools` value holds as vLLM reads it: a string is one stop."""
    if isinstance(value, list):
        return len(value)
    return 1 if isinstance(value, str) else None


def _check_limits(body: dict, limits: Limits) -> None:
    if limits.max_n is not None and "n" in body:
        try:
            n = _INT.validate_python(body["n"])
        except ValidationError:
            raise _bad(
                f"`n` is {json.dumps(body['n'])[:40]}, which is not a whole number; send an integer.", "n"
            ) from None
        if n is not None and n > limits.max_n:
            raise _limit_error("`n` (choices per request)", n, limits.max_n, "max_n", "n")
    stops = _count(body.get("stop"))
    if limits.max_stop is not None and stops is not None and stops > limits.max_stop:
        raise _limit_error("The number of `stop` strings", stops, limits.max_stop, "max_stop", "stop")
    tools = body.get("tools")
    if limits.max_tools is not None and isinstance(tools, list) and len(tools) > limits.max_tools:
        raise _limit_error("The number of `tools`", len(tools), limits.max_tools, "max_tools", "tools")
    messages = body.get("messages")
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if isinstance(role, str) and role not in CHAT_ROLES:
                raise _bad(
                    f"messages[{i}].role is {json.dumps(role)}, which is not a chat role; use one of "
                    f"{', '.join(CHAT_ROLES)}.",
                    param=f"messages.[{i}].role",
                    code="invalid_role",
                )


def _too_deep(value, limit: int) -> bool:
    """Whether JSON `value` nests objects and arrays more than `limit` deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _parse_json(body: bytes, max_depth: int | None) -> dict:
    if not body.strip():
        raise _bad('The request body is empty; send a JSON object, e.g. {"model": ..., "prompt": ...}.')
    depth_error = _bad(
        f"The request body nests JSON more than {max_depth} levels deep; send a flatter body, or start the "
        f"server with a higher `pangu-pi serve --max-json-depth`.",
        code="limit_exceeded",
    )
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(f"The request body is not valid JSON ({err}); send a JSON object.") from None
    except RecursionError:  # deeper than Python's parser goes: deeper than any limit too
        raise depth_error from None
    if not isinstance(parsed, dict):
        raise _bad(f"The request body must be a JSON object, got a JSON {type(parsed).__name__}.")
    if max_depth is not None and _too_deep(parsed, max_depth):
        raise depth_error
    return parsed
