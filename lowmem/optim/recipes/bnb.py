"""bitsandbytes' own optimizers, registered by name for comparison with the engine's recipes.

These are not engine optimizers (no meta-device accounting, no generic suite); their state is
sized by :func:`state_bytes_closed_form`, which follows ``bitsandbytes.optim.optimizer.
Optimizer2State.init_state`` (0.50): two uint8 states plus one float32 absmax per 256-element
block for tensors of at least ``min_8bit_size`` elements (two float32 states below it), and the
two shared 256-entry quantization maps; Lion (``Optimizer1State``, Chen et al. 2023) keeps one state
and one map. Paged variants allocate the same bytes in unified (pageable) memory on CUDA (on the CPU
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

# name -> (bitsandbytes class name, state bits, paged, states per parameter)
BNB_OPTIMIZERS = {
    "bnb_adamw8bit": ("AdamW8bit", 8, False, 2),
    "bnb_paged_adamw8bit": ("PagedAdamW8bit", 8, True, 2),
    "bnb_paged_adamw": ("PagedAdamW", 32, True, 2),
    "bnb_lion8bit": ("Lion8bit", 8, False, 1),
    "bnb_paged_lion": ("PagedLion", 32, True, 1),
    "bnb_paged_lion8bit": ("PagedLion8bit", 8, True, 1),
}


def _checks() -> dict[str, Any]:
    from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam

    return {"lr": LR(), "betas": BETAS(), "eps": EPS(), "weight_decay": WEIGHT_DECAY(),
            "min_8bit_size": HParam("min_8bit_size", 4096, lambda x: isinstance(x, int) and not isinstance(x, bool)
                                    and x >= 0, "an int >= 0", "smallest tensor whose state is 8-bit")}


def check_bnb_hparams(class_name: str, hparams: dict[str, Any]) -> None:
    """``hparams`` of bitsandbytes' ``class_name`` checked with the engine's own entries (bitsandbytes checks
    ``betas[0]`` / ``betas[1]`` only and compares ``lr`` with ``<=``: a third beta was dropped, ``lr='0.1'`` a bare
    TypeError), and ``amsgrad=True``, which none of them implements (the 8-bit classes refuse it, ``PagedAdamW``
    never passes it on: plain AdamW trained).

    Raises:
        ValueError: Naming the hyperparameter and what is valid.
    """
    checks = _checks()
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


def _factory(class_name: str):
    def build(params: Iterable[Any], **hparams: Any) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        check_bnb_hparams(class_name, hparams)
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
    return total + (states * 256 * 4 if any_8bit else 0)


for _name, (_cls, _bits, _paged, _states) in BNB_OPTIMIZERS.items():
    _lion = _cls.endswith(("Lion", "Lion8bit"))
    register(
        _name,
        _factory(_cls),
        summary=f"bitsandbytes {_cls} ({_bits}-bit state{'s' if _states > 1 else ''}{', paged' if _paged else ''}), for comparison",
        reference=("Chen et al. 2023, Symbolic Discovery of Optimization Algorithms; " if _lion else "")
        + "Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization (bitsandbytes)",
        hparams=(_LION_HPARAMS if _lion else _HPARAMS) if _bits == 8 else (_LION_HPARAMS_32BIT if _lion else _HPARAMS_32BIT),
        generic_tests=False,
        state_precision="8bit" if _bits == 8 else "fp32",
        second_moment="none" if _lion else "full",
    )
