"""BAdam (Luo et al. 2024): block coordinate descent over the model's layers, Adam on the active block.

The parameters are partitioned into blocks (parameter groups with a ``block`` id; from a model: one
block per decoder layer, ``...layers.<i>.``). Only the active block is stepped, by Adam, and only it
holds Adam's state; every ``switch_every`` steps the next block (``random`` reshuffling per
block-epoch, ``ascending`` or ``descending``) becomes active and the previous block's state is freed,
so the state is ``8 bytes x (parameters of the active block)``. With ``freeze_inactive`` (the
default, as the authors' ``BlockOptimizer``) the inactive parameters get ``requires_grad=False``, so
the backward pass computes and stores gradients for the active block only (and stops below it).

The schedule (the period, i.e. the number of switches so far, and the steps taken in it) is two
int64 tensors saved under ``"badam"`` in ``state_dict()``: a checkpoint loads with
``weights_only=True`` and a resumed run continues the same block, order and Adam state exactly.
It is also written into every parameter group (``badam_period``, ``badam_steps``: plain ints),
because ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` (what accelerate and the
Trainer save under FSDP2) keeps only ``state`` and ``param_groups`` and drops the ``"badam"`` entry.
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..engine import LowMemOptimizer, Recipe
from ..functional.badam import ORDERS, badam_block_position
from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam, is_bool, one_of, optional, positive_int
from ..moments import AdamMoments
from ..registry import decay_parameter_names, register
from ..sharded import is_dtensor, local


def _nonneg_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


BADAM_HPARAMS = (
    LR(1e-3), BETAS(), EPS(1e-8), WEIGHT_DECAY(0.0),
    HParam("switch_every", 100, positive_int, "an int > 0", "Adam steps on a block before switching (K in the paper)"),
    HParam("switch_mode", "random", one_of(*ORDERS), f"one of {list(ORDERS)}",
           "block order: random reshuffling per block-epoch, ascending (input to output) or descending"),
    HParam("start_block", None, optional(_nonneg_int), "None or an int >= 0",
           "the block id to start from (ascending / descending); None: the first in the order"),
    HParam("seed", 0, _nonneg_int, "an int >= 0", "seed of the random block order (block-epoch e uses seed + e)"),
    HParam("freeze_inactive", True, is_bool, "a bool",
           "set requires_grad=False on the parameters of inactive blocks (no gradient is computed for them)"),
    HParam("master_weights", True, is_bool, "a bool",
           "keep a float32 copy of the active block's bf16 / fp16 parameters, stepped in float32 (the authors')"),
    HParam("include_embedding", False, is_bool, "a bool",
           "create_optimizer(model): the input embedding is a block of its own (else it is frozen)"),
    HParam("include_lm_head", False, is_bool, "a bool",
           "create_optimizer(model): the output head and the other parameters outside the layers are a block (else frozen)"),
)
#: Hyperparameters of the whole optimizer (the schedule): every parameter group must agree.
OPTIMIZER_WIDE = ("switch_every", "switch_mode", "start_block", "seed", "freeze_inactive", "master_weights",
                  "include_embedding", "include_lm_head")
_LOW_PRECISION = (torch.bfloat16, torch.float16)

BADAM = Recipe(
    name="badam",
    summary="BAdam: block coordinate descent over layers, Adam (and its state) on the active block only",
    reference="Luo et al. 2024, BAdam: A Memory Efficient Full Parameter Optimization Method for Large Language Models, Algorithm 1",
    moment=AdamMoments(eps_placement="torch"),
    hparams=BADAM_HPARAMS,
    group_hparams=(HParam("block", None, optional(_nonneg_int), "None or an int >= 0",
                          "the block this group belongs to (None: block 0)"),),
)


def _check_same_schedule(defaults: dict[str, Any], saved_groups: list[dict[str, Any]]) -> None:
    """A checkpoint's optimizer-wide settings (:data:`OPTIMIZER_WIDE`: the block order, its seed, the switch interval,
    ...) are this optimizer's. torch's ``load_state_dict`` would put the saved values in the groups while the
    schedule reads ``defaults`` (the constructor's), so the resumed run followed neither; with another ``seed`` or
    ``switch_mode`` the active block changed under the saved Adam state. A group without the key (a checkpoint
    from before it existed) is not checked. ``freeze_inactive`` changes neither the math nor the state (only whether
    inactive gradients are computed; DDP needs it off): the constructor's value is put in ``saved_groups``, so a
    checkpoint of one process resumes on several.

    Raises:
        ValueError: Naming each setting, the checkpoint's value and this optimizer's."""
    differ = {}
    for g in saved_groups:
        if "freeze_inactive" in g:
            g["freeze_inactive"] = defaults["freeze_inactive"]
        for k in OPTIMIZER_WIDE:
            if k in g and g[k] != defaults[k]:
                differ.setdefault(k, g[k])
    if differ:
        listed = ", ".join(f"{k}={v!r} (this optimizer: {defaults[k]!r})" for k, v in differ.items())
        raise ValueError(f"badam: the checkpoint was saved with {listed}; these settings fix the block schedule and "
                         "the state it holds: build the optimizer with the checkpoint's values to resume it")


def _check_active_block_state(opt: "BAdam") -> None:
    """After a load: a block stepped since its switch (``steps > 0``) holds Adam's state. Without it
    the resumed run would restart the block's moments silently; that is what ``torch.distributed.checkpoint``
    gives when the new optimizer's request (the state it holds before loading) lacks the saved block's
    entries (:meth:`BAdam.prepare_load` not called)."""
    if opt._steps == 0:
        return
    groups = opt._active_groups()
    if any(opt.state.get(p) for g in groups for p in g["params"]):
        return
    raise ValueError(
        f"badam: the checkpoint's schedule is {opt._steps} step(s) into block {opt.active_block}, but none of that "
        "block's parameters has Adam state in it, so the run would restart the block's moments. "
        "torch.distributed.checkpoint (FSDP2) loads only the entries the new optimizer holds when it asks: call "
        f"optimizer.prepare_load({opt._period}, {opt._steps}) (the checkpoint's badam_period, badam_steps) before "
        "get_optimizer_state_dict / dcp.load (LowMemTrainer does; docs/distributed.md)")


#: Set on a parameter while BAdam keeps it frozen (an inactive block's): :func:`block_groups` still puts it in
#: its block, so a second BAdam built on the same model (to load a checkpoint) gets the same groups.
_FROZEN_BY_BADAM = "_lowmem_badam_frozen"

#: The schedule as written into every parameter group of ``state_dict()``: group key -> attribute.
_SCHEDULE_KEYS = {"badam_period": "_period", "badam_steps": "_steps"}


def _check_freeze_allowed(freeze_inactive: bool) -> None:
    """Freezing is refused with several processes: DDP registers the parameters that require
    gradients when it wraps the model, so a block unfrozen later would train on each rank's local
    gradient, the ranks drifting apart silently."""
    if freeze_inactive and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("Invalid freeze_inactive=True for optimizer 'badam' with several processes (DDP, FSDP): use "
                         "freeze_inactive=False (every gradient is then computed and all-reduced; only the active "
                         "block is stepped)")


def _unhooked(step: Any) -> Any:
    """``step`` without torch's hook wrapper: ``Optimizer._patch_step_function`` wraps a class's ``step`` in
    ``profile_hook_step`` (which runs the step pre / post hooks) when the first instance of that class is built, so
    ``LowMemOptimizer.step`` is wrapped once any plain ``LowMemOptimizer`` exists in the process; called through
    ``super()`` from :meth:`BAdam.step` (itself wrapped) it would run every hook twice."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class BAdam(LowMemOptimizer):
    """BAdam (Luo et al. 2024): Adam on one block of parameters at a time.

    ``create_optimizer(model, "badam")`` makes one block per decoder layer (parameter names with
    ``layers.<i>.``, in the order of ``model.named_parameters()``), as the authors'
    ``BlockOptimizer``: the input embedding and the output head (with any other parameter outside the
    layers) are frozen unless ``include_embedding`` / ``include_lm_head`` make them blocks of their
    own. A model without ``layers.<i>.`` names gets one block per top-level child module. Parameters
    given as a list form one block (Adam whose state restarts every ``switch_every`` steps); groups
    with a ``block`` id form several.

    Args:
        params: Parameters or parameter groups (with optional ``block`` ids).
        lr (`float`, defaults to `1e-3`): Learning rate.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): Adam's moment decay rates.
        eps (`float`, defaults to `1e-8`): Added to ``sqrt(v_hat)`` (torch's placement).
        weight_decay (`float`, defaults to `0.0`): Decoupled weight decay of the active block.
        switch_every (`int`, defaults to `100`): Adam steps per block (``K``; the authors' README
            uses 100, their ``BlockOptimizer`` defaults to 50).
        switch_mode (`str`, defaults to `"random"`): ``"random"`` (a new permutation every
            block-epoch), ``"ascending"`` or ``"descending"``.
        start_block (`int` or `None`, defaults to `None`): First block id (ascending / descending).
        seed (`int`, defaults to `0`): Seed of the random order.
        freeze_inactive (`bool`, defaults to `True`): Set ``requires_grad=False`` on the inactive
            blocks' parameters (BAdam's gradient and backward savings). ``False`` keeps every
            ``requires_grad`` as it is: the inactive gradients are computed and ignored (needed
            under DDP, whose reducer expects every gradient).
        master_weights (`bool`, defaults to `True`): For bf16 / fp16 parameters, keep a float32
            copy of the active block (state ``"master"``, 4 bytes per parameter of the block, freed
            at a switch), step it and copy it back rounded, as the authors' ``BlockOptimizer``
            does; ``False`` rounds every step into the parameter (lowmem's usual behaviour). Not
            for FSDP2 (sharded) parameters, which are stepped like every engine optimizer's.
        include_embedding (`bool`, defaults to `False`): With a model: the embedding is a block.
        include_lm_head (`bool`, defaults to `False`): With a model: the head (and the other
            parameters outside the layers) is a block.
        state_dtype (`str`, defaults to `"float32"`): Storage of Adam's moments.
        foreach (`bool` or `None`, defaults to `None`): Multi-tensor path for the active block.
    """

    recipe = BADAM

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        switch_every: int = 100,
        switch_mode: str = "random",
        start_block: int | None = None,
        seed: int = 0,
        freeze_inactive: bool = True,
        master_weights: bool = True,
        include_embedding: bool = False,
        include_lm_head: bool = False,
        *,
        state_dtype: str = "float32",
        foreach: bool | None = None,
    ):
        # the schedule: switches so far and steps taken on the active block (Python ints here, no host
        # reads in a step; int64 tensors in state_dict(): weights_only checkpoints)
        self._period = 0
        self._steps = 0
        self._active: int | None = None  # the active block id, cached for the current period
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, switch_every=switch_every,
            switch_mode=switch_mode, start_block=start_block, seed=seed, freeze_inactive=freeze_inactive,
            master_weights=master_weights, include_embedding=include_embedding, include_lm_head=include_lm_head,
            state_dtype=state_dtype, foreach=foreach,
        )
        _check_freeze_allowed(freeze_inactive)
        if start_block is not None:
            if switch_mode == "random":
                raise ValueError(f"Invalid start_block={start_block!r} for optimizer 'badam': it applies to switch_mode "
                                 "'ascending' / 'descending' (the random order starts from its permutation)")
            if start_block not in self.block_ids():
                raise ValueError(f"Invalid start_block={start_block!r} for optimizer 'badam': expected one of the "
                                 f"block ids {self.block_ids()}")
        self._apply_freeze()

    # ---- blocks and the schedule --------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._active = None  # a new block may change the order
        group = self.param_groups[-1]
        for k in OPTIMIZER_WIDE:
            if group[k] != self.defaults[k]:
                self.param_groups.pop()
                raise ValueError(f"Invalid {k}={group[k]!r} in parameter group {len(self.param_groups)} of optimizer "
                                 f"'badam': it is a setting of the whole optimizer ({self.defaults[k]!r}); give it to "
                                 "the constructor")

    @staticmethod
    def _block_of(group: dict[str, Any]) -> int:
        return 0 if group.get("block") is None else group["block"]

    def block_ids(self) -> list[int]:
        """The ids of the blocks, sorted (the order ``ascending`` visits them in)."""
        return sorted({self._block_of(g) for g in self.param_groups})

    @property
    def active_block(self) -> int:
        """The id of the block stepped now."""
        if self._active is None:
            ids = self.block_ids()
            d = self.defaults
            start = None if d["start_block"] is None else ids.index(d["start_block"])
            self._active = ids[badam_block_position(self._period, len(ids), d["switch_mode"], start, d["seed"])]
        return self._active

    def _active_groups(self) -> list[dict[str, Any]]:
        active = self.active_block
        return [g for g in self.param_groups if self._block_of(g) == active]

    def _apply_freeze(self) -> None:
        """``requires_grad`` on for the active block's parameters, off for the others (``freeze_inactive``)."""
        if not self.defaults["freeze_inactive"]:
            return
        active = self.active_block
        for g in self.param_groups:
            for p in g["params"]:
                p.requires_grad_(self._block_of(g) == active)
                setattr(p, _FROZEN_BY_BADAM, self._block_of(g) != active)  # (block_groups still counts it)
                if self._block_of(g) != active:
                    p.grad = None

    def _advance(self) -> None:
        """One step taken: after ``switch_every`` of them free the block's state and switch."""
        self._steps += 1
        if self._steps < self.defaults["switch_every"]:
            return
        index = self.__dict__.get("_sr_index")  # (the rounding's map of step counters: LowMemOptimizer._param_index)
        for g in self._active_groups():
            for p in g["params"]:
                freed = self.state.pop(p, None)  # the next visit starts Adam afresh (the authors clear the state too)
                if index is not None and freed and isinstance(freed.get("step"), Tensor):
                    index.pop(id(freed["step"]), None)  # (forgotten with it: the map does not grow per switch)
        self._period += 1
        self._steps = 0
        self._active = None
        self._apply_freeze()

    # ---- the engine's per-parameter step, restricted to the active block ------------------------

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor], key: Tensor | None = None) -> None:
        super()._init_state(p, group, state, key=key)  # (key: the FSDP2 parameter of a local shard)
        if group["master_weights"] and p.dtype in _LOW_PRECISION and not any(is_dtensor(q) for q in group["params"]):
            state["master"] = p.detach().float()  # the float32 copy of a low-precision parameter (meta: sized only)

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        if self._block_of(group) != self.active_block:
            return
        key = kwargs.pop("key", None)
        key = p if key is None else key
        if not (group["master_weights"] and p.dtype in _LOW_PRECISION) or kwargs.get("reduce") is not None:
            super()._update(p, grad, group, *args, key=key, **kwargs)  # (FSDP2 shards: no master copy)
            return
        state = self.state[key]
        if "step" not in state:
            self._init_state(p, group, state)
        master = state["master"]
        super()._update(master, grad, group, *args, key=key, **kwargs)  # the float32 copy takes the step
        p.copy_(master)

    def _rounding_epoch(self) -> int:
        """The block period (saved in the ``"badam"`` entry): a re-activated block's step count starts at 1 again,
        so ``bf16_stochastic_round`` draws new bits per activation (a resumed run the uninterrupted run's)."""
        return self._period

    def _foreach_ok(self, p: Tensor, group: dict[str, Any], *args: Any, **kwargs: Any) -> bool:
        return self._block_of(group) == self.active_block and super()._foreach_ok(p, group, *args, **kwargs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """The engine's step on the active block (gradients of other blocks are ignored, but a
        non-finite one still skips the step); a skipped step does not count towards ``switch_every``."""
        skipped = self.skipped_steps
        loss = _unhooked(LowMemOptimizer.step)(self, closure)
        if self.skipped_steps == skipped:
            self._advance()
        return loss

    def on_layerwise_step(self) -> None:
        """End of a step in layerwise mode (:class:`~lowmem.optim.layerwise.LayerwiseOptimizer` steps
        the parameters from their hooks, then calls this)."""
        self._advance()

    # ---- state ----------------------------------------------------------------------------------

    def materialize_state(self) -> None:
        """Allocate the active block's state (the only state BAdam holds)."""
        for group in self._active_groups():
            for p in group["params"]:
                if not self.state[p]:
                    self._init_state(local(p), group, self.state[p], key=p)

    def step_transient_bytes(self, per_parameter: bool = False, first_step: bool = False) -> int:
        """The largest transient of a step of the active block (:meth:`LowMemOptimizer.step_transient_bytes`), its
        non-finite check over every gradient the step reads (:meth:`_check_bytes`). Right after a switch the new
        block has no state until its first step: its step is counted with the state that step makes, allocated
        for the count and freed again (:meth:`_fresh_block_state`, as :meth:`state_dict` does; on meta tensors
        torch's fused AdamW kernel, which the first step takes, would not be seen to apply), as the step that
        makes the state (the engine's ``first_step=True``, whatever ``first_step`` says: FOUND_EST18 4);
        ``first_step`` is passed on for a block that has stepped."""
        groups = self.param_groups
        with self._fresh_block_state() as fresh:
            self.param_groups = self._active_groups()
            self._checked_groups = None if self.defaults["freeze_inactive"] else groups
            try:
                return super().step_transient_bytes(per_parameter, first_step=first_step or fresh)
            finally:
                self.param_groups, self._checked_groups = groups, None

    @contextlib.contextmanager
    def _fresh_block_state(self) -> Iterator[bool]:
        """Right at a switch (no step taken on the active block): its state as its first step makes it
        (:meth:`materialize_state`) for the body, then removed again (an entry that was empty is left empty).
        Yields whether it made any."""
        fresh = {}  # parameter -> whether it had an (empty) entry
        if self._steps == 0:
            fresh = {p: p in self.state for g in self._active_groups() for p in g["params"] if not self.state.get(p)}
            self.materialize_state()
        try:
            yield bool(fresh)
        finally:
            for p, had_entry in fresh.items():
                if had_entry:
                    self.state[p] = {}
                else:
                    self.state.pop(p, None)

    _checked_groups: list[dict[str, Any]] | None = None

    def _check_bytes(self) -> int:
        """The non-finite check (:meth:`LowMemOptimizer._check_bytes`) of every gradient :meth:`step` reads: with
        ``freeze_inactive=False`` the inactive blocks' too (they are computed, and a non-finite one skips the
        step), not only the active block's whose step :meth:`step_transient_bytes` counts."""
        if self._checked_groups is None:
            return super()._check_bytes()
        active = self.param_groups
        self.param_groups = self._checked_groups
        try:
            return super()._check_bytes()
        finally:
            self.param_groups = active

    def prepare_load(self, period: int, steps: int) -> None:
        """Before a ``torch.distributed.checkpoint`` load of a checkpoint saved at schedule ``(period, steps)``
        (its parameter groups' ``badam_period`` / ``badam_steps``): DCP fills only the entries this optimizer
        holds when it asks (``get_optimizer_state_dict``), so take the checkpoint's schedule and allocate the
        active block's state, as the checkpoint holds it (at ``steps == 0`` the fresh state :meth:`state_dict`
        adds; a state that is not empty also keeps DCP from its initialising step, which would count a step).
        (``LowMemTrainer`` calls it under FSDP2.)"""
        self._period, self._steps, self._active = int(period), int(steps), None
        for p in list(self.state):
            self.state.pop(p)
        self.materialize_state()
        self._apply_freeze()

    def state_dict(self) -> dict[str, Any]:
        # Right at a switch the active block has no state yet (it is allocated at its first step); a DCP load
        # asks for the entries the new optimizer has after DCP's initialising step, which allocates them: so
        # the returned dict holds them too (as _init_state makes them), and load_state_dict drops them again.
        with self._fresh_block_state():
            sd = super().state_dict()
        # an (empty) entry for every parameter without state (the inactive blocks): torch.distributed.checkpoint's
        # set_optimizer_state_dict refuses a parameter that requires gradients without one ("Missing optimizer
        # state for parameter"). Only in the returned dict: self.state keeps no entry (accelerate's prepare
        # round-trips the state dict before it swaps the parameters for FSDP2's, which would leave stale keys).
        for group in sd["param_groups"]:
            for pid in group["params"]:
                sd["state"].setdefault(pid, {})
        sd["badam"] = {"period": torch.tensor(self._period, dtype=torch.int64),
                       "steps": torch.tensor(self._steps, dtype=torch.int64)}
        for group in sd["param_groups"]:  # (what torch.distributed.checkpoint keeps: see the module docstring)
            group.update({k: getattr(self, a) for k, a in _SCHEDULE_KEYS.items()})
        return sd

    def _masters_for_dtypes(self, state: dict[Any, Any], groups: list[dict[str, Any]]) -> dict[Any, Any]:
        """The saved state fitted to the parameters' dtypes now, as torch casts a state to its parameter's dtype on
        load: a low-precision parameter (with ``master_weights``) whose saved state has no ``"master"`` (saved
        from float32 parameters) gets its float32 copy of the parameter as loaded, what a fresh visit starts
        from; a float32 parameter drops a saved ``"master"`` (saved from bf16 / fp16 parameters; the parameter
        itself is the float32 copy). Other dtypes are cast by the engine's load."""
        out = dict(state)
        for saved, mine in zip(groups, self.param_groups):
            if any(is_dtensor(q) for q in mine["params"]):
                continue  # (FSDP2 shards keep no master copy)
            for pid, p in zip(saved.get("params", []), mine["params"]):
                entry = out.get(pid)
                if not entry:
                    continue
                wants = mine["master_weights"] and p.dtype in _LOW_PRECISION
                if wants and "master" not in entry:
                    out[pid] = {**entry, "master": p.detach().float()}
                elif not wants and "master" in entry:
                    out[pid] = {k: v for k, v in entry.items() if k != "master"}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The engine's load (:meth:`LowMemOptimizer.load_state_dict`) of the checkpoint's active block's state and
        schedule, then the check of that state and the freezing of the inactive blocks. torch's hooks run around
        the whole of it, as torch runs them: the pre-hooks first on the dict as given (its ``"badam"`` entry
        included; a dict one returns is the one loaded), the post-hooks last, on the fully loaded BAdam (the
        checkpoint's active block, ``requires_grad`` set), and not after a refused load
        (``tests/test_ckptleft_badam_hooks.py``; run inside the engine's load, a post-hook saw the old block's
        ``requires_grad``)."""
        state_dict = state_dict.copy()
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        for hook in pre.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()  # (the engine's load runs none of them)
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            self._load_badam(state_dict)
        finally:  # (the same dicts: the hooks' handles remove from them)
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre, post
        for hook in post.values():
            hook(self)

    def _load_badam(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        schedule = state_dict.pop("badam", None)
        groups = [dict(g) for g in state_dict.get("param_groups", [])]
        if len(groups) != len(self.param_groups):  # (torch's message would not say why or what to do)
            raise ValueError(
                f"badam: the state dict has {len(groups)} parameter groups (blocks "
                f"{sorted({self._block_of(g) for g in groups})}), this optimizer {len(self.param_groups)} (blocks "
                f"{self.block_ids()}): build it as the saved one was built, e.g. create_optimizer(model, 'badam', ...) "
                "on the same model (block_groups: a decayed and an undecayed group per block)")
        _check_same_schedule(self.defaults, groups)
        in_groups = {(g.pop("badam_period", None), g.pop("badam_steps", None)) for g in groups}
        state_dict["param_groups"] = groups
        if schedule is not None:
            period, steps = int(schedule["period"]), int(schedule["steps"])
        elif len(in_groups) == 1 and None not in next(iter(in_groups)):
            period, steps = next(iter(in_groups))
        else:
            raise ValueError("badam: the state dict has no block schedule (a 'badam' entry, or 'badam_period' / "
                             f"'badam_steps' in every parameter group; found {sorted(in_groups, key=str)}); it was not "
                             "saved by BAdam")
        kept_schedule = self._period, self._steps
        self._period, self._steps, self._active = int(period), int(steps), None
        # BAdam holds state for the active block only, and only once it has stepped: anything else in the dict
        # (the empty entries of state_dict(), the fresh ones at a switch, what DCP's initialising step of a new
        # optimizer allocated) is dropped
        active = self.active_block
        kept = set()
        if self._steps > 0:
            for saved, mine in zip(groups, self.param_groups):
                if self._block_of(mine) == active:
                    kept.update(saved.get("params", []))
        state_dict["state"] = {k: v for k, v in state_dict.get("state", {}).items() if k in kept}
        state_dict["state"] = self._masters_for_dtypes(state_dict["state"], groups)
        kept = self.param_groups, self.state
        try:
            super().load_state_dict(state_dict)
            _check_active_block_state(self)
        except Exception:  # (the engine restores its groups and state on its own errors; this check's too)
            self.param_groups, self.state = kept
            (self._period, self._steps), self._active = kept_schedule, None
            raise
        self._apply_freeze()


# ---- blocks from a model ---------------------------------------------------------------------------

_LAYER = re.compile(r"^(.*?(?:^|\.)layers\.\d+\.)")
_EMBED = re.compile(r"^(.*embed[^.]*\.)")


def block_groups(model: nn.Module, weight_decay: float | None = None, include_embedding: bool = False,
                 include_lm_head: bool = False, freeze_inactive: bool = True, **_: Any) -> list[dict[str, Any]]:
    """BAdam's partition of ``model`` into parameter groups with ``block`` ids (the authors'
    ``infer_param_groups``): one block per decoder layer (names matching ``...layers.<i>.``), in the
    order of ``named_parameters()``; the embedding (``...embed*.``) a block when
    ``include_embedding``; the head and every other parameter one last block when
    ``include_lm_head``. Trainable: parameters that require gradients, and those a BAdam froze as
    inactive (so a second BAdam on the same model has the same blocks and loads the first one's
    ``state_dict``). Parameters in no block are frozen (``requires_grad=False``) when
    ``freeze_inactive``. A model without ``layers.<i>.`` names: one block per top-level child
    module (and one for the module's own parameters). Each block is split into a decayed group and
    an undecayed one (biases and norm weights, the Trainer's rule)."""
    spec = {h.name: h for h in BADAM_HPARAMS}
    for name, value in (("include_embedding", include_embedding), ("include_lm_head", include_lm_head),
                        ("freeze_inactive", freeze_inactive)):
        spec[name].validate(value, where="optimizer 'badam'")  # before any parameter is frozen
    _check_freeze_allowed(freeze_inactive)
    named = []
    seen: set[int] = set()
    for n, p in model.named_parameters():
        # (a parameter another BAdam froze, an inactive block's, is trainable: the same blocks, so that a
        # fresh BAdam on the model loads that one's state_dict)
        if (p.requires_grad or getattr(p, _FROZEN_BY_BADAM, False)) and id(p) not in seen:
            seen.add(id(p))
            named.append((n, p))
    if not named:
        raise ValueError("the model has no trainable parameters")
    layered = any(_LAYER.match(n) for n, _ in named)
    keys: list[str] = []
    key_of: dict[int, str | None] = {}
    for n, p in named:
        if layered:
            m = _LAYER.match(n) or (_EMBED.match(n) if include_embedding else None)
            key = m.group(1) if m else ("<rest>" if include_lm_head else None)
        else:
            key = n.split(".", 1)[0] + "." if "." in n else "<root>"
        key_of[id(p)] = key
        if key is not None and key not in keys:
            keys.append(key)
    if "<rest>" in keys:  # the head and the rest: the last block, as the authors append it
        keys.remove("<rest>")
        keys.append("<rest>")
    decay = decay_parameter_names(model)
    wd = {} if weight_decay is None else {"weight_decay": weight_decay}
    groups = []
    for b, key in enumerate(keys):
        members = [(n, p) for n, p in named if key_of[id(p)] == key]
        decayed = [p for n, p in members if n in decay]
        plain = [p for n, p in members if n not in decay]
        if decayed:
            groups.append({"params": decayed, "block": b, **wd})
        if plain:
            groups.append({"params": plain, "block": b, "weight_decay": 0.0})
    if not groups:
        raise ValueError("badam: no parameter of the model is in a block (include_embedding / include_lm_head?)")
    if freeze_inactive:
        for n, p in named:
            if key_of[id(p)] is None:
                p.requires_grad_(False)
    return groups


register(BADAM, BAdam, state_precision="fp32", second_moment="full", group_builder=block_groups,
         example_hparams={"switch_every": 6, "freeze_inactive": False})

__all__ = ["BADAM", "BAdam", "block_groups"]
