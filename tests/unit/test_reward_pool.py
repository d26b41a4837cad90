"""reward.num_workers: math-verify in a process pool scores as the serial path does, with deadlines
that hold in the workers (a stuck worker is killed and replaced), a group at a time or in batches."""

import pickle

import pytest
from helpers.reward_workload import EASY, PATHOLOGICAL, SET, workload, workload_tokenizer

from megatron_fipo.config import RewardConfig
from megatron_fipo.config_base import ConfigError
from megatron_fipo.data.problems import Problem
from megatron_fipo.reward.math_reward import warm_up
from megatron_fipo.reward.pool import GRACE_S
from megatron_fipo.reward.scoring import Scorer
from megatron_fipo.rollout.base import Sample

TIMEOUT = 1.5


@pytest.fixture(scope="module")
def tokenizer():
    return workload_tokenizer()


@pytest.fixture(scope="module")
def scorers(tokenizer):
    reward = dict(timeout_seconds=TIMEOUT, overlong_buffer_length=4, overlong_penalty_factor=0.5)
    warm_up()  # as each worker is before its first sample: the serial reference is then scored on the same clock
    serial = Scorer(RewardConfig(**reward), tokenizer, 8)
    pooled = Scorer(RewardConfig(num_workers=2, **reward), tokenizer, 8)
    yield serial, pooled
    pooled.close()


def test_a_thousand_samples_score_as_serially_and_none_is_held_past_its_timeout(tokenizer, scorers):
    serial, pooled = scorers
    work = [(tokenizer.encode(r), Problem((), t)) for r, t in workload(1000)]
    want = [serial.reward(tokenizer.decode(ids), problem) for ids, problem in work]
    got = [f.result() for f in [pooled.pool.submit(ids, problem) for ids, problem in work]]
    assert [(g.result.score, g.result.status) for g in got] == [(w.score, w.status) for w in want]
    statuses = [w.status for w in want]
    assert statuses.count("timeout") == 2 and statuses.count("unparsable") >= 2
    assert {"correct", "wrong", "no_answer"} <= set(statuses)
    assert max(g.held_s for g in got) <= TIMEOUT + 1.0


def test_groups_submitted_one_by_one_score_as_a_serial_batch(tokenizer, scorers):
    serial, pooled = scorers
    rows = [EASY[:4], EASY[3:], [PATHOLOGICAL[1], SET, PATHOLOGICAL[2], ("Answer: 8", "8")]]
    groups, problems = [], []
    for i, row in enumerate(rows):
        problems.append(Problem((), row[0][1]))
        # Lengths 8-2..8: the overlong penalty (4 tokens before 8) differs within a group.
        groups.append([Sample([1], tokenizer.encode(r)[:9 - j], [], "stop", 0) for j, (r, _) in enumerate(row)])
    want = serial.score(groups, problems)
    one_by_one = [pooled.submit(g, p) for g, p in zip(groups, problems)]
    for k, future in enumerate(one_by_one):
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
        stuck, right, wrong = (scorer.pool.submit(tokenizer.encode(r), problem) for r in ["hang", "12", "13"])
        assert (stuck.result().result.score, stuck.result().result.status) == (-1.0, "timeout")
        assert stuck.result().held_s <= 0.3 + GRACE_S + 1.0
        assert [f.result().result.status for f in (right, wrong)] == ["correct", "wrong"]  # by the new worker
        assert scorer.pool.replaced == 1
        with pytest.raises(TypeError, match="reward_pool_hooks:exact_or_stuck returned 'yes'"):
            scorer.score([[Sample([1], tokenizer.encode("bad"), [], "stop", 0)]], [problem])
    finally:
        scorer.close()
    with pytest.raises(RuntimeError, match="closed"):
        scorer.pool.submit([1], problem)


def test_close_fails_what_is_not_scored_and_stops_the_workers(tokenizer):
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
        decode = staticmethod(lambda ids: "")
        local = lambda self: None  # noqa: E731

        def __reduce__(self):
            raise pickle.PicklingError("no")

    with pytest.raises(ConfigError, match=r"reward.num_workers: the tokenizer \(Unpicklable\) cannot be sent.*num_workers=0"):
        Scorer(RewardConfig(num_workers=1), Unpicklable(), 8)
