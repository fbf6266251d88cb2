"""OWNFIXA (session 18): exact_match's answers (fractions by value, a missing answer), reward names kept apart,
all-zero reward_weights, TRL rewards that need math_verify (FOUND_OWNDATA18 1, 4, 11, 12, 13)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("completion, answer, expected", [
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),          # a fraction by value, as math_verify compares rationals
    ("\\boxed{-\\frac{3}{4}}", "-3/4", 1.0),
    ("\\boxed{\\dfrac{6}{8}}", "0.75", 1.0),
    ("\\boxed{-0.75}", "3/4", 0.0),                  # the sign counts
    ("so it is 1,234.", "Natalia sold ... #### 1234", 1.0),  # GSM8K's #### still read in the column
])
def test_exact_match_compares_fractions_by_value(completion, answer, expected):
    from lowmem.rewards import exact_match_reward

    assert exact_match_reward(completions=[completion], answer=[answer]) == [expected]


def test_exact_match_missing_answer_in_solution_column_and_nan():
    from lowmem.rewards import exact_match_reward

    assert exact_match_reward(completions=["nan", "None", "3"], solution=[float("nan"), None, "3"]) == [None, None, 1.0]


@pytest.mark.parametrize("spelling", ["recipe", "training_args"])
def test_all_zero_reward_weights_refused_in_both_spellings_and_a_zero_beside_one_passes(spelling):
    from types import SimpleNamespace

    from lowmem.rewards import validate_reward_fields

    def recipe(weights):
        if spelling == "recipe":
            return SimpleNamespace(trainer="grpo", reward_funcs=["exact_match", "format"], reward_weights=weights,
                                   training_args={})
        return SimpleNamespace(trainer="grpo", reward_funcs=["exact_match", "format"], reward_weights=None,
                               training_args={"reward_weights": weights})

    with pytest.raises(ValueError, match=("training_args." if spelling == "training_args" else "^") + "reward_weights"):
        validate_reward_fields(recipe([0, 0.0]))
    validate_reward_fields(recipe([0.0, 0.5]))


def test_trl_reward_package_check_names_the_package(monkeypatch):
    """Installed or not here: find_spec reports math_verify missing, the accuracy reward is refused naming the pip
    name; think_format_reward (no extra package) passes."""
    import importlib.util

    from lowmem.rewards import load_reward_funcs

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    with pytest.raises(ValueError, match=r"trl.rewards:accuracy_reward.*pip install math-verify"):
        load_reward_funcs(["trl.rewards:accuracy_reward"], ["prompt", "solution"])
    assert len(load_reward_funcs(["trl.rewards:think_format_reward"], ["prompt", "solution"])) == 1


def test_shared_reward_names_become_name_index_and_still_score(tmp_path):
    import asyncio
    import inspect

    from lowmem.rewards import load_reward_funcs

    (tmp_path / "r.py").write_text("def format(completions, **kwargs):\n    return [0.5] * len(completions)\n"
                                   "async def areward(completions, **kwargs):\n    return [0.25] * len(completions)\n")
    funcs = load_reward_funcs([{"name": "format", "pattern": r"\d+"}, "exact_match", f"{tmp_path / 'r.py'}:format",
                               f"{tmp_path / 'r.py'}:areward", f"{tmp_path / 'r.py'}:areward"], ["prompt", "answer"])
    assert [f.__name__ for f in funcs] == ["format_0", "exact_match", "format_2", "areward_3", "areward_4"]
    kw = dict(prompts=["q"], completions=["12"], answer=["12"])
    assert funcs[0](**kw) == [1.0] and funcs[2](**kw) == [0.5]  # the bound pattern and the file's function kept
    assert inspect.iscoroutinefunction(funcs[3]) and asyncio.run(funcs[3](**kw)) == [0.25]


def test_reward_model_directories_of_one_folder_name_are_refused(tmp_path):
    from lowmem.rewards import distinct_reward_names

    with pytest.raises(ValueError, match=r"reward_funcs\[0, 1\].*'rm'"):
        distinct_reward_names([str(tmp_path / "a" / "rm"), str(tmp_path / "b" / "rm")])
    funcs = distinct_reward_names([str(tmp_path / "a" / "rm"), lambda **k: None])
    assert funcs[0] == str(tmp_path / "a" / "rm")
