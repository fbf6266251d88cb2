"""Layerwise updates: each parameter is stepped in the backward pass, its gradient freed at once.

A post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``) steps a parameter as
soon as its gradient is complete and sets ``.grad = None``, so the model never holds all its
gradients at once (peak: the largest parameter's gradient). Any engine recipe works; unlike the
Trainer's built-in layerwise GaLore, :class:`LayerwiseOptimizer` supports

* **gradient accumulation** (``accumulation_steps``): full-rank parameters accumulate in ``.grad``
  as usual; projected parameters of recipes without a residual rule (GaLore, Online Subspace
  Descent) accumulate *in the subspace* (an ``r x n`` buffer instead of ``m x n``): a refresh due at
  the window's step is computed from the window's **first micro-batch** gradient, then every
  micro-batch is projected onto that basis and summed; Online Subspace Descent's basis step uses
  the **last** micro-batch gradient. Recipes with a residual (Fira, FRUGAL) need the full gradient
  and accumulate it in ``.grad``.
* **gradient clipping** (``max_grad_norm``): ``clip_mode="per_param"`` clips each parameter's
  stepped gradient to that norm; ``clip_mode="global_prev"`` scales every gradient by
  ``min(1, max_grad_norm / ||g_{k-1}||)`` where ``||g_{k-1}||`` is the global norm of the previous
  step's gradients (the current one is unknown until the backward pass ends). In the subspace
  accumulation mode both see the projected gradient.
* **checkpoints**: ``state_dict()`` / ``load_state_dict()`` hold the whole state (the wrapped
  optimizer's plus the clipping norm and the accumulation window in progress: the micro-batch counts
  and the subspace accumulators), plain tensors; ``step()`` and ``zero_grad()`` exist so that
  ``transformers.Trainer`` treats it as an ordinary optimizer. A checkpoint taken inside a window
  resumes it exactly together with the weights and the parameters' ``.grad`` (full-rank parameters
  accumulate there, as with any torch optimizer), restored after ``load_state_dict``: a loaded window whose
  ``.grad`` is missing is refused at the parameter's next gradient or ``step()``; it records its
  ``accumulation_steps`` (another value refused inside a window) and the previous step's global norm (``prev_norm``:
  the clipping coefficient follows the loading ``max_grad_norm``); loading drops the window the optimizer was in.
* **non-finite gradients**: parameters are stepped as their gradients arrive, so a NaN/Inf cannot
  skip the whole step as :meth:`LowMemOptimizer.step` does: the step ends where it arrives (that
  parameter and every later one are not stepped until the next step; the ones already stepped
  keep their update, and the warning says how many they were).
* **DDP**: a plain hook would step on the *local* gradient. Pass the
  ``DistributedDataParallel`` module (or call :meth:`LayerwiseOptimizer.attach_ddp` once it is
  wrapped): parameters are then stepped from a DDP communication hook, on the all-reduced
  gradient of each bucket. DDP keeps its full-size gradient buckets, so memory is not saved there.
  Stepping from plain hooks while a process group of several ranks is active raises an error.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._warn import warn_user
from .engine import LowMemOptimizer, refuse_untrainable
from .functional.norms import float_norm
from .group_layout import check_group_layouts, check_group_settings, check_rounding
from .registry import create_optimizer, get_entry, list_optimizers
from .sharded import is_dtensor


# Elements of a low-precision gradient converted to float32 at once by the non-finite check's norm
# (functional.norms.float_norm's blocks)
NORM_BLOCK = 2**19


def check_bytes(numel: int, dtype: torch.dtype, contiguous: bool = True) -> int:
    """What :meth:`LayerwiseOptimizer._step_param`'s non-finite check, ``float_norm(g, NORM_BLOCK).float().square()``,
    allocates alive together for one gradient of ``numel`` elements in ``dtype``.

    float32: the 0-d norm and its square (8 bytes); float64: the norm, its float32 copy, then the square (12).
    Another dtype (bfloat16, float16), contiguous and larger than :data:`NORM_BLOCK`: the running sum of squares,
    one block's float32 copy and its norm (``4 NORM_BLOCK + 8``); otherwise ``vector_norm(g, dtype=float32)``,
    whose kernel converts the whole tensor to float32 first (``4 numel``, not seen by a dispatch tracer, measured
    by the peak RSS) beside its 0-d output (``+ 4``), and at least the norm and its square (8).
    """
    if dtype is torch.float32:
        return 8
    if dtype is torch.float64:
        return 12
    if contiguous and numel > NORM_BLOCK:
        return 4 * NORM_BLOCK + 8
    return max(4 * numel + 4, 8)


def layerwise_transient_bytes(per_parameter: int, grads: list[tuple[int, torch.dtype, bool]], kept: int = 0,
                              max_grad_norm: float | None = None, clip_mode: str = "per_param",
                              device_type: str = "cpu", ddp: bool = False) -> int:
    """The largest transient of one :meth:`LayerwiseOptimizer._step_param`, in its phases:

    * the non-finite check (:func:`check_bytes` of the largest one over ``grads``, given as ``(numel, dtype,
      contiguous)``), next to the running sum of squared norms of the parameters stepped before it (4 bytes),
      then the new sum beside the old one and the squared norm (12);
    * with ``max_grad_norm``, ``clip_mode="per_param"``: the coefficient's 0-d temporaries (``sqrt + 1e-6``, its
      reciprocal and their product with ``max_grad_norm``: 20 bytes with the squared norm and the sum);
    * the inner step (``per_parameter``: the engine's ``step_transient_bytes(per_parameter=True)``) next to the
      squared norm and the sum (8 bytes), and with ``max_grad_norm`` the coefficient (4; ``"global_prev"`` off
      the CPU: its copy on the device, 4) and, while the gradient is scaled, the coefficient cast to a gradient
      dtype other than float32 (its itemsize). The hooks scale the gradient in place (they free it after the
      step); with ``ddp`` (stepped from DDP's communication hook, on a view of its bucket) the clipped gradient
      is a copy, of the largest gradient's size (with the largest inner transient: an upper bound when they
      are different parameters).

    ``kept``: bytes alive through every phase (MKL's packing buffer, :meth:`LowMemOptimizer._kept_gemm_bytes`), part
    of ``per_parameter`` already and added to the check's phase here. 0-d tensors count their bytes (on CUDA
    the caching allocator rounds each one up to 512 bytes: not modelled)."""
    if not grads:
        return per_parameter
    check = max(check_bytes(*g) for g in grads)
    held = copy = 0
    if max_grad_norm is not None:
        held = 4 * (clip_mode == "per_param" or device_type != "cpu")
        held += max((dtype.itemsize for _, dtype, _ in grads if dtype is not torch.float32), default=0)
        copy = max(numel * dtype.itemsize for numel, dtype, _ in grads) if ddp else 0
    phases = [kept + 4 + max(check, 8), per_parameter + 8 + held + copy]
    if max_grad_norm is not None and clip_mode == "per_param":
        phases.append(kept + 20)
    return max(phases)


def global_prev_coef(max_grad_norm: float, prev_norm: Tensor) -> Tensor:
    """The ``clip_mode="global_prev"`` scale ``min(1, max_grad_norm / (||g_{k-1}|| + 1e-6))``: gradient-norm clipping
    (Pascanu et al. 2013, "On the difficulty of training recurrent neural networks", Algorithm 1) with the previous
    step's global norm ``prev_norm`` in place of the current one (unknown until the backward pass ends)."""
    return torch.clamp(max_grad_norm / (prev_norm + 1e-6), max=1.0)


def layerwise_refusal(name: str, field: str = "layerwise") -> str | None:
    """Why optimizer ``name`` cannot run in layerwise mode, naming ``field`` (the switch as the caller spells it:
    ``lowmem_layerwise``, a recipe's ``layerwise``) and the optimizers that can, or ``None`` when it can.
    Layerwise mode steps each parameter from its gradient hook through the engine's per-parameter step
    (:class:`~lowmem.optim.engine.LowMemOptimizer`); a registered name without a recipe (a bitsandbytes class,
    ``bnb_*``) is stepped as a whole by its own ``step()`` and has none. Raises the registry's ``ValueError`` for an
    unknown name."""
    if get_entry(name).recipe is not None:
        return None
    engine = [n for n in list_optimizers() if get_entry(n).recipe is not None]
    base = name.strip().lower().replace("-", "_").removeprefix("bnb_").removeprefix("paged_")
    same = f" ({base!r} is the engine's optimizer of the same format)" if base in engine else ""
    return (f"{field}=True needs an engine optimizer (`lowmem list`): {name!r} is not one, it is a bitsandbytes class "
            f"stepped as a whole, with no per-parameter step for the gradient hooks; use one of {engine}{same}, or drop "
            f"{field}")


def _register_hook(p: Tensor, hook: Callable[[Tensor], None]) -> Any:
    """``p.register_post_accumulate_grad_hook(hook)``, also on a parameter frozen for now (BAdam's
    inactive blocks): the hook stays registered when ``requires_grad`` is turned back on."""
    if p.requires_grad:
        return p.register_post_accumulate_grad_hook(hook)
    p.requires_grad_(True)
    try:
        return p.register_post_accumulate_grad_hook(hook)
    finally:
        p.requires_grad_(False)


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Step every parameter from its gradient hook with a registered lowmem optimizer.

    Args:
        model_or_params (`nn.Module`, DDP module, or parameters / groups): What to train. A module
            lets subspace recipes choose targets (``target_modules``); a
            ``DistributedDataParallel`` module switches to stepping on the all-reduced gradient.
        name (`str`, defaults to `"adamw"`): Registered engine optimizer (``lowmem list``).
        accumulation_steps (`int`, defaults to `1`): Backward passes per optimizer step. Call
            :meth:`step` once per window, after the last backward (the Trainer does).
        max_grad_norm (`float` or `None`, defaults to `None`): Gradient clipping threshold.
        clip_mode (`str`, defaults to `"per_param"`): ``"per_param"`` or ``"global_prev"`` (see the
            module docstring).
        **hparams: The optimizer's hyperparameters (``lr``, ``rank``, ...).
    """

    def __init__(
        self,
        model_or_params: Any,
        name: str = "adamw",
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        clip_mode: str = "per_param",
        **hparams: Any,
    ):
        if isinstance(accumulation_steps, bool) or not (isinstance(accumulation_steps, int) and accumulation_steps >= 1):
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if clip_mode not in ("per_param", "global_prev"):
            raise ValueError(f"clip_mode must be 'per_param' or 'global_prev', got {clip_mode!r}")
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not (
                isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0 and math.isfinite(max_grad_norm))):
            raise ValueError(f"max_grad_norm must be None or a finite float > 0, got {max_grad_norm!r}")
        ddp = model_or_params if isinstance(model_or_params, nn.parallel.DistributedDataParallel) else None
        target = ddp.module if ddp is not None else model_or_params
        refused = layerwise_refusal(name, "layerwise")  # before the inner optimizer is built (bnb: paged on the CPU)
        if refused is not None:
            raise ValueError(refused)
        inner = create_optimizer(target, name, **hparams)
        if any(is_dtensor(p) for g in inner.param_groups for p in g["params"]):
            raise NotImplementedError(
                "layerwise mode does not support sharded (FSDP2 / DTensor) parameters: it steps each parameter"
                " from its gradient hook, before FSDP2 reduce-scatters the gradient; use the plain optimizer"
                " (docs/distributed.md)"
            )
        if not isinstance(inner, LowMemOptimizer):
            raise ValueError(f"layerwise mode needs an engine optimizer; {name!r} is not one")
        self.inner = inner
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.clip_mode = clip_mode
        params = [p for g in inner.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.param_groups = inner.param_groups  # one set of groups: schedulers change the inner lr
        self.state = inner.state
        self.defaults = inner.defaults
        self._group_of = {p: g for g in inner.param_groups for p in g["params"]}
        r = inner.recipe
        self._subspace_accumulation = not r.combine.needs_full_gradient and not r.stabilizers
        self._micro: dict[Tensor, int] = {}
        self._low: dict[Tensor, Tensor] = {}
        self._clip_coef = torch.ones(())
        self._prev_norm: Tensor | None = None  # the previous step's global norm (clip_mode global_prev; saved)
        self._sq_norm_sum: Tensor | None = None
        # parameters a loaded window left with a partial gradient in .grad: checked at their next gradient / step()
        self._grad_checks: dict[Tensor, Any] = {}
        self._handles: list[Any] = []
        # the current step: parameters already handled (stepped or skipped), and whether a
        # non-finite gradient was seen (then no further parameter is stepped until the next step)
        self._handled: set[Tensor] = set()
        self._nonfinite = False
        self._steps_without_step_call = 0  # steps the hooks began since the last step() call (_check_window)
        self._ddp = None
        if ddp is not None:
            self.attach_ddp(ddp)
        else:
            self._handles = [_register_hook(p, self._hook) for p in params]

    # ---- hooks ---------------------------------------------------------------------------------

    def attach_ddp(self, ddp_model: nn.parallel.DistributedDataParallel) -> None:
        """Step from ``ddp_model``'s communication hook (on all-reduced gradients) instead of the
        per-parameter hooks. Call it once, after wrapping the model and before the first backward."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._ddp = ddp_model
        ddp_model.register_comm_hook(None, self._comm_hook)

    def _comm_hook(self, process_group, bucket):  # no annotations: DDP checks them (GradBucket)
        group = process_group if process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        buffer = bucket.buffer().div_(world)
        fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()

        def step_bucket(f: torch.futures.Future) -> Tensor:
            reduced = f.value()[0]
            offset = 0
            for p in bucket.parameters():
                g = reduced[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                self._on_gradient(p, g, owned=False)
            return reduced

        return fut.then(step_bucket)

    def _hook(self, p: Tensor) -> None:
        if self._ddp is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                "LayerwiseOptimizer: a process group with several ranks is active but no DDP module is attached; the"
                " hook would step on the local gradient. Pass the DistributedDataParallel module, or call"
                " attach_ddp(ddp_model) after wrapping."
            )
        self._on_gradient(p, p.grad, owned=True)

    @torch.no_grad()
    def _on_gradient(self, p: Tensor, grad: Tensor, owned: bool) -> None:
        """A complete gradient of ``p`` for one backward pass. ``owned``: ``grad`` is ``p.grad``
        (hook mode), which we may free or leave to accumulate."""
        self.inner._check_dense(grad)  # before any state is touched
        if not self._handled:  # the step's first parameters: a setting fixing the state's layout changed is refused
            check_group_settings(self.inner)  # before any is stepped (lowmem.optim.group_layout)
            self._check_rounding()
            check_group_layouts(self.inner, settings=False)
        group = self._group_of[p]
        k = self._micro.get(p, 0) + 1
        self._micro[p] = k
        last = k >= self.accumulation_steps
        if self.accumulation_steps > 1 and owned and self._subspace_accumulation and self.inner._is_projected(p, group):
            if k == 1:
                self.inner.refresh_projection(p, grad, group)
                self._low[p] = self.inner.project(p, grad, group)
            else:
                self._low[p].add_(self.inner.project(p, grad, group))
            if last:
                self._step_param(p, grad, group, low=self._low.pop(p), owned=True)
            p.grad = None
            return
        if last:
            self._step_param(p, grad, group, owned=owned)
            if owned:
                p.grad = None
        # else: the gradient stays in p.grad and autograd adds the next micro-batch to it

    def _check_rounding(self) -> None:
        """``bf16_stochastic_round`` / ``kahan_summation`` checked again
        (:func:`~lowmem.optim.group_layout.check_rounding`, the error :meth:`LowMemOptimizer.step` gives) for a group
        whose parameters' dtypes changed since they were last checked here (``model.to(torch.float32)`` after
        construction: the option would no longer apply to anything). Before the ``check_group_layouts`` that compares
        the state with its parameters, as the plain step checks it first. Its cost at a step: a tuple of the dtypes of
        each such group's parameters."""
        seen = self.__dict__.setdefault("_rounding_dtypes", {})
        for i, group in enumerate(self.inner.param_groups):
            if not (group.get("bf16_stochastic_round") or group.get("kahan_summation")):
                continue
            now = tuple(p.dtype for p in group["params"])
            kept = seen.get(id(group))
            if kept is not None and kept[0] is group and kept[1] == now:
                continue
            check_rounding(group, f"parameter group {i} of optimizer '{self.inner.recipe.name}'")
            seen[id(group)] = (group, now)  # (the group kept alive: its id is not reused)

    def _new_step(self) -> None:
        self._handled.clear()
        self._nonfinite = False

    def _step_param(self, p: Tensor, grad: Tensor, group: dict, low: Tensor | None = None, owned: bool = False) -> None:
        """Step ``p`` from ``grad`` (or the accumulated projected gradient ``low``). ``owned``: the gradient (or
        ``low``) is freed after this step, so clipping scales it in place (no copy; the same values as
        ``clipped * coef``); a DDP bucket's view is scaled into a copy."""
        self._micro[p] = 0
        if p in self._handled:  # p's next gradient: a new step began (a loop that never calls step())
            self._new_step()
            self._steps_without_step_call += 1  # (refused at the next step(): _check_window)
        self._handled.add(p)
        if self._nonfinite:  # a non-finite gradient arrived earlier in this step: step nothing more
            return
        clipped = low if low is not None else grad
        # the norm is a reduction (no full-size temporary); a finite squared norm (in float32 at least)
        # proves every entry finite and the second-moment statistics safe from overflow
        norm_sq = float_norm(clipped, NORM_BLOCK).float().square()  # (check_bytes)
        if not math.isfinite(norm_sq.item()):  # (one host read, as bool() of a tensor; no temporaries: check_bytes)
            self._nonfinite = True
            # the step's global norm is this one (nan / inf), as the ordinary run's clip_grad_norm_ gives: the logged
            # grad_norm (trainers.hf.layerwise_grad_norm) and global_prev's next coefficient read it (USERAPI 2)
            self._sq_norm_sum = norm_sq
            self.inner.skipped_steps += 1
            warn_user(
                f"layerwise: non-finite gradient (or one whose squared norm overflows float32) for a"
                f" {tuple(p.shape)} parameter; it and every parameter whose"
                f" gradient comes later in this step are not stepped, but {len(self._handled) - 1} parameter(s)"
                " already stepped in this step from finite gradients (parameters are stepped as gradients"
                " arrive; this cannot be undone; the plain optimizer skips whole steps)"
                f" ({self.inner.skipped_steps} steps cut short so far)"
            )
            return
        self._sq_norm_sum = norm_sq if self._sq_norm_sum is None else self._sq_norm_sum + norm_sq
        if self.max_grad_norm is not None:
            if self.clip_mode == "per_param":
                coef = torch.clamp(self.max_grad_norm / (norm_sq.sqrt() + 1e-6), max=1.0)
            else:
                coef = self._clip_coef.to(clipped.device)
            clipped = clipped.mul_(coef.to(clipped.dtype)) if owned else clipped * coef.to(clipped.dtype)
        if low is not None:
            self.inner.step_param(p, grad, group=group, projected_grad=clipped)
        else:
            self.inner.step_param(p, clipped, group=group)

    # ---- the optimizer interface the Trainer uses ---------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """End of an accumulation window: parameters that missed micro-batches are stepped now with
        what they accumulated; the global norm for ``clip_mode="global_prev"`` is updated."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_window()
        for p in list(self._grad_checks):  # a loaded window closed without a backward pass: its .grad is the sum
            self._check_partial_grad(p)
        if not self._handled and not any(self._micro.values()):  # no gradient arrived in this window (only then)
            refuse_untrainable(self.inner.param_groups, f"LayerwiseOptimizer({self.inner.recipe.name!r})")
        for p, k in list(self._micro.items()):
            if k > 0:
                group = self._group_of[p]
                low = self._low.pop(p, None)
                if low is not None or p.grad is not None:
                    self._step_param(p, p.grad if p.grad is not None else torch.zeros_like(p), group, low=low,
                                     owned=True)
                    p.grad = None
                self._micro[p] = 0
        self._new_step()
        on_step = getattr(self.inner, "on_layerwise_step", None)  # BAdam: count the step, switch blocks
        if on_step is not None:
            on_step()
        if self._sq_norm_sum is not None and self.max_grad_norm is not None:
            total = self._sq_norm_sum.sqrt().cpu()
            if bool(torch.isfinite(total)):  # a step cut short by a non-finite gradient keeps the previous coefficient
                self._prev_norm = total
                self._clip_coef = global_prev_coef(self.max_grad_norm, total)
        self._sq_norm_sum = None
        return loss

    def _check_window(self) -> None:
        """Refuse a :meth:`step` call after more than one window of backward passes: the hooks stepped the
        parameters at the end of each window of ``accumulation_steps`` backward passes, so a caller that steps once
        per ``N > accumulation_steps`` (a ``transformers.Trainer`` with ``gradient_accumulation_steps=N`` given this
        optimizer through ``optimizers=``) got ``N / accumulation_steps`` optimizer steps per step, each on a
        partial gradient, silently (USERAPI 3). A loop that never calls ``step()`` is not concerned.

        Raises:
            ValueError: Naming ``accumulation_steps``, the Trainer's ``gradient_accumulation_steps`` and the fixes.
        """
        extra, self._steps_without_step_call = self._steps_without_step_call, 0
        if extra:
            n = self.accumulation_steps
            raise ValueError(
                f"LayerwiseOptimizer(accumulation_steps={n}) stepped the parameters {extra + 1} times since the last "
                f"step() call: each window of {n} backward pass(es) steps them from the gradient hooks, and step() "
                f"came after more (a Trainer with gradient_accumulation_steps > {n}?). Give the optimizer the caller's "
                "accumulation: LayerwiseOptimizer(..., accumulation_steps=<gradient_accumulation_steps>), or use "
                "lowmem.trainers.LowMemTrainer with LowMemTrainingArguments(lowmem_optim=..., lowmem_layerwise=True), "
                "which passes it")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (validated there: its hyperparameters, unknown keys) and hook its
        parameters, so they are stepped from their gradients like the others.

        Raises:
            ValueError: What the wrapped optimizer's ``add_param_group`` refuses (nothing is added then).
            NotImplementedError: With a ``DistributedDataParallel`` module attached: DDP reduces the parameters it
                had when it wrapped the model, so a parameter added later would never be stepped.
        """
        if "_group_of" not in self.__dict__:  # torch's __init__ adding its placeholder group (replaced by the inner's)
            super().add_param_group(param_group)
            return
        if self._ddp is not None:
            raise NotImplementedError(
                "LayerwiseOptimizer.add_param_group with a DistributedDataParallel module attached: DDP reduces only"
                " the parameters it wrapped, so the new ones would never be stepped; build the optimizer with them"
            )
        self.inner.add_param_group(param_group)
        group = self.inner.param_groups[-1]
        for p in group["params"]:
            self._group_of[p] = group
            self._handles.append(_register_hook(p, self._hook))

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict()`` plus ``"layerwise"`` (the clipping coefficient and the previous
        step's global norm, ``accumulation_steps``, the window in progress: :meth:`_window_state`); the hooks
        registered with ``register_state_dict_pre_hook`` / ``register_state_dict_post_hook`` run as in torch's."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = self.inner.state_dict()
        sd["layerwise"] = {"clip_coef": self._clip_coef.clone(), **self._window_state(),
                           "accumulation_steps": torch.tensor(self.accumulation_steps, dtype=torch.int64)}
        if self._prev_norm is not None:  # (the coefficient is recomputed from it with the loading max_grad_norm)
            sd["layerwise"]["prev_norm"] = self._prev_norm.clone()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` gave; the hooks registered with ``register_load_state_dict_pre_hook`` /
        ``register_load_state_dict_post_hook`` run as in torch's (a pre-hook may return a replacement)."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("layerwise", None)
        micro = (extra or {}).get("micro")
        if micro is not None and micro.numel() != len(self._params()):  # (before anything loads)
            raise ValueError(f"LayerwiseOptimizer.load_state_dict: the checkpoint's accumulation window counts "
                             f"{micro.numel()} parameters, this optimizer has {len(self._params())}")
        saved_n = (extra or {}).get("accumulation_steps")
        in_window = (micro is not None and bool((micro > 0).any())) or bool((extra or {}).get("low"))
        if saved_n is not None and in_window and int(saved_n) != self.accumulation_steps:
            raise ValueError(
                f"LayerwiseOptimizer.load_state_dict: the checkpoint was taken inside an accumulation window of "
                f"accumulation_steps={int(saved_n)} ({int(micro.max())} micro-batch(es) seen), this optimizer has "
                f"accumulation_steps={self.accumulation_steps}: the window would close on a mix of both lengths. Load it "
                f"with accumulation_steps={int(saved_n)}, or save the checkpoint at a window boundary (after step()), "
                "which loads into any accumulation_steps")
        self.inner.load_state_dict(state_dict)
        # torch's load_state_dict gives the inner optimizer new group dicts (with the saved lr):
        # route parameters and schedulers to those, not to the dicts we held before
        self.param_groups = self.inner.param_groups
        self._group_of = {p: g for g in self.inner.param_groups for p in g["params"]}
        self.state = self.inner.state
        if extra is not None:
            prev = extra.get("prev_norm")
            self._prev_norm = prev.detach().to("cpu", torch.float32, copy=True) if prev is not None else None
            # this optimizer's max_grad_norm applies from the first step (AUDIT-RESUME18 6: the saved coefficient was
            # the checkpoint's max_grad_norm's); an older checkpoint without the norm keeps its coefficient
            if prev is not None and self.max_grad_norm is not None:
                self._clip_coef = global_prev_coef(self.max_grad_norm, self._prev_norm)
            else:
                self._clip_coef = extra["clip_coef"].clone()
        self._load_window(extra or {})

    def _params(self) -> list[Tensor]:
        """The parameters in the order of the state dict's indices."""
        return [p for g in self.inner.param_groups for p in g["params"]]

    def _window_state(self) -> dict[str, Any]:
        """The accumulation window in progress, as tensors keyed by the state dict's parameter index: the
        micro-batches each parameter has seen (``micro``), the subspace accumulators (``low``) and the running
        squared gradient norm of the step (``sq_norm_sum``, only while a step is being taken). Between windows
        (where the Trainer saves): zero counts and nothing else."""
        params = self._params()
        index = {p: i for i, p in enumerate(params)}
        out: dict[str, Any] = {"micro": torch.tensor([self._micro.get(p, 0) for p in params], dtype=torch.int64)}
        if self._low:
            out["low"] = {str(index[p]): t.clone() for p, t in self._low.items()}
        if self._sq_norm_sum is not None:
            out["sq_norm_sum"] = self._sq_norm_sum.clone()
        return out

    def _load_window(self, extra: dict[str, Any]) -> None:
        """Restore the window :meth:`_window_state` saved; the window this optimizer was in is dropped (a checkpoint
        without one, e.g. an older one, leaves none: the next backward pass starts a window)."""
        params = self._params()
        micro = extra.get("micro")  # (its length is checked before the inner optimizer loads)
        self._micro = {p: int(k) for p, k in zip(params, micro.tolist())} if micro is not None else {}
        self._low = {}
        for i, t in (extra.get("low") or {}).items():
            p = params[int(i)]
            self._low[p] = t.to(device=p.device, copy=True)
        sq = extra.get("sq_norm_sum")
        self._sq_norm_sum = sq.clone() if sq is not None else None
        for handle in self._grad_checks.values():
            handle.remove()
        self._grad_checks = {}
        for p, k in self._micro.items():  # full-gradient partial sums live in .grad: checked before the next is added
            if k > 0 and p not in self._low:
                self._grad_checks[p] = p.register_hook(lambda grad, p=p: self._check_partial_grad(p))
        self._handled.clear()
        self._nonfinite = False
        self._steps_without_step_call = 0

    def _check_partial_grad(self, p: Tensor) -> None:
        """A parameter a loaded window left mid-window (``micro > 0``, not subspace-accumulated) must have its partial
        gradient in ``.grad`` when its next gradient arrives (a tensor hook: before autograd adds to ``.grad``) or at
        :meth:`step`: the state dict does not hold it, and without it the window closed on the micro-batches after the
        checkpoint alone, silently (AUDIT-RESUME18 7). Checked once per loaded window.

        Raises:
            ValueError: Naming the parameter (its index in the state dict and shape), the micro-batches the window has
                seen and the fix (restore ``.grad`` after ``load_state_dict``, or save at a window boundary).
        """
        handle = self._grad_checks.pop(p, None)
        if handle is not None:
            handle.remove()
        if p.grad is None and self._micro.get(p, 0) > 0:
            i = next(i for i, q in enumerate(self._params()) if q is p)
            raise ValueError(
                f"LayerwiseOptimizer: parameter {i} of shape {tuple(p.shape)}: the loaded checkpoint was taken inside an"
                f" accumulation window ({self._micro[p]} of {self.accumulation_steps} micro-batches seen) and the"
                " window's partial gradient (the parameter's .grad, which the optimizer's state dict does not hold)"
                " is missing: restore the parameters' .grad after load_state_dict (after building the optimizer:"
                " BAdam drops the .grad of the blocks it freezes), or save the checkpoint at a window boundary"
                " (after step())")

    def state_bytes(self) -> int:
        return self.inner.state_bytes()

    def step_transient_bytes(self) -> int:
        """The largest transient of stepping one parameter in its hook (:func:`layerwise_transient_bytes`): the
        inner optimizer's ``step_transient_bytes(per_parameter=True)`` (the hooks use no multi-tensor buckets)
        next to the non-finite check's norms, or the check itself (a low-precision gradient's float32 block,
        :func:`check_bytes`) when larger, plus, with ``max_grad_norm``, the clipping coefficient (and, stepped from
        DDP's communication hook, the clipped copy of the largest gradient; the hooks scale it in place).
        Gradients assumed in the parameter's dtype. The subspace accumulation buffers (``r x n`` per projected
        parameter, held across micro-batches) are state-like and not counted here."""
        inner = self.inner
        params = [p for g in inner.param_groups for p in g["params"]]
        grads = [(p.numel(), p.dtype, p.is_contiguous()) for p in params]
        return layerwise_transient_bytes(inner.step_transient_bytes(per_parameter=True), grads, inner._kept_gemm_bytes(),
                                         self.max_grad_norm, self.clip_mode,
                                         params[0].device.type if params else "cpu", ddp=self._ddp is not None)

    def __getstate__(self) -> dict[str, Any]:
        """Refused (``copy.deepcopy``, ``pickle``): the optimizer lives in hooks registered on the parameters, which a
        copy would neither move to the copied parameters nor keep (torch's ``__getstate__`` keeps only ``defaults``,
        ``state`` and ``param_groups``: the copy failed at its first step with an ``AttributeError``)."""
        raise TypeError(
            "LayerwiseOptimizer cannot be copied or pickled: it steps from hooks on the parameters. Copy the model,"
            " build a LayerwiseOptimizer on the copy and load_state_dict(optimizer.state_dict()) into it (a checkpoint"
            " continues bit for bit)"
        )

    def remove_hooks(self) -> None:
        """Detach from the parameters (the optimizer can no longer step); a loaded window's pending ``.grad``
        checks go too."""
        for h in [*self._handles, *self._grad_checks.values()]:
            h.remove()
        self._handles, self._grad_checks = [], {}

    def __repr__(self) -> str:
        return f"LayerwiseOptimizer({self.inner!r}, accumulation_steps={self.accumulation_steps})"
