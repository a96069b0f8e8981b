"""Online RL with verifiable rewards (GRPO) as a recipe of the training core: `finetune.mode: grpo`.

    pangu-pi finetune --config configs/yunshan_grpo_tiny.yaml --set model.init_from=runs/dpo/model --out runs/grpo

Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath) samples G completions o_1..o_G
per prompt q from the current policy, scores each with program-checkable rewards r_i
(training/rewards.py) and moves the policy towards the completions that beat their group:

    advantage     A_i = (r_i − mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)      (scale_rewards: none drops the /std)
    ratio         ρ_i,t = π(o_i,t | q, o_i,<t) / π_old(o_i,t | q, o_i,<t)
    per token     ℓ_i,t = −min(ρ_i,t·A_i, clip(ρ_i,t, 1 − ε_low, 1 + ε_high)·A_i) + β·KL_i,t
    KL (k3)       KL_i,t = exp(ref_i,t − logp_i,t) − (ref_i,t − logp_i,t) − 1,  ref = log π_ref

and the loss aggregates ℓ over the completion tokens (mask m) as `finetune.grpo.loss_type` says,
with TRL's definitions:

    grpo     mean over completions of (Σ_t m·ℓ / Σ_t m)                        (per sequence, then averaged)
    dr_grpo  Σ m·ℓ / (completions × max_completion_length)                     (a constant: no length bias)
    dapo     Σ m·ℓ / (completion tokens of the whole optimizer step, every process)

π_old is the policy that sampled: with `num_iterations` 1 the ratio is exactly 1 (the sampled log-probs
are the current ones, detached), so only the clip's gradient shape matters; with more, each batch of
completions serves that many optimizer steps and the ratio departs from 1. Log-probabilities are of
logits / temperature, as the sampler drew them.

How a step runs (per process; `batch.*` counts prompts, each with G completions):
- At the first micro-step of an optimizer step that starts a generation, the stream hands over the
  prompts of all the step's micro-batches. Each prompt's G completions are sampled by the HF model's
  generate() with a seed derived from `seed` and the prompt's position in the run, so the same
  prompt position gives the same completions on resume and on any process count (the sampler's RNG
  is a function of the data position the checkpoint stores). With `generator: vllm` a vLLM engine in
  this process samples them all at once from the same seeds, after the policy's current weights are
  pushed to it (training/vllm_rollout.py). Rewards, advantages, the reference's
  log-probs (β > 0) and the sampling policy's (num_iterations > 1) are computed then, once.
- Each micro-step then takes its batch of rollouts: a forward of prompt + completion, the loss.
- Rollouts that later optimizer steps reuse (num_iterations > 1) are saved with the checkpoint of
  each process, so a resume in the middle of an iteration cycle continues with the same rollouts.

The reference (β > 0): LoRA (`finetune.grpo.lora`) is the same model with its adapters disabled; full
weights are a frozen copy of the starting model held beside the policy (its weights once more, no
gradients and no optimizer state: 4 bytes a parameter in fp32, 2 in bf16; reported at start and in
the summary). β = 0, the default as in TRL, holds no reference at all.

Logged per step (metrics.jsonl, TensorBoard, W&B, the plot): `reward` (mean weighted total),
`reward_std`, `reward_NAME` and `reward_NAME_std` per reward function, `completion_length`,
`truncated_fraction` (cut off at max_completion_length), `zero_std_fraction` (groups whose rewards are
all equal: no signal), `clip_fraction` (tokens whose ratio the clip holds), `kl` (β > 0),
`reward_error_fraction`. With `eval.every`: `val_reward` (the mean reward of G completions of each
held-out prompt, sampled as in training from seeds fixed for the run), `val_reward_NAME`,
`val_completion_length`; `val_loss` is −val_reward.

Refused before compute: G < 2 and every other bad `finetune.grpo.*` value (training/config.py), a
reward that is not importable, a prompt file with no usable prompts; malformed records are counted
per reason (training/prompt_data.py). ZeRO-3 is refused: generate() would gather every weight per token.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

from pangu_pi.errors import UserError

from ..config import RunConfig
from ..distributed import Dist
from .. import rewards as reward_lib
from .sft import Finetuning, base_tokenizer, row_order

ADVANTAGE_EPS = 1e-4  # TRL's: keeps a near-constant group from blowing its advantages up
EVAL_SEED_OFFSET = 2**40  # held-out row r samples from sample_seed(seed, 2**40 + r): no training position's seed


# ------------------------------------------------------------------------------------------------
# The math


def nanstd(x, dim: int):
    """Standard deviation ignoring NaNs, with Bessel's correction; NaN where fewer than 2 values (TRL's)."""
    import torch

    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim)
    var = torch.where(count > 1, var * count / (count - 1).clamp(min=1), torch.full_like(var, float("nan")))
    return var.sqrt()


def group_advantages(rewards, group_size: int, scale: bool = True):
    """(advantage per completion, std per group) from the weighted reward per completion (groups of
    `group_size` in a row). NaN rewards (a failed reward, none applying) are left out of their group's
    mean and std and get advantage 0."""
    import torch

    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = nanstd(grouped, dim=1)
    adv = grouped - mean
    if scale:
        adv = adv / (std.unsqueeze(1) + ADVANTAGE_EPS)
    return torch.nan_to_num(adv, nan=0.0).view(-1), std


def completion_logps(logits, input_ids, prompt_lens, width: int, temperature: float = 1.0):
    """(B, width) log-probabilities of each row's completion tokens (completion token j of row b sits
    at position prompt_lens[b] + j of input_ids) under softmax(logits / temperature); rows past their
    completion read padding, which the mask removes."""
    import torch

    B, T, V = logits.shape
    j = torch.arange(width, device=logits.device)
    pos = (prompt_lens.to(logits.device).unsqueeze(1) + j).clamp(max=T - 1)  # (B, C) where each token sits
    targets = input_ids.gather(1, pos)
    picked = logits.gather(1, (pos - 1).unsqueeze(-1).expand(B, width, V)).float() / temperature
    return picked.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - picked.logsumexp(-1)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, loss_type: str, beta: float, epsilon_low: float,
              epsilon_high: float, max_completion_length: int, normalizer=None):
    """(loss, {"kl", "clip_fraction"}) from (B, C) per-token log-probs of the policy, the sampling
    policy (None: the policy's own, detached) and the reference (None when beta is 0), (B,)
    advantages and the (B, C) completion mask. `normalizer` (dapo): the step's completion tokens over
    every process / (processes × accumulation steps), what TRL divides by."""
    import torch

    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics = {}
    tokens = mask.sum().clamp(min=1.0)
    if beta != 0.0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        metrics["kl"] = (kl.detach() * mask).sum() / tokens
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (tokens if normalizer is None else normalizer)
    else:
        raise ValueError(f"unknown GRPO loss {loss_type!r}")
    r = ratio.detach()
    held = ((r < 1 - epsilon_low) & (adv < 0)) | ((r > 1 + epsilon_high) & (adv > 0))
    metrics["clip_fraction"] = (held.to(mask.dtype) * mask).sum() / tokens
    return loss, metrics


# ------------------------------------------------------------------------------------------------
# Data: prompts in run order, and this process's rollouts of the current generation


def load_prompts(config: RunConfig):
    """(tokenizer, PromptDataset) for the run; user-fixable problems become UserError."""
    from ..prompt_data import PromptDataset

    tokenizer = base_tokenizer(config)
    max_prompt = config.data.seq_len - config.finetune.grpo.max_completion_length
    try:
        data = PromptDataset(config.data.datasets, tokenizer, max_prompt, total=config.finetune.examples,
                             seed=config.seed)
    except ValueError as err:
        raise UserError(str(err)) from None
    return tokenizer, data


@dataclass
class Rollout:
    """One micro-batch of completions: rows are prompt + completion, right-padded."""

    input_ids: object  # (B, T)
    attention_mask: object  # (B, T)
    prompt_lens: object  # (B,)
    mask: object  # (B, C) completion tokens (up to and including the end-of-turn token)
    advantages: object  # (B,)
    old_logps: object = None  # (B, C) the sampling policy's, num_iterations > 1
    ref_logps: object = None  # (B, C) beta > 0
    normalizer: object = None  # dapo: the generation's completion tokens / (processes × accumulation)
    metrics: dict = field(default_factory=dict)  # name -> 0-d tensor
    n_tokens: int = 0  # attention_mask's sum, counted on the host when built: the loss reads no device value

    def to(self, device) -> Rollout:
        def move(x):
            return x.to(device) if hasattr(x, "to") else x

        return Rollout(*(move(getattr(self, k)) for k in ("input_ids", "attention_mask", "prompt_lens", "mask",
                                                           "advantages", "old_logps", "ref_logps",
                                                           "normalizer")),
                       metrics={k: move(v) for k, v in self.metrics.items()}, n_tokens=self.n_tokens)


class PromptStream:
    """The prompts in run order (a seeded permutation per epoch, as SFT's rows) and the rollouts of
    the generation in progress. A step that starts a generation (every `iterations`-th) takes the
    prompts of all its micro-batches at once; `samples_consumed` counts prompts of all processes."""

    def __init__(self, data, rows: list[int], seed: int, accum: int, iterations: int, world: int):
        self.data, self.rows, self.seed = data, rows, seed
        self.accum, self.iterations, self.world = accum, iterations, world
        self.samples_consumed = 0
        self.calls = 0  # micro-steps taken by this process
        self.buffer: list[Rollout] = []

    def next_batch(self, n: int, rank: int = 0, world_size: int = 1) -> dict:
        k, step = self.calls % self.accum, self.calls // self.accum
        self.calls += 1
        if k or step % self.iterations:
            return {"micro": k}
        plan = []
        for j in range(self.accum):
            first = self.samples_consumed + (j * world_size + rank) * n
            plan.append([(first + i, self.rows[row_order(len(self.rows), first + i, self.seed)]) for i in range(n)])
        self.samples_consumed += n * world_size * self.accum
        return {"micro": 0, "prompts": plan}

    def state_dict(self) -> dict:
        mid_cycle = (self.calls // self.accum) % self.iterations != 0
        return {"samples_consumed": int(self.samples_consumed), "steps": self.calls // self.accum,
                "rows": len(self.rows), "seed": self.seed, "world": self.world,
                "buffer": [r.to("cpu") for r in self.buffer] if mid_cycle else []}

    def load_state_dict(self, state: dict) -> None:
        if state.get("buffer") and state.get("world") != self.world:
            raise UserError(
                f"this checkpoint was written mid-way through finetune.grpo.num_iterations ({self.iterations}) by "
                f"{state.get('world')} processes, whose completions are saved per process; resume on "
                f"{state.get('world')} processes, or from a checkpoint at a step that is a multiple of "
                f"{self.iterations}")
        self.samples_consumed = int(state["samples_consumed"])
        self.calls = int(state["steps"]) * self.accum
        self.buffer = list(state.get("buffer") or [])


def sample_seed(seed: int, position: int) -> int:
    """The sampler's seed for the prompt at `position` of the run: a function of the data position only."""
    import numpy as np

    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------
# The recipe


class GroupRelativeTuning(Finetuning):
    """Finetuning's model, checkpoints and outputs; prompts for data, sampled completions, GRPO's loss."""

    name = "grpo"
    unit = "prompts"
    load = staticmethod(load_prompts)

    def plan(self, world_size: int, progress: bool) -> dict:
        grpo = self.config.finetune.grpo
        if grpo.generator == "vllm":
            from ..vllm_rollout import require_vllm

            require_vllm()
        reward_lib.resolve_rewards(grpo.rewards)  # a reward that does not import is refused before the data loads
        return super().plan(world_size, progress)

    def setup(self, plan: dict, d: Dist) -> None:
        super().setup(plan, d)
        self.grpo = self.config.finetune.grpo
        self.rewards = reward_lib.resolve_rewards(self.grpo.rewards)
        self.total_steps *= self.grpo.num_iterations if self.config.train.max_steps is None else 1
        from pangu_pi.tokenizer import stop_token_ids

        self.stop_ids = stop_token_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.ref_model = None
        self.reference_source = None
        self.reference_bytes = 0
        self.reward_errors = 0
        self.seconds = {"generation": 0.0, "rewards": 0.0, "reference": 0.0}
        self.world, self.rank = d.world, d.rank
        self.vllm = None  # the colocated engine (generator vllm), started in prepare()

    def make_stream(self, rows: list[int]) -> PromptStream:
        split = self.split
        return PromptStream(self.data, rows, self.config.seed, split.grad_accum,
                            self.config.finetune.grpo.num_iterations, split.world_size)

    # -- the reference ---------------------------------------------------------------------------

    def prepare(self, engine, d: Dist, resume_from) -> None:
        if self.grpo.generator == "vllm":
            from ..vllm_rollout import VllmRollout

            t0 = time.perf_counter()
            # Room for every completion of a generation at once: G per prompt of all the step's micro-batches.
            self.vllm = VllmRollout(self.model_config, seq_len=self.config.data.seq_len,
                                    max_seqs=self.grpo.num_generations * self.split.micro_batch_size
                                    * self.split.grad_accum, precision=self.config.train.precision,
                                    seed=self.config.seed)
            self.seconds["vllm_start"] = time.perf_counter() - t0
            self.seconds["weights_push"] = 0.0
        self._prepare_reference(engine, d)

    def _prepare_reference(self, engine, d: Dist) -> None:
        if self.grpo.beta == 0:
            self.reference_source = "none (beta 0)"
            return
        if self.config.finetune.uses_lora:
            self.reference_source = "the model with its adapters disabled"
            return
        import torch

        from ..engine import build_model

        # The starting model, whatever step the policy resumes at: the KL is to where training began.
        ref = build_model(copy.deepcopy(self.model_config), {"zero_optimization": {"stage": 0}},
                          init_from=self.config.model["init_from"])
        dtype = torch.bfloat16 if self.config.train.precision == "bf16" else torch.float32
        ref = ref.to(device=d.device, dtype=dtype).eval()
        ref.requires_grad_(False)
        self.ref_model = ref
        self.reference_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
        self.reference_source = (f"a frozen copy of the starting model ({self.reference_bytes / 2**20:.1f} MiB of "
                                 "weights, no gradients or optimizer state)")

    # -- sampling and scoring --------------------------------------------------------------------

    def _generate(self, model, prompt_ids: list[int], n: int, seed: int | None, device):
        """n completions of one prompt: (ids (n, L) without the prompt, mask (n, L), stopped (n,)).
        seed None: greedy."""
        import torch
        from transformers import GenerationConfig

        g = self.grpo
        sampled = seed is not None
        gen = GenerationConfig(do_sample=sampled, temperature=g.temperature if sampled else None,
                               top_p=g.top_p if sampled else None, top_k=0 if sampled else None,
                               max_new_tokens=g.max_completion_length, eos_token_id=self.stop_ids,
                               pad_token_id=self.pad_id, use_cache=True)
        ids = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
        devices = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            if sampled:
                torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        completion = out[:, len(prompt_ids):]
        is_stop = torch.isin(completion, torch.tensor(self.stop_ids, device=completion.device))
        stopped = is_stop.any(dim=1)
        # Up to and including the first end-of-turn token: the model must learn to stop, too.
        first = torch.where(stopped, is_stop.int().argmax(dim=1), torch.full_like(stopped, completion.shape[1] - 1,
                                                                                      dtype=torch.long))
        mask = torch.arange(completion.shape[1], device=completion.device).unsqueeze(0) <= first.unsqueeze(1)
        return completion, mask, stopped

    def _generate_vllm(self, model, plan: list[list[tuple[int, int]]]):
        """_generate's (prompt, row, ids, mask, stopped) for every prompt of the plan, sampled at once by
        the colocated engine after the policy's current weights are pushed to it."""
        import torch

        g = self.grpo
        t0 = time.perf_counter()
        self.vllm.push(model)
        self.seconds["weights_push"] += time.perf_counter() - t0
        flat = [(position, row) for micro in plan for position, row in micro]
        outs = self.vllm.generate([(self.data[row].prompt_ids, sample_seed(self.config.seed, position))
                                   for position, row in flat], g.num_generations, temperature=g.temperature,
                                  top_p=g.top_p, max_tokens=g.max_completion_length, stop_ids=self.stop_ids)
        raw, k = [], 0
        for micro in plan:
            rows = []
            for _, row in micro:
                samples = outs[k]
                k += 1
                width = max(len(ids) for ids, _ in samples)
                ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(samples), width), dtype=torch.bool)
                for i, (tokens, _) in enumerate(samples):  # vLLM ends a completion at its first stop id
                    ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                    mask[i, :len(tokens)] = True
                stopped = torch.tensor([s for _, s in samples])
                rows.append((self.data[row], row, ids, mask, stopped))
            raw.append(rows)
        return raw

    def _score(self, prompts, completion_ids: list[list[int]], stopped: list[bool], index: list[int]):
        """(per function (n_fn, n), totals (n,)) as float64 tensors on the CPU; failures reported and counted."""
        import torch

        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
        # A record field named like one of the call's own arguments cannot reach the rewards.
        keys = sorted({k for p in prompts for k in p.fields} - {"prompts", "completions", "completion_ids", "stopped"})
        fields = {k: [p.fields.get(k) for p in prompts] for k in keys}
        fields["stopped"] = list(stopped)
        per_fn, totals, errors = reward_lib.score(
            self.rewards, [p.messages for p in prompts], [[{"role": "assistant", "content": t}] for t in texts],
            completion_ids, fields, index)
        if errors:
            self.reward_errors += len(errors)
            reward_lib.report_errors(errors, self.rank)
        return (torch.tensor(per_fn, dtype=torch.float64), torch.tensor(totals, dtype=torch.float64),
                len({e.completion for e in errors}))

    def _rollouts(self, engine, plan: list[list[tuple[int, int]]], d: Dist) -> list[Rollout]:
        """Sample, score and prepare every micro-batch of this process's share of a generation."""
        import torch

        G, device = self.grpo.num_generations, d.device
        model = engine.module
        engine.eval()
        t0 = time.perf_counter()
        if self.vllm is not None:
            raw = self._generate_vllm(model, plan)
        else:
            raw = []
            for micro in plan:
                rows = []
                for position, row in micro:
                    p = self.data[row]
                    ids, mask, stopped = self._generate(model, p.prompt_ids, G,
                                                        sample_seed(self.config.seed, position), device)
                    rows.append((p, row, ids, mask, stopped))
                raw.append(rows)
        t1 = time.perf_counter()
        self.seconds["generation"] += t1 - t0
        out = []
        for rows in raw:
            prompts, index, comp, stops = [], [], [], []
            for p, row, ids, mask, stopped in rows:
                for k in range(G):
                    n = int(mask[k].sum())
                    prompts.append(p)
                    index.append(row)
                    comp.append(ids[k, :n].tolist())
                    stops.append(bool(stopped[k]))
            per_fn, totals, n_failed = self._score(prompts, comp, stops, index)
            out.append(self._batch(prompts, comp, stops, per_fn, totals, n_failed, device))
        self.seconds["rewards"] += time.perf_counter() - t1
        if self.grpo.loss_type == "dapo":
            tokens = torch.tensor([float(sum(r.mask.sum() for r in out))], dtype=torch.float64, device=device)
            d.sum_(tokens)
            normalizer = (tokens / (d.world * self.split.grad_accum)).clamp(min=1.0).float()[0]
            for r in out:
                r.normalizer = normalizer
        t2 = time.perf_counter()
        with torch.no_grad():
            for r in out:
                if self.grpo.num_iterations > 1:
                    r.old_logps = self._logps(model, r).detach()
                if self.grpo.beta != 0:
                    r.ref_logps = self._reference_logps(engine, r).detach()
        self.seconds["reference"] += time.perf_counter() - t2
        engine.train()
        return out

    def _batch(self, prompts, comp, stops, per_fn, totals, n_failed, device) -> Rollout:
        import torch

        G = self.grpo.num_generations
        width = max(1, max(len(c) for c in comp))
        lens = [len(p.prompt_ids) for p in prompts]
        T = max(lens) + width
        input_ids = torch.full((len(comp), T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(comp), T), dtype=torch.long)
        mask = torch.zeros((len(comp), width), dtype=torch.float32)
        for b, (p, c) in enumerate(zip(prompts, comp)):
            row = p.prompt_ids + c
            input_ids[b, :len(row)] = torch.tensor(row)
            attn[b, :len(row)] = 1
            mask[b, :len(c)] = 1
        adv, std = group_advantages(totals, G, scale=self.grpo.scale_rewards == "group")
        finite = totals[~torch.isnan(totals)]
        metrics = {
            "reward": finite.mean() if len(finite) else torch.tensor(float("nan")),
            "reward_std": nanstd(totals, dim=0),
        }
        for fn, col in zip(self.rewards, per_fn):
            metrics[f"reward_{fn.name}"] = torch.nanmean(col)
            metrics[f"reward_{fn.name}_std"] = nanstd(col, dim=0)
        metrics["completion_length"] = mask.sum(1).mean().double()
        metrics["truncated_fraction"] = 1.0 - torch.tensor(stops, dtype=torch.float64).mean()
        metrics["zero_std_fraction"] = torch.isclose(std, torch.zeros_like(std)).double().mean()
        metrics["reward_error_fraction"] = torch.tensor(n_failed / len(comp), dtype=torch.float64)
        r = Rollout(input_ids, attn, torch.tensor(lens), mask, adv.float(),
                    metrics={k: torch.as_tensor(v, dtype=torch.float64) for k, v in metrics.items()},
                    n_tokens=sum(lens) + sum(len(c) for c in comp))
        return r.to(device)

    def _logps(self, model, r: Rollout):
        logits = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits
        return completion_logps(logits, r.input_ids, r.prompt_lens, r.mask.shape[1], self.grpo.temperature)

    def _reference_logps(self, engine, r: Rollout):
        if self.ref_model is not None:
            return self._logps(self.ref_model, r).float()
        with engine.module.disable_adapter():
            return self._logps(engine.module, r).float()

    # -- the loss ---------------------------------------------------------------------------------

    def loss(self, engine, batch, d):
        if "prompts" in batch:
            self.train_stream.buffer = self._rollouts(engine, batch["prompts"], d)
        r = self.train_stream.buffer[batch["micro"]].to(d.device)
        g = self.grpo
        logps = completion_logps(engine(input_ids=r.input_ids, attention_mask=r.attention_mask).logits,
                                 r.input_ids, r.prompt_lens, r.mask.shape[1], g.temperature)
        loss, m = grpo_loss(logps, r.old_logps, r.ref_logps, r.advantages, r.mask, loss_type=g.loss_type,
                            beta=g.beta, epsilon_low=g.epsilon, epsilon_high=g.epsilon_high or g.epsilon,
                            max_completion_length=g.max_completion_length,
                            normalizer=r.normalizer)
        metrics = dict(r.metrics)
        metrics.update(m)
        return loss, r.n_tokens, metrics

    # -- evaluation: completions of the held-out prompts -----------------------------------------

    def evaluate(self, engine, d):
        import torch

        from ..evaluation import sharded_sums

        names = [fn.name for fn in self.rewards]
        rows = self.val_rows[: max(self.config.eval.samples, d.world)]

        G = self.grpo.num_generations

        def score(engine, items):
            total = torch.zeros(4 + 2 * len(names), dtype=torch.float64)
            for row in items:
                # G completions, sampled as in training but from seeds of the held-out row alone, so
                # every evaluation of the run draws the same random numbers: the curve moves with the policy.
                p = self.data[row]
                ids, mask, stopped = self._generate(engine.module, p.prompt_ids, G,
                                                    sample_seed(self.config.seed, EVAL_SEED_OFFSET + row), d.device)
                lens = mask.sum(1).tolist()
                per_fn, totals, _ = self._score([p] * G, [ids[k, :n].tolist() for k, n in enumerate(lens)],
                                                stopped.tolist(), [row] * G)
                for k in range(G):
                    if not math.isnan(totals[k]):
                        total[0] += totals[k]
                        total[1] += 1
                    for f, col in enumerate(per_fn):
                        if not math.isnan(col[k]):
                            total[4 + 2 * f] += col[k]
                            total[5 + 2 * f] += 1
                total[2] += sum(lens)
                total[3] += G
            return total

        t = sharded_sums(engine, d, rows, self.split.micro_batch_size, score, width=4 + 2 * len(names)).tolist()
        reward = t[0] / t[1] if t[1] else float("nan")
        metrics = {"val_reward": reward, "val_completion_length": t[2] / max(t[3], 1)}
        for k, name in enumerate(names):
            metrics[f"val_reward_{name}"] = t[4 + 2 * k] / t[5 + 2 * k] if t[5 + 2 * k] else float("nan")
        return -reward, metrics

    # -- what the run reports and leaves ----------------------------------------------------------

    def describe(self, d, n_params) -> str:
        c, split, data, g = self.config, self.split, self.data, self.grpo
        malformed = sum(data.stats["records"]["malformed"].values())
        weights = "LoRA adapters" if c.finetune.uses_lora else "full weights"
        return (f"malformed records: {malformed}\n{data.summary()}\n"
                f"GRPO ({g.loss_type}, G {g.num_generations}, beta {g.beta}, epsilon {g.epsilon}"
                + (f"/{g.epsilon_high}" if g.epsilon_high else "")
                + f", {g.num_iterations} iteration(s), {weights}) for {self.total_steps} steps on {d.world} "
                f"process(es), batch {split.global_batch_size} prompts × {g.num_generations} completions of at most "
                f"{g.max_completion_length} tokens; rewards: {reward_lib.describe(self.rewards)}; reference: "
                f"{self.reference_source}"
                + (f", {self.trainable:,} trainable parameters" if self.trainable is not None else ""))

    def finish(self, engine, d, summary: dict) -> None:
        from pathlib import Path

        import torch

        from pangu_pi import run_layout as layout

        from ..metrics import read_metrics

        errors = torch.tensor([float(self.reward_errors)], dtype=torch.float64, device=d.device)
        d.sum_(errors)
        g = self.config.finetune.grpo
        summary["grpo"] = {
            "loss_type": g.loss_type, "num_generations": g.num_generations, "beta": g.beta,
            "epsilon": g.epsilon, "epsilon_high": g.epsilon_high, "num_iterations": g.num_iterations,
            "scale_rewards": g.scale_rewards, "temperature": g.temperature, "top_p": g.top_p,
            "max_completion_length": g.max_completion_length, "generator": g.generator,
            "rewards": [{"name": r.name, "weight": r.weight, **r.options} for r in self.rewards],
            "weights": "lora" if self.config.finetune.uses_lora else "full",
            "reference": self.reference_source, "reference_bytes": self.reference_bytes,
            "prompts": len(self.data), "train_prompts": len(self.train_stream.rows), "val_prompts": len(self.val_rows),
            # Failures of this process's run (a resumed process counts from its resume).
            "reward_errors": int(errors.item()),
            "seconds_rank0": {k: round(v, 3) for k, v in self.seconds.items()},
        }
        if self.vllm is not None:
            summary["grpo"]["vllm_pushes"] = self.vllm.pushes
            self.vllm.close()  # every process at once: the engines' groups are collective
            self.vllm = None
        if d.rank == 0:
            rows = [r for r in read_metrics(Path(self.config.out) / layout.METRICS) if "reward" in r]
            if rows:
                summary["grpo"].update(first_reward=rows[0]["reward"], final_reward=rows[-1]["reward"])
        super().finish(engine, d, summary)

