"""``racs`` on fused MoE experts ``[E, A, B]`` (transformers 5's ``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``): each expert a linear layer with its own row and column scalings (the engine's batch of
matrices, RacsMoments.per_matrix), equal to stepping each expert as a 2-D parameter; under FSDP2 (``Shard(0)``:
whole experts on each rank) two gloo processes equal one (tests/test_fsdp_experts.py's model, float64 weights)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from lowmem.optim import create_optimizer

from test_fsdp_experts import make, train

STEPS = 4


def _build(model):
    return create_optimizer(list(model.parameters()), "racs", lr=1e-2)


def test_each_expert_is_stepped_as_its_own_matrix():
    """A ``(3, 8, 10)`` batch against three ``8 x 10`` parameters, 5 steps with a zero gradient at step 3 and 100x
    smaller ones at step 4: the weights and the stacked ``row_scale`` ``[3, 8]``, ``col_scale`` ``[3, 10]`` and
    ``update_norm`` ``[3]`` equal the separate parameters' (float32 rounding); the state is ``3 (8 + 10 + 1)`` numbers."""
    torch.manual_seed(0)
    w = torch.randn(3, 8, 10)
    batch = torch.nn.Parameter(w.clone())
    alone = [torch.nn.Parameter(w[e].clone()) for e in range(3)]
    a, b = create_optimizer([batch], "racs"), create_optimizer(alone, "racs", foreach=False)
    gen = torch.Generator().manual_seed(1)
    for t in range(5):
        g = torch.randn(3, 8, 10, generator=gen) * torch.tensor([1.0, 30.0, 0.01]).view(3, 1, 1)
        g = g * (0.0 if t == 2 else 0.01 if t == 3 else 1 + t)
        batch.grad = g.clone()
        for e, p in enumerate(alone):
            p.grad = g[e].clone()
        a.step()
        b.step()
    torch.testing.assert_close(batch.detach(), torch.stack([p.detach() for p in alone]), rtol=1e-6, atol=1e-7)
    st = a.state[batch]
    for k in ("row_scale", "col_scale", "update_norm"):
        torch.testing.assert_close(st[k], torch.stack([b.state[p][k] for p in alone]), rtol=1e-5, atol=0)
    assert a.state_bytes() - 4 == 4 * 3 * (8 + 10 + 1)


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        half = slice(rank * 8 // world, (rank + 1) * 8 // world)
        model, x, y = make()
        fully_shard(model, mesh=mesh)
        opt = _build(model)
        train(model, opt, x[half], y[half], STEPS)
        weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
        state = {pid: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in st.items()}
                 for pid, st in opt.state_dict()["state"].items()}
        if rank == 0:
            torch.save({"weights": weights, "state": state}, os.path.join(out_dir, "racs.pt"))
    finally:
        dist.destroy_process_group()
    from accelerate_fsdp_cpu import exit_without_finalizing

    exit_without_finalizing(0)  # (no interpreter finalization: a gloo worker thread could abort it)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_on_fused_experts(tmp_path):
    """FSDP2 ``Shard(0)`` of the experts ``[3, 24, 16]``, ``[3, 16, 12]`` (2 / 1 experts per rank) and ``[1, 16, 16]``
    (rank 1 holds none), the router a shard of rows (~12 s: two spawned processes): weights to 1e-6 and every state entry (the experts' stacked
    per-matrix scalings) to 1e-5 relative of the one-process run after 4 steps."""
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "racs.pt", weights_only=True)
    model, x, y = make()
    opt = _build(model)
    train(model, opt, x, y, STEPS)
    for key, ref in model.state_dict().items():
        torch.testing.assert_close(got["weights"][key], ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"{key}: {m}")
    ref_state = opt.state_dict()["state"]
    assert set(got["state"]) == set(ref_state)
    for pid, st in ref_state.items():
        assert set(got["state"][pid]) == set(st), pid
        for k, v in st.items():
            mine = got["state"][pid][k]
            assert mine.shape == v.shape and mine.dtype == v.dtype, (pid, k)
            torch.testing.assert_close(mine, v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{pid} {k}: {m}")
    assert ref_state[0]["row_scale"].shape == (3, 24) and ref_state[0]["col_scale"].shape == (3, 16)  # (gate_up)


def test_resume_of_a_batch_from_a_weights_only_checkpoint(tmp_path):
    """The stacked per-matrix state through ``torch.save`` / ``torch.load(weights_only=True)`` after 2 steps: 2 more
    steps equal the uninterrupted run's bit for bit (weights and state)."""
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(4, 6, 5, generator=gen) * (1 + t) for t in range(4)]

    def run(steps, p, opt):
        for g in grads[steps]:
            p.grad = g.clone()
            opt.step()

    torch.manual_seed(0)
    w = torch.randn(4, 6, 5)
    p = torch.nn.Parameter(w.clone())
    opt = create_optimizer([p], "racs")
    run(slice(0, 4), p, opt)
    q = torch.nn.Parameter(w.clone())
    first = create_optimizer([q], "racs")
    run(slice(0, 2), q, first)
    torch.save({"w": q.detach(), "opt": first.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    r = torch.nn.Parameter(ckpt["w"].clone())
    second = create_optimizer([r], "racs")
    second.load_state_dict(ckpt["opt"])
    assert second.state[r]["row_scale"].shape == (4, 6)
    run(slice(2, 4), r, second)
    assert torch.equal(r.detach(), p.detach())
    for k, v in opt.state[p].items():
        assert torch.equal(second.state[r][k], v), k
