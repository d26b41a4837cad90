"""Truncated importance sampling against the rollout logprobs (algo.tis_cap)."""

import pytest
import torch

from megatron_fipo.algo import FIPOConfig, dapo_policy_loss, fipo_policy_loss
from megatron_fipo.algo.policy_loss import truncated_is_weights
from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError, load_config

# pi_old / pi_rollout = 2, 1/2, 5 on three tokens (the fourth is padding).
OLD = torch.log(torch.tensor([[0.5, 0.2, 0.5, 1.0]]))
ROLLOUT = torch.log(torch.tensor([[0.25, 0.4, 0.1, 1.0]]))
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])


def test_weights_hand_computed():
    w = truncated_is_weights(OLD, ROLLOUT, cap=3.0)
    torch.testing.assert_close(w[:, :3], torch.tensor([[2.0, 0.5, 3.0]]), rtol=1e-6, atol=0)  # min(5, 3) = 3


def test_loss_and_gradient_hand_computed():
    # logp = old_logp: ratio 1, inside the clip, so d(per-token loss)/d(logp) = -A * w.
    cfg = FIPOConfig(tis_cap=3.0)
    logp = OLD.clone().requires_grad_(True)
    rollout = ROLLOUT.clone().requires_grad_(True)
    loss, metrics = dapo_policy_loss(logp, OLD, torch.tensor([1.0]), MASK, cfg, rollout_logp=rollout)
    assert loss.item() == pytest.approx(-(2.0 + 0.5 + 3.0) / 3, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0 / 3, -0.5 / 3, -1.0, 0.0]]), rtol=1e-6, atol=1e-7)
    assert rollout.grad is None  # the weight is a constant: no gradient into the engine's logprobs
    assert metrics["tis/weight_mean"] == pytest.approx(5.5 / 3, rel=1e-6)
    assert metrics["tis/capped_frac"] == pytest.approx(1 / 3)


def _fipo(cfg, rollout=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = torch.log(torch.rand(3, 6, generator=g) * 0.9 + 0.05)
    logp = (old + 0.3 * torch.randn(3, 6, generator=g)).requires_grad_(True)
    mask = torch.ones(3, 6)
    mask[1, 4:] = 0
    loss, metrics = fipo_policy_loss(logp, old, torch.tensor([1.0, -0.5, 2.0]), mask, cfg, rollout_logp=rollout)
    loss.backward()
    return old, loss, logp.grad, metrics


def test_fipo_with_tis_scales_each_tokens_gradient_by_its_weight():
    # Future-KL influence weights, clips and the sequence filter do not see the TIS weight: only the
    # per-token loss is multiplied, so each token's gradient is the plain one times w_t.
    old, plain, plain_grad, _ = _fipo(FIPOConfig(decay_rate=2.0))
    rollout = old + 0.5 * torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    _, tis, tis_grad, _ = _fipo(FIPOConfig(decay_rate=2.0, tis_cap=2.0), rollout)
    w = truncated_is_weights(old, rollout, 2.0)
    assert (w == 2.0).any() and (w < 1.0).any()
    torch.testing.assert_close(tis_grad, plain_grad * w, rtol=1e-6, atol=1e-9)
    assert tis.item() != plain.item()
    # On-policy engine (rollout logprobs = the trainer's): w = 1 and the loss is the plain one, exactly.
    _, same, _, _ = _fipo(FIPOConfig(decay_rate=2.0, tis_cap=2.0), old.clone())
    assert same.item() == plain.item()


def test_off_is_bit_identical_and_adds_no_metric():
    _, plain, plain_grad, plain_metrics = _fipo(FIPOConfig())
    old, _, _, _ = _fipo(FIPOConfig())
    _, off, off_grad, off_metrics = _fipo(FIPOConfig(tis_cap=0.0), old - 1.0)  # rollout logprobs given, unused
    assert torch.equal(off, plain) and torch.equal(off_grad, plain_grad)
    assert off_metrics.keys() == plain_metrics.keys() and not any(k.startswith("tis/") for k in off_metrics)


def test_tis_without_rollout_logprobs_and_bad_caps_are_refused():
    with pytest.raises(ValueError, match="algo.tis_cap"):
        _fipo(FIPOConfig(tis_cap=2.0))
    with pytest.raises(ConfigError, match="tis_cap must be 0 .off. or >= 1"):
        load_config(RunConfig, "examples/tiny_cpu.yaml", ["algo.tis_cap=0.5"])
    assert load_config(RunConfig, "examples/tiny_cpu.yaml", []).algo.tis_cap == 0.0  # off by default
