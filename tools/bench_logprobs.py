"""Peak memory of chunked vocab-parallel logprobs vs a plain full-vocabulary log_softmax.

Forward and backward of per-token logprobs + entropy from final hidden states [L, 1, H] through
an output layer [V, H], at a long sequence. Prints both peaks, their ratio, and the max error.
"""

from __future__ import annotations

import argparse

import torch
from benchlib import mib, peak_bytes, time_fn

from megatron_fipo.actor.logprobs import LogprobContext, logprob_output_processor, reference_logprob_entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=1024)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.seq, 1, args.hidden, generator=g, requires_grad=True)
    weight = (0.05 * torch.randn(args.vocab, args.hidden, generator=g)).requires_grad_()
    labels = torch.randint(args.vocab, (1, args.seq), generator=g)

    def output_layer(h, weight):
        return h @ weight.T, None

    def chunked():
        ctx = LogprobContext(1.0, args.chunk, None, 0, 1, False)
        logp = logprob_output_processor(hidden_states=hidden, output_layer=output_layer, output_weight=weight,
                                        labels=labels, context=ctx)
        logp.sum().backward()
        return logp.detach(), ctx.entropy

    def plain():
        logp, ent = reference_logprob_entropy((hidden @ weight.T)[:, 0], labels[0])
        logp.sum().backward()
        return logp.detach(), ent.detach()

    (a, ea), (b, eb) = chunked(), plain()
    err = max((a[0] - b).abs().max().item(), (ea[0] - eb).abs().max().item())
    peaks = {"chunked vocab-parallel": peak_bytes(chunked), "plain log_softmax": peak_bytes(plain)}
    times = {"chunked vocab-parallel": time_fn(chunked, repeats=3), "plain log_softmax": time_fn(plain, repeats=3)}
    full = args.seq * args.vocab * 4
    print(f"L={args.seq} V={args.vocab} H={args.hidden} chunk={args.chunk}; fp32 [L, V] logits = {mib(full).strip()}")
    for name in peaks:
        print(f"{name:<24} peak {mib(peaks[name])}  time {times[name] * 1e3:8.1f} ms")
    ratio = peaks["chunked vocab-parallel"] / peaks["plain log_softmax"]
    print(f"peak ratio chunked / plain = {ratio:.3f} (goal <= 0.25); max |difference| = {err:.2e}")


if __name__ == "__main__":
    main()
