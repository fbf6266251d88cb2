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


_SHARED_PROBE = """
import os, pytest
@pytest.fixture(scope="module")
def shared():
    return os.environ["PYTEST_XDIST_WORKER"]
@pytest.mark.parametrize("i", range(8))
def test_shared(shared, i):
    with open(os.path.join(os.environ["PROBE_OUT"], f"shared-{i}"), "w") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"])
"""


@pytest.fixture(scope="module")
def xdist_probe(tmp_path_factory):
    """One `pytest -n 2 --dist loadgroup` run (pyproject's options) of probe files with a copy of tests/conftest.py:
    (its result, the folder the probes wrote to)."""
    tmp = tmp_path_factory.mktemp("xdist_probe")
    (tmp / "test_probe.py").write_text(
        "import os, torch\n"
        "def test_probe():\n"
        "    n = max(1, len(os.sched_getaffinity(0)) // 2)\n"
        "    assert torch.get_num_threads() == n and os.environ['OMP_NUM_THREADS'] == str(n)\n")
    (tmp / "test_shared.py").write_text(_SHARED_PROBE)
    conftest = os.path.join(os.path.dirname(__file__), "conftest.py")
    (tmp / "conftest.py").write_text(open(conftest).read())
    (tmp / "out").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT")}
    env["PROBE_OUT"] = str(tmp / "out")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
                          str(tmp / "test_probe.py"), str(tmp / "test_shared.py")], cwd=tmp, env=env, capture_output=True, text=True)
    return res, tmp / "out"


def test_pytest_xdist_workers_share_the_cores(xdist_probe):
    """tests/conftest.py: a worker of `pytest -n 2` without OMP_NUM_THREADS runs cores // 2 torch threads."""
    res, _ = xdist_probe
    assert res.returncode == 0, res.stdout + res.stderr


def test_tests_sharing_a_module_fixture_run_on_one_worker(xdist_probe):
    """tests/conftest.py's scheduler under --dist loadgroup: a file that defines a module-scoped fixture is one work
    unit, so its 8 tests run on one worker and the fixture once (xdist's load hands them to both workers)."""
    res, out = xdist_probe
    assert res.returncode == 0, res.stdout + res.stderr
    workers = [(out / f"shared-{i}").read_text() for i in range(8)]
    assert len(set(workers)) == 1, workers
