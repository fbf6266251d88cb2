"""NorMuon (Li et al. 2025, "NorMuon: Making Muon more efficient and scalable", arXiv 2510.05491).

Muon's step (:class:`~lowmem.optim.recipes.normalized.MuonMoments`: momentum, Newton-Schulz in bfloat16, the
lean step in blocks of rows, batches of matrices, multi-tensor buckets) followed by one more step with its own
state: a neuron-wise second moment ``second_momentum_buffer`` (one number per row of each matrix) of the
orthogonalised update, by which each row is divided before the update is rescaled to a target norm
(:mod:`lowmem.optim.functional.normuon`, Algorithm 1 lines 3-5). State: Muon's momentum plus ``m`` numbers per
``m x n`` matrix; AdamW for every other parameter, as ``muon``.

Every path computes the rows' norms of the iterate, updates ``v`` and the per-row factors
``c_i = lr s / (sqrt(v_i) + eps)`` once per matrix, then steps ``c_i O_i``: the lean step before its blocks of
rows (:meth:`NorMuonMoments.prepare_chunks`), the whole step (:meth:`NorMuonMoments._whole_normuon`), a batch's
matrix when its iterate is computed, a bucket of one shape at once (:func:`normuon_foreach_`), an FSDP2 shard of
rows with the two norms' squares all-reduced (:meth:`NorMuonMoments._sharded_step`; on ``sharded.refusal``'s
allow-list beside Muon's rule since 5af7505).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from ..._warn import warn_user
from ..engine import LowMemOptimizer, Recipe
from ..functional.galore import blas_device
from ..functional.muon import (bf16_gemm_workspace_bytes, matrix_index, muon_foreach_iterate, muon_matrices,
                               muon_matrix_shape,
                               muon_momentum_, newton_schulz,
                               newton_schulz_batched, newton_schulz_transient_bytes, ns_column_block_numel, ns_rows,
                               ns_shape, row_block_spans)
from ..functional.normuon import (UPDATE_SCALES, neuron_factors_bytes, neuron_row_factors, neuron_second_moment_,
                                  row_norms, row_norms_bytes)
from ..hparams import HParam, in_unit_interval, one_of, positive
from ..moments import ChunkState, grad_element_bytes, state_dtype
from ..registry import register, takes_the_default
from .normalized import (MUON_HPARAMS, USE_MUON, WEIGHT_LAYOUT, DefaultTargetGroups, MuonMoments, check_muon_group,
                         flat_as_targeted, in_out, semantic_shape)

V_KEY = "second_momentum_buffer"


def _vector_index(v: Tensor, e: int) -> Tensor:
    """Row vector ``e`` of ``v`` (``[..., A]``, one per matrix of a batch ``[..., A, B]``, in row-major order of the
    leading dimensions as :func:`~lowmem.optim.functional.muon.matrices`): a view."""
    if v.dim() == 1:
        return v
    idx = []
    for n in reversed(v.shape[:-1]):
        e, i = divmod(e, n)
        idx.append(i)
    return v[tuple(reversed(idx))]


def _factors(v: Tensor, norms: Tensor, shape: tuple[int, int], group: dict[str, Any], lr,
             reduce: Any = None) -> Tensor:
    """Lines 3-5 for ``k`` matrices (``v``: their ``k x m`` second moments; a stored vector's ``1 x m`` view) whose
    rows' norms are ``norms`` (``k x m``, in the step's dtype): ``v`` updated (through a copy in that dtype when
    stored in another, written back) and the ``k x m`` per-row factors returned."""
    work = v if v.dtype == norms.dtype else v.to(norms.dtype)
    neuron_second_moment_(work, norms, shape[1], group["beta2"])
    if work is not v:
        v.copy_(work)
    return neuron_row_factors(work, norms, shape, group["row_eps"], group["update_scale"], lr, reduce)


def _itemsize(state, group) -> int:
    """Bytes per element of the step's vectors and of its rows' step: the gradient's dtype (float64 for a float64 state
    or in a group holding a float64 parameter, :func:`~lowmem.optim.moments.grad_element_bytes`; before 2026-11-30 the
    state's alone: a float64 parameter with a float32 state was counted at float32, FOUND_NORMUON 6), else float32."""
    return grad_element_bytes(group, state["momentum_buffer"])


class NorMuonMoments(MuonMoments):
    """NorMuon on the targets of ``use_muon`` groups (Muon's: 2-D weights, batches of matrices over the last two
    dimensions), AdamW on the rest. State: ``momentum_buffer`` (the weight's shape) and ``second_momentum_buffer``
    (``shape[:-1]``: one number per row of each matrix), in the group's ``state_dtype``.

    Muon's step is reused as it is up to the iterate ``O``; what changes is how a block of rows is read from it:
    ``c_i O_i`` instead of ``lr * ratio * O_i`` (:meth:`target_direction`, :meth:`_batched_rows`)."""

    target_keys = ("momentum_buffer", V_KEY)
    # FSDP2: ``v`` of a matrix sharded by rows holds the shard's rows (one number each): saved as the rows of the whole
    # ``(m,)``, sharded like the parameter's rows (it reshards, uneven shards too), as Adafactor's row statistics
    reduced_dims = {V_KEY: -1}

    def replicated_state(self, key, group):
        """FSDP2: ``v`` of a weight stored ``[in, out]`` (``in_out``, transformers' ``Conv1D``) holds one number per
        output column, every column on every rank (the shards are of input rows; the columns' norms all-reduced:
        :meth:`_sharded_step`): equal on every rank, saved once (loads onto any number of processes)."""
        return key == V_KEY and in_out(group)

    def target_init_state(self, state, shape, group, param):
        super().target_init_state(state, shape, group, param)
        # one number per output neuron: per row of [out, in], per column of a Conv1D weight [in, out] (in_out), per
        # output channel of a conv kernel [out, in, kh, kw] (a row of its matrix [out, in kh kw]: muon_matrix_shape)
        rows = shape[-1:] if in_out(group, shape) else muon_matrix_shape(shape)[:-1]
        state[V_KEY] = torch.zeros(rows, dtype=state_dtype(group, param), device=param.device)

    # ---- the lean (chunked) step ----

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized, reduce=None):
        """Muon's lean step (the iterate of the whole matrix, :meth:`MuonMoments._lean_prepare`), then the rows'
        norms of the iterate a block of rows at a time (the blocks of ``bounds``), ``v`` and the per-row factors
        (``ctx["factors"]``). A batch of matrices: Muon's context, each matrix's factors computed with its iterate
        (:meth:`_matrix_iterate`). ``reduce`` (an FSDP2 shard of rows): :meth:`_sharded_step`."""
        if self._is_adam(state):
            return None
        if reduce is not None:
            return self._sharded_step(state, shape, group, lr, stabilized, reduce)
        seen: dict[str, torch.dtype] = {}

        def recorded(a, b, view):
            g = stabilized(a, b, view)
            seen.setdefault("dtype", torch.float64 if g.dtype == torch.float64 else torch.float32)
            return g

        # (Muon's context reads its ratio; NorMuon's step size is the factors')
        muon_group = {**group, "adjust_lr_fn": "original"}
        if len(shape) == 3:
            ctx = self._batched_prepare(state, shape, muon_group, lr, bounds, recorded)
            ctx["seen"], ctx["factor_index"] = seen, None
            return ctx
        shape = muon_matrix_shape(shape)  # (a conv kernel: its matrix [out, in kh kw])
        ctx = self._lean_prepare(state, shape, muon_group, lr, bounds, recorded)
        ctx["factors"] = self._matrix_factors(ctx["x"], tuple(shape), state[V_KEY], group, lr, bounds,
                                              seen.get("dtype", torch.float32))
        ctx["in_out"] = in_out(group)
        return ctx

    def _sharded_step(self, state, shape, group, lr, stabilized, reduce) -> Tensor:
        """An FSDP2 shard of rows: Muon's (the momentum on the shard, the whole ``U`` gathered in bfloat16, the
        unsharded iteration on every rank, this shard's rows of the iterate), then lines 3-5 on the shard's rows
        (its ``v``), ``||O^||_F`` and ``||O||_F`` summed over the shards. A weight stored ``[in, out]`` (``in_out``,
        transformers' ``Conv1D``; FSDP2 shards its input rows): the output columns' squared norms summed over the
        shards, ``v`` the whole ``(out,)`` on every rank (:meth:`replicated_state`). Returns the shard's step."""
        numel = math.prod(shape)
        g = stabilized(0, numel, ChunkState(state, 0, numel)).view(shape)
        buf = state["momentum_buffer"]
        buf32 = buf if buf.dtype == g.dtype else buf.to(g.dtype)
        u = muon_momentum_(buf32, g, group["momentum"], group["nesterov"])
        if buf32 is not buf:
            buf.copy_(buf32)
        whole = reduce.gather_rows(u.to(torch.bfloat16), reduce.shape[0])
        del u, buf32
        o = newton_schulz(whole, group["ns_coefficients"], group["ns_steps"], group["ns_eps"])
        o = o[reduce.rows[0] : reduce.rows[1]]
        del whole
        dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
        if in_out(group):
            # [in, out] sharded by input rows: every rank holds every output column's rows of its shard, so each
            # column's squared norm is summed over the shards (one all-reduce of `out` numbers) and v, the norms and
            # the factors are the whole (out,) on every rank (lines 3-5 unsharded: the two norms need no reduce)
            out = o.shape[1]
            norms = reduce.sum_(o.to(dtype).square_().sum(dim=0)).sqrt_()
            factors = _factors(state[V_KEY].view(1, out), norms.view(1, out), (out, reduce.shape[0]), group,
                               lr).view(out)
            return o.to(g.dtype).mul_(factors[None, :])
        v, rows = state[V_KEY], o.shape[0]  # (rows may be 0: an empty trailing shard)
        factors = _factors(v.view(1, rows), row_norms(o, dtype).view(1, rows), tuple(reduce.shape), group, lr,
                           reduce).view(rows)
        return o.to(g.dtype).mul_(factors[:, None])

    @staticmethod
    def _matrix_factors(x: Tensor, shape: tuple[int, int], v: Tensor, group, lr, bounds, dtype) -> Tensor:
        """The per-row factors of one matrix from its iterate ``x`` (:func:`ns_shape`), its rows' norms taken a block
        of ``bounds`` at a time (flat element ranges of whole rows). A weight stored ``[in, out]`` (``in_out``):
        the factors of its output neurons, its columns, whose norms are taken in blocks of as many columns as a
        block of ``bounds`` holds ``in``-element vectors (each column's norm from a contiguous copy of it, as an
        nn.Linear twin's row: the same bits)."""
        m, n = shape
        if in_out(group):
            step = max(1, max((b - a for a, b in bounds), default=m) // m)
            norms = torch.empty(n, dtype=dtype, device=x.device)
            o = ns_rows(x, shape, 0, m)  # [m, n]: a view of the iterate in the weight's layout
            for c in range(0, n, step):
                norms[c : c + step] = row_norms(o[:, c : c + step].mT, dtype)
            return _factors(v.view(1, n), norms.view(1, n), (n, m), group, lr).view(n)
        norms = torch.empty(m, dtype=dtype, device=x.device)
        for a, b in bounds:
            norms[a // n : b // n] = row_norms(ns_rows(x, shape, a // n, b // n), dtype)
        return _factors(v.view(1, m), norms.view(1, m), shape, group, lr).view(m)

    def _matrix_iterate(self, ctx: dict[str, Any], e: int) -> Tensor:
        """Muon's iterate of matrix ``e`` of a batch, and its per-row factors (``ctx["factors"]``) computed with it."""
        x = super()._matrix_iterate(ctx, e)
        if ctx["factor_index"] != e:
            ctx["factors"] = ctx["factor_index"] = None
            (m, n), size = ctx["batch"], ctx["size"]
            step = max(n, size // n * n)
            bounds = [(a, min(a + step, m * n)) for a in range(0, m * n, step)]
            v = _vector_index(ctx["state"][V_KEY], e)
            ctx["factors"] = self._matrix_factors(x, (m, n), v, ctx["group"], ctx["lr"], bounds,
                                                  ctx["seen"].get("dtype", torch.float32))
            ctx["factor_index"] = e
        return x

    def _batched_rows(self, g: Tensor, ctx: dict[str, Any], r0: int, r1: int) -> Tensor:
        """Rows ``r0:r1`` of the ``[-1, B]`` view of a batch's step: each matrix's rows of its iterate times their
        factors (:meth:`_matrix_iterate`)."""
        m, n = ctx["batch"]
        if r0 // m == (r1 - 1) // m:  # within one matrix
            x = self._matrix_iterate(ctx, r0 // m)
            o = ns_rows(x, (m, n), r0 % m, r0 % m + r1 - r0)
            return o.to(g.dtype, memory_format=torch.contiguous_format).mul_(
                ctx["factors"][r0 % m : r0 % m + r1 - r0, None]).view(-1)
        out = torch.empty((r1 - r0, n), dtype=g.dtype, device=g.device)
        r = r0
        while r < r1:
            e = r // m
            stop = min(r1, (e + 1) * m)
            x = self._matrix_iterate(ctx, e)
            out[r - r0 : stop - r0].copy_(ns_rows(x, (m, n), r - e * m, stop - e * m)).mul_(
                ctx["factors"][r - e * m : stop - e * m, None])
            del x
            r = stop
        return out.view(-1)

    def target_direction(self, g, state, group, t, lr):
        if isinstance(state, ChunkState) and "muon" in state.extra:  # a block of rows of the lean step
            ctx, (r0, r1) = state.extra["muon"], state.extra["rows"]
            if "batch" in ctx:
                return self._batched_rows(g, ctx, r0, r1)
            o = ns_rows(ctx["x"], ctx["shape"], r0, r1)
            f = ctx["factors"][None, :] if ctx.get("in_out") else ctx["factors"][r0:r1, None]  # (columns: in_out)
            return o.to(g.dtype, memory_format=torch.contiguous_format).mul_(f).view(-1)
        if g.dim() == 3:  # a batch of matrices stepped whole: one matrix after the other
            out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
            buf, v = state["momentum_buffer"], state[V_KEY]
            for e in range(math.prod(g.shape[:-2])):
                matrix_index(out, e).copy_(self._whole_normuon(matrix_index(g, e), matrix_index(buf, e),
                                                               _vector_index(v, e), group, lr))
            return out
        return self._whole_normuon(g, state["momentum_buffer"], state[V_KEY], group, lr)

    def _whole_normuon(self, g: Tensor, buf: Tensor, v: Tensor, group, lr) -> Tensor:
        """The whole-tensor step of one matrix: Muon's momentum and :func:`newton_schulz` (the reference iteration),
        then lines 3-5 and the step ``c_i O_i``; a conv kernel as its matrix ``[out, in kh kw]`` (the step viewed back
        in the kernel's shape)."""
        buf32 = buf if buf.dtype == g.dtype else buf.to(g.dtype)
        u = muon_momentum_(buf32, g, group["momentum"], group["nesterov"])
        if buf32 is not buf:
            buf.copy_(buf32)
        if g.dim() == 4:
            shape = g.shape
            mat = muon_matrix_shape(shape)
            o = newton_schulz(u.reshape(mat), group["ns_coefficients"], group["ns_steps"], group["ns_eps"])
            del u, buf32
            dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
            factors = _factors(v.view(1, mat[0]), row_norms(o, dtype).view(1, mat[0]), mat, group, lr).view(mat[0])
            return o.to(g.dtype).mul_(factors[:, None]).view(shape)
        o = newton_schulz(u, group["ns_coefficients"], group["ns_steps"], group["ns_eps"])
        del u, buf32
        dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
        if in_out(group):  # [in, out]: the output neurons are the columns
            n = g.shape[1]
            factors = _factors(v.view(1, n), row_norms(o.mT, dtype).view(1, n), (n, g.shape[0]), group, lr).view(n)
            return o.to(g.dtype).mul_(factors[None, :])
        m = g.shape[0]
        factors = _factors(v.view(1, m), row_norms(o, dtype).view(1, m), tuple(g.shape), group, lr).view(m)
        return o.to(g.dtype).mul_(factors[:, None])

    # ---- the multi-tensor step ----

    def target_foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """The targets of a bucket, those of one shape stacked (:func:`normuon_foreach_`); a weight in pieces
        stepped whole from its first one (Muon's :meth:`_whole_by_shape`)."""
        for shape, idx in self._whole_by_shape(params, grads, states, group, t, lr).items():
            # (a batch [E, A, B]: its matrices; a conv kernel whole, its matrix [out, in kh kw]: muon_matrices)
            ps = [mat for i in idx for mat in muon_matrices(params[i])]
            gs = [mat for i in idx for mat in muon_matrices(grads[i])]
            bs = [mat for i in idx for mat in muon_matrices(states[i]["momentum_buffer"])]
            per = shape[0] if len(shape) == 3 else 1
            vs = [_vector_index(states[i][V_KEY], e) for i in idx for e in range(per)]
            normuon_foreach_(ps, gs, bs, vs, muon_matrix_shape(shape)[-2:], group, lr)

    def _bf16_stack_direction(self, stack, states, shape, group, lr):
        """NorMuon's float32 steps ``c_i O_i`` of a stack of iterates (:func:`normuon_foreach_direction`; the second
        moments float32 or bfloat16, stored rounded)."""
        per = math.prod(shape[:-2])  # (a batch [E, A, B]: each matrix's vector, as the float32 bucket's)
        vs = [_vector_index(s[V_KEY], e) for s in states for e in range(per)]
        return normuon_foreach_direction(stack, vs, tuple(shape[-2:]), group, lr)

    def _bf16_stack_bytes(self, numel, shape):
        """The iteration, the rows' norms, the factors and the float32 steps (:func:`normuon_foreach_bytes` without
        the workspace, which :meth:`target_bf16_bucket_transient_bytes` adds)."""
        return normuon_foreach_bytes(numel, tuple(shape[-2:]), threads=0)

    # ---- transients ----

    def _normalization_bytes(self, shape, block_rows: int | None, state, group) -> tuple[int, int]:
        """``(during, kept)`` of lines 3-5 on one ``m x n`` matrix beside its iterate. ``during``: the rows' norms,
        taken ``block_rows`` rows at a time into a vector of ``m`` (each block's contiguous copy beside its norms), or
        all at once (``block_rows`` None: the copy of the whole matrix beside the norms it returns), then the
        factors' computation beside the norms (with ``v``'s copy when stored in another dtype). ``kept``: the
        factors, through the step."""
        m, n = shape
        if in_out(group):  # [in, out]: the norms of the out columns, in blocks of as many columns (_matrix_factors)
            block = None if block_rows is None else block_rows * n
            m, n = n, m
            block_rows = None if block is None else max(1, min(m, block // n))
        isz = _itemsize(state, group)
        copy_v = isz * m if state[V_KEY].dtype.itemsize != isz else 0
        factors = isz * m + copy_v + neuron_factors_bytes(1, m, isz)
        norms = row_norms_bytes(m, n, isz) if block_rows is None else isz * m + row_norms_bytes(block_rows, n, isz)
        return max(norms, factors), isz * m

    def _lean_bytes(self, numel, shape, group, state, copy: int = 0) -> int:
        """Muon's lean step (:meth:`MuonMoments._lean_bytes`) with the normalization's phase beside the bfloat16
        iterate (``2 m n``) and its factors kept through the blocks' steps (a block's float32 step and gradient
        copy, ``numel (4 + copy)``). A batch of matrices: :meth:`_batched_transient_bytes`."""
        shape = torch.Size(muon_matrix_shape(shape))  # (a conv kernel: its matrix [out, in kh kw])
        if len(shape) > 2:
            return self._batched_transient_bytes(numel, shape, group, state, copy)
        muon = super()._lean_bytes(numel, shape, group, state, copy)
        m, n = shape
        during, kept = self._normalization_bytes(shape, max(1, min(m, numel // n)), state, group)
        return max(muon, 2 * m * n + during, 2 * m * n + kept + numel * (_itemsize(state, group) + copy))

    def _batched_transient_bytes(self, numel, shape, group, state, copy: int = 0) -> int:
        """A batch of matrices ``[..., m, n]`` in blocks of ``numel`` elements (whole rows): Muon's phases
        (:meth:`MuonMoments._batched_transient_bytes`' terms: a matrix's iterate computed inside a block within one
        matrix or spanning several, the block's step) with NorMuon's vectors beside them: the previous matrix's
        factors (``isz m``) alive through the next matrix's iteration, the normalization (:meth:`_normalization_bytes`,
        its rows' norms a block of rows at a time) beside the iterate and the block's gradient copy (and, in a block
        over several matrices, its step, allocated before the first iterate here), the factors kept through the
        block's step. Exact in the tensors (traced; before AUDIT2 4, 2026-11-30, a bound 1.4x-2x over: the block's
        step counted twice); the products' workspace a bound as Muon's."""
        m, n = shape[-2:]
        mat, count = m * n, math.prod(shape[:-2])
        buf = state["momentum_buffer"]
        w, low = self._widths(group, buf)
        threads = torch.get_num_threads() if buf.device.type == "cpu" else 1
        size = max(n, numel // n * n)
        piece = min(size, mat)
        with blas_device(buf.device.type):
            ns = newton_schulz_transient_bytes((m, n), ns_column_block_numel(buf.device, piece), threads=threads)
        iterate = 2 * mat + max(piece * (copy + w * (group["nesterov"] + low)), ns)
        within, spanning = row_block_spans(shape, size)
        during, kept = self._normalization_bytes((m, n), max(1, min(m, size // n)), state, group)
        prev = kept if count > 1 else 0  # (the previous matrix's factors, while the next one's iterate is computed)
        phases = [copy * within + iterate + prev, copy * within + 2 * mat + during, 2 * mat + (w + copy) * within + kept]
        if spanning:
            block = (w + copy) * spanning
            phases += [block + iterate + prev, block + 2 * mat + during, block + 2 * mat + kept]
        return max(phases)

    def _whole_matrix_bytes(self, shape, group, state) -> int:
        """The whole step of one matrix (:meth:`_whole_normuon`): Muon's (the traced tensors and the products'
        workspace), or the normalization beside the last iterate (``2 m n``), or the step ``c_i O_i`` (``isz m n``)
        beside the iterate and the factors: the largest."""
        shape = muon_matrix_shape(shape)  # (a conv kernel: its matrix)
        m, n = shape
        isz = _itemsize(state, group)
        muon = MuonMoments._whole_matrix_bytes(shape, group, state)
        during, kept = self._normalization_bytes(shape, None, state, group)
        return max(muon, 2 * m * n + during, 2 * m * n + kept + isz * m * n)

    def target_whole_transient_bytes(self, shape, group, state):
        if len(shape) == 3:  # (the batch's step in the gradient's dtype, one matrix's step beside it)
            return _itemsize(state, group) * math.prod(shape) + self._whole_matrix_bytes(shape[-2:], group, state)
        return self._whole_matrix_bytes(shape, group, state)

    def target_foreach_transient_bytes(self, numel):
        """A bucket of ``numel`` elements of any shape: :func:`normuon_foreach_bytes`'s bound over shapes
        (``k m <= numel``)."""
        return normuon_foreach_bytes(numel, (max(1, numel), 1), threads=torch.get_num_threads())

    def target_foreach_bucket_transient_bytes(self, numel, shape, group):
        return normuon_foreach_bytes(numel, muon_matrix_shape(shape)[-2:], threads=torch.get_num_threads())

    def sharded_transient_bytes(self, shape, whole_shape, shards, group, state):
        """FSDP2 (:meth:`_sharded_step`): Muon's bound of the gathered step (the whole matrix's unchunked step and
        the gather's buffers, :meth:`MuonMoments.sharded_transient_bytes`) plus the shard's normalization beside it
        (its rows' copy and vectors, two summed squares): a bound. ``None`` for AdamW parameters."""
        muon = super().sharded_transient_bytes(shape, whole_shape, shards, group, state)
        if muon is None:
            return None
        rows, n = shape
        isz = _itemsize(state, group)
        vec = n if in_out(group) else rows  # (in_out: the whole (out,) vectors on every rank)
        return muon + isz * (rows * n + 5 * vec + 4)


def normuon_foreach_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], vs: list[Tensor],
                     shape: tuple[int, int], group: dict[str, Any], lr) -> None:
    """NorMuon's whole step for ``k`` float32 matrices of one ``shape``, one multi-tensor or batched kernel per
    operation: Muon's momentum and batched Newton-Schulz
    (:func:`~lowmem.optim.functional.muon.newton_schulz_batched`), the rows' norms of the stack, lines 3-5 on the
    ``k x m`` stack of ``v`` (copied from and back to the state's vectors), then ``p <- p (1 - lr wd) ;
    p <- p - c_i O_i``. The same operations as the per-matrix step
    (:meth:`NorMuonMoments.prepare_chunks`, a whole matrix as one block of rows). Transient:
    :func:`normuon_foreach_bytes`."""
    m = shape[0]
    stack = [muon_foreach_iterate(grads, bufs, shape, group["momentum"], group["nesterov"])]  # (the stored layout)
    d = normuon_foreach_direction(stack, vs, shape, group, lr)
    weight_decay = group.get("weight_decay", 0.0)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_sub_(params, [ns_rows(di, shape, 0, m).view(p.shape) for di, p in zip(d.unbind(0), params)])


def normuon_foreach_direction(stack: list[Tensor], vs: list[Tensor], shape: tuple[int, int], group: dict[str, Any],
                              lr) -> Tensor:
    """The float32 steps ``c_i O_i`` of a stack of iterates (``[X]``, :func:`~lowmem.optim.functional.muon.
    muon_foreach_iterate`'s, handed over): :func:`~lowmem.optim.functional.muon.newton_schulz_batched`, the rows'
    norms of the stack, lines 3-5 on the ``k x m`` stack of ``v`` (copied from and back to the state's vectors
    ``vs``, float32 or bfloat16: stored rounded, the factors from the float32 stack, as the per-matrix step's
    ``_factors``). A new ``k`` x ``ns_shape`` float32 stack."""
    x = newton_schulz_batched(stack, group["ns_coefficients"], group["ns_steps"], group["ns_eps"])
    # the output neurons are the rows of each matrix (the columns of a tall one's x), or for a weight stored
    # [in, out] (in_out: transformers' Conv1D) its columns (the rows of a tall one's x)
    tall = (shape[0] > shape[1]) != in_out(group)
    norms = row_norms(x.mT if tall else x, torch.float32)  # k x out
    v = torch.empty(norms.shape, dtype=torch.float32, device=norms.device)
    torch._foreach_copy_(list(v.unbind(0)), vs)
    factors = _factors(v, norms, semantic_shape(shape, group), group, lr)
    torch._foreach_copy_(vs, list(v.unbind(0)))
    del norms, v
    d = x.to(torch.float32)
    del x
    d.mul_(factors[:, None, :] if tall else factors[:, :, None])
    return d


def normuon_foreach_bytes(numel: int, shape: tuple[int, int], threads: int = 1) -> int:
    """Bytes :func:`normuon_foreach_` allocates for ``k`` matrices of ``shape`` (``numel = k m n``): Muon's bucket
    (the bfloat16 stack and one of the Nesterov matrices, the iteration's temporaries: 6 bytes per element,
    :func:`~lowmem.optim.functional.muon.muon_foreach_transient_bytes`); the rows' norms (a float32 copy of the
    stack, ``4 numel``, and ``4 k m``) beside the iterate; the factors' computation (``v``'s float32 stack, the
    norms and :func:`~lowmem.optim.functional.normuon.neuron_factors_bytes`) beside it; the float32 step beside the
    iterate and the factors. Plus the products' workspace."""
    m, n = shape
    k = max(1, numel // max(1, m * n))
    factors = 8 * k * m + neuron_factors_bytes(k, m, 4)
    body = max(6 * numel + 4 * k * m, 2 * numel + factors)
    return body + bf16_gemm_workspace_bytes(math.isqrt(numel), threads)


def _eps_ok(x: Any) -> bool:
    return positive(x)


NORMUON_HPARAMS = tuple(h for h in MUON_HPARAMS if h.name != "adjust_lr_fn") + (
    HParam("beta2", 0.95, in_unit_interval, "a float in [0, 1)",
           "decay of the neuron-wise second moment v <- b2 v + (1 - b2) mean_cols(O * O) (Algorithm 1 line 3)"),
    HParam("row_eps", 1e-10, _eps_ok, "a finite float > 0",
           "eps of O / (sqrt(V) + eps) and of the rescaling's ||O^||_F + eps (the authors' code: 1e-10)"),
    HParam("update_scale", "match_rms", one_of(*UPDATE_SCALES), f"one of {list(UPDATE_SCALES)}",
           "match_rms: the paper's 0.2 sqrt(m n) / ||O^||_F (AdamW's lr carries over); preserve_norm: the authors'"
           " code's ||O||_F / ||O^||_F times sqrt(max(1, m / n)) (Muon's lr, ~0.02)"),
)

NORMUON = Recipe(
    name="normuon",
    summary="NorMuon: Muon's orthogonalised momentum with a neuron-wise (per row) second moment; AdamW elsewhere",
    reference="Li et al. 2025, NorMuon: Making Muon more efficient and scalable (arXiv 2510.05491), Algorithm 1",
    moment=NorMuonMoments(eps_placement="torch"),
    hparams=NORMUON_HPARAMS,
    group_hparams=(USE_MUON, WEIGHT_LAYOUT),
    validate_group=check_muon_group,  # (5 or more dimensions refused; a 4-D conv kernel as [out, in kh kw])
)


class NorMuon(DefaultTargetGroups, LowMemOptimizer):
    """NorMuon (Li et al. 2025) for 2-D hidden weights (and batches of matrices) with AdamW for everything else.

    On a targeted ``m x n`` matrix: Muon's momentum ``B <- mu B + (1 - mu) g`` and the Newton-Schulz iterate ``O``
    of ``g + mu (B - g)`` (Nesterov) or ``B``; the neuron-wise second moment
    ``v <- beta2 v + (1 - beta2) mean_cols(O * O)``; ``O^ = O / (sqrt(v) + row_eps)``; decoupled weight decay
    ``lr * weight_decay``; the step ``lr * s * O^`` with ``s = 0.2 sqrt(m n) / (||O^||_F + row_eps)`` (``update_scale=
    "match_rms"``, the paper's Algorithm 1) or ``||O||_F sqrt(max(1, m/n)) / (||O^||_F + row_eps)``
    (``"preserve_norm"``, the authors' code). Other parameters: AdamW as in :class:`~lowmem.optim.Muon`.
    State: Muon's 4 bytes/param plus 4 bytes per row of each matrix.

    Args:
        params: Parameters or parameter groups (``create_optimizer(model, "normuon")`` builds them); ``use_muon`` as
            in :class:`~lowmem.optim.Muon`.
        lr (`float`, defaults to `1e-3`): Learning rate (AdamW's: ``match_rms`` gives the update an RMS of 0.2).
        weight_decay (`float`, defaults to `0.1`): Decoupled weight decay ``p *= 1 - lr * weight_decay``.
        momentum (`float`, defaults to `0.95`): Momentum ``mu`` (the paper's ``beta1``).
        nesterov (`bool`, defaults to `True`): Orthogonalise ``g + mu (B - g)`` (the authors' code); ``False`` is the
            paper's Algorithm 1 (``B``).
        ns_coefficients, ns_steps, ns_eps: Muon's Newton-Schulz iteration.
        beta2 (`float`, defaults to `0.95`): Decay of the neuron-wise second moment.
        row_eps (`float`, defaults to `1e-10`): ``eps`` of the row normalization and of the rescaling.
        update_scale (`str`, defaults to `"match_rms"`): ``"match_rms"`` or ``"preserve_norm"`` (above).
        betas, eps, adamw_lr_ratio: the AdamW parameters' (as :class:`~lowmem.optim.Muon`).
        state_dtype (`str`, defaults to `"float32"`): Storage of the buffers and moments.
        foreach (`bool` or `None`, defaults to `None`): ``False`` steps every parameter one at a time.
    """

    recipe = NORMUON

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
                 ns_steps: int = 5, ns_eps: float = 1e-7, beta2: float = 0.95, row_eps: float = 1e-10,
                 update_scale: str = "match_rms", betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 adamw_lr_ratio: float = 1.0, *, state_dtype: str = "float32", foreach: bool | None = None):
        params = list(params)
        default = {"use_muon": True} if takes_the_default(params, "use_muon") else None
        super().__init__(flat_as_targeted(params, "use_muon", True), lr=lr, weight_decay=weight_decay,
                         momentum=momentum, nesterov=nesterov, ns_coefficients=ns_coefficients, ns_steps=ns_steps,
                         ns_eps=ns_eps, beta2=beta2, row_eps=row_eps, update_scale=update_scale, betas=betas, eps=eps,
                         adamw_lr_ratio=adamw_lr_ratio, state_dtype=state_dtype, foreach=foreach)
        self.target_default = default
        if eps != 1e-8 and all(g.get("use_muon") and p.ndim >= 2 for g in self.param_groups for p in g["params"]):
            # pytorch_optimizer's NorMuon(eps=...) is the row normalization's; here AdamW's, which no parameter takes
            warn_user(f"eps={eps!r} is AdamW's eps in lowmem's NorMuon and every parameter here takes NorMuon, so it"
                      f" changes nothing; the row normalization's eps (pytorch_optimizer's NorMuon eps) is row_eps here"
                      f" (row_eps={row_eps!r})")


register(NORMUON, NorMuon, state_precision="fp32", second_moment="blockwise", target_key="use_muon",
         batched_targets=True, example_hparams={"lr": 2e-2})
