"""torchrun worker for the context-parallel, sequence-parallel and packing tests.

Usage: torchrun --nproc-per-node N cp_worker.py OUT_DIR HF_DIR [packings=off,on] [key=value ...]
The dotted overrides configure the actor (parallel.*). For each ``actor.packing`` in ``packings``,
one measurement on actor_worker's batch, whose planted tokens make the dual clip, the Future-KL
exclusion and the sequence filter act: per-token logprobs, per-token Future-KL (as the loss
computed it), loss, response tokens and grad norm, and every value the Future-KL exchange sent.
The last rank writes OUT_DIR/results.pt, {packing: measurement}.
"""

import sys


class CountingDist:
    """torch.distributed as algo/future_kl_cp.py sees it, counting the elements each collective sends."""

    def __init__(self):
        import torch.distributed

        self.dist = torch.distributed
        self.sent: list[tuple[str, int]] = []

    def __getattr__(self, name):
        return getattr(self.dist, name)

    def all_gather_into_tensor(self, output, input, group=None):
        self.sent.append(("all_gather", input.numel()))
        return self.dist.all_gather_into_tensor(output, input, group=group)

    def all_reduce(self, tensor, group=None):
        self.sent.append(("all_reduce", tensor.numel()))
        return self.dist.all_reduce(tensor, group=group)


class RecordedShards:
    """The actor's SequenceShards of one micro-batch, recording its Future-KL and what it sent."""

    def __init__(self, inner, mb, future_kl, exchanges, counting):
        self.inner, self.mb, self.fkl, self.exchanges, self.counting = inner, mb, future_kl, exchanges, counting

    def future_kl(self, delta, mask, decay_rate):
        before = len(self.counting.sent)
        values = self.inner.future_kl(delta, mask, decay_rate)
        self.exchanges.append((len(self.mb.sample_index), self.counting.sent[before:]))
        self.fkl[self.mb.sample_index, : values.shape[1]] += (values * self.mb.response_mask).cpu()
        return values

    def sequence_sum(self, per_sequence):
        before = len(self.counting.sent)
        total = self.inner.sequence_sum(per_sequence)
        self.exchanges[-1] += (self.counting.sent[before:],)
        return total


def measure(actor, counting) -> dict:
    import torch

    from actor_worker import batch, dp_shard

    seqs, adv, noise = batch(0)
    logp, entropy = actor.compute_logprobs(seqs)
    old = logp - noise[:, : logp.shape[1]] * seqs.response_mask()
    fkl = torch.zeros_like(logp)
    exchanges = []  # per micro-batch: (sequences, what future_kl sent, what sequence_sum sent)
    shards_of = type(actor)._sequence_shards
    actor._sequence_shards = lambda mb: RecordedShards(shards_of(actor, mb), mb, fkl, exchanges, counting)
    loss, tokens, _, metrics = actor.compute_gradients(*dp_shard(seqs, adv, old, actor.ps.get_data_parallel_rank(),
                                                                 actor.dp_size))
    actor.optimizer.prepare_grads()
    if actor.sections.parallel.context_parallel_size > 1:
        torch.distributed.all_reduce(fkl, group=actor.ps.get_context_parallel_group())
    return {"logp": logp, "entropy": entropy, "future_kl": fkl, "loss": loss, "tokens": tokens,
            "grad_norm": float(actor.optimizer.get_grad_norm()), "seqs_filtered": metrics.get("seqs_filtered"),
            "num_microbatches": len(actor.microbatches(seqs)), "exchanges": exchanges,
            "response_mask": seqs.response_mask()}


def main() -> None:
    import torch

    from megatron_fipo.actor.actor import build_actor
    from megatron_fipo.algo import future_kl_cp
    from megatron_fipo.bridge.hf_io import HFCheckpointReader
    from megatron_fipo.bridge.weights import load_hf_weights
    from megatron_fipo.config import TrainerSections
    from megatron_fipo.config_base import apply_overrides, from_dict

    out, hf_dir, *overrides = sys.argv[1:]
    opts = dict(o.split("=", 1) for o in overrides if "." not in o.split("=", 1)[0])
    data = apply_overrides({"actor": {"model_config": hf_dir, "precision": "fp32", "max_tokens_per_microbatch": 64},
                            "optim": {"lr": 1e-3, "lr_warmup_steps": 0}},
                           [o for o in overrides if "." in o.split("=", 1)[0]])
    reader = HFCheckpointReader(hf_dir)
    actor = build_actor(from_dict(TrainerSections, data), reader.arch())
    load_hf_weights(actor, reader)
    counting = future_kl_cp.dist = CountingDist()
    results = {}
    for packing in opts.get("packings", "on").split(","):
        actor.sections.actor.packing = packing
        results[packing] = measure(actor, counting)
    # The last rank is on the last pipeline stage, where the loss and its metrics live.
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        torch.save(results, f"{out}/results.pt")


if __name__ == "__main__":
    main()
