"""FRUGAL's row and flat coordinate subspaces (``projection: rows`` / ``randk``) under FSDP2 (SMALLS19, item 1).

Measured on 2 gloo processes (tests/test_fsdp.py's harness, float64, 4 steps, rank 4):

* a 2-D weight (``Net``: fc1 256 x 32, fc2 256 x 256, sharded by rows) is refused at construction, naming the
  subspace (``selects rows or elements of the whole matrix``); through ``lowmem train`` under the CPU FSDP2 harness
  (tests/lowmem_train_fsdp_cpu.py, tiny Llama, ``optim_args: {rank: 4, projection: rows}``) that refusal came at the
  first step on both ranks, after the model loaded and the evaluation on start ran (nothing trained); now
  ``lowmem train`` refuses it before the model loads, from its meta build (the last test);
* a batched weight (``Batched``: 6 x 64 x 32, FSDP2's ``Shard(0)`` gives each rank 3 whole matrices) trains and
  equals one process's run exactly (0.0 max |weight difference|), projected: each matrix keeps its own
  ``proj_index`` (drawn from its index in the whole batch) and low-rank moments (``rows``: ``[E, 4, 32]``).

So the refusal is real for matrices sharded by rows, and a batch of matrices sharded on its batch dimension is
stepped exactly (docs/distributed.md)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowmem.optim import create_optimizer
from test_fsdp import Batched, Net, _shard, loss_fn, make

pytestmark = pytest.mark.distributed

STEPS = 4
PROJECTIONS = ["rows", "randk"]


def _hp(projection):
    return dict(lr=1e-2, rank=4, update_proj_gap=2, projection=projection)


def _build(model, projection):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_optimizer(model, "frugal", **_hp(projection))


def _single(projection):
    model, x, y = make(0, torch.float64, Batched)
    opt = _build(model, projection)
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt.state[model.w]


def _gather(t, world):
    """The ranks' local stacks (equal sizes) concatenated in rank order."""
    t = t.to_local() if hasattr(t, "to_local") else t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _worker(rank, world, init_file, out):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        half = slice(rank * 16 // world, (rank + 1) * 16 // world)
        got = {"refused": {}, "batched": {}}
        for projection in PROJECTIONS:
            model, _, _ = make(0, torch.float64, Net)
            _shard(model, mesh)
            try:
                _build(model, projection)
                got["refused"][projection] = None
            except NotImplementedError as e:
                got["refused"][projection] = str(e)
            model, x, y = make(0, torch.float64, Batched)
            _shard(model, mesh)
            opt = _build(model, projection)
            for _ in range(STEPS):
                opt.zero_grad()
                loss_fn(model, x[half], y[half]).backward()
                opt.step()
            state = opt.state[model.w]
            got["batched"][projection] = {
                "weights": {n: p.full_tensor().detach() for n, p in model.named_parameters()},
                "proj_index": _gather(state["proj_index"], world),  # (the rank's matrices' stack, local)
                "exp_avg_local": tuple(state["exp_avg"].to_local().shape) if hasattr(state["exp_avg"], "to_local")
                else tuple(state["exp_avg"].shape)}
        if rank == 0:
            torch.save(got, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_got(tmp_path_factory):
    d = tmp_path_factory.mktemp("smalls19_frugal_rows")
    mp.spawn(_worker, args=(2, str(d / "init"), str(d / "got.pt")), nprocs=2, join=True)
    return torch.load(d / "got.pt", weights_only=False)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_rows_of_a_matrix_sharded_by_rows_refused_by_name(fsdp_got, projection):
    msg = fsdp_got["refused"][projection]
    assert msg is not None, f"frugal projection={projection} accepted a matrix sharded by rows"
    assert f"coordinate subspace '{projection}'" in msg and "selects rows or elements of the whole matrix" in msg, msg


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_rows_of_experts_sharded_by_the_batch_equal_one_process(fsdp_got, projection):
    """0.0 from one process (each rank steps its own whole matrices), and projected, not degraded: the selection
    of every matrix is one process's (seeded by the matrix's index in the whole batch), the moments low-rank."""
    got = fsdp_got["batched"][projection]
    weights, state = _single(projection)
    for name, w in weights.items():
        assert torch.equal(got["weights"][name], w), (name, (got["weights"][name] - w).abs().max().item())
    assert torch.equal(got["proj_index"], state["proj_index"])
    k = 4 if projection == "rows" else 4 * 64
    assert got["exp_avg_local"] == ((3, k, 32) if projection == "rows" else (3, k)), got["exp_avg_local"]
    start = make(0, torch.float64, Batched)[0].w.detach()
    assert (weights["w"] - start).abs().max() > 1e-3  # (it trained)


@pytest.mark.parametrize("how", ["accelerate", "training_args"])
@pytest.mark.parametrize("optim_args, key", [({"rank": 4, "projection": "rows"}, "projection"),
                                             ({"rank": 4, "projection": "randk"}, "projection"),
                                             ({"rank": 4, "projection": "columns", "moment_policy": "rotate"},
                                              "moment_policy")])
def test_lowmem_train_refuses_a_row_subspace_under_fsdp_before_the_model_loads(tmp_path, monkeypatch, how,
                                                                              optim_args, key):
    """Before: the optimizer's NotImplementedError at the first step, after every rank loaded the model and ran the
    evaluation on start (measured through the CPU FSDP2 harness). Now a ConfigError from the meta build naming the
    recipe's key; a column subspace (and rows without FSDP) builds."""
    import lowmem.train
    from lowmem.config import ConfigError
    from lowmem.train import build_training_args, check_optimizer_on_meta, load_recipe

    for k in ("ACCELERATE_USE_FSDP", "FSDP_ACTIVATION_CHECKPOINTING", "WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(lowmem.train, "_accelerator_visible", lambda: True)

    def check(args_, **ta):
        recipe = load_recipe(None, optim="frugal", optim_args=args_, steps=2, output_dir=str(tmp_path / "out"),
                             **({"training_args": ta} if ta else {}))
        check_optimizer_on_meta(recipe, build_training_args(recipe))

    check(optim_args)  # (no FSDP)
    ta = {}
    if how == "accelerate":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    else:
        ta = {"fsdp": "full_shard"}
    with pytest.raises(ConfigError, match=rf"^optim_args\.{key}='{optim_args[key]}': 'frugal' under FSDP .* at the "
                                          r"first step: .*(selects rows or elements|scatters the whole matrix)"):
        check(optim_args, **ta)
    check({"rank": 4, "projection": "columns"}, **ta)
