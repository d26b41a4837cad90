"""Servers the trainer launches start at the first generation phase, never while the trainer may
hold the accelerator (colocated: the loop offloads the trainer before that phase).

The launch itself is the process boundary: ``SGLangServer.start`` is replaced by one that records the
call and attaches the server to an in-process SGLang double (megatron_fipo/testing_sglang.py), which
refuses every call SGLang 0.5.23 would refuse.
"""

from pathlib import Path

import pytest

from megatron_fipo.config import RolloutConfig, SGLangConfig
from megatron_fipo.rollout.sglang_engine import SGLangEngine
from megatron_fipo.rollout.sglang_server import SGLangServer
from megatron_fipo.testing_sglang import SGLangDouble
from test_sglang_lifecycle import ARCH, GREEDY, PROMPTS, VOCAB, _buckets, _weights


@pytest.fixture
def launched(monkeypatch):
    doubles = [SGLangDouble(_weights(0.5), vocab_size=VOCAB) for _ in range(2)]
    starts = []

    def start(self, model_path: str) -> None:
        starts.append((self.index, Path(model_path).name))
        self.new_process()
        self.url = self.http.url = doubles[self.index].url

    monkeypatch.setattr(SGLangServer, "start", start)
    yield doubles, starts
    for d in doubles:
        d.close()


def test_launched_servers_start_at_the_first_generation_phase(launched, tmp_path):
    doubles, starts = launched
    engine = SGLangEngine(RolloutConfig(engine="sglang", placement="colocated", sglang=SGLangConfig(
        num_servers=2, startup_timeout_s=30)), ARCH, tmp_path)
    engine.update_weights(_buckets(1.0), version=0)
    engine.pause()  # the trainer's phase: nothing to release, nothing started
    engine.update_weights(_buckets(2.0), version=1)
    assert starts == [] and all(d.calls == [] for d in doubles)
    engine.resume()  # the loop calls it once every rank has offloaded
    assert starts == [(0, "v1"), (1, "v1")]  # from the newest snapshot
    groups = engine.generate(PROMPTS, n=2, sampling=GREEDY, seed=0)
    assert {s.weight_version for g in groups for s in g} == {1}
    engine.pause()
    engine.update_weights(_buckets(3.0), version=2)  # now an in-place update
    engine.resume()
    assert {s.weight_version for g in engine.generate(PROMPTS, n=2, sampling=GREEDY, seed=0) for s in g} == {2}
    assert len(starts) == 2
    for d in doubles:
        assert d.crash is None
        assert "/update_weights_from_tensor" in d.calls and "/release_memory_occupation" in d.calls
