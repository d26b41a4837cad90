"""torchrun x2 worker: the step's samples handed to DP=2 ranks by rollout/shares.py, against the strided split.

Usage: torchrun --nproc-per-node 2 shares_worker.py OUT_DIR. Both ranks build the same long-tailed
batch (rank 0 alone would hold it in a run: the other rank uses its copy only to check what it
received and to run the old strided split). Rank 0 writes OUT_DIR/results.json.
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

GROUPS, N, MB_GROUPS = 8, 8, 4  # 64 samples, PPO mini-batches of 32


def rollout():
    """Long-tailed responses (log-normal, median 24 tokens, up to 400), rollout logprobs near the model's."""
    import torch

    from megatron_fipo.rollout.base import Sample

    g = torch.Generator().manual_seed(7)
    groups = []
    for _ in range(GROUPS):
        prompt = torch.randint(1, 256, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
        group = []
        for _ in range(N):
            r = int(torch.exp(torch.randn(1, generator=g) + 3.2).clamp(1, 400))
            response = torch.randint(1, 256, (r,), generator=g).tolist()
            # A random model's logprobs are near -ln 256 = -5.5; the engine's differ by up to 1.5 nats.
            logprobs = (-5.5 + 3 * torch.rand(r, generator=g) - 1.5).tolist()
            group.append(Sample(prompt, response, logprobs, "stop", weight_version=0))
        groups.append(group)
    rewards = torch.rand(GROUPS, N, generator=g).round()
    return groups, rewards


def main() -> None:
    import torch
    import torch.distributed as dist

    from megatron_fipo.actor.actor import build_actor
    from megatron_fipo.algo import fipo_policy_loss, group_advantages
    from megatron_fipo.algo.balance import imbalance
    from megatron_fipo.config import TrainerSections
    from megatron_fipo.config_base import from_dict
    from megatron_fipo.rollout.shares import ShareChannel, _unpack, pack_shares
    from megatron_fipo.sequences import SequenceBatch, pad_rows
    from megatron_fipo.stop import StopFlag
    from megatron_fipo.testing import TINY_QWEN2

    out = Path(sys.argv[1])
    config = out / f"config_{os.environ['RANK']}.json"
    config.write_text(json.dumps(TINY_QWEN2))
    sections = from_dict(TrainerSections, {"actor": {"model_config": str(config), "precision": "fp32",
                                                     "max_tokens_per_microbatch": 1024},
                                           "optim": {"lr": 1e-3, "lr_warmup_steps": 0}})
    actor = build_actor(sections)
    stop = StopFlag()
    stop.connect(5)
    rank, dp_rank, dp = dist.get_rank(), actor.ps.get_data_parallel_rank(), actor.dp_size
    assert dp == 2
    channel = ShareChannel(stop.group, dp_rank, timedelta(minutes=5))

    groups, rewards = rollout()
    samples = [s for g in groups for s in g]
    adv = group_advantages(rewards).flatten()
    stats = {"reward/mean": rewards.mean().item()}
    per_mb = MB_GROUPS * N
    plan = pack_shares(groups, adv, stats, per_mb, dp)  # what rank 0 sends; the others check against it
    share = channel.hand_out(plan if rank == 0 else None)
    expected = _unpack(plan[dp_rank], 0)
    exact = (share.seqs == expected.seqs and share.minibatches == expected.minibatches
             and torch.equal(share.rollout_logp, expected.rollout_logp) and torch.equal(share.advantages, expected.advantages)
             and share.stats == stats)

    # The same on a DP=1 x 2 layout (as TP=2): rank 1 gets the whole batch from rank 0 on the peer group.
    whole = pack_shares(groups, adv, stats, per_mb, 1)
    peer_share = ShareChannel(stop.group, 0, timedelta(minutes=5)).hand_out(whole if rank == 0 else None)
    exact_peer = peer_share.seqs == SequenceBatch([s.prompt_ids for s in samples], [s.response_ids for s in samples])
    none_everywhere = channel.hand_out(None) is None

    # The old split: each rank a stride of every mini-batch.
    strided = [list(range(s, s + per_mb))[dp_rank::dp] for s in range(0, len(samples), per_mb)]
    mine = [i for mb in strided for i in mb]
    row_of = {i: k for k, i in enumerate(mine)}
    old_seqs = SequenceBatch([samples[i].prompt_ids for i in mine], [samples[i].response_ids for i in mine])
    old_share = (old_seqs, [[row_of[i] for i in mb] for mb in strided], adv[mine],
                 pad_rows([samples[i].logprobs for i in mine], old_seqs.max_response_length))

    def losses(seqs, rows_of, advantages, rollout_logp, tis_cap):
        """Per mini-batch: (loss, grad norm) as the loop computes them, old logprobs moved off the model's."""
        actor.sections.algo.tis_cap = tis_cap
        old_logp, _ = actor.compute_logprobs(seqs, minibatches=rows_of)
        shifted = old_logp + 0.3 * (rollout_logp + 5.5) * seqs.response_mask()  # ratios e^-0.45 .. e^0.45
        result = []
        for rows in rows_of:
            loss = actor.compute_gradients(seqs.select(rows), shifted[rows], advantages[rows], 1.0, rollout_logp[rows])[0]
            actor.optimizer.prepare_grads()
            result.append((loss, float(actor.optimizer.get_grad_norm())))
        return result

    results = {"exact": exact, "exact_peer": exact_peer, "none_everywhere": none_everywhere}
    for cap in (0.0, 2.0):
        results[f"balanced_{cap}"] = losses(share.seqs, share.minibatches, share.advantages, share.rollout_logp, cap)
        results[f"strided_{cap}"] = losses(*old_share, cap)
    # The loss function itself on each whole mini-batch, with TIS: what the two splits must both give.
    full = SequenceBatch([s.prompt_ids for s in samples], [s.response_ids for s in samples])
    logp, _ = actor.compute_logprobs(full)
    rollout_logp = pad_rows([s.logprobs for s in samples], logp.shape[1])
    mask = full.response_mask()
    old = logp + 0.3 * (rollout_logp + 5.5) * mask
    results["whole_2.0"] = [fipo_policy_loss(logp[a:a + per_mb], old[a:a + per_mb], adv[a:a + per_mb], mask[a:a + per_mb],
                                             actor.sections.algo, rollout_logp=rollout_logp[a:a + per_mb])[0].item()
                            for a in range(0, len(samples), per_mb)]

    # Tokens each rank trains on per mini-batch, under both splits; bytes each rank received.
    tokens = lambda seqs, rows_of: [sum(seqs.total_length(r) for r in rows) for rows in rows_of]  # noqa: E731
    mine_counts = torch.tensor([*tokens(share.seqs, share.minibatches), *tokens(old_seqs, old_share[1]),
                                share.received_bytes, int(exact), int(exact_peer), int(none_everywhere)], dtype=torch.int64)
    gathered = [torch.zeros_like(mine_counts) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine_counts, group=stop.group)
    if rank == 0:
        n_mb = len(share.minibatches)
        results["tokens_balanced"] = [g[:n_mb].tolist() for g in gathered]
        results["tokens_strided"] = [g[n_mb:2 * n_mb].tolist() for g in gathered]
        results["imbalance_balanced"] = [imbalance([g[m].item() for g in gathered]) for m in range(n_mb)]
        results["imbalance_strided"] = [imbalance([g[n_mb + m].item() for g in gathered]) for m in range(n_mb)]
        results["received_bytes"] = [g[2 * n_mb].item() for g in gathered]
        results["all_exact"] = [g[2 * n_mb + 1:].tolist() for g in gathered]
        results["total_bytes"] = sum(m.nbytes for m in plan)
        results["response_lengths"] = sorted(len(s.response_ids) for s in samples)
        (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
