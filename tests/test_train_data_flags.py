"""`lowmem train --eval-dataset / --chat-template / --reward-funcs / --reward-weights`: the recipe's data fields
as flags (the OWNDATA helper, 2026-11-30). Same validation and messages as the recipe fields; a flag
overrides the recipe's value; relative paths in flags are from the current directory, in the recipe
from its folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowmem.cli import build_parser, main, recipe_from_args

from conftest import OWN_CHAT_TEMPLATE

CHAT_ROWS = [{"messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]}
             for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]


def _recipe(argv: list[str]):
    return recipe_from_args(build_parser().parse_args(["train", *argv]))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """cwd/ with data/{train,eval}.jsonl and rewards.py; cwd/sub/ with a recipe whose paths are from sub/."""
    _jsonl(tmp_path / "data" / "train.jsonl", CHAT_ROWS)
    _jsonl(tmp_path / "data" / "eval.jsonl", CHAT_ROWS[:2])
    _jsonl(tmp_path / "sub" / "data" / "train.jsonl", CHAT_ROWS)
    _jsonl(tmp_path / "sub" / "data" / "eval.jsonl", CHAT_ROWS[:2])
    (tmp_path / "rewards.py").write_text("def r(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    (tmp_path / "sub" / "rewards.py").write_text("def r(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    (tmp_path / "sub" / "t.jinja").write_text(OWN_CHAT_TEMPLATE)
    (tmp_path / "t.jinja").write_text(OWN_CHAT_TEMPLATE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_eval_dataset_flag_is_from_the_cwd_and_overrides_the_recipe(layout):
    sub = layout / "sub"
    (sub / "r.yaml").write_text("dataset: data/train.jsonl\neval_dataset: data/eval.jsonl\n")
    r = _recipe(["sub/r.yaml"])
    assert (r.dataset, r.eval_dataset) == (str(sub / "data/train.jsonl"), str(sub / "data/eval.jsonl"))
    r = _recipe(["sub/r.yaml", "--eval-dataset", "data/eval.jsonl"])
    assert r.dataset == str(sub / "data/train.jsonl") and r.eval_dataset == "data/eval.jsonl"  # the flag: cwd
    r = _recipe(["sub/r.yaml", "--eval_dataset", "data/eval.jsonl", "--eval-dataset", "data/train.jsonl"])
    assert r.eval_dataset == ["data/eval.jsonl", "data/train.jsonl"]  # repeatable, HF spelling too
    # the flag replaces the recipe's eval_split (exclusive fields: the override wins, as for any field)
    (sub / "s.yaml").write_text("dataset: data/train.jsonl\neval_split: 0.25\n")
    r = _recipe(["sub/s.yaml", "--eval-dataset", "data/eval.jsonl"])
    assert (r.eval_dataset, r.eval_split) == ("data/eval.jsonl", None)
    r = _recipe(["--dataset", "data/train.jsonl", "--eval-dataset", "data/eval.jsonl"])  # no recipe file
    assert (r.dataset, r.eval_dataset) == ("data/train.jsonl", "data/eval.jsonl")


def test_dataset_flag_replaces_a_recipe_task(layout):
    (layout / "task.yaml").write_text("task: addition\nsteps: 5\n")
    r = _recipe(["task.yaml", "--dataset", "data/train.jsonl"])
    assert (r.dataset, r.task) == ("data/train.jsonl", None)


def test_chat_template_flag_text_or_file(layout):
    sub = layout / "sub"
    (sub / "r.yaml").write_text("dataset: data/train.jsonl\nchat_template: t.jinja\n")
    assert _recipe(["sub/r.yaml"]).chat_template == str(sub / "t.jinja")
    assert _recipe(["sub/r.yaml", "--chat-template", "t.jinja"]).chat_template == "t.jinja"  # cwd's
    assert _recipe(["sub/r.yaml", "--chat_template", OWN_CHAT_TEMPLATE]).chat_template == OWN_CHAT_TEMPLATE


def test_reward_funcs_flags(layout):
    sub = layout / "sub"
    prompts = _jsonl(sub / "p.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    (sub / "g.yaml").write_text(f"trainer: grpo\ndataset: {prompts.name}\nreward_funcs: [rewards.py:r, exact_match]\n"
                                "reward_weights: [1.0, 0.5]\n")
    r = _recipe(["sub/g.yaml"])
    assert r.reward_funcs == [f"{sub / 'rewards.py'}:r", "exact_match"] and r.reward_weights == [1.0, 0.5]
    r = _recipe(["sub/g.yaml", "--reward-funcs", "rewards.py:r", "format", "--reward-weights", "2", "1"])
    assert r.reward_funcs == ["rewards.py:r", "format"] and r.reward_weights == [2.0, 1.0]  # cwd's file
    r = _recipe(["sub/g.yaml", "--reward_funcs", "format", "--reward_funcs", "exact_match", "--reward_weights", "1", "3"])
    assert r.reward_funcs == ["format", "exact_match"] and r.reward_weights == [1.0, 3.0]
    # nargs took the recipe: it is still the recipe
    (sub / "h.yaml").write_text(f"trainer: grpo\ndataset: {prompts.name}\nreward_funcs: [rewards.py:r]\n")
    r = _recipe(["--reward-funcs", "exact_match", "format", "sub/h.yaml"])
    assert r.reward_funcs == ["exact_match", "format"] and r.trainer == "grpo"
    r = _recipe(["--reward-funcs", "exact_match", "format", "--reward-weights", "1", "2", "sub/g.yaml"])
    assert r.reward_weights == [1.0, 2.0] and r.trainer == "grpo"


@pytest.mark.parametrize("argv, message", [
    (["--eval-dataset", "data/eval.jsonl"], "eval_dataset needs dataset"),
    (["--dataset", "data/train.jsonl", "--eval-dataset", " "], "Invalid eval_dataset=' ': expected a non-empty string"),
    (["--dataset", "data/train.jsonl", "--chat-template", "hello"],
     "chat_template: 'hello' is neither an existing .jinja file nor a Jinja template"),
    (["--dataset", "data/train.jsonl", "--chat-template", "{% for m in messages %}"],
     r"chat_template \(the recipe's text\): Jinja syntax error on line 1"),
    (["--reward-funcs", "exact_match"], "reward_funcs is for trainer grpo, gvpo or bnpo; trainer is 'sft'"),
    (["--trainer", "grpo", "--dataset", "data/train.jsonl", "--reward-funcs", "nope"],
     "Unknown reward 'nope' in reward_funcs\\[0\\]"),
    (["--trainer", "grpo", "--dataset", "data/train.jsonl", "--reward-funcs", "format", "--reward-weights", "x"],
     r"reward_weights=\['x'\]: expected a list \(items: a number\)"),
    (["--trainer", "grpo", "--dataset", "data/train.jsonl", "--reward-funcs", "format", "--reward-weights", "1", "2"],
     r"reward_weights has 2 entries \(\[1.0, 2.0\]\) but reward_funcs has 1"),
    (["--trainer", "grpo", "--dataset", "data/train.jsonl"], "needs reward_funcs \\(in the recipe, or --reward-funcs\\)"),
])
def test_bad_flag_values_are_the_recipe_fields_errors(layout, capsys, argv, message):
    import re

    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowmem: error: ") and len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_reward_funcs_flag_against_the_recipe_weights(layout):
    (layout / "g.yaml").write_text("trainer: grpo\ndataset: data/train.jsonl\nreward_funcs: [format, exact_match]\n"
                                   "reward_weights: [1.0, 0.5]\n")
    with pytest.raises(ValueError, match=r"replaces the recipe's reward_funcs=\['format', 'exact_match'\], whose "
                                         r"reward_weights=\[1.0, 0.5\].*--reward-weights"):
        _recipe(["g.yaml", "--reward-funcs", "format"])


def test_missing_files_named_by_flag_stop_before_the_model_loads(layout, capsys):
    argv = ["train", "--dataset", "data/train.jsonl", "--steps", "1", "--output-dir", "out"]
    assert main([*argv, "--eval-dataset", "nope.jsonl"]) == 2
    assert "lowmem: error: eval_dataset: 'nope.jsonl' does not exist" in capsys.readouterr().err
    assert main([*argv, "--chat-template", "nope.jinja"]) == 2
    assert "lowmem: error: chat_template: file 'nope.jinja' does not exist" in capsys.readouterr().err
    assert not (layout / "out" / "metrics.json").exists()


def test_flags_reach_the_run(layout, capsys):
    """One SFT step on conversational data with the eval set and chat template given only as flags: the eval
    set is evaluated and the template is saved with the model."""
    out = layout / "out"
    assert main(["train", "--dataset", "data/train.jsonl", "--eval-dataset", "data/eval.jsonl",
                 "--chat-template", "t.jinja", "--steps", "1", "--batch-size", "2", "--output-dir", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["eval_rows"] == 2 and m["final_loss"] is not None
    saved = json.loads((out / "tokenizer_config.json").read_text()).get("chat_template") \
        or (out / "chat_template.jinja").read_text()
    assert saved == OWN_CHAT_TEMPLATE


def test_reward_funcs_flag_reaches_grpo(layout, tiny_model_path):
    """One GRPO step whose reward function is a file named by --reward-funcs (from the cwd: rewards 1.0,
    where sub/rewards.py would give 0.0)."""
    _jsonl(layout / "p.jsonl", [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(4)])
    out = layout / "out"
    (layout / "sub" / "g.yaml").write_text("trainer: grpo\nreward_funcs: [rewards.py:r]\n"
                                           "training_args: {num_generations: 4, max_completion_length: 4}\n")
    assert main(["train", "sub/g.yaml", "--model", tiny_model_path, "--lr", "1e-2", "--dataset", "p.jsonl", "--steps", "1",
                 "--batch-size", "4", "--output-dir", str(out), "--reward-funcs", "rewards.py:r"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["final_reward"] == pytest.approx(1.0)
