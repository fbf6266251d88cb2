"""``lowmem.kit.save_tiny_model`` writes into a staging folder and installs it with ``lowmem.io.install_staged``:
a save interrupted while writing leaves no half-written model directory that later loads, and leaves an earlier
model in the same directory as it was."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from lowmem.kit import save_tiny_model


class Killed(Exception):
    pass


def _kill_tokenizer_save(monkeypatch):
    def killed(self, *a, **k):  # (the weights are written by then: model.save_pretrained runs first)
        raise Killed

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", killed)


def test_interrupted_save_into_a_new_directory_leaves_no_model(tmp_path, monkeypatch):
    _kill_tokenizer_save(monkeypatch)
    with pytest.raises(Killed):
        save_tiny_model(tmp_path / "tiny", seed=1)
    # nothing a loader would take: no config, no weights (a leftover staging folder is hidden and removed by the next save)
    assert not (tmp_path / "tiny").exists() or not any((tmp_path / "tiny").iterdir())
    monkeypatch.undo()
    assert save_tiny_model(tmp_path / "tiny", seed=1) == str(tmp_path / "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # (the staging folder of the killed save: gone)


def test_interrupted_save_over_a_model_keeps_it_whole(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path / "tiny"
    save_tiny_model(d, seed=0)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    _kill_tokenizer_save(monkeypatch)
    with pytest.raises(Killed):
        save_tiny_model(d, seed=1)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # the seed-0 model, every file as it was
    AutoTokenizer.from_pretrained(d, local_files_only=True)
    AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
    # a completed save replaces it (other weights), nothing left beside it
    save_tiny_model(d, seed=1)
    new = load_file(d / "model.safetensors")
    from safetensors.torch import load as load_bytes
    old = load_bytes(before["model.safetensors"])
    assert any(not torch.equal(new[k], old[k]) for k in old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
