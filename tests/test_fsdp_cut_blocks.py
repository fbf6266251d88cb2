"""lowmem.optim.sharded.cut_blocks / warn_cut_blocks: under FSDP2 block-wise statistics (quantization blocks,
MicroAdam's top-k and error-quantization blocks) are per shard; when the shards cut the unsharded blocks the
step is valid but not one process's, and a warning says so once (measured through the Trainer: MicroAdam at its
defaults on the tiny Llama, 4096-element weights in 2048-element shards, 2.0e-2 from one process; with blocks of
32, 0.0). No processes needed: the parameter's placement is all the check reads."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor.placement_types import Shard

from lowmem.optim import create_optimizer, get_entry
from lowmem.optim.sharded import _CUT_WARNED, cut_blocks, warn_cut_blocks


class _Mesh:
    def __init__(self, n):
        self.n = n

    def size(self, dim=0):
        return self.n


class _Sharded:
    """What cut_blocks reads of a DTensor sharded by rows over ``ranks``."""

    def __init__(self, *shape, ranks=2):
        self.shape, self.ndim = torch.Size(shape), len(shape)
        self.placements, self.device_mesh = (Shard(0),), _Mesh(ranks)

    def numel(self):
        return self.shape.numel()


def _group(name, **hp):
    opt = create_optimizer(torch.nn.Linear(4, 4, bias=False), name, **hp)
    return get_entry(name).recipe, opt.param_groups[0]


def test_cut_blocks():
    recipe, group = _group("microadam")  # top-k blocks of 4096, error blocks of 2048
    assert "top-k blocks of 4096" in cut_blocks(recipe, group, _Sharded(64, 64))  # 2 shards of 2048: one block each
    assert cut_blocks(recipe, group, _Sharded(4096, 64)) is None  # shards of 131072: whole blocks
    assert cut_blocks(recipe, group, _Sharded(64, 64, ranks=1)) is None
    recipe, group = _group("microadam", topk_block_size=32, quant_block_size=32)
    assert cut_blocks(recipe, group, _Sharded(64, 64)) is None and cut_blocks(recipe, group, _Sharded(64)) is None
    assert "error-quantization blocks of 32" in cut_blocks(recipe, group, _Sharded(30))  # 15-element shards
    recipe, group = _group("adamw8bit", block_size=64, min_quant_size=128)
    assert cut_blocks(recipe, group, _Sharded(80, 64)) is None  # 2560 elements a shard
    assert "quantization blocks of 64" in cut_blocks(recipe, group, _Sharded(30, 10))  # 150
    assert cut_blocks(recipe, group, _Sharded(10, 10)) is None  # 100 < min_quant_size: float32 moments
    recipe, group = _group("adamw")
    assert cut_blocks(recipe, group, _Sharded(30, 10)) is None


def test_warned_once_per_shape():
    recipe, group = _group("microadam")
    _CUT_WARNED.clear()
    with pytest.warns(UserWarning, match=r"shape \(64, 64\) under FSDP2: MicroAdam's top-k blocks") as rec:
        for _ in range(3):
            warn_cut_blocks(recipe, group, _Sharded(64, 64), "optimizer 'microadam'")
    assert len([w for w in rec if "FSDP2" in str(w.message)]) == 1
