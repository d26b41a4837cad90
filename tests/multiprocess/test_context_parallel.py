"""Context parallelism, sequence parallelism and packing against CP=1/TP=1 (torchrun over gloo, fp32, CPU).

The reference runs padded micro-batches on one rank. CP=2 and CP=4 split packed sequences in
Megatron's zig-zag layout (the CPU attention all-gathers K/V; Future-KL swaps chunk carries), TP=2
with SP re-orders each logprob chunk from TP-rank-major rows, and CP=2 x TP=2 x SP does both. The
batch's sequence lengths (9 to 15 tokens) are mostly not multiples of 2·cp; its planted tokens make
the dual clip, the Future-KL exclusion and the sequence filter act.
"""

from pathlib import Path

import pytest
import torch
from helpers.launch import torchrun
from test_actor_parallel import hf_dirs  # noqa: F401  (the tiny untied/tied checkpoints)

pytestmark = pytest.mark.multiprocess
WORKER = Path(__file__).with_name("cp_worker.py")
# Launches: ranks, worker arguments. CP packs whatever actor.packing says.
LAUNCHES = {
    "tp1": (1, ["packings=off,on"]),
    "tp2_sp": (2, ["packings=off,on", "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    "cp2": (2, ["parallel.context_parallel_size=2"]),
    "cp4": (4, ["parallel.context_parallel_size=4"]),
    "cp2_tp2_sp": (4, ["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=2",
                       "parallel.sequence_parallel=true"]),
}
# Each against the reference: TP=1, CP=1, padded micro-batches.
LAYOUTS = [("tp1", "on"), ("tp2_sp", "off"), ("tp2_sp", "on"), ("cp2", "on"), ("cp4", "on"), ("cp2_tp2_sp", "on")]


@pytest.fixture(scope="module")
def runs(hf_dirs, tmp_path_factory):  # noqa: F811
    out = {}
    for name, (nproc, args) in LAUNCHES.items():
        d = tmp_path_factory.mktemp(name)
        torchrun(nproc, WORKER, str(d), str(hf_dirs[0]), *args)
        out[name] = torch.load(d / "results.pt", weights_only=True)
    return out


def test_reference_exercises_future_kl_and_the_filter(runs):
    ref = runs["tp1"]["off"]
    assert ref["seqs_filtered"] == 2
    assert ref["future_kl"].abs().max() > 0.5
    assert ref["num_microbatches"] >= 2


@pytest.mark.parametrize("launch,packing", LAYOUTS)
def test_layout_equals_reference(runs, launch, packing):
    ref, got = runs["tp1"]["off"], runs[launch][packing]
    mask = ref["response_mask"].bool()
    for key in ("logp", "entropy", "future_kl"):
        scale = ref[key][mask].abs().max().item()
        torch.testing.assert_close(got[key][mask], ref[key][mask], rtol=1e-5, atol=1e-5 * scale, msg=key)
    assert got["tokens"] == ref["tokens"]
    assert got["seqs_filtered"] == ref["seqs_filtered"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("launch", ["cp2", "cp4", "cp2_tp2_sp"])
def test_future_kl_exchange_is_two_values_per_sequence_per_rank(runs, launch):
    # Per micro-batch of n sequences, each rank sends the totals of its two chunks of each sequence
    # (2·cp values per sequence over the group, whatever the sequence's length) and, for the
    # sequence filter, one count per sequence.
    got = runs[launch]["on"]
    assert len(got["exchanges"]) == got["num_microbatches"]
    for n, future_kl_sent, filter_sent in got["exchanges"]:
        assert future_kl_sent == [("all_gather", 2 * n)]
        assert filter_sent == [("all_reduce", n)]
    assert all(sent == [] for _, *sents in runs["tp1"]["on"]["exchanges"] for sent in sents)
