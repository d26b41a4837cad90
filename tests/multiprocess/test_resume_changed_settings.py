"""Resume a checkpoint after changing optimizer settings (torchrun x2, DP=2: a sharded distributed optimizer).

The new config's hyper-parameters win (lr, weight decay, betas, eps), the saved state stays (Adam
moments and step count, bit for bit): what a user means by `optim.lr=... trainer.total_steps=...` on a
finished run.
"""

from pathlib import Path

import pytest
import torch
from helpers.launch import torchrun

from megatron_fipo.testing import make_hf_checkpoint

pytestmark = pytest.mark.multiprocess
WORKER = Path(__file__).with_name("resume_hparams_worker.py")
NEW = ["optim.lr=0.05", "optim.weight_decay=0.05", "optim.adam_beta2=0.99", "optim.adam_eps=1.0e-6"]


def test_resume_takes_the_new_hyperparameters_and_keeps_the_adam_state(tmp_path):
    hf = make_hf_checkpoint(tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    torchrun(2, WORKER, str(tmp_path), str(hf), str(ckpt), "save")
    torchrun(2, WORKER, str(tmp_path), str(hf), str(ckpt), "load", *NEW)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"save_rank{rank}.pt", weights_only=True)["state"]
        loaded = torch.load(tmp_path / f"load_rank{rank}.pt", weights_only=True)
        groups = loaded["state"]["groups"]
        assert [g["lr"] for g in groups] == [0.05] * len(groups) and loaded["next_step_lr"] == 0.05
        assert [g["max_lr"] for g in groups] == [0.05] * len(groups)
        # Megatron's no-decay group (biases, norms) keeps weight decay 0; the others take the new 0.05.
        assert sorted(g["weight_decay"] for g in groups) == sorted(0.05 if s["weight_decay"] else 0.0
                                                                   for s in saved["groups"])
        assert {s["weight_decay"] for s in saved["groups"]} == {0.0, 0.1}
        assert all(tuple(g["betas"]) == (0.9, 0.99) and g["eps"] == 1e-6 for g in groups)
        assert len(loaded["state"]["moments"]) == len(saved["moments"]) > 0
        for got, want in zip(loaded["state"]["moments"], saved["moments"]):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(got[key], want[key]), key
        assert float(saved["moments"][0]["step"]) == 2
