"""The one way into the training loop from outside it: a `Callback` hears named moments of a run.

The core (training/core.py) calls every registered callback at each moment; a run with none pays a
test of an empty list. The test-only fault hooks (training/faults.py) are callbacks; so is anything
a user passes to `core.train(recipe, callbacks=[...])`.

    on_loss(step, loss) -> loss     each micro-batch's loss before backward (may replace it)
    on_save_midway(step)            rank 0, a checkpoint's engine state written, its other files not yet
    on_step_end(step)               after an optimizer step is logged, evaluated and saved
    on_train_end(engine, recipe, d) after the last step, before the recipe writes its results
"""

from __future__ import annotations


class Callback:
    """Override the moments you need; each default does nothing."""

    def on_loss(self, step: int, loss):
        return loss

    def on_save_midway(self, step: int) -> None:
        pass

    def on_step_end(self, step: int) -> None:
        pass

    def on_train_end(self, engine, recipe, d) -> None:
        pass


class CallbackList(Callback):
    """Several callbacks heard as one, in order; falsy when empty, so a hot path can skip it."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def on_loss(self, step, loss):
        for cb in self.callbacks:
            loss = cb.on_loss(step, loss)
        return loss

    def on_save_midway(self, step):
        for cb in self.callbacks:
            cb.on_save_midway(step)

    def on_step_end(self, step):
        for cb in self.callbacks:
            cb.on_step_end(step)

    def on_train_end(self, engine, recipe, d):
        for cb in self.callbacks:
            cb.on_train_end(engine, recipe, d)
