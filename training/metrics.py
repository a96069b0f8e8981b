"""What a training run reports: `metrics.jsonl`, a progress bar, TensorBoard scalars, a PNG of the
loss curves and, when `log.wandb` names a project, the same scalars in Weights & Biases. Only rank 0
writes any of them.

`metrics.jsonl` has one line per optimizer step (`step`, `loss`, `lr`, `grad_norm`, `tokens_per_s` of
all processes, `tokens_per_s_per_gpu` of one, `skipped`, the time split and, where the peak is known,
`mfu` (training/flops.py; the formula is in docs/training.md), plus what the recipe adds, such as
the preference recipe's rewards, margin and accuracy) and one line per validation (`step`,
`val_loss` and `val_ppl`, or the recipe's `val_*` metrics). After a resume it is cut back to the
checkpoint's step, so the file always tells one history: the steps that the model in the newest
checkpoint went through.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from pangu_pi import run_layout

METRICS_FILE = run_layout.METRICS
PLOT_FILE = run_layout.LOSS_PLOT

# The FLOP formula and the table of device peaks live in training/flops.py; imported here, where
# the core and the benchmarks have always found them.
from .flops import PEAK_FLOPS_TABLE as PEAK_FLOPS  # noqa: E402, F401
from .flops import flops_per_token, peak_flops  # noqa: E402, F401


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
    return rows


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep only the lines up to `last_step`: those after it were trained by a run that died before saving."""
    path = Path(path)
    if not path.exists():
        return
    kept = [row for row in read_metrics(path) if row.get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, path)


# Keys of a step row that are bookkeeping rather than curves.
_NOT_SCALARS = {"step", "skipped", "tokens"}
# The preference recipe's curves, drawn in a panel of their own beside the loss.
PREFERENCE_CURVES = ("margin", "accuracy", "reward")  # reward: GRPO's mean reward per step (and val_reward)


def _scalars(row: dict) -> dict[str, float]:
    """A step row's finite numbers (loss, lr, grad norm, throughput, a recipe's metrics), not its times."""
    return {k: v for k, v in row.items() if k not in _NOT_SCALARS and not k.endswith("_s")
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _curve(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """The train and validation loss curves as a PNG (and, for preference tuning, the reward margin
    and accuracy beside them); None when there is nothing to draw yet."""
    rows = read_metrics(metrics_path)
    train = _curve([r for r in rows if "val_loss" not in r], "loss")
    val = _curve(rows, "val_loss")
    if not train and not val:
        return None
    preference = any(_curve(rows, k) for k in PREFERENCE_CURVES)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(12 if preference else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss" if preference else "loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if preference:
        right = axes[0][1]
        for key in PREFERENCE_CURVES:
            for name, style in ((key, "-"), (f"val_{key}", "o-")):
                curve = _curve(rows, name)
                if curve:
                    right.plot(*zip(*curve), style, label=name.replace("_", " "), linewidth=1, markersize=3)
        right.set_xlabel("optimizer step")
        right.set_ylabel("reward margin / preference accuracy / mean reward")
        right.grid(alpha=0.3)
        right.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)  # a reader never sees half a PNG
    return png_path


class RunLogger:
    """Rank 0's reporter; on other ranks every method does nothing."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        enabled: bool,
        start_step: int,
        max_steps: int,
        tensorboard: bool = True,
        progress: bool = True,
        desc: str = "pretrain",
        wandb_project: str | None = None,
        run_config: dict | None = None,
    ):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.metrics_path = self.out_dir / METRICS_FILE
        self._file = None
        self._tb = None
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.metrics_path, start_step)
        self._file = open(self.metrics_path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a dead run wrote past the checkpoint we resumed from.
            self._tb = SummaryWriter(str(self.out_dir / run_layout.TENSORBOARD), purge_step=start_step + 1)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, unit="step", desc=desc, dynamic_ncols=True)
        if wandb_project:
            self._wandb = _wandb_run(wandb_project, self.out_dir, run_config or {})

    def _write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def step(self, row: dict[str, Any], *, write: bool = True) -> None:
        if not self.enabled:
            return
        if write:
            self._write(row)
            scalars = _scalars(row)
            if self._tb is not None:
                for key, value in scalars.items():
                    self._tb.add_scalar(f"train/{key}", value, row["step"])
            if self._wandb is not None:
                values = {f"train/{k}": v for k, v in scalars.items()}
                self._wandb.log({**values, "train/skipped": int(bool(row.get("skipped")))}, step=row["step"])
        if self._bar is not None:
            postfix = {"loss": f"{row['loss']:.4f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
            if row.get("tokens_per_s_per_gpu") is not None and row["tokens_per_s_per_gpu"] != row["tokens_per_s"]:
                postfix["tok/s/gpu"] = f"{row['tokens_per_s_per_gpu']:.0f}"
            if row.get("mfu") is not None:
                postfix["mfu"] = f"{100 * row['mfu']:.1f}%"
            if row.get("skipped"):
                postfix["skipped"] = "yes"
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)

    def advance(self) -> None:
        """A step that is not logged (`train.log_every`): the progress bar moves, nothing is read back."""
        if self._bar is not None:
            self._bar.update(1)

    def validation(self, step: int, loss: float, metrics: dict[str, float] | None = None) -> None:
        """A validation line: the loss and its perplexity, or the loss and a recipe's `val_*` metrics
        (a preference loss is not nats per token, so it has no perplexity)."""
        if not self.enabled:
            return
        if metrics is None:
            ppl = math.exp(min(loss, 50.0))  # cap: an untrained model's exp(loss) overflows nothing useful
            metrics = {"val_ppl": ppl}
            text = f"validation loss {loss:.4f}, perplexity {ppl:.2f}"
        else:
            text = f"validation loss {loss:.4f}, " + ", ".join(
                f"{k.removeprefix('val_').replace('_', ' ')} {v:.4f}" for k, v in metrics.items())
        row = {"step": step, "val_loss": loss, **metrics}
        self._write(row)
        named = {f"val/{k.removeprefix('val_')}": v for k, v in row.items()
                 if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for key, value in named.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(named, step=step)
        if self._bar is not None:
            self._bar.write(f"step {step}: {text}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def plot(self, png_path: str | Path) -> None:
        if self.enabled:
            plot_losses(self.metrics_path, png_path)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def _wandb_run(project: str, out_dir: Path, run_config: dict):
    """A W&B run for this run folder; a resumed run continues the same W&B run (its id is kept in
    OUT/wandb_id). WANDB_MODE=offline writes it under OUT/wandb with no network, for `wandb sync`."""
    import wandb

    id_file = out_dir / run_layout.WANDB_ID
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, dir=str(out_dir), id=run_id, resume="allow", name=out_dir.name,
                      config=run_config, settings=wandb.Settings(console="off", silent=True))
