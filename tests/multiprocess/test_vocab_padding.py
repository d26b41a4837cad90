"""A vocabulary TP does not divide (1003 at TP=2): padded to 1004 rows as Megatron-Bridge pads it,
the padding outside logprobs and entropy, so TP=2 equals TP=1; the round trip through conversion at
TP=2 is in test_convert.py."""

from pathlib import Path

import pytest
import torch
from helpers.launch import torchrun

from megatron_fipo.testing import make_hf_checkpoint

pytestmark = pytest.mark.multiprocess
WORKER = Path(__file__).with_name("vocab_padding_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab1003")
    hf = make_hf_checkpoint(root / "hf", seed=4, family="qwen3", vocab_size=1003)
    torchrun(1, WORKER, str(root / "tp1.pt"), str(hf))
    torchrun(2, WORKER, str(root / "tp2.pt"), str(hf))
    return {tp: torch.load(root / f"tp{tp}.pt", weights_only=True) for tp in (1, 2)}


def test_padded_as_megatron_bridge_pads(results):
    assert results[1]["padded_rows"] == 1003  # TP=1 divides it: no padding
    assert results[2]["padded_rows"] == 1004  # 1003 is odd: divisor 1, x TP=2


def test_logprobs_and_entropy_at_tp2_equal_tp1(results):
    for key in ("logp", "entropy"):
        assert torch.isfinite(results[2][key]).all()
        torch.testing.assert_close(results[2][key], results[1][key], rtol=1e-5, atol=1e-6)


def test_training_leaves_the_padding_at_zero_and_tp2_equal_to_tp1(results):
    assert torch.equal(results[2]["padding_rows_after_step"], torch.zeros(1, 64))
    assert not torch.equal(results[2]["trained_logp"], results[2]["logp"])
    torch.testing.assert_close(results[2]["trained_logp"], results[1]["trained_logp"], rtol=1e-4, atol=1e-4)
