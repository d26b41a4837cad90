"""Offload between phases and the step-0 checkpoint: DP=2 with the distributed optimizer (torchrun x2, gloo).

One launch per precision; see offload_worker.py for the four actors it trains.
"""

from pathlib import Path

import pytest
import torch
from helpers.launch import torchrun

from megatron_fipo.testing import make_hf_checkpoint

pytestmark = pytest.mark.multiprocess
WORKER = Path(__file__).with_name("offload_worker.py")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf") / "untied", seed=0)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def ranks(request, hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    torchrun(2, WORKER, str(out), str(hf_dir), request.param)
    return [torch.load(out / f"results_{rank}.pt", weights_only=True) for rank in (0, 1)]


def _bit_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_offload_frees_every_byte_and_onload_restores_them_bit_for_bit(ranks):
    for results in ranks:
        cycles = results["offload"]["cycles"]
        for cycle in cycles:
            assert cycle["bytes_before"] > 0 and cycle["bytes_offloaded"] == 0
            assert cycle["offload"]["device_bytes"] == 0
            # Weights, main params and optimizer state wait on the host; grads are dropped, not copied.
            assert cycle["offload"]["kept_bytes"] + cycle["offload"]["dropped_bytes"] == cycle["bytes_before"]
            assert cycle["host_bytes"] == cycle["offload"]["kept_bytes"]
            assert cycle["refused"], "computing while offloaded must raise, not touch freed memory"
            assert cycle["bytes_onloaded"] == cycle["bytes_before"]
            assert cycle["bit_equal"] and cycle["grads_zero"]
        # The first offload precedes any optimizer step; from the second on, the Adam moments go too.
        assert cycles[1]["offload"]["kept_bytes"] > cycles[0]["offload"]["kept_bytes"]
        assert cycles[1]["state_tensors"] > cycles[0]["state_tensors"]


def test_offload_between_every_step_ends_bit_equal(ranks):
    for results in ranks:
        assert results["offload"]["losses"] == results["plain"]["losses"]
        assert _bit_equal(results["offload"]["final"], results["plain"]["final"])


def test_step0_checkpoint_resumes_equal_to_uninterrupted(ranks):
    for results in ranks:
        # Writing it (which gives the never-stepped optimizer its state) changes nothing...
        assert results["saved"]["losses"] == results["plain"]["losses"]
        assert _bit_equal(results["saved"]["final"], results["plain"]["final"])
        if "resumed" not in results:
            pytest.skip("bf16 dist checkpoints fail on this CPU model, at any step: the local spec keeps RMSNorm "
                        "weights in fp32, so DDP makes a second (fp32) buffer, and Megatron 0.19.2's dp_reshardable "
                        "writer asserts on it (distrib_optimizer.py, sharded_param_state_dp_reshardable)")
        # ...and a fresh actor that loads it goes on exactly as one that never stopped.
        assert results["resumed"]["losses"] == results["plain"]["losses"]
        assert _bit_equal(results["resumed"]["final"], results["plain"]["final"])
