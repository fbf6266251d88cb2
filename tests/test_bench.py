"""`lowmem bench`: side-by-side measurement in one run (a benchmark; here only its correctness)."""

from __future__ import annotations

import json
import math

from lowmem.bench import BASELINE, run_bench
from lowmem.cli import main


def test_bench_rows_are_comparable():
    results = run_bench(["adamw", "adafactor"], steps=8, batch_size=4, progress=False)
    assert [r.optimizer for r in results] == [BASELINE, "adamw", "adafactor"]
    base, ours, ada = results
    # same weights, same batches, same math: lowmem's AdamW reproduces torch's losses
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(ours.losses, base.losses))
    assert base.step_time_ratio == 1.0 and ours.step_time_ratio > 0
    assert 8.0 <= base.bytes_per_param < 8.01  # two float32 moments (+ 4-byte step counters)
    assert ada.bytes_per_param < 1.0  # factored second moment
    assert ada.hparams["relative_step"] is False  # one external lr for every optimizer


def test_bench_cli_writes_json_and_markdown(tmp_path):
    rc = main(["bench", "adamw", "--steps", "6", "--batch-size", "4", "--output-dir", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert [r["optimizer"] for r in payload["results"]] == [BASELINE, "adamw"]
    assert "| adamw |" in (tmp_path / "bench.md").read_text()


def test_bench_unknown_optimizer_is_a_clear_error(capsys):
    assert main(["bench", "no_such_optim", "--steps", "2"]) == 2
    assert "valid:" in capsys.readouterr().err


def test_bench_on_a_local_model_directory(tiny_model_path):
    """`lowmem bench --model DIR`: any local causal-LM directory, loaded offline."""
    results = run_bench(["galore_adamw"], steps=4, batch_size=4, model_path=tiny_model_path, progress=False, rank=8)
    assert [r.optimizer for r in results] == [BASELINE, "galore_adamw"]
    assert results[1].hparams["rank"] == 8 and results[1].bytes_per_param < results[0].bytes_per_param
    assert all(math.isfinite(r.eval_loss) for r in results)


def test_bench_variants_are_rows_of_their_own():
    """`NAME:key=value,...` benches one optimizer at another setting, side by side in the same run."""
    results = run_bench(["microadam", "microadam:k_init=0.05,m=2"], steps=4, batch_size=4, progress=False)
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
