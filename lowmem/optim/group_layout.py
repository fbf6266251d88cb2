"""Settings that fix the state's layout, changed in ``param_groups`` between steps: refused at the next step.

A parameter's state is allocated from its group's settings (:meth:`LowMemOptimizer._init_state`): GaLore's
``rank`` and ``proj_type`` shape its basis and moments, 8-bit ``block_size`` / ``min_quant_size`` its codes,
Adam-mini's ``block`` and Subset-Norm's ``subset_size`` its second moment, MicroAdam's ``m`` its window, Muon's
``use_muon`` which state it has at all. torch's optimizers read every group value at each step, so a scheduler or a
callback may change ``lr``, ``betas``, ... in ``param_groups`` (those stay live here too); a change of a layout
setting would otherwise be ignored (the state keeps the old layout and the old meaning) or crash in the middle of
a step, after earlier parameters were updated. :func:`check_group_layouts` refuses it first, with a
``ValueError`` naming the group, the setting, the old and the new value.

Which settings fix the layout is not a list: it is read off the code that builds the state. The first time a
group is seen, :meth:`_init_state` runs on a meta-device twin of the parameter (nothing allocated, :func:`meta_layout`;
a sharded one on fake tensors) over a dict that records the keys it reads (:class:`_Reads`), once per distinct
parameter shape: those keys are the group's candidates, and their values are kept. At every step each group's candidate values are compared with
the kept ones (a tuple compare, no tensor work). A candidate that the recipe's moment rule summarizes
(:meth:`~lowmem.optim.moments.MomentRule.route_settings`: Subset-Norm's ``betas`` / ``momentum`` as
``(b1 > 0, b1 == 0)``, which is all its state is made from) is compared by that summary when its value differs, so
a scheduler cycling ``b1`` within ``(0, 1)`` (``OneCycleLR``'s ``cycle_momentum``) probes nothing; ``b1`` crossing 0
changes the summary. Only when a value (or summary) differs is the layout probed, under the kept and
the new settings, for each parameter with state: equal layouts (e.g. GaLore's ``projection`` ``svd`` ->
``random``, ``moment_policy``: read when the state is made, the same state) make the new values the kept ones;
another layout raises. A group first seen whose parameters already have state (loaded by ``load_state_dict``,
materialized) is checked once against the layout its settings give (a setting changed after the load). The same
settings are what ``load_state_dict`` compares
(:func:`~lowmem.optim.sharded.check_same_settings`: a checkpoint of another layout is refused there).

The same check refuses a parameter resized after its state was made (``p.data = ...`` of another shape, what
``resize_token_embeddings`` does to an embedding whose optimizer was built before; :func:`_check_resized`): the
snapshot keeps the shape and dtype each parameter's state was made for, compared with the parameter's own, not
with the state's tensors, whose shapes differ from the parameter's by design (factored, projected, quantized,
Adam-mini's blocks, FSDP2 shards: a sharded parameter's shape is its global one). A parameter without state takes
its new shape (its state is made for it); a changed dtype is refused only where the state's layout depends on it
(``state_dtype="param"``). When: :meth:`LowMemOptimizer.step` looks every stepped parameter's cached path up
(:meth:`LowMemOptimizer._route`, keyed by its shape and dtype among others) before anything is stepped; a path
decided again names its group, whose parameters are then compared (:func:`check_resized`), and a cached path means
the parameter's shape and dtype are those it had when they were compared, so a step whose paths are all cached
compares nothing (issue 15: the compare at every step cost about 0.15 us per parameter, 14 us a step on 100
parameters). A sharded parameter (no cached path) or a subclass that decides its paths at every step (BAdam) has
its group compared at every step. A parameter without a gradient is not stepped and not compared by the step:
resized, it is refused at the first step it has a gradient, or by :func:`check_state_fits` (below). :class:`~lowmem.optim.layerwise.LayerwiseOptimizer`'s hooks compare
every parameter at the step's first one (:func:`check_group_layouts`). A group's snapshot taken again after a
setting changed (the same layout) keeps the shapes and dtypes, so a parameter resized in that step is still refused.

A sharded parameter re-sharded at the same global shape (another device mesh or placements: ``Shard(0)`` ->
``Shard(1)`` / ``Replicate()``, ``fully_shard`` applied again) is refused the same way, naming both placements: the
snapshot of a group with sharded parameters keeps their ``(device mesh, placements)`` and local shapes too, compared
where the shapes are (a sharded parameter's group: at every step; about 0.4 us a parameter, docs/distributed.md
"Re-sharded parameters").

:func:`check_state_fits` compares every parameter with state, gradient or not, and the settings: called first by
``LowMemOptimizer.state_dict()``, so that a checkpoint never holds state of a parameter's old shape or placement
(every later load would refuse it; a load itself needs no such check, ``load_state_dict`` checks every loaded entry
against the parameter it is loaded for, and per-shard state against the placements it was saved under:
:func:`~lowmem.optim.sharded.check_saved_placement`). Its cost is that of the compare (about 0.3 us a parameter), at
a checkpoint, nothing at a step.

:func:`check_group_settings`, which :func:`check_group_layouts` calls first (from a step and from the layerwise hooks,
not from ``state_dict()``), refuses any setting written into a group with a value its recipe's ``HParam`` refuses (a
user's ``beta2 = 1.5``, ``lr = -1.0``): the construction's ``Invalid <name>=...`` error, naming the group, before
anything is stepped. It validates only the values that changed since its last check (a steady step: one tuple compare
per group, about 1.2 us hot / 3 us inside a step; OneCycleLR's ``lr`` + ``betas`` write: about 10 us inside a step,
100 parameters, 2026-12-01). A key added to a group later that reads as a misspelled setting (``betas1``,
``weight_decy``: :func:`~lowmem.optim.hparams.misspelled_settings`) is refused the same way, with the construction's
hint; other added keys (schedulers' ``initial_lr``, ``max_momentum``, ..., a library's own tags) are accepted, as
torch.optim accepts them (the group's keys compared as one tuple: about 0.12 us a group more a step). An optimizer
that does not step with its ``lr`` (Adafactor's ``relative_step``) checks an ``lr`` written later itself
(``_check_written_lr``: :func:`_written_lr`).
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .hparams import check_written_keys
from .sharded import is_dtensor, local, state_layout

_MISSING = object()  # (a key the group does not have)


class _Reads(dict):
    """A copy of a group's dict that records the keys read from it (``read``); iterating it, or copying it
    with ``dict(...)`` / ``{**...}``, counts as reading every key."""

    def __init__(self, group: dict[str, Any]) -> None:
        super().__init__(group)
        self.read: set[str] = set()

    def __getitem__(self, k: str) -> Any:
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k: str, default: Any = None) -> Any:
        self.read.add(k)
        return super().get(k, default)

    def __contains__(self, k: object) -> bool:
        self.read.add(k)  # type: ignore[arg-type]
        return super().__contains__(k)

    def setdefault(self, k: str, default: Any = None) -> Any:
        self.read.add(k)
        return super().setdefault(k, default)

    def _all(self) -> None:
        self.read.update(super().keys())

    def __iter__(self):  # type: ignore[override]
        self._all()
        return super().__iter__()

    def keys(self):  # type: ignore[override]
        self._all()
        return super().keys()

    def items(self):  # type: ignore[override]
        self._all()
        return super().items()

    def values(self):  # type: ignore[override]
        self._all()
        return super().values()


def layout(opt: Any, p: Tensor, group: dict[str, Any]) -> dict[str, tuple]:
    """``{entry: (shape, dtype)}`` of what ``opt`` allocates for ``p`` under ``group``'s settings, without
    allocating it (the layout ``load_state_dict`` compares): for an unsharded ``p``, :meth:`_init_state` of a
    meta-device twin (:func:`meta_layout`), for a sharded one on fake tensors
    (:func:`~lowmem.optim.sharded.state_layout`)."""
    if is_dtensor(p):
        return state_layout(opt._init_state, p, group, opt._is_projected(p, group))
    return meta_layout(opt, p, group)


def meta_layout(opt: Any, p: Tensor, group: dict[str, Any]) -> dict[str, tuple]:
    """:func:`layout` of unsharded ``p``: :meth:`_init_state` of a meta tensor of ``p``'s shape, strides and dtype
    standing in for ``p`` in the group's ``params`` (a projection finds its index there), so the probe costs a few
    meta allocations (about 0.03 ms, not the 0.25 ms of fake tensors: issue 15, a scheduler writing a setting
    read here, adamw_sn's ``betas``, at every step). Equal to the layout on ``p``'s own device: the state's
    shapes and dtypes are chosen from the group's settings and ``p``'s shape and dtype; the device is only
    where they are allocated (every recipe, CPU fake tensors against meta:
    ``tests/test_group_layout.py::test_meta_layout_is_the_fake_tensor_layout``). Reads of a :class:`_Reads`
    ``group`` are recorded."""
    twin = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="meta")
    params = [twin if q is p else q for q in dict.__getitem__(group, "params")]
    if type(group) is _Reads:  # (its copy would count as reading every key: params swapped in place)
        kept = dict.__getitem__(group, "params")
        dict.__setitem__(group, "params", params)
        try:
            made = _made(opt, twin, group)
        finally:
            dict.__setitem__(group, "params", kept)
    else:
        made = _made(opt, twin, {**group, "params": params})
    return {k: (tuple(v.shape), v.dtype) for k, v in made.items() if isinstance(v, Tensor)}


def _made(opt: Any, twin: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    with torch.no_grad():
        opt._init_state(twin, group, state)
    return state


#: State entries the step makes itself when they are missing: GaLore's ``moment_start`` under
#: ``moment_policy="reset"`` (``LowMemOptimizer._on_subspace_change`` / ``_complete_shared``; a checkpoint that
#: predates it loads too). Present on one side only, they are no other layout: ``moment_policy`` stays live.
MADE_BY_THE_STEP = frozenset({"moment_start"})


def _fixed(entries: dict[str, tuple]) -> dict[str, tuple]:
    return {k: v for k, v in entries.items() if k.split(" (")[0] not in MADE_BY_THE_STEP}


def _kind(p: Tensor) -> tuple:
    """Parameters whose state is made alike (one probe for each)."""
    if is_dtensor(p):
        return (tuple(p.shape), p.dtype, True, p.placements)
    return (tuple(p.shape), p.dtype, False, None)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # (a value whose == is not a truth value)
        return False


def _kept(group: dict[str, Any], keys: tuple[str, ...]) -> tuple:
    return tuple(group.get(k, _MISSING) for k in keys)


def _copied(values: tuple) -> tuple:
    """``values`` with lists and dicts copied (one changed in place must still differ)."""
    return tuple(type(v)(v) if isinstance(v, (list, dict)) else v for v in values)


def _summarized(opt: Any, group: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``{setting: summary}`` of the settings among ``keys`` that the recipe's moment rule summarizes
    (:meth:`~lowmem.optim.moments.MomentRule.route_settings`: Subset-Norm's ``betas`` / ``momentum`` as
    ``(b1 > 0, b1 == 0)``); empty when it summarizes none (a tensor ``b1``: ``None``). By the hook's contract the
    state is made from such a setting through its summary only, so a change of its value that keeps the summary
    keeps every parameter's layout (``tests/test_engfix_layout_summary.py`` traces the reads of every registered
    recipe whose rule summarizes)."""
    settings = opt.recipe.moment.route_settings(group)
    return {k: v for k, v in settings.items() if k in keys} if settings else {}


class _Snapshot(NamedTuple):
    """What :func:`check_group_layouts` keeps of a group (:func:`_snapshot`)."""

    group: dict[str, Any]  # (kept alive: its id is not reused)
    keys: tuple[str, ...]  # the settings the code building its parameters' state reads, sorted
    values: tuple  # their values (:func:`_copied`)
    layouts: dict[tuple, dict]  # the layout of each kind of parameter (:func:`_kind`) under them
    kinds: tuple[tuple, ...]  # the kind of each parameter of the group, in order
    summary: dict[str, Any]  # the settings among ``keys`` the moment rule summarizes (:func:`_summarized`)
    shapes: list  # the shape (``torch.Size``) each parameter's state was made for, in order (:func:`_check_resized`)
    dtypes: list  # and its dtype
    specs: list | None  # a sharded parameter's (device mesh, placements) its state was made for (:func:`_spec`), else
    # None; None for a group without sharded parameters
    locals: list | None  # and its local shard's shape
    all_sharded: bool  # every parameter of the group sharded: the placements read by :data:`_SPEC` (C-level)


def _snapshot(opt: Any, group: dict[str, Any]) -> _Snapshot:
    """The settings of ``group`` that the code building its parameters' state reads, their values, and the layout
    of each kind of its parameters (:func:`_kind`, once per parameter) under them: one probe per kind, recording the
    keys it reads."""
    read: set[str] = set()
    layouts: dict[tuple, dict] = {}
    kinds = tuple(map(_kind, group["params"]))
    for p, kind in zip(group["params"], kinds):
        if kind in layouts:
            continue
        probe = _Reads(group)
        layouts[kind] = _fixed(layout(opt, p, probe))
        read |= probe.read
    read.discard("params")
    keys = tuple(sorted(read))
    params = group["params"]
    sharded = any(k[2] for k in kinds)
    return _Snapshot(group, keys, _copied(_kept(group, keys)), layouts, kinds, _summarized(opt, group, keys),
                     list(map(_SHAPE, params)), list(map(_DTYPE, params)),
                     list(map(_spec, params)) if sharded else None, list(map(_local_shape, params)) if sharded else None,
                     all(k[2] for k in kinds))


_SHAPE, _DTYPE = attrgetter("shape"), attrgetter("dtype")  # (C-level reads: the per-step compare of the shapes)


def _spec(p: Tensor) -> tuple | None:
    """A sharded parameter's ``(device mesh, placements)`` (which piece of it this rank holds, with its global
    shape), else `None`."""
    return _SPEC(p) if is_dtensor(p) else None


_SPEC = attrgetter("device_mesh", "placements")  # (a DTensor's placements: a tuple)


def _local_shape(p: Tensor) -> tuple:
    return tuple(local(p).shape)


def _moved(params: list, entry: "_Snapshot") -> bool:
    """Whether a parameter of the group has another shape, dtype or (sharded) placement than its state was made
    for: the compare :func:`check_resized` makes at each step for the groups it is given (C-level list compares;
    the placements only for a group with sharded parameters)."""
    try:
        return (list(map(_SHAPE, params)) != entry.shapes or list(map(_DTYPE, params)) != entry.dtypes
                or (entry.specs is not None and list(map(_SPEC if entry.all_sharded else _spec, params)) != entry.specs))
    except AttributeError:  # (a parameter of an all-sharded group replaced by a plain tensor: compared one by one)
        return True


#: What the resize check's error says of the step (:func:`check_state_fits` says it of the checkpoint).
_NOTHING_STEPPED = "Nothing was stepped."


def _check_resized(opt: Any, i: int, group: dict[str, Any], entry: _Snapshot, done: str = _NOTHING_STEPPED) -> _Snapshot:
    """Refuse a parameter of ``group`` (index ``i``) resized (``p.data = ...`` of another shape, as
    ``resize_token_embeddings`` does) after its state was made for ``entry.shapes``: its state no longer fits it, and
    the step would fail inside a kernel after earlier buckets were stepped (or, with no per-element state: ``lomo``,
    ``scale``, ``sinkgd``, step on silently). A changed dtype (``model.half()``) is refused only where it gives the
    state another layout (``state_dtype="param"``). A sharded parameter re-sharded at the same global shape (another
    placement or device mesh: ``fully_shard`` applied again, ``Shard(0)`` -> ``Shard(1)`` or ``Replicate()``) is
    refused too, its state being that of another piece of it, unless its local shard was the whole parameter before
    and after (one process). A parameter without state takes its new shape, dtype and placement: its state will be
    made for them. ``done``: what the error says was left undone. Returns the entry with the shapes, dtypes and
    placements its parameters' state is made for."""
    params = group["params"]
    shapes, dtypes = list(entry.shapes), list(entry.dtypes)
    specs = list(entry.specs) if entry.specs is not None else None
    locs = list(entry.locals) if entry.locals is not None else None
    for j, p in enumerate(params):
        shape, dtype = p.shape, p.dtype
        spec = _spec(p) if specs is not None else None
        if shape == shapes[j] and dtype == dtypes[j] and (specs is None or spec == specs[j]):
            continue
        if not opt.state.get(p):  # (no state yet, or dropped: made for its shape now)
            shapes[j], dtypes[j] = shape, dtype
            if specs is not None:
                specs[j], locs[j] = spec, _local_shape(p)
            continue
        advice = "Build the optimizer after resizing, or drop its state: optimizer.state.pop(p)"
        if shape != shapes[j]:
            what = (f"is {tuple(shape)} but its state was made for {tuple(shapes[j])}: it was resized after its"
                    " state was made (e.g. by resize_token_embeddings or p.data = ...)")
        elif specs is not None and spec != specs[j]:
            now = _local_shape(p)
            if now == locs[j] == tuple(shape):  # (the whole parameter before and after: one process)
                specs[j] = spec
                continue
            old = specs[j]
            what = (f"of shape {tuple(shape)} is sharded as {_placed(spec)} (local shard {now}) but its state was made"
                    f" for {_placed(old)} (local shard {locs[j]}): it was re-sharded after its state was made (fully_shard"
                    " applied again, or another placement), and its state is that of another piece of it")
            advice = ("Load the optimizer's checkpoint after re-sharding (torch.distributed.checkpoint reshards the"
                      " state with the parameter; load_state_dict redistributes a state saved under other"
                      " placements), or drop its state: optimizer.state.pop(p)")
        else:
            held = _held(opt, p)
            want = {k: v for k, v in _fixed(layout(opt, p, group)).items() if not k.endswith(" (whole tensor)")}
            if held == want:  # (a state that does not depend on the dtype)
                dtypes[j] = dtype
                continue
            diff = "; ".join(f"{e}: {held.get(e, 'none')} held, {want.get(e, 'none')} for {dtype}"
                             for e in sorted(set(held) | set(want)) if held.get(e) != want.get(e))
            what = (f"is {dtype} but its state was made for {dtypes[j]} ({diff}): its dtype was changed after its"
                    " state was made (e.g. by model.half() or p.data = ...)")
        raise ValueError(f"{opt.recipe.name}: parameter {j} of parameter group {i} {what}. {done} {advice}")
    return entry._replace(shapes=shapes, dtypes=dtypes, specs=specs, locals=locs)


def _placed(spec: tuple) -> str:
    mesh, placements = spec
    return f"{placements} over a mesh of shape {tuple(mesh.shape)}"


def _value(v: Any) -> str:
    return "(not set)" if v is _MISSING else repr(v)


def check_resized(opt: Any, groups: list[dict[str, Any]]) -> None:
    """:func:`_check_resized` of each of ``groups`` (a group named more than once is compared once), after
    :func:`check_group_layouts` ``(opt, resized=False)`` of this step: what :meth:`LowMemOptimizer.step` calls for
    the groups of the parameters whose cached path (:meth:`LowMemOptimizer._route`, keyed by the parameter's
    shape and dtype among others) was decided again this step, before anything is stepped. A cached path means
    its parameter's shape and dtype are those it had when the path was decided, when they were compared here.
    A group with ``bf16_stochastic_round`` / ``kahan_summation`` is checked again (:func:`check_rounding`: its
    weights may have stopped being bfloat16)."""
    known = opt.__dict__.get("_layout_sigs", {})
    done: set[int] = set()
    for group in groups:
        if id(group) in done:
            continue
        done.add(id(group))
        if group.get("bf16_stochastic_round") or group.get("kahan_summation"):
            # a parameter's dtype changed since the settings were checked (``model.to(torch.float32)``): the option
            # may no longer apply (FOUND_AUDITSR 5; a path is decided again at a dtype change)
            i = next((i for i, g in enumerate(opt.param_groups) if g is group), None)
            if i is not None:
                check_rounding(group, f"parameter group {i} of optimizer '{opt.recipe.name}'")
        entry = known.get(id(group))
        if entry is None or entry.group is not group:  # (not a group of opt.param_groups)
            continue
        if _moved(group["params"], entry):
            i = next(i for i, g in enumerate(opt.param_groups) if g is group)
            known[id(group)] = _check_resized(opt, i, group, entry)  # (a parameter resized: refused)


def check_state_fits(opt: Any) -> None:
    """Refuse a parameter whose state no longer fits it: resized, its dtype changed where the state depends on it,
    or re-sharded (:func:`_check_resized`), and a setting that fixes the layout changed since its state was made
    (:func:`check_group_layouts` with every parameter compared, gradient or not). Called first by
    :meth:`LowMemOptimizer.state_dict` (``BAdam.state_dict`` too, through it): a step compares only the parameters it steps (a resized parameter without a
    gradient is refused at its next step with one), so without this a checkpoint taken in between holds state of
    the old shape, which every later load refuses (``load_state_dict`` checks each loaded entry against the
    parameter it is loaded for, so a load needs no such check). Its cost, once the groups' snapshots exist: a list
    compare of the parameters' shapes and dtypes per group (about 0.14 us a parameter: 14 us for 100 parameters
    against torch's ``state_dict()``'s own 48 us, 2026-11-30), nothing at a step.

    Raises:
        ValueError: As :func:`check_group_layouts`, saying that nothing was saved.
    """
    if "_decided" in opt.__dict__:  # (within a step's pass: the step compares what it steps)
        return
    check_group_layouts(opt, resized=True, done="Nothing was saved: its state would not load into an optimizer of"
                        " this parameter.", settings=False)


class _Validated(NamedTuple):
    """What :func:`check_group_settings` keeps of a group: the values it last validated."""

    group: dict[str, Any]  # (kept alive: its id is not reused)
    names: tuple[str, ...]  # the recipe's settings (``Recipe.all_hparams``), in order
    missing: tuple  # ``_MISSING`` once per name (the default of the C-level ``map(group.get, ...)``)
    values: tuple  # their values when last validated (:func:`_copied`; ``_MISSING``: not in the group)
    reads: frozenset | None  # the keys the recipe's ``validate_group`` read (``None``: it has none)
    keys: tuple  # the group's keys, in order, when they were last checked (:func:`~lowmem.optim.hparams.check_written_keys`)


def _validate_group(opt: Any, group: dict[str, Any], where: str) -> frozenset:
    """The recipe's cross-field check (``Recipe.validate_group``) of ``group``, on a copy that records the keys it
    reads (:class:`_Reads`): its verdict changes only when one of them does. Its error names the group, as
    :meth:`LowMemOptimizer.add_param_group`'s does."""
    seen = _Reads(_written_lr(opt, group, where))
    try:
        opt.recipe.validate_group(seen)
    except ValueError as e:
        e.args = (f"{where}: {e}", *e.args[1:])
        raise
    # (``lr`` is no trigger: torch writes it into every group, schedulers at every step and
    # torch.distributed.checkpoint's state initialization ``lr = 0.0`` for one zero-gradient step, which Adafactor's
    # ``relative_step`` check would refuse; ``lr`` alone is validated by its HParam)
    return frozenset(seen.read - {"params", "lr"})


#: the settings :func:`check_rounding` reads
ROUNDING_KEYS = frozenset({"bf16_stochastic_round", "kahan_summation", "fused", "master_weights"})


def check_rounding(group: dict[str, Any], where: str) -> None:
    """Refuse ``bf16_stochastic_round=True`` or ``kahan_summation=True`` where it cannot apply (a value that cannot
    apply is an error, never ignored): both at once (two ways of keeping the small updates: choose one), a group with no
    bfloat16 parameter (nothing to round: torchao's low-bit optimizers ignore the option on float32 weights, lowmem says
    so) or with float16 parameters (rounded into bfloat16 only: a float16 weight's write-back would round to nearest,
    beside bfloat16 ones too), with ``fused=True`` (bitsandbytes' fused kernels of adamw8bit, lion8bit, lion write a
    bfloat16 weight rounded to nearest; ``fused=None`` steps bfloat16 weights with the plain step, which applies the
    option: ``bnb_fused``'s eligibility), with BAdam's ``master_weights=True`` (its float32 copy of the active block
    already keeps the small updates; the bfloat16 weight is only a rounded copy of it), and ``kahan_summation`` with
    BAdam (its switch frees the compensation with the block's state). On FSDP2 (DTensor) parameters both apply: the
    compensation is element-wise, kept for the local shard (the engine's ``_init_state`` of ``local(p)``) and
    checkpointed with the parameter's placements (:func:`~lowmem.optim.sharded.state_to_dtensor`), projected 2-D
    FSDP2 parameters included (``LowMemOptimizer._init_state``'s sharded projected branch keeps the shard's)."""
    on = [k for k in ("bf16_stochastic_round", "kahan_summation") if group.get(k)]
    if not on:
        return
    if len(on) == 2:
        raise ValueError(
            f"{where}: bf16_stochastic_round=True and kahan_summation=True conflict: each keeps the updates that"
            " rounding to bfloat16 drops (stochastic rounding: unbiased, no state; Kahan: a 2 B/param compensation);"
            " valid: one of them")
    field = on[0]
    dtypes = sorted({str(local(p).dtype).replace("torch.", "") for p in group["params"]})
    half = ("; float16 weights are not rounded by it: lowmem rounds into bfloat16 only (train in bfloat16, or keep"
            " float32 master weights of a float16 model)") if "float16" in dtypes else ""
    if "bfloat16" not in dtypes:
        raise ValueError(
            f"{where}: {field}=True rounds updates into bfloat16 parameters, and this group has none"
            f" (its parameters: {', '.join(dtypes) or 'none'}){half}; valid: {field}=False, or bfloat16 weights")
    if half:  # (float16 beside bfloat16: their write-backs would round to nearest, the loss the option is on to avoid)
        fp16 = [p for p in group["params"] if local(p).dtype == torch.float16]
        raise ValueError(
            f"{where}: {field}=True with float16 parameters ({len(fp16)} of the group's {len(group['params'])}, e.g."
            f" one of shape {tuple(fp16[0].shape)}): lowmem rounds into bfloat16 only, so their write-backs would round"
            f" to nearest, losing the small updates {field} keeps for the bfloat16 ones; valid: the float16 parameters"
            f" in a group with {field}=False (float32 master weights keep a float16 model's small updates), or"
            " bfloat16 weights")
    if group.get("fused") is True:
        raise ValueError(
            f"{where}: {field}=True and fused=True conflict: bitsandbytes' fused kernel writes a bfloat16"
            f" weight rounded to nearest; valid: fused=None (bfloat16 weights take the plain step, which applies"
            f" {field}) or fused=False, or {field}=False")
    if group.get("master_weights") is True:
        raise ValueError(
            f"{where}: {field}=True and master_weights=True conflict: the float32 master copy of the"
            " active block already keeps small updates (the bfloat16 weight is a rounded copy of it); valid:"
            f" master_weights=False (pure-bfloat16 training with {field}) or {field}=False")
    if field == "kahan_summation" and "switch_every" in group:  # (a BAdam group: its schedule's keys)
        raise ValueError(
            f"{where}: kahan_summation=True and BAdam conflict: BAdam frees a block's state at each switch"
            " (switch_every), and the compensation with it (what it carried would be lost at every switch), while"
            " keeping it for every block would cost 2 B per parameter of the whole model beside BAdam's one-block"
            " state; valid: bf16_stochastic_round=True (no state, new bits per activation), or kahan_summation=False")


def record_validated(opt: Any, group: dict[str, Any], where: str, check: bool = False) -> None:
    """Keep ``group``'s settings as validated (:func:`check_group_settings`): what
    :meth:`LowMemOptimizer.add_param_group` calls once it has validated them; ``check``: validate each first (a
    group :func:`check_group_settings` sees first)."""
    specs = opt.recipe.all_hparams()
    names = tuple(specs)
    values = tuple(group.get(k, _MISSING) for k in names)
    if check:
        check_written_keys(opt.recipe, group, where=where)
        for k, v in zip(names, values):
            if v is not _MISSING:
                specs[k].validate(_numbers(v), where=where)
        check_rounding(group, where)
    reads = None if opt.recipe.validate_group is None else _validate_group(opt, group, where)
    opt.__dict__.setdefault("_settings_sigs", {})[id(group)] = _Validated(
        group, names, (_MISSING,) * len(names), _copied(values), reads, tuple(group))


def _written_lr(opt: Any, group: dict[str, Any], where: str) -> dict[str, Any]:
    """``group`` as the recipe's cross-field check is to see it, after the optimizer's own check of an ``lr`` it does
    not step with (``_check_written_lr``: Adafactor's ``relative_step`` groups, where ``None``, ``0.0`` and the
    step size it reports, transformers' ``AdafactorSchedule``'s write, stand for ``None`` and any other value is
    refused, :meth:`~lowmem.optim.recipes.full_rank.Adafactor._check_written_lr`); ``group`` itself for the
    others."""
    check = getattr(opt, "_check_written_lr", None)
    return group if check is None else check(group, where)


def _numbers(value: Any) -> Any:
    """``value`` with its one-element tensors and NumPy scalars (itself, or the items of a tuple / list: ``betas``)
    as Python numbers: what :func:`check_group_settings` validates of a value written later. Construction takes
    Python numbers only (:meth:`~lowmem.optim.hparams.HParam.validate`); a tensor written into a group later (a
    tensor ``lr``, as torch.optim takes it) is stepped with, so its value is what is checked."""
    if isinstance(value, (tuple, list)):
        items = [_numbers(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 and not value.is_complex() else value
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


_SPECS: dict[int, tuple[Any, dict]] = {}  # id(recipe) -> (recipe, its all_hparams()): kept alive, id not reused


def _specs(recipe: Any) -> dict:
    """``recipe.all_hparams()``, made once per recipe (a recipe is frozen configuration; the HParams are not kept
    in the optimizer's cache, so a deep copy of it shares nothing mutable)."""
    got = _SPECS.get(id(recipe))
    if got is None or got[0] is not recipe:
        got = _SPECS[id(recipe)] = (recipe, recipe.all_hparams())
    return got[1]


def check_group_settings(opt: Any) -> None:
    """Refuse a setting written into ``opt.param_groups`` after :meth:`LowMemOptimizer.add_param_group` checked it
    (a scheduler's or a user's ``group["beta2"] = 1.5``, ``group["lr"] = -1.0``): the same ``Invalid <name>=...``
    error, naming the group and the valid values (:meth:`~lowmem.optim.hparams.HParam.validate`), before anything is
    stepped. torch.optim checks nothing there; stepped with, such a value turns the weights NaN or ascends without a
    word. Cheap at every step: one C-level tuple of the recipe's settings per group, compared with the values last
    validated; only the settings whose value changed are validated again (``OneCycleLR`` writing ``lr`` / ``betas``
    / ``momentum`` at every step: those two or three), and the recipe's ``validate_group`` only when a key it read
    changed (but ``lr``: :func:`_validate_group`; an ``lr`` the optimizer does not step with: :func:`_written_lr`).
    A key added or renamed that reads as a misspelled setting is refused
    (:func:`~lowmem.optim.hparams.check_written_keys`). A group first seen (its dict replaced by ``load_state_dict``,
    or appended to ``param_groups`` by hand) is validated whole. A tensor
    written later (a tensor ``lr``: the step takes it, as torch.optim does) is validated by its value
    (:func:`_numbers`) when a new tensor is written; one changed in place (torch's schedulers ``fill_`` a tensor
    ``lr``) is not read back (a device sync at every step).

    Raises:
        ValueError: ``Invalid <name>=<value> in parameter group <i> of optimizer '<recipe>': expected <valid>``,
            or the recipe's cross-field error prefixed with the group; nothing is kept, so the next step refuses
            it again until the value is put right.
    """
    known = opt.__dict__.setdefault("_settings_sigs", {})  # (not copied: LowMemOptimizer._NOT_COPIED)
    for i, group in enumerate(opt.param_groups):
        entry = known.get(id(group))
        if entry is None or entry.group is not group:  # (first seen: every setting)
            record_validated(opt, group, f"parameter group {i} of optimizer '{opt.recipe.name}'", check=True)
            continue
        keys = tuple(group)
        if keys != entry.keys:  # (a key added, removed or renamed: a misspelled setting refused; about 0.13 us)
            check_written_keys(opt.recipe, group, where=f"parameter group {i} of optimizer '{opt.recipe.name}'")
            entry = known[id(group)] = entry._replace(keys=keys)
        now = tuple(map(group.get, entry.names, entry.missing))
        try:
            if now == entry.values:
                continue
        except Exception:  # (a tensor value: compared one by one below)
            pass
        changed, specs = [], _specs(opt.recipe)
        for k, a, b in zip(entry.names, entry.values, now):
            if a is b or _same(a, b):
                continue
            changed.append(k)
            if b is not _MISSING:
                spec = specs[k]
                x = b if type(b) is float else _numbers(b)
                try:
                    ok = spec.check(x)
                except (TypeError, ValueError):
                    ok = False
                if not ok:  # (the message, naming the group: HParam.validate's)
                    spec.validate(x, where=f"parameter group {i} of optimizer '{opt.recipe.name}'")
        if not changed:
            continue
        if "lr" in changed:  # (an lr the step would not use: Adafactor's relative_step; _written_lr)
            _written_lr(opt, group, f"parameter group {i} of optimizer '{opt.recipe.name}'")
        if not ROUNDING_KEYS.isdisjoint(changed):
            check_rounding(group, f"parameter group {i} of optimizer '{opt.recipe.name}'")
        reads = entry.reads
        if reads is not None and not reads.isdisjoint(changed):
            reads = _validate_group(opt, group, f"parameter group {i} of optimizer '{opt.recipe.name}'")
        known[id(group)] = _Validated(group, entry.names, entry.missing, _copied(now), reads, entry.keys)


def check_group_layouts(opt: Any, resized: bool | None = None, done: str = _NOTHING_STEPPED, settings: bool = True) -> None:
    """Refuse a setting that fixes the state's layout changed in ``opt.param_groups`` since its parameters'
    state was made (module docstring). Call it before anything of a step touches a parameter or its state.
    ``resized``: compare every parameter's shape and dtype with those its state was made for too
    (:func:`_check_resized`); ``False`` where the caller does it for the groups whose parameters' shape or dtype
    may have changed (:func:`check_resized`, after this call); by default ``False`` within
    :meth:`LowMemOptimizer.step`'s pass over the parameters' paths (``opt._decided`` set), else ``True``
    (:class:`~lowmem.optim.layerwise.LayerwiseOptimizer`'s hooks). ``settings``: first refuse a setting written
    into a group with an invalid value (:func:`check_group_settings`; the step's and the hooks' calls do).

    Raises:
        ValueError: Naming the group's index, the setting, its old and new value, a parameter whose state it
            changes, and what to do instead.
    """
    if settings:
        check_group_settings(opt)
    known = opt.__dict__.setdefault("_layout_sigs", {})  # (not copied: LowMemOptimizer._NOT_COPIED)
    if resized is None:
        resized = "_decided" not in opt.__dict__
    for i, group in enumerate(opt.param_groups):
        entry = known.get(id(group))
        params = group["params"]
        if entry is None or entry.group is not group or len(params) != len(entry.shapes):
            # (the entry keeps its group alive: its id is not reused)
            new = _snapshot(opt, group)
            _refuse_state_made_otherwise(opt, i, group, new)
            known[id(group)] = new
            continue
        if resized and _moved(params, entry):
            entry = known[id(group)] = _check_resized(opt, i, group, entry, done)  # (a parameter resized: refused)
        keys, values = entry.keys, entry.values
        now = _kept(group, keys)
        try:
            if now == values:
                continue
        except Exception:  # (a tensor value: compared one by one below)
            pass
        changed = [k for k, a, b in zip(keys, values, now) if not _same(a, b)]
        if not changed:
            continue
        summary = entry.summary
        if summary and all(k in summary for k in changed) and _summarized(opt, group, keys) == summary:
            # only settings the moment rule summarizes, each with its summary as before (a scheduler cycling
            # betas[0] / momentum within (0, 1): OneCycleLR's cycle_momentum): the same layouts, no probe
            known[id(group)] = entry._replace(values=_copied(now))
            continue
        # the same layout: the new values are the kept ones (a scheduler changing another value read when the
        # state is made costs one meta probe per kind of parameter at each change)
        new = _snapshot(opt, group)
        _refuse_layout_change(opt, i, group, dict(zip(keys, values)), changed, entry.layouts, new)
        # (the shapes and dtypes the state was made for are kept: a parameter resized too is still compared)
        known[id(group)] = new._replace(shapes=entry.shapes, dtypes=entry.dtypes, specs=entry.specs, locals=entry.locals)


def _held(opt: Any, p: Tensor) -> dict[str, tuple]:
    """``{entry: (shape, dtype)}`` of ``p``'s state as it is, named as :func:`layout` names them."""
    suffix = " (this shard)" if is_dtensor(p) else ""
    return _fixed({k + suffix: (tuple(v.shape), v.dtype) for k, v in opt.state[p].items() if isinstance(v, Tensor)})


def _refuse_state_made_otherwise(opt: Any, i: int, group: dict[str, Any], snapshot: _Snapshot) -> None:
    """A group first seen whose parameters already have state (loaded by ``load_state_dict``, made by
    ``materialize_state`` or for a sharded parameter at construction): its state must have the layout the group's
    settings give it now (a setting changed between the load and this step would otherwise go unseen)."""
    keys, values, layouts = snapshot.keys, snapshot.values, snapshot.layouts
    seen: set[tuple] = set()
    for p, kind in zip(group["params"], snapshot.kinds):
        if not opt.state.get(p) or kind in seen:
            continue
        seen.add(kind)
        held = _held(opt, p)
        want = {k: v for k, v in layouts[kind].items() if not k.endswith(" (whole tensor)")}
        if held == want:
            continue
        diff = "; ".join(f"{e}: {held.get(e, 'none')} held, {want.get(e, 'none')} under these settings"
                         for e in sorted(set(held) | set(want)) if held.get(e) != want.get(e))
        raise ValueError(
            f"{opt.recipe.name}: parameter group {i}: the state of a {tuple(p.shape)} parameter, made before this step"
            f" (loaded, or materialized), does not have the layout its group's settings give it ({diff}): one of the"
            " settings that fix it was changed after the state was made ("
            + ", ".join(f"{k}={_value(v)}" for k, v in zip(keys, values))
            + "). Put the old value back, or make a new optimizer, or load a checkpoint saved with these settings."
            " Or the parameter was resized after its state was made (e.g. by resize_token_embeddings, after a copy"
            " of the optimizer): build the optimizer after resizing, or drop its state: optimizer.state.pop(p)")


def _refuse_layout_change(opt: Any, i: int, group: dict[str, Any], old: dict[str, Any], changed: list[str],
                          layouts: dict, new: _Snapshot) -> None:
    """Raise when the settings ``changed`` (from ``old``) give a parameter of ``group`` with state another layout:
    ``new.layouts`` (by :func:`_kind`) than ``layouts`` (probed under ``old`` where missing)."""
    before = dict(group)  # the settings the state was made with
    for k, v in old.items():
        if v is _MISSING:
            before.pop(k, None)
        else:
            before[k] = v
    seen: set[tuple] = set()
    for p, kind in zip(group["params"], new.kinds):
        if not opt.state.get(p) or kind in seen:
            continue
        seen.add(kind)
        was = layouts[kind] if kind in layouts else _fixed(layout(opt, p, before))
        now = new.layouts[kind]
        if was == now:
            continue
        # the settings that change it on their own (else all of them, together)
        alone = [k for k in changed if _fixed(layout(opt, p, {**before, k: group[k]} if k in group
                                                     else {q: v for q, v in before.items() if q != k})) != was]
        names = alone or changed
        diff = "; ".join(f"{e}: {was.get(e, 'none')} -> {now.get(e, 'none')}" for e in sorted(set(was) | set(now))
                         if was.get(e) != now.get(e))
        raise ValueError(
            f"{opt.recipe.name}: parameter group {i}: "
            + ", ".join(f"setting '{k}' changed from {_value(old[k])} to {_value(group.get(k, _MISSING))}" for k in names)
            + f" after its parameters' state was made; it fixes the state's layout (a {tuple(p.shape)} parameter:"
            f" {diff}), so it cannot change during a run. Put the old value back, or make a new optimizer, or load a"
            " checkpoint saved with these settings")
