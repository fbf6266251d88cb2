"""Reward functions with bound keyword arguments (``{name: ..., <keyword>: <value>}``; USERFLOW3's audit, session 16).

- A bound keyword that the function does not name as a parameter went into its ``**kwargs`` and was ignored without
  a word: ``{name: format, patern: "\\d+"}`` (a typo of ``pattern``) rewarded the default ``<think>...`` format;
  ``{name: exact_match, weight: 0.5}`` (meant as a reward weight) weighed nothing.
- A bound keyword named like a dataset column replaced the column's values in every call (``answer: "7"`` beside an
  ``answer`` column scored every completion against 7), and one named like TRL's own keywords (``completions``)
  replaced the generated completions."""

import pytest

from lowmem.rewards import load_reward_funcs

COLUMNS = ["prompt", "answer"]


def _file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def scaled(completions, answer, scale=1.0, **kwargs):\n"
                    "    return [scale * float(c == a) for c, a in zip(completions, answer)]\n")
    return str(path)


@pytest.mark.parametrize("entry, says", [
    ({"name": "format", "patern": r"\d+"}, r"'patern'.*did you mean \['pattern'\]"),
    ({"name": "exact_match", "weight": 0.5}, r"'weight'.*reward_weights"),
    ({"name": "{file}:scaled", "scal": 2.0}, r"'scal'.*\['answer', 'completions', 'scale'\]"),
])
def test_a_bound_keyword_the_function_does_not_name_is_refused(tmp_path, entry, says):
    entry = {k: v.format(file=_file(tmp_path)) if k == "name" else v for k, v in entry.items()}
    with pytest.raises(ValueError, match=says):
        load_reward_funcs([entry], COLUMNS)


@pytest.mark.parametrize("bound, says", [({"answer": "7"}, r"'answer'.*column"), ({"completions": ["x"]}, r"'completions'.*TRL")])
def test_a_bound_keyword_named_like_a_call_keyword_is_refused(tmp_path, bound, says):
    with pytest.raises(ValueError, match=says):
        load_reward_funcs([{"name": f"{_file(tmp_path)}:scaled", **bound}], COLUMNS)


def test_bound_keywords_the_function_names_apply(tmp_path):
    (fn,) = load_reward_funcs([{"name": f"{_file(tmp_path)}:scaled", "scale": 2.0}], COLUMNS)
    assert fn(prompts=["p", "p"], completions=["7", "8"], answer=["7", "7"]) == [2.0, 0.0]
    (fmt,) = load_reward_funcs([{"name": "format", "pattern": r"\d+"}], COLUMNS)
    assert fmt(prompts=["p", "p"], completions=["12", "ab"], answer=["1", "1"]) == [1.0, 0.0]
