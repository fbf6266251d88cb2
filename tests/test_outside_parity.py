"""Outside checks of lowmem's optimizers against the packages and papers they claim to match, on
configurations the per-optimizer tests leave out: several parameter groups with their own settings,
1-D / 3-D / 4-D and tall / wide parameters, missing and zero gradients, a LambdaLR schedule, a
weights-only checkpoint reloaded mid-trajectory, and checkpoints of the peers whose settings lowmem
cannot honour (refused, never silently ignored). Small tensors: each test takes a few seconds."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from lowmem.optim import AdamW


def zoo(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


ZERO_AT = frozenset(range(2, 100, 4))


def trajectory(make, params, steps=20, seed=1, lr_lambda=None, none=(), zero=(), zero_at=ZERO_AT, reload_at=None):
    """``steps`` steps of ``make(params)`` on seeded gradients: parameter ``i in none`` gets no gradient
    every third step, ``i in zero`` a zero one at the steps ``zero_at`` (0-based); with ``reload_at``
    the optimizer (and its LambdaLR) is rebuilt there from a ``torch.load(weights_only=True)`` checkpoint."""
    opt = make(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        if t == reload_at:
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict() if sched else None}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            opt = make(params)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
            opt.load_state_dict(saved["opt"])
            if sched:
                sched.load_state_dict(saved["sched"])
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g) * (1 + t % 3)
            if i in none and t % 3 == 1:
                grad = None
            elif i in zero and t in zero_at:
                grad = torch.zeros(p.shape)
            p.grad = None if grad is None else grad.to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=t % 2 == 0)
        if sched:
            sched.step()
    return params


def max_rel_diff(ours, ref, init):
    """max |ours - ref| over the largest update |ref - init|, over all parameters."""
    worst = 0.0
    for a, b, c in zip(ours, ref, init):
        a, b, c = a.detach().double(), b.detach().double(), c.detach().double()
        worst = max(worst, ((a - b).abs().max() / (b - c).abs().max().clamp_min(1e-30)).item())
    return worst


def run_pair(ours, peer, shapes, dtype=torch.float32, **kw):
    init = zoo(shapes, dtype)
    a, b = copy.deepcopy(init), copy.deepcopy(init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trajectory(peer, b, **{k: v for k, v in kw.items() if k != "reload_at"})
        trajectory(ours, a, **kw)
    return max_rel_diff(a, b, init)


# ---- torch.optim.AdamW ----------------------------------------------------------------------

SHAPES = [(24, 16), (16, 40), (16,), (3, 8, 10), (2, 3, 4, 5)]


def adamw_groups(ps):
    return [{"params": ps[:2], "lr": 1e-2, "weight_decay": 0.05},
            {"params": ps[2:3], "weight_decay": 0.0, "betas": (0.8, 0.99), "eps": 1e-4},
            {"params": ps[3:], "lr": 3e-3}]


def test_adamw_groups_schedule_missing_grads_and_reload_match_torch():
    kw = dict(lr=5e-3, betas=(0.85, 0.97), eps=1e-6, weight_decay=0.1)
    diff = run_pair(lambda ps: AdamW(adamw_groups(ps), **kw),
                    lambda ps: torch.optim.AdamW(adamw_groups(ps), foreach=False, **kw), SHAPES,
                    lr_lambda=lambda t: 1 / (1 + 0.3 * t), none=(0, 3), zero=(1, 2), reload_at=7)
    assert diff < 1e-5


@pytest.mark.parametrize("flags", [{"maximize": True}, {"amsgrad": True}], ids=["maximize", "amsgrad"])
def test_torch_checkpoint_flags_lowmem_cannot_honour_are_refused(flags):
    """torch.optim.AdamW(maximize=True) loaded silently and the run then descended; amsgrad=True and
    torch.optim.Adam's coupled (L2) weight decay change the update too: each is refused by name, and
    the optimizer is left as it was."""
    ps = zoo([(4, 3)])
    torch_opt = torch.optim.AdamW(ps, lr=1e-2, **flags)
    ps[0].grad = torch.ones(4, 3)
    torch_opt.step()
    ours = AdamW(copy.deepcopy(ps), lr=1e-2)
    name = next(iter(flags))
    with pytest.raises(ValueError, match=rf"{name}=True.*valid: {name}=False"):
        ours.load_state_dict(torch_opt.state_dict())
    assert ours.param_groups[0]["lr"] == 1e-2 and name not in ours.param_groups[0]


def test_torch_adam_coupled_weight_decay_is_refused_and_without_decay_loads():
    ps = zoo([(4, 3)])
    for wd in (0.1, 0.0):
        torch_opt = torch.optim.Adam(ps, lr=1e-2, weight_decay=wd)
        ps[0].grad = torch.ones(4, 3)
        torch_opt.step()
        ours = AdamW(copy.deepcopy(ps), lr=1e-2, weight_decay=0.0)
        if wd:
            with pytest.raises(ValueError, match="decoupled_weight_decay=False.*valid: decoupled_weight_decay=True"):
                ours.load_state_dict(torch_opt.state_dict())
        else:  # no decay: Adam's update is AdamW's
            ours.load_state_dict(torch_opt.state_dict())


# ---- SPAM / Stable-SPAM: pytorch_optimizer 4.1.0, with the authors' cosine schedules ---------------

def _authors_cosine(self, t):
    """The authors' Stable-SPAM CosineDecay.get_dr: torch's ``CosineAnnealingLR(T_max=t_max + 1,
    eta_min).step(t)``, i.e. its closed form at epoch ``t``, not clamped. pytorch_optimizer 4.1.0
    sets ``last_epoch = t`` and calls ``step()``: torch's recursive form one epoch later, clamped at
    ``t_max``: other multipliers (docs/compressed.md)."""
    import math

    base = self.sgd.param_groups[0]["initial_lr"]
    return self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * t / (self.t_max + 1))) / 2


def _authors_spam_cosine(self, t):
    """The authors' SPAM CosineDecay.get_dr: as :func:`_authors_cosine`, ``eta_min`` from ``t >= t_max`` on."""
    return self.eta_min if t >= self.t_max else _authors_cosine(self, t)


SPAM_SHAPES = [(24, 16), (16, 40), (16,), (3, 8, 10)]


def spam_groups(ps):
    return [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "weight_decay": 0.0}]


@pytest.mark.parametrize("cfg", [dict(threshold=3.0, reset_interval=7, warmup_steps=3, grad_accu_steps=2),
                                 dict(threshold=5000.0, reset_interval=10, warmup_steps=4, grad_accu_steps=20)],
                         ids=["clipping", "resets"])
def test_spam_matches_pytorch_optimizer_with_the_authors_warmup(cfg, monkeypatch):
    po = pytest.importorskip("pytorch_optimizer")
    from pytorch_optimizer.optimizer import spam as po_spam

    from lowmem.optim import SPAM

    kw = dict(lr=5e-3, betas=(0.85, 0.98), eps=1e-6, weight_decay=0.1)
    peer_kw = dict(threshold=cfg["threshold"], update_proj_gap=cfg["reset_interval"],
                   warmup_epoch=cfg["warmup_steps"], grad_accu_steps=cfg["grad_accu_steps"])
    ours = lambda ps: SPAM(spam_groups(ps), **kw, **cfg)  # noqa: E731
    peer = lambda ps: po.SPAM(spam_groups(ps), **kw, **peer_kw, foreach=False)  # noqa: E731
    as_ported = run_pair(ours, peer, SPAM_SHAPES, steps=25, lr_lambda=lambda t: 1 / (1 + 0.1 * t), reload_at=9)
    monkeypatch.setattr(po_spam.CosineDecay, "get_death_rate", _authors_spam_cosine)
    diff = run_pair(ours, peer, SPAM_SHAPES, steps=25, lr_lambda=lambda t: 1 / (1 + 0.1 * t), reload_at=9)
    assert diff < 1e-5  # measured 1.7e-6
    assert as_ported > 1e-2  # the port's warm-up multipliers (0.155, 0.578, 0.928 for W=3; the authors' 0.01, 0.155, 0.505)


def test_stable_spam_t_max_matches_pytorch_optimizer_with_the_authors_schedule(monkeypatch):
    po = pytest.importorskip("pytorch_optimizer")
    from pytorch_optimizer.optimizer import spam as po_spam

    from lowmem.optim import StableSPAM

    cfg = dict(gamma1=0.5, gamma2=0.8, theta=0.9, t_max=10)
    kw = dict(lr=5e-3, betas=(0.85, 0.98), eps=1e-6, weight_decay=0.1)
    ours = lambda ps: StableSPAM(spam_groups(ps), **kw, **cfg, reset_interval=8)  # noqa: E731
    peer = lambda ps: po.StableSPAM(spam_groups(ps), **kw, **cfg, update_proj_gap=8)  # noqa: E731
    as_ported = run_pair(ours, peer, SPAM_SHAPES, steps=25, reload_at=9)
    monkeypatch.setattr(po_spam.CosineDecay, "get_death_rate", _authors_cosine)
    diff = run_pair(ours, peer, SPAM_SHAPES, steps=25, reload_at=9)
    assert diff < 1e-5  # measured 1.5e-6
    assert as_ported > 1e-2


# ---- galore-torch 1.0 and fira 1.0.2: two projected groups of their own settings ------------------

SUBSPACE_SHAPES = [(24, 16), (12, 40), (40, 12), (20, 20), (16,), (3, 4, 5), (2, 3, 4, 5)]
#: zero gradients only at steps that refresh no basis of gap 5 or 3 (a zero gradient's refresh is
#: skipped by lowmem and taken by the packages: docs/subspace.md)
OFF_REFRESH = frozenset({2, 7, 13, 14, 22})
SUBSPACE_RUN = dict(steps=23, lr_lambda=lambda t: 1 / (1 + 0.2 * t), none=(0, 1, 4), zero=(2, 3, 5),
                    zero_at=OFF_REFRESH, reload_at=8)


def subspace_groups(ps, a, b):
    """Tall (24x16, 40x12) and wide / square (12x40, 20x20) weights in two projected groups; the
    vector, 3-D and 4-D parameters in a plain one."""
    return [{"params": [ps[0], ps[2]], **a}, {"params": [ps[1], ps[3]], **b},
            {"params": ps[4:], "weight_decay": 0.0}]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_galore_adamw_two_projected_groups_match_galore_torch(proj_type):
    """Per-group rank / update_proj_gap / scale / lr / weight_decay, missing gradients (each parameter's
    own refresh schedule), zero gradients, a LambdaLR and a weights-only reload (lowmem only: galore-torch
    pickles its projectors)."""
    galore_torch = pytest.importorskip("galore_torch")
    from lowmem.optim import GaLoreAdamW

    a = {"rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": proj_type, "lr": 2e-2}
    b = {"rank": 6, "update_proj_gap": 3, "scale": 1.5, "proj_type": proj_type, "weight_decay": 0.02}
    kw = dict(lr=1e-2, betas=(0.85, 0.98), eps=1e-5, weight_decay=0.1)
    diff = run_pair(lambda ps: GaLoreAdamW(subspace_groups(ps, a, b), **kw),
                    lambda ps: galore_torch.GaLoreAdamW(subspace_groups(ps, a, b), **kw), SUBSPACE_SHAPES, **SUBSPACE_RUN)
    assert diff < 2e-4  # measured 2.0e-5 - 3.9e-5 (SVD rounding, amplified by Adam)


@pytest.mark.parametrize("cfg", [{"lr": 1e-2, "relative_step": False, "scale_parameter": False},
                                 {"lr": 1e-2, "relative_step": False, "clip_threshold": 0.5, "decay_rate": -0.6,
                                  "beta1": 0.5, "weight_decay": 0.05}], ids=["plain", "beta1_clip_decay"])
def test_galore_adafactor_two_projected_groups_match_galore_torch(cfg):
    galore_torch = pytest.importorskip("galore_torch")
    from lowmem.optim import GaLoreAdafactor

    a = {"rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": "std"}
    b = {"rank": 6, "update_proj_gap": 3, "scale": 1.5, "proj_type": "std", "lr": 3e-2}
    diff = run_pair(lambda ps: GaLoreAdafactor(subspace_groups(ps, a, b), **cfg),
                    lambda ps: galore_torch.GaLoreAdafactor(subspace_groups(ps, a, b), **cfg), SUBSPACE_SHAPES, **SUBSPACE_RUN)
    assert diff < 2e-4


def test_fira_adamw_two_projected_groups_match_fira():
    fira = pytest.importorskip("fira")
    from lowmem.optim import FiraAdamW

    a = {"rank": 4, "update_proj_gap": 5, "alpha": 0.5, "proj_type": "std", "lr": 2e-2}
    b = {"rank": 6, "update_proj_gap": 3, "alpha": 1.0, "proj_type": "reverse_std", "weight_decay": 0.02}
    kw = dict(lr=1e-2, betas=(0.85, 0.98), eps=1e-5, weight_decay=0.1)
    diff = run_pair(lambda ps: FiraAdamW(subspace_groups(ps, a, b), **kw),
                    lambda ps: fira.FiraAdamW(subspace_groups(ps, a, b), **kw), SUBSPACE_SHAPES, **SUBSPACE_RUN)
    assert diff < 2e-4  # measured 6e-5


# ---- torch.optim.Muon -----------------------------------------------------------------------------

MUON_SHAPES = [(24, 16), (16, 40), (40, 16), (32, 32)]


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_muon_class_on_a_flat_list_is_torch_muon(adjust_lr_fn):
    """``Muon(params)`` as ``torch.optim.Muon(params)``: the flat list is one group with use_muon=True
    (before, every parameter silently took AdamW: 1.6 of the update apart), with missing and zero
    gradients, a LambdaLR and a weights-only reload."""
    from lowmem.optim import Muon

    kw = dict(lr=1e-2, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
    diff = run_pair(lambda ps: Muon(ps, **kw), lambda ps: torch.optim.Muon(ps, **kw), MUON_SHAPES,
                    lr_lambda=lambda t: 1 / (1 + 0.2 * t), none=(0, 2), zero=(1, 3), reload_at=7)
    assert diff < 1e-4  # measured 3.8e-6 (bfloat16 Newton-Schulz, rounding per step)


def test_muon_groups_of_their_own_settings_match_torch_muon():
    from lowmem.optim import create_optimizer

    def groups(ps):
        return [{"params": ps[:2], "lr": 2e-2, "weight_decay": 0.05, "momentum": 0.9},
                {"params": ps[2:], "nesterov": False, "ns_steps": 3}]

    kw = dict(lr=1e-2, weight_decay=0.1, adjust_lr_fn="original")
    diff = run_pair(lambda ps: create_optimizer(groups(ps), "muon", **kw), lambda ps: torch.optim.Muon(groups(ps), **kw),
                    MUON_SHAPES, steps=15)
    assert diff < 1e-4  # measured 1.5e-6


def test_muon_says_torch_s_eps_is_ns_eps_here():
    """torch.optim.Muon(eps=1e-7) is its Newton-Schulz floor; lowmem's eps is AdamW's: with no AdamW
    parameter it would change nothing, without a word."""
    from lowmem.optim import Muon

    with pytest.warns(UserWarning, match="eps=1e-06 is AdamW's eps.*ns_eps"):
        Muon(zoo([(8, 8)]), eps=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Muon(zoo([(8, 8), (8,)]), eps=1e-6)  # the vector takes AdamW: its eps
        Muon(zoo([(8, 8)]), ns_eps=1e-6)


def test_normalized_recipes_give_groups_without_the_key_the_default():
    """Groups none of which has the key take the documented default, as with create_optimizer (they warned and
    took AdamW before; tests/test_transient_exact.py compares the two paths' steps)."""
    from lowmem.optim import Muon, Scale, SinkGD

    for cls, key in ((Muon, "use_muon"), (SinkGD, "use_sinkgd"), (Scale, "scale_role")):
        default = True if key != "scale_role" else "hidden"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            grouped = cls([{"params": zoo([(8, 8)])}])
            opt = cls(zoo([(8, 8)]))  # a flat list: one targeted group
            cls([{"params": zoo([(8, 8)]), key: False if key != "scale_role" else "hidden"}])
        assert opt.param_groups[0][key] == grouped.param_groups[0][key] == default


# ---- pytorch_optimizer's AdamWSN: flat subsets (subset_size) -------------------------------------

SN_SHAPES = [(40, 24), (24, 40), (37, 29), (40,), (3, 8, 10), (2, 3, 4, 5), (7,)]


@pytest.mark.parametrize("subset_size", [-1, -2, 16])
@pytest.mark.parametrize("foreach", [None, False])
def test_adamw_sn_flat_subsets_groups_and_odd_sizes_match_pytorch_optimizer(subset_size, foreach):
    """Two groups (own lr / betas / decay), 3-D and 4-D parameters, and sizes whose subsets are single
    elements (37 x 29 = 1073 and a length-7 vector: no divisor in range): the multi-tensor step crashed
    on those (v kept as (numel, 1) against a (37, 29) gradient). LambdaLR, zero gradients, a weights-only
    reload. (Missing gradients are left out: the peer's bias correction counts the group's steps,
    lowmem's and the authors' the parameter's; docs/optimizers.md.)"""
    po = pytest.importorskip("pytorch_optimizer")
    from lowmem.optim import create_optimizer

    def groups(ps):
        return [{"params": ps[:3], "lr": 2e-2}, {"params": ps[3:], "weight_decay": 0.0, "betas": (0.8, 0.95)}]

    hp = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-6)
    diff = run_pair(lambda ps: create_optimizer(groups(ps), "adamw_sn", subset_size=subset_size, foreach=foreach, **hp),
                    lambda ps: po.AdamWSN([{**g, "sn": True} for g in groups(ps)], subset_size=subset_size,
                                          foreach=False, **hp),
                    SN_SHAPES, steps=15, lr_lambda=lambda t: 1 / (1 + 0.2 * t), zero=(1, 5), reload_at=6)
    assert diff < 1e-4  # measured 2e-6 - 1.3e-5


# ---- apollo-torch 1.0.3: two projected groups, its seeds injected ---------------------------------

@pytest.fixture
def apollo_torch_draws(monkeypatch):
    """lowmem's projection made to draw apollo-torch's bases (tests/test_apollo.py does it for one
    group): apollo-torch seeds a parameter with its 1-based position over all groups, lowmem with its
    index in its group, so the fixture maps each lowmem parameter to its global position."""
    pytest.importorskip("apollo_torch")
    from apollo_torch.random_projector import GradientProjector, next_seed

    from lowmem.optim.subspace import SubspaceProjection

    positions: dict[int, int] = {}
    original = SubspaceProjection._new_basis

    def new_basis(self, g, state, group, method, refreshes, gen):
        if method != "gaussian":
            return original(self, g, state, group, method, refreshes, gen)
        seed = positions[id(group["params"][state["proj_meta"][0].item() % 1_000_003])]
        for _ in range(refreshes):
            seed = next_seed(seed)
        side = self._side(g.shape, group)
        basis = GradientProjector(group["rank"]).get_orthogonal_matrix(torch.zeros(tuple(g.shape)), group["rank"], side, seed)
        return (basis, None) if side == "left" else (None, basis)

    monkeypatch.setattr(SubspaceProjection, "_new_basis", new_basis)
    return positions


APOLLO_SHAPES = [(24, 40), (40, 24), (16, 30), (30, 16), (40,), (3, 4, 5)]


@pytest.mark.parametrize("proj", ["random", "svd"])
def test_apollo_two_projected_groups_match_apollo_torch(proj, apollo_torch_draws):
    """APOLLO (channel, rank 4) and APOLLO-Mini (tensor, rank 1, scale 128) groups side by side with their
    own update_proj_gap / lr / weight_decay, tall and wide weights, missing and zero gradients, a
    LambdaLR and a weights-only reload."""
    import apollo_torch

    from lowmem.optim import APOLLOAdamW

    a = {"rank": 4, "proj": proj, "scale_type": "channel", "update_proj_gap": 5, "scale": 1.0, "proj_type": "std", "lr": 2e-2}
    b = {"rank": 1, "proj": proj, "scale_type": "tensor", "update_proj_gap": 3, "scale": 128.0, "proj_type": "std",
         "weight_decay": 0.02}
    kw = dict(lr=1e-2, betas=(0.85, 0.98), eps=1e-5, weight_decay=0.1)

    def ours(ps):
        apollo_torch_draws.clear()
        apollo_torch_draws.update({id(p): i + 1 for i, p in enumerate([ps[0], ps[2], ps[1], ps[3], *ps[4:]])})
        return APOLLOAdamW(subspace_groups(ps, a, b), **kw)

    diff = run_pair(ours, lambda ps: apollo_torch.APOLLOAdamW(subspace_groups(ps, a, b), **kw), APOLLO_SHAPES,
                    steps=23, lr_lambda=lambda t: 1 / (1 + 0.2 * t), none=(0, 1, 4), zero=(2, 5), zero_at=OFF_REFRESH,
                    reload_at=8)
    assert diff < 1e-4  # measured 1e-5 - 2e-5


# ---- adam-mini 1.1.1 ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_adam_mini_betas_eps_missing_grads_schedule_and_reload_match_adam_mini(kind):
    """Other betas / eps / decay than tests/test_adam_mini.py's, seeded gradients on every parameter of a
    tiny grouped-query-attention model (per-head q / k, per-row v / o / MLP / embedding / head, per-tensor
    norms, Qwen2's per-element biases, a tied head), parameters missing gradients, zero gradients, a
    LambdaLR and a weights-only reload."""
    adam_mini = pytest.importorskip("adam_mini")
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from lowmem.optim import AdamMini

    sizes = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    torch.manual_seed(0)
    base = (LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=False)) if kind == "llama"
            else Qwen2ForCausalLM(Qwen2Config(**sizes, tie_word_embeddings=True)))
    hp = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.2)
    models = {}

    def maker(cls, label):
        model = copy.deepcopy(base)
        models[label] = model
        return list(model.parameters()), lambda _: cls(model.named_parameters(), dim=32, n_heads=4, n_kv_heads=2,
                                                       verbose=False, **hp)

    ours, make_ours = maker(AdamMini, "ours")
    theirs, make_theirs = maker(adam_mini.Adam_mini, "theirs")
    init = [p.detach().clone() for p in base.parameters()]
    run = dict(steps=12, lr_lambda=lambda t: 1 / (1 + 0.2 * t), none=(0, 3, 5, 7), zero=(1, 2, 4, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trajectory(make_theirs, theirs, **run)
        trajectory(make_ours, ours, reload_at=5, **run)
    assert max_rel_diff(ours, theirs, init) < 1e-4  # measured 1.8e-7 - 2.8e-6


# ---- bitsandbytes AdamW8bit (CPU) -----------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True])
def test_adamw8bit_groups_schedule_and_reload_match_bitsandbytes(fused):
    bnb = pytest.importorskip("bitsandbytes")
    from lowmem.optim import AdamW8bit

    def groups(ps):
        return [{"params": ps[:2], "lr": 2e-3, "weight_decay": 0.05}, {"params": ps[2:], "betas": (0.8, 0.99)}]

    kw = dict(lr=1e-3, betas=(0.9, 0.995), eps=1e-8, weight_decay=0.01)
    diff = run_pair(lambda ps: AdamW8bit(groups(ps), fused=fused, **kw), lambda ps: bnb.optim.AdamW8bit(groups(ps), **kw),
                    [(96, 64), (64, 96), (5000,), (40,), (3, 40, 50)], steps=15, lr_lambda=lambda t: 1 / (1 + 0.2 * t),
                    none=(0, 2), zero=(1, 4), reload_at=6)
    assert diff < 2e-4  # measured 1.3e-5 / 2.5e-5; the 8-bit error itself is 3e-2 of the update


# ---- pytorch_optimizer's GaLore / Fira: another refresh schedule, another key name ----------------

@pytest.mark.parametrize("which", ["galore", "fira"])
def test_pytorch_optimizer_galore_and_fira_refresh_one_step_early(which, monkeypatch):
    """pytorch_optimizer 4.1.0's GaLore and Fira refresh at the group's 1-based step ``t % T == 0`` (the
    first basis serves T - 1 steps); galore-torch, fira, the paper's Algorithm 2 (``t mod T = 0`` from
    ``t = 0``) and lowmem at the 0-based one. With the projector given ``t - 1`` the port follows lowmem."""
    po = pytest.importorskip("pytorch_optimizer")
    from pytorch_optimizer.optimizer.utils import galore as po_galore

    from lowmem.optim import FiraAdamW, GaLoreAdamW

    shapes = [(24, 16), (12, 40), (40, 12), (20, 20), (16,), (3, 4, 5)]
    keys = {"rank": 4, "update_proj_gap": 5}
    ours_keys, peer_keys = ({**keys, "scale": 0.25}, {**keys, "scale": 0.25}) if which == "galore" else (
        {**keys, "alpha": 0.5}, {**keys, "alpha": 0.5, "scale": 0.5})
    cls, peer_cls = (GaLoreAdamW, po.GaLore) if which == "galore" else (FiraAdamW, po.Fira)
    kw = dict(lr=1e-2, betas=(0.85, 0.98), eps=1e-5, weight_decay=0.1)

    def groups(ps, k):
        return [{"params": ps[:4], **k}, {"params": ps[4:]}]

    ours = lambda ps: cls(groups(ps, {**ours_keys, "proj_type": "std"}), **kw)  # noqa: E731
    peer = lambda ps: peer_cls(groups(ps, {**peer_keys, "projection_type": "std"}), foreach=False, **kw)  # noqa: E731
    as_ported = run_pair(ours, peer, shapes, steps=23)
    project = po_galore.GaLoreProjector.project
    monkeypatch.setattr(po_galore.GaLoreProjector, "project",
                        lambda self, grad, num_steps, *a, **k: project(self, grad, num_steps - 1, *a, **k))
    assert run_pair(ours, peer, shapes, steps=23) < 1e-4  # measured 2.6e-6 (galore), 2.5e-6 (fira)
    assert as_ported > 0.1  # 0.26 (galore), 0.52 (fira)


def test_peer_spellings_are_named_in_the_errors():
    """A migrated group or keyword in another package's spelling: the error names lowmem's setting
    (difflib alone pointed pytorch_optimizer's projection_type at 'projection', the basis method)."""
    from lowmem.optim import GaLoreAdamW, create_optimizer

    p = zoo([(8, 8)])
    with pytest.raises(ValueError, match=r"'projection_type' -> 'proj_type' \('projection_type' is pytorch_optimizer"):
        GaLoreAdamW([{"params": p, "rank": 2, "projection_type": "std"}])
    with pytest.raises(ValueError, match=r"'warmup_epoch' -> 'warmup_steps'.*valid:"):
        create_optimizer(p, "spam", warmup_epoch=3)
    with pytest.raises(ValueError, match=r"'update_proj_gap' -> 'reset_interval'"):
        create_optimizer(p, "stable_spam", update_proj_gap=3)
    with pytest.raises(ValueError, match=r"'rnak' -> 'rank'"):  # difflib still answers the typos
        create_optimizer(p, "galore_adamw", rnak=3)
    with pytest.raises(ValueError, match=r"gamma1=-1.0.*-1, meaning beta1, is not taken: give betas\[0\]"):
        create_optimizer(p, "stable_spam", gamma1=-1.0)  # the authors' 'gamma1 = beta1' spelling
    with pytest.raises(ValueError, match=r"'disable_nl' -> 'gamma' \('disable_nl' is apollo-torch's name; disable_nl=True is gamma=None"):
        create_optimizer(p, "apollo_adamw", rank=2, disable_nl=True)
    # a peer's setting that changes nothing here: said so, not pointed at 'scale_type' (which changes the update)
    with pytest.raises(ValueError, match=r"'scale_front' -> nothing \(apollo-torch's setting") as err:
        create_optimizer(p, "apollo_adamw", rank=2, scale_front=True)
    assert "-> 'scale_type'" not in str(err.value)


def test_peer_spellings_are_named_under_the_trainer():
    """The Trainer's optim_args go through the same hints as create_optimizer (they used difflib alone)."""
    from lowmem.trainers.hf import trainer_hparams

    with pytest.raises(ValueError, match=r"'warmup_epoch' -> 'warmup_steps' \('warmup_epoch' is pytorch_optimizer's SPAM name"):
        trainer_hparams("spam", None, "warmup_epoch=3")
    with pytest.raises(ValueError, match=r"'alpha' -> 'scale' \('alpha' is fira's name"):
        trainer_hparams("fira_adamw", None, {"alpha": 0.5})


# ---- transformers' Adafactor --------------------------------------------------------------------------

@pytest.mark.parametrize("relative_step", [False, True])
def test_adafactor_groups_of_their_own_settings_match_transformers(relative_step):
    """Groups with their own lr / weight_decay / beta1 / clip_threshold / decay_rate / eps, 1-D to 4-D
    parameters and a (1, 7) matrix, missing and zero gradients, a weights-only reload (and a LambdaLR
    with an external lr)."""
    from transformers.optimization import Adafactor as HFAdafactor

    from lowmem.optim import Adafactor

    if relative_step:
        kw = {}

        def groups(ps):
            return [{"params": ps[:3], "beta1": None}, {"params": ps[3:], "beta1": 0.9, "decay_rate": -0.5, "eps": (1e-30, 1e-2)}]
    else:
        kw = dict(lr=1e-2, relative_step=False, scale_parameter=True, weight_decay=0.01, beta1=0.9)

        def groups(ps):
            return [{"params": ps[:2], "lr": 2e-2, "weight_decay": 0.05}, {"params": ps[2:4], "beta1": 0.8, "clip_threshold": 0.7},
                    {"params": ps[4:]}]

    run = dict(steps=25, none=(0, 3), zero=(1, 4), reload_at=9, lr_lambda=None if relative_step else (lambda t: 1 / (1 + 0.2 * t)))
    diff = run_pair(lambda ps: Adafactor(groups(ps), **kw), lambda ps: HFAdafactor(groups(ps), **kw),
                    [(24, 16), (16, 40), (16,), (3, 8, 10), (2, 3, 4, 5), (1, 7)], **run)
    assert diff < 1e-5  # measured 1.8e-6 (external lr), 0.0 (relative step)


# ---- lomo-optim 0.1.1's AdaLomo: other settings than tests/test_lomo.py's ---------------------------

@pytest.mark.parametrize("kw", [dict(clip_threshold=0.5, decay_rate=-0.6, eps=(1e-30, 1e-2)),
                                dict(clip_threshold=2.0, eps=(1e-20, 1e-4), weight_decay=0.3)], ids=["clip_decay_eps2", "wd"])
def test_adalomo_settings_match_lomo_optim(kw, monkeypatch):
    lomo_optim = pytest.importorskip("lomo_optim")
    from test_lomo import batches, run_layerwise
    from toy_problem import loss_fn, make_problem

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # its statistics are allocated with .cuda()
    ref, x, y = make_problem()
    ours, start = copy.deepcopy(ref), copy.deepcopy(ref)
    data = batches(x, y, 10)
    theirs = lomo_optim.AdaLomo(ref, lr=5e-2, **kw)
    for xb, yb in data:
        theirs.fused_backward(loss_fn(ref, xb, yb), 5e-2)
    run_layerwise(ours, "adalomo", data, lr=5e-2, **kw)
    assert max_rel_diff(list(ours.parameters()), list(ref.parameters()), list(start.parameters())) < 1e-5  # measured 4e-7 / 5.8e-7


def test_torch_checkpoint_of_bf16_parameters_names_state_dtype():
    """torch.optim.AdamW keeps bf16 moments for bf16 parameters; lowmem's float32 default refuses them,
    and the error says which setting loads them (state_dtype='param', then the run continues as torch's)."""
    ps = zoo([(4, 3)], dtype=torch.bfloat16)
    torch_opt = torch.optim.AdamW(ps, lr=1e-2)
    ps[0].grad = torch.ones(4, 3, dtype=torch.bfloat16)
    torch_opt.step()
    with pytest.raises(ValueError, match="expected a torch.float32 tensor.*state_dtype='param'"):
        AdamW(copy.deepcopy(ps), lr=1e-2).load_state_dict(torch_opt.state_dict())
    ours = AdamW(copy.deepcopy(ps), lr=1e-2, state_dtype="param")
    ours.load_state_dict(torch_opt.state_dict())
    assert ours.state[ours.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.bfloat16
