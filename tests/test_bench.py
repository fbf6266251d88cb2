"""`lowmem bench`: side-by-side measurement in one run (a benchmark; here only its correctness)."""

from __future__ import annotations

import json
import math

import pytest

from lowmem.bench import BASELINE, BenchResult, round_slices, run_bench, spread_warning, step_time_ratios, summarize_ratios
from lowmem.cli import main


def test_bench_rows_are_comparable():
    results = run_bench(["adamw", "adafactor"], steps=8, batch_size=4, progress=False, repeats=3)
    assert [r.optimizer for r in results] == [BASELINE, "adamw", "adafactor"]
    base, ours, ada = results
    # same weights, same batches, same math: lowmem's AdamW reproduces torch's losses
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(ours.losses, base.losses))
    assert base.step_time_ratio == 1.0 and ours.step_time_ratio > 0
    assert base.ratio_spread == 0.0 and len(ours.round_ratios) == 3
    assert ours.ratio_min <= ours.step_time_ratio <= ours.ratio_max
    assert 8.0 <= base.bytes_per_param < 8.01  # two float32 moments (+ 4-byte step counters)
    assert ada.bytes_per_param < 1.0  # factored second moment
    assert ada.hparams["relative_step"] is False  # one external lr for every optimizer


def test_bench_cli_writes_json_and_markdown(tmp_path):
    rc = main(["bench", "adamw", "--steps", "8", "--repeats", "3", "--threads", "1", "--batch-size", "4",
               "--output-dir", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert [r["optimizer"] for r in payload["results"]] == [BASELINE, "adamw"]
    meta = payload["meta"]
    assert meta["threads"] == 1 and meta["repeats"] == 3 and "warning" in meta and meta["spread_limit"] == 0.10
    assert all(len(r["round_ratios"]) == 3 for r in payload["results"])
    md = (tmp_path / "bench.md").read_text()
    assert "| adamw |" in md and "1 CPU thread(s)" in md and "3 rounds" in md
    assert f"run_id {meta['run_id']}" in md  # the two files are one pair
    assert not list(tmp_path.glob(".*.tmp"))


def test_bench_too_few_steps_for_the_rounds_is_a_clear_error(capsys):
    assert main(["bench", "adamw", "--steps", "6", "--repeats", "5"]) == 2
    assert "repeats" in capsys.readouterr().err


def test_rounds_ratios_and_spread():
    """Round r's ratio compares the two optimizers on the same steps; the spread is (max - min) / median."""
    rounds = round_slices(10, 3)
    assert [(r.start, r.stop) for r in rounds] == [(0, 3), (3, 7), (7, 10)]
    base = [1.0] * 3 + [2.0] * 4 + [1.0] * 3  # the machine got busy in round 2: both got slower
    other = [1.5] * 3 + [3.0] * 4 + [1.5] * 3
    assert step_time_ratios(other, base, rounds) == [1.5, 1.5, 1.5]  # interleaving cancels the load
    s = summarize_ratios([1.0, 1.2, 1.1, 0.9, 1.0])
    assert s["step_time_ratio"] == 1.0 and s["ratio_min"] == 0.9 and s["ratio_max"] == 1.2
    assert s["ratio_spread"] == pytest.approx(0.3)


def _row(name, spread):
    return BenchResult(name, {}, 1, 8, 8.0, 1e-3, step_time_ratio=1.0, ratio_spread=spread)


def test_spread_warning_names_the_rows_that_cannot_be_ranked(capsys):
    assert spread_warning([_row(BASELINE, 0.0), _row("adamw", 0.05)]) is None
    w = spread_warning([_row(BASELINE, 0.0), _row("adamw", 0.05), _row("microadam", 0.4)])
    assert "microadam (40%)" in w and "adamw (" not in w and "cannot be ranked" in w
    assert "microadam" in spread_warning([_row("microadam", float("nan"))])  # NaN is not "small"
    from lowmem.bench import print_table, to_markdown

    rows = [_row(BASELINE, 0.0), _row("microadam", 0.4)]
    print_table(rows, {"threads": 1, "repeats": 5})
    out = capsys.readouterr().out
    assert "40%" in out and "cannot be ranked" in out and "1 CPU thread(s)" in out
    assert "cannot be ranked" in to_markdown(rows, meta={"warning": w})


def test_bench_unknown_optimizer_is_a_clear_error(capsys):
    assert main(["bench", "no_such_optim", "--steps", "2"]) == 2
    assert "valid:" in capsys.readouterr().err


def test_bench_on_a_local_model_directory(tiny_model_path):
    """`lowmem bench --model DIR`: any local causal-LM directory, loaded offline."""
    results = run_bench(["galore_adamw"], steps=4, batch_size=4, model_path=tiny_model_path, progress=False, rank=8,
                        warmup=1, repeats=1)
    assert [r.optimizer for r in results] == [BASELINE, "galore_adamw"]
    assert results[1].hparams["rank"] == 8 and results[1].bytes_per_param < results[0].bytes_per_param
    assert all(math.isfinite(r.eval_loss) for r in results)


def test_bench_variants_are_rows_of_their_own():
    """`NAME:key=value,...` benches one optimizer at another setting, side by side in the same run."""
    results = run_bench(["microadam", "microadam:k_init=0.05,m=2"], steps=4, batch_size=4, progress=False, warmup=1,
                        repeats=1)
    assert [r.optimizer for r in results] == [BASELINE, "microadam", "microadam:k_init=0.05,m=2"]
    default, variant = results[1].hparams, results[2].hparams
    assert "k_init" not in default and variant["k_init"] == 0.05 and variant["m"] == 2
    # same state bytes by construction: m * density is 0.1 in both
    assert abs(results[1].bytes_per_param - results[2].bytes_per_param) < 0.05
    assert results[1].losses != results[2].losses


def test_bench_variant_with_unknown_hyperparameter_is_a_clear_error(capsys):
    assert main(["bench", "microadam:densty=0.05", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "densty" in err and "k_init" in err


def test_interleaved_contenders_do_not_disturb_each_other(tmp_path):
    """Each contender has its own model copy and random stream: its losses are those of a run on its own,
    even with dropout drawing from the global generator between the contenders' steps."""
    from lowmem.kit import build_tiny_model

    model, tok = build_tiny_model(seed=0)
    model.config.attention_dropout = 0.3
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    kw = dict(steps=4, batch_size=4, progress=False, warmup=1, repeats=1, model_path=str(tmp_path))
    alone = run_bench(["osd_adamw"], **kw)[1]
    crowd = run_bench(["adafactor", "osd_adamw", "frugal"], **kw)
    assert crowd[2].optimizer == "osd_adamw" and crowd[2].losses == alone.losses
