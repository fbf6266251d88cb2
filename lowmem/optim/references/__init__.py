"""Plain single-tensor references: each registered engine optimizer written from its paper.

A reference is a short loop, readable top to bottom, that steps one float32 tensor through a list
of gradients with nothing of the engine in it (no chunks, no foreach, no state objects), citing the
equations it implements. ``tests/test_reference.py`` runs every engine optimizer in the registry on
every :attr:`Reference.configs` entry and checks that its trajectory equals the reference's (rtol
``1e-5`` in float32), on the single-tensor path and on the chunked / multi-tensor paths. A new
optimizer is covered by adding its entry here; the suite fails for an engine entry without one.

Interface: ``loop(p, grads, *, index, **group) -> [p_1, ..., p_T]``. ``p`` is the initial parameter
(the loop may modify it), ``grads`` the gradient of each step, ``index`` the parameter's position in
its group (seeds of random projections depend on it), ``group`` the optimizer's resolved parameter
group (every hyperparameter with its default filled in, ``params`` removed) and ``group_size``, the
group's parameter count (``refresh_phase="staggered"`` shifts parameter ``index``'s refresh schedule by
``index * update_proj_gap // group_size``). The loop returns the parameter after each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

ReferenceLoop = Callable[..., list[Tensor]]

#: Shapes the suite steps by default: a wide and a tall matrix (each projection side) and a vector.
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((24, 40), (40, 24), (40,))


@dataclass(frozen=True)
class Reference:
    """The plain loop of one optimizer and the configurations the suite checks it on.

    Attributes:
        loop: ``loop(p, grads, *, index, **group) -> list of parameters after each step``.
        configs: Keyword arguments for ``create_optimizer(params, name, **config)``, one case each
            (defaults, each projection side and residual rule, quantized and not, edge settings).
        shapes: Parameter shapes stepped together in one optimizer (each checked against the loop).
        steps: Steps per case (enough to cross several projection refreshes / resets).
        rtol, atol: Tolerances of the float32 comparison.
    """

    loop: ReferenceLoop
    configs: tuple[dict[str, Any], ...]
    shapes: tuple[tuple[int, ...], ...] = DEFAULT_SHAPES
    steps: int = 12
    rtol: float = 1e-5
    atol: float = 1e-6


_REFERENCES: dict[str, Reference] = {}


def register_reference(name: str, reference: Reference) -> None:
    """Attach ``reference`` to the registered optimizer ``name`` (raises if given twice)."""
    if name in _REFERENCES:
        raise ValueError(f"a reference for {name!r} is already registered")
    _REFERENCES[name] = reference


def get_reference(name: str) -> Reference | None:
    """The reference of optimizer ``name``, or ``None``."""
    _load()
    return _REFERENCES.get(name)


def _load() -> None:
    """Import the reference modules (each registers its loops)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
