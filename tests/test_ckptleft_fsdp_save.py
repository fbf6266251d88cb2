"""The FSDP branch of ``lowmem train``'s atomic final save (``lowmem.train._save_outputs`` under an FSDP plugin with
sharded state dicts: every process gathers the whole state dict, ``accelerator.get_state_dict``, process 0 writes it
into ``OUTPUT_DIR/.lowmem-saving-model`` and installs it with ``lowmem.io.install_staged``).

Fast, one process: the branch with a stand-in trainer (a kill while writing leaves the earlier model byte for
byte, a whole save replaces it, a process other than 0 gathers and writes nothing). Slow: two CPU processes
(gloo) under ``accelerate launch`` with the shipped FSDP2 configuration switched to ``SHARDED_STATE_DICT``, as
tests/test_trainer_fsdp.py runs it: the final model directory is complete and loads, and a second run killed in
process 0 while writing its weights leaves the first run's model intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from lowmem.train import file_damage, load_recipe


class Killed(BaseException):
    """A kill seen from inside: nothing after it runs."""


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _write(folder: Path, state_dict: dict, tag: str, die: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"tag": tag}))
    save_file(state_dict, folder / "model.safetensors")
    if die:  # half the weights written, then the process is gone
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        raise Killed


class _FsdpTrainer:
    """What _save_outputs uses of a Trainer under FSDP with SHARDED_STATE_DICT."""

    def __init__(self, main: bool, die: bool = False):
        plugin = SimpleNamespace(state_dict_type="StateDictType.SHARDED_STATE_DICT")
        self.gathered = []
        self.args = SimpleNamespace(should_save=main)
        self.model = object()
        self.accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), get_state_dict=self._gather)
        self.die = die

    def _gather(self, model):  # (a collective: every process takes part)
        self.gathered.append(model)
        return {"w": torch.arange(6, dtype=torch.float32)}

    def _save(self, output_dir, state_dict=None):
        _write(Path(output_dir), state_dict, "newer", self.die)

    def save_model(self, output_dir=None):  # (the FULL_STATE_DICT branch: not this one)
        raise AssertionError("save_model called under SHARDED_STATE_DICT: it writes no model there")


def test_fsdp_sharded_branch_installs_atomically(tmp_path):
    from lowmem.train import _save_outputs

    _write(tmp_path, {"w": torch.zeros(6)}, "old")
    (tmp_path / "checkpoint-2").mkdir()
    old = _files(tmp_path)
    recipe = load_recipe(None, output_dir=str(tmp_path), steps=1)
    t = _FsdpTrainer(main=True, die=True)
    with pytest.raises(Killed):
        _save_outputs(t, recipe)
    assert t.gathered == [t.model] and _files(tmp_path) == old  # the earlier model, byte for byte
    other = _FsdpTrainer(main=False)  # process 1: gathers with process 0, writes nothing
    assert _save_outputs(other, recipe) == {"saved_model": str(tmp_path)}
    assert other.gathered == [other.model] and _files(tmp_path) == old
    t = _FsdpTrainer(main=True)
    assert _save_outputs(t, recipe) == {"saved_model": str(tmp_path)}
    assert json.loads((tmp_path / "config.json").read_text()) == {"tag": "newer"}
    assert file_damage(tmp_path / "model.safetensors") is None
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # staging, previous: gone
    assert (tmp_path / "checkpoint-2").is_dir()


RECIPE = "optim: adamw\nlr: 0.01\ntrain_size: 16\neval_size: 8\nsteps: 2\nlogging_steps: 1\ntrack_memory: false\n"


def _launch(config: Path, out: Path, recipe: Path, kill: bool) -> subprocess.CompletedProcess:
    from test_trainer_fsdp import _free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CKPTLEFT_KILL_SAVE": "1" if kill else ""}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(config),
           "--num_processes", "2", "--main_process_port", str(_free_port()), __file__, "train", str(recipe),
           "--batch-size", "4", "--output-dir", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow  # two launches of 2 processes (~60 s)
@pytest.mark.distributed
def test_fsdp_final_save_two_processes_complete_and_a_killed_save_keeps_the_earlier(tmp_path):
    from safetensors.torch import load_file
    from test_trainer_fsdp import sharded_config
    from transformers import AutoModelForCausalLM

    config, recipe, out = sharded_config(tmp_path), tmp_path / "r.yaml", tmp_path / "out"
    recipe.write_text(RECIPE)
    proc = _launch(config, out, recipe, kill=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["optimizer_state_sharded"] is True, metrics  # FSDP2, not DDP
    first = _files(out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.json"} <= set(first), sorted(first)
    assert file_damage(out / "model.safetensors") is None
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    weights = load_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(str(out))  # complete: every weight there (no missing keys)
    assert set(weights) == {n for n, _ in model.named_parameters()}
    # a second run, process 0 killed while writing the weights into the staging folder
    proc = _launch(config, out, recipe, kill=True)
    assert proc.returncode != 0 and "CKPTLEFT: killed while saving" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert _files(out) == first  # the first run's model and metrics.json, byte for byte
    assert (out / ".lowmem-saving-model" / "model.safetensors").stat().st_size < len(first["model.safetensors"])


if __name__ == "__main__":  # a process of the launch: lowmem train as tests/lowmem_train_fsdp_cpu.py runs it
    import runpy

    sys.path.insert(0, str(Path(__file__).parent))
    if os.environ.get("CKPTLEFT_KILL_SAVE") and os.environ.get("RANK", "0") == "0":
        import transformers.modeling_utils as mu

        real = mu.safe_save_file

        def killed(tensors, filename, *args, **kwargs):
            real(tensors, filename, *args, **kwargs)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            print("CKPTLEFT: killed while saving", filename, flush=True)
            os._exit(9)

        mu.safe_save_file = killed
    runpy.run_path(str(Path(__file__).parent / "lowmem_train_fsdp_cpu.py"), run_name="__main__")
