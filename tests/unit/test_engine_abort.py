"""The embedded engine's abort: a generate in flight gives up at its next decode step; an abort that came
between calls does not touch the next one (the run's stop is agreed right after a batch anyway)."""

import threading

import pytest

from megatron_fipo.bridge.hf_io import HFCheckpointReader
from megatron_fipo.bridge.mapping import hf_names
from megatron_fipo.rollout.base import GenerationAborted, SamplingParams
from megatron_fipo.rollout.embedded import EmbeddedEngine
from megatron_fipo.testing import make_hf_checkpoint

LONG = SamplingParams(temperature=1.0, max_new_tokens=500)  # no stop token: every sequence runs 500 steps


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    reader = HFCheckpointReader(make_hf_checkpoint(tmp_path_factory.mktemp("hf")))
    engine = EmbeddedEngine(reader.arch(), max_batch=32)
    engine.update_weights([[(n, reader.read(n)) for n in hf_names(reader.arch())]], version=1)
    return engine


def test_abort_during_generate_raises_at_the_next_decode_step(engine):
    # As the stop flag's signal handler calls it, mid-call. generate clears the flag when it starts
    # and reads it only between decode steps: the raise itself shows the call gave up part-way.
    timer = threading.Timer(0.3, engine.abort)  # generate runs for seconds: 32 x 500 tokens
    timer.start()
    with pytest.raises(GenerationAborted):
        engine.generate([[5, 17, 33, 2]], n=32, sampling=LONG, seed=0)
    timer.join()


def test_an_abort_between_calls_is_spent(engine):
    short = SamplingParams(temperature=1.0, max_new_tokens=8)
    want = engine.generate([[9, 9]], n=4, sampling=short, seed=3)
    engine.abort()
    got = engine.generate([[9, 9]], n=4, sampling=short, seed=3)
    assert [s.response_ids for s in got[0]] == [s.response_ids for s in want[0]]
