"""Subspace seams: projections and residual rules.

A :class:`Projection` maps a 2-D gradient ``G`` (m x n) into a small subspace where the moment rule
keeps its state, and maps the resulting direction back. A :class:`ResidualRule` decides what to do
with the part of the gradient the subspace misses, ``G - up(down(G))``.

Both hold configuration only; their tensors live in the optimizer's per-parameter state under the
names in ``state_keys``, so checkpoints stay plain tensors (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class Projection:
    """Base class for subspace projections of 2-D parameters.

    The engine calls, per step of a projected parameter: :meth:`refresh_due`, then
    :meth:`refresh` when due, then :meth:`down`; after the moment rule, :meth:`up`.
    """

    state_keys: tuple[str, ...] = ()

    def low_shape(self, shape: torch.Size, group: dict[str, Any]) -> torch.Size:
        """Shape of the projected gradient for a parameter of ``shape``."""
        raise NotImplementedError

    def init_state(self, state: dict[str, Tensor], param: Tensor, group: dict[str, Any]) -> None:
        """Allocate the projection's tensors (zeros; the first :meth:`refresh` fills them)."""
        raise NotImplementedError

    def refresh_due(self, state: dict[str, Tensor], group: dict[str, Any], t: int) -> bool:
        """Whether the basis is recomputed at 1-based step ``t`` (always at ``t == 1``)."""
        gap = group.get("update_proj_gap", 200)
        return (t - 1) % gap == 0

    def refresh(self, g: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> bool:
        """Recompute the basis from gradient ``g`` in place; return ``False`` if it was skipped."""
        raise NotImplementedError

    def down(self, g: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def up(self, r: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> Tensor:
        raise NotImplementedError


class ResidualRule:
    """Base class: the update for ``G - up(down(G))``, the gradient outside the subspace."""

    state_keys: tuple[str, ...] = ()

    def init_state(self, state: dict[str, Tensor], param: Tensor, group: dict[str, Any]) -> None:
        pass

    def update(
        self,
        g: Tensor,
        low: Tensor,
        d_low: Tensor,
        state: dict[str, Tensor],
        group: dict[str, Any],
        projection: Projection,
    ) -> Tensor | None:
        """Return the residual's direction (same units as the subspace direction) or ``None``."""
        raise NotImplementedError


class DropResidual(ResidualRule):
    """GaLore (Zhao et al. 2024, Algorithm 2): the residual is discarded."""

    def update(self, g, low, d_low, state, group, projection):
        return None
