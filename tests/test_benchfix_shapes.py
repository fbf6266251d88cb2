"""lowmem bench --shapes SET NAMES --peers: only the peers of the named recipes are probed and timed (the
others listed as left out); with no recipe named, every peer."""

from __future__ import annotations

from lowmem import bench_shapes
from lowmem.bench import BASELINE
from lowmem.bench_peers import PEERS, Peer, get_peer, peer_label, peers_for


def test_peers_for_picks_the_named_recipes_peers():
    chosen, left = peers_for({"lion", "came"})
    assert [p.name for p in chosen] == [p.name for p in PEERS if p.recipe in ("lion", "came")]
    assert {"po_lion", "bnb_lion", "po_came"} <= {p.name for p in chosen}
    assert set(left) == {peer_label(p) for p in PEERS} - {peer_label(p) for p in chosen}
    assert left["peer:bnb_lion8bit"] == "stands for lion8bit, not among the named optimizers"
    assert peers_for(set()) == (list(PEERS), {})  # nothing named: all


def test_shapes_peers_time_only_the_named_recipes_peers(monkeypatch):
    # the second peer's package is missing: probed, it would be a "skipped" line; left out, it is never probed
    fake = Peer("nope", "no_such_package_xyz", "lion", get_peer("transformers_adafactor").build)
    monkeypatch.setattr("lowmem.bench_shapes.PEERS", (get_peer("transformers_adafactor"), fake))
    rows, meta = bench_shapes.run_shapes_bench(["adafactor:relative_step=false"], "hidden-32", peers=True, repeats=1,
                                               threads=1, progress=False)
    assert [r.optimizer for r in rows] == [BASELINE, "adafactor:relative_step=false", "peer:transformers_adafactor"]
    assert meta["left_out_peers"] == {"peer:nope": "stands for lion, not among the named optimizers"}
    assert meta["skipped_peers"] == {}
    assert "Peers left out (their recipe is not among the named optimizers): peer:nope." in bench_shapes.to_markdown(rows, meta)
    # only peer rows named: every peer is probed (the missing one skipped); a named peer row runs once
    rows, meta = bench_shapes.run_shapes_bench(["peer:transformers_adafactor"], "hidden-32", peers=True, repeats=1,
                                               threads=1, progress=False)
    assert [r.optimizer for r in rows] == [BASELINE, "peer:transformers_adafactor"]
    assert meta["left_out_peers"] == {} and "no_such_package_xyz is not installed" in meta["skipped_peers"]["peer:nope"]
    # a peer row named beside a recipe runs and is not listed as left out
    rows, meta = bench_shapes.run_shapes_bench(["peer:transformers_adafactor", "adamw"], "hidden-32", peers=True,
                                               repeats=1, threads=1, progress=False)
    assert [r.optimizer for r in rows] == [BASELINE, "peer:transformers_adafactor", "adamw"]
    assert meta["left_out_peers"] == {"peer:nope": "stands for lion, not among the named optimizers"}
