"""FOUND_NEWCOMER 5 (NEWFIX): the GRPO/GVPO/BNPO summary line names the training steps its two means average; a run
shorter than the windows (5 / 10 logged rewards) said "first 5 steps ... -> last 10 steps" over the same 2 steps."""

import pytest

from lowmem.train import mean_reward, reward_summary


def _metrics(rewards, at, steps):
    return {"reward_history": rewards, "reward_steps": at, "steps": steps,
            "initial_reward": mean_reward(rewards[:5]), "final_reward": mean_reward(rewards[-10:])}


@pytest.mark.parametrize("rewards, at, steps, line", [
    ([0.5, 1.0], [1, 2], 2, "mean reward over steps 1-2: 0.7500 after 2 steps"),
    ([0.5], [1], 1, "mean reward over step 1: 0.5000 after 1 step"),
    # 20 steps logged every step: the windows are the steps themselves
    ([0.0] * 5 + [1.0] * 15, list(range(1, 21)), 20, "mean reward: steps 1-5 0.0000 -> steps 11-20 1.0000 after 20 steps"),
    # 200 steps logged every 20: each logged reward is the mean of 20 steps
    ([float(i) for i in range(10)], list(range(20, 201, 20)), 200,
     "mean reward: steps 1-100 2.0000 -> steps 1-200 4.5000 after 200 steps"),
    # 240 steps logged every 20: the last 10 logged rewards start after the second one's window (step 41)
    ([float(i) for i in range(12)], list(range(20, 241, 20)), 240,
     "mean reward: steps 1-100 2.0000 -> steps 41-240 6.5000 after 240 steps"),
    # 7 logged steps: the windows overlap, each range says which steps it covers
    ([1.0] * 7, list(range(1, 8)), 7, "mean reward: steps 1-5 1.0000 -> steps 1-7 1.0000 after 7 steps"),
    ([None, None], [1, 2], 2, "mean reward over steps 1-2: none given after 2 steps"),
    ([], [], 3, "mean reward: none logged in 3 steps (logging_steps is more than the steps)"),
])
def test_reward_summary_names_the_steps(rewards, at, steps, line):
    assert reward_summary(_metrics(rewards, at, steps)) == line
