"""The optimizer registry: names to optimizers, and parameter groups built from a model.

``create_optimizer(model, "galore_adamw", rank=64)`` looks the name up, splits the model's
parameters into groups (no weight decay on biases and norm weights, exactly as
``transformers.Trainer`` does; subspace targets are the 2-D weights of the selected linear layers)
and builds the optimizer. Adding an optimizer is one recipe plus one :func:`register` call; the
generic test suite then covers it.
"""

from __future__ import annotations

import difflib

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .._warn import warn_user
from .engine import LowMemOptimizer, Recipe
from .hparams import unknown_key_hints

GROUPING_ARGS = ("target_modules",)
#: ``OptimizerEntry.state_precision``: how the optimizer's moments are stored by default.
STATE_PRECISIONS = ("fp32", "8bit", "4bit", "compressed")
#: ``OptimizerEntry.second_moment``: a full second moment per element, a factored one (row and
#: column statistics, Adafactor), a blockwise one (one value per block of parameters, Adam-mini),
#: or none.
SECOND_MOMENTS = ("full", "factored", "blockwise", "none")
#: What transformers' Trainer passes Adafactor for ``optim="adafactor"`` with its learning rate;
#: :func:`create_optimizer` does the same when ``lr`` is given and ``relative_step`` is not.
EXPLICIT_LR_SETTINGS = {"relative_step": False, "scale_parameter": False}


@dataclass(frozen=True)
class OptimizerEntry:
    """A registered optimizer.

    Attributes:
        name: Registry name.
        summary: One line for ``lowmem list``.
        reference: Paper or source.
        factory: ``factory(params, **hparams) -> torch.optim.Optimizer``.
        recipe: The engine recipe, or ``None`` for optimizers from other libraries (bitsandbytes).
        hparams: Valid hyperparameter names (taken from the recipe when there is one).
        subspace: Whether the optimizer projects 2-D targets (a recipe with a projection).
        target_key: The parameter-group key that marks the targeted group, or ``None``: the 2-D
            weights :func:`create_optimizer` selects (``target_modules``, default every projection
            layer but the output head) get the recipe's per-group hyperparameters (``group_hparams``)
            and this key tells the optimizer they are targeted (``"rank"`` for subspace recipes,
            ``"use_muon"`` for Muon). ``target_modules`` applies when it is set.
        embedding_groups: Group settings for the model's input embedding (``"input"``) and output
            head (``"output"``) weights, each put in a group of its own by :func:`create_optimizer`
            (SCALE's column normalisation of the embedding, momentum on the head); empty: they
            join the other parameters.
        batched_targets: Whether the targeted group also takes the trainable weights of more than two
            dimensions (fused MoE experts ``[E, A, B]``, batches of matrices; not the embeddings), chosen by
            ``target_modules`` on the parameter's or its module's name (default: all): Muon, SinkGD, SCALE and the
            subspace / Subset-Norm recipes, which step each ``A x B`` matrix of ``[..., A, B]`` as a 2-D weight.
        generic_tests: Whether the generic suite covers it (CPU-capable, engine-based).
        example_hparams: Settings the generic tests use.
        state_precision: How the moments are stored by default, one of :data:`STATE_PRECISIONS`:
            ``"fp32"``, ``"8bit"`` / ``"4bit"`` (blockwise-quantized codes), ``"compressed"``
            (MicroAdam's sparse window with 4-bit error feedback). The memory search prices what an
            optimizer gives up from this, never from its name.
        second_moment: ``"full"``, ``"factored"`` (Adafactor's row and column statistics),
            ``"blockwise"`` (one value per block, Adam-mini) or ``"none"`` (:data:`SECOND_MOMENTS`).
        second_moment_words: How the budget search names what a ``"factored"`` / ``"blockwise"`` / ``"none"``
            second moment gives up, where the form's own words (``"factored second moment"``, ...) would misname
            it (RACS: ``"row/column scaling, not per element"``); ``None``: the form's words. Priced from
            ``second_moment`` alone either way; refused with ``"full"`` (nothing given up to name); unused for a
            subspace optimizer (named by its rank).
        group_builder: ``group_builder(model, **hparams) -> parameter groups``, or ``None``: how
            :func:`create_optimizer` splits a model for an optimizer whose groups need more than
            the weight-decay rule (Adam-mini's partition into blocks, from parameter names and the
            model's head size). ``None``: :func:`build_param_groups`.
    """

    name: str
    summary: str
    reference: str
    factory: Callable[..., torch.optim.Optimizer] = field(repr=False)
    recipe: Recipe | None = None
    hparams: tuple[str, ...] = ()
    subspace: bool = False
    generic_tests: bool = True
    example_hparams: dict[str, Any] = field(default_factory=dict)
    state_precision: str | None = None
    second_moment: str | None = None
    second_moment_words: str | None = None
    group_builder: Callable[..., list[dict[str, Any]]] | None = field(default=None, repr=False)
    target_key: str | None = None
    embedding_groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    batched_targets: bool = False

    def valid_hparams(self) -> list[str]:
        names = list(self.recipe.all_hparams()) if self.recipe is not None else list(self.hparams)
        if self.target_key is not None:
            names += list(GROUPING_ARGS)
        return sorted(names)


_REGISTRY: dict[str, OptimizerEntry] = {}


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register(
    recipe_or_name: Recipe | str,
    cls: Callable[..., torch.optim.Optimizer] | None = None,
    *,
    summary: str | None = None,
    reference: str | None = None,
    hparams: Iterable[str] = (),
    generic_tests: bool = True,
    example_hparams: dict[str, Any] | None = None,
    state_precision: str | None = None,
    second_moment: str | None = None,
    second_moment_words: str | None = None,
    group_builder: Callable[..., list[dict[str, Any]]] | None = None,
    target_key: str | None = None,
    embedding_groups: dict[str, dict[str, Any]] | None = None,
    batched_targets: bool = False,
) -> OptimizerEntry:
    """Register an engine recipe (optionally with its named class) or an external optimizer.

    ``state_precision`` (:data:`STATE_PRECISIONS`) and ``second_moment`` (:data:`SECOND_MOMENTS`)
    describe the state for the memory search; every built-in registration sets them (tested), and
    the search refuses an optimizer without them (``second_moment_words``, optional: the search's words for the
    latter, :class:`OptimizerEntry`). ``target_key`` (default ``"rank"`` for a recipe
    with a projection) and ``embedding_groups``: see :class:`OptimizerEntry`.

    ``group_builder``: see :class:`OptimizerEntry`.

    Raises:
        ValueError: A name registered twice, or metadata outside its valid values.
    """
    for key, value, valid in (("state_precision", state_precision, STATE_PRECISIONS),
                              ("second_moment", second_moment, SECOND_MOMENTS)):
        if value is not None and value not in valid:
            raise ValueError(f"register: {key}={value!r} is not one of {list(valid)}")
    if second_moment_words is not None and (second_moment in (None, "full") or not isinstance(second_moment_words, str)
                                            or not second_moment_words.strip()):
        raise ValueError(f"register: second_moment_words={second_moment_words!r} needs a non-empty string and "
                         f"second_moment one of ['factored', 'blockwise', 'none'], got {second_moment!r}")
    meta = {"state_precision": state_precision, "second_moment": second_moment, "second_moment_words": second_moment_words}
    if embedding_groups is not None and set(embedding_groups) - {"input", "output"}:
        raise ValueError(f"register: embedding_groups keys must be 'input' / 'output', got {sorted(embedding_groups)}")
    if isinstance(recipe_or_name, Recipe):
        recipe = recipe_or_name
        if target_key is None and recipe.projection is not None:
            target_key = "rank"
        if target_key is not None and target_key not in {h.name for h in recipe.group_hparams}:
            raise ValueError(f"register: target_key={target_key!r} is not a group hyperparameter of recipe '{recipe.name}'")
        factory = cls if cls is not None else (lambda params, **kw: LowMemOptimizer(params, recipe, **kw))
        entry = OptimizerEntry(
            name=_canonical(recipe.name), summary=summary or recipe.summary, reference=reference or recipe.reference,
            factory=factory, recipe=recipe, subspace=recipe.projection is not None, generic_tests=generic_tests,
            example_hparams=dict(example_hparams or {}), target_key=target_key,
            embedding_groups={k: dict(v) for k, v in (embedding_groups or {}).items()}, batched_targets=batched_targets,
            **meta,
        )
    else:
        if cls is None:
            raise TypeError("register(name, cls) needs the optimizer class or factory")
        entry = OptimizerEntry(
            name=_canonical(recipe_or_name), summary=summary or "", reference=reference or "", factory=cls,
            hparams=tuple(hparams), generic_tests=generic_tests, example_hparams=dict(example_hparams or {}), **meta,
        )
    if group_builder is not None:
        entry = replace(entry, group_builder=group_builder)
    if entry.name in _REGISTRY:
        raise ValueError(f"optimizer {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def get_entry(name: str) -> OptimizerEntry:
    key = _canonical(name)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, sorted(_REGISTRY), n=3)
        raise ValueError(f"Unknown optimizer {name!r}" + (f" (did you mean {close}?)" if close else "")
                         + f"; valid: {sorted(_REGISTRY)}")
    return _REGISTRY[key]


def list_optimizers() -> list[str]:
    """Names of all registered optimizers, sorted (each one a valid ``name`` for
    :func:`create_optimizer`). Their entries: :func:`optimizer_entries`."""
    return sorted(_REGISTRY)


def optimizer_entries() -> list[OptimizerEntry]:
    """The :class:`OptimizerEntry` of every registered optimizer, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


# ---- parameter groups from a model ----------------------------------------------------------


# transformers' Trainer.get_decay_parameter_names (transformers 5.x): parameters inside an nn.LayerNorm
# (ALL_LAYERNORM_LAYERS), or whose lower-cased dotted name matches one of these, get no weight decay
NO_DECAY_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm,)
NO_DECAY_NAME_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
)


def _decay_names(module: nn.Module) -> list[str]:
    """``transformers.trainer_pt_utils.get_parameter_names(module, [nn.LayerNorm], patterns)``: recursive
    over ``named_children``, each child's names checked (prefixed, lower-cased) against the patterns at
    every level, a child that is a norm layer contributing nothing; the module's own parameters are
    checked by name only."""
    out = []
    for child_name, child in module.named_children():
        if isinstance(child, NO_DECAY_LAYER_TYPES):
            continue
        for n in _decay_names(child):
            full = f"{child_name}.{n}"
            if not any(p.search(full.lower()) for p in NO_DECAY_NAME_PATTERNS):
                out.append(full)
    out += [k for k in module._parameters if not any(p.search(k.lower()) for p in NO_DECAY_NAME_PATTERNS)]
    return out


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that get weight decay: everything but biases and norm weights.

    The rule of ``transformers.Trainer.get_decay_parameter_names``, written here so that the core
    optimizers do not import transformers (tested equal to the Trainer's on Llama, Qwen2, GPT-2, a
    LoRA model and plain modules): no decay for parameters of ``nn.LayerNorm`` modules, nor for names
    that contain ``bias``, ``layernorm`` or ``rmsnorm``, or a ``norm`` / ``*_norm`` component
    (lower-cased; ``model.norm.weight``, ``q_norm.weight``).
    """
    return set(_decay_names(model))


def _matches(module_name: str, targets: str | Iterable[str] | Callable[[str], bool]) -> bool:
    """peft's convention: a string is a regex matched against the full name; a list matches by
    exact name or by suffix after a dot. A callable decides by itself (the Trainer integration
    passes ``TrainingArguments.optim_target_modules`` with transformers' matching rules)."""
    if callable(targets):
        return bool(targets(module_name))
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def is_projection_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a 2-D projection layer whose weight a subspace optimizer can project:
    ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2-family models; its weight is stored
    transposed, ``[in, out]``: a projection handles it like any matrix, and the rules that read rows as
    output neurons read its columns, :data:`LAYOUT_AWARE`). Conv1D is recognised by its class, without
    importing transformers, among the classes the module's class derives from (FSDP2's ``fully_shard`` of the layer
    itself makes it an ``FSDPConv1D`` subclass)."""
    if isinstance(module, nn.Linear):
        return True
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in type(module).__mro__)


def embedding_param_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter that belongs to the input embedding or the output head of ``model``
    (``get_input_embeddings()`` / ``get_output_embeddings()``): the module's ``weight`` (a tied head is
    the embedding's weight) and every parameter inside the module. peft wraps a module named in
    ``modules_to_save`` (``ModulesToSaveWrapper``: ``original_module`` frozen, the trainable copy in
    ``modules_to_save.<adapter>``, a different ``nn.Linear`` whose weight the wrapper's ``weight``
    returns) and a LoRA-targeted head (``lora.Linear``: ``base_layer``, ``lora_A`` / ``lora_B``); every
    one of these is the head's and none is a hidden matrix (Jordan et al., Muon: embedding and head
    use AdamW; GaLore projects the hidden layers only)."""
    out: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            mod = fn() if callable(fn) else None
        except NotImplementedError:  # transformers' default for a model without one
            mod = None
        if not isinstance(mod, nn.Module):
            continue
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            out.add(id(w))
        out.update(id(p) for p in mod.parameters())
    return out


def subspace_target_names(model: nn.Module, target_modules: str | Iterable[str] | Callable[[str], bool] | None = None) -> list[str]:
    """Names of the 2-D weights to project.

    Default: the weights of every projection layer (:func:`is_projection_layer`: ``nn.Linear`` and
    transformers' ``Conv1D``) except the output head and the input embedding, with everything inside
    them (:func:`embedding_param_ids`: peft's ``modules_to_save`` copy of ``lm_head``, LoRA factors on
    the head, a weight tied to either); embeddings are not projection layers anyway. ``target_modules``
    selects modules by peft's rules instead (or a predicate on the module name); it never selects the
    head.
    """
    skip = embedding_param_ids(model)
    names = []
    for mod_name, mod in model.named_modules():
        if not is_projection_layer(mod) or mod.weight is None or not mod.weight.requires_grad or id(mod.weight) in skip:
            continue
        if target_modules is not None and not _matches(mod_name, target_modules):
            continue
        names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


def batched_target_names(model: nn.Module, target_modules: str | Iterable[str] | Callable[[str], bool] | None = None
                         ) -> list[str]:
    """Names of the trainable weights of more than two dimensions (fused MoE experts: transformers 5.x
    ``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``), the input and output embeddings
    excluded, that ``target_modules`` selects by peft's rules on the parameter's name or its module's
    (default: all). Convolution kernels (``nn.Conv1d`` / ``2d`` / ``3d``: a vision tower's patch embedding,
    a Mamba layer's depthwise ``conv1d``) are not batches of matrices and are excluded too: their
    ``[out, in, k...]`` is one linear map of ``in x k...`` inputs (Keller Jordan's Muon flattens it)."""
    skip = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.modules.conv._ConvNd)}
    skip |= embedding_param_ids(model)
    names = []
    for name, p in model.named_parameters():
        if p.dim() <= 2 or not p.requires_grad or id(p) in skip:
            continue
        if target_modules is not None and not (_matches(name, target_modules)
                                               or _matches(name.rpartition(".")[0], target_modules)):
            continue
        names.append(name)
    return names


def _batched_names() -> list[str]:
    """The registered optimizers that step weights of more than two dimensions per matrix (``batched_targets``)."""
    return sorted(n for n, e in _REGISTRY.items() if e.batched_targets)


def target_modules_hint(model: nn.Module, target_modules: Any, batched_targets: bool = False) -> str:
    """Why ``target_modules`` selected nothing, when it can tell: a string naming layers by their
    short name (peft's rule for a string is one regular expression matched against each module's
    full name: ``"q_proj"`` matches no ``model.layers.0.self_attn.q_proj``), or a selection of weights
    of 3 or more dimensions (fused MoE experts) that this optimizer does not target. ``""`` otherwise."""
    hint = ""
    if isinstance(target_modules, str) and "." not in target_modules.replace(".*", "") and any(
            n.rsplit(".", 1)[-1] == target_modules for n, _ in model.named_modules()):
        hint += (f"; a string is one regular expression matched against each module's full name (peft's rule): "
                 f"write '.*{target_modules}' or the list ['{target_modules}']")
    if not batched_targets and not callable(target_modules):
        big = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.dim() >= 3 and p.requires_grad
               and (_matches(n, target_modules) or _matches(n.rpartition(".")[0], target_modules))]
        if not big and isinstance(target_modules, str):  # what the same name in a list would select
            big = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.dim() >= 3 and p.requires_grad
                   and (_matches(n, [target_modules]) or _matches(n.rpartition(".")[0], [target_modules]))]
        if big:
            hint += (f"; {target_modules!r} names {len(big)} weight(s) of 3 or more dimensions (e.g. {big[0][0]} {list(big[0][1])}, "
                     f"fused MoE experts), which this optimizer does not project or normalize (it targets 2-D "
                     f"nn.Linear / Conv1D weights; {', '.join(_batched_names())} step such weights per matrix)")
    return hint


def build_param_groups(
    model: nn.Module,
    weight_decay: float | None = None,
    subspace: bool = False,
    target_modules: str | Iterable[str] | Callable[[str], bool] | None = None,
    subspace_hparams: dict[str, Any] | None = None,
    embedding_groups: dict[str, dict[str, Any]] | None = None,
    batched_targets: bool = False,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into optimizer groups.

    Returns up to three groups: projected (targeted) 2-D weights (carrying ``subspace_hparams``,
    e.g. ``rank`` or ``use_muon``), other parameters with weight decay, parameters without (biases,
    norm weights). ``embedding_groups`` (``{"input": settings, "output": settings}``) first puts the
    weight of ``model.get_input_embeddings()`` / ``get_output_embeddings()`` in a group of its own
    with those settings (a tied weight goes with the input embedding). Tied parameters appear once.
    Empty groups are omitted. ``batched_targets``: the targeted group also takes the trainable weights of
    more than two dimensions (:func:`batched_target_names`).
    """
    decay = decay_parameter_names(model)
    targets = set(subspace_target_names(model, target_modules)) if subspace else set()
    if subspace and batched_targets:
        targets |= set(batched_target_names(model, target_modules))
    if subspace and target_modules is not None and not targets:
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer of the model"
                         + target_modules_hint(model, target_modules, batched_targets))
    if subspace and not targets:
        warn_user(
            f"the optimizer found no trainable projection layer (nn.Linear or transformers' Conv1D, "
            f"output head excluded) to target in {type(model).__name__}: no parameter gets the targeted"
            " treatment (a subspace recipe trains every parameter full-rank, with full-size state; Muon,"
            " SCALE and SinkGD train them all with AdamW); pass target_modules to choose the layers",
        )
    projected, decayed, plain, seen = [], [], [], set()
    special: list[dict[str, Any]] = []
    for side, settings in (embedding_groups or {}).items():
        getter = getattr(model, "get_input_embeddings" if side == "input" else "get_output_embeddings", None)
        mod = getter() if getter is not None else None
        w = getattr(mod, "weight", None) if mod is not None else None
        if w is None or not w.requires_grad or id(w) in seen:
            continue
        seen.add(id(w))
        name = next(n for n, q in model.named_parameters() if q is w)
        wd_w = ({} if weight_decay is None else {"weight_decay": weight_decay}) if name in decay else {"weight_decay": 0.0}
        special.append({"params": [w], **wd_w, **settings})
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if name in targets:
            projected.append(p)
        elif name in decay:
            decayed.append(p)
        else:
            plain.append(p)
    wd = {} if weight_decay is None else {"weight_decay": weight_decay}
    groups = []
    if projected:
        groups.append({"params": projected, **wd, **(subspace_hparams or {})})
    if decayed:
        groups.append({"params": decayed, **wd})
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    groups += special
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def embedding_weights(model: nn.Module) -> list[nn.Parameter]:
    """The trainable ``weight`` of every ``nn.Embedding`` in ``model`` (once each, a tied one too): the tensors whose
    state transformers' Trainer keeps 32-bit for its bitsandbytes 8-bit optimizers (``Trainer.create_optimizer``:
    ``GlobalOptimManager.register_module_override(module, "weight", {"optim_bits": 32})``)."""
    out, seen = [], set()
    for mod in model.modules():
        w = getattr(mod, "weight", None) if isinstance(mod, nn.Embedding) else None
        if isinstance(w, torch.Tensor) and w.requires_grad and id(w) not in seen:
            seen.add(id(w))
            out.append(w)
    return out


def full_precision_embedding_groups(model: nn.Module, name: str, **hparams: Any) -> list[dict[str, Any]]:
    """:func:`create_optimizer`'s parameter groups for ``model`` with every ``nn.Embedding`` weight
    (:func:`embedding_weights`) moved to a group of its own (its former group's settings) whose ``min_quant_size``
    is one more than its size: the engine's 8-bit recipe keeps that weight's state float32, as transformers' Trainer
    does for the bitsandbytes 8-bit optimizers its ``optim`` names build. The other groups are unchanged.

    Raises:
        ValueError: ``name`` has no per-group ``min_quant_size`` it decides quantization by, or builds its groups its
            own way (a targeted / subspace recipe, a ``group_builder``).
    """
    entry = get_entry(name)
    if (entry.recipe is None or "min_quant_size" not in entry.valid_hparams() or entry.target_key is not None
            or entry.group_builder is not None):
        raise ValueError(f"optimizer '{entry.name}' cannot keep the embeddings' state float32 by a group's "
                         "min_quant_size (an engine 8-bit recipe with whole-model groups: lion8bit, adamw8bit, ...)")
    groups = build_param_groups(model, weight_decay=hparams.get("weight_decay"),
                                embedding_groups=entry.embedding_groups, batched_targets=entry.batched_targets)
    embeds = {id(w): w for w in embedding_weights(model)}
    out: list[dict[str, Any]] = []
    for g in groups:
        kept = [p for p in g["params"] if id(p) not in embeds]
        if kept:
            out.append({**g, "params": kept})
        for p in g["params"]:
            if id(p) in embeds:
                out.append({**g, "params": [p], "min_quant_size": p.numel() + 1})
    return out


def create_optimizer(model_or_params: nn.Module | Iterable[Any], name: str, **hparams: Any) -> torch.optim.Optimizer:
    """Build a registered optimizer by name.

    Args:
        model_or_params: A module (groups are built from it, see :func:`build_param_groups`, or by
            the entry's ``group_builder``) or
            parameters / parameter groups (used as given).
        name: A name from :func:`list_optimizers` (case-insensitive, ``-`` and ``_`` alike).
        **hparams: The optimizer's hyperparameters, plus ``target_modules`` for recipes with a
            targeted group (:attr:`OptimizerEntry.target_key`: subspace recipes, Muon, ...).
            Per-group hyperparameters (``rank``, ``update_proj_gap``, ``use_muon``, ...) go to the
            targeted group; a flat parameter list becomes one targeted group. Groups given as dicts
            take them where they lack their own, except the target key itself when some group sets
            it and it was not passed here: then, as in galore-torch, a group without ``rank`` (or
            ``use_muon``, ...) is the untargeted one (``[{"params": proj, "rank": 64}, {"params":
            rest}]`` projects ``proj`` only; before, ``rest`` took the default rank 128).
            For recipes with a relative step size (Adafactor, GaLore-Adafactor), an explicit ``lr``
            without ``relative_step`` means what it means to transformers' Trainer
            (``optim="adafactor"``): ``relative_step=False, scale_parameter=False``
            (:data:`EXPLICIT_LR_SETTINGS`; each unless given). ``relative_step=True`` with an ``lr``
            stays an error, as in transformers.

    Raises:
        ValueError: Unknown name or hyperparameter (the message lists the valid ones), or an
            invalid value; a group given with ``rank`` / ``use_muon`` / ``use_sinkgd`` on parameters of fewer than
            2 dimensions only (:func:`refuse_vector_only_targets`).

    A model's transformers ``Conv1D`` weights (``[in, out]``) targeted by muon, normuon or scale go to a group of
    their own with ``weight_layout="in_out"`` (:data:`LAYOUT_AWARE`); a parameter list given directly says the
    layout by its groups' ``weight_layout`` (default ``"out_in"``, nn.Linear's).
    """
    entry = get_entry(name)
    valid = entry.valid_hparams()
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        hints = unknown_key_hints(unknown, list(valid))
        raise ValueError(f"Unknown hyperparameter(s) {unknown} for optimizer '{entry.name}'"
                         + (f" (did you mean {', '.join(hints)}?)" if hints else "") + f"; valid: {valid}")
    hparams = dict(hparams)
    targeted = entry.target_key is not None
    target_given = targeted and hparams.get(entry.target_key) is not None  # (before the defaults fill it in)
    if hparams.get("lr") is not None and "relative_step" not in hparams:
        hparams.update({k: v for k, v in EXPLICIT_LR_SETTINGS.items() if k in valid and k not in hparams})
    target_modules = hparams.pop("target_modules", None)
    group_only: dict[str, Any] = {}
    if entry.recipe is not None:
        group_names = {h.name: h for h in entry.recipe.group_hparams}
        given = {k for k in group_names if k in hparams}
        group_only = {h.name: hparams.pop(h.name, h.default) for h in group_names.values()}
        if "weight_layout" in group_only and "weight_layout" not in given:  # (LAYOUT_AWARE: only where it is given,
            del group_only["weight_layout"]  # so a group without it, nn.Linear's default, is the one saved before)
        if "weight_layout" in given and isinstance(model_or_params, nn.Module):
            raise ValueError(f"weight_layout is set per layer by create_optimizer(model, '{entry.name}'): "
                             "transformers' Conv1D weights 'in_out', the others 'out_in'; pass parameter groups to "
                             "set it yourself")
        for k, v in group_only.items():
            # a default of None is "not set"; a None the caller gives is a value like any other: a setting
            # whose valid values exclude it (fira's gamma, proj_type, update_proj_gap, ...) is an error naming
            # it here, not a TypeError in the middle of a step or a silent default (moment_policy=None)
            if v is not None or k in given:
                group_names[k].validate(v, where=f"optimizer '{entry.name}'")
    if entry.group_builder is not None and isinstance(model_or_params, nn.Module):
        # the optimizer partitions the model itself (Adam-mini: blocks from names and the head size)
        return entry.factory(entry.group_builder(model_or_params, **hparams), **hparams)
    if isinstance(model_or_params, nn.Module):
        # weight_decay=None: decayed groups inherit the optimizer's default; biases/norms get 0
        params = build_param_groups(
            model_or_params, weight_decay=hparams.get("weight_decay"), subspace=targeted, target_modules=target_modules,
            subspace_hparams=group_only, embedding_groups=entry.embedding_groups,
            batched_targets=entry.batched_targets,
        )
        if entry.name in LAYOUT_AWARE:  # (Conv1D weights [in, out]: a group of their own, weight_layout="in_out")
            params = split_transposed_layouts(model_or_params, params, entry.target_key)
        return entry.factory(params, **hparams)
    else:
        if target_modules is not None:
            raise ValueError("target_modules needs a model (nn.Module), not a parameter list")
        params = list(model_or_params)
        if targeted and params and isinstance(params[0], dict):
            params = refuse_vector_only_targets(params, entry.target_key)
        if targeted and group_only.get(entry.target_key) is not None:
            fills = target_given or takes_the_default(params, entry.target_key)
            params = _apply_group_defaults(params, group_only, entry.target_key, target_given)
            opt = entry.factory(params, **hparams)
            if fills and hasattr(opt, "target_default"):  # a group added later takes it too (Muon, SinkGD, SCALE)
                opt.target_default = {entry.target_key: group_only[entry.target_key]}
            return opt
    return entry.factory(params, **hparams)


LAYOUT_AWARE = ("muon", "normuon", "scale")
"""The optimizers whose rule depends on which side of a 2-D weight is its output (Muon's ``adjust_lr_fn='original'``
ratio ``sqrt(max(1, out / in))``, NorMuon's per-output-neuron second moment, Li et al. 2025 Algorithm 1, SCALE's
per-output-unit normalization, Glentis et al. 2025): :func:`create_optimizer` (model) puts the targeted transformers
``Conv1D`` weights (``[in, out]``) in a group of their own with ``weight_layout="in_out"``
(:func:`split_transposed_layouts`), which the rules read, so that such a layer steps as its nn.Linear twin
``[out, in]`` would, transposed (tests/test_conv1d_layout21.py; until 2026-12-02 they were refused on such weights,
AUDQLORA19 2). Every other rule is symmetric in rows and columns, or nearly (tests/test_fixmodels19_conv1d.py)."""


def conv1d_weights(model: nn.Module) -> dict[int, tuple[str, tuple[int, ...]]]:
    """``id(weight) -> (module name, shape)`` of every transformers ``Conv1D`` in ``model`` (GPT-2-family models): a
    weight stored transposed, ``[in, out]`` (:func:`is_projection_layer`)."""
    return {id(mod.weight): (name, tuple(mod.weight.shape)) for name, mod in model.named_modules()
            if not isinstance(mod, nn.Linear) and is_projection_layer(mod) and isinstance(mod.weight, torch.Tensor)}


def split_transposed_layouts(model: nn.Module, groups: list[dict[str, Any]], target_key: str) -> list[dict[str, Any]]:
    """``groups`` with the ``Conv1D`` weights (:func:`conv1d_weights`, 2-D) of every group that sets ``target_key``
    moved to a copy of that group with ``weight_layout="in_out"`` (placed right after it; a group left empty is
    dropped). :data:`LAYOUT_AWARE`."""
    conv = conv1d_weights(model)
    out: list[dict[str, Any]] = []
    for g in groups:
        moved = [p for p in g["params"] if id(p) in conv and p.dim() == 2] if g.get(target_key) else []
        if not moved:
            out.append(g)
            continue
        kept = [p for p in g["params"] if not any(p is q for q in moved)]
        if kept:
            out.append({**g, "params": kept})
        out.append({**g, "params": moved, "weight_layout": "in_out"})
    return out


MATRIX_TARGET_KEYS = ("rank", "use_muon", "use_sinkgd")
"""Target keys (:attr:`OptimizerEntry.target_key`) whose rule applies to parameters of 2 or more dimensions only
(projection, orthogonalization, Sinkhorn normalization): a group setting one on 1-D parameters only would step AdamW."""


def refuse_vector_only_targets(groups: list[Any], target_key: str, first: int = 0) -> list[Any]:
    """Refuse a parameter group the caller gave with ``target_key`` set (``rank``, ``use_muon``, ``use_sinkgd``:
    :data:`MATRIX_TARGET_KEYS`) whose parameters all have fewer than 2 dimensions: nothing in it can be projected
    or orthogonalized, so it would silently step AdamW (SILENT 12 / 13). Checked on the caller's groups, before
    :func:`_apply_group_defaults` fills the key in: a flat list of vectors (which takes the default) stays valid.
    ``first``: the index of the first group in the optimizer (named in the message). Returns the groups, each group's
    ``params`` made a list (a generator is read once; a set is left to torch's error)."""
    if target_key not in MATRIX_TARGET_KEYS:
        return groups
    out = []
    for i, g in enumerate(groups, start=first):
        if isinstance(g, dict) and "params" in g and not isinstance(g["params"], (set, frozenset)):
            ps = g["params"]
            g = {**g, "params": [ps] if isinstance(ps, torch.Tensor) else list(ps)}
            v = g.get(target_key)
            if v not in (None, False) and g["params"] and all(p.dim() < 2 for p in g["params"]):
                shapes = [tuple(p.shape) for p in g["params"]]
                what = "project" if target_key == "rank" else "orthogonalize" if target_key == "use_muon" else "normalize"
                raise ValueError(
                    f"parameter group {i}: {target_key}={v!r} on parameters of fewer than 2 dimensions only "
                    f"{shapes[:4]}{' ...' if len(shapes) > 4 else ''}: nothing to {what}, the group would step AdamW; "
                    f"drop {target_key} from this group (or give it the matrices)")
        out.append(g)
    return out


def takes_the_default(params: list[Any], target_key: str) -> bool:
    """Whether parameters given as ``params`` take the default of ``target_key``: a flat list, or dict groups
    none of which sets it (:func:`_apply_group_defaults`; the classes' ``flat_as_targeted``)."""
    return bool(params) and (not isinstance(params[0], dict) or not any(target_key in g for g in params))


def _apply_group_defaults(params: list[Any], group_only: dict[str, Any], target_key: str,
                          target_given: bool) -> list[dict[str, Any]]:
    """Per-group defaults for parameters given as a list: a flat list is one targeted group of them all;
    dict groups take the defaults they lack, except that when some group sets ``target_key`` itself
    (and the caller did not pass it) the groups without it stay untargeted (galore-torch's rule)."""
    if not params:  # torch's "optimizer got an empty parameter list", not a group that trains nothing
        return params
    if isinstance(params[0], dict):
        marked = not target_given and any(target_key in g for g in params)
        return [g if marked and target_key not in g else {**group_only, **g} for g in params]
    return [{"params": params, **group_only}]


def bytes_per_param(name: str, shape: tuple[int, ...] = (4096, 4096), **hparams: Any) -> float:
    """Optimizer-state bytes per parameter for one weight of ``shape``, computed by the optimizer
    itself on the meta device (nothing is allocated): ``state_bytes() / numel``."""
    entry = get_entry(name)
    if entry.recipe is None:
        raise ValueError(f"{name!r} is not an engine optimizer; its state cannot be sized on the meta device")
    p = nn.Parameter(torch.empty(shape, device="meta"))
    opt = create_optimizer([p], name, **hparams)
    opt.materialize_state()
    # the step counter is bookkeeping shared by every optimizer; count the tensors that scale
    return (opt.state_bytes() - 4) / p.numel()
