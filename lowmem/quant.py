"""Quantized bases with LoRA: load a local causal LM in 4 bits (NF4/FP4, QLoRA) or 8 bits (LLM.int8) with
bitsandbytes, prepare it, add LoRA.

Works on CPU as well as CUDA: bitsandbytes 0.50 runs 4-bit and 8-bit linear layers (and its 8-bit
optimizers) on CPU, and ``transformers``' bitsandbytes quantizers accept ``device_map="cpu"``.
Dettmers et al. 2023, *QLoRA: Efficient Finetuning of Quantized LLMs* (NF4, double quantization);
Dettmers et al. 2022, *LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale* (vector-wise int8
weights, outlier columns in 16 bits). On the CPU, bitsandbytes trains an 8-bit layer (``Linear8bitLt`` in
``train()`` mode) through ``MatMul8bitFp``: the weight de-quantized (``int8 * SCB / 127``) and a float matmul in
the input's dtype, forward and backward; in ``eval()`` mode and on CUDA it runs LLM.int8's int8 matmul
(``MatMul8bitLt``) with the outlier threshold.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .memory.estimate import QuantSpec, lora_config, nothing_quantized_error, parse_dtype

#: The adapters of a quantized model loaded without ``lora`` (:func:`load_quantized_model`); read-only: ``dict(DEFAULT_LORA)``
#: for a copy. lowmem.train.check_optimizer_on_meta attaches the same ones on the meta device.
DEFAULT_LORA = MappingProxyType({"r": 16, "lora_alpha": 32, "target_modules": "all-linear"})


def bnb_config(quantization: Any = "nf4", double_quant: bool | None = None, compute_dtype: str | torch.dtype | None = "bf16"):
    """A ``transformers.BitsAndBytesConfig`` for 4-bit or 8-bit loading.

    Args:
        quantization (`str`, `dict` or `QuantSpec`, defaults to `"nf4"`): ``"nf4"`` or ``"fp4"`` (4-bit), ``"int8"``
            (8-bit, ``load_in_8bit=True``), or a dict (:meth:`~lowmem.memory.estimate.QuantSpec.parse`: 4-bit
            ``quant_type``, ``double_quant``, ``compute_dtype``, overriding the arguments below; int8 ``quant_type``,
            ``threshold``, bitsandbytes' ``llm_int8_threshold``, default 6.0).
        double_quant (`bool` or `None`, defaults to `None`): 4-bit only: quantize the block absmax too (~0.37
            bits/param saved); ``None``: on. With int8 it must stay ``None`` (a ValueError names it).
        compute_dtype (`str` or `torch.dtype`, defaults to `"bf16"`): 4-bit only: dtype of the de-quantized matmuls.
            int8 has none (its matmuls run in the input's dtype): ignored there; :func:`load_quantized_model` refuses
            one given explicitly.
    """
    from transformers import BitsAndBytesConfig

    spec = QuantSpec.parse(quantization)
    if spec is None:
        raise ValueError("quantization must be 'nf4', 'fp4' or 'int8' (or a dict), not None")
    if spec.is_int8:
        if double_quant is not None:
            raise ValueError(f"double_quant={double_quant!r} does not apply to quantization 'int8' (8-bit weights have one "
                             "float32 scale per row, no absmax blocks to quantize): leave it unset, or use nf4 / fp4")
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=spec.threshold)
    if isinstance(quantization, str):
        spec = QuantSpec(spec.quant_type, True if double_quant is None else double_quant)
    compute = spec.compute_dtype or (parse_dtype(compute_dtype) if compute_dtype is not None else torch.float32)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type, bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def load_quantized_model(
    path: str | os.PathLike,
    quantization: Any = "nf4",
    double_quant: bool | None = None,
    compute_dtype: str | torch.dtype | None = None,
    lora: Any = None,
    dtype: str | torch.dtype = "bf16",
    device: str | None = None,
    gradient_checkpointing: bool = True,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a local causal LM in 4 or 8 bits and make it trainable with LoRA.

    Steps: ``from_pretrained(path, quantization_config=BitsAndBytesConfig(...))`` (every linear
    layer but the output head becomes ``bnb.nn.Linear4bit``, or with ``"int8"`` ``bnb.nn.Linear8bitLt``: transformers
    takes layers of type ``nn.Linear`` exactly; a model none of whose layers is quantized, e.g. Falcon's
    ``FalconLinear``, is a ValueError: :func:`check_some_layer_quantized`), then
    ``peft.prepare_model_for_kbit_training`` (freezes everything, upcasts the remaining fp16/bf16
    parameters to float32, enables input gradients and optionally gradient checkpointing), then
    ``peft.get_peft_model`` with the LoRA config. Train the result with any lowmem optimizer:
    only the adapters require gradients.

    Args:
        path (`str`): A local model directory (nothing is downloaded).
        quantization (`str` or `dict`, defaults to `"nf4"`): ``"nf4"``, ``"fp4"`` or ``"int8"``; see :func:`bnb_config`.
        double_quant (`bool` or `None`, defaults to `None`): 4-bit only: double quantization of the absmax
            (``None``: on); given with int8, a ValueError.
        compute_dtype (`str` or `torch.dtype` or `None`, defaults to `None`): 4-bit only: matmul dtype of the 4-bit
            layers; ``None``: ``dtype`` (what :func:`~lowmem.memory.estimate_memory` assumes too); given with int8
            (whose matmuls run in the input's dtype: float32 after k-bit preparation), a ValueError.
        lora (`peft.LoraConfig`, `dict` or `None`, defaults to `None`): Adapters; ``None`` uses
            :data:`DEFAULT_LORA` (``r=16, lora_alpha=32, target_modules="all-linear"``).
        dtype (`str` or `torch.dtype`, defaults to `"bf16"`): Dtype of the non-quantized weights at
            loading (peft then upcasts them to float32).
        device (`str` or `None`, defaults to `None`): ``"cuda"`` when available, else ``"cpu"``.
        gradient_checkpointing (`bool`, defaults to `True`): As ``prepare_model_for_kbit_training``;
            uses ``use_reentrant=False``.
        trust_remote_code (`bool`, defaults to `False`): Forwarded to ``from_pretrained``.

    Returns:
        `peft.PeftModel`: the quantized model with trainable LoRA adapters.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {str(path)!r} is not a local directory (lowmem never downloads models)")
    if compute_dtype is not None and QuantSpec.parse(quantization).is_int8:
        raise ValueError(f"compute_dtype={compute_dtype!r} does not apply to quantization 'int8' (its matmuls run in the "
                         "input's dtype): leave it unset, or use nf4 / fp4")
    check_stored_quantization(path, quantization)  # a checkpoint stored quantized keeps its type
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(quantization, double_quant, compute_dtype or dtype), dtype=parse_dtype(dtype),
        device_map={"": device}, local_files_only=True, trust_remote_code=trust_remote_code,
    )
    check_some_layer_quantized(model, quantization)
    # checkpointing is enabled here rather than by peft, which calls transformers' deprecated
    # `gradient_checkpointing_enable` (a FutureWarning on every load); with use_reentrant=False peft adds nothing else
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    keep_4bit_trainable_on_cpu(model)
    if QuantSpec.parse(quantization).is_int8:
        log_int8_cast_once()
    cfg = lora_config(lora if lora is not None else dict(DEFAULT_LORA))
    return attach_lora(model, cfg)


def check_some_layer_quantized(model: nn.Module, quantization: Any) -> int:
    """How many layers ``from_pretrained`` quantized; none is an error, before k-bit preparation and training.

    transformers' bitsandbytes integration replaces only layers whose type is exactly ``torch.nn.Linear`` (or GPT-2's
    ``Conv1D``) (``replace_with_bnb_linear``: ``type(module) is nn.Linear``; ``lowmem.memory.estimate.bnb_quantizes``,
    the estimator's rule too), and offers no setting to take a subclass.
    A model whose linear layers are subclasses (Falcon's ``FalconLinear``: ``query_key_value``, ``dense``,
    ``dense_h_to_4h``, ``dense_4h_to_h``) loads with no layer quantized and, before this check, trained LoRA on the
    full-precision base, recorded as quantized, without a word.

    Raises:
        ValueError: No layer is quantized, naming the model type, the quantization and the classes of its linear
            layers.
    """
    n = len(quantized_modules(model))
    if n:
        return n
    raise nothing_quantized_error(model, quantization)  # (the estimator's message: one rule, estimate.bnb_quantizes)


def stored_quantization(path: str | os.PathLike) -> QuantSpec | None:
    """The bitsandbytes quantization a checkpoint's weights are stored in: ``config.json``'s ``quantization_config``
    (a '...-bnb-4bit' checkpoint, a model saved 4-/8-bit), which ``from_pretrained`` applies whatever
    ``quantization_config`` it is given; ``None`` when the config has none (or there is no config.json). Read from the
    file, before anything loads.

    Raises:
        ValueError: A ``quantization_config`` that is not bitsandbytes' (naming its ``quant_method``): lowmem loads and
            trains bitsandbytes bases only.
    """
    file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "bitsandbytes")).lower().replace("_", "")
    if method != "bitsandbytes":
        raise ValueError(f"the checkpoint {str(path)!r} is stored quantized with quant_method={method!r} (config.json "
                         "quantization_config): lowmem trains bitsandbytes bases only (quantization: nf4 / fp4 / int8); "
                         "start from the unquantized checkpoint")
    from transformers import BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QuantSpec.parse(BitsAndBytesConfig.from_dict({k: v for k, v in qc.items() if k != "quant_method"}))


def check_stored_quantization(path: str | os.PathLike, quantization: Any) -> QuantSpec | None:
    """``quantization`` against the checkpoint's stored one (:func:`stored_quantization`); returns the stored one.

    transformers loads a checkpoint stored quantized in its own quantization and ignores another one asked for (a
    UserWarning only): ``quantization='int8'`` over weights stored nf4 trained on nf4 layers, recorded as int8.

    Raises:
        ValueError: The types differ (nf4 / fp4 / int8), naming both; what :func:`stored_quantization` raises.
    """
    stored = stored_quantization(path)
    spec = QuantSpec.parse(quantization)
    if stored is not None and spec is not None and spec.quant_type != stored.quant_type:
        raise ValueError(f"quantization={spec.quant_type!r} but the checkpoint {str(path)!r} is stored "
                         f"{stored.quant_type!r} (config.json quantization_config, bitsandbytes): transformers would "
                         f"load its {stored.quant_type} weights and ignore {spec.quant_type!r}; set quantization: "
                         f"{stored.quant_type}, or quantize the unquantized checkpoint with {spec.quant_type}")
    return stored


def attach_lora(model: nn.Module, config: Any) -> nn.Module:
    """``peft.get_peft_model(model, lora_config(config))`` without the FutureWarning peft causes by reading
    transformers' deprecated ``is_gradient_checkpointing`` property (only that warning is silenced)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora_config(config))


@contextlib.contextmanager
def trainable_dtypes_kept(model: nn.Module | None) -> Iterator[None]:
    """Keep the dtype of every trainable parameter of ``model`` across the block (a TRL trainer's ``__init__``).

    TRL 1.x's ``SFTTrainer``, ``DPOTrainer`` and ``GRPOTrainer`` cast every trainable parameter of a quantized model
    (``is_loaded_in_4bit`` / ``is_loaded_in_8bit``) but DoRA's magnitude to bfloat16 in place, whatever the run's
    dtype (trl/trainer/sft_trainer.py, "When using QLoRA, the PEFT adapter weights are converted to bf16"). lowmem
    keeps the adapters in the dtype :func:`load_quantized_model` gave them (float32: peft's
    ``autocast_adapter_dtype``, as without quantization), the dtype lowmem's estimate, its docs and a resumed run
    (the Trainer reloads the adapters in float32) assume: each parameter whose dtype changed gets its original tensor
    back (bit for bit: no bfloat16 rounding of the initial adapters; same ``Parameter`` object, matched by identity).
    ``None`` (TRL loads the model): nothing to keep.
    """
    kept = [(p, p.data) for p in model.parameters() if p.requires_grad] if model is not None else []
    yield
    for p, data in kept:
        if p.dtype != data.dtype:
            p.data = data


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation (gradient) checkpointing through transformers' current API:
    ``activation_checkpointing_enable`` (transformers >= 5.x), else ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def keep_4bit_trainable_on_cpu(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns how many layers.

    bitsandbytes 0.50's ``Linear4bit.forward``, on a CPU with AVX512-BF16, in ``eval()`` mode and without
    gradients, converts the layer's weight in place to a packed layout for ``gemv_4bit`` and sets
    ``quant_state.packing_format_for_cpu``; nothing converts it back on ``train()``. Every later call,
    training included, takes ``matmul_4bit``'s packed branch, which calls ``gemv_4bit`` outside the
    ``MatMul4Bit`` autograd function: the gradient through the frozen 4-bit matmul is lost (LoRA
    adapters below the first 4-bit layer get wrong gradients; torch warns that ``bitsandbytes::gemv_4bit``
    has no autograd kernel), and with a bias (Qwen2's q/k/v projections) the branch's in-place
    ``result += bias`` raises "a view of a leaf Variable that requires grad is being used in an in-place
    operation". An evaluation before training (``lowmem train``, ``Trainer`` with ``eval_on_start``)
    triggers it. Turning the layer's ``support_avx512bf16_for_cpu`` off keeps the autograd path in
    evaluation too (evaluation is then as slow as a training forward; results are the same).
    """
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            if getattr(m.weight.quant_state, "packing_format_for_cpu", False):
                raise ValueError(
                    "a 4-bit layer is already packed for bitsandbytes' CPU inference kernel (the model ran in eval "
                    "mode): call keep_4bit_trainable_on_cpu before the first forward pass")
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


class _Once(logging.Filter):
    """Passes the first record of each message, drops its repeats."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def log_int8_cast_once() -> logging.Filter:
    """Let bitsandbytes' "MatMul8bitLt: inputs will be cast from ... to float16" warning through once per process.

    bitsandbytes logs it at every 8-bit matmul whose input is not float16 (each layer of each evaluation forward on the
    CPU, every forward on CUDA: k-bit preparation makes the hidden states float32): once says what happens (LLM.int8
    quantizes the input from a float16 copy); the repeats drown the training log. Idempotent; returns the filter.
    """
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    for f in logger.filters:
        if isinstance(f, _Once):
            return f
    f = _Once()
    logger.addFilter(f)
    return f


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The bitsandbytes quantized linear layers of ``model`` (4-bit ``Linear4bit``, 8-bit ``Linear8bitLt``), by name."""
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
