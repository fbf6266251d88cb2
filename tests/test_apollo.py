"""APOLLO / APOLLO-Mini against apollo-torch 1.0.3, fed the same projection.

apollo-torch draws its Gaussian projection from its own seeds (``stable_randn`` seeded with the
parameter's 1-based position, advanced by ``next_seed`` at each refresh); lowmem draws from its
seeds. The test injects apollo-torch's draw into lowmem's projection (a monkeypatched basis
generator) and checks that both optimizers then take the same steps: channel-wise and tensor-wise
scaling, the norm-growth limiter, bias correction in the step size, decay after the update, refreshes
every ``update_proj_gap`` steps, unprojected groups (plain AdamW of transformers' legacy form).
"""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import APOLLOAdamW, create_optimizer
from lowmem.optim.subspace import SubspaceProjection

apollo_torch = pytest.importorskip("apollo_torch")
from apollo_torch.random_projector import GradientProjector, next_seed  # noqa: E402

SHAPES = [(24, 40), (40, 24), (40,)]


def apollo_draw(shape, rank, side, param_index, refreshes):
    """The basis apollo-torch 1.0.3 uses at its ``refreshes``-th refresh for the parameter at 1-based
    position ``param_index``: lowmem's layout (left: m x r, right: r x n) is apollo-torch's."""
    seed = param_index
    for _ in range(refreshes):
        seed = next_seed(seed)
    return GradientProjector(rank).get_orthogonal_matrix(torch.zeros(shape), rank, side, seed)


@pytest.fixture
def inject_apollo_basis(monkeypatch):
    original = SubspaceProjection._new_basis

    def new_basis(self, g, state, group, method, refreshes, gen):
        if method != "gaussian":
            return original(self, g, state, group, method, refreshes, gen)
        index = state["proj_meta"][0].item() % 1_000_003  # lowmem's seed: seed * 1_000_003 + index
        side = self._side(g.shape, group)
        basis = apollo_draw(tuple(g.shape), group["rank"], side, index + 1, refreshes)
        return (basis, None) if side == "left" else (None, basis)

    monkeypatch.setattr(SubspaceProjection, "_new_basis", new_basis)


def run_pair(settings, steps=12, lr=1e-2, weight_decay=0.0, seed=0):
    torch.manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    proj = settings.get("proj", "random")
    ref_opt = apollo_torch.APOLLOAdamW(
        [{"params": theirs[:2], "rank": settings["rank"], "proj": proj, "scale_type": settings["scale_type"],
          "update_proj_gap": settings["update_proj_gap"], "scale": settings["scale"], "proj_type": "std"},
         {"params": theirs[2:]}],
        lr=lr, weight_decay=weight_decay, disable_nl=settings.get("disable_nl", False),
    )
    opt = APOLLOAdamW(
        [{"params": ours[:2], "rank": settings["rank"], "proj": proj, "scale_type": settings["scale_type"],
          "update_proj_gap": settings["update_proj_gap"], "scale": settings["scale"], "proj_type": "std"},
         {"params": ours[2:]}],
        lr=lr, weight_decay=weight_decay, disable_nl=settings.get("disable_nl", False),
    )
    gen = torch.Generator().manual_seed(seed + 1)
    worst = 0.0
    for t in range(steps):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen) * (1.0 + t % 3)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t + 1}: {m}")
            worst = max(worst, (a - b).abs().max().item())
    return worst


@pytest.mark.parametrize("settings", [
    {"rank": 4, "scale_type": "channel", "update_proj_gap": 5, "scale": 1.0},                    # APOLLO
    {"rank": 1, "scale_type": "tensor", "update_proj_gap": 5, "scale": 128.0},                   # APOLLO-Mini
    {"rank": 3, "scale_type": "channel", "update_proj_gap": 1, "scale": 4.0, "disable_nl": True},
    {"rank": 4, "scale_type": "channel", "update_proj_gap": 5, "scale": 1.0, "proj": "svd"},     # no injection
], ids=["apollo", "apollo_mini", "refresh_every_step_no_limiter", "svd"])
def test_matches_apollo_torch(settings, inject_apollo_basis):
    worst = run_pair(settings, weight_decay=0.05)
    assert worst < 1e-5


def test_apollo_mini_preset_is_apollo_with_the_papers_settings():
    """``apollo_mini`` = ``apollo_adamw`` with rank 1, tensor-wise scaling and scale 128 (paper, Sec. 4.2)."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(24, 40))]
    b = [torch.nn.Parameter(a[0].detach().clone())]
    mini = create_optimizer(a, "apollo_mini", lr=1e-2)
    full = create_optimizer(b, "apollo_adamw", lr=1e-2, rank=1, scale_type="tensor", scale=128.0)
    for _ in range(4):
        g = torch.randn(24, 40)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        mini.step()
        full.step()
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert mini.state[a[0]]["exp_avg"].shape == (1, 40)  # rank-1 state: n + n floats for a 24 x 40 weight


def test_bad_settings_name_the_field():
    p = [torch.nn.Parameter(torch.randn(8, 8))]
    with pytest.raises(ValueError, match="scale_type"):
        create_optimizer(p, "apollo_adamw", rank=2, scale_type="row")
    with pytest.raises(ValueError, match="proj_type"):
        create_optimizer(p, "apollo_adamw", rank=2, proj_type="full")
    with pytest.raises(ValueError, match="proj"):
        APOLLOAdamW([{"params": p, "rank": 2, "proj": "pca"}])
    with pytest.raises(ValueError, match="give one of them"):
        create_optimizer(p, "apollo_adamw", rank=2, proj="svd", projection="rsvd")
    with pytest.raises(ValueError, match="gamma"):
        create_optimizer(p, "apollo_adamw", rank=2, gamma=0.5)


def test_transformers_optim_args_for_apollo_work():
    """A config written for the HF Trainer (optim="apollo_adamw", its optim_args string) runs as is."""
    from lowmem.optim.hparams import parse_optim_args
    from lowmem.train import resolve_optim_name

    name, layerwise = resolve_optim_name("apollo_adamw_layerwise")
    assert (name, layerwise) == ("apollo_adamw", True)
    args = parse_optim_args("proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200,proj_type=std")
    opt = create_optimizer([torch.nn.Parameter(torch.randn(8, 16))], name, **args)
    group = opt.param_groups[0]
    assert (group["projection"], group["rank"], group["scale"], group["scale_type"]) == ("gaussian", 1, 128.0, "tensor")
    opt = create_optimizer([torch.nn.Parameter(torch.randn(8, 16))], name, **parse_optim_args("proj=svd,rank=2"))
    assert opt.param_groups[0]["projection"] == "svd"
