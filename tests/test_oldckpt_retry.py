"""A torch.distributed.checkpoint of per-shard state saved before lowmem recorded its placements (no
``shard_placement`` entry: docs/distributed.md, "Re-sharded parameters") still loads: DCP refuses it ("Missing key in
checkpoint state_dict: ...shard_placement") since the target has the entry, and the load is made again from a target
without the records (``sharded.without_placement_record``), unchecked, with ``load_state_dict``'s one warning. Which
DCP failures make that retry (``sharded.only_placement_missing``: these missing keys only) and the plain path
(``sharded.load_optimizer_dcp``) on one gloo process; the Trainer's resume: tests/test_oldckpt_trainer_resume.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lowmem.optim import create_optimizer
from lowmem.optim.sharded import PLACEMENT_KEY, load_optimizer_dcp, only_placement_missing, without_placement_record

pytestmark = pytest.mark.distributed

MISSING = "Missing key in checkpoint state_dict: "
UNCHECKED = r"of 1 sharded parameter\(s\) was loaded from a checkpoint that does not record the placements"


def _failure(*excs):
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException("load", {rank: (e, None) for rank, e in enumerate(excs)})


@pytest.mark.parametrize("excs, retried", [
    # what DCP raises for an older checkpoint: the first missing key of each rank, the record
    ((RuntimeError(f"{MISSING}optimizer.state.model.layers.0.mlp.up_proj.weight.{PLACEMENT_KEY}."),), True),
    ((RuntimeError(f"{MISSING}optim.state.weight.{PLACEMENT_KEY}."),
      RuntimeError(f"{MISSING}optim.state.bias.{PLACEMENT_KEY}.")), True),
    # another entry missing (on one rank): not an older checkpoint, raised as it is
    ((RuntimeError(f"{MISSING}optim.state.weight.{PLACEMENT_KEY}."),
      RuntimeError(f"{MISSING}optim.state.weight.exp_avg_codes.")), False),
    ((RuntimeError(f"{MISSING}optim.state.weight.exp_avg."),), False),
    ((RuntimeError(f"{MISSING}optim.state.weight.{PLACEMENT_KEY}_other."),), False),
    ((RuntimeError(f"{MISSING}optim.state.weight.not_{PLACEMENT_KEY}."),), False),
    # the record there, of another size (another lowmem's), or another kind of failure with the same text
    ((RuntimeError(f"Size mismatch between saved torch.Size([4, 4]) and current: torch.Size([8, 4]) for "
                   f"optim.state.weight.{PLACEMENT_KEY}"),), False),
    ((ValueError(f"{MISSING}optim.state.weight.{PLACEMENT_KEY}."),), False),
    ((), False),
])
def test_only_missing_placement_records_make_the_retry(excs, retried):
    assert only_placement_missing(_failure(*excs)) is retried


def test_not_a_checkpoint_exception_is_no_retry():
    assert not only_placement_missing(RuntimeError(f"{MISSING}optim.state.weight.{PLACEMENT_KEY}."))


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


def _model_opt(mesh, seed, name="adamw8bit"):
    from torch.distributed.tensor import Shard, distribute_tensor

    m = nn.Linear(8, 16, bias=False)
    m.weight = nn.Parameter(distribute_tensor(torch.randn(16, 8), mesh, [Shard(0)]))
    hp = {"min_quant_size": 1, "block_size": 64} if name == "adamw8bit" else {}
    opt = create_optimizer(m.parameters(), name, lr=1e-2, **hp)
    g = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed))
    m.weight.grad = distribute_tensor(g, mesh, [Shard(0)])
    opt.step()
    return m, opt


def _save(m, opt, path, drop=(PLACEMENT_KEY,)):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(m, opt)
    assert PLACEMENT_KEY in osd["state"]["weight"]  # (what lowmem writes now)
    for k in drop:
        del osd["state"]["weight"][k]  # (a checkpoint saved before the record holds no PLACEMENT_KEY)
    dcp.save({"optimizer": osd}, checkpoint_id=path)


@pytest.mark.parametrize("name", ["adamw8bit", "microadam"])
def test_load_optimizer_dcp_loads_an_older_checkpoint_warned_once(one_process, tmp_path, name):
    m, opt = _model_opt(one_process, 1, name)
    _save(m, opt, tmp_path / "old")
    m2, opt2 = _model_opt(one_process, 2, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_optimizer_dcp(m2, opt2, tmp_path / "old")
    said = [str(c.message) for c in caught if PLACEMENT_KEY in str(c.message)]
    assert len(said) == 1 and "loaded unchecked" in said[0] and "Save a new checkpoint" in said[0], said
    assert sorted(opt2.state[m2.weight]) == sorted(opt.state[m.weight])
    assert all(torch.equal(opt2.state[m2.weight][k], v) for k, v in opt.state[m.weight].items())
    assert "state_dict" not in vars(opt2)  # (the method is back)
    assert PLACEMENT_KEY in opt2.state_dict()["state"][0]


def test_load_optimizer_dcp_of_a_new_checkpoint_is_checked_and_not_warned(one_process, tmp_path):
    m, opt = _model_opt(one_process, 1)
    _save(m, opt, tmp_path / "new", drop=())
    m2, opt2 = _model_opt(one_process, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_optimizer_dcp(m2, opt2, tmp_path / "new")
    assert all(torch.equal(opt2.state[m2.weight][k], v) for k, v in opt.state[m.weight].items())


def test_load_optimizer_dcp_raises_another_missing_entry(one_process, tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    m, opt = _model_opt(one_process, 1)
    codes = next(k for k in opt.state[m.weight] if k != "step")
    _save(m, opt, tmp_path / "lost", drop=(codes, PLACEMENT_KEY))
    m2, opt2 = _model_opt(one_process, 2)
    before = {k: v.clone() for k, v in opt2.state[m2.weight].items()}
    with pytest.raises(CheckpointException, match=f"{MISSING}optimizer.state.weight.{codes}"):
        load_optimizer_dcp(m2, opt2, tmp_path / "lost")
    assert all(torch.equal(opt2.state[m2.weight][k], v) for k, v in before.items())  # nothing loaded
    assert "state_dict" not in vars(opt2)


def test_without_placement_record_leaves_out_the_record_in_the_block_only(one_process):
    m, opt = _model_opt(one_process, 1)
    with without_placement_record(opt):
        assert PLACEMENT_KEY not in opt.state_dict()["state"][0]
        with pytest.raises(RuntimeError, match="already replaced"):
            without_placement_record(opt).__enter__()
    assert PLACEMENT_KEY in opt.state_dict()["state"][0]
