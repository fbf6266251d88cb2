"""Alice (Gong et al. 2025, arXiv 2502.07752, Algorithm "Alice": the low-rank extension with tracking,
switching and compensation) as a chain of engine parts.

* :class:`AliceProjection` - the basis ``U`` of the projected side (:func:`~lowmem.optim.functional.alice.alice_side`:
  ``proj_type="std"`` the smaller side, a square weight's rows as the paper's ``m <= n``; GaLore's rule gives its
  columns) (the engine's
  :class:`~lowmem.optim.subspace.SubspaceProjection` geometry, state and project-down / up) with Alice's refresh:
  the first refresh takes the top-``r`` singular vectors of ``G`` (the eigenvectors of ``G G^T``, as GaLore's
  SVD), every later one tracks the covariance ``Q~ = beta3 U Q U^T + (1 - beta3) G G^T`` and switches
  (:func:`~lowmem.optim.functional.alice.switch`: one subspace iteration, the ``l`` leading Ritz vectors, ``r - l``
  directions drawn from the complement); ``Q`` keeps its entries (the paper's line 12; ``carry_covariance=True``
  carries it into the new basis). Refreshes at steps 1, K, 2K, ... (``refresh_phase="multiples"``, Algorithm 4 line 5).
  State: GaLore's ``proj_meta`` and
  basis, plus ``proj_cov`` (``r x r``).
* Adam's moments of ``sigma = U^T G`` (:class:`~lowmem.optim.moments.AdamMoments`, ``eps`` on the raw
  ``sqrt(v)``); the paper's update has no bias correction (``bias_correction=False``, the default), which the
  combine-back divides out of the moment rule's direction (a scalar).
* :class:`AliceCompensation` - the combine-back: ``Q <- beta3 Q + (1 - beta3) sigma sigma^T``, the residual's
  channel second moment ``p``, and ``alpha (U d + alpha_c limit(sqrt(d - r) (G - U sigma) Diag(p)^{-1/2}))``,
  folded into one GEMM per block of rows like Fira's residual. State: ``alice_p`` (one float per channel: a
  column of ``G`` for a left basis, a row for a right one) and ``alice_phi`` (0-d, the limiter's last norm).

Weight decay is decoupled and applied after the update (the engine's bucketed path for ``eps`` on the raw
``sqrt(v)``); 1-D parameters and weights whose smaller side is ``<= rank`` take AdamW steps with the same
moments. FSDP2: :meth:`AliceCompensation.sharded_direction` steps a shard of rows (its reductions there; a right
basis's ``alice_p`` is checkpointed as rows of the whole ``(m,)``: it reshards).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from ..._warn import warn_user
from ..engine import Recipe
from ..functional import alice as AL
from ..functional import galore as GL
from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam, in_unit_interval, is_bool, nonneg, optional, positive
from ..moments import AdamMoments
from ..registry import register
from ..subspace import CombineRule, SubspaceProjection, _meta, _usable, _Walk
from .subspace import (_choice, _nonneg_int, adam_hf_unit_scale, check_projected_state_dtype, check_rank_applies,
                       subspace_hparams)


def _side_key(state: dict[str, Tensor]) -> str:
    return "proj_left" if "proj_left" in state else "proj_right"


class AliceProjection(SubspaceProjection):
    """A one-sided basis renewed by Alice's tracking and switching (module docstring). Its geometry, state,
    project-down / up, schedule (``update_proj_gap``, ``refresh_phase``) and moment policy at a refresh are
    :class:`~lowmem.optim.subspace.SubspaceProjection`'s for ``projection="svd"``.

    Group keys: ``rank``, ``update_proj_gap``, ``proj_type`` (not ``full``), ``refresh_phase``, ``seed``,
    ``first_basis``, ``power_iters`` (subspace iterations per switch), ``beta3``, ``switch_fraction``,
    ``fix_signs``.
    State: ``proj_meta``, ``proj_left`` or ``proj_right``, ``proj_cov`` (``r x r`` float32)."""

    state_keys = SubspaceProjection.state_keys + ("proj_cov",)

    @staticmethod
    def method(group: dict[str, Any]) -> str:
        """The first refresh's method, whose counts (MKL's kept buffers, LAPACK's workspace) the parent's apply:
        ``first_basis`` (``"svd"``, the default: an exact SVD; ``"rsvd"``: GaLore's randomized range finder)."""
        return group.get("first_basis", "svd")

    def _side(self, shape, group) -> str:
        """Alice's side rule (:func:`~lowmem.optim.functional.alice.alice_side`: ``std`` puts a square weight's
        basis on its rows, the paper's ``m <= n``), which the engine's geometry, state, bytes and FSDP2 paths read."""
        return AL.alice_side(tuple(shape), group["proj_type"])

    def init_state(self, state, param, group, matrix=None):
        super().init_state(state, param, group, matrix)
        r = group["rank"]
        state["proj_cov"] = torch.zeros((r, r), dtype=torch.float32, device=param.device)

    def refresh(self, g, state, group, checked=False):
        """The first refresh: the top-``r`` singular vectors of ``G`` (``first_basis="svd"``; ``"rsvd"``: GaLore's
        randomized range finder, ``power_iters`` iterations, :func:`~lowmem.optim.functional.galore.range_finder`,
        their approximation); later ones: tracking and switching
        (:func:`~lowmem.optim.functional.alice.switch`) from the basis and ``Q``; with ``carry_covariance`` ``Q`` is
        carried into the new basis (:func:`~lowmem.optim.functional.alice.carry_covariance`). A zero or non-finite
        gradient, or
        a failing factorization, keeps the subspace (with a warning), as every data-dependent refresh."""
        if not checked and not _usable(g):
            warn_user(f"projection refresh skipped: the gradient of a {tuple(g.shape)} parameter is zero or not"
                      " finite; keeping the previous subspace")
            return False
        seed, _, refreshes = _meta(state)[:3]
        key = _side_key(state)
        left = key == "proj_left"
        g = g.float()
        try:
            if refreshes == 0 and group["first_basis"] == "rsvd":  # (Halko et al. 2011: G's top-r left space)
                gen = torch.Generator().manual_seed(seed * 7919 + refreshes)  # (range_finder draws on the CPU)
                new = GL.range_finder(g if left else g.t(), group["rank"], gen, group["power_iters"])
                state[key].copy_(new if left else new.t())
            elif refreshes == 0:
                new = GL.svd_basis(g, group["rank"], "left" if left else "right")[0 if left else 1]
                state[key].copy_(new)
            else:
                a = g if left else g.t()
                old = state[key] if left else state[key].t()
                gen = switch_generator(g, seed * 7919 + refreshes)
                leading = AL.leading_count(group["rank"], group["switch_fraction"])
                new = AL.switch(a, old, state["proj_cov"], group["beta3"], leading, group["power_iters"], gen,
                                group["fix_signs"])
                if group["carry_covariance"]:  # (lowmem's variant; the paper's line 12 keeps Q's entries)
                    q = AL.carry_covariance(state["proj_cov"], old, new)
                    state["proj_cov"].copy_(q)
                    del q
                state[key].copy_(new if left else new.t())
        except RuntimeError as err:  # torch.linalg.LinAlgError and friends
            warn_user(f"projection refresh failed ({err}); keeping the previous subspace")
            return False
        state["proj_meta"][2] += 1
        return True

    def _first_bytes(self, shape, group, state) -> int:
        """The first refresh's peak: GaLore's count of an exact SVD (``first_basis="svd"``) or of a ``rsvd`` refresh
        (:meth:`~lowmem.optim.subspace.SubspaceProjection._rsvd_bytes`, a bound of its range finder), sized for
        the device the basis is on."""
        m, n = shape
        with GL.blas_device(self._basis_device(state)):
            return GL.svd_refresh_bytes(m, n) if self.method(group) == "svd" else self._rsvd_bytes(shape, group)

    def transient_bytes(self, shape, group, state, refresh):
        """A plain step: the projected gradient. A refresh: the larger of the first one (an exact SVD, GaLore's
        count; ``first_basis="rsvd"``: GaLore's ``rsvd`` count) and a switch (:func:`switch_bytes`), beside the old
        basis's copy and the moments' rotation with ``moment_policy="rotate"``."""
        if not refresh:
            return super().transient_bytes(shape, group, state, refresh)
        m, n = shape
        work = self._first_bytes(shape, group, state)
        left = self._side(shape, group) == "left"
        d, e = (m, n) if left else (n, m)
        r = group["rank"]
        work = max(work, switch_bytes(d, e, r, AL.leading_count(r, group["switch_fraction"]), group["power_iters"]))
        if group.get("moment_policy") != "rotate":
            return work
        snapshot, rotation = self.rotate_bytes(shape, group)
        return snapshot + max(work, rotation)

    def untraced_refresh_bytes(self, shape, group):
        """The exact SVD's LAPACK copy and workspace (the first refresh's; GaLore's count; ``first_basis="rsvd"``:
        GaLore's ``rsvd`` count of what its traced tensors leave out), or a switch's LAPACK workspace (QR and
        ``eigh``), whichever refresh the report's count is."""
        m, n = shape
        left = self._side(shape, group) == "left"
        d, e = (m, n) if left else (n, m)
        r = group["rank"]
        svd = self._first_bytes(shape, group, {})
        sw = switch_bytes(d, e, r, AL.leading_count(r, group["switch_fraction"]), group["power_iters"])
        if sw > svd:
            return sw - switch_bytes(d, e, r, AL.leading_count(r, group["switch_fraction"]), group["power_iters"],
                                     workspace=False)
        return super().untraced_refresh_bytes(shape, group)


def switch_generator(g: Tensor, seed: int) -> torch.Generator | None:
    """The generator of a switch's complement draw: on the gradient's device (a CUDA basis draws there: no
    host-to-device copy per switch), seeded from the refresh's seed and count (``proj_meta``: a run and a run
    resumed from its checkpoint draw the same directions on the same kind of device; a CPU and a CUDA run draw
    different ones, from different generators); ``None`` on a meta or fake tensor (nothing drawn: the estimator's
    and ``lowmem bench --launches``' counts)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if g.device.type == "meta" or isinstance(g, FakeTensor):
        return None
    return torch.Generator(device=g.device).manual_seed(seed)


def switch_bytes(d: int, e: int, r: int, leading: int, iters: int, workspace: bool = True) -> int:
    """An upper bound of what a switch allocates (:func:`~lowmem.optim.functional.alice.switch` and
    :func:`~lowmem.optim.functional.alice.carry_covariance`; ``d`` the projected side, ``e`` the other):
    the iteration's ``A^T X`` (``e r``), ``Q~ X`` and QR's ``Q`` and ``R`` (``2 d r + r^2``) beside the iterate
    (``d r``), the Rayleigh quotient's ``A^T X`` and ``r x r`` products, the Ritz vectors (``d r``), the
    complement's draw and its projections (``3 d c``) and QR, the new basis (``d r``) and the carried ``Q``'s
    ``r x r`` products; ``workspace``: LAPACK's blocked QR and ``eigh`` workspace (``4 d min(r, 128)`` and
    ``(1 + 6 r + 2 r^2)`` floats). ``fix_signs``' pass over the ``r x r`` rotation (its magnitudes, their
    maxima's indices and entries) runs below that peak (traced equal with and without it on the five shapes of
    ``tests/test_alice.py::test_switch_allocates_within_its_bound``)."""
    c = min(r - leading, d - r)
    floats = 3 * d * r + max(e * r + d * r + r * r, e * r + 4 * r * r, 3 * d * max(c, 1) + d * r) + 4 * r * r + d * r
    if workspace:
        floats += d * min(r, 128) + 1 + 6 * r + 2 * r * r
    return 4 * floats


class AliceCompensation(CombineRule):
    """Alice's combine-back: ``alpha (U d / c + alpha_c limit(C))`` with ``C = sqrt(d - r) (G - U sigma)
    Diag(p)^{-1/2}`` (compensation), ``c`` the bias correction the moment rule folded into ``d`` (divided out
    with ``bias_correction=False``, the paper's update), and the per-step covariance EMA of the tracking.

    The residual's channel norms come from one pass over the rows (``G - U sigma`` a block at a time: the
    squared norms ``diag(G^T G) - diag(sigma^T sigma)`` of the paper without its cancellation); ``p`` and the
    limiter's norm ``||C|| = sqrt(sum_j k_j^2 ||R_j||^2)`` (``k = sqrt(d - r) / sqrt(p)``) follow from them. The
    direction is folded like Fira's: ``up(a d - b sigma * k) + G * (b k)`` per block of rows, one GEMM
    (``a = alpha / c``, ``b = alpha alpha_c / limiter``; ``k`` scales columns of ``U sigma`` for a left basis,
    rows of ``sigma Q`` for a right one, and commutes with the product).

    Group keys: ``scale`` (alpha), ``alpha_c``, ``gamma``, ``comp_beta`` (``None``: ``beta1``), ``beta3``,
    ``bias_correction``. State: ``alice_p`` (float32, one per channel), ``alice_phi`` (0-d float32, -1 before the first step)."""

    state_keys = ("alice_p", "alice_phi")
    needs_full_gradient = True

    def init_state(self, state, param, group):
        left = AL.alice_side(tuple(param.shape[-2:]), group["proj_type"]) == "left"
        channels = param.shape[-1] if left else param.shape[-2]
        state["alice_p"] = torch.zeros(channels, dtype=torch.float32, device=param.device)
        state["alice_phi"] = torch.full((), -1.0, dtype=torch.float32, device=param.device)

    def init_state_sharded(self, state, shard, param, group):
        """FSDP2 (a shard of rows of the ``DTensor`` ``param``): ``p`` of every column for a left basis
        (replicated), of the shard's rows for a right one; the side from the global shape."""
        left = AL.alice_side(tuple(param.shape[-2:]), group["proj_type"]) == "left"
        channels = param.shape[-1] if left else shard.shape[-2]
        state["alice_p"] = torch.zeros(channels, dtype=torch.float32, device=shard.device)
        state["alice_phi"] = torch.full((), -1.0, dtype=torch.float32, device=shard.device)

    @staticmethod
    def _subspace_scale(state, group) -> float:
        a = group["scale"]
        return a if group["bias_correction"] else a / adam_hf_unit_scale(state, group)

    def prepare(self, g, low, d_low, state, group, projection, bounds):
        left = "proj_left" in state
        AL.covariance_ema_(state["proj_cov"], low, group["beta3"], left)
        sq = self._residual_sq(g, low, state, group, projection, bounds, left)
        m, n = g.shape
        return self._fold(sq, low, d_low, state, group, m if left else n, left)

    def _fold(self, sq, low, d_low, state, group, side, left, total=None):
        """From the residual's squared channel norms ``sq`` (consumed): ``p`` (compensation, line 1), ``k``, the
        limiter of ``||C|| = sqrt(sum_j k_j^2 sq_j)``, and the fold ``(M, b k)`` (``side``: ``d``, the projected
        side's length; ``total``: sums a shard's part of ``||C||^2`` over the shards, FSDP2's right basis)."""
        p = AL.residual_moment_(state["alice_p"], sq, _comp_beta(group))
        k = AL.compensation_scale(p, side, group["rank"])
        # ||C|| = ||sqrt(sq) k|| (sq is the residual's, consumed; not sq k^2, whose k^2 overflows float32 where p is
        # floored: a zero residual, e.g. a zero first gradient, made it 0 * inf = NaN)
        if total is None:
            norm = torch.linalg.vector_norm(sq.sqrt_().mul_(k))
        else:
            norm = total(sq.sqrt_().mul_(k).square_().sum().view(1)).sqrt_()[0]
        del sq
        limiter = AL.growth_limiter_(norm, state["alice_phi"], group["gamma"])
        del norm
        k.mul_(group["scale"] * group["alpha_c"]).div_(limiter)  # b k
        kk = k if left else k.unsqueeze(1)
        mm = torch.mul(low, kk)  # (sigma * b k)
        mm.mul_(-1.0).add_(d_low, alpha=self._subspace_scale(state, group))
        return mm, kk

    def sharded_direction(self, g, low, d_low, state, group, sp):
        """The direction of an FSDP2 shard of rows ``g`` (``sp``: :class:`lowmem.optim.sharded.ShardedProjection`;
        the bases and ``Q`` whole on every rank). Left basis: ``sigma = P^T G`` is all-reduced (replicated), so is
        ``Q``'s EMA; the residual's column norms are summed over the shards (``n`` floats), and ``p``, ``k``,
        ``||C||``, ``M`` are replicated. Right basis: ``sigma = G_s Q^T`` holds the shard's rows, ``sigma^T sigma``
        is summed over the shards (``r^2`` floats), ``p`` and ``k`` are the shard's rows, ``||C||^2`` is summed
        (1 float). The shard's rows of the direction: ``up(M) + G_s (b k)``."""
        left = sp.side == "left"
        m, n = sp.shape
        b3 = group["beta3"]
        if left:
            AL.covariance_ema_(state["proj_cov"], low, b3, True)
        else:
            state["proj_cov"].mul_(b3).add_(sp.reduce.sum_(low.t() @ low), alpha=1.0 - b3)
        res = sp.up(low, state, group).mul_(-1.0).add_(g)
        sq = torch.linalg.vector_norm(res, dim=0 if left else 1).square_()
        del res
        if left:
            mm, kk = self._fold(sp.reduce.sum_(sq), low, d_low, state, group, m, True)
        else:
            mm, kk = self._fold(sq, low, d_low, state, group, n, False, total=sp.reduce.sum_)
        return sp.up(mm, state, group).addcmul_(g, kk)

    def direction_rows(self, g_rows, low, d_low, state, group, projection, start, stop, ctx):
        mm, kk = ctx
        d = projection.up_rows(mm, state, group, start, stop)
        return d.addcmul_(g_rows, kk if kk.dim() == 1 else kk[start:stop])

    def direction(self, g, low, d_low, state, group, projection):
        ctx = self.prepare(g, low, d_low, state, group, projection, [(0, g.shape[0])])
        return self.direction_rows(g.float(), low, d_low, state, group, projection, 0, g.shape[0], ctx)

    def _residual_sq(self, g, low, state, group, projection, bounds, left):
        """The residual ``G - U sigma``'s squared channel norms (a new float32 vector), a block of rows at a time."""
        dim = 0 if left else 1
        sq = None
        for a, b in bounds:
            rows = g[a:b] if g.dtype == torch.float32 else g[a:b].float()
            res = projection.residual_rows(rows, low, state, group, a, b, -1.0)
            del rows
            norms = torch.linalg.vector_norm(res, dim=dim)
            del res
            if left:
                sq = norms.square_() if sq is None else sq.add_(norms.square_())
            else:
                sq = norms.square_() if sq is None else torch.cat((sq, norms.square_()))
            del norms
        return sq

    def foreach_fold(self, gs, lows, d_lows, states, group, projection, alpha, bounds):
        """:meth:`prepare` and :meth:`direction_rows` of a bucket, folded (``CombineRule.foreach_fold``): each
        parameter's covariance EMA and residual channel norms (one block of rows at a time), then for the whole
        bucket in multi-tensor operations ``p`` (lerp, floor), ``k``, ``||C||`` (the norms of ``sqrt(sq) k``),
        the limiters (:func:`~lowmem.optim.functional.alice.growth_limiter_foreach_`); then per parameter
        ``M = a d_low - sigma (b k)`` in place in its direction, yielding ``(i, M, alpha, alpha b k)``:
        ``alpha d = alpha up(M) + G (alpha b k)``. The bias correction's unit scale from the bucket's first state
        (one step count per bucket, as Fira's)."""
        b3, gamma, r = group["beta3"], group["gamma"], group["rank"]
        lefts = ["proj_left" in st for st in states]
        sqs = []
        for g, low, st, left, bs in zip(gs, lows, states, lefts, bounds):
            AL.covariance_ema_(st["proj_cov"], low, b3, left)
            sqs.append(self._residual_sq(g, low, st, group, projection, bs, left))
        ps = [st["alice_p"] for st in states]
        torch._foreach_lerp_(ps, sqs, 1.0 - _comp_beta(group))
        torch._foreach_clamp_min_(ps, AL.P_FLOOR)
        ks = torch._foreach_rsqrt(ps)
        sides = [(g.shape[0] if left else g.shape[1]) for g, left in zip(gs, lefts)]
        torch._foreach_mul_(ks, [math.sqrt(d - r) for d in sides])
        torch._foreach_sqrt_(sqs)
        torch._foreach_mul_(sqs, ks)  # (sqrt(sq) k: its norm is ||C||)
        norms = torch.stack(torch._foreach_norm(sqs))
        del sqs
        limiter = AL.growth_limiter_foreach_(norms, [st["alice_phi"] for st in states], gamma)
        del norms
        coef = limiter.reciprocal_().mul_(group["scale"] * group["alpha_c"])  # b (limiter consumed)
        a = self._subspace_scale(states[0], group)

        def folds():
            for i, (low, d, k, left) in enumerate(zip(lows, d_lows, ks, lefts)):
                k.mul_(coef[i])  # b k
                kk = k if left else k.unsqueeze(1)
                d.mul_(a).addcmul_(low, kk, value=-1.0)  # M, in place in the direction
                yield i, d, alpha, kk.mul_(alpha)

        return folds()

    def foreach_fold_offered(self, members, group, projection):
        """Every float32 bucket of a basis (:meth:`foreach_fold`)."""
        return all(projection.can_add_up_rows(st) for _, _, st, _ in members)

    @staticmethod
    def _residual_sq_walk(w: _Walk, shape, bounds, left: bool) -> int:
        """:meth:`_residual_sq` of a float32 gradient walked on ``w``: per block of rows the residual rows
        (``addmm``) and their channel norms; the first block's norms are the sum (left: ``n``), the others' added
        in place; a right basis's row norms concatenated (the running vector, the block's and their concatenation).
        Returns the sum's bytes (alive on ``w``)."""
        n = shape[1]
        sq = 0
        for a, b in bounds:
            block = w.new(4 * (b - a) * n)
            nv = w.new(4 * (n if left else b - a))
            w.free(block)
            if not sq:
                sq = nv
            elif left:
                w.free(nv)
            else:
                cat = w.new(sq + nv)
                w.free(sq, nv)
                sq = cat
        return sq

    def foreach_fold_bytes(self, members, group, projection, device):
        """The peak of :meth:`foreach_fold` and the engine's in-place ``addmm_`` / ``addcmul_``, beyond the bucket's
        projected gradients and directions, walked along it: each parameter's residual channel norms beside the
        earlier parameters' (:meth:`_residual_sq_walk`); ``k`` of the bucket (``S``, 4 bytes per channel) beside the
        sums (``S``; ``sqrt(sq) k`` in place); the norms (``B`` 0-d tensors, then their stack) beside ``k`` and the sums;
        :func:`~lowmem.optim.functional.alice.growth_limiter_foreach_` (the previous norms' stack, the first-step
        mask, ones, the quotient, the clamp, ``/ gamma``, ``where``; then ``norms / limiter``); then ``k`` and the
        divisors alone (the folds work in place; a one-sided basis's ``addmm_`` allocates nothing)."""
        if self.foreach_fold_offered(members, group, projection) is not True:
            return None
        w = _Walk()
        sqs = []
        for shape, _, _, bounds in members:
            left = AL.alice_side(tuple(shape), group["proj_type"]) == "left"
            sqs.append(self._residual_sq_walk(w, shape, bounds, left))
        total, k = sum(sqs), len(members)
        w.new(total)  # ks
        zero_d = w.new(4 * k)  # (_foreach_norm's 0-d tensors, then their stack)
        norms = w.new(4 * k)
        w.free(zero_d, total)
        prev, first, ones = w.new(4 * k), w.new(k), w.new(4 * k)
        q = w.new(4 * k)
        c = w.new(4 * k)
        w.free(q)
        d = w.new(4 * k)
        w.free(c)
        w.new(4 * k)  # (the divisors, kept: the folds' coefficients)
        w.free(ones, d)
        w.free(w.new(4 * k))  # (norms / limiter, copied into the previous norms)
        w.free(prev, first, norms)
        return max(w.peak, max(projection.add_up_rows_bytes(shape, group, shape[0]) for shape, *_ in members))

    # ---- bytes ----

    @staticmethod
    def _channels(shape, group) -> int:
        return shape[1] if AL.alice_side(tuple(shape), group["proj_type"]) == "left" else shape[0]

    def prepare_bytes(self, shape, group, state, projection, bounds, low_precision=False):
        """Per block: its float32 copy (16-bit ``g``), the residual rows (``addmm``), their channel norms; the
        squared norms accumulated (left: ``n``) or concatenated (right: the running ``m``-vector beside the
        block's and their concatenation); then ``k`` (``sqrt(sq) k`` in place), the limiter's norm and
        :func:`~lowmem.optim.functional.alice.growth_limiter_`, and the fold's ``M`` (``L``). Held: ``M`` and
        ``k``."""
        m, n = shape
        left = AL.alice_side(tuple(shape), group["proj_type"]) == "left"
        ch = 4 * self._channels(shape, group)
        low = 4 * projection.low_shape(shape, group).numel()
        peak = 0
        acc = 0
        for a, b in bounds:
            block = 4 * (b - a) * n
            copy = block if low_precision else 0
            bn = 4 * (n if left else b - a)
            peak = max(peak, acc + copy + block, acc + block + bn)
            if left:
                acc = ch if acc == 0 else acc
                peak = max(peak, acc + bn) if acc else peak
            else:
                peak = max(peak, acc + bn + acc + bn)
                acc = acc + bn
        peak = max(peak, ch + ch)  # sq, k (sqrt(sq) k in place)
        peak = max(peak, ch + ch + 4 + AL_LIMITER_BYTES)
        held = ch + low
        peak = max(peak, held)
        return peak, held

    def rows_bytes(self, shape, group, state, projection, rows):
        """A block's ``up_rows(M)`` (the direction rows, ``addcmul_`` in place)."""
        return projection.up_rows_bytes(shape, group, rows)[0]

    def transient_bytes(self, shape, group, state, projection, rows):
        """An upper bound of :meth:`prepare` and a block of :meth:`direction_rows`: a residual block, the fold's
        ``M``, 4 channel vectors and the block's direction."""
        ch = 4 * self._channels(shape, group)
        low = 4 * projection.low_shape(shape, group).numel()
        return 8 * rows * shape[1] + low + 4 * ch


#: 0-d tensors of :func:`~lowmem.optim.functional.alice.growth_limiter_` (the flag, ``ones_like`` twice, the
#: ratio's divisor and ratio, the clamp, the limiter, ``norm / limiter``)
AL_LIMITER_BYTES = 1 + 4 * 7


def _comp_beta(group: dict[str, Any]) -> float:
    """The decay of ``p``: ``comp_beta``, or ``beta1`` when it is ``None`` (Algorithm 4 line 16 passes ``beta1``)."""
    b = group["comp_beta"]
    return group["betas"][0] if b is None else b


def _check_alice_group(group: dict[str, Any]) -> None:
    if group.get("rank") is None:
        return
    check_rank_applies(group)
    if group.get("proj_type") == "full":
        raise ValueError("alice tracks the covariance of one side of the gradient: proj_type must be one of"
                         " ['std', 'reverse_std', 'left', 'right'], got 'full'")
    try:  # (GaLore's check: the basis and the projected gradient are float32)
        check_projected_state_dtype({**group, "projection": "svd"})
    except ValueError as err:
        raise ValueError(str(err).replace("through a 'svd' basis", "through alice's basis")) from None


def alice_group_hparams(rank: int = 256) -> tuple[HParam, ...]:
    shared = [h for h in subspace_hparams("alice", ("alice",), scale=0.3, moment_policy="keep", rank=rank,
                                          refresh_phase="multiples")
              if h.name not in ("power_iters", "scale")]
    shared = [dataclasses.replace(h, doc=
                     "which side the basis projects: 'std' the smaller, a square weight's rows (the paper's m <= n;"
                     " GaLore's std takes its columns), 'reverse_std' the other, 'left' / 'right' explicit"
                     " (functional.alice.alice_side)") if h.name == "proj_type" else h for h in shared]
    return (
        *shared,
        HParam("scale", 0.3, positive, "a finite float > 0", "alpha: multiplies the whole update (subspace part and"
               " compensation), the paper's alpha"),
        HParam("power_iters", 1, _nonneg_int, "an int >= 0", "subspace iterations on the tracked covariance per switch"
               " (and the range finder's with first_basis='rsvd')"),
        _choice("first_basis", "svd", ("svd", "rsvd"), "the first refresh's top-r basis of G: 'svd' an exact SVD (the"
                " paper's eigenbasis of G G^T), 'rsvd' GaLore's randomized range finder (bounded memory)"),
        HParam("beta3", 0.999, in_unit_interval, "a float with 0 <= beta3 < 1",
               "decay of the tracked covariance Q (beta3 = 0: Alice-0, the current gradient's alone)"),
        HParam("switch_fraction", 0.84375, in_unit_interval, "a float with 0 <= switch_fraction < 1",
               "the part of the rank drawn from the complement at each switch (l = rank - floor(rank *"
               " switch_fraction) leading eigenvectors kept; 0.84375 = the paper's and pytorch_optimizer's l = 40 of 256;"
               " the paper's l = 40 at rank 128 and 160 at 512 are 0.6875)"),
        HParam("alpha_c", 0.4, nonneg, "a finite float >= 0", "compensation strength (0: no compensation)"),
        HParam("comp_beta", None, optional(in_unit_interval), "None or a float with 0 <= comp_beta < 1",
               "decay of the residual's channel second moment p (None: beta1, the paper's)"),
        HParam("carry_covariance", False, is_bool, "True or False",
               "at a switch, carry Q into the new basis (U_new^T U_old Q U_old^T U_new); False: the paper's line 12,"
               " Q's entries kept as they are"),
        HParam("fix_signs", False, is_bool, "True or False",
               "at a switch, sign each Ritz vector with its largest entry positive (functional.alice.fix_signs_:"
               " the kept first moment then does not depend on eigh's sign choice, which rounding can flip); False:"
               " eigh's own signs, as pytorch_optimizer"),
        HParam("gamma", 1.01, lambda x: positive(x) and x >= 1, "a finite float >= 1",
               "norm-growth limit of the compensation per step"),
        HParam("bias_correction", False, is_bool, "True or False",
               "Adam's bias correction of the subspace moments (the paper's update has none)"),
    )


ALICE = Recipe(
    name="alice",
    summary="Alice: Adam in a tracked low-rank eigenbasis of the gradient covariance, switched to the complement"
            " in part, with a compensation of the rest",
    reference="Gong et al. 2025, Towards Efficient Optimizer Design for LLM via Structured Fisher Approximation"
              " with a Low-Rank Extension (arXiv 2502.07752), Algorithm Alice (tracking, switching, compensation)",
    moment=AdamMoments(eps_placement="hf"),
    hparams=(LR(0.02), BETAS((0.9, 0.9)), EPS(1e-8), WEIGHT_DECAY(0.0)),
    group_hparams=alice_group_hparams(),
    projection=AliceProjection(),
    combine=AliceCompensation(),
    decay_after_update=True,
    validate_group=_check_alice_group,
)

register(ALICE, batched_targets=True, state_precision="fp32", second_moment="full",
         example_hparams={"rank": 4, "update_proj_gap": 5, "lr": 1e-2})
