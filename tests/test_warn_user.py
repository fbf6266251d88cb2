"""Warnings raised inside an optimizer step (or its construction) name the user's line, not the engine's or
torch's ``Optimizer.step`` wrappers (``lowmem._warn.warn_user``): a skipped non-finite step, a GaLore refresh
that keeps its subspace (zero gradient, or a failed SVD), a rank above a parameter's side, a layerwise step
cut short in the backward hooks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lowmem._warn import SKIPPED_PREFIXES, user_stacklevel
from lowmem.optim import create_optimizer
from lowmem.optim.layerwise import LayerwiseOptimizer
from lowmem.optim.subspace import SubspaceProjection


def _caught(fn, match):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
    hits = [w for w in rec if match in str(w.message)]
    assert hits, [str(w.message) for w in rec]
    return hits


def test_nonfinite_step_warns_at_the_step_call():
    p = nn.Parameter(torch.randn(6, 4))
    opt = create_optimizer([p], "adamw")
    p.grad = torch.full_like(p, float("nan"))
    (w,) = _caught(lambda: opt.step(), "non-finite gradient")
    assert w.filename == __file__, w.filename
    assert opt.skipped_steps == 1


def test_galore_refresh_warnings_name_the_step_call(monkeypatch):
    p = nn.Parameter(torch.randn(16, 8))
    opt = create_optimizer([{"params": [p], "rank": 4}], "galore_adamw", update_proj_gap=1)
    p.grad = torch.zeros_like(p)  # a zero gradient: the SVD refresh keeps the previous subspace
    (w,) = _caught(lambda: opt.step(), "projection refresh skipped")
    assert w.filename == __file__, w.filename

    def fail(*args, **kwargs):
        raise RuntimeError("SVD did not converge")

    monkeypatch.setattr(SubspaceProjection, "_new_basis", fail)
    p.grad = torch.randn_like(p)
    (w,) = _caught(lambda: opt.step(), "projection refresh failed")
    assert w.filename == __file__, w.filename


def test_rank_above_the_side_warns_at_the_construction():
    p, q = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(16, 16))  # rank 8 applies to q, not p
    (w,) = _caught(lambda: create_optimizer([{"params": [p, q], "rank": 8}], "galore_adamw"), "training it full-rank")
    assert w.filename == __file__, w.filename


def test_layerwise_cut_short_warns_at_the_backward_call():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    LayerwiseOptimizer(model, "adamw", lr=1e-2)
    model[0].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    (w,) = _caught(lambda: model(torch.randn(5, 4)).sum().backward(), "layerwise: non-finite")
    assert w.filename == __file__, w.filename


def test_user_stacklevel_skips_lowmem_and_torch_frames():
    """Counted from the frame given: 1 outside the skipped directories; through frames of files inside them
    (compiled with a lowmem / torch file name), the first frame outside."""
    assert user_stacklevel() == 1
    inner = compile("def call(f):\n    return f()\n", SKIPPED_PREFIXES[0] + "fake_engine.py", "exec")
    torchy = compile("def call(f):\n    return f()\n", SKIPPED_PREFIXES[1] + "fake_optimizer.py", "exec")
    a, b = {}, {}
    exec(inner, a)
    exec(torchy, b)
    import sys

    levels = b["call"](lambda: a["call"](lambda: user_stacklevel(sys._getframe(0))))
    # frames: the lambda (here, 1), lowmem's call (2), the outer lambda (here: 3)
    assert levels == 1
    levels = b["call"](lambda: a["call"](lambda: a["call"](lambda: user_stacklevel(sys._getframe(1)))))
    # from lowmem's innermost call: it (1), the lambda here (2)
    assert levels == 2


@pytest.mark.skipif(__import__("sys").version_info < (3, 12), reason="skip_file_prefixes needs Python >= 3.12")
def test_skip_file_prefixes_path_agrees():
    p = nn.Parameter(torch.randn(6, 4))
    opt = create_optimizer([p], "adamw")
    p.grad = torch.full_like(p, float("inf"))
    (w,) = _caught(lambda: opt.step(), "non-finite gradient")
    assert w.filename == __file__


def test_trainer_warning_names_the_users_create_optimizer_call(tiny_model, tmp_path):
    """Through the HF Trainer (transformers' and lowmem.trainers' frames, skipped too), a warning of the
    optimizer's construction names the user's line: here, GaLore's rank 48 above the 32-row k / v projections'
    side (it applies to the 64-wide weights; a rank above every side is an error)."""
    from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments

    model, _ = tiny_model
    args = LowMemTrainingArguments(str(tmp_path), lowmem_optim="galore_adamw", lowmem_optim_args={"rank": 48},
                                   max_steps=1, report_to="none", use_cpu=True)
    trainer = LowMemTrainer(model=model, args=args)
    hits = _caught(lambda: trainer.create_optimizer(), "training it full-rank")
    assert all(w.filename == __file__ for w in hits), [w.filename for w in hits]


def test_construction_warnings_name_the_callers_line():
    """The warnings of an optimizer's construction outside the engine (Muon's eps, Adam-mini without
    query/key projections) name the caller's line too."""
    from lowmem.optim.recipes.normalized import Muon

    w = nn.Parameter(torch.randn(8, 8))
    (hit,) = _caught(lambda: Muon([w], eps=1e-6), "is AdamW's eps")
    assert hit.filename == __file__, hit.filename
