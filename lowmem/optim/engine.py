"""The optimizer engine: one loop, composed from a recipe's parts.

A :class:`Recipe` names the parts: stabilizers (on the raw gradient), an optional projection (for
2-D parameters in groups with a ``rank``), a moment rule (the direction), a residual rule (what to
do with the gradient outside the subspace) and a learning-rate rule. :class:`LowMemOptimizer` only
allocates state and runs, for each parameter with a gradient::

    g  = stabilizers(grad)                       # clip / normalize / reset moments
    r  = P.down(g)            if projected else g  (P refreshed on its schedule)
    d  = moment.direction(r)                     # e.g. m_hat / (sqrt(v_hat) + eps)
    d  = scale * P.up(d) + residual(g, r, d)  if projected
    p <- p - lr * wd * p ;  p <- p - lr * d      # decoupled weight decay (AdamW, Algorithm 2)

Guarantees every optimizer built on the engine inherits:

* State holds tensors only; ``state_dict()`` loads with ``torch.load(weights_only=True)``.
* :meth:`LowMemOptimizer.load_state_dict` keeps each state tensor's dtype (torch would cast
  floating state to the parameter's dtype: quantized or float32 states must survive a bf16 model).
* :meth:`LowMemOptimizer.state_bytes` is the exact size of the optimizer state.
* Hyperparameters and parameter groups are validated, with errors naming the value and the
  valid range; unknown keyword arguments are rejected with the list of valid ones.
* A step whose gradients contain NaN or Inf is skipped as a whole (one host sync per step), with
  a warning, so optimizer state is never corrupted; ``skipped_steps`` counts them.

Plain full-rank float32 parameters of a recipe whose moment rule has a multi-tensor form
(``supports_foreach``: AdamW) are stepped in buckets with one kernel per operation; the
per-parameter loop above is the reference it is tested against.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from . import functional as F
from .hparams import ENGINE_HPARAMS, HParam
from .moments import MomentRule, constant_lr, state_dtype
from .stabilizers import Stabilizer
from .subspace import DropResidual, Projection, ResidualRule, rotate_moments

LRRule = Callable[[dict, dict, Tensor, float], "float | Tensor"]


@dataclass(frozen=True)
class Recipe:
    """A named composition of engine parts: one paper's optimizer.

    Attributes:
        name: Registry name (``lowmem.create_optimizer(model, name)``).
        summary: One line for ``lowmem list``.
        reference: The paper (and the equations the parts implement).
        moment: How the direction is computed from the (projected) gradient.
        hparams: Hyperparameters with defaults, copied into every parameter group.
        group_hparams: Hyperparameters that only some groups carry (``rank`` and friends for
            projected groups). A group without ``rank`` gets none of them and trains full-rank
            (galore-torch's convention); a group with ``rank`` gets the defaults of the others.
            They are validated where present.
        projection: Subspace projection for 2-D parameters of groups with a ``rank``.
        residual: Rule for the gradient outside the subspace.
        stabilizers: Gradient transforms applied first, in order.
        lr_rule: ``(group, state, param_fp32, t) -> step size``.
        decay_after_update: Apply decoupled weight decay after the gradient step instead of before
            (galore-torch and fira do this; torch's AdamW decays first).
        validate_group: Optional cross-field check of a complete parameter group; raises
            ``ValueError``.
    """

    name: str
    summary: str
    reference: str
    moment: MomentRule
    hparams: tuple[HParam, ...]
    group_hparams: tuple[HParam, ...] = ()
    projection: Projection | None = None
    residual: ResidualRule = field(default_factory=DropResidual)
    stabilizers: tuple[Stabilizer, ...] = ()
    lr_rule: LRRule = constant_lr
    decay_after_update: bool = False
    validate_group: Callable[[dict], None] | None = None

    def __repr__(self) -> str:
        return f"Recipe({self.name!r})"

    def all_hparams(self) -> dict[str, HParam]:
        return {h.name: h for h in (*self.hparams, *ENGINE_HPARAMS, *self.group_hparams)}


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one host synchronisation.

    A finite norm proves all elements finite, and one multi-tensor norm is cheap; only when a norm
    is not finite (a NaN/Inf, or an overflow of huge finite values) is the exact check run.
    """
    if not tensors:
        return True
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    norms = [n.float().to(tensors[0].device) for ts in by_device.values() for n in torch._foreach_norm(ts)]
    if bool(torch.stack(norms).isfinite().all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class LowMemOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a :class:`Recipe`.

    Args:
        params: Parameters or parameter groups, as for any torch optimizer.
        recipe: The recipe; subclasses set a class attribute instead.
        **hparams: Hyperparameters of the recipe (see ``recipe.all_hparams()``).
    """

    recipe: Recipe
    skip_nonfinite: bool = True

    def __init__(self, params: Iterable[Any], recipe: Recipe | None = None, **hparams: Any):
        recipe = recipe if recipe is not None else getattr(type(self), "recipe", None)
        if recipe is None:
            raise TypeError("LowMemOptimizer needs a recipe")
        self.recipe = recipe
        known = recipe.all_hparams()
        unknown = sorted(set(hparams) - set(known))
        if unknown:
            raise ValueError(
                f"Unknown hyperparameter(s) {unknown} for optimizer '{recipe.name}'; valid: {sorted(known)}"
            )
        for name, value in hparams.items():
            known[name].validate(value, where=f"optimizer '{recipe.name}'")
        defaults = {h.name: h.default for h in (*recipe.hparams, *ENGINE_HPARAMS)}
        defaults.update(hparams)
        self.skipped_steps = 0
        super().__init__(params, defaults)

    # ---- parameter groups -----------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"parameter group {len(self.param_groups) - 1} of optimizer '{self.recipe.name}'"
        try:
            for h in (*self.recipe.hparams, *ENGINE_HPARAMS):
                h.validate(group[h.name], where=where)
            if group.get("rank") is not None:  # a projected group: its other settings get defaults
                for h in self.recipe.group_hparams:
                    if h.default is not None:
                        group.setdefault(h.name, h.default)
            for h in self.recipe.group_hparams:
                if group.get(h.name) is not None:
                    h.validate(group[h.name], where=where)
            if self.recipe.validate_group is not None:
                self.recipe.validate_group(group)
        except ValueError:
            self.param_groups.pop()
            raise

    def _is_projected(self, p: Tensor, group: dict[str, Any]) -> bool:
        if self.recipe.projection is None or group.get("rank") is None or p.ndim != 2:
            return False
        if group["rank"] >= min(p.shape):
            warnings.warn(
                f"{self.recipe.name}: rank {group['rank']} >= smaller side of a {tuple(p.shape)} parameter;"
                " training it full-rank instead",
                stacklevel=3,
            )
            return False
        return True

    # ---- state ----------------------------------------------------------------------------

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor]) -> None:
        r = self.recipe
        state["step"] = torch.zeros((), dtype=torch.float32)
        shape = p.shape
        if self._is_projected(p, group):
            r.projection.init_state(state, p, group)
            shape = r.projection.low_shape(p.shape, group)
            r.residual.init_state(state, p, group)
        r.moment.init_state(state, shape, group, p)
        for s in r.stabilizers:
            s.init_state(state, p, group)

    def materialize_state(self) -> None:
        """Allocate the state of every parameter now (normally done lazily at its first step).

        On meta-device parameters this allocates nothing and lets :meth:`state_bytes` report the
        exact state size of a model that was never built: the memory estimator uses it.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self._init_state(p, group, self.state[p])

    def state_bytes(self) -> int:
        """Exact bytes held by the optimizer state (every tensor in ``self.state``)."""
        return sum(
            v.numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if isinstance(v, Tensor)
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch does, but keep each state tensor's saved dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating-point state to the parameter's
        dtype; for a bf16 model that would silently round float32 moments (and break quantized
        codes). Step counters stay on the CPU.
        """
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_map = dict(zip(saved_ids, params))
        cpu_keys = {"step", *(self.recipe.projection.cpu_state_keys if self.recipe.projection is not None else ())}
        for pid, saved in state_dict["state"].items():
            p = id_map.get(pid)
            if p is None:
                continue
            self.state[p] = {
                k: v.detach().to(device="cpu" if k in cpu_keys else p.device, copy=True) if isinstance(v, Tensor) else v
                for k, v in saved.items()
            }

    # ---- the update -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (torch's contract: optional closure, returns its loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self.skip_nonfinite and not _all_finite([p.grad for p, _ in work]):
            self.skipped_steps += 1
            warnings.warn(
                f"{self.recipe.name}: non-finite gradient; step skipped, optimizer state unchanged "
                f"({self.skipped_steps} skipped so far)",
                stacklevel=2,
            )
            return loss
        buckets: dict[tuple, tuple[dict[str, Any], list[Tensor]]] = {}
        for p, group in work:
            if self._foreach_ok(p, group):
                state = self.state[p]
                if "step" not in state:
                    self._init_state(p, group, state)
                state["step"] += 1
                buckets.setdefault((id(group), state["step"].item(), p.device), (group, []))[1].append(p)
            else:
                self._update(p, p.grad, group)
        for (_, t, _), (group, ps) in buckets.items():
            self.recipe.moment.foreach_step_(ps, [p.grad for p in ps], [self.state[p] for p in ps], group, t, group["lr"])
        return loss

    def _foreach_ok(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` can take the moment rule's multi-tensor path: a plain full-rank float32 step."""
        r = self.recipe
        return (
            group.get("foreach") is not False
            and r.moment.supports_foreach
            and not r.stabilizers
            and r.lr_rule is constant_lr
            and not r.decay_after_update
            and p.dtype == torch.float32
            and p.grad.dtype == torch.float32
            and not p.grad.is_sparse
            and state_dtype(group, p) == torch.float32
            and not self._is_projected(p, group)
        )

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict[str, Any] | None = None) -> None:
        """Update a single parameter from its ``.grad`` (the layerwise mode's entry point)."""
        if p.grad is None:
            return
        if group is None:
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        self._update(p, p.grad, group)

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], projected_grad: Tensor | None = None) -> None:
        """One step of ``p``. ``projected_grad``: the gradient already projected (layerwise
        accumulation in the subspace, after :meth:`refresh_projection`); ``grad`` is then only used
        by :meth:`Projection.post_update` and stabilizers are not supported."""
        if grad.is_sparse:
            raise RuntimeError(f"{self.recipe.name} does not support sparse gradients")
        r = self.recipe
        state = self.state[p]
        if "step" not in state:
            self._init_state(p, group, state)
        state["step"] += 1
        t = state["step"].item()

        g = grad if grad.dtype == torch.float32 else grad.float()
        for s in r.stabilizers:
            g = s.transform(g, state, group, int(t), r.moment)

        projected = self._is_projected(p, group)
        if projected:
            P = r.projection
            if projected_grad is None:
                self._refresh(p, g, state, group, int(t))
                low = P.down(g, state, group)
            else:
                low = projected_grad.float()
        else:
            low = g

        p32 = p if p.dtype == torch.float32 else p.float()
        lr = r.lr_rule(group, state, p32, t)
        d = r.moment.direction(low, state, group, t, lr)
        if projected:
            d_low = d
            d = P.up(d_low, state, group)
            scale = group.get("scale", 1.0)
            if scale != 1.0:
                d.mul_(scale)
            res = r.residual.update(g, low, d_low, state, group, P)
            if res is not None:
                d.add_(res)
            P.post_update(g, state, group)

        lr_scale = math.prod(s.lr_scale(state, group, int(t)) for s in r.stabilizers)
        wd = group.get("weight_decay", 0.0)
        if not r.decay_after_update:
            F.decoupled_weight_decay_(p32, lr, wd)
        if r.moment.applies_lr:
            p32.sub_(d if lr_scale == 1.0 else d.mul_(lr_scale))
        else:
            F.apply_update_(p32, d, lr if lr_scale == 1.0 else lr * lr_scale)
        if r.decay_after_update:
            F.decoupled_weight_decay_(p32, lr, wd)
        if p32 is not p:
            p.copy_(p32)

    def _refresh(self, p: Tensor, g: Tensor, state: dict[str, Tensor], group: dict[str, Any], t: int) -> None:
        """Refresh ``p``'s projection from ``g`` if due at step ``t``, then apply the moment policy."""
        P = self.recipe.projection
        if not P.refresh_due(state, group, t):
            return
        rotate = group.get("moment_policy", "keep") == "rotate" and t > 1
        old = P.snapshot(state, group) if rotate else None
        if P.refresh(g, state, group) and t > 1:
            self._on_subspace_change(state, group, old)

    @torch.no_grad()
    def refresh_projection(self, p: Tensor, g: Tensor, group: dict[str, Any]) -> bool:
        """Refresh ``p``'s projection for its *next* step from gradient ``g`` (if due), and return
        whether ``p`` is projected. Layerwise accumulation calls this on a window's first
        micro-batch, then accumulates ``project(p, g)`` and steps with ``projected_grad``."""
        if not self._is_projected(p, group):
            return False
        state = self.state[p]
        if "step" not in state:
            self._init_state(p, group, state)
        self._refresh(p, g if g.dtype == torch.float32 else g.float(), state, group, int(state["step"].item()) + 1)
        return True

    def project(self, p: Tensor, g: Tensor, group: dict[str, Any]) -> Tensor:
        """``g`` in ``p``'s current subspace (float32)."""
        return self.recipe.projection.down(g if g.dtype == torch.float32 else g.float(), self.state[p], group)

    def _on_subspace_change(self, state: dict[str, Tensor], group: dict[str, Any], old: dict[str, Tensor] | None = None) -> None:
        """What the moments do when the projection's basis changes: ``keep``, ``reset`` or ``rotate``
        (into the new basis, :func:`~lowmem.optim.subspace.rotate_moments`)."""
        policy = group.get("moment_policy", "keep")
        if policy == "reset":
            self.recipe.moment.reset(state)
        elif policy == "rotate" and old is not None:
            rotate_moments(self.recipe.moment.state_keys, self.recipe.projection, state, group, old)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(recipe={self.recipe.name!r}, groups={len(self.param_groups)})"
