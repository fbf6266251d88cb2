"""RESUMEFIX: lowmem train's checkpoint folders (AUDIT-RESUME18 3 and 5; the slow end-to-end tests are in
tests/test_audit18_resume.py): fast checks of the pieces, on files only."""

from __future__ import annotations

import json

import lowmem.train as lt


def _checkpoint(folder, callbacks, record):
    folder.mkdir()
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt"):
        (folder / name).write_bytes(b"")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "stateful_callbacks": callbacks}))
    if record:
        (folder / lt.RUN_RECORD).write_text("{}")
    return folder


def test_a_lowmem_train_checkpoint_without_its_run_record_is_missing_it(tmp_path):
    """trainer_state.json naming the record's callback (lowmem train's) and no lowmem_run.json: incomplete; another
    Trainer's checkpoint (no such callback) needs no record."""
    ours = {lt.RUN_RECORD_CALLBACK: {"args": {}, "attributes": {}}}
    assert lt.checkpoint_missing(_checkpoint(tmp_path / "a", ours, record=False)) == [lt.RUN_RECORD]
    assert lt.checkpoint_missing(_checkpoint(tmp_path / "b", ours, record=True)) == []
    assert lt.checkpoint_missing(_checkpoint(tmp_path / "c", {}, record=False)) == []


def test_the_record_callback_names_itself_in_trainer_state():
    """The callback lowmem train adds is an ExportableState under RUN_RECORD_CALLBACK (what checkpoint_missing reads)."""
    from transformers.trainer_callback import ExportableState

    cb = lt._run_record_writer()
    assert isinstance(cb, ExportableState) and type(cb).__name__ == lt.RUN_RECORD_CALLBACK


def test_later_checkpoints_are_the_ones_after_the_resumed_one(tmp_path):
    names = ["checkpoint-2", "checkpoint-4", "checkpoint-10", "checkpoint-x"]
    assert lt.later_checkpoints(names, tmp_path / "checkpoint-4") == ["checkpoint-10"]
    assert lt.later_checkpoints(names, str(tmp_path / "checkpoint-2")) == ["checkpoint-4", "checkpoint-10"]
    assert lt.later_checkpoints(names, tmp_path / "my-model") == []
