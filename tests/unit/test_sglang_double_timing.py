"""The SGLang double's timing model (megatron_fipo/testing_sglang_timing.py, a test double at the
process boundary: 32 real servers cannot start here). Its SGLang behaviours (n, abort shapes, rids,
server info) were measured on the real CPU server (docs/benchmarks.md); these tests pin them, and
the step-time arithmetic in simulated time, so no assertion depends on this machine's speed."""

import math
import statistics
import threading

import pytest

from megatron_fipo.rollout.sglang_http import SGLangError, SGLangHTTP
from megatron_fipo.testing_sglang import SGLangDouble
from megatron_fipo.testing_sglang_timing import DecodeScheduler, DecodeTiming, Sequence

A, B = 0.01, 0.002
FAST = DecodeTiming(max_running_requests=2, step_s=A, step_per_seq_s=B, time_scale=1e-3)
SLOW = DecodeTiming(max_running_requests=2, step_s=A, step_per_seq_s=B, time_scale=1.0)


@pytest.fixture
def double():
    made = []

    def make(timing: DecodeTiming) -> tuple[SGLangDouble, SGLangHTTP]:
        made.append(SGLangDouble(vocab_size=100, timing=timing))
        return made[-1], SGLangHTTP(made[-1].url, timeout_s=60)

    yield make
    for d in made:
        d.close()


def _run(scheduler: DecodeScheduler, lengths: list[int]) -> list[Sequence]:
    seqs = [Sequence(f"r{i}", [i], 0, n) for i, n in enumerate(lengths)]
    scheduler.submit(seqs)
    for seq in seqs:
        assert seq.done.wait(30)
    return seqs


def test_full_slots_queue_and_each_step_costs_a_plus_b_times_running():
    scheduler = DecodeScheduler(FAST, "t")
    try:
        seqs = _run(scheduler, [10, 4, 6])
        stats = scheduler.stats()
    finally:
        scheduler.close()
    # Two slots: 10 and 4 run; 6 joins when 4 ends (step 4) and ends at step 10 with the first.
    assert [s.start for s in seqs] == [0, 0, 4]
    assert [s.made for s in seqs] == [10, 4, 6] and not any(s.aborted for s in seqs)
    assert stats["steps"] == 10 and stats["tokens"] == 20 and stats["finished"] == 3
    assert stats["decode_s"] == pytest.approx(10 * (A + 2 * B), rel=1e-12)


def test_a_lone_sequence_steps_faster_than_a_full_batch():
    scheduler = DecodeScheduler(FAST, "t")
    try:
        _run(scheduler, [5])
        _run(scheduler, [5, 3])  # an idle gap between the two batches costs no decode time
        stats = scheduler.stats()
    finally:
        scheduler.close()
    assert stats["steps"] == 10
    assert stats["decode_s"] == pytest.approx(5 * (A + B) + 3 * (A + 2 * B) + 2 * (A + B), rel=1e-12)


def test_lengths_are_seeded_lognormal_capped_and_ignore_eos_takes_the_cap():
    timing = DecodeTiming(length_median=200, length_sigma=0.8, seed=3)
    draws = [timing.length([i, 7], 0, 10**6, ignore_eos=False) for i in range(2000)]
    assert draws == [timing.length([i, 7], 0, 10**6, ignore_eos=False) for i in range(2000)]
    assert statistics.median(draws) == pytest.approx(200, rel=0.06)  # median of the lognormal
    assert statistics.pstdev([math.log(d) for d in draws]) == pytest.approx(0.8, rel=0.06)
    assert [timing.length([1, 7], k, 10**6, False) for k in range(3)] != [draws[1]] * 3  # each sample its own
    assert DecodeTiming(seed=4).length([1, 7], 0, 10**6, False) != DecodeTiming(seed=3).length([1, 7], 0, 10**6, False)
    capped = [timing.length([i, 7], 0, 300, ignore_eos=False) for i in range(2000)]
    assert capped == [min(d, 300) for d in draws]
    assert timing.length([1], 0, 77, ignore_eos=True) == 77


def test_get_server_info_reports_the_slots_as_sglang_names_them(double):
    _, http = double(FAST)
    info = http.get("/get_server_info")
    assert info["max_running_requests"] == 2 and info["version"] == "0.5.23"
    assert info["internal_states"][0]["effective_max_running_requests_per_dp"] == 2


def test_n_samples_of_one_request_follow_their_prompt_with_their_own_lengths(double):
    d, http = double(DecodeTiming(max_running_requests=8, time_scale=1e-4, length_median=20, seed=5))
    one = http.post("/generate", {"input_ids": [5, 6], "sampling_params": {"n": 3, "max_new_tokens": 50}})
    assert [len(o["output_ids"]) for o in one] == [d.timing.length([5, 6], k, 50, False) for k in range(3)]
    for o in one:
        made = len(o["output_ids"])
        assert o["meta_info"]["finish_reason"] == {"type": "length", "length": made}
        assert len(o["meta_info"]["output_token_logprobs"]) == made == o["meta_info"]["completion_tokens"]
    batch = http.post("/generate", {"input_ids": [[5, 6], [9]], "sampling_params": {"n": 2, "max_new_tokens": 50}})
    expected = [d.timing.length(p, k, 50, False) for p in ([5, 6], [9]) for k in range(2)]  # prompt-major
    assert [len(o["output_ids"]) for o in batch] == expected
    # n identical prompts in a batch are the same samples as n=
    same = http.post("/generate", {"input_ids": [[5, 6]] * 3, "sampling_params": {"max_new_tokens": 50}})
    assert [o["output_ids"] for o in same] == [o["output_ids"] for o in one]


def _generate_in_background(http: SGLangHTTP, payload: dict) -> tuple[threading.Thread, dict]:
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("out", http.post("/generate", payload)))
    thread.start()
    return thread, box


def _wait_for_tokens(d: SGLangDouble) -> None:
    for _ in range(3000):
        if d.decoder.stats()["tokens"] > 0:
            return
        threading.Event().wait(0.01)
    raise AssertionError("the double made no token")


def test_abort_all_ends_running_and_queued_sequences_with_the_tokens_made_so_far(double):
    d, http = double(SLOW)
    thread, box = _generate_in_background(http, {"input_ids": [[1], [2], [3]], "sampling_params": {
        "max_new_tokens": 10**6, "ignore_eos": True}, "return_logprob": True})
    _wait_for_tokens(d)
    assert http.post("/abort_request", {"abort_all": True}) == {}  # an empty 200, as SGLang answers
    thread.join(30)
    outs = box["out"]
    abort = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
    assert [o["meta_info"]["finish_reason"] for o in outs] == [abort] * 3
    made = [len(o["output_ids"]) for o in outs]
    assert made[0] == made[1] > 0 and made[2] == 0  # two slots ran; the third was still queued
    assert [len(o["meta_info"]["output_token_logprobs"]) for o in outs] == made
    stats = d.decoder.stats()
    assert stats["aborted"] == 3 and stats["tokens"] == sum(made)


def test_abort_by_rid_ends_that_request_only_and_not_the_samples_of_n(double):
    d, http = double(DecodeTiming(max_running_requests=8, step_s=A, step_per_seq_s=B))
    long = {"max_new_tokens": 10**6, "ignore_eos": True}
    thread, box = _generate_in_background(http, {"rid": ["a1", "b1"], "input_ids": [[1], [2]], "sampling_params": long})
    grouped, group_box = _generate_in_background(http, {"rid": "g", "input_ids": [4], "sampling_params": {**long, "n": 2}})
    _wait_for_tokens(d)
    http.post("/abort_request", {"rid": "a1"})
    http.post("/abort_request", {"rid": "g"})  # SGLang gave each sample of n a fresh id: aborts nothing
    thread.join(0.5)
    assert thread.is_alive()  # b1 runs on until the abort_all below
    http.post("/abort_request", {"abort_all": True})
    thread.join(30)
    grouped.join(30)
    a1, b1 = box["out"]
    assert a1["meta_info"]["id"] == "a1" and len(a1["output_ids"]) < len(b1["output_ids"])
    assert d.decoder.stats()["aborted"] == 4
    with pytest.raises(SGLangError, match="rids length mismatch"):
        http.post("/generate", {"rid": ["x"], "input_ids": [[1], [2]], "sampling_params": {"max_new_tokens": 1}})
