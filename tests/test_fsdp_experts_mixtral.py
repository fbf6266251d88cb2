"""FSDP2 on a tiny transformers Mixtral (fused experts ``gate_up_proj [4, 48, 32]``, ``down_proj [4, 32, 24]`` per
layer): ``create_optimizer(model, ...)`` targets the experts and the attention / router weights, FSDP2 shards every
decoder layer, and 2 gloo processes with half the sequences each reach the one-process run's weights. Also HSDP
(``(Replicate(), Shard(0))`` on a 2 x 2 mesh of 4 processes) on the module of tests/test_fsdp_experts.py. Slow
(two spawns, ~60 s on 2 busy cores); tests/test_fsdp_experts.py is the fast check of the same path."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowmem.optim import create_optimizer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NAMES = ["galore_adamw", "apollo_adamw", "adamw_snsm"]
STEPS = 3


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    cfg._experts_implementation = "eager"  # (grouped_mm takes no float64)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (4, 8), generator=g)


def _build(model, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_optimizer(model, name, rank=4, update_proj_gap=2, lr=1e-2)


def _train(model, opt, ids):
    for _ in range(STEPS):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()


def _seeds(state):
    """The experts' ``proj_meta`` (seed, phase, refreshes of each expert) of a state dict's whole state."""
    return {pid: st["proj_meta"] for pid, st in state.items() if "proj_meta" in st and st["proj_meta"].dim() == 2}


def _worker(rank, world, init_file, out_dir):
    from test_fsdp_experts import _full_state
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        ids = _data()[rank * 2:(rank + 1) * 2]
        for name in NAMES:
            model = _mixtral()
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = _build(model, name)
            _train(model, opt, ids)
            full = {k: v.full_tensor() for k, v in model.state_dict().items()}
            seeds = _seeds(_full_state(opt))
            if rank == 0:
                torch.save({"weights": full, "seeds": seeds}, os.path.join(out_dir, f"{name}.pt"))
    finally:
        dist.destroy_process_group()
    from accelerate_fsdp_cpu import exit_without_finalizing

    exit_without_finalizing(0)  # (no interpreter finalization: a gloo worker thread could abort it)


@pytest.fixture(scope="module")
def mixtral_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_mixtral")
    mp.spawn(_worker, args=(2, str(out / "rendezvous"), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_tiny_mixtral_two_processes_match_one(mixtral_run, name):
    """The experts (and the projected attention weights) of 2 processes equal one process's (1e-6, float64;
    measured 4.0e-8 galore_adamw, 4.4e-8 apollo_adamw, 3.3e-7 adamw_snsm: the halves' gradients summed in
    another order), and so do the experts' seeds and refresh counts (``proj_meta``, exactly)."""
    model = _mixtral()
    opt = _build(model, name)
    assert any(p.dim() == 3 for g in opt.param_groups if g.get("rank") for p in g["params"])
    _train(model, opt, _data())
    got = torch.load(mixtral_run / f"{name}.pt", weights_only=True)
    for key, ref in model.state_dict().items():
        torch.testing.assert_close(got["weights"][key], ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {key}: {m}")
    seeds = _seeds(opt.state_dict()["state"])
    assert len(seeds) == 4 and seeds.keys() == got["seeds"].keys()  # (2 layers x gate_up_proj, down_proj)
    for pid, meta in seeds.items():
        assert torch.equal(got["seeds"][pid], meta), (pid, got["seeds"][pid], meta)


def _hsdp_worker(rank, world, init_file, out_dir):
    from test_fsdp_experts import RECIPES, _full_state, build, make, train
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        quarter = slice(rank * 8 // world, (rank + 1) * 8 // world)
        out = {}
        for tag in RECIPES:
            model, x, y = make()
            fully_shard(model, mesh=mesh)
            opt = build(model, tag)
            train(model, opt, x[quarter], y[quarter], 4)
            out[tag] = sorted({str(tuple(v.placements)) for st in opt.state_dict()["state"].values()
                               for v in st.values() if hasattr(v, "placements")})
            full = {k: v.full_tensor() for k, v in model.state_dict().items()}
            seeds = _seeds(_full_state(opt))
            if rank == 0:
                torch.save({"weights": full, "seeds": seeds}, os.path.join(out_dir, f"{tag}.pt"))
        if rank == 0:
            with open(os.path.join(out_dir, "placements.json"), "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()
    from accelerate_fsdp_cpu import exit_without_finalizing

    exit_without_finalizing(0)  # (no interpreter finalization: a gloo worker thread could abort it)


@pytest.fixture(scope="module")
def hsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsdp_experts")
    mp.spawn(_hsdp_worker, args=(4, str(out / "rendezvous"), str(out)), nprocs=4, join=True)
    return out


def test_hsdp_experts_match_one_process(hsdp_run):
    """HSDP (replicate 2 x shard 2): each shard's experts stepped locally; the weights equal one process's (1e-6;
    measured 0.0), the experts' proj_meta exactly, the experts' state saved with the parameter's
    (Replicate(), Shard(0))."""
    from test_fsdp_experts import RECIPES, build, make, train

    placements = json.loads((hsdp_run / "placements.json").read_text())
    for tag in RECIPES:
        model, x, y = make()
        opt = build(model, tag)
        train(model, opt, x, y, 4)
        got = torch.load(hsdp_run / f"{tag}.pt", weights_only=True)
        for key, ref in model.state_dict().items():
            torch.testing.assert_close(got["weights"][key], ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"{tag}: {key}: {m}")
        seeds = _seeds(opt.state_dict()["state"])
        assert seeds.keys() == got["seeds"].keys()
        for pid, meta in seeds.items():
            assert torch.equal(got["seeds"][pid], meta), (tag, pid)
        assert "(Replicate(), Shard(dim=0))" in placements[tag], placements[tag]
