"""Embedded-engine generation speed vs transformers' generate, same model, batch and length.

Both decode greedily-sampled tokens from the same random Qwen2 checkpoint with a KV cache, no
early stop; prints tokens/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from benchlib import time_fn

from megatron_fipo.bridge.hf_io import HFCheckpointReader
from megatron_fipo.bridge.mapping import hf_names
from megatron_fipo.rollout.base import SamplingParams
from megatron_fipo.rollout.embedded import EmbeddedEngine
from megatron_fipo.testing import make_hf_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        make_hf_checkpoint(d, vocab_size=8192, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                           num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4)
        reader = HFCheckpointReader(d)
        arch = reader.arch()
        engine = EmbeddedEngine(arch, max_batch=args.batch)
        engine.update_weights([[(n, reader.read(n)) for n in hf_names(arch)]], version=0)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    params = sum(p.numel() for p in hf.parameters())
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 8192, (args.batch, args.prompt), generator=g)
    sp = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)

    def embedded():
        engine.generate(prompts.tolist(), n=1, sampling=sp, seed=0)

    def transformers_generate():
        with torch.no_grad():
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0, top_k=0,
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)

    tokens = args.batch * args.new_tokens
    t_e, t_h = time_fn(embedded, repeats=3), time_fn(transformers_generate, repeats=3)
    print(f"model {params / 1e6:.1f}M params, batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"threads={torch.get_num_threads()}")
    print(f"embedded engine        : {tokens / t_e:8.0f} tokens/s")
    print(f"transformers generate  : {tokens / t_h:8.0f} tokens/s")
    print(f"ratio embedded / generate = {t_h / t_e:.2f}x (goal >= 1.0)")


if __name__ == "__main__":
    main()
