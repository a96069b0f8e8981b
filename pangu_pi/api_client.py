"""The client side of an OpenAI-compatible server (`pangu-pi serve`, vLLM), for the project's commands.

The openai package does the HTTP, the JSON and the server-sent events. This module sets it up one way
for every caller (the address with or without /v1, no silent retries, a placeholder key for a server
that wants none) and turns its errors into `UserError`s, which the CLI prints as one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .errors import UserError

# The openai client refuses to start without a key; a server started without one ignores the header.
NO_KEY = "EMPTY"


def api_base(url: str) -> str:
    """`url` ending in /v1, as given or with it added."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def connect(url: str, api_key: str | None = None, timeout: float = 600.0, connect_timeout: float = 10.0):
    """An `openai.OpenAI` client for the server at `url`."""
    try:
        import openai
    except ImportError:
        raise UserError("talking to a server needs the openai package: pip install 'openai>=1.50'") from None
    # No retries: a command that cannot reach its server should say so now, not after backing off.
    return openai.OpenAI(base_url=api_base(url), api_key=api_key or NO_KEY, max_retries=0,
                         timeout=openai.Timeout(timeout, connect=connect_timeout))  # fmt: skip


def server_message(err) -> str:
    """What the server said in an error reply: the OpenAI-shaped message, else its text."""
    body = err.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    text = body if isinstance(body, str) else ""
    if not text and err.response is not None:
        text = err.response.text
    return text.strip()[:500] or f"HTTP {err.status_code}"


@contextmanager
def user_errors(where: str, unreachable: str = "is the server running?") -> Iterator[None]:
    """Turn the openai package's errors inside the block into one-line `UserError`s naming `where`
    (the address asked); `unreachable` is the hint given when nothing answers there."""
    import openai

    try:
        yield
    except openai.APIStatusError as err:
        raise UserError(f"{where} answered {err.status_code}: {server_message(err)}") from None
    except openai.APIConnectionError as err:  # refused, unresolvable, timed out
        reason = str(err.__cause__ or "") or err.message
        raise UserError(f"cannot reach {where} ({reason}); {unreachable}") from None
    except openai.APIError as err:  # an error event in the middle of a streamed answer
        raise UserError(f"{where} failed mid-answer: {err.message}") from None
