"""Outside checks on configurations the other parity tests (test_outside_parity.py, test_authors_parity.py,
test_audit_parity_peers.py, test_optim_parity.py, test_subspace_parity.py) leave out:

- a group setting given as ``None`` where ``None`` is not one of its values (Fira's ``gamma``, ``proj_type``,
  ``update_proj_gap``, ...): refused by name, never a ``TypeError`` / ``KeyError`` in the middle of a step
  or a silent default (``moment_policy=None`` trained as ``keep``);
- bitsandbytes' ``AdamW8bit`` (CPU) on bfloat16 / float16 parameters, fused and not;
- non-contiguous (transposed) parameters and gradients against torch's AdamW, galore-torch (every side),
  fira, transformers' Adafactor and torch's Muon;
- a parameter group added during the run (Muon as ``torch.optim.Muon``; the untargeted rule kept);
- ``adjust_lr_fn=None`` (torch's Muon default) named; an empty parameter list refused as torch refuses it;
- ``AdamW(state_dtype="param")`` on bf16 / fp16 parameters resumed from ``torch.optim.AdamW(fused=True)``'s
  checkpoint, bit for bit;
- pytorch_optimizer's ``AdaFactor`` as ``lowmem bench`` maps it;
- every group value torch reads at each step changed before every step (torch AdamW / Muon, bitsandbytes).

Small tensors, a few steps each (< 2 s once the peers are imported)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lowmem.optim import create_optimizer

# ---- helpers --------------------------------------------------------------------------------------


def zoo(shapes, dtype=torch.float32, seed=0, transposed=False):
    """Seeded parameters; with ``transposed`` every matrix is the transpose of a contiguous tensor (the same
    values, column-major strides), a 3-D one a permuted view."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g)
        if transposed and t.ndim == 2:
            t = t.t().contiguous().t()
        elif transposed and t.ndim == 3:
            t = t.permute(2, 1, 0).contiguous().permute(2, 1, 0)
        out.append(nn.Parameter(t.to(dtype)))
    return out


def trajectory(opt, params, steps=10, seed=1, transposed_grads=False):
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for p in params:
            grad = torch.randn(p.shape, generator=g) * (1 + t % 3)
            if transposed_grads and grad.ndim == 2:
                grad = grad.t().contiguous().t()
            p.grad = grad.to(p.dtype)
        opt.step()
    return params


def max_rel_diff(ours, ref, init):
    """max |ours - ref| over the largest update |ref - init|, over all parameters."""
    worst = 0.0
    for a, b, c in zip(ours, ref, init):
        a, b, c = a.detach().double(), b.detach().double(), c.detach().double()
        worst = max(worst, ((a - b).abs().max() / (b - c).abs().max().clamp_min(1e-30)).item())
    return worst


# ---- a group setting given as None ----------------------------------------------------------------

NONE_CASES = [
    ("fira_adamw", "gamma", "a finite float >= 1"),  # was: torch.clamp's RuntimeError at the first step
    ("galore_adamw", "proj_type", "one of"),  # KeyError: None at the first step
    ("galore_adamw", "moment_policy", "one of"),  # trained silently (the step never reads it before a refresh)
    ("apollo_adamw", "update_proj_gap", "an int > 0"),  # TypeError: int % NoneType
    ("frugal", "free_lr_scale", "a finite float"),  # TypeError in mul_
    ("osd_adamw", "proj_optimizer", "one of"),  # KeyError: None
    ("adamw_snsm", "seed", "an int >= 0"),  # TypeError: NoneType * int
]


@pytest.mark.parametrize("name,key,valid", NONE_CASES, ids=[f"{n}-{k}" for n, k, _ in NONE_CASES])
def test_none_given_for_a_group_setting_is_refused_by_name(name, key, valid):
    """``create_optimizer(..., key=None)`` (also what ``optim_args="key=None"`` of the Trainer and ``lowmem
    train`` give) validated ``None`` nowhere: a default of None means "not set", and the explicit one was taken
    for it. Now the given value is checked like any other, at construction, naming the setting and its values."""
    p = nn.Parameter(torch.randn(24, 16))
    with pytest.raises(ValueError, match=rf"Invalid {key}=None in optimizer '{name}': expected {valid}"):
        create_optimizer([p], name, rank=4, **{key: None})


def test_none_where_none_is_a_value_is_still_accepted():
    """``rank=None`` (a full-rank group), APOLLO's ``gamma=None`` (no limiter) and OSD's ``proj_weight_decay=None``
    (the authors' decay) stay valid."""
    for name, hp in (("galore_adamw", dict(rank=None)), ("apollo_adamw", dict(rank=4, gamma=None)),
                     ("osd_adamw", dict(rank=4, proj_weight_decay=None))):
        p = nn.Parameter(torch.randn(24, 16))
        opt = create_optimizer([p], name, **hp)
        p.grad = torch.randn(24, 16)
        opt.step()


def test_none_in_a_parameter_group_is_refused_by_name():
    from lowmem.optim import FiraAdamW

    p = nn.Parameter(torch.randn(24, 16))
    with pytest.raises(ValueError, match=r"Invalid gamma=None"):
        FiraAdamW([{"params": [p], "rank": 4, "gamma": None}])


# ---- bitsandbytes AdamW8bit on low-precision parameters -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fused", [False, True], ids=["engine", "fused"])
def test_adamw8bit_low_precision_parameters_match_bitsandbytes(dtype, fused):
    """bitsandbytes' CPU AdamW8bit steps a bf16 / fp16 parameter in float32 and rounds it once, as lowmem does:
    bf16 equal bit for bit over 8 steps at lr 5e-2 (weights moving by 0.3 - 0.5), with and without decay; fp16
    within one fp16 rounding in 0.02% of the elements (measured: 2 of 31,000; the engine's decay and step are
    two roundings of the same float32 numbers bitsandbytes forms in one kernel)."""
    bnb = pytest.importorskip("bitsandbytes")
    from lowmem.optim import AdamW8bit

    shapes = [(96, 64), (64, 96), (5000,), (40,), (3, 40, 50)]
    for wd in (0.0, 0.1):
        init = zoo(shapes, dtype)
        ours, theirs = copy.deepcopy(init), copy.deepcopy(init)
        trajectory(AdamW8bit(ours, lr=5e-2, weight_decay=wd, fused=fused), ours, steps=8)
        trajectory(bnb.optim.AdamW8bit(theirs, lr=5e-2, weight_decay=wd), theirs, steps=8)
        for a, b, c in zip(ours, theirs, init):
            assert (b.float() - c.float()).abs().max() > 0.2  # the comparison is not vacuous
            if dtype == torch.bfloat16:
                assert torch.equal(a, b)
            else:
                ulp = torch.finfo(dtype).eps * c.detach().float().abs().clamp_min(2**-6)
                assert ((a.float() - b.float()).abs() <= ulp).all()
                assert (a != b).float().mean() < 1e-3


# ---- non-contiguous parameters and gradients -------------------------------------------------------

NC_SHAPES = [(24, 16), (12, 40), (40, 12), (20, 20), (16,), (3, 8, 10), (1, 7), (7, 1)]


PAIRS = ["adamw", "adafactor", "muon", "galore-std", "galore-reverse_std", "galore-left", "galore-right", "galore-full",
         "fira-std"]


def _pair(label):
    """(ours, peer, shapes, bound) on transposed parameters; the bound is the contiguous runs' own agreement
    (float32 rounding; SVD rounding amplified by Adam for the projected ones) with a margin."""
    from lowmem.optim import AdamW, Adafactor, FiraAdamW, GaLoreAdamW, Muon

    def groups(ps, keys):
        return [{"params": [p for p in ps if p.ndim == 2 and min(p.shape) > 4], **keys},
                {"params": [p for p in ps if p.ndim != 2 or min(p.shape) <= 4]}]

    if label == "adamw":
        return (lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1),
                lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False), NC_SHAPES, 1e-5)
    if label == "adafactor":
        from transformers.optimization import Adafactor as HFAdafactor

        kw = dict(lr=1e-2, relative_step=False, scale_parameter=True, beta1=0.9)
        return lambda ps: Adafactor(ps, **kw), lambda ps: HFAdafactor(ps, **kw), NC_SHAPES, 2e-5
    if label == "muon":
        kw = dict(lr=1e-2, weight_decay=0.1, adjust_lr_fn="original")
        return (lambda ps: Muon(ps, **kw), lambda ps: torch.optim.Muon(ps, **kw), [(24, 16), (12, 40), (40, 12), (20, 20)],
                1e-4)
    if label.startswith("galore"):
        galore_torch = pytest.importorskip("galore_torch")
        keys = {"rank": 4, "update_proj_gap": 3, "scale": 0.5, "proj_type": label.split("-", 1)[1]}
        return (lambda ps: GaLoreAdamW(groups(ps, keys), lr=1e-2, weight_decay=0.1),
                lambda ps: galore_torch.GaLoreAdamW(groups(ps, keys), lr=1e-2, weight_decay=0.1), NC_SHAPES, 2e-4)
    fira = pytest.importorskip("fira")
    keys = {"rank": 4, "update_proj_gap": 3, "alpha": 0.5, "proj_type": "std"}
    return (lambda ps: FiraAdamW(groups(ps, keys), lr=1e-2, weight_decay=0.1),
            lambda ps: fira.FiraAdamW(groups(ps, keys), lr=1e-2, weight_decay=0.1), NC_SHAPES, 2e-4)


@pytest.mark.parametrize("label", PAIRS)
def test_transposed_parameters_match_the_peers(label):
    """A tied or transposed weight (``nn.Parameter(w.t())``) is a column-major parameter, its gradient is
    whatever layout autograd produced. Each peer run on the same values stored contiguously and each lowmem
    run on the column-major parameters (gradients contiguous, then column-major too) agree within the bound
    of the contiguous comparison (measured: AdamW 1.3e-6, Adafactor 3.5e-6, Muon 3.1e-6, GaLore 2.4e-5 -
    3.2e-5 on every side, Fira 2.5e-5)."""
    ours, peer, shapes, bound = _pair(label)
    init = zoo(shapes)
    ref = copy.deepcopy(init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trajectory(peer(ref), ref)
        for grads in (False, True):
            mine = zoo(shapes, transposed=True)
            assert not mine[0].is_contiguous()
            trajectory(ours(mine), mine, transposed_grads=grads)
            diff = max_rel_diff(mine, ref, init)
            assert diff < bound, f"{label} (gradients column-major: {grads}): {diff:.3g} >= {bound}"


# ---- a parameter group added during the run ---------------------------------------------------------


def _add_at(make, shapes, add_at=3, steps=8, seed=1):
    """``make`` on the first two parameters, the others added as one group (``lr=2e-2``) before step ``add_at``."""
    params = zoo(shapes)
    init = copy.deepcopy(params)
    opt = make(params[:2])
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        if t == add_at:
            opt.add_param_group({"params": params[2:], "lr": 2e-2})
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g) * (1 + t % 3)
            p.grad = grad if (t >= add_at or i < 2) else None
        opt.step()
    return params, init, opt


@pytest.mark.parametrize("how", ["class", "create_optimizer", "class_groups"])
def test_muon_group_added_later_takes_muon_as_torch_muon(how):
    """``torch.optim.Muon(ps).add_param_group({"params": more})`` (progressive unfreezing) steps ``more`` by Muon.
    lowmem's Muon gave the added group no ``use_muon``, so its weights took AdamW, silently: 1.68 of the update
    apart after 5 steps. A group added to an optimizer whose groups took the default (a flat list, or groups none
    of which set ``use_muon``) takes it too, as the groups given at construction did (measured after: 2.8e-6)."""
    from lowmem.optim import Muon

    kw = dict(lr=1e-2, weight_decay=0.1, adjust_lr_fn="original")
    make = {"class": lambda ps: Muon(ps, **kw), "create_optimizer": lambda ps: create_optimizer(ps, "muon", **kw),
            "class_groups": lambda ps: Muon([{"params": ps}], **kw)}[how]
    shapes = [(24, 16), (16, 40), (40, 16), (32, 32)]
    ours, init, opt = _add_at(make, shapes)
    theirs, _, _ = _add_at(lambda ps: torch.optim.Muon(ps, **kw), shapes)
    assert opt.param_groups[1]["use_muon"] is True
    assert max_rel_diff(ours, theirs, init) < 1e-4


def test_group_added_later_keeps_the_rule_of_the_groups_given():
    """When a group given at construction sets the key, a group without it is the untargeted one (galore-torch's
    rule for ``rank``), added later or not; SinkGD and SCALE fill their defaults as Muon does."""
    from lowmem.optim import Muon, Scale, SinkGD

    a, b, c = zoo([(8, 8), (8, 8), (8, 8)])
    opt = Muon([{"params": [a], "use_muon": True}, {"params": [b]}])
    opt.add_param_group({"params": [c]})
    assert "use_muon" not in opt.param_groups[2]
    for cls, key, value in ((SinkGD, "use_sinkgd", True), (Scale, "scale_role", "hidden")):
        a, b = zoo([(8, 8), (8, 8)])
        opt = cls([a])
        opt.add_param_group({"params": [b]})
        assert opt.param_groups[1][key] == value
    a, b = zoo([(8, 8), (8, 8)])
    opt = create_optimizer([a], "galore_adamw", rank=4)  # galore-torch: a group without rank is AdamW
    opt.add_param_group({"params": [b]})
    assert opt.param_groups[1].get("rank") is None


def test_torch_muons_default_adjust_lr_fn_is_named():
    """``torch.optim.Muon(params, adjust_lr_fn=None)`` (its default) is ``"original"``; lowmem's default is
    ``"match_rms_adamw"`` and ``None`` is refused: the error says which value is torch's ``None``."""
    from lowmem.optim import Muon

    with pytest.raises(ValueError, match=r"Invalid adjust_lr_fn=None.*torch.optim.Muon's adjust_lr_fn=None is 'original'"):
        Muon(zoo([(8, 8)]), adjust_lr_fn=None)


# ---- torch.optim.AdamW(fused=True) on low-precision parameters -------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("foreach", [None, False], ids=["default", "single_tensor"])
def test_adamw_param_state_on_low_precision_is_torch_fused_adamw_bit_for_bit(dtype, foreach):
    """``torch.optim.AdamW(fused=True)`` on bf16 / fp16 parameters keeps moments of the parameter's dtype;
    ``AdamW(state_dtype="param")`` takes the same kernel per parameter, so a run resumed from torch's
    checkpoint (weights-only, two groups of their own lr / betas / decay, a 1-row matrix, a 3-D tensor)
    continues bit for bit as torch's uninterrupted run (weights moving by 0.09 - 0.48: not vacuous)."""
    import io

    from lowmem.optim import AdamW

    def groups(ps):
        return [{"params": ps[:2], "weight_decay": 0.1},
                {"params": ps[2:], "lr": 2e-2, "betas": (0.8, 0.95), "weight_decay": 0.0}]

    shapes = [(24, 16), (16, 40), (16,), (3, 8, 10), (1, 7)]
    init = zoo(shapes, dtype)
    ref, ours = copy.deepcopy(init), copy.deepcopy(init)
    torch_opt = torch.optim.AdamW(groups(ref), lr=5e-2, fused=True)
    trajectory(torch_opt, ref, steps=4)
    trajectory(torch_opt, ref, steps=4, seed=99)
    torch_half = torch.optim.AdamW(groups(ours), lr=5e-2, fused=True)
    trajectory(torch_half, ours, steps=4)
    buf = io.BytesIO()
    torch.save(torch_half.state_dict(), buf)
    buf.seek(0)
    opt = AdamW(groups(ours), lr=5e-2, state_dtype="param", foreach=foreach)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    trajectory(opt, ours, steps=4, seed=99)
    for a, b, c in zip(ours, ref, init):
        assert (b.float() - c.float()).abs().max() > 0.05
        assert torch.equal(a, b), (tuple(a.shape), (a.float() - b.float()).abs().max().item())


# ---- pytorch_optimizer's AdaFactor: the bench's peer row for adafactor ------------------------------


@pytest.mark.parametrize("relative_step", [False, True], ids=["external_lr", "relative_step"])
def test_adafactor_matches_pytorch_optimizer_adafactor_as_the_bench_maps_it(relative_step):
    """``lowmem bench``'s ``po_adafactor`` row (lowmem/bench_peers.py) runs pytorch_optimizer 4.1.0's ``AdaFactor``
    as lowmem's ``adafactor``: ``betas=(None, 0.999)`` (no first moment), ``eps1=1e-30, eps2=1e-3``, decay rate
    -0.8, clip 1.0. Measured 2.4e-6 of the update over 10 steps with an external lr, 2.2e-6 with the relative
    step and parameter scaling, with weight decay (1-D to 3-D parameters)."""
    po = pytest.importorskip("pytorch_optimizer")
    from lowmem.optim import Adafactor

    kw = dict(decay_rate=-0.8, clip_threshold=1.0, weight_decay=0.05, warmup_init=False)
    if relative_step:
        ours = lambda ps: Adafactor(ps, **kw)  # noqa: E731
        peer = lambda ps: po.AdaFactor(ps, lr=None, betas=(None, 0.999), eps1=1e-30, eps2=1e-3, relative_step=True,  # noqa: E731
                                       scale_parameter=True, **kw)
    else:
        ours = lambda ps: Adafactor(ps, lr=1e-2, relative_step=False, scale_parameter=False, **kw)  # noqa: E731
        peer = lambda ps: po.AdaFactor(ps, lr=1e-2, betas=(None, 0.999), eps1=1e-30, eps2=1e-3,  # noqa: E731
                                       relative_step=False, scale_parameter=False, **kw)
    shapes = [(24, 16), (16, 40), (16,), (3, 8, 10)]
    init = zoo(shapes)
    a, b = copy.deepcopy(init), copy.deepcopy(init)
    trajectory(ours(a), a)
    trajectory(peer(b), b)
    assert max_rel_diff(a, b, init) < 2e-5


# ---- an empty parameter list ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["muon", "galore_adamw", "adamw_sn", "sinkgd", "apollo_adamw"])
def test_an_empty_parameter_list_is_refused_as_torch_refuses_it(name):
    """``torch.optim.AdamW([])`` raises "optimizer got an empty parameter list", and so did
    ``create_optimizer([], "adamw")``; a recipe with a targeted group (``rank``, ``use_muon``, ...) wrapped the
    empty list in a group and returned an optimizer that trains nothing, silently (e.g. a filter on
    ``requires_grad`` over a model frozen by mistake)."""
    with pytest.raises(ValueError, match="empty parameter list"):
        create_optimizer([], name)
    with pytest.raises(ValueError, match="empty parameter list"):
        create_optimizer((p for p in nn.Linear(4, 4).parameters() if not p.requires_grad), name)


# ---- settings changed at every step (a scheduler or a callback) -----------------------------------------


def _changing(opt, t):
    """A callback's changes before step ``t``: every value the optimizer reads at each step."""
    for g in opt.param_groups:
        g["lr"] = 1e-2 * (1 + t % 3)
        g["weight_decay"] = 0.1 * (t % 2)
        if "betas" in g:
            g["betas"] = (0.9 - 0.1 * (t % 2), 0.99 - 0.005 * (t % 3))
            g["eps"] = 1e-8 * 10 ** (t % 3)
        if "momentum" in g:
            g["momentum"] = 0.9 + 0.03 * (t % 2)
            g["nesterov"] = t % 2 == 0
            g["ns_steps"] = 3 + t % 3


@pytest.mark.parametrize("label", ["adamw", "adamw_single_tensor", "muon", "adamw8bit", "adamw8bit_fused"])
def test_settings_changed_at_every_step_match_the_peers(label):
    """Every group value torch reads at each step (lr, betas, eps, weight decay; Muon's momentum, Nesterov,
    ns_steps) changed before every step, as a scheduler or a callback does, on lowmem and on the peer: measured
    1.3e-6 (torch AdamW, default and single-tensor path), 4.2e-6 (torch Muon), 1.5e-6 / 0 (bitsandbytes
    AdamW8bit, engine / fused) of the update over 8 steps."""
    from lowmem.optim import AdamW, AdamW8bit, Muon

    shapes = [(24, 16), (16, 40), (40, 16), (32, 32)] if label == "muon" else [(96, 64), (64, 96), (16,), (3, 8, 10)]
    if label.startswith("adamw8bit"):
        bnb = pytest.importorskip("bitsandbytes")
        ours = lambda ps: AdamW8bit(ps, min_quant_size=16, fused=label.endswith("fused"))  # noqa: E731
        peer, bound = lambda ps: bnb.optim.AdamW8bit(ps, min_8bit_size=16), 1e-4  # noqa: E731
    elif label == "muon":
        ours = lambda ps: Muon(ps, adjust_lr_fn="match_rms_adamw")  # noqa: E731
        peer, bound = lambda ps: torch.optim.Muon(ps, adjust_lr_fn="match_rms_adamw"), 1e-4  # noqa: E731
    else:
        ours = lambda ps: AdamW(ps, foreach=False if label.endswith("single_tensor") else None)  # noqa: E731
        peer, bound = lambda ps: torch.optim.AdamW(ps, foreach=False), 1e-5  # noqa: E731
    init = zoo(shapes)
    runs = []
    for make in (ours, peer):
        params = copy.deepcopy(init)
        opt = make(params)
        g = torch.Generator().manual_seed(1)
        for t in range(8):
            _changing(opt, t)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * (1 + t % 3)
            opt.step()
        runs.append(params)
    assert max_rel_diff(runs[0], runs[1], init) < bound
