"""stable_adamw (lowmem/optim/recipes/stable_adamw.py, Wortsman et al. 2023 Algorithm 2): equal to
pytorch-optimizer's StableAdamW (a peer implementation of the same algorithm), clipped without a host read, and
mapped from transformers' optim="stable_adamw" with the hyperparameters its Trainer hands torch-optimi."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lowmem.optim import create_optimizer

SHAPES = ((24, 40), (40,), (3, 5, 7))


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "chunks"])
@pytest.mark.parametrize("hp", [{}, {"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-8}],
                         ids=["defaults", "decay", "betas"])
def test_equals_pytorch_optimizers_stable_adamw_through_a_clipped_spike(hp, chunk):
    po = pytest.importorskip("pytorch_optimizer")
    ours, theirs = _params(), _params()
    opt = create_optimizer(ours, "stable_adamw", **hp)
    opt.chunk_numel = chunk
    full = {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 1e-2, **hp}
    ref = po.StableAdamW(theirs, kahan_sum=False, **full)
    gen = torch.Generator().manual_seed(1)
    clipped = False
    for t in range(6):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen) * (50.0 if t == 3 else 1.0)  # (step 4: RMS >> 1, clipped)
            p.grad, q.grad = g.clone(), g.clone()
        before = [p.detach().clone() for p in ours]
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6)
        if t == 3:  # the spike's step is smaller than lr per coordinate on average: the clip acted
            clipped = all((p - b).abs().mean() < 0.5 * full["lr"] for p, b in zip(ours, before))
    assert clipped
    assert opt.state_bytes() == sum(8 * p.numel() + 4 for p in ours)  # two float32 moments + the step counter


def test_decouple_lr_needs_max_lr():
    with pytest.raises(ValueError, match=r"stable_adamw: decouple_lr=True needs max_lr"):
        create_optimizer(_params(), "stable_adamw", decouple_lr=True)


def test_under_training_arguments_gets_what_the_hf_trainer_hands_torch_optimi(tmp_path, monkeypatch):
    """transformers' _get_stable_adamw: lr, TrainingArguments' betas / eps / weight_decay, optim_args decouple_lr and
    max_lr (torch-optimi stands in as a stub: it is not installed, and its class is not what is compared)."""
    import transformers.trainer_optimizer as TO
    from transformers import Trainer, TrainingArguments

    from lowmem.trainers.hf import optimizer_cls_and_kwargs

    monkeypatch.setattr(TO, "is_torch_optimi_available", lambda: True)
    monkeypatch.setitem(sys.modules, "optimi", types.SimpleNamespace(StableAdamW=object))
    args = TrainingArguments(str(tmp_path), optim="stable_adamw", optim_args="decouple_lr=True,max_lr=0.01",
                             learning_rate=2e-3, weight_decay=1e-4, adam_beta2=0.95, adam_epsilon=1e-7, report_to=[],
                             use_cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    _, hf_kw = Trainer.get_optimizer_cls_and_kwargs(args, model)
    _, kw = optimizer_cls_and_kwargs(model, "stable_adamw", args=args)
    opt = create_optimizer(kw["params"], "stable_adamw", **{k: v for k, v in kw.items() if k != "params"})
    group = next(g for g in opt.param_groups if g["weight_decay"])
    assert tuple(group["betas"]) == hf_kw["betas"] == (0.9, 0.95)
    for key in ("lr", "eps", "weight_decay", "decouple_lr", "max_lr"):
        assert group[key] == pytest.approx(hf_kw[key]), key
