"""Worker for the checkpoint-conversion tests: several conversions in one process (startup is the cost).

Usage: [torchrun --nproc-per-node N] convert_worker.py STAGE ROOT [ROOT ...]
Each ROOT holds hf_untied/ and hf_tied/; each stage reads what the earlier ones wrote there:
  tp1 (1 process): HF -> Megatron at TP=1                             -> mcore_tp1_{tag}
  tp2 (2 ranks):   HF -> Megatron at TP=2                             -> mcore_tp2_{tag}
                   Megatron (written at TP=1) -> HF at TP=2           -> hf_from_tp1_at_tp2_{tag}
                   logprobs at TP=2 of actors loaded from HF and from the TP=1 Megatron checkpoint;
                   of a trained actor and of one loaded from its run checkpoint -> logprobs_{tag}.pt
                   the trained actor's weights, exported by the bridge -> hf_trained_{tag}
  pp2 (2 ranks):   HF -> Megatron at PP=2                             -> mcore_pp2_{tag}
                   Megatron (written at TP=2) -> HF at PP=2           -> hf_from_tp2_at_pp2_{tag}
                   Megatron (written at PP=2) -> HF at PP=2           -> hf_from_pp2_at_pp2_{tag}
                   the run checkpoint (written at TP=2) -> HF at PP=2 -> hf_from_run_at_pp2_{tag}
The conversions alone, for the other model families (one launch each for all their ROOTs):
  tp2-convert (2 ranks): HF -> Megatron at TP=2                       -> mcore_tp2_{tag}
                         Megatron (written at TP=2) -> HF at TP=2     -> hf_from_tp2_at_tp2_{tag}
  pp2-convert (2 ranks): HF -> Megatron at PP=2                       -> mcore_pp2_{tag}
                         Megatron (written at TP=2) -> HF at PP=2     -> hf_from_tp2_at_pp2_{tag}
                         Megatron (written at PP=2) -> HF at PP=2     -> hf_from_pp2_at_pp2_{tag}
Conversions go through the CLI entry point, as `megatron-fipo convert` runs them.
"""

import sys

TAGS = ("untied", "tied")


def convert(*args: str) -> None:
    from megatron_fipo.cli import main

    assert main(["convert", *args]) == 0, args


def logprobs(root: str, tag: str) -> None:
    import torch

    from megatron_fipo.actor.actor import build_actor
    from megatron_fipo.actor.checkpoint import load_megatron_weights, save_checkpoint
    from megatron_fipo.bridge.hf_io import HFCheckpointReader, write_hf_checkpoint
    from megatron_fipo.bridge.weights import iter_hf_buckets, load_hf_weights
    from megatron_fipo.config import ActorConfig, OptimConfig, ParallelConfig, TrainerSections
    from megatron_fipo.sequences import SequenceBatch

    hf = f"{root}/hf_{tag}"
    sections = TrainerSections(actor=ActorConfig(model_config=hf, precision="fp32", seed=7),
                               parallel=ParallelConfig(tensor_model_parallel_size=2),
                               optim=OptimConfig(lr=1e-3, lr_warmup_steps=0))
    g = torch.Generator().manual_seed(0)
    batch = SequenceBatch([torch.randint(1, 256, (n,), generator=g).tolist() for n in (5, 9, 3)],
                          [torch.randint(1, 256, (n,), generator=g).tolist() for n in (7, 4, 10)])
    results = {}
    from_hf = build_actor(sections)
    load_hf_weights(from_hf, HFCheckpointReader(hf))
    results["hf"] = from_hf.compute_logprobs(batch)[0]
    from_mcore = build_actor(sections)
    load_megatron_weights(from_mcore, f"{root}/mcore_tp1_{tag}")
    results["megatron_tp1"] = from_mcore.compute_logprobs(batch)[0]
    # A run's checkpoints directory (its newest step) is a valid source too; its weights have trained.
    from_hf.sft_step(batch)
    results["trained"] = from_hf.compute_logprobs(batch)[0]
    save_checkpoint(from_hf, f"{root}/run_{tag}", step=1, extra={})
    buckets = iter_hf_buckets(from_hf, bucket_bytes=1 << 30)
    if torch.distributed.get_rank() == 0:
        write_hf_checkpoint(f"{root}/hf_trained_{tag}", buckets, from_hf.arch)
    else:
        for _ in buckets:
            pass
    from_run = build_actor(sections)
    load_megatron_weights(from_run, f"{root}/run_{tag}")
    results["trainer_checkpoint"] = from_run.compute_logprobs(batch)[0]
    if torch.distributed.get_rank() == 0:
        torch.save(results, f"{root}/logprobs_{tag}.pt")


def main() -> None:
    stage, *roots = sys.argv[1:]
    for root, tag in ((root, tag) for root in roots for tag in TAGS):
        hf = f"{root}/hf_{tag}"
        if stage == "tp1":
            convert("--to", "megatron", hf, f"{root}/mcore_tp1_{tag}")
        elif stage == "tp2-convert":
            convert("--to", "megatron", hf, f"{root}/mcore_tp2_{tag}", "--tp", "2")
            convert("--to", "hf", f"{root}/mcore_tp2_{tag}", f"{root}/hf_from_tp2_at_tp2_{tag}", "--tp", "2")
        elif stage == "pp2-convert":
            convert("--to", "megatron", hf, f"{root}/mcore_pp2_{tag}", "--pp", "2")
            convert("--to", "hf", f"{root}/mcore_tp2_{tag}", f"{root}/hf_from_tp2_at_pp2_{tag}", "--pp", "2")
            convert("--to", "hf", f"{root}/mcore_pp2_{tag}", f"{root}/hf_from_pp2_at_pp2_{tag}", "--pp", "2")
        elif stage == "tp2":
            convert("--to", "megatron", hf, f"{root}/mcore_tp2_{tag}", "--tp", "2")
            convert("--to", "hf", f"{root}/mcore_tp1_{tag}", f"{root}/hf_from_tp1_at_tp2_{tag}", "--tp", "2",
                    "--shard-mb", "0.1")
            logprobs(root, tag)
        elif stage == "pp2":
            convert("--to", "megatron", hf, f"{root}/mcore_pp2_{tag}", "--pp", "2")
            convert("--to", "hf", f"{root}/mcore_tp2_{tag}", f"{root}/hf_from_tp2_at_pp2_{tag}", "--pp", "2")
            convert("--to", "hf", f"{root}/mcore_pp2_{tag}", f"{root}/hf_from_pp2_at_pp2_{tag}", "--pp", "2")
            convert("--to", "hf", f"{root}/run_{tag}", f"{root}/hf_from_run_at_pp2_{tag}", "--pp", "2",
                    "--hf-config", hf)


if __name__ == "__main__":
    main()
