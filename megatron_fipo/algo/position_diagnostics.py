"""The paper's Δlogp diagnostics, per mini-batch: where in the response the policy moves, and what
weight FIPO gives there.

Positions fall into log2 buckets (bucket 0: token 0; bucket k: tokens [2^(k-1), 2^k); the last is
open), one fixed key set whatever the response length, from a tiny run's 60 tokens to the paper's 20k.
Each bucket's value is a *density*: the bucket's sum divided by the micro-batch's response tokens.
``metrics.merge_metrics`` weights micro-batches by those tokens, so the merged value is the exact sum
over the step divided by its tokens, and a bucket's mean is ``diag/<x>_bK / diag/tokens_bK``
(``megatron_fipo/compare_report.py`` does that division).
"""

from __future__ import annotations

import torch

POSITION_BUCKETS = 16  # the last holds tokens 16384 and beyond
# |Δlogp| above these counts as a token the update moved: the sparsity of the paper's Δlogp plots.
DELTA_LOGP_THRESHOLDS = (0.01, 0.1)


def position_bucket(positions: torch.Tensor) -> torch.Tensor:
    """0 for token 0, k for tokens [2^(k-1), 2^k), capped at POSITION_BUCKETS - 1."""
    bucket = torch.floor(torch.log2(positions.float().clamp(min=1))).long() + 1
    return torch.where(positions == 0, torch.zeros_like(bucket), bucket).clamp(max=POSITION_BUCKETS - 1)


@torch.no_grad()
def position_metrics(delta_logp: torch.Tensor, influence: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """delta_logp, influence, valid: [B, L] whole responses (column = token position).

    ``influence``: the weights FIPO multiplies advantages by (under DAPO the ones it would have used).
    """
    n = valid.sum().clamp(min=1).float()
    abs_delta = delta_logp.abs().float()
    out = {f"diag/abs_delta_logp_frac_gt_{t:g}": ((abs_delta > t) & valid).sum().item() / n.item()
           for t in DELTA_LOGP_THRESHOLDS}
    cols = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    bucket = position_bucket(cols)[valid]
    for name, values in (("tokens", torch.ones_like(abs_delta)), ("abs_delta_logp", abs_delta),
                         ("delta_logp", delta_logp.float()), ("influence", influence.float())):
        sums = torch.zeros(POSITION_BUCKETS, dtype=torch.float64, device=valid.device)
        sums.index_add_(0, bucket, values[valid].double())
        out.update({f"diag/{name}_b{k:02d}": v / n.item() for k, v in enumerate(sums.tolist())})
    return out
