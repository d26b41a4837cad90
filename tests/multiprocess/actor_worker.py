"""torchrun worker for the actor's parallel-equivalence tests: one launch, many measurements.

Usage: torchrun --nproc-per-node N actor_worker.py OUT_DIR HF_UNTIED HF_TIED [key=value ...]
where the overrides configure ``parallel`` (e.g. parallel.tensor_model_parallel_size=2) and
``mode`` (reference | layout | resume). Rank 0 writes OUT_DIR/results.pt.
"""

import sys


def batch(step: int):
    import torch

    from megatron_fipo.sequences import SequenceBatch

    g = torch.Generator().manual_seed(1000 + step)
    lens = [(5, 6), (3, 9), (7, 2), (4, 11), (6, 5), (2, 8), (9, 3), (3, 7)]
    prompts = [torch.randint(1, 256, (p,), generator=g).tolist() for p, _ in lens]
    responses = [torch.randint(1, 256, (r,), generator=g).tolist() for _, r in lens]
    adv = torch.randn(len(lens), generator=g)
    noise = 0.3 * torch.randn(len(lens), max(r for _, r in lens), generator=g)
    # Two negative-advantage samples with two tokens each at ratio e^3 > dual_clip_c: the dual clip
    # holds them, they leave Future-KL, and the sequence filter drops both samples.
    for row, cols in ((1, [0, 2]), (3, [1, 4])):
        adv[row] = -adv[row].abs()
        noise[row, cols] = 3.0
    return SequenceBatch(prompts, responses), adv, noise


def dp_shard(seqs, adv, old, dp_rank, dp_size):
    """This DP rank's samples, as (batch, old_logp, advantages)."""
    idx = list(range(dp_rank, len(seqs), dp_size))
    return seqs.select(idx), old[idx], adv[idx]


def main() -> None:
    import torch

    from megatron_fipo.actor.actor import build_actor
    from megatron_fipo.actor.checkpoint import load_checkpoint, save_checkpoint
    from megatron_fipo.algo import fipo_policy_loss
    from megatron_fipo.bridge.hf_io import HFCheckpointReader, write_hf_checkpoint
    from megatron_fipo.bridge.weights import iter_hf_buckets, load_hf_weights
    from megatron_fipo.config import TrainerSections
    from megatron_fipo.config_base import apply_overrides, from_dict

    out, hf_untied, hf_tied, *overrides = sys.argv[1:]
    # Dotted keys configure the actor; plain keys (mode, ckpt) steer this worker.
    opts = dict(o.split("=", 1) for o in overrides if "." not in o.split("=", 1)[0])
    mode = opts.get("mode", "layout")
    sec_overrides = [o for o in overrides if "." in o.split("=", 1)[0]]
    results = {}

    def make(hf_dir, extra=()):
        data = apply_overrides({"actor": {"model_config": hf_dir, "precision": "fp32", "max_tokens_per_microbatch": 64,
                                          "packing": "on"},
                                "optim": {"lr": 1e-3, "lr_warmup_steps": 0}}, [*sec_overrides, *extra])
        sections = from_dict(TrainerSections, data)
        reader = HFCheckpointReader(hf_dir)
        actor = build_actor(sections, reader.arch())
        load_hf_weights(actor, reader)
        return actor

    def measure(actor, tag, seqs, adv, noise):
        logp, ent = actor.compute_logprobs(seqs)
        old = logp - noise[:, : logp.shape[1]] * seqs.response_mask()
        dp_rank, dp_size = actor.ps.get_data_parallel_rank(), actor.dp_size
        loss, tokens, _, metrics = actor.compute_gradients(*dp_shard(seqs, adv, old, dp_rank, dp_size))
        actor.optimizer.prepare_grads()
        # The loss function itself on the whole batch in one piece: what the official code computes.
        whole, whole_metrics = fipo_policy_loss(logp, old, adv, seqs.response_mask(), actor.sections.algo)
        results[tag] = {"logp": logp, "entropy": ent, "loss": loss, "tokens": tokens,
                        "grad_norm": float(actor.optimizer.get_grad_norm()),
                        "seqs_filtered": metrics.get("seqs_filtered", 0.0),
                        "whole_batch_loss": whole.item(), "whole_batch_filtered": whole_metrics["seqs_filtered"]}
        return old

    def export(actor, name):
        buckets = iter_hf_buckets(actor, bucket_bytes=64 * 1024)
        if torch.distributed.get_rank() == 0:
            write_hf_checkpoint(f"{out}/{name}", buckets, actor.arch)
        else:
            for _ in buckets:
                pass

    seqs, adv, noise = batch(0)
    if mode in ("reference", "layout"):
        for tag, hf_dir in (("untied", hf_untied), ("tied", hf_tied)):
            actor = make(hf_dir)
            export(actor, f"export_{tag}")
            old = measure(actor, tag, seqs, adv, noise)
            if mode == "reference":
                # Train/inference mismatch: engine loaded through the bridge vs the actor, same tokens.
                from megatron_fipo.rollout.base import SamplingParams
                from megatron_fipo.rollout.embedded import EmbeddedEngine
                from megatron_fipo.sequences import SequenceBatch

                engine = EmbeddedEngine(actor.arch)
                engine.update_weights(iter_hf_buckets(actor, bucket_bytes=64 * 1024), version=1)
                groups = engine.generate(seqs.prompts[:4], n=2, sampling=SamplingParams(temperature=0.9, max_new_tokens=10), seed=5)
                flat = [s for g in groups for s in g]
                logp, _ = actor.compute_logprobs(SequenceBatch([s.prompt_ids for s in flat], [s.response_ids for s in flat]), temperature=0.9)
                diffs = [(logp[i, : len(s.logprobs)] - torch.tensor(s.logprobs)).abs().max().item() for i, s in enumerate(flat)]
                results[f"engine_mismatch_{tag}"] = max(diffs)
            if mode == "reference" and tag == "untied":
                # Same gradient whatever the micro-batching, packed or padded.
                for name, max_tokens, packing in (("mb1", 10_000, "on"), ("mb2", 60, "on"), ("mb4", 30, "on"),
                                                  ("padded", 64, "off")):
                    actor.sections.actor.max_tokens_per_microbatch = max_tokens
                    actor.sections.actor.packing = packing
                    n_mb = len(actor.microbatches(seqs))
                    loss, _, _, _ = actor.compute_gradients(seqs, old, adv)
                    grads = torch.cat([p.main_grad.flatten().clone() for p in actor.chunks[0].parameters()])
                    results[name] = {"loss": loss, "grads": grads, "num_microbatches": n_mb}
                actor.sections.actor.max_tokens_per_microbatch = 64
                actor.sections.actor.packing = "on"
    if mode == "reference":
        # Delta logp on the first PPO mini-batch of a step, old logprobs taken over the update's own
        # mini-batch partition (the loop's way) or over the whole batch at once.
        halves = [[0, 1, 2, 3], [4, 5, 6, 7]]
        for precision in ("fp32", "bf16"):
            actor = make(hf_untied, [f"actor.precision={precision}", "actor.max_tokens_per_microbatch=40"])
            shapes = []  # token-grid shapes of the micro-batches of each forward pass
            run = actor._run
            actor._run = lambda mbs, *a, **k: shapes.append([tuple(mb.tokens.shape) for mb in mbs]) or run(mbs, *a, **k)
            for how, groups in (("per_minibatch", halves), ("whole_batch", None)):
                shapes.clear()
                old, _ = actor.compute_logprobs(seqs, minibatches=groups)
                first = actor.compute_gradients(seqs.select(halves[0]), old[halves[0]], adv[halves[0]])[3]
                actor.compute_gradients(seqs.select(halves[1]), old[halves[1]], adv[halves[1]])
                results[f"first_minibatch_{precision}_{how}"] = {
                    "delta_logp": max(first["delta_logp/pos_abs_mean"], first["delta_logp/neg_abs_mean"]),
                    "same_shapes": shapes[0] == shapes[1] + shapes[2]}
    if mode in ("reference", "resume"):
        actor = make(hf_untied)
        ckpt = f"{out}/ckpt" if mode == "reference" else opts.get("ckpt")
        if mode == "reference":
            losses = []
            for step in range(1, 7):
                s, a, n = batch(step)
                logp, _ = actor.compute_logprobs(s)
                old = logp - n[:, : logp.shape[1]] * s.response_mask()
                losses.append(actor.train_step(*dp_shard(s, a, old, 0, 1)).loss)
                if step == 3:
                    save_checkpoint(actor, ckpt, step, {"data_position": step})
            results["uninterrupted_losses"] = losses[3:]
            # A NaN loss skips the update: parameters untouched, the skip counted.
            before = [p.detach().clone() for p in actor.chunks[0].parameters()]
            s, a, n = batch(7)
            logp, _ = actor.compute_logprobs(s)
            nan_step = actor.train_step(s, logp, torch.full_like(a, float("nan")))
            results["nan_step"] = {
                "updated": nan_step.updated,
                "skipped": actor.skipped_updates,
                "unchanged": all(torch.equal(b, p) for b, p in zip(before, actor.chunks[0].parameters())),
            }
        else:
            common = load_checkpoint(actor, ckpt)
            losses = []
            for step in range(common["extra"]["data_position"] + 1, 7):
                s, a, n = batch(step)
                logp, _ = actor.compute_logprobs(s)
                old = logp - n[:, : logp.shape[1]] * s.response_mask()
                losses.append(actor.train_step(*dp_shard(s, a, old, actor.ps.get_data_parallel_rank(), actor.dp_size)).loss)
            results["resumed_losses"] = losses
            results["resumed_step"] = common["step"]
    if torch.distributed.get_rank() == 0:
        torch.save(results, f"{out}/results.pt")


if __name__ == "__main__":
    main()
