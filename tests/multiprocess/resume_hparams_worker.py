"""torchrun worker: checkpoint an actor, then resume it under changed optimizer settings.

Usage: torchrun --nproc-per-node N resume_hparams_worker.py OUT HF_DIR CKPT save|load [key=value ...]
``save`` trains two steps and checkpoints; ``load`` builds the actor with the overrides (new lr, ...),
resumes and takes one more step. Each rank writes OUT/<phase>_rank<r>.pt: its optimizer's param
groups and its shard of the Adam state.
"""

import sys


def adam_state(actor) -> dict:
    """Hyper-parameters of every param group and this rank's Adam moments, in the optimizer's order."""
    groups, moments = [], []
    for opt in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            groups.append({k: v for k, v in group.items() if k in ("lr", "weight_decay", "betas", "eps", "max_lr")})
            for p in group["params"]:
                state = inner.state[p]
                moments.append({k: state[k].clone() for k in ("exp_avg", "exp_avg_sq", "step")})
    return {"groups": groups, "moments": moments}


def main() -> None:
    import torch

    from megatron_fipo.actor.actor import build_actor
    from megatron_fipo.actor.checkpoint import load_checkpoint, save_checkpoint
    from megatron_fipo.bridge.hf_io import HFCheckpointReader
    from megatron_fipo.bridge.weights import load_hf_weights
    from megatron_fipo.config import TrainerSections
    from megatron_fipo.config_base import apply_overrides, from_dict
    from megatron_fipo.sequences import SequenceBatch

    out, hf_dir, ckpt, phase, *overrides = sys.argv[1:]
    data = apply_overrides({"actor": {"model_config": hf_dir, "precision": "fp32"},
                            "optim": {"lr": 1e-3, "lr_warmup_steps": 0, "weight_decay": 0.1}}, overrides)
    reader = HFCheckpointReader(hf_dir)
    actor = build_actor(from_dict(TrainerSections, data), reader.arch())
    load_hf_weights(actor, reader)

    def step(seed: int):
        g = torch.Generator().manual_seed(seed)
        seqs = SequenceBatch([torch.randint(1, 256, (5,), generator=g).tolist() for _ in range(4)],
                             [torch.randint(1, 256, (6,), generator=g).tolist() for _ in range(4)])
        rank, size = actor.ps.get_data_parallel_rank(), actor.dp_size
        mine = seqs.select(list(range(rank, 4, size)))
        logp, _ = actor.compute_logprobs(mine)
        return actor.train_step(mine, logp - 0.1, torch.randn(4, generator=g)[rank::size])

    result = {}
    if phase == "save":
        step(1), step(2)
        save_checkpoint(actor, ckpt, 2, {})
        result["state"] = adam_state(actor)
    else:
        load_checkpoint(actor, ckpt)
        result["state"] = adam_state(actor)
        result["next_step_lr"] = step(3).lr
    torch.save(result, f"{out}/{phase}_rank{torch.distributed.get_rank()}.pt")


if __name__ == "__main__":
    main()
