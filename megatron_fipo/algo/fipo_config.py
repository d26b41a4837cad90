"""FIPO loss knobs. Torch-free, so configs load and validate before any heavy import."""

from __future__ import annotations

from dataclasses import dataclass

# influence_clip == 0 in the official code: weights min(exp(FutureKL), 10), bounded below only by 0.
UNCLIPPED_INFLUENCE_BOUNDS = (0.0, 10.0)


@dataclass
class FIPOConfig:
    """FIPO loss knobs; defaults are the paper's public Qwen2.5-32B recipe (run_fipo_qwen2.5_32b.sh)."""

    # PPO ratio clip: the ratio's lower bound is 1 - clip_ratio_low.
    clip_ratio_low: float = 0.2
    # The upper bound 1 + clip_ratio_high; larger than the lower margin (DAPO's clip-higher).
    clip_ratio_high: float = 0.28
    # Dual clip: for A < 0 the surrogate is capped at -A * c; tokens with ratio > c also leave Future-KL.
    dual_clip_c: float = 10.0
    # gamma = 2^(-1/decay_rate): a token's influence halves every decay_rate tokens.
    decay_rate: float = 32.0
    # Influence weights are clipped to [1 - clip, 1 + clip] (or [1, 1 + clip], below). 0 means what the
    # official code's future_kl_clip_ratio == 0 means: no lower bound and a cap at 10, min(exp(FKL), 10).
    influence_clip: float = 0.2
    # True: weights in [1, 1 + clip] (32B recipe); False: [1 - clip, 1 + clip] (paper's 7B runs).
    influence_clip_high_only: bool = True
    # A negative-advantage token whose ratio exceeds this keeps its influence weight in [0.8, 1.0].
    safety_threshold: float = 10.0
    # log(pi / pi_old) is clamped to +-this before the ratio and Future-KL (the official code's 20).
    logratio_clamp: float = 20.0
    # A sequence with two or more tokens held by the dual clip leaves the loss, numerator and
    # denominator (the official filter: the mean is over the surviving tokens).
    filter_dual_clip_sequences: bool = True
    # The paper's Eq. 5 masks only negative-advantage tokens above c out of Future-KL; the official
    # code masks every token above c. False follows the code.
    future_kl_mask_negative_only: bool = False
    # Truncated importance sampling against the rollout engine's logprobs (slime --use-tis, verl's
    # tis_imp_ratio_cap): each token's loss is multiplied by min(pi_old / pi_rollout, tis_cap). 0 = off.
    tis_cap: float = 0.0

    def __post_init__(self) -> None:
        for name in ("clip_ratio_low", "clip_ratio_high", "influence_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.clip_ratio_low >= 1:
            raise ValueError(f"clip_ratio_low must be < 1, got {self.clip_ratio_low}")
        if not self.dual_clip_c > 1 + self.clip_ratio_high:
            raise ValueError(
                f"dual_clip_c ({self.dual_clip_c}) must exceed 1 + clip_ratio_high ({1 + self.clip_ratio_high})"
            )
        if self.tis_cap != 0 and not self.tis_cap >= 1:
            raise ValueError(f"tis_cap must be 0 (off) or >= 1 (a cap below 1 would shrink every on-policy token's "
                             f"loss), got {self.tis_cap}")
        for name in ("decay_rate", "safety_threshold", "logratio_clamp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def influence_bounds(self) -> tuple[float, float]:
        if self.influence_clip == 0:
            return UNCLIPPED_INFLUENCE_BOUNDS
        low = 1.0 if self.influence_clip_high_only else 1.0 - self.influence_clip
        return low, 1.0 + self.influence_clip
