"""Resume audit of ``lowmem train``: a run killed while the Trainer writes a checkpoint (a half-written
``optimizer.pt``: ``torch.save`` patched to write half its bytes, then die) and ``--resume`` afterwards; and every
``torch.load`` lowmem and its trainers call reads with ``weights_only=True``."""

from __future__ import annotations

import ast
import io
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem.train import load_recipe, run

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(train_size=64, eval_size=16, batch_size=8, logging_steps=2, track_memory=False, seed=0)
RECIPE = dict(optim="adamw", lr=1e-2, steps=6, save_steps=2)


class Killed(BaseException):
    """What a SIGKILL looks like from inside: nothing after it runs (not an Exception: no handler catches it)."""


def _run(out, **kw):
    return run(load_recipe(None, output_dir=str(out), **{**SMALL, **RECIPE, **kw}))


def _killed_while_saving(monkeypatch, out, step, **kw):
    """Run until the Trainer writes ``checkpoint-<step>/optimizer.pt``: half its bytes reach the disk, then the
    process 'dies'."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(f"checkpoint-{step}/optimizer.pt"):
            buf = io.BytesIO()
            real(obj, buf, *args, **kwargs)
            Path(f).write_bytes(buf.getvalue()[: buf.tell() // 2])
            raise Killed
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(Killed):
        _run(out, **kw)
    monkeypatch.setattr(torch, "save", real)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    _run(out)
    return load_file(out / "model.safetensors")


def _assert_weights(out, ref):
    got = load_file(out / "model.safetensors")
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.slow  # three short runs, ~4 s
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch, uninterrupted, capsys):
    _killed_while_saving(monkeypatch, tmp_path, 4)
    assert (tmp_path / "checkpoint-4" / "optimizer.pt").is_file()  # half of it
    capsys.readouterr()
    m = _run(tmp_path, resume_from_checkpoint=True)
    assert "skipping incomplete checkpoint" in capsys.readouterr().out
    assert m["resumed_from"] == str(tmp_path / "checkpoint-2") and m["steps"] == 6
    _assert_weights(tmp_path, uninterrupted)  # bit for bit: nothing of the killed save leaked in


@pytest.mark.slow
def test_a_run_killed_while_overwriting_an_earlier_runs_checkpoint_resumes_from_an_intact_one(tmp_path, monkeypatch,
                                                                                              uninterrupted):
    """An earlier run left checkpoint-2 and -4; a new run into the same output_dir (no --resume: 'starts from step
    0 and overwrites them') is killed while writing checkpoint-4's optimizer.pt. checkpoint-4 then holds the new
    run's weights, half an optimizer.pt and the earlier run's trainer_state.json / scheduler.pt, so it counts as
    complete: --resume picked it and died in torch.load ('PytorchStreamReader failed reading zip archive')
    instead of resuming from the new run's intact checkpoint-2."""
    _run(tmp_path, lr=3e-2, steps=4)  # the earlier run, other settings
    _killed_while_saving(monkeypatch, tmp_path, 4)
    m = _run(tmp_path, resume_from_checkpoint=True)
    assert m["resumed_from"] == str(tmp_path / "checkpoint-2")
    _assert_weights(tmp_path, uninterrupted)


def _loads_without_weights_only(source: str) -> list[int]:
    """Lines of ``torch.load(...)`` calls in ``source`` without ``weights_only=True``."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            kw = {k.arg: k.value for k in node.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append(node.lineno)
    return bad


def test_every_torch_load_in_lowmem_and_its_trainers_is_weights_only():
    # the checker itself: it flags a bare load and one with weights_only=False, not a safe one
    assert _loads_without_weights_only("torch.load(f)\ntorch.load(f, weights_only=False)\n"
                                       "torch.load(f, map_location='cpu', weights_only=True)") == [1, 2]
    files = sorted((ROOT / "lowmem").rglob("*.py")) + sorted((ROOT / "trainers").rglob("*.py"))
    assert len(files) > 20
    bad = {str(f.relative_to(ROOT)): lines for f in files if (lines := _loads_without_weights_only(f.read_text()))}
    assert bad == {}
