"""A custom reward for the reward-pool tests (`reward.custom_reward=helpers.reward_pool_hooks:exact_or_stuck`)."""

import signal
import time


def exact_or_stuck(response: str, answer: str, problem: dict):
    """1 for the exact answer, else 0; "hang" never returns, as a C call that ignores signals would not;
    "bad" returns no score."""
    text = response.strip()
    if text == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(600)
    if text == "bad":
        return "yes"
    return (1.0, True) if text == answer else (0.0, False)
