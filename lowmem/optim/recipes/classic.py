"""torch's classic optimizers on the engine: SGD (with momentum, dampening, Nesterov), Adagrad and RMSprop.

These are the ``optim`` names ``sgd``, ``adagrad`` and ``rmsprop`` of transformers' ``TrainingArguments``, which its
Trainer builds as ``torch.optim.SGD`` / ``Adagrad`` / ``RMSprop`` (``trainer_optimizer._get_sgd`` and friends: the
learning rate, and from ``optim_args`` only the keys each reads). Here each is one moment rule (math:
:mod:`lowmem.optim.functional.classic`), so it gets the engine's guarantees (chunked steps, exact ``state_bytes()``,
non-finite steps skipped, ``weights_only`` checkpoints, bfloat16 state, stochastic rounding) and equals the torch
class on float32 parameters (tests/test_reference.py, tests/test_newopt18_classic.py).

State per element (float32): SGD none, or the momentum buffer (4 B) with ``momentum > 0``; Adagrad the sum of
squares (4 B); RMSprop the mean square (4 B), plus the momentum buffer (``momentum > 0``) and the mean gradient
(``centered=True``), 4 B each.

**Weight decay.** torch's three classes add ``weight_decay * p`` to the gradient (L2, coupled) before their
statistics, and so do these rules: the engine hands each chunk's gradient and parameter to the rule's
``coupled_gradient`` hook before its direction (:func:`lowmem.optim.functional.classic.l2_gradient`, a new
tensor of the chunk: 4 B per element of transient, 8 for float64 statistics), and decays nothing decoupled
(``weight_decay_for`` is 0). For SGD without momentum the two forms are the same update (``p - lr (g + wd p) =
p (1 - lr wd) - lr g``), so ``sgd`` keeps the engine's decoupled decay there (no temporary).

**Multi-tensor buckets** (issue 15; ``foreach`` not ``False``): float32 weights with float32 state are stepped a bucket
at a time by the rule's ``foreach_step_`` (the coupled gradients, statistics and directions as one multi-tensor
operation each: :mod:`lowmem.optim.functional.classic`'s ``*_foreach`` forms), bfloat16 weights with float32 or
bfloat16 state by the engine's ``_step_bf16_bucket`` (the coupled decay into the gradients' float32 copies,
``bf16_bucket_couple_``); bit for bit the per-tensor step (``foreach=False``; tests/test_foreach_classic.py). A bucket's
transient (``foreach_bucket_transient_bytes``): Adagrad's and RMSprop's quotient beside its denominator, 8 B per element
(the per-tensor step divides into the denominator: 4), SGD's coupled gradient and Nesterov's sum, 4 B each.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..engine import LowMemOptimizer, Recipe
from ..functional import adam as FA
from ..functional import classic as FC
from ..hparams import LR, WEIGHT_DECAY, HParam, check_torch_flags, in_unit_interval, is_bool, nonneg
from ..moments import _COUNTED_GRAD_DTYPE, ChunkState, MomentRule, state_dtype
from ..quantized import apply_updates_foreach_
from ..registry import register


def _unit(x: Any) -> bool:
    """A real number in ``[0, 1]``."""
    return nonneg(x) and x <= 1


def _work(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision the step computes in: itself when float32 / float64, else a float32 copy."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _copies(state: dict[str, torch.Tensor], keys: tuple[str, ...]) -> int:
    """Bytes per element of the float32 copies of the low-precision (bfloat16) state tensors among ``keys``."""
    return sum(4 for k in keys if k in state and state[k].dtype not in (torch.float32, torch.float64))


def _like(g: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """``g`` in the statistics' compute dtype: a float64 gradient beside float32 statistics is cast here only where the
    engine did not cast it (an FSDP2 shard's step; elsewhere ``computes_in_state_precision`` casts it once)."""
    return g if g.dtype == work.dtype else g.to(work.dtype)


def _width(state: dict[str, torch.Tensor], key: str) -> int:
    """Bytes per element the rule computes in: 8 for a float64 ``state[key]``, else 4."""
    return 8 if key in state and state[key].dtype == torch.float64 else 4


class _Elementwise(MomentRule):
    """Element-wise rules: chunks of any size, state sliced by flat views."""

    computes_in_state_precision = True  # (a float64 gradient with a float32 / bf16 state: cast once by the engine)

    #: The state tensor whose dtype the rule computes in (and so the coupled gradient's: 8 B per element when float64).
    work_key = ""

    def chunk_align(self, shape, group, state):
        return 1

    def couples(self, group: dict[str, Any]) -> bool:
        """Whether the weight decay is torch's L2 form in the gradient (:meth:`coupled_gradient`): a positive
        ``weight_decay`` (SGD: with momentum, see :class:`MomentumSGDMoments`)."""
        return bool(group.get("weight_decay", 0.0))

    def coupled_gradient(self, g: torch.Tensor, p: torch.Tensor, group: dict[str, Any],
                         state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The engine's hook before :meth:`direction` (its chunked and whole steps): ``g + wd p`` of the chunk
        (:func:`~lowmem.optim.functional.classic.l2_gradient`) where :meth:`couples`, else ``g`` itself."""
        return FC.l2_gradient(g, p, group["weight_decay"]) if self.couples(group) else g

    def weight_decay_for(self, group, state):
        """No decoupled decay where the decay is coupled (:meth:`coupled_gradient`); else the group's."""
        return 0.0 if self.couples(group) else group.get("weight_decay", 0.0)

    def _coupled_bytes(self, numel: int, group: dict[str, Any], state: dict[str, torch.Tensor]) -> int:
        """The coupled gradient, alive through :meth:`direction` (a new tensor in the statistics' precision); none
        for a low-precision gradient (the count told so: :func:`~lowmem.optim.moments.counting_gradient`), whose
        float32 copy the engine counts and frees when the hook returns: the coupled gradient takes its place (its
        own phase, copy and result, 8 B per element, is within the engine's two copies)."""
        if not self.couples(group) or _COUNTED_GRAD_DTYPE.get() in (torch.bfloat16, torch.float16):
            return 0
        return _width(state, self.work_key) * numel

    def chunk_state(self, state, start, stop, shape, group, ctx=None):
        view = ChunkState(state, start, stop)
        for k in self.state_keys:
            if k in state:
                view[k] = state[k].view(-1)[start:stop]
        return view

    @staticmethod
    def _store(state: dict[str, torch.Tensor], works: dict[str, torch.Tensor]) -> None:
        """Low-precision state written back (rounded to nearest) from its float32 working copies."""
        for k, w in works.items():
            if w is not state[k]:
                state[k].copy_(w)

    # ---- the multi-tensor buckets (the engine's foreach path; issue 15) ----
    #
    # float32 parameters with float32 state: :meth:`foreach_step_` (the coupled gradients, the statistics, the
    # directions, the engine's decay and update, one multi-tensor operation each); bfloat16 parameters (pieces) with
    # float32 or bfloat16 state: the engine's ``_step_bf16_bucket``, whose gradients' float32 copies take the coupled
    # decay in place (:meth:`bf16_bucket_couple_`) before :meth:`bf16_bucket_direction`. The same operations in the same
    # order as the per-tensor step (``foreach=False``): equal bit for bit on the CPU (tests/test_foreach_classic.py).

    supports_foreach = True
    pieces_elementwise = True  # (element-wise: a tensor in pieces is stepped piece by piece with its buckets)
    bf16_bucket_state_dtypes = (torch.float32, torch.bfloat16)

    def _bucket_direction(self, gs: list[torch.Tensor], works: list[dict[str, torch.Tensor]], group: dict[str, Any],
                          t: float, owned: bool) -> list[torch.Tensor]:
        """:meth:`direction` of a bucket: float32 gradients ``gs`` (coupled already), the float32 state ``works``
        (the state itself, or float32 copies of bfloat16 state, updated in place); ``owned``: ``gs`` are the
        caller's own tensors (a quotient may overwrite them)."""
        raise NotImplementedError

    def _present(self, states: list[dict[str, torch.Tensor]], key: str) -> bool:
        """Whether every member's state holds ``key`` (or none does: a bucket is one layout)."""
        has = [key in s for s in states]
        if any(has) and not all(has):
            raise ValueError(f"{type(self).__name__}: a bucket whose members' states differ in {key!r} (a parameter"
                             " whose state was made under other settings); step it with foreach=False")
        return bool(has) and has[0]

    def foreach_step_(self, params, grads, states, group, t, lr) -> None:
        """The whole step of float32 tensors (pieces) with float32 state: torch's L2 decay (new tensors ``g + wd p``,
        :func:`~lowmem.optim.functional.classic.l2_gradient_foreach`) where :meth:`couples`, the statistics and
        directions (:meth:`_bucket_direction`), then the engine's decoupled decay (SGD without momentum) and
        ``p -= lr d`` (:func:`~lowmem.optim.quantized.apply_updates_foreach_`). Allocates
        :meth:`foreach_bucket_transient_bytes`."""
        self.foreach_prepare(params, grads, states, group, t, lr)()

    def foreach_prepare(self, params, grads, states, group, t, lr):
        """:meth:`foreach_step_` prepared ahead (the engine's ``_prepare_buckets``, before the step's device read): the
        lists of the state now, the kernels when the returned function is called (the same operations in the same
        order)."""
        works = [{k: s[k] for k in self.state_keys if k in s} for s in states]

        def launch() -> None:
            coupled = self.couples(group)
            gs = FC.l2_gradient_foreach(grads, params, group["weight_decay"]) if coupled else list(grads)
            ds = self._bucket_direction(gs, works, group, t, owned=coupled)
            del gs
            apply_updates_foreach_(params, ds, lr, self.weight_decay_for(group, {}), decay_after=False)

        return launch

    def bf16_bucket_couple_(self, g32s: list[torch.Tensor], ps: list[torch.Tensor], group: dict[str, Any]) -> None:
        """The engine's hook in ``_step_bf16_bucket`` before :meth:`bf16_bucket_direction`: torch's L2 decay into the
        gradients' float32 copies ``g32s`` in place where :meth:`couples` (``g + wd p`` of the bfloat16 ``ps``: the
        values of :meth:`coupled_gradient`'s new tensor, nothing allocated)."""
        if self.couples(group):
            FC.l2_gradient_foreach_(g32s, ps, group["weight_decay"])

    def bf16_bucket_direction(self, g32s, states, group, t, lr):
        """:meth:`direction` of a bucket of bfloat16 parameters (pieces): ``g32s`` the gradients' float32 copies
        (coupled already: :meth:`bf16_bucket_couple_`), emptied here; bfloat16 state updated on float32 copies and
        stored rounded to nearest (as :meth:`_store`), the directions the unrounded copies'. Returns the float32
        directions (a quotient in the gradients' copies); allocates :meth:`bf16_bucket_transient_bytes`."""
        keys = [k for k in self.state_keys if self._present(states, k)]
        dtypes = {states[i][k].dtype for k in keys for i in range(len(states))}
        if dtypes not in (set(), {torch.float32}, {torch.bfloat16}):
            raise ValueError(f"{type(self).__name__}.bf16_bucket_direction: the state of one bucket is all float32 or"
                             f" all bfloat16, got {sorted(map(str, dtypes))}")
        works = [{} for _ in states]
        for k in keys:
            xs = [s[k] for s in states]
            for w, x in zip(works, FA.float32_copies(xs) if dtypes == {torch.bfloat16} else xs):
                w[k] = x
        ds = self._bucket_direction(list(g32s), works, group, t, owned=True)
        g32s.clear()
        if dtypes == {torch.bfloat16}:
            for k in keys:
                torch._foreach_copy_([s[k] for s in states], [w[k] for w in works])
        return ds

    def _low_copies(self, numel: int, states) -> int:
        """The float32 copies of bfloat16 state in a bucket of ``numel`` elements: 4 B per element per key."""
        keys = {k for s in states for k in self.state_keys if k in s and s[k].dtype == torch.bfloat16}
        return 4 * numel * len(keys)


class MomentumSGDMoments(_Elementwise):
    """``torch.optim.SGD``'s step: the direction is the gradient (``momentum = 0``, no state), or the momentum
    buffer ``momentum_buffer`` (Nesterov: ``g + mu b``). Group keys: ``momentum``, ``dampening``, ``nesterov``."""

    state_keys = ("momentum_buffer",)
    work_key = "momentum_buffer"

    def couples(self, group):
        """Coupled only with momentum: without it ``p - lr (g + wd p)`` is the engine's decoupled step."""
        return bool(group.get("weight_decay", 0.0)) and group["momentum"] > 0

    def init_state(self, state, shape, group, param):
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros(shape, dtype=state_dtype(group, param), device=param.device)

    def transient_bytes(self, numel, shape, group, state):
        """Nothing without momentum (the direction is the gradient) or with a float32 / float64 buffer (the
        direction is the buffer); a bfloat16 buffer's float32 copy; Nesterov's ``g + mu b``."""
        if "momentum_buffer" not in state:
            return 0
        return ((_copies(state, self.state_keys) + (_width(state, "momentum_buffer") if group["nesterov"] else 0)) * numel
                + self._coupled_bytes(numel, group, state))

    def direction_bytes(self, numel, shape, group, state):
        return 0 if "momentum_buffer" not in state else _width(state, "momentum_buffer") * numel

    def direction(self, g, state, group, t, lr):
        if "momentum_buffer" not in state:
            return FC.sgd_direction(g, None, 0.0, False)
        mu = group["momentum"]
        works = {"momentum_buffer": _work(state["momentum_buffer"])}
        g = _like(g, works["momentum_buffer"])
        FC.sgd_momentum_(works["momentum_buffer"], g, mu, group["dampening"], first=t <= 1)
        d = FC.sgd_direction(g, works["momentum_buffer"], mu, group["nesterov"])
        self._store(state, works)
        return d

    def _bucket_direction(self, gs, works, group, t, owned):
        if not self._present(works, "momentum_buffer"):
            return FC.sgd_direction_foreach(gs, None, 0.0, False)
        mu, bufs = group["momentum"], [w["momentum_buffer"] for w in works]
        FC.sgd_momentum_foreach_(bufs, gs, mu, group["dampening"], first=t <= 1)
        return FC.sgd_direction_foreach(gs, bufs, mu, group["nesterov"])

    def foreach_bucket_transient_bytes(self, numel, members, group=None):
        """The coupled gradients (with momentum and decay) beside Nesterov's ``g + mu b``; nothing else (the
        direction is the gradient or the buffer)."""
        if group is None or group["momentum"] <= 0:
            return 0
        return 4 * numel * (int(self.couples(group)) + int(bool(group["nesterov"])))

    def bf16_bucket_transient_bytes(self, numel, states, members=None, group=None):
        """The gradients' float32 copies, a bfloat16 buffer's float32 copy and Nesterov's ``g + mu b``."""
        if group is None or group["momentum"] <= 0:
            return 4 * numel
        return 4 * numel * (1 + int(bool(group["nesterov"]))) + self._low_copies(numel, states)

    def bf16_bucket_direction_bytes(self, numel, states, group=None):
        """The directions kept beside the parameters' copies: the gradients' copies (no momentum), Nesterov's sums,
        a bfloat16 buffer's float32 copy; nothing for a float32 buffer (the direction is the buffer)."""
        if group is None or group["momentum"] <= 0 or group["nesterov"]:
            return 4 * numel
        return self._low_copies(numel, states)


class AdagradMoments(_Elementwise):
    """``torch.optim.Adagrad``'s step: the sum of squared gradients ``sum`` (starting at
    ``initial_accumulator_value``), the direction ``g / (sqrt(sum) + eps) / (1 + (t - 1) lr_decay)``."""

    state_keys = ("sum",)
    work_key = "sum"
    chunk_direction_is_new = True

    def init_state(self, state, shape, group, param):
        state["sum"] = torch.full(shape, float(group["initial_accumulator_value"]), dtype=state_dtype(group, param),
                                  device=param.device)

    def transient_bytes(self, numel, shape, group, state):
        """The direction (the denominator's buffer), and a bfloat16 sum's float32 copy."""
        return (_width(state, "sum") + _copies(state, self.state_keys)) * numel + self._coupled_bytes(numel, group, state)

    def direction_bytes(self, numel, shape, group, state):
        return _width(state, "sum") * numel

    def direction(self, g, state, group, t, lr):
        works = {"sum": _work(state["sum"])}
        g = _like(g, works["sum"])
        FC.adagrad_sum_(works["sum"], g)
        self._store(state, works)
        return FC.adagrad_direction(g, works["sum"], group["eps"], t, group["lr_decay"])

    def _bucket_direction(self, gs, works, group, t, owned):
        ss = [w["sum"] for w in works]
        FC.adagrad_sum_foreach_(ss, gs)
        return FC.adagrad_direction_foreach(gs, ss, group["eps"], t, group["lr_decay"], into_grads=owned)

    def foreach_bucket_transient_bytes(self, numel, members, group=None):
        """The denominators beside the quotients (new), or beside the coupled gradients that take the quotients."""
        return 8 * numel

    def bf16_bucket_transient_bytes(self, numel, states, members=None, group=None):
        """The gradients' float32 copies (they take the quotients), the denominators, a bfloat16 sum's copy."""
        return 8 * numel + self._low_copies(numel, states)

    def bf16_bucket_direction_bytes(self, numel, states, group=None):
        """The quotients, in the gradients' copies."""
        return 4 * numel


class RMSpropMoments(_Elementwise):
    """``torch.optim.RMSprop``'s step: the mean square ``square_avg``, with ``centered`` the mean gradient
    ``grad_avg``, with ``momentum > 0`` the buffer ``momentum_buffer``. Group keys: ``alpha``, ``eps``,
    ``momentum``, ``centered``."""

    state_keys = ("square_avg", "grad_avg", "momentum_buffer")
    work_key = "square_avg"
    chunk_direction_is_new = True  # (the quotient, or the buffer: neither holds the gradient chunk)

    def init_state(self, state, shape, group, param):
        dtype = state_dtype(group, param)
        state["square_avg"] = torch.zeros(shape, dtype=dtype, device=param.device)
        if group["centered"]:
            state["grad_avg"] = torch.zeros(shape, dtype=dtype, device=param.device)
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros(shape, dtype=dtype, device=param.device)

    def transient_bytes(self, numel, shape, group, state):
        """The denominator (the direction without momentum; freed once the buffer has it with), and the float32
        copies of bfloat16 state."""
        return ((_width(state, "square_avg") + _copies(state, self.state_keys)) * numel
                + self._coupled_bytes(numel, group, state))

    def direction_bytes(self, numel, shape, group, state):
        return _width(state, "square_avg") * numel

    def direction(self, g, state, group, t, lr):
        works = {k: _work(state[k]) for k in self.state_keys if k in state}
        g = _like(g, works["square_avg"])
        FC.rmsprop_moments_(works["square_avg"], works.get("grad_avg"), g, group["alpha"])
        d = FC.rmsprop_direction_(g, works["square_avg"], works.get("grad_avg"), works.get("momentum_buffer"),
                                  group["momentum"], group["eps"])
        self._store(state, works)
        return d

    def _bucket_direction(self, gs, works, group, t, owned):
        vs = [w["square_avg"] for w in works]
        cs = [w["grad_avg"] for w in works] if self._present(works, "grad_avg") else None
        bufs = [w["momentum_buffer"] for w in works] if self._present(works, "momentum_buffer") else None
        FC.rmsprop_moments_foreach_(vs, cs, gs, group["alpha"])
        return FC.rmsprop_direction_foreach_(gs, vs, cs, bufs, group["momentum"], group["eps"], into_grads=owned)

    def foreach_bucket_transient_bytes(self, numel, members, group=None):
        """The denominators beside the coupled gradients (with momentum the buffers take the step), or beside the
        quotients (new, or in the coupled gradients)."""
        if group is not None and group["momentum"] > 0:
            return 4 * numel * (1 + int(self.couples(group)))
        return 8 * numel

    def bf16_bucket_transient_bytes(self, numel, states, members=None, group=None):
        """The gradients' float32 copies, the denominators and the float32 copies of bfloat16 state."""
        return 8 * numel + self._low_copies(numel, states)

    def bf16_bucket_direction_bytes(self, numel, states, group=None):
        """The quotients (in the gradients' copies), or the buffers: their float32 copies (bfloat16), else nothing."""
        if group is not None and group["momentum"] > 0:
            return 4 * numel if any(s["momentum_buffer"].dtype == torch.bfloat16 for s in states
                                    if "momentum_buffer" in s) else 0
        return 4 * numel


def _check_sgd(group: dict[str, Any]) -> None:
    """torch's rule: Nesterov needs ``momentum > 0`` and ``dampening = 0``."""
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"sgd: nesterov=True requires momentum > 0 and dampening=0 (torch.optim.SGD's rule), got "
                         f"momentum={group['momentum']!r}, dampening={group['dampening']!r}")


_MOMENTUM = HParam("momentum", 0.0, in_unit_interval, "a float with 0 <= momentum < 1",
                   "momentum factor (0: none, no buffer)")
_NESTEROV = HParam("nesterov", False, is_bool, "True or False", "Nesterov momentum (needs momentum > 0, dampening 0)")

SGD = Recipe(
    name="sgd",
    summary="SGD with optional momentum / dampening / Nesterov (torch.optim.SGD); 0 or 4 bytes/param",
    reference="Robbins & Monro 1951; Polyak 1964 (momentum); Sutskever et al. 2013, Eq. 1-2 (Nesterov)",
    moment=MomentumSGDMoments(),
    hparams=(LR(1e-3), _MOMENTUM,
             HParam("dampening", 0.0, _unit, "a float in [0, 1]", "dampening of the momentum's gradient term"),
             _NESTEROV, WEIGHT_DECAY(0.0)),
    validate_group=_check_sgd,
)

ADAGRAD = Recipe(
    name="adagrad",
    summary="Adagrad: per-coordinate sum of squared gradients (torch.optim.Adagrad); 4 bytes/param",
    reference="Duchi, Hazan & Singer 2011, Adaptive Subgradient Methods, Figure 1 (diagonal)",
    moment=AdagradMoments(),
    hparams=(LR(1e-2),
             HParam("lr_decay", 0.0, nonneg, "a float >= 0", "the step is lr / (1 + (t - 1) lr_decay)"),
             WEIGHT_DECAY(0.0),
             HParam("initial_accumulator_value", 0.0, nonneg, "a float >= 0", "the sum of squares' start"),
             HParam("eps", 1e-10, nonneg, "a float >= 0", "added to sqrt(sum)")),
)

RMSPROP = Recipe(
    name="rmsprop",
    summary="RMSprop, optionally centered and with momentum (torch.optim.RMSprop); 4-12 bytes/param",
    reference="Tieleman & Hinton 2012, Lecture 6e; Graves 2013, Eq. 38-41 (centered, momentum)",
    moment=RMSpropMoments(),
    hparams=(LR(1e-2),
             HParam("alpha", 0.99, _unit, "a float in [0, 1]", "decay of the mean square"),
             HParam("eps", 1e-8, nonneg, "a float >= 0", "added to the root mean square"),
             WEIGHT_DECAY(0.0), _MOMENTUM,
             HParam("centered", False, is_bool, "True or False", "subtract the squared mean gradient")),
)


class SGD_(LowMemOptimizer):  # noqa: N801  (exported as lowmem.optim.SGD; torch.optim.SGD keeps its name)
    """SGD on the lowmem engine, a drop-in for ``torch.optim.SGD`` (tested equal).

    ``b <- g`` (first step), ``b <- momentum b + (1 - dampening) g``; ``p <- p - lr b`` (Nesterov: ``p <- p -
    lr (g + momentum b)``). Without momentum no state.

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-3`): Learning rate.
        momentum (`float`, defaults to `0.0`): Momentum factor in [0, 1) (torch also takes >= 1, which diverges);
            > 0 keeps a buffer, 4 B per element.
        dampening (`float`, defaults to `0.0`): Dampening of the momentum's gradient term, in [0, 1].
        weight_decay (`float`, defaults to `0.0`): torch's L2 decay, ``g <- g + wd p`` before the momentum buffer
            (without momentum the same update as ``p -= lr * wd * p``, which the engine applies there).
        nesterov (`bool`, defaults to `False`): Nesterov momentum (needs ``momentum > 0``, ``dampening=0``).
        state_dtype (`str`, defaults to `"float32"`): Storage of the buffer.
        foreach (`bool` or `None`, defaults to `None`): the multi-tensor buckets (float32 and bfloat16 parameters;
            equal bit for bit); ``False`` steps one tensor, in chunks, at a time (the reference).
        maximize, differentiable, fused: ``torch.optim.SGD``'s, accepted at its defaults (``fused=False`` too);
            another value is refused (:data:`~lowmem.optim.hparams.TORCH_FLAGS`).
    """

    recipe = SGD

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 state_dtype: str = "float32"):
        check_torch_flags("SGD", maximize=maximize, differentiable=differentiable, fused=fused)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, state_dtype=state_dtype, foreach=foreach)


class Adagrad(LowMemOptimizer):
    """Adagrad on the lowmem engine, a drop-in for ``torch.optim.Adagrad`` (tested equal).

    ``s <- s + g^2`` (``s`` starts at ``initial_accumulator_value``); ``p <- p - lr / (1 + (t - 1) lr_decay) *
    g / (sqrt(s) + eps)``. State: ``s``, 4 B per element.

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-2`), lr_decay (`float`, defaults to `0.0`), weight_decay (`float`, defaults
            to `0.0`: torch's L2 decay, ``g <- g + wd p`` before the sum),
            initial_accumulator_value (`float`, defaults to `0.0`), eps (`float`, defaults to `1e-10`): torch's.
        state_dtype (`str`, defaults to `"float32"`): Storage of the sum.
        foreach (`bool` or `None`, defaults to `None`): the multi-tensor buckets (equal bit for bit); ``False``: one
            tensor, in chunks, at a time; positional after ``eps`` as torch's.
        maximize, differentiable, fused: ``torch.optim.Adagrad``'s, accepted at its defaults (``fused=False`` too);
            another value is refused (:data:`~lowmem.optim.hparams.TORCH_FLAGS`).
    """

    recipe = ADAGRAD

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False, fused: bool | None = None,
                 state_dtype: str = "float32"):
        check_torch_flags("Adagrad", maximize=maximize, differentiable=differentiable, fused=fused)
        super().__init__(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps, state_dtype=state_dtype,
                         foreach=foreach)


class RMSprop(LowMemOptimizer):
    """RMSprop on the lowmem engine, a drop-in for ``torch.optim.RMSprop`` (tested equal).

    ``v <- alpha v + (1 - alpha) g^2`` (centered: ``c <- alpha c + (1 - alpha) g``, ``v~ = v - c^2``);
    ``u = g / (sqrt(v~) + eps)``; ``p <- p - lr u`` or, with momentum, ``b <- momentum b + u; p <- p - lr b``.

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to `1e-2`), alpha (`float`, defaults to `0.99`), eps (`float`, defaults to `1e-8`),
            weight_decay (`float`, defaults to `0.0`: torch's L2 decay, ``g <- g + wd p`` before the statistics),
            momentum (`float`, defaults to `0.0`), centered (`bool`, defaults
            to `False`): torch's.
        state_dtype (`str`, defaults to `"float32"`): Storage of the statistics.
        foreach (`bool` or `None`, defaults to `None`): the multi-tensor buckets (equal bit for bit); ``False``: one
            tensor, in chunks, at a time.
        capturable, maximize, differentiable: ``torch.optim.RMSprop``'s (in its positions, ``foreach`` between),
            accepted at its defaults; another value is refused (:data:`~lowmem.optim.hparams.TORCH_FLAGS`).
    """

    recipe = RMSPROP

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False, *,
                 state_dtype: str = "float32"):
        check_torch_flags("RMSprop", capturable=capturable, maximize=maximize, differentiable=differentiable)
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                         centered=centered, state_dtype=state_dtype, foreach=foreach)


register(SGD, SGD_, state_precision="fp32", second_moment="none", example_hparams={"lr": 0.05, "momentum": 0.9})
register(ADAGRAD, Adagrad, state_precision="fp32", second_moment="full", example_hparams={"lr": 0.05})
register(RMSPROP, RMSprop, state_precision="fp32", second_moment="full", example_hparams={"lr": 1e-3})
