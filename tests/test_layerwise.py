"""Layerwise updates: same trajectory as an ordinary run (with accumulation), gradients freed in the
backward pass, clipping, checkpoints, a plain transformers.Trainer. (DDP over two CPU processes: in
tests/test_distributed.py's spawn, test_layerwise_ddp_two_processes_step_on_the_reduced_gradient.)"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from lowmem.optim import AdamW, create_optimizer
from lowmem.optim.layerwise import LayerwiseOptimizer
from toy_problem import loss_fn, make_problem


def windows(model, opt, x, y, n_windows, accum, after_backward=None):
    chunks = list(zip(x.chunk(accum), y.chunk(accum)))
    for _ in range(n_windows):
        for xc, yc in chunks:
            (loss_fn(model, xc, yc) / accum).backward()
            if after_backward is not None:
                after_backward(model)
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_same_weights(a, b, rtol=1e-5, atol=1e-6):
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("accum", [1, 3])
def test_adamw_layerwise_follows_ordinary_run(accum):
    ref, x, y = make_problem()
    lw = copy.deepcopy(ref)
    windows(ref, create_optimizer(ref, "adamw", lr=1e-2), x, y, 6, accum)
    seen = []
    opt = LayerwiseOptimizer(lw, "adamw", accumulation_steps=accum, lr=1e-2)
    windows(lw, opt, x, y, 6, accum, after_backward=lambda m: seen.append(sum(p.grad is not None for p in m.parameters())))
    assert_same_weights(lw, ref)
    if accum == 1:
        assert seen == [0] * 6  # every gradient was stepped and freed inside the backward pass


@pytest.mark.parametrize("name,extra", [
    ("galore_adamw", {"projection": "random", "scale": 1.0}),  # data-independent basis: equal through refreshes
    ("osd_adamw", {"proj_lr": 0.0}),  # a fixed learned basis after the first SVD
])
def test_subspace_layerwise_accumulates_in_the_subspace(name, extra):
    ref, x, y = make_problem()
    lw = copy.deepcopy(ref)
    hp = {"lr": 1e-2, "rank": 4, "update_proj_gap": 2, **extra}
    accum = 2
    # the ordinary run sees the full window gradient at a refresh; with duplicated micro-batches the
    # first micro-batch's gradient (what layerwise refreshes from) is exactly half of it
    xx, yy = torch.cat([x, x]), torch.cat([y, y])
    windows(ref, create_optimizer(ref, name, **hp), xx, yy, 5, accum)
    opt = LayerwiseOptimizer(lw, name, accumulation_steps=accum, **hp)
    grads_alive = []
    windows(lw, opt, xx, yy, 5, accum, after_backward=lambda m: grads_alive.append(m.fc1.weight.grad is not None))
    assert not any(grads_alive)  # the projected 32x16 weight never keeps a full gradient
    assert_same_weights(lw, ref)


def test_galore_svd_layerwise_equal_between_refreshes():
    ref, x, y = make_problem()
    lw = copy.deepcopy(ref)
    hp = {"lr": 1e-2, "rank": 4, "update_proj_gap": 100, "scale": 1.0}
    xx, yy = torch.cat([x, x]), torch.cat([y, y])  # micro-batch 1 = half the window: same SVD basis
    windows(ref, create_optimizer(ref, "galore_adamw", **hp), xx, yy, 6, 2)
    windows(lw, LayerwiseOptimizer(lw, "galore_adamw", accumulation_steps=2, **hp), xx, yy, 6, 2)
    assert_same_weights(lw, ref, rtol=1e-4, atol=1e-5)


def test_per_param_and_previous_global_norm_clipping():
    ref, x, y = make_problem()
    lw, lw2, ref2 = copy.deepcopy(ref), copy.deepcopy(ref), copy.deepcopy(ref)
    c = 0.05

    def per_param(m):
        for p in m.parameters():
            torch.nn.utils.clip_grad_norm_([p], c)  # coef = c / (norm + 1e-6), at most 1

    opt = create_optimizer(ref, "adamw", lr=1e-2)
    for _ in range(5):
        loss_fn(ref, x, y).backward()
        per_param(ref)
        opt.step()
        opt.zero_grad()
    windows(lw, LayerwiseOptimizer(lw, "adamw", max_grad_norm=c, lr=1e-2), x, y, 5, 1)
    assert_same_weights(lw, ref)

    opt, prev = create_optimizer(ref2, "adamw", lr=1e-2), None
    for _ in range(5):
        loss_fn(ref2, x, y).backward()
        norm = torch.norm(torch.stack([p.grad.norm() for p in ref2.parameters()]))
        if prev is not None:
            for p in ref2.parameters():
                p.grad.mul_(torch.clamp(c / (prev + 1e-6), max=1.0))
        prev = norm
        opt.step()
        opt.zero_grad()
    windows(lw2, LayerwiseOptimizer(lw2, "adamw", max_grad_norm=c, clip_mode="global_prev", lr=1e-2), x, y, 5, 1)
    assert_same_weights(lw2, ref2)
    assert not torch.allclose(lw2.fc1.weight, lw.fc1.weight)


@pytest.mark.parametrize("name", ["adamw", "galore_adamw", "fira_adamw"])
def test_checkpoint_resume_is_exact(name):
    hp = {"lr": 1e-2} if name == "adamw" else {"lr": 1e-2, "rank": 4, "update_proj_gap": 3}
    a, x, y = make_problem()
    b = copy.deepcopy(a)
    windows(a, LayerwiseOptimizer(a, name, accumulation_steps=2, max_grad_norm=1.0, clip_mode="global_prev", **hp), x, y, 7, 2)
    opt_b = LayerwiseOptimizer(b, name, accumulation_steps=2, max_grad_norm=1.0, clip_mode="global_prev", **hp)
    windows(b, opt_b, x, y, 3, 2)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "optim": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c, _, _ = make_problem(seed=5)
    c.load_state_dict(ckpt["model"])
    opt_c = LayerwiseOptimizer(c, name, accumulation_steps=2, max_grad_norm=1.0, clip_mode="global_prev", **hp)
    opt_c.load_state_dict(ckpt["optim"])
    windows(c, opt_c, x, y, 4, 2)
    assert_same_weights(c, a, rtol=0, atol=0)


def test_trainer_with_optimizer_cls_and_kwargs(tmp_path):
    """A plain transformers.Trainer drives it: same weights as the ordinary engine AdamW."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, y):
            return {"loss": loss_fn(self.inner, x, y)}

    base, x, y = make_problem()
    data = Dataset.from_dict({"x": x.tolist(), "y": y.tolist()}).with_format("torch")
    results = {}
    for mode in ("ordinary", "layerwise"):
        model = Wrapped(copy.deepcopy(base))
        args = TrainingArguments(
            output_dir=str(tmp_path / mode), per_device_train_batch_size=16, gradient_accumulation_steps=2, max_steps=4,
            learning_rate=1e-2, lr_scheduler_type="linear", max_grad_norm=0.0, report_to=[], save_strategy="no",
            use_cpu=True, dataloader_drop_last=True, seed=0, weight_decay=0.0,
        )
        if mode == "ordinary":
            cls_kw = (AdamW, {"lr": 1e-2, "weight_decay": 0.0})
        else:  # "model" in the kwargs: the Trainer passes it instead of its parameter groups
            cls_kw = (LayerwiseOptimizer, {"model": model, "name": "adamw", "accumulation_steps": 2, "lr": 1e-2, "weight_decay": 0.0})
        Trainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=cls_kw).train()
        results[mode] = model.inner
    assert_same_weights(results["layerwise"], results["ordinary"])
    assert not torch.equal(results["ordinary"].fc1.weight, base.fc1.weight)
