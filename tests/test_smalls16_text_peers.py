"""lowmem bench --task text NAMES --peers: only the peers of the named recipes are probed and trained (the others
listed as left out, in the metadata and the table's notes), as ``--shapes`` does; with no recipe named, every peer."""

from __future__ import annotations

from lowmem import bench_text
from lowmem.bench import BASELINE
from lowmem.bench_peers import Peer, get_peer


def _probes(monkeypatch, peers):
    probed: list[str] = []

    def probe(p, device="cpu"):
        probed.append(p.name)
        return None if p.name != "nope" else "no_such_package_xyz is not installed"

    monkeypatch.setattr(bench_text, "PEERS", peers)
    monkeypatch.setattr(bench_text, "probe_peer", probe)
    return probed


def test_text_peers_are_the_named_recipes_peers(monkeypatch):
    fake = Peer("nope", "no_such_package_xyz", "lion", get_peer("transformers_adafactor").build)
    probed = _probes(monkeypatch, (get_peer("transformers_adafactor"), get_peer("po_sm3"), fake))
    left: dict[str, str] = {}
    rows, skipped = bench_text.plan_entries(["adafactor:relative_step=false"], peers=True, lr_sweep=False, left_out=left)
    assert [r.label for r in rows] == [BASELINE, "adafactor:relative_step=false", "peer:transformers_adafactor"]
    assert probed == ["transformers_adafactor"]  # the others are not even probed
    assert left == {"peer:po_sm3": "stands for sm3, not among the named optimizers",
                    "peer:nope": "stands for lion, not among the named optimizers"}
    assert skipped == {}
    # the baseline (even as a variant) names no recipe: every peer, probed; the missing one skipped
    probed.clear()
    left = {}
    rows, skipped = bench_text.plan_entries(["torch_adamw:lr=3e-3"], peers=True, lr_sweep=False, left_out=left)
    assert probed == ["transformers_adafactor", "po_sm3", "nope"] and left == {}
    assert [r.label for r in rows][-2:] == ["peer:transformers_adafactor", "peer:po_sm3"]
    assert skipped == {"peer:nope": "no_such_package_xyz is not installed"}
    # a peer row named beside a recipe runs once and is not left out
    probed.clear()
    left = {}
    rows, skipped = bench_text.plan_entries(["peer:po_sm3", "lion"], peers=True, lr_sweep=False, left_out=left)
    assert [r.label for r in rows] == [BASELINE, "peer:po_sm3", "lion"]
    assert skipped == {"peer:nope": "no_such_package_xyz is not installed"}
    assert probed == ["nope"] and left == {"peer:transformers_adafactor": "stands for adafactor, not among the named optimizers"}


def test_text_bench_reports_the_left_out_peers(monkeypatch, tmp_path):
    _probes(monkeypatch, (get_peer("po_sm3"), get_peer("transformers_adafactor")))
    for i in range(4):
        (tmp_path / f"m{i}.py").write_text(f"x{i} = {i}\n" * 40)
    task = bench_text.TextTask(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seq_len=16,
                               batch_size=2, steps=2, warmup_steps=0, eval_sequences=2, heldout_percent=50,
                               timing_warmup=0)
    results, meta = bench_text.run_text_bench(["adafactor:relative_step=false"], task=task, peers=True, repeats=1,
                                              progress=False, threads=1, root=tmp_path)
    assert [r.optimizer for r in results] == [BASELINE, "adafactor:relative_step=false", "peer:transformers_adafactor"]
    assert meta["left_out_peers"] == {"peer:po_sm3": "stands for sm3, not among the named optimizers"}
    md = bench_text.to_markdown(results, meta)
    assert "Peers left out (their recipe is not among the named optimizers): peer:po_sm3." in md
