"""DOCTRUTH2: README's `lowmem bench --shapes small-tensors --peers` (and `lowmem bench --help`: "one [peer] not
installed or unable to run here is listed as skipped with the reason") on a set of plain tensors."""

import pytest


@pytest.mark.slow  # 8-16 s: probe_peer builds and steps the peer, then the torch AdamW rounds
def test_shapes_peers_on_a_tensor_set_skip_a_peer_that_cannot_run(monkeypatch):
    import lowmem.bench_shapes as bs
    from lowmem.bench_peers import get_peer

    pytest.importorskip("adam_mini")
    monkeypatch.setattr(bs, "PEERS", [get_peer("peer:adam_mini")])  # only the peer in question: < 1 s
    rows, meta = bs.run_shapes_bench([], "small-tensors", peers=True, repeats=1, progress=False)
    assert [r.optimizer for r in rows] == ["torch_adamw"]
    assert "peer:adam_mini" in meta["skipped_peers"] and "config" in meta["skipped_peers"]["peer:adam_mini"]
