"""Actor checkpoints with megatron.core.dist_checkpointing: atomic, keep-last-N, DP-reshardable.

Layout under ``root``: ``step_00000012/`` (one dist checkpoint per saved step) and ``latest``
(the newest complete step). A save goes to a hidden temp dir that is renamed only after every rank
finished writing, so a crash mid-save never leaves a checkpoint that looks complete.

The model's part of a checkpoint is layout-free (sharded tensors with global offsets): model
weights alone, as ``megatron-fipo convert`` writes them, load at any TP/PP.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_fipo.actor.offload import inner_optimizers
from megatron_fipo.actor.writer_queue import start_writer_queue

LATEST = "latest"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def latest_step(root: str | Path) -> Optional[int]:
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    step = int(path.read_text().strip())
    return step if _step_dir(Path(root), step).is_dir() else None


def _rng_state() -> torch.Tensor:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    states = [torch.get_rng_state()]
    if torch.cuda.is_available():
        states.append(torch.cuda.get_rng_state())
    states += [s for _, s in sorted(get_cuda_rng_tracker().get_states().items())]
    return torch.cat([s.view(-1).to(torch.uint8).cpu() for s in states])


def _set_rng_state(flat: torch.Tensor) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    names = sorted(tracker.get_states())
    sizes = [torch.get_rng_state().numel()]
    if torch.cuda.is_available():
        sizes.append(torch.cuda.get_rng_state().numel())
    sizes += [tracker.get_states()[n].numel() for n in names]
    parts = list(flat.split(sizes))
    torch.set_rng_state(parts.pop(0))
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(parts.pop(0))
    tracker.set_states({n: p.clone() for n, p in zip(names, parts)})


def _model_state(chunks: list) -> dict:
    return {f"model{i}": chunk.sharded_state_dict(prefix="") for i, chunk in enumerate(chunks)}


def _sharded_state(actor, is_loading: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    ps = actor.ps
    model = _model_state(actor.chunks)
    combined = {k: v for sd in model.values() for k, v in sd.items()}
    state = dict(model)
    # A never-stepped optimizer (a checkpoint before the first update, or a fresh one about to load)
    # has no state to describe: give it the state its first step starts from.
    _init_fresh_optimizer_state(actor.optimizer)
    # dp_reshardable: every rank writes its own optimizer shard in parallel, and a resume may use
    # a different DP size (TP/PP must match: convert through HF weights to change those).
    state["optimizer"] = actor.optimizer.sharded_state_dict(
        combined, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
    )
    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    rng = _rng_state()
    # One RNG state per (PP, TP) position; DP replicas share it, so a different DP size resumes.
    state["rng"] = ShardedTensor.from_rank_offsets(
        "rng_state", rng.unsqueeze(0).unsqueeze(0),
        (0, pp, ps.get_pipeline_model_parallel_world_size()),
        (1, tp, ps.get_tensor_model_parallel_world_size()),
        replica_id=ps.get_data_parallel_rank(),
    )
    return state


def _save_atomically(state: dict, final: Path, files: dict[str, bytes] | None = None) -> None:
    """dist_checkpointing.save into a hidden sibling of ``final``, renamed once every rank is done.

    ``files`` (relative path -> bytes) are written by rank 0 beside the shards before the rename.
    """
    from megatron.core import dist_checkpointing

    tmp = final.with_name(f".tmp_{final.name}")
    if _rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    start_writer_queue()  # before Megatron's own: see writer_queue.py
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank() == 0:
        for name, data in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)


def save_checkpoint(actor, root: str | Path, step: int, extra: dict[str, Any], keep_last: int = 2) -> Path:
    """Save model, optimizer, scheduler, RNG, step and ``extra`` (data position, ...) atomically.

    ``extra`` must hold only plain values and tensors: it is loaded with torch.load(weights_only=True).
    """
    root = Path(root)
    final = _step_dir(root, step)
    state = _sharded_state(actor, is_loading=False)
    state["common"] = {
        "step": step,
        "optimizer_steps": actor.steps,
        "skipped_updates": actor.skipped_updates,
        "scheduler": actor.scheduler.state_dict(),
        "extra": extra,
    }
    _save_atomically(state, final)
    if _rank() == 0:
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(f"{step}\n")
        os.replace(pointer, root / LATEST)
        steps = sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(_step_dir(root, old), ignore_errors=True)
    _barrier()
    return final


def save_model_weights(chunks: list, directory: str | Path, files: dict[str, bytes] | None = None) -> Path:
    """Model weights alone as one dist checkpoint at ``directory`` (atomic), plus ``files`` beside them."""
    final = Path(directory)
    _save_atomically(_model_state(chunks), final, files)
    _barrier()
    return final


def model_checkpoint_dir(path: str | Path) -> Path:
    """A dist checkpoint itself, or the newest step of a checkpoints root (the ``latest`` file)."""
    path = Path(path)
    step = latest_step(path)
    if step is not None:
        return _step_dir(path, step)
    if (path / "metadata.json").is_file():
        return path
    raise FileNotFoundError(f"{path}: not a Megatron dist checkpoint (no metadata.json) and not a checkpoints "
                            f"directory (no {LATEST!r} file naming a complete step)")


@torch.no_grad()
def load_model_weights(chunks: list, path: str | Path) -> Path:
    """Model weights only (no optimizer, RNG or step) from a converted or a trainer checkpoint, at any TP/PP."""
    from megatron.core import dist_checkpointing

    directory = model_checkpoint_dir(path)
    loaded = dist_checkpointing.load(_model_state(chunks), str(directory))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"])
    return directory


def load_megatron_weights(actor, path: str | Path) -> Path:
    """``load_model_weights`` into the actor, then into the optimizer's own (fp32 / sharded) copy."""
    directory = load_model_weights(actor.chunks, path)
    actor.optimizer.reload_model_params()
    return directory


def _numbers(optimizer: torch.optim.Optimizer) -> list[tuple[dict, object]]:
    """(container, key) of every number or tensor an optimizer keeps besides its params."""
    slots = [(state, key) for state in optimizer.state.values() for key in state]
    slots += [(group, key) for group in optimizer.param_groups for key in group if key != "params"]
    return [(d, k) for d, k in slots if isinstance(d[k], (torch.Tensor, int, float)) and not isinstance(d[k], bool)]


@torch.no_grad()
def init_fresh_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a never-stepped torch optimizer the state its first step starts from, whatever its class.

    Two of its own steps with zero gradients, lr 0 and weight decay 0 create exactly the state it
    defines (torch Adam's per-parameter step, TE/Apex FusedAdam's per-group step, moments, master
    copies) and change nothing else: moments stay 0, weights and master copies stay put, counters
    advance by 1 per step. So ``2 * after_one - after_two`` is each value before the first step,
    exactly (counters 0, everything else as it was), with no optimizer-specific code.
    """
    if any(optimizer.state.values()):  # stepped, or loaded: it has its state
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params:
        return
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    grads = [p.grad for p in params]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        if "weight_decay" in group:
            group["weight_decay"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    first = [(d, k, d[k].clone() if isinstance(d[k], torch.Tensor) else d[k]) for d, k in _numbers(optimizer)]
    optimizer.step()
    for d, k, one in first:
        if isinstance(one, torch.Tensor):
            d[k].copy_(2 * one - d[k])
        else:
            d[k] = 2 * one - d[k]
    for group, before in zip(optimizer.param_groups, settings):
        group.update(before)  # lr, weight decay and every other setting as they were
    for p, grad in zip(params, grads):
        p.grad = grad


def _init_fresh_optimizer_state(optimizer) -> None:
    """A never-stepped Megatron optimizer gets the state its first step starts from.

    Without it, a step-0 checkpoint holds no optimizer state (TE FusedAdam) or cannot be written at
    all (torch Adam, whose step Megatron's state_dict() reads), and a fresh optimizer's load template
    does not match a stepped checkpoint. Resuming from that state equals never having stopped.
    """
    for inner in inner_optimizers(optimizer):
        init_fresh_state(inner)


def _restore_adam_steps(optimizer) -> None:
    """Put the restored step count where torch Adam reads it.

    Without Apex/TE, Megatron's loader leaves the step in param_groups[i]["step"], while torch
    Adam's bias correction reads state[p]["step"]; left alone, a resumed run restarts the bias
    correction at step 0 and drifts from the uninterrupted one.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if not isinstance(inner, torch.optim.Adam):
            continue
        for group in inner.param_groups:
            if "step" in group:
                step = float(group.pop("step"))
                for p in group["params"]:
                    inner.state[p]["step"] = torch.tensor(step, dtype=torch.float32)


# Param-group keys Megatron fills from the optimizer config; the rest of its identifier tells groups apart.
_CONFIG_GROUP_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _take_current_hyperparameters(optimizer, saved: Any) -> None:
    """Give the saved param groups this run's hyper-parameters, keeping their state (e.g. Adam's step).

    Megatron matches saved groups to current ones by a tuple that includes max_lr and min_lr, and a
    loaded group brings its lr, weight decay, betas and eps along: a resume with a new optim.lr
    failed with a KeyError, and would otherwise have gone on with the old values. Groups are paired
    by the identifier's other keys (wd_mult, lr_mult, ...), which the config does not set.
    """
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    structural = [k for k in param_group_identifier_keys if k not in _CONFIG_GROUP_KEYS]
    ident = lambda group: tuple(group.get(k) for k in structural)  # noqa: E731
    current = {ident(g): g for opt in getattr(optimizer, "chained_optimizers", [optimizer])
               for g in opt.optimizer.param_groups}

    def visit(node: Any) -> None:  # one "param_groups" list per torch optimizer, however Megatron nests them
        if isinstance(node, dict):
            if isinstance(node.get("param_groups"), list):
                for group in node["param_groups"]:
                    group.update({k: v for k, v in current[ident(group)].items() if k not in ("params", "step")})
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(saved)


@torch.no_grad()
def load_checkpoint(actor, root: str | Path) -> Optional[dict[str, Any]]:
    """Restore the newest complete checkpoint under ``root``; returns its common state, or None."""
    from megatron.core import dist_checkpointing

    step = latest_step(root)
    if step is None:
        return None
    template = _sharded_state(actor, is_loading=True)
    loaded = dist_checkpointing.load(template, str(_step_dir(Path(root), step)))
    for i, chunk in enumerate(actor.chunks):
        chunk.load_state_dict(loaded[f"model{i}"])
    _take_current_hyperparameters(actor.optimizer, loaded["optimizer"])
    actor.optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(actor.optimizer)
    _set_rng_state(loaded["rng"].view(-1))
    common = loaded["common"]
    # The schedule's shape (lr, warmup, decay, weight decay) comes from this run's config; its
    # position (steps taken) from the checkpoint. Megatron would otherwise assert they are unchanged.
    actor.scheduler.override_opt_param_scheduler = True
    actor.scheduler.load_state_dict(common["scheduler"])
    actor.steps = common["optimizer_steps"]
    actor.skipped_updates = common["skipped_updates"]
    return common
