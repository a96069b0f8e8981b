"""One engine as both the supervisor (which starts and restarts its process) and the gateway (which
routes to it) see it: where it listens, whether it is up, what it serves. The supervisor writes
`status`; the gateway reads it and routes only to an engine that is up.

    starting ──(answers /health from its own process)──> up ──(process exits)──> waiting
        ^                                                                          │
        └──────────────────────(backoff over: started again)───────────────────────┘
    waiting ──(too many restarts in a row)──> failed
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

STARTING, UP, WAITING, FAILED = "starting", "up", "waiting", "failed"


@dataclass
class EngineState:
    name: str
    socket: Path  # the Unix socket its API server listens on, in a folder only we can enter
    model_dir: Path | None = None
    max_lora_rank: int | None = 16  # None: started without LoRA support
    startup_adapters: frozenset[str] = frozenset()  # named on the command line: not the API's to change
    status: str = STARTING
    reason: str = ""  # why it went down, for /health and 503s
    restarts: int = 0
    down_since: float | None = None
    models: list[dict] = field(default_factory=list)  # its last /v1/models listing
    # Adapters loaded at run time (name → path): what a restarted engine must be told again to serve
    # what it served before.
    loaded: dict[str, str] = field(default_factory=dict)

    @property
    def up(self) -> bool:
        return self.status == UP

    @property
    def health(self) -> str:
        """What /health says: up, restarting (down, coming back) or failed (given up)."""
        return self.status if self.status in (UP, FAILED) else "restarting"

    def mark_down(self, reason: str, gave_up: bool = False) -> None:
        self.status = FAILED if gave_up else WAITING
        self.reason = reason
        if self.down_since is None:
            self.down_since = time.time()

    def mark_up(self, restarted: bool) -> None:
        if restarted:
            self.restarts += 1
        self.status, self.reason, self.down_since = UP, "", None
