"""reward.custom_reward and data.custom_prompt: user functions by import path, and the errors when they do not resolve."""

from pathlib import Path

import pytest
from test_first_day_errors import assert_one_line_error, run_cli

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import load_config
from megatron_fipo.data.setup import setup_data
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.reward.scoring import Scorer
from megatron_fipo.rollout.base import Sample

REPO = Path(__file__).resolve().parents[2]
HOOKS = "helpers.custom_hooks"  # tests/ is on sys.path, as a user's package would be


def _data(*overrides: str):
    cfg = load_config(RunConfig, str(REPO / "examples" / "tiny_cpu.yaml"), ["reward.overlong_buffer_length=0", *overrides])
    return cfg, setup_data(cfg, ModelArch.from_hf_config(cfg.actor.model_config))


def _groups(data, problems, responses):
    tok = data.tokenizer
    return [[Sample(data.prompt_ids(p), tok.encode(r), [0.0] * len(tok.encode(r)), "stop", 0) for r in responses]
            for p in problems]


def test_custom_reward_scores_with_the_problem():
    cfg, data = _data(f"reward.custom_reward={HOOKS}:half_credit")
    by_answer = {p.answer: p for p in data.train_problems}
    problems = [by_answer["14"], by_answer["7"]]
    scores = Scorer(cfg.reward, data.tokenizer, cfg.rollout.max_response_length).score(
        _groups(data, problems, ["14", "4", "3"]), problems)
    # "14": exact / last digit / neither; "7": wrong / wrong / wrong, and "4" is not its last digit.
    assert scores.rewards.tolist() == [[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]]
    assert scores.correct.tolist() == [[True, False, False], [False, False, False]]
    assert dict(scores.status_counts) == {"correct": 1, "wrong": 5}


def test_a_bare_score_is_correct_when_positive_and_the_overlong_penalty_still_applies():
    cfg, data = _data(f"reward.custom_reward={HOOKS}:signed", "reward.overlong_buffer_length=2",
                      "reward.overlong_penalty_factor=0.5", "rollout.max_response_length=4")
    problem = next(p for p in data.train_problems if p.answer == "12")
    (group,) = _groups(data, [problem], ["12", "9"])
    long = data.tokenizer.encode("121")
    group.append(Sample(group[0].prompt_ids, long, [0.0] * len(long), "length", 0))
    scores = Scorer(cfg.reward, data.tokenizer, cfg.rollout.max_response_length).score([group], [problem])
    # "12", "9", "121" take 3, 2 and 4 tokens (sentencepiece's word start, then digits); DAPO's
    # penalty falls linearly over the last 2 tokens of 4: -0.25, 0, -0.5.
    assert [len(s.response_ids) for s in group] == [3, 2, 4]
    assert scores.rewards.tolist() == [[2.0 - 0.25, -0.5, -0.5 - 0.5]]
    assert scores.correct.tolist() == [[True, False, False]]


def test_a_reward_that_returns_no_score_is_named():
    cfg, data = _data(f"reward.custom_reward={HOOKS}:not_a_score")
    problem = data.train_problems[0]
    with pytest.raises(TypeError, match=r"reward.custom_reward helpers.custom_hooks:not_a_score returned 'yes'"):
        Scorer(cfg.reward, data.tokenizer, 8).score(_groups(data, [problem], ["1"]), [problem])


@pytest.mark.parametrize("hook,render", [
    ("twice", lambda tok, q: q + q),
    ("as_messages", lambda tok, q: tok.render_prompt([{"role": "user", "content": q}, {"role": "user", "content": "0+0="}])),
])
def test_custom_prompt_for_training_and_eval_problems(hook, render):
    _, data = _data(f"data.custom_prompt={HOOKS}:{hook}")
    tok = data.tokenizer
    for problem in (data.train_problems[0], data.eval_problems[0]):
        question = problem.messages[-1]["content"]
        assert data.prompt_ids(problem) == tok.encode(render(tok, question)) != tok.encode(question)


@pytest.mark.parametrize("override,fragments", [
    ("reward.custom_reward=no_such_module:score", ("reward.custom_reward: cannot import 'no_such_module'",
                                                   "PYTHONPATH")),
    ("reward.custom_reward=score_responses", ("reward.custom_reward: 'score_responses' is not an import path",
                                              "package.module:function")),
    ("data.custom_prompt=tests.helpers.custom_hooks:missing", ("data.custom_prompt: module 'tests.helpers.custom_hooks'",
                                                               "has no function 'missing'")),
])
def test_a_hook_that_does_not_resolve_fails_before_torch_loads(override, fragments, tmp_path):
    proc, torch_loaded = run_cli("train", "examples/tiny_cpu.yaml", f"run_dir={tmp_path / 'run'}", override)
    assert_one_line_error(proc, *fragments)
    assert not torch_loaded and not (tmp_path / "run").exists()
