"""torchrun worker: the bytes of one rank's actor tensors, for the memory ledger to be checked against.

Usage: torchrun --nproc-per-node N ledger_worker.py OUT_DIR TP CASE [CASE ...]
where CASE is NAME:MODEL_CONFIG_JSON:PRECISION. Each rank writes OUT_DIR/NAME.rank{R}.json with the
parameters (name, numel, element size), the DDP param and grad buffers, and the distributed
optimizer's fp32 main params and Adam moments after one optimizer step (Adam creates its state there).
"""

import json
import sys


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(actor) -> dict:
    params = [(name, p.numel(), p.element_size()) for _, name, p in actor.named_parameters_local()]
    buffers = [b for ddp in actor.model for b in ddp.buffers]
    # The step adds zero gradients: Adam allocates exp_avg / exp_avg_sq for every shard element.
    actor.optimizer.zero_grad()
    actor.optimizer.step()
    distributed = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
    main_params = sum(tensor_bytes(t for group in opt.shard_fp32_from_float16_groups for t in group)
                      for opt in distributed)
    moments = sum(tensor_bytes(v for state in opt.optimizer.state.values() for k, v in state.items()
                               if k in ("exp_avg", "exp_avg_sq"))
                  for opt in distributed)
    return {
        "dp_rank": actor.ps.get_data_parallel_rank(with_context_parallel=True),
        "params": params,
        "param_bytes": sum(n * size for _, n, size in params),
        "param_buffer_bytes": tensor_bytes(b.param_data for b in buffers if b.param_data is not None),
        "grad_buffer_bytes": tensor_bytes(b.grad_data for b in buffers),
        "main_param_bytes": main_params,
        "moment_bytes": moments,
    }


def main() -> None:
    import torch

    from megatron_fipo.actor.actor import build_actor
    from megatron_fipo.config import TrainerSections
    from megatron_fipo.config_base import from_dict
    from megatron_fipo.model_arch import ModelArch

    out, tp, *cases = sys.argv[1:]
    for case in cases:
        name, model_config, precision = case.split(":")
        sections = from_dict(TrainerSections, {
            "actor": {"model_config": model_config, "precision": precision},
            "parallel": {"tensor_model_parallel_size": int(tp)},
            "optim": {"lr": 1e-3, "lr_warmup_steps": 0},
        })
        actor = build_actor(sections, ModelArch.from_hf_config(model_config))
        result = measure(actor)
        with open(f"{out}/{name}.rank{torch.distributed.get_rank()}.json", "w") as f:
            json.dump(result, f)
        del actor


if __name__ == "__main__":
    main()
