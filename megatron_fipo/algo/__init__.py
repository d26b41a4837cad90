"""Pure tensor math of FIPO and its DAPO scaffold. Imports only torch (lazily: configs load without it)."""

from megatron_fipo.algo.fipo_config import FIPOConfig

_LAZY = {
    "dapo_policy_loss": "policy_loss",
    "fipo_policy_loss": "policy_loss",
    "influence_weights": "policy_loss",
    "future_kl": "future_kl_scan",
    "future_kl_reference": "future_kl_scan",
    "group_advantages": "advantages",
    "dynamic_sampling_mask": "advantages",
    "overlong_penalty": "advantages",
}

__all__ = ["FIPOConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"megatron_fipo.algo.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'megatron_fipo.algo' has no attribute {name!r}")
