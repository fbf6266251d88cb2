"""``lowmem bench --dtype bfloat16``: every contender's copy of the tiny model trains in bfloat16, so round-to-nearest,
``bf16_stochastic_round`` and ``kahan_summation`` rows sit side by side; a row that cannot apply is refused before the
model is loaded, naming the row and the option (lowmem.bench.check_dtype_rows), and peer rows name the peer."""

from __future__ import annotations

import json

import pytest

import lowmem.kit
from lowmem.bench import BASELINE, check_dtype_rows, run_bench
from lowmem.cli import main


def test_bfloat16_rows_side_by_side():
    rows = ["adamw", "adamw:bf16_stochastic_round=true", "adamw:kahan_summation=true"]
    results = run_bench(rows, steps=3, batch_size=2, progress=False, repeats=1, warmup=1, dtype="bfloat16")
    assert [r.optimizer for r in results] == [BASELINE, *rows]
    base, rtn, sr, kahan = results
    n = rtn.trainable_params
    # torch's AdamW keeps bfloat16 moments of bfloat16 weights (2 x 2 B), lowmem float32 ones (2 x 4 B); Kahan adds
    # its bfloat16 compensation, 2 B per parameter
    assert 4.0 <= base.bytes_per_param < 4.01
    assert rtn.state_bytes == sr.state_bytes
    assert kahan.state_bytes - rtn.state_bytes == 2 * n
    assert all(len(r.losses) == 3 for r in results)
    assert sr.losses[0] == rtn.losses[0] and sr.losses[1:] != rtn.losses[1:]  # (same start; the write-backs differ)


def _no_model(*a, **k):
    raise AssertionError("the model was loaded before the rows were checked")


@pytest.mark.parametrize("argv, row, option", [
    (["adamw", "adamw:bf16_stochastic_round=true"], "'adamw:bf16_stochastic_round=true'", "bf16_stochastic_round"),
    (["adamw:kahan_summation=true", "--dtype", "float32"], "'adamw:kahan_summation=true'", "kahan_summation"),
    (["lion", "--optim-args", "lion:kahan_summation=true"], "'lion'", "kahan_summation"),
])
def test_rounding_option_on_float32_is_refused_naming_it(monkeypatch, capsys, argv, row, option):
    monkeypatch.setattr(lowmem.kit, "load_model_and_tokenizer", _no_model)
    assert main(["bench", *argv, "--steps", "6", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowmem: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert row in err and f"{option}=True" in err and "--dtype bfloat16" in err


def test_check_dtype_rows_accepts_what_applies():
    check_dtype_rows(["adamw:kahan_summation=true"], {"lion": {"bf16_stochastic_round": True}}, "bfloat16")
    check_dtype_rows(["adamw", "adamw:bf16_stochastic_round=false"], {}, "float32")
    check_dtype_rows(["lion"], {"adamw": {"kahan_summation": True}}, "float32")  # (not a row: unused)
    with pytest.raises(ValueError, match="--dtype must be one of float32, bfloat16, got 'float16'"):
        check_dtype_rows(["adamw"], {}, "float16")


@pytest.mark.parametrize("extra", [[]])  # (--task text / --shapes probe the peer in bfloat16: test_bench17_text_bf16)
def test_peer_rows_in_bfloat16_name_the_peer(monkeypatch, capsys, extra):
    from lowmem.bench_peers import get_peer, peer_missing

    if peer_missing(get_peer("peer:galore_torch")) is not None:
        pytest.skip("galore_torch not installed")
    monkeypatch.setattr(lowmem.kit, "load_model_and_tokenizer", _no_model)
    assert main(["bench", "adamw", "peer:galore_torch", "--dtype", "bfloat16", *extra]) == 2
    err = capsys.readouterr().err
    assert "'peer:galore_torch'" in err and "cannot run in bfloat16" in err


def test_dtype_reaches_the_launches_count(tmp_path):
    """``--dtype bfloat16 --launches`` counts the step on bfloat16 meta weights (it was refused; --task text,
    --shapes take it too: BENCH17)."""
    args = ["bench", "adamw", "--dtype", "bfloat16", "--launches", "--shapes", "small-tensors"]
    assert main([*args, "--output-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "bench_launches.json").read_text())["meta"]["dtype"] == "bfloat16"


def test_cli_records_the_dtype(tmp_path):
    rc = main(["bench", "adamw:kahan_summation=true", "--dtype", "bfloat16", "--steps", "6", "--repeats", "1",
               "--batch-size", "1", "--output-dir", str(tmp_path)])
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert rc == 0 and payload["meta"]["dtype"] == "bfloat16"
    assert payload["meta"]["title"].endswith(", bfloat16 weights")
    assert "bfloat16 weights" in (tmp_path / "bench.md").read_text()
