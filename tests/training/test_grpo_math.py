"""GRPO's math (training/recipes/grpo.py) on fixed batches: group-normalised advantages, the clipped
policy-gradient loss of each `loss_type`, the k3 KL to the reference and the clip fraction, against
an independent float64 computation written here term by term, and against TRL's GRPOTrainer loss
code called on the same per-token log-probabilities, advantages and masks (with a stand-in for the
parts of a trainer it reads: one process, no accumulation). What the TRL check does not cover is
the log-probabilities themselves (TRL computes them from a model it wraps); `completion_logps` is
checked against float64 log-softmax below."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

LOSSES = ["grpo", "dr_grpo", "dapo"]


def _batch(seed: int, B: int = 8, C: int = 7, iterations: int = 2):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, C, generator=g, dtype=torch.float64) * 3
    old = logps + 0.3 * torch.randn(B, C, generator=g, dtype=torch.float64) if iterations > 1 else None
    ref = logps + 0.5 * torch.randn(B, C, generator=g, dtype=torch.float64)
    mask = torch.ones(B, C, dtype=torch.float64)
    for b, n in enumerate([7, 3, 5, 1, 7, 6, 2, 4][:B]):
        mask[b, n:] = 0
    return logps, old, ref, mask


def _float64_advantages(rewards: list[float], G: int, scale: bool) -> tuple[list[float], list[float]]:
    adv, stds = [], []
    for start in range(0, len(rewards), G):
        group = rewards[start:start + G]
        valid = [r for r in group if not math.isnan(r)]
        mean = sum(valid) / len(valid) if valid else float("nan")
        std = math.sqrt(sum((r - mean) ** 2 for r in valid) / (len(valid) - 1)) if len(valid) > 1 else float("nan")
        stds.append(std)
        for r in group:
            a = (r - mean) / (std + 1e-4) if scale else r - mean
            adv.append(0.0 if math.isnan(a) else a)
    return adv, stds


def _float64_loss(logps, old, ref, adv, mask, loss_type, beta, eps_lo, eps_hi, max_len, normalizer=None):
    B, C = len(logps), len(logps[0])
    per_seq, total, tokens, kl_sum, clipped = [], 0.0, 0.0, 0.0, 0.0
    for b in range(B):
        s, n = 0.0, 0.0
        for t in range(C):
            if not mask[b][t]:
                continue
            lp = logps[b][t]
            o = lp if old is None else old[b][t]
            ratio = math.exp(lp - o)
            clip = min(max(ratio, 1 - eps_lo), 1 + eps_hi)
            term = -min(ratio * adv[b], clip * adv[b])
            if beta:
                d = ref[b][t] - lp
                kl = math.exp(d) - d - 1
                term += beta * kl
                kl_sum += kl
            if (ratio < 1 - eps_lo and adv[b] < 0) or (ratio > 1 + eps_hi and adv[b] > 0):
                clipped += 1
            s += term
            n += 1
        per_seq.append(s / max(n, 1))
        total += s
        tokens += n
    if loss_type == "grpo":
        loss = sum(per_seq) / B
    elif loss_type == "dr_grpo":
        loss = total / (B * max_len)
    else:
        loss = total / (tokens if normalizer is None else normalizer)
    return loss, kl_sum / tokens, clipped / tokens


def test_group_advantages_match_float64_and_leave_failed_rewards_out():
    from pangu_pi.training.recipes.grpo import group_advantages

    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, float("nan"), -1.0, 0.25, float("nan"), 3.0, float("nan"),
               float("nan")]
    for scale in (True, False):
        adv, std = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, scale=scale)
        want_adv, want_std = _float64_advantages(rewards, 4, scale)
        assert adv.tolist() == pytest.approx(want_adv, rel=1e-12, abs=1e-12)
        assert [s for s in std.tolist() if not math.isnan(s)] == pytest.approx([s for s in want_std
                                                                                 if not math.isnan(s)])
    # A constant group has no signal; a NaN reward's advantage is 0 and the others are scored among themselves.
    assert adv[4:8].abs().max() == 0 and adv[9] == 0
    assert adv[8].item() == pytest.approx(2.0 - (2.0 - 1.0 + 0.25) / 3)
    # A group with one scored completion: no std, advantage 0 for all.
    assert torch.all(adv[12:] == 0)


@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize("beta,iterations", [(0.0, 1), (0.04, 1), (0.1, 2)])
def test_loss_kl_and_clip_fraction_match_an_independent_float64_computation(loss_type, beta, iterations):
    from pangu_pi.training.recipes.grpo import group_advantages, grpo_loss

    logps, old, ref, mask = _batch(3, iterations=iterations)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    adv, _ = group_advantages(rewards, 4)
    loss, m = grpo_loss(logps, old, ref if beta else None, adv, mask, loss_type=loss_type, beta=beta,
                        epsilon_low=0.2, epsilon_high=0.28, max_completion_length=10)
    want, kl, clip = _float64_loss(logps.tolist(), None if old is None else old.tolist(), ref.tolist(), adv.tolist(),
                                   mask.tolist(), loss_type, beta, 0.2, 0.28, 10)
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert m["clip_fraction"].item() == pytest.approx(clip, abs=1e-12)
    if beta:
        assert m["kl"].item() == pytest.approx(kl, rel=1e-12)
    if iterations > 1:
        assert 0 < clip < 1  # the fixed batch has tokens on both sides of the clip
    else:
        assert clip == 0  # the sampling policy is the policy: every ratio is 1


@pytest.mark.parametrize("loss_type", LOSSES)
def test_micro_batches_with_the_step_normaliser_add_up_to_the_whole_batch(loss_type):
    """DeepSpeed averages the micro-batches' gradients (÷ accumulation steps × processes); each loss
    type's micro-batch loss is scaled so the average is the loss of the whole step (dapo: ÷ the step's
    tokens)."""
    from pangu_pi.training.recipes.grpo import grpo_loss

    logps, old, ref, mask = _batch(5)
    adv = torch.linspace(-1, 1, 8, dtype=torch.float64)
    kw = dict(loss_type=loss_type, beta=0.05, epsilon_low=0.2, epsilon_high=0.2, max_completion_length=10)
    whole, _ = grpo_loss(logps, old, ref, adv, mask, **kw)
    normalizer = mask.sum() / 2 if loss_type == "dapo" else None
    halves = [grpo_loss(logps[s], old[s], ref[s], adv[s], mask[s], normalizer=normalizer, **kw)[0]
              for s in (slice(0, 4), slice(4, 8))]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(whole.item(), rel=1e-12)


def _trl_loss(logps, old, ref, adv, mask, loss_type, beta, eps_lo, eps_hi, max_len):
    """TRL's GRPOTrainer._compute_loss on given per-token log-probs, with a stand-in trainer (1 process)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, C = logps.shape
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps_lo, epsilon_high=eps_hi,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
        accelerator=SimpleNamespace(num_processes=1, reduce=lambda t, reduction="sum": t, gather=lambda t: t,
                                    sync_gradients=True),
        _metrics={"train": defaultdict(list)},
    )
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, C, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "num_items_in_batch": mask.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize("beta,iterations", [(0.0, 1), (0.04, 2)])
def test_loss_equals_trls_grpo_trainer_on_the_same_inputs(loss_type, beta, iterations):
    from pangu_pi.training.recipes.grpo import group_advantages, grpo_loss

    logps, old, ref, mask = _batch(7, iterations=iterations)
    rewards = torch.tensor([0.9, 0.1, 0.4, 0.4, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    adv, _ = group_advantages(rewards, 4)
    want, trl = _trl_loss(logps, old, ref, adv, mask, loss_type, beta, 0.2, 0.28, 9)
    loss, m = grpo_loss(logps, old, ref if beta else None, adv, mask, loss_type=loss_type, beta=beta,
                        epsilon_low=0.2, epsilon_high=0.28, max_completion_length=9)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert m["clip_fraction"].item() == pytest.approx(trl["clip_ratio/region_mean"], rel=1e-6)  # TRL counts in fp32
    if beta:
        assert m["kl"].item() == pytest.approx(trl["kl"], rel=1e-6)


def test_completion_logps_are_the_sampled_tokens_log_softmax_at_the_temperature():
    from pangu_pi.training.recipes.grpo import completion_logps

    g = torch.Generator().manual_seed(1)
    B, T, V, C = 3, 9, 11, 4
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    lens = torch.tensor([3, 5, 2])
    got = completion_logps(logits, ids, lens, C, temperature=0.7)
    for b in range(B):
        for j in range(C):
            pos = min(int(lens[b]) + j, T - 1)
            z = [float(x) / 0.7 for x in logits[b, pos - 1]]
            top = max(z)
            want = z[int(ids[b, pos])] - top - math.log(sum(math.exp(x - top) for x in z))
            assert got[b, j].item() == pytest.approx(want, rel=1e-6, abs=1e-6)
