"""Test-only fault hooks, one `Callback` (training/callbacks.py), read once from the environment.

    PANGU_PI_TEST_KILL_DURING_SAVE=N          SIGKILL the whole process group halfway through writing
                                              the step-N checkpoint (the previous one must stay usable)
    PANGU_PI_TEST_KILL_AFTER_STEP=N           SIGKILL the whole process group right after step N is
                                              logged, mid-run (resume must reproduce the losses)
    PANGU_PI_TEST_NONFINITE_GRAD_STEPS=3,5    NaN gradients at these optimizer steps (the loss stays
                                              finite), to exercise the non-finite guard
    PANGU_PI_TEST_DUMP_LOGITS=PATH            at the end, the engine's logits on a fixed input, saved to
                                              PATH, to compare with an export

`from_env()` is empty when none is set, so an ordinary run registers no callback at all.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from .callbacks import Callback

KILL_DURING_SAVE_ENV = "PANGU_PI_TEST_KILL_DURING_SAVE"
KILL_AFTER_STEP_ENV = "PANGU_PI_TEST_KILL_AFTER_STEP"
NONFINITE_STEPS_ENV = "PANGU_PI_TEST_NONFINITE_GRAD_STEPS"
DUMP_LOGITS_ENV = "PANGU_PI_TEST_DUMP_LOGITS"


@dataclass
class Faults(Callback):
    kill_during_save_step: int | None = None
    kill_after_step: int | None = None
    poisoned_steps: set[int] = field(default_factory=set)
    dump_logits_path: Path | None = None

    def on_save_midway(self, step: int) -> None:
        if self.kill_during_save_step == step:
            os.killpg(os.getpgid(0), signal.SIGKILL)

    def on_step_end(self, step: int) -> None:
        if self.kill_after_step == step:
            os.killpg(os.getpgid(0), signal.SIGKILL)

    def on_loss(self, step: int, loss):
        """Identity forward, NaN gradient: a test of the guard that the loss alone would not trip."""
        if step not in self.poisoned_steps:
            return loss
        import torch

        class _NaNGrad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                return g * float("nan")

        return _NaNGrad.apply(loss)

    def on_train_end(self, engine, recipe, d) -> None:
        if self.dump_logits_path is None:
            return
        import torch

        vocab = recipe.model_config.vocab_size
        ids = (torch.arange(1, 25, dtype=torch.long) * 37 % vocab).unsqueeze(0).to(d.device)
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=ids).logits.float().cpu()
        if d.rank == 0:
            torch.save({"input_ids": ids.cpu(), "logits": logits}, self.dump_logits_path)


def from_env() -> list[Callback]:
    """The fault hooks the environment asks for: [Faults(...)], or [] when none is set."""
    kill = os.environ.get(KILL_DURING_SAVE_ENV, "").strip()
    after = os.environ.get(KILL_AFTER_STEP_ENV, "").strip()
    poisoned = {int(s) for s in os.environ.get(NONFINITE_STEPS_ENV, "").split(",") if s.strip()}
    dump = os.environ.get(DUMP_LOGITS_ENV, "").strip()
    if not (kill or after or poisoned or dump):
        return []
    return [Faults(int(kill) if kill else None, int(after) if after else None, poisoned, Path(dump) if dump else None)]
