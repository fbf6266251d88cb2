"""SMALLS21 2: the engine's replicated (whole-tensor) state of an FSDP2-sharded, unprojected parameter
(``moment.replicated_state``: SM3's column accumulators, RACS's column scale...) goes into the state dict contiguous,
as ``projected_state_to_dtensor``'s replicated entries do (AUDDIST21 4): accelerate's FULL_STATE_DICT load broadcasts
rank 0's tensor into a contiguous buffer on the other ranks, so a non-contiguous entry would arrive there in another
element order. One gloo process (world size 1), no spawn."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from lowmem.optim import create_optimizer


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


@pytest.mark.parametrize("name,key", [("sm3", "acc_1"), ("racs", "col_scale")])
def test_a_non_contiguous_replicated_state_entry_is_saved_contiguous_and_equal(one_process, name, key):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    m = nn.Linear(8, 16, bias=False)
    m.weight = nn.Parameter(distribute_tensor(torch.randn(16, 8), one_process, [Shard(0)]))
    opt = create_optimizer(m.parameters(), name, lr=1e-2)
    m.weight.grad = distribute_tensor(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), one_process,
                                      [Shard(0)])
    opt.step()
    st = opt.state[m.weight]
    assert opt.recipe.moment.replicated_state(key, opt.param_groups[0]) and key in st
    v = st[key]
    strided = torch.empty(v.shape[0], 2, dtype=v.dtype)[:, 0]  # the same values, every other element of a buffer
    strided.copy_(v)
    assert not strided.is_contiguous()
    st[key] = strided
    saved = opt.state_dict()["state"][0][key]
    assert not isinstance(saved, DTensor)  # (replicated: saved plain, once)
    assert saved.is_contiguous()
    assert torch.equal(saved, v)
    # what a broadcast into a contiguous buffer of the saved shape receives: the same numbers in the same order
    received = torch.empty_like(saved, memory_format=torch.contiguous_format)
    received.view(-1).copy_(torch.as_strided(saved, (saved.numel(),), (1,), saved.storage_offset()))
    assert torch.equal(received, v)
