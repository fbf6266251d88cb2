"""Every script in examples/ runs as a user would run it (offline, CPU) and reports falling loss (each script
asserts it), and its docstring shows the command that runs it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


def _run(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


# the default suite runs the own-data and Python API examples (30-50 s each on 2 cores); the YAML recipe, HF Trainer,
# pure-bf16 and FSDP2 ones run in the slow set (their routes are tested in the default suite: test_train_run.py,
# test_trainer_hf.py, test_bf16_stochastic_round.py / test_bf16rest_*.py, test_fsdp.py)
DEFAULT_EXAMPLES = ["own_data.py", "python_api.py"]


@pytest.mark.parametrize("script", [s if s.name in DEFAULT_EXAMPLES else pytest.param(s, marks=pytest.mark.slow)
                                    for s in EXAMPLES], ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    proc = _run(script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_docstring_shows_its_command(script):
    doc = ast.get_docstring(ast.parse(script.read_text()))
    assert doc and f"python examples/{script.name}" in doc, script.name


@pytest.mark.slow
def test_fsdp2_example_with_another_optimizer(tmp_path):
    """`python examples/fsdp2.py galore_adamw`, as its docstring and docs/distributed.md show (2 processes, 25 s)."""
    script = next(p for p in EXAMPLES if p.name == "fsdp2.py")
    proc = _run(script, "galore_adamw", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss " in proc.stdout and "optimizer checkpoint" in proc.stdout
