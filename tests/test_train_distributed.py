"""`lowmem train` under `accelerate launch` on CPU: two data-parallel processes (gloo) reach the
weights of one process with the same global batch, and only the main process prints the summary
and writes metrics.json. The command is the one docs/training.md documents."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lowmem.kit import build_tiny_model
from lowmem.train import load_recipe, run

pytestmark = pytest.mark.distributed

RECIPE = "optim: adamw\nlr: 0.01\ntrain_size: 32\neval_size: 8\nsteps: 4\nlogging_steps: 1\ntrack_memory: false\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes_match_one(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    run(load_recipe(recipe, batch_size=8, output_dir=str(tmp_path / "one")))  # global batch 8 in one process

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "lowmem.cli", "train", str(recipe), "--batch-size", "4", "--output-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("eval loss: initial") == 1 and proc.stdout.count("metrics: ") == 1, proc.stdout
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["processes"] == 2 and m["steps"] == 4
    assert not [p.name for p in (tmp_path / "two").iterdir() if p.name.endswith(".tmp")]

    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = dict(build_tiny_model(0)[0].named_parameters())
    assert any(not torch.equal(one[k], start[k]) for k in one)
    for k in one:  # DDP averages the two halves' gradients: same update up to float summation order
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=5e-5, msg=k)


@pytest.mark.slow  # two more processes (~16 s on a loaded 2-core machine); the RANK logic is unit-tested in test_cli.py
def test_config_error_printed_once_by_two_processes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: adamw\nlr: abc\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "lowmem.cli", "train", str(bad)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0  # the launcher reports the processes' exit status 2
    assert proc.stderr.count("lowmem: error: ") == 1 and "lr='abc': expected a number >= 0" in proc.stderr, proc.stderr
