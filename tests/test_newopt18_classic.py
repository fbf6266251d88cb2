"""sgd / adagrad / rmsprop (lowmem/optim/recipes/classic.py): equal to torch.optim.SGD / Adagrad / RMSprop, exact
state, and a config written for the Hugging Face Trainer (``optim="sgd"`` ...) gets the optimizer transformers'
own Trainer builds (``trainer_optimizer._get_sgd`` / ``_get_adagrad`` / ``_get_rmsprop``)."""

from __future__ import annotations

import copy

import pytest
import torch

from lowmem.optim import create_optimizer

SHAPES = ((24, 40), (40,), (3, 5, 7))

CASES = [
    ("sgd", torch.optim.SGD, {"lr": 0.05}),
    ("sgd", torch.optim.SGD, {"lr": 0.05, "weight_decay": 0.1}),
    ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.05}),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.05, "lr_decay": 0.1, "initial_accumulator_value": 0.5, "eps": 1e-6}),
    ("rmsprop", torch.optim.RMSprop, {"lr": 1e-3}),
    ("rmsprop", torch.optim.RMSprop, {"lr": 1e-3, "alpha": 0.9, "centered": True}),
    ("rmsprop", torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.9, "eps": 1e-6}),
    ("rmsprop", torch.optim.RMSprop, {"lr": 1e-3, "alpha": 0.95, "momentum": 0.5, "centered": True}),
]

# float32 state tensors per element (beside the engine's step counter) of each case
STATES = [0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 3]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "chunks"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_equals_the_torch_class_and_state_bytes_exact(case, chunk):
    name, cls, hp = CASES[case]
    ours, theirs = _params(), _params()
    opt = create_optimizer(ours, name, **hp)
    opt.chunk_numel = chunk
    ref = cls(theirs, foreach=False, **hp)
    gen = torch.Generator().manual_seed(1)
    for t in range(6):
        grads = [torch.randn(p.shape, generator=gen) * (0.0 if t == 3 else 1.0) for p in ours]  # (a zero gradient)
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
    counters = sum(st["step"].numel() * st["step"].element_size() for st in opt.state.values())
    assert opt.state_bytes() == STATES[case] * 4 * sum(p.numel() for p in ours) + counters
    for p, q in zip(ours, theirs):  # the statistics themselves, under torch's names
        for key, value in ref.state[q].items():
            if key != "step" and value is not None:
                torch.testing.assert_close(opt.state[p][key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, hp, match", [
    ("sgd", {"nesterov": True}, r"nesterov=True requires momentum > 0 and dampening=0"),
    ("sgd", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, r"nesterov=True requires"),
])
def test_what_torch_would_train_otherwise_is_refused(name, hp, match):
    """Nesterov's rule is torch's. (``weight_decay > 0`` with momentum / Adagrad / RMSprop, refused before
    2026-12-01, is torch's L2 decay now: tests/test_l2decay_classic.py.)"""
    with pytest.raises(ValueError, match=match):
        create_optimizer(_params(), name, **hp)


HF_CASES = [
    ("sgd", "momentum=0.9,dampening=0.0,nesterov=True", 0.0, {"momentum": 0.9, "dampening": 0.0, "nesterov": True}),
    ("sgd", "", 0.1, {"momentum": 0.0, "nesterov": False}),
    ("adagrad", "lr_decay=0.05,eps=1e-6", 0.0, {"lr_decay": 0.05, "eps": 1e-6}),
    ("adagrad", "", 0.0, {"eps": 1e-10, "initial_accumulator_value": 0.0}),
    ("rmsprop", "alpha=0.9,centered=True,momentum=0.5", 0.0, {"alpha": 0.9, "centered": True, "momentum": 0.5}),
    ("rmsprop", "", 0.0, {"alpha": 0.99, "eps": 1e-8, "centered": False}),
]


@pytest.mark.parametrize("optim, optim_args, wd, expect", HF_CASES)
def test_under_training_arguments_equal_what_the_hf_trainer_builds(optim, optim_args, wd, expect, tmp_path):
    """transformers' Trainer builds ``torch.optim.<cls>(groups, lr=learning_rate, **optim_args it reads)`` with the
    weight decay on its decay groups and no adam_epsilon (set here to 1e-6 for adagrad / rmsprop: it must not reach Adagrad's / RMSprop's
    eps); lowmem's recipe under the same TrainingArguments has the same hyperparameters in every group and steps the
    same weights."""
    from transformers import Trainer, TrainingArguments

    from lowmem.trainers.hf import optimizer_cls_and_kwargs

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    eps = {} if optim == "sgd" else {"adam_epsilon": 1e-6}  # (sgd has no eps: lowmem refuses a set adam_epsilon there)
    args = TrainingArguments(str(tmp_path), optim=optim, optim_args=optim_args or None, learning_rate=3e-2,
                             weight_decay=wd, report_to=[], use_cpu=True, **eps)
    hf_cls, hf_kw = Trainer.get_optimizer_cls_and_kwargs(args, base)
    assert hf_cls.__module__.startswith("torch.optim")
    models, groups = {}, {}
    for who in ("hf", "lowmem"):
        model = copy.deepcopy(base)
        cls, kw = optimizer_cls_and_kwargs(model, optim, args=args)
        if who == "hf":  # the Trainer's decay groups (lowmem's are the same rule, tested in test_registry.py)
            opt = hf_cls([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in kw["params"]], **hf_kw)
        else:
            opt = cls(**kw)
        groups[who] = opt.param_groups
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            model(torch.randn(8, 24, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        models[who] = model
    for ours, theirs in zip(groups["lowmem"], groups["hf"]):
        for key in (*expect, "lr", "weight_decay"):
            assert ours[key] == theirs[key], (key, ours[key], theirs[key])
    for key, value in expect.items():
        assert groups["hf"][0][key] == value
    for p, q in zip(models["hf"].parameters(), models["lowmem"].parameters()):  # (RMSprop's first steps are ~10 lr:
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)  # a few float32 roundings of weights near 1 apart)
