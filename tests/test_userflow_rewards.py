"""A user's own reward functions under GRPO / GVPO / BNPO: TRL allows a function to return ``None`` for a
completion it does not score; a step in which every function did so for every completion is logged without a
reward. Before, ``lowmem train`` failed after training (``TypeError: unsupported operand type(s) for +: 'int' and
'NoneType'`` in the summary's mean) and wrote no ``metrics.json``."""

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from lowmem.train import TrainRecipe, mean_reward, run


def test_mean_reward_leaves_out_missing_steps():
    assert mean_reward([0.5, None, 1.0]) == 0.75
    assert mean_reward([None, None]) is None and mean_reward([]) is None


@pytest.mark.parametrize("trainer", ["grpo", "bnpo"])
def test_steps_without_any_reward_finish_the_run(own_model_dir, tmp_path, trainer):
    (tmp_path / "my_rewards.py").write_text(
        "def odd_only(completions, n, **kwargs):\n"          # None for the even rows: never a reward in step 1
        "    return [1.0 if k % 2 else None for k in n]\n")
    rows = [{"prompt": f"{k}+1=", "n": k} for k in (0, 2, 1, 3, 5, 7)]  # step 1: rows 0, 2; step 2: 1, 3
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = io.StringIO()
    m = run(TrainRecipe(trainer=trainer, model=own_model_dir, dataset=str(tmp_path / "p.jsonl"), lr=1e-3, steps=2,
                        batch_size=4, logging_steps=1, output_dir=str(tmp_path / "out"), save_model=False,
                        track_memory=False, reward_funcs=[f"{tmp_path / 'my_rewards.py'}:odd_only"],
                        training_args={"num_generations": 2, "max_completion_length": 3, "shuffle_dataset": False}),
            console=Console(file=out, width=200))
    assert m["reward_history"] == [None, 1.0], m["reward_history"]
    assert m["initial_reward"] == m["final_reward"] == 1.0
    assert m["reward_func_histories"] == {"odd_only": [None, 1.0]}
    saved = json.loads((Path(tmp_path / "out" / "metrics.json")).read_text())  # strict JSON: no NaN
    assert saved["reward_history"] == [None, 1.0] and not any(isinstance(v, float) and math.isnan(v)
                                                              for v in saved["reward_history"])
    assert "in 1 of 2 logged steps every reward function returned None" in out.getvalue()


def _ref_named(completions, completion, **kwargs):
    return [float(c == r) for c, r in zip(completions, completion)]


def _ref_in_kwargs(completions, **kwargs):
    return [float(c == r) for c, r in zip(completions, kwargs["completion"])]


def test_a_prompt_completion_datasets_completion_column_is_withheld():
    """GRPO on prompt + completion rows (an SFT file's reference answers): TRL 1.16 passes every column but
    'completion' to the reward functions. Before, only "missing a required argument: 'completion'" (the column
    is right there in the file) or, through **kwargs, "raised KeyError: 'completion'" mid-training."""
    from lowmem.rewards import check_reward_signature, checked_outputs

    with pytest.raises(ValueError, match=r"missing a required argument: 'completion'.*The dataset's 'completion' column "
                                         r"is not passed to reward functions: TRL withholds it .* rename the column"):
        check_reward_signature(_ref_named, "r.py:_ref_named", ["prompt", "completion"])
    with pytest.raises(ValueError, match=r"missing a required argument: 'completion'.*completions, \*\*kwargs\)$") as err:
        check_reward_signature(_ref_named, "r.py:_ref_named", ["prompt", "reference"])
    assert "withholds" not in str(err.value)  # no such column: the plain message
    with pytest.raises(ValueError, match=r"raised KeyError: 'completion' .*The dataset's 'completion' column is not "
                                         r"passed"):
        checked_outputs(_ref_in_kwargs, "r.py:_ref_in_kwargs")(prompts=["1+1="], completions=["2"])


def _any(completions, **kwargs):
    return [1.0 for _ in completions]


@pytest.mark.parametrize("column", ["completions", "prompts", "trainer_state", "log_metric"])
def test_a_column_named_like_trls_own_keywords_is_refused(column):
    """TRL 1.16 calls fn(prompts=, completions=, completion_ids=, **columns) with trainer_state / log_extra /
    log_metric set in that mapping: a 'completions' column (say, reference completions) failed at the first step
    with "got multiple values for keyword argument 'completions'" (a traceback, after generation); a 'trainer_state'
    column was replaced by TRL's object. Checked for lowmem train (load_reward_funcs) and the Python API
    (LowMemGRPOTrainer's check_reward_signatures) alike."""
    from datasets import Dataset

    from lowmem.rewards import load_reward_funcs
    from lowmem.trainers.trl import check_reward_signatures

    says = rf"dataset column\(s\) \['{column}'\] have the name\(s\) of keywords TRL gives every reward function .* rename"
    with pytest.raises(ValueError, match=says):
        load_reward_funcs(["format"], ["prompt", column])
    with pytest.raises(ValueError, match=says):
        check_reward_signatures([_any], Dataset.from_list([{"prompt": "1+1=", column: "x"}]))
    check_reward_signatures([_any], Dataset.from_list([{"prompt": "1+1=", "completion_ids": [1]}]))  # TRL withholds it


def test_the_eval_sets_columns_are_checked_too(tmp_path):
    """An eval file without a column a reward function needs (TRL scores the eval prompts before, during and after
    training): before, "ans() missing 1 required positional argument: 'answer'" at the evaluation before training,
    after the model loaded; now one error before, naming the eval set's columns."""
    from lowmem.rewards import load_reward_funcs

    (tmp_path / "r.py").write_text("def ans(completions, answer, **kwargs):\n    return [1.0 for _ in completions]\n")
    ref = f"{tmp_path / 'r.py'}:ans"
    with pytest.raises(ValueError, match=r"^eval_dataset \(columns \['prompt'\]\): reward function .*missing a required "
                                         r"argument: 'answer'"):
        load_reward_funcs([ref], ["prompt", "answer"], ["prompt"])
    with pytest.raises(ValueError, match=r"needs an eval_dataset column 'answer' or 'solution'; the eval_dataset has"):
        load_reward_funcs(["exact_match"], ["prompt", "answer"], ["prompt", "id"])
    assert len(load_reward_funcs([ref, "exact_match"], ["prompt", "answer"], ["prompt", "answer", "id"])) == 2


def test_lowmem_train_checks_the_eval_set_before_the_model_loads(own_model_dir, tmp_path, capsys):
    from lowmem.cli import main

    (tmp_path / "r.py").write_text("def ans(completions, answer, **kwargs):\n    return [1.0 for _ in completions]\n")
    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n' * 4)
    (tmp_path / "eval.jsonl").write_text('{"prompt": "1+2="}\n' * 2)
    assert main(["train", "--trainer", "grpo", "--model", own_model_dir, "--dataset", str(tmp_path / "train.jsonl"),
                 "--eval-dataset", str(tmp_path / "eval.jsonl"), "--lr", "1e-3", "--output-dir", str(tmp_path / "out"),
                 "--reward-funcs", f"{tmp_path / 'r.py'}:ans"]) == 2
    assert "eval_dataset (columns ['prompt']): reward function" in capsys.readouterr().err
