"""What keeps a flood or a slow client from taking the gateway: a cap on requests in flight (429 with
Retry-After beyond it), and, in the HTTP server itself, a cap on open connections and a deadline
for a request's headers (a client that opens connections and sends a byte a minute holds a socket
and a buffer each otherwise). The body's deadline is the request guard's (it reads the body)."""

from __future__ import annotations

import json
from typing import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from .request_guard import openai_error

RETRY_AFTER_S = 1
# Not counted against --max-concurrency: probes and scrapes must answer while the server is busy.
UNCOUNTED_PATHS = frozenset({"/health", "/metrics"})


def too_many(message: str, code: str = "too_many_requests"):
    return openai_error(429, message, "rate_limit_error", code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


class ConcurrencyLimit:
    """At most `max_concurrency` requests in flight; beyond, a 429 with Retry-After at once.

    A request counts until its response is complete or its client has gone away: a stream the client
    abandons ends the relay (which closes the engine's connection, and vLLM aborts the request), and
    its slot is free again."""

    def __init__(self, app: ASGIApp, max_concurrency: int | None, counters) -> None:
        self.app, self.max_concurrency, self.counters = app, max_concurrency, counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.max_concurrency is not None and self.counters.in_flight >= self.max_concurrency:
            self.counters.reject("concurrency")
            refusal = too_many(
                f"This server is answering {self.max_concurrency} requests already, its limit "
                f"(`pangu-pi serve --max-concurrency`); retry in {RETRY_AFTER_S} s."
            )
            await refusal(scope, receive, send)
            return
        self.counters.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counters.in_flight -= 1


def _raw_response(status: int, reason: str, message: str, code: str, retry_after: bool) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "rate_limit_error" if status == 429 else "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
    ).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after:
        head.append(f"retry-after: {RETRY_AFTER_S}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def protocol_class(max_connections: int | None, header_timeout_s: float | None, on_refusal: Callable[[str], None]):
    """uvicorn's HTTP protocol (httptools') with a connection cap and a header deadline.

    uvicorn's own `limit_concurrency` answers 503 (a server fault, to clients) and it has no header
    timeout; both are a few lines on its protocol class."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    full = _raw_response(
        429,
        "Too Many Requests",
        f"This server has {max_connections} connections open, its limit "
        "(`pangu-pi serve --max-connections`); retry shortly.",
        "too_many_connections",
        True,
    )
    slow = _raw_response(
        408,
        "Request Timeout",
        f"The request headers did not arrive within {header_timeout_s} s (`pangu-pi serve --header-timeout`).",
        "request_timeout",
        False,
    )

    class GuardedProtocol(HttpToolsProtocol):
        header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if max_connections is not None and len(self.connections) > max_connections:
                on_refusal("connections")
                transport.write(full)
                transport.close()
                return
            self._arm()  # a connection that never sends a request counts too

        def _arm(self) -> None:
            self._disarm()
            if header_timeout_s:
                self.header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_late(self) -> None:
            self.header_timer = None
            if not self.transport.is_closing():
                on_refusal("header_timeout")
                self.transport.write(slow)
                self.transport.close()

        def on_message_begin(self) -> None:  # the first byte of a request: its headers' clock starts
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedProtocol
