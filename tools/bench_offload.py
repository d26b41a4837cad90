"""Offload / onload of a Megatron actor between phases: seconds and bytes each way.

Builds a tiny and a ~100M-parameter Qwen2-shaped actor (fp32 and bf16, distributed optimizer),
takes one optimizer step so that the Adam state exists, then times actor.offload() / onload().
For comparison it also measures what Megatron-Core 0.19.2's own helpers free here
(DDP.offload_grad_buffers, optimizer.offload_to_cpu). On a CPU both sides of the copy are host
RAM: the figures are memcpy rates, not PCIe; the GPU figures come from tools/gpu_check.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_fipo.actor.actor import MegatronActor, build_actor
from megatron_fipo.config import ActorConfig, OptimConfig, TrainerSections
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.sequences import SequenceBatch

MODELS = {
    "tiny": {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "100M": {"vocab_size": 16384, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 12, "num_key_value_heads": 4},
}


def make_actor(shape: dict, precision: str, tokens_per_microbatch: int = 4096) -> MegatronActor:
    arch = ModelArch.from_hf_config({"model_type": "qwen2", "max_position_embeddings": 4096, **shape})
    sections = TrainerSections(actor=ActorConfig(model_config="(inline)", precision=precision,
                                                 max_tokens_per_microbatch=tokens_per_microbatch),
                               optim=OptimConfig(lr=1e-5, lr_warmup_steps=0))
    return build_actor(sections, arch)


def random_batch(vocab: int, samples: int, prompt: int, response: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seqs = SequenceBatch([torch.randint(1, vocab, (prompt,), generator=g).tolist() for _ in range(samples)],
                         [torch.randint(1, vocab, (response,), generator=g).tolist() for _ in range(samples)])
    return seqs, torch.randn(samples, generator=g)


def take_a_step(actor: MegatronActor, samples: int = 2, prompt: int = 8, response: int = 8) -> None:
    """One real optimizer step: afterwards the optimizer holds its moments, as between RL steps."""
    seqs, adv = random_batch(actor.arch.vocab_size, samples, prompt, response)
    old, _ = actor.compute_logprobs(seqs)
    actor.train_step(seqs, old, adv)


def measure_cycles(actor: MegatronActor, repeats: int) -> dict:
    """Median offload / onload seconds over ``repeats`` cycles, the bytes each way, and a bit-equality check."""
    params = [p for c in actor.chunks for p in c.parameters()]
    probe = [params[0], params[-1]]
    before = [p.detach().clone() for p in probe]
    device_before = actor.offloader.device_bytes()
    offs, ons, device_offloaded = [], [], []
    for _ in range(repeats):
        off = actor.offload()
        device_offloaded.append(actor.offloader.device_bytes())
        on = actor.onload()
        offs.append(off.seconds)
        ons.append(on.seconds)
    return {
        "params": sum(p.numel() for p in params),
        "device_bytes_before": device_before,
        "device_bytes_offloaded": max(device_offloaded),
        "kept_bytes": off.kept_bytes,
        "dropped_bytes": off.dropped_bytes,
        "host_bytes": actor.offloader.host_bytes,
        "offload_s": statistics.median(offs),
        "onload_s": statistics.median(ons),
        "offload_GBps": off.kept_bytes / statistics.median(offs) / 1e9,
        "onload_GBps": on.kept_bytes / statistics.median(ons) / 1e9,
        "bit_equal": all(torch.equal(a, b) for a, b in zip(before, probe)),
    }


def megatron_own(actor: MegatronActor) -> dict:
    """Bytes Megatron-Core 0.19.2's own offload helpers free on this device, and their seconds."""
    before = actor.offloader.device_bytes()
    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    for chunk in actor.model:
        chunk.offload_grad_buffers(synchronize=cuda, empty_cache=cuda)
    actor.optimizer.offload_to_cpu()  # moves only tensors that are on CUDA
    seconds = time.perf_counter() - start
    freed = before - actor.offloader.device_bytes()
    if cuda:  # it moves every non-CUDA tensor to CUDA: on a CPU it raises
        actor.optimizer.restore_from_cpu()
    for chunk in actor.model:
        chunk.restore_grad_buffers(synchronize=cuda)
    return {"freed_bytes": freed, "of_bytes": before, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("GPU figures: skipped (no CUDA here); tools/gpu_check.py measures them on a GPU node")
    print(f"device {device}, threads {torch.get_num_threads()}")
    for name in args.models:
        for precision in ("fp32", "bf16"):
            actor = make_actor(MODELS[name], precision)
            take_a_step(actor)
            r = measure_cycles(actor, args.repeats)
            own = megatron_own(actor)
            print(f"{name} ({r['params'] / 1e6:.1f}M params) {precision}: device {r['device_bytes_before'] / 2**20:.1f} MiB"
                  f" -> {r['device_bytes_offloaded']} B offloaded; kept {r['kept_bytes'] / 2**20:.1f} MiB"
                  f" (host {r['host_bytes'] / 2**20:.1f} MiB), grads dropped {r['dropped_bytes'] / 2**20:.1f} MiB;"
                  f" offload {r['offload_s'] * 1e3:.1f} ms ({r['offload_GBps']:.1f} GB/s),"
                  f" onload {r['onload_s'] * 1e3:.1f} ms ({r['onload_GBps']:.1f} GB/s); bit-equal {r['bit_equal']}")
            print(f"    Megatron's own helpers free {own['freed_bytes'] / 2**20:.1f} of {own['of_bytes'] / 2**20:.1f} MiB "
                  f"here in {own['seconds'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
