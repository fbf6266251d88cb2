"""The step's transient memory: the chunked step equals the whole-tensor step, its transient stays
bounded on a large tensor (peak RSS in a fresh process), and step_transient_bytes() reports it."""

from __future__ import annotations

import os

import pytest
import torch

from lowmem.optim.registry import create_optimizer

MiB = 2**20

# family -> hyperparameters that make a small tensor exercise every code path (quantized, clipped, reset)
CHUNKED = {
    "adamw": {"foreach": False},
    "adamw8bit": {"min_quant_size": 1, "block_size": 64},
    "adamw4bit": {"min_quant_size": 1, "block_size": 64},
    "adamw4bit_rank1": {"min_quant_size": 1, "block_size": 64},
    "microadam": {"m": 3, "k_init": 0.1, "topk_block_size": 64, "quant_block_size": 32},
    "spam": {"threshold": 2.0, "grad_accu_steps": 0, "reset_interval": 3, "warmup_steps": 2, "weight_decay": 0.1},
    "stable_spam": {"reset_interval": 3, "weight_decay": 0.1},
}


def _run(name: str, hparams: dict, chunk_numel: int | None, dtype=torch.float32, shape=(37, 29), steps: int = 5):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = create_optimizer([p], name, **hparams)
    opt.chunk_numel = chunk_numel
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        g = torch.randn(shape, generator=gen)
        if i % 2:
            g[0, :3] *= 100.0  # spikes, so clipping paths run
        p.grad = g.to(dtype)
        opt.step()
    return p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}


@pytest.mark.parametrize("name", sorted(CHUNKED) + ["adamw_foreach"])
def test_chunked_step_equals_whole_tensor_step(name):
    """37 x 29 = 1073 elements (odd: a half-filled last 4-bit byte) in chunks of ~128: several chunks
    and a last partial one (a partial quantization / top-k block, a partial row chunk for rank-1)."""
    hp = CHUNKED.get(name, {})
    name = name.replace("_foreach", "")
    whole_p, whole_s = _run(name, hp, None)
    chunk_p, chunk_s = _run(name, hp, 128)
    assert set(whole_s) == set(chunk_s)
    if name == "stable_spam":  # the norm of the clipped gradient is summed over chunks: rounding differs
        torch.testing.assert_close(chunk_p, whole_p, rtol=1e-6, atol=1e-7)
        for k in whole_s:
            torch.testing.assert_close(chunk_s[k], whole_s[k], rtol=1e-5, atol=1e-8)
        return
    assert torch.equal(chunk_p, whole_p)
    for k in whole_s:
        assert torch.equal(chunk_s[k], whole_s[k]), k


# subspace recipes: the combine-back scale * P.up(d_low) + residual in blocks of rows, refreshes included
PROJECTED = {
    "galore_adamw": {"rank": 4, "update_proj_gap": 2, "scale": 0.5},
    "galore_adamw_left": {"rank": 4, "update_proj_gap": 2, "proj_type": "left"},
    "galore_adamw_full": {"rank": 4, "update_proj_gap": 2, "proj_type": "full"},
    "galore_adamw_rsvd": {"rank": 4, "update_proj_gap": 2, "projection": "rsvd"},
    "fira_adamw": {"rank": 4, "update_proj_gap": 2},
    "fira_adamw_left": {"rank": 4, "update_proj_gap": 2, "proj_type": "left"},
    "frugal": {"rank": 4, "update_proj_gap": 2},
    "frugal_columns": {"rank": 4, "update_proj_gap": 2, "projection": "columns"},
    "frugal_rows": {"rank": 4, "update_proj_gap": 2, "projection": "rows"},
    "frugal_randk": {"rank": 4, "update_proj_gap": 2, "projection": "randk"},
    "osd_adamw": {"rank": 4, "proj_lr": 1e-2},
}


@pytest.mark.parametrize("label", sorted(PROJECTED))
def test_chunked_combine_back_equals_whole_tensor(label):
    name = label.replace("_left", "").replace("_full", "").replace("_rsvd", "").replace("_columns", "")
    name = name.replace("_rows", "").replace("_randk", "")
    whole_p, whole_s = _run(name, PROJECTED[label], None, steps=5)
    chunk_p, chunk_s = _run(name, PROJECTED[label], 128, steps=5)  # 4 rows of 29 per block: 10 blocks
    torch.testing.assert_close(chunk_p, whole_p, rtol=1e-5, atol=1e-6)
    for k in whole_s:
        torch.testing.assert_close(chunk_s[k], whole_s[k], rtol=1e-4, atol=1e-6)


def test_chunked_step_bf16_parameters():
    whole_p, whole_s = _run("adamw8bit", CHUNKED["adamw8bit"], None, dtype=torch.bfloat16)
    chunk_p, chunk_s = _run("adamw8bit", CHUNKED["adamw8bit"], 128, dtype=torch.bfloat16)
    assert torch.equal(chunk_p, whole_p)
    for k in whole_s:
        assert torch.equal(chunk_s[k], whole_s[k]), k


def test_chunked_step_actually_chunks(monkeypatch):
    """The chunked path visits the tensor in several pieces of whole blocks (so the equality above
    is not trivially one chunk)."""
    p = torch.nn.Parameter(torch.randn(37, 29))
    opt = create_optimizer([p], "adamw4bit", **CHUNKED["adamw4bit"])
    opt.chunk_numel = 128
    opt.materialize_state()
    bounds = opt._chunk_bounds(p, opt.param_groups[0], opt.state[p])
    assert len(bounds) == 9 and all((a % 64, b - a) == (0, 128) for a, b in bounds[:-1]) and bounds[-1] == (1024, 1073)


def test_chunk_numel_validated():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = create_optimizer([p], "adamw")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk_numel"):
            opt.chunk_numel = bad
