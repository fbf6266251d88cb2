"""Stabilizer seam: transforms applied to the raw gradient before any projection or moment rule.

A :class:`Stabilizer` may clip or normalize the gradient, reset moments (through the moment
rule's :meth:`~lowmem.optim.moments.MomentRule.reset`) and scale the learning rate (warm-up after
a reset). Like every component it holds configuration only; its tensors live in ``state[p]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .functional import spam as S
from .hparams import HParam, in_unit_interval, nonneg, optional, positive_int
from .moments import MomentRule, grad_element_bytes, sharded_group


class Stabilizer:
    state_keys: tuple[str, ...] = ()

    def init_state(self, state: dict[str, Tensor], param: Tensor, group: dict[str, Any]) -> None:
        pass

    def transform(
        self, g: Tensor, state: dict[str, Tensor], group: dict[str, Any], t: int, moment: MomentRule
    ) -> Tensor:
        """Return the transformed gradient. Must not modify ``g`` in place (it may be ``p.grad``)."""
        return g

    def lr_scale(self, state: dict[str, Tensor], group: dict[str, Any], t: int) -> float:
        return 1.0

    # ---- the chunked step (see LowMemOptimizer.chunk_numel) ----

    chunkable: bool = False  # True if prepare/transform_chunk implement transform in chunks

    def prepare(self, g: Tensor, state: dict[str, Tensor], group: dict[str, Any], t: int, moment: MomentRule,
                bounds: list[tuple[int, int]], reduce: Any = None) -> Any:
        """Per-tensor work before the chunks (moment resets, statistics of the whole gradient
        ``g``, flat), computed chunk by chunk with no full-size temporary. Returns a context for
        :meth:`transform_chunk`. ``reduce``: for the local shard of a sharded (FSDP2) parameter, a
        :class:`~lowmem.optim.sharded.ShardReduce` whose ``sum_`` / ``max_`` turn a statistic of
        the shard into that of the whole tensor (``None``: ``g`` is the whole tensor)."""
        return None

    def transform_chunk(self, g: Tensor, state: dict[str, Tensor], group: dict[str, Any], t: int,
                        moment: MomentRule, ctx: Any) -> Tensor:
        """:meth:`transform` of the flat chunk ``g`` (``state`` is the chunk's view); out of place."""
        return g

    def transient_bytes(self, numel: int, group: dict[str, Any]) -> int:
        """Upper bound of the bytes :meth:`transform` (or one :meth:`transform_chunk`) allocates for
        ``numel`` elements, the transformed gradient included."""
        return 0

    def chunk_bytes(self, numel: int, group: dict[str, Any], bounds: list[tuple[int, int]],
                    device: torch.device) -> tuple[int, int]:
        """``(transient, kept)`` of the engine's chunked step in ``bounds`` for a chunk of ``numel`` elements:
        :meth:`transient` of :meth:`prepare` and one :meth:`transform_chunk` (the result included, the gradient
        chunk's float32 copy not: the engine's), and the bytes of :meth:`prepare`'s context alive through every
        chunk's step (the engine's ``_param_transient_bytes`` counts it beside the rule's direction too).
        Default: :meth:`transient_bytes` and nothing kept."""
        return self.transient_bytes(numel, group), 0

    # ---- the multi-tensor step (whole tensors of one foreach bucket) ----

    def transform_many(self, grads: list[Tensor], states: list[dict[str, Tensor]], group: dict[str, Any], t: int,
                       moment: MomentRule) -> list[Tensor]:
        """The transformed gradients of whole tensors of one group at one step ``t`` (a foreach bucket),
        as :meth:`prepare` and :meth:`transform_chunk` of each with one piece (the default loops over
        them). A stabilizer with per-tensor statistics overrides it to compute them for all tensors
        at once (issue 15: kernels per step that scale with the bucket's shapes, not its tensors).
        Out of place; returns tensors of the gradients' shapes."""
        out = []
        for g, state in zip(grads, states):
            ctx = self.prepare(g.view(-1), state, group, t, moment, [(0, g.numel())])
            out.append(self.transform_chunk(g, state, group, t, moment, ctx))
        return out

    def transform_many_transient_bytes(self, numel: int, group: dict[str, Any],
                                       dtype: torch.dtype = torch.float32) -> int:
        """Upper bound of the bytes :meth:`transform_many` allocates for tensors of ``numel`` elements
        in all of ``dtype``, the transformed gradients included (the default: one tensor's
        :meth:`transient_bytes` alive at a time, plus the transformed gradients, 4 bytes per element)."""
        return self.transient_bytes(numel, group) + 4 * numel


# ---- SPAM and Stable-SPAM (Huang et al. 2025) -------------------------------------------------


def _nonneg_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def RESET_INTERVAL(default: int) -> HParam:  # noqa: N802 - reads like the other HParam constants
    return HParam(
        "reset_interval", default, _nonneg_int, "an int >= 0", "momentum reset every this many steps (Delta T; 0 = never)"
    )

SPAM_HPARAMS = (
    HParam("threshold", 5000.0, lambda x: nonneg(x), "a finite float >= 0",
           "spike threshold theta: entries with g^2 > theta * v are clipped (0 = no clipping)"),
    RESET_INTERVAL(500),
    HParam("warmup_steps", 150, _nonneg_int, "an int >= 0", "cosine lr warm-up length after each momentum reset"),
    HParam("grad_accu_steps", 20, _nonneg_int, "an int >= 0",
           "steps of second-moment history (since start and since a reset) before clipping starts"),
)

STABLE_SPAM_HPARAMS = (
    HParam("gamma1", 0.7, in_unit_interval, "a float in [0, 1) (the authors' and pytorch_optimizer's -1, meaning beta1, is not taken: give betas[0] itself)",
           "EMA decay of the gradient norm (AdaGN)"),
    HParam("gamma2", 0.9, in_unit_interval, "a float in [0, 1)", "EMA decay of the squared gradient norm (AdaGN)"),
    HParam("theta", 0.999, in_unit_interval, "a float in [0, 1)", "EMA decay of the max |g| clipping bound (AdaClip)"),
    RESET_INTERVAL(1000),
    HParam("t_max", None, optional(positive_int), "None or an int > 0",
           "cosine decay of beta1 and gamma1 to half over t_max steps (the reference's option; None = off)"),
    HParam("stats_step", "global", lambda x: x in ("global", "since_reset"), "'global' or 'since_reset'",
           "step count of AdaClip's and AdaGN's bias corrections: the global step, or restarting with the "
           "moments at each reset as the authors' code does"),
)


def _second_moment(moment: MomentRule, state: dict[str, Tensor], g: Tensor, group: dict[str, Any]) -> Tensor:
    getter = getattr(moment, "second_moment", None)
    v = getter(state, g.shape, group) if getter is not None else state.get("exp_avg_sq")
    if v is None:
        raise ValueError(f"SPAM clipping needs a second moment 'exp_avg_sq'; {type(moment).__name__} keeps none")
    if v.shape != g.shape:
        raise ValueError(
            f"SPAM clipping needs the second moment in the gradient's shape {tuple(g.shape)}, got {tuple(v.shape)}"
            " (a projected recipe keeps it in the subspace)"
        )
    return v.float()


# ``(1 - beta2) g^2`` underflows float16 (smallest subnormal 2^-24, about 6e-8) for ``|g|`` below
# ``sqrt(6e-8 / (1 - beta2))``: 7.7e-3 at ``beta2 = 0.999``, the size of most LLM gradient entries.
def check_spam_state_dtype(group: dict[str, Any]) -> None:
    """Refuse SPAM's spike clipping over a second moment stored in float16 (``state_dtype="param"`` on float16
    parameters): ``v`` underflows to 0 for small gradients, every such entry then counts as a spike
    (``g^2 > threshold * 0``) and is clipped to 0, so ``v`` stays 0 and Adam's step ``m / (sqrt(v) + eps)`` divides
    the remaining momentum by ``eps``. Measured on the toy problem of the generic tests: loss 0.686 -> 4.08 in 6
    steps (pytorch_optimizer's SPAM, whose state is float16 there: 9.02); float32 or bfloat16 state: 0.27.

    Raises:
        ValueError: Naming ``state_dtype`` and the values that apply.
    """
    if group.get("threshold", 0) > 0 and group.get("state_dtype") == "param":
        half = [tuple(p.shape) for p in group["params"] if p.dtype == torch.float16]
        if half:
            raise ValueError(
                f"Invalid state_dtype='param' with float16 parameters {half[:3]}{' ...' if len(half) > 3 else ''}:"
                " SPAM's second moment would be stored in float16, where it underflows to 0 for |g| < ~7.7e-3"
                " (beta2 0.999), and the spike clipping then zeroes those gradients while Adam divides the momentum by"
                " eps (divergence); expected 'float32' or 'bfloat16' for float16 parameters"
                " (or threshold=0: no clipping)"
            )


class SPAMStabilizer(Stabilizer):
    """SPAM's stabilizers (Huang et al. 2025, Algorithm 1): momentum reset, spike-aware clipping, warm-up.

    Every ``reset_interval`` steps the moment rule's moments are zeroed before the update; once the
    second moment has ``grad_accu_steps`` steps of history, entries with ``g^2 > threshold * v``
    are clipped to ``sign(g) sqrt(threshold * v)``; after each reset the step size is warmed up
    over ``warmup_steps`` steps (cosine, from 1% to 100%). Bias corrections keep counting from
    the first step, as in the reference implementation.

    Group keys: ``threshold``, ``reset_interval``, ``warmup_steps``, ``grad_accu_steps``
    (:data:`SPAM_HPARAMS`).
    """

    def transform(self, g, state, group, t, moment):
        interval = group["reset_interval"]
        if S.is_reset_step(t, interval):
            moment.reset(state)
        if group["threshold"] > 0 and S.spam_clip_active(t, interval, group["grad_accu_steps"]):
            g = S.spike_clip(g, _second_moment(moment, state, g, group), group["threshold"])
        return g

    def lr_scale(self, state, group, t):
        return S.spam_warmup_scale(t, group["reset_interval"], group["warmup_steps"])

    chunkable = True

    def prepare(self, g, state, group, t, moment, bounds, reduce=None):  # element-wise: nothing to reduce
        interval = group["reset_interval"]
        if S.is_reset_step(t, interval):
            moment.reset(state)
        return group["threshold"] > 0 and S.spam_clip_active(t, interval, group["grad_accu_steps"])

    def transform_chunk(self, g, state, group, t, moment, ctx):
        if not ctx:
            return g
        return S.spike_clip(g, _second_moment(moment, state, g, group), group["threshold"])

    def transient_bytes(self, numel, group):
        """Spike clipping (:func:`~lowmem.optim.functional.spam.spike_clip`), exact on a float32 second moment:
        the bound ``sqrt(theta v)`` beside ``g^2``, ``theta v`` and their boolean mask, then beside the mask,
        ``sign(g)`` and ``sign(g) bound``, then the result: 13 bytes per element (the gradient chunk's float32
        copy is the engine's). A second moment that is not float32 (a low-precision ``state_dtype``) adds its
        float32 copy, 4 more, alive through the clip. (24, "6 float32 tensors, measured", before 2026-11-30:
        a traced 64 x 24 step in chunks of 600 holds 7,800 B, 13 per element.) A float64 gradient
        (:func:`~lowmem.optim.moments.grad_element_bytes`): ``g^2``, ``sign(g)``, ``sign(g) bound`` and the result
        are float64, 21 bytes per element, 25 with a float64 second moment's float32 copy (``v.float()``; before
        2026-11-30 counted 13: a float64 64 x 24 weight in chunks of 600, 7,800 B reported, 12,600 / 15,000 traced).
        The stabilizer is not told the second moment's dtype: it is read from the group's ``state_dtype`` and its
        parameters' dtypes (a copy counted where any parameter's moment is not float32)."""
        if group["threshold"] <= 0:
            return 0
        w = grad_element_bytes(group)
        choice = group.get("state_dtype", "float32")
        copy = choice != "float32" and (choice != "param" or any(
            getattr(p, "dtype", torch.float32) != torch.float32 for p in group.get("params", ())))
        return (5 + 2 * w + 4 * copy) * numel


#: Stable-SPAM's chunked step on the CPU: a chunk of at least this many elements whose own ``max|g|`` is
#: within AdaClip's bound has nothing to clip, so its element-wise AdaClip pass (``|g|``, a comparison,
#: ``g / max|g| * bound``, a ``where``: ~1.4 ms per 2^19 elements) is skipped: the same values, one
#: host read per such chunk and one per parameter. Only on the CPU, where reading a tensor waits for
#: nothing; on a device every chunk takes the clipping pass (no synchronisation). Smaller chunks keep
#: the pass: there a read costs about what it saves. Issue 15.
CLEAN_CHUNK_MIN = 2**16


def _checks_clean_chunks(g: Tensor, bounds: list[tuple[int, int]]) -> bool:
    return g.device.type == "cpu" and any(b - a >= CLEAN_CHUNK_MIN for a, b in bounds)


class StableSPAMStabilizer(Stabilizer):
    """Stable-SPAM's stabilizers (Huang et al. 2025, Algorithm 1): AdaClip, AdaGN, MoRet.

    Per parameter: clip entries above the bias-corrected running max of ``|g|`` (``theta``),
    rescale ``g`` to the running norm statistics (``gamma1``, ``gamma2``, ``group["eps"]``), and
    zero the moments every ``reset_interval`` steps. AdaClip's and AdaGN's bias corrections count
    the global step (``group["stats_step"] = "global"``, as pytorch-optimizer) or, with
    ``"since_reset"``, the step counter the authors' code shares with Adam's moments, which restarts
    at each reset (:func:`~lowmem.optim.functional.spam.stats_step`). Pair it with :class:`RestartBiasCorrection` so
    that the moments' bias correction restarts at each reset, as the reference does. With
    ``group["t_max"]`` set, AdaGN's ``gamma1`` is scaled by
    :func:`~lowmem.optim.functional.spam.cosine_beta1_scale` (and ``RestartBiasCorrection``
    scales ``beta1`` alike), as in the reference implementation.

    State: ``spam_clip_max``, ``spam_norm_m``, ``spam_norm_v`` (0-d float32 each).
    """

    state_keys = ("spam_clip_max", "spam_norm_m", "spam_norm_v")

    def init_state(self, state, param, group):
        for k in self.state_keys:
            state[k] = torch.zeros((), dtype=torch.float32, device=param.device)

    def transform(self, g, state, group, t, moment):
        if S.is_reset_step(t, group["reset_interval"]):
            moment.reset(state)
        t_stats = S.stats_step(t, group["reset_interval"]) if group.get("stats_step") == "since_reset" else t
        g = S.ada_clip(g, state["spam_clip_max"], group["theta"], t_stats)
        gamma1 = group["gamma1"] * S.cosine_beta1_scale(t, group.get("t_max"))
        return S.ada_gn(g, state["spam_norm_m"], state["spam_norm_v"], gamma1, group["gamma2"], t_stats, group["eps"])

    chunkable = True

    def prepare(self, g, state, group, t, moment, bounds, reduce=None):
        """MoRet, then AdaClip's and AdaGN's statistics from reductions over the chunks: ``max |g|``,
        then the norm of the clipped gradient (sum of the chunks' squared norms); over the shards
        too with ``reduce`` (a sharded parameter: one scalar all-reduce each). A clean chunk (see
        :data:`CLEAN_CHUNK_MIN`) enters the norm as it is: AdaClip would return its values unchanged."""
        if S.is_reset_step(t, group["reset_interval"]):
            moment.reset(state)
        t_stats = S.stats_step(t, group["reset_interval"]) if group.get("stats_step") == "since_reset" else t
        check = _checks_clean_chunks(g, bounds)
        chunk_max = torch.empty(len(bounds), dtype=torch.float32) if check else None
        # accumulate in place: small tensors kept alive between chunk-sized temporaries would pin
        # glibc's heap and make it grow chunk by chunk (measured: +256 MiB on an 8192 x 8192 weight)
        g_max = torch.zeros((), dtype=torch.float32, device=g.device)
        for i, (a, b) in enumerate(bounds):
            # max |g| is exact in g's dtype (then rounded to float32, as before)
            m = S.abs_max(g[a:b]).float()
            torch.maximum(g_max, m, out=g_max)
            if chunk_max is not None:
                chunk_max[i] = m
        if reduce is not None:
            reduce.max_(g_max)
        bound = S.ada_clip_bound_(state["spam_clip_max"], g_max, group["theta"], t_stats)
        # one host read per parameter, on the CPU only (no device to wait for): which chunks are clean
        clean = (chunk_max <= bound).tolist() if chunk_max is not None else [False] * len(bounds)

        def clipped(i: int, x: Tensor) -> Tensor:
            return x if clean[i] else S.ada_clip_apply(x, g_max, bound)

        if len(bounds) == 1 and reduce is None:
            norm = torch.linalg.vector_norm(clipped(0, g.float()))
        else:
            sq = torch.zeros((), dtype=torch.float32, device=g.device)
            for i, (a, b) in enumerate(bounds):
                sq.add_(torch.linalg.vector_norm(clipped(i, g[a:b].float())).square_())
            if reduce is not None:
                reduce.sum_(sq)  # the squared norms of the other shards
            norm = sq.sqrt_()
        gamma1 = group["gamma1"] * S.cosine_beta1_scale(t, group.get("t_max"))
        scale = S.ada_gn_scale_(norm, state["spam_norm_m"], state["spam_norm_v"], gamma1, group["gamma2"], t_stats,
                                group["eps"], torch.finfo(torch.float32).tiny)
        return g_max, bound, scale, check

    def transform_chunk(self, g, state, group, t, moment, ctx):
        """AdaClip with the whole tensor's ``max|g|`` and bound, then AdaGN's factor. A clean chunk
        (:data:`CLEAN_CHUNK_MIN`; its own ``max|g|`` read on the CPU) is only scaled: ``g * scale`` is
        bit for bit what clipping that returns every value unchanged, then scaling, gives."""
        g_max, bound, scale, check = ctx
        if check and g.numel() >= CLEAN_CHUNK_MIN and bool(S.abs_max(g) <= bound):
            return g * scale
        return S.ada_clip_apply(g, g_max, bound).mul_(scale)

    def transient_bytes(self, numel, group):
        """AdaClip's result (``|g|``, then ``g / max|g| * bound`` and the ``where``, all written into
        it) and its boolean mask, plus a float32 copy of a low-precision gradient chunk in
        :meth:`prepare`'s norm pass: 4 + 1 + 4 bytes per element at most (the AdaGN scaling is in
        place on the result in a chunk; the whole-tensor step holds the clipped and the scaled
        gradient, 8). It was 16 (four float32 temporaries) before issue 15's in-place AdaClip."""
        return 9 * numel

    def chunk_bytes(self, numel, group, bounds, device):
        """The chunked step, exact: :meth:`prepare`'s norm pass or a chunk's AdaClip, ``|g|`` written into the
        result and its boolean mask (5 bytes per element; a low-precision chunk's float32 copy is the engine's)
        beside the 0-d statistics (the running ``max|g|``, a chunk's, the bound, the squared norms' sum and a
        chunk's norm: 16 B at most) and, on the CPU with chunks of :data:`CLEAN_CHUNK_MIN` or more, every
        chunk's ``max|g|`` (4 B each); kept through the chunks: ``max|g|``, the bound and AdaGN's factor (12)."""
        maxima = 4 * len(bounds) if device.type == "cpu" and any(b - a >= CLEAN_CHUNK_MIN for a, b in bounds) else 0
        # a float64 gradient (moments.grad_element_bytes): the chunk's AdaClip result in float64 (|g|: 9 bytes per
        # element with the mask), and the norm pass's float32 copy (g[a:b].float()) beside its float32 AdaClip (4 + 5);
        # before 2026-11-30 counted 5: a float64 64 x 24 weight in chunks of 600, 4,812 B reported, 7,212 traced
        return (grad_element_bytes(group) + 1) * numel + 16 + maxima, 12


    def transform_many(self, grads, states, group, t, moment):
        """AdaClip and AdaGN of whole tensors at once (issue 15), the tensors of one size stacked into a
        ``k x n`` matrix: ``max|g|`` of every row from one ``aminmax``; the per-tensor scalars
        (``spam_clip_max``, ``spam_norm_m``, ``spam_norm_v``) of all the tensors gathered into vectors
        by one ``stack``, updated by :func:`~lowmem.optim.functional.spam.ada_clip_bound_` and
        :func:`~lowmem.optim.functional.spam.ada_gn_scale_` (element-wise, so the same functions) once
        for all sizes and written back with one ``_foreach_copy_``; the clipping
        (:func:`~lowmem.optim.functional.spam.ada_clip_apply`'s operations, row ``i`` with its own
        ``max|g|`` and bound), each row's norm and the scaling on each stack. About 11 kernels per size
        and 23 per call, whatever the number of tensors. Equal to :meth:`prepare` and
        :meth:`transform_chunk` of each tensor in one piece up to float32 rounding (each row's norm
        sums in another order; the clipping is bit for bit; tested). Used by the engine off the CPU.

        Float32 gradients (the engine's buckets); others (and empty tensors) per tensor, as the default.
        Transient: :meth:`transform_many_transient_bytes` (measured in tests/test_stable_spam_many.py)."""
        if S.is_reset_step(t, group["reset_interval"]):
            for state in states:
                moment.reset(state)
        t_stats = S.stats_step(t, group["reset_interval"]) if group.get("stats_step") == "since_reset" else t
        gamma1 = group["gamma1"] * S.cosine_beta1_scale(t, group.get("t_max"))
        tiny = torch.finfo(torch.float32).tiny
        out: list[Tensor | None] = [None] * len(grads)
        by_kind: dict[tuple, list[int]] = {}
        for i, g in enumerate(grads):
            by_kind.setdefault((g.numel(), g.dtype, g.device), []).append(i)
        kinds, stacks, maxima = [], [], []
        for (numel, dtype, _), idx in by_kind.items():
            if dtype != torch.float32 or numel == 0:  # (the engine's buckets are float32) per tensor
                for i, g in zip(idx, Stabilizer.transform_many(self, [grads[i] for i in idx],
                                                               [states[i] for i in idx], group, t, _NoReset())):
                    out[i] = g
                continue
            stack = torch.stack([grads[i].reshape(-1) for i in idx])  # (k, n)
            lo, hi = torch.aminmax(stack, dim=1)
            maxima.append(torch.maximum(hi, lo.neg_()))  # S.abs_max of each row (exact)
            kinds.append(idx)
            stacks.append(stack)
            del stack, lo, hi
        if not kinds:
            return out
        # the scalars of every stacked tensor as vectors, in the order of ``kinds``: AdaClip's bound
        order = [i for idx in kinds for i in idx]
        g_max = torch.cat(maxima)
        scalars = [states[i][key] for i in order for key in self.state_keys]
        clip_max, norm_m, norm_v = torch.stack(scalars).view(len(order), 3).unbind(1)  # (strided views)
        bound = S.ada_clip_bound_(clip_max, g_max, group["theta"], t_stats)
        # each stack clipped (its rows with their own max|g| and bound), then freed; each row's norm
        clipped, norms, start = [], [], 0
        for j, idx in enumerate(kinds):
            rows = slice(start, start + len(idx))
            clipped.append(S.ada_clip_apply(stacks[j], g_max[rows, None], bound[rows, None]))
            stacks[j] = None
            norms.append(torch.linalg.vector_norm(clipped[-1], dim=1))
            start += len(idx)
        # AdaGN's factor of every tensor at once, the scalars written back, each stack scaled
        scale = S.ada_gn_scale_(torch.cat(norms), norm_m, norm_v, gamma1, group["gamma2"], t_stats, group["eps"], tiny)
        torch._foreach_copy_(scalars, [v for j in range(len(order)) for v in (clip_max[j], norm_m[j], norm_v[j])])
        start = 0
        for idx, c in zip(kinds, clipped):
            c.mul_(scale[start:start + len(idx), None])
            for j, i in enumerate(idx):
                out[i] = c[j].view(grads[i].shape)
            start += len(idx)
        return out

    def transform_many_transient_bytes(self, numel, group, dtype=torch.float32):
        """:meth:`transform_many` of float32 gradients (the engine's buckets): every stack (4 bytes per
        element), then per size its clipped copy (returned) and mask (5): at most 9 bytes per element
        (measured: exactly that with one size), and 4 KiB for the statistics' vectors (about 24 float32
        numbers per tensor). Other ``dtype``: taken one at a time, each its :meth:`transient_bytes` next
        to the results (13 at most)."""
        return 9 * numel + 4096 if dtype == torch.float32 else self.transient_bytes(numel, group) + 4 * numel


class _NoReset:
    """A moment rule whose :meth:`reset` does nothing: :meth:`StableSPAMStabilizer.transform_many` has
    reset the moments of every tensor already before it takes some of them one at a time."""

    @staticmethod
    def reset(state):
        pass


class RestartBiasCorrection(MomentRule):
    """Wrap a moment rule so its bias correction counts steps since the last momentum reset.

    With resets every ``group["reset_interval"]`` steps (Stable-SPAM's MoRet) the wrapped rule
    sees ``t' = t mod Delta T + 1`` after the first reset, so freshly zeroed moments are
    corrected as at the start of training. With ``group["t_max"]`` set, ``beta1`` is scaled by
    :func:`~lowmem.optim.functional.spam.cosine_beta1_scale` of the global step (Stable-SPAM's
    optional decay; the bias correction then uses the scaled ``beta1``, as the reference does).
    """

    def __init__(self, inner: MomentRule):
        self.inner = inner
        self.state_keys = inner.state_keys
        self.applies_lr = inner.applies_lr
        # the multi-tensor step: the inner rule's, at the restarted step count (a bucket shares t)
        self.foreach_decays_after = inner.foreach_decays_after
        self.foreach_step_lr = inner.foreach_step_lr
        # the chunked step's direction is the inner rule's (a new tensor for AdamW: the engine's
        # _param_transient_bytes then counts the parameter chunk's copy beside it alone)
        self.chunk_direction_is_new = inner.chunk_direction_is_new
        # its buckets are the inner rule's multi-tensor step: torch's fused AdamW kernel for AdamW (its 0-d step
        # count, the engine's _fused_step_bytes)
        self.foreach_uses_fused_kernel = getattr(inner, "foreach_counts_outside", False)

    def init_state(self, state, shape, group, param):
        self.inner.init_state(state, shape, group, param)

    def _restarted(self, group, t):
        """``(group, t')``: ``beta1`` scaled by the cosine decay when ``t_max`` is set, and the step
        count since the last reset."""
        if group.get("t_max") is not None:
            beta1, beta2 = group["betas"]
            group = {**group, "betas": (beta1 * S.cosine_beta1_scale(int(t), group["t_max"]), beta2)}
        return group, S.steps_since_reset(int(t), group["reset_interval"])

    def direction(self, g, state, group, t, lr):
        group, t = self._restarted(group, t)
        return self.inner.direction(g, state, group, t, lr)

    def supports_foreach_for(self, shape, group, state):
        """The inner rule's, but not in an FSDP2 (sharded) group: Stable-SPAM's stabilizer statistics
        (AdaGN's gradient norm, AdaClip's max) are all-reduced over the shards only by the
        per-parameter step."""
        return self.inner.supports_foreach_for(shape, group, state) and not sharded_group(group)

    def steps_pieces_whole(self, shape, group, state):
        return self.inner.steps_pieces_whole(shape, group, state)

    def foreach_step_(self, params, grads, states, group, t, lr, step_lr=None) -> None:
        """The inner rule's multi-tensor step with the restarted step count and the scaled ``beta1``
        (every tensor of a bucket is at the same step ``t``), as :meth:`direction` per tensor."""
        group, t = self._restarted(group, t)
        if step_lr is None:
            self.inner.foreach_step_(params, grads, states, group, t, lr)
        else:
            self.inner.foreach_step_(params, grads, states, group, t, lr, step_lr=step_lr)

    def foreach_transient_bytes(self, numel):
        return self.inner.foreach_transient_bytes(numel)

    def reset(self, state):
        self.inner.reset(state)

    def second_moment(self, state, shape, group):
        getter = getattr(self.inner, "second_moment", None)
        return getter(state, shape, group) if getter is not None else state.get("exp_avg_sq")

    def chunk_align(self, shape, group, state):
        return self.inner.chunk_align(shape, group, state)

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        return self.inner.chunk_state(state, start, stop, shape, group, ctx)

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized):
        return self.inner.prepare_chunks(state, shape, group, t, lr, bounds, stabilized)

    def finish_chunks(self, state, ctx):
        self.inner.finish_chunks(state, ctx)

    def transient_bytes(self, numel, shape, group, state):
        return self.inner.transient_bytes(numel, shape, group, state)
