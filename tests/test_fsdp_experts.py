"""FSDP2 on fused MoE experts ``[E, A, B]`` stepped per matrix (projected recipes, Subset-Norm): FSDP2 shards
dimension 0, so each rank holds whole experts and steps them as the unsharded engine steps a batch
(LowMemOptimizer._local_matrices), with no communication; their stacked state is sharded the same way.

Two gloo processes, each with half the batch, against one unsharded process with the whole batch (float64
weights, float32 subspace math): the weights, and every state entry (bases, moments, the per-expert
``proj_meta`` with its seed by the expert's index in the whole batch), equal the one-process run's; the experts
split unevenly (3 over 2 ranks: 2 / 1) and one batch leaves rank 1 no expert at all. Checkpoints through
``torch.distributed.checkpoint``: resumed on 2 processes, and on one process (another world size). One spawn
of 2 processes runs everything (~12 s of CPU); the test process runs the unsharded references.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowmem.optim import create_optimizer
from lowmem.optim.engine import MATRIX_SHARED_KEYS

pytestmark = pytest.mark.distributed

# refreshes at steps 1 and 3 (svd / random / rsvd bases: rsvd's first range finder and APOLLO's random
# projection draw from the per-expert seed)
RECIPES = {
    "galore_adamw": ("galore_adamw", {"rank": 4, "update_proj_gap": 2}),
    "galore_rsvd": ("galore_adamw", {"rank": 4, "update_proj_gap": 2, "projection": "rsvd"}),
    # the per-parameter path (one matrix after another) instead of the projected buckets
    "galore_loop": ("galore_adamw", {"rank": 4, "update_proj_gap": 2, "foreach": False}),
    "apollo_adamw": ("apollo_adamw", {"rank": 4, "update_proj_gap": 2}),
    "adamw_snsm": ("adamw_snsm", {"rank": 4, "update_proj_gap": 2}),
    # not projected: Subset-Norm's statistics per matrix (each expert's rows or columns)
    "adamw_sn": ("adamw_sn", {"subset_norm": True}),
}
STEPS = 4


class MoE(nn.Module):
    """A router (2-D, full-rank), fused experts ``gate_up`` ``[3, 24, 16]`` and ``down`` ``[3, 16, 12]``
    (2 / 1 experts on 2 ranks) and a lone expert ``[1, 16, 16]`` (rank 1's shard empty)."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(16, 3, bias=False)
        self.gate_up = nn.Parameter(torch.randn(3, 24, 16) * 0.3)
        self.down = nn.Parameter(torch.randn(3, 16, 12) * 0.3)
        self.lone = nn.Parameter(torch.randn(1, 16, 16) * 0.3)

    def forward(self, x):
        h = torch.einsum("bh,eih->bei", x, self.gate_up)
        a = torch.nn.functional.silu(h[..., :12]) * h[..., 12:]
        y = torch.einsum("bei,ehi->beh", a, self.down)
        weights = torch.softmax(self.router(x), dim=-1)
        return (weights.unsqueeze(-1) * y).sum(1) + x @ self.lone[0].t()


def make(seed=0):
    torch.manual_seed(seed)
    model = MoE().double()
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(8, 16, generator=g, dtype=torch.float64), torch.randn(8, 16, generator=g, dtype=torch.float64)


def build(model, tag):
    name, hp = RECIPES[tag]
    experts = [model.gate_up, model.down, model.lone]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_optimizer([{"params": experts, **hp}, {"params": [model.router.weight]}], name, lr=1e-2)


def train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=mesh)


def _full_state(opt):
    """Every state entry of ``opt.state_dict()`` whole (DTensors gathered), by parameter index."""
    from torch.distributed.tensor import DTensor

    return {pid: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in st.items()}
            for pid, st in opt.state_dict()["state"].items()}


def _worker(rank, world, init_file, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        half = slice(rank * 8 // world, (rank + 1) * 8 // world)
        out = {"resumed": {}, "state_bytes": {}, "transient": {}, "local": {}, "refused": {}}
        for tag in RECIPES:
            model, x, y = make()
            _shard(model, mesh)
            opt = build(model, tag)
            mine = [opt.state_bytes(), [opt.step_transient_bytes(), opt.step_transient_bytes(per_parameter=True)],
                    [tuple(p.to_local().shape) for p in (model.gate_up, model.down, model.lone)]]
            every = [None] * world
            dist.all_gather_object(every, mine)
            out["state_bytes"][tag], out["transient"][tag], out["local"][tag] = (list(x) for x in zip(*every))
            ckpt = os.path.join(out_dir, f"dcp_{tag}")
            for step in range(STEPS):
                if step == 2:
                    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                             checkpoint_id=ckpt)
                train(model, opt, x[half], y[half], 1)
            straight = {k: v.full_tensor() for k, v in model.state_dict().items()}
            state = _full_state(opt)
            # resumed on 2 processes from the checkpoint of step 2, into other weights
            model, _, _ = make(seed=1)
            _shard(model, mesh)
            opt = build(model, tag)
            sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(sd, checkpoint_id=ckpt)
            set_model_state_dict(model, sd["model"])
            set_optimizer_state_dict(model, opt, sd["optim"])
            train(model, opt, x[half], y[half], STEPS - 2)
            again = {k: v.full_tensor() for k, v in model.state_dict().items()}
            out["resumed"][tag] = max((again[k] - straight[k]).abs().max().item() for k in straight)
            if rank == 0:
                torch.save({"weights": straight, "state": state}, os.path.join(out_dir, f"{tag}.pt"))
        # one process's checkpoint of step 2 (saved by the fixture) resumed on 2 processes
        for tag in FROM_ONE:
            model, _, _ = make(seed=1)
            _shard(model, mesh)
            opt = build(model, tag)
            sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(sd, checkpoint_id=os.path.join(out_dir, f"one_{tag}"))
            set_model_state_dict(model, sd["model"])
            set_optimizer_state_dict(model, opt, sd["optim"])
            train(model, opt, x[half], y[half], STEPS - 2)
            full = {k: v.full_tensor() for k, v in model.state_dict().items()}
            if rank == 0:
                torch.save(full, os.path.join(out_dir, f"from_one_{tag}.pt"))
        # a NaN in one expert of rank 1 only: both ranks skip the step, nothing changes
        model, x, y = make()
        _shard(model, mesh)
        opt = build(model, "galore_adamw")
        train(model, opt, x[half], y[half], 1)
        opt.zero_grad()
        (model(x[half]) - y[half]).pow(2).mean().backward()
        if rank == 1:
            model.gate_up.grad.to_local()[0, 0, 0] = float("nan")
        before = [p.to_local().clone() for p in model.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        unchanged = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
        every = [None] * world
        dist.all_gather_object(every, [opt.skipped_steps, unchanged])
        out["nan"] = every
        # the experts' matrices split (their A or B dimension sharded): refused, naming what is supported
        for dim in (1, 2):
            p = nn.Parameter(distribute_tensor(torch.randn(4, 24, 16, dtype=torch.float64), mesh, [Shard(dim)]))
            try:
                create_optimizer([{"params": [p], "rank": 4}], "galore_adamw")
                out["refused"][dim] = None
            except NotImplementedError as e:
                out["refused"][dim] = str(e)
        if rank == 0:
            with open(os.path.join(out_dir, "out.json"), "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()
    from accelerate_fsdp_cpu import exit_without_finalizing

    exit_without_finalizing(0)  # (no interpreter finalization: a gloo worker thread could abort it)


FROM_ONE = ["apollo_adamw", "adamw_snsm"]


def _save_one(tag, ckpt):
    """One unsharded process's checkpoint (torch.distributed.checkpoint) after 2 steps of ``tag``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, x, y = make()
    opt = build(model, tag)
    train(model, opt, x, y, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (DCP: no process group, one process)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_experts")
    for tag in FROM_ONE:
        _save_one(tag, out / f"one_{tag}")
    mp.spawn(_worker, args=(2, str(out / "rendezvous"), str(out)), nprocs=2, join=True)
    return out


def _single(tag, steps=STEPS):
    model, x, y = make()
    opt = build(model, tag)
    train(model, opt, x, y, steps)
    return model, opt


@pytest.mark.parametrize("tag", RECIPES)
def test_two_processes_match_one_on_fused_experts(run, tag):
    """Weights and every state entry of the 2-process run equal the unsharded run's (tolerance 1e-6 on the
    float64 weights, as tests/test_fsdp.py; the float32 state to 1e-5 relative: the halves' gradients are
    summed by the all-reduce in another order; measured 0.0 for all). ``proj_meta`` (seed, phase, refreshes of
    each expert) exactly: red when a rank seeds its experts by their local index (rank 1's expert 0 taking expert
    0's seed)."""
    got = torch.load(run / f"{tag}.pt", weights_only=True)
    model, opt = _single(tag)
    for key, ref in model.state_dict().items():
        torch.testing.assert_close(got["weights"][key], ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"{tag}: {key}: {m}")
    ref_state = opt.state_dict()["state"]
    assert set(got["state"]) == set(ref_state)
    for pid, st in ref_state.items():
        assert set(got["state"][pid]) == set(st), (tag, pid)
        for k, v in st.items():
            mine = got["state"][pid][k]
            assert mine.shape == v.shape and mine.dtype == v.dtype, (tag, pid, k)
            if k == "proj_meta" or k in MATRIX_SHARED_KEYS:
                assert torch.equal(mine, v), (tag, pid, k, mine, v)
            else:
                torch.testing.assert_close(mine, v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{tag} {pid} {k}: {m}")


@pytest.mark.parametrize("tag", RECIPES)
def test_state_bytes_are_the_shards_share(run, tag):
    """Each rank's state_bytes() (materialized at construction): its experts' share of each batch's stacked
    state (rank 0: 2 of 3, and the lone expert; rank 1: 1 of 3, and an empty stack of the lone expert's),
    its rows of the router (AdamW), the counters whole. step_transient_bytes() (also per_parameter) counts each
    rank's experts as an unsharded batch of them: at most the one-process bound, an empty shard adding nothing."""
    got = json.loads((run / "out.json").read_text())
    assert [[tuple(s) for s in r] for r in got["local"][tag]] == [[(2, 24, 16), (2, 16, 12), (1, 16, 16)],
                                                                 [(1, 24, 16), (1, 16, 12), (0, 16, 16)]]
    model, x, y = make()
    opt = build(model, tag)
    opt.materialize_state()
    for rank, (mine, lone) in enumerate([(2, 1), (1, 0)]):
        share = {id(model.gate_up): (mine, 3), id(model.down): (mine, 3), id(model.lone): (lone, 1),
                 id(model.router.weight): (mine, 3)}
        expected = 0
        for p, st in opt.state.items():
            for v in st.values():
                size = v.numel() * v.element_size()
                expected += size if v.dim() == 0 else size * share[id(p)][0] // share[id(p)][1]
        assert got["state_bytes"][tag][rank] == expected, rank
        assert 0 < got["transient"][tag][rank][0] <= opt.step_transient_bytes()
        assert 0 < got["transient"][tag][rank][1] <= opt.step_transient_bytes(per_parameter=True)


@pytest.mark.parametrize("tag", RECIPES)
def test_checkpoint_resumes_on_two_processes(run, tag):
    """save at step 2 -> load into other weights on 2 processes -> 2 more steps = the uninterrupted run, exactly."""
    assert json.loads((run / "out.json").read_text())["resumed"][tag] == 0.0


@pytest.mark.parametrize("tag", RECIPES)
def test_checkpoint_resumes_on_one_process(run, tag):
    """The 2-process checkpoint of step 2 loads into one unsharded process (the experts' stacks reshard as the
    parameter), which continues with the whole batch to the 2-process run's weights (1e-6)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    model, _, _ = make(seed=1)
    _, x, y = make()
    opt = build(model, tag)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=run / f"dcp_{tag}")
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    train(model, opt, x, y, STEPS - 2)
    final = torch.load(run / f"{tag}.pt", weights_only=True)["weights"]
    for key, v in model.state_dict().items():
        torch.testing.assert_close(v, final[key], rtol=1e-6, atol=1e-6, msg=lambda m: f"{tag}: {key}: {m}")


def test_nonfinite_expert_on_one_rank_skips_on_all(run):
    """A NaN in rank 1's expert: the non-finite flag is reduced over the mesh, both ranks skip the step."""
    assert json.loads((run / "out.json").read_text())["nan"] == [[1, True], [1, True]]


@pytest.mark.parametrize("tag", FROM_ONE)
def test_one_process_checkpoint_resumes_on_two(run, tag):
    """One process's checkpoint of step 2 loads onto 2 processes (each takes its experts' rows of the stacks,
    their seeds included), which continue with half the batch each to the one-process run's weights (1e-6)."""
    model, _ = _single(tag)
    got = torch.load(run / f"from_one_{tag}.pt", weights_only=True)
    for key, ref in model.state_dict().items():
        torch.testing.assert_close(got[key], ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"{tag}: {key}: {m}")


@pytest.mark.parametrize("dim", ["1", "2"])
def test_experts_sharded_inside_their_matrices_refuse(run, dim):
    """Shard(1) / Shard(2) of [4, 24, 16] splits the matrices: NotImplementedError naming the parameter, its
    placements and what is supported."""
    msg = json.loads((run / "out.json").read_text())["refused"][dim]
    assert msg is not None, f"Shard({dim}) accepted"
    assert "parameter 0" in msg and f"Shard(dim={dim})" in msg and "(4, 24, 16)" in msg, msg
    assert "Shard(d) of a leading dimension d < 1" in msg and "galore_adamw" in msg, msg
