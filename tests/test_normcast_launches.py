"""``lowmem bench --launches --dtype bfloat16``: the launch audit on bfloat16 weights (lowmem/bench_launches.py), and
the first step's kernels beside the steady one's. On 48 bfloat16 tensors a steady Lion step launches fewer
kernels than there are tensors (the non-finite check casts its norms once per dtype, not once per tensor)."""

from __future__ import annotations

import json

import pytest

from lowmem import bench_launches as BL
from lowmem.cli import build_parser


def test_bfloat16_rows_count_the_bfloat16_step():
    rows, meta = BL.run_launches(["lion"], "small-batched", progress=False, host_steps=0, dtype="bfloat16")
    assert meta["dtype"] == "bfloat16" and meta["tensors"] == 48
    for r in rows:
        assert r.steady_default.syncs == 1
        assert 0 < r.steady_default.kernels < meta["tensors"], r  # (was 96 casts more: one per norm)
        assert r.first_default.kernels > r.steady_default.kernels and r.first_whole is not None
    md = BL.to_markdown(rows, meta)
    assert "48 tensors of bfloat16" in md and "first kernels (default / whole)" in md


def test_the_model_takes_the_dtype_and_an_unsupported_one_is_refused():
    import torch

    assert {p.dtype for p in BL.build_meta_model("small-tensors", "bfloat16").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in BL.build_meta_model("small-tensors").parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="valid: float32, bfloat16"):
        BL.run_launches(["adamw"], "small-tensors", progress=False, host_steps=0, dtype="float16")


def test_main_writes_the_dtype(tmp_path):
    args = build_parser().parse_args(["bench", "--launches", "adamw", "--shapes", "small-tensors", "--dtype", "bfloat16",
                                      "--output-dir", str(tmp_path)])
    assert args.dtype == "bfloat16" and args.launches
    assert BL.main(args, ["adamw"]) == 0  # (lowmem.bench dispatches --launches here)
    payload = json.loads((tmp_path / "bench_launches.json").read_text())
    assert payload["meta"]["dtype"] == "bfloat16" and payload["results"][0]["first_default"]["kernels"] > 0
    assert "### lowmem bench --launches --shapes small-tensors --dtype bfloat16" in (tmp_path / "bench_launches.md").read_text()
