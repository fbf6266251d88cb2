"""SMALLS18B: user-facing leftovers of session 18's audits (FOUND_RESUMEFIX 1, FOUND_OWNDATA18 leftovers).

* ``LowMemTrainer.train(resume_from_checkpoint=<older checkpoint>)`` moves the output directory's later
  ``checkpoint-M`` aside to ``earlier-run-K`` (named in a warning) before the resumed run rewrites them file by file,
  as ``lowmem train`` does.
* SFT rows with ``completion`` beside ``text`` / ``messages`` and no ``prompt``: TRL trains the text and never reads
  ``completion``; refused naming the columns.
* ``do_eval: true`` without a held-out set: refused naming the field and how to give eval data.
"""
from __future__ import annotations

import json
import logging

import pytest

from lowmem.config import ConfigError


class _Base:
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        return resume_from_checkpoint


def _trainer(output_dir, main=True):
    from types import SimpleNamespace

    from lowmem.trainers.hf import LowMemOptimizerMixin

    class T(LowMemOptimizerMixin, _Base):
        args = SimpleNamespace(output_dir=str(output_dir))

        def is_world_process_zero(self):
            return main

    return T()


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    import lowmem.trainers.hf

    monkeypatch.setattr(lowmem.trainers.hf, "resume_checkpoint", lambda out, value: value)  # (the completeness check: its own tests)
    for n in (2, 4, 6, 10):
        (tmp_path / f"checkpoint-{n}").mkdir()
        (tmp_path / f"checkpoint-{n}" / "trainer_state.json").write_text(json.dumps({"global_step": n}))
    return tmp_path


def test_resuming_an_older_checkpoint_moves_the_later_ones_aside(run_dir, caplog):
    """Resuming checkpoint-4 of {2, 4, 6, 10}: 6 and 10 (numeric order, not string order) go to earlier-run-1,
    untouched; the warning names them and the folder; 2 and 4 stay."""
    with caplog.at_level(logging.WARNING):
        got = _trainer(run_dir).train(str(run_dir / "checkpoint-4"))
    assert got == str(run_dir / "checkpoint-4")
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    aside = run_dir / "earlier-run-1"
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-10", "checkpoint-6"]
    assert json.loads((aside / "checkpoint-10" / "trainer_state.json").read_text()) == {"global_step": 10}
    assert "checkpoint-6" in caplog.text and "checkpoint-10" in caplog.text and str(aside) in caplog.text


def test_resuming_the_latest_checkpoint_or_on_another_process_moves_nothing(run_dir):
    _trainer(run_dir).train(str(run_dir / "checkpoint-10"))
    _trainer(run_dir, main=False).train(str(run_dir / "checkpoint-2"))  # (the main process moves them)
    _trainer(run_dir).train(None)
    assert len(list(run_dir.glob("checkpoint-*"))) == 4 and not list(run_dir.glob("earlier-run-*"))


@pytest.mark.parametrize("kind", ["text", "messages"])
def test_sft_rows_with_completion_but_no_prompt_are_refused(tmp_path, kind):
    """``{"text": ..., "completion": ...}``: detected as text with an extra column, and TRL 1.16's SFT tokenize_fn reads
    'completion' only under 'prompt', so the completion was never trained on, without a word."""
    from lowmem.data import load_train_data

    body = {"text": lambda i: f"{i}+1=",
            "messages": lambda i: [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": "?"}]}
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({kind: body[kind](i), "completion": str(i + 1)}) + "\n" for i in range(4)))
    with pytest.raises(ValueError, match=r"column 'completion' without 'prompt' .*rename the prompt column to 'prompt'"):
        load_train_data(str(path), "sft")
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1), "text": "x"}) + "\n"
                            for i in range(4)))
    assert load_train_data(str(path), "sft").format.name == "prompt-completion"  # (prompt + completion: TRL's first format)


def test_do_eval_without_a_held_out_set_is_refused(tmp_path):
    from lowmem.train import TrainRecipe

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i}+1={i + 1}"}) + "\n" for i in range(8)))
    with pytest.raises(ConfigError, match=r"^do_eval=true needs a held-out set for dataset=.*eval_dataset.*eval_split"):
        TrainRecipe(dataset=str(data), training_args={"do_eval": True})
    assert TrainRecipe(dataset=str(data), eval_split=0.25, training_args={"do_eval": True}).eval_split == 0.25
    TrainRecipe(dataset=str(data), training_args={"do_eval": False})
