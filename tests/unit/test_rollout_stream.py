"""Streaming rollouts: routing by free slots with ties in turn, one server per group, the abort at
the step's target (nothing aborted is retried, every kept group intact), and partial rollouts.

Against doubles of SGLang's HTTP server (megatron_fipo/testing_sglang.py, a test double at the
process boundary: several real servers do not fit on this host; tests/integration/
test_sglang_engine.py checks the abort and a continuation on the real one)."""

import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_fipo.config import RolloutConfig, RunConfig, SGLangConfig
from megatron_fipo.data.problems import Problem, ProblemStream
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.reward.scoring import GroupScores
from megatron_fipo.rollout.base import GenerationAborted, GroupRequest, Sample, SamplingParams
from megatron_fipo.rollout.collect import Collector
from megatron_fipo.rollout.sglang_engine import SGLangEngine
from megatron_fipo.testing_sglang import SGLangDouble

ARCH = ModelArch.from_hf_config("examples/tiny_qwen2/config.json")
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=4)
WEIGHTS = {"model.embed_tokens.weight": torch.ones(4, 3)}


@pytest.fixture
def doubles():
    made = []

    def make(delays):
        made.extend(SGLangDouble(WEIGHTS, generate_delay_s=d) for d in delays)
        return made[-len(delays):]

    yield make
    for d in made:
        d.close()


def _engine(servers, tmp_path: Path, **sglang) -> SGLangEngine:
    cfg = RolloutConfig(engine="sglang", sglang=SGLangConfig(urls=[d.url for d in servers], startup_timeout_s=30, **sglang))
    return SGLangEngine(cfg, ARCH, tmp_path)


def _stream(engine, prompts, n=2):
    return list(engine.stream(iter(GroupRequest(i, p, n) for i, p in enumerate(prompts)), SAMPLING, seed=0))


def test_ties_go_in_turn_and_a_group_is_one_request_on_one_server(doubles, tmp_path):
    servers = doubles([0.0, 0.0, 0.0])
    engine = _engine(servers, tmp_path, max_running_requests=64)
    # One group at a time: every server is idle at each pick, so each pick is a tie.
    picked = [_stream(engine, [[7, i]])[0].engine for i in range(5)]
    assert picked == [0, 1, 2, 0, 1]  # in turn, not the lowest index every time
    assert [d.calls.count("/generate") for d in servers] == [2, 2, 1]  # one request per group
    assert engine.served == [4, 4, 2]  # its n = 2 samples


def test_each_server_is_held_to_its_capacity(doubles, tmp_path):
    servers = doubles([0.3, 0.3])
    engine = _engine(servers, tmp_path, max_running_requests=4)
    seen = []
    pick = engine._pick

    def recorded(size):
        index = pick(size)
        seen.append(list(engine.in_flight))
        return index

    engine._pick = recorded
    results = _stream(engine, [[i] for i in range(6)])
    assert sorted(r.key for r in results) == list(range(6))
    assert max(max(s) for s in seen) == 4  # two groups of 2 fill a server, never more
    assert [4, 4] in seen  # both full at once: every server busy while work remained
    assert engine.in_flight == [0, 0]


class _Scores:
    """Rewards [1, -1, ...]: every group differs, so every complete group is kept."""

    def score(self, groups, problems):
        rewards = torch.tensor([[(-1.0) ** i for i in range(len(g))] for g in groups])
        return GroupScores(rewards, rewards > 0, {"correct": 1, "wrong": 1})

    def submit(self, group, problem):  # Scorer.submit without a pool: scored at once
        future = Future()
        future.set_result(self.score([group], [problem]))
        return future


class _Data:
    def __init__(self):
        self.train_stream = ProblemStream([Problem(({"role": "user", "content": str(i)},), str(i)) for i in range(50)], 0)

    def prompt_ids(self, problem):
        return [int(problem.answer) + 1, 3]


def _collector(engine, partial: bool) -> Collector:
    cfg = RunConfig()
    cfg = replace(cfg, rollout=replace(cfg.rollout, n_samples=2, partial_rollouts=partial),
                  trainer=replace(cfg.trainer, prompts_per_step=2, minibatch_prompts=1, gen_prompts_per_batch=3,
                                  max_gen_batches=2))
    return Collector(cfg, engine, _Scores(), _Data())


@pytest.mark.parametrize("partial", [False, True])
def test_the_target_aborts_what_is_in_flight_and_keeps_every_kept_group(doubles, tmp_path, partial):
    fast, slow = doubles([0.05, 30.0])  # the slow server's group can only end by the abort
    engine = _engine([fast, slow], tmp_path, max_running_requests=2)  # one group of 2 per server
    collector = _collector(engine, partial)
    batch = collector.collect(step=0, sampling=SAMPLING)
    engine.resume()  # without partials the cancel does not wait for its aborts: the next phase does
    assert len(batch.groups) == 2 and all(len(g) == 2 and all(s.finish_reason == "length" for s in g)
                                          for g in batch.groups)
    assert batch.stats["rollout/aborted_sequences"] >= 2  # the slow server's group at least
    # Two kept from the fast server, one cut short on the slow one, and one the fast server took when
    # its second landed (its slots work while the caller scores).
    assert batch.stats["rollout/prompts_drawn"] == 4
    assert slow.calls.count("/generate") == 1 and "/abort_request" in slow.calls  # aborted, not retried
    assert batch.stats["rollout/retried_requests"] == 0
    carried = [len(samples) for _, samples in collector.carried]
    assert carried == ([2, 2] if partial else [])
    if not partial:  # the aborted group's answer comes in the background
        for _ in range(200):  # the aborted group's slots stay counted until its answer is back
            if engine.in_flight == [0, 0]:
                break
            time.sleep(0.05)
        assert engine.in_flight == [0, 0]
    if partial:  # the next step sends the carried groups first (both servers now fast): none is lost
        slow.generate_delay_s = 0.05
        prompts = sorted(collector.data.prompt_ids(problem) for problem, _ in collector.carried)
        after = collector.collect(step=1, sampling=SAMPLING)
        assert after.stats["rollout/groups_carried_in"] == 2
        kept_or_carried = [g[0].prompt_ids for g in after.groups] + [s[0].prompt_ids for _, s in collector.carried]
        assert all(prompt in kept_or_carried for prompt in prompts)
        assert all(len(s.response_ids) == 4 and s.finish_reason == "length" for g in after.groups for s in g)


def test_a_partial_group_continues_from_its_prefixes(doubles, tmp_path):
    (server,) = doubles([0.0])
    engine = _engine([server], tmp_path, max_running_requests=8)
    prompt = [11, 12]
    done = Sample(prompt, [1, 2], [-0.1, -0.2], "stop", weight_version=0)
    cut = Sample(prompt, [5, 6, 7], [-0.3, -0.4, -0.5], "abort", weight_version=0)
    engine.update_weights([list(WEIGHTS.items())], version=3)  # the weights moved on since the group was cut
    (result,) = list(engine.stream(iter([GroupRequest("g", prompt, 2, partial=[done, cut])]), SAMPLING, seed=0))
    first, second = result.samples
    assert first is done  # a finished sample is not generated again
    more = 4 - 3  # the tokens max_new_tokens leaves it
    assert second.response_ids[:3] == [5, 6, 7] and len(second.response_ids) == 3 + more
    assert second.logprobs == [-0.3, -0.4, -0.5] + [-0.5] * more  # the double's logprob per token
    assert second.prompt_ids == prompt and second.finish_reason == "length"
    assert (second.weight_version, second.version_segments) == (0, [(3, 3)])
    assert result.new_tokens == more


def test_continued_concatenates_tokens_logprobs_and_versions():
    a = Sample([1], [4, 5], [-1.0, -2.0], "abort", weight_version=2)
    b = Sample([1, 4, 5], [6], [-3.0], "abort", weight_version=2)  # same weights: no new segment
    c = Sample([1, 4, 5, 6], [7, 8], [-4.0, -5.0], "stop", weight_version=4)
    out = a.continued(b).continued(c)
    assert (out.prompt_ids, out.response_ids, out.logprobs) == ([1], [4, 5, 6, 7, 8], [-1.0, -2.0, -3.0, -4.0, -5.0])
    assert (out.finish_reason, out.weight_version, out.version_segments) == ("stop", 2, [(3, 4)])


def test_a_stop_signal_aborts_an_sglang_rollout(doubles, tmp_path):
    (server,) = doubles([30.0])  # would run 30 s
    engine = _engine([server], tmp_path, max_running_requests=8)

    def stop_mid_stream():  # as StopFlag.on_signal calls it, once a request runs (not on a timer: a
        while "/generate" not in server.calls:  # loaded host may take longer to start the stream)
            time.sleep(0.01)
        engine.abort()

    timer = threading.Thread(target=stop_mid_stream, daemon=True)
    timer.start()
    with pytest.raises(GenerationAborted):
        _stream(engine, [[1], [2]])
    timer.join()
    assert server.calls.count("/generate") == 2 and "/abort_request" in server.calls  # aborted, not retried
    assert engine.in_flight == [0]
    server.generate_delay_s = 0.0
    (group,) = engine.generate([[3]], 2, SAMPLING, seed=0)  # the abort was for that call only
    assert [s.finish_reason for s in group] == ["length", "length"]


def test_the_embedded_stream_samples_as_generate_does_and_hands_carried_groups_back(tmp_path):
    from megatron_fipo.bridge.hf_io import HFCheckpointReader
    from megatron_fipo.bridge.mapping import hf_names
    from megatron_fipo.rollout.embedded import EmbeddedEngine
    from megatron_fipo.testing import make_hf_checkpoint

    reader = HFCheckpointReader(make_hf_checkpoint(tmp_path / "hf"))
    engine = EmbeddedEngine(reader.arch(), max_batch=4, prompts_per_chunk=3)
    engine.update_weights([[(n, reader.read(n)) for n in hf_names(reader.arch())]], version=1)
    prompts = [[1, 2], [3, 4], [5, 6], [7, 8], [9]]
    # Chunks of 3 prompts, each sampled as a generation batch is (seed + chunk index), 4 sequences at a time.
    want = engine.generate(prompts[:3], 2, SAMPLING, seed=3) + engine.generate(prompts[3:], 2, SAMPLING, seed=4)
    got = {r.key: r.samples for r in engine.stream(iter(GroupRequest(i, p, 2) for i, p in enumerate(prompts)),
                                                     SAMPLING, seed=3)}
    assert [[s.response_ids for s in got[i]] for i in range(5)] == [[s.response_ids for s in g] for g in want]
    carried = GroupRequest("carried", prompts[0], 2, partial=want[0])  # complete: handed back, not generated
    out = list(engine.stream(iter([carried, GroupRequest(0, prompts[1], 2)]), SAMPLING, seed=3))
    assert [r.key for r in out] == ["carried", 0] and out[0].samples is want[0] and out[0].new_tokens == 0
