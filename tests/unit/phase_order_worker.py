"""The tiny job, run by the real CLI, with a recorder around its real actor, engine and checkpoint writer.

Usage: python phase_order_worker.py OUT_DIR [key=value ...]  (the overrides go to `megatron-fipo train`).
Runs the job twice in this process, with actor.offload=true and =false; for each, OUT_DIR/<on|off>/
gets calls.json (every call that takes or frees memory, in order, with the bytes the actor's
storages hold on the device at that call) and params.pt (the final weights).
"""

import json
import sys
from pathlib import Path

ACTOR_CALLS = {"offload", "onload", "compute_logprobs", "train_step", "sft_step"}
ENGINE_CALLS = {"resume", "pause", "generate", "stream", "update_weights"}


class Recorder:
    """Forwards everything to ``target``; calls of ``methods`` are appended to ``log`` first."""

    def __init__(self, target, name: str, methods: set[str], log: list):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_methods", methods)
        object.__setattr__(self, "_log", log)

    def __getattr__(self, attr):
        value = getattr(self._target, attr)
        if attr not in self._methods:
            return value

        def recorded(*args, **kwargs):
            self._log.append(_entry(f"{self._name}.{attr}"))
            return value(*args, **kwargs)

        return recorded

    def __setattr__(self, attr, value):
        setattr(self._target, attr, value)


ACTORS: list = []


def _entry(call: str) -> dict:
    # Measured, not inferred from the call order: bytes the actor's storages hold right now.
    return {"call": call, "actor_device_bytes": ACTORS[0].offloader.device_bytes() if ACTORS else None}


def main() -> None:
    import torch

    from megatron_fipo import cli, loop

    out, *overrides = sys.argv[1:]
    log: list[dict] = []
    build_actor, build_engine, save_checkpoint = loop.build_actor, loop.build_engine, loop.save_checkpoint

    def recorded_actor(*args, **kwargs):
        actor = build_actor(*args, **kwargs)
        ACTORS.append(actor)
        return Recorder(actor, "actor", ACTOR_CALLS, log)

    def recorded_save(*args, **kwargs):
        log.append(_entry("checkpoint.save"))
        return save_checkpoint(*args, **kwargs)

    loop.build_actor = recorded_actor
    loop.build_engine = lambda *a, **k: Recorder(build_engine(*a, **k), "engine", ENGINE_CALLS, log)
    loop.save_checkpoint = recorded_save
    for name, offload in (("on", "true"), ("off", "false")):
        log.clear()
        ACTORS.clear()
        run = Path(out, name)
        assert cli.main(["train", "examples/tiny_cpu.yaml", f"run_dir={run}", *overrides, f"actor.offload={offload}"]) == 0
        (run / "calls.json").write_text(json.dumps(log))
        torch.save([p.detach().clone() for c in ACTORS[0].chunks for p in c.parameters()], run / "params.pt")


if __name__ == "__main__":
    main()
