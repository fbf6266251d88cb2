"""CAME (Luo et al., ACL 2023): Adafactor's factored second moment, a first moment of the clipped
update, and a factored "confidence" (the instability ``(u - m)^2``) that scales the step.

The math is in :mod:`lowmem.optim.functional.came` (lines 6-11 of the paper's algorithm) and
:mod:`lowmem.optim.functional.adafactor` (lines 1-5); :class:`CameMoments` holds the state and runs
it whole or in blocks of rows; :class:`CAME` is the constructor with the authors' signature
(``came_pytorch.CAME``: ``lr, eps, clip_threshold, betas, weight_decay``).

State per matrix ``[..., n, m]``: the first moment (full, ``4 B`` per element) and the row and
column statistics of ``v`` and of the instability (``4 (n + m)`` per matrix, twice). Vectors
(``ndim < 2``): a full ``v`` beside the first moment, and no confidence (the step is ``lr m``), as
the authors' reference does (docs/optimizers.md, "CAME").
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from .. import functional as F
from ..functional import adam as FA
from ..engine import LowMemOptimizer, Recipe
from ..functional.came import came_direction, came_first_moment_, came_instability_
from ..hparams import LR, WEIGHT_DECAY, HParam, in_unit_interval, positive
from ..functional.adafactor import STACK_NUMEL, group_cap, stack_groups, stacks_large
from ..moments import ChunkState, MomentRule, sharded_group, state_dtype, step_whole_from_piece_
from ..registry import register


def _betas3(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 3 and all(in_unit_interval(b) for b in x)


def _eps_pair(x: Any) -> bool:
    """Both > 0: with ``eps1 = 0`` an all-zero gradient row gives ``r_i = 0`` and ``(R / mean R)^-1/2 = inf``
    (``u = 0 * inf = NaN``); with ``eps2 = 0`` its instability row is 0 and ``m / sqrt(S) = 0 / 0``."""
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(positive(e) for e in x)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its compute precision: itself when float32 or float64 (a float64 state is never rounded to float32,
    functional/adam.py ``compute_float``); a low-precision state's float32 copy, written back by :func:`_store`."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _store(x: torch.Tensor, x32: torch.Tensor) -> None:
    if x32 is not x:
        x.copy_(x32)


class CameMoments(MomentRule):
    """CAME's moments (Luo et al. 2023): the direction is ``m_t / sqrt(S_t)`` (matrices) or ``m_t``
    (vectors); the engine multiplies it by ``lr`` and applies the decoupled decay before the update.

    Matrices (``ndim >= 2``, factored on the last two dimensions, leading ones batch dimensions) keep
    ``exp_avg`` and the row / column statistics ``exp_avg_sq_row`` / ``exp_avg_sq_col`` (``v``, ``b2``)
    and ``exp_avg_res_row`` / ``exp_avg_res_col`` (the instability, ``b3``); vectors ``exp_avg`` and a
    full ``exp_avg_sq``. A 2-D matrix is stepped in blocks of whole rows (:meth:`prepare_chunks`: three
    passes, then each block's direction); vectors and batched matrices whole. The multi-tensor step
    (:meth:`foreach_step_`) stacks same-shape tensors of a bucket and runs each operation once per stack.

    Group keys used: ``betas`` ``(b1, b2, b3)``, ``eps`` ``(eps1, eps2)``, ``clip_threshold``.
    """

    state_keys = ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col", "exp_avg_sq")
    #: the chunked direction is a new tensor (the factors times the first moment), holding nothing of the gradient
    chunk_direction_is_new = True
    #: a float64 gradient with a float32 / bfloat16 state is cast to float32 once by the engine (counted there)
    computes_in_state_precision = True
    # FSDP2 (lowmem.optim.sharded): prepare_chunks takes ``reduce`` (column sums, row sums and the update's RMS
    # all-reduced over the shards of dimension 0); the row / column statistics are the parameter's shape with one
    # dimension reduced away (checkpoints shard the rows like the parameter and replicate the columns)
    sharded_stats = True
    reduced_dims = {"exp_avg_sq_row": -1, "exp_avg_sq_col": -2, "exp_avg_res_row": -1, "exp_avg_res_col": -2}

    def init_state(self, state, shape, group, param):
        dtype, device = state_dtype(group, param), param.device
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
        if len(shape) >= 2:
            rows, cols = shape[:-1], shape[:-2] + shape[-1:]
            for key, size in (("exp_avg_sq_row", rows), ("exp_avg_sq_col", cols), ("exp_avg_res_row", rows),
                              ("exp_avg_res_col", cols)):
                state[key] = torch.zeros(size, dtype=dtype, device=device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)

    # ---- the whole-tensor step (vectors, batched matrices, chunk_numel=None) ----

    def direction(self, g, state, group, t, lr):
        if isinstance(state, ChunkState) and state.extra.get("factors") is not None:
            return self._chunk_direction(state)
        return self._whole_direction(g, state, group)

    def _whole_direction(self, g, state, group, reduce=None):
        """Lines 1-11 (without ``lr``) on a whole tensor. ``reduce`` (an FSDP2 shard stepped whole: a vector's
        piece, or whole matrices of a batch): the update's sum of squares and element count are summed over the
        shards for its RMS (line 5), the only statistic a shard does not hold whole."""
        b1, b2, b3 = group["betas"]
        eps1, eps2 = group["eps"]
        g2 = torch.mul(g, g).add_(eps1)  # G^2 + eps1
        if "exp_avg_sq_row" in state:  # lines 1-4: u = G / sqrt(R C / mean(R))
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row32, col32 = _f32(row), _f32(col)
            F.factored_second_moment_(row32, col32, g2, b2)
            _store(row, row32)
            _store(col, col32)
            del g2
            u = F.factored_rsqrt(row32, col32).mul_(g)
            del row32, col32
        else:  # a vector: v = b2 v + (1 - b2)(G^2 + eps1); u = G / sqrt(v)
            v = state["exp_avg_sq"]
            v32 = _f32(v)
            v32.mul_(b2).add_(g2, alpha=1.0 - b2)
            _store(v, v32)
            del g2
            u = v32.rsqrt().mul_(g)
            del v32
        if reduce is None:
            F.clip_by_rms_(u, group["clip_threshold"])  # line 5
        else:
            sums = reduce.sum_(torch.stack([torch.linalg.vector_norm(u).square(),
                                            torch.tensor(float(u.numel()), device=u.device)]))
            u.div_(((sums[0] / sums[1]).sqrt_() / group["clip_threshold"]).clamp_(min=1.0))
            del sums
        m = state["exp_avg"]
        m32 = _f32(m)
        came_first_moment_(m32, u, b1)  # line 6
        _store(m, m32)
        if "exp_avg_res_row" not in state:  # a vector: the step is lr m (no confidence), as the authors'
            del u
            return m32 if m32 is not m else m32.clone()
        came_instability_(u, m32, eps2)  # line 7 (+ eps2)
        rr, rc = state["exp_avg_res_row"], state["exp_avg_res_col"]
        rr32, rc32 = _f32(rr), _f32(rc)
        F.factored_second_moment_(rr32, rc32, u, b3)  # lines 8-9
        _store(rr, rr32)
        _store(rc, rc32)
        del u
        return came_direction(rr32, rc32, m32)  # lines 10-11 (without lr)

    @staticmethod
    def _layout(shape, state) -> tuple[int, int, int]:
        """``(R, C, low)``: the row and column statistics' sizes (0, 0 for a vector) and whether the state is
        stored in a lower precision than float32 (its float32 copies)."""
        low = int("exp_avg" in state and state["exp_avg"].dtype != torch.float32)
        if len(shape) < 2:
            return 0, 0, low
        return math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1], low

    def transient_bytes(self, numel, shape, group, state):
        """The whole-tensor step (:meth:`direction`), exact: a matrix's peak is the direction ``4 n`` beside
        :func:`~lowmem.optim.functional.factored_rsqrt`'s factors ``4 (R + C)`` (the second moment's phase, ``G^2``
        or ``u`` beside the same factors, is no larger), and with low-precision state the float32 copies of the
        first moment and of the instability's statistics, ``4 (n + R + C)``; a vector's the update and the
        clipping's two 0-d tensors (``4 n + 8``), or with low-precision state the update beside the copy of ``v``
        or of the first moment (``8 n``); a float64 state computes in float64: its vector ``8 n + 16``.
        (A float64 parameter with a float32 / bfloat16 state: the engine casts its gradient to float32 once and
        counts that copy, ``computes_in_state_precision``; this is then a float32 gradient's step.)"""
        rows, cols, low = self._layout(shape, state)
        if not rows:
            if "exp_avg" in state and state["exp_avg"].dtype == torch.float64:
                return 8 * numel + 16  # (the update, and the clipping's two 0-d tensors, in float64)
            return 4 * numel + max(8, 4 * numel * low)
        return 4 * (numel + rows + cols) * (1 + low)

    # ---- the chunked step: blocks of whole rows of a 2-D matrix ----

    def chunk_align(self, shape, group, state):
        if len(shape) != 2 or "exp_avg_sq_row" not in state:
            return None  # vectors and batched matrices: whole
        return shape[1]

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        rows = (start // shape[1], stop // shape[1]) if len(shape) == 2 else None  # (an FSDP2 shard stepped whole)
        view = ChunkState(state, start, stop, {"rows": rows, "factors": ctx, "parent": state, "shape": shape})
        view["exp_avg"] = state["exp_avg"].view(-1)[start:stop]
        return view

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized, reduce=None):
        """Lines 1-9 over the row blocks, in three passes: the second moment's row statistics per block and its
        column sums (1-3); the RMS of the whole update (5); each block's update again, clipped, its first moment
        (6) and instability (7), whose row statistics are updated per block and column sums summed (8-9). Returns
        the confidence's factors ``{"r": (R / mean(R))^-1/2, "c": C^-1/2}`` (line 10), which each block's
        direction multiplies its first moment by (:meth:`_chunk_direction`).

        ``reduce`` (an FSDP2 parameter's local shard of rows, :class:`~lowmem.optim.sharded.ShardReduce`): the
        row statistics of the shard's rows are local; the column sums, the row statistic's sum (its mean in lines 3
        and 10) and the row count are summed over the shards (one all-reduce of ``n + 2`` numbers for ``v``, one of
        ``n + 1`` for the instability), the update's sum of squares too (one number), so the step equals the
        unsharded one. A vector or a batch of whole matrices (a shard stepped whole: the update's RMS reduced), and
        an unsharded matrix in one block: :meth:`_whole_direction`, its direction handed to the chunk
        (``{"d": ...}``)."""
        numel = math.prod(shape)
        if len(shape) != 2 or (reduce is None and [tuple(b) for b in bounds] == [(0, numel)]):
            # a vector's or a batch's shard, or a matrix in one block: stepped whole (fewer operations)
            if [tuple(b) for b in bounds] not in ([], [(0, numel)]):
                raise ValueError(f"CAME: a {len(shape)}-D tensor is stepped whole, got chunks {bounds}")
            g = stabilized(0, numel, self.chunk_state(state, 0, numel, shape, group)).view(shape)
            return {"d": self._whole_direction(g, state, group, reduce)}
        b1, b2, b3 = group["betas"]
        eps1, eps2 = group["eps"]
        m, n = shape

        def grad(start, stop):
            return stabilized(start, stop, self.chunk_state(state, start, stop, shape, group)).view(-1, n)

        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row32, col32 = _f32(row), _f32(col)
        col_sum = torch.zeros_like(col32)
        for start, stop in bounds:  # lines 1-2: R per block, C summed
            g2 = grad(start, stop).square().add_(eps1)
            row32[start // n : stop // n].mul_(b2).add_(g2.mean(dim=-1), alpha=1.0 - b2)
            col_sum.add_(g2.sum(dim=-2))
            del g2
        if reduce is None:
            rows, row_mean = m, None
            col32.mul_(b2).add_(col_sum.div_(m), alpha=1.0 - b2)
        else:  # sums over every shard's rows: [column sums, sum of R, number of rows]
            sums = reduce.sum_(torch.cat([col_sum, row32.sum().view(1), col_sum.new_full((1,), m)]))
            rows = sums[n + 1].clone()  # (a 0-d copy: the sums' buffer is freed below)
            row_mean = sums[n : n + 1] / rows
            col32.mul_(b2).add_(sums[:n] / rows, alpha=1.0 - b2)
            del sums
        del col_sum
        _store(row, row32)
        _store(col, col32)
        row_mean = row32.mean(dim=-1, keepdim=True) if row_mean is None else row_mean
        r_factor = (row32 / row_mean).rsqrt_().unsqueeze(-1)  # line 3 as two factors
        del row_mean
        c_factor = col32.unsqueeze(-2).rsqrt()
        del row32, col32
        sq = torch.zeros((), dtype=r_factor.dtype, device=row.device)  # (float64 for a float64 state)
        for start, stop in bounds:  # line 5: the RMS of the whole update
            u = torch.mul(r_factor[start // n : stop // n], c_factor).mul_(grad(start, stop))
            sq.add_(torch.linalg.vector_norm(u).square_())
            del u
        if reduce is None:
            clip = (sq.sqrt_() / (math.sqrt(m * n) * group["clip_threshold"])).clamp_(min=1.0)
        else:
            clip = (reduce.sum_(sq).sqrt_() / ((rows * n).sqrt() * group["clip_threshold"])).clamp_(min=1.0)
        del sq
        mom, rr, rc = state["exp_avg"], state["exp_avg_res_row"], state["exp_avg_res_col"]
        rr32, rc32 = _f32(rr), _f32(rc)
        res_sum = torch.zeros_like(rc32)
        for start, stop in bounds:  # lines 4-9 per block
            r0, r1 = start // n, stop // n
            g = grad(start, stop)  # (held to the block's end: a low-precision gradient's copy beside the temporaries)
            u = torch.mul(r_factor[r0:r1], c_factor).mul_(g).div_(clip)
            mc = mom.view(-1)[start:stop]
            m32 = _f32(mc)
            came_first_moment_(m32.view(-1, n), u, b1)
            _store(mc, m32)
            came_instability_(u, m32.view(-1, n), eps2)
            del m32
            rr32[r0:r1].mul_(b3).add_(u.mean(dim=-1), alpha=1.0 - b3)
            res_sum.add_(u.sum(dim=-2))
            del u, g
        del r_factor, c_factor, clip
        if reduce is None:
            rc32.mul_(b3).add_(res_sum.div_(m), alpha=1.0 - b3)
            rr_mean = rr32.mean(dim=-1, keepdim=True)
        else:  # [column sums of the instability, sum of its R] over every shard's rows
            sums = reduce.sum_(torch.cat([res_sum, rr32.sum().view(1)]))
            rc32.mul_(b3).add_(sums[:n] / rows, alpha=1.0 - b3)
            rr_mean = sums[n : n + 1] / rows
            del sums
        del res_sum
        _store(rr, rr32)
        _store(rc, rc32)
        r_conf = (rr32 / rr_mean).rsqrt_().unsqueeze(-1)
        del rr_mean
        return {"r": r_conf, "c": rc32.unsqueeze(-2).rsqrt()}

    def _chunk_direction(self, state):
        """A block's ``m_t / sqrt(S_t)`` (lines 10-11 without ``lr``), a new tensor."""
        f = state.extra["factors"]
        if "d" in f:  # stepped whole (a vector's or a batch's FSDP2 shard): the direction is computed already
            return f["d"].view(-1)[state.start : state.stop]
        r0, r1 = state.extra["rows"]
        m32 = _f32(state["exp_avg"])
        return torch.mul(f["r"][r0:r1], f["c"]).mul_(m32.view(r1 - r0, -1)).view(-1)

    def chunk_transient_bytes(self, numel, shape, group, state):
        """The chunked step of an ``m x n`` matrix with blocks of at most ``numel`` elements (``k`` rows), exact:
        its largest phase is the third pass (:meth:`prepare_chunks`), where the update's factors ``4 (m + n)``,
        the clip divisor, the instability's column sums ``4 n`` and a block's update ``4 c`` are alive beside a
        statistic of it (its row means ``4 k`` or column sums ``4 n``) or, with low-precision state, the float32
        copy of the block's first moment ``4 c`` (freed before the statistics), and with low-precision state the
        float32 copies of the instability's statistics ``4 (m + n)``. A low-precision gradient's block copy is held
        through the block (the engine adds it). The first two passes and the directions (the confidence's
        factors, the block's direction and the copy of its first moment) hold less."""
        if len(shape) != 2 or numel >= math.prod(shape):  # (one block: the whole step, prepare_chunks)
            return self.transient_bytes(numel, shape, group, state)
        return self._row_blocks_bytes(numel, shape, state)

    def chunk_kept_bytes(self, numel, shape, group, state):
        """A tensor stepped in one block keeps its whole direction (:meth:`prepare_chunks`' ``{"d": ...}``) through
        the write-back; row blocks keep the confidence's factors ``4 (m + n)``."""
        if len(shape) != 2 or numel >= math.prod(shape):
            return 4 * math.prod(shape)  # (float32: only a bfloat16 parameter is rounded stochastically)
        return 4 * (shape[0] + shape[1])

    def _row_blocks_bytes(self, numel, shape, state) -> int:
        """The three passes over row blocks of at most ``numel`` elements (:meth:`chunk_transient_bytes`); a float64
        state is computed in float64 without copies: the same tensors at 8 bytes per element."""
        m, n = shape
        _, _, low = self._layout(shape, state)
        k = max(1, numel // n)
        if "exp_avg" in state and state["exp_avg"].dtype == torch.float64:  # computed in float64, no copies
            return 8 * (m + n) + 8 * n + 8 + 8 * numel + 8 * max(k, n)
        return 4 * (m + n) * (1 + low) + 4 * n + 4 + 4 * numel + max(4 * numel * low, 4 * max(k, n))

    def sharded_transient_bytes(self, shape, whole_shape, shards, group, state):
        """FSDP2, a shard of ``shape``: a matrix's shard always takes the three passes (its column sums are
        all-reduced), bounded by blocks of the whole shard (exact when it fits in one chunk, above the count of
        smaller chunks), plus the row count kept as a 0-d tensor (4 B); a vector's or a batch's shard the whole
        step, whose reduced RMS holds ``u`` beside its stacked sums (``4 n + 16``)."""
        numel = math.prod(shape)
        if len(shape) == 2:
            return self._row_blocks_bytes(max(numel, 1), shape, state) + 4
        return max(self.transient_bytes(numel, shape, group, state), 4 * numel + 16)

    # ---- the multi-tensor step (float32 parameters and state; the engine's foreach buckets) ----

    def supports_foreach_for(self, shape, group, state):
        """Every shape, not in an FSDP2 group (its column sums and update RMS need the shards' sums: the
        per-parameter step reduces them)."""
        return not sharded_group(group)

    def steps_pieces_whole(self, shape, group, state):
        """Always: a tensor larger than ``chunk_numel`` is stepped from its first piece, a matrix in row blocks,
        a vector or a batch of matrices whole (:meth:`foreach_step_`)."""
        return True

    def foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """A bucket's step: tensors of one shape stacked and stepped together, one group at a time
        (:func:`~lowmem.optim.functional.adafactor.stack_groups`: on the CPU tensors under 32,768 elements, at
        most 2^18 elements a group; elsewhere every same-shape set), each operation of :meth:`_whole_direction`
        once on the stacks (the statistics along the last dimensions, the update's RMS per stacked tensor), the
        state written back, then the decay and the update per tensor (``torch._foreach_*``). A tensor larger
        than ``chunk_numel`` arrives in flat pieces and is stepped from its first one as the per-parameter step
        does (:func:`~lowmem.optim.moments.step_whole_from_piece_` for a matrix, whole otherwise)."""
        wd = group.get("weight_decay", 0.0)
        whole = []
        for p, g, st in zip(params, grads, states):
            if not isinstance(st, ChunkState):
                whole.append((p, g, st))
                continue
            if st.start != 0:
                continue
            state, shape = st.extra["parent"], st.extra["shape"]
            if len(shape) == 2:
                step_whole_from_piece_(self, p, g, st, group, t, lr, decay_after=False)
                continue
            numel = math.prod(shape)
            pw = p.as_strided((numel,), (1,), p.storage_offset())
            d = self._whole_direction(g.as_strided((numel,), (1,), g.storage_offset()).view(shape), state, group)
            F.decoupled_weight_decay_(pw, lr, wd)
            pw.add_(d.view(-1), alpha=-lr)
            del d
        if not whole:
            return
        ps, gs, ss = (list(x) for x in zip(*whole))
        for idx in stack_groups(gs, [2 if "exp_avg_sq_row" in st else 1 for st in ss]):
            d = self._group_direction([gs[i] for i in idx], [ss[i] for i in idx], group)
            group_ps = [ps[i] for i in idx]
            if wd != 0:
                torch._foreach_mul_(group_ps, 1.0 - lr * wd)
            torch._foreach_add_(group_ps, list(d.unbind(0)), alpha=-lr)
            del d

    # ---- bfloat16 parameters in the multi-tensor buckets (the engine's _step_bf16_bucket) ----

    #: the state dtypes :meth:`bf16_bucket_direction` takes (bfloat16 statistics on float32 copies)
    bf16_bucket_state_dtypes = (torch.float32, torch.bfloat16)

    def bf16_bucket_direction(self, g32s, states, group, t, lr):
        """:meth:`direction` of a bucket of whole bfloat16 parameters: the gradients' float32 copies ``g32s`` grouped
        as :meth:`foreach_step_` groups float32 gradients (:func:`~lowmem.optim.functional.adafactor.stack_groups`),
        lines 1-11 once per group (:meth:`_group_direction`, bit for bit the per-parameter step's), each group's
        copies freed once its directions are made (``g32s`` is emptied); a lone vector's direction (its first moment
        itself) copied, so that every direction is a new tensor (the engine frees them before the write-back).
        bfloat16 statistics are updated on float32 copies and stored rounded to nearest at the end, the directions
        the unrounded copies' (as :meth:`_whole_direction`). Returns the float32 directions; allocates
        :meth:`bf16_bucket_transient_bytes`."""
        stored = {k: [i for i, s in enumerate(states) if k in s] for k in self.state_keys}
        dtypes = {states[i][k].dtype for k, idx in stored.items() for i in idx}
        if dtypes not in ({torch.float32}, {torch.bfloat16}):
            raise ValueError(f"CameMoments.bf16_bucket_direction: the statistics of one bucket are all float32 or all"
                             f" bfloat16, got {sorted(map(str, dtypes))}")
        low = dtypes == {torch.bfloat16}
        work = [dict(s) for s in states] if low else states
        if low:  # (float32 copies of every statistic, in the states' stead)
            for k, idx in stored.items():
                for i, x32 in zip(idx, FA.float32_copies([states[i][k] for i in idx])):
                    work[i][k] = x32
        ds: list = [None] * len(g32s)
        for idx in stack_groups(g32s, [2 if "exp_avg_sq_row" in st else 1 for st in states]):
            d = self._group_direction([g32s[i] for i in idx], [work[i] for i in idx], group)
            if len(idx) == 1 and "exp_avg_res_row" not in states[idx[0]]:
                d = d.clone()  # (a lone vector's first moment)
            for i, x in zip(idx, d.unbind(0)):
                ds[i], g32s[i] = x, None
            del d
        g32s.clear()
        if low:
            for k, idx in stored.items():
                if idx:
                    torch._foreach_copy_([states[i][k] for i in idx], [work[i][k] for i in idx])
        return ds

    def bf16_bucket_transient_bytes(self, numel, states, members=None, group=None):
        """What :meth:`bf16_bucket_direction` allocates for the bucket's ``members`` (``(elements, state)``) of
        ``numel`` elements: the gradients' float32 copies and the directions made so far (together 4 B per element)
        beside one group's :meth:`_group_bytes` (:meth:`foreach_bucket_transient_bytes`, grouped as the float32
        buckets; a lone vector's copy of its direction, ``4 n``, within its group's ``4 n + 4``), and bfloat16
        statistics' float32 copies (4 B per state element) throughout."""
        if members is None:  # (the groups' sizes need each member's elements: a state is empty before its first step)
            raise TypeError("CameMoments.bf16_bucket_transient_bytes needs members=, the bucket's (elements, state)")
        copies = sum(4 * st[k].numel() for _, st in members for k in self.state_keys
                     if k in st and st[k].dtype == torch.bfloat16)
        return 4 * numel + copies + self.foreach_bucket_transient_bytes(numel, members)

    @staticmethod
    def _group_direction(grads, states, group):
        """Lines 1-11 (without ``lr``) of a group of same-shape float32 tensors, stacked along a new first
        dimension: the directions, a new tensor (for a group of vectors: the stacked first moments; a lone
        vector's is a view of its state, which the update only reads)."""
        b1, b2, b3 = group["betas"]
        eps1, eps2 = group["eps"]
        k = len(grads)

        def stacked(key):
            xs = [st[key] for st in states]
            return xs, (xs[0].unsqueeze(0) if k == 1 else torch.stack(xs))

        def write_back(xs, x):
            if k > 1:
                torch._foreach_copy_(xs, list(x.unbind(0)))

        if "exp_avg_sq_row" in states[0]:  # lines 1-4 on the stack: U = (R / mean(R))^-1/2 C^-1/2 G
            g = grads[0].unsqueeze(0) if k == 1 else torch.stack(grads)
            w = torch.mul(g, g).add_(eps1)
            rows, r = stacked("exp_avg_sq_row")
            cols, c = stacked("exp_avg_sq_col")
            F.factored_second_moment_(r, c, w, b2)
            write_back(rows, r)
            write_back(cols, c)
            del w
            u = F.factored_rsqrt(r, c).mul_(g)
            del g, r, c
        else:  # vectors: V <- b2 V + (1 - b2)(G^2 + eps1); U = V^-1/2 G, in the memory of G^2
            w = (grads[0] * grads[0]) if k == 1 else torch.stack(grads)
            if k > 1:
                w.mul_(w)
            w.add_(eps1)
            vs, v = stacked("exp_avg_sq")
            v.mul_(b2).add_(w, alpha=1.0 - b2)
            write_back(vs, v)
            u = torch.rsqrt(v, out=w.unsqueeze(0) if k == 1 else w)
            del v, w
            u.mul_(grads[0] if k == 1 else torch.stack(grads))
        # line 5, per tensor: U / max(1, RMS(U) / d)
        lead = (-1,) + (1,) * (u.dim() - 1)
        clip = torch.linalg.vector_norm(u.view(k, -1), dim=1)
        clip.div_(math.sqrt(u[0].numel())).div_(group["clip_threshold"]).clamp_(min=1.0)
        u.div_(clip.view(lead))
        del clip
        ms, m = stacked("exp_avg")
        came_first_moment_(m, u, b1)  # line 6
        write_back(ms, m)
        if "exp_avg_res_row" not in states[0]:  # a vector: the step is lr m (no confidence)
            return m
        came_instability_(u, m, eps2)  # line 7 (+ eps2)
        rrs, rr = stacked("exp_avg_res_row")
        rcs, rc = stacked("exp_avg_res_col")
        F.factored_second_moment_(rr, rc, u, b3)  # lines 8-9
        write_back(rrs, rr)
        write_back(rcs, rc)
        del u
        return came_direction(rr, rc, m)  # lines 10-11 (without lr)

    def foreach_transient_bytes(self, numel):
        """Without the states at hand: two float32 tensors of the bucket (the statistics left out:
        :meth:`foreach_bucket_transient_bytes` counts them)."""
        return 8 * numel

    def foreach_bucket_transient_bytes(self, numel, members, group=None):
        """:meth:`foreach_step_` of a bucket whose ``members`` are ``(elements, state)``: its largest group's
        (:meth:`_group_bytes`; each group's temporaries are freed before the next one's), grouped as on the
        state's device (every same-shape set stacked off the CPU; both groupings on meta tensors: the larger)."""
        shapes = [(tuple(st["exp_avg"].shape) if "exp_avg" in st else (n,), n) for n, st in members]
        devices = {st["exp_avg"].device for _, st in members if "exp_avg" in st}
        device = next(iter(devices)) if len(devices) == 1 else None
        larges = (stacks_large(device),) if device is not None and device.type != "meta" else (False, True)
        out = 0
        for large in larges:
            cap = group_cap([n for _, n in shapes], large)
            groups: dict[tuple, list[int]] = {}
            for i, (shape, n) in enumerate(shapes):
                groups.setdefault((shape,) if large or n < STACK_NUMEL else (i,), []).append(i)
            for idx in groups.values():
                shape, n = shapes[idx[0]]
                per = max(1, cap // max(1, n))
                for a in range(0, len(idx), per):
                    out = max(out, self._group_bytes(shape, len(idx[a:a + per])))
        return out

    @staticmethod
    def _group_bytes(shape, k) -> int:
        """:meth:`_group_direction` of ``k`` float32 tensors of ``shape`` (contiguous; a lone one allocates no
        stacks), exact: a matrix group's peak holds the stacked gradients and update (``8 k n``), the stacked
        statistics and the factors of :func:`~lowmem.optim.functional.factored_rsqrt` (``8 k (R + C)``); a lone
        matrix the whole step's ``4 (n + R + C)``; a group of vectors its ``G^2`` turned into the update and the
        stacked first moments or gradients (``8 k n``), a lone vector ``G^2`` / the update and the clip's
        ``4 k`` beside it."""
        n = math.prod(shape)
        if len(shape) >= 2:
            rows, cols = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
            return 4 * (n + rows + cols) if k == 1 else 8 * k * (n + rows + cols)
        return 4 * n + 4 if k == 1 else 8 * k * n


CAME_RECIPE = Recipe(
    name="came",
    summary="CAME: Adafactor's factored second moment + a factored confidence of the momentum (rows + columns)",
    reference="Luo et al. 2023, CAME: Confidence-guided Adaptive Memory Efficient Optimization (ACL), CAME algorithm",
    moment=CameMoments(),
    hparams=(
        LR(2e-4),
        HParam("betas", (0.9, 0.999, 0.9999), _betas3, "a triple (beta1, beta2, beta3) with 0 <= beta < 1",
               "decay rates of the first moment, the second moment's and the instability's statistics"),
        HParam("eps", (1e-30, 1e-16), _eps_pair, "a pair (eps1, eps2) of floats > 0",
               "regularizers added to g^2 and to the instability (u - m)^2"),
        HParam("clip_threshold", 1.0, positive, "a finite float > 0", "threshold d of the update RMS clipping"),
        WEIGHT_DECAY(0.0),
    ),
)


class CAME(LowMemOptimizer):
    """CAME (Luo et al., ACL 2023) on the lowmem engine, the authors' ``came_pytorch.CAME`` signature.

    Matrices keep a full first moment and the row and column statistics of the second moment and of
    the instability; vectors a full first and second moment and no confidence (as the authors'
    reference). Equal to ``pytorch_optimizer.CAME`` at matching settings to float32 rounding (tested).

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `2e-4`): Learning rate.
        eps (`tuple[float, float]`, defaults to `(1e-30, 1e-16)`): ``eps1`` added to ``g^2``, ``eps2``
            added to the instability ``(u - m)^2``.
        clip_threshold (`float`, defaults to `1.0`): Update clipping threshold ``d``.
        betas (`tuple[float, float, float]`, defaults to `(0.9, 0.999, 0.9999)`): Decay rates of the
            first moment, the second moment and the instability, each in [0, 1).
        weight_decay (`float`, defaults to `0.0`): Decoupled, ``p *= 1 - lr * wd`` before the update.
        state_dtype (`str`, defaults to `"float32"`): Storage of the moments and statistics.
        foreach (`bool` or `None`, defaults to `None`): `None` steps float32 parameters in multi-tensor
            buckets (same-shape tensors stacked; equal bit for bit to the per-parameter step); `False` forces
            the per-parameter step (a 2-D matrix above ``chunk_numel`` in blocks of rows).
    """

    recipe = CAME_RECIPE

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-4,
        eps: tuple[float, float] = (1e-30, 1e-16),
        clip_threshold: float = 1.0,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        *,
        state_dtype: str = "float32",
        foreach: bool | None = None,
    ):
        super().__init__(params, lr=lr, eps=eps, clip_threshold=clip_threshold, betas=betas,
                         weight_decay=weight_decay, state_dtype=state_dtype, foreach=foreach)


register(CAME_RECIPE, CAME, state_precision="fp32", second_moment="factored", example_hparams={"lr": 1e-2})

__all__ = ["CAME", "CAME_RECIPE", "CameMoments"]
