"""lowmem's optimizers against the AUTHORS' step, where the two differed (docs/optimizers.md,
docs/subspace.md: "Against the authors' code").

Each expected value is computed here from the paper's equations with plain torch (and, where the
authors' code steps a piece with a torch optimizer, that torch optimizer), never with lowmem's
functions, so a mistake in lowmem cannot hide in the check.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim import create_optimizer

# ---- Online Subspace Descent (kyleliang919/Online-Subspace-Descent, galore_torch/galore_projector.py) ----


def _osd_plain(p0, grads, *, lr, rank, gap, proj_optimizer, lr_lambda, betas=(0.9, 0.999), eps=1e-6, wd=0.0):
    """OSD (Liang et al. 2024, Algorithm 1) as the authors run it: P_0 from the SVD of G_0 (left basis
    for a wide matrix, right for a tall one); GaLore's AdamW on ``P^T G`` (eps on the raw sqrt(v),
    decay after the step); after each step but the first, the basis takes one step of a
    torch optimizer (``torch.optim.AdamW`` with its default weight decay 0.01, or ``torch.optim.SGD``)
    on ``||G_n - P P^T G_n||^2``, ``G_n = G / ||G||``, with the step size ``1 / gap * lr_t / lr_0``."""
    b1, b2 = betas
    p, m, v, basis, opt = p0.clone(), None, None, None, None
    left = p0.shape[0] < p0.shape[1]
    for t, g in enumerate(grads, start=1):
        lr_t = lr * lr_lambda(t - 1)
        learn = basis is not None
        if basis is None:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            basis = (u[:, :rank] if left else vh[:rank]).clone().requires_grad_(True)
            opt = (torch.optim.AdamW([basis], lr=1.0 / gap) if proj_optimizer == "adam"
                   else torch.optim.SGD([basis], lr=1.0 / gap))
        if learn:
            with torch.enable_grad():
                gn = g / g.norm()
                b = basis
                err = gn - b @ (b.t() @ gn) if left else gn - (gn @ b.t()) @ b
                loss = err.norm() ** 2
                basis.grad = torch.autograd.grad(loss, basis)[0]
        b = basis.detach()
        low = b.t() @ g if left else g @ b.t()
        m = torch.zeros_like(low) if m is None else m
        v = torch.zeros_like(low) if v is None else v
        m = b1 * m + (1 - b1) * low
        v = b2 * v + (1 - b2) * low * low
        n = m / (v.sqrt() + eps)
        step = lr_t * math.sqrt(1 - b2**t) / (1 - b1**t)
        p = p - step * (b @ n if left else n @ b)
        p = p - lr_t * wd * p
        if learn:
            for grp in opt.param_groups:
                grp["lr"] = 1.0 / gap * lr_t / lr
            with torch.no_grad():
                opt.step()
            basis.grad = None
    return p


@pytest.mark.parametrize("proj_optimizer,schedule", [("adam", False), ("adam", True), ("sgd", True)])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_osd_basis_step_as_the_authors(shape, proj_optimizer, schedule):
    """The basis optimizer decays the basis as the authors' ``torch.optim.AdamW`` (weight decay
    0.01; lowmem had none: 4.3e-3 of the update apart after 20 steps) and its step size follows the
    learning-rate schedule (``lr_t / lr_0``; lowmem kept ``proj_lr``: 0.28 apart under ``1 / (t + 1)``)."""
    torch.manual_seed(0)
    gap, lr, steps = 4, 1e-2, 10
    p0 = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(steps)]
    lam = (lambda s: 1.0 / (s + 1)) if schedule else (lambda s: 1.0)
    expected = _osd_plain(p0, grads, lr=lr, rank=3, gap=gap, proj_optimizer=proj_optimizer, lr_lambda=lam)
    w = torch.nn.Parameter(p0.clone())
    opt = create_optimizer([w], "osd_adamw", lr=lr, rank=3, proj_lr=1.0 / gap, proj_optimizer=proj_optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        sched.step()
    moved = (expected - p0).abs().max()
    assert ((w.detach() - expected).abs().max() / moved).item() < 1e-4


def test_osd_proj_weight_decay_is_validated():
    with pytest.raises(ValueError, match=r"Invalid proj_weight_decay=-1.0 .*None or a finite float >= 0"):
        create_optimizer([torch.nn.Parameter(torch.zeros(8, 12))], "osd_adamw", rank=2, proj_weight_decay=-1.0)


# ---- Subspace-Momentum (timmytonga/sn-sm, GenericOptim.py + subspace_momentum.py + projectors/svd_projector.py) ----


def _sgd_sm_plain(p0, grads, *, lr, rank, gap, momentum, wd):
    """Subspace-Momentum (Nguyen & Nguyen, Section 4) on the authors' schedule: the step counter is
    incremented first, the SVD basis is drawn at step 1 and at every step ``t % T == 0`` (GaLore's side:
    right ``Vh[:r]`` for a tall or square matrix, left ``U[:, :r]`` for a wide one) and the momentum
    restarts from zero there; ``u = P m + (G - P P^T G)``, ``p <- p - lr u``, then ``p <- p - lr wd p``."""
    p, m, basis = p0.clone(), None, None
    right = p0.shape[0] >= p0.shape[1]
    for t, g in enumerate(grads, start=1):
        if basis is None or t % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            basis = vh[:rank] if right else u[:, :rank]
            m = None
        low = g @ basis.t() if right else basis.t() @ g
        m = (1 - momentum) * low if m is None else momentum * m + (1 - momentum) * low
        up = (lambda x: x @ basis) if right else (lambda x: basis @ x)
        p = p - lr * (up(m) + g - up(low))
        p = p - lr * wd * p
    return p


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_subspace_momentum_refreshes_at_multiples_of_the_gap(shape):
    """sgd_sm draws its basis at steps 1, T, 2T, ... as the authors' code (lowmem drew it at 1, T+1, ...:
    0.36 of the weights' movement apart after 20 steps at T = 5)."""
    torch.manual_seed(0)
    p0 = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(9)]
    expected = _sgd_sm_plain(p0, grads, lr=1e-2, rank=3, gap=4, momentum=0.9, wd=0.1)
    w = torch.nn.Parameter(p0.clone())
    opt = create_optimizer([w], "sgd_sm", lr=1e-2, weight_decay=0.1, rank=3, update_proj_gap=4)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    moved = (expected - p0).abs().max()
    assert ((w.detach() - expected).abs().max() / moved).item() < 1e-4
