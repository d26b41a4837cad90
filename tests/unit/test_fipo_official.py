"""The FIPO loss and its gradient against the official code's arithmetic, case by case.

``official_loss`` restates, operation for operation, what ``compute_policy_loss_future_kl`` in
Henrymachiyu/FIPO (``verl/trainer/ppo/core_algos.py``, commit be1f2c9) computes with
``loss_agg_mode="token-mean"``: the O(L^2) decay matrix for Future-KL, the exclusion of tokens whose
ratio exceeds ``clip_ratio_c``, the influence clip (including ``future_kl_clip_ratio == 0``), the
safety cap, the dual clip, the sequence filter and verl's ``masked_mean`` (sum / (count + 1e-8))
over the surviving tokens. Ours is an O(L) scan and a different order of operations, so the two
agree to float32 rounding, not bit for bit.
"""

import math

import pytest
import torch

from megatron_fipo.algo import FIPOConfig, fipo_policy_loss


def official_loss(old, logp, adv, mask, cfg: FIPOConfig):
    d = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(d)
    length = d.shape[1]
    gamma = 2 ** (-1.0 / cfg.decay_rate)
    keep = ~(d > torch.log(torch.tensor(cfg.dual_clip_c)))
    x = d * mask * keep.float()
    distance = torch.arange(length).unsqueeze(0) - torch.arange(length).unsqueeze(1)  # [i, j] = j - i
    decay = torch.pow(torch.tensor(gamma), distance.clamp(min=0)) * (distance >= 0).float()
    fkl = x @ decay.t()
    if cfg.influence_clip == 0:
        weights = torch.clamp(torch.exp(fkl), max=10.0)
    else:
        low = 1.0 if cfg.influence_clip_high_only else 1.0 - cfg.influence_clip
        weights = torch.clamp(torch.exp(fkl), min=low, max=1.0 + cfg.influence_clip)
    capped = (adv < 0) & (ratio > cfg.safety_threshold)
    weights = torch.where(capped, torch.clamp(weights, min=0.8, max=1.0), weights).detach()
    wa = adv * weights
    loss1 = -wa * ratio
    loss2 = -wa * torch.clamp(ratio, 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
    ppo = torch.maximum(loss1, loss2)
    loss3 = -wa * cfg.dual_clip_c
    dual = torch.min(loss3, ppo)
    held = (adv < 0) & (ppo > loss3) & mask.bool()
    final = (mask.bool() & ~(held.sum(dim=1) > 1).unsqueeze(1)).float()
    per_token = torch.where(wa < 0, dual, ppo)
    count = final.sum() + 1e-8
    return (per_token * final).sum() / count, int(final.sum()), ((per_token * final).abs().sum() / count).item()


def _case(seed: int, batch: int = 6, length: int = 48):
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(batch, length, generator=g)
    # Wide log-ratios: ratios above the safety threshold and the dual-clip c, and far below 1.
    logp = old + 1.6 * torch.randn(batch, length, generator=g)
    adv = torch.randn(batch, 1, generator=g).expand(batch, length).contiguous()
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return old, logp, adv, mask


CONFIGS = [
    FIPOConfig(decay_rate=decay, influence_clip=clip, influence_clip_high_only=high_only, safety_threshold=4.0)
    for decay in (4.0, 32.0, 128.0)
    for clip, high_only in ((0.2, True), (0.2, False), (0.0, True))
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"decay{c.decay_rate:g}-clip{c.influence_clip:g}-"
                         f"{'high' if c.influence_clip_high_only else 'sym'}")
@pytest.mark.parametrize("seed", range(5))
def test_loss_and_gradient_equal_the_official_arithmetic(cfg, seed):
    old, logp, adv, mask = _case(seed)
    ref_logp = logp.clone().requires_grad_(True)
    ref, ref_kept, magnitude = official_loss(old, ref_logp, adv, mask, cfg)
    ref.backward()
    ours_logp = logp.clone().requires_grad_(True)
    ours, metrics = fipo_policy_loss(ours_logp, old, adv, mask, cfg)
    ours.backward()
    # Each case exercises what it is meant to: the filter drops sequences, the dual clip and the
    # safety cap hold tokens.
    assert metrics["seqs_filtered"] >= 1 and metrics["pg_clipfrac_lower"] > 0 and metrics["safety_capped_frac"] > 0
    assert metrics["num_tokens_kept"] == ref_kept < metrics["num_tokens"]
    # The loss is a mean of terms of both signs: its rounding follows the terms' size, not the mean's.
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6 * magnitude)
    scale = ref_logp.grad.abs().max().item()
    torch.testing.assert_close(ours_logp.grad, ref_logp.grad, rtol=1e-5, atol=1e-5 * scale)


def test_a_mean_over_all_tokens_would_differ():
    """The denominator matters: dividing by every response token is measurably not the official loss."""
    old, logp, adv, mask = _case(0)
    cfg = CONFIGS[0]
    ref, kept, _ = official_loss(old, logp, adv, mask, cfg)
    ours, metrics = fipo_policy_loss(logp, old, adv, mask, cfg)
    all_tokens_mean = ours.item() * kept / metrics["num_tokens"]
    assert abs(all_tokens_mean - ref.item()) > 1e-3 * abs(ref.item())
    assert not math.isclose(kept, metrics["num_tokens"])
