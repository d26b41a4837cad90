"""reward.num_workers: math-verify in a process pool scores as the serial path does, with deadlines
that hold in the workers (a stuck worker is killed and replaced), a group at a time or in batches."""

import pickle
import time

import pytest
from helpers.reward_workload import EASY, PATHOLOGICAL, SET, workload, workload_tokenizer

from megatron_fipo.config import RewardConfig
from megatron_fipo.config_base import ConfigError
from megatron_fipo.data.problems import Problem
from megatron_fipo.reward.math_reward import warm_up
from megatron_fipo.reward.pool import GRACE_S
from megatron_fipo.reward.scoring import Scorer
from megatron_fipo.rollout.base import Sample

TIMEOUT = 2.0


@pytest.fixture(scope="module")
def tokenizer():
    return workload_tokenizer()


def _serial_and_pooled(tokenizer, timeout: float):
    reward = dict(timeout_seconds=timeout, overlong_buffer_length=4, overlong_penalty_factor=0.5)
    warm_up()  # as each worker is before its first sample: the serial reference is then scored on the same clock
    serial, pooled = Scorer(RewardConfig(**reward), tokenizer, 8), Scorer(RewardConfig(num_workers=2, **reward), tokenizer, 8)
    yield serial, pooled
    pooled.close()


@pytest.fixture
def timed(tokenizer):
    yield from _serial_and_pooled(tokenizer, TIMEOUT)


@pytest.fixture
def untimed(tokenizer):
    """No time limit: the same statuses however busy the host (only quick answers go to these)."""
    yield from _serial_and_pooled(tokenizer, 0.0)


def _starved(serial_status: str, pool_status: str, serial_s: float, pool_held_s: float) -> bool:
    """The side that timed out had the sample for its whole timeout: the host stopped it that long."""
    return (serial_status == "timeout" and serial_s >= TIMEOUT) or (pool_status == "timeout" and pool_held_s >= TIMEOUT)


def test_a_thousand_samples_score_as_serially_and_none_is_held_past_its_timeout(tokenizer, timed):
    serial, pooled = timed
    pairs = workload(1000)
    work = [(tokenizer.encode(r), Problem((), t)) for r, t in pairs]
    want, serial_s = [], []
    for ids, problem in work:
        start = time.monotonic()
        want.append(serial.reward(tokenizer.decode(ids), problem))
        serial_s.append(time.monotonic() - start)
    got = [f.result() for f in [pooled.pool.submit(ids, problem) for ids, problem in work]]
    differ = [(i, w.status, g.result.status, round(serial_s[i], 3), round(g.held_s, 3))
              for i, (w, g) in enumerate(zip(want, got)) if (g.result.score, g.result.status) != (w.score, w.status)]
    # Timeouts are wall-clock: a host that stops a process for a whole timeout (this one's 2 shared
    # cores do at times) times out a quick sample on that side. Only such differences, and few.
    assert all(_starved(*d[1:]) for d in differ) and len(differ) <= 20, \
        f"(sample, serial status, pool status, serial s, pool hold s): {differ}"
    slow = [i for i, pair in enumerate(pairs) if pair in PATHOLOGICAL[:2]]
    assert [(want[i].status, got[i].result.status) for i in slow] == [("timeout", "timeout")] * 2
    statuses = {w.status for w in want}
    assert {"correct", "wrong", "no_answer", "unparsable"} <= statuses
    assert max(g.held_s for g in got) <= TIMEOUT + 1.0


def test_groups_submitted_one_by_one_score_as_a_serial_batch(tokenizer, untimed):
    serial, pooled = untimed
    rows = [EASY[:4], EASY[3:], [("Answer: 9", "8"), SET, PATHOLOGICAL[2], ("Answer: 8", "8")]]
    groups, problems = [], []
    for i, row in enumerate(rows):
        problems.append(Problem((), row[0][1]))
        # At most 9, 8, 7, 6 tokens: the overlong penalty (from 4 tokens before 8) differs within a group.
        groups.append([Sample([1], tokenizer.encode(r)[:9 - j], [], "stop", 0) for j, (r, _) in enumerate(row)])
    want = serial.score(groups, problems)
    pooled_futures = [pooled.submit(g, p) for g, p in zip(groups, problems)]
    serial_futures = [serial.submit(g, p) for g, p in zip(groups, problems)]  # no pool: scored at once
    for k, future in enumerate(pooled_futures + serial_futures):
        k %= len(groups)
        got = future.result()
        assert got.rewards.tolist() == want.rewards[k:k + 1].tolist()
        assert got.correct.tolist() == want.correct[k:k + 1].tolist()
    batch = pooled.score(groups, problems)
    assert batch.rewards.tolist() == want.rewards.tolist() and batch.status_counts == want.status_counts
    assert want.rewards.min().item() < -1.0  # the penalty is in what was compared


def test_a_stuck_worker_is_killed_and_replaced_and_a_reward_error_reaches_the_caller(tokenizer):
    cfg = RewardConfig(timeout_seconds=0.3, num_workers=1, custom_reward="helpers.reward_pool_hooks:exact_or_stuck")
    scorer = Scorer(cfg, tokenizer, 8)
    try:
        problem = Problem((), "12")
        # A long response queued behind the stuck one (~600 kB pickled: more than a pipe holds) must not
        # hold up the deadline of the stuck one.
        stuck, long, right, wrong = (scorer.pool.submit(tokenizer.encode(r), problem) for r in ["hang", "1" * 300_000, "12", "13"])
        assert (stuck.result().result.score, stuck.result().result.status) == (-1.0, "timeout")
        assert stuck.result().held_s <= 0.3 + GRACE_S + 1.0
        assert [f.result().result.status for f in (long, right, wrong)] == ["wrong", "correct", "wrong"]  # by the new worker
        assert scorer.pool.replaced == 1
        with pytest.raises(TypeError, match="reward_pool_hooks:exact_or_stuck returned 'yes'"):
            scorer.score([[Sample([1], tokenizer.encode("bad"), [], "stop", 0)]], [problem])
    finally:
        scorer.close()
    with pytest.raises(RuntimeError, match="closed"):
        scorer.pool.submit([1], problem)


def test_close_fails_what_is_not_scored_and_can_be_repeated(tokenizer):
    scorer = Scorer(RewardConfig(num_workers=1), tokenizer, 8)
    pending = [scorer.pool.submit(tokenizer.encode("Answer: 1"), Problem((), "1")) for _ in range(50)]
    scorer.close()
    scorer.close()  # idempotent
    for f in pending:  # each either scored or told why not; none left waiting
        assert f.done() and (f.exception() is None or "closed before" in str(f.exception()))


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match=r"reward.num_workers must be >= 0"):
        RewardConfig(num_workers=-1)

    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("no")

    with pytest.raises(ConfigError, match=r"reward.num_workers: the tokenizer \(Unpicklable\) cannot be sent.*num_workers=0"):
        Scorer(RewardConfig(num_workers=1), Unpicklable(), 8)
