"""Layerwise mode's step transient with the Trainer's gradient clipping (issue 12): ``estimate_memory(layerwise=True,
max_grad_norm=...)`` equals ``LayerwiseOptimizer(..., max_grad_norm=..., clip_mode="global_prev").step_transient_bytes()``
(what LowMemTrainer builds) on the same model, for float32 and bfloat16 parameters on CPU and (fake) CUDA."""
import pytest
import torch

from lowmem.memory import estimate_memory
from lowmem.memory.estimate import _sizing_mode, build_meta_model, on_fake_device, resolve_config
from lowmem.optim.layerwise import LayerwiseOptimizer

OPTIMIZERS = [("adamw", {}), ("galore_adamw", {"rank": 4}), ("adafactor", {})]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _reported(name, hp, dtype, device, max_grad_norm):
    """What the LayerwiseOptimizer LowMemTrainer builds reports on the estimator's model, as fake tensors of ``device``."""
    meta = build_meta_model(resolve_config("tiny"), DTYPES[dtype])
    on_fake_device(meta, device)
    lw = LayerwiseOptimizer(meta, name, max_grad_norm=max_grad_norm, clip_mode="global_prev", **hp)
    try:
        with _sizing_mode(meta):
            lw.inner.materialize_state()
        return lw.step_transient_bytes()
    finally:
        lw.remove_hooks()


@pytest.mark.parametrize("name,hp", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_estimate_equals_layerwise_optimizer_with_clipping(name, hp):
    seen = {}
    for dtype in DTYPES:
        for device in ("cpu", "cuda"):
            for max_grad_norm in (None, 1.0):
                est = estimate_memory("tiny", optimizer=name, optim_args=hp, dtype=dtype, device=device, seq_len=16,
                                      layerwise=True, max_grad_norm=max_grad_norm)
                want = _reported(name, hp, dtype, device, max_grad_norm)
                assert est.optimizer_transient == want, (name, dtype, device, max_grad_norm, est.optimizer_transient, want)
                seen[dtype, device, max_grad_norm] = want
    # the coefficient (4 bytes off the CPU) and its bfloat16 cast (2): clipping is counted, so this test can fail
    assert seen["bf16", "cuda", 1.0] == seen["bf16", "cuda", None] + 6, seen
    assert seen["fp32", "cuda", 1.0] == seen["fp32", "cuda", None] + 4, seen
    assert seen["bf16", "cpu", 1.0] == seen["bf16", "cpu", None] + 2, seen  # the cast only
    assert seen["fp32", "cpu", 1.0] == seen["fp32", "cpu", None], seen  # global_prev keeps the coefficient on the CPU


def test_default_is_the_trainers_clipping_and_zero_is_none():
    kw = dict(optimizer="adamw", dtype="bf16", device="cuda", seq_len=16, layerwise=True)
    default = estimate_memory("tiny", **kw)
    assert default.settings["max_grad_norm"] == 1.0
    assert default.optimizer_transient == estimate_memory("tiny", max_grad_norm=1.0, **kw).optimizer_transient
    off = estimate_memory("tiny", max_grad_norm=0, **kw)
    assert off.settings["max_grad_norm"] is None
    assert off.optimizer_transient == estimate_memory("tiny", max_grad_norm=None, **kw).optimizer_transient
    assert default.optimizer_transient == off.optimizer_transient + 6
    assert default.total > off.total
    # not layerwise: the Trainer clips after backward, outside the step's transient
    kw["layerwise"] = False
    assert estimate_memory("tiny", **kw).optimizer_transient == estimate_memory("tiny", max_grad_norm=0, **kw).optimizer_transient


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan"), "1.0", True])
def test_bad_max_grad_norm_is_an_error(bad):
    with pytest.raises(ValueError, match="max_grad_norm"):
        estimate_memory("tiny", max_grad_norm=bad, seq_len=16, layerwise=True)
