import math

import pytest
import torch

from megatron_fipo.algo import FIPOConfig, dapo_policy_loss, fipo_policy_loss
from megatron_fipo.algo.policy_loss import influence_weights

LN2 = math.log(2.0)


def _iw(delta, adv, cfg, valid=None):
    valid = torch.ones_like(delta, dtype=torch.bool) if valid is None else valid
    return influence_weights(delta, adv, valid, cfg)


def test_unclipped_influence_weights_hand_computed():
    cfg = FIPOConfig(decay_rate=1.0)
    iw = _iw(torch.tensor([[LN2, -LN2]]), torch.ones(1, 2), cfg)
    torch.testing.assert_close(iw.raw, torch.tensor([[math.sqrt(2.0), 0.5]]), rtol=1e-6, atol=1e-7)
    # High-only clip: [1, 1.2]; symmetric clip: [0.8, 1.2].
    torch.testing.assert_close(iw.weight, torch.tensor([[1.2, 1.0]]))
    iw_sym = _iw(torch.tensor([[LN2, -LN2]]), torch.ones(1, 2), FIPOConfig(decay_rate=1.0, influence_clip_high_only=False))
    torch.testing.assert_close(iw_sym.weight, torch.tensor([[1.2, 0.8]]))


def test_token_above_dual_clip_ratio_is_excluded_from_future_kl():
    cfg = FIPOConfig(decay_rate=1.0, dual_clip_c=10.0)
    delta = torch.tensor([[0.1, math.log(11.0), 0.2]])
    iw = _iw(delta, torch.ones(1, 3), cfg)
    assert iw.excluded.tolist() == [[False, True, False]]
    torch.testing.assert_close(iw.future_kl, torch.tensor([[0.1 + 0.25 * 0.2, 0.5 * 0.2, 0.2]]))
    # The paper's variant keeps positive-advantage tokens in.
    paper = _iw(delta, torch.ones(1, 3), FIPOConfig(decay_rate=1.0, future_kl_mask_negative_only=True))
    assert not paper.excluded.any()


def test_safety_cap_applies_only_to_negative_advantages():
    cfg = FIPOConfig(decay_rate=1.0, influence_clip_high_only=False, safety_threshold=4.0)
    delta = torch.tensor([[math.log(5.0), math.log(5.0)]])  # ratio 5 > 4, FKL large -> raw weight > 1.2
    adv = torch.tensor([[-1.0, -1.0]])
    iw = _iw(delta, adv, cfg)
    assert iw.safety_capped.all()
    assert (iw.weight == 1.0).all()  # clip to [0.8,1.2] gives 1.2, then cap to [0.8,1.0]
    iw_pos = _iw(delta, -adv, cfg)
    assert not iw_pos.safety_capped.any()
    torch.testing.assert_close(iw_pos.weight, torch.full((1, 2), 1.2))


def test_fipo_equals_dapo_when_all_weights_are_one():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(4, 9, generator=g)
    old = logp + 0.3 * torch.rand(4, 9, generator=g)  # every delta < 0: exp(Future-KL) < 1, clipped up to 1
    adv = torch.tensor([1.0, -0.5, 0.25, -2.0])
    mask = (torch.rand(4, 9, generator=g) > 0.2).float()
    cfg = FIPOConfig(influence_clip_high_only=True, filter_dual_clip_sequences=False)
    fipo, _ = fipo_policy_loss(logp, old, adv, mask, cfg)
    dapo, _ = dapo_policy_loss(logp, old, adv, mask, cfg)
    assert fipo.item() == pytest.approx(dapo.item(), rel=1e-6)


def test_dapo_loss_hand_computed():
    cfg = FIPOConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, dual_clip_c=3.0)
    ratios = torch.tensor([[1.1, 1.5, 0.5, 5.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    # per token: -1.1 ; -min(1.5,1.28) = -1.28 ; A<0: max(0.5,0.8)=0.8 ; A<0: min(5, 3) = 3
    loss, m = dapo_policy_loss(torch.log(ratios), torch.zeros(1, 4), adv, torch.ones(1, 4), cfg)
    assert loss.item() == pytest.approx((-1.1 - 1.28 + 0.8 + 3.0) / 4, abs=1e-6)
    assert m["pg_clipfrac"] == pytest.approx(0.5)  # tokens 2 and 3 held by the PPO clip
    assert m["pg_clipfrac_lower"] == pytest.approx(0.25)  # token 4 held by the dual clip


def test_gradient_flows_through_ratio_not_influence_weight():
    cfg = FIPOConfig(decay_rate=2.0, influence_clip=10.0, filter_dual_clip_sequences=False)
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.05, -0.05, 0.02]], requires_grad=True)
    adv = torch.tensor([0.7])
    loss, _ = fipo_policy_loss(logp, old, adv, torch.ones(1, 3), cfg)
    loss.backward()
    delta = logp.detach()
    f = _iw(delta, adv.expand(1, 3), cfg).weight
    # Inside the clip range, d/dlogp of -A f exp(logp - old) / N is -A f ratio / N with f constant.
    expected = -0.7 * f * torch.exp(delta) / 3
    torch.testing.assert_close(logp.grad, expected, rtol=1e-6, atol=1e-7)


def test_sequence_filter_drops_exactly_sequences_with_two_dual_clipped_negatives():
    cfg = FIPOConfig(dual_clip_c=10.0, decay_rate=1.0)
    big = math.log(20.0)
    logp = torch.tensor([[big, big, 0.0], [big, 0.0, 0.0], [big, big, 0.0]])
    adv = torch.tensor([-1.0, -1.0, 1.0])  # row 2 is positive: the dual clip does not apply
    mask = torch.ones(3, 3)
    loss, m = fipo_policy_loss(logp, torch.zeros(3, 3), adv, mask, cfg)
    assert m["seqs_filtered"] == 1.0
    assert (m["num_tokens"], m["num_tokens_kept"]) == (9.0, 6.0)
    no_filter, _ = fipo_policy_loss(logp, torch.zeros(3, 3), adv, mask, FIPOConfig(dual_clip_c=10.0, decay_rate=1.0, filter_dual_clip_sequences=False))
    # Row 0 (the dropped one): two tokens capped at -A*f*c = 10*f, one at ratio 1 -> f. It leaves the
    # numerator and the denominator: the mean is over the 6 surviving tokens.
    iw = _iw(logp.clamp(-20, 20), adv.unsqueeze(1).expand(3, 3), cfg)
    row0 = (10.0 * iw.weight[0, 0] + 10.0 * iw.weight[0, 1] + iw.weight[0, 2] * 1.0).item()
    assert loss.item() * 6 == pytest.approx(no_filter.item() * 9 - row0, rel=1e-6)


def test_metrics_and_empty_mask():
    loss, m = fipo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.zeros(2, 3), FIPOConfig())
    assert loss.item() == 0.0 and m["num_tokens"] == 0.0
    for key in ("influence_weight/mean", "influence_weight_raw/max", "ratio/pos_p995", "delta_logp/neg_abs_mean",
                "pg_clipfrac", "seqs_filtered", "future_kl/mean"):
        assert key in m


def test_num_tokens_sets_the_denominator():
    logp, old = torch.full((2, 2), 0.1), torch.zeros(2, 2)
    adv, mask, cfg = torch.tensor([1.0, 1.0]), torch.ones(2, 2), FIPOConfig()
    half_a, _ = fipo_policy_loss(logp[:1], old[:1], adv[:1], mask[:1], cfg, num_tokens=4)
    half_b, _ = fipo_policy_loss(logp[1:], old[1:], adv[1:], mask[1:], cfg, num_tokens=4)
    whole, _ = fipo_policy_loss(logp, old, adv, mask, cfg)
    assert (half_a + half_b).item() == pytest.approx(whole.item(), rel=1e-6)


@pytest.mark.parametrize("kwargs,field", [
    ({"clip_ratio_low": 1.5}, "clip_ratio_low"),
    ({"dual_clip_c": 1.1}, "dual_clip_c"),
    ({"decay_rate": 0.0}, "decay_rate"),
    ({"influence_clip": -0.1}, "influence_clip"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FIPOConfig(**kwargs)


def test_influence_clip_zero_is_the_official_cap_at_ten():
    # future_kl_clip_ratio == 0 in the official code: min(exp(FKL), 10), no lower bound.
    cfg = FIPOConfig(decay_rate=1.0, influence_clip=0.0)
    assert cfg.influence_bounds == (0.0, 10.0)
    delta = torch.tensor([[math.log(3.0), -math.log(4.0), 0.0]])  # ratios 3 and 1/4: below safety and dual clip
    iw = _iw(delta, torch.ones(1, 3), cfg)
    # FKL = [ln3 + (-ln4)/2, -ln4, 0] -> exp: [3/2, 1/4, 1], none clipped.
    torch.testing.assert_close(iw.weight, torch.tensor([[1.5, 0.25, 1.0]]), rtol=1e-6, atol=0)
    big = _iw(torch.tensor([[2.0, 2.0]]), torch.ones(1, 2), cfg)  # FKL = 2 + 2/2 = 3: e^3 > 10
    assert big.weight[0, 0].item() == 10.0


def test_defaults_are_the_32b_recipe():
    cfg = FIPOConfig()
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.dual_clip_c, cfg.decay_rate) == (0.2, 0.28, 10.0, 32.0)
    assert cfg.influence_bounds == (1.0, pytest.approx(1.2))
    assert (cfg.safety_threshold, cfg.logratio_clamp, cfg.filter_dual_clip_sequences) == (10.0, 20.0, True)
