"""Estimate the memory of a training step without allocating anything.

The model is built on the meta device from its config, so shapes, dtypes, which parameters train
(LoRA, frozen k-bit bases) and the optimizer's state are the real ones; no tensor memory is used,
so a 70B estimate runs on a laptop. Components:

* ``weights`` - every parameter in its dtype; 4-bit weights at half a byte per element, int8 weights
  (LLM.int8) at one byte; with ``reference="copy"`` (DPO / GRPO) the reference model's too.
* ``quant_constants`` - bitsandbytes' block absmax (and, with double quantization, the second-level
  absmax, code books and offset) of each 4-bit weight; an int8 weight's float32 scale per output row (``SCB``).
* ``gradients`` - trainable parameters only, in their dtype; with ``layerwise=True`` (each gradient
  is consumed by ``step_param`` and freed at once) only the largest one.
* ``optimizer_states`` - ``create_optimizer(meta_model, ...)``, ``materialize_state()``,
  ``state_bytes()``: the optimizer's own exact accounting. bitsandbytes optimizers (no meta
  support) use :func:`~lowmem.optim.recipes.bnb.state_bytes_closed_form`, and say so.
* ``activations`` - :func:`~lowmem.memory.activations.llama_activation_bytes` (other architectures: traced);
  with ``trainer`` (lowmem's TRL trainers) TRL's fused LM head instead of the logits, DPO's chosen and rejected
  sequences, and GRPO's generation phase when it is the larger.
* ``optimizer_transient`` - what one optimizer step allocates beyond its state (decoded moments,
  update temporaries, a projection refresh's workspace): the optimizer's own
  ``step_transient_bytes()`` on the same model, i.e. the largest per-parameter transient (or
  multi-tensor bucket's; in layerwise mode, where each parameter is stepped alone in its gradient
  hook, ``LayerwiseOptimizer(..., max_grad_norm=max_grad_norm, clip_mode="global_prev")``'s
  ``step_transient_bytes()``: the per-parameter step, no buckets, beside the hook's non-finite check
  and, with the Trainer's default clipping ``max_grad_norm=1.0``, the clipping coefficient).
* ``ddp_buckets`` - ``ddp=True`` (several processes with ``DistributedDataParallel``, not FSDP): the reducer's gradient
  buckets, one flat tensor per bucket holding every trainable parameter's gradient in its dtype (``bucket_cap_mb``
  splits them, it does not change their sum), allocated when DDP wraps the model and live at every moment: with
  ``gradient_as_bucket_view=False`` (the Trainer's and accelerate's default) a copy beside ``gradients``; with
  ``True`` the gradients are views of the buckets (0 here, and the gradients live through the forward too).

The optimizer is sized for the device the run will use (``device``, ``"cpu"`` or ``"cuda"``): some
of its step's memory depends on it (on CPU, MKL keeps the packed copy of a GEMM operand that a
projected step's combine-back leaves; on CUDA, MicroAdam takes its compiled path). Its parameters
are therefore fake tensors of that device (``torch._subclasses.FakeTensorMode``, the tool torch's own
memory and runtime estimators use: a device and a shape, no storage), on which the optimizer runs
the same ``materialize_state()`` / ``state_bytes()`` / ``step_transient_bytes()`` as in training:
the estimate's state and transient equal what a real optimizer on that device reports.

The total is the peak of a step, not the sum of the rows: the optimizer steps after the backward
pass has freed the activations, so ``total = weights + quant_constants + gradients +
optimizer_states + max(activations, optimizer_transient)``; in layerwise mode parameters step
inside the backward pass, each from its gradient hook after the loss's moment (the activations' peak, no
gradient yet): a gradient and a step's transient are added to the activations of the later moments
(``details["forward_activations"]``), the larger of that and the activations' peak counts (:func:`peak_total`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .activations import (LINEARS, NORM_BACKWARD_TEMPS, LoraShape, fused_head_bytes, llama_activation_bytes, llama_formula_applies,
                          nograd_layer_bytes, traced_activation_bytes)
from .shapes import shape_config

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}
COMPONENTS = ("weights", "quant_constants", "gradients", "optimizer_states", "activations", "optimizer_transient",
              "ddp_buckets")
#: bitsandbytes base-weight types (``quantization``): 4-bit NF4 / FP4 (QLoRA), 8-bit LLM.int8
QUANT_TYPES = ("nf4", "fp4", "int8")
#: the dict form's fields by type (:meth:`QuantSpec.parse`)
FOUR_BIT_FIELDS = ("quant_type", "double_quant", "compute_dtype", "blocksize")
INT8_FIELDS = ("quant_type", "threshold")
#: bitsandbytes' ``llm_int8_threshold`` default (``BitsAndBytesConfig``, ``Linear8bitLt``)
INT8_THRESHOLD = 6.0
#: The devices an estimate is sized for (``estimate_memory(device=...)``)
DEVICES = ("cpu", "cuda")


def check_device(device: Any) -> str:
    """``device`` as one of :data:`DEVICES` (a ``torch.device`` or ``"cuda:0"``: its type).

    Raises:
        ValueError: Anything else; the message names the field and the choices.
    """
    kind = device.type if isinstance(device, torch.device) else device
    if isinstance(kind, str) and kind.split(":", 1)[0] in DEVICES and (":" not in kind or kind.split(":", 1)[1].isdigit()):
        return kind.split(":", 1)[0]
    raise ValueError(f"Invalid device={device!r}: expected one of {list(DEVICES)} (the device the run will use)")


def on_fake_device(model: nn.Module, device: str) -> dict[int, nn.Parameter]:
    """Replace every parameter of the meta ``model`` by a parameter of the same shape, dtype and
    ``requires_grad`` that is a fake tensor of ``device`` (no storage; shared parameters stay shared).

    Returns:
        `dict`: ``id`` of each old parameter -> its replacement.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    new: dict[int, nn.Parameter] = {}
    made: dict[tuple, torch.Tensor] = {}  # one fake tensor per shape and dtype, each parameter a view of it (2x faster)
    with mode:
        for mod in model.modules():
            for name, p in list(mod._parameters.items()):
                if p is None:
                    continue
                if id(p) not in new:
                    key = (tuple(p.shape), p.dtype)
                    if key not in made:
                        made[key] = torch.empty(p.shape, dtype=p.dtype, device=device)
                    new[id(p)] = nn.Parameter(made[key], requires_grad=p.requires_grad)
                mod._parameters[name] = new[id(p)]
    return new


def on_fake_cpu(model: nn.Module) -> dict[int, nn.Parameter]:
    """:func:`on_fake_device` on ``"cpu"``, and every buffer still on the meta device made a fake CPU tensor of the
    parameters' mode: the non-persistent buffers ``from_config`` leaves on meta that a forward uses without moving them
    (Gemma's and Gemma2's ``embed_scale``: ``embeds * self.embed_scale.to(dtype)`` mixed a meta and a fake CPU tensor,
    and every autocast trace of a Gemma refused it, so ``lowmem budget`` of a Gemma in bf16 stopped with an error),
    as :func:`~lowmem.memory.activations._trace_saved` does for its traces."""
    new = on_fake_device(model, "cpu")
    mode = _sizing_mode(model)
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device.type == "meta":
                with mode:
                    mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return new


def _sizing_mode(model: nn.Module):
    """The fake-tensor mode of ``model``'s parameters (:func:`on_fake_device`): the optimizer's state
    is allocated under it (fake tensors of the same device); a meta model: no mode (meta tensors)."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensor

    for p in model.parameters():
        if isinstance(p, FakeTensor):
            return p.fake_mode
    return contextlib.nullcontext()


def peak_total(components: dict[str, int], layerwise: bool = False, gradients_with_activations: int | None = None,
               tied_backward: int = 0, transient_with_activations: int | None = None,
               forward_activations: int | None = None, kept_with_activations: int = 0, embedding_backward: int = 0,
               inputs: int = 0, kept_step_count: int = 0) -> int:
    """The peak bytes of a training step from its components (see the module docstring).

    The optimizer's step transient and the activations are live at the same time only in layerwise
    mode (each parameter steps from its gradient hook, during the backward pass); otherwise the
    step runs after backward has freed the activations, and the larger of the two sets the peak.

    Args:
        components (`dict[str, int]`): Bytes by component (:data:`COMPONENTS`).
        layerwise (`bool`, defaults to `False`): Parameters step inside the backward pass.
        gradients_with_activations (`int` or `None`, defaults to `None`): The gradient bytes live at the
            activations' peak. One micro-batch per step (``gradient_accumulation_steps=1``: the gradients are
            freed after each step) fills the gradients as the backward pass frees the activations: the peak is
            the larger of the backward's (activations + the gradients made before its peak: the head's and the
            last layer's) and the step's (every gradient + the transient). ``None``: every gradient is live
            with the activations (gradient accumulation: the earlier micro-batches' gradients are kept). Layerwise with
            ``forward_activations``: those live at the loss's moment, where no step runs (with gradient accumulation
            every kept gradient, ``gradients``; ``None``: none).
        tied_backward (`int`, defaults to `0`): With ``gradients_with_activations``: the two weight-sized tensors
            of a tied embedding's backward, live with every gradient at the end of the backward pass (also in
            ``components["activations"]``, which is at least this). Layerwise with gradient accumulation: what the
            tied moment adds to every kept gradient, the largest over the micro-batches (3 W temporaries of the weight's
            size with the first's other gradients, a middle one's every gradient, the last one's W alone).
        transient_with_activations (`int` or `None`, defaults to `None`): Layerwise: the largest step transient of
            the parameters that step while activations are live (all but the input embedding, whose gradient is
            the backward's last); the input embedding's step is then counted without activations. ``None``:
            the whole ``optimizer_transient`` with the activations.
        forward_activations (`int` or `None`, defaults to `None`): Layerwise: the activations the largest step
            (``gradients`` and the transient) is live with, those of the backward's moments after the loss's (the
            output head's step, the decoder layers' later; with a tied embedding: what the forward saves, without
            its backward's tensors). Then ``total = rest - gradients + max(forward_activations + gradients +
            transient_with_activations, activations, gradients + max(optimizer_transient, tied_backward))``: the
            activations' peak holds no gradient. ``None``: the gradient and the transient with the activations' peak.
        kept_with_activations (`int`, defaults to `0`): The part of ``optimizer_transient`` that the first step makes
            and the process keeps (the quantized codecs' tables, ``details["optimizer_kept_tables"]``): live at every
            later moment, the activations' peak included, where the rest of the transient is not.
        embedding_backward (`int`, defaults to `0`): An untied input embedding's backward, the backward pass's last
            operation: the gradient of the embeddings' output (``e h`` per token), the token ids it indexes by and the
            loss with its backward's scalars, live with every gradient (the embedding's own being formed). Like
            ``tied_backward``, a moment of every gradient (``activation_parts["embedding_backward"]``).
        inputs (`int`, defaults to `0`): The batch's tensors the training loop holds through the whole step
            (:func:`batch_input_bytes`, ``details["batch_input_bytes"]``): live at every moment, the optimizer's step
            included, where no component holds them; added to the peak.
        kept_step_count (`int`, defaults to `0`): Like ``kept_with_activations``: the part of ``optimizer_transient``
            that is torch's fused AdamW kernel's step count, a float32 0-d tensor per device that each step makes and
            ``lowmem.optim.functional.adam`` keeps to the next (``details["optimizer_kept_step_count"]``, 4 B per device).
    """
    return inputs + _peak_of_components(components, layerwise, gradients_with_activations, tied_backward,
                                        transient_with_activations, forward_activations,
                                        kept_with_activations + kept_step_count, embedding_backward)


def batch_input_bytes(sequences: int, seq_len: int, gradient_accumulation_steps: int = 1) -> int:
    """Bytes of the batches a training loop holds through an optimizer step: per sequence token the collator's
    three int64 tensors, ``input_ids``, ``attention_mask`` and ``labels`` (``DataCollatorForSeq2Seq``,
    ``DataCollatorForLanguageModeling``: 24 B), for each of the step's ``gradient_accumulation_steps`` micro-batches
    (transformers' ``Trainer`` keeps the step's micro-batches in ``batch_samples`` until the next step fetches
    its own; on the device with accelerate's device placement). :func:`~lowmem.memory.measure_memory` holds one
    (its ids are its labels): 8 B per token, so the estimate is over it by 16 B per token."""
    return 3 * 8 * sequences * seq_len * gradient_accumulation_steps


def _peak_of_components(components: dict[str, int], layerwise: bool, gradients_with_activations: int | None,
                        tied_backward: int, transient_with_activations: int | None, forward_activations: int | None,
                        kept_with_activations: int, embedding_backward: int) -> int:
    """:func:`peak_total` without the batch's inputs."""
    act, transient = components.get("activations", 0), components.get("optimizer_transient", 0)
    kept = min(kept_with_activations, transient)
    rest = sum(v for k, v in components.items() if k in COMPONENTS and k not in ("activations", "optimizer_transient"))
    if layerwise:
        if forward_activations is not None:
            # each parameter steps in its gradient hook and frees its gradient: a gradient (at most the largest) and
            # a step's transient are live with the activations of the moments after the first gradient
            # (``forward_activations``), not with the loss's moment (the activations' peak, no gradient yet; with
            # gradient accumulation every kept one, ``gradients_with_activations``, but no step); the input embedding's
            # step (and a tied embedding's backward) after the activations are freed
            grads = components.get("gradients", 0)
            early = min(gradients_with_activations or 0, grads)
            with_act = transient if transient_with_activations is None else min(transient_with_activations, transient)
            return rest - grads + max(min(forward_activations, act) + grads + with_act, act + early + kept,
                                      grads + max(transient, tied_backward + kept, embedding_backward + kept))
        if transient_with_activations is None:
            return rest + act + transient
        return rest + max(act + min(transient_with_activations, transient), act + kept, transient)
    if gradients_with_activations is None:
        # gradient accumulation: every gradient kept, live with the activations; the untied embedding's backward (with
        # a later micro-batch's embedding gradient being added to the kept one) is a moment of its own
        return rest + max(act + kept, transient, embedding_backward + kept)
    grads = components.get("gradients", 0)
    early = min(gradients_with_activations, grads)
    return rest - grads + max(act + early + kept, grads + max(transient, tied_backward + kept, embedding_backward + kept))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {sorted(DTYPES)}")
    return DTYPES[key]


@dataclass(frozen=True)
class QuantSpec:
    """bitsandbytes base-weight settings: 4-bit (``BitsAndBytesConfig(load_in_4bit=True, ...)``, QLoRA) or 8-bit
    (``BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=...)``, LLM.int8).

    Attributes:
        quant_type: One of :data:`QUANT_TYPES`: ``"nf4"`` or ``"fp4"`` (4-bit), ``"int8"`` (8-bit).
        double_quant: 4-bit only: quantize the block absmax too (``bnb_4bit_use_double_quant``); ``False`` for int8.
        compute_dtype: 4-bit only: dtype of the de-quantized matmuls (``bnb_4bit_compute_dtype``); ``None``
            follows the model dtype (int8: always ``None``; its matmuls run in the input's dtype).
        blocksize: 4-bit only: elements per absmax block (bitsandbytes: 64).
        threshold: int8 only: LLM.int8's outlier threshold (``llm_int8_threshold``, bitsandbytes' default 6.0; input
            columns with a larger magnitude go through a 16-bit matmul); ``None`` for 4-bit.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype | None = None
    blocksize: int = 64
    threshold: float | None = None

    @property
    def is_int8(self) -> bool:
        """8-bit base weights (``load_in_8bit``)."""
        return self.quant_type == "int8"

    @classmethod
    def parse(cls, quantization: Any) -> "QuantSpec | None":
        """``None``, one of :data:`QUANT_TYPES` (``"nf4"``/``"fp4"``/``"int8"``), a dict of these fields (4-bit:
        ``quant_type``, ``double_quant``, ``compute_dtype``, ``blocksize``; int8: ``quant_type``, ``threshold``), a
        ``QuantSpec`` or a ``BitsAndBytesConfig`` (``load_in_4bit`` or ``load_in_8bit``).

        Raises:
            ValueError: An unknown type (the message lists :data:`QUANT_TYPES`) or field, a 4-bit field with int8
                (``double_quant``, ``compute_dtype``, ``blocksize``) or ``threshold`` with a 4-bit type, naming it.
        """
        if quantization is None or isinstance(quantization, QuantSpec):
            return quantization
        if isinstance(quantization, str):
            q: dict[str, Any] = {"quant_type": quantization}
        elif isinstance(quantization, dict):
            q = dict(quantization)
        elif hasattr(quantization, "bnb_4bit_quant_type"):
            if getattr(quantization, "llm_int8_skip_modules", None):
                raise ValueError(f"BitsAndBytesConfig llm_int8_skip_modules={quantization.llm_int8_skip_modules!r} is not "
                                 "supported: lowmem keeps the modules transformers keeps (the output head) in full precision")
            if getattr(quantization, "load_in_8bit", False):
                if getattr(quantization, "llm_int8_has_fp16_weight", False):
                    raise ValueError("BitsAndBytesConfig llm_int8_has_fp16_weight=True is not supported: the base weights "
                                     "are stored in 8 bits (LoRA trains the adapters)")
                q = {"quant_type": "int8", "threshold": float(quantization.llm_int8_threshold)}
            elif getattr(quantization, "load_in_4bit", False):
                q = {"quant_type": quantization.bnb_4bit_quant_type, "double_quant": quantization.bnb_4bit_use_double_quant,
                     "compute_dtype": quantization.bnb_4bit_compute_dtype}
            else:
                raise ValueError("BitsAndBytesConfig quantizes nothing: set load_in_4bit=True or load_in_8bit=True")
        else:
            raise ValueError(f"quantization={quantization!r}: expected None, one of {list(QUANT_TYPES)}, a dict or a BitsAndBytesConfig")
        quant_type = str(q.get("quant_type", "nf4")).lower()
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"Unknown quantization quant_type {q.get('quant_type')!r}; valid: {list(QUANT_TYPES)} "
                             "(nf4 / fp4: 4-bit, int8: 8-bit LLM.int8)")
        fields = INT8_FIELDS if quant_type == "int8" else FOUR_BIT_FIELDS
        unknown = sorted(set(q) - set(FOUR_BIT_FIELDS) - set(INT8_FIELDS))
        if unknown:
            raise ValueError(f"Unknown quantization field(s) {unknown}; valid: {list(FOUR_BIT_FIELDS)} (nf4 / fp4), "
                             f"{list(INT8_FIELDS)} (int8)")
        misplaced = sorted(k for k in set(q) - set(fields))
        if misplaced:
            raise ValueError(f"quantization field(s) {misplaced} do not apply to quant_type={quant_type!r}; valid for it: "
                             f"{list(fields)}" + (" (8-bit weights have no absmax blocks or double quantization, and their "
                                                  "matmuls run in the input's dtype)" if quant_type == "int8" else ""))
        if quant_type == "int8":
            threshold = q.get("threshold", INT8_THRESHOLD)
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0 or math.isinf(threshold):
                raise ValueError(f"Invalid quantization threshold={threshold!r}: expected a finite number >= 0 "
                                 f"(LLM.int8's outlier threshold, llm_int8_threshold; bitsandbytes' default {INT8_THRESHOLD}; "
                                 "0 turns the outlier decomposition off)")
            return cls(quant_type="int8", double_quant=False, compute_dtype=None, threshold=float(threshold))
        if q.get("compute_dtype") is not None:
            q["compute_dtype"] = parse_dtype(q["compute_dtype"])
        return cls(**{**q, "quant_type": quant_type})

    def weight_bytes(self, numel: int, rows: int | None = None) -> tuple[int, int]:
        """``(stored, constants)`` bytes of one quantized weight of ``numel`` elements (``rows`` output rows), as
        bitsandbytes stores it.

        4-bit: two codes per byte; per block a float32 absmax, or with double quantization a uint8 absmax plus a
        float32 absmax per 256 blocks, a 256-entry float32 code book and an offset; and the 16-entry float32 code of
        the 4-bit type. int8 (``Int8Params``: LLM.int8's vector-wise quantization, Dettmers et al. 2022, eq. 4): one
        int8 code per element and a float32 absmax per output row (``SCB``); ``rows`` is required.
        """
        if self.is_int8:
            if rows is None:
                raise ValueError("weight_bytes of an int8 weight needs rows (its output rows: one float32 SCB scale each)")
            return numel, 4 * rows
        packed = math.ceil(numel / 2)
        blocks = math.ceil(numel / self.blocksize)
        if self.double_quant:
            constants = blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4
        else:
            constants = 4 * blocks
        return packed, constants + 16 * 4

    def as_dict(self) -> dict[str, Any]:
        """The dict form (``estimate.settings["quantization"]``; :meth:`parse` reads it back)."""
        if self.is_int8:
            return {"quant_type": self.quant_type, "threshold": self.threshold}
        return {"quant_type": self.quant_type, "double_quant": self.double_quant}


@dataclass
class MemoryEstimate:
    """Bytes by component; ``total`` is their sum. ``details`` holds counts and sub-parts,
    ``notes`` what the numbers assume, ``settings`` the inputs."""

    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    quant_constants: int = 0
    optimizer_transient: int = 0
    ddp_buckets: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    #: ``(batch_size, seq_len, gradient_checkpointing) -> activation parts``, for the same model and
    #: adapters (the budget search re-uses it instead of rebuilding the meta model)
    activation_model: Any = field(default=None, repr=False, compare=False)

    @property
    def total(self) -> int:
        """The step's peak: :func:`peak_total` of the components (not their plain sum)."""
        return peak_total(self.components(), **self.peak_args())

    def peak_args(self) -> dict[str, Any]:
        """The arguments of :func:`peak_total` besides the components (stepping mode, the backward's overlap)."""
        return {"layerwise": bool(self.settings.get("layerwise")),
                "gradients_with_activations": self.details.get("gradients_with_activations"),
                "transient_with_activations": self.details.get("optimizer_transient_with_activations"),
                "forward_activations": self.details.get("forward_activations"),
                "tied_backward": int(self.details.get("activation_parts", {}).get("tied_embedding_backward", 0)),
                "embedding_backward": int(self.details.get("activation_parts", {}).get("embedding_backward", 0)),
                "kept_with_activations": int(self.details.get("optimizer_kept_tables") or 0),
                "kept_step_count": int(self.details.get("optimizer_kept_step_count") or 0),
                "inputs": int(self.details.get("batch_input_bytes") or 0)}

    def components(self) -> dict[str, int]:
        return {c: int(getattr(self, c)) for c in COMPONENTS}

    def to_dict(self) -> dict[str, Any]:
        return {**self.components(), "total": self.total, "details": self.details, "notes": self.notes, "settings": self.settings}

    def table(self) -> str:
        from .report import estimate_table

        return estimate_table(self)

    def __str__(self) -> str:
        return self.table()


def resolve_config(model: Any):
    """A transformers config from a named shape, a local model directory, a config or a model."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, nn.Module):
        if getattr(model, "config", None) is None:
            raise ValueError("an nn.Module given as model needs a transformers .config")
        return model.config
    if isinstance(model, (str, os.PathLike)):
        if os.path.isdir(model):
            adapter = os.path.join(model, "adapter_config.json")
            if os.path.isfile(adapter) and not os.path.isfile(os.path.join(model, "config.json")):
                import json

                with open(adapter) as f:
                    base = json.load(f).get("base_model_name_or_path")
                raise ValueError(f"model={str(model)!r} is a peft adapter directory (adapter_config.json, no config.json)"
                                 + (f" of the base model {base!r}" if base else "") + ": pass the base model (its "
                                 "directory, a named shape or its config) with lora= the adapter's settings, e.g. "
                                 f"lora=peft.LoraConfig.from_pretrained({str(model)!r})")
            return AutoConfig.from_pretrained(model, local_files_only=True)
        return shape_config(str(model))
    raise ValueError(f"model={model!r}: expected a named shape, a local directory, a transformers config or model")


def peft_model_parts(model: Any, lora: Any) -> tuple[Any, Any, list[str]]:
    """``(model, lora, notes)`` with a peft ``PeftModel`` given as ``model`` split into its base model and its active
    LoRA adapter's ``LoraConfig`` (sized as ``lora=`` is): its ``.config`` is the base model's, so the adapters were
    dropped and full fine-tuning sized, silently (USERAPI 6). Anything else is returned unchanged.

    Raises:
        ValueError: A PeftModel together with ``lora=`` (give one), several active adapters, or an adapter that is not
            LoRA (naming it and saying to pass the base model with ``lora=``).
    """
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(model, nn.Module) or not isinstance(peft_config, dict) or not hasattr(model, "get_base_model"):
        return model, lora, []
    from peft import LoraConfig

    active = getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", None)]
    if lora is not None:
        raise ValueError(f"model is a peft {type(model).__name__} with adapters {sorted(peft_config)} and lora= is given "
                         "too: give one (the model's active adapter is sized as lora= would be, or pass its base model, "
                         "model.get_base_model(), with lora=)")
    if len(active) != 1 or active[0] not in peft_config:
        raise ValueError(f"model is a peft {type(model).__name__} with active adapters {active!r}: the estimate sizes one "
                         "LoRA adapter; pass its base model (model.get_base_model()) with lora= the adapter's LoraConfig")
    cfg = peft_config[active[0]]
    if not isinstance(cfg, LoraConfig):
        raise ValueError(f"model is a peft {type(model).__name__} whose adapter {active[0]!r} is a {type(cfg).__name__}: "
                         "the estimate sizes LoRA adapters only (lora=); pass its base model (model.get_base_model()) "
                         "with lora= a LoraConfig")
    return model.get_base_model(), cfg, [f"peft model: its active adapter {active[0]!r} sized as lora= "
                                         f"(r={cfg.r}, target_modules={cfg.target_modules!r})"]


def model_instance_notes(model: Any, param_dtype: torch.dtype, peft: bool = False) -> list[str]:
    """Notes for a model instance given as ``model``, whose own parameters are sized (:func:`mirror_instance`): its
    floating dtypes when they are not ``dtype`` (which then sizes the activations only), and its frozen parameters
    (sized frozen; not for a peft model's base, whose adapters are sized as ``lora=``). Before 2026-12-01 an instance
    was sized from its ``.config`` only (every parameter in ``dtype=``, trained) and these notes said so."""
    if not isinstance(model, nn.Module):
        return []
    params = list(model.parameters())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.is_floating_point()})
    want = str(param_dtype).removeprefix("torch.")
    notes = [f"the model given holds {', '.join(dtypes)} parameters: sized in their own dtypes ({want}, dtype=, sizes "
             "the activations)"] if dtypes and dtypes != [want] else []
    frozen = [p for p in params if not p.requires_grad]
    if frozen and not peft:
        notes.append(f"the model given has {len(frozen)} of its {len(params)} parameter tensors frozen "
                     f"({sum(p.numel() for p in frozen):,} elements): sized frozen (no gradient, no optimizer state)")
    return notes


def _instance_name(name: str) -> str:
    """A parameter's name without peft's wrapping (``base_model.model.`` and a LoRA layer's ``.base_layer``), so that
    the model built from the config, wrapped by ``get_peft_model`` or not, and the model given name it alike."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def mirror_instance(meta: nn.Module, instance: Any, quantized: dict[int, str], requires_grad: bool) -> list[str]:
    """Give the parameters of ``meta`` (built from the ``.config`` of the model instance ``instance``, then wrapped by
    ``get_peft_model`` where LoRA is sized) the instance's own floating dtypes (its buffers' too) and, with ``requires_grad`` (the
    instance is the model trained as given: a peft model, or no ``lora=`` on top), its frozen / trainable flags,
    matched by name (:func:`_instance_name`); tied weights stay tied (the config's). A quantized weight (``quantized``:
    bitsandbytes' packed storage in the instance) keeps the estimator's 4- / 8-bit count. Returns notes: parameters of
    the instance the built model does not have (sized from the config then). Nothing for a config or a name."""
    if not isinstance(instance, nn.Module):
        return []
    given = {_instance_name(n): p for n, p in instance.named_parameters(remove_duplicate=False)}
    matched: set[str] = set()
    for n, p in meta.named_parameters(remove_duplicate=False):
        q = given.get(_instance_name(n))
        if q is None:
            continue
        matched.add(_instance_name(n))
        if id(p) not in quantized and q.is_floating_point() and p.dtype != q.dtype:
            p.data = p.data.to(q.dtype)
        if requires_grad:
            p.requires_grad_(q.requires_grad)
    buffers = {_instance_name(n): b for n, b in instance.named_buffers(remove_duplicate=False)}
    for n, b in meta.named_buffers(remove_duplicate=False):  # (a model cast with .to(dtype): its rotary tables too)
        q = buffers.get(_instance_name(n))
        if q is not None and q.is_floating_point() and b.is_floating_point() and b.dtype != q.dtype:
            module, _, leaf = n.rpartition(".")
            meta.get_submodule(module).register_buffer(leaf, b.to(q.dtype), persistent=leaf not in getattr(
                meta.get_submodule(module), "_non_persistent_buffers_set", set()))
    missing = sorted(set(given) - matched)
    return [f"{len(missing)} parameter tensors of the model given are not in the model built from its config (e.g. "
            f"{missing[0]!r}): sized from the config"] if missing else []


def config_quantization(config: Any, spec: "QuantSpec | None") -> tuple["QuantSpec | None", list[str]]:
    """The base weights' quantization: ``spec`` (``quantization=``), or the ``quantization_config`` of ``config`` (a
    pre-quantized checkpoint's config.json, a model loaded 4-/8-bit), which ``from_pretrained`` applies: it was
    ignored, and the weights sized unquantized, silently (USERAPI 8). Both given: the quantization types must agree
    (the stored weights have the config's); ``spec``'s other fields are used, with a note when they differ.

    Raises:
        ValueError: A ``quantization_config`` that is not bitsandbytes' (naming its ``quant_method``), or one whose type
            differs from ``quantization=``'s.
    """
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return spec, []
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    method = qc.get("quant_method", "bitsandbytes")
    # (a model loaded 4-/8-bit: transformers' BitsAndBytesConfig.to_dict() keeps the QuantizationMethod enum, whose
    # str() is 'quantizationmethod.bits_and_bytes', refused before 2026-12-01 as not bitsandbytes)
    method = str(getattr(method, "value", method)).lower().replace("_", "")
    if method != "bitsandbytes":
        raise ValueError(f"the model's config has quantization_config quant_method={method!r}: the estimate sizes "
                         "bitsandbytes 4-bit / 8-bit base weights only (quantization='nf4' / 'fp4' / 'int8'); estimate "
                         "from the unquantized model's config with quantization= the nearest bitsandbytes setting")
    from transformers import BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        own = QuantSpec.parse(BitsAndBytesConfig.from_dict({k: v for k, v in qc.items() if k != "quant_method"}))
    if spec is None:
        return own, [f"quantization from the model's config quantization_config (bitsandbytes {own.quant_type}, as "
                     "from_pretrained loads it)"]
    if spec.quant_type != own.quant_type:
        raise ValueError(f"quantization={spec.quant_type!r} but the model's config has quantization_config "
                         f"{own.quant_type!r} (bitsandbytes): the checkpoint's weights are stored as {own.quant_type}; "
                         "drop quantization= (the config's applies) or give the same type")
    differ = [f"{k}={getattr(own, k)!r}" for k in ("double_quant", "compute_dtype", "threshold")
              if getattr(spec, k) != getattr(own, k)]
    return spec, ([f"quantization= sized; the model's config quantization_config has {', '.join(differ)}"]
                  if differ else [])


def model_label(model: Any) -> str:
    """A short name for tables: the shape or path as given, else the config's path or model type."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    config = getattr(model, "config", model)
    return str(getattr(config, "name_or_path", "") or getattr(config, "model_type", type(model).__name__))


def build_meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` with every tensor on the meta device (nothing allocated).

    Raises:
        ValueError: ``config`` is not a text-only causal LM (a vision-language model, an encoder-decoder, an
            unknown ``model_type``); the message names its ``model_type`` and what the estimate covers.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    sub = [k for k in ("vision_config", "audio_config", "encoder_config") if getattr(config, k, None) is not None]
    if sub or getattr(config, "text_config", None) is not None and config.get_text_config() is not config:
        raise ValueError(f"model_type={model_type!r} is a multimodal model ({', '.join(sub) or 'text_config'}): the estimate "
                         "covers text-only causal LMs (its vision / audio tower's weights and activations would be "
                         "missing); estimate its language model from config.text_config, and add the tower by hand")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"model_type={model_type!r} is not a causal LM transformers can build (AutoModelForCausalLM); "
                         "the estimate covers decoder-only causal LMs such as llama, mistral, qwen2, gemma, phi3, "
                         "gpt_neox, gpt2, mixtral, qwen2_moe")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _meta_model_like(model: nn.Module, config: Any, dtype: torch.dtype, kbit: bool, lcfg: Any) -> nn.Module:
    """A meta-device copy of the estimate's model for tracing its activations: built again from ``config`` (the
    estimate's own model holds fake tensors of the run's device once its optimizer is sized), with the k-bit
    float32 upcast, the LoRA adapters and ``model``'s ``requires_grad`` flags (by name; BAdam's frozen blocks)."""
    meta = build_meta_model(config, dtype)
    if kbit:
        for p in meta.parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    if lcfg is not None:
        from peft import get_peft_model

        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            meta = get_peft_model(meta, lcfg)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in meta.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    return meta


#: a uniform stack's autocast traces (:func:`layer_scaled_bytes`) run its first ``SCALED_FROM`` and ``SCALED_FROM + 1``
#: layers: the last two traced are inner layers (each one's predecessor is a layer, not the embeddings)
SCALED_FROM = 3


def uniform_decoder_layers(model: nn.Module, config: Any) -> nn.ModuleList | None:
    """``model``'s decoder layers when there are more than three and all are of one kind
    (:func:`~lowmem.memory.activations.layer_kinds`: the same ``layer_types`` entry, submodules and their plain
    attributes, parameters and buffers; LoRA adapters and frozen flags included), else ``None``. A forward over such a
    stack repeats one layer's operations on the same shapes: :func:`layer_scaled_bytes` traces its first
    :data:`SCALED_FROM` and one more."""
    from .activations import decoder_layers, layer_kinds

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= SCALED_FROM + 1:
        return None
    try:
        layers = decoder_layers(model, n)
    except ValueError:
        return None
    kinds = layer_kinds(text, layers)
    return layers if all(k[1:] == kinds[0][1:] for k in kinds) else None


@contextlib.contextmanager
def first_layers(model: nn.Module, layers: nn.ModuleList, m: int):
    """``model`` running only the first ``m`` of its decoder ``layers`` (the same modules) inside the block."""
    from .activations import _layers_parent

    parent, attr = _layers_parent(model, layers)
    setattr(parent, attr, nn.ModuleList(list(layers)[:m]))
    try:
        yield
    finally:
        setattr(parent, attr, layers)


def layer_scaled_bytes(model: nn.Module, config: Any, trace: Any) -> int:
    """``trace()`` (bytes a forward of ``model`` saves or casts: one term per decoder layer, the same for every inner
    layer, plus terms before and after the layers) for the whole stack, from traces of its first ``m`` and ``m + 1``
    layers (``m`` = :data:`SCALED_FROM`: the last traced layer and the one before it are inner layers) when the stack is
    uniform (:func:`uniform_decoder_layers`): ``t(L) = t(m + 1) + (L - m - 1) (t(m + 1) - t(m))``, exact
    (``tests/test_est12_fast_mixed.py`` compares it with the whole stack's trace); else ``trace()`` of the whole
    stack. Llama-2-7B's 32 layers: 7 traced instead of 32."""
    layers = uniform_decoder_layers(model, config)
    if layers is None:
        return trace()
    with first_layers(model, layers, SCALED_FROM):
        short = trace()
    with first_layers(model, layers, SCALED_FROM + 1):
        longer = trace()
    return longer + (len(layers) - SCALED_FROM - 1) * (longer - short)


def autocast_cast_bytes(config: Any, dtype: torch.dtype, lora: Any = None, seq_len: int = 8, scaled: bool = True) -> dict[str, int]:
    """Bytes of the ``dtype`` copies autocast makes of the float32 parameters in one forward pass, by parameter name.

    Autocast casts per op, not per module: every floating operand of an op on its lower-precision list (``linear``,
    ``addmm``, ``mm``, ``matmul``, ``bmm``, ``baddbmm``, ``conv*``: on both the CPU and the CUDA lists) is cast, so
    ``nn.Linear``, transformers' ``Conv1D`` (GPT-2: ``torch.addmm(bias, x, weight)``, its bias too), a head tied to
    the input embedding, LoRA adapters and, in the eager per-expert loop, each 3-D fused expert's slice all are (not
    under ``grouped_mm``, transformers 5's default experts kernel: it casts its input to the weight's float32, no
    copy of the weight; :func:`~lowmem.memory.activations.traced_experts`); an ``nn.Embedding`` lookup
    and the norms are not. A leaf parameter's copy is cached until autocast exits and the op saves it for the backward
    pass. Found by running the model's own forward under ``torch.autocast("cpu", dtype)`` on fake CPU tensors
    (nothing is allocated; CUDA's autocast cannot be entered without a GPU, and its list casts the same weight ops)
    and recording each ``aten._to_copy`` of a parameter or of a view of one (an expert's slice).

    Args:
        config (`PretrainedConfig`): The causal LM's config.
        dtype (`torch.dtype`): The autocast dtype (``torch.bfloat16`` or ``torch.float16``).
        lora (`peft.LoraConfig`, `dict` or `None`, defaults to `None`): LoRA adapters on the model (float32, cast too).
        seq_len (`int`, defaults to `8`): Tokens of the traced forward (which parameters are cast does not depend on it).
        scaled (`bool`, defaults to `True`): A uniform stack (:func:`uniform_decoder_layers`) traced through its first
            ``SCALED_FROM + 1`` layers, the later layers' copies those of the last of them, under their names
            (``False``: every layer).

    Returns:
        `dict[str, int]`: parameter name -> bytes of its ``dtype`` copy (the elements cast, times ``dtype``'s size).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    model = build_meta_model(config, torch.float32)
    lcfg = lora_config(lora)
    if lcfg is not None:
        from peft import get_peft_model

        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = get_peft_model(model, lcfg)
    on_fake_cpu(model)
    names = {id(p): n for n, p in model.named_parameters()}  # a tied weight once, under its first name
    seen: dict[str, set] = {}

    class _RecordCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == dtype:
                t = args[0]
                base = t._base if t._base is not None else t
                if id(base) in names:  # a parameter or a slice of one (an expert's weight): count each slice once
                    seen.setdefault(names[id(base)], set()).add((t.storage_offset(), tuple(t.shape)))
            return func(*args, **kwargs)

    from .activations import traced_experts

    model.train()
    layers = uniform_decoder_layers(model, config) if scaled else None
    try:  # fused experts run their own kernel (traced_experts): grouped_mm casts its input to the weight's dtype (no
        # copy of the weight), the eager loop's F.linear casts each expert's slice
        with (_sizing_mode(model), torch.no_grad(), traced_experts(model), torch.autocast("cpu", dtype=dtype), _RecordCasts(),
              first_layers(model, layers, SCALED_FROM + 1) if layers is not None else contextlib.nullcontext()):
            model(input_ids=torch.zeros(1, seq_len, dtype=torch.long))
    except Exception as exc:  # noqa: BLE001  (what the model's code raised on fake tensors, re-raised with its name)
        raise ValueError(f"the autocast copies of model_type={getattr(config, 'model_type', None)!r} cannot be traced on "
                         f"fake tensors ({type(exc).__name__}: {exc}); its mixed-precision memory cannot be estimated") from exc
    out = {n: sum(math.prod(shape) for _, shape in views) * dtype.itemsize for n, views in seen.items()}
    if layers is None:
        return out
    # a uniform stack (uniform_decoder_layers): its first SCALED_FROM + 1 layers traced; every later layer casts what
    # the last traced one did, under its own names (checked: the one before it cast the same, else the whole stack)
    where = next(n for n, m in model.named_modules() if m is layers) + "."
    last = SCALED_FROM
    by_layer = {i: {n[len(where) + len(str(i)) + 1:]: v for n, v in out.items() if n.startswith(f"{where}{i}.")}
                for i in (last - 1, last)}
    if by_layer[last - 1] != by_layer[last]:
        return autocast_cast_bytes(config, dtype, lora, seq_len, scaled=False)
    for i in range(last + 1, len(layers)):
        out.update({f"{where}{i}.{n}": v for n, v in by_layer[last].items()})
    return out


def _fake_saved_bytes(config: Any, dtype: torch.dtype, autocast: torch.dtype | None, lcfg: Any, batch_size: int,
                      seq_len: int, scaled: bool = True) -> int:
    """Bytes of the storages one training forward of the causal LM of ``config`` saves for the backward pass
    (``saved_tensors_hooks``; parameters excluded, each storage once), its parameters ``dtype`` fake CPU tensors,
    under ``torch.autocast("cpu", autocast)`` unless ``autocast`` is ``None``. Nothing is allocated. A uniform stack
    (``scaled``): from its first :data:`SCALED_FROM` and one more layers (:func:`layer_scaled_bytes`)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from .activations import traced_experts

    model = build_meta_model(config, dtype)
    if lcfg is not None:
        from peft import get_peft_model

        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = get_peft_model(model, lcfg)
    on_fake_cpu(model)
    params = {StorageWeakRef(p.untyped_storage()) for p in [*model.parameters(), *model.buffers()]}
    saved: dict[Any, int] = {}
    keep: list[torch.Tensor] = []  # alive until counted: a freed storage's weak reference could be reused

    def pack(t):
        key = StorageWeakRef(t.untyped_storage())
        if key not in params and key not in saved:
            saved[key] = t.untyped_storage().nbytes()
            keep.append(t)
        return t

    model.train()

    def trace() -> int:
        saved.clear()
        keep.clear()
        ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
        try:
            with _sizing_mode(model), traced_experts(model):  # fused experts: the model's own kernel
                ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
                    model(input_ids=ids, labels=ids)
        except Exception as exc:  # noqa: BLE001  (what the model's code raised on fake tensors, re-raised with its name)
            raise ValueError(f"the autocast activations of model_type={getattr(config, 'model_type', None)!r} cannot be "
                             f"traced on fake tensors ({type(exc).__name__}: {exc}); its mixed-precision memory cannot be "
                             "estimated") from exc
        return sum(saved.values())

    # each inner decoder layer saves the same bytes: a uniform stack from its first three and four layers
    return layer_scaled_bytes(model, config, trace) if scaled else trace()


def autocast_extra_saved_bytes(config: Any, dtype: torch.dtype, lora: Any = None, batch_size: int = 1,
                               seq_len: int = 512, scaled: bool = True) -> int:
    """Bytes that a training forward under ``torch.autocast(dtype)`` of the float32 model saves beyond what the same
    forward of the model in pure ``dtype`` saves: the difference of two traces of the model's own code
    (:func:`_fake_saved_bytes`, fake CPU tensors; CUDA's autocast casts the same matmul operands).

    It holds the ``dtype`` copies of the weights autocast casts (:func:`autocast_cast_bytes`), and what a pure
    ``dtype`` count misses: the float32 residual stream makes each norm save a float32 normalized value; autocast
    casts a float32 input once per consuming op, so ``q_proj`` / ``k_proj`` / ``v_proj`` (and ``gate_proj`` /
    ``up_proj``, GPT-2's ``c_attn``...) each save their own ``dtype`` copy of the same hidden states; rotary tables in
    float32; the ``dtype`` logits saved next to their float32 copy. Measured on a tiny Llama (h=256, b4 x 64): the
    trace equals the storages a real CPU autocast forward saves, to the byte.

    A forward's saved bytes are affine in the batch: a batch above 2 is extrapolated from traces at 1 and 2; and
    in the number of layers of a uniform stack: it is traced through its first three and four layers
    (:func:`layer_scaled_bytes`; ``scaled=False``: the whole stack).

    Args:
        config (`PretrainedConfig`): The causal LM's config.
        dtype (`torch.dtype`): The autocast dtype (``torch.bfloat16`` or ``torch.float16``).
        lora (`peft.LoraConfig`, `dict` or `None`, defaults to `None`): LoRA adapters (float32, cast too).
        batch_size (`int`, defaults to `1`): Sequences per step.
        seq_len (`int`, defaults to `512`): Tokens per sequence.

    Returns:
        `int`: the bytes (0 or more; the traces' difference, clamped at 0).
    """
    lcfg = lora_config(lora)

    def diff(b: int) -> int:
        return (_fake_saved_bytes(config, torch.float32, dtype, lcfg, b, seq_len, scaled)
                - _fake_saved_bytes(config, dtype, None, lcfg, b, seq_len, scaled))

    if batch_size <= 2:
        return max(0, diff(batch_size))
    one, two = diff(1), diff(2)
    return max(0, one + (batch_size - 1) * (two - one))


def bnb_quantizes(module: nn.Module) -> bool:
    """Whether transformers' bitsandbytes loading replaces ``module`` by a quantized layer (``Linear4bit`` /
    ``Linear8bitLt``), its name aside: a layer of type ``torch.nn.Linear`` exactly or GPT-2's ``Conv1D`` (whose weight
    it transposes first), the test of ``transformers.integrations.bitsandbytes.replace_with_bnb_linear``
    (``isinstance(module, Conv1D) or type(module) is nn.Linear``; transformers exposes no predicate of its own). A
    subclass of ``nn.Linear`` (Falcon's ``FalconLinear``) stays in full precision. The one rule of the estimator
    (:func:`quantized_weight_ids`) and of the loader's check (``lowmem.quant.check_some_layer_quantized``)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D) or type(module) is nn.Linear


def bnb_output_rows(module: nn.Module) -> int:
    """The output rows of the quantized layer bitsandbytes makes of ``module`` (:func:`bnb_quantizes`): an
    ``nn.Linear``'s ``out_features``, a ``Conv1D``'s weight ``(in, out)`` transposed: its columns. int8 keeps one
    float32 scale per row (:meth:`QuantSpec.weight_bytes`)."""
    from transformers.pytorch_utils import Conv1D

    return module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0]


def _bnb_input_features(module: nn.Module) -> int:
    from transformers.pytorch_utils import Conv1D

    return module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features


def modules_not_converted(model: nn.Module) -> list[str]:
    """The module names transformers' bitsandbytes quantizers keep in full precision, as their
    ``_process_model_before_weight_loading`` gathers them for ``replace_with_bnb_linear`` (no
    ``llm_int8_skip_modules``: lowmem's ``bnb_config`` sets none): ``get_keys_to_not_convert`` (the output head, tied
    weights, the last module) and the model class's ``_keep_in_fp32_modules``."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return sorted({*get_keys_to_not_convert(model), *(getattr(model, "_keep_in_fp32_modules", None) or ())})


def _converts(name: str, keep: list[str]) -> bool:
    """transformers' name test (``quantizers_utils.should_convert_module``, where this transformers has it)."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # (older transformers: a key equal to the name, a prefix or a suffix of it)
        return not any(name == k or name.endswith("." + k) or name.startswith(k + ".") for k in keep)
    return should_convert_module(name, keep)


def quantized_weight_ids(model: nn.Module) -> dict[int, str]:
    """The weights bitsandbytes would quantize, by ``id``: every layer transformers replaces (:func:`bnb_quantizes`:
    ``nn.Linear`` exactly, GPT-2's ``Conv1D``) except the modules it keeps in full precision
    (:func:`modules_not_converted`: the output head, tied weights, the last module, ``_keep_in_fp32_modules``).
    Empty when transformers would quantize nothing (:func:`check_some_layer_quantizable`)."""
    keep = modules_not_converted(model)
    return {id(mod.weight): name for name, mod in model.named_modules() if bnb_quantizes(mod) and _converts(name, keep)}


def nothing_quantized_error(model: nn.Module, quantization: Any, loaded: bool = True) -> ValueError:
    """The error of a quantization that quantizes no layer of ``model``, naming the model type, the quantization
    and the classes of its linear layers: the loader's (``lowmem.quant.check_some_layer_quantized``, ``loaded``) and
    the estimator's (:func:`check_some_layer_quantizable`, before anything loads)."""
    spec = QuantSpec.parse(quantization)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    subclasses = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.Linear) and not bnb_quantizes(m)})
    found = (f"this model's linear layers are {', '.join(subclasses)} (subclasses of nn.Linear)" if subclasses else
             "this model has no nn.Linear layer transformers quantizes (the output head stays full precision)")
    return ValueError(
        f"quantization={spec.quant_type!r} {'quantized' if loaded else 'would quantize'} no layer of this {model_type!r} "
        f"model ({type(model).__name__}): transformers' bitsandbytes loading replaces only layers of type torch.nn.Linear "
        f"exactly (and GPT-2's Conv1D), and {found}; LoRA would train on the full-precision base. Drop quantization "
        "(lora alone trains adapters on the full-precision model), or use a model whose layers are nn.Linear")


def check_some_layer_quantizable(model: nn.Module, quantization: Any) -> dict[int, str]:
    """:func:`quantized_weight_ids` of ``model`` (built from the config, not loaded), refusing none as the loader does.

    Raises:
        ValueError: transformers would quantize no layer (Falcon's ``FalconLinear`` layers): :func:`nothing_quantized_error`.
    """
    quantized = quantized_weight_ids(model)
    if not quantized:
        raise nothing_quantized_error(model, quantization, loaded=False)
    return quantized


def quantizes_something(model: Any) -> bool:
    """Whether bitsandbytes loading would quantize any layer of ``model`` (a name, path, config or instance, as
    :func:`estimate_memory` takes it): the budget search offers no quantized candidate of a model it would not."""
    meta = build_meta_model(resolve_config(model), torch.float32)
    return bool(quantized_weight_ids(meta))


#: linears fed the same input tensor (one attention's q/k/v, one MLP's gate/up): bitsandbytes' 8-bit layers hold it once
INT8_SHARED_INPUTS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def int8_held_input_bytes(model: nn.Module, quantized: dict[int, str], act_bytes: int, lora_dropout: float) -> dict[bool, int]:
    """Bytes per token of the inputs that bitsandbytes' 8-bit layers keep until the step's graph is freed, beyond what
    the activations count, ``{checkpointed: bytes}``.

    ``MatMul8bitFp`` (the CPU's training path) stores its input as a plain attribute of the autograd context
    (``ctx.A = A``) and ``MatMul8bitLt`` (CUDA) in ``ctx.tensors``, not through ``save_for_backward``: activation
    checkpointing cannot drop them, and the context lives with the graph (the loss holds it) to the end of the
    backward pass. So every quantized linear's input is live from its forward on: one tensor per distinct input
    (:data:`INT8_SHARED_INPUTS`: q/k/v share one, gate/up one) of ``in_features`` elements per token in the input's
    dtype. With checkpointing all of them count (the recomputation makes new tensors beside them); without it, only
    those no LoRA adapter saves already (an adapter of the input's dtype without dropout saves that same tensor).
    Measured (tiny Llama, 2 layers, LoRA r=8 all-linear, 1 x 64 tokens, checkpointed, CPU): the held inputs are the
    difference between an int8 base's activations and an NF4 base's.
    """
    groups = _int8_input_groups(model, quantized, act_bytes, lora_dropout)
    return {True: sum(f for f, _ in groups.values()) * act_bytes,
            False: sum(f for f, saved in groups.values() if not saved) * act_bytes}


def int8_kept_input_bytes(model: nn.Module, quantized: dict[int, str], act_bytes: int, lora_dropout: float,
                          layer: nn.Module) -> dict[str, int]:
    """Bytes per token, by input (``"qkv"``, ``"o_proj"``, ``"gate_up"``, ``"down_proj"``: :data:`INT8_SHARED_INPUTS`),
    of ``layer``'s 8-bit linears' inputs that their LoRA adapter saves: the activations count them as saved, freed at
    that linear's backward, but the 8-bit matmul's autograd context (``ctx.A``, :func:`int8_held_input_bytes`) keeps
    the same tensor to the end of the backward pass. Without checkpointing they are live at the layer's later moments
    and at every earlier layer's (``activations.llama_activation_bytes``' ``kept_inputs``). Measured (tiny Llama, LoRA
    r=8 all-linear, bf16, 4 x 96 tokens, CPU): the peak is inside the last layer's ``down_proj`` backward, its input
    (``e i`` per token) live beside the gradient of that input from the base branch, from the adapter's and their sum.
    """
    prefix = next(n for n, m in model.named_modules() if m is layer)
    groups = _int8_input_groups(model, quantized, act_bytes, lora_dropout)
    return {group: features * act_bytes for (parent, group), (features, saved) in groups.items()
            if saved and (parent == prefix or parent.startswith(prefix + "."))}


def _int8_input_groups(model: nn.Module, quantized: dict[int, str], act_bytes: int,
                       lora_dropout: float) -> dict[tuple[str, str], list]:
    """The 8-bit linears' distinct inputs, ``{(parent module, input): [in_features, saved by a LoRA adapter]}``
    (:func:`int8_held_input_bytes`)."""
    groups: dict[tuple[str, str], list] = {}
    for name, mod in model.named_modules():
        if not bnb_quantizes(mod) or id(mod.weight) not in quantized:
            continue
        path = name.removesuffix(".base_layer")
        parent, _, leaf = path.rpartition(".")
        wrapper = model.get_submodule(path) if path != name else mod
        adapters = getattr(wrapper, "lora_A", None)
        adapter = adapters["default"] if adapters is not None and "default" in adapters else None
        saved = adapter is not None and adapter.weight.element_size() == act_bytes and not lora_dropout
        group = groups.setdefault((parent, INT8_SHARED_INPUTS.get(leaf, leaf)), [0, False])
        group[0] = max(group[0], _bnb_input_features(mod))
        group[1] = group[1] or saved
    return groups


def lora_config(lora: Any):
    """A ``peft.LoraConfig`` from a config, a dict of its fields, or ``None``."""
    if lora is None:
        return None
    from peft import LoraConfig

    if isinstance(lora, LoraConfig):
        return lora
    if isinstance(lora, dict):
        try:
            return LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
        except TypeError:  # an unknown field: lowmem train's error, naming peft's (rank -> r) and the valid ones
            from ..train import lora_config as checked

            checked(lora)
            raise
    raise ValueError(f"lora={lora!r}: expected None, a peft.LoraConfig or a dict of its fields")


def _unique_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen, out = set(), []
    for n, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out


def optimizer_state_bytes(model: nn.Module, optimizer: str | None, optim_args: dict[str, Any] | None = None) -> tuple[int, str]:
    """State bytes of ``optimizer`` for the trainable parameters of a (meta) ``model``, and how
    they were obtained (``"exact"`` or ``"closed form"``)."""
    state, _, how = optimizer_memory(model, optimizer, optim_args)
    return state, how


def optimizer_memory(model: nn.Module, optimizer: str | None, optim_args: dict[str, Any] | None = None,
                     layerwise: bool = False, max_grad_norm: float | None = None) -> tuple[int, int, str]:
    """``(state bytes, step transient bytes, how)`` of ``optimizer``: :func:`optimizer_sizes`."""
    sizes = optimizer_sizes(model, optimizer, optim_args, layerwise, max_grad_norm)
    return sizes["state"], sizes["transient"], sizes["how"]


def optimizer_sizes(model: nn.Module, optimizer: str | None, optim_args: dict[str, Any] | None = None,
                    layerwise: bool = False, max_grad_norm: float | None = None) -> dict[str, Any]:
    """State and step transient of ``optimizer`` on the trainable parameters of a meta ``model``, or
    of one whose parameters are fake tensors of the run's device (:func:`on_fake_device`: the state is
    allocated as fake tensors of that device, and the transient is that device's). Engine optimizers
    size both themselves (``materialize_state()``, ``state_bytes()``, ``step_transient_bytes()``;
    ``layerwise``: that of one parameter stepped alone, ``step_transient_bytes(per_parameter=True)``,
    no multi-tensor buckets): ``how="exact"``. bitsandbytes optimizers have no meta-device support:
    their state comes from a closed form (``how="closed form"``) and their transient is, on the CPU, the largest
    parameter's kernel work at the measured bytes per element (:data:`~lowmem.optim.recipes.bnb.CPU_STEP_BYTES`,
    AUDMEM21 2), elsewhere 0 (their CUDA kernels update the state in place). ``max_grad_norm`` (`float` or `None`, defaults to `None`, as
    :class:`~lowmem.optim.layerwise.LayerwiseOptimizer`'s): layerwise mode's gradient clipping
    (``clip_mode="global_prev"``); ``None`` or 0: none.

    Returns:
        `dict`: ``state``, ``transient`` (bytes), ``how``, and ``kept_gemm``: the part of the transient
        that is MKL's GEMM packing buffer, kept by the library after a projected step's combine-back on
        CPU (the engine's ``_kept_gemm_bytes()``; not a torch tensor, so a live-tensor tracker does not
        see it; 0 elsewhere).
    """
    max_grad_norm = check_max_grad_norm(max_grad_norm)
    sized = _size_optimizer(model, optimizer, optim_args)
    _emit(sized["messages"], stacklevel=3)
    return _pick(sized, layerwise, max_grad_norm)


def check_max_grad_norm(max_grad_norm: float | None) -> float | None:
    """``max_grad_norm`` as layerwise mode uses it: ``None`` or 0 (the Trainer's "no clipping", which
    LowMemTrainer passes on as ``max_grad_norm or None``) -> ``None``, else a finite float > 0.

    Raises:
        ValueError: Anything else (negative, infinite, NaN, not a number), naming the field."""
    if max_grad_norm is None or (not isinstance(max_grad_norm, bool) and max_grad_norm == 0):
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not (
            max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"Invalid max_grad_norm={max_grad_norm!r}: expected None, 0 (no clipping) or a finite number > 0")
    return float(max_grad_norm)


def _pick(sized: dict[str, Any], layerwise: bool, max_grad_norm: float | None = None) -> dict[str, Any]:
    """:func:`optimizer_sizes`' answer from a :func:`_size_optimizer` record, for ``layerwise`` or not; in layerwise
    mode with the hooks' gradient clipping at ``max_grad_norm`` (``None``: none), ``clip_mode="global_prev"`` as
    :class:`~lowmem.trainers.LowMemTrainer` runs it."""
    parts = sized.get("layerwise_parts") if layerwise else None
    transient = _layerwise_transient(parts, max_grad_norm) if parts is not None else sized["transient"][bool(layerwise)]
    before = sized.get("transient_with_activations") if layerwise else None
    later = sized.get("transient_after_head") if layerwise else None
    # layerwise: each parameter's step (as the hook runs it) by its gradient's bytes, for the traced moments
    by_size = ({size: _layerwise_transient({**before, "per_parameter": v}, max_grad_norm) for size, v in before["by_size"].items()}
               if before is not None and "by_size" in before else None)
    steady = ({size: _layerwise_transient({**before, "per_parameter": v}, max_grad_norm)
               for size, v in before["steady_by_size"].items()}
              if before is not None and "steady_by_size" in before else None)
    return {"state": sized["state"], "transient": transient, "how": sized["how"], "kept_gemm": sized["kept_gemm"],
            "kept_tables": sized.get("kept_tables", 0), "steps_by_gradient_bytes": by_size,
            "steady_steps_by_gradient_bytes": steady,
            "kept_step_count": sized.get("kept_step_count", 0),
            "foreach_scalars": 0 if layerwise else sized.get("foreach_scalars", 0),
            "transient_first_step": None if layerwise else sized.get("transient_first_step"),
            "svd_mkl": 0 if layerwise else sized.get("svd_mkl", 0),
            "svd_lapack": 0 if layerwise else sized.get("svd_lapack", 0),
            "svd_refresh": bool(sized.get("svd_refresh")),
            "blas_workspace": sized.get("blas_workspace_layerwise", 0) if layerwise else sized.get("blas_workspace", 0),
            "transient_with_activations": _layerwise_transient(before, max_grad_norm) if before is not None else None,
            "transient_after_head": _layerwise_transient(later, max_grad_norm) if later is not None else None,
            "head_transient": _layerwise_transient(later["head"], max_grad_norm) if later is not None else None}


def _transient_before_input_embedding(model: nn.Module, opt: Any, kept_gemm: int) -> dict[str, Any] | None:
    """Layerwise mode: the largest per-parameter step transient of the parameters other than the input embedding
    (plus MKL's kept buffer, as ``step_transient_bytes``). The input embedding's gradient is the backward pass's
    last, so it steps when the activations are freed (a tied head too: its two gradients are summed first);
    every other parameter steps while activations are live. ``None``: the input embedding does not train here,
    or the engine's per-parameter report cannot be split (its ``step_transient_bytes(per_parameter=True)`` holds).
    Returned as :func:`_layerwise_parts` (the clipping is applied by :func:`_layerwise_transient`)."""
    return _transient_without(model, opt, kept_gemm, with_head=True)


def _transient_without(model: nn.Module, opt: Any, kept_gemm: int, with_head: bool) -> dict[str, Any] | None:
    """:func:`_transient_before_input_embedding`, and with ``with_head=False`` without an untied output head's step
    either (the first in the backward pass, right after the loss's moment: the later parameters' steps are live with
    the later moments' activations); ``None`` also when there is no such head."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is None or not weight.requires_grad or not hasattr(opt, "_param_transient_bytes"):
        return None
    head = getattr(model.get_output_embeddings(), "weight", None) if hasattr(model, "get_output_embeddings") else None
    if not with_head and (head is None or head is weight or not head.requires_grad):
        return None
    worst, found, grads, own = 0, False, [], 0
    by_size: dict[int, int] = {}  # gradient bytes -> the largest step of a parameter with a gradient of that size
    # (and without a projection refresh: a subspace recipe's last micro-batch with accumulation, whose refresh ran at
    # the window's first, LayerwiseOptimizer._on_gradient)
    steady_by_size: dict[int, int] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if p is weight:
                found = True
            elif p is head and not with_head:  # its own step, apart
                own = opt._param_transient_bytes(p, group, opt.state[p]) if opt.state[p] else 0
                continue
            elif opt.state[p]:
                step = opt._param_transient_bytes(p, group, opt.state[p])
                worst = max(worst, step)
                size = p.numel() * p.element_size()
                by_size[size] = max(by_size.get(size, 0), step)
                steady = opt._param_transient_bytes(p, group, opt.state[p], steady=True)
                steady_by_size[size] = max(steady_by_size.get(size, 0), steady)
                grads.append((p.numel(), p.dtype, p.is_contiguous()))
    # (with the hook's non-finite check, as LayerwiseOptimizer.step_transient_bytes)
    out = {"per_parameter": kept_gemm + worst, "grads": grads, "kept": kept_gemm, "device_type": weight.device.type,
           "by_size": {size: kept_gemm + step for size, step in by_size.items()},
           "steady_by_size": {size: kept_gemm + step for size, step in steady_by_size.items()}}
    if not with_head:  # the head's own step (the same hook around it)
        out["head"] = {**out, "per_parameter": kept_gemm + own}
    return out if found else None


def _kept_table_bytes(opt: Any) -> int:
    """The tables the moment rule's codecs make at the first step that codes a moment and keep for the process
    (:meth:`~lowmem.optim.quantized.Quantized.cached_bytes`: on the CPU the 8-bit table quantizer's 64 KiB point
    table and the map, 4-bit the maps and lookup tables; a few KiB elsewhere), once per device. Not state, and not in
    ``step_transient_bytes()`` (a later step allocates none of them): counted with the step's transient (the tracker
    sees them made inside ``optimizer.step()``) and, being kept, at every later moment (:func:`peak_total`'s
    ``kept_with_activations``). 0 for a moment rule without codecs."""
    cached = getattr(getattr(getattr(opt, "recipe", None), "moment", None), "cached_bytes", None)
    if cached is None:
        return 0
    by_device: dict[Any, list] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            by_device.setdefault(p.device, []).append(opt.state[p])
    return sum(cached(states, device) for device, states in by_device.items())


def _foreach_scalar_bytes(opt: Any) -> int:
    """The 0-d CPU tensors Lion's multi-tensor direction reads ``beta1`` and ``beta2`` from
    (:func:`~lowmem.optim.functional.lion.lion_direction_foreach`: ``subset_norm.cpu_scalar`` of the momenta's dtype,
    float32 for a bfloat16 momentum's float32 copy), 4 B per value and dtype over the CPU parameters on the multi-tensor
    path: made by the first step and kept by value (``subset_norm._CPU_SCALARS``), or, under a dispatch mode (the
    measurement's tracker), made anew by each direction and alive beside its directions. Not dispatched operations'
    outputs where they are kept, so ``step_transient_bytes()`` leaves them out; added to the step's transient (before
    2026-12-01 left out: ``measure_memory("tiny", optimizer="lion", dtype="fp32")``'s transient measured 332,296 B for
    332,288 estimated). 0 for other rules (the per-parameter step, layerwise mode, passes Python numbers)."""
    from ..optim.recipes.lion import LionMoments

    if not isinstance(getattr(getattr(opt, "recipe", None), "moment", None), LionMoments):
        return 0
    keys: set[tuple[float, torch.dtype]] = set()
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            m = state.get("exp_avg")
            if p.device.type != "cpu" or m is None or not opt._foreach_ok(p, group, state=state):
                continue
            dtype = m.dtype if m.dtype in (torch.float32, torch.float64) else torch.float32
            keys |= {(float(group["betas"][0]), dtype), (float(group["betas"][1]), dtype)}
    return sum(torch.empty((), dtype=d, device="meta").element_size() for _, d in keys)


def _layerwise_parts(opt: Any, tables: int = 0) -> dict[str, Any]:
    """What :meth:`~lowmem.optim.layerwise.LayerwiseOptimizer.step_transient_bytes` computes its answer from, for the
    engine optimizer ``opt``: its per-parameter step (``step_transient_bytes(per_parameter=True)``), the gradients
    ``(numel, dtype, contiguous)``, MKL's kept buffer and the parameters' device type (the clipping coefficient's
    device copy); with the codecs' kept ``tables`` (:func:`_kept_table_bytes`) in every phase."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {"per_parameter": opt.step_transient_bytes(per_parameter=True) + tables,
            "grads": [(p.numel(), p.dtype, p.is_contiguous()) for p in params],
            "kept": (opt._kept_gemm_bytes() if hasattr(opt, "_kept_gemm_bytes") else 0) + tables,
            "device_type": params[0].device.type if params else "cpu"}


def _layerwise_transient(parts: dict[str, Any], max_grad_norm: float | None = None) -> int:
    """Layerwise mode's step transient from :func:`_layerwise_parts`: what
    :meth:`~lowmem.optim.layerwise.LayerwiseOptimizer.step_transient_bytes` reports for
    ``LayerwiseOptimizer(..., max_grad_norm=max_grad_norm, clip_mode="global_prev")`` (LowMemTrainer's layerwise
    mode; ``None``: no clipping): the per-parameter step next to the hook's non-finite check and the clipping
    coefficient (:func:`~lowmem.optim.layerwise.layerwise_transient_bytes`, the same function)."""
    from ..optim.layerwise import layerwise_transient_bytes

    return layerwise_transient_bytes(parts["per_parameter"], parts["grads"], parts["kept"], max_grad_norm, "global_prev",
                                     parts["device_type"])


def _size_optimizer(model: nn.Module, optimizer: str | None, optim_args: dict[str, Any] | None,
                    embeddings_32bit: bool = False) -> dict[str, Any]:
    """Everything :func:`optimizer_sizes` learns from one sizing, for both stepping modes: ``state``,
    ``transient`` (``{False: bucketed step, True: per parameter}``), ``how``, ``kept_gemm``, ``frozen``
    (names of the parameters the optimizer set ``requires_grad=False``: BAdam's inactive blocks) and
    ``messages`` (its warnings, summarized; not yet emitted). The state does not depend on the stepping
    mode (``create_optimizer`` is not told it), so one sizing serves both. ``embeddings_32bit``: every
    ``nn.Embedding`` weight's state 32-bit, as the Hugging Face 8-bit ``optim`` names run
    (:func:`resolve_optimizer_name`): an engine recipe built over
    :func:`~lowmem.optim.registry.full_precision_embedding_groups`, a bitsandbytes one's closed form with those
    weights at 32 bits (``register_module_override(..., {"optim_bits": 32})``)."""
    if optimizer is None:
        return {"state": 0, "transient": {False: 0, True: 0}, "how": "none", "kept_gemm": 0, "kept_tables": 0, "frozen": (),
                "messages": []}
    from ..optim import create_optimizer, get_entry

    entry = get_entry(optimizer)
    if entry.recipe is None:
        from ..optim.recipes.bnb import state_bytes_closed_form, step_transient_closed_form

        # (sized in closed form, without the constructor: its check of the names here, create_optimizer's message)
        unknown = sorted(set(optim_args or {}) - set(entry.valid_hparams()))
        if unknown:
            raise ValueError(f"Unknown hyperparameter(s) {unknown} for optimizer {entry.name!r}; valid: {entry.valid_hparams()}"
                             + (" (bf16_stochastic_round / kahan_summation are engine optimizers' options)"
                                if set(unknown) & {"bf16_stochastic_round", "kahan_summation"} else ""))

        trainable = [p for _, p in _unique_params(model) if p.requires_grad]
        state = state_bytes_closed_form(entry.name, trainable, **(optim_args or {}))
        # (bitsandbytes' CPU kernels' float32 work of the largest parameter, measured per element: AUDMEM21 2; 0 on CUDA)
        transient = step_transient_closed_form(entry.name, trainable, **(optim_args or {}))
        if embeddings_32bit:  # those weights' state at 32 bits (no 8-bit block of theirs: min_8bit_size above them)
            from ..optim.registry import embedding_weights

            embeds = {id(w) for w in embedding_weights(model)}
            kept = [p for p in trainable if id(p) not in embeds]
            full = [p for p in trainable if id(p) in embeds]
            state = (state_bytes_closed_form(entry.name, kept, **(optim_args or {}))
                     + state_bytes_closed_form(entry.name, full, min_8bit_size=1 + max((p.numel() for p in full), default=0)))
            transient = max(step_transient_closed_form(entry.name, kept, **(optim_args or {})),  # (their 32-bit kernel)
                            step_transient_closed_form(entry.name, full, min_8bit_size=1 + max((p.numel() for p in full), default=0)))
        return {"state": state, "transient": {False: transient, True: transient},
                "how": "closed form", "kept_gemm": 0, "kept_tables": 0, "frozen": (), "messages": []}
    before = [(n, p) for n, p in _unique_params(model) if p.requires_grad]
    with warnings.catch_warnings(record=True) as created:  # (the engine's "rank >= smaller side": kept below)
        warnings.simplefilter("always")
        if embeddings_32bit:
            from ..optim.registry import full_precision_embedding_groups

            groups = full_precision_embedding_groups(model, entry.name, **(optim_args or {}))
            opt = create_optimizer(groups, entry.name, **(optim_args or {}))
        else:
            opt = create_optimizer(model, entry.name, **(optim_args or {}))
    with warnings.catch_warnings(record=True) as caught, _sizing_mode(model):  # the engine warns per parameter
        warnings.simplefilter("always")
        opt.materialize_state()
        tables = _kept_table_bytes(opt)  # (the codecs' tables, kept from the first step on: in every phase)
        scalars = _foreach_scalar_bytes(opt)  # (Lion's 0-d betas on the CPU: the multi-tensor step's)
        sizes = {"state": opt.state_bytes(),
                 "transient": {False: opt.step_transient_bytes(per_parameter=False) + tables + scalars},
                 "layerwise_parts": _layerwise_parts(opt, tables),
                 "how": "exact", "kept_gemm": opt._kept_gemm_bytes() if hasattr(opt, "_kept_gemm_bytes") else 0,
                 "kept_tables": tables,
                 "foreach_scalars": scalars,
                 # torch's fused AdamW kernel's step count, a float32 0-d tensor per device that the step makes and
                 # functional.adam keeps to the next step (_step_tensor): in the transient (kept and new), and live at
                 # every later moment, the activations' included
                 "kept_step_count": opt._fused_step_bytes() if hasattr(opt, "_fused_step_bytes") else 0,
                 # an exact SVD refreshes a projection (GaLore, Fira, ...): counted as LAPACK's gesdd holds it
                 "svd_refresh": any(g.get("projection") in ("svd", "online_pca") and g.get("rank")
                                    for g in opt.param_groups)}
        # the step that makes the state (a run without materialize_state(): the Trainer's, `lowmem train`'s first
        # step), LowMemOptimizer.step_transient_bytes(first_step=True): equal to the default for AdamW since session
        # 18 (the fused route decided from the state the step makes), kept for a rule whose first step differs
        first = getattr(opt, "step_transient_bytes", None)
        sizes["transient_first_step"] = (first(per_parameter=False, first_step=True) + tables + scalars
                                         if "first_step" in inspect.signature(first).parameters else None)
        from ..optim.functional.galore import svd_mkl_left_out

        with svd_mkl_left_out():  # MKL's SVD buffers (AMD CPU): in the transient, not torch tensors
            without_mkl = opt.step_transient_bytes(per_parameter=False)
            sizes["svd_mkl"] = sizes["transient"][False] - without_mkl - tables - scalars
            from ..optim.functional.galore import svd_workspace_left_out

            with svd_workspace_left_out():  # LAPACK's copy of G and its workspace, inside the SVD kernel: not tensors
                sizes["svd_lapack"] = without_mkl - opt.step_transient_bytes(per_parameter=False)
        from ..optim.functional.muon import bf16_workspace_left_out

        with bf16_workspace_left_out():  # the bfloat16 products' BLAS workspace (Muon): not torch tensors
            sizes["blas_workspace"] = (sizes["transient"][False] - opt.step_transient_bytes(per_parameter=False) - tables
                                       - scalars)
            # layerwise: one parameter's step holds it too (tiny Mixtral bf16 muon: 3,055,616 B of a 3,743,744 B step,
            # 688,128 of tensors, as traced): named, as the whole step's, so that a measurement of live tensors
            # leaves it out (before, layerwise named none: muon layerwise 1.87 of the tracked peak with no term named)
            sizes["blas_workspace_layerwise"] = opt.step_transient_bytes(per_parameter=True)
        sizes["blas_workspace_layerwise"] = opt.step_transient_bytes(per_parameter=True) - sizes["blas_workspace_layerwise"]
        kept = sizes["kept_gemm"] + tables
        sizes["transient_with_activations"] = _transient_before_input_embedding(model, opt, kept)
        sizes["transient_after_head"] = _transient_without(model, opt, kept, with_head=False)
    sizes["transient"][True] = _layerwise_transient(sizes["layerwise_parts"])  # (without clipping)
    caught = [w for w in created if "smaller side" in str(w.message)] + caught
    sizes["frozen"] = tuple(n for n, p in before if not p.requires_grad)
    sizes["accumulated"] = _layerwise_accumulated(opt, before)
    sizes["messages"] = _summarize_warnings(caught)
    return sizes


def _layerwise_accumulated(opt: Any, named: list[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """What :class:`~lowmem.optim.layerwise.LayerwiseOptimizer` with ``accumulation_steps > 1`` keeps of each trainable
    parameter between a window's micro-batches, by name: the ``r x n`` float32 subspace accumulator
    (``LayerwiseOptimizer._low``, :meth:`~lowmem.optim.engine.LowMemOptimizer.project`'s output, ``low_shape`` per
    matrix) of a projected parameter when the recipe accumulates in the subspace (no residual: ``not
    recipe.combine.needs_full_gradient and not recipe.stabilizers``, as ``LayerwiseOptimizer._subspace_accumulation``);
    else its full gradient in ``.grad`` (the parameter's dtype). Names the optimizer does not step are left out."""
    recipe = getattr(opt, "recipe", None)
    subspace = recipe is not None and not recipe.combine.needs_full_gradient and not recipe.stabilizers
    names = {id(p): n for n, p in named}
    out: dict[str, int] = {}
    for group in getattr(opt, "param_groups", []):
        for p in group["params"]:
            if id(p) not in names:
                continue
            if subspace and opt._is_projected(p, group):
                low = recipe.projection.low_shape(p.shape[-2:], group)
                out[names[id(p)]] = math.prod(p.shape[:-2]) * math.prod(low) * 4  # (project: float32)
            else:
                out[names[id(p)]] = p.numel() * p.element_size()
    return out


def _emit(messages: list[str], stacklevel: int) -> None:
    """Warn each message once per process (``stacklevel`` counted from the caller of :func:`_emit`)."""
    for message in messages:
        if message not in _WARNED:  # once per process: catch_warnings resets Python's own once-registry
            _WARNED.add(message)
            warnings.warn(message, stacklevel=stacklevel + 1)


#: The active :func:`sizing_cache` (``None``: none; every estimate sizes its optimizer)
_SIZING_CACHE: dict[tuple, dict[str, Any]] | None = None


@contextlib.contextmanager
def sizing_cache():
    """Within this context, :func:`estimate_memory` sizes an optimizer once per :func:`sizing_key` and
    re-uses the result (state, both step transients, the parameters it freezes, its warnings): the
    budget search's candidates share it. Nested uses share the outer cache; on exit it is dropped, so
    nothing outlives the context (a changed environment, e.g. MKL, is seen by the next one).

    Yields:
        `dict`: The cache, ``sizing_key -> sizing`` (for inspection).
    """
    global _SIZING_CACHE
    outer = _SIZING_CACHE
    if outer is None:
        _SIZING_CACHE = {}
    try:
        yield _SIZING_CACHE
    finally:
        _SIZING_CACHE = outer


def sizing_key(model: nn.Module, optimizer: str | None, optim_args: dict[str, Any] | None, device: str) -> tuple:
    """What an optimizer's sizing depends on: its name and hyperparameters, the device, the model's config
    (Adam-mini's head size) and its trainable parameters' ``(name, shape, dtype)`` (full fine-tuning or
    LoRA, the LoRA rank and targets). Not the batch, sequence length, checkpointing, activations, frozen
    weights (4-bit or not) or the stepping mode (both transients are kept)."""
    config = getattr(model, "config", None)
    trainable = tuple((n, tuple(p.shape), p.dtype) for n, p in _unique_params(model) if p.requires_grad)
    return (optimizer, repr(sorted((optim_args or {}).items())), device,
            config.to_json_string(use_diff=False) if config is not None else None, trainable)


_WARNED: set[str] = set()


def _summarize_warnings(caught: list) -> list[str]:
    """Distinct warning messages, the engine's per-parameter "rank >= smaller side" ones folded into one line."""
    import re

    shapes, ranks, others = [], set(), []
    for w in caught:
        text = str(w.message)
        m = re.search(r"rank (\d+) >= smaller side of a (\(.*?\)) parameter", text)
        if m:
            ranks.add(m.group(1))
            if m.group(2) not in shapes:
                shapes.append(m.group(2))
        elif text not in others:
            others.append(text)
    if shapes:  # no optimizer name: one line for all the subspace optimizers at this rank
        others.insert(0, f"rank {'/'.join(sorted(ranks))} >= the smaller side of the {', '.join(shapes)} parameters: "
                         "subspace optimizers keep their state full-rank there (as in training)")
    return others


def state_bytes_at_scale(optimizer: str, model: Any = "llama-2-7b", **optim_args: Any) -> dict[str, Any]:
    """Exact optimizer-state size of ``optimizer`` on a real-scale model, with nothing allocated.

    The model (a named shape such as ``"llama-2-7b"``, a local directory or a config) is built on the
    meta device and the optimizer sizes its own state there (:func:`optimizer_state_bytes`).

    Returns:
        `dict`: ``optimizer``, ``model``, ``trainable_params``, ``state_bytes``, ``bytes_per_param``,
        ``how`` (``"exact"``, or ``"closed form"`` for bitsandbytes optimizers).
    """
    meta = build_meta_model(resolve_config(model), torch.float32)
    n = sum(p.numel() for _, p in _unique_params(meta) if p.requires_grad)
    sb, how = optimizer_state_bytes(meta, optimizer, optim_args)
    return {"optimizer": optimizer, "model": model_label(model), "trainable_params": n, "state_bytes": sb,
            "bytes_per_param": sb / n, "how": how}


def generation_parts(config: Any, generation_batch: int, seq_len: int, prompt_len: int, act_bytes: int,
                     one_layer: Any) -> dict[str, int]:
    """Bytes of ``model.generate`` on ``generation_batch`` prompts of ``prompt_len`` tokens up to ``seq_len`` tokens
    (GRPO's generation, no gradients): the larger of the prompt's forward (``one_layer(batch, tokens)``: a no-grad
    forward's peak inside one layer's MLP, :func:`~lowmem.memory.activations.nograd_layer_bytes`, plus the prompt's
    KV cache) and the end of decoding (the
    KV cache of ``seq_len`` tokens, keys and values of every layer in the activations' dtype, plus one layer's key or
    value tensor being concatenated: transformers' ``DynamicCache`` grows by ``torch.cat``).

    Returns:
        `dict[str, int]`: ``generation`` (the phase's bytes), ``kv_cache`` (at the end), ``prefill``.
    """
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * layers * kv_heads * head_dim * act_bytes  # keys and values, every layer
    kv_cache = generation_batch * seq_len * per_token
    prefill = one_layer(generation_batch, prompt_len) + generation_batch * prompt_len * per_token
    decode = kv_cache + kv_cache // (2 * max(layers, 1))
    return {"generation": max(prefill, decode), "kv_cache": kv_cache, "prefill": prefill}



class _LiveStorages:
    """A ``TorchDispatchMode`` (made on first use) that follows every storage the ops under it return, weakly, and
    keeps the peak of their sum; the storages of ``existing`` (parameters, buffers) are not counted."""

    @staticmethod
    def make(existing):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode

        class Live(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live, self.peak = {}, 0
                self.existing = {StorageWeakRef(t.untyped_storage()) for t in existing}

            def now(self) -> int:
                for key in [k for k in self.live if k.expired()]:
                    del self.live[key]
                return sum(self.live.values())

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for o in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(o, torch.Tensor):
                        key = StorageWeakRef(o.untyped_storage())
                        if key not in self.existing:
                            self.live.setdefault(key, o.untyped_storage().nbytes())
                self.peak = max(self.peak, self.now())
                return out

        return Live()


def generation_trace_bytes(config: Any, autocast: torch.dtype, generation_batch: int, seq_len: int, prompt_len: int,
                           lora: Any = None) -> dict[str, int]:
    """Bytes of GRPO's generation (``model.generate`` without gradients) under ``torch.autocast(autocast)`` over the
    float32 model of ``config`` (TRL's ``bf16=True``: accelerate's autocast wrapper stays on the unwrapped model's
    forward, one autocast region per forward call), from the model's own code on fake CPU tensors (nothing is
    allocated): every storage the ops return, followed until freed, parameters excluded.

    What autocast changes against :func:`generation_parts`: within each forward the ``dtype`` copy of every weight it
    casts stays in autocast's weight cache until the forward returns (:func:`autocast_cast_bytes`); the residual
    stream and the norms stay float32; the rotated keys are float32 (rotary ``cos`` / ``sin`` tables in the float32
    hidden states' dtype) and so are the values (``DynamicCache`` starts each layer with empty tensors of the keys'
    dtype and ``torch.cat`` promotes): the KV cache is float32, twice that of a pure ``dtype`` run.

    Two moments, as in :func:`generation_parts`: the prompt's forward (``generation_batch x prompt_len`` tokens, with
    ``position_ids`` per sequence, as ``generate`` passes them: per-sequence rotary tables) and the last decoding step
    (one token per sequence over a cache of ``seq_len - 2`` tokens, the cache growing by ``torch.cat``).
    Measured against ``model.generate`` under accelerate's wrapper (tiny Llama, every live storage): 0.97-0.99.

    Returns:
        `dict[str, int]`: ``generation`` (the larger moment), ``prefill``, ``decode`` and ``kv_cache`` (the cache
        after the last step).

    Raises:
        ValueError: The model's forward cannot run on fake tensors (the message names the model type).
    """
    from .activations import traced_experts

    model = build_meta_model(config, torch.float32)
    lcfg = lora_config(lora)
    if lcfg is not None:
        from peft import get_peft_model

        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = get_peft_model(model, lcfg)
    on_fake_cpu(model)
    model.train()  # TRL generates with the policy as it trains (no eval())
    existing = [*model.parameters(), *model.buffers()]

    def forward(ids, cache, positions):
        with torch.autocast("cpu", dtype=autocast):
            model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)

    from transformers import DynamicCache

    b = generation_batch
    try:
        with _sizing_mode(model), torch.no_grad(), traced_experts(model):  # fused experts: the model's own kernel
            live = _LiveStorages.make(existing)
            with live:
                ids = torch.zeros(b, prompt_len, dtype=torch.long)
                forward(ids, DynamicCache(config=config), torch.zeros(b, prompt_len, dtype=torch.long))
                del ids
            prefill = live.peak
            live = _LiveStorages.make(existing)
            with live:
                cache = DynamicCache(config=config)
                forward(torch.zeros(b, seq_len - 2, dtype=torch.long), cache, torch.zeros(b, seq_len - 2, dtype=torch.long))
                live.peak = live.now()  # the cache of seq_len - 2 tokens: the prompt forward's working set is freed
                forward(torch.zeros(b, 1, dtype=torch.long), cache, torch.zeros(b, 1, dtype=torch.long))
            decode = live.peak
            kv_cache = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))
    except Exception as exc:  # noqa: BLE001  (what the model's code raised on fake tensors, re-raised with its name)
        raise ValueError(f"the autocast generation of model_type={getattr(config, 'model_type', None)!r} cannot be traced "
                         f"on fake tensors ({type(exc).__name__}: {exc}); its GRPO memory cannot be estimated") from exc
    return {"generation": max(prefill, decode), "prefill": prefill, "decode": decode, "kv_cache": kv_cache}


#: ``estimate_memory(trainer=...)``: the training loops whose memory differs (``None``: a plain causal-LM loss)
TRAINERS = (None, "sft", "dpo", "grpo")
#: ``estimate_memory(reference=...)``: how the reference model of DPO / GRPO is held
REFERENCES = ("copy", "adapter", "none")


def check_trainer(trainer: str | None, reference: str | None, generation_batch_size: int | None,
                  max_completion_length: int | None, gradient_checkpointing: bool | None, lora: bool, batch_size: int,
                  seq_len: int, gradient_accumulation_steps: int) -> tuple[bool, str, int | None, int | None]:
    """Validate :func:`estimate_memory`'s trainer fields and resolve their defaults (TRL 1.16's).

    Returns:
        `tuple`: ``(gradient_checkpointing, reference, generation_batch_size, max_completion_length)``, resolved.

    Raises:
        ValueError: A value outside its valid range, naming the field (see :func:`estimate_memory`).
    """
    if trainer not in TRAINERS:
        raise ValueError(f"Invalid trainer={trainer!r}: expected one of {list(TRAINERS)} (GVPO / BNPO: 'grpo')")
    if gradient_checkpointing is None:
        gradient_checkpointing = trainer is not None  # TRL's configs default to True, transformers' Trainer to False
    elif not isinstance(gradient_checkpointing, bool):
        raise ValueError(f"Invalid gradient_checkpointing={gradient_checkpointing!r}: expected True, False or None")
    if reference is not None and reference not in REFERENCES:
        raise ValueError(f"Invalid reference={reference!r}: expected one of {list(REFERENCES)} or None (the trainer's default)")
    if trainer not in ("dpo", "grpo"):
        if reference not in (None, "none"):
            raise ValueError(f"reference={reference!r} needs trainer='dpo' or 'grpo' (trainer={trainer!r} has no reference model)")
        reference = "none"
    elif reference is None:
        reference = ("adapter" if lora else "copy") if trainer == "dpo" else "none"
    if reference == "adapter" and not lora:
        raise ValueError("reference='adapter' needs lora (the reference is the policy with its adapter disabled); "
                         "use reference='copy' for a separate reference model")
    for name, value in (("generation_batch_size", generation_batch_size), ("max_completion_length", max_completion_length)):
        if value is None:
            continue
        if trainer != "grpo":
            raise ValueError(f"{name}={value!r} needs trainer='grpo' (trainer={trainer!r} does not generate)")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}={value!r}: expected an integer >= 1 or None")
    if trainer == "grpo":
        if generation_batch_size is None:
            generation_batch_size = batch_size * gradient_accumulation_steps
        if max_completion_length is None:
            max_completion_length = 256 if seq_len > 256 else seq_len - 1
        if not 1 <= max_completion_length < seq_len:
            raise ValueError(f"Invalid max_completion_length={max_completion_length!r}: expected 1 <= max_completion_length "
                             f"< seq_len={seq_len} (seq_len is prompt + completion; the prompt needs a token)")
    return gradient_checkpointing, reference, generation_batch_size, max_completion_length


def resolve_optimizer_name(optimizer: str | None, layerwise: bool = False) -> tuple[str | None, bool, bool]:
    """``(registered name, layerwise, embeddings_32bit)`` for a registered optimizer name or a Hugging Face ``optim``
    name as ``lowmem train`` maps it (:func:`lowmem.train.resolve_optim_name`; ``<name>_layerwise`` sets
    ``layerwise``). ``embeddings_32bit``: the name is one of the Hugging Face 8-bit names whose runs keep every
    ``nn.Embedding`` weight's state 32-bit (:data:`lowmem.train.HF_EMBEDDINGS_32BIT`, as transformers' Trainer), not
    in layerwise mode (``lowmem train`` sets ``lowmem_embeddings_32bit`` only without it). A registered name is taken
    as is (``lion8bit``: the embeddings quantized too)."""
    if optimizer is None:
        return None, layerwise, False
    from ..optim import list_optimizers

    if isinstance(optimizer, str) and optimizer.strip().lower().replace("-", "_") in list_optimizers():
        return optimizer, layerwise, False
    from ..config import ConfigError
    from ..train import hf_keeps_embeddings_32bit, resolve_optim_name

    try:
        name, hf_layerwise = resolve_optim_name(optimizer)
    except (ConfigError, AttributeError):  # not a name at all, or neither kind: the registry's own message
        return optimizer, layerwise, False
    layerwise = layerwise or hf_layerwise
    base = optimizer.strip().lower().replace("-", "_").removesuffix("_layerwise")
    return name, layerwise, hf_keeps_embeddings_32bit(base) and not layerwise


def estimate_memory(
    model: Any,
    optimizer: str | None = "adamw",
    optim_args: dict[str, Any] | None = None,
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: str | torch.dtype = "bf16",
    quantization: Any = None,
    lora: Any = None,
    gradient_checkpointing: bool | None = False,
    layerwise: bool = False,
    native_gqa: bool = True,
    device: str = "cuda",
    gradient_accumulation_steps: int = 1,
    trainer: str | None = None,
    reference: str | None = None,
    generation_batch_size: int | None = None,
    max_completion_length: int | None = None,
    max_grad_norm: float | None = 1.0,
    padding_free: bool = False,
    ddp: bool = False,
    gradient_as_bucket_view: bool = False,
) -> MemoryEstimate:
    """Estimate the memory of one training step, by component, allocating nothing.

    Args:
        model (`str`, `PretrainedConfig` or `nn.Module`): A named shape (see
            :func:`~lowmem.memory.shapes.list_shapes`, e.g. ``"llama-2-7b"``), a local model
            directory (only ``config.json`` is read), a config, or a model instance (built from its ``.config`` with
            its own parameters' dtypes and frozen flags: :func:`mirror_instance`; a peft model's adapter as ``lora=``).
        optimizer (`str` or `None`, defaults to `"adamw"`): A registered optimizer name
            (``lowmem.list_optimizers()``), or a Hugging Face ``optim`` name as ``lowmem train`` maps it
            (:func:`resolve_optimizer_name`: ``lion_8bit``, ``adamw_8bit``, ... keep the ``nn.Embedding`` weights'
            state 32-bit, as transformers' Trainer; ``<name>_layerwise`` steps layerwise); ``None`` counts no
            optimizer state.
        optim_args (`dict` or `None`, defaults to `None`): Its hyperparameters, e.g. ``{"rank": 128}``;
            they change the state size exactly as in training.
        batch_size (`int`, defaults to `1`): Sequences per step per device.
        seq_len (`int`, defaults to `512`): Tokens per sequence.
        dtype (`str` or `torch.dtype`, defaults to `"bf16"`): Parameter dtype (``"bf16"``,
            ``"fp16"``, ``"fp32"``); also the activations' dtype, except for quantized models.
        quantization (`str`, `dict`, `QuantSpec`, `BitsAndBytesConfig` or `None`, defaults to `None`):
            4-bit (``"nf4"``/``"fp4"``) or 8-bit (``"int8"``, LLM.int8) base weights, see :class:`QuantSpec`. Implies peft's
            ``prepare_model_for_kbit_training``: non-quantized float16/bfloat16 parameters become
            float32 (hence float32 hidden states too). Needs ``lora``.
        lora (`peft.LoraConfig`, `dict` or `None`, defaults to `None`): LoRA adapters (peft's
            ``get_peft_model`` runs on the meta model; adapters are float32, as peft makes them).
        gradient_checkpointing (`bool` or `None`, defaults to `False`): Per-layer activation checkpointing. ``None``:
            the trainer's default, ``True`` for TRL's (``SFTConfig``, ``DPOConfig``, ``GRPOConfig`` turn it on),
            ``False`` without ``trainer``.
        layerwise (`bool`, defaults to `False`): Per-parameter stepping in the backward pass; only
            the largest gradient is live, with a step's transient, at the moment it is complete (after the loss's
            moment: :func:`peak_total`'s ``forward_activations``).
        native_gqa (`bool`, defaults to `True`): See :func:`~lowmem.memory.activations.llama_activation_bytes`.
        device (`str`, defaults to `"cuda"`): The device the run will use, ``"cpu"`` or ``"cuda"``
            (one of :data:`DEVICES`; ``"cuda:1"`` or a ``torch.device`` count as their type). The
            optimizer is sized on fake tensors of that device, so its transient is that device's: on
            ``"cpu"`` (a build with MKL) a projected step also keeps MKL's GEMM packing buffer; on
            ``"cuda"`` MicroAdam takes its compiled path. Weights, gradients and activations do not
            depend on it.
        gradient_accumulation_steps (`int`, defaults to `1`): Micro-batches per optimizer step. With one, the
            gradients are freed after each step and fill while the backward pass frees the activations, so both
            are not at their maximum together (:func:`peak_total`); with more, the earlier micro-batches'
            gradients are live through the next forward and backward.
        trainer (`str` or `None`, defaults to `None`): The training loop, one of :data:`TRAINERS`. ``None``: a plain
            causal-LM loss (transformers' ``Trainer``, a loop): the logits and ``cross_entropy``'s log-softmax.
            ``"sft"``, ``"dpo"``, ``"grpo"`` (GVPO and BNPO are GRPO's loop): lowmem's TRL 1.16 trainers, whose loss
            runs TRL's fused LM head (tiles of ``min(tokens, 4096) x min(vocab, 32768)``, no logits;
            :func:`~lowmem.memory.activations.fused_head_bytes`). ``"dpo"``: each pair is a chosen and a rejected
            sequence in one forward, so the activations are those of ``2 x batch_size`` sequences (``batch_size`` is
            ``per_device_train_batch_size``, in pairs), and the reference model's no-grad forward runs while they are
            live. ``"grpo"``: ``batch_size`` completions per micro-batch of ``seq_len`` tokens (prompt + completion);
            the generation (``model.generate`` on ``generation_batch_size`` prompts, no gradients live) is a phase of
            its own: the larger of the prompt's forward (one decoder layer's tensors, a no-grad forward frees each
            layer's) and the KV cache at the end (keys and values of every layer, plus one layer's key or value
            being concatenated). Use it with the TRL config's values; TRL turns ``gradient_checkpointing`` on
            (pass ``None`` for the trainer's default) and ``bf16`` (autocast over float32 weights: estimate that with
            :func:`lowmem.cli_budget.mixed_precision_estimate`, ``lowmem budget --precision mixed``).
        reference (`str` or `None`, defaults to `None`): The reference model of ``"dpo"`` / ``"grpo"``, one of
            :data:`REFERENCES`. ``"copy"``: a separate frozen copy of the model (``ref_model``, or TRL's reload of
            the policy): its weights are counted in ``weights`` (``details["reference_weights"]``). ``"adapter"``:
            the policy with its LoRA adapter disabled (``peft_config``; needs ``lora``): no extra weights.
            ``"none"``: no reference (GRPO's ``beta=0.0``, DPO's ``precompute_ref_log_probs=True``). ``None``:
            TRL's default: DPO ``"adapter"`` with ``lora``, else ``"copy"``; GRPO ``"none"`` (``beta=0.0``);
            ``"none"`` without a TRL trainer or with ``"sft"`` (which must not set another).
        generation_batch_size (`int` or `None`, defaults to `None`): ``"grpo"`` only: completions generated together
            on this device (TRL's ``generation_batch_size`` divided by the processes). ``None``: TRL's default,
            ``batch_size x gradient_accumulation_steps`` (``steps_per_generation`` defaults to the accumulation).
        max_completion_length (`int` or `None`, defaults to `None`): ``"grpo"`` only: tokens generated per completion
            (TRL's ``max_completion_length``), within ``seq_len``; the prompt is ``seq_len - max_completion_length``.
            ``None``: TRL's default 256, or ``seq_len - 1`` when ``seq_len`` is not above 256.
        max_grad_norm (`float` or `None`, defaults to `1.0`): Gradient clipping threshold, the Trainer's
            ``max_grad_norm`` (its default 1.0). It changes only layerwise mode's step transient: LowMemTrainer clips
            in the gradient hooks, ``LayerwiseOptimizer(..., max_grad_norm=max_grad_norm, clip_mode="global_prev")``,
            which holds the clipping coefficient (4 bytes on a device other than the CPU) and its cast to a gradient
            dtype other than float32 (e.g. 2 bytes for bfloat16) during each step; the estimate's transient is that
            optimizer's ``step_transient_bytes()``. ``None`` or ``0``: no clipping (``lowmem budget --measure`` and
            :func:`~lowmem.memory.measure.measure_memory` run without it).
        padding_free (`bool`, defaults to `False`): TRL's ``SFTConfig.padding_free`` (which ``packing=True`` with
            ``packing_strategy="bfd"``, TRL's default, turns on): the collator flattens the micro-batch's sequences into
            one row of ``batch_size x seq_len`` tokens with position ids restarting at each sequence, so the model runs
            on ``(1, batch_size x seq_len)``: the rotary tables (cos and sin, built from the position ids' shape) are
            per token. ``False``: padded batches without position ids, transformers' default ``(1, seq_len)`` ids
            shared by the batch (rotary tables of one sequence). With the plain loss or ``trainer="sft"`` only.
        ddp (`bool`, defaults to `False`): The run is data parallel with ``DistributedDataParallel`` (more than one
            process without FSDP: ``accelerate launch --multi_gpu``, ``torchrun``): each process holds the whole model,
            its state and DDP's gradient buckets, ``ddp_buckets`` (every trainable parameter's gradient bytes). The
            estimate is per process.
        gradient_as_bucket_view (`bool`, defaults to `False`): DDP's ``gradient_as_bucket_view`` (accelerate's
            ``DistributedDataParallelKwargs``; the Trainer's default ``False``). ``True``: the gradients are views of the
            buckets, so no copy (``ddp_buckets`` 0) but the gradients are never freed: live with the activations as
            with gradient accumulation. Needs ``ddp=True``; not with ``layerwise``.

    Returns:
        `MemoryEstimate`: bytes by component, with ``.total``, ``.table()`` and ``.to_dict()``.

    Raises:
        ValueError: Bad argument values (the message names the field and lists the valid ones), quantization
            without LoRA (quantized weights cannot be trained directly), ``reference`` or ``generation_batch_size`` /
            ``max_completion_length`` with a trainer that has none, ``reference="adapter"`` without ``lora``,
            ``layerwise`` without an optimizer or with one that is not an engine optimizer (``bnb_*``: the run refuses it),
            a quantization that would quantize no layer of the model (:func:`check_some_layer_quantizable`: Falcon's
            ``FalconLinear`` layers; the loader refuses it too).
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}={value!r}: expected an integer >= 1")
    device = check_device(device)
    max_grad_norm = check_max_grad_norm(max_grad_norm)
    for name, value in (("ddp", ddp), ("gradient_as_bucket_view", gradient_as_bucket_view)):
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {name}={value!r}: expected True or False")
    if gradient_as_bucket_view and not ddp:
        raise ValueError("gradient_as_bucket_view=True is DDP's setting: it needs ddp=True (several processes with "
                         "DistributedDataParallel)")
    if not isinstance(padding_free, bool):
        raise ValueError(f"Invalid padding_free={padding_free!r}: expected True or False (TRL's SFTConfig.padding_free)")
    if padding_free and trainer not in (None, "sft"):
        raise ValueError(f"padding_free=True is modelled for the plain loss and trainer='sft' (TRL's SFTConfig), not "
                         f"trainer={trainer!r}: valid trainers with it are [None, 'sft']")
    optimizer, layerwise, embeddings_32bit = resolve_optimizer_name(optimizer, layerwise)
    if layerwise and gradient_as_bucket_view:
        raise ValueError("gradient_as_bucket_view=True with layerwise=True is not estimated: layerwise stepping frees each "
                         "gradient in its hook, DDP's bucket views keep every one; drop one of them")
    if layerwise:  # a run LayerwiseOptimizer / lowmem train refuse has no estimate
        from ..optim.layerwise import layerwise_refusal

        if optimizer is None:
            raise ValueError("layerwise=True (lowmem budget --layerwise) needs an optimizer: the gradient hooks step "
                             "each parameter with it; pass optimizer=<an engine optimizer> or drop layerwise")
        refused = layerwise_refusal(optimizer, "layerwise")
        if refused is not None:
            raise ValueError(f"{refused} (lowmem budget: --layerwise)")
    given_model = model
    model, lora, found = peft_model_parts(model, lora)
    config = resolve_config(model)
    param_dtype = parse_dtype(dtype)
    found += model_instance_notes(model, param_dtype, peft=bool(found))
    spec, quant_notes = config_quantization(config, QuantSpec.parse(quantization))
    found += quant_notes
    lcfg = lora_config(lora)
    if spec is not None and lcfg is None:
        raise ValueError(("the model's config has a quantization_config (a pre-quantized checkpoint): " if quantization is None
                          else "") + "quantization needs lora: quantized (4-bit, int8) weights are frozen; pass "
                         "lora={'r': 16, 'target_modules': 'all-linear'}")
    gradient_checkpointing, reference, generation_batch_size, max_completion_length = check_trainer(
        trainer, reference, generation_batch_size, max_completion_length, gradient_checkpointing, lcfg is not None,
        batch_size, seq_len, gradient_accumulation_steps)
    notes: list[str] = found
    if embeddings_32bit:
        notes.append(f"optimizer {optimizer} as the Hugging Face 8-bit optim name runs it: the nn.Embedding weights' "
                     "state 32-bit (transformers' Trainer; lowmem_embeddings_32bit)")

    meta = build_meta_model(config, param_dtype)
    quantized = check_some_layer_quantizable(meta, spec) if spec is not None else {}
    rows = {name: bnb_output_rows(meta.get_submodule(name)) for name in quantized.values()}
    if spec is not None:  # prepare_model_for_kbit_training: the rest is upcast to float32
        for p in meta.parameters():
            if id(p) not in quantized and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        notes.append("k-bit preparation (peft): non-quantized fp16/bf16 parameters upcast to float32")
    if lcfg is not None:
        from peft import get_peft_model

        # on the meta device too: peft creates (and kaiming-initializes) each adapter on the default device
        # before moving it to its base layer's; 160M float32 CPU elements for a 7B r=64, 1.1 s per estimate
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            meta = get_peft_model(meta, lcfg)
    # a model instance: its own parameters' dtypes and frozen flags (a peft model's, adapters included; lora= on a
    # plain instance: peft's flags), not those the config would build
    notes += mirror_instance(meta, given_model, quantized, requires_grad=given_model is not model or lcfg is None)

    # the optimizer first: BAdam freezes its inactive blocks (requires_grad=False), which then get no gradient
    cache = _SIZING_CACHE
    key = (sizing_key(meta, optimizer, optim_args, device), embeddings_32bit) if cache is not None else None
    sizing = cache.get(key) if cache is not None else None
    if sizing is None:
        # the parameters as fake tensors of the run's device: the optimizer sizes its step for that device
        fake = on_fake_device(meta, device)
        quantized = {id(fake[i]): name for i, name in quantized.items()}
        sizing = _size_optimizer(meta, optimizer, optim_args, embeddings_32bit)
        if cache is not None:
            cache[key] = sizing
    else:  # a cached sizing: what the optimizer did to the model, done again
        frozen = set(sizing["frozen"])
        for n, p in _unique_params(meta):
            if n in frozen:
                p.requires_grad_(False)
    _emit(sizing["messages"], stacklevel=2)
    sized = _pick(sizing, layerwise, max_grad_norm)
    opt_bytes, transient, how = sized["state"], sized["transient"], sized["how"]
    first_step = sized.get("transient_first_step")
    if first_step is not None and first_step > transient:  # (a rule whose first step allocates more)
        notes.append(f"optimizer step transient: {transient:,} B once the state exists (materialize_state() before the "
                     f"first step, as measure_memory does); a first step that makes the state (the Trainer's, lowmem "
                     f"train's) allocates {first_step:,} B (details['optimizer_transient_first_step'])")

    params = _unique_params(meta)
    weights = constants = 0
    n_params = n_quantized = 0
    for _, p in params:
        n_params += p.numel()
        if id(p) in quantized:
            packed, const = spec.weight_bytes(p.numel(), rows[quantized[id(p)]])
            weights += packed
            constants += const
            n_quantized += p.numel()
        else:
            weights += p.numel() * p.element_size()
    # the model's buffers (rotary tables; MiniMax's lightning-attention decay tables, heads x block x block each) are
    # memory of the model as its weights are (the measurement's weights hold them). Before, not counted: 256 B for a
    # Llama-family rotary table, but 1,056,848 B of a tiny MiniMax's 2.49 MB (total 0.887 of the measured peak)
    seen_buffers: set[int] = set()
    buffer_bytes = 0
    for b in meta.buffers():
        if id(b) not in seen_buffers:
            seen_buffers.add(id(b))
            buffer_bytes += b.numel() * b.element_size()
    weights += buffer_bytes
    reference_weights = 0
    if reference == "copy":  # a frozen copy of the model, as loaded (4-bit too): its weights and constants
        reference_weights = weights + constants
        weights, constants = 2 * weights, 2 * constants
        notes.append(f"trainer={trainer!r}: the reference model is a separate frozen copy: its weights are counted")
    trainable = [(n, p) for n, p in params if p.requires_grad]
    grad_sizes = [p.numel() * p.element_size() for _, p in trainable]
    gradients = (max(grad_sizes) if grad_sizes else 0) if layerwise else sum(grad_sizes)
    # layerwise with gradient accumulation: LayerwiseOptimizer(accumulation_steps=...) steps a parameter at the window's
    # last micro-batch only; before it, a full-rank parameter's gradient stays in .grad (the parameter's dtype) and a
    # projected one's (a subspace recipe's) is summed in its r x n float32 accumulator: all of them live through the
    # next micro-batch's activations, with the full-size gradient of a projected parameter being formed (its hook
    # projects and frees it). Before, the largest gradient only: tiny Llama adamw, 2 micro-batches of 1 x 64 fp32,
    # 2,689,176 B estimated for 3,244,960 measured (FOUND_BUDGETAUDIT 1)
    layerwise_accumulating = layerwise and gradient_accumulation_steps > 1
    # plain stepping with gradient accumulation: a later micro-batch forms each gradient as a new tensor beside the kept
    # .grad before AccumulateGrad adds it in place: the largest such (the input embedding's or the output head's, V x h)
    # is live with every kept gradient for a moment. Not in `gradients` (what lives through the step); the moments
    # that hold it count it (the embedding's backward: `embedding_backward`; the head's: the activations' head moment;
    # a tied one: its three temporaries). torch's tracker labels it a gradient: its maximum is gradients + this
    accumulating = gradient_accumulation_steps > 1 and not layerwise
    gradients_accumulating = max(grad_sizes, default=0) if accumulating else 0
    if layerwise_accumulating:
        kept = sizing.get("accumulated") or {}
        full = {n: p.numel() * p.element_size() for n, p in trainable}
        projected = [n for n in full if n in kept and kept[n] != full[n]]
        gradients = (sum(kept.get(n, b) for n, b in full.items())
                     + max((full[n] for n in projected), default=0))
        notes.append(f"layerwise with {gradient_accumulation_steps} micro-batches per step: every gradient is kept between "
                     "them (a subspace recipe's projected parameters: their r x n accumulators, and the full gradient "
                     "being formed), live with the activations")
    elif layerwise:
        notes.append("layerwise: each gradient is stepped and freed in the backward pass; the largest one is counted")
    # DDP's reducer: one flat bucket tensor per (dtype, bucket_cap_mb) group of trainable parameters, made when DDP wraps
    # the model (torch.distributed's Reducer::initialize_buckets, rebuilt once at the second iteration's forward after
    # freeing the first): every trainable gradient's bytes, live at every moment of the step
    ddp_buckets = sum(grad_sizes) if ddp and not gradient_as_bucket_view else 0
    if ddp:
        notes.append(f"DDP (per process): gradient buckets {ddp_buckets:,} B beside the gradients" if not gradient_as_bucket_view
                     else "DDP with gradient_as_bucket_view: the gradients are the buckets' views, live at every moment "
                          "(with the activations too)")
    # the last micro-batch frees each kept gradient (a full-rank .grad, or a projected parameter's r x n accumulator,
    # popped by its step) as its parameter steps: by the full gradient's bytes (the traced moments' key), the least a
    # parameter of that size keeps (never more than is freed). The full gradient of a projected parameter is formed
    # and freed within its own hook: not live at the loss's moment (PEAKGALORE)
    freed_by_size: dict[int, int] = {}
    kept_by_size: dict[int, int] = {}  # (the most a parameter of that size keeps: the first micro-batch's, below)
    forming = 0
    if layerwise_accumulating:
        for n, b in full.items():
            freed_by_size[b] = min(freed_by_size.get(b, b), kept.get(n, b))
            kept_by_size[b] = max(kept_by_size.get(b, 0), kept.get(n, b))
        forming = max((full[n] for n in projected), default=0)
        projected_sizes = {full[n] for n in projected}

    if how == "closed form":
        notes.append(f"{optimizer}: bitsandbytes state sized by closed form (no meta-device support); its step transient "
                     + ("is its CPU kernels' float32 work, measured bytes per element of the largest parameter "
                        "(recipes.bnb.CPU_STEP_BYTES: 20-24 for the 8-bit AdamW / Lion path)" if str(device).startswith("cpu")
                        else "is 0 off the CPU (bitsandbytes' CUDA kernels update in place)"))
    notes.append(f"optimizer state and step transient sized for device={device!r}")
    if str(device).startswith("cuda") and sized.get("svd_refresh"):
        # the SVD's count is LAPACK's gesdd (its copy of G and workspace, functional.galore.svd_refresh_bytes); on CUDA
        # torch.linalg.svd runs cuSOLVER, whose workspace (through torch's allocator) is not modelled
        notes.append("the projection refresh's SVD is counted as LAPACK's gesdd holds it; on CUDA torch.linalg.svd runs "
                     "cuSOLVER, whose workspace is not counted (H200, one Llama-2-7B layer, GaLore / Fira / OSD refresh "
                     "step: about 178 MiB more measured, estimate / measured 0.80-0.81 on that step)")
    notes.append("total = the step's peak: the optimizer transient "
                 + ("and a gradient are live with the activations of the moment that gradient is complete, after the loss's "
                    "moment (layerwise: the activations' peak holds no gradient)" if layerwise and not layerwise_accumulating
                    else "are live with the activations of the moment that gradient is complete in the last micro-batch, "
                    "with every kept gradient but those stepped before it; the loss's moment holds every kept gradient, no "
                    "step" if layerwise else "replaces the activations freed by backward (the larger counts)")
                 + ("" if layerwise else "; one micro-batch per step: the gradients fill as backward frees the activations"
                    if gradient_accumulation_steps == 1 else f"; {gradient_accumulation_steps} micro-batches per step: every gradient is live with the activations")
                 + "; plus the batch inputs (the step's micro-batches' input_ids, attention_mask and labels, int64, which the "
                 "training loop holds through the step)")

    # activations: the hidden states' dtype is the embedding's (float32 after k-bit preparation)
    emb = meta.get_input_embeddings().weight
    head = meta.get_output_embeddings()
    act_bytes = emb.element_size()
    lora_layers = []
    if lcfg is not None:
        for name, mod in meta.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                a = mod.lora_A["default"]
                lora_layers.append(LoraShape(a.in_features, a.out_features, a.weight.element_size(), float(lcfg.lora_dropout or 0.0),
                                             name.rsplit(".", 1)[-1], mod.lora_B["default"].out_features,
                                             # dropout's saved mask: bool on CUDA (fused native_dropout), a noise
                                             # tensor of the adapter's dtype on the CPU
                                             1 if device.startswith("cuda") else a.weight.element_size()))
    saved_inputs, norms_train = set(), False
    for name, mod in meta.named_modules():  # layer 0 stands for all layers
        leaf = name.rsplit(".", 1)[-1]
        if ".layers.0." not in f"{name}.":
            continue
        # a linear saves its input for its weight's gradient, or for its adapter's when peft hands the adapter that
        # input itself: an adapter of another dtype (float32 in a bf16 model) or with dropout saves its own copy
        # (LoraShape), and the input is freed once the forward has used it
        adapter = mod.lora_A["default"] if hasattr(mod, "lora_A") and "default" in mod.lora_A else None
        direct = adapter is not None and adapter.weight.element_size() == act_bytes and not float(lcfg.lora_dropout or 0.0)
        if leaf in LINEARS and (direct or getattr(getattr(mod, "weight", None), "requires_grad", False)):
            saved_inputs.add(leaf)
        if leaf.endswith("layernorm") and mod.weight.requires_grad:
            norms_train = True
    traced = not llama_formula_applies(config)  # other blocks, and a Llama-family block with a sliding window
    # the last layer's down_proj weight's gradient, the first its backward forms (a temporary beside its tensors)
    down_grad = 0
    if not traced:
        from .activations import decoder_layers

        for name, mod in decoder_layers(meta, config.num_hidden_layers)[-1].named_modules():
            w = getattr(mod, "weight", None)
            if name.rsplit(".", 1)[-1] == "down_proj" and isinstance(w, torch.Tensor) and w.requires_grad:
                down_grad = w.numel() * w.element_size()
    act_kwargs = dict(
        head_bytes=head.weight.element_size() if head is not None else None, lora_layers=lora_layers, native_gqa=native_gqa,
        saved_inputs=saved_inputs, trainable_norms=norms_train,
        trainable_head=head is not None and (head.weight.requires_grad or hasattr(head, "lora_A")),
        down_grad_bytes=down_grad,
        # the first layer's input needs a gradient: the embedding trains, or checkpointing makes it (LoRA, k-bit)
        embeddings_require_grad=emb.requires_grad,
        # the output head weight's gradient, the first the backward forms (a temporary beside the logits' gradient)
        head_grad_bytes=(head.weight.numel() * head.weight.element_size()
                         if head is not None and head.weight.requires_grad else 0),
    )
    dequantized = 0
    int8_held = {True: 0, False: 0}
    if spec is not None and spec.is_int8:
        # the 8-bit layers (bitsandbytes MatMul8bitFp on the CPU, forward and backward; MatMul8bitLt's backward on
        # CUDA) de-quantize the weight in the input's dtype (int8 -> act dtype, times SCB / 127: a float32 scale per
        # row); the largest such weight and its scales are transient. And they hold their inputs (int8_held_input_bytes)
        numel, out_rows = max(((p.numel(), rows[quantized[id(p)]]) for _, p in params if id(p) in quantized), default=(0, 0))
        dequantized = numel * act_bytes + 4 * out_rows
        int8_held = int8_held_input_bytes(meta, quantized, act_bytes, float(lcfg.lora_dropout or 0.0))
        if not traced:  # the Llama formula's backward moments: the inputs kept past their adapter's backward
            from .activations import decoder_layers

            act_kwargs["kept_inputs"] = int8_kept_input_bytes(meta, quantized, act_bytes, float(lcfg.lora_dropout or 0.0),
                                                              decoder_layers(meta, config.num_hidden_layers)[-1])
        notes.append("int8 base (LLM.int8): each 8-bit layer's input is held by its autograd context to the end of the "
                     "backward pass" + (" (not dropped by checkpointing)" if gradient_checkpointing else "")
                     + "; the largest weight de-quantized in the input's dtype is transient"
                     + ("; CUDA's forward int8 codes of the input and LLM.int8's outlier columns (data-dependent: 2 B per "
                        "token per input column above the threshold) are not counted" if device == "cuda" else ""))
    elif spec is not None:
        # the 4-bit backward de-quantizes a weight in the compute dtype, then casts it to the
        # gradient's dtype (bitsandbytes MatMul4Bit.backward); the largest such weight is transient
        compute_bytes = (spec.compute_dtype or param_dtype).itemsize
        largest = max((p.numel() for _, p in params if id(p) in quantized), default=0)
        dequantized = largest * (compute_bytes + (act_bytes if act_bytes != compute_bytes else 0))

    if traced:
        # the traced step runs bitsandbytes' stand-ins (activations.kbit_linears): its moments hold the de-quantized
        # weights and an 8-bit layer's kept inputs where they live (Phi3 h64 LoRA r=64 1 x 32 fp32: the largest
        # de-quantized weight and the held inputs added to every moment instead were int8 0.950 / nf4 0.980 of the
        # measured peak, the trace's moments 1.0004); the held inputs stay a part (int8_held_inputs), not added
        dequantized = 0

    # a head tied to the input embedding (Gemma, Qwen2 / Llama-3.2 small sizes, GPT-2): autograd sums the weight's
    # two gradients before accumulating them, so at the end of the backward pass the head's contribution, the
    # embedding's and their sum are live together: two weight-sized tensors above the gradient (measured)
    tied = head is not None and head.weight is emb and emb.requires_grad
    tied_backward = 2 * emb.numel() * emb.element_size() if tied else 0
    # an untied input embedding's backward (the backward pass's last operation), with every gradient: its output's
    # gradient (e h per token), the int64 token ids it indexes by, the loss and its backward's scalars (16 B: measured 8-12).
    # Traced steps stop before it and the Llama formula's moments end at the first layer: without this term the step's
    # moment (every gradient + the transient) was the peak, e h per token under it for a transient below that
    # (Qwen2 / Mistral / Phi3 h=384, 1 x 128 tokens fp32 AdamW: 197,488 B under the measured peak)
    emb_backward_per_token = config.hidden_size * act_bytes + 8 if emb.requires_grad and not tied else 0
    # one micro-batch per step: the gradients made before the activations' peak in the last decoder layer's backward
    # (the output head's or a tied head's contribution, the final norm's, one decoder layer's: the largest)
    early_grads = None
    if gradient_accumulation_steps == 1 and not layerwise:
        from .activations import decoder_layers

        layer_ids = [{id(p) for p in layer.parameters()} for layer in decoder_layers(meta, config.num_hidden_layers)]
        in_layers = set().union(*layer_ids)
        by_id = {id(p): p.numel() * p.element_size() for _, p in trainable}
        early_grads = (sum(b for i, b in by_id.items() if i not in in_layers and i != id(emb))
                       + (emb.numel() * emb.element_size() if tied else 0)
                       + max((sum(by_id.get(i, 0) for i in ids) for ids in layer_ids), default=0))
        # the Llama formula's backward moments: the gradients formed before each. The head's (and the final norm's);
        # one layer's; a layer's MLP down_proj's (the first its backward forms, before its peak; measured); the first
        # layer's backward: every gradient but the input embedding's and that layer's, with its down_proj's
        blocks = decoder_layers(meta, config.num_hidden_layers)
        downs = [sum(by_id.get(id(p), 0) for n, p in blk.named_parameters() if ".down_proj." in f".{n}") for blk in (blocks[0], blocks[-1])]
        head_grads = sum(b for i, b in by_id.items() if i not in in_layers and i != id(emb))
        layer_grads, last_down = max((sum(by_id.get(i, 0) for i in ids) for ids in layer_ids), default=0), downs[1]
        first_layer_grads = (sum(b for i, b in by_id.items() if i != id(emb)) - sum(by_id.get(i, 0) for i in layer_ids[0])
                             + downs[0])
        # the first layer's input norm's backward, its last: every gradient but the input embedding's is formed
        all_but_embedding = sum(b for i, b in by_id.items() if i != id(emb))
    trace_model: list[nn.Module] = []
    # the trace depends on the model, dtype and trainable set, not on the optimizer: shared within a sizing_cache()
    trace_key = ("activation trace", config.to_json_string(use_diff=False), str(param_dtype), repr(spec), repr(lcfg),
                 tuple(n for n, p in _unique_params(meta) if not p.requires_grad)) if traced else None
    trace_cache: dict = cache.setdefault(trace_key, {}) if traced and cache is not None else {}

    def saved_parts(b: int, s: int, ckpt: bool, head_parts: dict | None = None) -> dict[str, int]:
        if padding_free:  # TRL's padding-free batch: one row of b s tokens, position ids per token
            b, s = 1, b * s
        if traced:  # any other architecture: what its own forward saves, traced on fake tensors
            if not trace_model:
                trace_model.append(_meta_model_like(meta, config, param_dtype, spec is not None, lcfg))
                if spec is not None:  # the quantized linears run bitsandbytes' stand-ins (activations.kbit_linears)
                    trace_model[0].lowmem_kbit = ("int8" if spec.is_int8 else "nf4", spec.compute_dtype or param_dtype,
                                                  frozenset(quantized.values()),
                                                  spec.blocksize if spec.double_quant and not spec.is_int8 else 0)
            if head_parts is not None:  # TRL's fused head itself, in its step (the target device's kernels); DPO: the
                # reference's no-grad forward in it, between the policy's forward and its backward (EST17)
                return traced_activation_bytes(trace_model[0], config, b, s, ckpt, cache=trace_cache, fused_head=True,
                                               fused_head_device=device,
                                               reference=reference if trainer == "dpo" else None)
            return traced_activation_bytes(trace_model[0], config, b, s, ckpt, cache=trace_cache, head_parts=head_parts)
        return llama_activation_bytes(config, b, s, act_bytes, ckpt, **act_kwargs, head_parts=head_parts)

    def llama_moments(parts: dict[str, int], tokens: int, ckpt: bool) -> list[int]:
        """The Llama formula's activations at the backward's moments after the loss's, each with gradients formed:
        with checkpointing the recomputed last layer's, without the final norm's and the last layer's (its MLP's gate
        and up gradients); and the first layer's (its recomputed checkpoint, or its share of the layers, with its MLP's
        gate and up gradients)."""
        if ckpt:
            checkpoints = tokens * config.num_hidden_layers * act_bytes * config.hidden_size
            gates = parts["checkpoint_layer_gates"]
            moments = [checkpoints + gates + parts["rope"]]
            # its checkpoint, recomputed: its MLP's gate and up gradients, or before them its recomputation's largest
            # moment (activations.recomputed_layer_bytes: peft's temporaries at an adapted linear, its norm's backward)
            first = tokens * act_bytes * config.hidden_size + max(gates, parts.get("checkpoint_layer_recompute", 0))
        else:
            moments = [parts["norm_moment"], parts["last_layer_moment"]]
            first = (parts["layers"] + parts["lora"]) // max(config.num_hidden_layers, 1) + 2 * tokens * act_bytes * config.intermediate_size
            # (with an 8-bit base, the later layers' inputs its matmuls' contexts keep: activations' kept_inputs)
            first += parts.get("kept_inputs_first_layer", 0)
        return moments + [first + parts["rope"]]

    def first_norm_moment(tokens: int) -> int:
        """Checkpointed: the first layer's input RMSNorm's backward, the layers' last moment: its checkpoint, the
        norm's saved tensors (activations.llama_activation_bytes' ``norm``), the gradient of the layer's input (the
        residual's) and the norm backward's float32 temporaries (activations.NORM_BACKWARD_TEMPS), with every gradient
        but the input embedding's. Llama h=256, i=344, 2 layers, bf16, full fine-tuning, 2 x 64: the step's peak
        (total 0.979 of the measured without it)."""
        h, e = config.hidden_size, act_bytes
        norm = 4 * h * (e != 4) + 4 + e * h * act_kwargs["trainable_norms"]
        return tokens * (e * h + norm + e * h + NORM_BACKWARD_TEMPS * 4 * h)

    def llama_down_moment(parts: dict[str, int], tokens: int, ckpt: bool) -> int:
        """The last (checkpointed: recomputed) layer's moment at its ``down_proj``, before any of its gradients is
        formed (the weight's gradient being formed is a temporary, among the activations):
        :func:`~lowmem.memory.activations.down_proj_moment_bytes`."""
        if ckpt:
            return tokens * config.num_hidden_layers * act_bytes * config.hidden_size + parts["checkpoint_layer"] + parts["rope"]
        return parts["last_layer_down_moment"]

    # layerwise: the largest step with the activations (all but the input embedding's) and, when an untied output head
    # steps first, the later parameters' largest gradient and step
    with_act = sized["transient_with_activations"]
    with_act = transient if with_act is None else min(with_act, transient)
    head_w = getattr(head, "weight", None)
    later_step = sized.get("transient_after_head")
    later_grad = max((b for (_, p), b in zip(trainable, grad_sizes) if p is not head_w and p is not emb), default=0)
    head_grad, head_step = (head_w.numel() * head_w.element_size(), sized["head_transient"]) if later_step is not None else (0, 0)

    def layerwise_live(first: int, later: int) -> int:
        """The activations layerwise mode's largest step (``gradients + optimizer_transient_with_activations``) is
        counted with: those of the first gradient's moment (the output head's step, right after the loss's moment),
        or, when a later parameter's step, with the activations of a later moment (``later``), is the larger, the
        bytes that make it. Without an untied output head every step counts with ``later``."""
        if later_step is None:
            return max(first, later)
        return max(first + head_grad + min(head_step, with_act), later + later_grad + min(later_step, with_act)) - gradients - with_act

    def one_layer(b: int, s: int) -> int:
        """A no-grad forward's working set: inside one decoder layer's MLP (nothing is saved)."""
        return nograd_layer_bytes(config, b * s, act_bytes)

    def activation_model(b: int, s: int, ckpt: bool) -> dict[str, int]:
        seqs = 2 * b if trainer == "dpo" else b  # DPO: a chosen and a rejected sequence per pair, in one forward
        head_parts = None
        if trainer is not None:  # TRL's fused LM head: tiles instead of logits
            head_parts = fused_head_bytes(seqs * s, config.vocab_size, config.hidden_size, act_bytes, act_bytes, device,
                                          head.weight.element_size() if head is not None else act_bytes,
                                          act_kwargs["trainable_head"])
        parts = saved_parts(seqs, s, ckpt, head_parts)
        if trainer == "dpo" and reference != "none" and not ckpt and not traced:
            # the reference's no-grad forward runs while the policy's activations are live (before the loss backward)
            # (the Llama formula: in place of the backward's tensors at the activations' peak; a traced step traces
            # it, activations._reference_forward)
            parts["reference_forward"] = max(0, one_layer(seqs, s) - parts.get("loss_backward", parts.get("backward", 0)))
            parts["total"] += parts["reference_forward"]
        if dequantized:
            parts["dequantized_weight"] = dequantized
            parts["total"] += dequantized
        held = seqs * s * int8_held[bool(ckpt)]
        if held:  # live at every moment of the step (the backward's included)
            parts["int8_held_inputs"] = held
            if traced:  # in the traced moments already (activations.kbit_linears)
                held = 0
            else:
                parts["total"] += held
        if early_grads is not None and "backward_peak" in parts:
            # traced step (the weights' gradients formed): the backward's peak of activations and gradients, as the
            # gradient bytes that, with the activations' maximum, make it
            parts["gradients_at_peak"] = max(0, min(gradients, parts["backward_peak"] + held - parts["total"]))
        elif early_grads is not None and "rope" in parts:
            # Llama formula: the backward's moments, each with the gradients formed before it. The loss's (its
            # logit-sized tensors, no gradient yet); without checkpointing, the final norm's and the last layer's (the
            # head's gradients, and that layer's down_proj's); with it, the recomputed last layer's (the head's and
            # one layer's); and the first layer's (every gradient but the input embedding's and that layer's, with its
            # down_proj's: the step's peak when the activations are small beside the gradients). The activations hold
            # the largest moment's tensors; the gradients count for what the moments with them exceed it by
            extra = parts.get("dequantized_weight", 0) + parts.get("reference_forward", 0) + held
            moments = list(zip(llama_moments(parts, seqs * s, ckpt),
                               ([head_grads + layer_grads] if ckpt else [head_grads, head_grads + last_down])
                               + [first_layer_grads]))
            # the last layer's down_proj, its weight's gradient being formed (in the activations): the head's formed
            moments.append((llama_down_moment(parts, seqs * s, ckpt), head_grads))
            if "first_adapters_moment" in parts and not ckpt:  # the layers' last adapters' backward: every gradient
                moments.append((parts["first_adapters_moment"], all_but_embedding))
            if ckpt:  # the first layer's input norm's backward (its checkpoint recomputed), every later gradient formed
                moments.append((first_norm_moment(seqs * s) + parts["rope"], all_but_embedding))
            over = max(act + extra + g for act, g in moments) - parts["total"]
            parts["gradients_at_peak"] = max(0, min(gradients, over))
        elif early_grads is not None:
            # the loss's logit-sized tensors are freed before those gradients exist: the activations' peak is the
            # larger of the loss's moment (all of them) and the last layer's (without those, with the gradients)
            logit_sized = parts["loss_backward"] + (parts["logits"] if "logits" in parts else b * s * config.vocab_size * 4)
            if ckpt and "checkpoint_head" in parts:
                # checkpointed: the loss's moment (its tensors, no gradient of a layer yet) and the recomputed layer's
                # (its tensors and gradients, with those gradients); the activations hold the larger of the two
                # moments' tensors, so the gradients count for what the layer's moment exceeds the loss's by
                over = max(0, parts["checkpoint_head"] - parts["checkpoint_layer"])
                parts["gradients_at_peak"] = max(0, early_grads - over)
            else:
                parts["gradients_at_peak"] = early_grads if ckpt else max(0, early_grads - logit_sized)
        if layerwise_accumulating:
            # LayerwiseOptimizer(accumulation_steps=k): every kept gradient is live at the loss's moment (the
            # activations' peak, where no step runs: a parameter steps in its hook after its gradient is complete)
            # (a subspace recipe's: its r x n accumulators, not the full gradient a hook forms; before, that one too:
            # tiny Mixtral bf16 galore_adamw rank 8, 2 x 32, the loss's moment 2,715,964 B for 2,581,824 measured)
            parts["gradients_at_peak"] = gradients - forming
        if (layerwise and (not tied_backward or parts.get("gradient_moments") or layerwise_accumulating)
                and ("gradient_moment" in parts or "rope" in parts)):
            # (a tied head with the Llama formula: what the forward saves, below, as measured. The traced step's
            # moments hold what the measured steps do: the tied head's first contribution, held until the embedding's
            # is summed at the end, is a temporary of those moments in both (gemma2 h=384, 4 layers, 1 x 128 tokens,
            # layerwise microadam: the moment of the peak, 34,733,064 B of activations with a 1,572,864 B gradient,
            # traced and measured alike; the forward's saved tensors with the largest later gradient instead were
            # 1.056 of the measured peak))
            # layerwise: each parameter steps in its gradient hook, after the loss's moment (the activations' peak,
            # no gradient yet): its steps are live with the activations of the backward's moments after the first
            # gradient (the traced step's, or the Llama formula's final norm, layer and first-layer moments)
            extra = parts.get("dequantized_weight", 0) + parts.get("reference_forward", 0) + held
            steps_by_size = sized.get("steps_by_gradient_bytes")
            # with accumulation, the last micro-batch's steps: every kept gradient is live (peak_total's rest, the
            # moment's own included: the hook runs after AccumulateGrad added the new one in place and freed it) but
            # those of the parameters stepped before it (freed), so the activations here are the moment's less those
            # (a projected parameter's r x n accumulator: freed_by_size).
            # Before, the whole step transient on top of the activations' peak: tiny Mixtral bf16 adafactor, 2
            # micro-batches of 2 x 64, 1.344 of the measured peak (AUDIT-PEAK18 1)
            if parts.get("gradient_moments") and steps_by_size:
                # the traced step: each gradient's moment (the activations when it is complete) with that gradient and
                # its own parameter's step (by the gradient's bytes), not the largest step with the most activations
                if layerwise_accumulating:
                    live, freed, before = 0, 0, 0
                    # a subspace recipe's projected parameter refreshes its basis at the window's first micro-batch
                    # (its full gradient, the accumulators and .grad kept before it this micro-batch, the refresh and
                    # projection: at most its step with a refresh) and steps at the last without one (from the
                    # accumulator). Before, the refresh's step at the last: tiny Mixtral bf16 galore_adamw rank 8,
                    # 1 x 8 tokens, the experts' 405,504 B step for 147,456 (tensors 1.112 of the measured peak)
                    steady = (sized.get("steady_steps_by_gradient_bytes") or steps_by_size) if forming else steps_by_size
                    for a, g in parts["gradient_moments"]:
                        # (rest holds every kept gradient and the largest full gradient a projected parameter's hook
                        # forms: only a projected parameter's own moment has one, its own)
                        own = g if g in projected_sizes else 0
                        live = max(live, a + min(steady.get(g, with_act), with_act) - freed - forming + own)
                        if own:  # (relative to rest's every kept gradient and the one being formed)
                            live = max(live, a + min(steps_by_size.get(g, with_act), with_act) + before + g - gradients)
                        freed += freed_by_size.get(g, 0 if forming else g)
                        before += kept_by_size.get(g, g)
                    parts["forward_activations"] = min(parts["total"], max(0, live - with_act) + extra)
                else:
                    live = max(a + g + min(steps_by_size.get(g, with_act), with_act) for a, g in parts["gradient_moments"])
                    parts["forward_activations"] = min(parts["total"], max(0, live - gradients - with_act) + extra)
                parts.pop("forward_saved", None)
                return finish(parts, b, s)
            if "gradient_moment" in parts:
                first, later = parts.get("first_gradient_moment", 0), parts.get("gradient_moment", 0)
            else:
                moments, tokens = llama_moments(parts, seqs * s, ckpt), seqs * s
                # the head's moment: its weight's gradient complete, before the final norm's backward (autograd runs
                # the leaf's AccumulateGrad first; the norm's float32 temporaries, 12 B per token per hidden unit, are
                # not made yet: Qwen2 h=384, 1 x 128 tokens, layerwise adamw8bit 1.0053 of the measured peak with
                # them, over by 589,824 B, the activations at the head's step); checkpointed: beside the checkpoints
                first = parts["head_step_moment"] if not ckpt else (
                    tokens * config.num_hidden_layers * act_bytes * config.hidden_size + parts["rope"] + parts["final_norm"])
                later = max(moments)
            if not layerwise_accumulating:
                parts["forward_activations"] = min(parts["total"], layerwise_live(first, later) + extra)
            elif later_step is None:  # (accumulating: the moments' own gradients are kept ones; none taken off)
                # (a tied head: its contribution, W, held from the head's backward to the embedding's, with them)
                parts["forward_activations"] = min(parts["total"], max(first, later) + tied_backward // 2 + extra)
            else:
                live = max(first + min(head_step, with_act), later + min(later_step, with_act))
                parts["forward_activations"] = min(parts["total"], max(0, live - with_act) + extra)
            parts.pop("forward_saved", None)
        return finish(parts, b, s)

    def finish(parts: dict[str, int], b: int, s: int) -> dict[str, int]:
        """:func:`activation_model`'s last terms: a tied or untied embedding's backward moment and GRPO's generation
        phase."""
        # the batch the loop holds through the step (DPO: the chosen and rejected sequences); not an activation
        parts["batch_inputs"] = batch_input_bytes(2 * b if trainer == "dpo" else b, s, gradient_accumulation_steps)
        if emb_backward_per_token:  # (DPO: the chosen and rejected sequences, one forward)
            parts["embedding_backward"] = (2 * b if trainer == "dpo" else b) * s * emb_backward_per_token + 16
            if accumulating:
                # a later micro-batch's: its embedding gradient (embedding_dense_backward, V x h) is a new tensor beside
                # the kept .grad until AccumulateGrad adds it in place (torch's tracker labels it a gradient at the
                # parameter's hook): every kept gradient + W + the e h per token above (details["gradients_accumulating"])
                parts["embedding_backward"] += emb.numel() * emb.element_size()
        if tied_backward:  # not live with the other activations: the larger of the two moments
            parts["tied_embedding_backward"] = tied_backward
            # what is saved before the tied moment (layerwise: its steps; unless the traced step's gradient moments gave them)
            from_saved = "forward_activations" not in parts
            if layerwise_accumulating:
                # LayerwiseOptimizer(accumulation_steps=k) keeps every gradient between micro-batches and steps (and
                # frees) each at the last one's. The other activations' moments hold every kept gradient (and a step's
                # transient); the tied moment's three weight-sized temporaries (the head's contribution, the
                # embedding's, their sum) hold the first micro-batch's other gradients (the sum becomes the
                # embedding's .grad: tied_backward with every gradient, as without accumulation), a middle one's every
                # gradient with all three, the last one's the embedding's kept gradient alone (the others stepped and
                # freed): 4 W. Measured (session 13, ESTRES; Qwen2 tied h=256, vocabulary 32000, 4 layers, 2 x (1 x
                # 128), fp32, layerwise adamw8bit): the last micro-batch's tied moment is the peak, 189,387,384 B; the
                # estimate with every kept gradient and the step's transient beside those temporaries was 198,542,640
                # (1.048)
                weight = tied_backward // 2
                # (without the tied moment; the traced step's: its last micro-batch's step moments, above)
                parts["forward_activations"] = parts.get("forward_activations", parts["total"])
                loss_moment = parts["total"]
                parts["total"] = max(loss_moment, 3 * weight)
                # the loss's moment (every kept gradient, no step) as the activations' maximum with the gradients that
                # make it up (a short sequence's activations are the tied moment's 3 W: peak_total counts it apart)
                parts["gradients_at_peak"] = max(0, min(gradients, loss_moment + gradients - parts["total"]))
                # what the tied moment adds to every kept gradient (peak_total: gradients + tied_backward)
                parts["tied_embedding_backward"] = (max(tied_backward, 4 * weight - gradients) if gradient_accumulation_steps == 2
                                                    else 3 * weight)
                return grpo(parts, b, s)
            parts.setdefault("forward_activations", min(parts["total"], parts.pop("forward_saved", parts["total"])))
            if layerwise and from_saved:
                # layerwise: the tied embedding's gradient completes last, after the activations are freed (its moment is
                # the tied one); the gradient a step holds with them is the largest other one (peak_total counts the
                # largest gradient there: the difference comes off). Before, gemma2 (h=384, 4 layers, 1 x 128 tokens)
                # layerwise microadam was 1.179 of the measured peak, GPT-2 layerwise adamw8bit 1.069
                parts["forward_activations"] = max(0, parts["forward_activations"] - (gradients - later_grad))
            # the tied moment's temporaries: the head's contribution, the embedding's (tied_backward) and their sum until
            # autograd hands it to .grad (a third weight-sized tensor; the tracker and the traced steps count a gradient
            # being formed among the activations): the activations' maximum of a short sequence, GPT-2 h=384 tied
            # 1 x 32 adamw 24,576,000 B for 36,864,264 measured (0.667) before, 36,864,000 now, layerwise or not.
            # The total is the same: that moment is counted with every other gradient (tied_backward in peak_total),
            # and the activations' moment's gradients give up what it adds (gradients_at_peak: the backward's moments
            # with their gradients, traced or the Llama formula's; with gradient accumulation, unmeasured, left as it was)
            raised = tied_backward + tied_backward // 2
            if layerwise:  # (its gradient counted with the largest one, at least the sum's size)
                parts["total"] = max(parts["total"], raised)
            elif "gradients_at_peak" in parts and ("backward_peak" in parts or "rope" in parts):
                if raised > parts["total"]:
                    parts["gradients_at_peak"] = max(0, parts["total"] + parts["gradients_at_peak"] - raised)
                    parts["total"] = raised
            elif accumulating:
                # a later micro-batch's tied moment: the head's contribution, the embedding's and their sum (added in
                # place to the kept .grad) beside every kept gradient. Tiny Qwen2 tied (vocabulary 2000, h=64), 2 x (1 x
                # 32), adamw: the total was 416,908 B under the measured peak with 2 W (ESTFIX)
                parts["total"] = max(parts["total"], raised)
            else:
                parts["total"] = max(parts["total"], tied_backward)
        return grpo(parts, b, s)

    def grpo(parts: dict[str, int], b: int, s: int) -> dict[str, int]:
        """GRPO's generation phase (:func:`finish`'s last term)."""
        if trainer == "grpo":  # generation: its own phase, the gradients freed (zero_grad after the last step)
            gen_batch = generation_batch_size if b == batch_size else b * gradient_accumulation_steps
            parts.update(generation_parts(config, gen_batch, s, s - max_completion_length, act_bytes, one_layer))
            live_grads = parts.get("gradients_at_peak", gradients)
            # the training phase's activations apart (mixed precision replaces the generation by its autocast trace)
            parts["training"] = parts["total"]
            parts["total"] = max(parts["total"], parts["generation"] - live_grads)
        return parts

    parts = activation_model(batch_size, seq_len, gradient_checkpointing)
    if trainer is not None:
        notes.append(f"trainer={trainer!r} (TRL 1.16, lowmem's trainer): the loss runs TRL's fused LM head (tiles, no logits)"
                     + ("; each pair's chosen and rejected sequences in one forward: activations of 2 x batch_size sequences"
                        if trainer == "dpo" else "")
                     + (f"; generation of {generation_batch_size} completions ({max_completion_length} tokens each) is a "
                        "phase of its own, without gradients (activation_parts['generation'])" if trainer == "grpo" else ""))
    if traced:
        notes.append(f"activations: model_type={config.model_type!r} traced on fake tensors ("
                     + ("the tensors its forward saves" if "backward_peak" not in parts else "its training step, forward and backward")
                     + "; nothing allocated)")
    if tied_backward:
        notes.append("tied input/output embedding: its two gradients and their sum are live at the end of the backward pass")

    n_trainable = sum(p.numel() for _, p in trainable)
    return MemoryEstimate(
        weights=weights, gradients=gradients, optimizer_states=opt_bytes, activations=parts["total"], quant_constants=constants,
        optimizer_transient=transient, ddp_buckets=ddp_buckets,
        details={
            "parameters": n_params, "trainable_parameters": n_trainable, "quantized_parameters": n_quantized,
            "buffer_bytes": buffer_bytes,
            "optimizer_state_source": how, "activation_parts": {k: v for k, v in parts.items() if k not in ("total", "batch_inputs")},
            "batch_input_bytes": parts["batch_inputs"],
            "activation_bytes_per_element": act_bytes, "optimizer_transient_mkl_gemm_pack": sized["kept_gemm"],
            "optimizer_transient_mkl_svd": sized.get("svd_mkl", 0),
            "optimizer_transient_lapack_svd": sized.get("svd_lapack", 0),
            "optimizer_transient_blas_workspace": sized.get("blas_workspace", 0),
            "optimizer_kept_tables": sized["kept_tables"],
            "optimizer_kept_step_count": sized["kept_step_count"],
            "optimizer_transient_first_step": sized.get("transient_first_step"),
            "optimizer_foreach_scalars": sized.get("foreach_scalars", 0),
            "gradients_with_activations": None if gradient_as_bucket_view else parts.get("gradients_at_peak"),
            "optimizer_transient_with_activations": sized.get("transient_with_activations"),
            "forward_activations": parts.get("forward_activations"),
            "reference_weights": reference_weights,
            "gradients_accumulating": gradients_accumulating,
        },
        notes=notes,
        settings=dict(
            model=model_label(model),
            optimizer=optimizer, optim_args=dict(optim_args or {}), batch_size=batch_size, seq_len=seq_len, dtype=str(param_dtype).removeprefix("torch."),
            quantization=None if spec is None else spec.as_dict(),
            lora=None if lcfg is None else {"r": lcfg.r, "target_modules": sorted(lcfg.target_modules) if isinstance(lcfg.target_modules, (set, list)) else lcfg.target_modules},
            gradient_checkpointing=gradient_checkpointing, layerwise=layerwise, device=device,
            gradient_accumulation_steps=gradient_accumulation_steps,
            trainer=trainer, reference=reference, generation_batch_size=generation_batch_size,
            max_completion_length=max_completion_length, max_grad_norm=max_grad_norm, padding_free=padding_free,
            **({"ddp": True, "gradient_as_bucket_view": gradient_as_bucket_view} if ddp else {}),
        ),
        activation_model=activation_model,
    )
