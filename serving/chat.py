"""`pangu-pi chat`: a terminal chat with an OpenAI-compatible endpoint, printing tokens as they stream.

    pangu-pi chat [--url http://127.0.0.1:8000] [--model NAME] [--api-key KEY] [--system TEXT]

Type a message and Enter; `/reset` starts a new conversation, `/exit` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from pangu_pi.api_client import api_base, connect, user_errors
from pangu_pi.errors import UserError

from .request_guard import API_KEY_ENV

UNREACHABLE = "is `pangu-pi serve` running there?"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pangu-pi chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server address (with or without /v1)")
    parser.add_argument("--model", help="model name (default: the first one the server lists)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"bearer key (default: ${API_KEY_ENV})")
    parser.add_argument("--system", help="system message that opens the conversation")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    return parser.parse_args(argv)


class ChatClient:
    def __init__(self, url: str, api_key: str | None, timeout: float = 600.0):
        self.base = api_base(url)
        self.client = connect(url, api_key, timeout=timeout)

    def models(self) -> list[str]:
        with user_errors(f"{self.base}/models", UNREACHABLE):
            return [m.id for m in self.client.models.list().data]

    def stream(self, model: str, messages: list[dict], **sampling) -> Iterator[str]:
        """Yield the assistant's text piece by piece as the server sends it (server-sent events)."""
        with user_errors(f"{self.base}/chat/completions", UNREACHABLE):
            for chunk in self.client.chat.completions.create(model=model, messages=messages, stream=True, **sampling):
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    client = ChatClient(args.url, args.api_key)
    models = client.models()
    model = args.model or (models[0] if models else None)
    if model is None:
        raise UserError(f"{client.base} serves no models")
    if model not in models:
        raise UserError(f"{client.base} does not serve {model!r}; it serves {', '.join(models)}")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {model} at {client.base}; /reset starts over, /exit leaves", file=sys.stderr)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = list(opening)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        if interactive:
            print(f"{model}> ", end="", file=sys.stderr, flush=True)
        answer = []
        try:
            for piece in client.stream(model, messages, **sampling):
                answer.append(piece)
                print(piece, end="", flush=True)
        except UserError as err:
            print(f"\n[error] {err}", file=sys.stderr, flush=True)
            messages.pop()  # the turn failed; let the user try again
            continue
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(answer)})
    return 0
