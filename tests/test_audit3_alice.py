"""Outside review of ``alice`` (AUDIT3) against the paper's text: Gong, Scetbon, Ma & Meeds 2025, "Towards Efficient
Optimizer Design for LLM via Structured Fisher Approximation with a Low-Rank Extension" (arXiv 2502.07752v2),
Section 5, Algorithms 2 (switching), 3 (compensation), 4 (Alice) and 10 (subspace iteration). The loop below is
written here from the paper, in float64, for an ``m x n`` weight with ``m <= n`` (the paper's convention; a tall
weight is stepped as its transpose):

    t == 1 or t mod K == 0:  Q_t = b3 U Q~ U^T + (1 - b3) G G^T ;  U = Switch(Q_t, r, l, U)          (Alg. 4, 5-7)
        Switch (Alg. 2 with Alg. 10, one step): X = QR(Q_t U); (w, E) = EVD(X^T Q_t X); keep the top l of X E,
        r - l drawn from the complement (l = r here: no draw). At t = 1 (U_0 = 0) the subspace iteration is
        undefined; read as EVD(Q_1, r) = the top-r left singular vectors of G (taken from G's SVD, as lowmem).
    sigma = U^T G ;  Q~ = b3 Q~ + (1 - b3) sigma sigma^T        (line 12: Q~_{t-1} as it is, not re-expressed)
    m = b1 m + (1 - b1) sigma ;  v = b2 v + (1 - b2) sigma^2 ;  omega = m / sqrt(v)       (no bias correction)
    Compensation(G, U, p, phi, gamma, b1)  (Alg. 3; the decay passed is b1):
        p = b1 p + (1 - b1) (1^T G^2 - 1^T sigma^2) ;  C = sqrt(m - r) (G - U sigma) Diag(p)^-1/2
        eta = gamma / max(||C|| / phi, gamma) if phi > 0 else 1 ;  phi = ||eta C|| ;  C = eta C
    W <- W - lr alpha (U omega + alpha_c C)

The loop is checked against pytorch_optimizer's ``Alice`` (a transcription of Algorithm 4) seeded with the same first
basis, over several switches. lowmem equals it (FOUND_AUDIT3 2-4, fixed in b689026: ``Q~`` kept across a switch,
``p`` decayed with ``b1`` and floored at float32's tiny, refreshes at 1, K, 2K); a strict xfail shows a square weight
projected on the other side (FOUND_AUDIT3 5). Then state / transient bytes on shapes the authors' tests did not use
(FOUND_AUDIT3 6 for the docs' sentence; racs's bytes: tests/test_audit3_racs.py).
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import pytest
import torch

from lowmem.optim import create_optimizer


def _paper_alice(w0, grads, *, lr, rank, gap, b1=0.9, b2=0.9, b3=0.999, alpha=0.3, alpha_c=0.4, gamma=1.01,
                 carry=False):
    """Algorithm 4 (module docstring), float64, ``l = r``. ``carry=True``: lowmem's variant of line 12 (``Q~``
    re-expressed in the new basis at a switch), for the check that it is the one difference. The factorizations
    (the first SVD, the switch's QR and EVD) run in float32, as lowmem's and pytorch_optimizer's do: a basis
    vector's sign is arbitrary, and the paper's moments and ``Q~`` kept across a switch are read through it, so
    the loop calls the same LAPACK routines (single precision) whatever machine runs it."""
    tall = w0.shape[0] > w0.shape[1]
    w = (w0.t() if tall else w0).double().clone()
    m_, n_ = w.shape
    u = q = mom = var = p = None
    phi = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        g = (g.t() if tall else g).double()
        if t == 1:  # (the signs as lowmem's: U of G's SVD, or V for a tall G stepped as G^T; a kept moment's
            # reading in a later basis depends on them, in the paper as in any implementation)
            usv = torch.linalg.svd((g.t() if tall else g).float(), full_matrices=False)
            u = (usv[2][:rank].t() if tall else usv[0][:, :rank]).double()
            q = torch.zeros(rank, rank, dtype=torch.float64)
            mom = torch.zeros(rank, n_, dtype=torch.float64)
            var = torch.zeros(rank, n_, dtype=torch.float64)
            p = torch.zeros(n_, dtype=torch.float64)
        elif t % gap == 0:
            qt = b3 * u @ q @ u.t() + (1 - b3) * g @ g.t()
            x = torch.linalg.qr((qt @ u).float())[0].double()
            vals, vecs = torch.linalg.eigh((x.t() @ qt @ x).float())
            new = x @ vecs.double().flip(1)
            if carry:
                q = new.t() @ u @ q @ u.t() @ new
            u = new
        sigma = u.t() @ g
        q = b3 * q + (1 - b3) * sigma @ sigma.t()
        mom = b1 * mom + (1 - b1) * sigma
        var = b2 * var + (1 - b2) * sigma * sigma
        omega = mom / var.sqrt()
        p = b1 * p + (1 - b1) * ((g * g).sum(0) - (sigma * sigma).sum(0))
        c = math.sqrt(m_ - rank) * (g - u @ sigma) / p.sqrt()
        eta = (gamma / max(float(c.norm()) / phi, gamma)) if phi > 0 else 1.0
        c = eta * c
        phi = float(c.norm())
        w = w - lr * alpha * (u @ omega + alpha_c * c)
        out.append((w.t() if tall else w).clone())
    return out


def _grads(shape, steps, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    # a low-rank signal that turns with t plus noise, its scale changing (the limiter both holds and lets go)
    m, n = shape
    a, b = torch.randn(m, 3, generator=gen, dtype=torch.float64), torch.randn(3, n, generator=gen, dtype=torch.float64)
    out = []
    for t in range(steps):
        rot = torch.tensor([[math.cos(0.4 * t), -math.sin(0.4 * t), 0], [math.sin(0.4 * t), math.cos(0.4 * t), 0],
                            [0, 0, 1]], dtype=torch.float64)
        g = a @ rot @ b + 0.3 * torch.randn(m, n, generator=gen, dtype=torch.float64)
        out.append(g * scale * (1.0 + 1.5 * (t % 4 == 2)))
    return out


def _lowmem(w0, grads, *, lr, rank, gap, dtype=torch.float32, **extra):
    """lowmem's alice set to the paper's choices where it has a setting for them: refreshes at 1, K, 2K
    (``refresh_phase="multiples"``), ``l = r`` (``switch_fraction=0``), ``eps`` below rounding, ``p``'s decay
    ``b1`` (``comp_beta``)."""
    p = torch.nn.Parameter(w0.clone().to(dtype))
    group = {"params": [p], "rank": rank, "update_proj_gap": gap, "refresh_phase": "multiples",
             "switch_fraction": 0.0, **extra}
    opt = create_optimizer([group], "alice", lr=lr, eps=1e-30)
    out = []
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
        out.append(p.detach().double().clone())
    return out, opt, p


def _movement_close(got, want, w0, rtol):
    """``got`` and ``want`` (lists of weights) agree to ``rtol`` of the movement from ``w0``, step by step."""
    for t, (x, y) in enumerate(zip(got, want), 1):
        err = float((x - y).norm())
        scale = float((y - w0.double()).norm())
        assert err <= rtol * scale, f"step {t}: {err:.3g} apart, movement {scale:.3g}"


SETTINGS = [
    ((12, 30), 3, 3, {}),
    ((30, 12), 4, 2, {"b1": 0.8, "b2": 0.95, "b3": 0.5, "alpha": 0.5, "alpha_c": 0.7, "gamma": 1.3}),
    ((9, 9), 2, 4, {"b3": 0.0, "gamma": 1.0}),  # Alice-0 (beta3 = 0), a square weight, no norm growth
]
#: a square weight: the paper's convention (m <= n) projects its rows; lowmem's default ``proj_type="std"`` its
#: columns (GaLore's m >= n rule), 0.47 of the movement apart at step 1: FOUND_AUDIT3 5
SQUARE_LEFT = {"proj_type": "left"}


def _lowmem_extra(cfg):
    b1, b2 = cfg.get("b1", 0.9), cfg.get("b2", 0.9)
    extra = {"betas": (b1, b2), "comp_beta": b1}
    for ours, theirs in (("b3", "beta3"), ("alpha", "scale"), ("alpha_c", "alpha_c"), ("gamma", "gamma")):
        if ours in cfg:
            extra[theirs] = cfg[ours]
    return extra


PEER_CONFIGS = [{"b3": 0.9}, {"b1": 0.8, "b2": 0.95, "b3": 0.5, "alpha": 0.5, "alpha_c": 0.7, "gamma": 1.3}]


@pytest.mark.parametrize("cfg", PEER_CONFIGS, ids=["b3-0.9", "all-changed"])
def test_the_paper_loop_and_lowmem_are_pytorch_optimizers_alice_seeded_with_the_same_first_basis(cfg):
    """The loop above against pytorch_optimizer 4.1.0's ``Alice`` (its rows projected, ``leading_basis = rank``;
    its state seeded after one step with the loop's first basis, so that its own first switch from ``U = 0`` is
    out of play): the same weights to 1e-5 of the movement over 11 steps (its switch casts to float32), switches at
    4 and 8 (``Q~`` kept, ``p`` with ``b1``); lowmem with the same settings (float32 state) to 2e-4."""
    from pytorch_optimizer import Alice

    shape, rank, gap = (10, 24), 3, 4
    grads = _grads(shape, 11, 5)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = _paper_alice(w0, grads, lr=0.02, rank=rank, gap=gap, **cfg)
    w = torch.nn.Parameter(w0.clone())
    betas = (cfg.get("b1", 0.9), cfg.get("b2", 0.9), cfg.get("b3", 0.999))
    peer = Alice([w], lr=0.02, betas=betas, rank=rank, leading_basis=rank, update_interval=gap, eps=0.0,
                 alpha=cfg.get("alpha", 0.3), alpha_c=cfg.get("alpha_c", 0.4), gamma=cfg.get("gamma", 1.01))
    # the peer's step 1 with the loop's basis instead of its switch from U = 0 (same formulas otherwise)
    u1 = torch.linalg.svd(grads[0].float(), full_matrices=False)[0][:, :rank].double()
    st = peer.state[w]
    st.update(U=u1.clone(), Q=torch.zeros(rank, rank, dtype=torch.float64),
              m=torch.zeros(rank, shape[1], dtype=torch.float64), v=torch.zeros(rank, shape[1], dtype=torch.float64),
              p=torch.zeros(shape[1], dtype=torch.float64), phi=torch.zeros(1, dtype=torch.float64))
    got = []
    for g in grads:
        w.grad = g.clone()
        peer.step()
        got.append(w.detach().clone())
    _movement_close(got, want, w0, 1e-5)  # (the peer's switch runs in float32)
    ours, _, _ = _lowmem(w0, grads, lr=0.02, rank=rank, gap=gap, **_lowmem_extra(cfg))
    _movement_close(ours, got, w0, 2e-4)


@pytest.mark.parametrize("shape,rank,gap,cfg", SETTINGS, ids=[f"{s[0]}x{s[1]}-r{r}-K{k}" for s, r, k, _ in SETTINGS])
def test_lowmem_follows_the_paper_until_the_second_switch(shape, rank, gap, cfg):
    """Steps 1 .. 2K - 1 (the first basis, one switch at K, every compensation and limiter step): lowmem (float32
    state) equals the paper's loop to 2e-4 of the weights' movement, wide, tall (its right side projected, the paper
    on the transpose) and square, Alice-0 included."""
    grads = _grads(shape, 2 * gap - 1, 11)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = _paper_alice(w0, grads, lr=0.02, rank=rank, gap=gap, **cfg)
    side = SQUARE_LEFT if shape[0] == shape[1] else {}
    got, _, _ = _lowmem(w0, grads, lr=0.02, rank=rank, gap=gap, **_lowmem_extra(cfg), **side)
    _movement_close(got, want, w0, 2e-4)


def test_a_square_weight_is_projected_on_its_rows_by_default():
    """A 9 x 9 weight with alice's defaults (no ``proj_type``): the paper's loop steps its rows' side."""
    grads = _grads((9, 9), 3, 11)
    w0 = torch.randn(9, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = _paper_alice(w0, grads, lr=0.02, rank=2, gap=4)
    got, _, _ = _lowmem(w0, grads, lr=0.02, rank=2, gap=4, comp_beta=0.9)
    _movement_close(got, want, w0, 2e-4)


def test_lowmem_follows_the_paper_after_the_second_switch():
    """12 steps, switches at 3, 6, 9, alice's defaults: the tracked ``Q~`` keeps its entries across a switch (line 12),
    so the later bases are the paper's (FOUND_AUDIT3 2: with ``Q~`` re-expressed in the new basis, lowmem's default
    before b689026, measured 0.7% of the movement apart at the second switch, 3% by step 12; here 1e-5)."""
    shape, rank, gap = (12, 30), 3, 3
    grads = _grads(shape, 12, 11)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = _paper_alice(w0, grads, lr=0.02, rank=rank, gap=gap, b3=0.9)
    got, _, _ = _lowmem(w0, grads, lr=0.02, rank=rank, gap=gap, beta3=0.9)
    _movement_close(got, want, w0, 1e-4)
    carried, _, _ = _lowmem(w0, grads, lr=0.02, rank=rank, gap=gap, beta3=0.9, carry_covariance=True)
    assert float((carried[-1] - want[-1]).norm()) > 0.01 * float((want[-1] - w0).norm())


def test_carry_covariance_re_expresses_q_in_the_new_basis():
    """``carry_covariance=True`` (lowmem's option): the same 12 steps against the loop with line 12's ``Q~``
    re-expressed in the new basis, ``U_new^T U_old Q~ U_old^T U_new``: equal to 2e-3 of the movement (float32 state
    through three switches)."""
    shape, rank, gap = (12, 30), 3, 3
    grads = _grads(shape, 12, 11)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = _paper_alice(w0, grads, lr=0.02, rank=rank, gap=gap, b3=0.9, carry=True)
    got, _, _ = _lowmem(w0, grads, lr=0.02, rank=rank, gap=gap, beta3=0.9, carry_covariance=True)
    _movement_close(got, want, w0, 2e-3)


def test_the_update_does_not_depend_on_the_gradients_scale():
    """Algorithm 4 is invariant to the gradients' scale: ``omega = m / sqrt(v)``, ``C = sqrt(m - r) R / sqrt(p)``
    and the limiter's ratio are all ratios of the gradients' own sizes. Gradients x 1e-5 (float64 weights, eps
    1e-30) must move the weights as gradients x 1 do (FOUND_AUDIT3 3: lowmem's former floor ``p >= 1e-8`` put them
    0.82 of the movement apart; it bit once a channel's residual squared norm was below 1e-8: a column of d = 4096
    rows with gradient entries of RMS < 1.6e-6, the size of a 7B model's entries at a gradient norm of 0.1-0.4)."""
    shape, rank, gap = (16, 40), 4, 3
    ref, _, _ = _lowmem(torch.zeros(shape, dtype=torch.float64), _grads(shape, 6, 3), lr=1.0, rank=rank, gap=gap,
                        dtype=torch.float64)
    small, _, _ = _lowmem(torch.zeros(shape, dtype=torch.float64), _grads(shape, 6, 3, scale=1e-5), lr=1.0,
                          rank=rank, gap=gap, dtype=torch.float64)
    _movement_close(small, ref, torch.zeros(shape), 1e-4)


def test_defaults_are_the_papers_with_the_compensations_decay_beta1():
    """alice's defaults for the schedule, ``Q~`` and ``p`` (no ``refresh_phase``, ``carry_covariance``, ``comp_beta``
    given), ``betas=(0.5, 0.9)``: refreshes at 1, K, 2K and ``p`` decayed with ``b1 = 0.5`` as line 16 passes it
    (FOUND_AUDIT3 4: ``comp_beta`` was 0.9 whatever ``b1``, the schedule 1, K + 1, ...)."""
    shape, rank, gap = (12, 30), 3, 3
    grads = _grads(shape, 8, 4)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = _paper_alice(w0, grads, lr=0.02, rank=rank, gap=gap, b1=0.5)
    p = torch.nn.Parameter(w0.float())
    opt = create_optimizer([{"params": [p], "rank": rank, "update_proj_gap": gap, "switch_fraction": 0.0}], "alice",
                           lr=0.02, eps=1e-30, betas=(0.5, 0.9))
    got = []
    for g in grads:
        p.grad = g.float()
        opt.step()
        got.append(p.detach().double().clone())
    _movement_close(got, want, w0, 2e-4)


# ---- settings honoured: groups, resume, zero first gradient ---------------------------------------------------


def test_groups_of_different_settings_each_follow_the_paper():
    """Two groups (rank / gap / betas / beta3 / alpha / alpha_c / gamma all different, a wide and a tall weight), 5
    steps each with a switch: each weight equals the paper's loop with its own group's settings."""
    ga, gb = _grads((10, 26), 5, 21), _grads((26, 10), 5, 22)
    wa = torch.randn(10, 26, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    wb = torch.randn(26, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ca = {"b1": 0.7, "b2": 0.99, "b3": 0.9, "alpha": 0.2, "alpha_c": 1.0, "gamma": 1.5}
    cb = {"b1": 0.9, "b2": 0.9, "b3": 0.999, "alpha": 0.3, "alpha_c": 0.1, "gamma": 1.01}
    pa, pb = torch.nn.Parameter(wa.float()), torch.nn.Parameter(wb.float())
    groups = [{"params": [pa], "rank": 2, "update_proj_gap": 3, **_lowmem_extra(ca)},
              {"params": [pb], "rank": 4, "update_proj_gap": 4, **_lowmem_extra(cb)}]
    for g in groups:
        g.update(refresh_phase="multiples", switch_fraction=0.0)
    opt = create_optimizer(groups, "alice", lr=0.02, eps=1e-30)
    got_a, got_b = [], []
    for x, y in zip(ga, gb):
        pa.grad, pb.grad = x.float(), y.float()
        opt.step()
        got_a.append(pa.detach().double().clone())
        got_b.append(pb.detach().double().clone())
    _movement_close(got_a, _paper_alice(wa, ga, lr=0.02, rank=2, gap=3, **ca), wa, 2e-4)
    _movement_close(got_b, _paper_alice(wb, gb, lr=0.02, rank=4, gap=4, **cb), wb, 2e-4)


def test_a_bucket_of_weights_follows_the_paper_per_weight():
    """The multi-tensor fold (d176878): three 12 x 30 weights and a 30 x 12 one in one group, 8 steps with switches
    at 3 and 6; one weight's gradient all zero at step 2 (its compensation 0, its limiter restarting), another's x 1e3:
    each follows its own paper loop to 2e-4 of its movement (its own ``p``, ``phi`` and ``Q~``)."""
    shapes = [(12, 30), (12, 30), (12, 30), (30, 12)]
    w0s = [torch.randn(s, generator=torch.Generator().manual_seed(60 + i), dtype=torch.float64)
           for i, s in enumerate(shapes)]
    grads = [_grads(s, 8, 70 + i) for i, s in enumerate(shapes)]
    grads[1][1] = torch.zeros(shapes[1], dtype=torch.float64)
    grads[2] = [g * 1e3 for g in grads[2]]
    ps = [torch.nn.Parameter(w.float()) for w in w0s]
    opt = create_optimizer([{"params": ps, "rank": 3, "update_proj_gap": 3, "switch_fraction": 0.0}], "alice",
                           lr=0.02, eps=1e-30)
    got = [[] for _ in ps]
    for t in range(8):
        for p, g in zip(ps, grads):
            p.grad = g[t].float()
        opt.step()
        for i, p in enumerate(ps):
            got[i].append(p.detach().double().clone())
    for i, (w, g) in enumerate(zip(w0s, grads)):
        _movement_close(got[i], _paper_alice(w, g, lr=0.02, rank=3, gap=3), w, 2e-4)


def test_resume_from_a_weights_only_state_dict_across_a_switch_with_draws():
    """The default switch (``l < r``: directions drawn from the complement, seeded from the state), 4 steps, a
    ``state_dict`` through ``torch.load(weights_only=True)`` into a new optimizer, 5 more steps with a switch:
    bit for bit the run that never stopped (the draw's generator is rebuilt from the saved state)."""
    shape = (14, 32)
    grads = [g.float() for g in _grads(shape, 9, 8)]
    w0 = torch.randn(shape)
    kw = {"rank": 4, "update_proj_gap": 3, "switch_fraction": 0.5}
    p = torch.nn.Parameter(w0.clone())
    opt = create_optimizer([{"params": [p], **kw}], "alice", lr=0.02)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    q = torch.nn.Parameter(w0.clone())
    first = create_optimizer([{"params": [q], **kw}], "alice", lr=0.02)
    for g in grads[:4]:
        q.grad = g.clone()
        first.step()
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = create_optimizer([{"params": [q], **kw}], "alice", lr=0.02)
    second.load_state_dict(torch.load(buf, weights_only=True))
    for g in grads[4:]:
        q.grad = g.clone()
        second.step()
    assert torch.equal(q.detach(), p.detach())


def test_a_zero_first_gradient_takes_the_first_basis_at_the_next_step():
    """LoRA's ``lora_A`` (its first gradient exactly 0): the refresh is skipped with a warning and retried at the
    next step (an orthonormal basis, the compensation and the subspace step then both move the weight)."""
    p = torch.nn.Parameter(torch.randn(16, 40))
    opt = create_optimizer([{"params": [p], "rank": 4, "update_proj_gap": 200}], "alice", lr=0.02)
    p.grad = torch.zeros(16, 40)
    with pytest.warns(UserWarning, match="refresh skipped"):
        opt.step()
    before = p.detach().clone()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        p.grad = torch.randn(16, 40, generator=gen)
        opt.step()
    basis = opt.state[p]["proj_left"]
    torch.testing.assert_close(basis.t() @ basis, torch.eye(4), atol=1e-5, rtol=0)
    assert float((p.detach() - before).norm()) > 1e-3


# ---- memory on shapes the authors' tests did not use --------------------------------------------------------------


def _state_tensor_bytes(opt):
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def test_alice_bytes_on_new_shapes():
    """alice: ``state_bytes()`` is the bytes of its state tensors, and ``step_transient_bytes()`` (the bound of any
    step: the first refresh's SVD or a switch) is never under a traced step, switches included (gap 2), on a
    square weight, fused experts [2, 9, 20], ``reverse_std`` and ranks 2 / 5, float32 and bfloat16 weights."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_muonfix_sweep import _RealLive

    under = []
    for shape, hp in [((12, 12), {"rank": 2}), ((2, 9, 20), {"rank": 3}), ((9, 30), {"rank": 5, "proj_type":
                                                                                       "reverse_std"})]:
        for pdtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(shape).to(pdtype))
            v = torch.nn.Parameter(torch.randn(7).to(pdtype))  # (a vector: AdamW's moments)
            opt = create_optimizer([{"params": [p, v], "update_proj_gap": 2, **hp}], "alice", lr=1e-2)
            opt.chunk_numel = 40
            gen = torch.Generator().manual_seed(1)
            for step in range(5):
                p.grad = torch.randn(shape, generator=gen).to(pdtype)
                v.grad = torch.randn(7, generator=gen).to(pdtype)
                reported = opt.step_transient_bytes() if step else None
                with _RealLive() as tr:
                    opt.step()
                if step and tr.peak > reported:
                    under.append((shape, pdtype, step, reported, tr.peak))
            assert opt.state_bytes() == _state_tensor_bytes(opt), (shape, pdtype)
    assert not under, under
