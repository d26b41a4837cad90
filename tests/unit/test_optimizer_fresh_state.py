"""The step-0 checkpoint's optimizer state: init_fresh_state gives any never-stepped optimizer the state
its first step starts from, with no optimizer-specific code.

Checked by behaviour: an optimizer given that state and then stepped equals one stepped fresh, bit for
bit, over several steps; and it holds the same state keys a stepped one does (what a checkpoint's load
template expects).
"""

import importlib.util

import pytest
import torch

from megatron_fipo.actor.checkpoint import init_fresh_state

OPTIMIZERS = {
    "adam_l2": lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.1),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1, amsgrad=True),
    "adam_single_tensor": lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=False),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "rmsprop_centered": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True),
}


def _params(device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g).to(device)),
            torch.nn.Parameter(torch.randn(7, generator=g).to(device))]


def _groups(params):
    # Two groups with different settings, as Megatron builds them (no weight decay on norms and biases).
    return [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}]


def _compare(make, device="cpu"):
    fresh_params, given_params = _params(device), _params(device)
    fresh, given = make(_groups(fresh_params)), make(_groups(given_params))
    init_fresh_state(given)
    assert all(torch.equal(a, b) for a, b in zip(fresh_params, given_params)), "the no-op steps moved a weight"
    state_keys = {k for s in given.state.values() for k in s}
    settings = lambda opt: [{k: v for k, v in g.items() if k not in ("params", "step")} for g in opt.param_groups]  # noqa: E731
    assert settings(given) == settings(fresh), "lr, weight decay or another setting was not put back"
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(fresh_params, given_params):
            grad = torch.randn(a.shape, generator=g).to(device)
            a.grad, b.grad = grad.clone(), grad.clone()
        fresh.step()
        given.step()
    assert all(torch.equal(a, b) for a, b in zip(fresh_params, given_params))
    assert state_keys == {k for s in fresh.state.values() for k in s}
    return fresh, given


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fresh_state_steps_exactly_like_a_fresh_optimizer(name):
    fresh, given = _compare(OPTIMIZERS[name])
    for a, b in zip(fresh.state.values(), given.state.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.state_dict()["param_groups"] == given.state_dict()["param_groups"]


def test_adam_state_is_zero_at_step_zero():
    params = _params()
    opt = torch.optim.Adam(_groups(params), lr=0.1)
    init_fresh_state(opt)
    for p in params:
        assert opt.state[p]["step"].item() == 0.0
        assert not opt.state[p]["exp_avg"].any() and not opt.state[p]["exp_avg_sq"].any()


def test_a_stepped_optimizer_is_left_alone():
    params = _params()
    opt = torch.optim.Adam(_groups(params), lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    init_fresh_state(opt)
    assert all(torch.equal(before[k], opt.state[params[0]][k]) for k in before)


@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("transformer_engine")),
                    reason="Transformer Engine's FusedAdam needs CUDA and transformer-engine (neither is here)")
def test_transformer_engine_fused_adam():
    from transformer_engine.pytorch.optimizers import FusedAdam

    fresh, given = _compare(lambda groups: FusedAdam(groups, lr=0.1, weight_decay=0.1, adam_w_mode=True), "cuda")
    # Its step counter lives in the param groups: 0 at step 0, so the first real step is step 1.
    assert [g["step"] for g in fresh.param_groups] == [g["step"] for g in given.param_groups]
