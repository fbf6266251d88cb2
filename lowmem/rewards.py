"""Reward functions for ``lowmem train`` with ``trainer: grpo | gvpo | bnpo``.

A recipe's ``reward_funcs`` is a list of entries, each one of

* a built-in name (:data:`BUILTIN_REWARDS`): ``exact_match``, ``format``, ``addition``;
* ``"package.module:function"``: a function of an importable module (the current directory is
  searched first);
* ``"path/to/file.py:function"``: a function defined in a Python file (a relative path in a recipe
  file is from the recipe's folder, :func:`lowmem.train.resolve_recipe_paths`; else from the current directory);
* a mapping ``{name: <one of the above>, <keyword>: <value>, ...}``: the same function with those
  keyword arguments bound, e.g. ``{name: format, pattern: "\\d+"}``;
* a local directory holding a reward model (``AutoModelForSequenceClassification`` with one label,
  and its tokenizer): TRL loads it and scores each prompt + completion, as for a Hub model id.

The user's code is imported only because the recipe names it, when training starts. Every reward
function follows TRL's contract::

    def my_reward(prompts, completions, **kwargs) -> list[float | None]:
        # prompts, completions: one entry per completion (strings, or lists of messages for
        # conversational data); kwargs: every other dataset column (e.g. answer=[...]) plus TRL's
        # completion_ids, trainer_state, ...
        ...

Several rewards are summed with ``reward_weights`` (TRL's ``GRPOConfig.reward_weights``; default 1 each).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

DEFAULT_FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def completion_text(completion: Any) -> str:
    """The text of one completion: a string as is; a conversational completion (a list of messages)
    as its last message's ``content``."""
    if isinstance(completion, list):
        return str(completion[-1]["content"]) if completion else ""
    return str(completion)


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_final_answer(text: str, last_number: bool = True) -> str:
    """The final answer in ``text``, by the first rule that applies:

    1. the content of the last ``<answer>...</answer>``;
    2. the content of the last ``\\boxed{...}``;
    3. what follows the last ``####`` (GSM8K's convention);
    4. the last number (``-12``, ``1,234``, ``3.5``), with ``last_number`` (a free-form completion; an answer
       column is read with ``last_number=False``: its ``\\frac{1}{2}``, ``3/4`` or ``(3, 5)`` is the answer, not ``2``,
       ``4`` or ``5``);
    5. the whole text.

    The result is stripped of surrounding whitespace, a trailing period and ``$`` signs.
    """
    tags = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if tags:
        found = tags[-1]
    elif (boxed := _last_boxed(text)) is not None:
        found = boxed
    elif "####" in text:
        found = text.rsplit("####", 1)[1]
    elif last_number and (numbers := _NUMBER.findall(text)):
        found = numbers[-1]
    else:
        found = text
    return found.strip().strip("$").strip().rstrip(".").strip()


_PLAIN = r"-?\d[\d,]*(?:\.\d+)?"
_FRACTION = re.compile(rf"(-?)\s*\\[dt]?frac\s*\{{\s*({_PLAIN})\s*\}}\s*\{{\s*({_PLAIN})\s*\}}|({_PLAIN})\s*/\s*({_PLAIN})")


def answer_number(text: str) -> float | None:
    """The value of an answer that is a number: ``1,000``, ``-3.5``, a fraction ``3/4`` / ``-\\frac{1}{2}`` /
    ``\\dfrac{3}{4}`` (what math_verify's LaTeX parsing reads as a rational); else ``None``."""
    s = text.strip()
    try:
        return float(s.replace(",", ""))
    except ValueError:
        pass
    m = _FRACTION.fullmatch(s)
    if m is None:
        return None
    sign, num, den = (m[1], m[2], m[3]) if m[2] is not None else ("", m[4], m[5])
    num, den = float(num.replace(",", "")), float(den.replace(",", ""))
    if den == 0:
        return None
    return (-1.0 if sign else 1.0) * num / den


def answers_equal(predicted: str, target: str) -> bool:
    """Whether two final answers are equal: numerically when both are numbers (:func:`answer_number`: commas
    ignored, ``"1,000" == "1000.0"``, fractions by value, ``"\\frac{1}{2}" == "1/2" == "0.5"``), else as strings after
    collapsing whitespace (case-sensitive)."""
    a, b = answer_number(predicted), answer_number(target)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return " ".join(predicted.split()) == " ".join(target.split())


def _missing(value: Any) -> bool:
    """A cell without a value: ``None`` (JSON ``null``, a key a row lacks) or a float NaN (pandas' missing value)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def exact_match_reward(completions: list, answer: list | None = None, solution: list | None = None,
                       **kwargs: Any) -> list[float | None]:
    """1.0 where the completion's final answer equals the row's ``answer`` (else ``solution``) column, else 0.0;
    ``None`` (TRL: no reward for that completion, left out of the means) where the row has no answer (``null``).

    The completion goes through :func:`extract_final_answer`, the column through it with ``last_number=False`` (a
    GSM8K ``answer`` ending in ``#### 72`` is ``72``, a MATH ``\\frac{1}{2}`` is itself), and the two are compared by
    :func:`answers_equal`. Conversational completions are scored on their last message.

    Raises:
        ValueError: The dataset has neither an ``answer`` nor a ``solution`` column.
    """
    targets = answer if answer is not None else solution
    if targets is None:
        columns = sorted(k for k in kwargs if k not in ("completion_ids", "trainer_state", "log_extra", "log_metric"))
        raise ValueError(f"reward 'exact_match' needs a dataset column 'answer' or 'solution'; the dataset has {columns}")
    return [None if _missing(t) else
            float(answers_equal(extract_final_answer(completion_text(c)), extract_final_answer(str(t), last_number=False)))
            for c, t in zip(completions, targets)]


def format_reward(completions: list, pattern: str = DEFAULT_FORMAT_PATTERN, **kwargs: Any) -> list[float]:
    """1.0 where the whole completion (stripped) matches ``pattern`` (``re.fullmatch``, ``re.DOTALL``), else 0.0.

    The default pattern asks for ``<think>...</think>`` followed by ``<answer>...</answer>`` and
    nothing else; bind another one with a mapping entry, e.g. ``{name: format, pattern: "\\d+"}``.
    """
    rx = re.compile(pattern, re.DOTALL)
    return [float(rx.fullmatch(completion_text(c).strip()) is not None) for c in completions]


def addition_reward(prompts: list, completions: list, answer: list | None = None, **kwargs: Any) -> list[float]:
    """The embedded demo's partial-credit reward (:func:`lowmem.kit.reward_fn`): digits and the correct
    prefix of the sum; ``answer`` from the column, else computed from a prompt ``"a+b="``."""
    from lowmem.kit import reward_fn

    return reward_fn(prompts, completions, answer=answer)


BUILTIN_REWARDS: dict[str, Callable[..., list[float]]] = {
    "exact_match": exact_match_reward, "format": format_reward, "addition": addition_reward,
}
# Built-in rewards that read a dataset column: one of these must exist (checked before the model loads).
BUILTIN_NEEDS_ONE_OF: dict[str, tuple[str, ...]] = {"exact_match": ("answer", "solution")}
REFERENCE_HELP = ("a built-in name " + str(sorted(BUILTIN_REWARDS)) + ", 'package.module:function', "
                  "'path/to/file.py:function', a mapping {name: ..., <keyword>: value}, or a local reward-model directory")


def _entry_parts(entry: Any, index: int) -> tuple[str, dict[str, Any]]:
    """``(reference, bound keyword arguments)`` of one ``reward_funcs`` entry; type checks only."""
    where = f"reward_funcs[{index}]"
    if isinstance(entry, str):
        ref, bound = entry, {}
    elif isinstance(entry, dict):
        if "name" not in entry:
            raise ValueError(f"Invalid {where}={entry!r}: a mapping entry needs 'name' (expected {REFERENCE_HELP})")
        ref, bound = entry["name"], {k: v for k, v in entry.items() if k != "name"}
    else:
        raise ValueError(f"Invalid {where}={entry!r}: expected {REFERENCE_HELP}")
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"Invalid {where} name {ref!r}: expected {REFERENCE_HELP}")
    ref = ref.strip()
    if ref not in BUILTIN_REWARDS and ":" not in ref:
        # a reward-model directory: a path (checked when the run starts, from its directory) or an existing folder
        if not ("/" in ref or "\\" in ref or Path(ref).expanduser().is_dir()):
            raise ValueError(f"Unknown reward {ref!r} in {where}" + _trl_spelling(ref) + f": expected {REFERENCE_HELP}")
        if bound:
            raise ValueError(f"Invalid {where}: a reward-model directory takes no keyword arguments; got {sorted(bound)}")
    if ref == "format" and "pattern" in bound:
        if not isinstance(bound["pattern"], str):
            raise ValueError(f"Invalid {where} pattern {bound['pattern']!r}: expected a regular expression string")
        try:
            re.compile(bound["pattern"])
        except re.error as err:
            raise ValueError(f"Invalid {where} pattern {bound['pattern']!r}: {err}") from None
    return ref, bound


# The names TRL's `trl grpo` script registers for --reward_funcs (trl/scripts/grpo.py), all in trl.rewards.
TRL_SCRIPT_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward")


def _trl_spelling(ref: str) -> str:
    """What lowmem calls a reward given in the `trl grpo` script's spelling: a name of its registry
    (:data:`TRL_SCRIPT_REWARDS`, functions of ``trl.rewards``) or a dotted ``module.function``; else ``""``."""
    if ref in TRL_SCRIPT_REWARDS:
        return f" (a `trl grpo` script name: here 'trl.rewards:{ref}')"
    if "." in ref and not ref.endswith(".py") and all(part.isidentifier() for part in ref.split(".")):
        module, func = ref.rsplit(".", 1)
        return f" (the `trl grpo` script's dotted form: here '{module}:{func}', or 'path/to/{module}.py:{func}')"
    return ""


def validate_reward_fields(recipe: Any) -> None:
    """Type- and range-check ``reward_funcs`` and ``reward_weights`` of a recipe (nothing is imported).

    Weights written as strings (``"0.5"``) are converted to numbers.

    Raises:
        ValueError: Naming the field: a wrong entry, rewards for a trainer that takes none
            (``sft``, ``dpo``), weights without rewards, a length mismatch, a non-finite weight,
            ``reward_weights`` both here and in ``training_args``, or unequal weights for ``bnpo``.
    """
    funcs, weights = recipe.reward_funcs, recipe.reward_weights
    if funcs is not None:
        if not isinstance(funcs, list) or not funcs:
            raise ValueError(f"Invalid reward_funcs={recipe.reward_funcs!r}: expected a non-empty list of {REFERENCE_HELP}")
        for i, entry in enumerate(funcs):
            _entry_parts(entry, i)
        if recipe.trainer not in ("grpo", "gvpo", "bnpo"):
            raise ValueError(f"reward_funcs is for trainer grpo, gvpo or bnpo; trainer is {recipe.trainer!r}")
        recipe.reward_funcs = funcs
        nested = (recipe.training_args or {}).get("reward_weights") if isinstance(recipe.training_args, dict) else None
        if isinstance(nested, (list, tuple)):  # (TRL: after the model loaded)
            check_reward_weights(nested, len(funcs), prefix="training_args.")
    if weights is not None:
        if not isinstance(weights, list) or not weights:
            raise ValueError(f"Invalid reward_weights={recipe.reward_weights!r}: expected a list of numbers")
        out = []
        for i, w in enumerate(weights):
            try:
                value = float(w) if not isinstance(w, bool) else None
            except (TypeError, ValueError):
                value = None
            if value is None or not math.isfinite(value):
                raise ValueError(f"Invalid reward_weights[{i}]={w!r}: expected a finite number")
            out.append(value)
        if funcs is None:
            raise ValueError("reward_weights needs reward_funcs (one weight per reward function)")
        check_reward_weights(out, len(funcs))
        if "reward_weights" in (recipe.training_args or {}):
            raise ValueError("reward_weights is given both as a recipe field and in training_args; keep one")
        if recipe.trainer == "bnpo" and len(set(out)) > 1:
            raise ValueError(f"reward_weights={out}: BNPO averages one advantage per reward function with equal "
                             "weight; expected equal weights (or none)")
        recipe.reward_weights = out


def check_reward_weights(weights: Any, funcs: int | None, prefix: str = "") -> None:
    """The rule of ``reward_weights`` against the reward functions, one for every route: ``lowmem train``'s recipe
    (``prefix="training_args."`` for ``training_args.reward_weights``, ``""`` for the recipe's own field) and the
    Python API (``prefix="LowMemGRPOConfig."``, GVPO / BNPO's: :func:`lowmem.trainers.trl.check_reward_weights_count`).
    ``funcs``: the number of reward functions, ``None`` when ``reward_funcs`` is unset (``lowmem train``'s synthetic
    task, one function: :func:`lowmem.kit.reward_fn`). One weight per function (TRL 1.16 checks the count in
    ``GRPOTrainer.__init__``, after the policy and any reward model loaded), and not all 0
    (:func:`check_some_weight`).

    Raises:
        ValueError: ``<prefix>reward_weights has N entries ([...]) but reward_funcs has M; ...``, or
            ``<prefix>reward_weights=[0.0, ...]: all weights are 0 ...``.
    """
    field = f"{prefix}reward_weights"
    if len(weights) != (1 if funcs is None else funcs):
        have = ("reward_funcs is unset: the synthetic task has one reward function (lowmem.kit.reward_fn)"
                if funcs is None else f"reward_funcs has {funcs}")
        raise ValueError(f"{field} has {len(weights)} entries ({list(weights)}) but {have}; expected one weight per "
                         "reward function" + (" (set reward_funcs for more)" if funcs is None else ""))
    check_some_weight(field, weights)


def check_some_weight(field: str, weights: Any) -> None:
    """Refuse ``reward_weights`` that are all 0: TRL's reward is ``sum_i w_i r_i`` (GRPOTrainer._generate_and_score),
    0 for every completion then, so every group's advantages (and with the default ``beta: 0`` the whole gradient) are
    0 while ``rewards/<name>/mean`` keeps being logged. A 0 beside a non-zero weight stays valid (logged, not trained on).

    Raises:
        ValueError: Naming ``field``.
    """
    try:
        zero = len(weights) > 0 and all(not isinstance(w, bool) and float(w) == 0.0 for w in weights)
    except (TypeError, ValueError):  # a non-number: the type checks name it
        return
    if zero:
        raise ValueError(f"{field}={list(weights)}: all weights are 0, so the weighted reward is 0 for every completion "
                         "and GRPO has nothing to learn from (every advantage is 0); give at least one non-zero weight")


def _import_module(module: str, ref: str) -> Any:
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and not (module == err.name or module.startswith(err.name + ".")):
            # the module exists; an import inside it failed
            raise ValueError(f"reward function {ref!r}: importing module {module!r} failed: {_import_failure(err)}") from err
        raise ValueError(f"reward function {ref!r}: module {module!r} not found ({err}); expected an importable "
                         "module (installed, or a .py file in the current directory) or 'path/to/file.py:function'") from None
    except Exception as err:  # the user's module fails to import: a syntax error, an exception at import time
        raise ValueError(f"reward function {ref!r}: importing module {module!r} failed: {_import_failure(err)}") from err
    finally:
        if added:
            sys.path.remove(cwd)


def _import_file(path: str, ref: str) -> Any:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"reward function {ref!r}: file {path!r} does not exist "
                                f"(relative paths are from the current directory, {Path.cwd()})")
    name = f"lowmem_user_rewards_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and relative lookups inside the file need it
    # the file's folder first on sys.path while it runs, as for `python file.py`: its imports of the modules beside
    # it (`from helpers import extract_answer`) work (before: ModuleNotFoundError unless run from that folder)
    folder = str(file.resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's file fails to import: a syntax error, an exception at import time
        del sys.modules[name]
        raise ValueError(f"reward function {ref!r}: importing {path!r} failed: {_import_failure(err)}") from err
    finally:
        if added:
            sys.path.remove(folder)
    return module


def _import_failure(err: Exception) -> str:
    """Why importing a user's reward code failed, in one line: a syntax error with its file and line,
    else the exception's type, message and the line of the user's code that raised it
    (``LOWMEM_DEBUG=1`` shows the whole traceback)."""
    if isinstance(err, SyntaxError):
        return f"{type(err).__name__}: {err.msg} ({err.filename}, line {err.lineno})"
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    user = [f for f in frames if "importlib" not in f.filename]
    at = f" ({user[-1].filename}, line {user[-1].lineno})" if user else ""
    return f"{type(err).__name__}: {err}{at}"


# The keyword arguments TRL's ``GRPOTrainer._calculate_rewards`` (trl 1.16) gives every reward function,
# besides the dataset's columns other than prompt / completion / completion_ids.
TRL_REWARD_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def reward_call_keywords(columns: list[str] | None) -> list[str]:
    """The keyword arguments a reward function is called with for a dataset of ``columns``: TRL's
    :data:`TRL_REWARD_KEYWORDS` and every column except ``prompt``, ``completion``, ``completion_ids``."""
    extra = [c for c in (columns or []) if c not in ("prompt", "completion", "completion_ids")]
    return list(TRL_REWARD_KEYWORDS) + [c for c in extra if c not in TRL_REWARD_KEYWORDS]


def check_reward_columns(columns: list[str] | None) -> None:
    """Refuse dataset columns named like the keywords TRL gives every reward function besides the columns: TRL 1.16
    calls ``fn(prompts=..., completions=..., completion_ids=..., **columns)`` after setting ``trainer_state``,
    ``log_extra`` and ``log_metric`` in that mapping, so a ``prompts`` / ``completions`` column failed at the first step
    (``TypeError: fn() got multiple values for keyword argument 'completions'``, after the model loaded and generated)
    and a ``trainer_state`` / ``log_extra`` / ``log_metric`` column reached no function (TRL's object replaced it).

    Raises:
        ValueError: Naming the columns, what TRL passes under those names, and to rename them.
    """
    clash = [c for c in (columns or []) if c in TRL_REWARD_KEYWORDS and c != "completion_ids"]
    if clash:
        raise ValueError(
            f"dataset column(s) {clash} have the name(s) of keywords TRL gives every reward function itself (prompts, "
            "completions: the prompts and the generated completions; trainer_state, log_extra, log_metric: its "
            "objects), so TRL would fail with \"got multiple values for keyword argument\" (prompts, completions) or "
            "replace the column (the others); rename the column(s) in the data (e.g. reference_completions)")


def check_reward_signature(fn: Callable[..., Any], ref: str, columns: list[str] | None, bound: dict[str, Any] | None = None) -> None:
    """Check, before any model loads, that ``fn`` can take TRL's call (all keywords:
    :func:`reward_call_keywords` of the dataset's ``columns``, plus the ``bound`` ones): every required
    parameter is among them and every one of them is a parameter or goes into ``**kwargs``; and that no column
    has the name of one of TRL's own keywords (:func:`check_reward_columns`).

    Raises:
        ValueError: Naming the function, what does not fit, and the keywords it is called with.
    """
    import inspect

    check_reward_columns(columns)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no introspectable signature (a C function): TRL's call decides
        return
    keywords = reward_call_keywords(columns) + [k for k in (bound or {}) if k not in reward_call_keywords(columns)]
    try:
        sig.bind(**dict.fromkeys(keywords))
    except TypeError as err:
        withheld = [p.name for p in sig.parameters.values() if p.name in WITHHELD_COLUMNS and p.name in (columns or [])
                    and p.name not in keywords]
        raise ValueError(
            f"reward function {ref!r} {sig}: {err}; TRL calls it with the keywords {keywords} and takes one float "
            "(or None) per completion back: def reward(prompts, completions, **kwargs)"
            + (f". {_withheld_hint(withheld[0])}" if withheld else "")
        ) from None


def check_bound_keywords(fn: Callable[..., Any], ref: str, bound: dict[str, Any], columns: list[str] | None,
                         where: str = "dataset") -> None:
    """Check the keyword arguments a ``{name: ..., <keyword>: <value>}`` entry binds: each must be a parameter the
    function names (one that only its ``**kwargs`` would take was ignored without a word: ``{name: format, patern:
    ...}`` rewarded the default format, ``{name: exact_match, weight: 0.5}`` weighed nothing), and none may be named
    like a keyword of TRL's call or a column of ``columns`` (the bound value replaced TRL's or the column's in every
    call).

    Raises:
        ValueError: Naming the function, the keywords, its parameters (and the close ones) or the column.
    """
    import difflib
    import inspect

    if not bound:
        return
    trl = [k for k in bound if k in TRL_REWARD_KEYWORDS]
    if trl:
        raise ValueError(f"reward function {ref!r} binds {trl}, the name(s) of keywords TRL gives every reward function "
                         "itself (the prompts, the generated completions and their ids, its objects): the bound value would "
                         "replace TRL's in every call; remove the keyword(s)")
    clash = [k for k in bound if k in (columns or [])]
    if clash:
        raise ValueError(f"reward function {ref!r} binds {clash}, also the name(s) of {where} column(s): the bound value "
                         "would replace the column's values in every call; remove the keyword(s), or rename the column(s)")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature (a C function): TRL's call decides
        return
    named = sorted(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    for k in bound:
        if k not in named:
            close = difflib.get_close_matches(k, named, n=3)
            raise ValueError(
                f"reward function {ref!r} binds {k!r}, which it does not name as a parameter (its parameters: {named}): "
                "the value would go into its **kwargs and be ignored"
                + (f"; did you mean {close}?" if close else "")
                + ("; a reward function's weight is reward_weights (one per function)" if k in ("weight", "weights")
                   else ""))


# Dataset columns TRL's GRPOTrainer (1.16, ``_calculate_rewards``) does not pass to reward functions: a prompt-completion
# dataset's reference ``completion`` (the name is the generated one's; ``completions`` holds those).
WITHHELD_COLUMNS = ("completion",)


def _withheld_hint(column: str) -> str:
    return (f"The dataset's {column!r} column is not passed to reward functions: TRL withholds it (in GRPO a completion "
            f"is a generated one, given as completions); rename the column (e.g. reference, or answer for exact_match) "
            "to receive it")


def checked_outputs(fn: Callable[..., Any], ref: str) -> Callable[..., Any]:
    """``fn`` wrapped so that what it returns is checked when TRL calls it: a list (or tuple) of one
    real number or ``None`` per completion, else a ``ValueError`` naming the function and what it
    returned (TRL itself would fail on it with a bare ``TypeError``). A 1-D numpy array or tensor,
    which TRL takes as it takes a list, is passed on as a list. Async functions are returned as
    they are (TRL awaits them)."""
    import inspect

    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
        return fn

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> list[float | None]:
        try:
            out = fn(*args, **kwargs)
        except Exception as err:  # the user's code failed inside TRL's step: one line naming it and its line
            withheld = isinstance(err, KeyError) and err.args and err.args[0] in WITHHELD_COLUMNS
            raise ValueError(f"reward function {ref!r} raised {_call_failure(err, fn)}"
                             + (f". {_withheld_hint(err.args[0])}" if withheld else "")
                             + _conversational_hint(err, kwargs.get("completions"))) from err
        n = len(kwargs["completions"]) if "completions" in kwargs else None
        expected = f"a list of {n if n is not None else 'one'} float(s) or None, one per completion"
        if getattr(out, "ndim", None) == 1 and callable(getattr(out, "tolist", None)):
            out = out.tolist()  # a 1-D numpy array or tensor: TRL iterates it like a list
        if not isinstance(out, (list, tuple)):
            raise ValueError(f"reward function {ref!r} returned {_shown(out)}; expected {expected}")
        for i, r in enumerate(out):
            if not _is_reward(r):
                raise ValueError(f"reward function {ref!r} returned {_shown(r)} at position {i}; expected {expected}")
        if n is not None and len(out) != n:
            raise ValueError(f"reward function {ref!r} returned {len(out)} rewards for {n} completions; expected {expected}")
        return out

    return checked


def _call_failure(err: Exception, fn: Callable[..., Any]) -> str:
    """``err`` raised by reward function ``fn``, in one line: its type and message, and the line of ``fn``'s
    file that raised it (the deepest frame in that file; else the deepest frame)."""
    import inspect
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    try:
        source = inspect.getsourcefile(inspect.unwrap(fn))
    except TypeError:
        source = None
    own = [f for f in frames if source is not None and f.filename == source] or frames[-1:]
    at = f" ({own[-1].filename}, line {own[-1].lineno})" if own else ""
    return f"{type(err).__name__}: {err}{at}"


def _conversational_hint(err: Exception, completions: Any) -> str:
    """For a ``TypeError`` / ``AttributeError`` on conversational completions (lists of messages, which a
    function written for strings meets as lists): how to get their text. Else ``""``."""
    if isinstance(err, (TypeError, AttributeError)) and isinstance(completions, list) and completions \
            and isinstance(completions[0], list):
        return ("; the data is conversational, so each completion is a list of {'role', 'content'} messages, not a "
                "string: its text is completion[-1]['content'] (lowmem.rewards.completion_text(completion))")
    return ""


def _is_reward(value: Any) -> bool:
    """What TRL turns into a float: ``None`` (NaN), a real number (``bool`` and numpy's included), a
    one-element tensor."""
    import numbers

    if value is None or isinstance(value, numbers.Real):
        return True
    numel = getattr(value, "numel", None)
    return callable(numel) and hasattr(value, "item") and numel() == 1


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"


# TRL's rewards that import a package inside their body (trl 1.16, trl/rewards/accuracy_rewards.py:65, 281): the
# import name and the pip name. Importing trl.rewards works without it; the first reward call raised ImportError.
TRL_REWARD_PACKAGES: dict[str, tuple[str, str]] = {
    "accuracy_reward": ("math_verify", "math-verify"), "reasoning_accuracy_reward": ("math_verify", "math-verify"),
}


def check_reward_packages(fn: Callable[..., Any], ref: str) -> None:
    """Refuse a ``trl.rewards`` function of :data:`TRL_REWARD_PACKAGES` whose package is not installed, before the
    model loads (it failed at its first call, after the model loaded and generated).

    Raises:
        ValueError: Naming the function, the package and the ``pip install`` that fixes it.
    """
    import importlib.util

    if not str(getattr(fn, "__module__", "")).startswith("trl.rewards"):
        return
    need = TRL_REWARD_PACKAGES.get(getattr(fn, "__name__", ""))
    if need is not None and importlib.util.find_spec(need[0]) is None:
        raise ValueError(f"reward function {ref!r} needs the package {need[0]} (TRL imports it when the reward is "
                         f"called), which is not installed: pip install {need[1]}")


def check_reward_model_dir(folder: str | Path, name: str) -> None:
    """A local reward-model directory as TRL 1.16's GRPOTrainer loads it:
    ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)``. Read from its ``config.json`` only
    (transformers' ``AutoConfig``; no weights loaded): its ``architectures`` must name a ``*ForSequenceClassification``
    class and its ``num_labels`` be 1. A causal LM (``LlamaForCausalLM``, any chat / policy model) loaded so gets a
    newly, randomly initialised score head (transformers' load report: ``score.weight | MISSING``), and GRPO trained
    on random rewards; a classifier of 2 labels failed after the policy loaded (``RuntimeError: You set
    ignore_mismatched_sizes to False``). ``name`` is the entry's name in the error (``reward_funcs[0]``).

    Raises:
        ValueError: Naming ``name``, the folder, its architectures / num_labels and what is expected.
    """
    folder = Path(folder)
    expected = ("expected a reward model saved with save_pretrained: a *ForSequenceClassification checkpoint with "
                "num_labels: 1 (one score per prompt + completion; TRL loads it as AutoModelForSequenceClassification "
                "with num_labels=1)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{name}={str(folder)!r}: the directory has no config.json; {expected}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{name}={str(folder)!r}: its config.json cannot be read by transformers' AutoConfig "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); {expected}") from None
    archs = list(getattr(config, "architectures", None) or [])
    labels = config.num_labels
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        what = ("a causal language model: its score head would be newly initialised at random, and GRPO would "
                "train on random rewards" if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
                else "no sequence classifier (TRL would load it with a newly, randomly initialised score head)")
        raise ValueError(f"{name}={str(folder)!r}: config.json has architectures {archs or None} (num_labels {labels}): "
                         f"{what}; {expected}")
    if labels != 1:
        raise ValueError(f"{name}={str(folder)!r}: config.json has architectures {archs} with num_labels {labels}: its "
                         f"score head has {labels} outputs and TRL loads it with num_labels=1 (a size-mismatch "
                         f"RuntimeError after the policy loaded); {expected}")


def resolve_reward(entry: Any, index: int = 0, columns: list[str] | None = None,
                   eval_columns: list[str] | None = None) -> Callable[..., list[float]] | str:
    """The reward function of one ``reward_funcs`` entry (see the module docstring), imported now.

    With ``columns`` (the training dataset's) the function's signature is checked against TRL's call
    (:func:`check_reward_signature`) and its outputs are checked when called (:func:`checked_outputs`);
    with ``eval_columns`` (the eval set's, which TRL scores before, during and after training) against that
    call too: an eval file without a column a function needs failed at the evaluation before training, after
    the model loaded.

    Returns:
        `Callable` or `str`: The path of a reward-model directory as is (TRL's ``GRPOTrainer`` loads
        it); else a callable with ``__name__`` set to the built-in's name (``exact_match``) or the function's
        name (TRL logs ``rewards/<name>/mean``); bound keyword arguments are applied.

    Raises:
        ValueError: Unknown built-in, missing module or function, or an attribute that is not callable.
        FileNotFoundError: A ``.py`` file that does not exist.
    """
    ref, bound = _entry_parts(entry, index)
    if ref not in BUILTIN_REWARDS and ":" not in ref:  # a local reward-model directory: TRL loads it
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"reward_funcs[{index}]: reward-model directory {ref!r} does not exist (a function "
                                    "is named 'path/to/file.py:function')")
        check_reward_model_dir(folder, f"reward_funcs[{index}]")
        return str(folder)
    if ref in BUILTIN_REWARDS:
        fn, name = BUILTIN_REWARDS[ref], ref
    else:
        target, func = ref.rsplit(":", 1)
        if not target or not func:
            raise ValueError(f"Invalid reward_funcs[{index}]={ref!r}: expected {REFERENCE_HELP}")
        module = _import_file(target, ref) if target.endswith(".py") else _import_module(target, ref)
        if not hasattr(module, func):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ValueError(f"reward function {ref!r}: {target!r} has no attribute {func!r}; its functions: {public}")
        fn, name = getattr(module, func), func
        if not callable(fn):
            raise ValueError(f"reward function {ref!r}: {func!r} is a {type(fn).__name__}, not a function")
        check_reward_packages(fn, ref)
    needs = BUILTIN_NEEDS_ONE_OF.get(ref if ref in BUILTIN_REWARDS else "", ())
    check_bound_keywords(fn, ref, bound, columns)
    for which, cols in (("dataset", columns), ("eval_dataset", eval_columns)):
        if cols is None:
            continue
        try:
            check_bound_keywords(fn, ref, bound, cols, which)
            check_reward_signature(fn, ref, cols, bound)
        except ValueError as err:
            if which == "dataset":
                raise
            raise ValueError(f"eval_dataset (columns {list(cols)}): {err}") from None
        if needs and not set(needs) & (set(cols) | set(bound)):
            raise ValueError(f"reward {ref!r} (reward_funcs[{index}]) needs {'a dataset' if which == 'dataset' else 'an eval_dataset'} "
                             f"column {' or '.join(map(repr, needs))}; the {which} has {sorted(cols)}")
    if columns is not None:
        fn = checked_outputs(fn, ref)
    if not bound and getattr(fn, "__name__", None) == name:
        return fn

    @functools.wraps(fn)
    def with_bound(*args: Any, **kwargs: Any) -> list[float]:
        return fn(*args, **{**kwargs, **bound})

    with_bound.__name__ = name
    return with_bound


def load_reward_funcs(entries: list[Any], columns: list[str] | None = None,
                      eval_columns: list[str] | None = None) -> list[Callable[..., list[float]] | str]:
    """:func:`resolve_reward` of every entry, in order (what ``GRPOTrainer(reward_funcs=...)`` takes);
    with ``columns`` (the training dataset's) each function's signature is checked against TRL's call
    and its outputs when called; with ``eval_columns`` (the eval set's) the signature against its call too.
    Functions that share a name get distinct ones (:func:`distinct_reward_names`)."""
    return distinct_reward_names([resolve_reward(e, i, columns, eval_columns) for i, e in enumerate(entries)])


def reward_name(func: Callable[..., Any] | str) -> str:
    """The name TRL logs a reward under (``rewards/<name>/mean``; trl 1.16 GRPOTrainer.__init__): a reward-model path's
    last part (``config._name_or_path.split("/")[-1]``), else the function's ``__name__``."""
    if isinstance(func, str):
        return func.rstrip("/").split("/")[-1]
    return getattr(func, "__name__", type(func).__name__)


def _renamed(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` under another ``__name__`` (a wrapper: the user's function is not changed); async stays async."""
    import inspect

    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
        async def renamed(*args: Any, **kwargs: Any) -> Any:
            return await fn(*args, **kwargs)
    else:
        def renamed(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)
    functools.update_wrapper(renamed, fn)
    renamed.__name__ = renamed.__qualname__ = name
    return renamed


def distinct_reward_names(funcs: list[Callable[..., Any] | str]) -> list[Callable[..., Any] | str]:
    """``funcs`` with one name each: TRL logs every reward as ``rewards/<name>/mean`` and averages the values logged
    under one key, so two functions named ``reward`` (``r1.py:reward``, ``r2.py:reward``; two ``{name: format, ...}``)
    were one metric, the mean of both, and metrics.json's ``reward_func_histories`` one entry. Each function of a
    shared name becomes ``<name>_<index>`` (its ``reward_funcs`` index: ``format_0``, ``format_1``).

    Raises:
        ValueError: Two reward-model directories of one folder name (TRL names them, lowmem cannot), or a new name
            that is another entry's, naming the entries.
    """
    names = [reward_name(f) for f in funcs]
    out = list(funcs)
    for name in sorted(set(names)):
        at = [i for i, n in enumerate(names) if n == name]
        if len(at) < 2:
            continue
        models = [i for i in at if isinstance(funcs[i], str)]
        if len(models) > 1:
            raise ValueError(f"reward_funcs{models} are reward-model directories with one folder name {name!r}: TRL "
                             "logs each reward as rewards/<folder name>/mean, so theirs would be one metric; rename a folder")
        for i in at:
            if not isinstance(funcs[i], str):
                out[i] = _renamed(funcs[i], f"{name}_{i}")
    distinct_names([reward_name(f) for f in out])  # a new name that is another entry's: refused
    return out


def distinct_names(names: list[str]) -> list[str]:
    """The names TRL logs rewards under (``rewards/<name>/mean``), one per reward function: a name shared by several
    functions becomes ``<name>_<index>`` (the function's ``reward_funcs`` index), as :func:`distinct_reward_names`
    renames them for ``lowmem train``; the Python API's trainers (``trainers.trl.LowMemGRPOTrainer``) rename their
    logged names with it.

    Raises:
        ValueError: A new name that is another entry's (``["a", "a", "a_1"]``), naming the entries.
    """
    final = [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    clash = sorted({n for n in final if final.count(n) > 1})
    if clash:
        raise ValueError(f"reward_funcs: the names {clash} are given to several entries "
                         f"{[i for i, n in enumerate(final) if n in clash]} (a shared name becomes <name>_<index>); "
                         "rename a function so that each reward has its own name in the logs")
    return final


def reward_histories(log_history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each reward function's logged mean per step, ``{name: [...]}``, from a trainer's ``log_history``
    (TRL logs ``rewards/<name>/mean``; the weighted sum is ``reward``)."""
    out: dict[str, list[float]] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith("rewards/") and key.endswith("/mean"):
                out.setdefault(key[len("rewards/"):-len("/mean")], []).append(value)
    return out
