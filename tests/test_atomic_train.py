"""A run killed while writing loses nothing and leaves nothing half-written that is taken as complete:
``--resume`` skips a checkpoint whose ``optimizer.pt`` / ``scheduler.pt`` / weights are truncated (checked
cheaply: zip central directory, safetensors header), and the final model is installed from a staging directory
by renames (``lowmem.io.install_staged``), so a kill mid-save leaves the earlier model as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lowmem.io as lio
from lowmem.config import ConfigError
from lowmem.train import checkpoint_problems, file_damage, load_recipe, resolve_checkpoint, run


class Killed(BaseException):
    """A SIGKILL seen from inside: nothing after it runs (no Exception handler catches it)."""


def _checkpoint(folder: Path, step: int) -> None:
    folder.mkdir(parents=True)
    torch.save({"state": {0: {"exp_avg": torch.ones(64)}}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    save_file({"w": torch.full((64,), float(step))}, folder / "model.safetensors")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a write killed half-way leaves


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "model.safetensors", "trainer_state.json"])
def test_resume_skips_a_checkpoint_with_a_truncated_file(tmp_path, name):
    _checkpoint(tmp_path / "checkpoint-2", 2)
    _checkpoint(tmp_path / "checkpoint-4", 4)
    assert checkpoint_problems(tmp_path / "checkpoint-4") is None  # whole files pass
    _truncate(tmp_path / "checkpoint-4" / name)
    warnings: list[str] = []
    recipe = load_recipe(None, output_dir=str(tmp_path), steps=6, resume_from_checkpoint=True)
    assert resolve_checkpoint(recipe, warn=warnings.append) == str(tmp_path / "checkpoint-2")
    assert len(warnings) == 1 and "skipping incomplete checkpoint" in warnings[0] and "checkpoint-4" in warnings[0]
    assert f"{name} truncated or unreadable" in warnings[0], warnings
    with pytest.raises(ConfigError, match=rf"is not a complete checkpoint: {name} truncated or unreadable"):
        resolve_checkpoint(load_recipe(None, output_dir=str(tmp_path), steps=6,
                                       resume_from_checkpoint=str(tmp_path / "checkpoint-4")))


def test_a_sharded_index_with_a_truncated_shard_is_damage(tmp_path):
    save_file({"a": torch.zeros(8)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(8)}, tmp_path / "model-00002-of-00002.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    assert file_damage(index) is None
    _truncate(tmp_path / "model-00002-of-00002.safetensors")
    assert file_damage(index).startswith("its shard model-00002-of-00002.safetensors is truncated")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _model_dir(folder: Path, tag: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"tag": tag}))
    (folder / "tokenizer.json").write_text(json.dumps({"tag": tag}))
    save_file({"w": torch.full((4,), float(len(tag)))}, folder / "model.safetensors")


N_RENAMES = 3 + 3  # the old model's 3 files aside, the new model's 3 in


@pytest.mark.parametrize("kill_at", range(N_RENAMES + 1))
def test_install_staged_killed_at_every_rename_keeps_a_whole_model(tmp_path, monkeypatch, kill_at):
    """Killed before the k-th rename: the directory holds the old model whole or the new one whole, or lacks
    its weights (no loader takes it) with the old model whole in .lowmem-previous-model-1; the checkpoints beside
    it are untouched."""
    out = tmp_path / "out"
    _model_dir(out, "old")
    old = _files(out)
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"ckpt")
    staged = out / ".lowmem-saving-model"
    _model_dir(staged, "newer")
    new = _files(staged)
    real, done = os.replace, []

    def replace(src, dst):
        if len(done) == kill_at:
            raise Killed
        done.append(dst)
        real(src, dst)

    monkeypatch.setattr(lio.os, "replace", replace)
    if kill_at < N_RENAMES:
        with pytest.raises(Killed):
            lio.install_staged(staged, out, aside_stem=".lowmem-previous-model", order=lambda n: n.endswith(".safetensors"))
    else:
        lio.install_staged(staged, out, aside_stem=".lowmem-previous-model", order=lambda n: n.endswith(".safetensors"))
    now = {k: v for k, v in _files(out).items()}
    aside = out / ".lowmem-previous-model-1"
    if (out / "model.safetensors").exists():  # what a loader would take: whole, one model
        assert now == old or now == new, kill_at
    else:
        kept = {k: v for k, v in now.items() if old.get(k) == v}  # not yet moved aside
        assert {**kept, **_files(aside)} == old, kill_at  # the old model, whole, recoverable
        assert all(v in (old.get(k), new[k]) for k, v in now.items())
    if kill_at == N_RENAMES:
        assert now == new and not aside.exists() and not staged.exists()
    assert (out / "checkpoint-2" / "optimizer.pt").read_bytes() == b"ckpt"


SMALL = dict(train_size=16, eval_size=8, batch_size=4, logging_steps=2, track_memory=False, seed=0, optim="adamw")


class _Trainer:
    """What _save_outputs uses of a Trainer; save_model writes the model files and dies before the weights end."""

    def __init__(self, die: bool):
        from types import SimpleNamespace

        self.args = SimpleNamespace(should_save=True)
        self.accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None))
        self.die = die

    def save_model(self, output_dir=None):
        _model_dir(Path(output_dir), "newer")
        if self.die:
            _truncate(Path(output_dir) / "model.safetensors")
            raise Killed


def test_the_final_save_goes_through_a_staging_directory(tmp_path):
    """_save_outputs: a save killed mid-write leaves output_dir's model as it was (before: save_model wrote
    into output_dir, leaving new config / tokenizer and half the weights there), a whole one replaces it."""
    from lowmem.train import _save_outputs

    _model_dir(tmp_path, "old")
    old = _files(tmp_path)
    recipe = load_recipe(None, output_dir=str(tmp_path), steps=1)
    with pytest.raises(Killed):
        _save_outputs(_Trainer(die=True), recipe)
    assert _files(tmp_path) == old
    assert _save_outputs(_Trainer(die=False), recipe) == {"saved_model": str(tmp_path)}
    assert json.loads((tmp_path / "config.json").read_text()) == {"tag": "newer"}
    assert file_damage(tmp_path / "model.safetensors") is None
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # staging, previous: gone


@pytest.mark.slow  # two short runs, ~2.3 s
def test_a_run_killed_while_saving_the_final_model_leaves_the_earlier_model_intact(tmp_path, monkeypatch):
    """The second run's save_pretrained writes half of model.safetensors, then the process dies: output_dir still
    holds the first run's model and metrics.json, byte for byte; the next run replaces them whole."""
    import transformers.modeling_utils as mu

    run(load_recipe(None, output_dir=str(tmp_path), steps=1, lr=3e-2, **SMALL))
    first = _files(tmp_path)
    assert "model.safetensors" in first and "metrics.json" in first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # staging removed
    real = mu.safe_save_file

    def save(tensors, filename, *args, **kwargs):
        real(tensors, str(tmp_path / "whole.bin"), *args, **kwargs)
        Path(filename).write_bytes((tmp_path / "whole.bin").read_bytes()[:1000])
        (tmp_path / "whole.bin").unlink()
        raise Killed

    monkeypatch.setattr(mu, "safe_save_file", save)
    with pytest.raises(Killed):
        run(load_recipe(None, output_dir=str(tmp_path), steps=2, **SMALL))
    monkeypatch.setattr(mu, "safe_save_file", real)
    assert _files(tmp_path) == first  # nothing of the killed save in output_dir
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path))  # the earlier model loads
    assert (tmp_path / ".lowmem-saving-model" / "model.safetensors").stat().st_size == 1000  # the half, aside


@pytest.mark.slow  # three short runs, ~3 s
def test_the_run_after_a_killed_save_replaces_the_model_whole(tmp_path, monkeypatch):
    test_a_run_killed_while_saving_the_final_model_leaves_the_earlier_model_intact(tmp_path, monkeypatch)
    first = (tmp_path / "model.safetensors").read_bytes()
    m = run(load_recipe(None, output_dir=str(tmp_path), steps=2, **SMALL))
    assert m["steps"] == 2 and (tmp_path / "model.safetensors").read_bytes() != first
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # staging, previous: gone


@pytest.mark.slow  # two short runs, ~4.4 s
def test_a_run_whose_optimizer_pt_write_was_cut_short_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                            capsys):
    """The Trainer's torch.save of checkpoint-4/optimizer.pt puts half its bytes on disk and the run goes on
    (what a crash leaves of writes the OS had not flushed: trainer_state.json is there, optimizer.pt is cut).
    Before: --resume took checkpoint-4 and died in torch.load ('failed finding central directory')."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        if str(f).endswith("checkpoint-4/optimizer.pt"):
            _truncate(Path(f))

    monkeypatch.setattr(torch, "save", save)
    run(load_recipe(None, output_dir=str(tmp_path), steps=4, save_steps=2, **SMALL))
    monkeypatch.setattr(torch, "save", real)
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").is_file()
    capsys.readouterr()
    m = run(load_recipe(None, output_dir=str(tmp_path), steps=6, save_steps=2, resume_from_checkpoint=True, **SMALL))
    out = capsys.readouterr().out
    assert "skipping incomplete checkpoint" in out and "optimizer.pt truncated or unreadable" in out, out
    assert m["resumed_from"] == str(tmp_path / "checkpoint-2") and m["steps"] == 6
