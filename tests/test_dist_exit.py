"""lowmem.dist_exit.exit_process: the ordinary ``sys.exit`` outside a process group; in one, the group destroyed,
the ``atexit`` handlers run, the output flushed and no interpreter finalization (tests/test_experts_gloo_exit.py
forces the abort that finalization can meet)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lowmem.dist_exit import exit_if_distributed, exit_process


@pytest.mark.parametrize("distributed", [None, False])
def test_without_a_process_group_it_is_sys_exit(distributed):
    with pytest.raises(SystemExit) as err:
        exit_process(5, distributed=distributed)
    assert err.value.code == 5


def test_exit_if_distributed_returns_the_code_without_a_process_group():
    assert exit_if_distributed(2) == 2 and exit_if_distributed(None) is None


def test_code_must_be_an_exit_status():
    with pytest.raises(TypeError, match="code must be an int"):
        exit_process("2", distributed=True)


_SCRIPT = r"""
import atexit, sys, tempfile, os
import torch.distributed as dist
from lowmem.dist_exit import exit_if_distributed, exit_process

class Finalized:
    def __del__(self):
        print("finalized", flush=True)

keep = Finalized()
dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "rdv"), rank=0, world_size=1)
atexit.register(lambda: print("atexit: initialized", dist.is_initialized()))
sys.stdout.write("unflushed ")  # a pipe: block-buffered until the exit flushes it
CALL
print("not reached")
"""


@pytest.mark.parametrize("call", ["exit_process(3)", "exit_if_distributed(3)"])
def test_in_a_process_group_it_exits_without_finalization(call):
    out = subprocess.run([sys.executable, "-c", _SCRIPT.replace("CALL", call)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stdout == "unflushed atexit: initialized False\n", (out.stdout, out.stderr[-2000:])
