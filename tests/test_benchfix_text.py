"""lowmem bench --task text: a row's own ``lr=`` is the lr it trains at and the lr its table row shows;
beside ``--lr`` or ``--lr-sweep`` it is an error naming both (no silent override)."""

from __future__ import annotations

import pytest
import torch

from lowmem import bench_text
from lowmem.bench_peers import RECOMMENDED


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))


def test_variant_lr_is_the_rows_lr_and_source():
    rows, _ = bench_text.plan_entries(["lion:lr=3e-3", "lion"], peers=False, lr_sweep=False)
    by = {r.label: r for r in rows}
    own, rec = by["lion:lr=3e-3"], by["lion"]
    assert own.lr == 3e-3 and own.lr_source == "the row's variant" and "lr" not in own.variant
    assert rec.lr == RECOMMENDED["lion"].lr != 3e-3 and rec.lr_source == RECOMMENDED["lion"].source
    # what trains is what the row says
    opt, hp = bench_text.build_optimizer(own, _tiny(), rank=4)
    assert hp["lr"] == 3e-3 and {g["lr"] for g in opt.param_groups} == {3e-3}
    # the baseline takes its variant too (was: torch_adamw:... silently trained at the recommended settings)
    base = bench_text.plan_entries(["torch_adamw:lr=3e-3,weight_decay=0.0"], peers=False, lr_sweep=False)[0][-1]
    opt, hp = bench_text.build_optimizer(base, _tiny(), rank=4)
    assert base.lr == 3e-3 and {(g["lr"], g["weight_decay"]) for g in opt.param_groups} == {(3e-3, 0.0)}


def test_variant_lr_beside_sweep_or_one_lr_is_an_error():
    with pytest.raises(ValueError, match=r"lion:lr=3e-3.*--lr-sweep"):
        bench_text.plan_entries(["lion:lr=3e-3"], peers=False, lr_sweep=True)
    with pytest.raises(ValueError, match=r"lion:lr=3e-3.*--lr sets 0.01"):
        bench_text.plan_entries(["lion:lr=3e-3"], peers=False, lr_sweep=False, lr=1e-2)
    # a sweep without a variant lr still sweeps around the recommended lr
    rows, _ = bench_text.plan_entries(["lion"], peers=False, lr_sweep=True)
    assert sorted(r.lr for r in rows if r.name == "lion") == pytest.approx(
        sorted(RECOMMENDED["lion"].lr * f for f in bench_text.LR_SWEEP_FACTORS))


def test_table_shows_the_lr_that_ran(tmp_path):
    for i in range(4):
        (tmp_path / f"m{i}.py").write_text(f"x{i} = {i}\n" * 40)
    task = bench_text.TextTask(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seq_len=16,
                               batch_size=2, steps=2, warmup_steps=0, eval_sequences=2, heldout_percent=50,
                               timing_warmup=0)
    results, meta = bench_text.run_text_bench(["lion:lr=3e-3"], task=task, repeats=1, progress=False, threads=1,
                                              root=tmp_path)
    row = results[1]
    assert row.optimizer == "lion:lr=3e-3" and row.lr == 3e-3 and row.hparams["lr"] == 3e-3
    md = bench_text.to_markdown(results, meta)
    assert "| lion:lr=3e-3 | 0.003 |" in md and "lion:lr=3e-3: the row's variant" in md
