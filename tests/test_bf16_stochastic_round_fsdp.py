"""``bf16_stochastic_round`` on FSDP2 shards (2 gloo processes on the CPU): the element-wise step of a local shard
(AdamW, Adafactor's chunked step with its all-reduces) and GaLore's projected rows (LowMemOptimizer.
_update_projected_sharded) round their write-back stochastically: bfloat16 weights of 0.25 move by about
3 steps x lr on average where round-to-nearest leaves them unchanged."""

import tempfile

import pytest
import torch

CASES = [("adamw", {}, 1e-4), ("adafactor", {}, 1e-4), ("galore_adamw", {"rank": 4, "update_proj_gap": 2}, 1e-3)]


def _worker(rank, world, init, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lowmem.optim import create_optimizer

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    drifts = {}
    for name, kw, lr in CASES:
        for dtype, sr in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)):
            m = torch.nn.Sequential(torch.nn.Linear(256, 64, bias=False))
            with torch.no_grad():
                m[0].weight.fill_(0.25)
            m = m.to(dtype)
            fully_shard(m, mesh=mesh)
            opt = create_optimizer(list(m.parameters()), name, lr=lr, weight_decay=0.0, bf16_stochastic_round=sr, **kw)
            for _ in range(3):
                for p in m.parameters():
                    p.grad = DTensor.from_local(torch.ones_like(p.to_local()), p.device_mesh, p.placements)
                opt.step()
            drifts[(name, str(dtype), sr)] = 0.25 - m[0].weight.full_tensor().float().mean().item()
    if rank == 0:
        torch.save(drifts, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_write_backs_round_stochastically():
    import torch.multiprocessing as mp

    d = tempfile.mkdtemp()
    mp.spawn(_worker, args=(2, d + "/rendezvous", d + "/drifts.pt"), nprocs=2, join=True)
    drifts = torch.load(d + "/drifts.pt")
    for name, _, _ in CASES:
        rtn, sr, exact = (drifts[(name, "torch.bfloat16", False)], drifts[(name, "torch.bfloat16", True)],
                          drifts[(name, "torch.float32", False)])
        assert rtn == 0.0 and exact > 5e-5, (name, rtn, exact)
        assert abs(sr - exact) < 0.15 * exact, (name, sr, exact)
