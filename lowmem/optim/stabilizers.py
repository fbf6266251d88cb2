"""Stabilizer seam: transforms applied to the raw gradient before any projection or moment rule.

A :class:`Stabilizer` may clip or normalize the gradient, reset moments (through the moment
rule's :meth:`~lowmem.optim.moments.MomentRule.reset`) and scale the learning rate (warm-up after
a reset). Like every component it holds configuration only; its tensors live in ``state[p]``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .moments import MomentRule


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
