"""docs/distributed.md, "DDP": on a machine without GPUs `accelerate launch --cpu --num_processes 2` starts **one**
process (accelerate's simple launcher), not two: a trap the page warns about, checked here so the warning stays
true for the pinned accelerate. (`--multi_gpu` on CPU starting two gloo processes: tests/test_train_distributed.py.)
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # one launch, ~20 s on the loaded 2-core machine

RECIPE = "optim: adamw\nlr: 0.01\ntrain_size: 32\neval_size: 8\nsteps: 1\ntrack_memory: false\nsave_model: false\n"


def test_accelerate_launch_cpu_flag_starts_one_process(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "lowmem.cli", "train", str(recipe), "--output-dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["processes"] == 1 and m["steps"] == 1  # one process trained the whole run alone, no error
    assert proc.stdout.count("eval loss: initial") == 1
