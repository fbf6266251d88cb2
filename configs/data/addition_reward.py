"""A reward function in a file of your own, named in a recipe as
``reward_funcs: [data/addition_reward.py:digits_and_prefix]`` (relative to the recipe file's folder).

TRL's contract: one float per completion. ``prompts`` and ``completions`` hold one entry per
completion (strings here; lists of messages for conversational data); every other dataset column
arrives as a keyword argument of the same name (``answer`` below), one value per completion.
"""


def digits_and_prefix(prompts, completions, answer, **kwargs):
    """Half for the answer's width in digits, half for the correct leading characters."""
    rewards = []
    for completion, target in zip(completions, answer):
        if isinstance(completion, list):  # conversational: the assistant message
            completion = completion[-1]["content"]
        head = completion[: len(target)]
        digits = sum(c.isdigit() for c in head) / len(target)
        prefix = next((i for i, (c, t) in enumerate(zip(head, target)) if c != t), len(head))
        rewards.append(0.5 * digits + 0.5 * prefix / len(target))
    return rewards
