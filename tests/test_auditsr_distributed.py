"""AUDITSR: ``bf16_stochastic_round`` across ranks (2 gloo processes on the CPU).

A replicated parameter must be rounded with the same bits on every rank that holds a copy of it, or the copies
diverge: DDP (plain tensors, all-reduced gradients: the stream is seeded by the parameter's position and step
only, the same on every rank), and the replicate dimension of an HSDP mesh (``fully_shard`` on a 2-D mesh
``(replicate, shard)``), where the two ranks of mesh ``(2, 1)`` hold the same shard. ``_mesh_position`` counts every
mesh dimension, the replicate one included, so the replicas draw different bits (FOUND_AUDITSR 2)."""

import tempfile

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _worker(rank, world, init, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lowmem.optim import create_optimizer

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    result = {}
    # DDP: the same model and data on both ranks (a different data shard per rank, all-reduced gradients)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8)).to(torch.bfloat16)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = create_optimizer(list(ddp.parameters()), "adamw", lr=1e-4, bf16_stochastic_round=True)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(4):
        ddp(torch.randn(8, 32, generator=gen).to(torch.bfloat16)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    both = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(both, flat)
    result["ddp_equal"] = bool(torch.equal(both[0], both[1]))
    # HSDP: mesh (replicate=2, shard=1): both ranks hold the whole weight, the same gradient
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    m = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        m[0].weight.fill_(0.25)
    m = m.to(torch.bfloat16)
    fully_shard(m, mesh=mesh)
    opt = create_optimizer(list(m.parameters()), "adamw", lr=1e-4, weight_decay=0.0, bf16_stochastic_round=True)
    for _ in range(3):
        for p in m.parameters():
            p.grad = DTensor.from_local(torch.ones_like(p.to_local()), p.device_mesh, p.placements)
        opt.step()
    local = m[0].weight.to_local().detach().float().flatten()
    both = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(both, local)
    result["hsdp_equal"] = bool(torch.equal(both[0], both[1]))
    result["hsdp_moved"] = 0.25 - local.mean().item()
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    import torch.multiprocessing as mp

    d = tempfile.mkdtemp()
    mp.spawn(_worker, args=(2, d + "/rendezvous", d + "/result.pt"), nprocs=2, join=True)
    return torch.load(d + "/result.pt")


def test_ddp_replicas_round_identically(ranks):
    """Passes: DDP's replicas (plain tensors) stay bit-identical after 4 stochastically rounded steps.
    Mutation checked: _rounding_generator seeded with stream_seed(index + rank, t) -> red."""
    assert ranks["ddp_equal"]


def test_hsdp_replicas_round_identically(ranks):
    assert ranks["hsdp_moved"] > 5e-5  # (the rounding moved the weights: the option applied)
    assert ranks["hsdp_equal"]
