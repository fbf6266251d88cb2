"""DISTFIX: MemoryCallback under FSDP2 (DTensor parameters, gradients and optimizer state) counts the local shards
through a tracked step (FOUND_DIST18 4: live_bytes crashed on a DTensor's storage)."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn


def test_memory_callback_tracked_fsdp2_step_counts_local_gradients_and_state(tmp_path):
    from torch.distributed.fsdp import fully_shard

    from lowmem.trainers.memory_callback import MemoryCallback

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters())
        cb, state = MemoryCallback(track_steps=1), SimpleNamespace(global_step=0)
        cb.on_step_begin(None, state, None, model=model, optimizer=opt)
        model(torch.randn(4, 8)).sum().backward()
        cb.on_pre_optimizer_step(None, state, None, model=model)
        opt.step()
        cb.on_step_end(None, state, None, model=model, optimizer=opt)
        n = 2 * (8 * 8 + 8)
        assert cb.peak["weights"] == n * 4
        assert cb.peak["gradients"] == n * 4
        assert cb.peak["optimizer_states"] == 2 * n * 4 + 4 * 4  # exp_avg, exp_avg_sq; a float32 step per parameter
        assert cb.peak["peak"] >= cb.peak["weights"] + cb.peak["gradients"]
    finally:
        dist.destroy_process_group()


def test_live_bytes_counts_torchao_quantized_state_through_its_inner_tensors():
    """torchao's OptimState8bit wraps codes, scales and a quantization map and has no storage of its own (the same
    "invalid python storage" as a DTensor): MemoryCallback's optimizer_states counts what it wraps, exactly. One
    256 x 256 float32 parameter, blocks of 128: uint8 codes 2 x 65,536, float32 scales 2 x 512 x 4, the signed and
    the unsigned 256-entry maps (float32), a float32 step."""
    pytest.importorskip("torchao")
    from torchao.optim import AdamW8bit

    from lowmem.memory.measure import live_bytes

    p = nn.Parameter(torch.randn(256, 256))
    p.grad = torch.randn(256, 256)
    opt = AdamW8bit([p], block_size=128)
    # the state as the optimizer's first step makes it (its _new_buffer), without the step (torchao compiles it)
    state = opt.state[p]
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        state[name] = opt._new_buffer(p, signed)
    state["step"] = torch.tensor(0.0)
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    assert type(state["exp_avg"]).__name__ == "OptimState8bit"
    assert live_bytes(tensors) == 2 * 65536 + 2 * 512 * 4 + 2 * 256 * 4 + 4


class _Opaque(torch.Tensor):
    """A wrapper subclass that holds no storage and does not say what it wraps (no __tensor_flatten__)."""

    @staticmethod
    def __new__(cls, like):
        return torch.Tensor._make_wrapper_subclass(cls, like.shape, dtype=like.dtype, device=like.device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_live_bytes_leaves_out_an_opaque_wrapper_with_a_warning_naming_it():
    """Counted what it can (the plain tensor), said what it left out; no crash."""
    from lowmem.memory.measure import live_bytes

    with pytest.warns(UserWarning, match=r"_Opaque .* left out of the count"):
        assert live_bytes([_Opaque(torch.zeros(8)), torch.zeros(4)]) == 16
