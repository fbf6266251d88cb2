"""torch's coupled (L2) weight decay in sgd (with momentum) / adagrad / rmsprop (lowmem/optim/recipes/classic.py:
the rules' ``coupled_gradient`` hook, ``g + wd p`` before the statistics): equal to torch.optim.SGD / Adagrad /
RMSprop with ``weight_decay > 0``, whole and chunked, on float32 and bfloat16 parameters; exact state and traced
transient; a Hugging Face config (``optim: sgd`` with ``weight_decay``) trains what transformers' Trainer builds."""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer

SHAPES = ((24, 40), (40,), (3, 5, 7))

CASES = [  # (name, torch class, hyperparameters, float32 state tensors per element)
    ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1}, 1),
    ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05}, 1),
    ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.2}, 1),
    ("sgd", torch.optim.SGD, {"lr": 0.05, "weight_decay": 0.1}, 0),  # (no momentum: the engine's decoupled decay)
    ("adagrad", torch.optim.Adagrad, {"lr": 0.05, "weight_decay": 0.1}, 1),
    ("adagrad", torch.optim.Adagrad, {"lr": 0.05, "lr_decay": 0.1, "initial_accumulator_value": 0.5, "eps": 1e-6,
                                      "weight_decay": 0.3}, 1),
    ("rmsprop", torch.optim.RMSprop, {"lr": 1e-3, "weight_decay": 0.1}, 1),
    ("rmsprop", torch.optim.RMSprop, {"lr": 1e-3, "alpha": 0.9, "centered": True, "weight_decay": 0.2}, 2),
    ("rmsprop", torch.optim.RMSprop, {"lr": 1e-3, "alpha": 0.95, "momentum": 0.5, "centered": True,
                                      "weight_decay": 0.05}, 3),
]
IDS = [f"{n}-{'-'.join(k for k in hp if k not in ('lr', 'weight_decay')) or 'plain'}" for n, _, hp, _ in CASES]


def _params(dtype=torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "chunks"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_equals_the_torch_class_with_weight_decay(case, chunk):
    """Six steps (one with a zero gradient: the decay alone feeds the statistics) equal to the torch class's, the
    statistics under torch's names too; state exactly the statistics (the decay keeps nothing)."""
    name, cls, hp, states = case
    ours, theirs = _params(), _params()
    opt = create_optimizer(ours, name, **hp)
    opt.chunk_numel = chunk
    ref = cls(theirs, foreach=False, **hp)
    gen = torch.Generator().manual_seed(1)
    for t in range(6):
        grads = [torch.randn(p.shape, generator=gen) * (0.0 if t == 3 else 1.0) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
    counters = sum(st["step"].numel() * st["step"].element_size() for st in opt.state.values())
    assert opt.state_bytes() == states * 4 * sum(p.numel() for p in ours) + counters
    for p, q in zip(ours, theirs):
        for key, value in ref.state[q].items():
            if key != "step" and value is not None:
                torch.testing.assert_close(opt.state[p][key], value, rtol=1e-6, atol=1e-7)


COUPLED = [i for i, c in enumerate(CASES) if c[0] != "sgd" or c[2].get("momentum")]  # (where the decay is coupled)


@pytest.mark.parametrize("case", [CASES[i] for i in COUPLED], ids=[IDS[i] for i in COUPLED])
def test_bfloat16_parameters_whole_and_chunked_equal_torch_on_their_values(case):
    """bfloat16 parameters (float32 statistics, the step in float32, rounded to nearest): whole and chunked steps
    bit-equal, and equal within one bfloat16 rounding to the torch class stepping the same values in float32 (its
    parameters rounded to bfloat16 after each step, as ours are stored). The decay is large enough here that the
    decoupled form differs by more than that rounding."""
    name, cls, hp, _ = case
    hp = {**hp, "weight_decay": 0.5}
    runs = {}
    for chunk in (None, 64):
        ps = _params(torch.bfloat16)
        opt = create_optimizer(ps, name, **hp)
        opt.chunk_numel = chunk
        runs[chunk] = (ps, opt)
    theirs = [torch.nn.Parameter(p.detach().float()) for p in runs[None][0]]
    ref = cls(theirs, foreach=False, **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(q.shape, generator=gen).bfloat16() for q in theirs]
        for ps, opt in runs.values():
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        for q, g in zip(theirs, grads):
            q.grad = g.float()
        ref.step()
        with torch.no_grad():
            for q in theirs:
                q.copy_(q.bfloat16().float())
    for p, c, q in zip(runs[None][0], runs[64][0], theirs):
        assert torch.equal(p, c)
        torch.testing.assert_close(p.float(), q, rtol=8e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("chunk", [None, 256], ids=["whole", "chunks"])
@pytest.mark.parametrize("name, hp", [("sgd", {"momentum": 0.9}), ("sgd", {"momentum": 0.9, "nesterov": True}),
                                      ("adagrad", {}), ("rmsprop", {}), ("rmsprop", {"momentum": 0.9, "centered": True})],
                         ids=["sgd", "nesterov", "adagrad", "rmsprop", "rmsprop-centered-momentum"])
def test_step_allocates_what_it_reports(name, hp, chunk, dtype):
    """Every dispatched output of one per-parameter step traced: equal to ``step_transient_bytes`` (the coupled
    gradient, 4 B per element of a chunk, 8 for float64 statistics, beside the rule's temporaries; on a bfloat16
    parameter it takes the place of the gradient's float32 copy). SGD's bfloat16 chunks are counted with both
    float32 copies (the engine's count for a rule whose direction may be the gradient itself; 4 B per element over,
    as without decay): never under there."""
    from test_nonfinite_check_bytes import _AllLive

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(24, 40, dtype=dtype))
    opt = create_optimizer([p], name, foreach=False, lr=1e-3, weight_decay=0.1,
                           state_dtype="param" if dtype == torch.float64 else "float32", **hp)
    opt.chunk_numel = chunk
    g = torch.randn(24, 40, dtype=dtype)
    opt.step_param(p, g.clone())
    g2 = g.clone()
    with _AllLive() as t:
        opt.step_param(p, g2)
    report = opt.step_transient_bytes(per_parameter=True)
    if name == "sgd" and dtype == torch.bfloat16 and chunk is not None:
        assert t.peak <= report <= t.peak + 4 * chunk
    else:
        assert t.peak == report
    # and the decay's own term: the report without it, less the coupled gradient of a float32 / float64 chunk
    opt.param_groups[0]["weight_decay"] = 0.0
    width = 0 if dtype == torch.bfloat16 else (8 if dtype == torch.float64 else 4)
    assert report - opt.step_transient_bytes(per_parameter=True) == width * (chunk or p.numel())


HF_CASES = [
    ("sgd", "momentum=0.9,nesterov=True", 0.01),
    ("sgd", "momentum=0.9,dampening=0.1", 0.1),
    ("adagrad", "lr_decay=0.05", 0.01),
    ("rmsprop", "alpha=0.9,centered=True,momentum=0.5", 0.01),
]


@pytest.mark.parametrize("optim, optim_args, wd", HF_CASES)
def test_a_hf_config_with_weight_decay_trains_what_the_trainer_builds(optim, optim_args, wd, tmp_path):
    """``TrainingArguments(optim=..., weight_decay=...)``: transformers' Trainer builds the torch class with the
    decay on its decay groups (biases and norms at 0); lowmem's recipe under the same arguments has the same groups'
    hyperparameters and steps the same weights (before: refused, "weight_decay=0.01 with momentum=0.9")."""
    import copy

    from transformers import Trainer, TrainingArguments

    from lowmem.trainers.hf import optimizer_cls_and_kwargs

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    args = TrainingArguments(str(tmp_path), optim=optim, optim_args=optim_args, learning_rate=3e-2,
                             weight_decay=wd, report_to=[], use_cpu=True)
    hf_cls, hf_kw = Trainer.get_optimizer_cls_and_kwargs(args, base)
    models, groups = {}, {}
    for who in ("hf", "lowmem"):
        model = copy.deepcopy(base)
        cls, kw = optimizer_cls_and_kwargs(model, optim, args=args)
        if who == "hf":
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
    assert sorted(g["weight_decay"] for g in groups["hf"]) == [0.0, wd]
    for ours, theirs in zip(groups["lowmem"], groups["hf"]):
        assert ours["weight_decay"] == theirs["weight_decay"] and ours["lr"] == theirs["lr"]
    for p, q in zip(models["hf"].parameters(), models["lowmem"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
