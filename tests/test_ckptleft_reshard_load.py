"""A sharded optimizer's ``state_dict()`` (its state as ``DTensor`` s of the parameters' placements) loaded into an
optimizer of the same parameters re-sharded (``Shard(0)`` -> ``Shard(1)`` / ``Replicate()``) on two gloo processes:
a state of the parameter's own layout (AdamW's moments) is redistributed exactly to the new local shard
(``sharded.state_from_dtensor``; before, the old shard's piece was taken and refused as "loaded piece (4, 6),
expected (8, 3)"), and continuing equals continuing the saved optimizer; a per-shard state (8-bit codes) cannot
follow and is refused naming both placements, by the record of the placements it was saved under
(``sharded.PLACEMENT_KEY``), also under Shard(1) of an even split, where it has the same size (it loaded as it is
before that record: tests/test_ckptplace_reshard_dcp.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # (a 2-process spawn: ~6 s)


def _worker(rank, world, init_file, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from lowmem.optim import create_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {}
    try:
        mesh = init_device_mesh("cpu", (world,))
        w = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
        grads = [torch.randn(8, 6, generator=torch.Generator().manual_seed(10 + t)) for t in range(3)]

        def param(placement):
            return torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [placement]))

        def step(p, opt, g):
            p.grad = distribute_tensor(g, mesh, p.placements)
            opt.step()

        for to in (Shard(1), Replicate()):
            a = param(Shard(0))
            opt = create_optimizer([a], "adamw", lr=1e-2)
            step(a, opt, grads[0]), step(a, opt, grads[1])
            saved = opt.state_dict()
            b = param(to)
            b.data.copy_(distribute_tensor(a.full_tensor().detach(), mesh, [to]))
            opt2 = create_optimizer([b], "adamw", lr=1e-2)
            opt2.load_state_dict(saved)
            whole = {}
            for k in ("exp_avg", "exp_avg_sq"):
                was = DTensor.from_local(opt.state[a][k], mesh, [Shard(0)], run_check=False).full_tensor()
                now = DTensor.from_local(opt2.state[b][k], mesh, [to], run_check=False).full_tensor()
                whole[k] = torch.equal(was, now) and tuple(opt2.state[b][k].shape) == tuple(b.to_local().shape)
            step(a, opt, grads[2]), step(b, opt2, grads[2])
            whole["continued"] = torch.equal(a.full_tensor(), b.full_tensor())
            result[repr(to)] = whole
        # 8-bit codes are one piece per shard: refused under other placements, naming both (under Shard(1) of an
        # even split as many codes per shard: refused by the record of the placements they were saved under)
        w = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        a = param(Shard(0))
        opt = create_optimizer([a], "adamw8bit", lr=1e-2, min_quant_size=1, block_size=64)
        step(a, opt, torch.randn(16, 8))
        for to in (Replicate(), Shard(1)):
            b = param(to)
            try:
                opt2 = create_optimizer([b], "adamw8bit", lr=1e-2, min_quant_size=1, block_size=64)
                opt2.load_state_dict(opt.state_dict())
                result["8bit " + repr(to)] = "loaded"
            except ValueError as e:
                result["8bit " + repr(to)] = str(e)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_state_of_the_parameters_layout_reshards_exactly_on_load(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for to in ("Shard(dim=1)", "Replicate()"):
            assert got[to] == {"exp_avg": True, "exp_avg_sq": True, "continued": True}, (rank, to, got)
        for to in ("Replicate()", "Shard(dim=1)"):
            said = got["8bit " + to]
            assert ("saved with the parameter sharded as (Shard(dim=0),) over a mesh of shape (2,), but it is"
                    f" sharded as ({to},) over a mesh of shape (2,) now" in said), said
