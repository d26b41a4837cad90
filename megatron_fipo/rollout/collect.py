"""A step's rollout: streaming dynamic sampling (rank 0).

Prompts stream into the engines as capacity frees; each group is scored as soon as it arrives and
kept when its rewards differ (DAPO dynamic sampling). Once ``trainer.prompts_per_step`` groups are
kept the requests still in flight are aborted, so the step waits for none of what it would throw
away. The draw is bounded as generation batches bounded it: at most ``trainer.max_gen_batches *
trainer.gen_prompts_per_batch`` prompts per step; when they are spent the step trains on what it kept.

With ``rollout.partial_rollouts`` the aborted groups (and groups done but not yet kept) are carried
to the next step: their unfinished samples continue from their prefixes, keeping the tokens,
behaviour logprobs and weight versions they have (APRIL / slime --partial-rollout). Carried groups
live in memory only: a resumed run starts without them.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from megatron_fipo.algo import dynamic_sampling_mask
from megatron_fipo.config import RunConfig
from megatron_fipo.data.problems import Problem
from megatron_fipo.data.setup import DataBundle
from megatron_fipo.reward.scoring import GroupScores, Scorer
from megatron_fipo.rollout.base import GroupRequest, GroupResult, Sample, SamplingParams, StreamStats


@dataclass
class StepBatch:
    groups: list[list[Sample]]
    rewards: torch.Tensor  # [G, n]
    stats: dict[str, float]


@dataclass
class _Arrival:
    result: GroupResult
    problem: Problem
    scores: "Future[GroupScores]"


@dataclass
class _KeptGroups:
    """The step's groups so far: those dynamic sampling kept, and counts over every group scored."""

    groups: list[list[Sample]] = field(default_factory=list)
    rewards: list[torch.Tensor] = field(default_factory=list)
    correct: list[torch.Tensor] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    drawn: int = 0  # prompts drawn from the data stream
    carried_in: int = 0  # groups carried from the previous step (partial rollouts)
    dropped: int = 0
    samples_generated: int = 0  # sequences generated this step (continued ones too), kept, dropped or aborted
    # Every token generated this step, aborted ones included when partial rollouts wait for them
    # (without, the cancel does not wait for the aborted requests' answers: their tokens are not counted).
    tokens_generated: int = 0
    latencies: list[float] = field(default_factory=list)  # per sample: its request's dispatch to completion
    reward_waits: list[float] = field(default_factory=list)  # per group: completion to scores in hand
    reward_seconds: float = 0.0  # of the rollout's time, spent scoring (no pool) or blocked on scores

    def add(self, arrival: _Arrival, scores: GroupScores, dynamic_sampling: bool) -> None:
        self.reward_waits.append(time.monotonic() - arrival.result.done_at)
        for k, v in scores.status_counts.items():
            self.statuses[k] = self.statuses.get(k, 0) + v
        if dynamic_sampling and not bool(dynamic_sampling_mask(scores.rewards)[0]):
            self.dropped += 1
            return
        self.groups.append(arrival.result.samples)
        self.rewards.append(scores.rewards[0])
        self.correct.append(scores.correct[0])

    def step_batch(self, size: int, per_batch: int, stream: StreamStats) -> Optional[StepBatch]:
        """The first ``size`` kept groups with the rollout's statistics; None when none was kept."""
        if not self.groups:
            return None
        kept, rewards, correct = self.groups[:size], self.rewards[:size], self.correct[:size]
        lengths = torch.tensor([len(s.response_ids) for g in kept for s in g], dtype=torch.float32)
        total = sum(self.statuses.values())
        latency = torch.tensor(self.latencies or [0.0])
        window = max(stream.wall_s, 1e-9)
        busy = [b / window for b in stream.busy_s] or [0.0]
        stats = {  # what is measured in seconds is under time/, throughput/ and perf/ (it differs between runs)
            # Generation batches' worth of prompts drawn (what `megatron-fipo plan --calibrate` reads).
            "rollout/gen_batches": self.drawn / per_batch,
            "rollout/prompts_drawn": self.drawn,
            "rollout/groups_carried_in": self.carried_in,
            "rollout/groups_kept": len(kept),
            "rollout/groups_dropped": self.dropped,
            "rollout/samples_generated": self.samples_generated,
            "rollout/tokens_generated": self.tokens_generated,
            "rollout/tokens_per_kept_token": self.tokens_generated / max(lengths.sum().item(), 1.0),
            "rollout/aborted_sequences": stream.aborted_sequences,
            "rollout/retried_requests": stream.retried_requests,
            "throughput/rollout_generated_tokens_per_s": self.tokens_generated / window,
            "perf/rollout_engine_busy_min": min(busy),
            "perf/rollout_engine_busy_mean": sum(busy) / len(busy),
            "perf/rollout_slot_occupancy_mean": sum(stream.slot_s) / window / max(len(stream.slot_s), 1),
            "time/rollout_sample_latency_p50_s": latency.quantile(0.5).item(),
            "time/rollout_sample_latency_p99_s": latency.quantile(0.99).item(),
            "time/reward_wait_mean_s": sum(self.reward_waits) / max(len(self.reward_waits), 1),
            "time/reward_wait_max_s": max(self.reward_waits, default=0.0),
            "time/reward_s": self.reward_seconds,
            "rollout/accuracy": torch.stack(correct).float().mean().item(),
            "reward/mean": torch.stack(rewards).mean().item(),
            "response_length/mean": lengths.mean().item(),
            "response_length/max": lengths.max().item(),
            "response_length/clip_frac": sum(s.finish_reason == "length" for g in kept for s in g) / lengths.numel(),
            **{f"reward/{k}_frac": v / total for k, v in self.statuses.items()},
        }
        return StepBatch(kept, torch.stack(rewards), stats)


class Collector:
    def __init__(self, cfg: RunConfig, engine, scorer: Scorer, data: DataBundle):
        self.cfg, self.engine, self.scorer, self.data = cfg, engine, scorer, data
        self.carried: list[tuple[Problem, list[Sample]]] = []  # partial rollouts for the next step

    def collect(self, step: int, sampling: SamplingParams) -> Optional[StepBatch]:
        """Stream until prompts_per_step groups are kept or the draw is spent. Raises GenerationAborted
        when a stop signal cut it short (nothing is carried then: the resumed run redoes the step)."""
        tr = self.cfg.trainer
        pool = _KeptGroups(carried_in=len(self.carried))
        problems: dict[int, Problem] = {}
        carried, self.carried = self.carried, []
        stream = self.engine.stream(self._requests(carried, problems, pool), sampling,
                                    seed=tr.seed * 1_000_003 + step * 1009)
        pending: deque[_Arrival] = deque()
        for result in stream:
            self._account(pool, result)
            problem = problems[result.key]
            submitted = time.monotonic()  # without a pool, submit scores the group itself
            pending.append(_Arrival(result, problem, self.scorer.submit(result.samples, problem)))
            pool.reward_seconds += time.monotonic() - submitted
            self._settle(pool, pending, block=stream.blocking, limit=tr.prompts_per_step)
            if len(pool.groups) >= tr.prompts_per_step:
                for cut in stream.cancel(keep_partial=self.cfg.rollout.partial_rollouts):
                    self._account(pool, cut)
                    self._carry(problems[cut.key], cut.samples)
                break
        self._settle(pool, pending, block=True, limit=tr.prompts_per_step)
        for arrival in pending:  # complete, but the step has its groups
            self._carry(arrival.problem, arrival.result.samples)
        return pool.step_batch(tr.prompts_per_step, tr.gen_prompts_per_batch, stream.stats)

    def _requests(self, carried: list[tuple[Problem, list[Sample]]], problems: dict[int, Problem],
                  pool: _KeptGroups) -> Iterator[GroupRequest]:
        """Carried groups first, then fresh prompts, drawn only when an engine asks (bounded)."""
        tr, r = self.cfg.trainer, self.cfg.rollout
        for problem, samples in carried:
            problems[len(problems)] = problem
            yield GroupRequest(len(problems) - 1, self.data.prompt_ids(problem), len(samples), partial=samples)
        while pool.drawn < tr.max_gen_batches * tr.gen_prompts_per_batch:
            (problem,) = self.data.train_stream.take(1)
            pool.drawn += 1
            problems[len(problems)] = problem
            yield GroupRequest(len(problems) - 1, self.data.prompt_ids(problem), r.n_samples)

    def _settle(self, pool: _KeptGroups, pending: deque[_Arrival], block: bool, limit: int) -> None:
        """Take the scores of arrived groups in arrival order, all (block) or those ready, until
        ``limit`` groups are kept."""
        while pending and (block or pending[0].scores.done()) and len(pool.groups) < limit:
            arrival = pending.popleft()
            waited = time.monotonic()
            scores = arrival.scores.result()
            pool.reward_seconds += time.monotonic() - waited
            pool.add(arrival, scores, self.cfg.trainer.dynamic_sampling)

    @staticmethod
    def _account(pool: _KeptGroups, result: GroupResult) -> None:
        pool.samples_generated += result.sequences
        pool.tokens_generated += result.new_tokens
        if result.complete:
            pool.latencies += [result.latency_s] * len(result.samples)

    def _carry(self, problem: Problem, samples: list[Sample]) -> None:
        if self.cfg.rollout.partial_rollouts:
            self.carried.append((problem, samples))
