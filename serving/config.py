"""What `pangu-pi serve` was asked to do, typed: the command line parsed and checked into one
frozen dataclass that every other part of the server reads (the planner, the engine launcher, the
KV-cache sizer, the gateway). Defaults live on the fields; the parser only adds the help."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from pangu_pi.errors import UserError

from .request_guard import ADMIN_KEY_ENV, API_KEY_ENV, Limits

DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class ServeConfig:
    model_dir: Path
    name: str | None = None
    lora: tuple[str, ...] = ()  # NAME=DIR each
    variant: tuple[str, ...] = ()  # NAME=DIR each
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    admin_api_key: str | None = None
    max_model_len: int | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    startup_timeout: float = 900.0
    tool_call_parser: str = "hermes"
    no_auto_tool_choice: bool = False
    json_whitespace: bool = False
    log_dir: Path | None = None
    force: bool = False
    max_restarts: int = 5
    max_lora_rank: int | None = None
    max_loras: int | None = None
    no_runtime_lora: bool = False
    # Limits on one request, and backpressure.
    limits: Limits = DEFAULT_LIMITS
    max_concurrency: int | None = 512
    max_connections: int | None = 1024
    header_timeout: float | None = 10.0
    queue_timeout: float = 30.0
    engine_concurrency: int | None = None  # default: the engines' --max-num-seqs
    vllm_args: tuple[str, ...] = field(default_factory=tuple)  # after `--`, to every engine unchanged

    def passthrough(self, flag: str) -> str | None:
        """The value of a vLLM flag passed after `--`, if any (`--flag V` or `--flag=V`)."""
        for i, arg in enumerate(self.vllm_args):
            if arg == flag and i + 1 < len(self.vllm_args):
                return self.vllm_args[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        return None

    @property
    def slots_per_engine(self) -> int:
        """Requests the gateway lets in flight to one engine: what its batch holds, unless told."""
        if self.engine_concurrency is not None:
            return self.engine_concurrency
        with_seqs = self.passthrough("--max-num-seqs")
        return int(with_seqs) if with_seqs and with_seqs.isdigit() else 256


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pangu-pi serve",
        description="Serve a checkpoint (and its LoRA adapters and variants) behind an OpenAI-compatible API.",
        epilog="Arguments after `--` go to every vLLM engine unchanged, e.g. `-- --enforce-eager`.",
    )
    add = parser.add_argument
    add("model_dir", type=Path, help="HF checkpoint folder (config.json, weights, tokenizer)")
    add("--name", help="model name clients ask for (default: the folder's name)")
    add(
        "--lora", action="append", default=[], metavar="NAME=DIR", help="peft LoRA adapter of MODEL_DIR, served as NAME"
    )
    add("--variant", action="append", default=[], metavar="NAME=DIR",
        help="another checkpoint (own tokenizer or weights), served by its own engine as NAME")  # fmt: skip
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    add("--port", type=int, default=8000)
    add("--api-key", default=os.environ.get(API_KEY_ENV), help=f"require this bearer key (default: ${API_KEY_ENV})")
    add("--admin-api-key", default=os.environ.get(ADMIN_KEY_ENV),
        help=f"a second key, the only one that may load or unload adapters at run time (default: ${ADMIN_KEY_ENV}; "
             "without it the inference key may, and serve warns)")  # fmt: skip
    add("--max-model-len", type=int, help="context length (default: the model's)")
    add("--dtype", default="auto", help="weights/activations dtype: auto, bfloat16, float16, float32")
    add("--tensor-parallel-size", "-tp", type=int, default=1, help="GPUs per engine")
    add("--startup-timeout", type=float, default=900.0, help="seconds to wait for the engines")
    add(
        "--tool-call-parser",
        default="hermes",
        metavar="NAME",
        help="vLLM tool parser for tool calls (default hermes: the <tool_call> format of pangu-pi's chat template)",
    )
    add(
        "--no-auto-tool-choice",
        action="store_true",
        help="no tool parser: tool calls stay in the text and tool_choice auto, required or a name is refused",
    )
    add(
        "--json-whitespace",
        action="store_true",
        help="let constrained JSON (response_format, forced tool calls) hold free whitespace, as plain vLLM does",
    )
    add("--log-dir", type=Path,
        help="folder for each engine's log, ENGINE.log (default: a new private folder in the temp dir); "
             "a non-empty folder serve did not create is refused unless --force")  # fmt: skip
    add("--force", action="store_true", help="write engine logs into a non-empty --log-dir that serve did not create")
    add("--max-restarts", type=int, default=5, help="restarts of a dead engine in a row before giving up (default 5)")
    add(
        "--max-lora-rank",
        type=int,
        help="largest rank of an adapter loaded at run time (default: 16, or the largest --lora's rank)",
    )
    add("--max-loras", type=int, help="adapters one batch can mix (default: 4, or the --lora count)")
    add(
        "--no-runtime-lora",
        action="store_true",
        help="start engines without LoRA support unless --lora asks for it (refuses /v1/load_lora_adapter)",
    )
    limits = parser.add_argument_group("limits on one request (each refusal is a 4xx naming the flag)")
    d = DEFAULT_LIMITS
    limits.add_argument("--max-n", type=int, default=d.max_n, help="largest `n` (default %(default)s)")
    limits.add_argument(
        "--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (default %(default)s)"
    )
    limits.add_argument("--max-stop", type=int, default=d.max_stop, help="most `stop` strings (default %(default)s)")
    limits.add_argument("--max-tools", type=int, default=d.max_tools, help="most `tools` (default %(default)s)")
    limits.add_argument(
        "--max-json-depth", type=int, default=d.max_json_depth, help="deepest JSON nesting (default %(default)s)"
    )
    limits.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                        help="seconds a request body may take to arrive (default %(default)s; 408 beyond)")  # fmt: skip
    push = parser.add_argument_group("backpressure (each refusal is a 429 with Retry-After, or a 408)")
    c = ServeConfig(Path("."))
    push.add_argument("--max-concurrency", type=int, default=c.max_concurrency,
                      help="requests in flight at the gateway (default %(default)s)")  # fmt: skip
    push.add_argument("--max-connections", type=int, default=c.max_connections,
                      help="open client connections (default %(default)s)")  # fmt: skip
    push.add_argument("--header-timeout", type=float, default=c.header_timeout,
                      help="seconds a request's headers may take to arrive (default %(default)s)")  # fmt: skip
    push.add_argument("--engine-concurrency", type=int,
                      help="requests in flight to one engine (default: its --max-num-seqs, else 256)")  # fmt: skip
    push.add_argument("--queue-timeout", type=float, default=c.queue_timeout,
                      help="seconds a request waits for one of those engine slots (default %(default)s)")  # fmt: skip
    return parser


_POSITIVE = ("max_n", "max_body_bytes", "max_stop", "max_tools", "max_json_depth", "body_timeout", "max_concurrency",
             "max_connections", "header_timeout", "engine_concurrency", "queue_timeout")  # fmt: skip


def parse_args(argv: list[str]) -> ServeConfig:
    """The command line as a ServeConfig; a number out of range is a UserError naming its flag."""
    ours, passthrough = _split_passthrough(argv)
    args = build_parser().parse_args(ours)
    for name in (*_POSITIVE, "max_restarts"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "max_restarts" else 1e-9):
            raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    limits = Limits(
        args.max_n, args.max_body_bytes, args.max_stop, args.max_tools, args.max_json_depth, args.body_timeout
    )
    known = {f.name for f in fields(ServeConfig)}
    values = {k: v for k, v in vars(args).items() if k in known}
    values.update(lora=tuple(args.lora), variant=tuple(args.variant), limits=limits, vllm_args=tuple(passthrough))
    return ServeConfig(**values)


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []
