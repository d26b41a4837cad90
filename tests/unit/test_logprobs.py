"""Chunked vocab-parallel logprobs/entropy against a plain full-vocabulary log_softmax."""

import pytest
import torch

from megatron_fipo.actor.logprobs import (
    LogprobContext,
    logprob_output_processor,
    reference_logprob_entropy,
    vocab_parallel_logprob_entropy,
)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kernel_matches_log_softmax_values_and_gradient(temperature):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(37, 101, generator=g, dtype=torch.float64)).float().requires_grad_()
    target = torch.randint(101, (37,), generator=g)
    logp, ent = vocab_parallel_logprob_entropy(logits, target, temperature)
    ref_logits = logits.detach().clone().requires_grad_()
    ref_logp, ref_ent = reference_logprob_entropy(ref_logits, target, temperature)
    # Logprobs here reach ~-17: float32 rounding scales with the value (1.9e-6 seen on one machine).
    torch.testing.assert_close(logp, ref_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-6, atol=1e-6)
    weights = torch.randn(37, generator=g)
    (logp * weights).sum().backward()
    (ref_logp * weights).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6 * ref_logits.grad.abs().max().item())
    assert not ent.requires_grad  # entropy is a diagnostic only


def test_vocab_shards_assemble_like_the_full_vocabulary():
    # Two "TP ranks" computed by hand: the shard-local sums the kernel all-reduces add up.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 8, generator=g)
    target = torch.tensor([0, 3, 4, 7, 5])
    ref_logp, _ = reference_logprob_entropy(logits, target)
    zmax = logits.max(-1, keepdim=True).values
    parts = []
    for start in (0, 4):
        z = logits[:, start:start + 4] - zmax
        local = target - start
        inside = (local >= 0) & (local < 4)
        parts.append((z.exp().sum(-1), (z.gather(-1, local.clamp(0, 3).unsqueeze(-1)).squeeze(-1) * inside)))
    logp = sum(p[1] for p in parts) - torch.log(sum(p[0] for p in parts))
    torch.testing.assert_close(logp, ref_logp, rtol=1e-6, atol=1e-6)


def test_chunked_output_processor_matches_unchunked_and_is_order_preserving():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(50, 2, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    labels = torch.randint(40, (2, 50), generator=g)

    def output_layer(h, weight):
        return h @ weight.T, None

    out = {}
    for chunk in (7, 50):
        ctx = LogprobContext(1.0, chunk, None, 0, 1, False)
        logp = logprob_output_processor(hidden_states=hidden, output_layer=output_layer, output_weight=weight,
                                        labels=labels, context=ctx)
        grad_h, grad_w = torch.autograd.grad(logp.sum(), (hidden, weight))
        out[chunk] = (logp.detach(), ctx.entropy, grad_h, grad_w)
    ref, _ = reference_logprob_entropy((hidden @ weight.T).transpose(0, 1), labels)
    torch.testing.assert_close(out[7][0], ref.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(out[7], out[50]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_vocabulary_padding_columns_are_outside_the_softmax():
    """Columns from vocab_size on (rows that pad the vocabulary for TP) hold large logits here; the
    result equals the unpadded log_softmax, entropy included (no NaN from 0 * -inf), and they get no gradient."""
    g = torch.Generator().manual_seed(3)
    real = (3 * torch.randn(11, 101, generator=g)).requires_grad_()
    pad = torch.full((11, 3), 50.0)
    target = torch.randint(101, (11,), generator=g)
    logits = torch.cat([real, pad], dim=-1).detach().requires_grad_()
    logp, ent = vocab_parallel_logprob_entropy(logits, target, 0.7, vocab_size=101)
    ref_logp, ref_ent = reference_logprob_entropy(real, target, 0.7)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-6, atol=1e-6)
    logp.sum().backward()
    ref_logp.sum().backward()
    assert torch.equal(logits.grad[:, 101:], torch.zeros(11, 3))
    torch.testing.assert_close(logits.grad[:, :101], real.grad, rtol=1e-5, atol=1e-7)
