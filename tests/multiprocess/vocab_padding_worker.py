"""Worker: actor logprobs and entropy of a model whose vocabulary (1003) TP=2 does not divide.

Usage: torchrun --nproc-per-node N vocab_padding_worker.py OUT HF_DIR
At TP=N the vocabulary is padded (1004 rows at TP=2); rank 0 writes OUT: logprobs and entropy of a
fixed batch, then the same after one SFT step, and the padding rows of the trained output layer.
"""

import sys


def main() -> None:
    import torch
    import torch.distributed as dist

    from megatron_fipo.actor.actor import build_actor
    from megatron_fipo.bridge.hf_io import HFCheckpointReader
    from megatron_fipo.bridge.weights import load_hf_weights
    from megatron_fipo.config import ActorConfig, OptimConfig, ParallelConfig, TrainerSections
    from megatron_fipo.sequences import SequenceBatch

    out, hf = sys.argv[1:]
    tp = int(__import__("os").environ["WORLD_SIZE"])
    reader = HFCheckpointReader(hf)
    sections = TrainerSections(actor=ActorConfig(model_config=hf, precision="fp32", seed=7),
                               parallel=ParallelConfig(tensor_model_parallel_size=tp),
                               optim=OptimConfig(lr=1e-3, lr_warmup_steps=0, weight_decay=0.1))
    actor = build_actor(sections, reader.arch())
    load_hf_weights(actor, reader)
    g = torch.Generator().manual_seed(0)
    vocab = actor.arch.vocab_size
    # The last ids of the vocabulary (those next to the padding) among the targets.
    batch = SequenceBatch([torch.randint(1, vocab, (n,), generator=g).tolist() for n in (5, 9, 3)],
                          [[vocab - 1, vocab - 2] + torch.randint(1, vocab, (n,), generator=g).tolist()
                           for n in (7, 4, 10)])
    results = {"padded_rows": actor.model[0].module.output_layer.weight.shape[0] * tp}
    results["logp"], results["entropy"] = actor.compute_logprobs(batch)
    actor.sft_step(batch)
    results["trained_logp"], results["trained_entropy"] = actor.compute_logprobs(batch)
    weight = actor.model[0].module.output_layer.weight.detach()
    rows = [torch.empty_like(weight) for _ in range(tp)]
    dist.all_gather(rows, weight.contiguous())
    results["padding_rows_after_step"] = torch.cat(rows)[vocab:]
    if dist.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
