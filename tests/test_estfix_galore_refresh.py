"""Issue 12, session 14 (ESTFIX): the part of galore_adamw's estimated transient that is the exact SVD refresh's
kernel-internal memory (LAPACK's column-major copy of the gradient and ``gesdd``'s workspace: real, but no dispatched
operation returns it) is named, ``details["optimizer_transient_lapack_svd"]``, as MKL's buffers are.

Qwen2 h=384, 4 layers, vocabulary 8000, rank 128, fp32, 1 x 128 (the ESTOUT model): of 9,502,728 B estimated,
1,048,576 MKL's GEMM packing buffer, 1,359,872 MKL's SVD buffers (AMD), 1,196,032 LAPACK's workspace; the rest,
5,898,248, is the refresh step's traced tensors (5,898,240) and the fused AdamW kernel's step counts. The 606,212 B that
were "above the tensors and not named" are that workspace less the 589,820 B by which a steady step's tensors exceed the
refresh step's (the non-finite check holds projected gradients in the room the refresh leaves: ``_hold_budget``);
measured 6,488,068 = that steady step."""

from __future__ import annotations

import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Live(TorchDispatchMode):
    """The most bytes of new storages that dispatched operations return, live at once (not their inputs)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _drop(self, n, ptr):
        self.live -= n
        self.seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = [a for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)]
        given += [x for a in [*args, *(kwargs or {}).values()] if isinstance(a, (list, tuple)) for x in a
                  if isinstance(x, torch.Tensor)]
        inputs = {a.untyped_storage().data_ptr() for a in given}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in inputs and ptr not in self.seen:
                    n = t.untyped_storage().nbytes()
                    self.seen.add(ptr)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._drop, n, ptr)
        return out


def _config():
    from transformers import Qwen2Config

    # (a small vocabulary: the refresh, not the embeddings' AdamW bucket, is the step's largest phase)
    return Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def test_refresh_step_tensors_are_the_transient_less_its_named_library_memory():
    from transformers import AutoModelForCausalLM

    from lowmem.memory import estimate_memory
    from lowmem.optim import create_optimizer

    args = {"rank": 16, "update_proj_gap": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = estimate_memory(_config(), "galore_adamw", args, batch_size=1, seq_len=32, dtype="fp32", device="cpu")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config())
        opt = create_optimizer(model, "galore_adamw", **args)
        opt.materialize_state()
        gen = torch.Generator().manual_seed(1)
        for step in range(3):  # refreshes at steps 1 and 3 (the state exists at 3)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            if step < 2:
                opt.step()
                continue
            with _Live() as live:
                opt.step()
    d = est.details
    lapack = d["optimizer_transient_lapack_svd"]
    assert lapack > 0
    named = d["optimizer_transient_mkl_gemm_pack"] + d["optimizer_transient_mkl_svd"] + lapack
    # the rest is the refresh step's tensors, and the fused AdamW kernel's step counts (kept and new, 4 B each)
    assert 0 <= est.optimizer_transient - named - live.peak <= 2 * d["optimizer_kept_step_count"], (est.details, live.peak)
    from lowmem.memory.measure import MemoryMeasurement

    measured = {**est.components(), "total": est.total}
    assert "LAPACK copy of the gradient" in MemoryMeasurement(measured, measured, est, "cpu").table()


def test_lapack_workspace_named_only_where_an_svd_runs():
    from lowmem.memory import estimate_memory
    from lowmem.optim.functional import galore as GL

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = estimate_memory(_config(), "adamw", batch_size=1, seq_len=32, dtype="fp32", device="cpu")
        layerwise = estimate_memory(_config(), "galore_adamw", {"rank": 16}, batch_size=1, seq_len=32, dtype="fp32",
                                    device="cpu", layerwise=True)
    assert plain.details["optimizer_transient_lapack_svd"] == 0
    assert layerwise.details["optimizer_transient_lapack_svd"] == 0  # (as MKL's: named for bucketed steps)
    # one SVD: the outputs U, S, V^T left, on the tall path and the wide one
    for m, n in ((1024, 384), (384, 1024)):
        k = min(m, n)
        with GL.svd_workspace_left_out():
            assert GL.svd_refresh_bytes(m, n) == 4 * (m * k + k + k * n) + GL.svd_mkl_bytes(m, n)
        assert GL.svd_refresh_bytes(m, n) > 4 * (m * n + m * k + k * n)
