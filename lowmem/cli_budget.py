"""``lowmem budget``: will it fit, and what to change so that it does.

    lowmem budget llama-2-7b --optimizer adamw --batch-size 4 --seq-len 1024
    lowmem budget llama-3-8b --quantization nf4 --lora-r 16 --gradient-checkpointing --json
    lowmem budget llama-2-7b --budget 24GiB            # search configurations that fit
    lowmem budget ./my-model --measure --dtype fp32     # run real steps and compare
    lowmem budget ./my-model --budget 8GiB --measure    # search, then run the top pick and check it fits

Prints a table (estimate by component; with ``--measure`` also measured; with ``--budget --measure`` the pick's
estimate beside its measurement and the verdict, exit 1 when it measures over the budget), writes a PNG bar chart
(``--png``), and ``--json`` prints machine-readable output instead of the table. Torch is only
imported inside the handler.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Callable, Iterator


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "budget", help="estimate (or measure) training memory by component; --budget searches what fits",
        description="Estimate the memory of a training step (weights, quantization constants, gradients, optimizer state, "
        "activations) on the meta device, nothing allocated. With --budget, list the configurations that fit, "
        "ranked by what they give up. See docs/memory.md.",
    )
    p.add_argument("model", help="named shape (llama-2-7b, llama-3-8b, tiny, ...) or a local model directory")
    p.add_argument("--optimizer", "--optim", default=None,
                   help="registered optimizer, or a Hugging Face optim name as lowmem train maps it (adamw_torch_8bit, "
                   "galore_adamw_layerwise, ...; default adamw). With --budget: search only this optimizer (default: "
                   "every default one)")
    p.add_argument("--optim-args", default="", metavar="k=v,...",
                   help="optimizer hyperparameters: 'k=v,k=v' (e.g. rank=128,betas=[0.9,0.95]) or a JSON object")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default 512, or a local model's context when that is shorter; longer than "
                   "a local model's context is an error)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="weights' dtype (default bf16; note: lowmem train loads float32 unless the recipe's dtype is "
                   "bfloat16, which the output says when --dtype is not given)")
    p.add_argument("--precision", default="pure", choices=["pure", "mixed"],
                   help="with --dtype bf16/fp16: 'pure' (default) = weights and gradients in that dtype, no float32 copy; "
                   "'mixed' = float32 master weights, gradients and optimizer state with autocast activations "
                   "(the Trainer's bf16=True). The output states which one it assumes and the other's total")
    p.add_argument("--quantization", default=None, choices=["nf4", "fp4", "int8"],
                   help="quantized base weights (needs --lora-r): nf4 / fp4 4-bit (QLoRA), int8 8-bit (LLM.int8, "
                   "bitsandbytes' default outlier threshold 6.0)")
    p.add_argument("--no-double-quant", action="store_true", help="4-bit without double quantization (nf4 / fp4 only)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (all linear layers unless --lora-targets)")
    p.add_argument("--lora-targets", default=None, help="with --lora-r: comma-separated module names, or all-linear (default)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="per-layer activation checkpointing (default: off; with --trainer, TRL's default: on)")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1, metavar="N",
                   help="micro-batches per optimizer step (default 1: the gradients fill as backward frees the activations; "
                   "above 1 every gradient is live with the next micro-batches' activations)")
    p.add_argument("--layerwise", action="store_true", help="per-parameter stepping in the backward pass")
    p.add_argument("--max-grad-norm", type=float, default=1.0, metavar="X",
                   help="the Trainer's gradient clipping (default 1.0, its default; 0: none). Layerwise mode clips in its "
                   "gradient hooks (clip_mode=global_prev), which adds the coefficient to the step transient. Estimate only: "
                   "--measure runs without clipping")
    p.add_argument("--ddp", action="store_true",
                   help="several processes with DistributedDataParallel (accelerate launch --multi_gpu, torchrun; not "
                   "FSDP): the estimate per process counts DDP's gradient buckets (ddp_buckets, every trainable "
                   "gradient's bytes). Estimate only")
    p.add_argument("--trainer", default=None, choices=["sft", "dpo", "grpo"],
                   help="lowmem's TRL trainer (GVPO / BNPO: grpo): TRL's fused LM head instead of logits; dpo: --batch-size "
                   "pairs, chosen and rejected in one forward, and the reference model; grpo: --batch-size completions of "
                   "--seq-len tokens (prompt + completion) and the generation's KV cache. Estimate only")
    p.add_argument("--reference", default=None, choices=["copy", "adapter", "none"],
                   help="with --trainer dpo/grpo: the reference model, a separate copy (its weights counted), the LoRA "
                   "adapter disabled, or none (default: TRL's: dpo copy, or adapter with --lora-r; grpo none, beta=0)")
    p.add_argument("--generation-batch-size", type=int, default=None, metavar="N",
                   help="with --trainer grpo: completions generated together on a device (default batch x accumulation)")
    p.add_argument("--max-completion-length", type=int, default=None, metavar="N",
                   help="with --trainer grpo: generated tokens per completion, within --seq-len (default TRL's 256)")
    p.add_argument("--budget", default=None,
                   help="e.g. 24GiB: search optimizer, rank, quantization, checkpointing, batch. --optimizer, --optim-args, "
                   "--lora-r, --quantization, --layerwise and --(no-)gradient-checkpointing narrow the search to what they "
                   "say; --no-double-quant and --lora-targets are refused with it. With --measure: the top pick (--top K: the top K) "
                   "is run with its own settings and its measured peak checked against the budget (exit 1 when over)")
    p.add_argument("--top", type=int, default=None,
                   help="with --budget: how many configurations to show (>= 1, default 15); with --measure also how many "
                   "of them to measure (default: the top pick only)")
    p.add_argument("--measure", action="store_true", help="also run real steps and report what was live (CPU or CUDA)")
    p.add_argument("--steps", type=int, default=None, help="with --measure: training steps (default 2)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="the device the run will use; the optimizer's step transient is sized for it (on cpu, MKL's GEMM "
                   "packing buffer of projected steps; on cuda, MicroAdam's compiled path). Default: cuda (estimate, --budget); with --measure "
                   "(also with --budget), cuda when available, else cpu (the estimate beside the measurement, and the "
                   "search, are for the measured device)")
    p.add_argument("--png", default=None, metavar="PATH",
                   help='write a bar chart of the components (needs matplotlib: pip install -e ".[plot]")')
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(handler=run)
    return p


def require_matplotlib() -> None:
    """``--png`` needs matplotlib (the ``plot`` extra): a one-line error before any work when it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError('--png needs matplotlib, which is not installed: pip install -e ".[plot]" '
                         "(or pip install matplotlib)") from None


def mixed_gradients_with_activations(master_early: int | None, low_early: int | None, quantized: bool) -> int | None:
    """The gradient bytes the mixed run's backward adds to its activations' peak (``peak_total``'s
    ``gradients_with_activations``; ``None``: every gradient, gradient accumulation), from the float32 estimate's
    (``master_early``) and the pure ``dtype`` estimate's (``low_early``).

    Each backward moment of the mixed run is the pure ``dtype`` run's moment (its activations ``a_m`` and the gradients
    formed before it, ``g_m`` in ``dtype``) with three changes: the autocast extra ``X`` (the ``dtype`` weight copies,
    the float32 norms' and the per-linear hidden-state copies) joins the activations, the gradients are float32
    (``2 g_m``: a parameter's float32 gradient is twice its ``dtype`` one), and the ``dtype`` copy of every weight whose
    gradient is formed is freed with its op's saved tensors when that op's backward is done (``g_m`` bytes: the copy
    of each formed gradient's weight, in ``dtype``). So the moment is ``a_m + X - g_m + 2 g_m = (a_m + g_m) + X``: the
    pure run's moment plus ``X``, and with the activations ``a + X`` the moments exceed them by the pure run's
    ``low_early`` (``max(a_m + g_m) - a``). The float32 estimate's (``max(a32_m + g32_m) - a32``) was sized against the
    float32 activations: beside ``a + X`` it added the float32 gradients of the first layer's moment to the loss's
    activations and every weight copy (Llama-2-7B 1 x 512, AdamW: total 109.85 GiB for a step peak of 100.42). The
    moment is at most that, up to the norms' float32 gradients (not cast: no copy freed; ``h`` elements per norm):
    what else autocast saved for the formed gradients' ops (norms' inputs, hidden-state copies) is freed too, and with
    LoRA the frozen weights' copies beside the adapters'. Quantized weights (4-bit, int8:
    de-quantized, not cast, ``X`` = 0): no copy is freed for the adapters' gradients, so the float32 estimate's
    (unchanged, unmeasured here) is kept."""
    if quantized:
        return master_early
    return low_early


def autocast_forward_peak_bytes(config, dtype, lora=None, batch_size: int = 1, seq_len: int = 512, scaled: bool = True) -> int:
    """The most bytes live at once (parameters and buffers excluded) in one training forward of the float32 causal LM
    of ``config`` under ``torch.autocast("cpu", dtype)``, its loss included (the model's own, ``labels`` given), on
    fake CPU tensors: every storage an op returns counts until it is freed (nothing is allocated). The forward's end,
    a moment of its own, with no gradient: every saved tensor and the loss's float32 logits and ``nll_loss``'s
    output live together; the pure ``dtype`` estimate's moments are its backward's, which the mixed run's forward
    end can exceed (Llama h=512, 3 layers, vocab 256, 1 x 512: 74,483,728 B traced and measured (MemTracker), 70,023,168
    as the pure run's activations plus the autocast extra).

    A uniform stack (``scaled``, :func:`~lowmem.memory.estimate.uniform_decoder_layers`) is traced through its first
    ``m`` and ``m + 1`` layers (``m`` = :data:`~lowmem.memory.estimate.SCALED_FROM`, 3): each inner layer adds the same
    bytes ``b`` and repeats the same moments from where it starts, and the head's moments follow the last layer's, so
    from layer ``m - 1`` on the peak is ``P(L) = P(m + 1) + (L - m - 1) b``, ``b = P(m + 1) - P(m)``; it holds when both
    truncated peaks come after layer ``m - 1`` has begun (above the most live before it, recorded by a hook) and
    ``b >= 0``, else the whole stack is traced. Llama-2-7B x 512 tokens: 7 layers traced instead of 32 (3.2 -> 0.4 s),
    the same bytes."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from .memory.activations import traced_experts
    from .memory.estimate import (SCALED_FROM, _sizing_mode, build_meta_model, first_layers, lora_config, on_fake_cpu,
                                  uniform_decoder_layers)

    model = build_meta_model(config, torch.float32)
    lcfg = lora_config(lora)
    if lcfg is not None:
        import warnings

        from peft import get_peft_model

        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = get_peft_model(model, lcfg)
    on_fake_cpu(model)
    params = {StorageWeakRef(p.untyped_storage()) for p in [*model.parameters(), *model.buffers()]}
    live: dict = {}
    peak = [0]

    class _LiveBytes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    key = StorageWeakRef(t.untyped_storage())
                    if key not in params and key not in live:
                        live[key] = t.untyped_storage().nbytes()
            for key in [k for k in live if k.expired()]:
                del live[key]
            peak[0] = max(peak[0], sum(live.values()))
            return out

    model.train()

    def trace() -> int:
        live.clear()
        peak[0] = 0
        try:
            with _sizing_mode(model), traced_experts(model):
                ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
                with torch.autocast("cpu", dtype=dtype), _LiveBytes():
                    out = model(input_ids=ids, labels=ids)
                del out
        except Exception as exc:  # noqa: BLE001  (what the model's code raised on fake tensors, re-raised with its name)
            raise ValueError(f"the autocast forward of model_type={getattr(config, 'model_type', None)!r} cannot be traced "
                             f"on fake tensors ({type(exc).__name__}: {exc}); its mixed-precision memory cannot be "
                             "estimated") from exc
        return peak[0]

    layers = uniform_decoder_layers(model, config) if scaled else None
    if layers is None:
        return trace()
    # the most live before layer m - 1 begins (the embeddings, masks, rotary tables, the first layers)
    before = []
    hook = layers[SCALED_FROM - 1].register_forward_pre_hook(lambda *_: before.append(peak[0]))
    try:
        with first_layers(model, layers, SCALED_FROM):
            short = trace()
        with first_layers(model, layers, SCALED_FROM + 1):
            longer = trace()
    finally:
        hook.remove()
    if len(before) != 2 or short <= before[0] or longer <= before[1] or longer < short:
        return trace()  # (a peak before the repeated layers, or a shrinking one: not their line)
    return longer + (len(layers) - SCALED_FROM - 1) * (longer - short)


def autocast_step_bytes(config, dtype, lora=None, batch_size: int = 1, seq_len: int = 512,
                        gradient_checkpointing: bool = True, trainable: int | None = None,
                        quantization=None, fused_head: str | None = None,
                        reference: str | None = None) -> dict[str, int] | None:
    """The activations of one training step of the float32 causal LM of ``config`` with its forward under
    ``torch.autocast("cpu", dtype)`` and its backward outside it, traced on fake CPU tensors
    (:func:`~lowmem.memory.activations.traced_activation_bytes` with ``autocast``: the model's own forward, loss and
    ``loss.backward()``, every storage followed; its first decoder layers, the rest stitched): ``total``, the most
    activation bytes live at once, and ``backward_peak``, the most activation and float32 gradient bytes live at
    once. Everything autocast does is in the trace: the ``dtype`` weight copies its cache holds until the forward
    returns, and each checkpointed layer's again in its recomputation; the float32 residual stream the checkpoints
    keep; the recomputed layer's float32 norms and its per-linear ``dtype`` copies of the hidden states; the float32
    gradients. ``None`` when the model's trainable elements are not ``trainable`` (an optimizer that freezes blocks,
    BAdam: the trace would form gradients the run does not). With ``quantization`` (bitsandbytes' base weights, as
    :func:`~lowmem.memory.estimate_memory` takes it) the quantized linears run the estimate's stand-ins of
    bitsandbytes' CPU training path (:func:`~lowmem.memory.activations.kbit_linears`): 8-bit ``MatMul8bitFp``'s
    de-quantized weight and linear under autocast as bitsandbytes' own, 4-bit ``gemm_4bit`` (a custom operator, on no
    autocast list) in the compute dtype.

    Tiny Llama (h=256, i=688, 2 layers, vocab 128), checkpointed, AdamW, CPU autocast, second step: the traced
    ``backward_peak`` equals MemTracker's activations and gradients at the step's peak to the byte (1 x 16:
    6,664,520 B; 1 x 256: 9,974,792 B), where the pure-dtype run's moment plus the autocast extra was 458 KB under
    at 1 x 256 (total 0.985)."""
    import torch

    from .memory.activations import traced_activation_bytes
    from .memory.estimate import build_meta_model, lora_config

    from .memory.estimate import QuantSpec, quantized_weight_ids

    model = build_meta_model(config, torch.float32)
    spec = QuantSpec.parse(quantization)
    names = frozenset(quantized_weight_ids(model).values()) if spec is not None else None
    lcfg = lora_config(lora)
    if lcfg is not None:
        import warnings

        from peft import get_peft_model

        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = get_peft_model(model, lcfg)
    if spec is not None:  # (as estimate_memory marks its traced model: activations.kbit_linears)
        model.lowmem_kbit = ("int8" if spec.is_int8 else "nf4", spec.compute_dtype or torch.float32, names,
                             spec.blocksize if spec.double_quant and not spec.is_int8 else 0)
    if trainable is not None and trainable != sum(p.numel() for p in {id(p): p for p in model.parameters()
                                                                       if p.requires_grad}.values()):
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if fused_head:
        return traced_activation_bytes(model, text, batch_size, seq_len, gradient_checkpointing, autocast=dtype,
                                       fused_head=True, fused_head_device=fused_head, reference=reference)
    return traced_activation_bytes(model, text, batch_size, seq_len, gradient_checkpointing, autocast=dtype)


def mixed_precision_estimate(model, dtype: str = "bf16", **kwargs):
    """The estimate for mixed precision: float32 master weights, gradients, optimizer state and its transient
    (the fp32 estimate), with the activations of a ``dtype`` run plus what autocast saves beyond them
    (:func:`~lowmem.memory.estimate.autocast_extra_saved_bytes`: the ``dtype`` copy of every weight operand of its
    matmul ops, whatever the module, the float32 normalized values of the float32 residual stream, one ``dtype``
    copy of the hidden states per consuming linear; counted with the activations: the backward frees them).
    With ``gradient_checkpointing`` the weight copies (:func:`~lowmem.memory.estimate.autocast_cast_bytes`) plus
    each layer's checkpointed input in float32 instead of ``dtype`` (``details['autocast_extra_saved']``); 4-bit and
    int8 weights are de-quantized by bitsandbytes, not cast (their backward's copy is in the activations): nothing is
    added for them. Without a trainer or with ``trainer="sft"`` / ``"dpo"`` (TRL's fused head; DPO with its reference
    forward, ``reference``) or ``"grpo"``'s training phase (not 4-bit), not in layerwise mode or ``padding_free``, the activations and the gradients at their peak are instead those of the step itself traced
    under autocast (:func:`autocast_step_bytes`, ``details['autocast_step']``; estimate / measured within 1.001 of the
    measured peak on the tiny models of ``tests/test_est12_mixed_*.py`` and ``tests/test_mixedfix_total.py``, a 4-bit
    base without checkpointing 1.0001-1.0006 (its de-quantized weights counted since 2026-12-01); DPO / GRPO under
    bf16 autocast 1.001-1.003 (tiny Llama, TRL runs; before 2026-12-01 0.91-0.998); before 2026-12-01 the plain run, no checkpointing, quantization or
    trainer, took the sum below: 0.9940 on a 3-layer h=512 Llama at 1 x 128, now 1.0000). With
    ``trainer="grpo"`` the generation phase is traced under autocast
    (:func:`~lowmem.memory.estimate.generation_trace_bytes`: the weight cache, a float32 KV cache and residual stream)
    and the larger of it and the training phase counts (4-bit models: the pure-dtype formula). The backward's gradient
    term is otherwise the pure-dtype run's (:func:`mixed_gradients_with_activations`); without checkpointing,
    quantization or a ``trainer`` the forward's end (:func:`autocast_forward_peak_bytes`, no gradient) is a moment too: the activations
    are the larger of it and the backward's, the gradients what the backward's moment exceeds them by (the traced
    step's forward holds that end: it changes nothing there; it counts where the step is not traced, e.g. BAdam)."""
    import dataclasses

    import torch

    from .memory import estimate_memory
    from .memory.estimate import (QuantSpec, autocast_cast_bytes, autocast_extra_saved_bytes, generation_trace_bytes,
                                  parse_dtype, resolve_config)

    half = parse_dtype(dtype)
    if half == torch.float32:
        raise ValueError("--precision mixed needs --dtype bf16 or fp16 (the autocast dtype); fp32 is one precision")
    master = estimate_memory(model, dtype="fp32", **kwargs)
    low = estimate_memory(model, dtype=dtype, **kwargs)
    config = resolve_config(model)
    quantized = bool(kwargs.get("quantization"))
    copies = 0 if quantized else sum(autocast_cast_bytes(config, half, kwargs.get("lora")).values())
    # the sequences of one forward (DPO: chosen and rejected), and checkpointing as resolved (TRL's default: on)
    seqs = kwargs.get("batch_size", 1) * (2 if kwargs.get("trainer") == "dpo" else 1)
    if quantized:
        extra = 0
    elif master.settings["gradient_checkpointing"]:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        extra = copies + text.num_hidden_layers * seqs * kwargs.get("seq_len", 512) * text.hidden_size * (4 - half.itemsize)
    else:
        extra = autocast_extra_saved_bytes(config, half, kwargs.get("lora"), seqs, kwargs.get("seq_len", 512))
    name = str(half).removeprefix("torch.")
    activations, details = low.activations + extra, {**master.details}
    low_parts = low.details["activation_parts"]
    early = mixed_gradients_with_activations(master.details["gradients_with_activations"],
                                             low.details["gradients_with_activations"], quantized)
    stepped = None
    spec = QuantSpec.parse(kwargs.get("quantization"))
    ckpt = master.settings["gradient_checkpointing"]
    trainer = kwargs.get("trainer")
    # (GRPO: its training phase; a 4-bit model's generation keeps the pure-dtype formula, so its sum does too)
    if ((trainer in (None, "sft", "dpo") or trainer == "grpo" and not quantized) and not kwargs.get("padding_free")
            and not master.settings["layerwise"]):
        # no trainer or TRL's SFT: the autocast step itself, traced (SFT: with TRL's fused LM head on the run's
        # device). It holds the recomputed layer's float32 norms and hidden-state copies, which the pure run's moment
        # plus the weight copies and float32 checkpoints missed (0.985 of the measured peak), a quantized base's
        # float32 residual stream and adapters' copies (the pure run's moment was 1.06-1.27 of the measured), SFT's
        # (0.9805 checkpointed, 0.9963 not), and the plain run's (no checkpointing, quantization or trainer; before
        # 2026-12-01 the pure run's moment plus the autocast extra and the forward's end: h=512 3-layer Llama 1 x 128
        # 0.9940 of the measured peak, its activations and gradients 39,477,248 B for 40,417,288 traced and measured)
        stepped = autocast_step_bytes(config, half, kwargs.get("lora"), seqs, kwargs.get("seq_len", 512), ckpt,
                                      master.details["trainable_parameters"], kwargs.get("quantization"),
                                      master.settings["device"] if trainer is not None else None,
                                      master.settings.get("reference") if trainer == "dpo" else None)
        if stepped is not None:
            # the trace's own token ids (traced_activation_bytes makes them: seqs x seq_len int64, live through the step)
            # are the batch's input_ids, which the estimate counts with the batch (details['batch_input_bytes']): not
            # twice (EST19: TRL's DPO 4 pairs x 66 tokens, bf16, checkpointed, second step, the batch tracked: 4,224 B over)
            activations = stepped["total"] - 8 * seqs * kwargs.get("seq_len", 512)
            if early is not None:
                early = max(0, min(master.gradients, stepped["backward_peak"] - stepped["total"]))
    forward_end = 0
    if not quantized and not master.settings["gradient_checkpointing"] and kwargs.get("trainer") is None:
        # the forward's end (its loss included), a moment without gradients: the activations are the larger of it and
        # the backward's moments' maximum, and the gradients count for what the backward's moment exceeds them by
        forward_end = autocast_forward_peak_bytes(config, half, kwargs.get("lora"), seqs, kwargs.get("seq_len", 512))
        if forward_end > activations:
            if early is not None:
                early = max(0, activations + early - forward_end)
            activations = forward_end
    details["gradients_with_activations"] = early
    details["activation_parts"] = {**master.details["activation_parts"]}
    if early is not None:
        details["activation_parts"]["gradients_at_peak"] = early
    if kwargs.get("trainer") == "grpo" and not quantized:
        # the generation under autocast, traced (float32 KV cache, the weight cache, float32 residual stream), in place
        # of the pure-dtype formula's; the training phase's activations as above
        s = kwargs.get("seq_len", 512)
        gen = generation_trace_bytes(config, half, master.settings["generation_batch_size"], s, s - master.settings["max_completion_length"],
                                     kwargs.get("lora"))
        live_grads = master.gradients if early is None else early
        training = stepped["total"] if stepped is not None else low_parts["training"] + extra
        activations = max(training, gen["generation"] - live_grads)
        details["activation_parts"] = {**details["activation_parts"], **gen, "training": training}
        master.notes.append(f"generation under {name} autocast traced on fake tensors: the weight cache, float32 keys and "
                            "values (KV cache), float32 residual stream (activation_parts['generation'])")
    notes = [n for n in master.notes] + [
        f"mixed precision: float32 master weights, gradients and optimizer state; activations of a {name} autocast run: "
        f"those of a pure {name} run plus what autocast saves beyond them ({extra / 2**30:.2f} GiB: the {name} copy of "
        f"each weight autocast casts for its matmuls, {copies / 2**30:.2f} GiB, the float32 residual stream's norms, "
        f"a {name} copy of the hidden states per consuming linear)"]
    if stepped is not None:
        notes.append(f"activations and the gradients at their peak: the {'checkpointed ' if ckpt else ''}step under {name} "
                     "autocast, traced on fake tensors (details['autocast_step'])")
    if forward_end and activations == forward_end:
        notes.append(f"activations: the forward's end under {name} autocast, its loss included ({forward_end / 2**30:.2f} GiB, "
                     "traced on fake tensors: details['autocast_forward_peak']), above the backward's moments")
    return dataclasses.replace(master, activations=activations, notes=notes,
                               settings={**master.settings, "dtype": f"{name} mixed (fp32 master weights)", "precision": "mixed"},
                               details={**details, "autocast_weight_copies": copies, "autocast_extra_saved": extra,
                                        "autocast_forward_peak": forward_end,
                                        "autocast_step": ({k: v for k, v in stepped.items() if isinstance(v, int)}
                                                          if stepped is not None else None)})


def _precision_note(est, other_total: int, precision: str, dtype: str) -> str:
    from .memory.report import fmt_bytes

    if precision == "pure":
        return (f"precision: pure {dtype} (weights and gradients in {dtype}, no float32 master copy); mixed precision "
                f"with float32 master weights (--precision mixed): total {fmt_bytes(other_total)}")
    return f"precision: mixed (--precision pure, everything in {dtype}: total {fmt_bytes(other_total)})"


def _context_length(model: str) -> tuple[int, str] | None:
    """``(positions, where)`` of a local model directory (:func:`lowmem.train.model_context_length`: the user's model,
    whose context a run cannot exceed); `None` for a named shape (a sizing exercise: a longer ``--seq-len`` is the
    user's what-if, e.g. with RoPE scaling) or when the config says nothing."""
    import os

    if not os.path.isdir(model):
        return None
    from .train import model_context_length

    return model_context_length(model)


def _resolve_seq_len_and_dtype(args: argparse.Namespace) -> list[str]:
    """Fill ``--seq-len`` (512, or the model's context when shorter) and ``--dtype`` (bf16) when not given, and
    refuse a ``--seq-len`` longer than the model's context (a run the model cannot do: ``lowmem train`` refuses the
    same ``max_length``). Returns the notes saying what was chosen for the user."""
    notes = []
    context = _context_length(args.model)
    if args.seq_len is None:
        args.seq_len = 512 if context is None else min(512, context[0])
        if context is not None and context[0] < 512:
            notes.append(f"seq {args.seq_len}: the model's context ({context[1]}), shorter than the default 512")
    elif args.seq_len < 1:
        raise ValueError(f"--seq-len={args.seq_len}: expected an integer >= 1")
    elif context is not None and args.seq_len > context[0]:
        raise ValueError(f"--seq-len={args.seq_len} is longer than the model's context ({context[1]}); expected "
                         f"1 .. {context[0]}")
    if args.dtype is None:
        args.dtype = "bf16"
        notes.append("dtype bf16 (the default here); lowmem train loads the model in float32 unless the recipe sets "
                     "dtype: bfloat16: size that run with --dtype fp32")
    return notes


def _search_narrowing(args: argparse.Namespace, optimizer_given: bool, optim_args: dict) -> dict:
    """:func:`~lowmem.memory.search.search_budget`'s arguments for what the user gave beside ``--budget``: each flag
    narrows the search to what it says (``--optimizer``: that optimizer only; ``--optim-args``: those hyperparameters,
    a ``rank`` the only rank, ``bf16_stochastic_round`` / ``kahan_summation`` full fine-tuning of bfloat16 weights
    only; ``--lora-r``: LoRA candidates of that rank only; ``--quantization``: those base weights;
    ``--layerwise``: layerwise stepping only; ``--(no-)gradient-checkpointing``: that choice only). A flag the search
    cannot apply is an error naming it (no silent ignoring)."""
    if args.no_double_quant:
        raise ValueError("--no-double-quant is not used with --budget (the search's 4-bit candidates use double quantization)")
    if args.lora_targets not in (None, "all-linear"):
        raise ValueError(f"--lora-targets {args.lora_targets}: not used with --budget (the search's LoRA candidates target "
                         "all-linear); drop it")
    if optim_args and not optimizer_given:
        raise ValueError("--optim-args with --budget needs --optimizer (the optimizer they are for): the search tries "
                         "several optimizers, whose hyperparameters differ")
    if args.quantization and not args.lora_r:
        raise ValueError(f"--quantization {args.quantization} needs --lora-r (quantized base weights are trained through LoRA)")
    if args.lora_r is not None and args.lora_r < 1:
        raise ValueError(f"--lora-r {args.lora_r}: expected an integer >= 1")
    if args.layerwise and args.lora_r:
        raise ValueError("--layerwise with --lora-r and --budget: the search's LoRA candidates step normally (layerwise "
                         "stepping is tried for full fine-tuning); drop one of them")
    kw: dict = {}
    if optimizer_given:
        from .optim import get_entry

        kw["optimizers"] = [getattr(args, "optimizer_as_given", args.optimizer)]  # (an HF 8-bit name's embeddings: 32-bit)
        if get_entry(args.optimizer).subspace:  # (the search's LoRA candidates use a full-rank optimizer)
            if args.lora_r:
                raise ValueError(f"--optimizer {args.optimizer} with --lora-r and --budget: the search trains LoRA adapters "
                                 "with a full-rank optimizer; give one (adamw, adamw8bit, ...) or drop --lora-r")
            kw["lora_ranks"] = []
    if optim_args:
        kw["optim_args"] = optim_args
    bf16_only = [k for k in BF16_ONLY_OPTIM_ARGS if optim_args and optim_args.get(k)]
    if bf16_only:  # (options for bfloat16 weights: full fine-tuning of a bfloat16 model only)
        if args.dtype != "bf16":
            raise ValueError(f"--optim-args {bf16_only[0]}=true applies to bfloat16 weights: with --budget give --dtype bf16"
                             f" (got --dtype {args.dtype})")
        if args.lora_r or args.quantization:
            raise ValueError(f"--optim-args {bf16_only[0]}=true with --lora-r / --quantization and --budget: LoRA adapters"
                             " are float32, nothing to round; drop one of them")
        kw["lora_ranks"] = []  # (the search's LoRA candidates train float32 adapters)
    if args.lora_r:
        kw.update(lora_ranks=[args.lora_r], full_finetuning=False)
    if args.quantization:
        kw["quantization"] = [args.quantization]
    if args.layerwise:
        kw["layerwise"] = [True]
    if args.gradient_checkpointing is not None:
        kw["checkpointing"] = [args.gradient_checkpointing]
    return kw


def measure_kwargs(settings: dict, gradient_accumulation_steps: int = 1) -> dict:
    """:func:`~lowmem.memory.measure_memory`'s arguments for a search candidate's ``settings`` (``Candidate.settings``):
    every setting the pick was estimated with, none dropped (optimizer and its arguments, LoRA, 4-bit base weights,
    layerwise stepping, checkpointing, batch, sequence length, dtype, device), and the micro-batches per step the
    whole search was estimated with. The search's 4-bit candidates use double quantization
    (``lowmem.quant.bnb_config``'s default for a name)."""
    return dict(optimizer=settings["optimizer"], optim_args=dict(settings.get("optim_args") or {}),
                batch_size=settings["batch_size"], seq_len=settings["seq_len"], dtype=settings["dtype"],
                quantization=settings.get("quantization"), lora=settings.get("lora"),
                gradient_checkpointing=bool(settings["gradient_checkpointing"]), layerwise=bool(settings["layerwise"]),
                device=settings["device"], gradient_accumulation_steps=gradient_accumulation_steps)


def pick_verdict(peak: int, limit: int) -> tuple[bool, str]:
    """``(fits, words)``: a measured ``peak`` against the budget ``limit`` (bytes), and by how much."""
    from .memory.report import fmt_bytes

    if peak <= limit:
        return True, (f"fits the budget: measured peak {fmt_bytes(peak)} ({peak:,} B), {fmt_bytes(limit - peak)} "
                      f"({limit - peak:,} B) under {fmt_bytes(limit)}")
    return False, (f"does not fit the budget: measured peak {fmt_bytes(peak)} ({peak:,} B) is {fmt_bytes(peak - limit)} "
                   f"({peak - limit:,} B) over {fmt_bytes(limit)}; the estimate was too low")


@contextlib.contextmanager
def measuring_progress(total: int) -> Iterator[Callable[[int, str], Callable[[int, int], None]]]:
    """Progress of ``lowmem budget --measure`` on stderr (loading a model and stepping it takes minutes on a real one):
    yields ``show(i, what)``, called before measurement ``i`` (0-based) of ``total``; it returns ``step(k, steps)``,
    :func:`~lowmem.memory.measure_memory`'s ``progress`` (called after each of that measurement's optimizer steps). In
    a terminal a transient rich bar (spinner, ``i/total``, elapsed time, refreshed while a measurement runs) over a
    second one counting the steps, ``k/steps``; otherwise (a log, a pipe) one line per measured configuration,
    ``lowmem budget: measuring #1/2 (adamw, batch 1, 2 steps on cpu) ...``, and a short one per step,
    ``lowmem budget: measuring #1/2: step 1/2 done``, as rich draws no live bar there."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        def show_line(i: int, what: str) -> Callable[[int, int], None]:
            print(f"lowmem budget: measuring #{i + 1}/{total} ({what}) ...", file=sys.stderr, flush=True)
            return lambda k, steps: print(f"lowmem budget: measuring #{i + 1}/{total}: step {k}/{steps} done",
                                          file=sys.stderr, flush=True)

        yield show_line
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("measuring", total=total)
        steps_task = progress.add_task("  steps", total=None, visible=False)

        def show_bar(i: int, what: str) -> Callable[[int, int], None]:
            progress.update(task, description=f"measuring #{i + 1} ({what})", completed=i)
            progress.reset(steps_task, total=None, completed=0, visible=False)
            return lambda k, steps: progress.update(steps_task, total=steps, completed=k, visible=True)

        yield show_bar


def measure_picks(model: str, picks: list, limit: int, steps: int = 2, gradient_accumulation_steps: int = 1) -> list[dict]:
    """Run ``steps`` real training steps of each candidate in ``picks`` (:func:`~lowmem.memory.measure_memory`, with
    :func:`measure_kwargs`: the candidate's own settings) and check the measured peak against ``limit``.

    The peak is CUDA's ``max_memory_allocated`` on CUDA, else the tracker's highest total of live torch tensors (on
    CPU, MKL's buffers are not tensors and are not in it). On the CPU (Linux) the record also holds ``rss_peak``, the
    process's peak RSS over the last step (:attr:`~lowmem.memory.measure.MemoryMeasurement.rss_peak`: what the tracker
    cannot see, a library kernel's work such as bitsandbytes' CPU optimizer step, AUDMEM21 2); where the tracker's
    peak fits and that one does not, the verdict says so, ``rss_over`` is its excess, and ``lowmem budget`` prints a
    warning (the verdict stays the tracker's: the RSS also holds the tracker's bookkeeping, a few MiB). A quantized (4-bit or int8) candidate the device cannot build (bitsandbytes
    without support there) is skipped with the reason (``fits: None``), never passed. Progress goes to stderr
    (:func:`measuring_progress`: a bar in a terminal, else one line per pick).

    Returns one dict per pick: ``rank`` (1-based), ``settings`` (what was measured, ``measure_kwargs``), ``estimate``
    (the pick's components and ``total`` as the search estimated them), ``measured`` (each component's own maximum and
    ``total``), ``peak`` (bytes checked against the budget), ``fits``, ``margin`` (``limit - peak``), ``verdict``,
    ``notes``."""
    import warnings

    from .memory.measure import fix_mmap_threshold, measure_memory
    from .memory.report import fmt_bytes

    # glibc's mmap threshold fixed for this process's measurements (it exits after them): freed chunk-sized blocks go
    # back to the OS, so the RSS read below is the bytes live at the peak, not the heap's fragmentation (the gap to the
    # live tensors: 23 MiB at a 45 MiB pick with glibc's dynamic threshold, 0.26 MiB fixed)
    fix_mmap_threshold()
    out = []
    with measuring_progress(len(picks)) as show:
        for i, c in enumerate(picks):
            kw = measure_kwargs(c.settings, gradient_accumulation_steps)
            step = show(i, f"{c.settings['optimizer']}, batch {kw['batch_size']}, {steps} steps on {kw['device']}")
            record = {"rank": i + 1, "settings": kw, "estimate": {**c.components, "total": c.total}, "notes": []}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = measure_memory(model, steps=steps, progress=step, **kw)
            except (ImportError, RuntimeError, NotImplementedError) as e:
                if not kw["quantization"]:
                    raise
                record.update(measured=None, peak=None, fits=None, margin=None,
                              verdict=f"not measured: {kw['quantization']} base weights cannot be built on "
                              f"{kw['device']} here ({type(e).__name__}: {e})")
                out.append(record)
                continue
            peak = res.peak_allocated if res.peak_allocated is not None else res.measured["total"]
            fits, verdict = pick_verdict(peak, limit)
            record.update(measured=res.measured, peak=peak, fits=fits, margin=limit - peak, verdict=f"#{i + 1} {verdict}",
                          losses=res.losses)
            if res.peak_allocated is not None:
                record["notes"].append("peak: CUDA max_memory_allocated (the total row: live tensors, MemTracker)")
            else:
                record["notes"].append("peak: live torch tensors (MemTracker); MKL's buffers are not tensors")
            rss_peak = record["rss_peak"] = getattr(res, "rss_peak", None)  # (None off the CPU)
            if rss_peak is not None:
                # the process's own peak over the steps (MemoryMeasurement.rss_peak): what the tracker cannot see, such
                # as a library kernel's work (bitsandbytes' CPU step, AUDMEM21 2), flagged where it is over the budget
                record["notes"].append(f"process peak RSS over the last step: {fmt_bytes(rss_peak)} ({rss_peak:,} B; "
                                       "tensors at its start + RSS growth, non-tensor memory included)")
                if fits and rss_peak > limit:
                    record["rss_over"] = rss_peak - limit
                    record["verdict"] += (f"; but the process's peak RSS over the last step, {fmt_bytes(rss_peak)} "
                                          f"({rss_peak:,} B), is {fmt_bytes(rss_peak - limit)} over the budget: "
                                          "memory the live-tensor tracker does not see (a library kernel's work, MKL's "
                                          "buffers, the allocator's and Python's)")
            if kw["layerwise"]:
                record["notes"].append("measured without gradient clipping (the estimate counts the hooks' clipping)")
            out.append(record)
    return out


def measured_table(check: dict) -> str:
    """A pick's measurement (:func:`measure_picks`) as text: estimated beside measured per component, and the verdict."""
    from .memory.estimate import COMPONENTS
    from .memory.report import fmt_bytes

    s = check["settings"]
    what = ", ".join([s["optimizer"]] + [f"{k}={v}" for k, v in (s["optim_args"] or {}).items()]
                     + ([f"LoRA r={s['lora']['r']}"] if s["lora"] else []) + ([s["quantization"]] if s["quantization"] else [])
                     + (["layerwise"] if s["layerwise"] else []) + (["checkpointing"] if s["gradient_checkpointing"] else [])
                     + [f"batch {s['batch_size']}", f"seq {s['seq_len']}", s["dtype"], s["device"]])
    lines = [f"measured #{check['rank']} ({what}):"]
    if check["measured"] is None:
        return "\n".join(lines + [f"  {check['verdict']}"]) + "\n"
    est, meas = check["estimate"], check["measured"]
    lines.append(f"  {'component':<22}{'estimated':>14}{'measured':>14}{'est/meas':>10}")
    for k in (*COMPONENTS, "total"):
        m = meas.get(k, 0)
        ratio = f"{est.get(k, 0) / m:.3f}" if m else "-"
        lines.append(f"  {k:<22}{fmt_bytes(est.get(k, 0)):>14}{fmt_bytes(m):>14}{ratio:>10}")
    lines.append(f"  {check['verdict']}")
    lines.extend(f"  note: {n}" for n in check["notes"])
    return "\n".join(lines) + "\n"


#: optimizer settings that apply to bfloat16 weights only (lowmem.optim.group_layout.check_rounding): left out of the
#: mixed-precision comparison of a pure-precision estimate
BF16_ONLY_OPTIM_ARGS = ("bf16_stochastic_round", "kahan_summation")


def run(args: argparse.Namespace) -> int:
    import os

    if os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "config.json")):
        # transformers' AutoConfig says "Should have a `model_type` key in its config.json" of a file that is not there
        raise ValueError(f"model={args.model!r}: the directory has no config.json; expected a model directory written by "
                         "save_pretrained, or a named shape (llama-2-7b, llama-3-8b, tiny, ...)")
    if args.png:
        require_matplotlib()
    chosen = _resolve_seq_len_and_dtype(args)
    if args.precision == "mixed" and args.dtype == "fp32":
        raise ValueError("--precision mixed needs --dtype bf16 or fp16 (the autocast dtype); fp32 is one precision")
    if args.precision == "mixed" and (args.budget or args.measure):
        raise ValueError("--precision mixed is estimated only: not with --budget or --measure")
    if args.trainer and (args.budget or args.measure):
        raise ValueError("--trainer is estimated only: not with --budget or --measure (lowmem train measures TRL runs: "
                         "its metrics.json 'memory')")
    from .memory import estimate_memory
    from .memory.report import bar_chart, fmt_bytes

    quant = None
    if args.quantization == "int8":
        if args.no_double_quant:
            raise ValueError("--no-double-quant applies to 4-bit base weights (--quantization nf4 / fp4), not int8 (one "
                             "float32 scale per row, no absmax blocks)")
        quant = {"quant_type": "int8"}
    elif args.quantization:
        quant = {"quant_type": args.quantization, "double_quant": not args.no_double_quant}
    elif args.no_double_quant:
        raise ValueError("--no-double-quant needs --quantization nf4 or fp4 (4-bit base weights)")
    # flags that apply only beside another: given alone they would change nothing (no silent ignoring)
    if args.lora_r is not None and args.lora_r < 1:  # (0 read as "no LoRA"; -3 reached peft, whose error names no flag)
        raise ValueError(f"--lora-r {args.lora_r}: expected an integer >= 1")
    if args.lora_targets is not None and args.lora_r is None:
        raise ValueError(f"--lora-targets {args.lora_targets} needs --lora-r (the LoRA rank; without it the estimate is a "
                         "full fine-tune)")
    if args.steps is not None and not args.measure:
        raise ValueError(f"--steps {args.steps} needs --measure (the estimate runs no step)")
    if args.steps is None:
        args.steps = 2
    lora = None
    if args.lora_r:
        targets = "all-linear" if args.lora_targets in (None, "all-linear") else args.lora_targets.split(",")
        lora = {"r": args.lora_r, "lora_alpha": 2 * args.lora_r, "target_modules": targets}
    from .optim.hparams import parse_optim_args
    from .train import resolve_optim_name

    optimizer_given = args.optimizer is not None
    given = args.optimizer or "adamw"
    args.optimizer_as_given = given
    args.optimizer, hf_layerwise = resolve_optim_name(given)  # lowmem train's names: adamw_torch_4bit, ...
    args.layerwise = args.layerwise or hf_layerwise
    from .train import hf_keeps_embeddings_32bit

    # an HF 8-bit name (lion_8bit, adamw_8bit, ...) is estimated and measured as lowmem train runs it: the nn.Embedding
    # weights' state 32-bit (estimate_memory / measure_memory take the HF name; not layerwise, as lowmem train)
    hf_embeddings_32bit = hf_keeps_embeddings_32bit(given.removesuffix("_layerwise")) and not args.layerwise
    common = dict(
        optimizer=given.strip().lower().replace("-", "_") if hf_embeddings_32bit else args.optimizer, optim_args=parse_optim_args(args.optim_args), batch_size=args.batch_size, seq_len=args.seq_len,
        dtype=args.dtype, quantization=quant, lora=lora, gradient_checkpointing=args.gradient_checkpointing, layerwise=args.layerwise,
    )
    trainer_fields = dict(trainer=args.trainer, reference=args.reference, generation_batch_size=args.generation_batch_size,
                          max_completion_length=args.max_completion_length)
    common.update({k: v for k, v in trainer_fields.items() if v is not None})
    if args.ddp and (args.measure or args.budget is not None):
        raise ValueError("--ddp is estimate only: --measure runs one process and --budget searches without DDP's "
                         "buckets; drop --ddp or run the estimate alone")
    if args.measure and args.steps < 1:  # (no step measured: a peak of nothing, which "fits" any budget)
        raise ValueError(f"--steps {args.steps}: expected an integer >= 1 (training steps measured)")
    if args.top is not None and args.budget is None:
        raise ValueError(f"--top {args.top} needs --budget (it is how many of the search's configurations to show)")
    if args.gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient-accumulation-steps {args.gradient_accumulation_steps}: expected an integer >= 1")
    if args.gradient_accumulation_steps > 1:  # (--measure runs them too: measure_memory, 909e397)
        common["gradient_accumulation_steps"] = args.gradient_accumulation_steps

    if args.budget is not None:
        from .memory.search import BF16_ROUNDING_NOTE, BYTE_FORMS, parse_bytes, search_budget

        try:
            limit = parse_bytes(args.budget)
        except ValueError as e:
            raise ValueError(f"--budget {args.budget!r}: {e}") from None
        if limit <= 0:
            raise ValueError(f"--budget {args.budget}: expected a size > 0 ({BYTE_FORMS})")
        if limit < 2**20 and not any(c.isalpha() for c in str(args.budget)):
            # (a number without a unit is bytes: --budget 40 searched for 40 bytes and printed "nothing fits")
            raise ValueError(f"--budget {args.budget}: a number without a unit is bytes ({limit:,} B, below 1 MiB, which "
                             f"nothing fits); give the unit, e.g. --budget {args.budget}GiB ({BYTE_FORMS})")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: expected an integer >= 1 (with --budget: the largest batch tried)")
        if args.top is not None and args.top < 1:
            raise ValueError(f"--top {args.top}: expected an integer >= 1 (how many configurations to show)")
        device = args.device or "cuda"
        if args.measure:  # the search sizes for the device the picks are measured on (as --measure's estimate does)
            import torch

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            if device == "cuda" and not torch.cuda.is_available():
                raise ValueError("--measure --device cuda: CUDA is not available here; use --device cpu")
        found = search_budget(args.model, limit, seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype,
                              top=15 if args.top is None else args.top, device=device, gradient_accumulation_steps=args.gradient_accumulation_steps,
                              max_grad_norm=args.max_grad_norm, **_search_narrowing(args, optimizer_given, common["optim_args"]))
        if args.png and found:
            from .memory.estimate import COMPONENTS, MemoryEstimate

            shown = [MemoryEstimate(**{k: c.components.get(k, 0) for k in COMPONENTS}, settings={"model": args.model, **c.settings},
                                    details={"gradients_with_activations": c.peak_args.get("gradients_with_activations"),
                                             "optimizer_transient_with_activations": c.peak_args.get("transient_with_activations"),
                                             "forward_activations": c.peak_args.get("forward_activations"),
                                             "activation_parts": {"tied_embedding_backward": c.peak_args.get("tied_backward", 0),
                                                                  "embedding_backward": c.peak_args.get("embedding_backward", 0)},
                                             "optimizer_kept_tables": c.peak_args.get("kept_with_activations", 0),
                                             "optimizer_kept_step_count": c.peak_args.get("kept_step_count", 0),
                                             "batch_input_bytes": c.peak_args.get("inputs", 0)})
                     for c in found[:6]]
            bar_chart({f"#{i + 1}": e for i, e in enumerate(shown)}, args.png, budget=limit,
                      title=f"{args.model}: the {len(shown)} configurations that give up least within {fmt_bytes(limit)}")
        checks = (measure_picks(args.model, found[:1 if args.top is None else args.top], limit, steps=args.steps,
                                gradient_accumulation_steps=args.gradient_accumulation_steps) if args.measure and found else [])
        over = [ch for ch in checks if ch["fits"] is False]
        for ch in checks:
            if ch["fits"] is None:
                print(f"warning: #{ch['rank']} {ch['verdict']}", file=sys.stderr)
            elif ch.get("rss_over"):  # (fits by live tensors; the process's RSS says otherwise: measure_picks)
                print(f"warning: {ch['verdict']}", file=sys.stderr)
        if args.json:
            out = {"budget": limit, "candidates": [c.to_dict() for c in found]}
            if args.measure:
                out["measured"] = checks
            print(json.dumps(out, indent=2))
            for ch in over:
                print(f"error: {ch['verdict']}", file=sys.stderr)
            return 1 if over else 0
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{args.model}: configurations within {fmt_bytes(limit)} (seq {args.seq_len}, {args.dtype}), least given up first")
        for col in ("#", "optimizer", "rank", "LoRA", "base", "ckpt", "layerwise", "batch", "total", "gives up"):
            table.add_column(col, justify="right" if col in ("#", "batch", "total", "rank") else "left")
        for i, c in enumerate(found):
            s = c.settings
            table.add_row(str(i + 1), s["optimizer"], str(s["optim_args"].get("rank", "")), str(s["lora"]["r"]) if s.get("lora") else "",
                          s.get("quantization") or "", "yes" if s["gradient_checkpointing"] else "", "yes" if s["layerwise"] else "",
                          str(s["batch_size"]), fmt_bytes(c.total), "; ".join(c.gives_up) or "nothing")
        Console(width=160).print(table)
        if any(BF16_ROUNDING_NOTE in c.gives_up for c in found):
            print(f"note: '{BF16_ROUNDING_NOTE}': full fine-tuning of bfloat16 weights (no float32 master copy) rounds each "
                  "step's write-back to nearest, losing updates below half a bfloat16 ulp (|w| * 2^-9); with --optimizer "
                  "NAME (an engine optimizer, not bnb_*), --optim-args bf16_stochastic_round=true (no memory) or kahan_summation=true (2 B/param of state) "
                  "keeps them (docs/optimizers.md, 'Pure-bfloat16 training'); --dtype fp32 sizes float32 weights")
        for ch in checks:
            print(measured_table(ch), end="")
        for ch in over:
            print(f"error: {ch['verdict']}", file=sys.stderr)
        if over:
            return 1
        if not found:
            small = found.smallest
            if small is None:
                print(f"nothing fits in {fmt_bytes(limit)}: try a shorter --seq-len, or a larger budget", file=sys.stderr)
                return 1
            s = small.settings
            what = ", ".join([s["optimizer"]] + ([f"rank {s['optim_args']['rank']}"] if s["optim_args"].get("rank") else [])
                             + ([f"LoRA r={s['lora']['r']}"] if s.get("lora") else []) + ([f"{s['quantization']}"] if s.get("quantization") else [])
                             + (["layerwise"] if s["layerwise"] else []) + ["batch 1"]
                             + (["checkpointing"] if s["gradient_checkpointing"] else []))
            print(f"nothing fits in {fmt_bytes(limit)} ({limit:,} B): the smallest configuration ({what}) needs "
                  f"{fmt_bytes(small.total)} ({small.total:,} B), {fmt_bytes(small.total - limit)} more than the budget; "
                  "try a shorter --seq-len, or a budget of at least that", file=sys.stderr)
            return 1
        return 0

    if args.measure:
        from .memory.measure import measure_memory

        with measuring_progress(1) as show:
            step = show(0, f"{args.optimizer}, batch {args.batch_size}, {args.steps} steps on "
                        f"{args.device or 'cuda when available, else cpu'}")
            res = measure_memory(args.model, steps=args.steps, device=args.device, progress=step,
                                 **{**common, "gradient_checkpointing": bool(args.gradient_checkpointing)})
        est = res.estimate
        if args.png:
            bar_chart([est], args.png, measured=res.measured, at_peak=res.at_peak)
        if args.json:
            print(json.dumps(res.to_dict(), indent=2, default=str))
        else:
            print(res.table(), end="")
        return 0

    common["device"] = args.device or "cuda"
    common["max_grad_norm"] = args.max_grad_norm
    if args.ddp:
        common["ddp"] = True
    est = estimate_memory(args.model, **common)
    if args.dtype != "fp32":  # say which precision is assumed, and what the other one totals
        kw = {k: v for k, v in common.items() if k != "dtype"}
        if args.precision == "pure" and kw.get("optim_args"):
            # the comparison's float32 master weights: nothing for the bfloat16-only write-back options to round
            # (with --precision mixed they stay, and the estimate refuses them by name)
            kw["optim_args"] = {k: v for k, v in kw["optim_args"].items() if k not in BF16_ONLY_OPTIM_ARGS}
        mixed = mixed_precision_estimate(args.model, args.dtype, **kw)
        pure, other = (est, mixed) if args.precision == "pure" else (mixed, est)
        est = pure if args.precision == "pure" else mixed
        est.notes.append(_precision_note(est, other.total, args.precision, args.dtype))
        est.details["total_other_precision"] = other.total
    est.notes.extend(chosen)
    if args.png:
        bar_chart([est], args.png)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2, default=str))
    else:
        print(est.table(), end="")
    return 0
