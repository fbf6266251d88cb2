"""FSDP2 ``Shard(0)`` of float32 fused experts under ``racs`` / ``adamw_sn`` (tests/test_fsdp_experts.py's model, made
float32: its float64 weights take the per-matrix step): each rank steps its shard's whole experts with the batched
step (LowMemOptimizer._matrix_blocks on the local shard, no communication), two gloo processes equal to one process's
per-matrix step."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from lowmem.optim import create_optimizer

from test_fsdp_experts import make, train

STEPS = 4
RECIPES = {"racs": {}, "adamw_sn": {"subset_norm": True}}


def _build(model, name, **experts_group):
    experts = [model.gate_up, model.down, model.lone]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_optimizer([{"params": experts, **RECIPES[name], **experts_group},
                                 {"params": [model.router.weight]}], name, lr=1e-2, weight_decay=0.1)


def _make32():
    model, x, y = make()
    return model.float(), x.float(), y.float()


def _spy(seen):
    from lowmem.optim.recipes.racs import RacsMoments
    from lowmem.optim.recipes.subset_norm import SubsetNormMoments

    for cls in (RacsMoments, SubsetNormMoments):
        orig = cls.batch_direction

        def spy(self, g, *args, _orig=orig, **kwargs):
            seen.append(g.shape[0])
            return _orig(self, g, *args, **kwargs)

        cls.batch_direction = spy


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
        seen: list[int] = []
        _spy(seen)
        for name in RECIPES:
            model, x, y = _make32()
            fully_shard(model, mesh=mesh)
            opt = _build(model, name)
            seen.clear()
            train(model, opt, x[half], y[half], STEPS)
            weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
            state = {pid: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in st.items()}
                     for pid, st in opt.state_dict()["state"].items()}
            torch.save({"weights": weights, "state": state, "seen": list(seen)},
                       os.path.join(out_dir, f"{name}-{rank}.pt"))
    finally:
        dist.destroy_process_group()
    from accelerate_fsdp_cpu import exit_without_finalizing

    exit_without_finalizing(0)  # (no interpreter finalization: a gloo worker thread could abort it)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_with_batched_experts(tmp_path):
    """Experts ``[3, 24, 16]``, ``[3, 16, 12]`` (2 / 1 per rank) and ``[1, 16, 16]`` (rank 1: none), float32, 4 steps
    (~12 s: two spawned processes): each rank's batches take the batched step (rank 0 blocks of 2, 2, 1, rank 1 of 1, 1),
    the weights to 1e-5 and every state entry to 1e-4 relative of the one-process run of the per-matrix step
    (``foreach=False`` in the experts' group; the gradients' reduction adds in another order, racs's products too)."""
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    for name in RECIPES:
        got = [torch.load(tmp_path / f"{name}-{r}.pt", weights_only=True) for r in range(2)]
        assert got[0]["seen"] == [2, 2, 1] * STEPS and got[1]["seen"] == [1, 1] * STEPS, [g["seen"] for g in got]
        model, x, y = _make32()
        opt = _build(model, name, foreach=False)
        train(model, opt, x, y, STEPS)
        for key, ref in model.state_dict().items():
            torch.testing.assert_close(got[0]["weights"][key], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
        ref_state = opt.state_dict()["state"]
        assert set(got[0]["state"]) == set(ref_state)
        for pid, st in ref_state.items():
            for k, v in st.items():
                mine = got[0]["state"][pid][k]
                assert mine.shape == v.shape and mine.dtype == v.dtype, (name, pid, k)
                torch.testing.assert_close(mine, v, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name} {pid} {k}: {m}")
