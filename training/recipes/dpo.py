"""Preference tuning (DPO) as a recipe of the training core: `pangu-pi finetune` with `finetune.mode: dpo`.

    pangu-pi finetune --config configs/yunshan_dpo_tiny.yaml --set model.init_from=runs/sft/model --out runs/dpo
    pangu-pi finetune --config my_dpo.yaml --nproc 2 --set finetune.dpo.lora=true --set finetune.dpo.beta=0.2

Direct Preference Optimization (Rafailov et al., 2023) tunes a policy π on pairs of a better (chosen,
y_w) and a worse (rejected, y_l) answer to the same prompt x, against a frozen reference π_ref (the
starting checkpoint). With h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]:

    sigmoid (DPO):   loss = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)      (ε = finetune.dpo.label_smoothing)
    ipo (IPO):       loss = (h − 1/(2β))²  on log-probs averaged over the answer's tokens

β·(log π − log π_ref) of an answer is its implicit reward. Logged per step (metrics.jsonl,
TensorBoard, W&B, the plot): `rewards_chosen`, `rewards_rejected`, `margin` (their difference),
`accuracy` (the share of pairs whose chosen reward is the higher; a tie counts half, so the starting
model, whose rewards are all 0, scores 0.5) and the policy's `logps_chosen`, `logps_rejected`. With
`eval.every`, the same on the held-out pairs (`data.val_fraction` of them) as `val_*`.

Where the reference log-probabilities come from:
- LoRA (`finetune.dpo.lora`): the same model with its adapters disabled, one extra no-grad forward
  per micro-batch; nothing else is held in memory.
- Full weights: computed once, before the first step, by the starting model itself (every process
  scores its share of the pairs, under any ZeRO stage), then stored with the run
  (OUT/dpo_reference.pt, copied into every checkpoint) and read back on resume, whatever the process
  count. This costs 32 bytes per pair instead of a frozen second model (2-4 bytes per weight on every
  GPU, or its ZeRO-3 partition plus gathers), and one forward pass over the data. See docs/training.md.

This recipe builds on chat fine-tuning (recipes/sft.py: the model, the row stream, checkpoints and
outputs); the loss, the reference and the evaluation are its own. Everything else (process group,
DeepSpeed, accumulation, the non-finite guard, checkpoints, exact resume on any process count,
metrics) is the core's (training/core.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from pangu_pi import run_layout as layout
from pangu_pi.errors import UserError

from ..config import RunConfig
from ..distributed import Dist
from ..evaluation import sharded_sums
from ..sft_data import IGNORE_INDEX
from .sft import Finetuning, RowStream, load_data

METRICS = ("rewards_chosen", "rewards_rejected", "margin", "accuracy", "logps_chosen", "logps_rejected")


# ------------------------------------------------------------------------------------------------
# The loss


def sequence_logps(logits, labels):
    """(Σ log-probs of the labelled tokens, their count) per row; labels are -100 where not counted."""
    import torch.nn.functional as F

    targets = labels[:, 1:]
    per_token = -F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return per_token.sum(-1), (targets != IGNORE_INDEX).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """(mean loss, per-pair metrics) from per-pair log-probs (summed for sigmoid, token-averaged for ipo)."""
    import torch.nn.functional as F

    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    chosen = beta * (policy_chosen - ref_chosen).detach()
    rejected = beta * (policy_rejected - ref_rejected).detach()
    wins = (chosen > rejected).to(chosen.dtype) + 0.5 * (chosen == rejected).to(chosen.dtype)
    metrics = {"rewards_chosen": chosen, "rewards_rejected": rejected, "margin": chosen - rejected,
               "accuracy": wins, "logps_chosen": policy_chosen.detach(), "logps_rejected": policy_rejected.detach(),
               "loss": losses.detach()}
    return losses.mean(), metrics


# ------------------------------------------------------------------------------------------------
# Data


def load_pairs(config: RunConfig):
    """(tokenizer, PreferenceDataset) for the run; user-fixable problems become UserError."""
    from ..preference_data import PreferenceDataset

    return load_data(config, PreferenceDataset)


# ------------------------------------------------------------------------------------------------
# The recipe


class PreferenceTuning(Finetuning):
    """Finetuning's model, checkpoints and outputs; pairs for data and DPO's loss."""

    name = "dpo"
    unit = "pairs"
    rows_per_sample = 2  # a pair is two rows of a forward: chosen, rejected (sequence parallelism sizes by it)
    load = staticmethod(load_pairs)

    def make_stream(self, rows: list[int]) -> RowStream:
        from ..preference_data import collate_pairs

        pad = self.data.pad_id
        return RowStream(self.data, rows, self.config.seed, self.attn, collate=lambda items: collate_pairs(items, pad))

    def setup(self, plan: dict, d: Dist) -> None:
        super().setup(plan, d)
        self.dpo = self.config.finetune.dpo
        self.reference = None  # full weights: (pairs, 4) float64 — Σ log-probs and counts, chosen then rejected
        self.reference_source = "the model with its adapters disabled" if self.config.finetune.uses_lora else None

    # -- reference log-probs ---------------------------------------------------------------------

    def prepare(self, engine, d: Dist, resume_from: Path | None) -> None:
        if self.config.finetune.uses_lora:
            return
        import torch

        fingerprint = self.data.fingerprint()
        stored = Path(resume_from) / layout.DPO_REFERENCE if resume_from is not None else None
        if stored is not None:
            if not stored.is_file():
                raise UserError(f"{resume_from} has no {layout.DPO_REFERENCE}: the starting model's log-probabilities "
                                "are not stored with this run, and trained weights cannot stand in for them; start a "
                                "new run folder")
            saved = torch.load(stored, map_location="cpu", weights_only=True)
            if saved["fingerprint"] != fingerprint:
                raise UserError(f"the preference data differ from those this run started with (fingerprint "
                                f"{saved['fingerprint']}, now {fingerprint}); resume with the same data.datasets, "
                                "finetune.examples and data.seq_len, or start a new run folder")
            self.reference = saved["logps"]
            self.reference_source = f"stored with the run ({stored})"
        else:
            self.reference = self._score_reference(engine, d)
            self.reference_source = "computed once by the starting model"
            if d.rank == 0:
                path = Path(self.config.out) / layout.DPO_REFERENCE
                tmp = path.with_name(path.name + ".tmp")
                torch.save({"fingerprint": fingerprint, "init_from": str(self.config.model["init_from"]),
                            "logps": self.reference}, tmp)
                os.replace(tmp, path)
        d.barrier()

    def _score_reference(self, engine, d: Dist):
        """Every pair scored by the starting model; each process takes every world-th pair, and all
        run the same number of forwards (ZeRO-3 gathers weights collectively)."""
        import torch
        from tqdm.auto import tqdm

        n = len(self.data)
        mine = list(range(d.rank, n, d.world))
        per_rank = math.ceil(n / d.world)
        micro = self.split.micro_batch_size
        out = torch.zeros(n, 4, dtype=torch.float64, device=d.device)
        engine.eval()
        bar = tqdm(total=per_rank, desc="reference log-probs", unit="pair", disable=d.rank != 0 or not self.progress)
        with torch.no_grad():
            for start in range(0, per_rank, micro):
                # A process with fewer pairs repeats its last one so every process runs this forward;
                # only the first `real` rows of the batch are its own new pairs.
                idx = [mine[min(k, len(mine) - 1)] if mine else 0 for k in range(start, min(start + micro, per_rank))]
                real = max(0, min(len(idx), len(mine) - start))
                batch = self.train_stream.collate([self.data[i] for i in idx])
                sums, counts = self._logps(engine, batch, d, adapters=True)
                k = len(idx)
                rows = torch.stack([sums[:k], sums[k:], counts[:k], counts[k:]], dim=1).double()
                out[idx[:real]] = rows[:real]
                bar.update(len(idx))
        bar.close()
        engine.train()
        d.sum_(out)
        return out.cpu()

    def _logps(self, engine, batch: dict, d: Dist, adapters: bool):
        batch = {k: v.to(d.device) for k, v in batch.items() if k != "index"}
        labels = batch.pop("labels")
        if self.sequence_parallel and engine.module.training:
            # Each rank scores its slice of the right-padded rows (causal attention never reads the
            # padding, so no mask); the sums are the group's (training/sequence_parallel.py).
            import torch.nn.functional as F

            shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
            if adapters:
                return self.sequence_parallel.sequence_logps(engine, batch["input_ids"], shift, IGNORE_INDEX)
            with engine.module.disable_adapter():
                return self.sequence_parallel.sequence_logps(engine.module, batch["input_ids"], shift, IGNORE_INDEX)
        if adapters:
            logits = engine(**batch).logits
        else:
            with engine.module.disable_adapter():
                logits = engine.module(**batch).logits
        return sequence_logps(logits, labels)

    def _reference_logps(self, engine, batch: dict, d: Dist):
        import torch

        if self.reference is not None:
            ref = self.reference[batch["index"]].to(d.device)
            sums = torch.cat([ref[:, 0], ref[:, 1]])
            counts = torch.cat([ref[:, 2], ref[:, 3]])
            return sums, counts
        with torch.no_grad():
            sums, counts = self._logps(engine, batch, d, adapters=False)
        return sums.double(), counts.double()

    # -- the loss ---------------------------------------------------------------------------------

    def _pair_loss(self, engine, batch: dict, d: Dist):
        # One copy to the device for both forwards (the reference's and the policy's); the row index
        # stays on the host, where the stored reference scores are.
        batch = {k: v if k == "index" else v.to(d.device, non_blocking=True) for k, v in batch.items()}
        ref_sums, ref_counts = self._reference_logps(engine, batch, d)
        sums, counts = self._logps(engine, batch, d, adapters=True)
        sums, counts = sums.double(), counts.double()
        if self.dpo.loss_type == "ipo":  # IPO compares per-token averages: long answers do not dominate
            sums, ref_sums = sums / counts.clamp(min=1), ref_sums / ref_counts.clamp(min=1)
        pc, pr = sums.chunk(2)
        rc, rr = ref_sums.chunk(2)
        return dpo_loss(pc, pr, rc, rr, beta=self.dpo.beta, loss_type=self.dpo.loss_type,
                        label_smoothing=self.dpo.label_smoothing)

    def loss(self, engine, batch, d):
        loss, m = self._pair_loss(engine, batch, d)
        tokens = int(batch["attention_mask"].sum())
        if self.sequence_parallel:  # the group's ranks read the same pairs
            loss, tokens = self.sequence_parallel.group_loss(loss), tokens // self.sequence_parallel.size
        return loss.float(), tokens, {k: m[k].mean() for k in METRICS}

    def evaluate(self, engine, d):
        """Loss and metrics over the held-out pairs, every process taking an equal share."""
        import torch

        keys = ("loss",) + METRICS

        def score(engine, rows):
            batch = self.train_stream.collate([self.data[j] for j in rows])
            _, m = self._pair_loss(engine, batch, d)
            return torch.cat([torch.stack([m[k].sum() for k in keys]).double(),
                              torch.tensor([len(rows)], dtype=torch.float64, device=d.device)])

        total = sharded_sums(engine, d, self.val_rows, self.split.micro_batch_size, score, width=len(keys) + 1)
        means = (total[:-1] / total[-1].clamp(min=1)).tolist()
        values = dict(zip(keys, means))
        return values.pop("loss"), {f"val_{k}": v for k, v in values.items()}

    # -- what the run reports and leaves ----------------------------------------------------------

    def checkpoint_files(self) -> dict:
        files = super().checkpoint_files()
        stored = Path(self.config.out) / layout.DPO_REFERENCE
        if self.reference is not None and stored.is_file():
            files[layout.DPO_REFERENCE] = stored
        return files

    def describe(self, d, n_params) -> str:
        c, split, data = self.config, self.split, self.data
        malformed = sum(data.stats["records"]["malformed"].values())
        weights = "LoRA adapters" if c.finetune.uses_lora else "full weights"
        dpo = c.finetune.dpo
        return (f"malformed records: {malformed}\n{data.summary()}\n"
                f"preference tuning ({dpo.loss_type}, beta {dpo.beta}, {weights}) for {self.total_steps} steps on "
                f"{d.world} process(es), batch {split.global_batch_size} pairs; reference log-probs: "
                f"{self.reference_source or 'computed once by the starting model'}"
                + (f", {self.trainable:,} trainable parameters" if self.trainable is not None else ""))

    def finish(self, engine, d, summary: dict) -> None:
        c = self.config.finetune
        summary["dpo"] = {"beta": c.dpo.beta, "loss_type": c.dpo.loss_type, "label_smoothing": c.dpo.label_smoothing,
                          "weights": "lora" if c.uses_lora else "full", "reference": self.reference_source,
                          "pairs": len(self.data), "train_pairs": len(self.train_stream.rows),
                          "val_pairs": len(self.val_rows)}
        super().finish(engine, d, summary)
