"""``lowmem bench --shapes/--launches qwen3-moe-layer[-small]``: one Qwen3-30B-A3B decoder layer, its fused experts
batches of matrices (3-D parameters), so the batched step of racs / adamw_sn / adagrad_sn shows in one command."""

from __future__ import annotations

import pytest
import torch

from lowmem import bench_shapes
from lowmem.bench_launches import audit, build_meta_model
from lowmem.bench_shapes import MOE_SETS, QWEN3_MOE, run_shapes_bench, set_shapes
from lowmem.cli import main


@pytest.mark.parametrize("name", list(MOE_SETS))
def test_the_set_is_transformers_qwen3_moe_layer(name):
    """Names and shapes equal transformers' Qwen3MoeDecoderLayer with the checkpoint's head_dim (128; the config's
    default None means hidden / heads = 64), built on meta; the launches model allocates nothing."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

    cfg = Qwen3MoeConfig(head_dim=QWEN3_MOE["head_dim"], num_experts=MOE_SETS[name])
    assert all(getattr(cfg, k) == v for k, v in QWEN3_MOE.items())  # (the other defaults are the checkpoint's)
    with torch.device("meta"):
        ref = {n: tuple(p.shape) for n, p in Qwen3MoeDecoderLayer(cfg, 0).named_parameters()}
    assert set_shapes(name) == ref
    model = build_meta_model(name)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == ref
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_timing_the_full_layer_is_refused_naming_the_small_set(monkeypatch, capsys):
    def no_build(name):
        raise AssertionError("the set was built before the refusal")

    monkeypatch.setattr(bench_shapes, "build_set", no_build)
    with pytest.raises(ValueError, match="qwen3-moe-layer-small"):
        run_shapes_bench(["adamw"], "qwen3-moe-layer", repeats=1)
    assert main(["bench", "--shapes", "qwen3-moe-layer", "adamw", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--launches" in err and "qwen3-moe-layer-small" in err


def test_the_experts_are_stepped_as_batches_on_the_launch_path():
    """With whole tensors (chunk_numel=None) adamw_sn's kernels a step do not grow with the number of experts (each
    fused tensor is one batched step); with the default chunk the 128 experts take blocks of whole matrices, more
    kernels than 16 but far fewer than a step per matrix (foreach=False)."""
    small = audit("adamw_sn", "qwen3-moe-layer-small", host_steps=0)
    full = audit("adamw_sn", "qwen3-moe-layer", host_steps=0)
    per_matrix = audit("adamw_sn:foreach=false", "qwen3-moe-layer-small", host_steps=0)
    assert small.skipped is None and full.skipped is None
    assert full.steady_whole.kernels == small.steady_whole.kernels
    assert small.steady_default.kernels < full.steady_default.kernels
    assert 3 * small.steady_default.kernels < per_matrix.steady_default.kernels
    assert full.steady_default.syncs == 1


@pytest.mark.slow
def test_the_small_set_times_on_the_cpu():
    results, meta = run_shapes_bench(["adamw_sn"], "qwen3-moe-layer-small", repeats=1, threads=1, progress=False)
    assert meta["params"] == sum(torch.Size(s).numel() for s in set_shapes("qwen3-moe-layer-small").values())
    assert [r.optimizer for r in results] == ["torch_adamw", "adamw_sn"] and results[1].step_time_s > 0
