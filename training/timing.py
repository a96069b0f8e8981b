"""Phase times of the step loop (data, forward, backward, optimizer), only when asked.

`log.phase_times: false` (the default) gives a timer whose marks do nothing, so the loop never waits
for the device. When asked for, a CUDA run records CUDA events at the phase boundaries on the
current stream and reads their elapsed times once per logged step (the one wait they cost); a CPU
run, where every op has finished when it returns, reads `time.perf_counter`.

Times are per optimizer step, averaged over the steps since the last logged one, in seconds.
"""

from __future__ import annotations

import time

PHASES = ("data", "forward", "backward", "optimizer")


class PhaseTimer:
    def __init__(self, enabled: bool, device):
        self.enabled = enabled
        self.cuda = enabled and getattr(device, "type", "cpu") == "cuda"
        self._reset()

    def _reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.events: list[tuple[str, object, object]] = []
        self.steps = 0
        self._last = None

    def _now(self):
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin_step(self) -> None:
        if self.enabled:
            self.steps += 1
            self._last = self._now()

    def mark(self, phase: str) -> None:
        """The end of `phase`, which began at the previous mark (or the step's start)."""
        if not self.enabled:
            return
        now = self._now()
        if self.cuda:
            self.events.append((phase, self._last, now))
        else:
            self.totals[phase] += now - self._last
        self._last = now

    def read(self) -> dict[str, float]:
        """{"data_s": ..., "forward_s": ..., ...} per step since the last read; {} when off."""
        if not self.enabled or not self.steps:
            return {}
        if self.events:
            self.events[-1][2].synchronize()  # the only wait: once per logged step, and only when asked
            for phase, start, end in self.events:
                self.totals[phase] += start.elapsed_time(end) / 1000.0
        out = {f"{phase}_s": total / self.steps for phase, total in self.totals.items()}
        self._reset()
        return out
