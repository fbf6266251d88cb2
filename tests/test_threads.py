"""Thread counts chosen for the user (issue 16): no oversubscribed cores without knowing OMP_NUM_THREADS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lowmem import threads


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_user_setting_wins_and_is_validated(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3 and threads.set_train_threads(None) == 3 and torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        threads.default_threads()


def test_defaults_share_the_cores(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    assert threads.default_threads() == 8 and threads.default_threads(cap=4) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun / accelerate launch, 2 processes per machine
    assert threads.default_threads() == 4
    assert threads.set_train_threads(None) == 1 and torch.get_num_threads() == 1  # the tiny model: one thread
    assert threads.set_train_threads("/some/model") == 4
    with pytest.raises(ValueError, match="threads"):
        threads.set_threads(0)


def test_bench_threads_flag(monkeypatch):
    from lowmem.bench import bench_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert bench_threads(None) == 1 and bench_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert bench_threads(None) == 2
    with pytest.raises(ValueError, match="--threads"):
        bench_threads(0)


def test_pytest_xdist_workers_share_the_cores(tmp_path):
    """tests/conftest.py: a worker of `pytest -n 2` without OMP_NUM_THREADS runs cores // 2 torch threads."""
    (tmp_path / "test_probe.py").write_text(
        "import os, torch\n"
        "def test_probe():\n"
        "    n = max(1, len(os.sched_getaffinity(0)) // 2)\n"
        "    assert torch.get_num_threads() == n and os.environ['OMP_NUM_THREADS'] == str(n)\n")
    conftest = os.path.join(os.path.dirname(__file__), "conftest.py")
    (tmp_path / "conftest.py").write_text(open(conftest).read())
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT")}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", str(tmp_path / "test_probe.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
