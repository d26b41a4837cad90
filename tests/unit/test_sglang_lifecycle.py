"""SGLang's memory tags and the engine's call sequences, checked against a double of SGLang 0.5.23's
HTTP server that refuses exactly where SGLang does (megatron_fipo/testing_sglang.py, a test double at
the process boundary: memory release needs CUDA, so the real CPU server cannot run these calls)."""

import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron_fipo.config import RolloutConfig, SGLangConfig
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.rollout.base import SamplingParams
from megatron_fipo.rollout.sglang_engine import SGLangEngine
from megatron_fipo.rollout.sglang_http import SGLangError, SGLangHTTP, ServerUnavailable
from megatron_fipo.rollout.sglang_memory import ServerMemory
from megatron_fipo.rollout.sglang_weights import serialize_named_tensors
from megatron_fipo.testing_sglang import SGLangDouble, weights_fingerprint
from helpers.job_script import release_as_job_script, run_release_block
from tests.helpers.launch import free_port

ARCH = ModelArch.from_hf_config("examples/tiny_qwen2/config.json")
VOCAB = 1000
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=5)
PROMPTS = [[5, 17, 33], [9, 9], [42]]


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": torch.full((4, 3), value), "lm_head.weight": torch.full((3,), 2 * value)}


def _buckets(value: float):
    return [[item] for item in _weights(value).items()]  # two buckets: a sync makes two load calls


def _expected(value: float, prompt: list[int], n: int = 5) -> list[int]:
    """The double's greedy tokens for these weights (its stand-in for a model)."""
    seed = weights_fingerprint(_weights(value), VOCAB)
    return [(seed + sum(prompt) + 31 * i) % VOCAB for i in range(n)]


@pytest.fixture
def doubles():
    made = []

    def make(n=2, **kwargs):
        made.extend(SGLangDouble(_weights(0.5), vocab_size=VOCAB, **kwargs) for _ in range(n))
        return made[-n:]

    yield make
    for d in made:
        d.close()


def _engine(servers, tmp_path: Path, placement="colocated", transport="tensor", **sglang) -> SGLangEngine:
    cfg = RolloutConfig(engine="sglang", placement=placement, sglang=SGLangConfig(
        urls=[d.url for d in servers], weight_transport=transport, distributed_backend="gloo",
        weights_update_port=free_port(), **{"startup_timeout_s": 30, **sglang}))
    return SGLangEngine(cfg, ARCH, tmp_path)


# ---- the state machine on its own --------------------------------------------------------------
REL, RES = "release_memory_occupation", "resume_memory_occupation"
ALL = ["weights", "kv_cache", "cuda_graph"]


def test_each_phase_names_only_the_tags_it_changes():
    calls = []
    memory = ServerMemory(lambda path, payload: calls.append((path.strip("/"), payload["tags"])), releasable=True)
    steps = [  # (phase, calls it makes) in the loop's order, from a fresh server
        ("update", [(REL, ["kv_cache", "cuda_graph"])]),
        ("generate", [(RES, ["kv_cache", "cuda_graph"])]),
        ("generate", []),
        ("train", [(REL, ALL)]),
        ("train", []),
        ("update", [(RES, ["weights"])]),  # resident only to be overwritten
        ("generate", [(RES, ["kv_cache", "cuda_graph"])]),
        ("train", [(REL, ALL)]),
    ]
    for phase, expected in steps:
        calls.clear()
        memory.enter(phase)
        assert calls == expected, phase
    memory.restarted()  # a new process holds every tag: nothing to resume
    calls.clear()
    memory.enter("generate")
    assert calls == [] and memory.released == set()


def test_servers_that_keep_their_memory_are_never_asked():
    calls = []
    memory = ServerMemory(lambda path, payload: calls.append(path), releasable=False)
    for phase in ("update", "generate", "train", "update", "generate"):
        memory.enter(phase)
    assert calls == []


# ---- the double refuses where SGLang 0.5.23 does -----------------------------------------------
def test_resuming_a_tag_that_is_not_released_kills_the_server(doubles):
    (d,) = doubles(1)
    http = SGLangHTTP(d.url)
    with pytest.raises(ServerUnavailable):
        http.post("/resume_memory_occupation", {"tags": ["weights"]})
    assert d.crash.startswith("KeyError: 'weights'")
    assert not http.healthy()


def test_the_pre_fix_step_sequence_fails_with_keyerror_weights(doubles):
    """What SGLangEngine did before: release all, resume weights for the update, then resume all."""
    (d,) = doubles(1)
    http = SGLangHTTP(d.url)
    http.post("/release_memory_occupation", {})
    http.post("/resume_memory_occupation", {"tags": ["weights"]})
    http.post("/begin_weight_update")
    http.post("/update_weights_from_tensor", {"serialized_named_tensors": [serialize_named_tensors(_buckets(1.0)[0])]})
    http.post("/end_weight_update")
    with pytest.raises(ServerUnavailable):
        http.post("/resume_memory_occupation", {})
    assert d.crash.startswith("KeyError: 'weights'")


def test_release_while_a_request_runs_kills_the_server_unless_retracted(doubles):
    busy, retracted = doubles(2, generate_delay_s=1.0)
    for d in (busy, retracted):
        threading.Thread(target=SGLangHTTP(d.url).post, args=("/generate", {"input_ids": [1, 2]}), daemon=True).start()
    time.sleep(0.3)
    with pytest.raises(ServerUnavailable):
        SGLangHTTP(busy.url).post("/release_memory_occupation", {"tags": ["kv_cache"]})
    assert busy.crash.startswith("AssertionError: release_memory_occupation should be called only when server is idle")
    http = SGLangHTTP(retracted.url)
    http.post("/pause_generation", {"mode": "retract"})  # running requests go back to the waiting queue
    http.post("/release_memory_occupation", {"tags": ["kv_cache"]})
    assert retracted.crash is None and retracted.offload_tags == {"kv_cache"}


def test_update_sessions_and_flush_are_refused_with_sglangs_messages(doubles):
    (d,) = doubles(1, generate_delay_s=1.0)
    http = SGLangHTTP(d.url)
    payload = {"serialized_named_tensors": [serialize_named_tensors(sum(_buckets(1.0), []))]}
    with pytest.raises(SGLangError, match="HTTP 400.*must run between begin_weight_update"):
        http.post("/update_weights_from_tensor", payload)
    with pytest.raises(SGLangError, match="no weight-update session is open"):
        http.post("/end_weight_update")
    http.post("/begin_weight_update")
    with pytest.raises(SGLangError, match="already open"):
        http.post("/begin_weight_update")
    http.post("/update_weights_from_tensor", payload)
    http.post("/end_weight_update")
    assert torch.equal(d.weights["lm_head.weight"], torch.full((3,), 2.0))
    worker = threading.Thread(target=http.post, args=("/generate", {"input_ids": [1]}))
    worker.start()
    time.sleep(0.3)
    with pytest.raises(SGLangError, match="Cache not flushed because there are pending requests"):
        http.post("/flush_cache")
    worker.join()
    http.post("/flush_cache")
    assert d.crash is None


@pytest.mark.parametrize("released, call, payload", [
    (["weights"], "/update_weights_from_tensor", None),
    (["kv_cache"], "/generate", {"input_ids": [1, 2]}),
    (["cuda_graph"], "/generate", {"input_ids": [1, 2]}),
])
def test_touching_released_memory_is_a_gpu_fault(doubles, released, call, payload):
    (d,) = doubles(1)
    http = SGLangHTTP(d.url)
    http.post("/release_memory_occupation", {"tags": released})
    if payload is None:
        http.post("/begin_weight_update")
        payload = {"serialized_named_tensors": [serialize_named_tensors(_buckets(1.0)[0])]}
    with pytest.raises(ServerUnavailable):
        http.post(call, payload)
    assert d.crash.startswith("GPU fault")


def test_pause_abort_ends_requests_in_flight_and_holds_new_ones(doubles):
    (d,) = doubles(1, generate_delay_s=2.0)
    http = SGLangHTTP(d.url)
    out = {}
    first = threading.Thread(target=lambda: out.setdefault("first", http.post("/generate", {"input_ids": [1]})))
    first.start()
    time.sleep(0.3)
    http.post("/pause_generation", {})  # mode abort
    first.join(timeout=5)
    assert out["first"]["meta_info"]["finish_reason"]["type"] == "abort"
    d.generate_delay_s = 0.0
    second = threading.Thread(target=lambda: out.setdefault("second", http.post("/generate", {"input_ids": [1]})))
    second.start()
    time.sleep(0.5)
    assert "second" not in out  # held while paused
    http.post("/continue_generation")
    second.join(timeout=5)
    assert out["second"]["meta_info"]["finish_reason"]["type"] == "length"


# ---- the engine's sequences --------------------------------------------------------------------
def _greedy(engine):
    return engine.generate(PROMPTS, n=2, sampling=GREEDY, seed=0)


def _assert_follows(groups, value: float, version: int):
    for prompt, group in zip(PROMPTS, groups):
        assert [s.response_ids for s in group] == [_expected(value, prompt)] * 2
        assert {s.weight_version for s in group} == {version}


def _generation(engine, value: float, version: int) -> None:
    """A rollout or an eval: the loop's generation phase (loop.py) resumes, generates, pauses."""
    engine.resume()
    _assert_follows(_greedy(engine), value, version)
    engine.pause()


def _rl_steps(engine, steps=2):
    """The engine calls in the loop's order: sync, eval, then per step rollout, train, sync, eval
    (tests/integration/test_sglang_loop_calls.py runs the loop itself)."""
    engine.update_weights(_buckets(1.0), version=0)
    _generation(engine, 1.0, 0)
    for step in range(steps):
        _generation(engine, 1.0 + step, step)
        engine.update_weights(_buckets(2.0 + step), version=step + 1)
        _generation(engine, 2.0 + step, step + 1)


@pytest.mark.parametrize("placement, transport", [
    ("colocated", "tensor"), ("colocated", "disk"), ("disaggregated", "tensor"), ("disaggregated", "distributed"),
])
def test_rl_steps_make_only_legal_calls(doubles, tmp_path, placement, transport):
    servers = doubles(2)
    if placement == "colocated":  # the job script gives every tag back before the trainer starts
        release_as_job_script([d.url for d in servers])
    engine = _engine(servers, tmp_path, placement, transport)
    _rl_steps(engine)
    for d in servers:
        assert d.crash is None
        if placement == "colocated":
            rest = ["kv_cache", "cuda_graph"]
            eval_after_sync = [(RES, rest), (REL, ALL)]
            step = [(RES, ALL), (REL, ALL), (RES, ["weights"])] + eval_after_sync  # rollout, train, sync, eval
            # The job script released all; the first sync brings back the weights alone.
            assert d.memory_calls == [(REL, ALL), (RES, ["weights"])] + eval_after_sync + step * 2
        else:
            assert d.memory_calls == []  # disaggregated servers keep their memory
        assert d.calls.count("/begin_weight_update") == d.calls.count("/end_weight_update") == (
            3 if transport != "disk" else 0)
        assert d.session is None and d.weight_version == "2"
        # Each of the 3 syncs flushes a resident prefix cache once, with its last load; a released
        # one was flushed by its release. Never /flush_cache, which also empties the allocator (a
        # full gc.collect of the scheduler on a CPU server: 0.55-0.72 s per sync on the tiny job).
        assert d.flushes == ([] if placement == "colocated" else ["update"] * 3)


def test_a_server_restarted_unseen_between_phases_is_tracked_again(doubles, tmp_path, caplog):
    """The job script brought it back while the trainer trained: it holds every tag again, and a
    resume of its weights would kill it."""
    servers = doubles(2)
    release_as_job_script([d.url for d in servers])
    engine = _engine(servers, tmp_path, "colocated", "tensor")
    engine.update_weights(_buckets(1.0), version=0)
    engine.resume()
    _greedy(engine)
    engine.pause()
    servers[1].restart()  # fresh process, same port, initial weights, every tag resident
    with caplog.at_level(logging.WARNING, logger="megatron_fipo"):
        engine.update_weights(_buckets(2.0), version=1)
    assert any("restarted since version 0" in r.getMessage() for r in caplog.records)
    _assert_follows(_greedy(engine), 2.0, 1)
    assert all(d.crash is None for d in servers)


def test_a_dead_job_script_server_is_waited_for_and_the_update_group_reformed(doubles, tmp_path, caplog):
    servers = doubles(2)
    engine = _engine(servers, tmp_path, "disaggregated", "distributed")
    engine.update_weights(_buckets(1.0), version=0)
    first = engine.transport.group_name
    _greedy(engine)
    servers[0].kill()
    threading.Timer(1.5, servers[0].restart).start()  # the job script's loop starts it again
    with caplog.at_level(logging.WARNING, logger="megatron_fipo"):
        engine.update_weights(_buckets(2.0), version=1)
    messages = [r.getMessage() for r in caplog.records]
    assert any("started by the job script) is unreachable" in m and "startup_timeout_s=30" in m for m in messages)
    assert any(f"re-forming the weight-update group {first}" in m for m in messages)
    _assert_follows(_greedy(engine), 2.0, 1)
    # The survivor left the old group before both joined the new one, on the next port.
    assert servers[1].calls.count("/init_weights_update_group") == 2
    assert servers[1].calls.count("/destroy_weights_update_group") == 1
    port = engine.cfg.weights_update_port
    assert first == f"megatron_fipo-{port}"
    assert set(servers[1].groups) == set(servers[0].groups) == {f"megatron_fipo-{port + 1}"}


def test_a_job_script_server_that_never_comes_back_fails_the_update_after_the_timeout(doubles, tmp_path, caplog):
    servers = doubles(2)
    release_as_job_script([d.url for d in servers])
    engine = _engine(servers, tmp_path, "colocated", "tensor", startup_timeout_s=2.0)
    engine.update_weights(_buckets(1.0), version=0)
    servers[0].kill()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="megatron_fipo"), pytest.raises(ServerUnavailable, match=servers[0].url):
        engine.update_weights(_buckets(2.0), version=1)
    assert 2.0 <= time.monotonic() - started < 30
    assert any("not healthy within rollout.sglang.startup_timeout_s=2.0 s" in r.getMessage() + str(r.exc_info)
               for r in caplog.records)


# ---- start-up: the job script releases its colocated servers before the trainer starts ----------
def test_the_job_script_waits_for_each_server_then_releases_every_tag_by_name(doubles):
    """launch/sbatch.py's release step, run by bash: a server still down is waited for; each ends
    with every tag released (named, SGLang's three) and the released version stamped."""
    up, late = doubles(2, api_key="k3y")
    late.kill()
    threading.Timer(1.0, late.restart).start()  # still loading when the script starts
    release_as_job_script([up.url, late.url], api_key="k3y", startup_timeout_s=30)
    for d in (up, late):
        assert d.crash is None and d.offload_tags == set(ALL) and d.weight_version == "-1"
        assert d.memory_calls == [(REL, ALL)]
        assert d.calls == [f"/{REL}", "/update_weight_version"]  # the double does not record /health
    assert late.restarts == 1


def test_the_job_script_stops_when_a_server_never_comes_up(doubles):
    (gone,) = doubles(1)
    gone.kill()
    out = run_release_block([gone.url], startup_timeout_s=1)
    assert out.returncode != 0
    assert (f"SGLang server {gone.url} not healthy within rollout.sglang.startup_timeout_s=1 s; "
            "see its sglang-*.log in /logs") in out.stderr


def test_a_server_restarted_before_the_trainers_first_call_is_taken_for_a_new_process(doubles, tmp_path, caplog):
    """The restart loop does not release (sbatch.py release_block): a server it brought back between
    the script's release and the trainer's first update holds every tag and reports version default.
    The engine releases what the update does not need and resumes nothing on it."""
    fresh, released = doubles(2)
    release_as_job_script([fresh.url, released.url])
    fresh.restart()
    with caplog.at_level(logging.WARNING, logger="megatron_fipo"):
        _rl_steps(_engine([fresh, released], tmp_path), steps=1)
    assert any("restarted since version -1 was stamped" in r.getMessage() for r in caplog.records)
    assert [d.crash for d in (fresh, released)] == [None, None]
    rest = ["kv_cache", "cuda_graph"]
    assert fresh.memory_calls[:2] == [(REL, ALL), (REL, rest)]  # the script's, then the update's on the new process
    assert released.memory_calls[:2] == [(REL, ALL), (RES, ["weights"])]
    assert fresh.memory_calls[2:] == released.memory_calls[2:]


def test_a_server_restarted_during_a_rollout_holds_every_tag_until_the_trainers_turn(doubles, tmp_path):
    """Killed mid-rollout and brought back by the job script's loop, not released by it: the engine
    routes around it, may route to it again once it is back (it holds every tag, and its samples say
    they come from the job's initial weights), and at the end of the generation phase releases all
    of its tags."""
    servers = doubles(2)
    release_as_job_script([d.url for d in servers])
    engine = _engine(servers, tmp_path)
    engine.update_weights(_buckets(1.0), version=0)
    engine.resume()
    servers[0].kill()
    threading.Timer(1.0, servers[0].restart).start()
    assert len(_greedy(engine)) == len(PROMPTS)
    engine.pause()  # waits for the restarted server, then releases it
    assert servers[0].restarts == 1 and servers[0].offload_tags == set(ALL)
    before = len(servers[0].memory_calls)
    engine.update_weights(_buckets(2.0), version=1)
    _generation(engine, 2.0, 1)
    assert [d.crash for d in servers] == [None, None]
    assert servers[0].memory_calls[before - 1:] == [(REL, ALL), (RES, ["weights"]), (RES, ["kv_cache", "cuda_graph"]),
                                                    (REL, ALL)]


def test_a_server_that_dies_between_the_check_and_its_release_is_recovered_into_the_phase(doubles, tmp_path):
    """It answered the phase's health check, then died before its release: the engine recovers it
    (the job script restarts it) and releases the new process, instead of failing the run."""
    servers = doubles(2)
    release_as_job_script([d.url for d in servers])
    engine = _engine(servers, tmp_path)
    engine.update_weights(_buckets(1.0), version=0)
    engine.resume()
    _greedy(engine)
    armed = [True]

    def die_after_the_check(path: str) -> None:
        if path == "/model_info" and armed.pop() if armed else False:
            servers[1].kill()
            threading.Timer(1.0, servers[1].restart).start()

    servers[1].after_call = die_after_the_check
    engine.pause()
    assert servers[1].restarts == 1 and servers[1].offload_tags == set(ALL) and servers[0].offload_tags == set(ALL)
    engine.update_weights(_buckets(2.0), version=1)
    _generation(engine, 2.0, 1)
    assert [d.crash for d in servers] == [None, None]


def test_a_sync_holds_no_more_buckets_than_before_it_flagged_the_last(doubles, tmp_path):
    """The transport looks one bucket ahead to flag the last load (the one that flushes): at most two
    buckets are alive at once, as when the next was built while the previous was still held."""
    import gc
    import weakref

    alive, peak = set(), [0]

    def buckets():
        for i in range(5):
            tensor = torch.full((3,), float(i))
            alive.add(id(tensor))
            weakref.finalize(tensor, alive.discard, id(tensor))
            gc.collect()
            peak[0] = max(peak[0], len(alive))
            yield [("lm_head.weight", tensor)]

    servers = doubles(1)
    engine = _engine(servers, tmp_path, "disaggregated", "tensor")
    engine.update_weights(buckets(), version=0)
    assert peak[0] == 2 and servers[0].flushes == ["update"]
    assert torch.equal(servers[0].weights["lm_head.weight"], torch.full((3,), 4.0))
