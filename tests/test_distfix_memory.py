"""DISTFIX: MemoryCallback under FSDP2 (DTensor parameters, gradients and optimizer state) counts the local shards
through a tracked step (FOUND_DIST18 4: live_bytes crashed on a DTensor's storage)."""

from types import SimpleNamespace

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
