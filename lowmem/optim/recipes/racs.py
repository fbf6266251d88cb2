"""RACS, Row-And-Column Scaled SGD (Gong, Scetbon, Ma & Meeds 2025, arXiv:2502.07752, Algorithm 1): the gradient
scaled by moving averages of the two diagonal scalings of a Kronecker-factored Fisher fit (Eq. 16's fixed point), its
norm's growth limited (math: :mod:`lowmem.optim.functional.racs`).

State of a tensor stepped as ``rows x cols`` (:func:`~lowmem.optim.functional.racs.matrix_dims`: a matrix itself,
a tensor of 4 or more dimensions, a convolution kernel, its ``[shape[0], -1]`` view, a vector a column ``[n, 1]``, a
0-d tensor ``[1, 1]``, as pytorch_optimizer's ``RACS``; the paper defines RACS for matrices; a 3-D weight ``[E, A, B]``,
fused MoE experts, is a batch of ``A x B`` matrices, each with its own state, stacked: :meth:`RacsMoments.per_matrix`): ``row_scale`` (``q_t``, ``rows`` values) and
``col_scale`` (``s_t``, ``cols`` values) in the state dtype, both from 0 (line 2), and ``update_norm`` (``phi_t``,
0-d, float32; float64 with a float64 state). A matrix keeps ``m + n + 1`` numbers, no first moment.

A batch of matrices is stepped by the engine in blocks of whole matrices (:meth:`RacsMoments.batch_direction`:
every line once on the block's ``(k, A, B)`` view and the views of its stacked scalings, updated in place), or one
matrix at a time (``foreach=False``, bfloat16 scalings, float64 weights, matrices larger than ``chunk_numel``).
:class:`RacsMoments` steps a tensor whole (its squares made once), or in blocks of whole rows
(:meth:`RacsMoments.prepare_chunks`: one pass over the blocks per fixed-point iteration, one for the last ``q`` with
the moving averages and the scaled gradient's norm, then each block's update), or as an FSDP2 shard of rows (each
iteration's column sums with ``q . q``, ``cols + 1`` numbers, and the norm's square summed over the shards).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..engine import LowMemOptimizer, Recipe
from ..functional.adafactor import STACK_NUMEL, group_cap, stack_groups, stacks_large
from ..functional.racs import (inv_sqrt, matrix_dims, norm_growth_limit, racs_ema_, racs_fixed_point,
                               racs_fixed_point_stacked, racs_rows, racs_scale, scaled_square_norm,
                               scaled_square_norms_stacked)
from ..hparams import LR, WEIGHT_DECAY, HParam, _is_real, in_unit_interval, positive, positive_int
from ..moments import ChunkState, MomentRule, sharded_group, state_dtype, step_whole_from_piece_
from ..registry import register


def _gamma(x: Any) -> bool:
    """``1 <= gamma`` (finite): the update's norm may grow by ``gamma`` per step."""
    return _is_real(x) and x >= 1


def _float16_state_refusal(where: str) -> str:
    """The error of a float16 state: the column scaling carries the gradient's squares (``q_i s_j ~ G_ij^2``), which
    overflow float16 past 65504 (entries of 256) or underflow below 6e-8 (entries of 2.4e-4), after which
    ``(s + eps)^-1/2`` is 0 or ``eps^-1/2``: rows or columns silently stopped or blown up."""
    return (f"racs: {where}: state_dtype='param' of a float16 parameter would keep float16 scalings that carry the "
            f"gradient's squares, which overflow past 65504 (entries of 256) or vanish below 6e-8 and then stop or "
            f"blow up those columns' steps; use state_dtype='float32' (the default) or 'bfloat16'")


def _check_group(group: dict[str, Any]) -> None:
    """No float16 state (:func:`_float16_state_refusal`): ``state_dtype='param'`` with a float16 parameter."""
    if group.get("state_dtype", "float32") != "param":
        return
    for i, p in enumerate(group["params"]):
        if p.dtype == torch.float16:
            raise ValueError(_float16_state_refusal(f"parameter {i}, {tuple(p.shape)}"))


def _compute(dtype: torch.dtype) -> torch.dtype:
    """The dtype a state of ``dtype`` is computed in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Foreach:
    """:class:`RacsMoments`' multi-tensor step (float32 parameters and scalings, the engine's foreach buckets)."""

    def supports_foreach_for(self, shape, group, state):
        """Float32 scalings (``state_dtype`` ``"float32"``, or ``"param"`` of the float32 parameters the engine
        buckets), not in an FSDP2 group (the column sums and the norm need the shards': the per-parameter step
        reduces them)."""
        return group.get("state_dtype", "float32") in ("float32", "param") and not sharded_group(group)

    def steps_pieces_whole(self, shape, group, state):
        """Always: a tensor larger than ``chunk_numel`` is stepped from its first piece with the per-parameter
        chunked step (:func:`~lowmem.optim.moments.step_whole_from_piece_`)."""
        return True

    def foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """A bucket's step (one step count ``t``: the engine's buckets are per step count): tensors of one shape
        stacked (:func:`~lowmem.optim.functional.adafactor.stack_groups`, as SM3's and Adafactor's buckets), every
        line of the step once on each stack (:meth:`_group_direction`: the fixed point by batched matrix-vector
        products, each matrix's scalings, norm and limiter a row of the stack's), the scalings written back, then
        the decay and the update per tensor (``torch._foreach_*``). Equal to the per-parameter step up to float32
        rounding (the batched products add in another order). A tensor larger than ``chunk_numel`` arrives in
        flat pieces and is stepped from its first one."""
        wd = group.get("weight_decay", 0.0)
        whole = []
        for p, g, st in zip(params, grads, states):
            if not isinstance(st, ChunkState):
                whole.append((p, g, st))
            elif st.start == 0:
                step_whole_from_piece_(self, p, g, st, group, t, lr, decay_after=False)
        if not whole:
            return
        ps, gs, ss = (list(x) for x in zip(*whole))
        for idx in stack_groups(gs, [1] * len(gs)):
            d = self._group_direction([gs[i] for i in idx], [ss[i] for i in idx], group, t)
            group_ps = [ps[i] for i in idx]
            if wd != 0:
                torch._foreach_mul_(group_ps, 1.0 - lr * wd)
            torch._foreach_add_(group_ps, [x.view(p.shape) for x, p in zip(d.unbind(0), group_ps)], alpha=-lr)
            del d

    @staticmethod
    def _group_direction(grads, states, group, t):
        """Every line of the step (without ``lr``) for ``k`` same-shape float32 tensors stacked as ``(k, rows,
        cols)`` (a lone tensor: a view, or a strided one's copy): ``eta alpha G~`` of each, a new tensor; the
        scalings and kept norms written back."""
        k = len(grads)
        rows, cols = states[0]["row_scale"].shape[0], states[0]["col_scale"].shape[0]

        def stacked(xs, shape):  # (a lone strided tensor of more than 2 dimensions, channels_last: a copy)
            return xs[0].reshape(1, *shape) if k == 1 else torch.stack(xs).view(k, *shape)

        g = stacked(grads, (rows, cols))
        if g.numel() == 0:  # (empty tensors: nothing to scale, the scalings keep their values)
            return torch.zeros_like(g)
        beta, eps = group["beta"], group["eps"]
        rs, cs, ns = ([st[key] for st in states] for key in ("row_scale", "col_scale", "update_norm"))
        sq = g.square()
        q, s = racs_fixed_point_stacked(sq, group["iterations"])  # line 5
        row, col = stacked(rs, (rows,)), stacked(cs, (cols,))
        racs_ema_(col, s, beta)  # line 6
        racs_ema_(row, q, beta)  # line 7
        del q, s
        if k > 1:
            torch._foreach_copy_(rs, list(row.unbind(0)))
            torch._foreach_copy_(cs, list(col.unbind(0)))
        rf, cf = inv_sqrt(row, eps), inv_sqrt(col, eps)
        del row, col
        norm = scaled_square_norms_stacked(sq, rf, cf).sqrt_()
        del sq
        u = racs_scale(g, rf, cf)  # line 8
        del g, rf, cf
        if t <= 1:
            scale = norm.new_full((k,), group["alpha"])
        else:  # lines 9-10, per matrix
            scale = norm_growth_limit(norm, stacked(ns, ()), group["gamma"])
            norm.mul_(scale)
            scale.mul_(group["alpha"])
        torch._foreach_copy_(ns, list(norm.unbind(0)))
        del norm
        return u.mul_(scale.view(k, 1, 1))

    # ---- the batched step of a batch of matrices (fused MoE experts [E, A, B]) ----

    def supports_batch_for(self, shape, group, state):
        """The engine's batched step of a batch of matrices (:meth:`~lowmem.optim.engine.LowMemOptimizer._matrix_blocks`):
        float32 scalings (the stacks are updated in place, as the per-matrix step's float32 ones; bfloat16 ones
        are computed in float32 by the per-matrix step)."""
        row = state.get("row_scale")
        return row is not None and row.dtype == torch.float32 and state["update_norm"].dtype == torch.float32

    def batch_direction(self, g, state, group, t, lr):
        """The step of a block of ``k`` matrices of a batch (``g``: their float32 gradients ``[k, A, B]``;
        ``state``: the views ``[k, A]``, ``[k, B]``, ``[k]`` of the stacked scalings and kept norms, updated in
        place): ``alpha eta G~`` of each, a new ``[k, A, B]`` tensor (:meth:`_stack_direction`)."""
        return self._stack_direction(g, state["row_scale"], state["col_scale"], state["update_norm"], group, t)

    @staticmethod
    def _stack_direction(g, row, col, phi, group, t):
        """Every line of the step (without ``lr``) for ``k`` float32 matrices ``g`` ``(k, R, C)`` whose row and
        column scalings ``row`` ``(k, R)``, ``col`` ``(k, C)`` and kept norms ``phi`` ``(k,)`` are written in place:
        the lines of :meth:`_group_direction` on a stack that needs no stacking and no copying back (a batch's
        own stacked state). Lines 5-11: Eq. 16's fixed point by batched products
        (:func:`~lowmem.optim.functional.racs.racs_fixed_point_stacked`), so equal to the per-matrix step up to
        float32 rounding (its products add in another order)."""
        k = g.shape[0]
        if g.numel() == 0:  # (empty matrices: nothing to scale, the scalings keep their values)
            return torch.zeros_like(g)
        beta, eps = group["beta"], group["eps"]
        sq = g.square()
        q, s = racs_fixed_point_stacked(sq, group["iterations"])  # line 5
        racs_ema_(col, s, beta)  # line 6
        racs_ema_(row, q, beta)  # line 7
        del q, s
        rf, cf = inv_sqrt(row, eps), inv_sqrt(col, eps)
        norm = scaled_square_norms_stacked(sq, rf, cf).sqrt_()
        del sq
        u = racs_scale(g, rf, cf)  # line 8
        del rf, cf
        if t <= 1:  # (the first step: eta = 1, phi_1 = ||G~||)
            phi.copy_(norm)
            return u.mul_(group["alpha"])
        scale = norm_growth_limit(norm, phi, group["gamma"])  # lines 9-10, per matrix
        phi.copy_(norm.mul_(scale))
        del norm
        return u.mul_(scale.mul_(group["alpha"]).view(k, 1, 1))  # line 11 (without lr)

    def batch_transient_bytes(self, k, shape, group, state, copy=0):
        """:meth:`batch_direction` of ``k`` ``R x C`` matrices beside the engine's float32 copy of a low-precision
        gradient block (``copy`` bytes per element), then the direction beside the parameter block's copy, exact:
        :meth:`_group_bytes` of a stack that is the state itself (no stacked gradients, scalings or norms)."""
        n = k * shape[0] * shape[1]
        return max(copy * n + self._group_bytes(tuple(shape), k, group["iterations"], stacked=False),
                   4 * n + copy * n)

    def foreach_transient_bytes(self, numel):
        """Without the states at hand: a bound of :meth:`_group_bytes` per element (a stack of 0-d tensors' limiter
        phase, ``25 k`` bytes, is the most per element; a vector's ``[n, 1]`` at most ``24 k n``); 0 for no bucket."""
        return 25 * numel

    def foreach_bucket_transient_bytes(self, numel, members, group=None):
        """:meth:`foreach_step_` of a bucket whose ``members`` are ``(elements, state)``: its largest group's
        (:meth:`_group_bytes`; each group's temporaries are freed before the next one's), grouped as on the
        scalings' device (every same-shape set stacked off the CPU; both groupings on meta tensors: the larger)."""
        shapes = [(self._dims_of(st, n), n) for n, st in members]
        devices = {v.device for _, st in members for v in st.values() if isinstance(v, torch.Tensor) and v.dim()}
        device = next(iter(devices)) if len(devices) == 1 else None
        larges = (stacks_large(device),) if device is not None and device.type != "meta" else (False, True)
        iterations = 5 if group is None else group["iterations"]
        out = 0
        for large in larges:
            cap = group_cap([n for _, n in shapes], large)
            groups: dict[tuple, list[int]] = {}
            for i, (dims, n) in enumerate(shapes):
                groups.setdefault(dims if large or n < STACK_NUMEL else (i,), []).append(i)
            for idx in groups.values():
                dims, n = shapes[idx[0]]
                per = max(1, cap // max(1, n))
                for a in range(0, len(idx), per):
                    out = max(out, self._group_bytes(dims, len(idx[a:a + per]), iterations))
        return out

    @staticmethod
    def _dims_of(state, n) -> tuple[int, int]:
        """The ``(rows, cols)`` a tensor is stepped as, from its scalings (``(n, 1)`` before they are made)."""
        if "row_scale" in state:
            return state["row_scale"].shape[0], state["col_scale"].shape[0]
        return n, 1

    @staticmethod
    def _group_bytes(dims, k, iterations, stacked=None) -> int:
        """:meth:`_group_direction` of ``k`` float32 tensors stepped as ``R x C`` (``n`` elements each), exact (any
        ``iterations``): the squares (``4 k n``) and, for a stack (``k > 1``), the stacked gradients (``4 k n``)
        beside, in turn, the fixed point's ``q``, ``s``, a new ``q`` or ``s`` and a sum per matrix
        (``4 max(2 k R + k C + k, k R + 2 k C + k)``, never the most: below the norms' phase); the scalings with their
        stacked averages (``k > 1``) or their factors (``4 k (R + C)`` each); the factors beside the norms'
        products (``4 k (R + C) + 4 max(k (R + C), 2 k R)``). Then ``G~`` beside the gradients' stack, the factors and the norms (``4 k (n + R + C + 1)``), or
        beside the limiter's vectors and its ``k``-byte mask (``4 k n + 17 k``, and the stacked kept norms).
        ``stacked=False``: a stack that is the state itself (:meth:`_stack_direction`), counted as a lone tensor's."""
        rows, cols = dims
        n = rows * cols
        if n == 0:  # (empty tensors: nothing stepped)
            return 0
        stack = k > 1 if stacked is None else stacked
        base = 4 * k * n * (2 if stack else 1)
        # (the fixed point's phase, 4 max(2 k R + k C + k, k R + 2 k C + k) beside the base, is never above the norms')
        factors = base + 4 * k * (rows + cols) * (2 if stack else 1)
        norms = base + 4 * k * (rows + cols) + 4 * max(k * (rows + cols), 2 * k * rows)
        update = 4 * k * n * (2 if stack else 1) + 4 * k * (rows + cols) + 4 * k
        limiter = 4 * k * n + 17 * k + (4 * k if stack else 0)
        return max(factors, norms, update, limiter)


class RacsMoments(_Foreach, MomentRule):
    """RACS's scalings and norm-growth limiter (see the module docstring).

    Group keys used: ``beta``, ``alpha``, ``gamma``, ``eps``, ``iterations``.
    """

    state_keys = ("row_scale", "col_scale", "update_norm")
    #: the direction is a new tensor (``G~``), holding nothing of the gradient chunk
    chunk_direction_is_new = True
    #: a float64 gradient with a float32 / bfloat16 state is cast to float32 once by the engine (counted there)
    computes_in_state_precision = True
    #: :meth:`chunk_transient_bytes` counts a low-precision gradient's and parameter's block copies, phase by phase
    chunk_counts_copies = True
    #: FSDP2: prepare_chunks takes ``reduce=`` (each iteration's column sums with ``q . q`` and the norm's square
    #: summed over the shards)
    sharded_stats = True
    #: checkpoints of an FSDP2 shard: ``row_scale`` one number per row (sharded like the rows); ``col_scale`` and
    #: ``update_norm`` are equal on every rank (:meth:`replicated_state`)
    reduced_dims = {"row_scale": "rows"}

    def per_matrix(self, shape, group):
        """A 3-D weight ``[E, A, B]`` (fused MoE experts: transformers 5's ``experts.gate_up_proj [E, 2I, H]``,
        ``experts.down_proj [E, H, I]``) is a batch of ``E`` linear layers, each scaled by its own rows and columns
        (Eq. 15-16: ``A + B + 1`` numbers each, stacked ``[E, A]`` / ``[E, B]`` / ``[E]``), stepped by the engine as
        separate 2-D parameters (:meth:`~lowmem.optim.engine.LowMemOptimizer._matrices`). A tensor of 4 or more
        dimensions (a convolution kernel ``[out, in, k...]``: one linear map of ``in x k...`` inputs) keeps its
        ``[shape[0], -1]`` view (:func:`~lowmem.optim.functional.racs.matrix_dims`)."""
        return len(shape) == 3

    def init_state(self, state, shape, group, param):
        dtype, device = state_dtype(group, param), param.device
        if dtype == torch.float16:  # (a parameter made float16 after construction: model.half())
            raise ValueError(_float16_state_refusal(f"a {tuple(shape)} parameter"))
        rows, cols = matrix_dims(shape)
        state["row_scale"] = torch.zeros(rows, dtype=dtype, device=device)  # q_0 = 0 (line 2)
        state["col_scale"] = torch.zeros(cols, dtype=dtype, device=device)  # s_0 = 0
        state["update_norm"] = torch.zeros((), dtype=_compute(dtype), device=device)  # phi_0 = 0

    def replicated_state(self, key, group):
        return key in ("col_scale", "update_norm")

    # ---- the scalings and the limiter ----

    @staticmethod
    def _limit(norm, state, group, t):
        """Lines 9-10: the limiter's ``eta`` (``None`` for 1, the tensor's first step) and ``phi_t = eta ||G~||``
        written to the state."""
        phi = state["update_norm"]
        if t <= 1:
            phi.copy_(norm)
            return None
        eta = norm_growth_limit(norm, phi, group["gamma"])
        phi.copy_(norm.mul_(eta))
        return eta

    @staticmethod
    def _scalings(squares_of, bounds, rows, cols, grad_dtype, state, group, reduce=None):
        """Lines 5-7 and ``||G~||`` over the row blocks ``bounds`` (``squares_of(a, b)``: their squares, in
        ``grad_dtype``): Eq. 16's fixed point (:func:`~lowmem.optim.functional.racs.racs_fixed_point`), its ``s``
        into the column scaling's average, then a last pass making each block's ``q`` into the row scaling's average
        and adding the block's share of ``||G~||^2``. Returns the row and column factors of line 8 and ``||G~||``
        (with ``reduce``: every iteration's column sums and the norm's square summed over the shards)."""
        beta, eps = group["beta"], group["eps"]
        row, col = state["row_scale"], state["col_scale"]
        c = _compute(row.dtype)
        row, col = (row if row.dtype == c else row.to(c)), (col if col.dtype == c else col.to(c))
        q, s, ss = racs_fixed_point(squares_of, bounds, rows, cols, group["iterations"], row.device,
                                    torch.promote_types(c, grad_dtype), None if reduce is None else reduce.sum_)
        racs_ema_(col, s, beta)  # line 6
        cf = inv_sqrt(col, eps)
        sq_norm = torch.zeros((), dtype=q.dtype, device=q.device)
        for a, b in bounds:  # the last q of each block (Eq. 16), line 7, and the block's ||G~||^2
            sq = squares_of(a, b)
            racs_ema_(row[a:b], racs_rows(sq, s, ss, out=q[a:b]), beta)
            sq_norm.add_(scaled_square_norm(sq, inv_sqrt(row[a:b], eps), cf))
            del sq
        del q, s, ss
        if row is not state["row_scale"]:
            state["row_scale"].copy_(row)
            state["col_scale"].copy_(col)
        rf = inv_sqrt(row, eps)
        del row, col
        if reduce is not None:
            reduce.sum_(sq_norm)
        return rf, cf, sq_norm.sqrt_()

    # ---- the whole-tensor step ----

    def _whole(self, g, state, group, t):
        """Every line of the step on the whole tensor ``g`` (its ``rows x cols`` view), its squares made once:
        returns ``alpha eta G~``, a new tensor of that view's shape."""
        rows, cols = state["row_scale"].shape[0], state["col_scale"].shape[0]
        g = g.reshape(rows, cols)  # (a view; a strided tensor of more than 2 dimensions: a copy)
        if g.numel() == 0:  # (an empty tensor: nothing to scale, the scalings keep their values)
            return torch.zeros_like(g)
        sq = g.square()
        rf, cf, norm = self._scalings(lambda a, b: sq[a:b], [(0, rows)], rows, cols, g.dtype, state, group)
        del sq
        u = racs_scale(g, rf, cf)  # line 8
        del rf, cf
        eta = self._limit(norm, state, group, t)
        return u.mul_(group["alpha"] if eta is None else eta.mul_(group["alpha"]))  # line 11 (without lr)

    def direction(self, g, state, group, t, lr):
        if isinstance(state, ChunkState):
            ctx = state.extra["ctx"]
            if ctx is None:  # one block: the whole tensor (prepare_chunks left it to this step)
                return self._whole(g, state.extra["parent"], group, t).view(-1)
            r0, r1 = state.extra["rows"]
            return racs_scale(g.view(r1 - r0, -1), ctx["r"][r0:r1], ctx["c"]).mul_(ctx["scale"]).view(-1)
        return self._whole(g, state, group, t).view(g.shape)

    # ---- the chunked step: blocks of whole rows (of the rows x cols view) ----

    def chunk_align(self, shape, group, state):
        return max(1, matrix_dims(shape)[1])

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        cols = max(1, matrix_dims(shape)[1])
        return ChunkState(state, start, stop, {"ctx": ctx, "rows": (start // cols, stop // cols), "parent": state,
                                               "shape": shape})

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized, reduce=None):
        """Lines 5-10 for a tensor stepped in more than one block of rows (or an FSDP2 shard), by passes over the
        blocks (each recomputes the block's squares): one per fixed-point iteration, one for the last ``q`` with
        the moving averages and ``||G~||^2``; returns the factors and ``alpha eta`` (``{"r", "c", "scale"}``), each
        block's update then being ``racs_scale(block) * scale``. ``None`` for a single block of an unsharded
        tensor: :meth:`direction` steps it whole (its squares made once).

        ``reduce`` (an FSDP2 shard of rows, :class:`~lowmem.optim.sharded.ShardReduce`): the row scaling is the
        shard's own rows; every iteration's column sums with ``q . q`` (``cols + 1`` numbers) and the norm's square
        (one) are summed over the shards, so every shard steps as the whole tensor would."""
        rows, cols = matrix_dims(shape)
        if reduce is None and [tuple(b) for b in bounds] in ([], [(0, rows * cols)]):
            return None
        grad_dtype = stabilized(0, 0, ChunkState(state, 0, 0)).dtype  # (an empty chunk: its dtype, nothing copied)

        def squares_of(r0, r1):  # (rows r0:r1: the flat chunk of elements r0 cols : r1 cols)
            a, b = r0 * cols, r1 * cols
            return stabilized(a, b, self.chunk_state(state, a, b, shape, group)).view(-1, cols).square()

        row_bounds = [(a // cols, b // cols) for a, b in bounds]
        rf, cf, norm = self._scalings(squares_of, row_bounds, rows, cols, grad_dtype, state, group, reduce)
        eta = self._limit(norm, state, group, t)
        scale = norm.fill_(group["alpha"]) if eta is None else eta.mul_(group["alpha"])
        return {"r": rf, "c": cf, "scale": scale}

    # ---- what a step allocates ----

    @staticmethod
    def _elem(state) -> int:
        """Bytes per element of the compute dtype (8 for a float64 state, else 4)."""
        row = state.get("row_scale")
        return 8 if row is not None and row.dtype == torch.float64 else 4

    @staticmethod
    def _low(state) -> bool:
        """Whether the scalings are stored below their compute precision (bfloat16: float32 copies in the step)."""
        row = state.get("row_scale")
        return row is not None and row.dtype not in (torch.float32, torch.float64)

    def _phases(self, group, state, rows, cols, block, n_sq, copy):
        """The most the step holds together, in bytes, over its phases (see :meth:`transient_bytes`): ``block``
        rows per pass, ``n_sq`` elements of squares held through the scalings (the whole step's ``G^2``; 0 for
        blocks, whose squares are made per pass, ``copy`` bytes per element of a low-precision block's float32
        copy beside them while they are made)."""
        e = self._elem(state)
        R, C, b = rows, cols, block
        low = (R + C) if self._low(state) else 0
        blk = 0 if n_sq else b * C  # (a pass's squares of a block)
        made = (copy * b * C) // e if not n_sq else 0  # (its float32 copy while they are made, in units of e)
        base = n_sq + low
        iterations = group["iterations"]
        fixed = base + R + (C + 1) + 1 + blk + made  # (the first iteration: q = 1, the column sums)
        if iterations > 1:  # (the previous s, its column sums' buffer, and s . s beside the new sums)
            fixed = max(fixed, base + R + 2 * (C + 1) + 1 + blk + made, base + R + 2 * (C + 1) + 3)
        loop = base + R + (C + 1) + 1 + C + 1 + max(blk + made, blk + b + max(C + b, 2 * b + 1))
        factors = base + R + C + 1
        return e * max(fixed, loop, factors)

    def transient_bytes(self, numel, shape, group, state):
        """The whole-tensor step (:meth:`_whole`), exact, at ``e`` bytes per element of the compute dtype (8 for a
        float64 state), for ``R x C`` (``n`` elements), ``G^2`` (``e n``) held through the scalings beside the
        scalings' float32 copies (bfloat16 ones, ``e (R + C)``) and, in turn: the fixed point's ``q``, two column-sum
        buffers and 0-d sums (``e (R + 2 C + 4)``); the last pass's ``q``, ``s``, ``(s_t + eps)^-1/2``, the row
        factors and the norm's matrix-vector products (``e (2 R + 2 C + 3 + max(C + R, 2 R + 1))``); then ``G~``
        beside the factors and the norm (``e (n + R + C + 1)``) or the limiter's scalars (``e (n + 3)``)."""
        if numel == 0:
            return 0
        rows, cols = matrix_dims(shape)
        e = self._elem(state)
        return max(self._phases(group, state, rows, cols, rows, numel, 0), e * (numel + rows + cols + 1),
                   e * (numel + 3))

    def chunk_transient_bytes(self, numel, shape, group, state, copy=0):
        """The chunked step with blocks of at most ``numel`` elements, exact; ``copy``: bytes per element of a
        low-precision gradient's float32 block copy (:attr:`chunk_counts_copies`: 4, else 0). One block
        (:meth:`prepare_chunks` leaves it whole): the gradient's copy beside :meth:`transient_bytes`, or the update
        beside the parameter's copy. Several (``b`` rows each): the passes as the whole step's with a block's squares
        (``e b C``, beside its copy while made) instead of ``G^2``; then the factors and ``alpha eta`` beside the
        limiter's scalars (``e (R + C + 4)``) or a block's ``G~`` beside its gradient's or parameter's copy
        (``e (R + C + 1 + b C) + c b C``)."""
        rows, cols = matrix_dims(shape)
        total = rows * cols
        e = self._elem(state)
        if numel >= total:
            if total == 0:
                return 0
            return max(copy * total + self.transient_bytes(total, shape, group, state), (e + copy) * total)
        b = max(1, numel // max(cols, 1))
        return max(self._phases(group, state, rows, cols, b, 0, copy), e * (rows + cols + 4),
                   e * (rows + cols + 1 + b * cols) + copy * b * cols)


RACS_RECIPE = Recipe(
    name="racs",
    summary="RACS: SGD scaled on rows and columns by a Kronecker-diagonal Fisher fit (power iteration on G^2), "
            "norm growth limited",
    reference="Gong, Scetbon, Ma & Meeds 2025, Towards Efficient Optimizer Design for LLM via Structured Fisher"
              " Approximation with a Low-Rank Extension (arXiv:2502.07752), Algorithm 1 with Eq. 16",
    moment=RacsMoments(),
    hparams=(
        LR(2e-2),
        HParam("beta", 0.9, in_unit_interval, "a float with 0 <= beta < 1",
               "decay of the row and column scalings' moving averages (Algorithm 1, lines 6-7)"),
        HParam("alpha", 0.05, positive, "a finite float > 0", "the update's scale (the step is lr * eta * alpha * G~)"),
        HParam("gamma", 1.01, _gamma, "a finite float >= 1",
               "norm-growth limiter: the update's norm may grow by at most this factor per step"),
        HParam("iterations", 5, positive_int, "an int >= 1",
               "fixed-point iterations of Eq. 16 per step, from q = 1 (the paper's 5)"),
        HParam("eps", 1e-30, positive, "a finite float > 0",
               "added to each scaling inside its square root (not in the paper)"),
        WEIGHT_DECAY(0.0),
    ),
    validate_group=_check_group,
)


class RACS(LowMemOptimizer):
    """RACS, Row-And-Column Scaled SGD (Gong et al. 2025, Algorithm 1), on the lowmem engine, with the paper's
    Table 9 settings as defaults. Every parameter is stepped by RACS (vectors as ``[n, 1]`` columns, as
    pytorch_optimizer); the paper's experiments gave RACS the attention and MLP linear weights and Adam the rest.

    Each step of a tensor stepped as ``rows x cols`` (a vector as a column, a tensor of 4 or more dimensions as
    ``[shape[0], -1]``, each matrix of a 3-D batch ``[E, A, B]``, fused MoE experts, as its own ``A x B``): ``iterations`` steps of Eq. 16 from ``q = 1`` (``s = G^2^T q / q.q``, ``q = G^2 s / s.s``);
    ``s_t = beta s_{t-1} + (1 - beta) s``, ``q_t`` likewise (both from 0); ``G~ = g / sqrt((q_t,i + eps)(s_t,j +
    eps))``; ``eta = 1`` at the first step, else ``gamma / max(||G~|| / phi, gamma)``; ``phi <- eta ||G~||``;
    ``p <- p (1 - lr wd) - lr eta alpha G~`` (``eta = 1`` also while ``phi = 0``, after an all-zero gradient).

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `2e-2`): Learning rate (the paper's Table 9, every model size).
        beta (`float`, defaults to `0.9`): Decay of the scalings' moving averages, in [0, 1).
        alpha (`float`, defaults to `0.05`): The update's scale, > 0 (Table 9; 0.02 at 1.3B).
        gamma (`float`, defaults to `1.01`): Norm-growth limiter, >= 1.
        iterations (`int`, defaults to `5`): Fixed-point iterations of Eq. 16 per step, >= 1.
        eps (`float`, defaults to `1e-30`): Inside each square root, > 0.
        weight_decay (`float`, defaults to `0.0`): Decoupled, ``p *= 1 - lr * wd`` before the update.
        state_dtype (`str`, defaults to `"float32"`): Storage of the scalings (`"float32"`, `"bfloat16"`, or
            `"param"`: refused for float16 parameters, whose column scaling carries the gradient's squares).
        foreach (`bool` or `None`, defaults to `None`): `None` steps float32 parameters with float32 scalings in
            multi-tensor buckets (same-shape tensors stacked, the fixed point batched: equal to the per-parameter
            step up to float32 rounding), and the matrices of a 3-D batch (fused MoE experts) in blocks of whole
            matrices of at most ``chunk_numel`` elements (the same rounding); `False` forces the per-parameter and
            per-matrix step.
    """

    recipe = RACS_RECIPE

    def __init__(self, params: Iterable[Any], lr: float = 2e-2, beta: float = 0.9, alpha: float = 0.05,
                 gamma: float = 1.01, iterations: int = 5, eps: float = 1e-30, weight_decay: float = 0.0, *,
                 state_dtype: str = "float32", foreach: bool | None = None):
        super().__init__(params, lr=lr, beta=beta, alpha=alpha, gamma=gamma, iterations=iterations, eps=eps,
                         weight_decay=weight_decay, state_dtype=state_dtype, foreach=foreach)


register(RACS_RECIPE, RACS, state_precision="fp32", second_moment="factored",
         second_moment_words="row/column scaling, not per element", example_hparams={"lr": 2e-2})

__all__ = ["RACS", "RACS_RECIPE", "RacsMoments"]
