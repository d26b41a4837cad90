"""A custom reward and prompt for the tests, named by import path as a user's would be
(`reward.custom_reward=helpers.custom_hooks:half_credit`, `data.custom_prompt=helpers.custom_hooks:twice`)."""


def half_credit(response: str, answer: str, problem: dict) -> tuple[float, bool]:
    """1 for the exact answer; 0.5 for its last digit alone (correct only when exact); 0 otherwise."""
    assert problem["answer"] == answer and problem["source"] == "arithmetic"
    text = response.strip()
    if text == answer:
        return 1.0, True
    return (0.5 if text == answer[-1] else 0.0), False


def signed(response: str, answer: str, problem: dict) -> float:
    """A bare score: +2 exact, -0.5 otherwise (correct when > 0)."""
    return 2.0 if response.strip() == answer else -0.5


def twice(problem: dict) -> str:
    """The question written twice, as prompt text (no chat template)."""
    question = problem["messages"][-1]["content"]
    return question + question


def as_messages(problem: dict) -> list[dict]:
    """The question as chat messages with an extra user turn, for the tokenizer to render."""
    return [*problem["messages"], {"role": "user", "content": "0+0="}]




def not_a_score(response: str, answer: str, problem: dict) -> str:
    return "yes"
