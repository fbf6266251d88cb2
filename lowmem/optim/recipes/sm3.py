"""SM3 (Anil, Gupta, Koren, Singer, NeurIPS 2019, "Memory-Efficient Adaptive Optimization"): SM3-II.

Adagrad's per-coordinate sum of squared gradients, bounded by accumulators of cover sets instead of stored
per coordinate (math: :mod:`lowmem.optim.functional.sm3`, Algorithm 2). Covers, as the paper's Section 4 and
the authors' TF code: for a tensor of ``p >= 2`` dimensions, the slices along each dimension (a matrix
``m x n``: ``m`` row and ``n`` column accumulators, ``4 (m + n)`` bytes); a vector or a scalar one
accumulator per coordinate (diagonal Adagrad, as the authors' code and pytorch_optimizer's ``SM3``).
``momentum > 0`` adds a full momentum of the preconditioned gradient (4 B per element); ``momentum = 0``
(the default, as both) keeps none, so a matrix's whole state is its ``m + n`` accumulators.

Embeddings: their gradients are dense here (``nn.Embedding(sparse=True)`` is refused by the engine, as for
every recipe), so an embedding is a matrix with row and column covers, as the paper's experiments ran
(the authors' TF code: "on TPU all the sparse gradients are densified"; its sparse path, row covers only,
is not reproduced).

:class:`Sm3Moments` steps a tensor whole or in blocks of its leading index (rows): ``nu`` and the update
are element-wise given the accumulators, the leading dimension's accumulators are per block, and the
others' new maxima are collected over the blocks (:meth:`Sm3Moments.prepare_chunks` /
:meth:`Sm3Moments.finish_chunks`) and written after the last one, since every block reads their old values.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from ..engine import LowMemOptimizer, Recipe
from ..functional.sm3 import sm3_cover_max, sm3_momentum_, sm3_nu, sm3_precondition_
from ..hparams import LR, WEIGHT_DECAY, HParam, in_unit_interval, positive
from ..functional.adafactor import STACK_NUMEL, group_cap, stack_groups, stacks_large
from ..moments import ChunkState, MomentRule, sharded_group, state_dtype, step_whole_from_piece_
from ..registry import register

#: state keys of the per-dimension accumulators (``acc_0`` .. ``acc_{p-1}`` of a ``p``-D tensor; ``reset`` zeroes
#: those of up to 16 dimensions)
_DIM_KEYS = tuple(f"acc_{i}" for i in range(16))


def _beta2(x: Any) -> bool:
    """``0 <= beta2 <= 1`` (1: the paper's sums)."""
    return in_unit_interval(x) or (x == 1 and not isinstance(x, bool))


def _float16_state_refusal(where: str) -> str:
    """The error of a float16 state: the accumulators are sums of squared gradients (``beta2 = 1``) or their moving
    averages, and float16 overflows past 65504 (a gradient entry of 256 is enough), after which ``rsqrt(inf) = 0``
    freezes those coordinates for good (AUDIT2 1)."""
    return (f"sm3: {where}: state_dtype='param' of a float16 parameter would keep float16 accumulators of squared "
            f"gradients, which overflow to inf past 65504 (one gradient entry of 256) and then stop those "
            f"coordinates' steps for good; use state_dtype='float32' (the default) or 'bfloat16'")


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


class Sm3Moments(MomentRule):
    """SM3-II's accumulators (Algorithm 2) and an optional momentum of the preconditioned gradient.

    State of a ``p``-D tensor, ``p >= 2``: ``acc_i`` (1-D, ``shape[i]`` values) for each dimension ``i``;
    of a vector or a 0-d tensor: ``acc`` (its own shape); with ``momentum > 0``: ``momentum`` (the tensor's
    shape). The direction is ``g / sqrt(nu + eps)``, or the momentum of it.

    Group keys used: ``momentum``, ``beta2``, ``eps``.
    """

    state_keys = ("momentum", "acc") + _DIM_KEYS
    #: the direction is ``nu``'s buffer (a new tensor), holding nothing of the gradient chunk
    chunk_direction_is_new = True
    #: a float64 gradient with a float32 / bfloat16 state is cast to float32 once by the engine (counted there)
    computes_in_state_precision = True

    def init_state(self, state, shape, group, param):
        dtype, device = state_dtype(group, param), param.device
        if dtype == torch.float16:  # (a parameter made float16 after construction: model.half())
            raise ValueError(_float16_state_refusal(f"a {tuple(shape)} parameter"))
        if len(shape) >= 2:
            for i, n in enumerate(shape):
                state[f"acc_{i}"] = torch.zeros(n, dtype=dtype, device=device)
        else:
            state["acc"] = torch.zeros(shape, dtype=dtype, device=device)
        if group["momentum"] > 0:
            state["momentum"] = torch.zeros(shape, dtype=dtype, device=device)

    # ---- the step of a block of leading indices (a whole tensor is one block) ----

    @staticmethod
    def _block(g, state, group, shape, rows, kept):
        """Lines 6-8 and the momentum on the block ``g`` of a tensor of ``shape``: its leading indices ``rows``
        (``(start, stop)``; ``None``: a vector's elements, whose accumulator is the state's ``acc`` view).
        ``kept``: ``{i: running maxima}`` of the dimensions ``i >= 1`` when the tensor is stepped in several
        blocks (their accumulators are written by :meth:`finish_chunks`); ``None``: written here. Returns the
        direction, a new tensor of ``g``'s shape."""
        momentum, beta2, eps = group["momentum"], group["beta2"], group["eps"]
        if g.numel() == 0:  # (an empty tensor: no coordinate, no cover set changes)
            return torch.zeros_like(g)
        if len(shape) >= 2:
            r0, r1 = rows
            g = g.view(r1 - r0, *shape[1:])  # (a chunk's flat block; a whole, maybe strided, tensor: its own shape)
            p = len(shape)
            covers = [state["acc_0"][r0:r1].view(-1, *([1] * (p - 1)))]
            covers += [state[f"acc_{i}"].view([1] * i + [shape[i]] + [1] * (p - 1 - i)) for i in range(1, p)]
            nu = sm3_nu(covers, g, beta2)  # line 6
            del covers
            state["acc_0"][r0:r1].copy_(sm3_cover_max(nu, 0))  # line 8: the block's own rows
            for i in range(1, p):
                top = sm3_cover_max(nu, i)
                if kept is None:
                    state[f"acc_{i}"].copy_(top)
                else:
                    torch.maximum(kept[i], top, out=kept[i])  # (an FSDP2 float64 shard's into float32: rounded)
                del top
        else:  # one cover per coordinate: nu = mu + g^2 (diagonal Adagrad), mu = nu
            acc = state["acc"]
            nu = sm3_nu([acc.view(g.shape)], g, beta2)
            acc.copy_(nu.view(acc.shape))
        u = sm3_precondition_(nu, g, eps)  # line 7 (without lr), in nu's memory
        if momentum > 0:
            m = state["momentum"].view(u.shape)  # (a chunk's flat view, or the whole tensor)
            m32 = m if m.dtype == u.dtype else m.to(u.dtype)  # (a low-precision momentum's float32 copy)
            sm3_momentum_(m32, u, momentum)
            if m32 is not m:
                m.copy_(m32)
            u.copy_(m32)
            del m32
        return u

    def direction(self, g, state, group, t, lr):
        if isinstance(state, ChunkState):
            shape = state.extra["shape"]
            return self._block(g, state, group, shape, state.extra["rows"], state.extra["kept"]).view(-1)
        shape = g.shape
        rows = (0, shape[0]) if len(shape) >= 2 else None
        return self._block(g, state, group, shape, rows, None).view(shape)

    # ---- the chunked step: blocks of whole leading indices ----

    def chunk_align(self, shape, group, state):
        if len(shape) < 2:
            return 1  # element-wise
        return max(1, math.prod(shape[1:]))  # whole rows (whole leading indices; an empty tensor: any)

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        if len(shape) >= 2:
            per = max(1, math.prod(shape[1:]))
            rows = (start // per, stop // per)
        else:
            rows = None
        view = ChunkState(state, start, stop, {"shape": shape, "rows": rows, "kept": ctx["kept"] if ctx else None,
                                               "parent": state})
        if "acc" in state:
            view["acc"] = state["acc"].view(-1)[start:stop]
        if "momentum" in state:
            view["momentum"] = state["momentum"].view(-1)[start:stop]
        return view

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized, reduce=None):
        """The running maxima of the dimensions ``i >= 1`` (one flat zeroed buffer: ``nu >= 0``) when a tensor of
        ``p >= 2`` dimensions is stepped in more than one block: every block reads those accumulators' old
        values (line 6), so their new ones (line 8) are kept aside and written by :meth:`finish_chunks`.
        ``None`` for a vector (element-wise) or a single block (written in place) of an unsharded tensor.

        ``reduce`` (an FSDP2 shard of rows, :class:`~lowmem.optim.sharded.ShardReduce`): ``acc_0`` holds the
        shard's rows (local); the maxima of the other dimensions are maxima over every shard's rows, one
        all-reduce (max) in :meth:`finish_chunks`, of the kept buffer or, for a shard stepped in one block, of
        the accumulators written with the shard's own maxima (an empty shard's zeroed first: it holds no
        coordinate of any set)."""
        if len(shape) < 2:
            return None
        if [tuple(b) for b in bounds] in ([], [(0, math.prod(shape))]):
            if reduce is None:
                return None
            if not bounds:
                for i in range(1, len(shape)):
                    state[f"acc_{i}"].zero_()
            return {"kept": None, "reduce": reduce, "dims": len(shape)}
        acc = state["acc_0"]
        flat = torch.zeros(sum(shape[1:]), dtype=_compute(acc.dtype), device=acc.device)
        kept, at = {}, 0
        for i in range(1, len(shape)):
            kept[i], at = flat[at:at + shape[i]], at + shape[i]
        return {"kept": kept, "flat": flat, "reduce": reduce}

    def finish_chunks(self, state, ctx):
        """Line 8 of the dimensions ``i >= 1`` after the last block: the kept maxima written (all-reduced first
        for a shard)."""
        if ctx is None:
            return
        reduce = ctx["reduce"]
        if ctx["kept"] is None:  # a shard in one block: its accumulators hold the shard's maxima
            for i in range(1, ctx["dims"]):
                reduce.max_(state[f"acc_{i}"])
            return
        if reduce is not None:
            reduce.max_(ctx["flat"])
        for i, top in ctx["kept"].items():
            state[f"acc_{i}"].copy_(top)

    sharded_stats = True  # (prepare_chunks takes reduce=: the maxima of the dimensions i >= 1 over the shards)
    #: checkpoints of an FSDP2 shard: ``acc_0`` one number per row (sharded like the rows); the other
    #: dimensions' accumulators are equal on every rank (:meth:`replicated_state`)
    reduced_dims = {"acc_0": "rows"}

    def replicated_state(self, key, group):
        return key.startswith("acc_") and key != "acc_0"

    # ---- what a step allocates ----

    @staticmethod
    def _elem(state) -> int:
        """Bytes per element of the compute dtype (8 for a float64 state, else 4)."""
        for k in ("acc", "acc_0"):
            if k in state:
                return 8 if state[k].dtype == torch.float64 else 4
        return 4

    def _block_bytes(self, numel, shape, state) -> int:
        """:meth:`_block` of ``numel`` elements, exact: ``nu`` (the direction), beside the largest cover maxima
        of the block (a matrix's) or, with a low-precision momentum, its compute copy."""
        if numel == 0:  # (an empty tensor: nothing stepped)
            return 0
        e = self._elem(state)
        m = state.get("momentum")
        low_m = m is not None and m.dtype not in (torch.float32, torch.float64)
        extra = e * numel if low_m else 0
        if len(shape) >= 2:
            rows = numel // max(1, math.prod(shape[1:]))
            extra = max(extra, e * max([rows, *shape[1:]]))
        return e * numel + extra

    def transient_bytes(self, numel, shape, group, state):
        """The whole-tensor step (:meth:`direction`): :meth:`_block_bytes` of the whole tensor."""
        return self._block_bytes(numel, shape, state)

    def chunk_transient_bytes(self, numel, shape, group, state):
        """A chunk of ``numel`` elements: :meth:`_block_bytes`, beside the running maxima of the dimensions
        ``i >= 1`` (:meth:`prepare_chunks`) when the tensor takes more than one block."""
        out = self._block_bytes(numel, shape, state)
        if len(shape) >= 2 and numel < math.prod(shape):
            out += self._elem(state) * sum(shape[1:])
        return out


    # ---- the multi-tensor step (float32 parameters and state; the engine's foreach buckets) ----

    #: the state dtypes :meth:`foreach_step_` takes (the engine's bucket gate, ``LowMemOptimizer._foreach_ok``, is
    #: to read it; until then it buckets float32 state only: FOUND_SMALLS16 3)
    foreach_state_dtypes = (torch.float32, torch.bfloat16)

    def supports_foreach_for(self, shape, group, state):
        """Float32 or bfloat16 state (``state_dtype`` ``"float32"`` / ``"bfloat16"``, or ``"param"`` of the float32
        parameters the engine buckets), not in an FSDP2 group (the column maxima need the shards': the
        per-parameter step reduces them). A bfloat16 state is computed in float32 as the per-parameter step
        computes it (:meth:`_group_direction`), bit for bit."""
        return group.get("state_dtype", "float32") in ("float32", "bfloat16", "param") and not sharded_group(group)

    def steps_pieces_whole(self, shape, group, state):
        """Always: a tensor larger than ``chunk_numel`` is stepped from its first piece with the per-parameter
        chunked step (:func:`~lowmem.optim.moments.step_whole_from_piece_`)."""
        return True

    def foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """A bucket's step: tensors of one shape stacked (:func:`~lowmem.optim.functional.adafactor.stack_groups`,
        as Adafactor's and CAME's buckets), lines 6-8 and the momentum once on each stack
        (:meth:`_group_direction`: the cover maxima per stacked tensor), the state written back, then the decay and
        the update per tensor (``torch._foreach_*``); equal bit for bit to the per-parameter step. A tensor larger
        than ``chunk_numel`` arrives in flat pieces and is stepped from its first one."""
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
        for idx in stack_groups(gs, [2 if "acc_0" in st else 1 for st in ss]):
            d = self._group_direction([gs[i] for i in idx], [ss[i] for i in idx], group)
            group_ps = [ps[i] for i in idx]
            if wd != 0:
                torch._foreach_mul_(group_ps, 1.0 - lr * wd)
            torch._foreach_add_(group_ps, list(d.unbind(0)), alpha=-lr)
            del d

    #: bfloat16 parameters join the multi-tensor buckets (the engine's ``_step_bf16_bucket``; whole tensors only, as
    #: this rule is not ``pieces_elementwise``) with a state of these dtypes, computed in float32 as :meth:`direction`
    bf16_bucket_state_dtypes = (torch.float32, torch.bfloat16)

    def bf16_bucket_direction(self, g32s, states, group, t, lr):
        """:meth:`direction` of a bucket of whole bfloat16 parameters: the gradients' float32 copies ``g32s`` grouped
        as :meth:`foreach_step_` groups float32 gradients (:func:`~lowmem.optim.functional.adafactor.stack_groups`),
        lines 6-8 and the momentum once per group (:meth:`_group_direction`, bit for bit the per-parameter step's),
        each group's copies freed once its directions are made (``g32s`` is emptied). Returns the float32
        directions (views of their group's stack); allocates :meth:`bf16_bucket_transient_bytes` at most."""
        ds: list = [None] * len(g32s)
        for idx in stack_groups(g32s, [2 if "acc_0" in st else 1 for st in states]):
            d = self._group_direction([g32s[i] for i in idx], [states[i] for i in idx], group)
            for i, x in zip(idx, d.unbind(0)):
                ds[i], g32s[i] = x, None
            del d
        g32s.clear()
        return ds

    def bf16_bucket_transient_bytes(self, numel, states, members=None, group=None):
        """What :meth:`bf16_bucket_direction` allocates at most for the bucket's ``members`` (``(elements, state)``)
        of ``numel`` elements: the gradients' float32 copies and the directions made so far (together 4 B per
        element: a group's copies are freed as its directions are made) beside one group's
        :meth:`_group_bytes` (:meth:`foreach_bucket_transient_bytes`, grouped as the float32 buckets)."""
        if members is None:  # (the groups' sizes need each member's elements: a state is empty before its first step)
            raise TypeError("Sm3Moments.bf16_bucket_transient_bytes needs members=, the bucket's (elements, state)")
        return 4 * numel + self.foreach_bucket_transient_bytes(numel, members)

    @staticmethod
    def _group_direction(grads, states, group):
        """Lines 6-8 and the momentum (without ``lr``) of ``k`` same-shape float32 tensors stacked along a new
        first dimension (a lone tensor: views, nothing stacked): the directions, a new ``(k, *shape)`` tensor."""
        momentum, beta2, eps = group["momentum"], group["beta2"], group["eps"]
        k, shape = len(grads), grads[0].shape

        def stacked(xs):
            return xs[0].unsqueeze(0) if k == 1 else torch.stack(xs)

        def write_back(xs, x):
            if k > 1:
                torch._foreach_copy_(xs, list(x.unbind(0)))

        g = stacked(grads)
        if g.numel() == 0:  # (empty tensors: no coordinate, no cover set changes)
            return torch.zeros_like(g)
        if "acc_0" in states[0]:  # one accumulator per slice of each dimension, per stacked tensor
            p = len(shape)
            accs = [[st[f"acc_{i}"] for st in states] for i in range(p)]
            covers = [stacked(a).view(k, *([1] * i), shape[i], *([1] * (p - 1 - i))) for i, a in enumerate(accs)]
            nu = sm3_nu(covers, g, beta2)  # line 6
            del covers
            for i, a in enumerate(accs):  # line 8
                top = sm3_cover_max(nu, i, lead=1)
                if k == 1:
                    a[0].copy_(top[0])
                else:
                    torch._foreach_copy_(a, list(top.unbind(0)))
                del top
        else:  # one cover per entry (vectors, scalars)
            accs = [st["acc"] for st in states]
            nu = sm3_nu([stacked(accs)], g, beta2)
            if k > 1:
                write_back(accs, nu)
            else:
                accs[0].copy_(nu[0])
        u = sm3_precondition_(nu, g, eps)  # line 7 (without lr)
        del g
        if momentum > 0:
            ms = [st["momentum"] for st in states]
            if ms[0].dtype == u.dtype:
                m = stacked(ms)
                sm3_momentum_(m, u, momentum)
                write_back(ms, m)
            else:  # a bfloat16 momentum: updated in a float32 copy, rounded into the state, the copy the direction
                # (as _block's m32); the copy is filled tensor by tensor (no bfloat16 stack beside it)
                m = torch.empty(u.shape, dtype=u.dtype, device=u.device)
                torch._foreach_copy_(list(m.unbind(0)), ms)
                sm3_momentum_(m, u, momentum)
                torch._foreach_copy_(ms, list(m.unbind(0)))
            u.copy_(m)
            del m
        return u

    def foreach_transient_bytes(self, numel):
        """Without the states at hand: three float32 tensors of the bucket (the accumulators left out:
        :meth:`foreach_bucket_transient_bytes` counts them)."""
        return 12 * numel

    def foreach_bucket_transient_bytes(self, numel, members, group=None):
        """:meth:`foreach_step_` of a bucket whose ``members`` are ``(elements, state)``: its largest group's
        (:meth:`_group_bytes`; each group's temporaries are freed before the next one's), grouped as on the
        state's device (every same-shape set stacked off the CPU; both groupings on meta tensors: the larger)."""
        shapes = [(self._shape_of(st, n), st, n) for n, st in members]
        devices = {v.device for _, st in members for v in st.values() if isinstance(v, torch.Tensor) and v.dim()}
        device = next(iter(devices)) if len(devices) == 1 else None
        larges = (stacks_large(device),) if device is not None and device.type != "meta" else (False, True)
        out = 0
        for large in larges:
            cap = group_cap([n for _, _, n in shapes], large)
            groups: dict[tuple, list[int]] = {}
            for i, (shape, st, n) in enumerate(shapes):
                groups.setdefault((shape, "acc_0" in st) if large or n < STACK_NUMEL else (i,), []).append(i)
            for idx in groups.values():
                shape, st, n = shapes[idx[0]]
                per = max(1, cap // max(1, n))
                for a in range(0, len(idx), per):
                    out = max(out, self._group_bytes(shape, st, len(idx[a:a + per])))
        return out

    @staticmethod
    def _shape_of(state, n) -> tuple:
        """The tensor's shape from its state (the accumulators' sizes; ``(n,)`` before the state is made)."""
        if "acc_0" in state:
            return tuple(state[f"acc_{i}"].numel() for i in range(len(_DIM_KEYS)) if f"acc_{i}" in state)
        return tuple(state["acc"].shape) if "acc" in state else (n,)

    @staticmethod
    def _group_bytes(shape, state, k) -> int:
        """:meth:`_group_direction` of ``k`` float32 tensors of ``shape``, exact: a lone one the per-parameter
        step's (``nu``, beside one cover's maxima for a tensor of ``p >= 2`` dimensions or a bfloat16 momentum's
        float32 copy); a stack holds the stacked gradients and ``nu`` (``8 k n``) beside the stacked accumulators
        (``a k (n_1 + ... + n_p)``, a vector's ``a k n``; ``a`` the state's bytes per element: 4, bfloat16 2), then
        beside one dimension's float32 maxima (``4 k n_i``: above the bfloat16 stack for a wide dimension); with
        momentum the stacked (or float32 copy of the bfloat16) momentum beside ``nu`` once the gradients are freed,
        ``8 k n``."""
        n = math.prod(shape)
        dims = len(shape) >= 2 and "acc_0" in state
        if n == 0:  # (empty tensors: nothing stepped)
            return 0
        acc = state.get("acc_0", state.get("acc"))
        a = acc.element_size() if isinstance(acc, torch.Tensor) and acc.dtype == torch.bfloat16 else 4
        m = state.get("momentum")
        low_m = isinstance(m, torch.Tensor) and m.dtype == torch.bfloat16
        if k == 1:
            return 4 * n + max(4 * max(shape) if dims else 0, 4 * n if low_m else 0)
        first = 8 * k * n + max(a * k * (sum(shape) if dims else n), 4 * k * max(shape) if dims else 0)
        return max(first, 8 * k * n if "momentum" in state else 0)


SM3_RECIPE = Recipe(
    name="sm3",
    summary="SM3-II: Adagrad bounded by one accumulator per row and per column (per slice of each dimension)",
    reference="Anil, Gupta, Koren, Singer 2019, Memory-Efficient Adaptive Optimization (NeurIPS), Algorithm 2 (SM3-II)",
    moment=Sm3Moments(),
    hparams=(
        LR(0.1),
        HParam("momentum", 0.0, in_unit_interval, "a float with 0 <= momentum < 1",
               "momentum of the preconditioned gradient (0: none, no momentum state)"),
        HParam("beta2", 1.0, _beta2, "a float with 0 <= beta2 <= 1",
               "1: the paper's sums of squares; < 1: nu = beta2 min(mu) + (1 - beta2) g^2 (moving averages)"),
        HParam("eps", 1e-30, positive, "a finite float > 0", "added to nu inside the square root"),
        WEIGHT_DECAY(0.0),
    ),
    validate_group=_check_group,
)


class SM3(LowMemOptimizer):
    """SM3-II (Anil et al., NeurIPS 2019) on the lowmem engine, ``pytorch_optimizer.SM3``'s signature where the
    two agree (``beta2`` is the authors' TF ``beta2``: pytorch_optimizer's ``beta`` is ``1 - beta2`` at 0 only).

    Each step, for a tensor of ``p >= 2`` dimensions with one accumulator per slice of each dimension:
    ``nu = min(mu_0[i], mu_1[j], ...) + g^2``; ``mu_k <- max of nu over each slice``; ``u = g / sqrt(nu + eps)``;
    ``m <- momentum m + (1 - momentum) u`` (``momentum > 0``); ``p <- p (1 - lr wd) - lr m`` (or ``u``).
    Vectors and scalars: one accumulator per entry (Adagrad).

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `0.1`): Learning rate (pytorch_optimizer's default; Adagrad-like steps shrink
            as the sums grow).
        momentum (`float`, defaults to `0.0`): Momentum of the preconditioned gradient, in [0, 1); > 0 keeps a
            full momentum (4 B per element).
        beta2 (`float`, defaults to `1.0`): 1: sums of squares (the paper); < 1: the moving-average form.
        eps (`float`, defaults to `1e-30`): Added to ``nu`` inside the square root; > 0.
        weight_decay (`float`, defaults to `0.0`): Decoupled, ``p *= 1 - lr * wd`` before the update.
        state_dtype (`str`, defaults to `"float32"`): Storage of the accumulators and momentum (`"float32"`,
            `"bfloat16"`, or `"param"`, the parameter's dtype: refused for float16 parameters, whose accumulators of
            squared gradients would overflow).
        foreach (`bool` or `None`, defaults to `None`): `None` steps float32 parameters with float32 state in
            multi-tensor buckets (same-shape tensors stacked; equal bit for bit to the per-parameter step); `False`
            forces the per-parameter step.
    """

    recipe = SM3_RECIPE

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.0, beta2: float = 1.0,
                 eps: float = 1e-30, weight_decay: float = 0.0, *, state_dtype: str = "float32",
                 foreach: bool | None = None):
        super().__init__(params, lr=lr, momentum=momentum, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         state_dtype=state_dtype, foreach=foreach)


register(SM3_RECIPE, SM3, state_precision="fp32", second_moment="factored",
         second_moment_words="row/column max accumulators, not per element", example_hparams={"lr": 1e-2})

__all__ = ["SM3", "SM3_RECIPE", "Sm3Moments"]
