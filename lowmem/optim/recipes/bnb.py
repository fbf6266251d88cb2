"""bitsandbytes' own optimizers, registered by name for comparison with the engine's recipes.

These are not engine optimizers (no meta-device accounting, no generic suite); their state is
sized by :func:`state_bytes_closed_form`, which follows ``bitsandbytes.optim.optimizer.
Optimizer2State.init_state`` (0.50): two uint8 states plus one float32 absmax per 256-element
block for tensors of at least ``min_8bit_size`` elements (two float32 states below it), and the
two shared 256-entry quantization maps; Lion (``Optimizer1State``, Chen et al. 2023) and RMSprop keep one state
and one map, AdEMAMix three states and two maps. Transformers' ``rmsprop_bnb*`` and ``paged_ademamix*`` names map here
(lowmem/train.py ``HF_OPTIM_NAMES``). Paged variants allocate the same bytes in unified (pageable) memory on CUDA (on the CPU
bitsandbytes warns and allocates ordinary memory). The engine's own ``lion`` / ``lion8bit``
(:mod:`.lion`) store the same format and are tested equal to bitsandbytes' on the CPU.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from ..registry import register

# The keywords the bitsandbytes classes take and apply (bitsandbytes 0.50's signatures; tests/test_audit_silent17.py
# compares them with inspect.signature): percentile_clipping / block_wise are Optimizer2State's, which these classes
# do not pass on (listed, they failed with __init__'s bare TypeError); optim_bits / args / is_paged are the classes'
# own plumbing (the name fixes the bits and the paging). min_8bit_size matters to the 8-bit classes only.
_HPARAMS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "min_8bit_size")
_LION_HPARAMS = ("lr", "betas", "weight_decay", "min_8bit_size")
_HPARAMS_32BIT = ("lr", "betas", "eps", "weight_decay", "amsgrad")
_LION_HPARAMS_32BIT = ("lr", "betas", "weight_decay")
# RMSprop (Optimizer1State "rmsprop": one state, the mean square): momentum and centered are refused (bitsandbytes
# 0.50 ignores momentum: the same weights with 0.9 as with 0; centered raises NotImplementedError)
_RMSPROP_HPARAMS_32BIT = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")
# AdEMAMix: betas a pair (TrainingArguments' adam_beta1 / adam_beta2) or bitsandbytes' triple; beta1 / beta2 / beta3 as
# transformers' optim_args keys (trainer_optimizer._get_bitsandbytes_optimizer)
_ADEMAMIX_HPARAMS_32BIT = ("lr", "betas", "beta1", "beta2", "beta3", "alpha", "t_alpha", "t_beta3", "eps", "weight_decay")

# name -> (bitsandbytes class name, state bits, paged, states per parameter)
BNB_OPTIMIZERS = {
    "bnb_adamw8bit": ("AdamW8bit", 8, False, 2),
    "bnb_paged_adamw8bit": ("PagedAdamW8bit", 8, True, 2),
    "bnb_paged_adamw": ("PagedAdamW", 32, True, 2),
    "bnb_lion8bit": ("Lion8bit", 8, False, 1),
    "bnb_paged_lion": ("PagedLion", 32, True, 1),
    "bnb_paged_lion8bit": ("PagedLion8bit", 8, True, 1),
    "bnb_rmsprop": ("RMSprop", 32, False, 1),
    "bnb_rmsprop8bit": ("RMSprop8bit", 8, False, 1),
    "bnb_paged_ademamix": ("PagedAdEMAMix", 32, True, 3),  # (CUDA only: paged; AdEMAMix's state buffers have no
    "bnb_paged_ademamix8bit": ("PagedAdEMAMix8bit", 8, True, 3),  # CPU fallback either, FOUND_ADEMAMIX 9)
}


def _family(class_name: str) -> str:
    """``"lion"``, ``"rmsprop"``, ``"ademamix"`` or ``"adam"``: which hyperparameters a bitsandbytes class takes."""
    for family in ("lion", "rmsprop", "ademamix"):
        if family in class_name.lower():
            return family
    return "adam"


def _hparams(class_name: str, bits: int) -> tuple[str, ...]:
    """The keywords lowmem passes on to bitsandbytes' ``class_name`` (``min_8bit_size`` for the 8-bit classes)."""
    family = _family(class_name)
    base = {"lion": _LION_HPARAMS_32BIT, "rmsprop": _RMSPROP_HPARAMS_32BIT, "ademamix": _ADEMAMIX_HPARAMS_32BIT,
            "adam": _HPARAMS_32BIT}[family]
    return (*base, "min_8bit_size") if bits == 8 else base


def _checks(class_name: str = "") -> dict[str, Any]:
    from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam, in_unit_interval, nonneg, optional, positive_int

    checks = {"lr": LR(), "betas": BETAS(), "eps": EPS(), "weight_decay": WEIGHT_DECAY(),
              "min_8bit_size": HParam("min_8bit_size", 4096, lambda x: isinstance(x, int) and not isinstance(x, bool)
                                      and x >= 0, "an int >= 0", "smallest tensor whose state is 8-bit")}
    family = _family(class_name)
    if family == "rmsprop":
        checks |= {"alpha": HParam("alpha", 0.99, lambda x: nonneg(x) and 0 < x <= 1, "a float in (0, 1]",
                                   "decay of the mean square (bitsandbytes refuses 0)"),
                   "momentum": HParam("momentum", 0, lambda x: nonneg(x) and x == 0, "0 (bitsandbytes' RMSprop ignores "
                                      "any other value: use lowmem's rmsprop for momentum)", "momentum"),
                   "centered": HParam("centered", False, lambda x: x is False, "False (bitsandbytes' RMSprop has no "
                                      "centered form: use lowmem's rmsprop)", "centered")}
    elif family == "ademamix":
        checks |= {"betas": HParam("betas", (0.9, 0.999, 0.9999), lambda x: isinstance(x, (tuple, list))
                                   and len(x) in (2, 3) and all(in_unit_interval(b) for b in x),
                                   "2 or 3 floats, each in [0, 1)", "beta1, beta2 (and beta3)"),
                   **{k: HParam(k, 0.9, in_unit_interval, "a float in [0, 1)", k) for k in ("beta1", "beta2", "beta3")},
                   "alpha": HParam("alpha", 5.0, nonneg, "a float >= 0", "weight of the slow EMA"),
                   **{k: HParam(k, None, optional(positive_int), "None or an int >= 1", k) for k in ("t_alpha", "t_beta3")}}
    return checks


def check_bnb_hparams(class_name: str, hparams: dict[str, Any]) -> None:
    """``hparams`` of bitsandbytes' ``class_name`` checked with the engine's own entries (bitsandbytes checks
    ``betas[0]`` / ``betas[1]`` only and compares ``lr`` with ``<=``: a third beta was dropped, ``lr='0.1'`` a bare
    TypeError), and ``amsgrad=True``, which none of them implements (the 8-bit classes refuse it, ``PagedAdamW``
    never passes it on: plain AdamW trained).

    Raises:
        ValueError: Naming the hyperparameter and what is valid.
    """
    checks = _checks(class_name)
    for key, value in hparams.items():
        if key in checks:
            checks[key].validate(value)
    amsgrad = hparams.get("amsgrad", False)
    if not isinstance(amsgrad, bool):
        raise ValueError(f"Invalid amsgrad={amsgrad!r}: expected False (bitsandbytes' {class_name} has no AMSGrad)")
    if amsgrad:
        raise ValueError(f"amsgrad=True: bitsandbytes' {class_name} does not implement AMSGrad (its 8-bit classes "
                         "refuse it, PagedAdamW drops it); drop amsgrad (torch.optim.AdamW(amsgrad=True) has AMSGrad)")


def skip_nonfinite_steps(opt: torch.optim.Optimizer, label: str) -> torch.optim.Optimizer:
    """``opt`` (a bitsandbytes optimizer) whose ``step`` is skipped, with a warning, when a gradient holds NaN or Inf,
    as the engine's optimizers do (bitsandbytes steps it into the weights and moments: every later step NaN, without
    a word). One host sync per step (the gradients' finiteness, reduced on the device). ``opt.skipped_steps`` counts
    them, as the engine's ``skipped_steps``."""
    from ..._warn import warn_user

    step = opt.step
    opt.skipped_steps = 0

    def guarded_step(closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(gr).all().to(grads[0].device) for gr in grads]).all()):
            opt.skipped_steps += 1
            warn_user(f"{label}: non-finite gradient (NaN or Inf); step skipped, optimizer state unchanged "
                      f"({opt.skipped_steps} skipped so far)")
            return loss
        out = step()
        return loss if closure is not None else out

    opt.step = guarded_step
    return opt


def check_paged_device(class_name: str, params: list[Any]) -> None:
    """A paged class (``PagedAdamW``, ``PagedLion``, ...) needs CUDA parameters: on CPU ones bitsandbytes warns
    "Falling back to non-paged optimizer behavior" and trains unpaged, which the name says it is not.

    Raises:
        ValueError: Naming the optimizer and what runs on the CPU instead.
    """
    tensors = [t for item in params for t in (item["params"] if isinstance(item, dict) else [item])]
    cpu = [tuple(t.shape) for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    if cpu:
        unpaged = class_name.replace("Paged", "")
        raise ValueError(f"bitsandbytes' {class_name} pages its state in CUDA unified memory, and {len(cpu)} parameter(s) "
                         f"are on the CPU ({cpu[0]}{', ...' if len(cpu) > 1 else ''}), where bitsandbytes would fall "
                         f"back to unpaged behavior; move the model to CUDA, or use an unpaged optimizer on the CPU "
                         f"({unpaged}: {unpaged_names(class_name)})")


# bitsandbytes' unpaged classes that lowmem's engine recipes store in the same format (tested equal): what a paged
# class without a registered unpaged entry suggests on the CPU
_UNPAGED_RECIPES = {"AdEMAMix": ["ademamix"], "AdEMAMix8bit": ["ademamix8bit"], "AdEMAMix32bit": ["ademamix"],
                    "Lion": ["lion"], "AdamW": ["adamw"]}


def unpaged_names(class_name: str) -> list[str]:
    """The lowmem names of the unpaged form of bitsandbytes' paged ``class_name`` (``PagedAdamW8bit`` ->
    ``['bnb_adamw8bit']``, ``PagedAdEMAMix8bit`` -> ``['ademamix8bit']``, the engine's recipe of the same format)."""
    unpaged = class_name.replace("Paged", "")
    return [n for n, v in BNB_OPTIMIZERS.items() if v[0] == unpaged] or _UNPAGED_RECIPES.get(unpaged, ["a lowmem recipe"])


def _ademamix_betas(hparams: dict[str, Any]) -> dict[str, Any]:
    """bitsandbytes' AdEMAMix ``betas`` triple from a pair (TrainingArguments' adam_beta1 / adam_beta2) or a triple,
    with ``beta1`` / ``beta2`` / ``beta3`` winning (transformers' ``optim_args.get("beta3", 0.9999)``)."""
    out = dict(hparams)
    betas = list(out.pop("betas", (0.9, 0.999)))
    if len(betas) == 2:
        betas.append(0.9999)
    for i, key in enumerate(("beta1", "beta2", "beta3")):
        if key in out:
            betas[i] = out.pop(key)
    out["betas"] = tuple(betas)
    return out


def _factory(class_name: str):
    def build(params: Iterable[Any], **hparams: Any) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        check_bnb_hparams(class_name, hparams)
        if _family(class_name) == "ademamix":
            hparams = _ademamix_betas(hparams)
        if _family(class_name) == "rmsprop":
            hparams = {k: v for k, v in hparams.items() if k not in ("momentum", "centered")}  # (checked: 0 / False)
        if class_name.startswith("Paged"):
            params = list(params)
            check_paged_device(class_name, params)
        return skip_nonfinite_steps(getattr(bnb.optim, class_name)(params, **hparams), f"bnb_{class_name}")

    build.__name__ = f"bnb_{class_name}"
    return build


def state_bytes_closed_form(name: str, params: Iterable[torch.Tensor], min_8bit_size: int = 4096, **_: Any) -> int:
    """Bytes of a bitsandbytes optimizer's state for ``params``, without building it.

    Args:
        name (`str`): One of :data:`BNB_OPTIMIZERS`.
        params (`Iterable[torch.Tensor]`): The trained parameters (meta tensors are fine).
        min_8bit_size (`int`, defaults to `4096`): Smaller tensors keep float32 states, as in
            bitsandbytes.
    """
    if name not in BNB_OPTIMIZERS:
        raise ValueError(f"Unknown bitsandbytes optimizer {name!r}; valid: {sorted(BNB_OPTIMIZERS)}")
    _, bits, _, states = BNB_OPTIMIZERS[name]
    total, any_8bit = 0, False
    for p in params:
        n = p.numel()
        if bits == 8 and n >= min_8bit_size:
            total += states * (n + 4 * math.ceil(n / 256))
            any_8bit = True
        else:
            total += states * 4 * n
    return total + (min(states, 2) * 256 * 4 if any_8bit else 0)  # (AdEMAMix: 3 states, 2 maps)


#: bitsandbytes' CPU optimizer kernels (``bitsandbytes/backends/cpu/ops.py``, 0.50: torch operations inside one custom
#: op, ``bitsandbytes::optimizer_update_8bit_blockwise`` / ``optimizer_update_32bit``, so a live-tensor tracker sees none
#: of them) make float32 work tensors of the whole parameter: the dequantized states, the gradient's scaled copy, the
#: update and its temporaries, and a low-precision parameter's float32 copy. Bytes per element of the parameter
#: stepped, ``(family, 8-bit blockwise path) -> (float32 parameter, bfloat16 / float16 parameter)``, measured
#: (FIXMEM21, 2026-12-02) as a fresh process's peak RSS growth over steps 2-3 of one 2048 x 2048 weight (glibc's mmap
#: threshold fixed at 64 KiB, warm-up first, ``OMP_NUM_THREADS=1``): AdamW8bit 19.97 / 23.97 (float16 23.94; 1024 x
#: 1024 19.81 / 23.87), Lion8bit 19.98 / 23.98, RMSprop8bit 11.98 / 15.94, RMSprop (32-bit) 11.95 / 15.99, the
#: 32-bit path of the 8-bit classes (a tensor under ``min_8bit_size``) AdamW 11.98 / 15.95, Lion 11.95 / 15.96. The
#: paged classes are refused on the CPU; AdEMAMix (paged only) has no CPU entry. On CUDA the kernels update in place:
#: nothing counted there (no measurement says otherwise).
CPU_STEP_BYTES = {("adam", True): (20, 24), ("lion", True): (20, 24), ("rmsprop", True): (12, 16),
                  ("adam", False): (12, 16), ("lion", False): (12, 16), ("rmsprop", False): (12, 16)}


def step_transient_closed_form(name: str, params: Iterable[torch.Tensor], min_8bit_size: int = 4096, **_: Any) -> int:
    """The step transient of bitsandbytes optimizer ``name`` on ``params`` (meta or fake tensors of the run's device):
    on the CPU the largest parameter's kernel work (:data:`CPU_STEP_BYTES` per element: the kernel steps one
    parameter at a time and frees its work before the next), on any other device 0 (in-place CUDA kernels).
    AdEMAMix on the CPU: ``ValueError`` (paged only: bitsandbytes has no CPU kernel for its state, FOUND_ADEMAMIX 9)."""
    if name not in BNB_OPTIMIZERS:
        raise ValueError(f"Unknown bitsandbytes optimizer {name!r}; valid: {sorted(BNB_OPTIMIZERS)}")
    cls, bits, _, _ = BNB_OPTIMIZERS[name]
    family = _family(cls)
    worst = 0
    for p in params:
        if p.device.type != "cpu":
            continue
        if family == "ademamix":
            raise ValueError(f"{name}: bitsandbytes' AdEMAMix is paged (CUDA only); its CPU step is not sized: "
                             "estimate it with device='cuda', or use the engine's 'ademamix' / 'ademamix8bit' on the CPU")
        eight = bits == 8 and p.numel() >= min_8bit_size
        per = CPU_STEP_BYTES[(family, eight)][p.dtype not in (torch.float32, torch.float64)]
        worst = max(worst, per * p.numel())
    return worst


_PAPERS = {"lion": "Chen et al. 2023, Symbolic Discovery of Optimization Algorithms; ",
           "rmsprop": "Tieleman & Hinton 2012, RMSprop (Lecture 6e); ",
           "ademamix": "Pagliardini et al. 2024, The AdEMAMix Optimizer; "}

for _name, (_cls, _bits, _paged, _states) in BNB_OPTIMIZERS.items():
    _fam = _family(_cls)
    register(
        _name,
        _factory(_cls),
        summary=f"bitsandbytes {_cls} ({_bits}-bit state{'s' if _states > 1 else ''}{', paged' if _paged else ''}), for comparison",
        reference=_PAPERS.get(_fam, "") + "Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization (bitsandbytes)",
        hparams=_hparams(_cls, _bits),
        generic_tests=False,
        state_precision="8bit" if _bits == 8 else "fp32",
        second_moment="none" if _fam == "lion" else "full",
    )
