import sympy
import pytest

from megatron_fipo.reward import math_reward
from megatron_fipo.reward.math_reward import MathReward, extract_answer, last_boxed

reward = MathReward(answer_format="dapo", timeout_seconds=5.0)


@pytest.mark.parametrize("response,truth", [
    ("so the value is half.\nAnswer: 1/2", "\\frac{1}{2}"),
    ("Answer: 0.5", "\\frac{1}{2}"),
    ("Answer: $\\frac{1}{2}$", "0.5"),
    ("we get \\boxed{\\frac12}", "1/2"),
    ("Answer: \\{2, 1\\}", "\\{1,2\\}"),
    ("Answer: 2\\sqrt{2}", "\\sqrt{8}"),
    ("Answer: 34", "34"),
])
def test_equivalent_forms_score_correct(response, truth):
    result = reward(response, truth)
    assert (result.status, result.score) == ("correct", 1.0)


@pytest.mark.parametrize("response,truth,status", [
    ("Answer: 3/4", "\\frac{1}{2}", "wrong"),
    ("Answer: \\{1, 3\\}", "\\{1,2\\}", "wrong"),
    ("I don't know", "5", "no_answer"),
    ("", "5", "no_answer"),
    ("Answer: ???", "5", "unparsable"),
])
def test_wrong_and_missing_answers(response, truth, status):
    result = reward(response, truth)
    assert (result.status, result.score) == (status, -1.0)


def test_model_output_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    result = reward(f"Answer: __import__('os').system('touch {marker}')", "0")
    assert result.score == -1.0 and not marker.exists()


def test_pathological_answer_times_out_and_is_counted():
    x = sympy.Symbol("x")
    expanded = sympy.latex(sympy.expand((x + 1) ** 30))  # parsing alone takes > 1 s
    quick = MathReward(answer_format="dapo", timeout_seconds=0.2)
    result = quick(f"Answer: {expanded}", "(x+1)^{30}")
    assert (result.status, result.score) == ("timeout", -1.0)


def test_a_final_answer_seen_before_is_not_parsed_again_and_scores_the_same(monkeypatch):
    """The verdict is memoized on (extracted answer, ground truth): other text around the same final
    answer reuses it; another answer, another truth or a timeout are checked anew."""
    calls = []
    real_parse = math_reward.parse
    monkeypatch.setattr(math_reward, "parse", lambda text, **kw: calls.append(text) or real_parse(text, **kw))
    math_reward._check.cache_clear()
    first = reward("adding them: 12 + 5.\nAnswer: 17", "17")
    assert len(calls) == 2 and (first.status, first.answer) == ("correct", "17")
    again = reward("so it is\nAnswer: 17", "17")
    assert len(calls) == 2 and again == first
    assert reward("Answer: 17", "18").status == "wrong" and len(calls) == 4
    assert reward("Answer: 16", "17").status == "wrong" and len(calls) == 6
    x = sympy.Symbol("x")
    slow = f"Answer: {sympy.latex(sympy.expand((x + 1) ** 30))}"
    quick = MathReward(answer_format="dapo", timeout_seconds=0.2)
    assert quick(slow, "(x+1)^{30}").status == "timeout"
    parsed = len(calls)
    assert quick(slow, "(x+1)^{30}").status == "timeout" and len(calls) > parsed


def test_extraction_formats():
    assert extract_answer("steps\nAnswer: 42", "dapo") == "42"
    assert extract_answer("Answer: 1\nmore text after", "dapo") is None
    assert extract_answer("the answer is \\boxed{x^{2}}", "boxed") == "x^{2}"
    assert extract_answer(" 17 ", "plain") == "17"
    assert last_boxed("\\boxed{\\frac{1}{2}} and \\boxed{3}") == "3"
    assert last_boxed("\\boxed{unclosed") is None
