"""Bridge export throughput (Megatron shards -> HF-named buckets) vs plain tensor copy bandwidth.

Also prints the export's peak extra memory at several bucket sizes: it follows the bucket, not the
model size.
"""

from __future__ import annotations

import argparse

import torch
from benchlib import mib, peak_bytes, time_fn

from megatron_fipo.actor.actor import build_actor
from megatron_fipo.bridge.weights import iter_hf_buckets
from megatron_fipo.config import ActorConfig, TrainerSections
from megatron_fipo.model_arch import ModelArch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    arch = ModelArch.from_hf_config({
        "model_type": "qwen2", "vocab_size": 32768, "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
        "num_hidden_layers": args.layers, "num_attention_heads": 16, "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
    })
    actor = build_actor(TrainerSections(actor=ActorConfig(model_config="(inline)", precision="fp32")), arch)
    params = [p for c in actor.chunks for p in c.parameters()]
    total = sum(p.numel() * p.element_size() for p in params)

    def export(bucket_bytes):
        n = 0
        for bucket in iter_hf_buckets(actor, bucket_bytes):
            n += sum(t.numel() * t.element_size() for _, t in bucket)
        return n

    def copy():
        return [p.detach().clone() for p in params]

    assert export(256 * 2**20) == total
    t_export = time_fn(lambda: export(256 * 2**20), repeats=3)
    t_copy = time_fn(copy, repeats=3)
    print(f"model {total / 2**30:.2f} GiB fp32 ({sum(p.numel() for p in params) / 1e6:.0f}M params), "
          f"threads={torch.get_num_threads()}")
    print(f"bridge export : {total / t_export / 1e9:6.2f} GB/s ({t_export:.3f} s)")
    print(f"tensor copy   : {total / t_copy / 1e9:6.2f} GB/s ({t_copy:.3f} s)")
    print(f"ratio export / copy = {t_copy / t_export:.2f} (goal on CPU >= 0.5)")
    for bucket_mb in (16, 64, 256):
        print(f"bucket {bucket_mb:4d} MiB: peak extra memory during export {mib(peak_bytes(lambda: export(bucket_mb * 2**20)))}")


if __name__ == "__main__":
    main()
