"""TRL trainers that build a lowmem optimizer from their config.

Each config is TRL's own config plus :class:`~lowmem.trainers.hf.LowMemArguments`
(``lowmem_optim``, ``lowmem_optim_args``), so a YAML recipe or the command line selects the
optimizer by name; each trainer is TRL's trainer with
:class:`~lowmem.trainers.hf.LowMemOptimizerMixin` first in its bases::

    from lowmem.trainers import LowMemDPOConfig, LowMemDPOTrainer
    args = LowMemDPOConfig(output_dir="out", lowmem_optim="adafactor", learning_rate=1e-3)
    trainer = LowMemDPOTrainer(model=model_dir, args=args, train_dataset=pairs, peft_config=lora)

The optimizer is built in ``create_optimizer``, which the Trainer calls when training starts,
after TRL has wrapped the model with ``peft_config``: it holds only the adapter's trainable
parameters. Everything else is TRL's: gradient accumulation, evaluation, checkpoints and
``resume_from_checkpoint`` (lowmem optimizer state is tensors-only, so ``optimizer.pt`` reloads
unchanged). Leave ``lowmem_optim`` unset and each trainer behaves exactly like TRL's.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from lowmem.config import ConfigError
from lowmem.rewards import distinct_names

from .hf import LowMemArguments, LowMemOptimizerMixin

_FIELDS_DOC = """
    Parameters:
        lowmem_optim (`str` or `None`, *optional*, defaults to `None`):
            Name of a registered lowmem optimizer (``lowmem list``), e.g. ``"adafactor"``, or a Hugging
            Face ``optim`` name (``"galore_adamw_8bit"``, ``"paged_adamw_8bit"``, ``<name>_layerwise``). It replaces
            ``optim`` and is built with lowmem's parameter groups when training starts (after any
            ``peft_config`` adapter is created, so only trainable parameters are optimized).
            ``learning_rate``, ``weight_decay``, ``adam_beta1``/``adam_beta2`` (as ``betas``) and
            ``adam_epsilon`` (as ``eps``) apply where the optimizer has them. `None` keeps TRL's
            optimizer.
        lowmem_optim_args (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Extra hyperparameters of ``lowmem_optim``: a dict, a JSON object or ``"k=v,k=v"``
            (e.g. ``"rank=8,update_proj_gap=50"``); they win over the mapped fields above. Unknown
            names raise ``ValueError`` listing the valid ones. Requires ``lowmem_optim``.
"""


@dataclass
class LowMemSFTConfig(LowMemArguments, SFTConfig):
    __doc__ = "TRL's ``SFTConfig`` plus lowmem's optimizer selection.\n" + _FIELDS_DOC


#: how a check's message names a config field: ``key("beta")`` -> ``"GVPOConfig.beta"`` (the config's own name),
#: ``"beta"`` / ``"training_args.beta"`` (``lowmem train``: the recipe's key, :func:`lowmem.train.recipe_key`)
FieldKey = Callable[[str], str]


def bare_key(field: str) -> str:
    """A field named as it is (the checks whose config message never carried the class name)."""
    return field


def config_key(config: Any) -> FieldKey:
    """Fields named ``<Config>.<field>``, as the config class's own errors name them."""
    name = config if isinstance(config, str) else type(config).__name__
    return lambda field: f"{name}.{field}"


class ConfigFieldError(ConfigError):
    """A trainer config's check failed, its message a function ``say(key)`` of how each field it names is written
    (:data:`FieldKey`). Raised by the config with its own naming (``str(err)``: ``LowMemGRPOConfig.loss_type=...``);
    ``lowmem train``, which builds the config from a recipe before any model loads, prints :meth:`named` with the
    recipe's keys (``loss_type=...``, ``batch_size=...``) instead of ``LowMemGRPOConfig: LowMemGRPOConfig.<field>``:
    one check, two namings, no copy of its logic."""

    def __init__(self, say: Callable[[FieldKey], str], key: FieldKey) -> None:
        self.say = say
        super().__init__(say(key))

    def named(self, key: FieldKey) -> str:
        """The message with each field named by ``key``."""
        return self.say(key)


def field_error(check: Callable[..., Any], field: str, key: FieldKey, *args: Any) -> None:
    """Run ``check(key(field), *args)`` (a check that takes the field's name as its first argument and raises
    ``ValueError``, e.g. :func:`lowmem.rewards.check_some_weight`) and raise its error as a :class:`ConfigFieldError`,
    so ``lowmem train`` can name the recipe's key with the same check."""
    def say(k: FieldKey) -> str:
        try:
            check(k(field), *args)
        except ValueError as err:
            return str(err)
        raise AssertionError(f"{check.__name__} passed with the other naming")  # pragma: no cover

    try:
        check(key(field), *args)
    except ValueError:
        raise ConfigFieldError(say, key) from None


# TRL 1.16's string fields whose values its docs list but its configs do not check: a value outside (a typo) failed
# only at the first training step, after the model loaded (and for GRPO after the first generation), with "Unknown loss
# type" / "Invalid value for scale_rewards" / "Unknown importance sampling level" / "Unknown f_divergence_type".
DPO_CHOICES: dict[str, tuple[str, ...]] = {
    "loss_type": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
    "f_divergence_type": ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
}
GRPO_CHOICES: dict[str, tuple[str, ...]] = {
    "loss_type": ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
    "scale_rewards": ("group", "batch", "none"),  # GRPOConfig turns True / False into "group" / "none"
    "importance_sampling_level": ("token", "sequence"),
    "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
    "vllm_mode": ("server", "colocate"),
}


def check_choices(config: Any, choices: dict[str, tuple[str, ...]]) -> None:
    """Refuse a value of ``config``'s fields outside ``choices`` (:data:`DPO_CHOICES`, :data:`GRPO_CHOICES`; a list
    field, DPO's ``loss_type``, item by item) when the config is built.

    Raises:
        ConfigFieldError: ``<Config>.<field>=<value>: expected one of [...]`` (``lowmem train``: ``<field>=...``).
    """
    for name, valid in choices.items():
        value = getattr(config, name, None)
        items = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in items if v is not None and v not in valid]
        if bad:
            raise ConfigFieldError(lambda key, name=name, value=value, items=items, valid=valid: (
                f"{key(name)}={value!r}: expected {'items ' if value is not items[0] else ''}one of {list(valid)}"),
                config_key(config))


@dataclass
class LowMemDPOConfig(LowMemArguments, DPOConfig):
    __doc__ = ("TRL's ``DPOConfig`` plus lowmem's optimizer selection; ``loss_type`` and ``f_divergence_type`` must be "
               "among TRL's values (:data:`DPO_CHOICES`); ``beta=0`` and a ``label_smoothing`` no ``loss_type`` reads are "
               "refused as ``lowmem train`` refuses them (:func:`lowmem.train.check_dpo_fields`), and so are fields only "
               "another setting reads (``discopop_tau``, ``f_alpha_divergence_coef``, ``ref_model_sync_steps``, "
               "``ref_model_mixup_alpha``, ...) set without it (:func:`lowmem.train.check_dependent_fields`).\n" + _FIELDS_DOC)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices(self, DPO_CHOICES)
        from lowmem.config import ConfigError
        from lowmem.train import check_dpo_fields

        try:  # as ``lowmem train`` refuses them: beta=0 (no gradient) and a label_smoothing no loss_type reads
            check_dpo_fields(vars(self))
        except ConfigError as err:
            raise ConfigError(f"{type(self).__name__}.{err}") from None


@dataclass
class LowMemGRPOConfig(LowMemArguments, GRPOConfig):
    __doc__ = ("TRL's ``GRPOConfig`` plus lowmem's optimizer selection; ``loss_type``, ``scale_rewards``, "
               "``importance_sampling_level``, ``multi_objective_aggregation`` and ``vllm_mode`` must be among TRL's "
               "values (:data:`GRPO_CHOICES`); fields only another setting reads (``ref_model_sync_steps`` without "
               "``sync_ref_model``, ``vllm_*`` without ``use_vllm``, ``sapo_*`` / ``vespo_*`` without that "
               "``loss_type``, ``delta`` / ``epsilon`` / ``epsilon_high`` under a ``loss_type`` that never reads them, "
               "``entropy_target`` / ``entropy_coef_min`` / ``_max`` / ``_delta`` without "
               "``use_adaptive_entropy``, ...) are refused as ``lowmem train`` refuses them "
               "(:func:`lowmem.train.check_dependent_fields`).\n" + _FIELDS_DOC)

    #: whether every process's eval batch must hold whole groups (GVPO's loss), else only the global one (TRL's GRPO)
    EVAL_GROUPS_PER_PROCESS = False

    def __post_init__(self) -> None:
        if self.eval_strategy != "no":  # before TRL's check, which names no field ("The global eval batch size ...")
            from lowmem.train import launched_processes

            check_eval_groups(self, launched_processes())
        groups = self.num_generations
        if groups is None:  # GRPOConfig types it `int | None`, then takes the batch modulo it: a TypeError naming no field
            raise ConfigFieldError(lambda key: (
                f"{key('num_generations')}=None: expected an integer >= 2 (the completions sampled per prompt; TRL's "
                "default 8); null has no meaning in TRL's GRPO (its GRPOConfig takes the generation batch modulo it and "
                "fails with a TypeError)"), config_key(self))
        if isinstance(groups, int) and not isinstance(groups, bool) and groups < 2:  # TRL's check names no field
            raise ConfigFieldError(lambda key: (
                "GRPO needs num_generations >= 2 completions per prompt (a completion's advantage is its reward minus "
                f"its group's mean: one completion has none); got {key('num_generations')}={groups}"), bare_key)
        check_completion_length(vars(self), config_key(self))
        super().__post_init__()
        check_choices(self, GRPO_CHOICES)
        from lowmem.config import ConfigError
        from lowmem.train import check_dependent_fields

        from lowmem.rewards import check_some_weight
        from lowmem.train import check_generation_kwargs

        try:  # as ``lowmem train`` refuses them: a field that only another setting reads, set without it;
            # generation_kwargs that override a config field (sampled at one temperature, scored at another)
            check_dependent_fields(type(self), vars(self))
            check_generation_kwargs({"generation_kwargs": self.generation_kwargs})
        except ConfigError as err:
            raise ConfigError(f"{type(self).__name__}.{err}") from None
        check_batch_generation_kwargs(self)
        if self.reward_weights is not None:  # all 0: every advantage 0, nothing trained
            field_error(check_some_weight, "reward_weights", config_key(self), self.reward_weights)
        refuse_vllm_fields_without_use_vllm(self)
        refuse_use_vllm_without_vllm(self)  # (else TRL's ImportError when the trainer is built, after the model loaded)


def check_completion_length(values: dict[str, Any], key: FieldKey) -> None:
    """Refuse ``max_completion_length=None`` (GRPOConfig types it ``int | None``; the range check skips ``None``) where
    TRL 1.16 has no length for it: generating with transformers, TRL passes ``max_new_tokens=None`` to ``generate``,
    which then stops at transformers' default ``GenerationConfig.max_length`` (20: every completion 20 tokens,
    measured), a default silently replacing the value; ``loss_type='dr_grpo'`` divides by it (``TypeError`` at the
    first step, after the model loaded and generated). Under ``use_vllm`` without dr_grpo, ``None`` is vLLM's
    ``max_tokens=None`` (up to the model's context) and passes. One rule for the Python API's configs (``key``:
    ``<Config>.<field>``) and ``lowmem train`` (the recipe's key, through :class:`ConfigFieldError`).

    Raises:
        ConfigFieldError: ``<key>=None: expected an integer > 0 ...``.
    """
    if values.get("max_completion_length", 512) is not None:
        return
    loss = values.get("loss_type", "dapo")
    loss = str(getattr(loss, "value", loss))
    if values.get("use_vllm") and loss != "dr_grpo":
        return
    why = ("loss_type='dr_grpo' divides its loss by it (a TypeError at the first step)" if loss == "dr_grpo" else
           "generating with transformers, TRL passes max_new_tokens=None and generate() stops at transformers' default "
           "max_length of 20 tokens, a length nobody chose (under use_vllm, null is vLLM's 'up to the context')")
    raise ConfigFieldError(lambda k: f"{k('max_completion_length')}=None: expected an integer > 0 (the most tokens a "
                           f"completion may have; TRL's default 512): {why}", key)


_IDS_ONLY = ("TRL reads only the generated token ids (its log-probabilities come from its own forward pass): without "
             "return_dict_in_generate transformers ignores it, with it the output is no tensor of ids")
#: ``generation_kwargs`` keys that break what TRL 1.16's transformers generation (``GRPOTrainer._generate_single_turn``)
#: expects back from ``model.generate``: one tensor of prompt + completion ids, one row per prompt row. Each: a test of
#: a value that breaks it, and why.
BATCH_GENERATION_KWARGS: dict[str, tuple[Any, str]] = {
    "num_return_sequences": (lambda v: v != 1, "TRL already repeats each prompt num_generations times and reads one "
                             "completion per row: more sequences per row multiply the rows (at the first step: "
                             "'RuntimeError: Sizes of tensors must match ... Expected size 8 but got size 16'); set "
                             "num_generations instead"),
    "return_dict_in_generate": (bool, "TRL slices the tensor of ids generate() returns; a dict output fails at the "
                                "first step ('TypeError: tuple indices must be integers or slices, not tuple')"),
    "output_scores": (bool, _IDS_ONLY), "output_logits": (bool, _IDS_ONLY), "output_attentions": (bool, _IDS_ONLY),
    "output_hidden_states": (bool, _IDS_ONLY),
    "stop_strings": (lambda v: v is not None, "transformers needs the tokenizer passed to generate() for stop strings, "
                     "which TRL does not pass: the first generation fails ('... we could not locate a tokenizer')"),
}


def check_batch_generation_kwargs(config: Any) -> None:
    """Refuse ``generation_kwargs`` (:data:`BATCH_GENERATION_KWARGS`) that break the batches TRL's GRPO generates:
    accepted before, they failed at the first step, after the model loaded and generated, naming no key. Under
    ``use_vllm`` the keys go to vLLM's sampling parameters instead and are not checked here.

    Raises:
        ConfigFieldError: ``<Config>.generation_kwargs.<key>=<value>: <why>`` (``lowmem train``: ``generation_kwargs.<key>``).
    """
    from lowmem.config import ConfigError

    kwargs = getattr(config, "generation_kwargs", None)
    if not isinstance(kwargs, dict) or getattr(config, "use_vllm", False):
        return
    for key, (breaks, why) in BATCH_GENERATION_KWARGS.items():
        if key in kwargs and breaks(kwargs[key]):
            raise ConfigFieldError(lambda k, key=key, why=why: (
                f"{k('generation_kwargs')}.{key}={kwargs[key]!r}: {why}; drop generation_kwargs.{key}"), config_key(config))


def check_eval_groups(config: Any, processes: int) -> None:
    """Refuse an eval batch that splits a prompt's group of ``num_generations_eval`` completions (unset:
    ``num_generations``): TRL's GRPO evaluates whole groups of the global eval batch
    (``per_device_eval_batch_size`` x ``processes``), GVPO (``EVAL_GROUPS_PER_PROCESS``) of every process's. Before,
    ``trainer.evaluate()`` with ``eval_strategy="no"`` (TRL checks only with evaluation during training) failed after
    generating with ``RuntimeError: shape '[-1, 3]' is invalid for input of size 8``, naming no field; with evaluation
    on, TRL's message named none either. Values that are not integers are left to the range checks.

    Raises:
        ConfigFieldError: Naming both fields and the values that fit.
    """
    from math import gcd

    batch, given = config.per_device_eval_batch_size, config.num_generations_eval
    groups = given if given is not None else config.num_generations
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (batch, groups, processes)):
        return
    per_process = getattr(config, "EVAL_GROUPS_PER_PROCESS", False)
    processes = 1 if per_process else processes
    if (batch * processes) % groups == 0:
        return
    step = groups // gcd(groups, processes)  # per_device_eval_batch_size must be a multiple of this
    fits = sorted({m for m in (batch // step * step, -(-batch // step) * step) if m > 0})
    total = batch * processes
    divisors = [d for d in range(2, total + 1) if total % d == 0]
    name = type(config).__name__
    where = (f"per process ({name.replace('Config', '')}'s loss compares the completions of a group within a process)"
             if per_process else f"of the global eval batch ({batch} x {processes} process(es))" if processes > 1 else "")
    raise ConfigFieldError(lambda key: (
        f"{key('per_device_eval_batch_size')}={batch} does not hold whole groups of num_generations_eval={groups}"
        f"{'' if given is not None else ' (unset: num_generations)'}: evaluation generates {groups} completions per "
        f"prompt and scores each group together{' ' + where if where else ''}; set per_device_eval_batch_size to a "
        f"multiple of {step} ({' or '.join(map(str, fits))}) or num_generations_eval to a divisor of {total}"
        + (f" ({divisors})" if divisors else "") + " (before: a RuntimeError after the first evaluation's generation)"),
        config_key(name))


def changed_vllm_fields(values: dict[str, Any]) -> list[str]:
    """The ``vllm_*`` fields of ``GRPOConfig`` that ``values`` sets away from TRL's default. Without ``use_vllm`` TRL
    (1.16) generates with transformers and reads none of them: ``GRPOTrainer`` copies them in its ``__init__`` and
    reads each only under ``if self.use_vllm`` (building ``VLLMGeneration``, weight syncs, the importance-sampling
    correction of vLLM's log-probabilities, VESPO's mode check); ``GRPOConfig.__post_init__`` only validates the
    importance-sampling clips (and copies the deprecated ``vllm_importance_sampling_cap`` into
    ``vllm_importance_sampling_clip_max``). GVPO and BNPO (lowmem.trainers) read none of them either."""
    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig) if f.name.startswith("vllm_")}
    return [k for k in sorted(defaults) if k in values and values[k] != defaults[k]]


def refuse_vllm_fields_without_use_vllm(values: Any, prefix: str | None = None) -> None:
    """``vllm_*`` settings away from TRL's default (:func:`changed_vllm_fields`) with ``use_vllm`` off: a ConfigError
    naming each field. The one rule of both routes: ``lowmem train``'s recipe (``values`` its ``training_args`` dict,
    ``prefix="training_args."``, :func:`lowmem.train.check_unavailable_fields`) and the Python API's configs
    (``values`` a ``LowMemGRPOConfig`` / GVPO / BNPO config, named ``<Config>.`` by default). A YAML recipe's ``true``,
    Python's ``True``.

    Raises:
        ValueError: (:class:`lowmem.config.ConfigError`) ``<prefix>vllm_x=<value> ...: vLLM generation settings, which
            need <prefix>use_vllm=True ...``.
    """
    from lowmem.config import ConfigError

    mapping = values if isinstance(values, dict) else vars(values)
    if prefix is None:
        prefix = f"{type(values).__name__}."
    if mapping.get("use_vllm"):
        return
    changed = changed_vllm_fields(mapping)
    if changed:
        true = "true" if prefix == "training_args." else "True"
        raise ConfigError(f"{', '.join(f'{prefix}{k}={mapping[k]!r}' for k in changed)}: vLLM generation settings, which "
                          f"need {prefix}use_vllm={true}: without it TRL generates with transformers and reads none of "
                          f"them; set {prefix}use_vllm={true} (needs the vllm package: pip install 'trl[vllm]') or leave "
                          "them at TRL's defaults")


def refuse_use_vllm_without_vllm(values: Any, prefix: str | None = None) -> None:
    """``use_vllm`` on while the vllm package is not installed (:func:`lowmem.train._vllm_available`, TRL's
    ``is_vllm_available``): a ConfigError naming the field, before any model loads (TRL raised an ``ImportError`` when
    the trainer was built). The one rule of both routes, as :func:`refuse_vllm_fields_without_use_vllm`: ``lowmem
    train``'s recipe (``values`` its ``training_args`` dict, ``prefix="training_args."``,
    :func:`lowmem.train.check_unavailable_fields`) and the Python API's configs (``values`` a ``LowMemGRPOConfig`` /
    GVPO / BNPO config, named ``<Config>.`` by default). A YAML recipe's ``true`` / ``false``, Python's ``True`` /
    ``False``.

    Raises:
        ValueError: (:class:`lowmem.config.ConfigError`) ``<prefix>use_vllm=True needs the vllm package, which is not
            installed: pip install 'trl[vllm]' (or <prefix>use_vllm=False: ...)``.
    """
    import lowmem.train
    from lowmem.config import ConfigError

    mapping = values if isinstance(values, dict) else vars(values)
    if not mapping.get("use_vllm") or lowmem.train._vllm_available():
        return
    if prefix is None:
        prefix = f"{type(values).__name__}."
    true, false = ("true", "false") if prefix == "training_args." else ("True", "False")
    raise ConfigError(f"{prefix}use_vllm={true} needs the vllm package, which is not installed: pip install 'trl[vllm]' "
                      f"(or {prefix}use_vllm={false}: TRL then generates with transformers)")


def refuse_unused_grpo_fields(config: Any, names: tuple[str, ...], method: str, instead: str) -> None:
    """Raise if ``config`` sets any of ``names`` (``GRPOConfig`` fields that ``method`` does not read)
    away from TRL's default: a value that would be silently ignored (no silent fallback).

    Raises:
        ConfigFieldError: Naming each such field, its value and TRL's default, and what ``method`` does ``instead``.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    changed = [n for n in names if getattr(config, n) != defaults[n]]
    if changed:
        raise ConfigFieldError(lambda key: (
            f"{method} does not use "
            + ", ".join(f"{key(n)}={getattr(config, n)!r} (TRL's default {defaults[n]!r})" for n in changed)
            + f": {instead}. Leave {'it' if len(changed) == 1 else 'them'} at the default, or train with GRPO "
            "(LowMemGRPOConfig; lowmem train: trainer: grpo) to use GRPO's loss and advantages"), bare_key)


def freeze_reference(ref_model: Any) -> None:
    """``ref_model.requires_grad_(False)`` (TRL 1.16 leaves a reference it is given or loads trainable). No gradient
    flows into it (TRL runs it under ``torch.no_grad()``), so the loss and the policy's gradients are unchanged; but
    under ``bf16`` / ``fp16`` autocast over float32 weights a trainable leaf weight's half-precision copy is cached
    until the autocast region exits, after the loss: the reference's forward left a copy of all its linear weights
    beside the policy's activations (tiny Llama h=256: 2,899,968 B; Llama-2-7B ~12 GiB). It is put in eval mode too:
    a reference given in train mode (``copy.deepcopy`` of a policy, a model built in memory; TRL's own ``from_pretrained``
    load is already in eval mode) kept its dropout active, so with ``disable_dropout=False`` its log-probabilities,
    the fixed target of the DPO / GRPO KL term, were random (with TRL's default ``disable_dropout=True`` dropout is
    off anyway). The Trainer only switches the policy between train and eval. ``None`` (no reference: PEFT,
    precomputed, ``beta=0``) is a no-op."""
    if ref_model is not None:
        ref_model.requires_grad_(False)
        ref_model.eval()


def check_reference_reloadable(trainer: str, model: Any, alternatives: str) -> None:
    """Refuse, with what to do instead, a policy TRL cannot reload as its reference model.

    When a reference model is needed (DPO without ``ref_model``, GRPO with ``beta != 0``) and no adapter
    stands in for it, TRL builds the reference by loading ``model.config._name_or_path`` again. A model
    built in memory (``AutoModelForCausalLM.from_config``, ``lowmem.kit.build_tiny_model``) has an empty
    path, and TRL failed with ``OSError: Repo id must use alphanumeric chars ...: ''``.

    Raises:
        ValueError: ``model`` is a model instance (not a path, not a PEFT model) with an empty
            ``config._name_or_path``.
    """
    from accelerate.utils import is_peft_model

    if isinstance(model, str) or is_peft_model(model) or not hasattr(model, "config"):
        return
    if getattr(model.config, "_name_or_path", "") in ("", None):
        raise ValueError(
            f"{trainer}: TRL builds the reference model by reloading the policy from model.config._name_or_path, "
            "which is empty: this model was built in memory, not loaded from a directory. Save it first "
            "(model.save_pretrained(path); tokenizer.save_pretrained(path)) and pass model=path, or pass "
            f"peft_config (the reference is then the base model with the adapter disabled), {alternatives}"
        )


def dataset_columns(dataset: Any) -> list[str] | None:
    """The column names of a ``datasets.Dataset`` / ``IterableDataset`` (its first row's keys when its
    features are unknown); `None` for anything else (a torch dataset, ``None``)."""
    columns = getattr(dataset, "column_names", None)
    if columns is None and hasattr(dataset, "features") and hasattr(dataset, "__iter__"):
        first = next(iter(dataset), None)
        columns = list(first) if isinstance(first, dict) else None
    return list(columns) if columns is not None else None


def check_preference_columns(dataset: Any, split: str) -> None:
    """Refuse, before TRL maps it, a DPO dataset without ``chosen`` and ``rejected`` columns (TRL 1.16 fails
    with a bare ``KeyError: 'chosen'`` while preparing it), naming the columns found, DPO's formats and, when
    the columns are an SFT format (``text``, ``messages``, ``prompt`` + ``completion``) or a GRPO one
    (``prompt``), the trainer that takes them. Vision datasets (an ``images`` / ``image`` column), which TRL
    does not prepare, and datasets whose columns are unknown are left to TRL.

    Raises:
        ValueError: ``chosen`` or ``rejected`` missing.
    """
    columns = dataset_columns(dataset)
    if columns is None or {"chosen", "rejected"} <= set(columns) or {"image", "images"} & set(columns):
        return
    from lowmem.data import FORMATS

    hint = ""
    for trainer, cls in (("sft", "LowMemSFTTrainer"), ("grpo", "LowMemGRPOTrainer / GVPOTrainer / BNPOTrainer")):
        fits = [desc for _, cols, desc in FORMATS[trainer] if set(cols) <= set(columns)]
        if fits:
            hint = (f". These columns are {trainer.upper()} data ({fits[0]}): train them with {cls} "
                    f"(lowmem train: trainer: {trainer}), or add 'chosen' and 'rejected' columns for DPO")
            break
    accepted = "; ".join(desc for _, _, desc in FORMATS["dpo"])
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    raise ValueError(f"LowMemDPOTrainer: {split} columns {columns} lack {missing}; DPO trains on preference pairs: "
                     f"{accepted}{hint}")


def check_reward_signatures(reward_funcs: Any, train_dataset: Any, eval_dataset: Any = None) -> None:
    """Check, before the model loads, that each reward function (a Python callable, not a reward model) takes
    the keywords TRL's GRPO calls it with for ``train_dataset``'s columns, and for ``eval_dataset``'s (a dataset or
    a dict of them; TRL scores the eval prompts with the same functions)
    (:func:`lowmem.rewards.check_reward_signature`, what ``lowmem train`` checks): TRL 1.16 called it only
    after the first generation, failing with ``TypeError: ... got an unexpected keyword argument
    'completion_ids'`` (a function without ``**kwargs``) or ``missing ... argument 'answer'`` (a column
    the dataset lacks; an eval set's at the first evaluation, after training steps). Nothing is checked for a
    dataset whose columns are unknown.

    Raises:
        ValueError: Naming the function, what does not fit and the keywords it is called with; for an eval set
            prefixed ``eval_dataset (columns [...]): `` (``eval_dataset['name'] ...`` in a dict), as ``lowmem train``
            words it.
    """
    from torch import nn

    from lowmem.rewards import check_reward_signature

    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [(None, eval_dataset)]
    sets = [(None, train_dataset)] + [("eval_dataset" if key is None else f"eval_dataset[{key!r}]", data)
                                      for key, data in evals if data is not None]
    for split, dataset in sets:
        columns = dataset_columns(dataset)
        if columns is None:
            continue
        for i, fn in enumerate(funcs):
            if callable(fn) and not isinstance(fn, nn.Module):
                try:
                    check_reward_signature(fn, getattr(fn, "__name__", f"reward_funcs[{i}]"), columns)
                except ValueError as err:
                    if split is None:
                        raise
                    raise ValueError(f"{split} (columns {columns}): {err}") from None


def check_reward_weights_count(config: Any, reward_funcs: Any) -> None:
    """Refuse, before any model loads, ``reward_weights`` whose count is not the number of reward functions, as
    ``lowmem train`` refuses it (:func:`lowmem.rewards.validate_reward_fields`). TRL 1.16 checks it in
    ``GRPOTrainer.__init__`` after loading the policy (and any reward model): minutes of loading lost on a typo.

    The rule is :func:`lowmem.rewards.check_reward_weights`, the one ``lowmem train`` runs (named ``<Config>.`` here).

    Raises:
        ValueError: ``<Config>.reward_weights has N entries ([...]) but reward_funcs has M``, or all 0.
    """
    from lowmem.rewards import check_reward_weights

    weights = getattr(config, "reward_weights", None)
    if weights is None:
        return
    funcs = [] if reward_funcs is None else reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    check_reward_weights(weights, len(funcs), prefix=f"{type(config).__name__}.")


def logged_reward_names(reward_funcs: Any) -> list[str]:
    """The names TRL 1.16's ``GRPOTrainer.__init__`` logs ``reward_funcs`` under (``rewards/<name>/mean``), worked
    out before it loads anything: a reward model's path or ``config._name_or_path``, last part; a callable's
    ``__name__`` (through ``functools.partial``), else its class name (trl.trainer.utils.get_callable_name)."""
    from trl.trainer.utils import get_callable_name

    funcs = [] if reward_funcs is None else reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    names = []
    for fn in funcs:
        if isinstance(fn, str):
            names.append(fn.split("/")[-1])
        elif hasattr(fn, "config") and hasattr(fn, "parameters"):  # a reward model instance (nn.Module)
            names.append(str(getattr(fn.config, "_name_or_path", "") or "").split("/")[-1])
        else:
            names.append(get_callable_name(fn))
    return names


def check_kept_columns(config: Any, *datasets: Any) -> None:
    """Refuse ``remove_unused_columns=True`` (the HF Trainer's default, which TRL's ``GRPOConfig`` turns off) on a
    GRPO dataset with columns besides ``prompt``: the Trainer then drops them before TRL calls the reward functions,
    which fail at the first step (``missing 1 required positional argument: 'answer'``, after the model loaded and
    generated) or, taking ``**kwargs``, silently lose them.

    Raises:
        ConfigFieldError: Naming the columns and the fix (``remove_unused_columns=False``).
    """
    if config is None or not getattr(config, "remove_unused_columns", False):
        return
    for dataset in datasets:
        extra = [c for c in (dataset_columns(dataset) or []) if c != "prompt"]
        if extra:
            raise ConfigFieldError(lambda key: (
                f"{key('remove_unused_columns')}=True would drop the dataset's columns {extra} before TRL passes them "
                "to the reward functions as keyword arguments; set remove_unused_columns=False (GRPOConfig's default)"),
                config_key(config))


def check_generation_batch_prompts(config: Any, dataset: Any, key: FieldKey | None = None) -> None:
    """Refuse a training set with fewer prompts than one generation batch samples. TRL 1.16's GRPO (GVPO and BNPO
    too) draws ``generation_batch_size / num_generations`` distinct prompts per generation batch
    (``generation_batch_size``: ``per_device_train_batch_size`` x processes x ``steps_per_generation``, which defaults
    to ``gradient_accumulation_steps``), and its ``RepeatSampler`` drops an incomplete one: with fewer prompts no batch
    is left, and transformers "stopping training at step 0" ended the run with exit status 0, 0 steps and the model
    saved untouched (by epochs: "args.max_steps must be set to a positive value if dataloader does not have a length").
    One rule for ``lowmem train`` (the recipe's keys, through :class:`ConfigFieldError`) and the Python API's trainers
    (``<Config>.<field>``). A dataset without a length (an ``IterableDataset``) or ``config`` values that are not
    integers (the range checks report those) pass.

    Raises:
        ConfigFieldError: Naming the prompt count, what one generation batch needs and the fields that set it.
    """
    if config is None or dataset is None:
        return
    try:
        rows = len(dataset)
    except TypeError:
        return
    batch, groups = getattr(config, "generation_batch_size", None), getattr(config, "num_generations", None)
    per_device, steps = config.per_device_train_batch_size, getattr(config, "steps_per_generation", None)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (batch, groups)):
        return
    need = batch // groups
    if rows >= need:
        return
    processes = getattr(config, "world_size", 1)
    raise ConfigFieldError(lambda k: (
        f"the training set has {rows} prompt{'s' if rows != 1 else ''}, fewer than one generation batch samples: "
        f"{need} distinct prompts (generation_batch_size {batch} = {k('per_device_train_batch_size')}={per_device} x "
        f"{processes} process(es) x steps_per_generation {steps} (default: gradient_accumulation_steps), divided by "
        f"{k('num_generations')}={groups} completions per prompt); TRL's sampler drops an incomplete generation batch, "
        f"so the run would train 0 steps; give at least {need} prompts, or lower {k('per_device_train_batch_size')} / "
        "gradient_accumulation_steps (steps_per_generation)"), key or config_key(config))


def _bound(trainer_cls: type, model: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    return inspect.signature(trainer_cls.__init__).bind(None, model, *args, **kwargs).arguments


class LowMemSFTTrainer(LowMemOptimizerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` building its optimizer from :class:`LowMemSFTConfig`."""


class LowMemDPOTrainer(LowMemOptimizerMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` building its optimizer from :class:`LowMemDPOConfig`.

    ``train_dataset`` / ``eval_dataset`` without ``chosen`` and ``rejected`` columns are refused naming the
    trainer their columns fit (:func:`check_preference_columns`). A model instance built in memory (empty
    ``config._name_or_path``) needs ``ref_model``,
    ``peft_config`` or ``precompute_ref_log_probs=True``: TRL reloads the reference by path
    (:func:`check_reference_reloadable`)."""

    def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
        bound = _bound(DPOTrainer, model, args, kwargs)
        config = bound.get("args")
        if isinstance(bound.get("ref_model"), str):  # TRL 1.16 failed with "'str' object has no attribute 'modules'"
            raise TypeError(
                f"ref_model={bound['ref_model']!r}: TRL's DPOTrainer takes a model instance here, not a path (older TRL "
                "took a path). Load it (AutoModelForCausalLM.from_pretrained(path)), or leave ref_model unset: the "
                "reference is then the initial policy, reloaded from its directory"
            )
        for split in ("train_dataset", "eval_dataset"):
            datasets = bound.get(split)
            for key, data in (datasets.items() if isinstance(datasets, dict) else [(None, datasets)]):
                check_preference_columns(data, split if key is None else f"{split}[{key!r}]")
        if (bound.get("ref_model") is None and bound.get("peft_config") is None
                and not (config is not None and config.precompute_ref_log_probs)):
            check_reference_reloadable("DPO", model, "ref_model=<a copy of the model> (copy.deepcopy(model)), or "
                                       "precompute_ref_log_probs=True (reference log-probabilities computed once, "
                                       "before training)")
        super().__init__(model, *args, **kwargs)
        freeze_reference(self.ref_model)


class LowMemGRPOTrainer(LowMemOptimizerMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` building its optimizer from :class:`LowMemGRPOConfig`.

    With ``beta != 0`` a model instance built in memory (empty ``config._name_or_path``) needs
    ``peft_config``: TRL reloads the reference by path (:func:`check_reference_reloadable`)."""

    _reference_alternative = "or beta=0.0 (no reference model)"

    def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
        bound = _bound(GRPOTrainer, model, args, kwargs)
        config = bound.get("args")
        check_reward_weights_count(config, bound.get("reward_funcs"))
        given = bound.get("reward_funcs")
        distinct_names(logged_reward_names(given))  # a clash of the new names refused before the load
        given = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
        check_reward_signatures(bound.get("reward_funcs"), bound.get("train_dataset"), bound.get("eval_dataset"))
        import os

        from lowmem.rewards import check_reward_model_dir

        for i, func in enumerate(given):  # a local reward-model folder: as lowmem train checks it, before TRL loads it
            if isinstance(func, (str, os.PathLike)) and os.path.isdir(func):
                check_reward_model_dir(func, f"reward_funcs[{i}]")
        check_kept_columns(config, bound.get("train_dataset"), bound.get("eval_dataset"))
        check_generation_batch_prompts(config, bound.get("train_dataset"))  # else 0 steps, exit 0
        if config is not None and bound.get("eval_dataset") is not None:  # evaluate() after training, too
            check_eval_groups(config, config.world_size)
        if config is not None and config.beta != 0.0 and bound.get("peft_config") is None:
            check_reference_reloadable(self._name, model, self._reference_alternative)
        super().__init__(model, *args, **kwargs)
        freeze_reference(self.ref_model)  # GVPO's and BNPO's too (subclasses)
        # reward functions of one name (a factory's inner function, two lambdas) each get their own metric, as in
        # lowmem train: TRL logged one rewards/<name>/mean, the mean of both, and 2N values per N completions
        self.reward_func_names[:len(given)] = distinct_names(self.reward_func_names[:len(given)])
        # the user's functions as given (TRL appends an environment's get_reward, called with its own keywords)
        self._given_reward_funcs = given

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> Any:
        """TRL's, after checking, before anything is generated, that the eval batch holds whole groups
        (:func:`check_eval_groups`) and the reward functions take the columns of an ``eval_dataset`` given here
        (:func:`check_reward_signatures`)."""
        check_eval_groups(self.args, self.args.world_size)
        if eval_dataset is not None and not isinstance(eval_dataset, str):  # one given here: its columns too
            check_reward_signatures(self._given_reward_funcs, None, eval_dataset)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's, with each Python reward function's output checked (:func:`checked_reward_func`): a function that
        returns ``None``, a number, strings or the wrong count, or raises, is a ``ValueError`` naming it; and an
        infinite reward (a function's or a reward model's, in the gathered batch) too (:func:`check_finite_rewards`)."""
        funcs = self.reward_funcs
        self.reward_funcs = [checked_reward_func(f, name) for f, name in zip(funcs, self.reward_func_names)]
        try:
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self.reward_funcs = funcs
        check_finite_rewards(rewards_per_func, self.reward_func_names, self._name)
        return rewards_per_func


def check_finite_rewards(rewards_per_func: Any, names: list[str], method: str = "GRPO") -> None:
    """Refuse an infinite reward in ``rewards_per_func`` (``(completions, functions)``, TRL's float32 rewards of the
    gathered generation batch; NaN is a ``None``, left out of TRL's means, and passes). In GRPO an infinite reward makes
    its group's mean and std inf / NaN, and TRL's ``nan_to_num`` turns the group's advantages (every advantage with
    ``scale_rewards="batch"``) into 0: the step trained nothing on them, the only trace ``reward: inf`` in the log.
    GVPO's loss would be NaN; BNPO's reward is outside any ``reward_range``.

    Raises:
        ValueError: Naming the function (its ``reward_funcs`` index), the value and the completion.
    """
    import torch

    infinite = torch.isinf(rewards_per_func)
    if not infinite.any():
        return
    row, col = infinite.nonzero()[0].tolist()
    raise ValueError(
        f"reward function {names[col]!r} (reward_funcs[{col}]) returned {rewards_per_func[row, col].item()} for "
        f"completion {row} of the generation batch ({int(infinite.sum())} infinite reward(s) in it): {method} needs "
        "finite rewards (a number beyond float32's range, |x| > 3.4e38, is infinite too); return None for a completion "
        "a function does not score")


def checked_reward_func(fn: Any, name: str) -> Any:
    """``fn`` (a reward function TRL's GRPO calls) with its outputs checked as ``lowmem train`` checks them
    (:func:`lowmem.rewards.checked_outputs`): one real number or ``None`` per completion, else a ``ValueError``
    naming the function and what it returned; an exception it raises becomes a ``ValueError`` naming it and its line.
    Before, through the Python API, TRL failed with a bare ``TypeError: 'NoneType' object is not iterable`` (a
    function returning ``None``), ``'float' object is not iterable``, ``too many dimensions 'str'``, or the user's
    exception without the function's name. What TRL accepts is kept: a generator or other iterator is read into a
    list, a 1-D numpy array or tensor passed as a list; ``async`` functions (TRL awaits them) are checked too.
    A reward model (``nn.Module``) is returned as it is.
    """
    import collections.abc
    import functools

    from torch import nn

    from lowmem.rewards import checked_outputs
    from trl.trainer.utils import is_async_callable

    if isinstance(fn, nn.Module):
        return fn

    def listed(out: Any) -> Any:  # TRL iterates what a function returns: an iterator (generator, map) is a list to it
        return list(out) if isinstance(out, collections.abc.Iterator) else out

    if is_async_callable(fn):
        @functools.wraps(fn)
        async def checked_async(*args: Any, **kwargs: Any) -> Any:
            try:
                out = await fn(*args, **kwargs)
            except Exception as err:
                raise ValueError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err
            return checked_outputs(lambda *a, **k: listed(out), name)(*args, **kwargs)

        return checked_async

    @functools.wraps(fn)
    def called(*args: Any, **kwargs: Any) -> Any:
        return listed(fn(*args, **kwargs))

    return checked_outputs(called, name)
