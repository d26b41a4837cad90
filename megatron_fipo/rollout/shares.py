"""The step's samples to the trainer ranks: each data-parallel rank receives only its share, as tensors, on gloo.

Rank 0 holds the rollout. It splits every PPO mini-batch over the DP ranks with equal tokens
(``algo/balance.py``) and sends each DP rank its share as four tensors: a header of sizes, int32
lengths and token ids, fp32 advantages and rollout logprobs, and the step's metrics as JSON bytes
(no pickle: nothing a rank receives is executed). That is 4 bytes per prompt token and 8 per
response token: 7.6 per token on 500-token prompts with 500-8,000-token responses of a 152k
vocabulary, where the pickled ``Sample``s that every rank received before took 12.2.

Everything travels on a CPU (gloo) group, so no collective runs on the GPU communicator while
SGLang holds the GPUs. The ranks with the same DP rank (the TP, PP and CP ranks of one model
replica) need the same share: rank 0 sends it once, to the lowest of them, which broadcasts it to
the others on a gloo group of their own. Rank 0 thus sends each sample once, and the fan-out runs
in parallel across replicas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megatron_fipo.algo.balance import minibatch_shares
from megatron_fipo.rollout.base import Sample
from megatron_fipo.sequences import SequenceBatch

_HEADER = 5  # samples, mini-batches, token ids, response tokens, stats bytes; samples = -1: no batch


@dataclass
class Share:
    """One DP rank's samples for the step, mini-batch after mini-batch."""

    seqs: SequenceBatch
    rollout_logp: torch.Tensor  # [B, longest response] fp32, 0 on padding: the engine's logprobs
    advantages: torch.Tensor  # [B] fp32, computed per prompt group before the split
    minibatches: list[list[int]]  # rows of each PPO mini-batch, in order
    stats: dict[str, float]  # the step's rollout metrics, the same on every rank
    received_bytes: int = 0  # what this rank received for it (rank 0 keeps its own: 0)


@dataclass
class _Message:
    header: torch.Tensor  # int64 [_HEADER]
    ints: torch.Tensor  # int32: prompt lengths [B], response lengths [B], mini-batch sizes [M], token ids
    floats: torch.Tensor  # fp32: advantages [B], rollout logprobs of each response token
    text: torch.Tensor  # uint8: the stats as JSON

    def tensors(self) -> list[torch.Tensor]:
        return [self.header, self.ints, self.floats, self.text]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @classmethod
    def empty(cls, header: torch.Tensor) -> "_Message":
        """Buffers to receive the message that ``header`` announces."""
        b, m, n_ids, n_logp, n_text = (max(v, 0) for v in header.tolist())
        return cls(header, torch.empty(2 * b + m + n_ids, dtype=torch.int32), torch.empty(b + n_logp, dtype=torch.float32),
                   torch.empty(n_text, dtype=torch.uint8))


_NO_BATCH = _Message.empty(torch.tensor([-1, 0, 0, 0, 0], dtype=torch.int64))


def pack_shares(groups: list[list[Sample]], advantages: torch.Tensor, stats: dict[str, float],
                minibatch_size: int, dp: int) -> list[_Message]:
    """Rank 0: each DP rank's share of the step's samples, ready to send (index = DP rank).

    ``advantages`` [samples]: per sample, in the order of ``groups`` flattened. Mini-batches are
    ``minibatch_size`` consecutive samples (whole prompt groups), each split by tokens over ``dp``.
    """
    samples = [s for g in groups for s in g]
    for i, s in enumerate(samples):
        if len(s.logprobs) != len(s.response_ids):
            raise ValueError(f"sample {i}: {len(s.logprobs)} rollout logprobs for {len(s.response_ids)} response tokens")
    text = torch.frombuffer(bytearray(json.dumps(stats).encode()), dtype=torch.uint8)
    costs = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    messages = []
    for minibatches in minibatch_shares(costs, minibatch_size, dp):
        order = [i for mb in minibatches for i in mb]
        mine = [samples[i] for i in order]
        ids = [t for s in mine for t in (*s.prompt_ids, *s.response_ids)]
        logps = [x for s in mine for x in s.logprobs]
        ints = torch.tensor([len(s.prompt_ids) for s in mine] + [len(s.response_ids) for s in mine]
                            + [len(mb) for mb in minibatches] + ids, dtype=torch.int32)
        floats = torch.cat([advantages[order].float(), torch.tensor(logps, dtype=torch.float32)])
        header = torch.tensor([len(mine), len(minibatches), len(ids), len(logps), text.numel()], dtype=torch.int64)
        messages.append(_Message(header, ints, floats, text))
    return messages


def _unpack(msg: _Message, received_bytes: int) -> Optional[Share]:
    b, m, _, _, _ = msg.header.tolist()
    if b < 0:
        return None
    ints = msg.ints.tolist()
    prompt_lens, response_lens, sizes, ids = ints[:b], ints[b:2 * b], ints[2 * b:2 * b + m], ints[2 * b + m:]
    prompts, responses, at = [], [], 0
    for p, r in zip(prompt_lens, response_lens):
        prompts.append(ids[at:at + p])
        responses.append(ids[at + p:at + p + r])
        at += p + r
    lengths = torch.tensor(response_lens, dtype=torch.long)
    rollout_logp = torch.zeros(b, max(response_lens, default=0), dtype=torch.float32)
    rollout_logp[torch.arange(rollout_logp.shape[1]) < lengths.unsqueeze(1)] = msg.floats[b:]  # row-major, as packed
    starts = [sum(sizes[:k]) for k in range(m)]
    return Share(SequenceBatch(prompts, responses), rollout_logp, msg.floats[:b].clone(),
                 [list(range(a, a + n)) for a, n in zip(starts, sizes)], json.loads(bytes(msg.text.tolist()).decode()),
                 received_bytes)


class ShareChannel:
    """Rank 0 -> every rank, its DP rank's share. Built by every rank at the same point (it makes groups).

    ``group``: a gloo group of every rank (``StopFlag.group``), None in a single process.
    """

    def __init__(self, group, dp_rank: int, timeout: timedelta):
        self._group = group
        self._peers = None  # gloo group of the ranks with this rank's DP rank, when there are several
        self._leader = 0  # the rank that hands this rank's DP rank its share
        self._leaders = [0]  # rank 0: the leader of each DP rank
        if group is None:
            return
        ranks = dist.get_process_group_ranks(group)
        gathered = [torch.zeros(1, dtype=torch.int64) for _ in ranks]
        dist.all_gather(gathered, torch.tensor([dp_rank], dtype=torch.int64), group=group)
        members: dict[int, list[int]] = {}
        for rank, d in zip(ranks, (int(t) for t in gathered)):
            members.setdefault(d, []).append(rank)
        if sorted(members) != list(range(len(members))) or members[0][0] != 0:
            raise RuntimeError(f"ShareChannel: DP ranks {sorted(members)} are not 0..n-1 with rank 0 in DP rank 0")
        self._leaders = [members[d][0] for d in range(len(members))]
        self._leader = members[dp_rank][0]
        for d in range(len(members)):  # every rank creates every group, in the same order
            if len(members[d]) > 1:
                peers = dist.new_group(members[d], backend="gloo", timeout=timeout)
                if d == dp_rank:
                    self._peers = peers

    def hand_out(self, messages: Optional[list[_Message]] = None) -> Optional[Share]:
        """Every rank's share; rank 0 passes ``pack_shares``'s messages, None when the rollout kept nothing.

        Returns None on every rank when rank 0 had nothing. A collective: every rank calls it.
        """
        rank = dist.get_rank() if self._group is not None else 0
        if rank == 0:
            if messages is not None and len(messages) != len(self._leaders):
                raise ValueError(f"ShareChannel: {len(messages)} shares for {len(self._leaders)} DP ranks")
            messages = messages or [_NO_BATCH] * len(self._leaders)
            sends = [dist.isend(t, dst=leader, group=self._group, tag=k)
                     for leader, msg in zip(self._leaders[1:], messages[1:]) for k, t in enumerate(msg.tensors()) if t.numel()]
            self._fan_out(messages[0])
            for work in sends:
                work.wait()
            return _unpack(messages[0], 0)
        if rank == self._leader:
            msg = self._receive(lambda t, k: dist.recv(t, src=0, group=self._group, tag=k))
            self._fan_out(msg)
        else:
            msg = self._receive(lambda t, k: dist.broadcast(t, src=self._leader, group=self._peers))
        return _unpack(msg, msg.nbytes)

    def _fan_out(self, msg: _Message) -> None:
        """The DP rank's leader: the share to the other ranks of its DP rank."""
        if self._peers is not None:
            for t in msg.tensors():
                if t.numel():
                    dist.broadcast(t, src=self._leader, group=self._peers)

    @staticmethod
    def _receive(take) -> _Message:
        """The header, then the buffers it announces (empty ones are never sent)."""
        header = torch.zeros(_HEADER, dtype=torch.int64)
        take(header, 0)
        msg = _Message.empty(header)
        for k, t in enumerate(msg.tensors()[1:], start=1):
            if t.numel():
                take(t, k)
        return msg
