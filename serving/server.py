"""`pangu-pi serve`: PanGu-π checkpoints behind an OpenAI-compatible endpoint on vLLM.

    pangu-pi serve MODEL_DIR [--lora NAME=DIR ...] [--variant NAME=DIR ...] [--host 127.0.0.1]
                   [--port 8000] [--api-key KEY] [--admin-api-key KEY] [--max-model-len N] [-- VLLM_ARGS ...]

One engine serves MODEL_DIR and every LoRA adapter (adapters share the base's tokenizer, so one
batch can mix them). Each `--variant` (own tokenizer or weights) gets an engine of its own. A
gateway on --host:--port routes requests among the engines by their `model`, checks the keys, the
request limits and the load, loads adapters at run time, and merges the engines' metrics.

vLLM runs as child processes in their own process groups, listening on Unix sockets in a private
folder, each logging to a file under --log-dir. An engine that dies is restarted with backoff (at
most --max-restarts times in a row) while the gateway answers its models with a 503; the others keep
serving. On Ctrl-C or SIGTERM every group is stopped, and a child left behind by a crashed parent is
stopped by the kernel (parent-death signal).

The parts, each a module of this package: `config` (the command line, typed), `engines` (plan,
start, probe and stop the vLLM processes), `supervisor` (restarts), `kv_cache` (CPU cache sizing),
`gateway` (the HTTP front), `request_guard` and `backpressure` (what a request may do).
"""

from __future__ import annotations

import secrets
import shutil
import signal
import sys
import threading
import time

from pangu_pi.errors import UserError

from .config import ServeConfig, parse_args
from .engines import (Engine, Launch, detect_device, plan_engines, prepare_log_dir, private_folder, start_engine,
                      stop_engines, wait_until_healthy)  # fmt: skip
from .kv_cache import choose_kv_cache
from .supervisor import Supervisor, say

__all__ = ["main", "parse_args", "run_gateway"]


class _Stop(Exception):
    """Raised in the main thread by SIGTERM, so shutdown runs the same path as Ctrl-C."""


def _raise_stop(signum, frame) -> None:
    raise _Stop()


def main(argv: list[str]) -> int:
    config = parse_args(argv)
    socket_dir = private_folder("pangu-pi-engines-")
    try:
        engines = plan_engines(config, socket_dir)
        device = detect_device()
        log_dir = prepare_log_dir(config)
        # The engines take a key only the gateway knows, so nothing on the machine can bypass the gateway.
        kv_cache_gib, line = choose_kv_cache(engines, config, device)
        launch = Launch(config, device, secrets.token_urlsafe(24), log_dir, kv_cache_gib)
        if line:
            say(line)
        say(f"engine logs in {log_dir}")
        if not config.admin_api_key and any(e.state.max_lora_rank is not None for e in engines):
            say("warning: no --admin-api-key, so any client with the API key can load and unload adapters; "
                "set one to keep that to the operator")  # fmt: skip
        return _serve(engines, launch)
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def _serve(engines: list[Engine], launch: Launch) -> int:
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        for engine in engines:
            start_engine(engine, launch)
        wait_until_healthy(engines, launch.config.startup_timeout)
        return run_gateway(engines, launch)
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_engines(engines)


def build_gateway(engines: list[Engine], engine_key: str, config: ServeConfig):
    from .gateway import Gateway

    return Gateway(
        [e.state for e in engines],
        engine_key,
        limits=config.limits,
        admin_key=config.admin_api_key,
        max_concurrency=config.max_concurrency,
        engine_concurrency=config.slots_per_engine,
        queue_timeout_s=config.queue_timeout,
    )


def run_gateway(engines: list[Engine], launch: Launch) -> int:
    import uvicorn

    from .backpressure import protocol_class

    config = launch.config
    gateway = build_gateway(engines, launch.key, config)
    names = ", ".join(n for e in engines for n in (e.name, *e.loras))
    server = uvicorn.Server(uvicorn.Config(
        gateway.app(config.api_key), host=config.host, port=config.port, log_level="warning", access_log=False,
        http=protocol_class(config.max_connections, config.header_timeout, gateway.counters.reject),
    ))  # fmt: skip
    supervisor = Supervisor(engines, launch, gateway, server)
    supervisor.start()

    def announce() -> None:  # only once the gateway listens: a client that waits for the line can connect
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            print(f"pangu-pi serve: ready at http://{config.host}:{config.port}/v1 (models: {names})", flush=True)

    threading.Thread(target=announce, name="announce-ready", daemon=True).start()
    # uvicorn captures SIGINT/SIGTERM while serving, shuts down cleanly, then re-raises the signal
    # into our handlers, which unwind into main's cleanup.
    try:
        server.run()
    finally:
        supervisor.stop()
    if supervisor.all_failed:
        raise UserError(
            f"every engine died {config.max_restarts + 1} times in a row; see their logs in {launch.log_dir}"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (UserError, FileNotFoundError) as err:
        print(f"pangu-pi serve: error: {err}", file=sys.stderr)
        sys.exit(2)
