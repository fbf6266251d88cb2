"""Subspace seams: projections and residual rules, and the concrete ones the subspace recipes use.

A :class:`Projection` maps a 2-D gradient ``G`` (m x n) into a small subspace where the moment rule
keeps its state, and maps the resulting direction back. A :class:`ResidualRule` decides what to do
with the part of the gradient the subspace misses, ``G - up(down(G))``.

Both hold configuration only; their tensors live in the optimizer's per-parameter state under the
names in ``state_keys``, so checkpoints stay plain tensors (``torch.load(weights_only=True)``).

Concrete parts (the math is in :mod:`lowmem.optim.functional` ``galore``, ``fira``, ``frugal``,
``osd``):

* :class:`SubspaceProjection` - one projection whose method is chosen per parameter group
  (``group["projection"]``): ``svd`` (GaLore), ``rsvd`` (randomized range finder, then
  warm-started subspace iteration), ``random`` / ``gaussian`` (random orthonormal or Gaussian
  bases), ``online_pca`` (Online Subspace Descent), ``columns`` / ``rows`` / ``randk`` /
  ``blocks`` (FRUGAL's coordinate and block subspaces).
* :class:`DropResidual` (GaLore), :class:`FiraResidual` (norm-based scaling and norm-growth
  limiter), :class:`StateFreeResidual` (FRUGAL's signSGD / SGD on the rest).
* :class:`CombineRule` - the combine-back step (full-size direction from ``g``, ``low``, ``d_low``);
  :class:`ProjectBack` is ``scale * P.up(d_low) + residual``, the rule of every recipe above.
* :func:`rotate_moments` - the ``moment_policy="rotate"`` rule.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor

from .._warn import warn_user
from .functional import frugal as FR
from .functional import galore as GL
from .functional import fira as FI
from .functional import osd as OSD
from .functional.adam import adam_direction, adam_direction_foreach, adam_moments_, adam_moments_foreach_
from .functional.norms import float_norm
from .moments import constant_lr

#: one parameter of :meth:`CombineRule.foreach_fold`: ``(index, M, a, k)``, the direction times ``alpha`` is
#: ``a * P.up(M) + g * k``
Fold = Tuple[int, Optional[Tensor], float, Optional[Tensor]]

BASIS_METHODS = ("svd", "rsvd", "random", "gaussian", "online_pca")
COORDINATE_METHODS = ("columns", "rows", "randk", "blocks")
#: MKL's packing buffer kept after a basis's first project-down GEMM (``P^T G`` / ``G Q^T``) on an Intel
#: CPU (the running CPU's: :func:`~lowmem.optim.functional.galore.down_pack_bytes`)
DOWN_PACK_BYTES = GL.DOWN_PACK_BYTES_INTEL
DATA_DEPENDENT = ("svd", "rsvd", "online_pca")
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
MOMENT_POLICIES = ("keep", "reset", "rotate")


class Projection:
    """Base class for subspace projections of 2-D parameters.

    The engine calls, per step of a projected parameter: :meth:`refresh_due`, then
    :meth:`refresh` when due, then :meth:`down`; after the moment rule, :meth:`up`; after the
    update, :meth:`post_update`. With ``moment_policy="rotate"`` it also calls :meth:`snapshot`
    before a refresh and :meth:`rotate_moment` after it.

    Attributes:
        state_keys: Names of the state tensors this projection may own.
        cpu_state_keys: Those kept on the CPU (small bookkeeping read by the host every step).
    """

    state_keys: tuple[str, ...] = ()
    cpu_state_keys: tuple[str, ...] = ()

    def low_shape(self, shape: torch.Size, group: dict[str, Any]) -> torch.Size:
        """Shape of the projected gradient for a parameter of ``shape``."""
        raise NotImplementedError

    def init_state(self, state: dict[str, Tensor], param: Tensor, group: dict[str, Any],
                   matrix: int | None = None) -> None:
        """Allocate the projection's tensors (zeros; the first :meth:`refresh` fills them). ``matrix``:
        the state of the ``matrix``-th ``A x B`` matrix (row-major over the leading dimensions) of a batch
        ``param`` ``[..., A, B]`` (fused MoE experts; the engine stacks the matrices' states), else of
        the 2-D ``param``."""
        raise NotImplementedError

    def refresh_due(self, state: dict[str, Tensor], group: dict[str, Any], t: int) -> bool:
        """Whether the basis is recomputed at 1-based step ``t`` (always at ``t == 1``)."""
        gap = group["update_proj_gap"]
        return (t - 1) % gap == 0

    def refreshes_again(self, state: dict[str, Tensor], group: dict[str, Any]) -> bool:
        """Whether a later step may still refresh this parameter's basis (:meth:`refresh_due`); ``False`` lets the
        engine's ``step_transient_bytes()`` leave the refresh phase out. Default: always."""
        return True

    def refresh(self, g: Tensor, state: dict[str, Tensor], group: dict[str, Any], checked: bool = False) -> bool:
        """Recompute the basis from gradient ``g`` in place; return ``False`` if it was skipped.
        ``checked``: ``g`` is known usable (:meth:`refresh_checks_usable`; the engine read it with its
        non-finite check, :func:`all_usable_if_finite`), so the refresh reads no device value of its own for it."""
        raise NotImplementedError

    def refresh_reads_gradient(self, group: dict[str, Any]) -> bool:
        """Whether :meth:`refresh` reads the gradient's values (not only its shape and device). ``False`` lets the
        engine's chunked step of a low-precision gradient refresh without a float32 copy of the whole gradient
        (FIXAPOLLO21: APOLLO's random bases). Default: reads."""
        return True

    def refresh_checks_usable(self, group: dict[str, Any]) -> bool:
        """Whether :meth:`refresh` reads whether its gradient is usable (finite and not all zero,
        :func:`usable_flags`) before using it: then the engine checks the gradients of a step's due refreshes
        at once with its non-finite check (one device read a step, issue 15) and passes ``checked=True``."""
        return False

    def down(self, g: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def up(self, r: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def pre_check(self, items: list[tuple[Tensor, dict[str, Tensor], dict[str, Any]]]) -> tuple[Tensor, Any] | None:
        """Before the engine's non-finite check of a step: ``(flag, checked)``, a device bool the engine
        reads together with its check's (one device read for both), and what the step's
        :meth:`post_update` / :meth:`foreach_post_update` then receive as ``checked`` when the flag read
        ``True`` (``None`` when it read ``False``, or the check did not run); ``None`` (the default): nothing
        to read. ``items``: ``(gradient, state, group)`` of the step's parameters (not sharded) that have
        a state."""
        return None

    def post_update(self, g: Tensor, state: dict[str, Tensor], group: dict[str, Any], low: Tensor | None = None,
                    checked: Any = None) -> None:
        """Called after the parameter update with the (stabilized) full gradient; default: nothing.
        ``low``: ``down(g)`` when the step computed it from this float32 ``g`` (else ``None``);
        ``checked``: what :meth:`pre_check` handed over for this step (else ``None``)."""

    def foreach_post_update(self, gs: list[Tensor], states: list[dict[str, Tensor]], group: dict[str, Any],
                            lows: list[Tensor | None], checked: Any = None) -> None:
        """:meth:`post_update` of a bucket's parameters after their update (the projected multi-tensor
        step, float32 gradients); default: one at a time (the reference)."""
        for g, state, low in zip(gs, states, lows):
            self.post_update(g, state, group, low, checked)

    def down_batched(self, g: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> Tensor | None:
        """:meth:`down` of every matrix of a batch ``g`` ``[..., m, n]`` at once from the batch's stacked state,
        equal to each matrix's :meth:`down`; ``None`` (the default): one matrix at a time."""
        return None

    def down_keeps_nonfinite(self, state: dict[str, Tensor], group: dict[str, Any]) -> bool:
        """Whether a NaN or +-Inf anywhere in ``g`` always leaves :meth:`down`'s result non-finite
        (a product with a basis: under IEEE arithmetic ``NaN * x``, ``Inf * 0`` and ``Inf - Inf`` are
        NaN, ``Inf * x`` is +-Inf, so a non-finite ``G[i, j]`` makes column ``j`` of ``P^T G`` / row
        ``i`` of ``G Q^T`` non-finite whatever the basis holds, zeros included) and
        :meth:`post_update` does not read ``g``. The engine then checks the projected gradient for
        non-finite values instead of ``g`` on steps without a refresh (issue 15). Default: no."""
        return False

    def up_rows(self, r: Tensor, state: dict[str, Tensor], group: dict[str, Any], start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of :meth:`up` (the chunked combine-back); default: slices :meth:`up`."""
        return self.up(r, state, group)[start:stop]

    def can_add_up_rows(self, state: dict[str, Tensor]) -> bool:
        """Whether :meth:`add_up_rows_` can step this parameter (default: no)."""
        return False

    def residual_rows(self, g_rows: Tensor, r: Tensor, state: dict[str, Tensor], group: dict[str, Any], start: int,
                      stop: int, alpha: float) -> Tensor:
        """``g_rows + alpha * up_rows(r, ..., start, stop)`` (a new float32 tensor); default: from :meth:`up_rows`."""
        return self.up_rows(r, state, group, start, stop).mul_(alpha).add_(g_rows)

    def add_up_rows_(self, out: Tensor, r: Tensor, state: dict[str, Tensor], group: dict[str, Any], start: int,
                     stop: int, alpha: float) -> None:
        """``out += alpha * up_rows(r, ..., start, stop)`` in place, fused (when :meth:`can_add_up_rows`)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused combine-back")

    def can_stack_residuals(self, state: dict[str, Tensor]) -> bool:
        """Whether :meth:`residuals_stacked` can take this parameter (default: no)."""
        return False

    def residuals_stacked(self, gs: list[Tensor], low: Tensor, states: list[dict[str, Tensor]], group: dict[str, Any],
                          alpha: float) -> Tensor:
        """``G_i + alpha * up(low_i)`` of same-shape float32 gradients ``gs`` at once, ``[B, m, n]`` (a new
        tensor: the gradients stacked, then one batched GEMM in place; ``low``: their projected gradients
        stacked, ``[B, ...]``), each :meth:`can_stack_residuals`; equal to :meth:`residual_rows` of each
        one's whole rows to float32 rounding. Allocates ``4 B (m n + basis)`` bytes (:meth:`stacked_residual_bytes`)."""
        raise NotImplementedError(f"{type(self).__name__} has no stacked residuals")

    def stacked_residual_bytes(self, shape: torch.Size, group: dict[str, Any]) -> int:
        """Bytes :meth:`residuals_stacked` allocates per parameter of ``shape``."""
        raise NotImplementedError(f"{type(self).__name__} has no stacked residuals")

    def transient_bytes(self, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor], refresh: bool) -> int:
        """Upper bound of the bytes a refresh (``refresh=True``) or a plain step's down projection and
        basis update allocate for a parameter of ``shape``; default: two full-size float32 tensors."""
        return 8 * shape.numel()

    def combine_transient_bytes(self, shape: torch.Size, group: dict[str, Any], rows: int) -> int:
        """Bytes of the combine-back of ``rows`` rows (the full-size direction when ``rows`` is all)."""
        return 4 * rows * shape[1]

    def add_up_rows_bytes(self, shape: torch.Size, group: dict[str, Any], rows: int) -> int:
        """Bytes :meth:`add_up_rows_` allocates for ``rows`` rows (an in-place ``addmm_``); default: none."""
        return 0

    def up_rows_bytes(self, shape: torch.Size, group: dict[str, Any], rows: int) -> tuple[int, int]:
        """``(peak, out)`` of :meth:`up_rows` of ``rows`` rows; default: the rows, ``4 rows n``."""
        return 4 * rows * shape[1], 4 * rows * shape[1]

    def up_bytes(self, shape: torch.Size, group: dict[str, Any]) -> int:
        """The peak of :meth:`up` (the whole direction); default: ``4 m n``."""
        return 4 * shape[0] * shape[1]

    def down_rows_bytes(self, shape: torch.Size, group: dict[str, Any], bounds: list[tuple[int, int]]) -> int:
        """The peak of :meth:`down_rows` of a low-precision gradient of ``shape`` in the row blocks ``bounds``
        (the projected gradient included); default: a block's float32 copy beside the projected gradient."""
        return 4 * max(b - a for a, b in bounds) * shape[1] + 4 * self.low_shape(shape, group).numel()

    def down_bytes(self, shape: torch.Size, group: dict[str, Any]) -> int:
        """The peak of :meth:`down` of a float32 gradient of ``shape``; default: the projected gradient."""
        return 4 * self.low_shape(shape, group).numel()

    def post_update_bytes(self, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor],
                          low_precision: bool, low_given: bool) -> int:
        """The peak of :meth:`post_update` of a gradient of ``shape`` (``low_precision``: the gradient as stored in
        16 bits; ``low_given``: its projection passed as ``low``), not checked by :meth:`pre_check`; default: none."""
        return 0

    def foreach_post_update_bytes(self, members: list[tuple], group: dict[str, Any], checked: bool) -> int:
        """The peak of :meth:`foreach_post_update` of a folded bucket's members ``(shape, low_shape, state,
        bounds)`` (float32 gradients, their projections given) beside the bucket's projected gradients;
        ``checked``: the engine read :meth:`pre_check`'s flag with the non-finite check; default: none."""
        return 0

    def untraced_refresh_bytes(self, shape: torch.Size, group: dict[str, Any]) -> int:
        """The part of :meth:`transient_bytes` (``refresh=True``) that a kernel allocates inside (LAPACK's
        copy of its input and workspace): counted in the report, invisible to a trace of the dispatched
        operations' outputs; default: none."""
        return 0

    def kept_gemm_bytes(self, shape: torch.Size, group: dict[str, Any]) -> int:
        """The packing buffers MKL's float32 GEMM keeps for the process after this projection's first
        project-down and combine-back of a parameter of ``shape`` (CPU builds with MKL only; the engine
        decides where it applies and counts the largest one once, in every phase of a step); default: none."""
        return 0

    def refresh_kept_bytes(self, shape: torch.Size, group: dict[str, Any]) -> int:
        """The part of :meth:`transient_bytes` (``refresh=True``) that is the buffer of
        :meth:`kept_gemm_bytes` (so that the engine, which counts that buffer once per step, does not
        count it twice); default: none."""
        return 0

    def snapshot(self, state: dict[str, Tensor], group: dict[str, Any]) -> dict[str, Tensor]:
        """Copies of the tensors that define the current subspace (for :meth:`rotate_moment`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot rotate moments")

    def rotate_moment(
        self, x: Tensor, old: dict[str, Tensor], state: dict[str, Tensor], group: dict[str, Any], squared: bool
    ) -> Tensor:
        """Carry a low-rank moment ``x`` from the ``old`` subspace into the current one."""
        raise NotImplementedError(f"{type(self).__name__} cannot rotate moments")


# ---- the concrete projection ------------------------------------------------------------------


def _meta(state: dict[str, Tensor]) -> list[int]:
    """``[seed, phase, refreshes, pca_steps, m, n]`` (CPU int64: no device synchronisation)."""
    return state["proj_meta"].tolist()


def refresh_phase_offset(refresh_phase: str, gap: int, index: int, count: int) -> int:
    """The offset of a parameter's refresh schedule (refreshes at the steps ``t`` with
    ``(t - 1 - phase) % gap == 0``, and at the first step): ``"aligned"`` 0 (steps ``1, T+1, 2T+1, ...``,
    galore-torch's, whose step counter starts at 0), ``"multiples"`` ``gap - 1`` (steps ``1, T, 2T, ...``:
    timmytonga/sn-sm, whose counter is incremented before the projection refreshes at ``step % T == 0``),
    ``"staggered"`` ``index * gap // count`` (the ``index``-th of ``count`` parameters of the group)."""
    if refresh_phase == "multiples":
        return gap - 1
    return index * gap // count if refresh_phase == "staggered" else 0


#: the seeds of the matrices of a batch (:func:`matrix_seed`) step by this, above any parameter's index. Odd,
#: and not a multiple of 2^32: torch's CPU generator keeps the low 32 bits of a seed, so the stride must stay
#: distinct there after the refresh's ``* 7919`` (2^32 did not: every matrix drew matrix 0's basis)
MATRIX_SEED_STRIDE = 2**20 + 1


def matrix_seed(seed: int, index: int, matrix: int | None = None) -> int:
    """The seed of a projection's random draws (``random`` / ``gaussian`` bases, ``rsvd``'s first range
    finder, ``randk`` / ``rows`` / ``columns`` selections; a refresh's generator is seeded with
    ``seed * 7919 + refreshes``): ``seed * 1_000_003 + index`` for the ``index``-th parameter of its
    group, plus ``matrix * (2^20 + 1)`` for matrix ``matrix`` of a batch ``[..., A, B]`` (row-major over the
    leading dimensions; matrix 0 draws what the 2-D parameter at that index would, the others draw
    apart from every parameter's as long as a group holds fewer than 2^20 parameters and a batch fewer than
    2^11 matrices: distinct modulo 2^32, the bits torch's CPU generator keeps, and so after ``* 7919``, odd)."""
    return seed * 1_000_003 + index + (matrix or 0) * MATRIX_SEED_STRIDE


# ---- Q-GaLore's lazy refresh (opt-in: group["lazy_refresh_threshold"]) --------------------------

#: the projections whose refresh is an SVD of the gradient (exact or randomized): the ones a lazy refresh applies to
LAZY_METHODS = ("svd", "rsvd")
#: Q-GaLore's interval growth (the authors' ``gamma_proj=2``): the refresh interval is doubled
LAZY_GROWTH = 2


def basis_similarity(old: tuple[Tensor | None, Tensor | None], new: tuple[Tensor | None, Tensor | None]) -> float:
    """``|cos|`` of the first basis vectors of the old and the new subspace (Q-GaLore, Zhang et al. 2024, Section 3,
    "layer-adaptive lazy update": the cosine similarity of successive projections; the authors' code compares the
    first column of ``P`` / first row of ``Q``, ``F.cosine_similarity(past[0], new[0])``). Both are unit vectors
    (an SVD's / a QR's orthonormal basis), so the cosine is their dot product; taken in absolute value because a
    singular vector's sign is arbitrary (``-u`` spans the same subspace; the authors take the signed cosine).
    ``old`` / ``new``: ``(left, right)`` bases; the left one's first column where there is one, else the right one's
    first row. Allocates one 0-d float32 tensor; reads it to the host (one device read per refresh)."""
    (old_left, old_right), (new_left, new_right) = old, new
    a, b = (old_left[:, 0], new_left[:, 0]) if new_left is not None else (old_right[0], new_right[0])
    return abs(float(torch.dot(a, b)))


def lazy_interval(interval: int, window: list[float], similarity: float, threshold: float,
                  patience: int) -> tuple[int, list[float]]:
    """Q-GaLore's adaptive refresh interval (Section 3; the authors' ``GaLoreProjector.project``): the similarity
    of the refresh just made joins a window of the last ``patience`` ones (the authors' ``queue_size``); when the
    window is full and its mean is ``>= threshold`` (``cos_threshold``), the interval is multiplied by
    :data:`LAZY_GROWTH` (``gamma_proj``). The window is not cleared after that (as the authors'), so a subspace that
    stays aligned doubles its interval at every later refresh. Returns ``(interval, window)``."""
    window = (window + [similarity])[-patience:]
    if len(window) == patience and sum(window) / patience >= threshold:
        interval *= LAZY_GROWTH
    return interval, window


class SubspaceProjection(Projection):
    """Every projection of the subspace recipes; the method is ``group["projection"]``.

    Group keys used (see :data:`SUBSPACE_GROUP_HPARAMS` in the recipes): ``rank``,
    ``update_proj_gap``, ``proj_type`` (which side a basis projects, galore-torch's names),
    ``projection``, ``refresh_phase``, ``seed``, ``power_iters`` (``rsvd``), ``proj_lr`` and
    ``proj_optimizer`` (``online_pca``).

    State (only what the method needs): ``proj_meta`` (CPU int64 ``[seed, phase, refreshes,
    pca_steps, m, n]``), ``proj_left`` (``m x r``) and/or ``proj_right`` (``r x n``) float32 bases, or
    ``proj_index`` (int64 coordinates); ``pca_exp_avg`` / ``pca_exp_avg_sq`` for ``online_pca``
    with Adam.

    Refreshes never crash: a zero or non-finite gradient, or a failing SVD, skips the refresh
    (with a warning) and keeps the old subspace; until a first refresh succeeds one is attempted
    every step. ``refresh_phase="staggered"`` offsets each parameter's refresh schedule by
    ``index * update_proj_gap // len(group)``, so that a step pays for few refreshes.
    """

    state_keys = ("proj_meta", "proj_left", "proj_right", "proj_index", "pca_exp_avg", "pca_exp_avg_sq", "proj_lazy",
                  "proj_lazy_cos")
    cpu_state_keys = ("proj_meta", "proj_lazy", "proj_lazy_cos")

    # -- geometry --

    @staticmethod
    def method(group: dict[str, Any]) -> str:
        return group["projection"]

    def _side(self, shape, group) -> str:
        return GL.galore_side(tuple(shape), group["proj_type"])

    def _coordinates(self, shape, group) -> tuple[int | None, int]:
        """``(dim, k)``: the dimension indices select along (``None``: flattened) and how many."""
        m, n, r = shape[0], shape[1], group["rank"]
        method = self.method(group)
        if method == "randk":
            return None, min(r * max(m, n), m * n)
        if method == "columns" or (method == "blocks" and self._side(shape, group) == "right"):
            return 1, r
        return 0, r

    def low_shape(self, shape, group):
        if self.method(group) in BASIS_METHODS:
            return torch.Size(GL.low_rank_shape(tuple(shape), self._side(shape, group), group["rank"]))
        dim, k = self._coordinates(shape, group)
        if dim is None:
            return torch.Size((k,))
        return torch.Size((shape[0], k) if dim == 1 else (k, shape[1]))

    # -- state --

    def init_state(self, state, param, group, matrix=None):
        params = group["params"]
        index = next(i for i, q in enumerate(params) if q is param)
        gap = group["update_proj_gap"]
        # the matrices of a batch share their parameter's schedule (one refresh step for the batch)
        phase = refresh_phase_offset(group["refresh_phase"], gap, index, len(params))
        seed = matrix_seed(group["seed"], index, matrix)
        m, n = param.shape[-2:]
        shape = torch.Size((m, n))
        state["proj_meta"] = torch.tensor([seed, phase, 0, 0, m, n], dtype=torch.int64)
        r, dev = group["rank"], param.device
        method = self.method(group)
        if group.get("lazy_refresh_threshold") is not None and method in LAZY_METHODS:
            # CPU: the interval (read by refresh_due every step, no device read) and how many similarities the
            # window holds; the window of the last lazy_refresh_patience similarities (lazy_interval)
            state["proj_lazy"] = torch.tensor([gap, 0], dtype=torch.int64)
            state["proj_lazy_cos"] = torch.zeros(group["lazy_refresh_patience"], dtype=torch.float64)
        if method in BASIS_METHODS:
            side = self._side(shape, group)
            if side in ("left", "full"):  # (column-major: the project-down GEMM's faster layout)
                state["proj_left"] = GL.basis_zeros(m, r, dev)
            if side in ("right", "full"):
                state["proj_right"] = GL.basis_zeros(r, n, dev)
            if method == "online_pca" and group["proj_optimizer"] == "adam":
                basis = state.get("proj_left", state.get("proj_right"))
                state["pca_exp_avg"] = torch.zeros_like(basis)
                state["pca_exp_avg_sq"] = torch.zeros_like(basis)
        else:
            state["proj_index"] = torch.zeros(self._coordinates(shape, group)[1], dtype=torch.int64, device=dev)

    def _basis(self, state) -> tuple[Tensor | None, Tensor | None]:
        return state.get("proj_left"), state.get("proj_right")

    # -- schedule and refresh --

    def refresh_due(self, state, group, t):
        _, phase, refreshes = _meta(state)[:3]
        if refreshes == 0:
            return True
        if self.method(group) == "online_pca":
            return False  # learned online after the first SVD
        gap = group["update_proj_gap"]
        if "proj_lazy" in state:  # a lazy refresh's own interval (Q-GaLore: lazy_interval)
            gap = state["proj_lazy"].tolist()[0]  # (tolist: 1 us; int(t[0]) made a view, 6 us)
            phase = gap - 1 if group["refresh_phase"] == "multiples" else phase  # (t = gap, 2 gap, ...)
        return (t - 1 - phase) % gap == 0

    def refreshes_again(self, state, group):
        """``online_pca`` refreshes (an SVD) only until its first refresh (:meth:`refresh_due`); other methods on
        their schedule. A state holding no values (meta or fake: the estimator's) or not made yet: may refresh."""
        if self.method(group) != "online_pca":
            return True
        from torch._subclasses.fake_tensor import FakeTensor

        meta = state.get("proj_meta")
        return meta is None or meta.device.type != "cpu" or isinstance(meta, FakeTensor) or _meta(state)[2] == 0

    def refresh_checks_usable(self, group):
        return self.method(group) in DATA_DEPENDENT

    def refresh_reads_gradient(self, group):
        """Only a data-dependent basis (``svd``, ``rsvd``, ``online_pca``) reads the gradient's values; a random one
        (``random`` / ``gaussian``) and a choice of coordinates read its shape and device (:meth:`_new_basis`)."""
        return self.method(group) in DATA_DEPENDENT

    def refresh(self, g, state, group, checked=False):
        method = self.method(group)
        if method in DATA_DEPENDENT and not checked and not _usable(g):
            warn_user(
                f"projection refresh skipped: the gradient of a {tuple(g.shape)} parameter is zero or not finite;"
                " keeping the previous subspace"
            )
            return False
        seed, _, refreshes = _meta(state)[:3]
        gen = torch.Generator().manual_seed(seed * 7919 + refreshes)
        try:
            if method in BASIS_METHODS:
                new = self._new_basis(g, state, group, method, refreshes, gen)
                lazy = "proj_lazy" in state and refreshes > 0  # (Q-GaLore: against the subspace it replaces)
                similarity = basis_similarity(self._basis(state), new) if lazy else None
                for key, basis in zip(("proj_left", "proj_right"), new):
                    if basis is not None:
                        state[key].copy_(basis)
            else:
                dim, k = self._coordinates(g.shape, group)
                size = g.numel() if dim is None else g.shape[dim]
                idx = FR.block_indices(size, k, refreshes) if method == "blocks" else FR.random_indices(size, k, gen)
                state["proj_index"].copy_(idx)
        except RuntimeError as err:  # torch.linalg.LinAlgError (SVD did not converge) and friends
            warn_user(f"projection refresh failed ({err}); keeping the previous subspace")
            return False
        state["proj_meta"][2] += 1
        if method == "online_pca":
            state["proj_meta"][3] = -1  # the SVD step itself takes no PCA step (its gradient is optimal)
        if method in BASIS_METHODS and lazy:
            self._lazy_update(state, group, similarity)
        return True

    @staticmethod
    def _lazy_update(state, group, similarity: float) -> None:
        """:func:`lazy_interval` on the parameter's CPU state (``proj_lazy``: interval and window length;
        ``proj_lazy_cos``: the window, oldest first)."""
        lazy, cos = state["proj_lazy"], state["proj_lazy_cos"]
        interval, seen = lazy.tolist()
        interval, window = lazy_interval(interval, cos[:seen].tolist(), similarity, group["lazy_refresh_threshold"],
                                         cos.numel())
        lazy[0], lazy[1] = interval, len(window)
        for i, c in enumerate(window):  # (in place, element by element: no new tensor)
            cos[i] = c

    def _new_basis(self, g, state, group, method, refreshes, gen):
        side, r = self._side(g.shape, group), group["rank"]
        if method in DATA_DEPENDENT:  # (a random basis reads g's shape and device only: refresh_reads_gradient)
            g = g.float()
        if method in ("svd", "online_pca"):
            return GL.svd_basis(g, r, side)
        if method in ("random", "gaussian"):
            orth = method == "random"
            left = GL.random_basis(g.shape[0], r, gen, orth).to(g.device) if side in ("left", "full") else None
            right = GL.random_basis(g.shape[1], r, gen, orth).t().to(g.device) if side in ("right", "full") else None
            return left, right
        # rsvd: a randomized range finder the first time, then subspace iteration from the old basis
        iters = group["power_iters"]
        old_left, old_right = self._basis(state)
        left = right = None
        if side in ("left", "full"):
            left = GL.range_finder(g, r, gen, iters) if refreshes == 0 else GL.subspace_iteration(g, old_left, iters)
        if side in ("right", "full"):
            gt = g.t()
            q = GL.range_finder(gt, r, gen, iters) if refreshes == 0 else GL.subspace_iteration(gt, old_right.t(), iters)
            right = q.t()
        return left, right

    # -- projecting --

    def down(self, g, state, group):
        if "proj_index" in state:
            return FR.select(g, self._coordinates(g.shape, group)[0], state["proj_index"])
        return GL.project_down(g, *self._basis(state))

    def down_batched(self, g, state, group):
        """:meth:`down` of a batch of matrices ``g`` ``[..., m, n]`` with the batch's stacked state (each matrix its
        own basis) in one batched product (:func:`~lowmem.optim.functional.galore.project_down_batched`), or
        ``None`` where that is not one product: coordinates, bases on both sides."""
        left, right = self._basis(state)
        if "proj_index" in state or (left is None) == (right is None):
            return None
        return GL.project_down_batched(g, left, right)

    def down_keeps_nonfinite(self, state, group):
        # a basis product (svd, rsvd, random, gaussian); not a selection of coordinates (an entry not
        # selected is not read), not online PCA (its basis step reads the whole gradient)
        return self.method(group) in BASIS_METHODS and self.method(group) != "online_pca" and "proj_index" not in state

    def up(self, r, state, group):
        if "proj_index" in state:
            shape = _param_shape(state)
            return FR.scatter(r, self._coordinates(shape, group)[0], state["proj_index"], shape)
        return GL.project_up(r, *self._basis(state))

    def down_rows(self, g, state, group, bounds):
        """:meth:`down` of a low-precision ``g``, converted to float32 a block of rows at a time."""
        if "proj_index" in state:
            return FR.select(g, self._coordinates(g.shape, group)[0], state["proj_index"]).float()
        return GL.project_down_rows(g, *self._basis(state), bounds)

    def up_rows(self, r, state, group, start, stop):
        if "proj_index" in state:
            shape = _param_shape(state)
            return FR.scatter_rows(r, self._coordinates(shape, group)[0], state["proj_index"], shape, start, stop)
        return GL.project_up_rows(r, *self._basis(state), start, stop)

    def can_add_up_rows(self, state):
        return "proj_index" not in state  # a basis (coordinates scatter instead)

    def add_up_rows_(self, out, r, state, group, start, stop, alpha):
        GL.project_up_rows_add_(out, r, *self._basis(state), start, stop, alpha)

    def residual_rows(self, g_rows, r, state, group, start, stop, alpha):
        if "proj_index" in state:
            return super().residual_rows(g_rows, r, state, group, start, stop, alpha)
        return GL.project_up_rows_add(g_rows, r, *self._basis(state), start, stop, alpha)

    def can_stack_residuals(self, state):
        """A basis on one side (not both, not coordinates)."""
        return "proj_index" not in state and ("proj_left" in state) != ("proj_right" in state)

    def residuals_stacked(self, gs, low, states, group, alpha):
        """The bases stacked in their own layout (a left basis is column-major), the gradients stacked, then
        :func:`~lowmem.optim.functional.galore.project_up_add_stacked_` (one ``baddbmm_``)."""
        key = "proj_left" if "proj_left" in states[0] else "proj_right"
        bases = torch.stack([st[key].mT for st in states]).mT
        return GL.project_up_add_stacked_(torch.stack(gs), low, *((bases, None) if key == "proj_left" else (None, bases)),
                                          alpha)

    def stacked_residual_bytes(self, shape, group):
        """The gradient's copy and the basis's: ``4 (m n + r m)`` (left) or ``4 (m n + r n)`` (right)."""
        m, n = shape
        low = self.low_shape(shape, group)
        return 4 * (m * n + (m * low[0] if self._side(shape, group) == "left" else low[1] * n))

    def transient_bytes(self, shape, group, state, refresh):
        """What this projection allocates at one kind of step (the engine reports the larger of a
        plain step and a refresh step, which runs the refresh first and then a plain step).

        A plain step: the projected gradient ``P^T G`` / ``G Q^T`` / the selected coordinates (its
        direction is the moment rule's); ``online_pca`` also its basis gradient, ``r (m + n)``-sized.

        A refresh: ``svd`` (exact, as galore-torch) runs LAPACK's divide-and-conquer SVD of the whole
        gradient: its copy, ``U`` (``m x k``), ``V^T`` (``k x n``) and about ``3.25 k^2`` floats of
        workspace, ``4 (m n + m k + k n) + 13 k^2`` bytes (``k = min(m, n)``; measured 1547 MiB for
        8192 x 8192, 390 MiB for 4096 x 4096, each within 4% below this), on LAPACK's tall path
        (``m >= 11 n / 6``: QR first) ``3 k^2`` more and, on an AMD CPU, MKL's QR and product buffers
        (:func:`~lowmem.optim.functional.galore.svd_refresh_bytes`);
        ``rsvd`` the larger of its first refresh (the range finder) and a later one (the subspace
        iteration) phase by phase, with the buffers MKL keeps (:meth:`_rsvd_bytes`,
        :func:`~lowmem.optim.functional.galore.rsvd_refresh_bytes`); a random basis (:func:`~lowmem.optim.functional.galore.random_basis`,
        per projected side of ``d`` rows) its Gaussian draw and the scaled result (``gaussian``,
        ``8 d r`` bytes; measured exactly that) or the draw, the QR factors ``Q`` and ``R``, the
        signs and sign-fixed result and LAPACK's blocked workspace (``random``, ``12 d r + 4 r^2 + 4 r + 4 d min(r, 128)``;
        measured 27.1 MiB for 8192 x 256, 51.4 for 8192 x 512, 12 for 16384 x 64); coordinates the
        choice of their ``k`` int64 indices: a random one (``columns``, ``rows``, ``randk``) the permutation of the
        ``size`` it chooses from beside the sorted first ``k`` and their order, ``8 size + 16 k``, ``blocks`` its
        range and remainder, ``16 k``. With ``moment_policy="rotate"`` the old subspace's copy is alive through the refresh, and
        the rotation adds the transitions and the rotated moment (:meth:`rotate_bytes`)."""
        m, n = shape
        r = group["rank"]
        k = min(m, n)
        method = self.method(group)
        small = 4 * 5 * (r + 4) * (m + n)  # panels of rank + oversampling columns, a few alive at once (measured)
        low = 4 * self.low_shape(shape, group).numel()
        if not refresh:
            return small if method == "online_pca" else low
        if method in ("svd", "online_pca"):  # sized for the device its basis is on, as rsvd's below
            with GL.blas_device(self._basis_device(state)):
                work = GL.svd_refresh_bytes(m, n)
        elif method in COORDINATE_METHODS:
            dim, k = self._coordinates(shape, group)
            size = m * n if dim is None else shape[dim]
            # random: the int64 permutation of the size beside the sorted first k (values and indices); blocks:
            # the range and its remainder (functional.frugal.random_indices / block_indices; exact, traced)
            work = 8 * size + 16 * k if method != "blocks" else 16 * k
        elif method in ("random", "gaussian"):
            side = self._side(shape, group)
            rows = [d for d, s in ((m, ("left", "full")), (n, ("right", "full"))) if side in s]
            draw = [8 * d * r if method == "gaussian" else 12 * d * r + 4 * r * r + 4 * r + 4 * d * min(r, 128)
                    for d in rows]
            work = draw[0] if len(draw) == 1 else max(draw[0], 4 * m * r + draw[1])  # "full": left kept while right is drawn
        elif not GL._SVD_WORKSPACE_COUNTED.get():  # rsvd, the tensors only (svd_workspace_left_out: the estimate's
            # split, its LAPACK and MKL buffers apart; before 2026-12-01 the whole count stayed in the tensors' part:
            # tiny galore_adamw rank 8 rsvd read 4.17 MiB for 128 KiB measured, lowmem budget --measure)
            work = self._rsvd_traced_bytes(shape, group)
        else:  # rsvd, sized for the device its basis is on (a CUDA step's does not read the host CPU's vendor)
            with GL.blas_device(self._basis_device(state)):
                work = self._rsvd_bytes(shape, group)
        if group.get("moment_policy") != "rotate":
            return work
        snapshot, rotation = self.rotate_bytes(shape, group)
        return snapshot + max(work, rotation)

    @staticmethod
    def _basis_device(state) -> str:
        basis = state.get("proj_left", state.get("proj_right"))
        return basis.device.type if isinstance(basis, Tensor) else "cpu"

    def _two_sided(self, shape, group) -> bool:
        return self.method(group) in BASIS_METHODS and self._side(shape, group) == "full"

    def up_rows_bytes(self, shape, group, rows) -> tuple[int, int]:
        """``(peak, out)`` of :meth:`up_rows` of ``rows`` rows: a basis's product (two-sided beside ``P[a:b] N``,
        ``rows x r``); coordinates :func:`~lowmem.optim.functional.frugal.scatter_rows_bytes`: columns the zero
        rows and the copy of their columns; rows and ``randk`` also the masks of the indices that fall in the
        block, the chosen indices and values, of ``c`` indices in the block. ``c`` depends on the selection, so
        this is the exact maximum over selections, ``c = min(k, rows)`` (rows) or ``min(k, rows n)`` (``randk``):
        the traced peak of a step whose selection puts that many in one block (all of a ``randk`` selection's
        ``k`` in its first ``k`` coordinates, tests/test_bounds_frugal_rows.py); a random selection spreads them
        over the blocks and allocates less (a (200, 128) weight at rank 16, chunk 4096: 74,752 B for 112,768).
        Not the count of the selection held: the next refresh draws another (the report is for every step of a run),
        the estimator's meta parameters hold none, and reading it would cost a device read a report."""
        m, n = shape
        out = 4 * rows * n
        if self.method(group) in BASIS_METHODS:
            return out + 4 * rows * group["rank"] * self._two_sided(shape, group), out
        dim, k = self._coordinates(shape, group)
        c = min(k, rows if dim == 0 else rows * n)
        return FR.scatter_rows_bytes(k, c, rows, n, dim), out

    def up_bytes(self, shape, group) -> int:
        """The peak of :meth:`up` (the whole direction): the scattered or projected-back tensor, two-sided
        beside ``P N`` (``m x r``)."""
        m, n = shape
        return 4 * m * n + 4 * m * group["rank"] * self._two_sided(shape, group)

    def combine_transient_bytes(self, shape, group, rows):
        """:meth:`up_rows_bytes`' peak."""
        return self.up_rows_bytes(shape, group, rows)[0]

    def add_up_rows_bytes(self, shape, group, rows):
        """Two-sided: ``P[a:b] N`` (``rows x r``), the ``addmm_``'s left factor."""
        return 4 * rows * group["rank"] * self._two_sided(shape, group)

    def down_rows_bytes(self, shape, group, bounds):
        """A basis: :func:`~lowmem.optim.functional.galore.project_down_rows_bytes` (exact); coordinates: the
        selection in the gradient's (16-bit) dtype and its float32 copy."""
        m, n = shape
        if self.method(group) not in BASIS_METHODS:
            return 6 * self.low_shape(shape, group).numel()
        side = self._side(shape, group)
        return GL.project_down_rows_bytes(n, group["rank"], side in ("left", "full"), side in ("right", "full"), bounds)

    def post_update_bytes(self, shape, group, state, low_precision, low_given):
        """``online_pca``'s basis step (exact, traced): the gradient's norm
        (:func:`~lowmem.optim.functional.norms.float_norm`: a 16-bit gradient of more than ``2^19`` elements in
        float32 blocks), the usability flags beside it (7 bytes), the PCA gradient
        (:func:`~lowmem.optim.functional.osd.pca_loss_grad_bytes`), then Adam's direction of it (its size)."""
        if self.method(group) != "online_pca":
            return 0
        m, n = shape
        block = 2**19
        norm = 8 + 4 * min(m * n, block) if low_precision and m * n > block else 4
        key = "proj_left" if "proj_left" in state else "proj_right"
        pca, grad = OSD.pca_loss_grad_bytes(m, n, group["rank"], "left" if key == "proj_left" else "right",
                                            low_precision, low_given and not low_precision)
        adam = 2 * grad if group["proj_optimizer"] == "adam" else grad
        return max(norm, 4 + 7, 4 + pca, 4 + adam)

    def down_bytes(self, shape, group) -> int:
        """The peak of :meth:`down` of a float32 gradient: the projected gradient (two-sided: ``P^T G``
        beside its product with ``Q^T``)."""
        low = 4 * self.low_shape(shape, group).numel()
        if self.method(group) in BASIS_METHODS and self._side(shape, group) == "full":
            return 4 * group["rank"] * shape[1] + low
        return low

    def untraced_refresh_bytes(self, shape, group):
        """``svd`` / ``online_pca`` (an exact SVD): of :func:`~lowmem.optim.functional.galore.svd_refresh_bytes`
        (``4 (m n + m k + k n) + 13 k^2``, more on LAPACK's tall path), all but the SVD's outputs ``U``, ``S``,
        ``V^T`` (``4 (m k + k + k n)``): LAPACK's column-major copy of the gradient and its workspace (and MKL's
        buffers), allocated inside the kernel; ``random``: QR's workspace, ``4 d min(r, 128)``
        (the larger side drawn); ``rsvd``: all of its peak-RSS count (:meth:`_rsvd_bytes`) but the larger of its
        refreshes' traced tensors (:func:`~lowmem.optim.functional.galore.range_finder_traced_bytes`)."""
        m, n = shape
        if self.method(group) == "rsvd":  # all but the tensors its operations return (LAPACK's, MKL's buffers)
            return self._rsvd_bytes(shape, group) - self._rsvd_traced_bytes(shape, group)
        if self.method(group) == "random":  # QR's blocked workspace, per side drawn
            side = self._side(shape, group)
            return max(4 * d * min(group["rank"], 128) for d, sides in ((m, ("left", "full")), (n, ("right", "full")))
                       if side in sides)
        if self.method(group) not in ("svd", "online_pca"):
            return 0
        k = min(m, n)
        return GL.svd_refresh_bytes(m, n) - 4 * (m * k + k + k * n)

    def kept_gemm_bytes(self, shape, group) -> int:
        """A basis's combine-back (``P N`` / ``N Q``: ``r``-deep panels by ``n`` columns) leaves MKL's
        packing buffer, :func:`~lowmem.optim.functional.galore.gemm_pack_bytes` ``(r, n)``, and its
        project-down (``P^T G`` / ``G Q^T``) another, :func:`~lowmem.optim.functional.galore.down_pack_bytes`
        ``(n)``, both as MKL keeps them on the running CPU (measured in a fresh process,
        ``MALLOC_MMAP_THRESHOLD_=65536``, on an Intel Xeon: the first ``P^T G`` keeps 1.4-1.6 MiB at rank
        64-256 before the combine-back, together 3.8 MiB at 2048 x 2048 rank 256, 9.8 at 8192 x 8192,
        12.5 at 4096 x 11008; a plain step of galore_adamw rank 256 grows 3.2 / 9.0 / 10.2 MiB beyond
        its other phases; on an AMD EPYC the combine-back keeps 0.19 MiB and the project-down most: a
        plain step grows 1.2 / 3.1 / 2.2 / 4.8 MiB beyond its other phases at 2048 x 2048 rank 256,
        1024 x 4096 rank 256, 4096 x 4096 rank 256, 2048 x 8192 rank 128, for 1.75 / 3.25 / 3.25 / 5.1
        counted); coordinates combine back by indexing (none)."""
        if self.method(group) not in BASIS_METHODS:
            return 0
        return GL.kept_pack_bytes(group["rank"], shape[1])

    def refresh_kept_bytes(self, shape, group) -> int:
        """``rsvd``: all of :meth:`kept_gemm_bytes`. Its refresh report bounds a refresh next to MKL's
        kept buffers (:func:`~lowmem.optim.functional.galore.rsvd_refresh_bytes`: a later refresh next to
        the larger of its SVD's panel and a combine-back's packing buffer, plus the first calls' GEMM / QR
        packing; measured over steps 1-3, the combine-back of step 1 included: 53.3 MiB for 64.6 reported
        at 4096 x 11008 rank 256, a right basis whose combine-back packs 11008 columns)."""
        return self.kept_gemm_bytes(shape, group) if self.method(group) == "rsvd" else 0

    def _rsvd_traced_bytes(self, shape, group) -> int:
        """The tensors of a ``rsvd`` refresh (what its operations return, a dispatch trace's count), the larger of
        the first (the range finder) and a later one (the subspace iteration) per projected side
        (:func:`~lowmem.optim.functional.galore.range_finder_traced_bytes`); ``full`` keeps the left basis while the
        right one is found. :meth:`_rsvd_bytes` is these plus LAPACK's and MKL's buffers."""
        m, n = shape
        r, iters = group["rank"], group["power_iters"]
        side = self._side(shape, group)

        def seen(d, e):  # the range finder (the first refresh) or the subspace iteration (a later one)
            return max(GL.range_finder_traced_bytes(d, e, r, iters), GL.range_finder_traced_bytes(d, e, r, iters, None))

        return {"left": seen(m, n), "right": seen(n, m), "full": max(seen(m, n), 4 * m * r + seen(n, m))}[side]

    def _rsvd_bytes(self, shape, group) -> int:
        """A ``rsvd`` refresh's peak over a run (:func:`~lowmem.optim.functional.galore.rsvd_refresh_bytes`)
        for each projected side (``A = G`` for the left basis, ``G^T`` for the right); ``full`` keeps the
        left basis and the SVD panel MKL kept while the right one is found."""
        m, n = shape
        r, iters = group["rank"], group["power_iters"]
        side = self._side(shape, group)
        left = GL.rsvd_refresh_bytes(m, n, r, iters)
        right = GL.rsvd_refresh_bytes(n, m, r, iters)
        if side == "left":
            return left
        if side == "right":
            return right
        kept = 4 * m * r + 4 * n * min(r + 4, m, n)  # the left basis and its SVD's kept MKL panel
        return max(left, kept + right)

    def rotate_bytes(self, shape, group) -> tuple[int, int]:
        """``moment_policy="rotate"`` at a refresh: ``(snapshot, rotation)``, the copy of the old basis
        or index (:meth:`snapshot`) and what :meth:`rotate_moment` allocates for one moment: the
        ``r x r`` transitions and their squares and the rotated moment (a basis), or the moment
        scattered to the parameter's shape and selected again (coordinates)."""
        m, n = shape
        r = group["rank"]
        low = 4 * self.low_shape(shape, group).numel()
        if self.method(group) in COORDINATE_METHODS:
            return 8 * self._coordinates(shape, group)[1], 4 * m * n + low
        side = self._side(shape, group)
        basis = 4 * r * ((m if side in ("left", "full") else 0) + (n if side in ("right", "full") else 0))
        sides = 2 if side == "full" else 1
        return basis, 8 * r * r * sides + low * sides

    # -- Online Subspace Descent: learn the basis after each step --

    def pre_check(self, items):
        """Online Subspace Descent (issue 15): whether every gradient that takes a basis step this step
        is usable (finite and not all zero, as :func:`_usable`), one device bool for the whole step that
        the engine reads with its non-finite check, instead of one device read per bucket (or per
        parameter) in :meth:`foreach_post_update` / :meth:`post_update`. The norms: one
        ``torch._foreach_norm`` per dtype (a low-precision norm accumulates in float32 as
        :func:`~lowmem.optim.functional.norms.float_norm` does: zero and non-finite exactly when that is,
        an overflow of the narrower dtype only makes the flag ``False``, then the basis steps read their own).
        ``checked``: by ``id``, the gradient itself (only that tensor is taken as checked) and, for a float32
        one, its norm (a 0-d view: the value :meth:`foreach_post_update` computes; a low-precision one's is
        computed there again, ``float_norm``'s). ``None`` when no parameter takes a basis step (the first
        step's refresh) or the gradients are on several devices."""
        todo = [g for g, state, group in items
                if "proj_meta" in state and self.method(group) == "online_pca" and _pca_step_due(state)]
        if not todo or any(g.device != todo[0].device for g in todo):
            return None
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in todo:
            by_dtype.setdefault(g.dtype, []).append(g)
        norms = {dt: torch.stack(torch._foreach_norm(gs)) for dt, gs in by_dtype.items()}
        f32 = norms.get(torch.float32)
        parts = [n if n.dtype == torch.float32 else n.float() for n in norms.values()]
        flag = all_usable(parts[0] if len(parts) == 1 else torch.cat(parts))
        checked = {id(g): (g, None) for dt, gs in by_dtype.items() if dt != torch.float32 for g in gs}
        if f32 is not None:
            checked.update((id(g), (g, n)) for g, n in zip(by_dtype[torch.float32], f32.unbind(0)))
        return flag, checked

    def post_update(self, g, state, group, low=None, checked=None):
        if self.method(group) != "online_pca":
            return
        meta = state["proj_meta"]  # CPU int64: one read, then written back
        pca_steps = _meta(state)[3]
        if pca_steps < 0:
            meta[3] = 0
            return
        norm = float_norm(g)  # shared by the usability check and the PCA gradient
        if _checked_norms([g], checked) is None and not _usable(g, norm):  # (checked: usable, no device read)
            return
        key = "proj_left" if "proj_left" in state else "proj_right"
        basis = state[key]
        proj = low if low is not None and g.dtype == basis.dtype else None  # the step's P^T G / G Q^T
        grad = OSD.pca_loss_grad(basis, g, "left" if key == "proj_left" else "right", norm, proj)
        lr, wd = OSD.basis_step_settings(group["proj_lr"], group.get("proj_weight_decay"), group["proj_optimizer"],
                                         group.get("lr"), group.get("initial_lr"))
        if group["proj_optimizer"] == "sgd":
            if wd:
                grad.add_(basis, alpha=wd)  # torch.optim.SGD's weight decay
            basis.add_(grad, alpha=-lr)
        else:
            t = pca_steps + 1
            meta[3] = t
            if wd:
                basis.mul_(1.0 - lr * wd)  # torch.optim.AdamW's decoupled decay, before the moments
            adam_moments_(state["pca_exp_avg"], state["pca_exp_avg_sq"], grad, 0.9, 0.999)
            basis.add_(adam_direction(state["pca_exp_avg"], state["pca_exp_avg_sq"], t, 0.9, 0.999, 1e-8), alpha=-lr)

    def foreach_post_update(self, gs, states, group, lows, checked=None):
        """:meth:`post_update` of a bucket (Online Subspace Descent): the gradients' norms (as
        :meth:`post_update`: the same values) and whether all are usable: known without a device read
        when :meth:`pre_check` checked them (``checked``: the engine read its flag with the non-finite
        check's; its norms taken when the bucket's gradients are all float32), else one device
        read for the bucket (a zero gradient in the bucket: one read each); each basis gradient (:func:`~lowmem.optim.functional.osd.pca_loss_grad`);
        the basis steps of the parameters at one PCA step count together, one multi-tensor kernel per
        operation (SGD, or AdamW's decay, moments and direction: ``functional.adam_moments_foreach_``,
        ``adam_direction_foreach``; the same operations in the same order, equal bit for bit on the CPU)."""
        if self.method(group) != "online_pca":
            return
        todo = []
        for i, state in enumerate(states):
            if _meta(state)[3] < 0:
                state["proj_meta"][3] = 0  # (the refresh's own step takes no PCA step)
            else:
                todo.append(i)
        if not todo:
            return
        todo_gs = [gs[i] for i in todo]
        known = _checked_norms(todo_gs, checked)  # all usable, by the engine's one read of the step
        f32 = [g.dtype == torch.float32 for g in todo_gs]
        if known is not None and all(f32):  # (pre_check's norms: the values computed here)
            norms, usable = known, [True] * len(todo)
        else:
            if all(f32):  # one multi-tensor kernel (the same values on the CPU)
                norm_t = torch.stack(torch._foreach_norm(todo_gs))
            else:
                norm_t = torch.stack([float_norm(g) for g in todo_gs])
            norms = list(norm_t.unbind(0))
            if known is not None:
                usable = [True] * len(todo)
            else:  # one device read for the bucket (all usable: the common case); else one per parameter
                flags = usable_flags(norm_t)
                usable = [True] * len(todo) if bool(flags.all()) else [bool(f) for f in flags]
                # (read: freed before the basis steps, which then hold the norms' stack alone, the 4 bytes per
                # gradient the engine keeps when the pre-check's flag holds: foreach_post_update_bytes)
                del flags
        lr, wd = OSD.basis_step_settings(group["proj_lr"], group.get("proj_weight_decay"), group["proj_optimizer"],
                                         group.get("lr"), group.get("initial_lr"))
        # the parameters at one PCA step count, side and shape: their basis gradients stacked a batch at a
        # time (OSD.pca_loss_grad_stacked), each batch within fold_budget (the bucket's freed directions)
        groups: dict[tuple, list[tuple[int, Tensor]]] = {}
        for i, norm, ok in zip(todo, norms, usable):
            if ok:
                key = "proj_left" if "proj_left" in states[i] else "proj_right"
                groups.setdefault((_meta(states[i])[3] + 1, key, tuple(gs[i].shape)), []).append((i, norm))
        budget = OSD_BUDGET_SCALE * 4 * sum(self._low_numel(gs[i], states[i]) for i in todo)  # (fold_budget)
        for (t, key, _), members in groups.items():
            side = "left" if key == "proj_left" else "right"
            basis0, g0 = states[members[0][0]][key], gs[members[0][0]]
            rank = basis0.shape[1] if side == "left" else basis0.shape[0]
            cost = OSD.stacked_grad_bytes(basis0.numel(), self._low_numel(g0, states[members[0][0]]), rank)
            size = max(1, budget // cost)
            for start in range(0, len(members), size):
                batch = members[start:start + size]
                sts = [states[i] for i, _ in batch]
                bases = [st[key] for st in sts]
                projs = [lows[i] if lows[i] is not None and gs[i].dtype == bases[0].dtype else None for i, _ in batch]
                if len(batch) == 1 or gs[batch[0][0]].dtype != bases[0].dtype:
                    grads = [OSD.pca_loss_grad(st[key], gs[i], side, norm, proj)
                             for (i, norm), st, proj in zip(batch, sts, projs)]
                else:
                    picked = torch.stack([norm for _, norm in batch])  # (an index list: a host-to-device copy)
                    grads = list(OSD.pca_loss_grad_stacked(bases, [gs[i] for i, _ in batch], side, picked,
                                                           projs).unbind(0))
                self._basis_step_foreach(bases, grads, sts, group, t, lr, wd)

    def foreach_post_update_bytes(self, members, group, checked, usable=None):
        """:meth:`foreach_post_update` of a folded bucket (float32 gradients, their projections given) walked
        (``online_pca``; other methods: none): without ``checked`` the gradients' 0-d norms and their stack (kept)
        beside them, then the usability flags (``isfinite``, ``> 0``, their ``&``, and ``all``; freed once read);
        with it, the engine's kept norms (counted by the engine); then per batch of one PCA step count, side and
        shape (within :func:`fold_budget`, as the step cuts them): one parameter's basis gradient
        (:func:`~lowmem.optim.functional.osd.pca_loss_grad_bytes`) or, stacked, the norms' stack (bound until the
        next stacked batch's is made), the bases', the projected gradients', ``B`` / ``D`` and the two ``r x r``
        products' stacks and the result (:func:`~lowmem.optim.functional.osd.pca_loss_grad_stacked`), then the
        basis optimizer's step: SGD in place; AdamW's ``sqrt(v)`` and direction once the gradients are freed.
        Every member is taken as due (a steady step; the refresh's own step takes none); ``usable`` (a bool per
        member, default all): the members whose gradient is usable, the others take no basis step (a zero
        gradient). Exact against a trace (tests/test_folds_buckets.py, tests/test_bounds_osd_zero.py).

        ``checked``: the pre-check's flag held (every gradient usable): the engine's norms, kept by the engine (4 bytes
        per float32 gradient beside every phase of the step). When it fails (a zero gradient: :meth:`pre_check`) the
        engine keeps none and the bucket computes its own as without ``checked``: their stack (the same 4 bytes per
        gradient) replaces the engine's, the flags are freed once read, and the unusable gradients take no basis
        step, so that step allocates at most this count (traced: tests/test_bounds_osd_zero.py); the all-usable step
        allocates it."""
        if self.method(group) != "online_pca" or not members:
            return 0
        w = _Walk()
        k = len(members)
        if not checked:
            w.free(w.new(4 * k))  # (the 0-d norms, then their stack)
            w.new(4 * k)
            a, b = w.new(k), w.new(k)
            flags = w.new(k)
            w.free(a, b)
            w.free(w.new(1))  # (flags.all())
            w.free(flags)  # (read, then freed before the basis steps)
        lows = [shape_low.numel() for _, shape_low, _, _ in members]
        budget = OSD_BUDGET_SCALE * 4 * sum(lows)
        groups: dict[tuple, list[int]] = {}
        for i, (shape, _, state, _) in enumerate(members):
            if usable is None or usable[i]:
                groups.setdefault(("proj_left" in state, tuple(shape)), []).append(i)
        picked = 0  # (the last stacked batch's norms, bound until the next one's)
        r = group["rank"]
        for (left, shape), idx in groups.items():
            m, n = shape
            side = "left" if left else "right"
            basis, low, rr = 4 * (m * r if left else r * n), 4 * lows[idx[0]], 4 * r * r
            size = max(1, budget // OSD.stacked_grad_bytes(basis // 4, low // 4, r))
            for start in range(0, len(idx), size):
                kb = min(size, len(idx) - start)
                if kb == 1:
                    peak, out = OSD.pca_loss_grad_bytes(m, n, r, side, False, True)
                    w.peak = max(w.peak, w.live + peak)
                    grads = w.new(out)
                else:
                    new_picked = w.new(4 * kb)
                    w.free(picked)
                    picked = new_picked
                    stack, inv = w.new(kb * basis), w.new(4 * kb)
                    a = w.new(kb * low)
                    bd, prod = w.new(kb * basis), w.new(kb * rr)
                    w.free(a)
                    prod2 = w.new(kb * rr)
                    grads = w.new(kb * basis)
                    w.free(stack, inv, bd, prod, prod2)
                if group["proj_optimizer"] == "sgd":
                    w.free(grads)
                else:
                    w.free(grads)
                    w.free(w.new(kb * basis), w.new(kb * basis))  # (sqrt(v), then the direction)
        return w.peak

    @staticmethod
    def _low_numel(g: Tensor, state: dict[str, Tensor]) -> int:
        """Elements of the projected gradient ``P^T G`` / ``G Q^T`` of a basis-projected ``g``."""
        if "proj_left" in state:
            return state["proj_left"].shape[1] * g.shape[1]
        return g.shape[0] * state["proj_right"].shape[0]

    @staticmethod
    def _basis_step_foreach(bases: list[Tensor], grads: list[Tensor], sts: list[dict[str, Tensor]],
                            group: dict[str, Any], t: int, lr: float, wd: float) -> None:
        """The basis optimizer's step of parameters at PCA step ``t`` (their basis gradients ``grads``),
        one multi-tensor kernel per operation: SGD, or AdamW's decay, moments and direction
        (``functional.adam_moments_foreach_``, ``adam_direction_foreach``); ``grads`` is emptied."""
        if group["proj_optimizer"] == "sgd":
            if wd:
                torch._foreach_add_(grads, bases, alpha=wd)
            torch._foreach_add_(bases, grads, alpha=-lr)
            del grads[:]
            return
        for state in sts:
            state["proj_meta"][3] = t
        if wd:
            torch._foreach_mul_(bases, 1.0 - lr * wd)
        ms, vs = [st["pca_exp_avg"] for st in sts], [st["pca_exp_avg_sq"] for st in sts]
        adam_moments_foreach_(ms, vs, grads, 0.9, 0.999)
        del grads[:]
        torch._foreach_add_(bases, adam_direction_foreach(ms, vs, t, 0.9, 0.999, 1e-8), alpha=-lr)

    # -- rotation of moments --

    def snapshot(self, state, group):
        return {k: state[k].clone() for k in ("proj_left", "proj_right", "proj_index") if k in state}

    def rotate_moment(self, x, old, state, group, squared):
        if "proj_index" in state:
            # selection is exact for both moments: kept coordinates keep their statistics, new ones start at 0
            shape = _param_shape(state)
            dim, _ = self._coordinates(shape, group)
            full = FR.scatter(x.float(), dim, old["proj_index"], shape)
            return FR.select(full, dim, state["proj_index"])
        transition = GL.basis_transition((old.get("proj_left"), old.get("proj_right")), self._basis(state))
        return GL.rotate_low_rank(x.float(), transition, squared)


def _param_shape(state: dict[str, Tensor]) -> torch.Size:
    return torch.Size(state["proj_meta"][4:6].tolist())


def usable_flags(norms: Tensor) -> Tensor:
    """Whether each gradient of norm ``norms`` is usable by a data-dependent refresh or Online Subspace
    Descent's basis step (the PCA objective normalizes ``G / ||G||``, Section 3 eq. 5): finite and not
    all zero, on the device (no read)."""
    return torch.isfinite(norms) & (norms > 0)


def all_usable(norms: Tensor) -> Tensor:
    """``usable_flags(norms).all()`` in 3 kernels instead of 4: a norm is usable exactly when its log is
    finite (``log 0 = -inf``, ``log inf = inf``, ``log nan = nan``; a positive float32 norm's log lies within
    +-104), and a sum of finite logs is finite (any other term makes it infinite or NaN)."""
    return torch.isfinite(norms.log().sum())


def all_usable_if_finite(norms: Tensor) -> Tensor:
    """:func:`all_usable` of ``norms`` known finite (the engine's non-finite check read with it, issue 15):
    then usable is not zero, and ``all`` of the norms says it in one kernel (a 1-byte result; ``isfinite``'s
    decomposition would allocate 4 temporaries)."""
    return norms.all()


def _usable(g: Tensor, norm: Tensor | None = None) -> bool:
    """A gradient a data-dependent refresh can use: finite and not all zero (one host sync).
    ``norm``: ``float_norm(g)`` when the caller has it."""
    if norm is None:
        norm = float_norm(g)  # no float32 copy of a low-precision g
    return bool(usable_flags(norm))


def _pca_step_due(state: dict[str, Tensor]) -> bool:
    """Whether Online Subspace Descent's parameter takes a basis step after this step's update: its
    first refresh done and no refresh at the step before (``proj_meta``: a CPU read, no device read)."""
    _, _, refreshes, pca_steps = _meta(state)[:4]
    return refreshes > 0 and pca_steps >= 0


def _checked_norms(gs: list[Tensor], checked: dict[int, tuple[Tensor, Tensor | None]] | None) -> list[Tensor | None] | None:
    """The norms :meth:`SubspaceProjection.pre_check` found for the gradients ``gs`` (all usable: its
    flag read ``True``; ``None`` for a low-precision one), or ``None`` when ``checked`` is ``None`` or one
    of ``gs`` was not checked (that very tensor: another one at the same address is not)."""
    if checked is None:
        return None
    found = [checked.get(id(g)) for g in gs]
    if any(f is None or f[0] is not g for f, g in zip(found, gs)):
        return None
    return [f[1] for f in found]


def stacked(xs: list[Tensor]) -> Tensor:
    """``torch.stack(xs)``; a single tensor as a view (no copy)."""
    return xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)


def shape_batches(lows: list[Tensor], gs: list[Tensor], budget: int, cost: Callable[[Tensor], int],
                  most: Callable[[Tensor], int] | None = None) -> list[list[int]]:
    """The indices of a bucket's parameters grouped by the shapes of their gradient and projected
    gradient (bucket order within a batch), each batch's ``cost`` (bytes per parameter, of its
    projected gradient) at most ``budget`` and at most ``most(low)`` parameters (at least one): the
    parameters :meth:`CombineRule.foreach_fold` stacks together."""
    groups: dict[tuple, list[list[int]]] = {}
    for i, (low, g) in enumerate(zip(lows, gs)):
        batches = groups.setdefault((tuple(low.shape), tuple(g.shape)), [[]])
        n = len(batches[-1]) + 1
        if batches[-1] and (n * cost(low) > budget or (most is not None and n > most(low))):
            batches.append([])
        batches[-1].append(i)
    return [b for bs in groups.values() for b in bs]


class _Walk:
    """Bytes of the tensors alive while a piece of code runs, and their peak: the count a ``*_bytes`` function
    walks along the code it mirrors (``new`` a tensor, ``free`` it)."""

    def __init__(self, live: int = 0):
        self.live = self.peak = live

    def new(self, nbytes: int) -> int:
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        return nbytes

    def free(self, *sizes: int) -> None:
        self.live -= sum(sizes)


def limiter_walk(w: _Walk, k: int) -> int:
    """:func:`~lowmem.optim.functional.fira.growth_limiter_foreach_` of ``k`` norms walked on ``w`` (the previous
    norms' stack, the first-step mask, ones, ``prev + eps``, the quotient, the clamp, ``/ gamma``, ``where``; then
    ``norms / limiter``, copied into the previous norms): ``17 k`` bytes at its peak; returns the limiters' bytes,
    kept (alive on ``w``)."""
    prev, first, ones = w.new(4 * k), w.new(k), w.new(4 * k)
    a = w.new(4 * k)
    b = w.new(4 * k)
    w.free(a)
    c = w.new(4 * k)
    w.free(b)
    d = w.new(4 * k)
    w.free(c)
    limiter = w.new(4 * k)
    w.free(ones, d)
    w.free(w.new(4 * k))
    w.free(prev, first)
    return limiter


def _metas(shapes: list[torch.Size]) -> list[Tensor]:
    """Meta tensors of ``shapes``: :func:`shape_batches`' arguments for a count (nothing allocated)."""
    return [torch.empty(s, device="meta") for s in shapes]


#: Online Subspace Descent's stacked basis gradients: a batch's bytes at most this times :func:`fold_budget`
#: of the bucket's basis steps (1: within the bucket's freed directions)
OSD_BUDGET_SCALE = 1


def fold_budget(lows: list[Tensor]) -> int:
    """The bytes :meth:`CombineRule.foreach_fold` may allocate at once beyond its arguments: 4 per
    projected element of the bucket, the room of the multi-tensor direction's ``sqrt(v)`` (freed by
    then), so that the fold stays within the bucket's counted peak (``step_transient_bytes``)."""
    return 4 * sum(low.numel() for low in lows)


#: where :func:`stacks_by_shape` holds: ``None``, off the CPU; ``True`` / ``False``, on every device / none
#: (tests run either path on the CPU and on meta tensors with it)
STACK_BY_SHAPE: bool | None = None
#: the fewest parameters stacked where :func:`stacks_by_shape` (Fira: five kernels a stack, the bases, the
#: gradients and the projected gradients stacked, ``baddbmm_``, ``vector_norm``, against two each alone;
#: Subset-Norm: two, the stack and ``vector_norm``, against one each)
MIN_STACK = 3


def stacks_by_shape(device: torch.device) -> bool:
    """Whether a bucket's full-size gradients of one shape are copied into stacks for one kernel each
    (issue 15): Fira's residuals (:meth:`FiraResidual.foreach_fold` through
    :meth:`Projection.residuals_stacked`: one ``baddbmm_`` and one ``vector_norm`` for a few parameters) and
    Subset-Norm's gradient norms (``SubsetNormStep.foreach_fold``: one ``vector_norm``). Off the CPU, where
    the step is launch-bound; on the CPU one kernel per parameter, faster there single-threaded (4 residuals
    of 2816 x 1024 at rank 128: 74 ms one by one, 113 ms stacked, the stack being a copy of the gradients).
    :data:`STACK_BY_SHAPE` overrides it."""
    return device.type != "cpu" if STACK_BY_SHAPE is None else STACK_BY_SHAPE


# ---- residual rules -----------------------------------------------------------------------------


class ResidualRule:
    """Base class: the update for ``G - up(down(G))``, the gradient outside the subspace."""

    state_keys: tuple[str, ...] = ()

    def init_state(self, state: dict[str, Tensor], param: Tensor, group: dict[str, Any]) -> None:
        pass

    def update(
        self,
        g: Tensor,
        low: Tensor,
        d_low: Tensor,
        state: dict[str, Tensor],
        group: dict[str, Any],
        projection: Projection,
    ) -> Tensor | None:
        """Return the residual's direction (same units as the subspace direction) or ``None``."""
        raise NotImplementedError

    # the chunked combine-back: rows start:stop of update(...), after prepare() saw every row
    def prepare(self, g, low, d_low, state, group, projection, bounds) -> Any:
        """Whole-tensor statistics of the residual, from passes over the row chunks ``bounds``."""
        return None

    def update_rows(self, g_rows, low, d_low, state, group, projection, start, stop, ctx) -> Tensor | None:
        """Rows ``start:stop`` of :meth:`update` (``g_rows`` are the gradient's rows)."""
        return None

    def fold(self, low, d_low, state, group, projection, ctx) -> tuple[Tensor, Tensor] | None:
        """``(M, coef)`` such that rows ``start:stop`` of ``scale * up(d_low) + update(...)`` are
        ``up_rows(M) + g_rows * coef`` (``coef`` of shape ``[n]``, or ``[m, 1]`` sliced to the rows),
        after :meth:`prepare` returned ``ctx``: one GEMM per row block instead of two (issue 15).
        Default ``None``: :class:`ProjectBack` adds :meth:`update_rows` to ``up_rows(d_low)``."""
        return None

    def foreach_fold(self, gs, lows, d_lows, states, group, projection, alpha, bounds) -> Iterator[Fold] | None:
        """:meth:`CombineRule.foreach_fold` of :class:`ProjectBack` with this residual (a basis
        projection: :meth:`Projection.can_add_up_rows`); default ``None``: not offered."""
        return None

    def foreach_fold_rest(self, ps, gs, lows, states, group, projection, alpha, bounds) -> None:
        """:meth:`CombineRule.foreach_fold_rest` of :class:`ProjectBack` with this residual; default: nothing."""

    def foreach_fold_offered(self, group) -> bool | None:
        """Whether :meth:`foreach_fold` folds a bucket on a basis projection (``None``: not known here)."""
        return None

    def foreach_fold_bytes(self, members, group, projection, device) -> int | None:
        """:meth:`CombineRule.foreach_fold_bytes` of :class:`ProjectBack` with this residual; default ``None``."""
        return None

    def transient_bytes(self, shape, group, state, projection, rows: int) -> int:
        """Upper bound of the bytes :meth:`update` allocates for ``rows`` rows (all rows: the whole step)."""
        return 0

    def prepare_bytes(self, shape, group, state, projection, bounds, low_precision=False) -> tuple[int, int]:
        """``(peak, held)`` of :meth:`prepare` and :meth:`fold` over the row blocks ``bounds`` (the per-parameter
        step's, :func:`projected_alone_bytes`; ``low_precision``: ``g`` as stored in 16 bits); default: none."""
        return 0, 0

    def rows_bytes(self, shape, group, state, projection, rows: int) -> int:
        """The peak of :meth:`update_rows` of ``rows`` rows beside the subspace part's block and :meth:`prepare`'s
        context (the per-parameter step's, :func:`projected_alone_bytes`); default :meth:`transient_bytes`."""
        return self.transient_bytes(shape, group, state, projection, rows)

    def whole_bytes(self, shape, group, state, projection) -> int:
        """The peak of :meth:`update` beside the subspace part's whole-size direction; default :meth:`rows_bytes`
        of all rows."""
        return self.rows_bytes(shape, group, state, projection, shape[0])


class DropResidual(ResidualRule):
    """GaLore (Zhao et al. 2024, Algorithm 2): the residual is discarded."""

    def update(self, g, low, d_low, state, group, projection):
        return None

    def foreach_fold(self, gs, lows, d_lows, states, group, projection, alpha, bounds):
        """``alpha scale up(d_low)``: ``(i, d_low, alpha * scale, None)`` (no statistics)."""
        a = alpha * group["scale"]
        return ((i, d, a, None) for i, d in enumerate(d_lows))

    def foreach_fold_offered(self, group):
        return True

    def foreach_fold_bytes(self, members, group, projection, device):
        """Each ``p += a up(d_low)`` in place: a two-sided basis's ``P N`` (:meth:`Projection.add_up_rows_bytes`)."""
        return max(projection.add_up_rows_bytes(shape, group, shape[0]) for shape, *_ in members)


class FiraResidual(ResidualRule):
    """Fira (Chen et al. 2024, Algorithm 1): the residual ``G - alpha P P^T G``, scaled column-wise
    by how much the optimizer rescales the low-rank gradient (eq. 7-8), then limited so that its
    norm grows at most by ``gamma`` per step (eq. 9).

    Args:
        unit_scale: ``(state, group) -> float``, the factor the moment rule folds into its
            direction (Adam's ``sqrt(1 - beta2^t) / (1 - beta1^t)`` with ``eps_placement="hf"``).
            The scaling factor and the limiter are computed on the direction divided by it, as
            fira 1.0.2 does, and the result is multiplied back.

    Group keys: ``gamma`` (limiter, default 1.01), ``scale``. State: ``fira_prev_norm`` (0-d).
    """

    state_keys = ("fira_prev_norm",)

    def __init__(self, unit_scale: Callable[[dict, dict], float] | None = None):
        self.unit_scale = unit_scale

    def init_state(self, state, param, group):
        state["fira_prev_norm"] = torch.full((), -1.0, dtype=torch.float32, device=param.device)

    def update(self, g, low, d_low, state, group, projection):
        c = self.unit_scale(state, group) if self.unit_scale is not None else 1.0
        residual = g - projection.up(low, state, group) * group["scale"]
        scaled = FI.norm_based_scaling(residual, d_low / c, low)
        return FI.norm_growth_limit(scaled, state["fira_prev_norm"], group["gamma"]).mul_(c)

    def _scaled_rows(self, g_rows, low, factor, state, group, projection, start, stop):
        residual = projection.up_rows(low, state, group, start, stop).mul_(-group["scale"]).add_(g_rows)
        return residual.mul_(factor if factor.dim() == 1 else factor[start:stop])

    def prepare(self, g, low, d_low, state, group, projection, bounds):
        """The scaling factor (eq. 7-8) and the limiter (eq. 9) from the norm of the whole scaled
        residual, summed over row chunks."""
        c = self.unit_scale(state, group) if self.unit_scale is not None else 1.0
        factor = FI.scaling_factor(d_low / c, low)
        if len(bounds) == 1:
            norm = torch.linalg.vector_norm(self._scaled_rows(g, low, factor, state, group, projection, 0, g.shape[0]))
        else:  # accumulated in place (no small tensors pinned between row-sized temporaries)
            norm = torch.zeros((), dtype=torch.float32, device=g.device)
            for a, b in bounds:
                norm.add_(torch.linalg.vector_norm(self._scaled_rows(g[a:b], low, factor, state, group, projection, a, b)).square_())
            norm.sqrt_()
        limiter = FI.growth_limiter_(norm, state["fira_prev_norm"], group["gamma"])
        return factor, limiter, c

    def update_rows(self, g_rows, low, d_low, state, group, projection, start, stop, ctx):
        """The unfolded rows (the reference :meth:`fold` is tested equal to)."""
        factor, limiter, c = ctx
        return self._scaled_rows(g_rows, low, factor, state, group, projection, start, stop).div_(limiter).mul_(c)

    def fold(self, low, d_low, state, group, projection, ctx):
        """With ``f`` the scaling factor (eq. 7-8), ``l`` the limiter (eq. 9), ``c`` the unit scale and
        ``alpha = scale``, the combined rows are
        ``alpha up(d_low) + (G - alpha up(low)) f c / l = up(alpha (d_low - low * k)) + G * k`` with
        ``k = f c / l``: ``f`` scales the columns of ``up(low) = P low`` (left side, ``k`` of shape
        ``[n]``) or the rows of ``up(low) = low Q`` (right side, ``[m, 1]``), so it commutes with the
        projection's product. Returns ``(M, k)``, ``M`` of ``low``'s shape; ``None`` for a projection
        without a basis (coordinates scatter)."""
        if not projection.can_add_up_rows(state):
            return None
        factor, limiter, c = ctx
        coef = factor * (c / limiter)
        m = torch.addcmul(d_low, low, coef, value=-1.0)
        if group["scale"] != 1.0:
            m.mul_(group["scale"])
        return m, coef

    def _residual_norms(self, g, low, state, group, projection, dim, bounds):
        """The channel norms of the residual ``G - scale up(low)`` (``dim`` 0: of its columns, ``[n]``;
        1: of its rows, ``[m]``), one block of rows of ``bounds`` at a time (one ``addmm`` each)."""
        alpha = -group["scale"]
        if len(bounds) == 1:
            a, b = bounds[0]
            return torch.linalg.vector_norm(projection.residual_rows(g[a:b], low, state, group, a, b, alpha), dim=dim)
        if dim == 1:
            return torch.cat([torch.linalg.vector_norm(projection.residual_rows(g[a:b], low, state, group, a, b, alpha), dim=1)
                              for a, b in bounds])
        sq = torch.zeros(g.shape[1], dtype=torch.float32, device=g.device)
        for a, b in bounds:
            sq.add_(torch.linalg.vector_norm(projection.residual_rows(g[a:b], low, state, group, a, b, alpha), dim=0).square_())
        return sq.sqrt_()

    def foreach_fold(self, gs, lows, d_lows, states, group, projection, alpha, bounds):
        """:meth:`fold` of a bucket, a batch of parameters of one shape at a time (:func:`shape_batches`):
        the residuals' channel norms of each first, either one parameter and block of rows at a time
        (before any stack exists) or, off the CPU (:func:`stacks_by_shape`) for a batch whose parameters
        are one block of rows each with a one-sided basis (:meth:`Projection.can_stack_residuals`), the
        batch's residuals stacked (:meth:`Projection.residuals_stacked`, one ``baddbmm_`` on a copy of
        the gradients) and their channel norms in one ``vector_norm``; then for all of them at once
        (stacked: the two stacks and the channel vectors within :func:`fold_budget`), the scaling factor
        (eq. 7-8) from the channel norms of ``d_low / c`` and ``low``, the scaled residual's norm
        ``sqrt(sum_j f_j^2 ||R_j||^2)`` (:func:`~lowmem.optim.functional.fira.scaled_norms`), the limiters
        (eq. 9, :func:`~lowmem.optim.functional.fira.growth_limiter_foreach_`), ``k = f c / l`` and
        ``M = d_low - low * k`` in place in the stack of directions; yields ``(i, M, alpha scale, alpha k)``."""
        c = self.unit_scale(states[0], group) if self.unit_scale is not None else 1.0  # (one step count per bucket)
        scale, gamma = group["scale"], group["gamma"]
        dims = [0 if low.shape[0] < low.shape[1] else 1 for low in lows]  # (scaling_factor's channels)
        # a batch: its residuals' channel norms first, one parameter and block of rows at a time (no stack
        # alive; at most rank + 3 parameters' norms next to a residual block: within the per-parameter
        # combine-back's counted transient); then the stacks of its projected gradients and directions
        # (2 x 4 B per element) and about 5 channel vectors per parameter, within fold_budget
        budget = fold_budget(lows)
        batches = shape_batches(lows, gs, budget, lambda low: 8 * low.numel() + 20 * max(low.shape),
                                lambda low: min(low.shape) + 3)
        stack = bool(gs) and stacks_by_shape(gs[0].device)

        def residual_norms(idx: list[int], dim: int) -> Tensor:
            """The batch's residuals' channel norms, ``[B, C]``: where :func:`stacks_by_shape`, stacked
            :data:`MIN_STACK` or more parameters at a time (the stacked gradients, bases and projected
            gradients of such a part within fold_budget less the batch's channel norms; none of the batch's
            stacks alive yet; five kernels a part, fewer than two per parameter), the rest one at a time,
            each written into the batch's norms; else one parameter and block of rows at a time."""
            one = [(0, gs[idx[0]].shape[0])]
            if stack and len(idx) >= MIN_STACK and all(bounds[i] == one and projection.can_stack_residuals(states[i])
                                                      for i in idx):
                low0 = lows[idx[0]]
                room = budget - 4 * max(low0.shape) * len(idx)  # (the batch's norms)
                size = room // (projection.stacked_residual_bytes(gs[idx[0]].shape, group) + 4 * low0.numel())
                if size >= MIN_STACK:
                    out = torch.empty((len(idx), gs[idx[0]].shape[1 - dim]),  # (columns' or rows' norms)
                                      dtype=torch.float32, device=gs[idx[0]].device)
                    for a in range(0, len(idx), size):
                        part = idx[a:a + size]
                        if len(part) >= MIN_STACK:
                            residuals = projection.residuals_stacked([gs[i] for i in part],
                                                                     torch.stack([lows[i] for i in part]),
                                                                     [states[i] for i in part], group, -scale)
                            torch.linalg.vector_norm(residuals, dim=dim + 1, out=out[a:a + len(part)])
                        else:  # (a rest of one or two: one GEMM and norm each)
                            for j, i in enumerate(part, a):
                                residuals = projection.residual_rows(gs[i], lows[i], states[i], group, *one[0], -scale)
                                torch.linalg.vector_norm(residuals, dim=dim, out=out[j])
                        del residuals
                    return out
            return stacked([self._residual_norms(gs[i], lows[i], states[i], group, projection, dim, bounds[i])
                            for i in idx])

        def folds() -> Iterator[Fold]:
            for idx in batches:
                dim = dims[idx[0]]
                rnorms = residual_norms(idx, dim)
                low = stacked([lows[i] for i in idx])
                d = stacked([d_lows[i] for i in idx])
                factor = FI.factor_from_norms(torch.linalg.vector_norm(d, dim=dim + 1).div_(c),
                                              torch.linalg.vector_norm(low, dim=dim + 1))
                norms = FI.scaled_norms(rnorms, factor)
                del rnorms
                limiter = FI.growth_limiter_foreach_(norms, [states[i]["fira_prev_norm"] for i in idx], gamma)
                k = factor.mul_((c / limiter).unsqueeze(1))
                kk = k.unsqueeze(1) if dim == 0 else k.unsqueeze(2)
                # (one parameter: its stack is a view of its direction, left untouched)
                m = d.addcmul_(low, kk, value=-1.0) if len(idx) > 1 else torch.addcmul(d, low, kk, value=-1.0)
                del low, d, kk
                coef = k.mul_(alpha)
                for j, i in enumerate(idx):
                    yield i, m[j], alpha * scale, coef[j] if dim == 0 else coef[j].unsqueeze(1)
                del m, coef, k, factor, norms, limiter  # (before the next batch's residuals and stacks)

        return folds()

    def foreach_fold_offered(self, group):
        return True

    def foreach_fold_bytes(self, members, group, projection, device):
        """The peak of :meth:`foreach_fold` of a bucket (``members``: ``(shape, low_shape, state, bounds)`` of each
        parameter) and of the engine's in-place updates with its terms (``addmm_`` of ``up(M)``: a two-sided
        basis's ``P N``; ``addcmul_``), beyond the bucket's projected gradients and directions, walked along
        :meth:`foreach_fold` batch by batch (nothing of a batch outlives it): the residuals' channel norms (one
        parameter and block of rows at a time: a block's residual beside its norm, the norms of the batch's
        earlier parameters kept, then their stack; or, where :func:`stacks_by_shape` on ``device``, stacked
        :data:`MIN_STACK` or more at a time: the projected gradients', the bases' and the gradients' stacks beside
        the batch's norms), the stacks of the batch's projected gradients and directions (a batch of one: views),
        the factor's four ``[B, C]`` vectors, the scaled norms, the limiters
        (:func:`~lowmem.optim.functional.fira.growth_limiter_foreach_`: ``17 B`` bytes), ``c / l``, and ``M`` (a
        batch of one: a new tensor; else in place in the directions' stack) beside the update's ``P N``. Exact
        against a trace (tests/test_folds_buckets.py)."""
        lows = _metas([low for _, low, _, _ in members])
        gs = _metas([shape for shape, _, _, _ in members])
        budget = fold_budget(lows)
        batches = shape_batches(lows, gs, budget, lambda low: 8 * low.numel() + 20 * max(low.shape),
                                lambda low: min(low.shape) + 3)
        stack = bool(members) and device is not None and stacks_by_shape(torch.device(device))
        worst = 0
        for idx in batches:
            shape, low_shape = members[idx[0]][0], members[idx[0]][1]
            m, n = shape
            k, size_l = len(idx), 4 * low_shape.numel()
            dim = 0 if low_shape[0] < low_shape[1] else 1
            ch = 4 * (n if dim == 0 else m)  # (a channel vector's bytes: columns' or rows' norms)
            w = _Walk()
            # the residuals' channel norms
            one = [(0, m)]
            stacked_form = False
            if stack and k >= MIN_STACK and all(members[i][3] == one and projection.can_stack_residuals(members[i][2])
                                                for i in idx):
                room = budget - 4 * max(low_shape) * k
                size = room // (projection.stacked_residual_bytes(shape, group) + size_l)
                if size >= MIN_STACK:
                    stacked_form = True
                    rn = w.new(k * ch)
                    for a in range(0, k, size):
                        part = min(size, k - a)
                        if part >= MIN_STACK:
                            w.free(w.new(part * (size_l + projection.stacked_residual_bytes(shape, group))))
                        else:  # (a rest of one or two: each residual made while the one before is bound)
                            res = [w.new(4 * m * n) for _ in range(part)]
                            w.free(*res)
            if not stacked_form:
                kept = []
                for i in idx:
                    kept.append(self._residual_norms_walk(w, members[i][0], members[i][1], members[i][3], dim,
                                                          projection, group))
                rn = w.new(k * ch) if k > 1 else 0
                w.free(*(kept if k > 1 else []))
                rn = rn or kept[0]
            # the stacks, the factor (eq. 7-8), the scaled norms and the limiters (eq. 9)
            stacks = w.new(2 * k * size_l) if k > 1 else 0
            vec = k * ch
            nd, nl = w.new(vec), w.new(vec)
            eps = w.new(vec)  # (grad_norms + eps, beside the quotient)
            w.new(vec)  # (the factor, then k and the coefficients in place: to the batch's end)
            w.free(eps, nd, nl)
            tmp = w.new(vec)
            w.new(4 * k)  # (the scaled norms)
            w.free(tmp, rn)
            limiter_walk(w, k)  # (the limiters, kept)
            w.free(w.new(4 * k))  # (c / limiter)
            if k == 1:
                w.new(size_l)  # (M: a new tensor; the stack of one is a view of its direction)
            else:
                w.free(stacks // 2)  # (the projected gradients' stack; M is written into the directions')
            # the engine's update with each term: addmm_ (two-sided: P N), addcmul_ in place
            w.free(w.new(max(projection.add_up_rows_bytes(members[i][0], group, members[i][0][0]) for i in idx)))
            worst = max(worst, w.peak)
        return worst

    @staticmethod
    def _residual_norms_walk(w: _Walk, shape, low_shape, bounds, dim, projection, group) -> int:
        """:meth:`_residual_norms` walked on ``w`` (a block's residual, a two-sided basis's ``P N`` first, beside
        its norm); returns the bytes of the norms it leaves."""
        n = shape[1]
        sided = projection.add_up_rows_bytes(shape, group, 1)  # (two-sided: a row of P N)

        def residual(rows: int) -> int:
            t = w.new(sided * rows)
            r = w.new(4 * rows * n)
            w.free(t)
            return r

        if len(bounds) == 1:
            a, b = bounds[0]
            r = residual(b - a)
            v = w.new(4 * (n if dim == 0 else b - a))
            w.free(r)
            return v
        if dim == 1:
            parts = []
            for a, b in bounds:
                r = residual(b - a)
                parts.append(w.new(4 * (b - a)))
                w.free(r)
            v = w.new(4 * shape[0])
            w.free(*parts)
            return v
        sq = w.new(4 * n)
        for a, b in bounds:
            r = residual(b - a)
            w.free(w.new(4 * n), r)
        return sq

    def transient_bytes(self, shape, group, state, projection, rows):
        """All rows at once (the whole-tensor :meth:`update`): the subspace part, the residual and its
        scaled form, 3 float32 blocks. A block of fewer rows is folded (:meth:`fold`): no row block of
        its own (the norm pass's block comes and goes before the direction's); the factor's
        ``d_low / c`` (:meth:`prepare`) is freed before the fold's ``M`` exists (``addcmul``: no
        ``low * k`` of its own), so one tensor of ``low``'s size, and the factor, ``k`` and a norm's
        vector (``n`` or ``m`` each). Measured on 2048 x 2048 at rank 512, one weight: 13.9 MiB for
        this plus the projected gradient, its direction and a block of rows, 14.0 (was 22.0) reported."""
        if rows >= shape[0] or not projection.can_add_up_rows(state):
            return 12 * rows * shape[1]
        return 4 * projection.low_shape(shape, group).numel() + 12 * max(shape)

    @staticmethod
    def _channels(shape, group, projection) -> int:
        """The scaling factor's length (:func:`~lowmem.optim.functional.fira.scaling_factor`: per column of an
        ``r x n`` projected gradient, per row of ``m x r``)."""
        low = projection.low_shape(shape, group)
        return low[1] if low[0] < low[1] else low[0]

    def prepare_bytes(self, shape, group, state, projection, bounds, low_precision=False):
        """Exact (traced): ``d_low / c`` beside the scaling factor's two norm vectors and their denominator
        (``L + 12 C``); beside the factor (``4 C``), the norm pass (a block's scaled residual, its norm and the
        sum's 0-d tensor) and :func:`~lowmem.optim.functional.fira.growth_limiter_`; then :meth:`fold`'s ``k``
        (``4 C``) and ``M`` (``L``) beside the factor and the limiter, all held through the blocks."""
        if not projection.can_add_up_rows(state):
            return 0, 0
        low = 4 * projection.low_shape(shape, group).numel()
        ch = 4 * self._channels(shape, group, projection)
        block = 4 * max(b - a for a, b in bounds) * shape[1]
        held = 2 * ch + 4 + low
        return max(low + 3 * ch, ch + 8 + block, ch + FI.LIMITER_BYTES, held), held

    def rows_bytes(self, shape, group, state, projection, rows):
        """Folded (a basis): nothing beside the subspace part's block (``addcmul_`` into it)."""
        if not projection.can_add_up_rows(state):
            return self.transient_bytes(shape, group, state, projection, rows)
        return 0

    def whole_bytes(self, shape, group, state, projection):
        """:meth:`update` beside the subspace part: ``up(low)``, its scaled copy, the residual, then beside the
        residual ``d_low / c``, the factor and the scaled residual, then the limited one and the norm's 0-d
        tensor (``12 m n + 4``, the largest but for a rank near the smaller side)."""
        mn = 4 * shape[0] * shape[1]
        low = 4 * projection.low_shape(shape, group).numel()
        ch = 4 * self._channels(shape, group, projection)
        return max(2 * mn, mn + low + 3 * ch, 2 * mn + low + ch, 3 * mn + 4)


class StateFreeResidual(ResidualRule):
    """FRUGAL (Zmushko et al. 2024, Algorithm 1): the residual ``G - P P^T G`` takes a state-free
    step, ``signSGD`` (``sign(residual)``) or ``SGD``, at ``free_lr_scale`` times the learning rate.

    Group keys: ``free_rule`` (``"signsgd"`` or ``"sgd"``), ``free_lr_scale``. No state.
    """

    def update(self, g, low, d_low, state, group, projection):
        residual = g - projection.up(low, state, group)
        return FR.scaled_state_free_direction(residual, group["free_rule"], group["free_lr_scale"])

    def update_rows(self, g_rows, low, d_low, state, group, projection, start, stop, ctx):
        up = projection.up_rows(low, state, group, start, stop)
        residual = torch.sub(g_rows, up, out=up)  # (in place: one kernel, the bits of g - up)
        return FR.scaled_state_free_direction(residual, group["free_rule"], group["free_lr_scale"])

    def foreach_fold(self, gs, lows, d_lows, states, group, projection, alpha, bounds):
        """The subspace part of a bucket: ``(i, d_low, alpha scale, None)`` (one ``addmm_`` into the parameter
        each); the state-free part is :meth:`foreach_fold_rest`'s."""
        a = alpha * group["scale"]
        return ((i, d, a, None) for i, d in enumerate(d_lows))

    def foreach_fold_rest(self, ps, gs, lows, states, group, projection, alpha, bounds):
        """The state-free part of a bucket (issue 15): each parameter's residual ``G - P P^T G`` a block of
        rows of ``bounds`` at a time (the bits of :meth:`update_rows`' residual), then, for a batch of blocks,
        ``sign`` in place (:func:`~lowmem.optim.functional.frugal.state_free_direction_foreach_`) and
        ``p += alpha free_lr_scale d`` in one multi-tensor kernel each, instead of one per block (equal to
        :meth:`update_rows` added to the subspace part, to float32 rounding: two additions into ``p``, not
        one). A batch holds at most 3 blocks' elements of the smallest parameter's largest block (12 bytes per
        element, this rule's :meth:`transient_bytes` of any parameter of the bucket: within its count)."""
        f = group["free_lr_scale"]
        if f == 0:
            return
        cap = 3 * min(max((b - a for a, b in bs), default=0) * g.shape[1] for bs, g in zip(bounds, gs))
        batch_p: list[Tensor] = []
        batch_r: list[Tensor] = []
        used = 0
        for p, g, low, state, bs in zip(ps, gs, lows, states, bounds):
            for start, stop in bs:
                numel = (stop - start) * g.shape[1]
                if batch_r and used + numel > cap:
                    FR.state_free_step_foreach_(batch_p, batch_r, group["free_rule"], alpha * f)
                    used = 0
                up = projection.up_rows(low, state, group, start, stop)
                batch_r.append(torch.sub(g[start:stop], up, out=up))  # (the residual: update_rows' bits)
                batch_p.append(p[start:stop])
                used += numel
                del up
        if batch_r:
            FR.state_free_step_foreach_(batch_p, batch_r, group["free_rule"], alpha * f)

    def foreach_fold_offered(self, group):
        """FRUGAL's own fold (a subclass folding otherwise says so itself)."""
        ours = (type(self).foreach_fold is StateFreeResidual.foreach_fold
                and type(self).foreach_fold_rest is StateFreeResidual.foreach_fold_rest)
        return True if ours else None

    def foreach_fold_bytes(self, members, group, projection, device):
        """:meth:`foreach_fold`'s in-place ``addmm_`` of each parameter (a two-sided basis's ``P N``), then
        :meth:`foreach_fold_rest` walked: each block's ``up_rows`` (:meth:`Projection.up_rows_bytes`; the residual
        written into it) beside the blocks of its batch (at most 3 blocks' elements of the smallest parameter's
        largest block), ``sign`` and the update in place, the batch freed at once. Exact against a trace
        (tests/test_folds_buckets.py)."""
        if self.foreach_fold_offered(group) is not True:
            return None
        worst = max(projection.add_up_rows_bytes(shape, group, shape[0]) for shape, *_ in members)
        if group["free_lr_scale"] == 0:
            return worst
        cap = 3 * min(max((b - a for a, b in bs), default=0) * shape[1] for shape, _, _, bs in members)
        batch = used = 0
        for shape, _, _, bs in members:
            for a, b in bs:
                numel = (b - a) * shape[1]
                if batch and used + numel > cap:
                    batch = used = 0
                peak, out = projection.up_rows_bytes(shape, group, b - a)
                worst = max(worst, batch + peak)
                batch += out
                used += numel
        return worst

    def transient_bytes(self, shape, group, state, projection, rows):
        """The subspace part of the rows, the residual and its sign: 3 float32 row blocks."""
        return 12 * rows * shape[1]

    def rows_bytes(self, shape, group, state, projection, rows):
        """Beside the subspace part's block: the projection of ``low``'s rows (:meth:`Projection.up_rows_bytes`,
        then the residual in place) and its sign or copy (a new block)."""
        peak, out = projection.up_rows_bytes(shape, group, rows)
        return max(peak, out + 4 * rows * shape[1])

    def whole_bytes(self, shape, group, state, projection):
        """:meth:`update`: ``up(low)`` (two-sided: beside ``P low``, freed before the residual), then ``g - up(low)``
        beside it, then its sign or copy beside the residual (``8 m n``)."""
        return max(projection.up_bytes(shape, group), 8 * shape[0] * shape[1])


# ---- combine back: the full-size direction of a projected parameter ------------------------------


class CombineRule:
    """The chain's step after the moment rule, for a projected parameter: the full-size direction
    from the gradient ``g`` (``m x n``), its projection ``low = P.down(g)`` and the moment rule's
    subspace direction ``d_low``. The engine then applies weight decay and the learning rate.

    :class:`ProjectBack` is GaLore's ``scale * P.up(d_low) + residual`` (with a
    :class:`ResidualRule`); a rule that does not map ``d_low`` back at all (APOLLO scales the raw
    gradient by how the moment rule rescaled its projection) is another subclass, written outside
    the engine. Like every part it holds configuration only; its tensors live in ``state[p]``.

    The combine-back runs a block of rows at a time (no direction of the parameter's full size):
    :meth:`prepare` sees every row first (whole-tensor norms), then :meth:`direction_rows` gives
    rows ``start:stop``. :meth:`direction` is the whole-tensor form (``chunk_numel=None``), the
    reference the row form is tested equal to.

    Attributes:
        state_keys: Names of the state tensors this rule owns.
        needs_full_gradient: Whether the rule reads ``g`` (not only ``low`` and ``d_low``); layerwise
            accumulation can keep a projected parameter's micro-batch sum in the subspace only when
            it does not.
    """

    state_keys: tuple[str, ...] = ()
    needs_full_gradient: bool = True

    def init_state(self, state: dict[str, Tensor], param: Tensor, group: dict[str, Any]) -> None:
        pass

    def init_state_sharded(self, state: dict[str, Tensor], shard: Tensor, param: Tensor, group: dict[str, Any]) -> None:
        """FSDP2 (lowmem.optim.sharded): the state for the local rows ``shard`` of the ``DTensor``
        ``param``; default :meth:`init_state` of the whole parameter (0-d state: Fira's, APOLLO's)."""
        self.init_state(state, param, group)

    def direction(self, g: Tensor, low: Tensor, d_low: Tensor, state: dict[str, Tensor], group: dict[str, Any],
                  projection: Projection) -> Tensor:
        """The full-size direction (float32, a new tensor)."""
        raise NotImplementedError

    def prepare(self, g: Tensor, low: Tensor, d_low: Tensor, state: dict[str, Tensor], group: dict[str, Any],
                projection: Projection, bounds: list[tuple[int, int]]) -> Any:
        """Whole-tensor statistics from passes over the row blocks ``bounds``; returns a context."""
        return None

    def direction_rows(self, g_rows: Tensor, low: Tensor, d_low: Tensor, state: dict[str, Tensor],
                       group: dict[str, Any], projection: Projection, start: int, stop: int, ctx: Any) -> Tensor:
        """Rows ``start:stop`` of :meth:`direction` (``g_rows`` are the gradient's rows, float32)."""
        raise NotImplementedError

    def add_in_place_scale(self, state: dict[str, Tensor], group: dict[str, Any], projection: Projection) -> float | None:
        """``c`` if the direction is ``c * P.up(d_low)`` and nothing else, so the engine may add it to
        the parameter in place with one GEMM (``addmm_``); ``None`` otherwise (default)."""
        return None

    def foreach_fold(self, gs: list[Tensor], lows: list[Tensor], d_lows: list[Tensor], states: list[dict[str, Tensor]],
                     group: dict[str, Any], projection: Projection, alpha: float,
                     bounds: list[list[tuple[int, int]]]) -> Iterator[Fold] | None:
        """The combine-back of a bucket of projected parameters at once (the engine's projected
        multi-tensor step, issue 15), folded for an in-place update: yields ``(i, M, a, k)`` for every
        parameter ``i`` such that ``alpha * direction(gs[i], lows[i], d_lows[i], ...)`` is
        ``a * P.up(M) + gs[i] * k`` (``M`` ``None``: no subspace term; ``k`` ``None``: no gradient term,
        else shaped like a scaling factor: ``[n]``, ``[m, 1]`` or 0-d), which the engine adds to the
        float32 parameter in place (``addmm_``, ``addcmul_``): no full-size direction. Statistics of the
        parameters of one shape are computed together (stacked, :func:`shape_batches`), so a step
        launches a few kernels per shape, not per parameter; state is updated as :meth:`prepare` does.
        Each tuple is used before the next is asked for (a batch's stacks are freed as the iteration
        moves on). Memory: at most 4 bytes per projected element of the bucket beyond the arguments,
        and per parameter the temporaries of one block of rows of ``bounds[i]`` (its row blocks), both
        within :meth:`transient_bytes` and the bucket's multi-tensor direction. Arguments are float32;
        ``alpha`` a number (the engine's ``-lr``). ``None`` (default): not offered, each parameter is
        combined back alone (:meth:`direction_rows`, the reference this is tested equal to, to float32
        rounding)."""
        return None

    def foreach_fold_rest(self, ps: list[Tensor], gs: list[Tensor], lows: list[Tensor], states: list[dict[str, Tensor]],
                          group: dict[str, Any], projection: Projection, alpha: float,
                          bounds: list[list[tuple[int, int]]]) -> None:
        """After the engine added :meth:`foreach_fold`'s terms to the float32 parameters ``ps``: the part of
        ``alpha * direction`` that is neither ``P.up(M)`` nor ``G * k`` (FRUGAL's ``sign`` of the residual),
        added to ``ps`` in place, within :meth:`transient_bytes`; default: nothing."""

    def transient_bytes(self, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor],
                        projection: Projection, rows: int) -> int:
        """Upper bound of the bytes :meth:`direction_rows` allocates for ``rows`` rows (the returned
        direction included; all rows: :meth:`direction`)."""
        raise NotImplementedError

    def prepare_bytes(self, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor],
                      projection: Projection, bounds: list[tuple[int, int]], low_precision: bool = False
                      ) -> tuple[int, int]:
        """``(peak, held)``: the bytes :meth:`prepare` allocates at most over the row blocks ``bounds`` and
        those of its context, alive through the blocks' :meth:`direction_rows` (the per-parameter step,
        :func:`projected_alone_bytes`; ``low_precision``: ``g`` as stored in 16 bits); default: none."""
        return 0, 0

    def rows_bytes(self, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor],
                   projection: Projection, rows: int) -> int:
        """The peak of :meth:`direction_rows` of ``rows`` rows beside :meth:`prepare`'s context, the returned
        direction included (the per-parameter step, :func:`projected_alone_bytes`); default :meth:`transient_bytes`."""
        return self.transient_bytes(shape, group, state, projection, rows)

    def fold_bytes(self, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor],
                   projection: Projection) -> int | None:
        """The bytes one parameter's :meth:`foreach_fold` term and its in-place update (``addmm_`` of
        ``up(M)``, ``addcmul_``) allocate beside the bucket's projected gradients and directions (the engine's
        multi-tensor combine-back of float32 parameters at a float learning rate); ``None`` (default): not
        counted here (the engine counts :meth:`transient_bytes` of a block of rows)."""
        return None

    def foreach_fold_offered(self, members: list[tuple], group: dict[str, Any], projection: Projection) -> bool | None:
        """Whether :meth:`foreach_fold` folds a float32 bucket of ``members`` (``(shape, low_shape, state, row
        bounds)`` of each parameter; ``False``: each is combined back alone, counted by :func:`projected_back_bytes`);
        ``None`` (default): not known here (the engine then counts a bound)."""
        return None

    def foreach_fold_bytes(self, members: list[tuple], group: dict[str, Any], projection: Projection,
                           device: torch.device | None) -> int | None:
        """The peak bytes of :meth:`foreach_fold` of a bucket, the engine's in-place updates with its terms and
        :meth:`foreach_fold_rest`, beyond the bucket's projected gradients and directions (alive through the
        fold); ``members``: ``(shape, low_shape, state, row bounds)`` of each parameter in bucket order;
        ``device``: the parameters' (its form of the fold: :func:`stacks_by_shape`). ``None`` (default): not
        counted (the engine counts a bound)."""
        return None

    def whole_bytes(self, shape: torch.Size, group: dict[str, Any], state: dict[str, Tensor],
                    projection: Projection) -> int:
        """The peak of :meth:`direction` (the step with ``chunk_numel=None``), the direction included; default:
        :meth:`prepare_bytes` of one block of all rows, then :meth:`rows_bytes` of all rows beside its context."""
        peak, held = self.prepare_bytes(shape, group, state, projection, [(0, shape[0])])
        return max(peak, held + self.rows_bytes(shape, group, state, projection, shape[0]))


def _direction_width(state: dict[str, Tensor]) -> int:
    """Bytes per element of the moment rule's subspace direction ``d_low`` and so of ``up(d_low)``: 8 with float64
    moments (``state_dtype="param"`` of a float64 parameter, projected by coordinates or a Gaussian basis: the
    SVD bases refuse it), else 4. (Before 2026-11-30 counted 4: a float64 FRUGAL 48 x 24 weight, chunk 600,
    14,112 B reported, 16,512 traced.)"""
    m = state.get("exp_avg")
    return 8 if m is not None and m.dtype == torch.float64 else 4


class ProjectBack(CombineRule):
    """``d = scale * P.up(d_low) + residual(g, low, d_low)`` (GaLore, Algorithm 2 line 10, with the
    residual rule of Fira or FRUGAL; :class:`DropResidual` for GaLore itself).

    Group keys: ``scale`` (alpha), and the residual rule's.
    """

    def __init__(self, residual: ResidualRule | None = None):
        self.residual = residual if residual is not None else DropResidual()
        self.state_keys = self.residual.state_keys
        self.needs_full_gradient = not isinstance(self.residual, DropResidual)

    def init_state(self, state, param, group):
        self.residual.init_state(state, param, group)

    def direction(self, g, low, d_low, state, group, projection):
        d = projection.up(d_low, state, group)
        scale = group["scale"]
        if scale != 1.0:
            d.mul_(scale)
        res = self.residual.update(g, low, d_low, state, group, projection)
        return d if res is None else d.add_(res)

    def prepare(self, g, low, d_low, state, group, projection, bounds):
        """The residual rule's context and its fold (:meth:`ResidualRule.fold`), if it offers one."""
        ctx = self.residual.prepare(g, low, d_low, state, group, projection, bounds)
        return ctx, self.residual.fold(low, d_low, state, group, projection, ctx)

    def direction_rows(self, g_rows, low, d_low, state, group, projection, start, stop, ctx):
        ctx, folded = ctx
        if folded is not None:  # one GEMM: up_rows(M) + g_rows * coef
            m, coef = folded
            d = projection.up_rows(m, state, group, start, stop)
            return d.addcmul_(g_rows, coef if coef.dim() == 1 else coef[start:stop])
        return self.unfolded_rows(g_rows, low, d_low, state, group, projection, start, stop, ctx)

    def unfolded_rows(self, g_rows, low, d_low, state, group, projection, start, stop, ctx):
        """:meth:`direction_rows` without the fold (``ctx``: the residual rule's own context):
        ``scale * up_rows(d_low) + update_rows(...)``, the reference the folded rows are tested equal to."""
        d = projection.up_rows(d_low, state, group, start, stop)
        scale = group["scale"]
        if scale != 1.0:
            d.mul_(scale)
        res = self.residual.update_rows(g_rows, low, d_low, state, group, projection, start, stop, ctx)
        return d if res is None else d.add_(res)

    def foreach_fold(self, gs, lows, d_lows, states, group, projection, alpha, bounds):
        """The residual rule's (:meth:`ResidualRule.foreach_fold`) on a basis projection (not coordinates)."""
        if not all(projection.can_add_up_rows(st) for st in states):
            return None
        return self.residual.foreach_fold(gs, lows, d_lows, states, group, projection, alpha, bounds)

    def foreach_fold_rest(self, ps, gs, lows, states, group, projection, alpha, bounds):
        self.residual.foreach_fold_rest(ps, gs, lows, states, group, projection, alpha, bounds)

    def foreach_fold_offered(self, members, group, projection):
        """A basis projection (:meth:`Projection.can_add_up_rows`) and the residual rule's word
        (:meth:`ResidualRule.foreach_fold_offered`); coordinates: ``False``."""
        if not all(projection.can_add_up_rows(st) for _, _, st, _ in members):
            return False
        return self.residual.foreach_fold_offered(group)

    def foreach_fold_bytes(self, members, group, projection, device):
        """The residual rule's (:meth:`ResidualRule.foreach_fold_bytes`) where it folds."""
        if self.foreach_fold_offered(members, group, projection) is not True:
            return None
        return self.residual.foreach_fold_bytes(members, group, projection, device)

    def add_in_place_scale(self, state, group, projection):
        if isinstance(self.residual, DropResidual) and projection.can_add_up_rows(state):
            return group["scale"]
        return None

    def fold_bytes(self, shape, group, state, projection):
        """GaLore's (no residual, a basis): ``p += a up(d_low)`` in place, nothing but a two-sided basis's
        ``P N`` (:meth:`Projection.add_up_rows_bytes` of all rows); other residual rules: not counted here."""
        if isinstance(self.residual, DropResidual) and projection.can_add_up_rows(state):
            return projection.add_up_rows_bytes(shape, group, shape[0])
        return None

    def transient_bytes(self, shape, group, state, projection, rows):
        return (self.residual.transient_bytes(shape, group, state, projection, rows)
                + projection.combine_transient_bytes(shape, group, rows))

    def rows_bytes(self, shape, group, state, projection, rows):
        """``up_rows(d_low)`` (or the fold's ``up_rows(M)``; :meth:`Projection.up_rows_bytes`), then the residual
        rule's rows beside its block. A float64 ``d_low`` (:func:`_direction_width`) is mapped up in float64."""
        peak, out = projection.up_rows_bytes(shape, group, rows)
        k = _direction_width(state) // 4
        return max(k * peak, k * out + self.residual.rows_bytes(shape, group, state, projection, rows))

    def prepare_bytes(self, shape, group, state, projection, bounds, low_precision=False):
        return self.residual.prepare_bytes(shape, group, state, projection, bounds, low_precision)

    def whole_bytes(self, shape, group, state, projection):
        """:meth:`direction`: ``up(d_low)`` (two-sided: beside ``P d_low``, freed after the product), then the
        whole-size ``scale up(d_low)`` beside the residual rule's whole update."""
        w = _direction_width(state)
        return max(projection.up_bytes(shape, group) * w // 4,
                   w * shape[0] * shape[1] + self.residual.whole_bytes(shape, group, state, projection))


# ---- the per-parameter step's peak, phase by phase --------------------------------------------------


def projected_alone_bytes(opt: Any, p: Tensor, group: dict[str, Any], state: dict[str, Tensor],
                          steady: bool = False, traced: bool = False, kept: bool = False) -> int:
    """The peak bytes the per-parameter step of projected ``p`` (``LowMemOptimizer._update``: layerwise
    mode's step, ``step_param``) allocates, phase by phase as the engine runs it (``_project_down``, the moment
    rule's direction, ``_combine_back`` / ``_combine_rows``), for a recipe without stabilizers. ``opt``: the
    engine optimizer (its ``recipe``, ``_chunk`` and ``_row_bounds``); ``steady``: a step without a refresh;
    ``traced``: without the refresh's kernel-internal workspace (:meth:`Projection.untraced_refresh_bytes`),
    what a trace of the dispatched operations sees; ``kept``: without the part of the refresh that is MKL's kept
    GEMM buffer (:meth:`Projection.refresh_kept_bytes`: the engine counts that buffer once for the whole step).

    Phases (``G`` = ``4 m n``, ``L`` = the projected gradient's ``4 r n`` or ``4 m r``):

    * a low-precision gradient, chunked (projected a block of rows at a time): a refresh beside the
      gradient's whole float32 copy (only a refresh that reads it, :meth:`Projection.refresh_reads_gradient`); :meth:`Projection.down_rows_bytes`; a step-size rule that reads the
      parameter (Adafactor's) beside its float32 copy, ``L + G + step_bytes``;
    * otherwise: the refresh, then the projection (:meth:`Projection.down_bytes`) beside the float32 copy of
      a low-precision gradient (and, for the rest of the step, of the parameter unless it is combined back
      a block of rows at a time with a constant learning rate);
    * the moment rule's direction beside the projected gradient (``MomentRule.transient_bytes``);
    * the combine-back beside the projected gradient and what :meth:`MomentRule.direction_bytes` keeps:
      nothing more when the direction is added to a float32 parameter in place (``addmm_``:
      :meth:`CombineRule.add_in_place_scale` and a float learning rate); per block of rows, the gradient
      rows' float32 copy (low precision) beside :meth:`CombineRule.rows_bytes` of the block, then the
      parameter rows' float32 copy beside the block's direction; unchunked, the whole-tensor combine-back.

    Exact against a trace of the dispatched operations' outputs (tests/test_galoreexact_per_parameter.py)
    for the recipes whose combine rule and projection count their blocks exactly."""
    r, P = opt.recipe, opt.recipe.projection
    m, n = p.shape
    lowp = p.dtype not in (torch.float32, torch.float64)
    low_shape = P.low_shape(p.shape, group)
    low = 4 * low_shape.numel()
    whole = 4 * m * n
    chunk = opt._chunk(p.device)
    bounds = opt._row_bounds(p.shape, chunk) if chunk is not None else None
    refresh = 0 if steady else P.transient_bytes(p.shape, group, state, refresh=True)
    if traced and not steady:
        refresh -= P.untraced_refresh_bytes(p.shape, group)
    if kept and not steady:
        refresh -= P.refresh_kept_bytes(p.shape, group)
    # the engine reads the parameter (its float32 copy, if 16-bit) for any rule but moments.constant_lr; the
    # rule says what it allocates (step_bytes: Adafactor's 0-d norm and step size, none when it returns a float)
    constant = r.lr_rule is constant_lr
    lr_peak = 0 if constant else r.lr_rule.step_bytes(group)
    moment = r.moment.transient_bytes(low_shape.numel(), low_shape, group, state)
    direction = r.moment.direction_bytes(low_shape.numel(), low_shape, group, state)
    in_rows = lowp and bounds is not None
    phases = []
    if in_rows:
        held = 0
        # (the refresh beside the gradient's whole float32 copy, if it reads the gradient: Projection.refresh_reads_gradient)
        reads = whole * P.refresh_reads_gradient(group)
        phases += [reads + refresh if not steady else 0, P.down_rows_bytes(p.shape, group, bounds),
                   0 if constant else low + whole + lr_peak]
    else:  # (a float64 gradient too: the subspace math is float32; the parameter stays float64)
        g32 = whole * (lowp or p.dtype == torch.float64)
        held = g32 + whole * (lowp and not (bounds is not None and constant))  # (and the parameter's copy)
        phases += [g32 + refresh if not steady else 0, g32 + P.down_bytes(p.shape, group), held + low + lr_peak]
    phases.append(held + low + moment)
    phases.append(held + low + direction + projected_back_bytes(opt, p, group, state))
    return max(phases)


def projected_back_bytes(opt: Any, p: Tensor, group: dict[str, Any], state: dict[str, Tensor]) -> int:
    """The peak of projected ``p``'s combine-back (``LowMemOptimizer._combine_back`` / ``_combine_rows``) beside
    its held float32 copies, its projected gradient and the moment rule's direction (and step size): nothing for
    an in-place ``addmm_`` (a float32 parameter, a float learning rate, ``scale * up(d_low)``; a two-sided
    basis's ``P N``), else the combine rule's context (:meth:`CombineRule.prepare_bytes`) and per block of rows
    the gradient rows' float32 copy (16-bit) beside :meth:`CombineRule.rows_bytes`, then the parameter rows'
    copy beside the block's direction (both freed before the next block's); unchunked
    :meth:`CombineRule.whole_bytes`; then the projection's post_update (Online Subspace Descent's basis step,
    :meth:`Projection.post_update_bytes`). Part of :func:`projected_alone_bytes`; the engine's multi-tensor
    step combines each parameter of a bucket back the same way unless the bucket folds
    (:meth:`CombineRule.fold_bytes`)."""
    r, P = opt.recipe, opt.recipe.projection
    m, n = p.shape
    lowp = p.dtype not in (torch.float32, torch.float64)
    low = 4 * P.low_shape(p.shape, group).numel()
    chunk = opt._chunk(p.device)
    bounds = opt._row_bounds(p.shape, chunk) if chunk is not None else None
    lr_peak = 0 if r.lr_rule is constant_lr else r.lr_rule.step_bytes(group)
    in_rows = lowp and bounds is not None
    # the projection's post_update (Online Subspace Descent's basis step) after the update: of the gradient as
    # the combine-back reads it (16-bit when projected a block of rows at a time), its projection given if float32
    post = P.post_update_bytes(p.shape, group, state, in_rows, True)
    if bounds is None:
        # the whole direction, then beside it (it replaced the moment rule's; the step size stays) the post_update
        return max(r.combine.whole_bytes(p.shape, group, state, P), 4 * m * n - low + post)
    # (the engine's _combine_rows: not with a tensor learning rate, which addmm_'s alpha cannot take)
    if (r.combine.add_in_place_scale(state, group, P) is not None and p.dtype == torch.float32 and lr_peak == 0
            and not isinstance(group["lr"], torch.Tensor)):
        return max(P.add_up_rows_bytes(p.shape, group, m), post)
    peak, ctx = r.combine.prepare_bytes(p.shape, group, state, P, bounds, in_rows)
    phases = [peak]
    for a, b in bounds:  # (each block's copies and direction freed before the next block's are made)
        block = 4 * (b - a) * n
        phases.append(ctx + block * lowp + r.combine.rows_bytes(p.shape, group, state, P, b - a))
        phases.append(ctx + block + block * lowp)
    phases.append(ctx + post)
    return max(phases)


# ---- moments when the subspace changes ----------------------------------------------------------

LINEAR_MOMENTS = ("exp_avg",)
SQUARED_MOMENTS = ("exp_avg_sq",)


def rotate_moments(moment_keys, projection: Projection, state, group, old) -> None:
    """``moment_policy="rotate"``: carry first moments linearly and second moments through the
    squared transition into the new subspace (:func:`~lowmem.optim.functional.galore.rotate_low_rank`).
    Other statistics (Adafactor's row/column factors) are kept. In-place: dtypes are preserved."""
    for key in moment_keys:
        if key in state and (key in LINEAR_MOMENTS or key in SQUARED_MOMENTS):
            state[key].copy_(projection.rotate_moment(state[key], old, state, group, squared=key in SQUARED_MOMENTS))
