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
from lowmem.optim.layerwise import LayerwiseOptimizer
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
        _layerwise(rank, world, out_dir)  # the same process group (each spawn's start-up is most of its time)
    finally:
        dist.destroy_process_group()
    from lowmem.dist_exit import exit_process

    exit_process(0, distributed=True)  # no finalization: a gloo thread could abort it (lowmem/dist_exit.py)


def _layerwise(rank, world, out_dir):
    """LayerwiseOptimizer on a DDP model: its hooks step on the all-reduced gradient (GaLore, accumulation 2)."""
    model, x, y = make_problem()
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    ddp = DDP(model)
    opt = LayerwiseOptimizer(ddp, "galore_adamw", accumulation_steps=2, lr=1e-2, rank=4, update_proj_gap=3)
    xs, ys = x[shard].chunk(2), y[shard].chunk(2)
    for _ in range(4):
        with ddp.no_sync():
            (loss_fn(ddp, xs[0], ys[0]) / 2).backward()
        (loss_fn(ddp, xs[1], ys[1]) / 2).backward()
        opt.step()
        opt.zero_grad()
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(out_dir, "layerwise_ddp.pt"))
    refused = False  # plain hooks under a 2-rank process group would step on the local gradient
    m2, _, _ = make_problem()
    LayerwiseOptimizer(m2, "adamw", lr=1e-2)
    try:
        loss_fn(m2, x, y).backward()
    except RuntimeError as err:
        refused = "DDP" in str(err) or "DistributedDataParallel" in str(err)
    torch.save(refused, os.path.join(out_dir, f"layerwise_refused{rank}.pt"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Every engine optimizer under DDP, then the layerwise check, in one spawn of 2 processes: their folder."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(out / "rendezvous"), str(out), NAMES), nprocs=2, join=True)
    return out


def test_ddp_two_processes_match_single_process(ddp_run):
    for name in NAMES:
        ddp_state = torch.load(ddp_run / f"{name}.pt", weights_only=True)
        for key, ref in run_single(name).items():
            torch.testing.assert_close(ddp_state[key], ref, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def test_layerwise_ddp_two_processes_step_on_the_reduced_gradient(ddp_run):
    """(tests/test_layerwise.py's DDP check, run in this file's spawn.) Layerwise GaLore with accumulation 2 under
    DDP = one process on the global batch; plain layerwise hooks under a 2-rank process group are refused."""
    ref, x, y = make_problem()
    opt = create_optimizer(ref, "galore_adamw", lr=1e-2, rank=4, update_proj_gap=3)
    for _ in range(4):
        loss_fn(ref, x, y).backward()  # the global batch = the mean of the two ranks' halves
        opt.step()
        opt.zero_grad()
    ddp_state = torch.load(ddp_run / "layerwise_ddp.pt", weights_only=True)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert all(torch.load(ddp_run / f"layerwise_refused{r}.pt", weights_only=True) for r in range(2))
