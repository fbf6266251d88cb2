"""Outside-in audit of the reward functions a Python-API user hands to LowMemGRPOTrainer / GVPOTrainer / BNPOTrainer
(TRL 1.16's ``GRPOTrainer._calculate_rewards`` contract: ``fn(prompts=, completions=, completion_ids=, **columns,
trainer_state=, log_extra=, log_metric=)`` returns one float or ``None`` per completion; sync or ``async``).

Before ``trainers.trl.checked_reward_func``, only ``lowmem train`` checked outputs; through the Python API TRL failed
with ``TypeError: 'NoneType' object is not iterable`` (a function returning ``None``), ``'float' object is not
iterable`` (a scalar), ``too many dimensions 'str'`` (strings) or the user's bare exception, none naming the function.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

PROMPTS = ["1+1=", "1+1=", "2+3=", "2+3="]
COMPLETIONS = ["2", "3", "5", "6"]
INPUTS = [{"prompt": p, "answer": a, "level": lv} for p, a, lv in zip(PROMPTS, ["2", "2", "5", "5"], [1, 1, 2, 2])]


@pytest.fixture(scope="module", params=["grpo", "gvpo", "bnpo"])
def trainer(request, tmp_path_factory):
    from lowmem.kit import save_tiny_model
    from trl_helpers import make_trainer

    from trl.trainer.utils import shutdown_event_loop_in_daemon, start_event_loop_in_daemon

    path = save_tiny_model(tmp_path_factory.mktemp(f"trlaudit-rewards-{request.param}"), seed=0)
    trainer = make_trainer(request.param, path, str(tmp_path_factory.mktemp("out")), 1, optim=None)
    # TRL starts its event loop when __init__ sees an async reward function; the tests swap functions in afterwards
    thread, trainer.async_loop, ready = start_event_loop_in_daemon(name="trlaudit-async")
    ready.wait()
    yield trainer
    shutdown_event_loop_in_daemon(thread, trainer.async_loop)


def _score(trainer, *funcs):
    saved = trainer.reward_funcs, trainer.reward_func_names, trainer.reward_processing_classes, trainer.reward_weights
    trainer.reward_funcs = list(funcs)
    trainer.reward_func_names = [f.__name__ for f in funcs]
    trainer.reward_processing_classes = [None] * len(funcs)
    trainer.reward_weights = torch.ones(len(funcs))
    try:
        return trainer._calculate_rewards(INPUTS, PROMPTS, COMPLETIONS, [[1]] * 4)
    finally:
        trainer.reward_funcs, trainer.reward_func_names, trainer.reward_processing_classes, trainer.reward_weights = saved


def returns_none(prompts, completions, **kwargs):
    return None


def returns_scalar(prompts, completions, **kwargs):
    return 1.0


def returns_strings(prompts, completions, **kwargs):
    return ["1"] * len(completions)


def returns_three(prompts, completions, **kwargs):
    return [1.0, 0.0, 1.0]


def raises_key_error(prompts, completions, **kwargs):
    return [float(c == kwargs["solution"]) for c in completions]


async def async_returns_none(prompts, completions, **kwargs):
    return None


@pytest.mark.parametrize("fn, says", [
    (returns_none, "returned NoneType None"), (returns_scalar, "returned float 1.0"),
    (returns_strings, "returned str '1' at position 0"), (returns_three, "returned 3 rewards for 4 completions"),
    (raises_key_error, "raised KeyError: 'solution'"), (async_returns_none, "returned NoneType None"),
])
def test_a_bad_reward_function_is_an_error_naming_it(trainer, fn, says):
    with pytest.raises(ValueError, match=f"reward function '{fn.__name__}'") as err:
        _score(trainer, fn)
    assert says in str(err.value)


def test_what_trl_accepts_still_scores(trainer):
    def numpy_floats(prompts, completions, **kwargs):
        return [np.float32(0.5), np.float64(1.0), None, np.int64(0)]

    def numpy_array(prompts, completions, **kwargs):
        return np.array([0.0, 1.0, 0.0, 1.0])

    def tensor(prompts, completions, **kwargs):
        return torch.tensor([1.0, 1.0, 0.0, 0.0])

    def generator(prompts, completions, **kwargs):
        return (float(len(c)) for c in completions)

    async def async_rewards(prompts, completions, **kwargs):
        return [0.25] * len(completions)

    got = _score(trainer, numpy_floats, numpy_array, tensor, generator, async_rewards)
    want = torch.tensor([[0.5, 0.0, 1.0, 1.0, 0.25], [1.0, 1.0, 1.0, 1.0, 0.25], [math.nan, 0.0, 0.0, 1.0, 0.25],
                         [0.0, 1.0, 0.0, 1.0, 0.25]])
    torch.testing.assert_close(got, want, equal_nan=True)


def test_dataset_columns_reach_the_function_as_keywords(trainer):
    seen = {}

    def correct(prompts, completions, answer, level, completion_ids, trainer_state, **kwargs):
        seen.update(answer=answer, level=level, completion_ids=completion_ids, state=trainer_state)
        return [float(c == a) for c, a in zip(completions, answer)]

    got = _score(trainer, correct)
    assert seen["answer"] == ["2", "2", "5", "5"] and seen["level"] == [1, 1, 2, 2]
    assert seen["completion_ids"] == [[1]] * 4 and seen["state"] is trainer.state
    torch.testing.assert_close(got, torch.tensor([[1.0], [0.0], [1.0], [0.0]]))


def test_the_trainers_reward_funcs_are_left_as_given(trainer):
    funcs = [returns_none]
    trainer.reward_funcs, saved = funcs, trainer.reward_funcs
    try:
        with pytest.raises(ValueError, match="returned NoneType None"):
            trainer._calculate_rewards(INPUTS, PROMPTS, COMPLETIONS, [[1]] * 4)
        assert trainer.reward_funcs is funcs and funcs == [returns_none]  # the check wraps only for the call
    finally:
        trainer.reward_funcs = saved
