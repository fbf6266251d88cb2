"""``transformers.Trainer`` integration: lowmem optimizers with lowmem's parameter groups.

Two ways in:

* A plain ``Trainer``: ``Trainer(..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, "adafactor", args=args))``.
* :class:`LowMemTrainer` with :class:`LowMemTrainingArguments` (``lowmem_optim="adafactor"``), or
  any trainer class combined with :class:`LowMemOptimizerMixin`, e.g.
  ``class LowMemDPOTrainer(LowMemOptimizerMixin, DPOTrainer)`` with a config that adds
  :class:`LowMemArguments` (``@dataclass class LowMemDPOConfig(LowMemArguments, DPOConfig)``).

Both map the ``TrainingArguments`` optimizer fields onto the optimizer (:func:`trainer_hparams`)
and use :func:`lowmem.optim.build_param_groups` (no weight decay on biases and norm weights,
subspace targets for projected optimizers). Engine optimizers keep tensors-only state, so the
Trainer's checkpoints (``optimizer.pt``) save and resume them unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from lowmem.optim import LowMemOptimizer, create_optimizer, get_entry
from lowmem.optim.hparams import parse_optim_args  # noqa: F401 - the one k=v reader, re-exported
from lowmem.optim.hparams import text_booleans
from lowmem.optim.sharded import PLACEMENT_KEY, only_placement_missing, without_placement_record

logger = logging.getLogger(__name__)

# TrainingArguments field(s) -> optimizer hyperparameter. Applied where the optimizer has that
# hyperparameter *and* accepts the value (Adafactor's ``eps`` is a pair, so adam_epsilon cannot apply).
TRAINING_ARGS_MAP: tuple[tuple[tuple[str, ...], str], ...] = (
    (("learning_rate",), "lr"),
    (("weight_decay",), "weight_decay"),
    (("adam_beta1", "adam_beta2"), "betas"),
    (("adam_epsilon",), "eps"),
)
# transformers' Trainer does the same for optim="adafactor": the Trainer's learning rate and
# scheduler drive the step size.
TRAINER_OVERRIDES = {"relative_step": False, "scale_parameter": False}

# Settings a Trainer can never apply: its scheduler drives ``learning_rate``, so Adafactor's own step size
# cannot run under it (refused with the arguments, before any model loads).
TRAINER_REFUSED = {
    "relative_step": (True, "the Trainer drives the step size (learning_rate and its scheduler), so Adafactor's "
                            "relative step cannot apply under a Trainer; remove it (relative_step=False is set for you), "
                            "or give a plain transformers.Trainer optimizers=(lowmem.optim.Adafactor(params, "
                            "relative_step=True), transformers.optimization.AdafactorSchedule(optimizer))"),
    "warmup_init": (True, "it needs relative_step=True, which cannot apply under a Trainer (the Trainer drives the "
                          "step size: learning_rate and its scheduler); remove it"),
}


def hf_optim_defaults(name: str, args: Any) -> dict[str, Any]:
    """The Hugging Face Trainer's own defaults (:data:`lowmem.train.HF_OPTIM_DEFAULTS`) when ``args.optim`` names one of its
    optimizers that maps onto lowmem's ``name``; ``{}`` otherwise (``lowmem_optim`` alone keeps lowmem's)."""
    optim = getattr(args, "optim", None)
    optim = getattr(optim, "value", optim)
    from lowmem.train import _hf_optim_defaults, resolve_optim_name

    if not isinstance(optim, str) or not _hf_optim_defaults(optim):
        return {}

    try:
        base, _ = resolve_optim_name(optim)
    except ValueError:
        return {}
    return _hf_optim_defaults(optim) if base == name else {}

_TA_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}

# TrainingArguments fields that apply to an optimizer only when the user set them: left at their defaults (Adam's
# betas (0.9, 0.999) and eps 1e-8) they would replace the defaults of optimizers whose own differ (racs' eps 1e-30,
# alice's betas (0.9, 0.9)). learning_rate (the scheduler's base) and weight_decay (the Trainer's 0.0) always apply.
OPTIONAL_FIELDS = ("adam_beta1", "adam_beta2", "adam_epsilon")
# Attribute lowmem train sets on the config it builds: the OPTIONAL_FIELDS its recipe names (lowmem.train.build_training_args)
NAMED_FIELDS_ATTR = "_lowmem_named_optimizer_fields"


def hf_optim_named(name: str, args: Any) -> bool:
    """Whether ``args.optim`` (the Hugging Face Trainer's field, so its meaning) names optimizer ``name``
    (``optim="lion_32bit"`` for ``lion``, ``"apollo_adamw"`` for ``apollo_adamw``; ``adamw_torch``, the default, for
    ``adamw``): the Hugging Face Trainer builds it with ``TrainingArguments``' betas and eps, set or not, and so does
    lowmem then. ``lowmem_optim`` (lowmem's meaning) alone keeps the optimizer's own defaults."""
    optim = getattr(args, "optim", None)
    optim = getattr(optim, "value", optim)
    if not isinstance(optim, str):
        return False
    from lowmem.train import resolve_optim_name

    try:
        return resolve_optim_name(optim)[0] == name
    except ValueError:
        return False


def user_set_fields(args: Any, fields: tuple[str, ...], named: bool = True) -> bool:
    """Whether the user set any of ``fields`` of ``args``: a value that differs from the default of ``args``' class
    (the Python API), or (``named``) a field ``lowmem train``'s config names (recorded as :data:`NAMED_FIELDS_ATTR`;
    a saved ``training_args.json`` names every field, at its default)."""
    given = getattr(args, NAMED_FIELDS_ATTR, ()) if named else ()
    defaults = {f.name: f.default for f in dataclasses.fields(type(args))} if dataclasses.is_dataclass(args) else _TA_DEFAULTS
    return any(f in given or getattr(args, f) != defaults.get(f, _TA_DEFAULTS.get(f)) for f in fields)


def check_optimizer_fields(args: Any) -> None:
    """Type- and range-check the ``TrainingArguments`` fields that reach an optimizer
    (:data:`TRAINING_ARGS_MAP`): ``learning_rate >= 0``, ``weight_decay >= 0``, ``adam_beta1`` and
    ``adam_beta2`` in ``[0, 1)``, ``adam_epsilon >= 0`` (ranges: :data:`lowmem.config.RANGES`).

    Raises:
        ValueError: (:class:`lowmem.config.ConfigError`) naming the field, its value and the valid range.
    """
    from lowmem.config import check_value

    for fields, _ in TRAINING_ARGS_MAP:
        for f in fields:
            if hasattr(args, f):
                check_value(f, getattr(args, f), float, where=f"{type(args).__name__}.")


def trainer_hparams(name: str, args: TrainingArguments | None = None, optim_args: dict | str | None = None) -> dict[str, Any]:
    """The hyperparameters optimizer ``name`` gets under a Trainer.

    1. ``TrainingArguments`` fields map onto the optimizer (:data:`TRAINING_ARGS_MAP`):
       ``learning_rate -> lr``, ``weight_decay``, ``(adam_beta1, adam_beta2) -> betas``,
       ``adam_epsilon -> eps``, where the optimizer has that hyperparameter. Each field is first
       range-checked (:func:`check_optimizer_fields`: a negative learning rate is an error, never
       replaced by a default). ``adam_beta1``, ``adam_beta2`` and ``adam_epsilon`` apply only when the user set
       them (:func:`user_set_fields`: ``lowmem train``'s config names them, or, in Python, their value differs from
       the config class's default); untouched, the optimizer's own defaults apply (racs' ``eps`` 1e-30, alice's
       ``betas`` (0.9, 0.9)), except under a Hugging Face ``optim`` name for it (:func:`hf_optim_named`:
       ``lion_32bit``), which the Hugging Face Trainer builds with ``TrainingArguments``' values. A field set to another value than its default that the optimizer has no
       hyperparameter for (``adam_beta1=0.5`` with Adafactor) or whose value it rejects (``adam_epsilon=1e-6`` with
       Adafactor's pair) is an error; a default that cannot apply (a saved config's ``adam_beta1: 0.9`` with
       Adafactor) is logged at info level.
    2. Optimizers with ``relative_step`` / ``scale_parameter`` (Adafactor) get ``False`` for
       both, as ``transformers.Trainer`` does for ``optim="adafactor"``.
    3. The ``TrainingArguments``' own ``optim_args`` string (the Hugging Face Trainer's
       ``"rank=64,update_proj_gap=200"``, :func:`hf_optim_args`), then ``optim_args`` (dict, JSON or
       ``"k=v,k=v"``; ``lowmem_optim_args``) win over both, the latter over the former; a field of step 1 that
       the user set to another value (``learning_rate=1e-3`` beside ``lr=0.5``) is an error naming both.

    Raises:
        ValueError: Unknown optimizer or hyperparameter (messages list the valid ones), or a
            ``TrainingArguments`` value out of range or rejected by the optimizer (the message names
            the field and the valid values).
    """
    entry = get_entry(name)
    if args is not None:
        check_optimizer_fields(args)
    explicit = {**hf_optim_args(args), **parse_optim_args(optim_args)}
    specs = entry.recipe.all_hparams() if entry.recipe is not None else {}
    explicit = torch_optimi_kahan_sum(entry, text_booleans(specs, explicit))  # ("nesterov=1": "true" / "1" / "yes")
    valid = entry.valid_hparams()
    paired = betas_from_beta_keys(entry, explicit, args)  # (AdEMAMix: transformers' beta1= / beta2= in optim_args)
    unknown = sorted(set(explicit) - set(valid))
    if unknown:
        from lowmem.optim.hparams import unknown_key_hints

        hints = unknown_key_hints(unknown, list(valid))
        raise ValueError(f"Unknown hyperparameter(s) {unknown} for optimizer '{entry.name}'"
                         + (f" (did you mean {', '.join(hints)}?)" if hints else "") + f"; valid: {valid}")
    hp: dict[str, Any] = {}
    if args is not None:
        hf_meaning = hf_optim_named(entry.name, args)
        for fields, target in TRAINING_ARGS_MAP:
            values = tuple(getattr(args, f) for f in fields)
            value = values if len(values) > 1 else values[0]
            user_set = user_set_fields(args, fields)
            shown = ", ".join(f"{f}={getattr(args, f)!r}" for f in fields)
            if target in explicit:
                if user_set and explicit[target] != value and not (paired and target == "betas"):  # (paired: checked there)
                    raise ValueError(f"{type(args).__name__} {shown} and optim_args / lowmem_optim_args' {target}="
                                     f"{explicit[target]!r} both set optimizer '{entry.name}''s {target}, to different "
                                     f"values (one would be dropped); give one of them")
                continue
            if fields[0] in OPTIONAL_FIELDS and not user_set and not hf_meaning:
                continue  # an untouched adam_* default: the optimizer's own default applies (racs' eps 1e-30, alice's betas)
            if target in valid and (target not in specs or _accepts(specs[target], value)):
                hp[target] = value
                continue
            changed = user_set_fields(args, fields, named=False)  # a named default (a saved config's) that cannot apply: no error
            if target in valid and changed:
                try:
                    specs[target].validate(value)
                except ValueError as err:
                    raise ValueError(f"{type(args).__name__} {shown} cannot apply to optimizer '{entry.name}': {err} "
                                     f"remove {', '.join(fields)} or give the optimizer's own '{target}' in lowmem_optim_args") from None
            if changed:
                own = sorted(k for k in valid if k.startswith("beta")) if target == "betas" else []
                raise ValueError(f"{type(args).__name__} {shown} cannot apply to optimizer '{entry.name}': it has no "
                                 f"'{target}' hyperparameter (valid: {valid}); remove {', '.join(f for f in fields if user_set_fields(args, (f,), False))}"
                                 + (f", or give its own {own} in lowmem_optim_args (optim_args)" if own else ""))
            logger.info("lowmem optimizer '%s' does not take TrainingArguments %s (its default) as '%s', so it does not "
                        "apply (valid hyperparameters: %s)", entry.name, shown, target, valid)
        hp.update({k: v for k, v in TRAINER_OVERRIDES.items() if k in valid})
        hp.update({k: v for k, v in hf_optim_defaults(entry.name, args).items() if k in valid})
    hp.update(explicit)
    return hp


def torch_optimi_kahan_sum(entry: Any, explicit: dict[str, Any]) -> dict[str, Any]:
    """torch-optimi's ``kahan_sum`` in the ``optim_args`` of ``stable_adamw`` (transformers' ``optim="stable_adamw"``
    hands it to torch-optimi's ``StableAdamW``: ``None``, its default, and ``True`` compensate the low-precision
    weights, ``False`` none) as lowmem's setting (AUDREF19 3): ``None`` / ``True`` leave ``kahan_summation`` unset,
    which is that default of lowmem's ``StableAdamW`` (on for the groups holding bfloat16 weights:
    :func:`lowmem.optim.hparams.kahan_sum_groups`), ``False`` (or ``0``) is ``kahan_summation=False``. A new dict;
    ``explicit`` itself for any other optimizer (where ``kahan_sum`` stays an unknown name).

    Raises:
        ValueError: Another value, or ``kahan_sum`` beside ``kahan_summation`` (one would be dropped).
    """
    if "kahan_sum" not in explicit or entry.recipe is None or entry.recipe.name != "stable_adamw":
        return explicit
    out = dict(explicit)
    value = out.pop("kahan_sum")
    if type(value) is int and value in (0, 1):
        value = bool(value)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"optim_args kahan_sum={value!r} for optimizer '{entry.name}': expected None, true or false "
                         "(torch-optimi's kahan_sum: None and true compensate the bfloat16 weights, false none)")
    if "kahan_summation" in out:
        raise ValueError(f"optim_args give both kahan_sum={value!r} (torch-optimi's name) and kahan_summation="
                         f"{out['kahan_summation']!r} for optimizer '{entry.name}' (one would be dropped); give one of them")
    if value is False:
        out["kahan_summation"] = False
    return out


def betas_from_beta_keys(entry: Any, explicit: dict[str, Any], args: Any) -> bool:
    """transformers' Trainer reads ``beta1`` / ``beta2`` from ``optim_args`` for AdEMAMix (``optim="ademamix"``,
    ``ctx.optim_args.get("beta1", adam_beta1)``): for an optimizer whose recipe takes ``betas`` and ``beta3``
    (``ademamix``, ``ademamix8bit``), turn them, in place, into ``explicit["betas"]``, the other of the pair from
    ``TrainingArguments``' ``adam_beta1`` / ``adam_beta2`` where it applies (the user set it, or ``optim`` is the
    Hugging Face name for this optimizer: :func:`user_set_fields`, :func:`hf_optim_named`), else the recipe's default.
    Returns whether it did.

    Raises:
        ValueError: ``beta1`` / ``beta2`` beside ``betas``, or beside a different ``adam_beta1`` / ``adam_beta2`` the
            user set (one would be dropped)."""
    keys = [k for k in ("beta1", "beta2") if k in explicit]
    specs = entry.recipe.all_hparams() if entry.recipe is not None else {}
    if not keys or not {"betas", "beta3"} <= set(specs):
        return False
    if "betas" in explicit:
        raise ValueError(f"optim_args / lowmem_optim_args give both {keys} and betas={explicit['betas']!r} for optimizer "
                         f"'{entry.name}' (one would be dropped); give one of them")
    pair = list(specs["betas"].default)
    hf_meaning = args is not None and hf_optim_named(entry.name, args)
    for i, f in enumerate(("adam_beta1", "adam_beta2")):
        key = f"beta{i + 1}"
        from_args = args is not None and (hf_meaning or user_set_fields(args, (f,)))
        if key in explicit:
            if from_args and user_set_fields(args, (f,)) and explicit[key] != getattr(args, f):
                raise ValueError(f"{type(args).__name__} {f}={getattr(args, f)!r} and optim_args / lowmem_optim_args' "
                                 f"{key}={explicit[key]!r} both set optimizer '{entry.name}''s betas[{i}], to different "
                                 "values (one would be dropped); give one of them")
            pair[i] = explicit.pop(key)
        elif from_args:
            pair[i] = getattr(args, f)
    explicit["betas"] = tuple(pair)
    return True


def hf_optim_args(args: Any) -> dict[str, Any]:
    """The Hugging Face Trainer's own ``TrainingArguments.optim_args`` string, parsed
    (:func:`parse_optim_args`): a config written for ``optim="galore_adamw", optim_args="rank=64"``
    keeps its hyperparameters under a lowmem optimizer (GaLore's and APOLLO's names are lowmem's).
    ``{}`` without ``args`` or when unset."""
    return parse_optim_args(getattr(args, "optim_args", None)) if args is not None else {}


def target_modules_hparam(name: str, args: Any, hp: dict[str, Any]) -> dict[str, Any]:
    """``hp`` plus ``target_modules`` from ``args.optim_target_modules`` (matched by the Trainer's rules,
    :class:`OptimTargetModules`), when set.

    Raises:
        ValueError: The optimizer treats every parameter alike, or ``target_modules`` is also in ``hp``.
    """
    targets = getattr(args, "optim_target_modules", None)
    if targets is None:
        return hp
    if get_entry(name).target_key is None:
        raise ValueError(_targets_refused(targets, name))
    if "target_modules" in hp:
        raise ValueError("optim_target_modules and lowmem_optim_args' target_modules are both set; give one")
    return {**hp, "target_modules": OptimTargetModules(targets)}


def validate_optim_args(name: str, optim_args: dict | str | None) -> dict[str, Any]:
    """``optim_args`` of optimizer ``name`` parsed (:func:`parse_optim_args`) and checked before any
    model loads: unknown names are an error listing the valid ones, and each value goes through the
    optimizer's own hyperparameter spec (a string that reads as a number, as PyYAML leaves ``3e-4``,
    is converted first; so is each such item of a list / tuple, ``eps: [1e-30, 1e-3]``). Returns the checked
    mapping (numbers converted).

    Raises:
        ValueError: Naming ``optim_args.<key>``, the value and what is valid.
    """
    entry = get_entry(name)
    specs = entry.recipe.all_hparams() if entry.recipe is not None else {}
    explicit = torch_optimi_kahan_sum(entry, text_booleans(specs, parse_optim_args(optim_args)))  # ("centered=1": True)
    trainer_hparams(name, None, explicit)  # unknown keys -> error listing the valid ones
    out = dict(explicit)
    for key, value in explicit.items():
        if key not in specs:
            continue
        # a pair as YAML writes it (eps: [1e-30, 1e-3]: PyYAML's strings) is converted item by item, as a scalar is
        if isinstance(value, (list, tuple)):
            value = type(value)(_numeric_string(v) for v in value)
        else:
            value = _numeric_string(value)
        try:
            specs[key].validate(value)
        except ValueError as err:
            raise ValueError(f"optim_args.{key}={explicit[key]!r}: {err}") from None
        if key in TRAINER_REFUSED and value is TRAINER_REFUSED[key][0]:
            raise ValueError(f"optim_args.{key}={explicit[key]!r} for optimizer '{entry.name}': {TRAINER_REFUSED[key][1]}")
        out[key] = value
    return out


def _numeric_string(value: Any) -> Any:
    """``value`` as a number when it is a string that reads as one (PyYAML's ``1e-3``: YAML 1.1 needs a dot), else
    as given (a string hyperparameter such as ``proj_type='std'``: the spec decides)."""
    if isinstance(value, str):
        try:
            return int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            pass
    return value


def _accepts(spec: Any, value: Any) -> bool:
    try:
        spec.validate(value)
        return True
    except ValueError:
        return False


def _require_numeric_lr(optimizer: torch.optim.Optimizer, name: str) -> None:
    if any(g.get("lr") is None for g in optimizer.param_groups):
        raise ValueError(
            f"optimizer '{name}' would run with lr=None (a self-computed step size, e.g. Adafactor's relative_step=True); "
            "the Trainer's learning-rate scheduler needs a number: keep relative_step=False (the default under the "
            "Trainer) and set learning_rate"
        )


def optimizer_cls_and_kwargs(
    model: nn.Module, name: str, *, args: TrainingArguments | None = None, embeddings_32bit: bool | None = None,
    **hparams: Any
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """``(cls, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)``.

    ``kwargs["params"]`` holds lowmem's parameter groups for ``model``; the Trainer pops it and
    uses it instead of its own two groups. The Trainer consumes (mutates) ``kwargs``: build one
    pair per Trainer. When the Trainer pops them, the groups are built again if the model's trainable parameters
    changed since (TRL's ``peft_config`` freezes the base weights and adds adapters after this call):
    :class:`TrainerOptimizerKwargs`.

    Args:
        model (`nn.Module`): The model the Trainer trains (the same object).
        name (`str`): A registered optimizer (``lowmem list``), or a Hugging Face ``optim`` name lowmem maps
            (``"galore_adamw_8bit"``, ``"adamw_torch_4bit"``, ...; not ``<name>_layerwise``: use :class:`LowMemTrainer`).
        args (`TrainingArguments` or `None`, defaults to `None`): When given, its learning rate,
            weight decay, betas and epsilon apply as in :func:`trainer_hparams`; ``hparams`` win.
            Without it only ``hparams`` (and the optimizer's defaults) apply, and the Trainer's
            ``learning_rate`` is *not* used: pass ``lr`` yourself.
        embeddings_32bit (`bool` or `None`, defaults to `None`): Keep every ``nn.Embedding`` weight's state 32-bit
            (:func:`create_optimizer_embeddings_32bit`). `None`: when ``name`` (or ``args.optim``, meaning the same
            optimizer) is one of the Hugging Face names transformers' Trainer builds as a bitsandbytes 8-bit
            optimizer (:data:`lowmem.train.HF_EMBEDDINGS_32BIT`: ``lion_8bit``, ``adamw_8bit``, ...), as it does.
        **hparams: The optimizer's hyperparameters (``target_modules`` for subspace optimizers).

    A ``TrainingArguments.optim`` other than the default and other than ``name`` is logged as a warning: the
    Trainer ignores it when ``optimizer_cls_and_kwargs`` is given.

    A plain ``transformers.Trainer`` runs none of :class:`LowMemOptimizerMixin`'s resume checks: an FSDP2 checkpoint
    saved before lowmem recorded per-shard placements fails there inside torch.distributed.checkpoint ("Missing key
    in checkpoint state_dict: ...shard_placement"); pass the same pair to :class:`LowMemTrainer` to resume it
    (docs/training.md, "A plain Trainer").

    Raises:
        ValueError: Unknown name or hyperparameter, a layerwise name, or a configuration without a numeric ``lr``.
    """
    from lowmem.train import hf_keeps_embeddings_32bit

    given, name = name, _plain_trainer_name(name)
    entry = get_entry(name)
    optim = getattr(getattr(args, "optim", None), "value", getattr(args, "optim", None)) if args is not None else None
    if embeddings_32bit is None:
        embeddings_32bit = hf_keeps_embeddings_32bit(given) or (
            hf_keeps_embeddings_32bit(optim) and _plain_trainer_name(optim, strict=False) == entry.name)
    if args is not None:
        if optim is not None and optim != _TA_DEFAULTS.get("optim") and _plain_trainer_name(optim, strict=False) != entry.name:
            logger.warning("optimizer_cls_and_kwargs(model, %r) replaces TrainingArguments.optim=%r, which the Trainer "
                           "ignores when optimizer_cls_and_kwargs is given%s", name, optim,
                           " (layerwise mode: LowMemTrainer with lowmem_layerwise=True)" if optim.endswith("_layerwise") else "")
    resolved = target_modules_hparam(name, args, trainer_hparams(name, args, hparams)) if args is not None else dict(hparams)

    def build() -> torch.optim.Optimizer:
        with _explain_targets(model, resolved, entry.batched_targets):
            return (create_optimizer_embeddings_32bit(model, name, **resolved) if embeddings_32bit
                    else create_optimizer(model, name, **resolved))

    opt = build()
    _require_numeric_lr(opt, entry.name)
    cls = type(opt)
    decided = dtype_decided_settings(cls, resolved)
    if entry.recipe is not None:
        kwargs = {k: v for k, v in opt.defaults.items() if k not in decided}
        if cls is LowMemOptimizer:  # registered without a class of its own
            kwargs["recipe"] = entry.recipe
    else:
        kwargs = {k: v for k, v in resolved.items() if k != "target_modules"}

    def groups(built: torch.optim.Optimizer) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k not in decided} for g in built.param_groups]

    kwargs["params"] = groups(opt)
    return cls, TrainerOptimizerKwargs(kwargs, model, lambda: groups(build()))


def dtype_decided_settings(cls: type, given: dict[str, Any]) -> tuple[str, ...]:
    """The settings ``cls``'s constructor decides per parameter group from the weights' dtype when they are not
    given (``given``: the hyperparameters the optimizer was built with), which :func:`optimizer_cls_and_kwargs` leaves
    out of the ``(cls, kwargs)`` pair (the class's defaults and every group's) so that the Trainer's construction
    decides them again, as lowmem's own: StableAdamW's ``kahan_summation`` (torch-optimi's ``kahan_sum=None``: on for
    the groups of bfloat16 weights, with the load pre-hook that lets a checkpoint of the same run on weights of another
    dtype load; commit b5cae1f). Before (SMALLS20B 3), the pair passed ``kahan_summation`` as given: the Trainer's
    StableAdamW had the decided values but no hook, and a resume onto weights of another dtype was refused
    ("the checkpoint was saved with other settings kahan_summation=False (this optimizer: True)")."""
    from lowmem.optim.recipes.stable_adamw import StableAdamW

    return ("kahan_summation",) if issubclass(cls, StableAdamW) and "kahan_summation" not in given else ()


class TrainerOptimizerKwargs(dict):
    """The ``kwargs`` of :func:`optimizer_cls_and_kwargs`: a dict whose ``pop("params")`` (what the Trainer does when it
    builds the optimizer, after its own wrapping of the model) gives groups of the model's trainable parameters *then*.
    TRL's trainers with ``peft_config`` wrap the model in LoRA adapters after the pair was built: peft freezes the base
    weights the groups hold and adds adapters they lack, so the optimizer would step nothing (USERAPI 9: every adapter
    unchanged, no warning). When the model's set of trainable parameters changed since the pair was built, the groups
    are built again from the same model, name and hyperparameters (peft injects its layers into that object), with
    an info line."""

    def __init__(self, kwargs: dict[str, Any], model: nn.Module, rebuild: Any) -> None:
        super().__init__(kwargs)
        self._model, self._rebuild = model, rebuild
        self._trainable = _trainable_ids(model)

    def pop(self, key: Any, *default: Any) -> Any:
        if key == "params" and key in self and _trainable_ids(self._model) != self._trainable:
            now = _trainable_ids(self._model)
            logger.info("optimizer_cls_and_kwargs: the model's trainable parameters changed since the pair was built "
                        "(%d frozen, %d added: peft adapters?); parameter groups built again from the model",
                        len(self._trainable - now), len(now - self._trainable))
            self["params"], self._trainable = self._rebuild(), now
        return super().pop(key, *default)


def _trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def _plain_trainer_name(name: str, strict: bool = True) -> str | None:
    """The lowmem name of ``name`` (a lowmem or a mapped Hugging Face ``optim`` name) for a plain Trainer's
    :func:`optimizer_cls_and_kwargs`. With ``strict=False`` an unknown or layerwise name gives `None`.

    Raises:
        ValueError: ``<name>_layerwise`` (layerwise mode installs gradient hooks, which ``optimizer_cls_and_kwargs``
            cannot: use :class:`LowMemTrainer`), or an unknown name (listing both sets of names).
    """
    from lowmem.train import resolve_optim_name

    try:
        base, layerwise = resolve_optim_name(name)
    except ValueError:
        if not strict:
            return None
        raise
    if layerwise:
        if not strict:
            return None
        raise ValueError(f"optimizer_cls_and_kwargs(model, {name!r}): layerwise mode steps each parameter in its gradient hook, "
                         "which a plain Trainer's optimizer_cls_and_kwargs cannot install; use LowMemTrainer with "
                         f"LowMemTrainingArguments(lowmem_optim={base!r}, lowmem_layerwise=True)")
    return base


@dataclass
class LowMemArguments:
    """Fields that select a lowmem optimizer; combine with any ``TrainingArguments`` subclass
    (``@dataclass class LowMemDPOConfig(LowMemArguments, DPOConfig)``).

    Parameters:
        lowmem_optim (`str` or `None`, *optional*, defaults to `None`):
            Name of a registered lowmem optimizer (``lowmem list``), e.g. ``"adafactor"``, or a Hugging
            Face ``optim`` name that ``lowmem train`` maps (``"galore_adamw_8bit"`` -> ``galore_adamw8bit``,
            ``"adamw_torch_4bit"``, ``"paged_adamw_8bit"``, ...; ``<name>_layerwise`` also sets
            ``lowmem_layerwise``; :data:`lowmem.train.HF_OPTIM_NAMES`). When set,
            it replaces ``optim`` (a non-default ``optim`` is warned about) and the Trainer builds it
            with lowmem's parameter groups. ``learning_rate``, ``weight_decay``,
            ``adam_beta1``/``adam_beta2`` (as ``betas``) and ``adam_epsilon`` (as ``eps``) apply where
            the optimizer has them; a field that cannot apply is logged (a warning if it was changed
            from its default). Adafactor-style optimizers run with ``relative_step=False`` and
            ``scale_parameter=False``, as with ``optim="adafactor"``. `None` keeps the Trainer's own
            optimizer (an ``optim`` that lowmem implements too, ``galore_adamw``, ``adafactor``, ..., is logged as a
            warning naming ``lowmem_optim``: :func:`hf_optim_lowmem_implements`).
        lowmem_optim_args (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Extra hyperparameters for ``lowmem_optim``: a dict, a JSON object, or ``"k=v,k=v"``
            (e.g. ``"rank=64,update_proj_gap=200"``). They win over values mapped from the fields
            above and over the Hugging Face Trainer's own ``optim_args`` string, which applies too
            (:func:`hf_optim_args`; checked here as well). Unknown names raise ``ValueError`` listing the valid ones. Parsed into a dict
            in ``__post_init__``. Requires ``lowmem_optim``.
        lowmem_layerwise (`bool`, *optional*, defaults to `False`):
            Step each parameter from its post-accumulate-grad hook and free its gradient at once
            (:class:`lowmem.optim.layerwise.LayerwiseOptimizer`), so no full gradient buffer exists.
            Unlike transformers' layerwise GaLore it works with ``gradient_accumulation_steps``
            (subspace recipes accumulate in the projected space) and with checkpoints. Gradient
            clipping becomes the global norm *of the previous step* (``max_grad_norm``; the current
            norm is unknown while parameters are already being stepped) and the Trainer's own
            clipping is turned off; the logged ``grad_norm`` is the step's global norm, summed in the
            hooks (:func:`layerwise_grad_norm`). Under DDP the trainer attaches it to the DDP module at its
            first training step (parameters stepped from the communication hook on the all-reduced
            gradients, docs/distributed.md); under FSDP it is refused. Requires ``lowmem_optim``.
    """

    lowmem_optim: str | None = field(
        default=None, metadata={"help": "Registered lowmem optimizer (see `lowmem list`); replaces `optim` when set."}
    )
    lowmem_optim_args: dict | str | None = field(
        default=None,
        metadata={"help": "Hyperparameters for `lowmem_optim`: JSON object or 'k=v,k=v'; they win over mapped fields."},
    )

    lowmem_layerwise: bool = field(
        default=False,
        metadata={"help": "Step each parameter in its gradient hook and free the gradient at once (lowmem_optim only)."},
    )
    lowmem_embeddings_32bit: bool | None = field(
        default=None,
        metadata={"help": "Keep every nn.Embedding weight's optimizer state 32-bit (an 8-bit lowmem_optim only), as "
                          "transformers' Trainer does for its bitsandbytes 8-bit optim names. None: on for those names "
                          "(lion_8bit, paged_lion_8bit, adamw_bnb_8bit, adamw_8bit, paged_adamw_8bit), off otherwise."},
    )

    #: Ranges of this config's fields that differ from :data:`lowmem.config.RANGES` (:func:`check_config_ranges`);
    #: ``None``: the class checks the field itself (GVPO's ``beta > 0``).
    FIELD_RANGES: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        """Checks, before any model loads: the optimizer fields (:func:`check_optimizer_fields`), the ranges of
        every field that has one (:func:`check_config_ranges`, TRL's fields included, also without
        ``lowmem_optim``), the optimizer name and its hyperparameters."""
        check_optimizer_fields(self)
        check_config_ranges(self)
        _check_lowmem_name_in_optim(self)
        given = self.lowmem_optim
        if self.lowmem_optim is not None:
            self._resolve_lowmem_optim()
        self.lowmem_optim_args = parse_optim_args(self.lowmem_optim_args)
        if self.lowmem_layerwise and self.lowmem_optim is None:
            raise ValueError("lowmem_layerwise=True requires lowmem_optim")
        if self.lowmem_layerwise:  # a bnb_* class: refused here, before any model loads, not at train()
            from lowmem.optim.layerwise import layerwise_refusal

            refused = layerwise_refusal(self.lowmem_optim, "lowmem_layerwise")
            if refused is not None:
                raise ValueError(f"{type(self).__name__}.{refused}")
        self._resolve_embeddings_32bit(given)
        if self.lowmem_optim is None:
            if self.lowmem_optim_args:
                raise ValueError("lowmem_optim_args is set but lowmem_optim is not")
        else:  # name, keys and values now, before any model loads (not at the first training step)
            for field_name in ("optim_args", "lowmem_optim_args"):  # the HF Trainer's string applies too (hf_optim_args)
                try:
                    checked = validate_optim_args(self.lowmem_optim, getattr(self, field_name, None))
                except ValueError as err:
                    raise ValueError(f"{type(self).__name__}.{field_name}{str(err)[len('optim_args'):]}"
                                     if str(err).startswith("optim_args.") else f"{type(self).__name__}.{field_name}: {err}") from None
                if field_name == "lowmem_optim_args":
                    self.lowmem_optim_args = checked
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        from lowmem.train import check_half_precision, check_scheduler_kwargs

        # lr_scheduler_kwargs' keys and values, as lowmem train checks them (a wrong one failed at the first step, or
        # ran another schedule: min_lr_rate -1 held the lr at 0 for half the run)
        sched = getattr(self, "lr_scheduler_type", "linear")
        check_scheduler_kwargs(str(getattr(sched, "value", sched)), getattr(self, "lr_scheduler_kwargs", None),
                               self.learning_rate, prefix=f"{type(self).__name__}.")

        # fp16 on the CPU: accelerate sets no autocast there, the run trains in float32 without a word
        check_half_precision({"fp16": getattr(self, "fp16", False), "bf16": getattr(self, "bf16", False),
                              "use_cpu": getattr(self, "use_cpu", False)},
                             where=f"{type(self).__name__}.")
        targets = getattr(self, "optim_target_modules", None)
        if self.lowmem_optim is not None and targets is not None and get_entry(self.lowmem_optim).target_key is None:
            raise ValueError(_targets_refused(targets, self.lowmem_optim))
        optim = getattr(self, "optim", None)
        default = _TA_DEFAULTS.get("optim")
        from lowmem.optim.recipes.lomo import FUSED_BACKWARD

        if self.lowmem_optim in FUSED_BACKWARD and not self.lowmem_layerwise:  # the HF Trainer's optim='lomo' always fuses
            logger.warning("lowmem_optim=%r without lowmem_layerwise=True is an ordinary optimizer: the backward pass keeps "
                           "every gradient until the step (LOMO's saving needs lowmem_layerwise=True, or lowmem_optim=%r)",
                           self.lowmem_optim, f"{self.lowmem_optim}_layerwise")
        optim = getattr(optim, "value", optim)
        if (self.lowmem_optim is not None and optim is not None and optim != default
                and _same_optimizer(optim, self.lowmem_optim, self.lowmem_layerwise) is False):
            logger.warning("lowmem_optim=%r replaces optim=%r, which is ignored", self.lowmem_optim, optim)
        ours = hf_optim_lowmem_implements(optim) if self.lowmem_optim is None else None
        if ours is not None:
            logger.warning("%s(optim=%r) without lowmem_optim runs transformers' own %r, not lowmem's %r; set "
                           "lowmem_optim=%r for lowmem's (it takes the same name, optim_args and optim_target_modules)",
                           type(self).__name__, optim, optim, ours, optim)

    def _resolve_lowmem_optim(self) -> None:
        """``lowmem_optim`` as a lowmem registry name: a Hugging Face ``optim`` name (``galore_adamw_8bit``,
        ``adamw_torch_4bit``, ``paged_adamw_8bit``, ...) maps as in ``lowmem train``
        (:data:`lowmem.train.HF_OPTIM_NAMES`), and ``<name>_layerwise`` also sets ``lowmem_layerwise``.

        Raises:
            ValueError: Neither a lowmem nor a mapped Hugging Face name (naming ``lowmem_optim`` and both sets of names).
        """
        from lowmem.train import resolve_optim_name

        try:
            name, layerwise = resolve_optim_name(self.lowmem_optim)
        except ValueError as err:
            text = str(err)
            raise ValueError(f"{type(self).__name__}.lowmem_{text}" if text.startswith("optim=")
                             else f"{type(self).__name__}.lowmem_optim: {text}") from None
        if name != self.lowmem_optim or layerwise:
            logger.info("lowmem_optim=%r is lowmem's %r%s", self.lowmem_optim, name,
                        " with lowmem_layerwise=True" if layerwise else "")
        self.lowmem_optim = name
        self.lowmem_layerwise = self.lowmem_layerwise or layerwise

    def _resolve_embeddings_32bit(self, given: Any) -> None:
        """``lowmem_embeddings_32bit``: `None` becomes `True` when ``lowmem_optim`` was given as one of the Hugging Face
        names transformers' Trainer builds as a bitsandbytes 8-bit optimizer (:data:`lowmem.train.HF_EMBEDDINGS_32BIT`),
        or ``optim`` is one and means the same optimizer; `False` otherwise (lowmem's own names keep their documented
        layout). `True` is checked: it needs an 8-bit ``lowmem_optim`` that can keep them so
        (:func:`embeddings_32bit_kind`) and no layerwise mode.

        Raises:
            ValueError: Not a bool / `None`, or `True` where it cannot apply (naming the field and why).
        """
        from lowmem.train import HF_EMBEDDINGS_32BIT, hf_keeps_embeddings_32bit

        where, value = f"{type(self).__name__}.lowmem_embeddings_32bit", self.lowmem_embeddings_32bit
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{where}={value!r}: expected True, False or None (None: True for the Hugging Face "
                             f"names {sorted(HF_EMBEDDINGS_32BIT)}, as transformers' Trainer)")
        if value is None:
            optim = getattr(self, "optim", None)
            optim = getattr(optim, "value", optim)
            hf = hf_keeps_embeddings_32bit(given) or (
                hf_keeps_embeddings_32bit(optim) and self.lowmem_optim is not None
                and _same_optimizer(optim, self.lowmem_optim, self.lowmem_layerwise))
            self.lowmem_embeddings_32bit = bool(hf and self.lowmem_optim is not None and not self.lowmem_layerwise)
            return
        if not value:
            return
        if self.lowmem_optim is None:
            raise ValueError(f"{where}=True requires lowmem_optim (without it transformers' Trainer builds the optimizer)")
        if self.lowmem_layerwise:
            raise ValueError(f"{where}=True cannot apply in layerwise mode (lowmem_layerwise=True builds one optimizer "
                             "per parameter); set it to False or drop lowmem_layerwise")
        if embeddings_32bit_kind(self.lowmem_optim) is None:
            raise ValueError(f"{where}=True cannot apply to lowmem_optim={self.lowmem_optim!r}: expected an 8-bit "
                             f"optimizer that keeps a tensor's state 32-bit by group ({_embeddings_32bit_names()})")


def _check_lowmem_name_in_optim(args: Any) -> None:
    """``optim`` naming a lowmem optimizer that transformers does not know (``optim="racs"``, ``"alice"``,
    ``"sm3_layerwise"``): transformers' own error lists its ``OptimizerNames`` only; this one names ``lowmem_optim``,
    the field that takes the name (``optim_args`` and ``optim_target_modules`` apply to it as well).

    Raises:
        ValueError: naming ``optim`` and ``lowmem_optim``.
    """
    from transformers.training_args import OptimizerNames

    from lowmem.train import resolve_optim_name

    optim = getattr(args, "optim", None)
    optim = getattr(optim, "value", optim)  # an OptimizerNames member: its string
    if not isinstance(optim, str) or optim in {o.value for o in OptimizerNames}:
        return
    try:
        resolve_optim_name(optim)
    except ValueError:
        return  # not lowmem's either: transformers' error lists its names
    raise ValueError(f"{type(args).__name__}.optim={optim!r} is a lowmem optimizer, not one of transformers' "
                     f"OptimizerNames: set lowmem_optim={optim!r} instead (optim_args and optim_target_modules apply "
                     "to it as well)")


def hf_optim_lowmem_implements(optim: Any) -> str | None:
    """The lowmem name of a Hugging Face ``TrainingArguments.optim`` that lowmem implements itself
    (:data:`lowmem.train.HF_OPTIM_NAMES`: ``galore_adamw``, ``adafactor``, ``adamw_torch_8bit``, ``*_layerwise``, ...),
    which a :class:`LowMemArguments` config without ``lowmem_optim`` leaves to transformers (galore-torch, its own
    Adafactor, torchao, bitsandbytes); `None` for another name and for AdamW (``adamw_torch``: torch's AdamW, which
    lowmem's equals). A newcomer's ``LowMemTrainingArguments(optim="galore_adamw", optim_target_modules=[...])``
    trained with galore-torch without a word (NEWCOMER audit)."""
    from lowmem.train import resolve_optim_name

    if not isinstance(optim, str):
        return None
    try:
        name, layerwise = resolve_optim_name(optim)
    except ValueError:
        return None
    if name == "adamw" and not layerwise:
        return None
    return f"{name}_layerwise" if layerwise else name


def _same_optimizer(optim: str, name: str, layerwise: bool) -> bool:
    """Whether the Hugging Face ``optim`` name means lowmem's ``name`` with ``layerwise`` (``galore_adamw_8bit_layerwise``
    and ``galore_adamw8bit`` in layerwise mode): then ``lowmem_optim`` replaces nothing the user asked for."""
    from lowmem.train import resolve_optim_name

    try:
        return resolve_optim_name(optim) == (name, layerwise)
    except ValueError:
        return False


_STRATEGY_STEPS = ("logging_steps", "save_steps", "eval_steps")  # read only under their *_strategy='steps'


def check_config_ranges(config: Any) -> None:
    """Range-check the fields of a ``TrainingArguments`` / TRL config that have a range in
    :data:`lowmem.config.RANGES` (or in the class's ``FIELD_RANGES``), as ``lowmem train`` checks a recipe:
    TRL does not check them itself (a negative ``beta`` trains towards the rejected answers / away from the
    reference, ``temperature <= 0`` or ``max_completion_length=0`` fail at generation, after the model loaded).
    ``reward_weights`` must be a list of finite numbers, and a field whose metadata lists its ``choices`` (SFT's
    ``loss_type`` and ``packing_strategy``, ``truncation_mode``, ...) one of them. ``None`` (an unset optional
    field) is not checked. A number given as a string (``beta="0.1"``, ``reward_weights=["1", "1"]``: a config read
    from JSON) is converted and the config keeps the number, as ``lowmem train`` converts a YAML recipe; a string
    that is no number is refused naming the field.

    Raises:
        ValueError: (:class:`lowmem.config.ConfigError`) naming ``<Config>.<field>``, the value and the valid range.
    """
    from lowmem.config import RANGES, ConfigError, check_value, field_types

    ranged = {**RANGES, **getattr(type(config), "FIELD_RANGES", {})}
    ranges = {k: v for k, v in ranged.items() if v is not None}  # None: the class checks the range itself (the type here)
    where = f"{type(config).__name__}."
    names = {f.name for f in dataclasses.fields(config)}
    try:  # each field checked as its annotation types it (TRL's pad_to_multiple_of: int | str, default 'auto')
        types_ = field_types(type(config))
    except Exception:  # (an annotation typing cannot resolve: every ranged field is a number)
        types_ = {}
    for name in sorted(names & set(ranged)):
        value = getattr(config, name)
        if value is None or isinstance(value, (list, tuple, dict)):
            continue
        strategy = getattr(config, name.replace("_steps", "_strategy"), "steps") if name in _STRATEGY_STEPS else "steps"
        if str(getattr(strategy, "value", strategy)) != "steps":  # save_steps=0 beside save_strategy='no': unused
            continue
        # the converted value is kept: a number given as a string ("0.1", a config read from JSON) is the number, as
        # `lowmem train` converts YAML; before, the string passed this check and failed at the first step
        setattr(config, name, check_value(name, value, types_.get(name, float), where=where, ranges=ranges))
    weights = getattr(config, "reward_weights", None) if "reward_weights" in names else None
    if weights is not None:
        if not isinstance(weights, (list, tuple)):  # before: "'float' object is not iterable" from list(weights)
            raise ConfigError(f"{where}reward_weights={weights!r}: expected a list of numbers, one per reward function")
        infinite = [w for w in weights if not isinstance(w, bool) and _as_float(w) is not None
                    and not math.isfinite(_as_float(w))]
        if infinite:
            raise ConfigError(f"{where}reward_weights={list(weights)!r}: expected finite numbers, one per reward "
                              f"function; got {infinite}")
        config.reward_weights = check_value("reward_weights", list(weights), list[float], where=where)
    for f in dataclasses.fields(config):  # TRL's fields that declare their values (SFT's packing_strategy, truncation_mode, ...)
        choices = f.metadata.get("choices") if f.metadata else None
        value = getattr(config, f.name, None)
        if not choices or value is None or isinstance(value, enum.Enum):
            continue
        bad = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if v not in choices]
        if bad:
            raise ConfigError(f"{where}{f.name}={value!r}: expected {'items ' if isinstance(value, (list, tuple)) else ''}"
                              f"one of {list(choices)}")


def _as_float(value: Any) -> float | None:
    """``value`` as a float (a number or a numeric string), else `None`."""
    try:
        return float(value) if isinstance(value, (int, float, str)) else None
    except ValueError:
        return None


@dataclass
class LowMemTrainingArguments(LowMemArguments, TrainingArguments):
    """``TrainingArguments`` plus :class:`LowMemArguments` (``lowmem_optim``, ``lowmem_optim_args``).

    Use with :class:`LowMemTrainer` (or any trainer with :class:`LowMemOptimizerMixin`); see
    :class:`LowMemArguments` for the two fields and how the ``TrainingArguments`` optimizer fields
    map onto the lowmem optimizer.
    """


def embeddings_32bit_kind(name: str) -> str | None:
    """How optimizer ``name`` keeps the ``nn.Embedding`` weights' state 32-bit: ``"bnb"`` (a bitsandbytes 8-bit class:
    ``GlobalOptimManager.register_module_override(module, "weight", {"optim_bits": 32})``, exactly transformers'
    ``Trainer.create_optimizer``), ``"groups"`` (an engine 8-bit recipe: the weight in a group of its own whose
    ``min_quant_size`` exceeds its size, :func:`lowmem.optim.registry.full_precision_embedding_groups`), or `None`."""
    from lowmem.optim.recipes.bnb import BNB_OPTIMIZERS

    entry = get_entry(name)
    if entry.name in BNB_OPTIMIZERS:
        return "bnb" if BNB_OPTIMIZERS[entry.name][1] == 8 else None
    if (entry.recipe is not None and "min_quant_size" in entry.valid_hparams() and entry.target_key is None
            and entry.group_builder is None):
        return "groups"
    return None


def _embeddings_32bit_names() -> str:
    from lowmem.optim import list_optimizers

    return ", ".join(n for n in list_optimizers() if embeddings_32bit_kind(n) is not None)


def create_optimizer_embeddings_32bit(model: nn.Module, name: str, **hparams: Any) -> torch.optim.Optimizer:
    """:func:`lowmem.create_optimizer` with every ``nn.Embedding`` weight's state kept 32-bit, as transformers'
    Trainer keeps it for its bitsandbytes 8-bit ``optim`` names (:func:`embeddings_32bit_kind`); the other tensors
    as ``create_optimizer`` builds them.

    Raises:
        ValueError: ``name`` cannot keep them so (naming the optimizers that can).
    """
    from lowmem.optim.registry import embedding_weights, full_precision_embedding_groups

    kind = embeddings_32bit_kind(name)
    if kind is None:
        raise ValueError(f"optimizer {name!r} cannot keep the embeddings' state 32-bit: expected an 8-bit optimizer "
                         f"({_embeddings_32bit_names()})")
    if kind == "groups":
        opt = create_optimizer(full_precision_embedding_groups(model, name, **hparams), name, **hparams)
    else:
        opt = create_optimizer(model, name, **hparams)
        _register_bnb_embedding_overrides(model)
    logger.info("lowmem optimizer %s: %d nn.Embedding weight(s), %d elements, keep a 32-bit state", name,
                len(embedding_weights(model)), sum(w.numel() for w in embedding_weights(model)))
    return opt


def _register_bnb_embedding_overrides(model: nn.Module) -> None:
    """transformers' ``Trainer.create_optimizer`` for a bitsandbytes class built with ``optim_bits=8``: every
    ``nn.Embedding``'s ``weight`` gets ``{"optim_bits": 32}`` in bitsandbytes' process-wide ``GlobalOptimManager``
    (read at the optimizer's first step)."""
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})


def check_resumable(checkpoint: str) -> None:
    """A checkpoint the Trainer is about to resume from can: not one written with ``save_only_model`` (no
    ``optimizer.pt`` / ``scheduler.pt``: the Trainer skipped them, and the optimizer state and the schedule started
    again, silently), not one with a damaged file (``optimizer.pt`` half-written by a killed run: torch's zip error
    named no file). What ``lowmem train`` refuses (:func:`lowmem.train.weights_only_checkpoint`,
    :func:`lowmem.train.checkpoint_damaged`), for the Python API.

    Raises:
        ValueError: Naming the checkpoint, its files, and what to do (the latest complete checkpoint beside it).
    """
    from lowmem.train import checkpoint_damaged, checkpoint_problems, weights_only_checkpoint

    path = Path(checkpoint)
    if not path.is_dir():
        return  # (the Trainer's own error)
    if weights_only_checkpoint(path):
        raise ValueError(f"resume_from_checkpoint={checkpoint!r} holds the weights only (save_only_model=True writes no "
                         "optimizer.pt, scheduler.pt or RNG state), so it cannot resume a run: the optimizer state and "
                         "the schedule would start again; start a new run from its weights (from_pretrained) without "
                         "resume_from_checkpoint")
    damaged = checkpoint_damaged(path)
    if damaged:
        siblings = sorted((d for d in path.parent.glob("checkpoint-*") if d.is_dir() and d != path
                           and d.name[len("checkpoint-"):].isdigit() and checkpoint_problems(d) is None),
                          key=lambda d: int(d.name[len("checkpoint-"):]))
        raise ValueError(f"resume_from_checkpoint: {checkpoint} is not a complete checkpoint ("
                         + "; ".join(f"{n} {why}" for n, why in damaged.items()) + ": an interrupted save?); "
                         + (f"the latest complete one is {siblings[-1]}: resume from it (resume_from_checkpoint="
                            f"{str(siblings[-1])!r}), or move {path.name} aside" if siblings else
                            "no complete checkpoint is beside it: start from step 0"))


class LowMemOptimizerMixin:
    """Builds the optimizer from ``args.lowmem_optim`` / ``args.lowmem_optim_args``.

    Put it first in the bases of any ``transformers.Trainer`` subclass (TRL's included). With
    ``lowmem_optim`` unset (or args without the field) the trainer behaves exactly as before.
    """

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``train``, with the checkpoint to resume checked as ``lowmem train`` checks it
        (:func:`resume_checkpoint`): a ``save_only_model`` checkpoint or an incomplete one (a file missing or
        truncated) is refused naming it, and `True` takes the latest *complete* ``checkpoint-N`` (incomplete ones
        skipped with a warning). The Trainer itself resumed a ``save_only_model`` checkpoint with a fresh optimizer and
        schedule, silently, and failed in ``torch.load`` on a truncated ``optimizer.pt`` naming no file. The output
        directory's ``checkpoint-M`` after the resumed one are moved aside first (:func:`move_later_checkpoints`, the
        main process only): the Trainer rewrote them in place, file by file."""
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False \
                and not getattr(self, "is_deepspeed_enabled", False):  # (DeepSpeed writes its own layout)
            resume_from_checkpoint = resume_checkpoint(self.args.output_dir, resume_from_checkpoint)
            if isinstance(resume_from_checkpoint, str) and self.is_world_process_zero():
                move_later_checkpoints(self.args.output_dir, resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)


    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The Trainer's load of a checkpoint's weights, exact on models that transformers loads through a
        weight conversion (MoE models with fused experts: Mixtral, Qwen2-MoE, Qwen3-MoE), which the
        Trainer's own ``load_state_dict(strict=False)`` left at their pre-resume values
        (:func:`lowmem.train.load_trainer_checkpoint`)."""
        from lowmem.train import load_trainer_checkpoint

        return load_trainer_checkpoint(self, super()._load_from_checkpoint, resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's weights, exact through a weight conversion too
        (see :meth:`_load_from_checkpoint`)."""
        from lowmem.train import load_converted_checkpoint

        best = self.state.best_model_checkpoint
        if best is not None and not (getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)):
            if load_converted_checkpoint(getattr(self.model, "module", self.model), best):
                return None
        return super()._load_best_model()

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        name = getattr(self.args, "lowmem_optim", None)
        if name is None:
            return super().create_optimizer(model)
        if self.optimizer is not None:
            if not getattr(self, "_lowmem_built_optimizer", False):
                raise ValueError("lowmem_optim is set but an optimizer was also passed via `optimizers=`; choose one")
            return self.optimizer
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            raise ValueError("lowmem_optim and optimizer_cls_and_kwargs are both set; choose one")
        opt_model = self.model if model is None else model
        hp = target_modules_hparam(name, self.args, trainer_hparams(name, self.args, getattr(self.args, "lowmem_optim_args", None)))
        if getattr(self.args, "lowmem_layerwise", False):
            from lowmem.optim.layerwise import LayerwiseOptimizer

            if getattr(self, "is_fsdp_enabled", False):
                # Under FSDP2 the Trainer builds the optimizer on the unsharded model and accelerate then
                # swaps its parameters for the sharded ones: the hooks would stay on parameters that get
                # no gradients, so nothing would train (measured before this check: every weight unchanged).
                raise ValueError(
                    "lowmem_layerwise=True does not work under FSDP (accelerate's FSDP plugin / TrainingArguments.fsdp): "
                    "layerwise mode steps each parameter from its gradient hook, before FSDP reduce-scatters the "
                    "gradient, and the hooks would sit on the unsharded parameters that FSDP replaces. Drop "
                    "lowmem_layerwise (the optimizer then steps each rank's shard, docs/distributed.md) or train with DDP"
                )

            with _explain_targets(opt_model, hp, get_entry(name).batched_targets):
                self.optimizer = LayerwiseOptimizer(
                    opt_model, name, accumulation_steps=self.args.gradient_accumulation_steps,
                    max_grad_norm=self.args.max_grad_norm or None, clip_mode="global_prev", **hp,
                )
            # gradients are freed in their hooks: the Trainer's clipping would see none (skipped by _clip_grad_norm;
            # the user's arguments keep their max_grad_norm, for a second trainer built on them and training_args.bin)
        else:
            with _explain_targets(opt_model, hp, get_entry(name).batched_targets):
                if getattr(self.args, "lowmem_embeddings_32bit", False):
                    self.optimizer = create_optimizer_embeddings_32bit(opt_model, name, **hp)
                else:
                    self.optimizer = create_optimizer(opt_model, name, **hp)
        _require_numeric_lr(self.optimizer, name)
        self._lowmem_built_optimizer = True
        logger.info("lowmem optimizer %s with %s", name, hp)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The Trainer's scheduler; under one that is not a ``LambdaLR`` (``reduce_lr_on_plateau``, ``greedy``: no
        ``base_lrs`` in ``scheduler.pt``) each group's ``initial_lr`` is set to its rate, as torch's ``LRScheduler``
        sets it, so ``optimizer.pt`` keeps the run's learning rate and a resume compares it
        (:func:`plateau_mismatch`)."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if getattr(scheduler, "lr_lambdas", None) is None:
            opt = optimizer if optimizer is not None else self.optimizer
            for group in getattr(opt, "param_groups", None) or []:
                group.setdefault("initial_lr", group["lr"])
        return scheduler

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer's own loading, with errors that name the cause (the original kept as ``__cause__``):
        a checkpoint of another lowmem optimizer (other group hyperparameters, which torch would adopt
        and the first step fail on with a ``KeyError``; or another number of groups) is a ``ValueError``
        saying to resume with the optimizer that wrote it; under FSDP a checkpoint written by another
        number of processes whose per-shard state cannot be redistributed fails inside torch with a
        bare size mismatch, re-raised naming the number of processes. An FSDP ``SHARDED_STATE_DICT`` checkpoint
        saved before lowmem recorded per-shard state's placements (``shard_placement``), which DCP refuses ("Missing
        key in checkpoint state_dict: ...shard_placement", and nothing else: ``sharded.only_placement_missing``), is
        loaded again without the records in the target (``sharded.without_placement_record``): it resumes, its
        per-shard state loaded unchecked with ``load_state_dict``'s one warning (docs/distributed.md, "Re-sharded
        parameters")."""
        if checkpoint is not None:
            check_resumable(checkpoint)
        name = getattr(self.args, "lowmem_optim", None)
        before = _group_keys(self.optimizer)
        scheduler = getattr(getattr(self, "lr_scheduler", None), "scheduler", getattr(self, "lr_scheduler", None))
        own_base = list(scheduler.base_lrs) if getattr(scheduler, "lr_lambdas", None) is not None else None
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's AcceleratedOptimizer
        # another schedule (ReduceLROnPlateau, GreedyLR): this run's rates and settings, compared after the load
        own_plateau = (None if own_base is not None or scheduler is None or not hasattr(scheduler, "state_dict") else
                       ([g.get("initial_lr", g["lr"]) for g in inner.param_groups], scheduler.state_dict()))
        own_settings = _group_settings(inner)
        if checkpoint is not None and getattr(self, "is_fsdp_enabled", False) and hasattr(inner, "prepare_load"):
            # BAdam: torch.distributed.checkpoint fills only the entries the optimizer holds when it asks, which
            # depend on the block schedule: take the checkpoint's schedule first
            schedule = fsdp_checkpoint_schedule(checkpoint)
            if schedule is not None:
                inner.prepare_load(*schedule)
        older = ()  # a DCP checkpoint (SHARDED_STATE_DICT) saved before lowmem recorded per-shard state's placements
        if checkpoint is not None and getattr(self, "is_fsdp_enabled", False):
            from torch.distributed.checkpoint.api import CheckpointException as older
        try:
            try:
                out = super()._load_optimizer_and_scheduler(checkpoint)
            except older as err:
                if not only_placement_missing(err):
                    raise
                # DCP refused it before anything loaded ("Missing key ... shard_placement"): the same load from a
                # target without the records, which load_state_dict loads unchecked, with its one warning
                logger.info("resuming from %s: its optimizer state has no '%s' records (saved before lowmem wrote"
                            " them); loading it unchecked", checkpoint, PLACEMENT_KEY)
                with without_placement_record(inner):
                    out = super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as err:  # torch: "loaded state dict has a different number of parameter groups", ...
            if name is None or checkpoint is None:
                raise
            raise ValueError(f"the optimizer state in {checkpoint} does not fit lowmem_optim={name!r} with these "
                             f"optim_args ({err}); resume with the optimizer and optim_args that wrote it") from err
        except RuntimeError as err:
            saved = checkpoint_processes(checkpoint)
            world = getattr(self.args, "world_size", 1)
            if not getattr(self, "is_fsdp_enabled", False) or saved is None or saved == world:
                raise
            raise RuntimeError(
                f"the optimizer state in {checkpoint} was written by {saved} processes and does not load onto {world} "
                f"({err}): per-shard state (8-/4-bit moments' codes and scales, MicroAdam's window) loads only onto "
                f"the number of processes that wrote it (docs/distributed.md); resume with {saved} processes"
            ) from err
        after = _group_keys(self.optimizer)
        if name is not None and checkpoint is not None and before is not None and after is not None and before != after:
            # torch's load_state_dict takes the saved groups' hyperparameters: another optimizer's would
            # only fail at the first step (a KeyError inside the update), or not at all
            raise ValueError(
                f"the optimizer state in {checkpoint} was written by another optimizer than lowmem_optim={name!r}: its "
                f"parameter groups hold {sorted(set().union(*after) - set().union(*before))} and lack "
                f"{sorted(set().union(*before) - set().union(*after))}; resume with the optimizer that wrote it"
            )
        changed = settings_mismatch(own_settings, _group_settings(inner)) if checkpoint is not None else None
        if changed is not None:
            raise ValueError(
                f"resuming from {checkpoint}: {changed}; torch's load_state_dict takes the checkpoint's optimizer "
                "settings, so the run would go on with the checkpoint's value and ignore this run's. Resume with the "
                "settings that wrote the checkpoint, or start a new run from its weights (model: the checkpoint "
                "folder, without resuming)"
            )
        if checkpoint is not None and own_base is not None and not getattr(self, "is_deepspeed_enabled", False):
            problem = schedule_mismatch(own_base, list(scheduler.base_lrs), scheduler.lr_lambdas, scheduler.last_epoch,
                                        scheduler.get_last_lr())
            if problem is not None:
                raise ValueError(
                    f"resuming from {checkpoint}: {problem}; the Trainer restores the checkpoint's base rate and step "
                    "(scheduler.pt) and keeps this run's schedule function. Resume with the learning_rate (lr), "
                    "lr_scheduler_type (lr_scheduler), warmup_steps and "
                    "max_steps (steps) that wrote the checkpoint (a constant schedule may take more steps), or start a "
                    "new run from its weights (model: the checkpoint folder, without resuming)"
                )
        saved_sched = Path(checkpoint) / "scheduler.pt" if checkpoint is not None else None
        if own_plateau is not None and saved_sched.is_file() and not getattr(self, "is_deepspeed_enabled", False):
            # (scheduler.pt read only for a schedule of these settings: another scheduler's may not be weights_only-safe)
            own_sched = own_plateau[1] if any(k in own_plateau[1] for k in PLATEAU_SETTINGS) else {}
            problem = plateau_mismatch(own_plateau[0], [g.get("initial_lr") for g in inner.param_groups], own_sched,
                                       torch.load(saved_sched, map_location="cpu", weights_only=True) if own_sched else {})
            if problem is not None:
                raise ValueError(
                    f"resuming from {checkpoint}: {problem}; the Trainer restores the optimizer's rates (optimizer.pt) "
                    "and the whole scheduler (scheduler.pt), so the run would go on with the checkpoint's values and "
                    "ignore this run's. Resume with the learning_rate (lr), lr_scheduler_type (lr_scheduler) and "
                    "lr_scheduler_kwargs that wrote the checkpoint, or start a new run from its weights (model: the "
                    "checkpoint folder, without resuming)"
                )
        return out

    def training_step(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's step; in layerwise mode under DDP the optimizer first steps from the DDP module's
        communication hook (``LayerwiseOptimizer.attach_ddp``, once: the Trainer wraps the model after it built
        the optimizer), on the all-reduced gradients; without it every process would step on its own gradient,
        which the optimizer refuses."""
        from lowmem.optim.layerwise import LayerwiseOptimizer

        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        if isinstance(opt, LayerwiseOptimizer) and opt._ddp is None and isinstance(model, nn.parallel.DistributedDataParallel):
            opt.attach_ddp(model)
        from lowmem.trainers.memory_callback import MemoryCallback

        cb = next((c for c in self.callback_handler.callbacks if isinstance(c, MemoryCallback)), None)
        if cb is not None:  # a tracked step counts the batch, which the Trainer fetched before on_step_begin
            cb.training_inputs(args[0] if args else kwargs.get("inputs"))
        if not getattr(self, "_lowmem_saves_checked", False) and getattr(opt, "state", None):
            self._lowmem_saves_checked = True
            from lowmem.optim.sharded import check_state_saves

            check_state_saves(opt, self.model, self.args.save_strategy)
        with fused_head_tiles(self.model):
            return super().training_step(model, *args, **kwargs)

    def prediction_step(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's evaluation step, with TRL's fused LM head tiles sized to the vocabulary (:func:`fused_head_tiles`),
        measured by an attached ``MemoryCallback`` (its ``evaluation`` component)."""
        from lowmem.trainers.memory_callback import MemoryCallback

        cb = next((c for c in self.callback_handler.callbacks if isinstance(c, MemoryCallback)), None)
        measured = cb.evaluation_step(self.model, self.optimizer) if cb is not None else contextlib.nullcontext()
        with measured, fused_head_tiles(self.model):
            return super().prediction_step(*args, **kwargs)

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """The Trainer's clipping over ``p.grad``; none in layerwise mode (``None``, the norm then comes from
        :meth:`_get_grad_norm`): the optimizer clips in its gradient hooks (``max_grad_norm``, ``clip_mode="global_prev"``)
        and frees each gradient there, and ``args.max_grad_norm`` stays the user's value."""
        from lowmem.optim.layerwise import LayerwiseOptimizer

        if isinstance(getattr(self.optimizer, "optimizer", self.optimizer), LayerwiseOptimizer):
            return None
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The ``grad_norm`` the Trainer logs (transformers >= 5 calls this before ``optimizer.step()``).
        In layerwise mode the gradients were consumed and freed in their hooks, so the Trainer's own
        norm over ``p.grad`` would be 0: the norm :func:`layerwise_grad_norm` accumulated is logged."""
        norm = layerwise_grad_norm(self.optimizer) if grad_norm is None else None
        return norm if norm is not None else super()._get_grad_norm(model, grad_norm=grad_norm)


# group settings a resume may change: the scheduler's (compared by schedule_mismatch), and implementation choices
# that leave the update's math alone
RESUME_FREE_SETTINGS = frozenset({"lr", "initial_lr", "foreach", "fused", "capturable", "differentiable"})


def _group_settings(optimizer: Any) -> list[dict[str, Any]] | None:
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        return None
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()
             if k != "params" and k not in RESUME_FREE_SETTINGS and isinstance(v, (bool, int, float, str, tuple, list))}
            for g in groups]


def settings_mismatch(own: list[dict[str, Any]] | None, loaded: list[dict[str, Any]] | None) -> str | None:
    """The first optimizer setting (``weight_decay``, ``betas``, ``eps``, an ``optim_args`` value) that this run's
    optimizer was built with and the checkpoint's groups hold otherwise, or ``None``. torch's ``load_state_dict``
    adopts the saved groups' settings: resumed with ``weight_decay=0.1`` over a checkpoint of 0.0 the run went on at
    0.0, without a word. Settings of a layout the state cannot take are refused before (``LowMemOptimizer``)."""
    if own is None or loaded is None or len(own) != len(loaded):
        return None
    for i, (mine, theirs) in enumerate(zip(own, loaded)):
        for k in sorted(set(mine) & set(theirs)):
            if mine[k] != theirs[k]:
                group = f" of parameter group {i}" if len(own) > 1 else ""
                return f"the checkpoint's run had {k}={theirs[k]!r}{group}, this run {k}={mine[k]!r}"
    return None


def schedule_mismatch(own_base: list[Any], saved_base: list[Any], lambdas: list[Any], step: int,
                      saved_lrs: list[Any]) -> str | None:
    """Why a ``LambdaLR`` restored from a checkpoint does not continue that run's schedule, or ``None``.

    ``load_state_dict`` takes the checkpoint's ``base_lrs``, ``last_epoch`` and last rates, and keeps this run's
    ``lr_lambdas`` (transformers' schedules are ``functools.partial`` functions: warm-up and total steps are this
    run's). This run's own configuration gives ``own_base[i] * lambdas[i](step)`` at the checkpoint's step; the
    checkpoint's run had ``saved_lrs[i]`` there. Another base rate is a changed learning rate (the Trainer would
    silently keep the checkpoint's), another rate at the same base a changed schedule (type, warm-up, length)."""
    import math

    several = len({v for v in own_base if isinstance(v, (int, float))}) > 1  # groups of their own rates: name them
    for i, (own, saved, fn, lr) in enumerate(zip(own_base, saved_base, lambdas, saved_lrs)):
        if not all(isinstance(v, (int, float)) for v in (own, saved, lr)):
            continue
        group = f" (parameter group {i})" if several else ""
        if not math.isclose(own, saved, rel_tol=1e-9, abs_tol=0.0):
            return (f"this run's learning rate{group} is {own:g}, the checkpoint's run trained with learning rate "
                    f"{saved:g} (the Trainer would go on at {saved:g} and ignore {own:g})")
        ours = own * fn(step)
        if not math.isclose(ours, lr, rel_tol=1e-6, abs_tol=1e-12):
            return (f"at its step {step} the checkpoint's schedule had lr {lr:g}{group}, this run's schedule "
                    f"(lr_scheduler_type, warmup_steps, max_steps) gives {ours:g} there (the Trainer would run the "
                    f"checkpoint's base rate on this run's schedule, a mix of both)")
    return None


# what configures ReduceLROnPlateau / transformers' GreedyLR (their state_dict holds the whole object): another value on
# resume is refused (the loaded scheduler.pt would replace this run's); counters and the best metric are the run's state
PLATEAU_SETTINGS = ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lrs", "max_lrs", "eps",
                    "warmup", "smooth", "window_size", "reset_start_original")


def plateau_mismatch(own_lrs: list[Any], saved_lrs: list[Any], own: dict[str, Any], saved: dict[str, Any]) -> str | None:
    """Why a checkpoint of a schedule that is not a ``LambdaLR`` (``reduce_lr_on_plateau``, ``greedy``) does not
    continue with this run's configuration, or ``None``. ``own_lrs`` / ``saved_lrs``: each group's ``initial_lr``
    (this run's learning rate; the checkpoint's, ``None`` for one written before lowmem set it: not compared); the
    group's current ``lr`` may legitimately be lower (the plateau reduced it), so the base rate is compared. ``own`` /
    ``saved``: the schedulers' ``state_dict()`` s; :data:`PLATEAU_SETTINGS` compared, and a checkpoint of another
    scheduler (none of them, or others) named as another ``lr_scheduler_type``."""
    import math

    for i, (mine, theirs) in enumerate(zip(own_lrs, saved_lrs)):
        if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and not math.isclose(mine, theirs, rel_tol=1e-9):
            group = f" (parameter group {i})" if len(own_lrs) > 1 else ""
            return (f"this run's learning rate{group} is {mine:g}, the checkpoint's run trained with learning rate "
                    f"{theirs:g} (the Trainer would go on at the checkpoint's rate and ignore {mine:g})")
    keys = [k for k in PLATEAU_SETTINGS if k in own]
    if keys and (not isinstance(saved, dict) or not any(k in saved for k in keys)):
        return (f"the checkpoint's run used another lr_scheduler_type (its scheduler.pt holds none of this run's "
                f"schedule settings {keys})")
    changed = [f"{k}={saved[k]!r} (this run: {own[k]!r})" for k in keys if k in saved and saved[k] != own[k]]
    if changed:
        return "the checkpoint's run had lr_scheduler_kwargs " + ", ".join(changed)
    return None


@contextlib.contextmanager
def fused_head_tiles(model: Any):
    """TRL's fused LM head (``add_fused_lm_head``: SFT, GRPO, DPO, ... trainers, ``model(..., fused_lm_head=True)``)
    projects tiles of ``[min(tokens, 4096), 32768]`` into one buffer allocated at that width whatever the
    vocabulary (``trl.kernels.ChunkedLogProbFunction``; TRL 1.16): 512 MiB in float32 from 4096 tokens per micro-batch,
    in the forward and again in the backward. Inside this context the tile width is ``min(32768, vocab_size)``: with a
    vocabulary below 32768 the buffer is ``tokens x vocab``; the results are bit for bit the same (one tile either way).
    Measured (lowmem train, GPT-2 h=64, vocab 391, batch 16 x 256, CPU): activations 714.5 -> 210.6 MiB (a plain
    forward and backward: 177.5). Nothing changes when TRL has no such constant (another version) or the model no
    vocabulary."""
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:  # transformers' Trainer without TRL installed: no fused head
        trl_utils = None
    default = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None)
    config = getattr(model, "config", None)
    vocab = getattr(config.get_text_config(), "vocab_size", None) if hasattr(config, "get_text_config") else None
    if not isinstance(default, int) or not isinstance(vocab, int) or vocab < 1 or vocab >= default:
        yield
        return
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = vocab
    try:
        yield
    finally:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = default


@contextlib.contextmanager
def _explain_targets(model: nn.Module, hp: dict[str, Any], batched_targets: bool = False):
    """Re-raise the optimizer's "target_modules=... matched no linear layer" naming the field the user
    set (``optim_target_modules`` or ``target_modules``) and the model's projection layers, by module
    name (e.g. GPT-2's ``c_attn``, ``c_fc``, ``c_proj``; GPT-NeoX's ``query_key_value``): a config written
    for Llama's ``q_proj`` / ``v_proj`` selects nothing in another architecture."""
    try:
        yield
    except ValueError as err:
        if "matched no linear layer" not in str(err) or "target_modules" not in hp:
            raise
        from lowmem.optim.registry import subspace_target_names, target_modules_hint

        targets = hp["target_modules"]
        field_name = "optim_target_modules" if isinstance(targets, OptimTargetModules) else "target_modules"
        layers = sorted({n[: -len(".weight")].rsplit(".", 1)[-1] for n in subspace_target_names(model)})
        raise ValueError(f"{field_name}={targets!r} matched no projection layer of {type(model).__name__}; its "
                         f"projection layers (nn.Linear / Conv1D, output head excluded) are named {layers}"
                         + target_modules_hint(model, getattr(targets, "targets", targets), batched_targets)) from err


def _group_keys(optimizer: Any) -> list[frozenset[str]] | None:
    """The hyperparameter names of each parameter group (``None`` without ``param_groups``)."""
    groups = getattr(optimizer, "param_groups", None)
    return None if groups is None else [frozenset(g) - {"params", "param_names"} for g in groups]


def _targets_refused(targets: Any, name: str) -> str:
    return (f"optim_target_modules={targets!r} selects the layers an optimizer treats apart (a subspace optimizer's "
            f"projected weights, Muon's orthogonalized ones); lowmem_optim={name!r} treats every parameter alike")


def fsdp_checkpoint_schedule(checkpoint: str) -> tuple[int, int] | None:
    """BAdam's schedule ``(badam_period, badam_steps)`` in the optimizer state of an FSDP Trainer checkpoint:
    ``optimizer.bin`` (``FULL_STATE_DICT``) or the ``optimizer_0`` directory of torch.distributed.checkpoint
    (``SHARDED_STATE_DICT``, read collectively: every process calls it). `None` when it holds none."""
    import os

    full = os.path.join(checkpoint, "optimizer.bin")
    if os.path.isfile(full):
        groups = torch.load(full, map_location="cpu", weights_only=True).get("param_groups", [])
        return (groups[0]["badam_period"], groups[0]["badam_steps"]) if groups and "badam_period" in groups[0] else None
    sharded = os.path.join(checkpoint, "optimizer_0")
    if not os.path.isdir(sharded):
        return None
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(sharded)
    keys = {k: 0 for k in ("optimizer.param_groups.0.badam_period", "optimizer.param_groups.0.badam_steps")}
    if not set(keys) <= set(reader.read_metadata().state_dict_metadata):
        return None
    dcp.load(keys, storage_reader=reader)
    return keys["optimizer.param_groups.0.badam_period"], keys["optimizer.param_groups.0.badam_steps"]


def checkpoint_processes(checkpoint: str | None) -> int | None:
    """How many processes wrote a Trainer checkpoint: its ``rng_state_<rank>.pth`` files (one per
    process when there were several), or `None` when it has none of them."""
    import os
    import re

    if checkpoint is None or not os.path.isdir(checkpoint):
        return None
    ranks = [f for f in os.listdir(checkpoint) if re.fullmatch(r"rng_state_\d+\.pth", f)]
    return len(ranks) or None


def move_later_checkpoints(output_dir: str, resumed_from: str) -> Path | None:
    """Move ``output_dir``'s ``checkpoint-M`` folders after the one a run resumes from (``M > N`` for
    ``.../checkpoint-N``) into ``output_dir/earlier-run-K``, with a warning naming them and that folder, as
    ``lowmem train`` does (:func:`lowmem.train.later_checkpoints`, :func:`lowmem.train.move_earlier_checkpoints`):
    the resumed run writes its own ``checkpoint-M`` into them file by file, so one killed inside would leave a mix of
    both runs that looks complete. Returns that folder, or `None` when there are none."""
    from lowmem.train import later_checkpoints, move_earlier_checkpoints

    out = Path(output_dir)
    names = sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir()) if out.is_dir() else []
    later = later_checkpoints(names, resumed_from)
    if not later:
        return None
    aside = move_earlier_checkpoints(out, later)
    logger.warning("%s holds %s from an earlier run, after the checkpoint this run resumes from (%s); they were moved "
                   "to %s before this run writes its own (delete it when not needed; move one back to resume from it "
                   "instead)", output_dir, later, resumed_from, aside)
    return aside


def resume_checkpoint(output_dir: str, value: str | bool) -> str | bool:
    """The checkpoint ``Trainer.train(resume_from_checkpoint=value)`` should resume, checked as ``lowmem train``
    checks it (:func:`check_resumable`, :func:`lowmem.train.checkpoint_problems`).

    `True`: the highest-numbered complete ``output_dir/checkpoint-N``; incomplete ones are skipped with a warning
    naming the file, as ``lowmem train --resume`` does; `True` is returned unchanged when ``output_dir`` has no
    ``checkpoint-N`` (the Trainer's own error). A path must be a complete checkpoint.

    Raises:
        ValueError: A ``save_only_model`` checkpoint (also the latest one for `True`: it cannot resume), an incomplete
            one (naming the missing or damaged files), or `True` with no complete checkpoint (naming the incomplete ones).
    """
    import os

    from lowmem.train import checkpoint_problems, weights_only_checkpoint

    if value is True:
        found = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d[len("checkpoint-"):].isdigit()
                 and os.path.isdir(os.path.join(output_dir, d))] if os.path.isdir(output_dir) else []
        skipped = []
        for d in sorted(found, key=lambda d: int(d[len("checkpoint-"):]), reverse=True):
            path = os.path.join(output_dir, d)
            if weights_only_checkpoint(path):
                check_resumable(path)  # (raises: the latest checkpoint holds the weights only)
            problems = checkpoint_problems(path)
            if problems is None:
                return path
            skipped.append(f"{path} ({problems})")
            logger.warning("resume_from_checkpoint=True: skipping incomplete checkpoint %s (%s; an interrupted run?)",
                           path, problems)
        if skipped:
            raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint-N directory in {output_dir} "
                             f"(incomplete: {'; '.join(skipped)}); give a path, or train without resume_from_checkpoint")
        return value
    path = str(value)
    check_resumable(path)
    problems = checkpoint_problems(path) if os.path.isdir(path) else None
    if problems is not None:  # (a file missing: check_resumable names the weights-only and damaged cases)
        raise ValueError(f"resume_from_checkpoint={path!r} is not a complete checkpoint: {problems}")
    return path


class OptimTargetModules:
    """``TrainingArguments.optim_target_modules`` as a predicate on module names, with the
    Trainer's own matching rules (``transformers.trainer_utils.check_target_module_exists``: a
    string is a regex matched against the full name; a list item matches by exact name, by
    substring, or as a regex), so a configuration written for the Trainer's GaLore selects the same
    layers here (e.g. ``[r".*.attn.*", r".*.mlp.*"]`` or ``["attn", "mlp"]``); ``"all-linear"`` selects every
    projection layer (:attr:`all_linear`)."""

    def __init__(self, targets: str | list[str]):
        self.targets = targets

    @property
    def all_linear(self) -> bool:
        """``"all-linear"`` (or ``"all_linear"``), the Trainer's name for every linear layer: here every projection
        layer lowmem's default selects (the output head excluded, as peft's ``"all-linear"`` does; transformers'
        own GaLore / APOLLO also project an untied ``lm_head``)."""
        return isinstance(self.targets, str) and self.targets.replace("_", "-") == "all-linear"

    def __call__(self, module_name: str) -> bool:
        from transformers.trainer_utils import check_target_module_exists

        return self.all_linear or bool(check_target_module_exists(self.targets, module_name))

    def __repr__(self) -> str:
        return repr(self.targets)


def layerwise_grad_norm(optimizer: Any) -> torch.Tensor | None:
    """The global gradient norm of the step a :class:`~lowmem.optim.layerwise.LayerwiseOptimizer`
    is in: the square root of the sum of the squared norms of every gradient its hooks stepped since
    the last ``step()`` (pre-clipping; for parameters accumulated in a subspace, the projected
    gradient's); NaN when a gradient of this step was not finite (the ordinary run's norm is NaN / Inf then:
    the partial sum of the gradients before it, or the Trainer's 0 over the freed gradients, looked healthy).
    `None` for another optimizer, or before any gradient arrived."""
    from lowmem.optim.layerwise import LayerwiseOptimizer

    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if not isinstance(opt, LayerwiseOptimizer):
        return None
    if getattr(opt, "_nonfinite", False):
        return torch.tensor(float("nan"))
    if opt._sq_norm_sum is None:
        return None
    return opt._sq_norm_sum.sqrt()


class LowMemTrainer(LowMemOptimizerMixin, Trainer):
    """``transformers.Trainer`` that builds a lowmem optimizer from :class:`LowMemTrainingArguments`. Given plain
    ``TrainingArguments`` (no ``lowmem_optim``) and ``optimizer_cls_and_kwargs`` it is transformers' Trainer plus the
    mixin's resume checks: e.g. an FSDP2 SHARDED_STATE_DICT checkpoint saved before lowmem recorded per-shard
    placements, on which the plain Trainer fails inside torch.distributed.checkpoint ("Missing key in checkpoint
    state_dict: ...shard_placement"), resumes here (:meth:`LowMemOptimizerMixin._load_optimizer_and_scheduler`;
    tests/test_smalls16_plain_resume.py)."""
