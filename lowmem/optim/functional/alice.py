"""Alice (Gong et al. 2025, "Towards Efficient Optimizer Design for LLM via Structured Fisher Approximation
with a Low-Rank Extension", arXiv 2502.07752): the low-rank extension's math, as pure functions.

Alice keeps, per 2-D weight, an orthonormal basis ``U`` (``d x r``, ``d`` the projected side), an ``r x r``
estimate ``Q`` of the gradient's covariance in that basis, Adam's moments of ``sigma = U^T G`` and a
per-channel second moment ``p`` of the gradient left outside the subspace. Every ``K`` steps the basis is
renewed from the tracked covariance (Algorithm "Alice", lines "tracking" and "switching"):

* **tracking**: ``Q~ = beta3 U Q U^T + (1 - beta3) G G^T`` (:func:`tracked_times`, :func:`tracked_rayleigh`:
  never formed, only its products with ``d x r`` matrices: ``O(d r (e + r))`` memory instead of ``d^2``);
* **switching** (:func:`switch`): one step of subspace iteration on ``Q~`` from ``U``, its eigenvectors in that
  subspace (Rayleigh-Ritz, ``eigh`` of an ``r x r`` matrix; optionally signed by :func:`fix_signs_`), the ``l`` leading
  ones kept, and ``r - l`` directions drawn from the complement of the iterated subspace
  (:func:`complement_directions`);
* every step ``Q <- beta3 Q + (1 - beta3) sigma sigma^T`` (:func:`covariance_ema_`; Algorithm 4 line 12 keeps ``Q``'s
  entries across a switch; lowmem's ``carry_covariance=True`` first carries ``Q`` into the new basis,
  :func:`carry_covariance`);
* **compensation** (Algorithm 3, with ``beta = beta1``): ``p <- beta p + (1 - beta) (diag(G^T G) - diag(sigma^T sigma))`` (:func:`residual_moment_`,
  the residual's squared channel norms), ``C = sqrt(d - r) (G - U sigma) Diag(p)^{-1/2}``
  (:func:`compensation_scale`), limited so that ``||C||`` grows by at most ``gamma`` a step
  (:func:`growth_limiter_`);
* the update ``W <- W - lr alpha (U m / (sqrt(v) + eps) + alpha_c C)``.

Functions work in the "left" orientation: ``a`` is ``d x e`` with the basis on its ``d`` rows (the engine passes
``G^T`` and the transposed basis for a right-side projection).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: floor of the residual's second moment: float32's smallest normal number, so that ``p^{-1/2}`` stays finite for a
#: channel whose residual has been exactly zero (its compensation is then 0, the paper's pseudo-inverse); every
#: ``p >= 1.2e-38`` is the paper's ``Diagv(p)^{-1/2}`` unchanged, so the update does not depend on the gradient's
#: scale (pytorch_optimizer floors at 1e-8: its compensation shrinks for gradients with column norms below 1e-4)
P_FLOOR = torch.finfo(torch.float32).tiny


def alice_side(shape: tuple[int, int], proj_type: str) -> str:
    """Which side Alice projects: ``"left"`` (the basis on the ``m`` rows, ``U`` ``m x r``) or ``"right"``.

    ``std`` projects the smaller side with a square weight's **rows** (the paper's convention, Sec. 2.1: ``W`` is
    ``m x n`` with ``m <= n`` and ``U`` in ``R^{m x r}``, i.e. ``"left" if m <= n``; GaLore's
    :func:`~lowmem.optim.functional.galore.galore_side` gives a square weight's columns); ``reverse_std`` the other
    side (``"right" if m <= n``: a square weight's columns); ``left`` / ``right`` are explicit."""
    m, n = shape
    if proj_type == "std":
        return "left" if m <= n else "right"
    if proj_type == "reverse_std":
        return "right" if m <= n else "left"
    return proj_type


def leading_count(rank: int, switch_fraction: float) -> int:
    """``l``, the leading eigenvectors a switch keeps: ``rank - floor(rank * switch_fraction)`` (>= 1 for a
    fraction < 1; the other ``r - l`` directions are drawn from the complement). pytorch_optimizer's default
    ``leading_basis=40`` of ``rank=256`` is ``switch_fraction=0.84375``."""
    return rank - math.floor(rank * switch_fraction)


def tracked_times(a: Tensor, basis: Tensor, q: Tensor, beta3: float, x: Tensor) -> Tensor:
    """``Q~ x`` with ``Q~ = beta3 U Q U^T + (1 - beta3) A A^T`` (tracking), for ``x`` of ``d x k``: a new
    ``d x k`` tensor (``A^T x`` and ``Q U^T x`` are the only other tensors, ``e x k`` and ``r x k``)."""
    out = a @ (a.t() @ x)
    out.mul_(1.0 - beta3)
    return out.addmm_(basis, q @ (basis.t() @ x), alpha=beta3)


def tracked_rayleigh(a: Tensor, basis: Tensor, q: Tensor, beta3: float, x: Tensor) -> Tensor:
    """``x^T Q~ x`` (``k x k``) for an orthonormal ``x``: ``(1 - beta3) (A^T x)^T (A^T x) + beta3 T^T Q T`` with
    ``T = U^T x``."""
    b = a.t() @ x
    h = b.t() @ b
    t = basis.t() @ x
    return h.mul_(1.0 - beta3).add_(t.t() @ q @ t, alpha=beta3)


def subspace_eig(a: Tensor, basis: Tensor, q: Tensor, beta3: float, iters: int,
                 fix_signs: bool = False) -> tuple[Tensor, Tensor]:
    """``iters`` steps of subspace iteration on ``Q~`` from ``basis`` (``X <- qr(Q~ X)``), then the Ritz pairs of
    ``Q~`` in ``span(X)``: eigenvalues in descending order and their ``d x r`` orthonormal eigenvectors (with
    ``fix_signs`` in :func:`fix_signs_`'s convention, else with ``eigh``'s own signs)."""
    x = basis
    for _ in range(iters):
        x = torch.linalg.qr(tracked_times(a, basis, q, beta3, x)).Q
    vals, vecs = torch.linalg.eigh(tracked_rayleigh(a, basis, q, beta3, x))
    vecs = vecs.flip(1)
    return vals.flip(0), x @ (fix_signs_(vecs) if fix_signs else vecs)


def fix_signs_(vecs: Tensor) -> Tensor:
    """``vecs`` (eigenvectors in columns) with each column's largest-magnitude entry made positive, in place.
    ``eigh`` defines an eigenvector up to its sign, and the sign matters: Adam's first moment ``m`` is kept across a
    switch (``moment_policy="keep"``, the paper's), so a flipped basis column turns its row of ``m`` against the
    gradient. Without a convention two correct implementations (or one on two LAPACKs, or FSDP2's shards summing in
    another order) can part at a switch where rounding flips ``eigh``'s choice: the paper loop and the engine by 0.5
    of an entry 3 steps after one (a 40 x 24 weight at rank 20), 2 processes and one by 3% of the movement; with it,
    to float32 rounding. (A column whose two largest entries have equal magnitudes and opposite signs stays
    ambiguous.)"""
    top = vecs.gather(0, vecs.abs().argmax(0, keepdim=True))
    return vecs.mul_(top.sign_())


def complement_directions(vecs: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` orthonormal directions drawn uniformly (Haar) from the orthogonal complement of ``span(vecs)``
    (``vecs`` orthonormal, ``d x r``, ``count <= d - r``): a Gaussian ``d x count`` draw on ``generator``'s device
    (the recipe's is the basis's: no host-to-device copy; a generator on another device's draw is copied there;
    ``None``: torch's default generator of ``vecs``' device, the meta tensors' count), projected off ``vecs`` twice
    (re-orthogonalisation), then QR."""
    device = vecs.device if generator is None else generator.device
    x = torch.randn(vecs.shape[0], count, generator=generator, device=device).to(vecs.device)
    for _ in range(2):
        x.sub_(vecs @ (vecs.t() @ x))
    return torch.linalg.qr(x).Q


def switch(a: Tensor, basis: Tensor, q: Tensor, beta3: float, leading: int, iters: int,
           generator: torch.Generator | None, fix_signs: bool = False) -> Tensor:
    """Switching: the new ``d x r`` basis from the tracked covariance. Its first ``leading`` columns are the
    leading Ritz vectors of :func:`subspace_eig`; the other ``r - l`` are drawn from the complement of the
    iterated subspace (:func:`complement_directions`). When that complement has fewer than ``r - l``
    dimensions (``d - r < r - l``), all of them are drawn and the next Ritz vectors fill the rest."""
    rank = basis.shape[1]
    _, vecs = subspace_eig(a, basis, q, beta3, iters, fix_signs)
    k = rank - leading
    c = min(k, a.shape[0] - rank)
    parts = [vecs[:, : leading + k - c]]
    if c > 0:
        parts.append(complement_directions(vecs, c, generator))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].contiguous()


def carry_covariance(q: Tensor, old: Tensor, new: Tensor) -> Tensor:
    """``Q`` in the new basis' coordinates: ``T Q T^T`` with ``T = U_new^T U_old`` (the tracked low-rank
    covariance ``U_old Q U_old^T`` seen from ``U_new``). With the step's ``covariance_ema_`` the new ``Q`` is
    ``U_new^T Q~ U_new``."""
    t = new.t() @ old
    return t @ q @ t.t()


def covariance_ema_(q: Tensor, sigma: Tensor, beta3: float, left: bool) -> Tensor:
    """``Q <- beta3 Q + (1 - beta3) sigma sigma^T`` in place (``sigma`` ``r x e``; ``left=False``: ``sigma`` is
    ``e x r`` (a right-side projection's ``G Q^T``) and the product is ``sigma^T sigma``)."""
    if left:
        return q.addmm_(sigma, sigma.t(), beta=beta3, alpha=1.0 - beta3)
    return q.addmm_(sigma.t(), sigma, beta=beta3, alpha=1.0 - beta3)


def residual_moment_(p: Tensor, residual_sq: Tensor, beta: float) -> Tensor:
    """``p <- beta p + (1 - beta) ||R_j||^2`` per channel, floored at :data:`P_FLOOR` (compensation, line 1:
    ``diag(G^T G) - diag(sigma^T sigma)`` is the residual ``R = G - U sigma``'s squared column norms)."""
    return p.lerp_(residual_sq, 1.0 - beta).clamp_min_(P_FLOOR)


def compensation_scale(p: Tensor, side: int, rank: int) -> Tensor:
    """The per-channel factor of the compensation ``C = sqrt(d - r) R Diag(p)^{-1/2}``: ``sqrt(d - r) / sqrt(p)``
    (``side`` = ``d``)."""
    return p.rsqrt().mul_(math.sqrt(side - rank))


def growth_limiter_(norm: Tensor, previous_norm: Tensor, gamma: float) -> Tensor:
    """The divisor that keeps ``||C_t|| <= gamma ||C_{t-1}||``: ``max(||C_t|| / ||C_{t-1}||, gamma) / gamma``, 1
    while no previous norm exists (``previous_norm <= 0``: the first step, or a zero compensation); records
    ``||C_t|| / divisor`` in ``previous_norm`` (0-d tensors, no host read)."""
    first = previous_norm <= 0
    ratio = norm / torch.where(first, torch.ones_like(previous_norm), previous_norm)
    limiter = torch.where(first, torch.ones_like(norm), torch.clamp(ratio, min=gamma) / gamma)
    previous_norm.copy_(norm / limiter)
    return limiter


def growth_limiter_foreach_(norms: Tensor, previous_norms: list[Tensor], gamma: float) -> Tensor:
    """:func:`growth_limiter_` of ``B`` compensations at once: ``norms`` ``[B]`` and their 0-d ``previous_norms``
    (updated in place, one multi-tensor copy). The same quotient, clamp and selection per element as the
    per-parameter form (a previous norm ``<= 0`` selects 1; its quotient is discarded). Returns the divisors ``[B]``."""
    previous = torch.stack(previous_norms)
    first = previous <= 0
    limiter = torch.where(first, torch.ones_like(norms), torch.clamp(norms / previous, min=gamma) / gamma)
    torch._foreach_copy_(previous_norms, list((norms / limiter).unbind(0)))
    return limiter
