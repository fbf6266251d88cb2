"""``lowmem bench --task text --dtype bfloat16``: every contender's copy of the byte-level Llama trains in bfloat16;
a peer runs there when lowmem.bench_peers.probe_peer succeeds on bfloat16 weights: one named explicitly that fails
is refused naming itself, one added by --peers is a skipped line saying why. ``--shapes`` steps its sets' weights in
bfloat16 the same way; ``--launches`` refuses it."""

from __future__ import annotations

import json

import pytest
import torch

from lowmem import bench_peers, bench_shapes, bench_text
from lowmem.bench import BASELINE
from lowmem.bench_peers import Peer, probe_peer
from lowmem.bench_shapes import run_shapes_bench
from lowmem.cli import main


def _fp32_only(model, lr, rank, st):
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise TypeError("fp32_only steps float32 weights only")
    return torch.optim.SGD(model.parameters(), lr=lr)


FAKE = Peer("fp32_only", "torch", "adamw", _fp32_only)


def test_text_smoke_run_trains_bfloat16_weights(tmp_path):
    rc = main(["bench", "--task", "text", "--text-size", "smoke", "--dtype", "bfloat16", "--threads", "1",
               "adamw", "adamw:kahan_summation=true", "--repeats", "1", "--output-dir", str(tmp_path)])
    payload = json.loads((tmp_path / "bench_text.json").read_text())
    assert rc == 0 and payload["meta"]["dtype"] == "bfloat16"
    md = (tmp_path / "bench_text.md").read_text()
    assert md.startswith("### lowmem bench --task text --dtype bfloat16") and "; bfloat16 weights." in md
    base, rtn, kahan = payload["results"]
    assert [base["optimizer"], rtn["optimizer"], kahan["optimizer"]] == [BASELINE, "adamw", "adamw:kahan_summation=true"]
    n = rtn["trainable_params"]
    # torch's AdamW keeps bfloat16 moments of bfloat16 weights (2 x 2 B); Kahan's compensation is 2 B a parameter
    assert 4.0 <= base["bytes_per_param"] < 4.01
    assert kahan["state_bytes"] - rtn["state_bytes"] == 2 * n


def test_probe_names_the_dtype():
    assert probe_peer(FAKE) is None
    why = probe_peer(FAKE, dtype=torch.bfloat16)
    assert why.startswith("torch failed on cpu with bfloat16 weights: TypeError: fp32_only steps float32 weights only")


def test_named_peer_failing_in_bfloat16_is_refused_naming_itself(monkeypatch, capsys):
    monkeypatch.setattr(bench_peers, "PEERS", (*bench_peers.PEERS, FAKE))

    def no_model(*a, **k):
        raise AssertionError("a model was built before the peer was refused")

    monkeypatch.setattr(bench_text, "build_model", no_model)
    monkeypatch.setattr(bench_text, "load_text", no_model)  # (refused before the data is read too)
    assert main(["bench", "--task", "text", "--text-size", "smoke", "--dtype", "bfloat16", "adamw",
                 "peer:fp32_only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'peer:fp32_only' cannot train bfloat16 weights" in err and "fp32_only steps float32 weights only" in err


def test_peers_flag_skips_a_peer_failing_in_bfloat16_saying_why(monkeypatch):
    monkeypatch.setattr(bench_text, "PEERS", (FAKE,))
    monkeypatch.setattr(bench_peers, "PEERS", (FAKE,))
    rows, skipped = bench_text.plan_entries(["adamw"], peers=True, lr_sweep=False, dtype="bfloat16")
    assert [r.label for r in rows] == [BASELINE, "adamw"]
    assert "bfloat16 weights" in skipped["peer:fp32_only"]
    rows, skipped = bench_text.plan_entries(["adamw"], peers=True, lr_sweep=False)  # float32: it runs
    assert [r.label for r in rows] == [BASELINE, "adamw", "peer:fp32_only"] and not skipped


def test_bfloat16_launches_run_counts_bfloat16_weights(tmp_path, capsys):
    """``lowmem bench --launches --dtype bfloat16`` runs (no longer refused) and says its dtype in the title."""
    assert main(["bench", "adamw", "--dtype", "bfloat16", "--launches", "--shapes", "small-tensors",
                 "--output-dir", str(tmp_path)]) == 0
    md = (tmp_path / "bench_launches.md").read_text()
    assert md.startswith("### lowmem bench --launches --shapes small-tensors --dtype bfloat16\n")
    assert "tensors of bfloat16 on the meta device" in md and "launches" not in capsys.readouterr().err


def test_shapes_step_bfloat16_weights(monkeypatch):
    monkeypatch.setattr(bench_shapes, "SMALL_SET_STEPS", 1)
    rows = ["adamw", "adamw:kahan_summation=true"]
    results, meta = run_shapes_bench(rows, "small-tensors", repeats=1, threads=1, progress=False, dtype="bfloat16")
    assert meta["dtype"] == "bfloat16" and "; bfloat16 weights;" in bench_shapes.to_markdown(results, meta)
    base, rtn, kahan = results
    assert [r.optimizer for r in results] == [BASELINE, *rows]
    # torch's AdamW: bfloat16 moments of bfloat16 weights (2 x 2 B); Kahan's compensation 2 B a parameter
    assert 4.0 <= base.bytes_per_param < 4.01 and kahan.state_bytes - rtn.state_bytes == 2 * rtn.params


def test_shapes_refuse_a_named_peer_failing_in_bfloat16(monkeypatch):
    monkeypatch.setattr(bench_peers, "PEERS", (*bench_peers.PEERS, FAKE))

    def no_build(name):
        raise AssertionError("the set was built before the peer was refused")

    monkeypatch.setattr(bench_shapes, "build_set", no_build)
    with pytest.raises(ValueError, match="'peer:fp32_only' cannot step bfloat16 weights: torch failed on cpu with "
                                         "bfloat16 weights"):
        run_shapes_bench(["adamw", "peer:fp32_only"], "small-tensors", repeats=1, dtype="bfloat16")
