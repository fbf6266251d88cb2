"""StableAdamW (Wortsman et al. 2023, Algorithm 2) on the engine: transformers' ``optim="stable_adamw"``.

AdamW whose decay rates are debiased (Adafactor's ``beta_hat``, no bias correction after) and whose step size is
divided, per tensor, by ``max(1, RMS)`` of the update ``g^2 / max(v, eps^2)`` (math:
:mod:`lowmem.optim.functional.stable_adamw`). The clipped step size applies to the decoupled weight decay too.

The RMS is a whole-tensor statistic: the chunked step computes it in a pass over the chunks first
(:meth:`StableAdamWMoments.prepare_chunks`, ``v_t`` aside, nothing written), the whole-tensor step after the moments.
The step size is a 0-d tensor (the recipe's learning-rate rule, :func:`clipped_lr`) that the rule multiplies in place
by ``1 / max(1, RMS)`` before the engine decays and steps with it: the clipped size reaches the decay and the update
without a host read (torch-optimi reads the RMS of every tensor). State: ``exp_avg`` and ``exp_avg_sq`` (8 B per
element, float32). On FSDP2 shards the RMS's sum is all-reduced over the shards (one 0-d all-reduce per tensor).

Multi-tensor buckets (issue 15; ``foreach`` not ``False``, not on FSDP2 shards): float32 weights, and bfloat16 ones as
float32 copies (``bf16_bucket_steps_copies``), are stepped a bucket at a time (:meth:`StableAdamWMoments.foreach_step_`):
each tensor's RMS sum is its own ``.sum()`` of ``g^2 / max(v_t, eps^2)`` with ``v_t`` aside (the per-tensor prepare
pass's values), the clip factors and step sizes one float64 tensor for the bucket, the moments and directions one
multi-tensor operation each, the decay and update with each tensor's step size; a tensor larger than ``chunk_numel``
is stepped whole from its first piece (the per-tensor chunked step). Bit for bit ``foreach=False``
(tests/test_foreach_classic.py); the whole-tensor step computes its RMS as a one-chunk prepare pass (since 2026-12-02;
before, from ``v_t`` in place: within float32 rounding).

torch-optimi's ``kahan_sum`` is the engine's ``kahan_summation`` (the same compensation, for bfloat16 weights), with
its default: not given, on for the groups of bfloat16 weights (:class:`StableAdamW`). Not here from torch-optimi:
``triton`` / ``gradient_release`` (layerwise mode: ``stable_adamw_layerwise``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from ..engine import LowMemOptimizer, Recipe
from ..functional import stable_adamw as FS
from ..functional import adam as FA
from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam, is_bool, kahan_sum_groups, optional, positive
from ..moments import ChunkState, MomentRule, sharded_group, state_dtype, step_whole_from_piece_
from ..registry import register
from ..sharded import kahan_default_load_hook


def _work(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _like(g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``g`` in the moments' compute dtype: a float64 gradient beside float32 moments is cast here only where the
    engine did not cast it (an FSDP2 shard's step; elsewhere ``computes_in_state_precision`` casts it once)."""
    return g if g.dtype == m.dtype else g.to(m.dtype)


class StableAdamWMoments(MomentRule):
    """Adam's moments with debiased rates; the step size (a tensor) clipped per tensor (see the module)."""

    state_keys = ("exp_avg", "exp_avg_sq")
    chunk_direction_is_new = True
    computes_in_state_precision = True  # (a float64 gradient with a float32 / bf16 state: cast once by the engine)

    def init_state(self, state, shape, group, param):
        dtype = state_dtype(group, param)
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=param.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=param.device)

    def chunk_align(self, shape, group, state):
        return 1

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        # (``parent`` / ``shape``: a bucket's piece is stepped whole from it, step_whole_from_piece_)
        view = ChunkState(state, start, stop, {"parent": state, "shape": shape, **({"clipped": True} if ctx is not None else {})})
        for k in self.state_keys:
            if k in state:
                view[k] = state[k].view(-1)[start:stop]
        return view

    @staticmethod
    def _rates(group: dict[str, Any], t: float) -> tuple[float, float]:
        beta1, beta2 = group["betas"]
        return FS.debiased_beta(beta1, t), FS.debiased_beta(beta2, t)

    sharded_stats = True  # (FSDP2: the RMS's sum all-reduced over the shards in prepare_chunks)

    def prepare_chunks(self, state, shape, group, t, lr, bounds, stabilized, reduce=None):
        """The pass over the chunks: ``RMS_t`` of the whole tensor (``v_t`` computed aside, nothing written; the sum
        all-reduced over the shards of an FSDP2 parameter, ``reduce``), and ``lr`` (:func:`clipped_lr`'s tensor)
        multiplied in place by ``1 / max(1, RMS_t)``, on the device (no host read)."""
        _, beta2_hat = self._rates(group, t)
        v = state["exp_avg_sq"]
        total = torch.zeros((), dtype=torch.float64 if v.dtype == torch.float64 else torch.float32, device=v.device)
        for start, stop in bounds:
            view = self.chunk_state(state, start, stop, shape, group)
            total.add_(FS.update_rms_sum(stabilized(start, stop, view), view["exp_avg_sq"], beta2_hat, group["eps"]))
        numel = math.prod(reduce.shape) if reduce is not None and reduce.shape is not None else (bounds[-1][1] if bounds else 0)
        if reduce is not None:
            reduce.sum_(total)
        lr.mul_(FS.clip_scale_(total, numel))
        return True

    def weight_decay_for(self, group, state):
        """``weight_decay`` (the engine multiplies it by the clipped ``lr``), divided by ``max_lr`` with
        ``decouple_lr`` (torch-optimi's fully decoupled decay, ``(eta_t / max_lr) wd``)."""
        wd = group.get("weight_decay", 0.0)
        return wd / group["max_lr"] if wd and group.get("decouple_lr") else wd

    def _widths(self, group, state) -> tuple[int, int]:
        """``(width, copies)`` per element: the moments' compute width (8 for float64 moments, else 4) and the
        float32 copies of bfloat16 moments (8, else 0)."""
        m = state.get("exp_avg")
        width = 8 if m is not None and m.dtype == torch.float64 else 4
        copies = 8 if m is not None and m.dtype not in (torch.float32, torch.float64) else 0
        return width, copies

    def _update_phase(self, n, group, state) -> int:
        """The decay and update after :meth:`direction` (the direction alive), both in place (``addcmul_`` with the
        0-d step size: :func:`~lowmem.optim.functional.adam.decoupled_weight_decay_`, ``apply_update_``): the
        direction beside the step size and, with a decay, ``lr wd`` (8 B each)."""
        width, _ = self._widths(group, state)
        return width * n + (16 if self.weight_decay_for(group, state) else 8)

    def transient_bytes(self, numel, shape, group, state):
        """The whole-tensor step, exact: the RMS (``g^2`` and ``v_t``, beside the float32 copies of bfloat16 moments
        and the 0-d step size and sum), then the moments and direction (freed copies), then the update
        (:meth:`_update_phase`)."""
        width, copies = self._widths(group, state)
        return max((2 * width + copies) * numel + 8 + width, self._update_phase(numel, group, state))

    def chunk_transient_bytes(self, numel, shape, group, state):
        """The chunked step with chunks of at most ``numel`` elements, exact: the prepare pass (a chunk's ``g^2`` and
        ``v_t`` beside the 0-d step size, total and chunk sum), a chunk's direction (the float32 copies of bfloat16
        moments and ``sqrt(v) + eps``), the update (:meth:`_update_phase`)."""
        width, copies = self._widths(group, state)
        return max(2 * width * numel + 8 + 2 * width, (copies + width) * numel + 8,
                   self._update_phase(numel, group, state))

    def direction_bytes(self, numel, shape, group, state):
        m = state.get("exp_avg")
        return (8 if m is not None and m.dtype == torch.float64 else 4) * numel

    def direction(self, g, state, group, t, lr):
        beta1_hat, beta2_hat = self._rates(group, t)
        m, v = _work(state["exp_avg"]), _work(state["exp_avg_sq"])
        g = _like(g, m)
        if not getattr(state, "extra", {}).get("clipped"):  # the whole tensor (no prepare pass): the RMS of v_t
            # (the prepare pass's one-chunk sum, v_t aside before the moments: the same bits as the chunked step and
            # the multi-tensor buckets, foreach_step_; before 2026-12-02 v_t's in place, within float32 rounding)
            lr.mul_(FS.clip_scale_(FS.update_rms_sum(g, v, beta2_hat, group["eps"]), g.numel()))
        FS.stable_adamw_moments_(m, v, g, beta1_hat, beta2_hat)
        d = FS.stable_adamw_direction(m, v, group["eps"])
        if m is not state["exp_avg"]:
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)
        return d


    # ---- the multi-tensor buckets (the engine's foreach path; issue 15) ----

    supports_foreach = True
    #: bfloat16 parameters join the buckets as float32 copies stepped by :meth:`foreach_step_` (the engine's
    #: ``_step_bf16_bucket``, then its write-back), with float32 or bfloat16 moments
    bf16_bucket_steps_copies = True
    bf16_bucket_state_dtypes = (torch.float32, torch.bfloat16)

    def supports_foreach_for(self, shape, group, state):
        """Not in an FSDP2 (sharded) group: the RMS of a shard is summed over every shard (:meth:`prepare_chunks`'s
        all-reduce), which the per-parameter step does."""
        return not sharded_group(group)

    def steps_pieces_whole(self, shape, group, state):
        """Always: the RMS spans the tensor, so a tensor in pieces is stepped from its first one in chunks of the
        piece's size (:func:`~lowmem.optim.moments.step_whole_from_piece_`: the per-tensor chunked step)."""
        return True

    def foreach_step_(self, params, grads, states, group, t, lr, lr_rule=None) -> None:
        """A bucket's whole step: each tensor's RMS sum from ``v_t`` aside (:func:`~lowmem.optim.functional.
        stable_adamw.update_rms_sums_foreach`: each its own ``.sum()``, as the per-tensor prepare pass), the clipped
        step sizes (:func:`~lowmem.optim.functional.stable_adamw.clip_lrs`, a float64 tensor), the moments and
        directions, then the decay and update with each tensor's step size (:func:`~lowmem.optim.functional.
        stable_adamw.step_foreach_`). ``lr_rule``: :func:`clipped_lr` (the recipe's, :attr:`foreach_lr_rule`; the
        rule computes the sizes itself). A tensor in pieces (larger than ``chunk_numel``) is stepped whole from its
        first piece. bfloat16 moments (a bucket of bfloat16 parameters' copies, :attr:`bf16_bucket_steps_copies`)
        are updated on float32 copies and stored rounded to nearest. Allocates :meth:`foreach_bucket_transient_bytes`."""
        self.foreach_prepare(params, grads, states, group, t, lr, lr_rule=lr_rule)()

    def foreach_prepare(self, params, grads, states, group, t, lr, lr_rule=None):
        """:meth:`foreach_step_` prepared ahead (the engine's ``_prepare_buckets``, before the step's device read): the
        members' split (pieces, whole tensors), the lists and element counts now; the kernels when the returned
        function is called (the same operations in the same order)."""
        if lr_rule is not None and lr_rule is not clipped_lr:
            raise ValueError(f"{type(self).__name__}.foreach_step_: no multi-tensor form of the lr rule {lr_rule!r}")
        firsts, whole = [], []
        for p, g, s in zip(params, grads, states):
            if not isinstance(s, ChunkState):
                whole.append((p, g, s))
            elif s.start == 0:  # (the other pieces: stepped with the first)
                firsts.append((p, g, s))
        ps, gs, ss = (list(x) for x in zip(*whole)) if whole else ([], [], [])
        del whole
        ms, vs = [s["exp_avg"] for s in ss], [s["exp_avg_sq"] for s in ss]
        low = {m.dtype for m in ms} | {v.dtype for v in vs}
        if low not in (set(), {torch.float32}, {torch.bfloat16}):
            raise ValueError(f"{type(self).__name__}.foreach_step_: the moments of one bucket are all float32 or all"
                             f" bfloat16, got {sorted(map(str, low))}")
        low = low == {torch.bfloat16}
        numels = [p.numel() for p in ps]

        def launch() -> None:
            for p, g, s in firsts:
                step_whole_from_piece_(self, p, g, s, group, t, clipped_lr(group, s.extra["parent"], p, t),
                                       decay_after=False)
            if not ps:
                return
            beta1_hat, beta2_hat = self._rates(group, t)
            m32s, v32s = (FA.float32_copies(ms), FA.float32_copies(vs)) if low else (ms, vs)
            lrs = FS.clip_lrs(FS.update_rms_sums_foreach(gs, v32s, beta2_hat, group["eps"]), numels, group["lr"])
            FS.stable_adamw_moments_foreach_(m32s, v32s, gs, beta1_hat, beta2_hat)
            ds = FS.stable_adamw_direction_foreach(m32s, v32s, group["eps"])
            if low:
                torch._foreach_copy_(ms, m32s)
                torch._foreach_copy_(vs, v32s)
            del m32s, v32s
            FS.step_foreach_(ps, ds, lrs, self.weight_decay_for(group, {}))

        return launch

    def foreach_bucket_transient_bytes(self, numel, members, group=None):
        """What :meth:`foreach_step_` allocates for a bucket of ``numel`` elements of whole tensors (a tensor in
        pieces is stepped alone from its first piece, its per-parameter transient counted by the engine), exact:
        ``g^2`` and ``v_t`` (8 B per element), then the directions beside their denominators (8 B) and the float64
        step sizes (8 B per tensor), with the float32 copies of bfloat16 moments (8 B per element) through both
        phases; then, the copies freed, the directions (4 B per element) and the step sizes beside the decay's
        coefficients (16 B per tensor): the decay and the update are in place (``addcmul_``). (The clip factors'
        phase, 12 B per tensor beside the copies, is less.)"""
        whole = [(n, st) for n, st in members if not isinstance(st, ChunkState)]
        k = len(whole)
        n = sum(n for n, _ in whole) if members else numel
        low = any(st["exp_avg"].dtype == torch.bfloat16 for _, st in whole if "exp_avg" in st)
        wd = group is not None and self.weight_decay_for(group, {}) != 0
        return max((16 if low else 8) * n + 8 * k, 4 * n + (16 if wd else 8) * k)



def clipped_lr(group: dict[str, Any], state: dict[str, torch.Tensor], p32: torch.Tensor, t: float,
               reduce: Any = None) -> torch.Tensor:
    """The step's learning rate as a new 0-d float64 tensor on the parameter's device, which
    :class:`StableAdamWMoments` multiplies in place by ``1 / max(1, RMS_t)`` before the engine decays and steps with
    it (``eta_t`` of Algorithm 2, lines 9-10: the decay and the update take the clipped size; no host read).
    ``reduce`` (an FSDP2 shard's, :mod:`lowmem.optim.sharded`): unused, the rule reduces the RMS itself."""
    return torch.full((), float(group["lr"]), dtype=torch.float64, device=p32.device)


# the engine's chunked step of a low-precision parameter may evaluate it per chunk: it reads no parameter (FIXMEM21;
# engine._chunk_bounds, _chunked_lr)
clipped_lr.takes_p_rms = True
clipped_lr.reads_param = lambda group: False

# the multi-tensor buckets evaluate the lr rule themselves (the clip factors of a bucket at once); bfloat16 parameters'
# copies take the same step (bf16_bucket_steps_copies)
StableAdamWMoments.foreach_lr_rule = staticmethod(clipped_lr)
StableAdamWMoments.bf16_bucket_lr_rule = staticmethod(clipped_lr)


def _check(group: dict[str, Any]) -> None:
    if group["decouple_lr"] and group["max_lr"] is None:
        raise ValueError("stable_adamw: decouple_lr=True needs max_lr (the schedule's largest lr: the decay is "
                         "(lr / max_lr) * weight_decay); torch-optimi takes the constructor's lr, give it here")



STABLE_ADAMW = Recipe(
    name="stable_adamw",
    summary="StableAdamW: AdamW with debiased rates and per-tensor update clipping (torch-optimi's); 8 bytes/param",
    reference="Wortsman et al. 2023, Stable and low-precision training for large-scale vision-language models, Algorithm 2",
    moment=StableAdamWMoments(),
    lr_rule=clipped_lr,
    hparams=(LR(1e-3), BETAS((0.9, 0.99)), EPS(1e-6), WEIGHT_DECAY(1e-2),
             HParam("decouple_lr", False, is_bool, "True or False",
                    "fully decoupled decay, theta *= 1 - (eta_t / max_lr) wd (torch-optimi's)"),
             HParam("max_lr", None, optional(positive), "None or a float > 0",
                    "the schedule's largest lr, for decouple_lr")),
    validate_group=_check,
)


class StableAdamW(LowMemOptimizer):
    """StableAdamW (Wortsman et al. 2023) on the lowmem engine, after torch-optimi's ``StableAdamW`` (its defaults).

    ``beta_hat(b, t) = b (1 - b^(t-1)) / (1 - b^t)``; ``m, v`` EMAs with them; ``eta = lr / max(1, RMS(g^2 / max(v,
    eps^2)))`` per tensor; ``p <- p (1 - eta wd) - eta m / (sqrt(v) + eps)``. State: two moments (8 B per element).

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-3`): Learning rate (before the clipping).
        betas (`tuple[float, float]`, defaults to `(0.9, 0.99)`): Decay rates, debiased each step.
        eps (`float`, defaults to `1e-6`): Added to ``sqrt(v)``; ``eps^2`` floors ``v`` in the RMS.
        weight_decay (`float`, defaults to `1e-2`): Decoupled decay, scaled by the clipped step size.
        decouple_lr (`bool`, defaults to `False`): Fully decoupled decay, ``(eta / max_lr) * weight_decay``.
        max_lr (`float` or `None`, defaults to `None`): The schedule's largest lr (needed with ``decouple_lr``).
        state_dtype (`str`, defaults to `"float32"`), foreach (`bool` or `None`): the engine's.
        kahan_summation (`bool`): the engine's; not given, torch-optimi's ``kahan_sum=None``: on for the groups
            holding bfloat16 parameters (:func:`~lowmem.optim.hparams.kahan_sum_groups`; not beside
            ``bf16_stochastic_round=True``). bf16_stochastic_round (`bool`, defaults to `False`): the engine's.
    """

    recipe = STABLE_ADAMW

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-6, weight_decay: float = 1e-2, decouple_lr: bool = False, max_lr: float | None = None,
                 *, state_dtype: str = "float32", foreach: bool | None = None):
        given, decided = self.__dict__.get("_added_settings", {}), []  # (the engine settings given: __init_subclass__)
        if "kahan_summation" not in given:  # torch-optimi's default (kahan_sum=None): on for bfloat16 weights
            params, decided = kahan_sum_groups(params, "optimizer 'stable_adamw'", bool(given.get("bf16_stochastic_round")))
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple_lr=decouple_lr,
                         max_lr=max_lr, state_dtype=state_dtype, foreach=foreach)
        if decided:
            self.register_load_state_dict_pre_hook(kahan_default_load_hook(decided))


register(STABLE_ADAMW, StableAdamW, state_precision="fp32", second_moment="full", example_hparams={"lr": 1e-2})
