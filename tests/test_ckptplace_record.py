"""Per-shard state (8-bit codes and scales, MicroAdam's window: one piece per shard, ``sharded.state_to_dtensor``)
does not reshard with its parameter, and under ``Shard(1)`` of an even split each piece has the size it had under
``Shard(0)``: a checkpoint that did not say which placement it was saved under loaded silently with another piece's
state. ``state_dict()`` now records the placements and mesh shape of every sharded parameter with such state
(``sharded.PLACEMENT_KEY``, an int64 tensor), and ``load_state_dict`` refuses it under other placements, naming the
parameter, both placements and what to do; a checkpoint without the record (older) loads as before, with one
warning naming how many parameters went unchecked. One process of a two-process "fake" group (torch's test backend:
collectives do nothing, the shards are those of rank 0 of two); DCP on a one-process gloo group. The two-process
runs: tests/test_ckptplace_reshard_dcp.py (slow)."""

from __future__ import annotations

import io
import re
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lowmem.optim import create_optimizer
from lowmem.optim.sharded import PLACEMENT_KEY, RECORD_ROWS, check_saved_placement, placement_record

SETTINGS = {"adamw8bit": {"min_quant_size": 1, "block_size": 64}, "microadam": {}}


def _rec(*rows):
    """A record (sharded.placement_record): one row [mesh size, kind, tensor dim, split factor] per mesh dimension
    (kind 0 Replicate, 1 Shard), then rows of zeros."""
    record = torch.zeros(RECORD_ROWS, 4, dtype=torch.int64)
    record[: len(rows)] = torch.tensor(rows)
    return record


@pytest.fixture
def mesh():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (2,))
    finally:
        dist.destroy_process_group()


def _param(w, mesh, placement):
    from torch.distributed.tensor import distribute_tensor

    return nn.Parameter(distribute_tensor(w.clone(), mesh, [placement]))


def _stepped(name, mesh, placement, w, seeds=(1, 2)):
    from torch.distributed.tensor import distribute_tensor

    p = _param(w, mesh, placement)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (MicroAdam's blocks cut at the shards: its own warning)
        opt = create_optimizer([p], name, lr=1e-2, **SETTINGS[name])
    for s in seeds:
        p.grad = distribute_tensor(torch.randn(w.shape, generator=torch.Generator().manual_seed(s)), mesh, [placement])
        opt.step()
    return p, opt


def _fresh(name, mesh, placement, w):
    return _stepped(name, mesh, placement, w, seeds=(7,))  # (its own state, to see that a refused load keeps it)


def _reloaded(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ["adamw8bit", "microadam"])
def test_per_shard_state_saved_under_shard0_is_refused_under_shard1_of_an_even_split(mesh, name):
    from torch.distributed.tensor import Shard

    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    a, opt = _stepped(name, mesh, Shard(0), w)
    saved = _reloaded(opt.state_dict())  # (torch.load(weights_only=True) takes the record)
    assert torch.equal(saved["state"][0][PLACEMENT_KEY], _rec([2, 1, 0, 1]))
    b, opt2 = _fresh(name, mesh, Shard(1), w)  # local shard (16, 4): as many elements as (8, 8)
    kept = {k: v.clone() for k, v in opt2.state[b].items()}
    msg = (rf"{name}: parameter 0 of parameter group 0 of shape \(16, 8\): its per-shard state .* was saved with the"
           r" parameter sharded as \(Shard\(dim=0\),\) over a mesh of shape \(2,\), but it is sharded as"
           r" \(Shard\(dim=1\),\) over a mesh of shape \(2,\) now: it was re-sharded between save and load"
           r".*remove state_dict\['state'\]\[0\] before loading")
    with pytest.raises(ValueError, match=msg):
        opt2.load_state_dict(saved)
    assert all(torch.equal(opt2.state[b][k], v) for k, v in kept.items())  # its own state kept
    del saved["state"][0]  # (what the message says): the rest loads, its state is made at its next step
    opt2.load_state_dict(saved)
    assert b not in opt2.state


@pytest.mark.parametrize("name", ["adamw8bit", "microadam"])
def test_the_same_placement_loads_exactly_and_without_a_warning(mesh, name):
    from torch.distributed.tensor import Shard

    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    a, opt = _stepped(name, mesh, Shard(0), w)
    b, opt2 = _fresh(name, mesh, Shard(0), w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(_reloaded(opt.state_dict()))
    assert PLACEMENT_KEY not in opt2.state[b] and set(opt2.state[b]) == set(opt.state[a])
    assert all(torch.equal(opt2.state[b][k], v) for k, v in opt.state[a].items())


def test_a_checkpoint_without_the_record_loads_as_before_with_one_warning_naming_the_count(mesh):
    from torch.distributed.tensor import Shard

    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    ps = [_param(w, mesh, Shard(0)) for _ in range(2)] + [_param(torch.randn(16, 8), mesh, Shard(0))]
    opt = create_optimizer([{"params": ps[:2]}, {"params": ps[2:], "min_quant_size": 10**6}], "adamw8bit", lr=1e-2,
                           min_quant_size=1, block_size=64)
    for p in ps:
        p.grad = p.detach() * 0.5
    opt.step()
    sd = opt.state_dict()
    assert [PLACEMENT_KEY in sd["state"][i] for i in range(3)] == [True, True, False]  # (float32 moments reshard)
    for s in sd["state"].values():
        s.pop(PLACEMENT_KEY, None)  # what a checkpoint saved before the record holds
    qs = [_param(w, mesh, Shard(1)) for _ in range(2)] + [_param(torch.randn(16, 8), mesh, Shard(0))]
    opt2 = create_optimizer([{"params": qs[:2]}, {"params": qs[2:], "min_quant_size": 10**6}], "adamw8bit", lr=1e-2,
                            min_quant_size=1, block_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt2.load_state_dict(sd)  # (unchecked: another piece's codes, as before)
    said = [str(c.message) for c in caught if PLACEMENT_KEY in str(c.message)]
    assert len(said) == 1 and "of 2 sharded parameter(s)" in said[0] and "loaded unchecked" in said[0], said
    assert torch.equal(opt2.state[qs[0]]["exp_avg"], opt.state[ps[0]]["exp_avg"])


def test_the_record_names_placements_and_mesh_and_a_whole_piece_is_no_change(mesh):
    from torch.distributed.tensor import Replicate, Shard

    p = _param(torch.randn(16, 8), mesh, Shard(1))
    assert torch.equal(placement_record(p), _rec([2, 1, 1, 1]))
    assert torch.equal(placement_record(_param(torch.randn(16, 8), mesh, Replicate())), _rec([2, 0, 0, 1]))
    check_saved_placement(_rec([2, 1, 1, 1]), p, ["exp_avg"], "here", "drop")  # the same: passes
    with pytest.raises(ValueError, match=r"here: .* sharded as \(Shard\(dim=1\),\) over a mesh of shape \(1,\), but"
                                         r" it is sharded as \(Shard\(dim=1\),\) over a mesh of shape \(2,\) now"):
        check_saved_placement(_rec([1, 1, 1, 1]), p, ["exp_avg"], "here", "drop")  # another mesh
    # one process's Shard(0) (the whole parameter) into a replicated one (the whole parameter on each rank): the same
    check_saved_placement(_rec([1, 1, 0, 1]), _param(torch.randn(16, 8), mesh, Replicate()), [], "here", "d")
    # HSDP's (Replicate(), Shard(1)) over (2, 2): shard i holds the same piece as under (Shard(1),) over (2,) (a
    # replicated mesh dimension copies the pieces: tests/test_hsdp_reshard.py loads one onto the other)
    check_saved_placement(_rec([2, 0, 0, 1], [2, 1, 1, 1]), p, ["exp_avg"], "here", "drop")
    with pytest.raises(ValueError, match=r"sharded as \(Replicate\(\), Shard\(dim=0\)\) over a mesh of shape \(2, 2\)"):
        check_saved_placement(_rec([2, 0, 0, 1], [2, 1, 0, 1]), p, ["exp_avg"], "here", "drop")
    with pytest.raises(ValueError, match=re.escape(f"here: the loaded '{PLACEMENT_KEY}' is str")):
        check_saved_placement("(Shard(dim=0),)", p, [], "here", "drop")


@pytest.mark.parametrize("flatten", [False, True])
def test_the_record_round_trips_through_torch_distributed_checkpoint(one_process, tmp_path, flatten):
    """get_optimizer_state_dict and dcp.save / dcp.load carry the record (flatten_optimizer_state_dict takes tensors,
    ints, floats and dicts only): the target's own record is replaced by the checkpoint's; set_optimizer_state_dict
    passes it to load_state_dict unless flattened."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    m, opt = _model_opt(one_process, 1)
    dcp.save({"optim": get_optimizer_state_dict(m, opt, options=options)}, checkpoint_id=tmp_path / "ckpt")
    m2, opt2 = _model_opt(one_process, 2)
    target = get_optimizer_state_dict(m2, opt2, options=options)
    rec = target["state.weight." + PLACEMENT_KEY] if flatten else target["state"]["weight"][PLACEMENT_KEY]
    assert torch.equal(rec, _rec([1, 1, 0, 1]))
    rec.copy_(_rec([1, 1, 1, 1]))  # (a target's own record: the checkpoint's replaces it)
    dcp.load({"optim": target}, checkpoint_id=tmp_path / "ckpt")
    assert torch.equal(rec, _rec([1, 1, 0, 1]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_optimizer_state_dict(m2, opt2, target, options=options)
    said = [str(c.message) for c in caught if PLACEMENT_KEY in str(c.message)]
    # flattened, torch's set_optimizer_state_dict passes on only the entries the optimizer's state holds: the
    # record does not reach load_state_dict, which says so (unchecked, as an older checkpoint)
    assert len(said) == (1 if flatten else 0) and all("of 1 sharded parameter(s)" in m for m in said), said
    w = m2.weight
    assert PLACEMENT_KEY not in opt2.state[w]
    assert all(torch.equal(opt2.state[w][k], v) for k, v in opt.state[m.weight].items())
    if not flatten:  # a record of other placements refuses; the rest loads without the parameter's state
        rec.copy_(_rec([2, 1, 0, 1]))
        with pytest.raises(ValueError, match=r"mesh of shape \(2,\), but it is sharded as \(Shard\(dim=0\),\) over a"
                                             r" mesh of shape \(1,\) now.*remove state_dict\['state'\]\['weight'\]"):
            set_optimizer_state_dict(m2, opt2, target, options=options)
        del target["state"]["weight"]  # (what the message says; set_optimizer_state_dict needs strict=False then)
        set_optimizer_state_dict(m2, opt2, target, options=StateDictOptions(strict=False))
        assert w not in opt2.state  # (made at its next step)


@pytest.fixture
def one_process(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _model_opt(mesh, seed):
    from torch.distributed.tensor import Shard, distribute_tensor

    m = nn.Linear(8, 16, bias=False)
    m.weight = nn.Parameter(distribute_tensor(torch.randn(16, 8), mesh, [Shard(0)]))
    opt = create_optimizer(m.parameters(), "adamw8bit", lr=1e-2, min_quant_size=1, block_size=64)
    g = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed))
    m.weight.grad = distribute_tensor(g, mesh, [Shard(0)])
    opt.step()
    return m, opt


def test_an_older_dcp_checkpoint_is_refused_by_dcp_and_loads_warned_without_the_targets_record(one_process, tmp_path):
    """A DCP checkpoint saved before the record: dcp.load refuses it (the target has the entry: "Missing key"); with
    the entries removed from the target it loads, warned; with allow_partial_load the target keeps its own record
    (loaded, not checked: docs/distributed.md)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    m, opt = _model_opt(one_process, 1)
    old = get_optimizer_state_dict(m, opt)
    del old["state"]["weight"][PLACEMENT_KEY]  # (what a checkpoint saved before the record holds)
    dcp.save({"optim": old}, checkpoint_id=tmp_path / "old")
    m2, opt2 = _model_opt(one_process, 2)
    target = {"optim": get_optimizer_state_dict(m2, opt2)}
    missing = f"Missing key in checkpoint state_dict: optim.state.weight.{PLACEMENT_KEY}"
    with pytest.raises(CheckpointException, match=missing):
        dcp.load(target, checkpoint_id=tmp_path / "old")
    for s in target["optim"]["state"].values():
        s.pop(PLACEMENT_KEY, None)  # (docs/distributed.md: to load it unchecked)
    dcp.load(target, checkpoint_id=tmp_path / "old")
    with pytest.warns(UserWarning, match=r"of 1 sharded parameter\(s\) was loaded from a checkpoint that does not"):
        set_optimizer_state_dict(m2, opt2, target["optim"])
    assert all(torch.equal(opt2.state[m2.weight][k], v) for k, v in opt.state[m.weight].items())
    m3, opt3 = _model_opt(one_process, 3)
    target = {"optim": get_optimizer_state_dict(m3, opt3)}
    dcp.load(target, checkpoint_id=tmp_path / "old", planner=DefaultLoadPlanner(allow_partial_load=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_optimizer_state_dict(m3, opt3, target["optim"])  # (its own record: passes, unwarned)


def test_a_full_state_dict_carries_the_record_to_load_state_dict(one_process, tmp_path):
    """get_optimizer_state_dict(full_state_dict=True) -> torch.save / torch.load(weights_only=True) ->
    set_optimizer_state_dict: the checkpoint's record reaches load_state_dict (one written as if saved on a mesh of
    two is refused)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True)
    m, opt = _model_opt(one_process, 1)
    sd = get_optimizer_state_dict(m, opt, options=full)
    assert torch.equal(sd["state"]["weight"][PLACEMENT_KEY], _rec([1, 1, 0, 1]))
    torch.save(sd, tmp_path / "full.pt")
    m2, opt2 = _model_opt(one_process, 2)
    set_optimizer_state_dict(m2, opt2, torch.load(tmp_path / "full.pt", weights_only=True), options=full)
    assert all(torch.equal(opt2.state[m2.weight][k], v) for k, v in opt.state[m.weight].items())
    sd["state"]["weight"][PLACEMENT_KEY] = _rec([2, 1, 0, 1])
    with pytest.raises(ValueError, match=r"sharded as \(Shard\(dim=0\),\) over a mesh of shape \(2,\), but it is"
                                         r" sharded as \(Shard\(dim=0\),\) over a mesh of shape \(1,\) now.*"
                                         r"remove state_dict\['state'\]\['weight'\] before loading"):
        set_optimizer_state_dict(m2, opt2, sd, options=full)
    # a full state dict without the record (older): the target's own record stays (docs/distributed.md: unwarned)
    del sd["state"]["weight"][PLACEMENT_KEY]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_optimizer_state_dict(m2, opt2, sd, options=full)
    assert all(torch.equal(opt2.state[m2.weight][k], v) for k, v in opt.state[m.weight].items())
