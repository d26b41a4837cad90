"""User code the config names by import path, ``package.module:function`` (like slime's --custom-rm-path).

- ``reward.custom_reward(response: str, answer: str, problem: dict) -> float | tuple[float, bool]``:
  the decoded response, the ground-truth answer, and the problem; returns the score, or (score,
  correct). A bare score counts as correct when it is > 0 (eval accuracy and rollout accuracy use
  ``correct``). DAPO's overlong penalty is still added to the score.
- ``data.custom_prompt(problem: dict) -> str | list[dict]``: the prompt of a training or eval problem,
  as text used as it is, or as chat messages the tokenizer renders with its chat template.

``problem`` is ``{"messages": [...], "answer": str, "source": str}``: the data set's chat messages
(with the default instruction), the ground truth, and where it came from. The module is imported from
the working directory or PYTHONPATH.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from megatron_fipo.config_base import ConfigError
from megatron_fipo.data.problems import Problem


def load_hook(spec: str, key: str) -> Callable:
    """The function ``spec`` names; a ConfigError naming ``key`` when it does not resolve."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"{key}: {spec!r} is not an import path; write it as package.module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the console script, unlike `python -m`, leaves the working directory out
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}: cannot import {module_name!r} ({err}); make it importable from the working "
                          "directory or PYTHONPATH") from None
    hook = getattr(module, name, None)
    if not callable(hook):
        raise ConfigError(f"{key}: module {module_name!r} ({module.__file__}) has no function {name!r}")
    return hook


def problem_record(problem: Problem) -> dict:
    """What a hook gets of a problem: plain values, copies (a hook cannot change the data set)."""
    return {"messages": [dict(m) for m in problem.messages], "answer": problem.answer, "source": problem.source}
