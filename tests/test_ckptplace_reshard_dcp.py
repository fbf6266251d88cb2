"""The silent case of docs/distributed.md "Re-sharded parameters", on two gloo processes: per-shard state (adamw8bit's
codes and scales, MicroAdam's window) saved with its parameter sharded ``Shard(0)`` and loaded with it sharded
``Shard(1)`` of an even split (local shards (8, 8) and (16, 4): pieces of the same size). Without a record of the
placement it was saved under it loaded as it is: each rank trained on with another piece's state (shown here by
removing the record: it still loads, with a warning). Now both paths refuse it, naming both placements:
``load_state_dict`` of the ``state_dict()`` itself, and torch.distributed.checkpoint (``get_optimizer_state_dict``,
``dcp.save`` / ``dcp.load``, ``set_optimizer_state_dict``). Under the placement it was saved under it loads exactly,
and the next step equals the saved optimizer's next step bit for bit."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # (a 2-process spawn: ~10 s)

SETTINGS = {"adamw8bit": {"min_quant_size": 1, "block_size": 64}, "microadam": {}}


def _worker(rank, world, init_file, out):
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lowmem.optim import create_optimizer
    from lowmem.optim.sharded import PLACEMENT_KEY

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # (MicroAdam's blocks cut at the shards: its own warning)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {}
    try:
        mesh = init_device_mesh("cpu", (world,))
        w = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
        grads = [torch.randn(16, 8, generator=torch.Generator().manual_seed(10 + t)) for t in range(3)]

        def model(name, placement):
            m = nn.Linear(8, 16, bias=False)
            m.weight = nn.Parameter(distribute_tensor(w.clone(), mesh, [placement]))
            return m, create_optimizer(m.parameters(), name, lr=1e-2, **SETTINGS[name])

        def step(m, opt, g):
            m.weight.grad = distribute_tensor(g, mesh, m.weight.placements)
            opt.step()

        def refusal(load):
            try:
                load()
                return "loaded"
            except ValueError as e:
                return str(e)

        for name in SETTINGS:
            got = result[name] = {}
            a, opt = model(name, Shard(0))
            step(a, opt, grads[0]), step(a, opt, grads[1])
            saved = opt.state_dict()
            ckpt = os.path.join(out, f"dcp_{name}")
            dcp.save({"optim": get_optimizer_state_dict(a, opt)}, checkpoint_id=ckpt)

            # load_state_dict of the state dict itself, under Shard(1)
            b, opt2 = model(name, Shard(1))
            got["state_dict"] = refusal(lambda: opt2.load_state_dict(saved))
            # the silent case itself: without the record (a checkpoint saved before it) it loads, another piece's
            old = {**saved, "state": {k: {e: v for e, v in s.items() if e != PLACEMENT_KEY}
                                      for k, s in saved["state"].items()}}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got["unrecorded"] = refusal(lambda: opt2.load_state_dict(old))
            got["warned"] = [str(c.message) for c in caught if PLACEMENT_KEY in str(c.message)]

            # through torch.distributed.checkpoint, under Shard(1): refused
            b, opt2 = model(name, Shard(1))
            target = {"optim": get_optimizer_state_dict(b, opt2)}
            dcp.load(target, checkpoint_id=ckpt)
            got["dcp"] = refusal(lambda: set_optimizer_state_dict(b, opt2, target["optim"]))

            # under Shard(0), as saved: exactly the saved state, and the same next step
            c, opt3 = model(name, Shard(0))
            target = {"optim": get_optimizer_state_dict(c, opt3)}
            dcp.load(target, checkpoint_id=ckpt)
            set_optimizer_state_dict(c, opt3, target["optim"])
            c.weight.data.copy_(a.weight.data)
            got["equal"] = sorted(opt3.state[c.weight]) == sorted(opt.state[a.weight]) and all(
                torch.equal(opt3.state[c.weight][k], v) for k, v in opt.state[a.weight].items())
            step(a, opt, grads[2]), step(c, opt3, grads[2])
            got["continued"] = torch.equal(a.weight.to_local(), c.weight.to_local())
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_per_shard_state_re_sharded_at_the_same_size_is_refused_by_both_loads(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in SETTINGS:
            r = got[name]
            for path in ("state_dict", "dcp"):
                said = r[path]
                assert (f"{name}: parameter 0 of parameter group 0 of shape (16, 8): its per-shard state" in said
                        and "saved with the parameter sharded as (Shard(dim=0),) over a mesh of shape (2,), but it is"
                            " sharded as (Shard(dim=1),) over a mesh of shape (2,) now" in said), (rank, name, path, r)
            assert r["unrecorded"] == "loaded" and len(r["warned"]) == 1, (rank, name, r)
            assert r["equal"] and r["continued"], (rank, name, r)
