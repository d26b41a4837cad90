"""Asynchronous rollouts (rollout/async_rollout.py): the producer's schedule (batch i drawn with
weights version max(0, i - k), whatever the timing), the drop and count of samples more than k
versions old, an abort that rewinds the data stream, the buffer through a checkpoint, and the rule
on trainer.max_staleness.

The producer's ``collect`` here draws real problems from a ProblemStream and stamps each sample
with the version the "engine" holds, as the engines do; the loop passes Collector.collect
(tests/integration/test_async_run.py runs it end to end)."""

import threading
import time

import pytest
import torch

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError, load_config
from megatron_fipo.data.problems import Problem, ProblemStream
from megatron_fipo.rollout.async_rollout import (AsyncRollout, buffer_from_state, buffer_state, drop_groups,
                                                 stale_groups)
from megatron_fipo.rollout.base import GenerationAborted, Sample
from megatron_fipo.rollout.collect import StepBatch

PROBLEMS = [Problem(({"role": "user", "content": f"{i}+1"},), str(i + 1)) for i in range(50)]


class Producer:
    """collect(step): two groups of two samples per step, from the stream, stamped with the engine's version."""

    def __init__(self, delays=()):
        self.stream = ProblemStream(PROBLEMS, seed=3)
        self.version = 0  # the weights the engine holds
        self.seen: list[tuple[int, int, int]] = []  # (step, version, stream position at start)
        self.delays = list(delays)
        self.old_versions: dict[int, int] = {}  # step -> a version its first group's second sample claims

    def collect(self, step: int) -> StepBatch:
        self.seen.append((step, self.version, self.stream.position))
        if step < len(self.delays):
            time.sleep(self.delays[step])
        groups = []
        for problem in self.stream.take(2):
            prompt = [len(problem.answer), step]
            groups.append([Sample(prompt, [1, 2], [-0.5, -0.25], "stop", self.version),
                           Sample(prompt, [3], [-1.0], "stop", self.version)])
        if step in self.old_versions:
            groups[0][1].weight_version = self.old_versions[step]
        return StepBatch(groups, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), {"rollout/accuracy": 0.5})


def _train(rollout: AsyncRollout, producer: Producer, steps: range) -> list[dict]:
    """The loop's order: allow(weights held), take the step's batch, train, hold, sync (version + 1)."""
    figures = []
    for step in steps:
        rollout.allow(producer.version)
        batch, stats = rollout.take(step)
        rollout.done(step)
        stats["staleness"] = [step - s.weight_version for g in batch.groups for s in g]
        figures.append(stats)
        rollout.hold()
        stats["buffered_after_hold"] = [b.step for b in rollout.buffered()]
        producer.version = step + 1
    return figures


@pytest.mark.parametrize("k, delays", [(1, ()), (1, (0.05, 0.0, 0.05)), (2, (0.0, 0.05, 0.0, 0.05))])
def test_batch_i_is_drawn_with_version_i_minus_k_whatever_the_timing(k, delays):
    producer = Producer(delays)
    rollout = AsyncRollout(producer.collect, producer.stream, k)
    rollout.start(0)
    figures = _train(rollout, producer, range(5))
    rollout.close()
    assert [(step, version) for step, version, _ in producer.seen[:5]] == [(i, max(0, i - k)) for i in range(5)]
    assert [f["staleness"] for f in figures] == [[min(i, k)] * 4 for i in range(5)]
    # Held for the sync after step s, the producer has collected the next k steps' batches, no more.
    assert [f["buffered_after_hold"] for f in figures] == [list(range(s + 1, s + k + 1)) for s in range(5)]
    assert [position for _, _, position in producer.seen[:5]] == [0, 2, 4, 6, 8]


def test_no_batch_is_collected_past_the_last_step():
    producer = Producer()
    rollout = AsyncRollout(producer.collect, producer.stream, 2, total_steps=3)
    rollout.start(0)
    _train(rollout, producer, range(3))
    rollout.close()
    assert [step for step, _, _ in producer.seen] == [0, 1, 2]
    assert producer.stream.position == 6


def test_samples_more_than_k_versions_old_are_dropped_by_group_and_counted():
    producer = Producer()
    producer.old_versions = {2: -1}  # step 2's first group holds a sample of version -1: 3 behind
    rollout = AsyncRollout(producer.collect, producer.stream, 1)
    rollout.start(0)
    figures = _train(rollout, producer, range(3))
    rollout.close()
    assert [f["async/dropped_stale_samples"] for f in figures] == [0.0, 0.0, 2.0]
    assert figures[2]["staleness"] == [1, 1]  # the second group only


def test_drop_groups_keeps_the_rewards_rows_of_the_groups_kept():
    s = lambda v: Sample([1], [2], [-0.1], "stop", v)  # noqa: E731
    batch = StepBatch([[s(3), s(3)], [s(1), s(3)], [s(2), s(2)]], torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), {})
    assert stale_groups(batch, step=4, max_staleness=2) == [1]
    kept = drop_groups(batch, [1])
    assert kept.groups == [batch.groups[0], batch.groups[2]]
    assert torch.equal(kept.rewards, torch.tensor([[1.0, 2.0], [5.0, 6.0]]))
    assert drop_groups(batch, [0, 1, 2]) is None


def test_an_abort_rewinds_the_stream_and_the_batch_is_drawn_again_the_same():
    producer = Producer()
    started, release = threading.Event(), threading.Event()
    plain = producer.collect

    def collect(step):
        if step == 1 and not release.is_set():
            producer.stream.take(2)  # drawn, then cut short in its generation
            started.set()
            release.wait()
            raise GenerationAborted("aborted")
        return plain(step)

    rollout = AsyncRollout(collect, producer.stream, 1, abort=release.set)
    rollout.start(0)
    rollout.allow(0)
    batch0, _ = rollout.take(0)
    rollout.done(0)
    started.wait(5)
    rollout.hold(abort=True)
    assert producer.stream.position == 2  # back where step 1's draw began
    with pytest.raises(GenerationAborted):
        rollout.take(1)
    rollout.allow(0)
    batch1, _ = rollout.take(1)
    rollout.close()
    assert producer.seen == [(0, 0, 0), (1, 0, 2)]
    assert [g[0].prompt_ids for g in batch1.groups] != [g[0].prompt_ids for g in batch0.groups]


def test_the_buffer_survives_a_checkpoint_and_the_producer_goes_on_after_it(tmp_path):
    producer = Producer()
    rollout = AsyncRollout(producer.collect, producer.stream, 1)
    rollout.start(0)
    _train(rollout, producer, range(2))  # held after step 1: batch 2 (version 1) is buffered
    saved = rollout.buffered()
    rollout.close()
    assert [b.step for b in saved] == [2]
    saved[0].batch.groups[0][0].logprobs = [0.1 + 0.2, -1e-300]  # any float comes back exactly
    torch.save({"buffer": buffer_state(saved)}, tmp_path / "state.pt")
    restored = buffer_from_state(torch.load(tmp_path / "state.pt", weights_only=True)["buffer"])
    assert restored[0].batch.groups == saved[0].batch.groups
    assert torch.equal(restored[0].batch.rewards, saved[0].batch.rewards)

    again = Producer()
    again.stream.position, again.version = producer.stream.position, 2  # the resumed run: stream and weights
    resumed = AsyncRollout(again.collect, again.stream, 1)
    resumed.start(2, restored)
    figures = _train(resumed, again, range(2, 4))
    resumed.close()
    assert again.seen[0] == (3, 2, 6)  # batch 2 came from the checkpoint; batch 3 from where it ended
    assert [f["staleness"] for f in figures] == [[1] * 4, [1] * 4]


def test_a_producer_failure_reaches_the_trainer():
    def collect(step):
        raise ValueError("engine down")

    rollout = AsyncRollout(collect, ProblemStream(PROBLEMS, seed=0), 1)
    rollout.start(0)
    rollout.allow(0)
    with pytest.raises(RuntimeError, match="producer failed"):
        rollout.take(0)
    rollout.close()


def test_max_staleness_needs_engines_that_generate_while_the_trainer_trains(tmp_path):
    base = ["trainer.max_staleness=1", f"run_dir={tmp_path}"]
    assert load_config(RunConfig, "examples/tiny_cpu.yaml", base).trainer.max_staleness == 1  # embedded: generates in a thread
    with pytest.raises(ConfigError, match=r"trainer.max_staleness.*rollout.placement=disaggregated"):
        load_config(RunConfig, "examples/tiny_cpu.yaml", base + ["rollout.engine=sglang"])
    with pytest.raises(ConfigError, match=r"trainer.max_staleness.*actor.offload"):
        load_config(RunConfig, "examples/tiny_cpu.yaml", base + ["actor.offload=true"])
    with pytest.raises(ConfigError, match="trainer.max_staleness must be >= 0"):
        load_config(RunConfig, "examples/tiny_cpu.yaml", ["trainer.max_staleness=-1"])
    assert RunConfig().trainer.max_staleness == 0


def test_a_batch_taken_stays_buffered_until_its_step_is_trained():
    """A stop agreed after rank 0 took the step's batch: the checkpoint keeps it for the resumed run."""
    producer = Producer()
    rollout = AsyncRollout(producer.collect, producer.stream, 1)
    rollout.start(0)
    rollout.allow(0)
    rollout.take(0)
    rollout.hold()
    assert [b.step for b in rollout.buffered()] == [0, 1]
    rollout.done(0)
    assert [b.step for b in rollout.buffered()] == [1]
    rollout.close()
