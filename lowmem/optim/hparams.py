"""Hyperparameter specifications: defaults, validation and documentation in one place.

Each recipe lists its :class:`HParam` entries. Optimizers validate every parameter group against
them, so a bad value fails at construction (or in ``add_param_group``) with an error that names
the value and the valid range, instead of producing NaNs a thousand steps later.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class HParam:
    """One hyperparameter of a recipe.

    Args:
        name: Keyword used in constructors, ``create_optimizer`` and parameter groups.
        default: Value used when the caller gives none.
        check: Predicate that accepts valid values.
        valid: Human-readable description of the valid values, used in error messages.
        doc: One line on what the value means.
        group_only: If true the value only makes sense per parameter group (e.g. GaLore's
            ``rank``), and ``None`` means "this group is not projected".
    """

    name: str
    default: Any
    check: Callable[[Any], bool]
    valid: str
    doc: str

    def validate(self, value: Any, where: str = "") -> None:
        ok = False
        try:
            ok = bool(self.check(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            loc = f" in {where}" if where else ""
            foreign = _foreign_scalar(value)
            hint = (f" (got a {foreign}: give Python numbers, e.g. float(x) / int(x); torch.optim would take it, the"
                    " checks and the step here read plain numbers)") if foreign else ""
            raise ValueError(f"Invalid {self.name}={value!r}{loc}: expected {self.valid}{hint}.")


def _foreign_scalar(value: Any) -> str:
    """The type of a NumPy or torch value in ``value`` (itself, or an item of a tuple / list: ``betas``), e.g.
    ``"numpy.float32"`` or ``"torch.Tensor"``; ``""`` when there is none. ``np.float32(1e-3)`` and
    ``torch.tensor(1e-3)`` are no Python float, and ``Invalid lr=np.float32(0.001): expected a finite float >= 0``
    alone reads as a contradiction."""
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
        module = type(v).__module__.split(".")[0]
        if module in ("numpy", "torch"):
            return f"{module}.{type(v).__name__}"
    return ""


# ---- predicates -----------------------------------------------------------------------------


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def nonneg(x: Any) -> bool:
    return _is_real(x) and x >= 0


def positive(x: Any) -> bool:
    return _is_real(x) and x > 0


def in_unit_interval(x: Any) -> bool:
    """``0 <= x < 1``."""
    return _is_real(x) and 0 <= x < 1


def betas_pair(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(in_unit_interval(b) for b in x)


def optional(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: x is None or pred(x)


def positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda x: x in choices


def is_bool(x: Any) -> bool:
    return isinstance(x, bool)


# ---- common entries -------------------------------------------------------------------------


def LR(default: float | None = 1e-3) -> HParam:  # noqa: N802 - reads like a constant
    return HParam("lr", default, nonneg, "a finite float >= 0", "learning rate (parameter units per unit update)")


def BETAS(default: tuple[float, float] = (0.9, 0.999)) -> HParam:  # noqa: N802
    return HParam(
        "betas", tuple(default), betas_pair, "a pair (beta1, beta2) with 0 <= beta < 1",
        "decay rates of the first and second moment EMAs",
    )


def EPS(default: float = 1e-8) -> HParam:  # noqa: N802
    return HParam("eps", default, nonneg, "a finite float >= 0", "added to the denominator for numerical stability")


def WEIGHT_DECAY(default: float = 0.0) -> HParam:  # noqa: N802
    return HParam("weight_decay", default, nonneg, "a finite float >= 0", "decoupled weight decay coefficient")


STATE_DTYPE = HParam(
    "state_dtype", "float32", one_of("float32", "bfloat16", "param"),
    "one of 'float32', 'bfloat16', 'param'",
    "storage dtype of float optimizer states ('param' = same dtype as the parameter)",
)

FOREACH = HParam(
    "foreach", None, optional(is_bool), "None, True or False",
    "use the multi-tensor path where the recipe has one (None = automatically); False forces the"
    " single-tensor reference path",
)

BF16_STOCHASTIC_ROUND = HParam(
    "bf16_stochastic_round", False, is_bool, "True or False",
    "write each step's float32 result into bfloat16 parameters with stochastic rounding (unbiased: updates"
    " below half a bfloat16 ulp survive on average; Zamirai et al. 2020) instead of round-to-nearest; a group"
    " with it needs a bfloat16 parameter",
)

KAHAN_SUMMATION = HParam(
    "kahan_summation", False, is_bool, "True or False",
    "keep a bfloat16 compensation buffer per bfloat16 parameter (2 B per element of state) that carries what each"
    " write-back rounded away (Kahan summation); a group with it needs a bfloat16 parameter",
)

ENGINE_HPARAMS = (STATE_DTYPE, FOREACH, BF16_STOCHASTIC_ROUND, KAHAN_SUMMATION)  # accepted by every engine optimizer


# ---- torch.optim's flags on the drop-in classes ---------------------------------------------

#: torch.optim's flags that its AdamW / SGD / Adagrad / RMSprop take and lowmem's drop-in classes of the same names
#: accept (AUDREF19 2: ``AdamW(params, amsgrad=False)`` was a TypeError): the values each honours (torch's default
#: first) and why another is refused (:func:`check_torch_flags`). ``foreach`` is every engine optimizer's own setting.
TORCH_FLAGS: dict[str, tuple[tuple[Any, ...], str]] = {
    "amsgrad": ((False,), "amsgrad=True divides by the running maximum of sqrt(v_t) (Reddi et al. 2018), a state"
                          " lowmem's Adam does not keep"),
    "maximize": ((False,), "lowmem's optimizers minimize; to ascend an objective, step on its negation"),
    "capturable": ((False,), "the step is not CUDA-graph capturable: its step count lives on the CPU and a"
                             " non-finite step is skipped after a read on the host"),
    "differentiable": ((False,), "the step runs under torch.no_grad: autograd does not see through the update"),
    "fused": ((None, False), "lowmem has no fused kernel for this optimizer (the engine's chunked step; foreach"
                             " chooses its multi-tensor path)"),
}


def check_torch_flags(optimizer: str, **flags: Any) -> None:
    """torch.optim's flags given to a lowmem drop-in class (``AdamW(params, amsgrad=False, fused=None)``): each at a
    value of :data:`TORCH_FLAGS` (torch's default, or ``fused=False``) is accepted and changes nothing, since that
    is the update lowmem runs; any other value is refused rather than ignored.

    Raises:
        ValueError: Naming the class, the flag and its value, why, and the values supported.
    """
    for k, v in flags.items():
        ok, why = TORCH_FLAGS[k]
        if not any(v is o for o in ok):
            supported = " or ".join(f"{k}={o!r}" for o in ok)
            raise ValueError(f"{optimizer}: {k}={v!r} is not implemented: {why}; supported: {supported} (torch's"
                             f" default {k}={ok[0]!r})")


def kahan_sum_groups(params: Any, where: str, stochastic_round: bool = False) -> tuple[list[Any], list[int]]:
    """``params`` (parameters, ``(name, parameter)`` pairs or parameter groups, as a constructor takes them) as
    parameter groups whose ``kahan_summation`` is torch-optimi's ``kahan_sum=None``: on for a group holding bfloat16
    parameters, off for the others (its ``StableAdamW`` compensates the low-precision parameters when ``kahan_sum`` is
    ``None``; transformers' ``optim="stable_adamw"`` gives it ``None``: AUDREF19 3). A group with its own
    ``kahan_summation``, or with ``bf16_stochastic_round`` (the group's, else ``stochastic_round``: the other way of
    keeping small updates), is left as it is. Returns the groups and the indices of those it decided (the load
    follows them: :func:`lowmem.optim.sharded.kahan_default_load_hook`).

    A group holding float16 parameters stays off, with a warning: torch-optimi compensates them, lowmem's
    compensation is bfloat16's only (their write-backs round to nearest, as in every lowmem optimizer);
    ``kahan_summation=False`` says so and silences it.
    """
    import torch

    from lowmem._warn import warn_user

    items = [params] if isinstance(params, torch.Tensor) else list(params)
    if not items:
        return items, []  # (the constructor's own error: an empty parameter list)
    groups = [dict(g) for g in items] if isinstance(items[0], Mapping) else [{"params": items}]
    decided = []
    for i, g in enumerate(groups):
        ps = g["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        g["params"] = ps
        if "kahan_summation" in g or g.get("bf16_stochastic_round", stochastic_round):
            continue
        tensors = [q[1] if isinstance(q, tuple) else q for q in ps]
        half = sum(1 for q in tensors if q.dtype == torch.float16)
        if half:
            warn_user(f"{where}: torch-optimi's default kahan_sum=None compensates low-precision weights, and lowmem's"
                      f" compensation is for bfloat16 weights only: the {half} float16 parameter(s) of parameter group"
                      f" {i} are written back rounded to nearest (the group has no Kahan compensation); give"
                      " kahan_summation=False to say so, or train bfloat16 weights")
        g["kahan_summation"] = not half and any(q.dtype == torch.bfloat16 for q in tensors)
        decided.append(i)
    return groups, decided


# ---- optimizer arguments from text ----------------------------------------------------------

_FLOAT_NO_DOT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_OPENERS, _CLOSERS = "([{", ")]}"


@functools.cache
def _yaml_loader() -> type:
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (YAML 1.2's core schema does; PyYAML's
    YAML 1.1 resolver wants a dot, ``1.0e-3``, and would give the string ``'1e-3'``)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_NO_DOT, list("-+0123456789"))
    return _Loader


def _split_top_level(text: str) -> list[str]:
    """Split at the commas outside brackets and quotes: ``betas=[0.9,0.95],lr=1e-3`` -> 2 items."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPENERS:
            depth += 1
        elif ch in _CLOSERS:
            depth -= 1
            if depth < 0:
                raise ValueError(f"optimizer arguments {text!r}: unbalanced {ch!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise ValueError(f"optimizer arguments {text!r}: unclosed bracket or quote")
    items.append(text[start:])
    return items


def _tuples(value: Any) -> Any:
    """Lists become tuples, recursively (``betas``, Adafactor's ``eps`` pair)."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def parse_value(text: str) -> Any:
    """One value of ``k=v``: a YAML scalar or flow sequence, read with ``yaml.safe_load`` (``true``,
    ``False``, ``0.01``, ``1e-3``, ``[0.9, 0.95]``, ``'quoted'``), plus Python's spellings ``None`` and
    ``(0.9, 0.95)``. Sequences become tuples; anything else is the string as written.

    Raises:
        ValueError: An empty value, or one YAML cannot read (``[0.9,``).
    """
    import yaml

    text = text.strip()
    if not text:
        raise ValueError("empty value")
    if text == "None":
        return None
    if text.startswith("(") and text.endswith(")"):
        text = "[" + text[1:-1] + "]"
    try:
        return _tuples(yaml.load(text, Loader=_yaml_loader()))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ValueError(f"cannot read {text!r}: {str(err).splitlines()[0]}") from None


def parse_optim_args(value: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """Optimizer hyperparameters from a mapping, a JSON object, or ``"k=v,k=v"``.

    The one reader behind ``lowmem train --optim-args`` (and the recipe's / ``TrainingArguments``'
    ``optim_args``), ``lowmem budget --optim-args`` and ``lowmem bench NAME:k=v``. In the ``k=v``
    form, pairs are split at the commas outside brackets and quotes
    (``betas=[0.9,0.95],lr=1e-3``) and each value is read by :func:`parse_value`. Lists become
    tuples in every form.

    Raises:
        ValueError: A malformed string (a pair without ``=``, a key that is not an identifier, a key
            given twice, invalid JSON) or a value that is not a mapping.
    """
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except ValueError as err:
                raise ValueError(f"optimizer arguments {text!r} are not a valid JSON object: {err}") from None
        else:
            out: dict[str, Any] = {}
            for item in _split_top_level(text):
                key, sep, raw = item.partition("=")
                key = key.strip()
                if not sep or not key.isidentifier():
                    raise ValueError(f"optimizer arguments must look like 'k=v,k=v' (lists in brackets: "
                                     f"betas=[0.9,0.95]) or a JSON object; {item.strip()!r} in {text!r} is not k=v")
                if key in out:
                    raise ValueError(f"optimizer arguments {text!r}: {key!r} is given twice")
                try:
                    out[key] = parse_value(raw)
                except ValueError as err:
                    raise ValueError(f"optimizer argument {key}: {err}") from None
            return out
    if not isinstance(value, Mapping):
        raise ValueError(f"optimizer arguments must be a mapping, a JSON object or 'k=v,k=v'; got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ValueError(f"optimizer argument names must be strings; got {key!r}")
    return {k: _tuples(v) for k, v in value.items()}


def _takes(spec: HParam, value: Any) -> bool:
    try:
        return bool(spec.check(value))
    except (TypeError, ValueError):
        return False


def is_boolean_option(spec: HParam) -> bool:
    """Whether ``spec`` is a boolean option: it takes ``True`` and ``False`` and refuses the int ``1``
    (``centered``, ``nesterov``, ``decouple_lr``, ``foreach``; not a number such as ``momentum``)."""
    return _takes(spec, True) and _takes(spec, False) and not _takes(spec, 1)


def text_booleans(specs: Mapping[str, HParam], values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (optimizer arguments read by :func:`parse_optim_args`) with the int ``1`` / ``0`` of a boolean option
    (:func:`is_boolean_option` of its spec in ``specs``) as ``True`` / ``False``: transformers' Trainer reads an
    ``optim_args`` boolean as true when it is ``"true"``, ``"1"`` or ``"yes"`` (``trainer_optimizer._get_sgd`` /
    ``_get_rmsprop``: ``nesterov=1``, ``centered=1``), and the reader gives ``1`` for ``"1"`` (AUDREF19 4). Every other
    value is left as it is (``2``, ``0.5`` stay, and are refused by the spec naming the option)."""
    out = dict(values)
    for k, v in values.items():
        spec = specs.get(k)
        if spec is not None and type(v) is int and v in (0, 1) and is_boolean_option(spec):
            out[k] = bool(v)
    return out


# ---- parameter-group keys -------------------------------------------------------------------

#: Keys of a parameter group that are not hyperparameters: torch's own (``params``, and
#: ``param_names`` when named parameters are given), a free label (``name``), and what torch's LR
#: schedulers write into groups (``initial_lr``; OneCycleLR's ``max_lr``, ``min_lr``,
#: ``base_momentum``, ``max_momentum``; SWALR's ``swa_lr``), which a group copied from an existing
#: one (``{**opt.param_groups[0], "params": new}``) carries along.
GROUP_BOOKKEEPING_KEYS = (
    "params", "param_names", "name", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr",
)


def valid_group_keys(recipe: Any, extra: tuple[str, ...] = ()) -> list[str]:
    """The keys a parameter group of ``recipe`` may carry, sorted: its hyperparameters (the recipe's,
    the engine's ``state_dtype`` / ``foreach``, and per-group ones such as ``rank``), the
    :data:`GROUP_BOOKKEEPING_KEYS`, and ``extra`` (a class's accepted aliases, e.g. fira's ``alpha``)."""
    return sorted({*recipe.all_hparams(), *GROUP_BOOKKEEPING_KEYS, *extra})


#: Other packages' names of lowmem settings (a peer's spelling -> lowmem's, and whose it is), named in
#: the error when one reaches a recipe that has the lowmem setting (a migrated parameter group or
#: ``create_optimizer`` keyword): difflib's closest match can be another setting (``projection_type``
#: is closest to ``projection``, GaLore's basis method, not to ``proj_type``, its side).
PEER_SPELLINGS: dict[str, tuple[str, ...]] = {
    "projection_type": ("proj_type", "pytorch_optimizer's GaLore / Fira"),
    "warmup_epoch": ("warmup_steps", "pytorch_optimizer's SPAM"),
    "update_proj_gap": ("reset_interval", "pytorch_optimizer's SPAM / StableSPAM"),
    "DeltaT": ("reset_interval", "the SPAM authors'"),
    "gamma3": ("theta", "the Stable-SPAM authors'"),
    "total_T": ("t_max", "the Stable-SPAM authors'"),
    "sn": ("subset_norm", "the Subset-Norm authors' / pytorch_optimizer's AdamWSN"),
    "ns_coeffs": ("ns_coefficients", "pytorch_optimizer's Muon"),
    "min_8bit_size": ("min_quant_size", "bitsandbytes'"),
    "disable_nl": ("gamma", "apollo-torch's", "disable_nl=True is gamma=None: no norm-growth limiter"),
    "alpha": ("scale", "fira's"),
    "n_heads": ("head_dim", "adam-mini's", "head_dim = dim // n_heads"),
    "n_kv_heads": ("head_dim", "adam-mini's", "head_dim = dim // n_heads; the key/value heads have the same head_dim"),
    "dim": ("head_dim", "adam-mini's", "head_dim = dim // n_heads"),
}

#: Other packages' settings that lowmem's recipe accepts nowhere because they change nothing there (the key,
#: whose, why): the error says so rather than pointing at a similarly spelled setting that does change the update.
PEER_NO_OPS: dict[str, tuple[str, str]] = {
    "scale_front": ("apollo-torch's", "lowmem's APOLLO gives the same update either way: remove it"),
    # timm's param_groups_layer_decay writes it into groups, only timm's schedulers read it (lr = schedule * lr_scale);
    # the engine steps with ``lr``, so under any other scheduler it would change nothing: refused when given and when
    # written later (:func:`check_group_keys`, :func:`check_written_keys`)
    "lr_scale": ("timm's", "lowmem's step reads only lr, and torch's and transformers' schedulers never apply it: give "
                 "the group lr * lr_scale as its lr (timm's and torch's schedulers schedule each group's own initial_lr) "
                 "and remove it"),
}


def unknown_key_hints(unknown: list[Any], valid: list[str]) -> list[str]:
    """``'key' -> 'setting'`` for each unknown key: another package's spelling of a valid setting
    (:data:`PEER_SPELLINGS`, saying whose), else difflib's closest valid name."""
    import difflib

    hints = []
    for k in unknown:
        peer = PEER_SPELLINGS.get(str(k))
        if peer is not None and peer[0] in valid:
            note = f"; {peer[2]}" if len(peer) > 2 else ""
            hints.append(f"{k!r} -> {peer[0]!r} ({k!r} is {peer[1]} name{note})")
        elif str(k) in PEER_NO_OPS:
            whose, why = PEER_NO_OPS[str(k)]
            hints.append(f"{k!r} -> nothing ({whose} setting; {why})")
        elif m := difflib.get_close_matches(str(k), valid, n=1):
            hints.append(f"{k!r} -> {m[0]!r}")
    return hints


def check_group_keys(recipe: Any, group: Mapping[str, Any], *, where: str = "", extra: tuple[str, ...] = ()) -> None:
    """Reject a parameter group with a key the recipe does not know, the way constructors reject
    unknown keyword arguments: ``{"params": ps, "rnak": 8}`` would otherwise train full-rank AdamW,
    and ``update_proj_gaps`` would be ignored, without a word.

    Args:
        recipe: A :class:`lowmem.optim.engine.Recipe` (anything with ``name`` and ``all_hparams()``).
        group: The parameter group, as given to ``add_param_group``.
        where: Where the group is, for the message (e.g. ``"parameter group 1"``).
        extra: Further accepted keys (aliases a migration class translates itself).

    Raises:
        ValueError: Naming the unknown key(s), the close matches, and every valid key.
    """
    valid = valid_group_keys(recipe, extra)
    unknown = sorted(set(group) - set(valid), key=str)
    if not unknown:
        return
    hints = unknown_key_hints(unknown, valid)
    loc = f" in {where}" if where else ""
    raise ValueError(
        f"Unknown parameter-group key(s) {unknown}{loc}"
        + ("" if f"optimizer '{recipe.name}'" in where else f" of optimizer '{recipe.name}'")
        + (f" (did you mean {', '.join(hints)}?)" if hints else "") + f"; valid: {valid}"
    )


#: Prefixes of the keys schedulers add to a group next to a setting they drive (torch's ``initial_lr`` /
#: ``max_lr`` / ``min_lr`` / ``base_momentum`` / ``max_momentum``, SWALR's ``swa_lr``, timm's
#: ``initial_<field>``): a key ``<prefix><setting>`` written later is never read as a misspelled setting.
SCHEDULER_KEY_PREFIXES = ("initial_", "max_", "min_", "base_", "swa_")

def misspelled_settings(recipe: Any, keys: Iterable[Any]) -> list[Any]:
    """The keys of ``keys`` that are not valid group keys of ``recipe`` (:func:`valid_group_keys`) and read as a
    misspelling of one of its settings: another package's spelling of it (:data:`PEER_SPELLINGS`,
    :data:`PEER_NO_OPS`), or a close match (``difflib`` ratio >= 0.75: ``betas1`` / ``beta2`` -> ``betas``,
    ``weight_decy`` -> ``weight_decay``, ``rnak`` -> ``rank``) that is not ``<prefix><setting>`` with a
    :data:`SCHEDULER_KEY_PREFIXES` prefix, ``<anything>_<setting or bookkeeping key>`` (warm-up schedulers'
    ``warmup_initial_lr`` / ``warmup_max_lr``). Any other unknown key is some library's own bookkeeping (torch.optim
    ignores extra keys; schedulers write some) and is not returned. timm's ``lr_scale`` is a :data:`PEER_NO_OPS` key,
    returned as at construction: the engine does not apply it."""
    import difflib

    settings = list(recipe.all_hparams())
    valid = set(valid_group_keys(recipe))
    out = []
    for k in keys:
        if k in valid or not isinstance(k, str):
            continue
        if k in PEER_NO_OPS or (k in PEER_SPELLINGS and PEER_SPELLINGS[k][0] in settings):
            out.append(k)
            continue
        if any(k.startswith(pre) and k[len(pre):] in settings for pre in SCHEDULER_KEY_PREFIXES):
            continue
        if any(k.endswith("_" + s) for s in (*settings, *GROUP_BOOKKEEPING_KEYS)):  # a scheduler's own copy
            continue  # (warm-up schedulers' warmup_initial_lr / warmup_max_lr, a library's use_weight_decay)
        if difflib.get_close_matches(k, settings, n=1, cutoff=0.75):
            out.append(k)
    return out


def check_written_keys(recipe: Any, group: Mapping[str, Any], *, where: str = "") -> None:
    """Refuse a key written into a parameter group after construction that reads as a misspelled setting
    (:func:`misspelled_settings`: ``group["betas1"] = 0.8``, ``group["weight_decy"] = 0.0``), which the step would
    ignore, the intended setting unchanged: the construction's message (:func:`check_group_keys`' hints). Other
    unknown keys are accepted, as torch.optim accepts them (schedulers' and other libraries' bookkeeping).

    Raises:
        ValueError: Naming the key(s), the setting each is closest to, and every valid key.
    """
    wrong = misspelled_settings(recipe, group)
    if not wrong:
        return
    valid = valid_group_keys(recipe)
    hints = unknown_key_hints(sorted(wrong, key=str), valid)
    loc = f" in {where}" if where else f" of optimizer '{recipe.name}'"
    raise ValueError(
        f"Unknown parameter-group key(s) {sorted(wrong, key=str)} written{loc} after construction"
        + (f" (did you mean {', '.join(hints)}?)" if hints else "")
        + f": the step reads only the optimizer's settings, so it would change nothing; valid: {valid}"
    )
