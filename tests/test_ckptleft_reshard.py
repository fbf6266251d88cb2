"""A sharded (FSDP2 ``DTensor``) parameter re-sharded at the same global shape after its state was made
(``Shard(0)`` -> ``Shard(1)`` or ``Replicate()``, ``fully_shard`` applied again): its state is that of another piece of
it. The step refuses it before anything is stepped, naming the parameter and both placements (it failed inside a
kernel, "The size of tensor a (8) must match the size of tensor b (4)", or stepped on with another piece's state
where the local shapes agree); ``group_layout.check_state_fits`` (for ``state_dict()``) refuses it without a
gradient. One process of a two-process "fake" group (torch's test backend: collectives do nothing, the shards are
those of rank 0 of two)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lowmem.optim import create_optimizer
from lowmem.optim.group_layout import check_state_fits


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


def _placed(w, mesh, placement):
    from torch.distributed.tensor import distribute_tensor

    return nn.Parameter(distribute_tensor(w, mesh, [placement]))


def _grad(p, seed):
    from torch.distributed.tensor import distribute_tensor

    p.grad = distribute_tensor(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)), p.device_mesh,
                               p.placements)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
@pytest.mark.parametrize("to", ["Shard(1)", "Replicate()"])
def test_a_re_sharded_parameter_with_state_is_refused_naming_both_placements(mesh, name, to):
    from torch.distributed.tensor import Replicate, Shard

    w = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    a, b = _placed(w, mesh, Shard(0)), _placed(w.clone(), mesh, Shard(0))
    opt = create_optimizer([a, b], name, lr=1e-2)
    for t in range(2):
        _grad(a, t), _grad(b, 10 + t)
        opt.step()
    check_state_fits(opt)  # (nothing re-sharded: passes)
    torch.utils.swap_tensors(b, _placed(w.clone(), mesh, eval(to)))  # the same object, now another piece of w
    assert tuple(b.shape) == (8, 6) and b.placements == (eval(to),)
    before = [p.to_local().clone() for p in (a, b)]
    placed = re.escape(repr((eval(to),)))
    msg = (rf"parameter 1 of parameter group 0 of shape \(8, 6\) is sharded as {placed} "
           r".*but its state was made for \(Shard\(dim=0\),\) .*re-sharded after its state was made")
    with pytest.raises(ValueError, match=msg):
        check_state_fits(opt)  # (no gradient needed)
    _grad(a, 5), _grad(b, 6)
    with pytest.raises(ValueError, match=msg + r".*Nothing was stepped"):
        opt.step()
    assert all(torch.equal(p.to_local(), q) for p, q in zip((a, b), before))  # nothing stepped
    opt.state.pop(b)  # (what the message says): its state made for the new piece
    opt.step()
    assert opt.state[b]["step"].item() == 1 and opt.state[a]["step"].item() == 3
