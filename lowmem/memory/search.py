"""Search the configurations that fit a memory budget, ranked by what they give up.

Each candidate is a point of: optimizer (and rank for subspace recipes), LoRA rank, 8-bit or 4-bit
base weights, gradient checkpointing, layerwise stepping, and batch size. Weights, gradients and
optimizer state are estimated once per (optimizer, rank, LoRA, quantization, layerwise) without
allocating anything, the optimizer itself sized once per :func:`~lowmem.memory.estimate.sizing_key`
(inside :func:`~lowmem.memory.estimate.sizing_cache`: layerwise and quantized variants share it);
activations for every batch size and checkpointing choice come from the same activation model, so
the search is a few seconds per optimizer even for 70B shapes.

What a configuration gives up (``cost``; lower is better, ties prefer larger batches):

=======================================  ====  =============================================
choice                                   cost  what is given up
=======================================  ====  =============================================
AdamW, full fine-tuning                  0     nothing (the reference)
8-bit / compressed optimizer states      1     state precision
Adafactor (factored second moment)       1.5   per-element second moment
RACS / SM3 (row and column statistics)   1.5   per-element second moment
Adam-mini (blockwise second moment)      1.5   per-element second moment
layerwise stepping                       0.5   gradient accumulation and clipping over the model
gradient checkpointing                   1     ~30% more compute (one extra forward)
subspace optimizer (GaLore...), rank r   2 + log2(h/ (4 r))/2   full-rank moments
LoRA rank r                              3 + log2(64 / r)/2     full-rank updates
8-bit base weights (LLM.int8)            0.75  weight precision, less than 4 bits (on top of LoRA)
4-bit base weights (QLoRA)               1.5   weight precision (on top of LoRA)
batch below the requested one            log2(requested / batch) throughput per step
=======================================  ====  =============================================

A full fine-tuning candidate of bfloat16 weights (``dtype="bf16"``, no float32 master copy) also lists
:data:`BF16_ROUNDING_NOTE` among what it gives up, unpriced, unless its ``optim_args`` turn on
``bf16_stochastic_round`` or ``kahan_summation`` (:data:`BF16_ROUNDING_OPTIONS`): each write-back rounds the
weight to nearest, losing updates below half a bfloat16 ulp (docs/optimizers.md, "Pure-bfloat16 training").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from .estimate import MemoryEstimate, check_device, check_max_grad_norm, estimate_memory, peak_total, resolve_config, sizing_cache

COSTS = {"optimizer_8bit": 1.0, "optimizer_4bit": 1.25, "adafactor": 1.5, "no_second_moment": 1.5, "layerwise": 0.5,
         "checkpointing": 1.0, "quantization": 1.5, "quantization_int8": 0.75}


def quantization_cost(quantization: str | None) -> float:
    """What a LoRA candidate's base weights give up: none 0, ``"int8"`` ``COSTS["quantization_int8"]`` (8 bits a
    weight, LLM.int8's outlier columns in 16 bits), 4-bit (``"nf4"`` / ``"fp4"``) ``COSTS["quantization"]``."""
    if not quantization:
        return 0.0
    return COSTS["quantization_int8"] if str(quantization).lower() == "int8" else COSTS["quantization"]


class SearchResult(list):
    """:func:`search_budget`'s candidates (a list, best first) and ``smallest``: the :class:`Candidate` of least total
    among those the search computed at batch 1, fitting or not. When nothing fits every configuration was computed at
    batch 1 with each checkpointing choice, so it is the smallest configuration, and "nothing fits" says how much it
    needs (when something fits, a configuration that fits at a larger batch is not computed at batch 1)."""

    smallest: "Candidate | None" = None


@dataclass
class Candidate:
    """One configuration that fits: its settings, estimated bytes by component and total, and cost."""

    settings: dict[str, Any]
    components: dict[str, int]
    total: int
    cost: float
    gives_up: list[str] = field(default_factory=list)
    #: :func:`~lowmem.memory.estimate.peak_total`'s other arguments for ``components`` (``MemoryEstimate.peak_args``)
    peak_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "components": self.components, "total": self.total, "cost": round(self.cost, 3), "gives_up": self.gives_up}


#: Forms :func:`parse_bytes` accepts (binary GiB/MiB/KiB and decimal GB/MB/KB as accelerate reads them).
BYTE_FORMS = "'24GiB', '24 GiB', '80GB', '512MiB', '64KiB', '1TiB', '2TB', the short binary forms '24G', '512M', '1T', or bytes"


def parse_bytes(text: str | int | float) -> int:
    """A size in bytes from ``"24GiB"``, ``"24 GiB"``, ``"80GB"``, ``"80G"``, ``"512MiB"``, ``"1TiB"`` or a number.

    The units accelerate knows (GiB/MiB/KiB = powers of 1024, GB/MB/KB = powers of 1000) are read by
    ``accelerate.utils.convert_file_size_to_int``, after the unit is upper-cased (accelerate reads a lower-case
    ``b`` as bits: ``"24gb"`` would be 3e9) and spaces removed. lowmem adds what it accepted before: TiB/TB,
    the short forms G/M/K/T (binary), a ``B`` suffix and a plain number of bytes. Anything else, and negative
    sizes, are a ValueError naming the accepted forms.
    """
    import re

    from accelerate.utils import convert_file_size_to_int

    error = ValueError(f"Cannot read a size from {text!r}; use {BYTE_FORMS}")
    if isinstance(text, bool) or not isinstance(text, (int, float, str)):
        raise error
    if not isinstance(text, str):
        if text < 0:
            raise error
        return int(text)
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([a-zA-Z]*)", text.strip().replace(" ", ""))
    if m is None:
        raise error
    number, unit = m.group(1), m.group(2).upper()
    unit = {"G": "GIB", "M": "MIB", "K": "KIB", "T": "TIB"}.get(unit, unit)
    if unit in ("", "B"):
        return int(float(number))
    if unit == "TIB":  # accelerate stops at GiB / GB
        number, unit = repr(float(number) * 1024), "GIB"
    elif unit == "TB":
        number, unit = repr(float(number) * 1000), "GB"
    if unit not in ("GIB", "MIB", "KIB", "GB", "MB", "KB"):
        raise error
    return convert_file_size_to_int(number + unit)


def default_optimizers() -> list[str]:
    """Registered optimizers the search tries by default (those present in this installation): a curated list, one
    per memory class (``--optimizer NAME`` searches any other). ``racs`` is the row-and-column one: Adafactor's state
    (one value per row and per column) with a step transient of a few rows and columns (Llama-2-7B, per parameter:
    128 MiB against Adafactor's 1.95 GiB), and the better of racs / sm3 on lowmem's tasks at its default lr
    (docs/benchmarks.md: tiny 0.997 x AdamW's loss, text 0.924; sm3 1.036 at its default, 0.998 with momentum at
    4 B/param more)."""
    from ..optim import list_optimizers

    names = set(list_optimizers())
    wanted = ["adamw", "adamw8bit", "adamw4bit", "adafactor", "racs", "galore_adamw", "galore_adamw8bit", "bnb_adamw8bit"]
    return [n for n in wanted if n in names]


#: What a state precision gives up, priced (``OptimizerEntry.state_precision``).
_PRECISION_COST = {"fp32": (None, ""), "8bit": ("optimizer_8bit", "8-bit states"),
                   "4bit": ("optimizer_4bit", "4-bit states"), "compressed": ("optimizer_8bit", "compressed states")}


#: ``optim_args`` that keep small updates of bfloat16 weights (lowmem.optim.group_layout.check_rounding)
BF16_ROUNDING_OPTIONS = ("bf16_stochastic_round", "kahan_summation")
#: What a full fine-tuning candidate of pure bfloat16 weights gives up without one of :data:`BF16_ROUNDING_OPTIONS`
BF16_ROUNDING_NOTE = "bf16 weights round off small updates"


def bf16_rounding_note(dtype: Any, optim_args: dict[str, Any] | None) -> list[str]:
    """``[BF16_ROUNDING_NOTE]`` for a full fine-tuning candidate of ``dtype`` bfloat16 whose ``optim_args`` turn on
    neither of :data:`BF16_ROUNDING_OPTIONS`, else ``[]`` (float32 / float16 weights: the options do not apply)."""
    from .estimate import parse_dtype

    import torch

    if parse_dtype(dtype) != torch.bfloat16 or any((optim_args or {}).get(k) for k in BF16_ROUNDING_OPTIONS):
        return []
    return [BF16_ROUNDING_NOTE]


def _optimizer_cost(name: str, entry: Any, rank: int | None, hidden: int) -> tuple[float, list[str]]:
    """What optimizer ``entry`` gives up, priced from its registry metadata (``subspace``,
    ``state_precision``, ``second_moment``), never from its name.

    A subspace optimizer costs 2 plus half a unit per halving of the rank below ``hidden / 4``, plus
    its state precision; its second moment's form is not priced again (the rank is what it gives
    up). A full-rank one costs its state precision (8-bit and compressed 1.0, 4-bit 1.25) plus 1.5
    for a factored (Adafactor) or blockwise (Adam-mini) second moment, and 1.5 for none at all (LOMO's
    SGD, Muon's / SCALE's / SinkGD's normalized updates: no per-coordinate adaptivity, whatever their
    papers report at their own tuned settings); float32 full-rank state with a full second moment
    (AdamW, SPAM, Stable-SPAM, bitsandbytes' 32-bit paged AdamW) gives up nothing. The words of a factored one are
    Adafactor's ("factored second moment") unless the entry's ``second_moment_words`` name its statistics (RACS, SM3).

    Raises:
        ValueError: An entry registered without the metadata.
    """
    if entry.state_precision not in _PRECISION_COST or entry.second_moment is None:
        raise ValueError(f"optimizer {name!r} has no memory metadata (state_precision={entry.state_precision!r}, "
                         f"second_moment={entry.second_moment!r}); register it with state_precision= one of "
                         f"{list(_PRECISION_COST)} and second_moment=")
    key, what = _PRECISION_COST[entry.state_precision]
    precision = (COSTS[key], what) if key else (0.0, "")
    if entry.subspace:
        r = rank or max(1, hidden // 4)
        cost, gives = 2 + max(0.0, math.log2(hidden / (4 * r))) / 2, [f"{name}: rank-{r} moments"]
        return cost + precision[0], gives + ([precision[1]] if key else [])
    cost, gives = precision[0], [f"{name}: {precision[1]}"] if key else []
    if entry.second_moment in ("factored", "blockwise"):
        words = entry.second_moment_words or f"{entry.second_moment} second moment"
        cost, gives = cost + COSTS["adafactor"], gives + [words]
    elif entry.second_moment == "none":
        cost, gives = cost + COSTS["no_second_moment"], gives + [entry.second_moment_words or "no second moment"]
    return cost, gives


def search_budget(
    model: Any,
    budget: int | str,
    seq_len: int = 512,
    batch_size: int = 8,
    dtype: str = "bf16",
    optimizers: Iterable[str] | None = None,
    ranks: Iterable[int] | None = None,
    lora_ranks: Iterable[int] = (64, 16),
    quantization: Iterable[str | None] = (None, "int8", "nf4"),
    checkpointing: Iterable[bool] = (False, True),
    layerwise: Iterable[bool] = (False, True),
    top: int | None = None,
    device: str = "cuda",
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = 1.0,
    optim_args: dict[str, Any] | None = None,
    full_finetuning: bool = True,
) -> SearchResult:
    """Configurations whose estimated total fits ``budget``, best (least given up) first.

    Args:
        model: As for :func:`~lowmem.memory.estimate_memory`.
        budget (`int` or `str`): Bytes, or e.g. ``"24GiB"``.
        seq_len (`int`, defaults to `512`): Tokens per sequence (fixed).
        batch_size (`int`, defaults to `8`): The batch wanted; powers of two up to it are tried.
        dtype (`str`, defaults to `"bf16"`): Parameter dtype.
        optimizers (`Iterable[str]` or `None`, defaults to `None`): Names to try, registered or the Hugging Face
            ``optim`` names ``lowmem train`` takes (an 8-bit one, e.g. ``lion_8bit``, keeps the ``nn.Embedding``
            weights' state 32-bit outside layerwise mode, as ``lowmem train`` runs it; ``<name>_layerwise``: layerwise
            candidates only); ``None``: :func:`default_optimizers`. Full fine-tuning uses each; LoRA uses the first full-rank one.
        ranks (`Iterable[int]` or `None`, defaults to `None`): Ranks of subspace optimizers;
            ``None``: hidden size / 4, / 8, / 16.
        lora_ranks (`Iterable[int]`, defaults to `(64, 16)`): LoRA ranks (all linear layers).
        quantization (`Iterable`, defaults to `(None, "int8", "nf4")`): Base-weight options of the LoRA candidates
            (``None``, ``"int8"``, ``"nf4"``, ``"fp4"``; quantized bases only with LoRA).
        checkpointing (`Iterable[bool]`, defaults to `(False, True)`): Gradient-checkpointing options.
        layerwise (`Iterable[bool]`, defaults to `(False, True)`): Layerwise stepping (engine
            optimizers, full fine-tuning only).
        top (`int` or `None`, defaults to `None`): Keep the best ``top`` candidates (an integer >= 1); ``None``:
            every one. ``0`` or a negative number is a ``ValueError`` (as ``lowmem budget --top``).
        device (`str`, defaults to `"cuda"`): The device the run will use (``"cpu"`` or ``"cuda"``):
            the optimizer's step transient is sized for it (:func:`~lowmem.memory.estimate_memory`).
        gradient_accumulation_steps (`int`, defaults to `1`): Micro-batches per optimizer step; above one, every
            gradient is live with the activations (:func:`~lowmem.memory.estimate.peak_total`).
        max_grad_norm (`float` or `None`, defaults to `1.0`): The Trainer's gradient clipping threshold; sizes the
            layerwise candidates' step transient with the hooks' clipping (:func:`~lowmem.memory.estimate_memory`).
            ``None`` or ``0``: no clipping.
        optim_args (`dict` or `None`, defaults to `None`): Hyperparameters given to every optimizer tried (full
            fine-tuning and LoRA; ``lowmem budget --optim-args``); a ``rank`` among them replaces ``ranks``.
        full_finetuning (`bool`, defaults to `True`): Try full fine-tuning; ``False``: LoRA candidates only
            (``lowmem budget --lora-r``). LoRA candidates are tried when ``layerwise`` holds ``False`` (they step
            normally) and ``lora_ranks`` is not empty.

    Returns:
        :class:`SearchResult`: the candidates that fit, best first (at most ``top``), and ``smallest``.

    Raises:
        ValueError: ``budget`` not a size > 0; ``batch_size`` not an integer >= 1; ``top`` neither ``None`` nor an
            integer >= 1; nothing to search (e.g. only layerwise stepping with bitsandbytes optimizers).
    """
    from ..optim import get_entry
    from .estimate import quantizes_something, resolve_optimizer_name

    limit = parse_bytes(budget)
    if limit <= 0:
        raise ValueError(f"budget={budget!r}: expected a size > 0 ({BYTE_FORMS})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top={top!r}: expected None (every candidate) or an integer >= 1 (the best top)")
    device = check_device(device)
    optim_args = dict(optim_args or {})
    max_grad_norm = check_max_grad_norm(max_grad_norm)
    config = resolve_config(model)
    hidden = config.hidden_size
    quantization = list(quantization)
    if any(quantization) and not all(quantization) and not quantizes_something(config):
        # bitsandbytes would quantize no layer (Falcon's FalconLinear): no quantized candidate. Asked for alone
        # (lowmem budget --quantization), estimate_memory refuses it, naming the model type and the quantization
        quantization = [q for q in quantization if not q]
    optimizers = list(optimizers) if optimizers is not None else default_optimizers()
    ranks = list(ranks) if ranks is not None else [hidden // 4, hidden // 8, hidden // 16]
    if "rank" in optim_args:
        ranks = [optim_args["rank"]]
    layerwise = list(layerwise)
    batches = sorted({2**k for k in range(int(math.log2(batch_size)) + 1)} | {batch_size})

    statics: list[tuple[dict[str, Any], float, list[str]]] = []
    extra_args = {k: v for k, v in optim_args.items() if k != "rank"}
    for name in optimizers if full_finetuning else []:
        registered, hf_layerwise, embeddings_32bit = resolve_optimizer_name(name)
        entry = get_entry(registered)
        unknown = sorted(set(extra_args) - set(entry.valid_hparams())) if entry.recipe is None else []
        if unknown:  # (estimate_memory sizes a bitsandbytes optimizer in closed form, without its constructor's check)
            raise ValueError(f"Unknown hyperparameter(s) {unknown} for optimizer {entry.name!r}; valid: {entry.valid_hparams()}"
                             + (" (bf16_stochastic_round / kahan_summation are engine optimizers' options)"
                                if set(unknown) & set(BF16_ROUNDING_OPTIONS) else ""))
        for r in ranks if entry.subspace else [None]:
            base_cost, gives = _optimizer_cost(entry.name, entry, r, hidden)
            for lw in layerwise:
                if lw and entry.recipe is None or hf_layerwise and not lw:
                    continue
                # an HF 8-bit name (lion_8bit, adamw_8bit, ...) keeps the embeddings' state 32-bit as lowmem train runs
                # it (not layerwise): the candidate keeps the name, which estimate_memory / measure_memory price so
                shown = name.strip().lower().replace("-", "_").removesuffix("_layerwise") if embeddings_32bit and not lw else entry.name
                statics.append((dict(optimizer=shown, optim_args={**extra_args, **({"rank": r} if r else {})}, layerwise=lw),
                                base_cost + (COSTS["layerwise"] if lw else 0),
                                gives + (["layerwise stepping"] if lw else []) + bf16_rounding_note(dtype, extra_args)))
    lora_opt = next((get_entry(resolve_optimizer_name(n)[0]).name for n in optimizers
                     if not get_entry(resolve_optimizer_name(n)[0]).subspace), "adamw")
    for lr in lora_ranks if False in layerwise else []:
        for q in quantization:
            cost = 3 + max(0.0, math.log2(64 / lr)) / 2 + quantization_cost(q)
            statics.append((dict(optimizer=lora_opt, optim_args=dict(extra_args), lora={"r": lr, "target_modules": "all-linear"},
                                 quantization=q, layerwise=False),
                            cost, [f"LoRA r={lr}"] + ([f"{q} base weights"] if q else [])))
    if not statics:
        raise ValueError(f"nothing to search: optimizers={optimizers}, layerwise={layerwise}, lora_ranks={list(lora_ranks)}, "
                         f"full_finetuning={full_finetuning} give no configuration (layerwise stepping needs an engine "
                         "optimizer, not a bitsandbytes one; LoRA candidates step normally)")

    out = SearchResult()
    # one optimizer sizing per optimizer config and trainable set, shared by layerwise / quantization variants
    with sizing_cache():
        ests: list[MemoryEstimate] = [estimate_memory(config, batch_size=1, seq_len=seq_len, dtype=dtype, device=device,
                                                      gradient_accumulation_steps=gradient_accumulation_steps,
                                                      max_grad_norm=max_grad_norm, **static)
                                      for static, _, _ in statics]
    def candidate(static: dict[str, Any], est: MemoryEstimate, cost: float, gives: list[str], b: int, ckpt: bool) -> Candidate:
        parts = est.activation_model(b, seq_len, ckpt)
        components = {**est.components(), "activations": parts["total"]}
        peak_args = {**est.peak_args(), "gradients_with_activations": parts.get("gradients_at_peak"),
                     "forward_activations": parts.get("forward_activations"),
                     "embedding_backward": parts.get("embedding_backward", 0), "inputs": parts.get("batch_inputs", 0)}
        extra = (COSTS["checkpointing"] if ckpt else 0) + math.log2(batch_size / b)
        return Candidate(
            settings={**static, "batch_size": b, "seq_len": seq_len, "dtype": dtype, "gradient_checkpointing": ckpt,
                      "device": device},
            components=components, total=peak_total(components, **peak_args), cost=cost + extra, peak_args=peak_args,
            gives_up=gives + (["checkpointing (~30% compute)"] if ckpt else []) + ([f"batch {b} < {batch_size}"] if b < batch_size else []),
        )

    for (static, cost, gives), est in zip(statics, ests):
        fixed = est.weights + est.quant_constants + est.gradients + est.optimizer_states
        for ckpt in checkpointing:
            if fixed >= limit:  # (only the smallest batch, for ``smallest``)
                c = candidate(static, est, cost, gives, 1, ckpt)
                if out.smallest is None or c.total < out.smallest.total:
                    out.smallest = c
                continue
            for b in reversed(batches):  # the largest batch that fits
                c = candidate(static, est, cost, gives, b, ckpt)
                if b == 1 and (out.smallest is None or c.total < out.smallest.total):
                    out.smallest = c
                if c.total <= limit:
                    out.append(c)
                    break
    out.sort(key=lambda c: (c.cost, -c.settings["batch_size"], c.total))
    if top is not None:
        del out[top:]
    return out
