"""The chain_arithmetic task: answers right, both warm-start forms parse with the reward's parser."""

import re
from collections import Counter

import pytest

from megatron_fipo.config import RunConfig
from megatron_fipo.config_base import ConfigError, load_config
from megatron_fipo.data.chain_arithmetic import chain_problems, response_form, short_form, worked_form
from megatron_fipo.data.setup import setup_data
from megatron_fipo.model_arch import ModelArch
from megatron_fipo.reward.math_reward import MathReward, extract_answer

CONFIG = "examples/tiny_cpu_chain.yaml"


def test_forms_on_a_hand_worked_sum():
    assert worked_form([4, 7, 2, 9]) == "4+7=11,11+2=13,13+9=22 Answer: 22"
    assert short_form([4, 7, 2, 9]) == "Answer: 22"
    assert worked_form([3, 4]) == "3+4=7 Answer: 7"
    assert worked_form([1, 0, 1, 1], modulus=2) == "1+0=1,1+1=0,0+1=1 Answer: 1"  # parity: sums mod 2
    assert short_form([1, 0, 1, 1], modulus=2) == "Answer: 1"
    assert [response_form(t) for t in ("4+7=11,11+2=13 Answer: 13", "3+4=7 Answer: 7", " Answer: 1",
                                       "1 Answer: 1", "1,0", "4+7=11,11+")] == \
        ["worked", "worked", "short", "other", "other", "worked"]


@pytest.mark.parametrize("modulus, digits", [(0, 10), (2, 2)])
def test_problems_are_distinct_right_and_both_forms_parse(modulus, digits):
    problems = chain_problems(100, 3, 6, seed=3, modulus=modulus)
    prompts = [p.messages[0]["content"] for p in problems]
    assert len(set(prompts)) == 100
    assert prompts == [p.messages[0]["content"] for p in chain_problems(100, 3, 6, 3, modulus)]  # seeded
    assert sorted(Counter(len(p.split("+")) for p in prompts)) == [3, 4, 5, 6]
    for p, prompt in zip(problems, prompts):
        terms = [int(t) for t in prompt.rstrip("=").split("+")]
        assert all(0 <= t < digits for t in terms)
        assert p.answer == str(sum(terms) % modulus if modulus else sum(terms))
        worked, short = p.references
        steps, tail = worked.split(" ", 1)
        running, expected = terms[0], []
        for term in terms[1:]:  # one addition per term after the first: running sum + term
            after = (running + term) % modulus if modulus else running + term
            expected.append(f"{running}+{term}={after}")
            running = after
        assert steps.split(",") == expected and tail == f"Answer: {running}"
        for text in (worked, short):
            assert extract_answer(text, "dapo") == p.answer
    reward = MathReward("dapo")
    assert reward(problems[0].references[0], problems[0].answer).status == "correct"
    assert reward(problems[0].references[1], problems[0].answer).status == "correct"
    assert reward("1+2=3 Answer: 4", "3").status == "wrong"


def test_warm_start_draws_both_forms_and_ends_them_with_eos():
    cfg = load_config(RunConfig, CONFIG, ["data.chain_problems=300", "data.eval_size=20"])
    data = setup_data(cfg, ModelArch.from_hf_config(cfg.actor.model_config))
    assert len(data.train_problems) == 280 and len(data.eval_problems) == 20
    p = data.train_problems[0]
    drawn = [data.answer_ids(p) for _ in range(200)]
    assert all(ids[-1] == data.tokenizer.eos_id for ids in drawn)
    texts = Counter(data.tokenizer.decode(ids[:-1]) for ids in drawn)
    assert set(texts) == set(p.references)
    assert 70 <= texts[p.references[0]] <= 130  # uniform: 100 expected, sd 7
    assert len(data.prompt_ids(p)) <= cfg.data.max_prompt_length


@pytest.mark.parametrize("overrides, field", [
    (["data.chain_min_terms=1"], "data.chain_min_terms"),
    (["data.chain_modulus=2", "data.chain_min_terms=3", "data.chain_max_terms=4", "data.chain_problems=25"],
     "data.chain_problems"),  # 8 + 16 exist
    (["data.chain_problems=64"], "data.chain_problems"),  # no more than the eval set
    (["data.chain_modulus=1"], "data.chain_modulus"),
])
def test_bad_chain_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(RunConfig, CONFIG, overrides + ["data.eval_size=10"] if "64" not in overrides[0] else overrides)
