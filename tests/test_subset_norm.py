"""Subset-Norm and Subspace-Momentum (Nguyen & Nguyen 2024): adamw_sn, adamw_snsm, sgd_sm, adagrad_sn,
adagrad_snsm.

Parity of ``adamw_sn`` with pytorch_optimizer's ``AdamWSN`` (4.1.0, the dev extra), groups from a
model as the authors build them, exact state sizes, the chunked step against the whole one, and
the step's transient (reported on the meta device, measured in a fresh process). The trajectories
against the paper's plain loops are in tests/test_reference.py (lowmem/optim/references/subset_norm.py).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import lowmem
from lowmem.optim import create_optimizer
from lowmem.optim.recipes.subset_norm import AdamWSN
from lowmem.optim.registry import bytes_per_param

MiB = 2**20
NAMES = ("adamw_sn", "adamw_snsm", "sgd_sm", "adagrad_sn", "adagrad_snsm")


def _grads(shape, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        g = torch.randn(shape, generator=gen) * (1 + t % 3)
        if t == 4:
            g.view(-1)[:3] *= 50.0
        out.append(g)
    return out


# ---- parity with pytorch_optimizer's AdamWSN ----------------------------------------------------


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.99)], ids=["adam", "rmsprop"])
def test_adamw_sn_equals_pytorch_optimizer(betas):
    """pytorch_optimizer's AdamWSN with ``sn=True`` sums ``g^2`` over contiguous flat subsets of
    ``subset_size``: ``subset_size = n`` is one subset per row. The authors' partition of a wide
    matrix is per column: the peer steps its transpose. Vectors: ``sn=False`` (element-wise)."""
    po = pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(0)
    shapes = [(40, 24), (24, 40), (40,)]
    starts = [torch.randn(s) for s in shapes]
    grads = [_grads(s, 20, seed=i) for i, s in enumerate(shapes)]
    hp = {"lr": 1e-2, "betas": betas, "weight_decay": 0.1, "eps": 1e-6}
    ours = [torch.nn.Parameter(x.clone()) for x in starts]
    opt = create_optimizer(ours, "adamw_sn", **hp)
    opt.chunk_numel = 64  # the chunked step: whole rows, column statistics over the row chunks
    theirs = [torch.nn.Parameter(starts[0].clone()), torch.nn.Parameter(starts[1].t().contiguous()),
              torch.nn.Parameter(starts[2].clone())]
    peer = po.AdamWSN([{"params": theirs[:1], "sn": True, "subset_size": 24},
                       {"params": theirs[1:2], "sn": True, "subset_size": 24},
                       {"params": theirs[2:], "sn": False}], foreach=False, **hp)
    worst = 0.0
    for t in range(20):
        for p, q, g in zip(ours, theirs, grads):
            p.grad = g[t].clone()
            q.grad = (g[t].t() if g[t].ndim == 2 and q.shape != g[t].shape else g[t]).contiguous().clone()
        opt.step()
        peer.step()
        for p, q in zip(ours, theirs):
            q_ = q.detach().t() if q.shape != p.shape else q.detach()
            torch.testing.assert_close(p.detach(), q_, rtol=1e-5, atol=1e-6)
            worst = max(worst, float((p.detach() - q_).abs().max()))
    # the state: one statistic per row of the tall matrix, per column of the wide one, per element of the vector
    assert opt.state[ours[0]]["exp_avg_sq"].shape == (40, 1)
    assert opt.state[ours[1]]["exp_avg_sq"].shape == (1, 40)
    assert opt.state[ours[2]]["exp_avg_sq"].shape == (40,)
    torch.testing.assert_close(opt.state[ours[1]]["exp_avg_sq"].t(), peer.state[theirs[1]]["exp_avg_sq"], rtol=1e-5, atol=0)
    assert ("exp_avg" in opt.state[ours[0]]) == (betas[0] > 0)  # RMSPropSN keeps no first moment
    assert worst < 1e-6  # measured 1.2e-7 over 20 steps (the parameters move by up to 0.14)


@pytest.mark.parametrize("subset_size", [-1, -2, 16])
def test_flat_subsets_equal_pytorch_optimizer_default_partition(subset_size):
    """``subset_size`` set: contiguous flat subsets of the largest divisor of the size not above the
    request (``-d``: ``sqrt(size) / d``), for every parameter, as pytorch_optimizer's ``AdamWSN``
    (``sn=True``) does: its own partition, no transposes, vectors included."""
    po = pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(0)
    shapes = [(40, 24), (24, 40), (37, 29), (40,)]
    starts = [torch.randn(s) for s in shapes]
    grads = [_grads(s, 12, seed=i) for i, s in enumerate(shapes)]
    hp = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1, "eps": 1e-6}
    ours = [torch.nn.Parameter(x.clone()) for x in starts]
    theirs = [torch.nn.Parameter(x.clone()) for x in starts]
    opt = create_optimizer(ours, "adamw_sn", subset_size=subset_size, **hp)
    opt.chunk_numel = 100  # chunks of whole subsets
    peer = po.AdamWSN([{"params": theirs, "sn": True}], subset_size=subset_size, foreach=False, **hp)
    for t in range(12):
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g[t].clone(), g[t].clone()
        opt.step()
        peer.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    sizes = [(opt.state[p]["exp_avg_sq"].numel(), peer.state[q]["exp_avg_sq"].numel(), p.numel()) for p, q in zip(ours, theirs)]
    assert all(a == b <= n for a, b, n in sizes) and sizes[0][0] < sizes[0][2]  # 1073 = 29 x 37 with -2: element-wise
    with pytest.raises(ValueError, match="subset_size"):
        create_optimizer(ours, "adamw_sn", subset_size=0)
    with pytest.raises(ValueError, match="subset_size"):
        create_optimizer(ours, "adamw_snsm", subset_size=4)  # the projected recipes keep the authors' rows


def test_adamw_sn_class_takes_the_authors_groups():
    """``AdamWSN`` as the authors' class: ``sn=True`` groups are subset-normed, others are AdamW."""
    a, b = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(8, 6))
    opt = AdamWSN([{"params": [a], "sn": True}, {"params": [b]}], lr=1e-2)
    assert opt.param_groups[0]["subset_norm"] is True and "sn" not in opt.param_groups[0]
    a.grad, b.grad = torch.randn(8, 6), torch.randn(8, 6)
    opt.step()
    assert opt.state[a]["exp_avg_sq"].shape == (8, 1)
    assert opt.state[b]["exp_avg_sq"].shape == (8, 6)
    with pytest.raises(ValueError, match="correct_bias"):
        AdamWSN([a], correct_bias=False)
    with pytest.raises(ValueError, match="not both"):
        AdamWSN([{"params": [a], "sn": True, "subset_norm": True}])
    with pytest.raises(ValueError, match="subset_norm"):
        AdamWSN([{"params": [a], "sn": "yes"}])


def test_first_moment_cannot_appear_after_allocation():
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = create_optimizer([p], "adamw_sn", betas=(0.0, 0.999))
    p.grad = torch.randn(6, 4)
    opt.step()
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    # (refused before the step by lowmem.optim.group_layout: betas[0] 0 -> 0.9 adds a first moment to the layout)
    with pytest.raises(ValueError, match=r"setting 'betas' changed from \(0\.0, 0\.999\) to \(0\.9, 0\.999\).*exp_avg"):
        opt.step()



def _authors_sm_sn_step(p, g, st, *, lr, betas, eps, wd, rank, adaptive, adagrad=False):
    """One step of the authors' ``GenericOptim`` (timmytonga/sn-sm) on a 2-D parameter of a group
    with ``rank`` (``momentum_type="sm"``) and, when ``adaptive``, ``subset_size="heuristics"``
    (``second_moment_type="sn"``, ``correct_bias=True``; the ``sgd`` configuration otherwise:
    ``betas=(b1, 0)``, no bias correction; ``adagrad``: ``betas=(b1, 1)``, running sums, no bias
    correction), written out with its ``SVDProjector("svd")`` of the
    first gradient (the projection is not refreshed again here)."""
    b1, b2 = betas
    st["step"] = st.get("step", 0) + 1
    if "basis" not in st:  # SVDProjector: right factor Vh[:r] when m >= n, else left U[:, :r]
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        st["basis"] = vh[:rank] if g.shape[0] >= g.shape[1] else u[:, :rank]
    B, right = st["basis"], g.shape[0] >= g.shape[1]
    proj = g @ B.t() if right else B.t() @ g
    back = (lambda x: x @ B) if right else (lambda x: B @ x)
    st.setdefault("exp_avg", torch.zeros_like(proj)).mul_(b1).add_(proj, alpha=1 - b1)
    numerator = back(st["exp_avg"]) + (g - back(proj))
    if adaptive:
        reduce_dim = 0 if g.shape[0] >= g.shape[1] else 1
        sq = torch.sum(g**2, dim=1 - reduce_dim, keepdim=True)
        v = st.setdefault("exp_avg_sq", torch.zeros_like(sq))
        v.add_(sq) if adagrad else v.mul_(b2).add_(sq, alpha=1 - b2)
        step_size = lr if adagrad else lr * math.sqrt(1 - b2 ** st["step"]) / (1 - b1 ** st["step"])
        p = p - step_size * numerator / (st["exp_avg_sq"].sqrt() + eps)
    else:
        p = p - lr * numerator
    return p - lr * wd * p


@pytest.mark.parametrize("name", ["adamw_snsm", "sgd_sm", "adagrad_snsm"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)], ids=["tall", "wide"])
def test_subspace_momentum_equals_the_authors_step(name, shape):
    """Between refreshes (one SVD at step 1, ``update_proj_gap`` beyond the run: the authors refresh
    at steps divisible by T, lowmem at 1, T+1, ..., docs/optimizers.md) the engine equals the
    authors' GenericOptim step on the same projection, SN on top or not."""
    torch.manual_seed(0)
    start = torch.randn(shape)
    grads = _grads(shape, 12)
    hp = {"lr": 1e-2, "weight_decay": 0.1, "rank": 4, "update_proj_gap": 1000}
    hp.update({"betas": (0.9, 0.99), "eps": 1e-6} if name == "adamw_snsm" else {"momentum": 0.8})
    if name == "adagrad_snsm":
        hp["eps"] = 1e-6
    p = torch.nn.Parameter(start.clone())
    opt = create_optimizer([p], name, **hp)
    q, st = start.clone(), {}
    for g in grads:
        p.grad = g.clone()
        opt.step()
        q = _authors_sm_sn_step(q, g, st, lr=hp["lr"], betas=hp.get("betas", (hp.get("momentum"), 0.0)), eps=hp.get("eps"),
                                wd=hp["weight_decay"], rank=4, adaptive=name != "sgd_sm", adagrad=name == "adagrad_snsm")
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    assert (q - start).abs().max() > 1e-2

# ---- groups from a model --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_groups_from_a_model(tiny_model, name):
    """Projection layers and the output head take Subset-Norm (the authors' nn.Linear rule; the SM
    recipes project the projection layers, not the head); embeddings, norms and biases keep Adam's
    element-wise second moment (SGD with momentum for sgd_sm)."""
    model, _ = tiny_model
    opt = create_optimizer(model, name, rank=4) if name.endswith("sm") else create_optimizer(model, name)
    ids = {id(p): n for n, p in model.named_parameters()}
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    assert head is not emb
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    seen = 0
    for group in opt.param_groups:
        for p in group["params"]:
            st, n = opt.state[p], ids[id(p)]
            if name == "sgd_sm":
                assert "exp_avg_sq" not in st and "sn_exp_avg_sq" not in st
                continue
            if p is emb or p.ndim == 1:
                assert st["exp_avg_sq"].shape == p.shape, n
            elif p is head or name.endswith("_sn"):
                assert st["exp_avg_sq"].shape == (p.shape[0], 1) if p.shape[0] >= p.shape[1] else (1, p.shape[1]), n
                seen += 1
            else:  # projected: momentum of P^T G, the SN statistic of G in the combine step
                assert "proj_meta" in st and st["exp_avg"].numel() < p.numel(), n
                assert st["sn_exp_avg_sq"].numel() == max(p.shape), n
                seen += 1
    assert seen > 2 or name == "sgd_sm"


# ---- state bytes ------------------------------------------------------------------------------------


def test_state_bytes_per_param_at_4096():
    n = 4096 * 4096
    assert bytes_per_param("adamw_sn") == (4 * n + 4 * 4096) / n  # m, one v per row: 4.001
    assert bytes_per_param("adamw_sn", betas=(0.0, 0.999)) == 4 * 4096 / n  # RMSPropSN: 0.001
    # rank 128: m (128 x 4096), the basis (4096 x 128), the SN statistic, the projection's 6 int64 counters
    assert bytes_per_param("adamw_snsm") == (4 * 128 * 4096 * 2 + 4 * 4096 + 8 * 6) / n  # 0.251
    assert bytes_per_param("sgd_sm") == (4 * 128 * 4096 * 2 + 8 * 6) / n  # 0.250
    assert bytes_per_param("adagrad_sn") == bytes_per_param("adamw_sn")
    assert bytes_per_param("adagrad_sn", momentum=0.0) == 4 * 4096 / n  # AdaGrad-SN itself: 0.001
    assert bytes_per_param("adagrad_snsm") == bytes_per_param("adamw_snsm")


# ---- the step in chunks, transients ----------------------------------------------------------------


@pytest.mark.parametrize("name,shape,hp", [
    ("adamw_sn", (37, 29), {}), ("adamw_sn", (29, 37), {"betas": (0.0, 0.9)}), ("adamw_sn", (37, 29), {"subset_norm": False}),
    ("adamw_snsm", (37, 29), {"rank": 4, "update_proj_gap": 2}), ("adamw_snsm", (29, 37), {"rank": 4, "update_proj_gap": 2}),
    ("adamw_snsm", (29, 37), {"rank": 4, "update_proj_gap": 2, "subset_norm": False}),
    ("sgd_sm", (29, 37), {"rank": 4, "update_proj_gap": 2}),
    ("adagrad_sn", (29, 37), {}), ("adagrad_snsm", (37, 29), {"rank": 4, "update_proj_gap": 2}),
], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_step_equals_whole_step(name, shape, hp, dtype):
    """Row chunks of 128 elements (several, the last partial): per-row statistics are row-local, per-
    column ones are summed over the chunks first (rounding only); bf16 parameters take the rows path
    without a full float32 copy of the gradient."""
    results = []
    for chunk in (None, 128):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(shape).to(dtype))
        opt = create_optimizer([p], name, lr=1e-2, **hp)
        opt.chunk_numel = chunk
        for g in _grads(shape, 5):
            p.grad = g.to(dtype)
            opt.step()
        results.append((p.detach().float(), {k: v.clone() for k, v in opt.state[p].items()}))
    (wp, ws), (cp, cs) = results
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(cp, wp, **tol)
    assert set(ws) == set(cs)
    for k in ws:
        torch.testing.assert_close(cs[k].float(), ws[k].float(), rtol=1e-4, atol=1e-6)


def test_step_transient_on_meta_is_bounded_by_the_chunk():
    """adamw_sn is chunked in whole rows: its transient depends on the chunk, not on the tensor."""
    sizes = {}
    for shape in ((4096, 4096), (8192, 8192), (2048, 8192)):
        p = torch.nn.Parameter(torch.empty(shape, device="meta"))
        opt = create_optimizer([p], "adamw_sn")
        opt.chunk_numel = 2**19  # the CPU's chunk (meta tensors default to the GPU's, 2^24)
        opt.materialize_state()
        sizes[shape] = opt.step_transient_bytes()
        opt.chunk_numel = None
        assert opt.step_transient_bytes() >= 8 * p.numel()  # g^2 and the direction, whole
    assert all(4 * 2**19 < s <= 4 * 2**19 + 8 * 8192 for s in sizes.values()), sizes  # g^2 of a chunk + its sums


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
MEASURED = {
    "adamw_sn": ({}, "plain", 2),
    "adamw_sn_wide": ({}, "plain", 2),  # per-column statistics: the column pass over row chunks
    # refreshes at steps 1 and 3, a plain step between: the combine-back in row blocks and the SN column pass
    "adamw_snsm_rsvd": ({"rank": 64, "update_proj_gap": 2, "projection": "rsvd"}, "refresh", 3),
}


@needs_proc
def test_step_peak_is_bounded_and_reported():
    """Peak RSS growth of real steps on a 2048 x 2048 weight (1024 x 4096 for the wide case) in a fresh
    process stays under 64 MiB and below step_transient_bytes() (+10% + 1 MiB); for the chunked
    adamw_sn the report is also tight (within 2x + 4 MiB)."""
    from lowmem.optim.step_memory import LIVE_ENV, measure_steps

    labels = sorted(MEASURED)
    specs = [{"name": label.replace("_wide", "").replace("_rsvd", ""), "shape": [1024, 4096] if "wide" in label else [2048, 2048],
              "hparams": MEASURED[label][0], "mode": MEASURED[label][1], "steps": MEASURED[label][2]} for label in labels]
    rows = dict(zip(labels, measure_steps(specs, env=LIVE_ENV)))
    for label, r in rows.items():
        grown, reported = r["growth_bytes"], r["transient_bytes"]
        assert grown <= 64 * MiB, (label, grown / MiB)
        assert grown <= 1.1 * reported + MiB, (label, grown / MiB, reported / MiB)
        if label.startswith("adamw_sn") and "snsm" not in label or MEASURED[label][1] == "refresh":
            assert reported <= 2 * grown + 4 * MiB, (label, grown / MiB, reported / MiB)


# ---- the registry -------------------------------------------------------------------------------


def test_registered_with_metadata():
    entries = {e.name: e for e in lowmem.optim.optimizer_entries()}
    assert entries["adamw_sn"].second_moment == "blockwise" and not entries["adamw_sn"].subspace
    assert entries["adamw_snsm"].second_moment == "blockwise" and entries["adamw_snsm"].subspace
    assert entries["sgd_sm"].second_moment == "none" and entries["sgd_sm"].subspace
    assert entries["adagrad_sn"].second_moment == "blockwise" and not entries["adagrad_sn"].subspace
    assert entries["adagrad_snsm"].second_moment == "blockwise" and entries["adagrad_snsm"].subspace
    assert {e.state_precision for n, e in entries.items() if n in NAMES} == {"fp32"}


@pytest.mark.parametrize("name,hp", [("adamw_snsm", {}), ("sgd_sm", {}), ("adamw_snsm", {"betas": (0.0, 0.999)})])
def test_multi_tensor_step_runs_on_torch_without_foreach_clone(monkeypatch, name, hp):
    """The H200 device's torch 2.11 has no ``torch._foreach_clone`` (2.13 has): the Subspace-Momentum rules'
    multi-tensor step failed there with AttributeError (GPU checks, 2026-11-29). pyproject allows torch >= 2.4."""
    def run():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(48, 32, bias=False))
        opt = create_optimizer(model, name, lr=1e-2, rank=4, update_proj_gap=2, **hp)
        for _ in range(3):
            model(torch.randn(4, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]
    before = run()
    monkeypatch.delattr(torch, "_foreach_clone", raising=False)
    after = run()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
