"""The SGLang engine against a real SGLang server running on this CPU (no mock anywhere).

The server runs from .venv-sglang (tools/sglang_cpu/setup.sh, which `make test` runs) through
tools/sglang_cpu/python, which adds the documented sgl_kernel import shim. Weights reach it through
the bridge's HF-named tensors; the embedded engine with the same weights is the reference.

Memory release is not run here: on a CPU SGLang 0.5.23's /release_memory_occupation ends in
``torch.get_device_module().synchronize()`` (weight_updater.py:379), which raises "Found no NVIDIA
driver" in the scheduler and kills the server (measured). Those calls are checked against the
double (tests/unit/test_sglang_lifecycle.py); the rule it rests on, a resume of a tag never released
kills the server, is checked here on the real one.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron_fipo.bridge.hf_io import HFCheckpointReader
from megatron_fipo.bridge.mapping import hf_names
from megatron_fipo.config import RolloutConfig, SGLangConfig
from megatron_fipo.rollout.base import SamplingParams
from megatron_fipo.rollout.embedded import EmbeddedEngine
from megatron_fipo.rollout.sglang_engine import SGLangEngine
from megatron_fipo.rollout.sglang_http import SGLangError, SGLangHTTP, ServerUnavailable
from megatron_fipo.rollout.sglang_weights import DiskTransport, DistributedTransport
from megatron_fipo.testing import make_hf_checkpoint
from tests.helpers.launch import free_port
from tests.integration.sglang_handoff_worker import PROMPTS as WORKER_PROMPTS

REPO = Path(__file__).resolve().parents[2]
SGLANG_PYTHON = REPO / "tools" / "sglang_cpu" / "python"
CPU_ARGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph", "--dtype", "float32",
            "--max-total-tokens", "16384", "--skip-server-warmup", "--sleep-on-idle"]
PROMPTS = [[5, 17, 33, 2], [9, 9], [100, 4, 77, 31, 12, 8, 3], [42]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
# fp32 on both sides (the tiny job measured 2e-7 mean abs between trainer and SGLang).
LOGPROB_ATOL = 1e-5
API_KEY = "test-key"

if not (REPO / ".venv-sglang" / "bin" / "python").exists():
    if os.environ.get("CI"):
        raise RuntimeError(".venv-sglang is missing: `make test` runs tools/sglang_cpu/setup.sh first")
    pytest.skip("no .venv-sglang: run tools/sglang_cpu/setup.sh (make test does)", allow_module_level=True)


def _buckets(reader: HFCheckpointReader, names: list[str]) -> list[list[tuple[str, torch.Tensor]]]:
    half = len(names) // 2  # two buckets, as the bridge would send them
    return [[(n, reader.read(n)) for n in names[:half]], [(n, reader.read(n)) for n in names[half:]]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang")
    readers = [HFCheckpointReader(make_hf_checkpoint(root / f"hf{seed}", seed=seed)) for seed in (1, 2)]
    arch = readers[0].arch()
    names = hf_names(arch)
    # SGLang's CPU engine sizes its pool from the host's free memory, which other processes move while
    # it starts: at 0.05 a busy machine measured "no memory for the KV cache" (minimum 0.069).
    # --max-total-tokens caps the KV cache whatever the fraction.
    cfg = RolloutConfig(engine="sglang", sglang=SGLangConfig(
        python=str(SGLANG_PYTHON), base_port=free_port(), mem_fraction_static=0.3, extra_args=CPU_ARGS, api_key=API_KEY,
        release_memory=False, weight_transport="tensor", startup_timeout_s=300,
        num_servers=2))
    engine = SGLangEngine(cfg, arch, root / "run")
    try:
        engine.update_weights(_buckets(readers[0], names), version=0)  # a snapshot
        engine.resume()  # the first generation phase launches the servers from it
    except BaseException:
        engine.shutdown()  # one that did start must not outlive the test
        raise
    references = []
    for reader in readers:
        ref = EmbeddedEngine(arch)
        ref.update_weights(_buckets(reader, names), version=0)
        references.append(ref)
    yield engine, readers, references, names, arch, root
    engine.shutdown()


def _greedy(engine, n=1):
    return engine.generate(PROMPTS, n=n, sampling=GREEDY, seed=0)


def _assert_same_greedy(groups, ref_groups):
    for group, ref_group in zip(groups, ref_groups):
        got, want = group[0], ref_group[0]
        assert got.response_ids == want.response_ids
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=LOGPROB_ATOL)


def test_api_key_is_required(setup):
    engine = setup[0]
    with pytest.raises(SGLangError, match="HTTP 401"):
        SGLangHTTP(engine.servers[0].url).post("/generate", {"input_ids": [1, 2], "sampling_params": {}})


def test_weight_updates_change_greedy_output_to_the_embedded_engines(setup):
    engine, readers, references, names, arch, root = setup
    before = _greedy(engine)
    _assert_same_greedy(before, _greedy(references[0]))
    assert all(n > 0 for n in engine.served), f"least-loaded routing left a server idle: {engine.served}"
    assert {s.weight_version for g in before for s in g} == {0}

    # update_weights_from_tensor (shared memory on a CPU) with new weights: output follows them.
    engine.update_weights(_buckets(readers[1], names), version=1)
    after = _greedy(engine)
    assert [g[0].response_ids for g in after] != [g[0].response_ids for g in before]
    _assert_same_greedy(after, _greedy(references[1]))
    assert {s.weight_version for g in after for s in g} == {1}

    # update_weights_from_disk back to the first weights.
    DiskTransport(root / "disk", arch).push(engine.servers, _buckets(readers[0], names), version=2)
    engine.update_weights([], version=2)  # no tensors: only bumps the version (the disk push flushed the cache)
    again = _greedy(engine)
    _assert_same_greedy(again, _greedy(references[0]))
    assert {s.weight_version for g in again for s in g} == {2}


def test_sampled_logprobs_match_the_embedded_engine(setup):
    engine, readers, references, names, arch, root = setup
    engine.update_weights(_buckets(readers[0], names), version=3)
    groups = engine.generate(PROMPTS, n=3, sampling=SamplingParams(temperature=0.7, max_new_tokens=10), seed=0)
    assert [len(g) for g in groups] == [3] * len(PROMPTS)
    ref = references[0]
    for prompt, group in zip(PROMPTS, groups):
        for sample in group:
            # Score SGLang's tokens with the embedded engine's model: same numbers, same temperature.
            want = ref.score(prompt, sample.response_ids, temperature=0.7)
            assert torch.allclose(torch.tensor(sample.logprobs), want, atol=LOGPROB_ATOL)


def test_killed_server_mid_batch_loses_no_prompt(setup, caplog):
    engine, readers, references, names, arch, root = setup
    server, other = engine.servers
    served_before = list(engine.served)
    prompts = [[i % 200 + 1, 7, 9] for i in range(48)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=200)
    out: dict = {}
    worker = threading.Thread(target=lambda: out.setdefault("groups", engine.generate(prompts, 2, sampling, seed=0)))
    with caplog.at_level("WARNING", logger="megatron_fipo"):
        worker.start()
        threading.Event().wait(3.0)  # let requests reach the server
        assert worker.is_alive(), "the batch finished before the server could be killed: make it longer"
        os.killpg(server.proc.pid, signal.SIGKILL)
        worker.join(timeout=600)
    assert not worker.is_alive()
    groups = out["groups"]
    assert len(groups) == len(prompts) and all(len(g) == 2 for g in groups)
    assert all(s.prompt_ids == p and 1 <= len(s.response_ids) <= 200 for p, g in zip(prompts, groups) for s in g)
    engine.wait_for_recoveries()
    assert server.restarts == 1 and other.restarts == 0 and server.http.healthy()
    # The killed server's requests were retried: the healthy one took more than its even share.
    assert engine.served[1] - served_before[1] > len(prompts)
    assert any("restarting" in r.getMessage() for r in caplog.records)
    # The restart came up from the newest snapshot on disk, and its samples say which weights they used.
    assert {s.weight_version for g in groups for s in g} <= {0, 3}


def test_distributed_update_over_gloo(setup):
    engine, readers, references, names, arch, root = setup
    transport = DistributedTransport("127.0.0.1", free_port(), backend="gloo")
    transport.push(engine.servers, _buckets(readers[1], names), version=4)
    engine.update_weights([], version=4)
    _assert_same_greedy(_greedy(engine), _greedy(references[1]))


def test_resuming_a_tag_never_released_kills_the_real_server(setup):
    """SGLang 0.5.23's offload_tags.remove raises in the scheduler, which takes the server down (the
    double's crash rule). The engine then recovers it."""
    engine = setup[0]
    server = engine.servers[0]
    with pytest.raises(ServerUnavailable):
        SGLangHTTP(server.url, API_KEY, timeout_s=120).post("/resume_memory_occupation", {"tags": ["weights"]})
    server.proc.wait(timeout=60)
    log = server.log_path.read_text(errors="replace")
    assert "Scheduler hit an exception" in log and "KeyError: 'weights'" in log
    engine._report_dead(0)
    engine.wait_for_recoveries()
    assert server.http.healthy() and server.restarts >= 1


def _torchrun_nodes(script: Path, nodes: int, logs: Path, *args: str, timeout: int = 600) -> None:
    """One torchrun per simulated node, one process each: the ranks see ``nodes`` nodes. Output goes to
    files, not pipes: torch's shared-memory manager outlives a worker holding its pipes open."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    port = str(free_port())
    procs = []
    for k in range(nodes):
        with open(logs / f"node{k}.log", "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                                           "--node-rank", str(k), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                                           "--master-port", port, str(script), *args],
                                          env=env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break  # one node failed: the others wait for it in a collective
        time.sleep(1.0)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for k, proc in enumerate(procs):
        assert proc.wait() == 0, f"node {k} exited {proc.returncode}:\n{(logs / f'node{k}.log').read_text()[-6000:]}"


def test_per_node_handoff_each_rank_loads_its_own_server(setup):
    """Two trainer ranks on two (simulated) nodes, each loading the real server of its own node
    with shared-memory handles: greedy output follows each update on both, and nothing is broadcast."""
    engine, readers, references, names, arch, root = setup
    urls = [server.url for server in engine.servers]
    _torchrun_nodes(Path(__file__).parent / "sglang_handoff_worker.py", 2, root, str(root), API_KEY, *urls)
    results = [json.loads((root / f"rank{k}.json").read_text()) for k in range(2)]
    want = [[g[0].response_ids for g in ref.generate(WORKER_PROMPTS, n=1, sampling=GREEDY, seed=0)] for ref in references]
    assert want[0] != want[1]
    for k, result in enumerate(results):
        assert result["sinks"] == [0, 1]
        assert result["tensor_posts"] == [urls[k]]  # its own node's server, no other
        assert result["tensor_post_count"] >= 4  # two pushes of several buckets each
        assert result["broadcasts"] == []
        for version, (greedy, tokens) in enumerate(zip(result["greedy"], want)):
            assert greedy["tokens"] == tokens
            assert set(greedy["version"]) == {str(version)}


def test_stream_abort_keeps_what_completed_and_a_partial_greedy_sample_continues_exactly(setup):
    """Streaming on the real server: a group's samples come from one server in one request; a
    cancel mid-generation returns at once with the completed group intact and the rest cut short
    (not retried); continuing a cut greedy sample from its prefix gives the uninterrupted tokens."""
    from megatron_fipo.rollout.base import GroupRequest

    engine, readers, references, names, arch, root = setup
    engine.update_weights(_buckets(readers[0], names), version=5)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=120)
    prompts = [[5, 17, 33, 2], [9, 9, 4], [100, 4, 77]]
    capacity, engine.capacity = engine.capacity, [2, 2]  # one group of 2 per server: the third waits
    served = list(engine.served)
    try:
        stream = engine.stream(iter(GroupRequest(i, p, 2) for i, p in enumerate(prompts)), sampling, seed=0)
        first = next(iter(stream))
        started = time.monotonic()
        cut = stream.cancel()
        cancel_s = time.monotonic() - started
    finally:
        engine.capacity = capacity
    print(f"cancel returned in {cancel_s:.3f} s with {stream.stats.aborted_sequences} sequences cut short")
    assert cancel_s < 5.0  # measured well under 1 s; generous for a loaded host
    assert [len(s.response_ids) for s in first.samples] == [120, 120] and first.complete  # kept intact
    assert stream.stats.retried_requests == 0 and stream.stats.aborted_sequences >= 2
    assert cut and sorted([first.key] + [r.key for r in cut]) == list(range(1 + len(cut)))  # every group sent came back
    # One request per group, on one server: the served counts moved by whole groups.
    moved = [after - before for after, before in zip(engine.served, served)]
    assert moved == [2 * [r.engine for r in [first, *cut]].count(i) for i in range(len(engine.servers))]

    partial = next(r for r in cut if not r.complete)
    prompt = prompts[partial.key]
    sample = partial.samples[0]
    assert sample.finish_reason == "abort" and len(sample.response_ids) < 120
    (whole,) = list(engine.stream(iter([GroupRequest("again", prompt, 2, partial=partial.samples)]), sampling, seed=0))
    want = references[0].generate([prompt], n=1, sampling=sampling, seed=0)[0][0]
    for got in whole.samples:
        assert got.response_ids == want.response_ids
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=LOGPROB_ATOL)
        assert got.weight_version == 5 and got.version_segments == []
