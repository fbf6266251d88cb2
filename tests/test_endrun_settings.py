"""Settings of the end of a run that were accepted and then failed or misled: ``save_only_model`` checkpoints on
``--resume`` (called "incomplete ... an interrupted run?"), and a ``metric_for_best_model`` the evaluation does not
report (transformers' ``KeyError`` traceback at the first checkpoint, after training steps had run)."""

from __future__ import annotations

import pytest

from lowmem.config import ConfigError
from lowmem.train import load_recipe, run

SMALL = dict(train_size=32, eval_size=16, batch_size=8, logging_steps=2, track_memory=False, seed=0, optim="adamw",
             lr=1e-3, save_model=False)


def _run(out, **kw):
    return run(load_recipe(None, output_dir=str(out), **{**SMALL, **kw}))


def test_save_only_model_checkpoints_are_named_as_such_on_resume(tmp_path, capsys):
    _run(tmp_path, steps=4, save_steps=2, training_args={"save_only_model": True})
    capsys.readouterr()
    with pytest.raises(ConfigError, match=r"save_only_model: true") as err:
        _run(tmp_path, steps=6, save_steps=2, resume_from_checkpoint=True)
    assert "checkpoint-4" in str(err.value) and "model: " in str(err.value)  # the fix: a new run from its weights
    assert "interrupted" not in capsys.readouterr().out + str(err.value)


def test_a_metric_for_best_model_the_evaluation_lacks_is_an_error_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"metric_for_best_model='accuracy'.*\['eval_loss'\]"):
        _run(tmp_path, steps=4, save_steps=2, eval_steps=2,
             training_args={"load_best_model_at_end": True, "metric_for_best_model": "accuracy"})
    assert not (tmp_path / "checkpoint-2").exists()  # before any step
