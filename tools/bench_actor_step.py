"""Step time of a ~10M-parameter Megatron actor: FIPO loss vs DAPO loss vs plain NLL backward.

All three run the same forward/backward over the same packed micro-batches; only the loss on the
per-token logprobs differs. Prints median seconds per step and the ratios.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from benchlib import time_fn

from megatron_fipo.actor.actor import build_actor
from megatron_fipo.config import ActorConfig, TrainerSections
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.sequences import SequenceBatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    arch = ModelArch.from_hf_config({
        "model_type": "qwen2", "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 1024,
        "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024,
    })
    sections = TrainerSections(actor=ActorConfig(model_config="(inline)", precision="fp32",
                                                 max_tokens_per_microbatch=2048))
    actor = build_actor(sections, arch)
    params = sum(p.numel() for c in actor.chunks for p in c.parameters())
    g = torch.Generator().manual_seed(0)
    batch = SequenceBatch(
        [torch.randint(1, arch.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(args.samples)],
        [torch.randint(1, arch.vocab_size, (args.response,), generator=g).tolist() for _ in range(args.samples)],
    )
    old, _ = actor.compute_logprobs(batch)
    old = old + 0.05 * torch.randn(old.shape, generator=g)
    adv = torch.randn(args.samples, generator=g)

    def step(kind):
        if kind == "nll":
            return actor._accumulate_gradients(batch, lambda mb, logp, mask: (-(logp * mask).sum(), {}), 1.0)
        actor.sections.actor.loss = kind
        return actor.compute_gradients(batch, old, adv)

    # Round-robin over the three losses so that machine drift hits all of them alike.
    samples: dict[str, list[float]] = {"nll": [], "dapo": [], "fipo": []}
    for kind in samples:
        step(kind)  # warm-up
    for _ in range(args.repeats):
        for kind in samples:
            samples[kind].append(time_fn(lambda k=kind: step(k), repeats=1, warmup=0))
    times = {kind: statistics.median(v) for kind, v in samples.items()}
    tokens = args.samples * (args.prompt + args.response)
    print(f"model {params / 1e6:.1f}M params, {args.samples} samples x {args.prompt + args.response} tokens "
          f"({tokens} tokens, {len(actor.microbatches(batch))} micro-batches), threads={torch.get_num_threads()}")
    for kind, seconds in times.items():
        print(f"{kind}: {seconds:.3f} s/step ({tokens / seconds:,.0f} tokens/s)")
    print(f"FIPO vs DAPO: {times['fipo'] / times['dapo']:.3f}x; FIPO vs NLL (no policy loss): "
          f"{times['fipo'] / times['nll']:.3f}x (goal: FIPO adds < 3%)")


if __name__ == "__main__":
    main()
