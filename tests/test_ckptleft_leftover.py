"""A final save interrupted between its rename steps (``lowmem.io.install_staged``) leaves the files it replaced in
``OUTPUT_DIR/.lowmem-previous-model-K``: ``lowmem train`` names that folder in a warning at its start and at
``--resume``, with what to do (move the files back, or delete the folder), and never deletes it."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

import lowmem.io as lio
import lowmem.train as lt
from lowmem.train import interrupted_saves, load_recipe, run


class Killed(BaseException):
    pass


def _model(folder: Path, tag: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"tag": tag}))
    save_file({"w": torch.full((4,), float(len(tag)))}, folder / "model.safetensors")


def _interrupted_save(out: Path, monkeypatch) -> Path:
    """A model in ``out``, then a save of another killed after the old files went aside, before the new weights came in."""
    _model(out, "old")
    staging = lio.staging_dir(out, "saving-model")
    _model(staging, "newer")
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(b)
        if len(calls) == 3:  # (two moved aside, the new config in: killed before the new weights)
            raise Killed
        return real(a, b)

    monkeypatch.setattr(lio.os, "replace", replace)
    with pytest.raises(Killed):
        lio.install_staged(staging, out, aside_stem=".lowmem-previous-model", order=lio.weights_last)
    monkeypatch.undo()
    aside = out / ".lowmem-previous-model-1"
    assert sorted(p.name for p in aside.iterdir()) == ["config.json", "model.safetensors"]
    return aside


def test_interrupted_saves_names_the_folder_and_what_to_do(tmp_path, monkeypatch):
    assert interrupted_saves(tmp_path) == []
    aside = _interrupted_save(tmp_path, monkeypatch)
    _model(tmp_path / "merged" / ".lowmem-previous-merged-2", "m")
    found = interrupted_saves(tmp_path)
    assert len(found) == 2, found
    first = found[0]
    assert str(aside) in first and "config.json, model.safetensors" in first
    assert "move" in first and "back" in first and "delete" in first
    assert "no model weights" in first  # (output_dir lacks model.safetensors: the new weights never came in)
    assert str(tmp_path / "merged" / ".lowmem-previous-merged-2") in found[1]


class Stop(Exception):
    pass


@pytest.mark.parametrize("resume", [False, True])
def test_lowmem_train_warns_at_its_start_and_at_resume_and_keeps_the_folder(tmp_path, monkeypatch, resume):
    aside = _interrupted_save(tmp_path, monkeypatch)
    kept = {p.name: p.read_bytes() for p in aside.iterdir()}
    if resume:  # a complete checkpoint to resume from
        ck = tmp_path / "checkpoint-2"
        ck.mkdir()
        torch.save({"state": {}, "param_groups": []}, ck / "optimizer.pt")
        torch.save({"last_epoch": 2}, ck / "scheduler.pt")
        save_file({"w": torch.zeros(4)}, ck / "model.safetensors")
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": 2}))

    def stop(recipe):
        raise Stop

    monkeypatch.setitem(lt.TRAINERS, "sft", stop)  # (the warning comes before the model loads)
    buf = io.StringIO()
    with pytest.raises(Stop):
        run(load_recipe(None, output_dir=str(tmp_path), steps=4, resume_from_checkpoint=True if resume else None),
            console=Console(file=buf, width=400, soft_wrap=True))
    out = buf.getvalue()
    assert out.count(".lowmem-previous-model-1") >= 1 and "interrupted" in out, out
    assert f"resuming from {tmp_path / 'checkpoint-2'}" in out if resume else "resuming" not in out
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == kept  # nothing deleted
