"""A user's reward function is checked against TRL's call before the model loads (its signature, the
columns a built-in needs), and what it returns is checked when TRL calls it: one clear error naming it."""

import numpy as np
import pytest
import torch

from lowmem.cli import main
from lowmem.rewards import load_reward_funcs, resolve_reward

REWARDS = """
def good(prompts, completions, answer, **kwargs):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]
def only_completions(completions, **kwargs):
    return [0.5] * len(completions)
def no_kwargs(prompts, completions):
    return [0.0] * len(completions)
def wrong_name(completion, **kwargs):
    return 1.0
def needs_label(prompts, completions, label, **kwargs):
    return [0.0] * len(completions)
def scalar(prompts, completions, **kwargs):
    return 1.0
def short(prompts, completions, **kwargs):
    return [1.0]
def strings(prompts, completions, **kwargs):
    return ["1"] * len(completions)
def array(prompts, completions, **kwargs):
    return np.linspace(0, 1, len(completions))
def tensor(prompts, completions, **kwargs):
    return torch.full((len(completions),), 0.25)
def matrix(prompts, completions, **kwargs):
    return np.zeros((len(completions), 1))
def mixed(prompts, completions, **kwargs):
    return [None, np.float32(0.5), torch.tensor(1.0), True][:len(completions)]
import numpy as np, torch
"""
COLUMNS = ["prompt", "answer"]


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "rw.py"
    path.write_text(REWARDS)
    return str(path)


def test_signatures_checked_against_trls_call(rewards_file):
    ok = load_reward_funcs([f"{rewards_file}:good", f"{rewards_file}:only_completions", "exact_match", "addition",
                            {"name": "format", "pattern": r"\d+"}, "trl.rewards:think_format_reward"], COLUMNS)
    assert [f.__name__ for f in ok] == ["good", "only_completions", "exact_match", "addition", "format", "think_format_reward"]
    assert resolve_reward(f"{rewards_file}:needs_label", 0, ["prompt", "label"]).__name__ == "needs_label"
    assert resolve_reward({"name": f"{rewards_file}:needs_label", "label": 1}, 0, COLUMNS)  # bound keyword counts
    for name, why in [("no_kwargs", "got an unexpected keyword argument"), ("wrong_name", "missing a required argument: 'completion'"),
                      ("needs_label", "missing a required argument: 'label'")]:
        with pytest.raises(ValueError, match=rf"reward function '.*rw.py:{name}' \(.*\): {why}.*TRL calls it with the keywords "
                                             r"\['prompts', 'completions', 'completion_ids', .*'answer'\]"):
            resolve_reward(f"{rewards_file}:{name}", 0, COLUMNS)
    assert resolve_reward(f"{rewards_file}:no_kwargs").__name__ == "no_kwargs"  # without columns: not checked (Python API)


def test_builtin_exact_match_needs_its_column_before_the_run():
    with pytest.raises(ValueError, match=r"reward 'exact_match' \(reward_funcs\[1\]\) needs a dataset column 'answer' or "
                                         r"'solution'; the dataset has \['prompt', 'target'\]"):
        load_reward_funcs(["addition", "exact_match"], ["prompt", "target"])
    assert load_reward_funcs(["exact_match"], ["prompt", "solution"])


def test_outputs_checked_when_called(rewards_file):
    call = dict(prompts=["1+1=", "2+2="], completions=["2", "5"], completion_ids=[[1], [2]], trainer_state=None,
                log_extra=None, log_metric=None, answer=["2", "4"])
    assert resolve_reward(f"{rewards_file}:good", 0, COLUMNS)(**call) == [1.0, 0.0]
    mixed = resolve_reward(f"{rewards_file}:mixed", 0, COLUMNS)
    assert len(mixed(**{**call, "prompts": ["a"] * 4, "completions": ["b"] * 4})) == 4  # None, numpy, 1-element tensor, bool
    # a 1-D numpy array or tensor, as TRL takes it (it iterates the output): passed on as a list
    assert resolve_reward(f"{rewards_file}:array", 0, COLUMNS)(**call) == [0.0, 1.0]
    assert resolve_reward(f"{rewards_file}:tensor", 0, COLUMNS)(**call) == [0.25, 0.25]
    for name, what in [("scalar", r"returned float 1.0; expected a list of 2 float\(s\) or None, one per completion"),
                       ("short", r"returned 1 rewards for 2 completions"),
                       ("strings", r"returned str '1' at position 0"),
                       ("matrix", r"returned ndarray")]:
        with pytest.raises(ValueError, match=rf"reward function '.*rw.py:{name}' {what}"):
            resolve_reward(f"{rewards_file}:{name}", 0, COLUMNS)(**call)


def test_lowmem_train_refuses_a_wrong_signature_before_the_model_loads(rewards_file, tmp_path, capsys, monkeypatch):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(f"trainer: grpo\ndataset: prompts.jsonl\nreward_funcs: ['{rewards_file}:wrong_name']\nbatch_size: 4\n"
                      "steps: 1\ntraining_args: {num_generations: 4}\n")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the reward function was checked")

    monkeypatch.setattr("lowmem.train.load_policy", no_model)
    rc = main(["train", str(recipe), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "lowmem: error: reward function" in err and "missing a required argument: 'completion'" in err, err
    assert not (tmp_path / "out" / "metrics.json").exists()
