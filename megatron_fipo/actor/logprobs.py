"""Per-token logprobs and entropy, vocab-parallel and chunked along the sequence.

Each tensor-parallel rank holds logits for its vocabulary slice only; the log-normalizer, the
target logit and the entropy are assembled with two small all-reduces per chunk, so no rank ever
holds full-vocabulary logits. The output layer runs chunk by chunk under activation checkpointing,
so the live fp32 logits are [chunk, vocab / TP], never [sequence, vocab / TP].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """logits [n, V/TP] (any float dtype), target [n] global ids -> (logp [n], entropy [n]) fp32.

    Entropy is a diagnostic: it carries no gradient (FIPO and DAPO use no entropy bonus). Columns
    at or past ``vocab_size`` pad the vocabulary for TP: they are -inf, outside the softmax.
    """

    @staticmethod
    def forward(ctx, logits, target, inv_temperature, vocab_start, group, vocab_size=None):
        z = logits.float() * inv_temperature  # a fresh fp32 tensor: safe to modify in place
        vocab_local = z.shape[-1]
        padding = None
        if vocab_size is not None and vocab_start + vocab_local > vocab_size:
            padding = torch.arange(vocab_start, vocab_start + vocab_local, device=z.device) >= vocab_size
            z.masked_fill_(padding, float("-inf"))
        zmax = z.max(dim=-1).values
        if group is not None:
            dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
        z.sub_(zmax.unsqueeze(-1))
        local_idx = target - vocab_start
        in_shard = (local_idx >= 0) & (local_idx < vocab_local)
        local_idx = local_idx.clamp(0, vocab_local - 1)
        exp = torch.exp(z)
        if padding is not None:
            z.masked_fill_(padding, 0.0)  # exp is 0 there: keeps 0 * -inf (NaN) out of the entropy
        parts = torch.stack([
            exp.sum(dim=-1),
            (exp * z).sum(dim=-1),
            z.gather(-1, local_idx.unsqueeze(-1)).squeeze(-1) * in_shard,
        ])
        if group is not None:
            dist.all_reduce(parts, group=group)
        sum_exp, sum_ez, target_z = parts
        log_z = torch.log(sum_exp)
        logp = target_z - log_z
        entropy = log_z - sum_ez / sum_exp
        probs = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(probs, local_idx, in_shard)
        ctx.inv_temperature = inv_temperature
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        probs, local_idx, in_shard = ctx.saved_tensors
        # d logp / d z = onehot(target) - softmax(z); z = logits / T.
        scale = grad_logp * ctx.inv_temperature
        grad = probs.mul_(-scale.unsqueeze(-1))
        grad.scatter_add_(-1, local_idx.unsqueeze(-1), (scale * in_shard).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_logprob_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 1.0,
    vocab_start: int = 0,
    group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of ``target`` and entropy under softmax(logits / temperature), over the TP group.

    logits [..., V/TP] hold vocabulary ids [vocab_start, vocab_start + V/TP) of this rank; ids from
    ``vocab_size`` on (the padding of a vocabulary TP does not divide) are left out.
    """
    shape = target.shape
    logp, ent = _VocabParallelLogprobEntropy.apply(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), 1.0 / temperature, vocab_start, group, vocab_size
    )
    return logp.view(shape), ent.view(shape)


def reference_logprob_entropy(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0):
    """Full-vocabulary log_softmax, for tests and benchmarks."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@dataclass
class LogprobContext:
    """Passed through GPTModel.forward as output_processor_context; collects the entropy."""

    temperature: float
    chunk_size: int
    tp_group: Optional[dist.ProcessGroup]
    tp_rank: int
    tp_size: int
    sequence_parallel: bool
    entropy: Optional[torch.Tensor] = None
    vocab_size: Optional[int] = None  # the model's; the output layer's rows beyond it pad for TP


def logprob_output_processor(*, hidden_states, output_layer, output_weight, labels, context: LogprobContext, **_):
    """GPTModel output_processor: hidden [s(/TP with SP), b, h], labels [b, s] -> logp [b, s] fp32.

    With sequence parallelism the output layer all-gathers each local chunk across TP ranks, so a
    chunk's rows are TP-rank-major; ``positions`` maps them back to sequence order.
    """
    s_local, batch = hidden_states.shape[:2]
    targets = labels.transpose(0, 1)  # [s, b]
    gather = context.tp_size if context.sequence_parallel else 1
    vocab_local = output_weight.shape[0] if output_weight is not None else output_layer.weight.shape[0]
    vocab_start = context.tp_rank * vocab_local
    group = context.tp_group if context.tp_size > 1 else None

    def score(h_chunk, t_chunk):
        logits, _ = output_layer(h_chunk, weight=output_weight)
        return vocab_parallel_logprob_entropy(logits, t_chunk, context.temperature, vocab_start, group,
                                              context.vocab_size)

    logps, ents, positions = [], [], []
    for start in range(0, s_local, context.chunk_size):
        end = min(s_local, start + context.chunk_size)
        pos = (torch.arange(gather).unsqueeze(1) * s_local + torch.arange(start, end).unsqueeze(0)).flatten()
        t_chunk = targets[pos.to(targets.device)]
        h_chunk = hidden_states[start:end]
        if torch.is_grad_enabled():
            logp, ent = checkpoint(score, h_chunk, t_chunk, use_reentrant=False)
        else:
            logp, ent = score(h_chunk, t_chunk)
        logps.append(logp)
        ents.append(ent)
        positions.append(pos)
    logp, ent = torch.cat(logps), torch.cat(ents)
    if gather > 1:
        order = torch.argsort(torch.cat(positions)).to(logp.device)
        logp, ent = logp[order], ent[order]
    context.entropy = ent.transpose(0, 1).contiguous()
    return logp.transpose(0, 1).contiguous()
