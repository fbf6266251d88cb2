"""Online Subspace Descent (Liang et al. 2024, "Memory-Efficient LLM Training with Online Subspace
Descent"): the projection is learned online, by a small optimizer step on the PCA objective.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .norms import float_norm


def pca_loss_grad(basis: Tensor, g: Tensor, side: str, g_norm: Tensor | None = None,
                  g_proj: Tensor | None = None) -> Tensor:
    """Gradient in ``P`` of the reconstruction loss of the normalized gradient (Section 3, eq. 5):

    ``L(P) = || G_n - P P^T G_n ||_F^2`` for a left basis ``P`` (``m x r``), ``G_n = G / ||G||``;
    for a right basis ``Q`` (``r x n``), ``L(Q) = || G_n - G_n Q^T Q ||_F^2``. In closed form
    (``E`` the reconstruction error): ``dL/dP = -2 (E G_n^T + G_n E^T) P`` and
    ``dL/dQ = -2 Q (E^T G_n + G_n^T E)``. No SVD is needed after the first.

    Evaluated in factored form so that nothing of ``G``'s size is allocated: with
    ``A = P^T G_n`` (``r x n``) and ``B = G_n A^T`` (``m x r``), ``dL/dP = 2 (P A A^T + B (P^T P - 2 I))``;
    with ``C = G_n Q^T`` (``m x r``) and ``D = C^T G_n`` (``r x n``),
    ``dL/dQ = 2 ((Q Q^T - 2 I) D + C^T C Q)``. ``g_norm``: ``||G||`` when the caller has it
    (:func:`~lowmem.optim.functional.norms.float_norm` of ``g``; computed here otherwise).
    ``g_proj``: ``P^T G`` (left) or ``G Q^T`` (right) of a float32 ``g`` when the caller has it (the
    step's projected gradient: the same product, so the same values); saves one ``m x n x r`` product.
    """
    dtype = basis.dtype
    inv_norm = 1.0 / (float_norm(g) if g_norm is None else g_norm).to(dtype)
    eye = torch.eye(basis.shape[1] if side == "left" else basis.shape[0], dtype=dtype, device=basis.device)
    if g.dtype != dtype:  # low precision: converted a block of rows at a time (no full-size copy)
        bounds = [(i, min(i + 512, g.shape[0])) for i in range(0, g.shape[0], 512)]
        if side == "left":
            a = sum(basis[i:j].t() @ g[i:j].to(dtype) for i, j in bounds).mul_(inv_norm)
            b = torch.cat([g[i:j].to(dtype) @ a.t() for i, j in bounds]).mul_(inv_norm)
            return 2 * (basis @ (a @ a.t()) + b @ (basis.t() @ basis - 2 * eye))
        c = torch.cat([g[i:j].to(dtype) @ basis.t() for i, j in bounds]).mul_(inv_norm)
        d = sum(c[i:j].t() @ g[i:j].to(dtype) for i, j in bounds).mul_(inv_norm)
        return 2 * ((basis @ basis.t() - 2 * eye) @ d + (c.t() @ c) @ basis)
    if side == "left":
        a = (basis.t() @ g).mul_(inv_norm) if g_proj is None else g_proj * inv_norm
        b = (g @ a.t()).mul_(inv_norm)
        return 2 * (basis @ (a @ a.t()) + b @ (basis.t() @ basis - 2 * eye))
    c = (g @ basis.t()).mul_(inv_norm) if g_proj is None else g_proj * inv_norm
    d = (c.t() @ g).mul_(inv_norm)
    return 2 * ((basis @ basis.t() - 2 * eye) @ d + (c.t() @ c) @ basis)


class _Live:
    """Bytes of named tensors alive together and the peak while they come and go (for :func:`pca_loss_grad_bytes`)."""

    def __init__(self, **live: int):
        self.live = dict(live)
        self.peak = sum(self.live.values())

    def new(self, name: str, nbytes: int) -> None:
        """``name`` bound to a new tensor of ``nbytes`` (the one it named is freed after)."""
        self.peak = max(self.peak, sum(self.live.values()) + nbytes)
        self.live[name] = nbytes

    def free(self, *names: str) -> None:
        for name in names:
            self.live.pop(name, None)


def pca_loss_grad_bytes(rows: int, cols: int, rank: int, side: str, low_precision: bool, proj_given: bool,
                        block_rows: int = 512) -> tuple[int, int]:
    """``(peak, out)``: the bytes :func:`pca_loss_grad` of a float32 basis allocates at most (its result
    included) and its result's (the basis's size), for a ``rows x cols`` gradient (``low_precision``: converted
    ``block_rows`` rows at a time; else float32, ``proj_given``: its projection passed as ``g_proj``), as its
    operations run (traced: tests/test_galoreexact_per_parameter.py)."""
    m, n, r = rows, cols, rank
    basis = 4 * (m * r if side == "left" else r * n)
    low = 4 * (r * n if side == "left" else m * r)
    rr = 4 * r * r
    t = _Live()
    t.new("recip", 4)  # 1 / norm: a reciprocal and its product
    t.new("inv", 4)
    t.free("recip")
    t.new("eye", rr)
    first, second = ("a", "b") if side == "left" else ("c", "d")
    if not low_precision:
        t.new(first, low)  # g_proj * inv_norm, or the product (scaled in place)
        t.new(second, basis)  # G a^T (left) / c^T G (right), scaled in place
    else:
        bounds = [(i, min(i + block_rows, m)) for i in range(0, m, block_rows)]
        blocks = [4 * (j - i) * n for i, j in bounds]
        if side == "left":  # a = sum of r x n products (Python's sum: a new tensor each), b = cat of b x r parts
            for i, blk in enumerate(blocks):
                t.new("copy", blk)
                t.new("prod", low)
                t.free("copy")
                t.new("acc" if i else "acc0", low)  # (0 + the first product: a new tensor too)
                t.free("prod", "acc0")
            t.live["a"] = t.live.pop("acc", low)
            for i, ((lo, hi), blk) in enumerate(zip(bounds, blocks)):
                t.new("copy", blk)
                t.new(f"part{i}", 4 * (hi - lo) * r)
                t.free("copy")
            t.new("b", basis)
            t.free(*[f"part{i}" for i in range(len(bounds))])
        else:  # c = cat of b x r parts, d = sum of r x n products
            for i, ((lo, hi), blk) in enumerate(zip(bounds, blocks)):
                t.new("copy", blk)
                t.new(f"part{i}", 4 * (hi - lo) * r)
                t.free("copy")
            t.new("c", low)
            t.free(*[f"part{i}" for i in range(len(bounds))])
            for i, blk in enumerate(blocks):
                t.new("copy", blk)
                t.new("prod", basis)
                t.free("copy")
                t.new("acc" if i else "acc0", basis)
                t.free("prod", "acc0")
            t.live["d"] = t.live.pop("acc", basis)
    if side == "left":  # 2 (P (a a^T) + b (P^T P - 2 I))
        t.new("aa", rr)
        t.new("x", basis)
        t.free("aa")
        t.new("pp", rr)
        t.new("two_eye", rr)
        t.new("sub", rr)
        t.free("pp", "two_eye")
        t.new("y", basis)
        t.free("sub")
    else:  # 2 ((Q Q^T - 2 I) d + (c^T c) Q)
        t.new("qq", rr)
        t.new("two_eye", rr)
        t.new("sub", rr)
        t.free("qq", "two_eye")
        t.new("x", basis)
        t.free("sub")
        t.new("cc", rr)
        t.new("y", basis)
        t.free("cc")
    t.new("sum", basis)
    t.free("x", "y")
    t.new("out", basis)
    return t.peak, basis


#: ``torch.optim.AdamW``'s default ``weight_decay``: the authors' basis optimizer
#: (kyleliang919/Online-Subspace-Descent ``galore_projector.py``: ``torch.optim.AdamW([P], lr=1/update_proj_gap)``)
#: decays the basis with it; their ``torch.optim.SGD`` basis has none.
AUTHORS_PROJ_WEIGHT_DECAY = {"adam": 0.01, "sgd": 0.0}


def basis_step_settings(proj_lr: float, proj_weight_decay: float | None, proj_optimizer: str,
                        lr: Any = None, initial_lr: Any = None) -> tuple[float, float]:
    """``(step size, weight decay)`` of the basis optimizer at this step.

    The step size follows the learning-rate schedule, as the authors' code sets it before every basis
    step: ``proj_lr * lr_t / lr_0`` (their ``1 / update_proj_gap * group["lr"] / init_lr``); ``lr_0``
    is the group's ``initial_lr`` (set by torch's LR schedulers): without one, or with ``lr_0 = 0``,
    the step size is ``proj_lr``. ``proj_weight_decay=None``: the authors' (torch's default of their
    basis optimizer, :data:`AUTHORS_PROJ_WEIGHT_DECAY`): 0.01 for ``adam`` (``torch.optim.AdamW``,
    decoupled ``P <- P (1 - step wd)`` before the Adam step), 0 for ``sgd`` (``torch.optim.SGD``,
    whose weight decay adds ``wd P`` to the basis gradient)."""
    wd = AUTHORS_PROJ_WEIGHT_DECAY[proj_optimizer] if proj_weight_decay is None else float(proj_weight_decay)
    if initial_lr is None or lr is None or float(initial_lr) == 0.0:
        return float(proj_lr), wd
    return float(proj_lr) * float(lr) / float(initial_lr), wd


def pca_loss_grad_stacked(bases: list[Tensor], gs: list[Tensor], side: str, norms: Tensor,
                          projs: list[Tensor | None]) -> Tensor:
    """:func:`pca_loss_grad` of ``k`` parameters of one shape at once (float32 bases and gradients; the
    multi-tensor basis step, issue 15), stacked ``k x m x r`` (left) or ``k x r x n`` (right).

    The same factored form (Section 3, eq. 5): per parameter only the products with its gradient
    (``B = G_n A^T`` / ``D = C^T G_n``, and ``A = P^T G`` / ``C = G Q^T`` where ``projs`` has none),
    written into the stacks; the ``r``-deep products, ``P^T P - 2 I`` and the sum are one batched kernel
    each (``bmm`` / ``baddbmm_``) instead of one per parameter. Equal to :func:`pca_loss_grad` of each to
    float32 rounding (a batched GEMM may sum in another order). Allocates, beyond the result, the stacked
    bases and the stacked ``A`` / ``C`` and ``B`` / ``D`` (:func:`stacked_grad_bytes`)."""
    k = len(bases)
    basis = torch.stack(bases)
    inv = norms.to(basis.dtype).reciprocal().view(k, 1, 1)  # 1 / ||G|| (as 1.0 / norm), norms: ``(k,)``
    if side == "left":  # basis P: k x m x r, G: m x n
        a = _stacked_products(projs, lambda i: (bases[i].t(), gs[i])).mul_(inv)
        b = torch.empty(k, basis.shape[1], basis.shape[2], dtype=basis.dtype, device=basis.device)
        for i, g in enumerate(gs):
            torch.mm(g, a[i].t(), out=b[i])
        b.mul_(inv)
        aat = torch.bmm(a, a.transpose(1, 2))
        del a
        ptp = torch.bmm(basis.transpose(1, 2), basis)
        ptp.diagonal(dim1=1, dim2=2).sub_(2.0)  # P^T P - 2 I (the same bits)
        out = torch.bmm(basis, aat)
        del basis, aat
        return out.baddbmm_(b, ptp).mul_(2.0)
    # right: basis Q: k x r x n, G: m x n
    c = _stacked_products(projs, lambda i: (gs[i], bases[i].t())).mul_(inv)
    d = torch.empty_like(basis)
    for i, g in enumerate(gs):
        torch.mm(c[i].t(), g, out=d[i])
    d.mul_(inv)
    ctc = torch.bmm(c.transpose(1, 2), c)
    del c
    qqt = torch.bmm(basis, basis.transpose(1, 2))
    qqt.diagonal(dim1=1, dim2=2).sub_(2.0)  # Q Q^T - 2 I
    out = torch.bmm(qqt, d)
    del d, qqt
    return out.baddbmm_(ctc, basis).mul_(2.0)


def _stacked_products(projs: list[Tensor | None], factors) -> Tensor:
    """``torch.stack`` of the projected gradients, each missing one computed as ``x @ y`` of ``factors(i)``."""
    if all(p is not None for p in projs):
        return torch.stack(projs)
    return torch.stack([p if p is not None else torch.mm(*factors(i)) for i, p in enumerate(projs)])


def stacked_grad_bytes(basis_numel: int, low_numel: int, rank: int) -> int:
    """Bytes :func:`pca_loss_grad_stacked` holds at its peak per parameter (float32): the stacked basis,
    ``A`` / ``C`` (the projected gradient's size) and ``B`` / ``D`` (the basis's), the two ``r x r``
    products and the result (the basis's size); ``A`` / ``C`` is freed before the result is allocated."""
    return 4 * (max(2 * basis_numel + low_numel, 3 * basis_numel) + 2 * rank * rank)
