"""FIPO and DAPO clipped policy losses, token-level, pure torch.

Semantics follow the official FIPO code (Henrymachiyu/FIPO, ``compute_policy_loss_future_kl`` in
``verl/trainer/ppo/core_algos.py``) unless a field of ``FIPOConfig`` says otherwise. On one
micro-batch the loss and its gradient equal the official function's; over several micro-batches
and data-parallel ranks the token mean is one exact mean over the mini-batch's surviving tokens
(the official code averages per-micro-batch means).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_fipo.algo.fipo_config import FIPOConfig
from megatron_fipo.algo.future_kl_scan import future_kl
from megatron_fipo.algo.position_diagnostics import position_metrics

# The official code caps influence weights of negative-advantage tokens with a huge ratio to this range.
SAFETY_WEIGHT_RANGE = (0.8, 1.0)


def _token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    return advantages.float().expand_as(mask)


class SequenceShards(Protocol):
    """How this rank's [B, L] response tensors relate to whole sequences.

    Locally every row is a whole response. Under context parallelism each rank holds chunks of
    every sequence, so Future-KL (a suffix sum) and the per-sequence counts of the sequence filter
    need the other ranks' chunks: ``algo/future_kl_cp.py`` provides that version.
    """

    def future_kl(self, delta_logp: torch.Tensor, mask: torch.Tensor, decay_rate: float) -> torch.Tensor: ...

    def sequence_sum(self, per_sequence: torch.Tensor) -> torch.Tensor: ...


class _WholeSequences:
    def future_kl(self, delta_logp: torch.Tensor, mask: torch.Tensor, decay_rate: float) -> torch.Tensor:
        return future_kl(delta_logp, mask, decay_rate)

    def sequence_sum(self, per_sequence: torch.Tensor) -> torch.Tensor:
        return per_sequence


LOCAL_SHARDS: SequenceShards = _WholeSequences()


def _clipped_surrogate(
    weighted_adv: torch.Tensor, adv: torch.Tensor, ratio: torch.Tensor, clip_low: float, clip_high: float,
    dual_clip_c: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO surrogate with clip-low/clip-high and dual-clip for negative advantages.

    Returns (per-token loss, ppo-clip-bound mask, dual-clip-bound mask). As in the official code,
    the dual clip applies where the weighted advantage is negative, and a token counts as held by
    it (for the sequence filter and the metric) where the raw advantage is negative.
    """
    unclipped = -weighted_adv * ratio
    clipped = -weighted_adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    ppo = torch.maximum(unclipped, clipped)
    dual_cap = -weighted_adv * dual_clip_c
    loss = torch.where(weighted_adv < 0, torch.minimum(ppo, dual_cap), ppo)
    return loss, clipped > unclipped, (adv < 0) & (ppo > dual_cap)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    if values.numel() == 0:
        return [0.0] * len(qs)
    return torch.quantile(values.float(), torch.tensor(qs, dtype=torch.float32, device=values.device)).tolist()


@torch.no_grad()
def _ratio_metrics(ratio: torch.Tensor, delta: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for sign, sel in (("pos", valid & (adv > 0)), ("neg", valid & (adv < 0))):
        r, d = ratio[sel], delta[sel]
        q = _quantiles(r, (0.25, 0.5, 0.75, 0.995, 0.999))
        out.update({f"ratio/{sign}_p25": q[0], f"ratio/{sign}_median": q[1], f"ratio/{sign}_p75": q[2],
                    f"ratio/{sign}_p995": q[3], f"ratio/{sign}_p999": q[4]})
        out[f"ratio/{sign}_max"] = r.max().item() if r.numel() else 0.0
        out[f"ratio/{sign}_min"] = r.min().item() if r.numel() else 0.0
        out[f"delta_logp/{sign}_mean"] = d.mean().item() if d.numel() else 0.0
        out[f"delta_logp/{sign}_abs_mean"] = d.abs().mean().item() if d.numel() else 0.0
    out["ppo_kl"] = (-delta[valid]).mean().item() if valid.any() else 0.0
    return out


@dataclass
class InfluenceWeights:
    weight: torch.Tensor  # clipped, safety-capped, what multiplies the advantage
    raw: torch.Tensor  # exp(Future-KL) before any clip
    future_kl: torch.Tensor
    excluded: torch.Tensor  # tokens left out of Future-KL (ratio above dual_clip_c)
    safety_capped: torch.Tensor


@torch.no_grad()
def influence_weights(
    delta_logp: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor, cfg: FIPOConfig,
    shards: SequenceShards = LOCAL_SHARDS,
) -> InfluenceWeights:
    """f_t = clip(exp(FutureKL_t)); no gradient flows through it.

    delta_logp is the clamped log-ratio [B, L]; advantages [B, L]; valid the bool response mask.
    """
    # The thresholds are compared as the official code compares them (log c in the tensor's dtype,
    # the ratio itself against the safety threshold), so boundary tokens fall on the same side.
    excluded = delta_logp > torch.log(torch.tensor(cfg.dual_clip_c, dtype=delta_logp.dtype))
    if cfg.future_kl_mask_negative_only:
        excluded = excluded & (advantages < 0)
    fkl = shards.future_kl(delta_logp, valid & ~excluded, cfg.decay_rate)
    raw = torch.exp(fkl)
    weight = raw.clamp(*cfg.influence_bounds)
    capped = (advantages < 0) & (torch.exp(delta_logp) > cfg.safety_threshold)
    weight = torch.where(capped, weight.clamp(*SAFETY_WEIGHT_RANGE), weight)
    return InfluenceWeights(weight, raw, fkl, excluded, capped)


def _policy_loss(logp, old_logp, advantages, mask, cfg, num_tokens, use_influence, shards, rollout_logp):
    valid = mask.bool()
    adv = _token_advantages(advantages, mask)
    delta = torch.clamp(logp.float() - old_logp.float(), -cfg.logratio_clamp, cfg.logratio_clamp)
    ratio = torch.exp(delta)
    iw = influence_weights(delta, adv, valid, cfg, shards) if use_influence else None
    weighted_adv = adv * iw.weight if iw is not None else adv

    per_token, ppo_bound, dual_bound = _clipped_surrogate(
        weighted_adv, adv, ratio, cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.dual_clip_c
    )
    tis = None
    if cfg.tis_cap > 0:  # off: the loss is not touched, bit for bit
        tis = truncated_is_weights(old_logp, rollout_logp, cfg.tis_cap)
        per_token = per_token * tis
    kept = valid
    dropped = torch.zeros(valid.shape[0], dtype=torch.bool, device=valid.device)
    if use_influence and cfg.filter_dual_clip_sequences:
        # A sequence with two or more dual-clipped tokens leaves the loss, numerator and denominator.
        dropped = shards.sequence_sum((dual_bound & valid).sum(dim=1)) > 1
        kept = valid & ~dropped.unsqueeze(1)
    kept_f = kept.float()
    # Token mean over the tokens that survive the filter (the official masked_mean over final_mask).
    # The actor passes num_tokens=1 and hands the kept count to Megatron, whose per-token loss
    # divides the summed gradients by the count over all micro-batches and DP x CP ranks.
    denom = kept_f.sum().clamp(min=1) if num_tokens is None else num_tokens
    loss = (per_token * kept_f).sum() / denom

    with torch.no_grad():
        metrics = _ratio_metrics(ratio, delta, adv, valid)
        metrics["pg_clipfrac"] = _masked_mean(ppo_bound.float(), valid).item()
        metrics["pg_clipfrac_lower"] = _masked_mean(dual_bound.float(), valid).item()
        metrics["seqs_filtered"] = float(dropped.sum())
        metrics["num_tokens"] = float(valid.sum())
        metrics["num_tokens_kept"] = float(kept_f.sum())
        if iw is not None:
            metrics.update(_influence_metrics(iw, valid, cfg))
        if tis is not None:
            metrics["tis/weight_mean"] = _masked_mean(tis, valid).item()
            metrics["tis/capped_frac"] = _masked_mean((tis >= cfg.tis_cap).float(), valid).item()
        if shards is LOCAL_SHARDS:  # a column is a token position only in whole sequences (not under CP)
            weight = iw.weight if iw is not None else influence_weights(delta, adv, valid, cfg, shards).weight
            metrics.update(position_metrics(delta, weight, valid))
    return loss, metrics


@torch.no_grad()
def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor | None, cap: float) -> torch.Tensor:
    """w_t = min(exp(old_logp_t - rollout_logp_t), cap): truncated importance sampling, no gradient.

    The rollout engine drew the tokens from pi_rollout (its kernels, its precision, possibly older
    weights), while the PPO ratio is taken against pi_old, the trainer's own logprobs of the same
    tokens. Multiplying each token's loss by pi_old / pi_rollout corrects for that mismatch; the cap
    bounds the variance that a token with pi_rollout << pi_old would add (slime --use-tis, verl's
    tis_imp_ratio_cap).
    """
    if rollout_logp is None:
        raise ValueError("algo.tis_cap > 0 needs the rollout logprobs: pass rollout_logp (or set algo.tis_cap=0)")
    return torch.exp(old_logp.float() - rollout_logp.float()).clamp(max=cap)


@torch.no_grad()
def _influence_metrics(iw: InfluenceWeights, valid: torch.Tensor, cfg: FIPOConfig) -> dict[str, float]:
    low, up = cfg.influence_bounds
    out = {
        "influence_weight/clip_frac_upper": _masked_mean((iw.weight >= up - 1e-7).float(), valid).item(),
        "influence_weight/clip_frac_lower": _masked_mean((iw.weight <= low + 1e-7).float(), valid).item(),
        "future_kl/excluded_frac": _masked_mean(iw.excluded.float(), valid).item(),
        "safety_capped_frac": _masked_mean(iw.safety_capped.float(), valid).item(),
    }
    for name, values, empty in (("influence_weight", iw.weight, 1.0), ("influence_weight_raw", iw.raw, 1.0),
                                ("future_kl", iw.future_kl, 0.0)):
        v = values[valid]
        stats = (v.mean().item(), v.min().item(), v.max().item()) if v.numel() else (empty,) * 3
        out.update({f"{name}/mean": stats[0], f"{name}/min": stats[1], f"{name}/max": stats[2]})
    return out


def dapo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: FIPOConfig,
    num_tokens: float | torch.Tensor | None = None,
    shards: SequenceShards = LOCAL_SHARDS,
    rollout_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO / GRPO baseline: dual-clip PPO surrogate with clip-higher, token-level mean."""
    return _policy_loss(logp, old_logp, advantages, mask, cfg, num_tokens, False, shards, rollout_logp)


def fipo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: FIPOConfig,
    num_tokens: float | torch.Tensor | None = None,
    shards: SequenceShards = LOCAL_SHARDS,
    rollout_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """FIPO loss: the DAPO surrogate on advantages re-weighted by clip(exp(Future-KL)).

    logp, old_logp, mask: [B, L]; advantages: [B] or [B, L]. The loss is the token mean over the
    tokens that survive the sequence filter (``filter_dual_clip_sequences``: a sequence with two or
    more negative-advantage tokens held by the dual clip leaves numerator and denominator), as in
    the official code; ``num_tokens`` overrides the denominator (the actor passes 1 and lets
    Megatron divide by the global kept count, ``metrics["num_tokens_kept"]`` summed).
    ``rollout_logp`` [B, L]: the engine's logprobs of the tokens, for truncated importance sampling
    (``cfg.tis_cap`` > 0): each token's loss is multiplied by min(exp(old_logp - rollout_logp), tis_cap).
    """
    return _policy_loss(logp, old_logp, advantages, mask, cfg, num_tokens, True, shards, rollout_logp)
