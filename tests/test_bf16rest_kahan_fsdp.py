"""``kahan_summation`` on FSDP2 shards (2 gloo processes on the CPU, bfloat16 weights): the compensation is
element-wise, kept for the local shard (``state["kahan_comp"]`` of the shard's shape) and checkpointed with the
parameter's placements (lowmem.optim.sharded.state_to_dtensor).

The gradients are set by hand, the same global tensor in both runs (the shard's rows of it under FSDP2), so the
sharded run of an element-wise recipe (AdamW, Lion) and of GaLore on a batch of experts (each rank steps its whole
matrices) must equal the unsharded one bit for bit: the weights, the moments and the compensation. A projected 2-D
FSDP2 parameter is refused for now (the engine's sharded projected state keeps no compensation: FOUND_BF16REST 1),
naming the parameter's shape and the alternatives. The model's shapes give uneven shards (255 rows: 128 / 127) and
an empty one (a 1-row weight: rank 1 holds none). The learning rate is below half a bfloat16 ulp of the weights, so
round-to-nearest would leave them unchanged: the compensation carries every update (checked: the weights move, as
they do not without Kahan).
"""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowmem.optim import create_optimizer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # (one spawn of 2 processes: ~25 s on 2 busy cores)

# tag -> (optimizer, settings): element-wise (AdamW, Lion); GaLore on the experts, a batch of matrices each rank steps
# whole (its stacked state, compensation included, sharded as the parameter; scale 1: updates of about lr), the 2-D
# weights full-rank (rank None); Adafactor (its column sums and RMS all-reduced over the shards in float32) and Muon
# (the momentum gathered; the experts each rank's whole matrices one by one: MuonMoments.per_matrix) resumed only
CASES = {"adamw": ("adamw", {}), "lion": ("lion", {}),
         "galore_experts": ("galore_adamw", {"groups": lambda m: [
             {"params": [m.experts], "rank": 4, "update_proj_gap": 2, "scale": 1.0},
             {"params": [m.fc1.weight, m.fc2.weight, m.head.weight], "rank": None}]}),
         "galore_right": ("galore_adamw", {"rank": 4, "update_proj_gap": 2}),
         "galore_left": ("galore_adamw", {"rank": 4, "update_proj_gap": 2, "proj_type": "reverse_std"}),
         "adafactor": ("adafactor", {}), "muon": ("muon", {})}
EXACT = ["adamw", "lion", "galore_experts"]
# projected 2-D weights sharded by FSDP2 (their compensation the shard's: the engine's sharded projected _init_state):
# resumed bit-exact and sized per shard like the others; against one process the projected moments differ by float32
# rounding (each rank's P^T G is all-reduced: another sum order, ~1e-7), which can flip a compensation's last bit
PROJECTED = ["galore_right", "galore_left"]  # equal to one process bit for bit
LR = 2e-4  # the weights are ~U(0.125, 0.25): their ulp is 2^-10, half of it 4.9e-4 (2.4 steps)


class Net(nn.Module):
    """fc1: 255 x 32 (uneven shards 128 / 127), fc2: 64 x 256 (even), head: 1 x 255 (rank 1's shard empty), experts:
    6 x 64 x 32 (3 whole matrices per rank)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 255, bias=False)
        self.fc2 = nn.Linear(256, 64, bias=False)
        self.head = nn.Linear(255, 1, bias=False)
        self.experts = nn.Parameter(torch.empty(6, 64, 32))


def make(seed=0):
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.125, 0.25)
    return model.to(torch.bfloat16)


def grads(step):
    """The global gradients of step ``step`` (bfloat16, by parameter name)."""
    g = torch.Generator().manual_seed(1000 + step)
    return {n: torch.randn(p.shape, generator=g).to(torch.bfloat16) for n, p in Net().named_parameters()}


def build(model, tag, kahan=True):
    name, hp = CASES[tag]
    hp = dict(hp)
    groups = hp.pop("groups", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (galore_adamw's warning of the head's rank >= its smaller side: not tested)
        return create_optimizer(model if groups is None else groups(model), name, lr=LR, weight_decay=0.0,
                                kahan_summation=kahan, **hp)


def train(model, opt, steps, start=0):
    from lowmem.optim.sharded import is_dtensor, shard_rows

    for step in range(start, start + steps):
        whole = grads(step)
        for n, p in model.named_parameters():
            if is_dtensor(p):
                from torch.distributed.tensor import DTensor

                a, b = shard_rows(p)
                p.grad = DTensor.from_local(whole[n][a:b].contiguous(), p.device_mesh, p.placements,
                                            run_check=False, shape=p.shape, stride=p.stride())
            else:
                p.grad = whole[n]
        opt.step()


def full(model, opt):
    """The whole weights and, by parameter name, every state entry (full tensors)."""
    from lowmem.optim.sharded import is_dtensor

    names = {p: n for n, p in model.named_parameters()}
    out = {n: (p.full_tensor() if is_dtensor(p) else p).detach().clone() for n, p in model.named_parameters()}
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in zip([i for g in sd["param_groups"] for i in g["params"]], params):
        for k, v in sd["state"].get(pid, {}).items():
            if isinstance(v, torch.Tensor) and k != "shard_placement":
                out[f"{names[p]}.{k}"] = (v.full_tensor() if is_dtensor(v) else v).clone()
    return out


def _worker(rank, world, init_file, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))

        def sharded(seed=0):
            model = make(seed)
            for m in (model.fc1, model.fc2, model.head):
                fully_shard(m, mesh=mesh)
            return fully_shard(model, mesh=mesh)

        report = {"resumed": {}, "bytes": {}}
        for tag in CASES:
            model = sharded()
            opt = build(model, tag)
            train(model, opt, 2)
            ckpt = os.path.join(out_dir, f"dcp_{tag}")
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=ckpt)
            train(model, opt, 2, start=2)
            straight = full(model, opt)
            if rank == 0:
                torch.save(straight, os.path.join(out_dir, f"{tag}.pt"))
            model = sharded(seed=1)  # other weights: the checkpoint must set them
            opt = build(model, tag)
            sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(sd, checkpoint_id=ckpt)
            set_model_state_dict(model, sd["model"])
            set_optimizer_state_dict(model, opt, sd["optim"])
            train(model, opt, 2, start=2)
            again = full(model, opt)
            report["resumed"][tag] = {k: torch.equal(again[k], v) for k, v in straight.items()}
            # this rank's state: the shards' (materialized on a fresh optimizer)
            model = sharded()
            opt = build(model, tag)
            opt.materialize_state()
            comp = {n: tuple(opt.state[p]["kahan_comp"].shape) for n, p in model.named_parameters()}
            local = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
            plain = build(model, tag, kahan=False)
            plain.materialize_state()
            report["bytes"][tag] = {"state_bytes": opt.state_bytes(), "comp": comp, "local": local,
                                    "without": plain.state_bytes()}
        # a projected parameter's compensation (for when the engine keeps one: FOUND_BF16REST 1) is saved with the
        # parameter's placements whichever side is projected (a left side's moments stay plain: replicated)
        from lowmem.optim.sharded import projected_state_to_dtensor

        w = model.fc1.weight
        placed = {}
        for rows in (True, False):
            v = projected_state_to_dtensor(torch.zeros(w.to_local().shape, dtype=torch.bfloat16), w, "kahan_comp", rows)
            placed[str(rows)] = [type(v).__name__, str(tuple(v.placements)) == str(tuple(w.placements)) if
                                 hasattr(v, "placements") else False, list(v.shape)]
        report["projected"] = placed
        every = [None] * world
        dist.all_gather_object(every, report)
        if rank == 0:
            with open(os.path.join(out_dir, "report.json"), "w") as f:
                json.dump(every, f)
    finally:
        dist.destroy_process_group()
    from lowmem.dist_exit import exit_process

    exit_process(0, distributed=True)  # no finalization: a gloo thread could abort it (lowmem/dist_exit.py)


@pytest.fixture(scope="module")
def kahan_fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kahan_fsdp")
    mp.spawn(_worker, args=(2, str(out / "rendezvous"), str(out)), nprocs=2, join=True)
    return out, json.loads((out / "report.json").read_text())


def single(tag, steps=4):
    model = make()
    opt = build(model, tag)
    train(model, opt, steps)
    return model, opt


@pytest.mark.parametrize("tag", EXACT)
def test_two_shards_equal_one_process_bit_for_bit(kahan_fsdp_run, tag):
    out, _ = kahan_fsdp_run
    sharded = torch.load(out / f"{tag}.pt", weights_only=True)
    model, opt = single(tag)
    ref = full(model, opt)
    assert sorted(sharded) == sorted(ref)
    assert any(k.endswith("kahan_comp") for k in ref)
    for k, v in ref.items():
        assert torch.equal(sharded[k], v), k
    # the updates are below half an ulp: without the compensation the weights would not move
    moved = {n: bool((p != make().get_parameter(n)).any()) for n, p in model.named_parameters()}
    assert all(moved.values()), moved
    plain = make()
    train(plain, build(plain, tag, kahan=False), 4)
    assert all(torch.equal(p, make().get_parameter(n)) for n, p in plain.named_parameters())


@pytest.mark.parametrize("tag", PROJECTED)
def test_projected_shards_keep_their_compensation(kahan_fsdp_run, tag):
    """A projected bfloat16 FSDP2 weight keeps its shard's compensation (red when the engine's sharded projected
    _init_state keeps none: the write-back rounds to nearest): the compensations are live and the weights end within
    one bfloat16 ulp of one process's (the projected moments' all-reduce order: ~1e-7 apart)."""
    out, _ = kahan_fsdp_run
    sharded = torch.load(out / f"{tag}.pt", weights_only=True)
    model, opt = single(tag)
    ref = full(model, opt)
    assert sorted(sharded) == sorted(ref)
    for name in ("fc1.weight", "fc2.weight"):
        assert sharded[f"{name}.kahan_comp"].abs().max() > 0, name
        a, b = sharded[name].float(), ref[name].float()
        assert torch.allclose(a, b, rtol=2 ** -8, atol=0), (name, (a - b).abs().max())


@pytest.mark.parametrize("tag", list(CASES))
def test_checkpoint_resume_is_bit_exact(kahan_fsdp_run, tag):
    """save after 2 steps (torch.distributed.checkpoint) -> load into another model and optimizer -> 2 more steps
    equals the 4 uninterrupted steps: weights, moments, compensation (red when the compensation is saved as a plain
    tensor: DCP keeps one rank's piece for both)."""
    _, report = kahan_fsdp_run
    for rank in report:
        assert rank["resumed"][tag] and all(rank["resumed"][tag].values()), rank["resumed"][tag]
    assert any(k.endswith("kahan_comp") for k in report[0]["resumed"][tag])


@pytest.mark.parametrize("tag", EXACT)
def test_two_shard_checkpoint_loads_into_one_process(kahan_fsdp_run, tag):
    """The compensation has the parameter's placements, so the 2-process checkpoint reshards: one process loads it
    and continues to the 2-process run's weights and compensation."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    out, _ = kahan_fsdp_run
    model = make(seed=1)
    opt = build(model, tag)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=out / f"dcp_{tag}")
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    train(model, opt, 2, start=2)
    sharded = torch.load(out / f"{tag}.pt", weights_only=True)
    for k, v in full(model, opt).items():
        assert torch.equal(sharded[k], v), k


@pytest.mark.parametrize("tag", list(CASES))
def test_state_bytes_per_rank_are_the_shards(kahan_fsdp_run, tag):
    """Each rank's compensation has its shard's shape (128 / 127 rows of fc1, 1 / 0 of head): its state_bytes() is
    the optimizer's without kahan_summation plus 2 B per element of its shards; for the element-wise recipes the
    ranks' state_bytes() add up to one process's, less the step counters, which every rank keeps."""
    _, report = kahan_fsdp_run
    for rank in report:
        r = rank["bytes"][tag]
        assert r["comp"] == r["local"]
        assert r["state_bytes"] - r["without"] == sum(2 * math.prod(shape) for shape in r["local"].values())
    assert [rank["bytes"][tag]["local"]["fc1.weight"][0] for rank in report] == [128, 127]
    assert [rank["bytes"][tag]["local"]["head.weight"][0] for rank in report] == [1, 0]
    if tag in EXACT:
        model = make()
        opt = build(model, tag)
        opt.materialize_state()
        kept = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if v.dim() == 0)
        assert sum(rank["bytes"][tag]["state_bytes"] - kept for rank in report) == opt.state_bytes() - kept


def test_projected_compensation_is_saved_with_the_parameters_placements(kahan_fsdp_run):
    """projected_state_to_dtensor gives a compensation the parameter's placements and global shape on either side
    (red when the left side's plain-tensor rule, for replicated moments, takes it: one rank's piece saved for both)."""
    _, report = kahan_fsdp_run
    for rank in report:
        assert rank["projected"] == {"True": ["DTensor", True, [255, 32]], "False": ["DTensor", True, [255, 32]]}
