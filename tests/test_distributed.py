"""DDP over gloo with two CPU processes reaches the weights of one process with the same global batch.

This is what ``accelerate launch`` does on several devices: every engine optimizer must work there
unchanged, because DDP all-reduces (averages) gradients before ``optimizer.step()``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from lowmem.optim import create_optimizer, optimizer_entries
from toy_problem import hparams_for, loss_fn, make_problem

pytestmark = pytest.mark.distributed
NAMES = [e.name for e in optimizer_entries() if e.generic_tests and e.recipe is not None]
STEPS = 6


def run_single(name):
    model, x, y = make_problem()
    opt = create_optimizer(model, name, **hparams_for(name))
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return model.state_dict()


def _worker(rank, world, init_file, out_dir, names):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name in names:
            model, x, y = make_problem()
            ddp = DDP(model)
            opt = create_optimizer(model, name, **hparams_for(name))
            shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)  # each rank: its half of the batch
            for _ in range(STEPS):
                opt.zero_grad()
                loss_fn(ddp, x[shard], y[shard]).backward()  # DDP averages the two halves' gradients
                opt.step()
            if rank == 0:
                torch.save(model.state_dict(), os.path.join(out_dir, f"{name}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), NAMES), nprocs=2, join=True)
    for name in NAMES:
        ddp_state = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        for key, ref in run_single(name).items():
            torch.testing.assert_close(ddp_state[key], ref, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
