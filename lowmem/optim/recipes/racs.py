"""RACS, Row-And-Column Scaled SGD (Gong, Scetbon, Ma & Meeds 2025, arXiv:2502.07752): the gradient scaled by a
moving average of its rows' and its columns' mean squares, its norm's growth limited (math:
:mod:`lowmem.optim.functional.racs`).

State of a tensor stepped as ``rows x cols`` (:func:`~lowmem.optim.functional.racs.matrix_dims`: a matrix itself,
a tensor of more dimensions its ``[shape[0], -1]`` view, a vector a column ``[n, 1]``, a 0-d tensor ``[1, 1]``, as
pytorch_optimizer's ``RACS``): ``row_sq`` (``rows`` values, starting at 0), ``col_sq`` (``cols`` values, starting at 1 as pytorch_optimizer's:
:data:`COLUMN_START`) in the state dtype and
``update_norm`` (0-d, float32; float64 with a float64 state), the last update's norm for the limiter. A matrix
keeps ``m + n + 1`` numbers, no first moment (the paper's algorithm has none: SGD-like memory).

:class:`RacsMoments` steps a tensor whole, or in blocks of whole rows (:meth:`RacsMoments.prepare_chunks`: a pass
over the blocks for the statistics, the row ones per block and the column sums over all of them; a second for the
scaled gradient's norm; then each block's update), or as an FSDP2 shard of rows (the column sums, the row count
and the norm's square summed over the shards: one all-reduce of ``cols + 1`` numbers and one of a scalar).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..engine import LowMemOptimizer, Recipe
from ..functional.racs import (column_square_sums, matrix_dims, norm_growth_limit, racs_ema_, racs_factors,
                               racs_scale, row_square_means)
from ..functional.adafactor import STACK_NUMEL, group_cap, stack_groups, stacks_large
from ..hparams import LR, WEIGHT_DECAY, HParam, _is_real, in_unit_interval, positive
from ..moments import ChunkState, MomentRule, sharded_group, state_dtype, step_whole_from_piece_
from ..registry import register


#: The column statistic's value before the first step (the row statistic's is 0), as pytorch_optimizer's ``RACS``:
#: early steps are scaled mostly by the rows (``s_t = beta^t + ...``; after 20 steps at ``beta = 0.9`` the start
#: still weighs 0.12), so a gradient far below 1 is not blown up by two small statistics at once.
COLUMN_START = 1.0


def _gamma(x: Any) -> bool:
    """``1 <= gamma`` (finite): the update's norm may grow by ``gamma`` per step."""
    return _is_real(x) and x >= 1


def _float16_state_refusal(where: str) -> str:
    """The error of a float16 state: the statistics are mean squares of the gradient, which overflow float16 past
    65504 (a row of entries of 256), after which ``(inf + eps)^-1/2 = 0`` silently stops those rows or columns."""
    return (f"racs: {where}: state_dtype='param' of a float16 parameter would keep float16 mean squares of the "
            f"gradient, which overflow to inf past 65504 (entries of 256) and then stop those rows' or columns' "
            f"steps; use state_dtype='float32' (the default) or 'bfloat16'")


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
    """:class:`RacsMoments`' multi-tensor step (float32 parameters and statistics, the engine's foreach buckets)."""

    def supports_foreach_for(self, shape, group, state):
        """Float32 statistics (``state_dtype`` ``"float32"``, or ``"param"`` of the float32 parameters the engine
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
        line of the step once on each stack (:meth:`_group_direction`: each matrix's statistics, norm and limiter
        a row of the stack's), the statistics written back, then the decay and the update per tensor
        (``torch._foreach_*``); equal bit for bit to the per-parameter step. A tensor larger than ``chunk_numel``
        arrives in flat pieces and is stepped from its first one."""
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

    def _group_direction(self, grads, states, group, t):
        """Every line of the step (without ``lr``) for ``k`` same-shape float32 tensors stacked along a new first
        dimension as ``(k, rows, cols)`` (a lone tensor: views, nothing stacked): ``alpha eta G~`` of each, a new
        ``(k, rows, cols)`` tensor; the statistics and kept norms written back."""
        k = len(grads)
        rows, cols = states[0]["row_sq"].shape[0], states[0]["col_sq"].shape[0]

        def stacked(xs, shape):  # (a lone strided tensor of more than 2 dimensions, channels_last: a copy)
            return xs[0].reshape(1, *shape) if k == 1 else torch.stack(xs).view(k, *shape)

        g = stacked(grads, (rows, cols))
        if g.numel() == 0:  # (empty tensors: nothing to scale, the statistics keep their values)
            return torch.zeros_like(g)
        beta, eps = group["beta"], group["eps"]
        rs, cs, ns = ([st[key] for st in states] for key in ("row_sq", "col_sq", "update_norm"))
        row, col = stacked(rs, (rows,)), stacked(cs, (cols,))
        racs_ema_(row, row_square_means(g), beta)
        racs_ema_(col, column_square_sums(g).div_(rows), beta)
        if k > 1:
            torch._foreach_copy_(rs, list(row.unbind(0)))
            torch._foreach_copy_(cs, list(col.unbind(0)))
        rf, cf = racs_factors(row, col, eps)
        del row, col
        u = racs_scale(g, rf, cf)
        del g, rf, cf
        norm = torch.linalg.vector_norm(u, dim=(1, 2))
        if t <= 1:
            scale = norm.new_full((k,), group["alpha"])
        else:
            scale = norm_growth_limit(norm, stacked(ns, ()), group["gamma"], eps)
            norm.mul_(scale)
            scale.mul_(group["alpha"])
        torch._foreach_copy_(ns, list(norm.unbind(0)))
        del norm
        return u.mul_(scale.view(k, 1, 1))

    def foreach_transient_bytes(self, numel):
        """Without the states at hand: a bound of :meth:`_group_bytes` per element (a stack of 0-d tensors' ``20 k``;
        a vector's ``[n, 1]`` statistics as large as its elements, ``12 k n + 8 k``; a matrix's ``12 k n`` at most);
        0 for no bucket (the engine's default when none is filled)."""
        return 20 * numel

    def foreach_bucket_transient_bytes(self, numel, members, group=None):
        """:meth:`foreach_step_` of a bucket whose ``members`` are ``(elements, state)``: its largest group's
        (:meth:`_group_bytes`; each group's temporaries are freed before the next one's), grouped as on the
        statistics' device (every same-shape set stacked off the CPU; both groupings on meta tensors: the larger)."""
        shapes = [(self._dims_of(st, n), n) for n, st in members]
        devices = {v.device for _, st in members for v in st.values() if isinstance(v, torch.Tensor) and v.dim()}
        device = next(iter(devices)) if len(devices) == 1 else None
        larges = (stacks_large(device),) if device is not None and device.type != "meta" else (False, True)
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
                    out = max(out, self._group_bytes(dims, len(idx[a:a + per])))
        return out

    @staticmethod
    def _dims_of(state, n) -> tuple[int, int]:
        """The ``(rows, cols)`` a tensor is stepped as, from its statistics (``(n, 1)`` before they are made)."""
        if "row_sq" in state:
            return state["row_sq"].shape[0], state["col_sq"].shape[0]
        return n, 1

    @staticmethod
    def _group_bytes(dims, k) -> int:
        """:meth:`_group_direction` of ``k`` float32 tensors stepped as ``R x C`` (``n`` elements each), exact. A stack
        (``k > 1``) holds the stacked gradients (``4 k n``) beside, in turn, the stacked statistics and their factors
        (``8 k (R + C)``) and ``G~`` with the factors (``4 k n + 4 k (R + C)``); then ``G~`` beside the limiter's
        vectors (the norms, the stacked kept norms, two of its temporaries: ``16 k``). A lone tensor (views, nothing
        stacked): the factors beside ``G~`` (``4 n + 4 (R + C)``), then ``G~`` beside the limiter's ``12`` bytes."""
        rows, cols = dims
        n = rows * cols
        if n == 0:  # (empty tensors: nothing stepped)
            return 0
        if k == 1:
            return max(4 * n + 4 * (rows + cols), 4 * n + 12)
        return max(8 * k * n + 4 * k * (rows + cols), 4 * k * n + 8 * k * (rows + cols), 4 * k * n + 16 * k)


class RacsMoments(_Foreach, MomentRule):
    """RACS's row and column statistics and the norm-growth limiter (see the module docstring).

    Group keys used: ``beta``, ``alpha``, ``gamma``, ``eps``.
    """

    state_keys = ("row_sq", "col_sq", "update_norm")
    #: the direction is a new tensor (``G~``), holding nothing of the gradient chunk
    chunk_direction_is_new = True
    #: a float64 gradient with a float32 / bfloat16 state is cast to float32 once by the engine (counted there)
    computes_in_state_precision = True
    #: FSDP2: prepare_chunks takes ``reduce=`` (the column sums, row count and norm summed over the shards)
    sharded_stats = True
    #: checkpoints of an FSDP2 shard: ``row_sq`` one number per row (sharded like the rows); ``col_sq`` and
    #: ``update_norm`` are equal on every rank (:meth:`replicated_state`)
    reduced_dims = {"row_sq": "rows"}

    def init_state(self, state, shape, group, param):
        dtype, device = state_dtype(group, param), param.device
        if dtype == torch.float16:  # (a parameter made float16 after construction: model.half())
            raise ValueError(_float16_state_refusal(f"a {tuple(shape)} parameter"))
        rows, cols = matrix_dims(shape)
        state["row_sq"] = torch.zeros(rows, dtype=dtype, device=device)
        state["col_sq"] = torch.ones(cols, dtype=dtype, device=device)  # (s_0 = 1: COLUMN_START)
        state["update_norm"] = torch.zeros((), dtype=_compute(dtype), device=device)

    def reset(self, state):
        """The statistics back to their start (rows 0, columns :data:`COLUMN_START`), the kept norm to 0."""
        for k in ("row_sq", "update_norm"):
            if k in state:
                state[k].zero_()
        if "col_sq" in state:
            state["col_sq"].fill_(COLUMN_START)

    def replicated_state(self, key, group):
        return key in ("col_sq", "update_norm")

    # ---- the statistics and the limiter ----

    @staticmethod
    def _stats(state):
        """The row and column statistics in their compute dtype (float32 copies of bfloat16 ones)."""
        row, col = state["row_sq"], state["col_sq"]
        c = _compute(row.dtype)
        return (row if row.dtype == c else row.to(c)), (col if col.dtype == c else col.to(c))

    @staticmethod
    def _write_back(state, row, col):
        if row is not state["row_sq"]:
            state["row_sq"].copy_(row)
            state["col_sq"].copy_(col)

    @staticmethod
    def _limit(norm, state, group, t):
        """The limiter's ``eta`` (1 at the tensor's first step) and ``phi_t = eta ||G~||`` written to the state."""
        phi = state["update_norm"]
        if t <= 1:
            phi.copy_(norm)
            return None
        eta = norm_growth_limit(norm, phi, group["gamma"], group["eps"])
        phi.copy_(norm.mul_(eta))
        return eta

    # ---- the whole-tensor step ----

    def _whole(self, g, state, group, t):
        """Every line of the step on the whole tensor ``g`` (its ``rows x cols`` view): returns ``alpha eta G~``, a
        new tensor of that view's shape."""
        rows, cols = state["row_sq"].shape[0], state["col_sq"].shape[0]
        g = g.reshape(rows, cols)  # (a view; a strided tensor of more than 2 dimensions: a copy)
        if g.numel() == 0:  # (an empty tensor: nothing to scale, the statistics keep their values)
            return torch.zeros_like(g)
        beta, eps = group["beta"], group["eps"]
        row, col = self._stats(state)
        racs_ema_(row, row_square_means(g), beta)
        racs_ema_(col, column_square_sums(g).div_(rows), beta)
        self._write_back(state, row, col)
        rf, cf = racs_factors(row, col, eps)
        del row, col
        u = racs_scale(g, rf, cf)
        del rf, cf
        eta = self._limit(torch.linalg.vector_norm(u), state, group, t)
        return u.mul_(group["alpha"] if eta is None else eta.mul_(group["alpha"]))

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
        """The statistics and the limiter of a tensor stepped in more than one block of rows (or an FSDP2 shard):
        a first pass over the blocks updates each block's row statistics and sums its columns' squares, a
        second sums the squares of the scaled blocks (``||G~||^2``); returns the factors and ``alpha eta``
        (``{"r", "c", "scale"}``), each block's update then being ``racs_scale(block) * scale``. ``None`` for a
        single block of an unsharded tensor: :meth:`direction` steps it whole (one pass).

        ``reduce`` (an FSDP2 shard of rows, :class:`~lowmem.optim.sharded.ShardReduce`): the row statistics are the
        shard's own; the column sums with the row count (one all-reduce of ``cols + 1`` numbers) and the norm's
        square (one scalar) are summed over the shards, so every shard steps as the whole tensor would."""
        rows, cols = matrix_dims(shape)
        if reduce is None and [tuple(b) for b in bounds] in ([], [(0, rows * cols)]):
            return None
        beta, eps = group["beta"], group["eps"]
        row, col = self._stats(state)
        col_sum = torch.zeros(cols, dtype=row.dtype, device=row.device)
        for a, b in bounds:
            g = stabilized(a, b, self.chunk_state(state, a, b, shape, group)).view(-1, cols)
            racs_ema_(row[a // cols:b // cols], row_square_means(g), beta)
            col_sum.add_(column_square_sums(g))
            del g
        if reduce is None:
            col_sum.div_(rows)
        else:  # [column sums, row count] over every shard
            sums = reduce.sum_(torch.cat([col_sum, col_sum.new_full((1,), rows)]))
            col_sum = sums[:cols].div_(sums[cols])
            del sums
        racs_ema_(col, col_sum, beta)
        del col_sum
        self._write_back(state, row, col)
        rf, cf = racs_factors(row, col, eps)
        del row, col
        sq = torch.zeros((), dtype=rf.dtype, device=rf.device)
        for a, b in bounds:
            g = stabilized(a, b, self.chunk_state(state, a, b, shape, group)).view(-1, cols)
            u = racs_scale(g, rf[a // cols:b // cols], cf)
            del g
            sq.add_(torch.linalg.vector_norm(u).square_())
            del u
        if reduce is not None:
            reduce.sum_(sq)
        eta = self._limit(sq.sqrt_(), state, group, t)
        scale = sq.fill_(group["alpha"]) if eta is None else eta.mul_(group["alpha"])
        return {"r": rf, "c": cf, "scale": scale}

    # ---- what a step allocates ----

    @staticmethod
    def _elem(state) -> int:
        """Bytes per element of the compute dtype (8 for a float64 state, else 4)."""
        row = state.get("row_sq")
        return 8 if row is not None and row.dtype == torch.float64 else 4

    @staticmethod
    def _low(state) -> bool:
        """Whether the statistics are stored below their compute precision (bfloat16: float32 copies in the step)."""
        row = state.get("row_sq")
        return row is not None and row.dtype not in (torch.float32, torch.float64)

    def transient_bytes(self, numel, shape, group, state):
        """The whole-tensor step (:meth:`_whole`), exact, at ``e`` bytes per element of the compute dtype: the
        factors beside the statistics' float32 copies (bfloat16 statistics, ``2 e (R + C)``; the row means or the
        column means before them are less), then ``G~`` beside the factors (``e numel + e (R + C)``), then ``G~``
        beside the limiter's three scalars (its norm, ``phi + eps``, their quotient)."""
        if numel == 0:
            return 0
        e = self._elem(state)
        rows, cols = matrix_dims(shape)
        factors = e * (rows + cols) * (2 if self._low(state) else 1)
        return max(factors, e * numel + e * (rows + cols), e * numel + 3 * e)

    def chunk_transient_bytes(self, numel, shape, group, state, copy=0):
        """The chunked step with blocks of at most ``numel`` elements, exact; ``copy``: bytes per element of a
        low-precision gradient's float32 block copy (:attr:`chunk_counts_copies`: 4, else 0), alive in each pass
        until the block's statistics or ``G~`` are made, and of the parameter block's copy beside the update.

        One block (:meth:`prepare_chunks` leaves it whole): the gradient's copy beside :meth:`transient_bytes`, or
        the update beside the parameter's copy. Several, the most of: the first pass's column sums beside a block's
        copy and its row means or column sums (``e C + c b C + e max(b, C)``, next to the statistics' float32
        copies); the factors beside those copies; the second pass's factors, the norm's running square and a
        block's ``G~`` beside its copy or its norm (``e (R + C) + e + e b C + max(c b C, e)``; each block's update
        then holds the same beside the parameter block's copy); the limiter's scalars beside the factors."""
        rows, cols = matrix_dims(shape)
        total = rows * cols
        e = self._elem(state)
        if numel >= total:
            return max(copy * total + self.transient_bytes(total, shape, group, state), (e + copy) * total)
        b = max(1, numel // max(cols, 1))
        copies = e * (rows + cols) if self._low(state) else 0
        first = copies + e * cols + copy * b * cols + e * max(b, cols)
        factors = copies + e * (rows + cols)
        second = e * (rows + cols) + e + e * b * cols + max(copy * b * cols, e)
        return max(first, factors, second, e * (rows + cols) + 3 * e)

    #: :meth:`chunk_transient_bytes` counts a low-precision gradient's and parameter's block copies, phase by phase
    chunk_counts_copies = True


RACS_RECIPE = Recipe(
    name="racs",
    summary="RACS: SGD scaled by moving averages of the gradient's row and column mean squares, norm growth limited",
    reference="Gong, Scetbon, Ma & Meeds 2025, Towards Efficient Optimizer Design for LLM via Structured Fisher"
              " Approximation with a Low-Rank Extension (arXiv:2502.07752), the RACS algorithm",
    moment=RacsMoments(),
    hparams=(
        LR(1e-3),
        HParam("beta", 0.9, in_unit_interval, "a float with 0 <= beta < 1",
               "decay of the row and column mean squares' moving averages"),
        HParam("alpha", 0.05, positive, "a finite float > 0", "the update's scale (the step is lr * alpha * eta * G~)"),
        HParam("gamma", 1.01, _gamma, "a finite float >= 1",
               "norm-growth limiter: the update's norm may grow by at most this factor per step"),
        HParam("eps", 1e-8, positive, "a finite float > 0",
               "added to each statistic inside its square root and to the previous norm"),
        WEIGHT_DECAY(0.0),
    ),
    validate_group=_check_group,
)


class RACS(LowMemOptimizer):
    """RACS, Row-And-Column Scaled SGD (Gong et al. 2025), on the lowmem engine, with pytorch_optimizer's ``RACS``
    signature where the two agree (decoupled weight decay only).

    Each step of a tensor stepped as ``rows x cols`` (a vector as a column, a tensor of more dimensions as
    ``[shape[0], -1]``): ``q <- beta q + (1 - beta) mean_j g^2``; ``s <- beta s + (1 - beta) mean_i g^2``;
    ``G~ = g / sqrt((q_i + eps)(s_j + eps))``; ``eta = 1`` at the first step, else
    ``gamma / max(||G~|| / (phi + eps), gamma)``; ``phi <- eta ||G~||``; ``p <- p (1 - lr wd) - lr alpha eta G~``.

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-3`): Learning rate.
        beta (`float`, defaults to `0.9`): Decay of the row and column statistics' moving averages, in [0, 1).
        alpha (`float`, defaults to `0.05`): The update's scale, > 0.
        gamma (`float`, defaults to `1.01`): Norm-growth limiter, >= 1.
        eps (`float`, defaults to `1e-8`): Inside each square root and beside the previous norm, > 0.
        weight_decay (`float`, defaults to `0.0`): Decoupled, ``p *= 1 - lr * wd`` before the update.
        state_dtype (`str`, defaults to `"float32"`): Storage of the statistics (`"float32"`, `"bfloat16"`, or
            `"param"`: refused for float16 parameters, whose mean squares would overflow).
        foreach (`bool` or `None`, defaults to `None`): accepted for the engine's signature; RACS steps every
            parameter on its own (its statistics span rows, columns and the whole tensor).
    """

    recipe = RACS_RECIPE

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, beta: float = 0.9, alpha: float = 0.05,
                 gamma: float = 1.01, eps: float = 1e-8, weight_decay: float = 0.0, *, state_dtype: str = "float32",
                 foreach: bool | None = None):
        super().__init__(params, lr=lr, beta=beta, alpha=alpha, gamma=gamma, eps=eps, weight_decay=weight_decay,
                         state_dtype=state_dtype, foreach=foreach)


register(RACS_RECIPE, RACS, state_precision="fp32", second_moment="factored", example_hparams={"lr": 1e-2})

__all__ = ["COLUMN_START", "RACS", "RACS_RECIPE", "RacsMoments"]
