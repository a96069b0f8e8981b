"""Keeps the engines running: a thread that notices an engine whose process exited, marks it down
(the gateway answers its models with a 503), stops what it left behind, and starts it again after
1, 2, 4 … s (at most MAX_BACKOFF_S), at most --max-restarts times in a row. A restarted engine
counts as up only once its own process answers on its socket; it then gets its run-time adapters
back from the gateway. When every engine has given up, the gateway is stopped."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

from .engine_state import FAILED, STARTING, UP, WAITING
from .engines import (Engine, Impostor, Launch, describe_exit, engine_failure, kill_leftovers, probe,
                      snapshot_descendants, start_engine)  # fmt: skip

HEALTHY_RESET_S = 600.0  # an engine up this long has its failure count start again from zero
MAX_BACKOFF_S = 30.0


def say(message: str) -> None:
    print(f"pangu-pi serve: {message}", file=sys.stderr, flush=True)


class Supervisor:
    POLL_S = 0.25

    def __init__(self, engines: list[Engine], launch: Launch, gateway=None, server=None):
        self.engines, self.launch = engines, launch
        self.gateway, self.server = gateway, server
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.all_failed = False
        self.thread = threading.Thread(target=self._loop, name="engine-supervisor", daemon=True)

    @property
    def max_restarts(self) -> int:
        return self.launch.config.max_restarts

    def start(self) -> None:
        for engine in self.engines:
            snapshot_descendants(engine)
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
                        say(f"supervising engine {engine.name!r} failed: {err!r}")
                if snapshot:
                    last_snapshot = now

    def _step(self, engine: Engine, now: float, snapshot: bool) -> None:
        status = engine.state.status
        if status == UP:
            if engine.process.poll() is not None:
                self._died(engine, now, "died")
            elif snapshot:
                snapshot_descendants(engine)
        elif status == WAITING and now >= engine.next_start:
            say(f"restarting engine {engine.name!r} (attempt {engine.failures} of {self.max_restarts})")
            start_engine(engine, self.launch)
            engine.start_deadline = now + self.launch.config.startup_timeout
        elif status == STARTING:
            self._check_start(engine, now)

    def _check_start(self, engine: Engine, now: float) -> None:
        if engine.process.poll() is not None:
            time.sleep(0.5)  # the relay thread's last lines
            self._died(engine, now, "exited during a restart")
            return
        snapshot_descendants(engine)
        try:
            healthy = probe(engine, timeout=0.5)
        except Impostor as err:
            # Nothing was sent to it; the engine starts again, binding its socket path anew.
            kill_leftovers(engine)
            self._died(engine, now, f"was refused: {err}", quiet=False)
            return
        if healthy:
            engine.up_since = now
            problems = []
            if self.gateway is not None and self.gateway.loop is not None:
                future = asyncio.run_coroutine_threadsafe(self.gateway.engine_back(engine.name), self.gateway.loop)
                problems = future.result(timeout=120)
            else:  # not serving yet: nothing was loaded at run time
                engine.state.mark_up(restarted=True)
            say(f"engine {engine.name!r} is back")
            for problem in problems:
                say(f"engine {engine.name!r}: {problem}")
        elif now > engine.start_deadline:
            kill_leftovers(engine)
            self._died(engine, now, f"was not ready {self.launch.config.startup_timeout:.0f} s after a restart")

    def _died(self, engine: Engine, now: float, what: str, quiet: bool = True) -> None:
        reason = engine_failure(engine, what)
        kill_leftovers(engine)
        if engine.state.status == UP and now - engine.up_since > HEALTHY_RESET_S:
            engine.failures = 0
        engine.failures += 1
        short = describe_exit(engine.process.returncode) if quiet else what
        if engine.failures > self.max_restarts:
            engine.state.mark_down(f"{short}; gave up after {self.max_restarts} restarts", gave_up=True)
            say(f"{reason}; giving up after {self.max_restarts} restarts in a row")
            if all(e.state.status == FAILED for e in self.engines):
                self.all_failed = True
                if self.server is not None:
                    self.server.should_exit = True
            return
        delay = min(MAX_BACKOFF_S, 2.0 ** (engine.failures - 1))
        engine.next_start = now + delay
        engine.state.mark_down(short)
        say(f"{reason}; restarting it in {delay:.0f} s")
