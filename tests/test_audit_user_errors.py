"""What a new user meets when running lowmem on their own files (the AUDIT helper's findings, 2026-11-30).

Each test is a defect found by following README.md / docs/training.md step by step on a user's own
files; each was red before its fix."""

from __future__ import annotations

import sys

import pytest

from lowmem.cli import main


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("source, expected", [
    ("def my_reward(prompts, completions\n    return [1.0]\n", "SyntaxError: '(' was never closed"),
    ("import lowmem_no_such_package_xyz\ndef my_reward(**kw):\n    return []\n",
     "ModuleNotFoundError: No module named 'lowmem_no_such_package_xyz'"),
    ("x = 1 / 0\n", "ZeroDivisionError: division by zero"),
])
def test_reward_file_that_fails_to_import_is_a_one_line_error(source, expected, tmp_path, monkeypatch):
    """A reward file with a syntax error (or one raising at import) was a traceback and exit status 1
    from `lowmem train`; it is a ValueError naming the reward, the file, the cause and its line, and
    the half-imported module does not stay in sys.modules."""
    from lowmem.rewards import resolve_reward

    path = tmp_path / "my_rewards.py"
    path.write_text(source)
    before = set(sys.modules)
    with pytest.raises(ValueError, match="importing .*my_rewards.py' failed") as err:
        resolve_reward(f"{path}:my_reward")
    assert expected in str(err.value) and "line 1" in str(err.value)
    assert set(sys.modules) == before
    monkeypatch.chdir(tmp_path)  # the same file as `my_rewards:my_reward`, a module of the current directory
    with pytest.raises(ValueError, match="importing module 'my_rewards' failed") as err:
        resolve_reward("my_rewards:my_reward")
    assert expected in str(err.value)
    sys.modules.pop("my_rewards", None)


def test_reward_file_syntax_error_stops_lowmem_train_with_exit_2(tiny_model_path, tmp_path, capsys):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "1+1=", "answer": "2"}\n' * 8)
    (tmp_path / "bad.py").write_text("def r(prompts, completions\n")
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(f"trainer: grpo\nmodel: {tiny_model_path}\ndataset: prompts.jsonl\nreward_funcs: [bad.py:r]\n"
                      f"steps: 1\nbatch_size: 4\noutput_dir: {tmp_path / 'out'}\ntraining_args: {{num_generations: 4}}\n")
    code, err = _run(["train", str(recipe)], capsys)
    assert code == 2
    assert "lowmem: error: reward function" in err and "SyntaxError" in err and "bad.py, line 1" in err
    assert not (tmp_path / "out" / "metrics.json").exists()
