"""Strict configuration: every value is checked against its dataclass field type and range, once.

One generic checker (:func:`check_value`) reads a field's type from the dataclass annotations
(``typing.get_type_hints``) and either returns the value, converted where the conversion is
unambiguous, or raises :class:`ConfigError` naming the field, what was found and what is valid.
It serves :class:`lowmem.train.TrainRecipe` and every ``TrainingArguments`` / TRL config field a
recipe passes through. Nothing is replaced by a default.

The rules (docs/training.md, "Strict configuration"):

* ``bool`` fields accept only booleans (YAML ``true`` / ``false``); the string ``"no"`` is an
  error, not ``True``.
* ``int`` and ``float`` fields accept numbers, and a *string that reads as a number*, which is
  converted: PyYAML (YAML 1.1) reads ``3e-4`` and ``1e5`` as strings, and
  ``transformers.HfArgumentParser`` converts such strings on the command line too. A float field
  must be finite; an ``int`` field must be integral (``"1e3"`` -> 1000, ``2.5`` is an error).
  Booleans are never numbers.
* ``str`` fields accept strings only; ``Enum`` fields accept their values (the message lists them).
* ``X | None`` accepts ``None``; in a union the first member that takes the value as it is wins,
  then the first that takes it converted.
* ``list[X]`` takes a list (each item checked); ``dict`` takes a mapping.
* Ranges come from :data:`RANGES` (by field name), e.g. ``lr >= 0``, ``adam_beta2`` in ``[0, 1)``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A user's configuration is invalid (a value, a key, a file that cannot be read as a recipe).

    ``lowmem`` prints it as one line, ``lowmem: error: ...``, and exits with status 2.
    """


@dataclass(frozen=True)
class Range:
    """A numeric interval; ``None`` bounds are open-ended."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, x: float) -> bool:
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return not (self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)))

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "any number"


NONNEG = Range(0)
POSITIVE = Range(0, lo_open=True)
UNIT_OPEN = Range(0, 1, hi_open=True)  # betas: [0, 1)

# Valid ranges by field name, for TrainRecipe fields and TrainingArguments / TRL config fields.
RANGES: dict[str, Range] = {
    # TrainRecipe
    "lr": NONNEG, "weight_decay": NONNEG, "warmup_steps": NONNEG, "steps": POSITIVE, "batch_size": POSITIVE,
    "seed": NONNEG, "logging_steps": POSITIVE, "save_steps": POSITIVE, "eval_steps": POSITIVE,
    "train_size": POSITIVE, "eval_size": POSITIVE,
    # TrainingArguments (the optimizer fields and the step counts)
    "learning_rate": NONNEG, "adam_beta1": UNIT_OPEN, "adam_beta2": UNIT_OPEN, "adam_epsilon": NONNEG,
    "max_grad_norm": NONNEG, "warmup_ratio": Range(0, 1), "gradient_accumulation_steps": POSITIVE,
    "per_device_train_batch_size": POSITIVE, "per_device_eval_batch_size": POSITIVE,
    "num_train_epochs": POSITIVE,
    # TRL configs (DPO, GRPO and GVPO / BNPO): a sign typo would train silently in the wrong direction
    # (beta < 0), a zero would divide (temperature) or generate nothing (max_completion_length)
    "beta": NONNEG, "label_smoothing": Range(0, 0.5, hi_open=True), "max_length": POSITIVE,
    "max_prompt_length": POSITIVE, "max_completion_length": POSITIVE, "temperature": POSITIVE,
    "top_p": Range(0, 1, lo_open=True), "top_k": NONNEG, "min_p": Range(0, 1), "repetition_penalty": POSITIVE,
    "num_iterations": POSITIVE, "epsilon": NONNEG, "epsilon_high": NONNEG, "steps_per_generation": POSITIVE,
    "generation_batch_size": POSITIVE,
    # GRPO's num_generations_eval (None: num_generations); TRL reads it as `num_generations_eval or num_generations`, so
    # 0 silently became num_generations; 1 is valid in TRL's evaluation (advantages without a std)
    "num_generations_eval": Range(1),
    # fields whose invalid values failed mid-training (neftune_noise_alpha < 0: uniform_'s range; dataloader_num_workers
    # < 0) or trained wrongly without a word (label_smoothing_factor >= 1 weighs the NLL term <= 0; the mixing and
    # quantile fields outside [0, 1]); ranges from transformers' and TRL's docs
    "neftune_noise_alpha": NONNEG, "label_smoothing_factor": UNIT_OPEN, "dataloader_num_workers": NONNEG, "ld_alpha": Range(0, 1), "ref_model_mixup_alpha": Range(0, 1),
    "ref_model_sync_steps": POSITIVE, "discopop_tau": POSITIVE, "precompute_ref_batch_size": POSITIVE,
    "top_entropy_quantile": Range(0, 1), "delta": POSITIVE,
    # TRL's int | str field (default 'auto'): 0 failed mid-preparation with a ZeroDivisionError
    "pad_to_multiple_of": POSITIVE,
    # 0: the first evaluation (before training, after the model loaded) divided by it (`step % 0`, ZeroDivisionError)
    "eval_accumulation_steps": POSITIVE,
}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + str([m.value for m in tp])
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args):
            args = tuple(a for a in args if a is not str)
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + str(list(typing.get_args(tp)))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list (items: {_type_name(args[0])})" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


class _Reject(Exception):
    pass


def _number_from_string(value: str) -> float:
    try:
        x = float(value.strip())
    except ValueError:
        raise _Reject from None
    return x


def _coerce(value: Any, tp: Any, convert: bool) -> Any:
    """``value`` as type ``tp``; raises :class:`_Reject`. ``convert`` allows string -> number."""
    if tp is Any or tp is object or isinstance(tp, typing.TypeVar):
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Reject
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
        if enums and isinstance(value, str):  # `IntervalStrategy | str`: the string names a member
            members = tuple(m for m in members if m is not str)
        for conv in ((False, True) if convert else (False,)):
            for m in members:
                try:
                    return _coerce(value, m, conv)
                except _Reject:
                    pass
        raise _Reject
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _Reject
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Reject
    if tp is int:
        if isinstance(value, bool):
            raise _Reject
        if isinstance(value, int):
            return value
        x = _number_from_string(value) if (convert and isinstance(value, str)) else value
        if isinstance(x, float) and math.isfinite(x) and x.is_integer():
            return int(x)
        raise _Reject
    if tp is float:
        if isinstance(value, bool):
            raise _Reject
        x = _number_from_string(value) if (convert and isinstance(value, str)) else value
        if isinstance(x, (int, float)) and math.isfinite(x):
            return float(x) if isinstance(value, str) else x
        raise _Reject
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Reject
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            tp(value)
        except ValueError:
            raise _Reject from None
        return value  # keep the string: the config class converts it itself
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Reject
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if len(args) == 1 or (origin is tuple and len(set(args)) == 1 and args):
            return type(value)(_coerce(v, args[0], convert) for v in value)
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Reject
        args = typing.get_args(tp)
        if args and args[0] is str and any(not isinstance(k, str) for k in value):
            raise _Reject
        return value
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Reject
    return value  # a type this checker does not model: the consumer validates it


# the words YAML 1.1 (PyYAML's safe_load) reads as booleans, by the boolean they become
_YAML_BOOLEAN_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}
# text fields whose "off" is another word than 'no' (TrainingArguments.report_to: 'none')
_YAML_FALSE_MEANS = {"report_to": "none"}


def _yaml_boolean_hint(value: bool, tp: Any, name: str = "") -> str:
    """Why a boolean may stand where ``tp`` takes text: YAML 1.1 reads an unquoted ``no`` / ``off`` as false and ``yes``
    / ``on`` as true (``save_strategy: no`` arrives as ``False``). The first such word ``tp`` takes is named, to be
    written in quotes (``report_to``: its ``none``, :data:`_YAML_FALSE_MEANS`); a type that takes none gets the rule
    alone. ``""`` for a type without text values."""
    if not value and name in _YAML_FALSE_MEANS:
        return f" (YAML reads an unquoted no / off as false: write {_YAML_FALSE_MEANS[name]})"
    for word in _YAML_BOOLEAN_WORDS[value]:
        try:
            _coerce(word, tp, convert=False)
        except _Reject:
            continue
        said = " / ".join(_YAML_BOOLEAN_WORDS[value][:2])
        return f" (YAML reads an unquoted {said} as {str(value).lower()}: write '{word}' in quotes)"
    if "one of" in _type_name(tp) or "string" in _type_name(tp):
        return " (YAML reads an unquoted yes / no / on / off as a boolean: write a word meant as text in quotes)"
    return ""


def check_value(name: str, value: Any, tp: Any, *, where: str = "", ranges: dict[str, Range] | None = None) -> Any:
    """``value`` checked against type ``tp`` and the range of ``name`` (:data:`RANGES`), converted
    where the rules of this module allow.

    Raises:
        ConfigError: ``"{where}{name}={value!r}: expected {type}[ {range}]"``.
    """
    rng = (RANGES if ranges is None else ranges).get(name)
    expected = _type_name(tp) + (f" {rng.describe()}" if rng is not None else "")
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    if rng is not None and type(None) in members:
        rest = [m for m in members if m is not type(None)]
        expected = f"{_type_name(typing.Union[tuple(rest)])} {rng.describe()}, or null"
    try:
        out = _coerce(value, tp, convert=False)
    except _Reject:
        try:
            out = _coerce(value, tp, convert=True)
        except _Reject:
            hint = ""
            if isinstance(value, str) and _type_name(tp).startswith("a boolean"):
                hint = " (strings such as 'yes'/'no' are not booleans: write true or false without quotes)"
            elif isinstance(value, bool):
                hint = _yaml_boolean_hint(value, tp, name)
            raise ConfigError(f"{where}{name}={value!r}: expected {expected}{hint}") from None
    if rng is not None and isinstance(out, (int, float)) and not isinstance(out, bool) and not rng.contains(out):
        raise ConfigError(f"{where}{name}={value!r}: expected {expected}")
    return out


# Fields whose annotation is narrower than what their class takes: TRL's ``GRPOConfig.scale_rewards`` is annotated
# ``str`` but documented (and converted in ``__post_init__``) as ``str`` or ``bool`` (``True`` -> ``"group"``, ``False`` ->
# ``"none"``; older TRL's field was a bool, and Dr. GRPO configs write ``scale_rewards: false``).
ACCEPTED_TYPES: dict[str, Any] = {"scale_rewards": str | bool}


def field_types(cls: type) -> dict[str, Any]:
    """``{field name: resolved type}`` of dataclass ``cls`` (string annotations resolved; :data:`ACCEPTED_TYPES`
    where the class takes more than its annotation says)."""
    hints = typing.get_type_hints(cls)
    return {f.name: ACCEPTED_TYPES.get(f.name, hints.get(f.name, Any)) for f in dataclasses.fields(cls)}


def check_fields(cls: type, values: dict[str, Any], *, where: str = "") -> dict[str, Any]:
    """Check each ``values[k]`` against field ``k`` of dataclass ``cls``; returns the converted
    mapping. Unknown keys raise :class:`ConfigError` listing the valid ones."""
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"{where}unknown field(s) {unknown} of {cls.__name__}; valid: {sorted(types_)}")
    return {k: check_value(k, v, types_[k], where=where) for k, v in values.items()}


def check_dataclass(obj: Any, *, where: str = "") -> None:
    """Check (and convert in place) every field of dataclass instance ``obj``."""
    for name, tp in field_types(type(obj)).items():
        setattr(obj, name, check_value(name, getattr(obj, name), tp, where=where))
