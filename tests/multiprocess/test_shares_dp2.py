"""Samples to ranks under torchrun x2 (DP=2, gloo): each rank receives only its share, balanced by tokens,
and the loss on the same samples equals the old strided split's (shares_worker.py)."""

import json
from pathlib import Path

import pytest
from helpers.launch import torchrun

pytestmark = pytest.mark.multiprocess
WORKER = Path(__file__).with_name("shares_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("shares")
    torchrun(2, WORKER, str(out))
    res = json.loads((out / "results.json").read_text())
    print(json.dumps({k: v for k, v in res.items() if k != "response_lengths"}))
    return res


def test_each_rank_receives_only_its_share_exactly(results):
    assert results["all_exact"] == [[1, 1, 1], [1, 1, 1]]  # share as planned, whole batch over the peer group, no batch
    received, total = results["received_bytes"], results["total_bytes"]
    assert received[0] == 0  # rank 0 keeps its own share
    assert 0.4 <= received[1] / total <= 0.6


def test_tokens_balanced_on_a_long_tailed_batch(results):
    lengths = results["response_lengths"]
    assert lengths[-1] > 6 * lengths[len(lengths) // 2]  # the longest response > 6x the median
    assert max(results["imbalance_balanced"]) <= 0.05
    assert max(results["imbalance_strided"]) > 10 * max(results["imbalance_balanced"])  # the old stride's, same batch


@pytest.mark.parametrize("cap", ["0.0", "2.0"])
def test_loss_on_the_same_samples_equals_the_strided_split(results, cap):
    for (loss, grad), (old_loss, old_grad) in zip(results[f"balanced_{cap}"], results[f"strided_{cap}"]):
        assert abs(loss - old_loss) <= 1e-6
        assert grad == pytest.approx(old_grad, rel=1e-5)
    if cap == "2.0":
        # With TIS the actor's loss over both ranks is the loss function's on each whole mini-batch,
        # and differs from the loss without it.
        for (loss, _), whole, (off, _) in zip(results["balanced_2.0"], results["whole_2.0"], results["balanced_0.0"]):
            assert loss == pytest.approx(whole, rel=1e-5)
            assert abs(loss - off) > 1e-3
