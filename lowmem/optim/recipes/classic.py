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
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..engine import LowMemOptimizer, Recipe
from ..functional import classic as FC
from ..hparams import LR, WEIGHT_DECAY, HParam, check_torch_flags, in_unit_interval, is_bool, nonneg
from ..moments import _COUNTED_GRAD_DTYPE, ChunkState, MomentRule, state_dtype
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
        foreach (`bool` or `None`, defaults to `None`): accepted for every engine optimizer (this rule steps one
            tensor, in chunks, at a time).
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
        foreach (`bool` or `None`, defaults to `None`): accepted (one tensor, in chunks, at a time); positional
            after ``eps`` as torch's.
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
        foreach (`bool` or `None`, defaults to `None`): accepted (one tensor, in chunks, at a time).
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
