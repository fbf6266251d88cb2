"""Q-GaLore's layer-adaptive lazy refresh (``lazy_refresh_threshold`` / ``lazy_refresh_patience``, Zhang et al. 2024,
Section 3): the engine against the plain reference loop (when refreshes happen, each parameter's interval, the
weights), checkpoints (``weights_only=True``, resume bit for bit), ``state_bytes()``, the traced refresh step against
``step_transient_bytes``' per-parameter report, and the refusals (values out of range, projections whose refresh is
not an SVD of the gradient, batches of matrices)."""

import io
import math
import warnings

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.references import subset_norm as RSN
from lowmem.optim.references import subspace as R
from lowmem.optim.subspace import lazy_interval

STEPS = 40


def _grads(shape, steps=STEPS, drift=0.3, seed=0):
    """A fixed rank-1 direction plus noise (``drift``: the noise's size): the first singular vectors of successive
    gradients stay aligned (|cos| near 1) at small drift, wander at large."""
    gen = torch.Generator().manual_seed(seed)
    u, v = torch.randn(shape[0], 1, generator=gen), torch.randn(1, shape[1], generator=gen)
    return [3 * (u @ v) + drift * torch.randn(shape, generator=gen) * (1 + 0.5 * math.sin(t)) for t in range(steps)]


def _run(name, shape, grads, p0=None, **kw):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape) if p0 is None else p0.clone())
    p_init = p.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer([p], name, **kw)
    refreshes, ws = [], []
    for g in grads:
        before = int(opt.state[p]["proj_meta"][2]) if p in opt.state else 0
        p.grad = g.clone()
        opt.step()
        refreshes.append(int(opt.state[p]["proj_meta"][2]) > before)
        ws.append(p.detach().clone())
    return opt, p, p_init, ws, refreshes


def _reference(name, opt, p_init, grads):
    """The reference loop's weights and the steps it refreshed at (its subspace dict changes)."""
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    loop = {"galore_adamw": R.galore_adamw, "fira_adamw": R.fira_adamw, "frugal": R.frugal,
            "galore_adafactor": R.galore_adafactor, "adamw_snsm": RSN.subspace_momentum,
            "adagrad_snsm": RSN.subspace_momentum, "sgd_sm": RSN.subspace_momentum}[name]
    seen = []
    real = R.maybe_refresh

    def spy(g, t, sub, refreshes, group, index, **kw):
        out = real(g, t, sub, refreshes, group, index, **kw)
        seen.append(out[1] > refreshes)
        return out

    R.maybe_refresh = RSN.maybe_refresh = spy  # (the Subspace-Momentum loop imported it by name)
    try:
        ws = loop(p_init.clone(), grads, index=0, **group)
    finally:
        R.maybe_refresh = RSN.maybe_refresh = real
    return ws, seen


# (two-sided: eps 1e-3, as the registered reference config: the SVD's core P^T G Q is diagonal up to rounding noise
# whose sign Adam's first step would amplify)
CONFIGS = [
    ("galore_adamw", (40, 24), {"rank": 4, "update_proj_gap": 2, "lazy_refresh_threshold": 0.9,
                                "lazy_refresh_patience": 2, "lr": 1e-2}, 0.3),
    ("galore_adamw", (24, 40), {"rank": 4, "update_proj_gap": 3, "lazy_refresh_threshold": 0.5,
                                "lazy_refresh_patience": 1, "lr": 1e-2, "proj_type": "full", "eps": 1e-3}, 0.3),
    ("galore_adamw", (40, 24), {"rank": 4, "update_proj_gap": 2, "lazy_refresh_threshold": 0.6, "lazy_refresh_patience": 3,
                                "lr": 1e-2, "projection": "rsvd", "moment_policy": "rotate"}, 0.3),
    # noise as large as the signal: the first vectors wander, the mean |cos| of 3 stays under 0.99 (no lengthening)
    ("galore_adamw", (40, 24), {"rank": 4, "update_proj_gap": 2, "lazy_refresh_threshold": 0.99,
                                "lazy_refresh_patience": 3, "lr": 1e-2}, 3.0),
    ("fira_adamw", (24, 40), {"rank": 4, "update_proj_gap": 2, "lazy_refresh_threshold": 0.8,
                              "lazy_refresh_patience": 2, "lr": 1e-2}, 0.3),
    ("frugal", (40, 24), {"rank": 4, "update_proj_gap": 2, "lazy_refresh_threshold": 0.8, "lazy_refresh_patience": 2,
                          "lr": 1e-2, "projection": "svd", "refresh_phase": "multiples"}, 0.3),
    ("galore_adafactor", (40, 24), {"rank": 4, "update_proj_gap": 2, "lazy_refresh_threshold": 0.8,
                                    "lazy_refresh_patience": 2, "lr": 1e-2, "relative_step": False,
                                    "scale_parameter": False}, 0.3),
    # Subspace-Momentum (momentum reset at each refresh, the authors' 'multiples' schedule by default)
    ("adamw_snsm", (40, 24), {"rank": 4, "update_proj_gap": 2, "lazy_refresh_threshold": 0.8,
                              "lazy_refresh_patience": 2, "lr": 1e-2}, 0.3),
    ("adamw_snsm", (24, 40), {"rank": 4, "update_proj_gap": 3, "lazy_refresh_threshold": 0.5,
                              "lazy_refresh_patience": 1, "lr": 1e-2, "proj_type": "full", "refresh_phase": "aligned",
                              "subset_norm": False}, 0.3),
    ("adamw_snsm", (40, 24), {"rank": 4, "update_proj_gap": 2, "lazy_refresh_threshold": 0.99,
                              "lazy_refresh_patience": 3, "lr": 1e-2}, 3.0),
    ("sgd_sm", (24, 40), {"rank": 4, "update_proj_gap": 3, "lazy_refresh_threshold": 0.5,
                          "lazy_refresh_patience": 1, "lr": 1e-2, "moment_policy": "rotate"}, 0.3),
    ("adagrad_snsm", (40, 24), {"rank": 4, "update_proj_gap": 2, "lazy_refresh_threshold": 0.6,
                                "lazy_refresh_patience": 3, "lr": 1e-2, "projection": "rsvd"}, 0.3),
]


@pytest.mark.parametrize("name,shape,kw,drift", CONFIGS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CONFIGS)])
def test_engine_equals_reference(name, shape, kw, drift):
    """The same refresh steps and weights as the reference loop; aligned gradients refresh less often than every
    update_proj_gap steps, wandering ones exactly as often."""
    grads = _grads(shape, drift=drift)
    opt, p, p_init, ws, refreshes = _run(name, shape, grads, **kw)
    ref, ref_refreshes = _reference(name, opt, p_init, grads)
    assert refreshes == ref_refreshes
    for a, b in zip(ws, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _, _, _, _, plain = _run(name, shape, grads, **{**kw, "lazy_refresh_threshold": None})
    if drift < 1:
        assert sum(refreshes) < sum(plain) and int(opt.state[p]["proj_lazy"][0]) > kw["update_proj_gap"]
    else:
        assert refreshes == plain and int(opt.state[p]["proj_lazy"][0]) == kw["update_proj_gap"]


def test_lazy_interval_rule():
    """The authors' queue: full and its mean >= threshold doubles the interval; the queue is kept."""
    assert lazy_interval(5, [], 0.9, 0.5, 2) == (5, [0.9])
    assert lazy_interval(5, [0.9], 0.2, 0.5, 2) == (10, [0.9, 0.2])  # mean 0.55
    assert lazy_interval(10, [0.9, 0.2], 0.1, 0.5, 2) == (10, [0.2, 0.1])  # the oldest leaves
    assert lazy_interval(10, [0.2, 0.1], 0.5, 0.5, 1) == (20, [0.5])  # patience 1: >= at the threshold


def test_off_by_default_holds_no_state():
    """Off (the default): no lazy state, the trajectory of the plain schedule (every update_proj_gap steps)."""
    grads = _grads((40, 24), steps=12)
    opt, p, _, ws, refreshes = _run("galore_adamw", (40, 24), grads, rank=4, update_proj_gap=2, lr=1e-2)
    assert "proj_lazy" not in opt.state[p] and refreshes == [t % 2 == 0 for t in range(12)]


@pytest.mark.parametrize("name", ["galore_adamw", "adamw_snsm", "adagrad_snsm", "sgd_sm"])
def test_state_bytes_and_checkpoint_resume_bit_for_bit(name):
    """state_bytes counts the interval (2 int64) and the queue (patience float64) per projected parameter; a
    checkpoint (weights_only) taken mid-run resumes to the uninterrupted run's weights and lazy state, bit for bit."""
    shape, kw = (40, 24), {"rank": 4, "update_proj_gap": 2, "lazy_refresh_threshold": 0.9, "lazy_refresh_patience": 3,
                           "lr": 1e-2}
    grads = _grads(shape, steps=30)
    opt, p, p_init, ws, _ = _run(name, shape, grads, **kw)
    plain, pp, _, _, _ = _run(name, shape, grads, **{**kw, "lazy_refresh_threshold": None})
    assert opt.state_bytes() - plain.state_bytes() == 16 + 8 * 3
    assert int(opt.state[p]["proj_lazy"][0]) > 2  # (the run lengthened its interval: the resume crosses that)

    half, q, _, _, _ = _run(name, shape, grads[:13], p0=p_init, **kw)
    buf = io.BytesIO()
    torch.save({"opt": half.state_dict(), "p": q.detach().clone()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    r = torch.nn.Parameter(ck["p"].clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = create_optimizer([r], name, **kw)
    resumed.load_state_dict(ck["opt"])
    for g in grads[13:]:
        r.grad = g.clone()
        resumed.step()
    assert torch.equal(r.detach(), ws[-1])
    for key in ("proj_lazy", "proj_lazy_cos", "proj_meta"):
        assert torch.equal(resumed.state[r][key], opt.state[p][key]) and resumed.state[r][key].device.type == "cpu"


@pytest.mark.parametrize("saved,here", [(None, 0.4), (0.4, None)])
def test_checkpoint_of_the_other_setting_is_an_error(saved, here):
    """Resuming a run saved without the lazy refresh with it (or the reverse) names the setting (the engine's
    settings check: the state layouts differ), not a silent plain schedule."""
    p = torch.nn.Parameter(torch.randn(40, 24))
    a = create_optimizer([p], "galore_adamw", rank=4, update_proj_gap=2, lazy_refresh_threshold=saved)
    p.grad = torch.randn(40, 24)
    a.step()
    b = create_optimizer([p], "galore_adamw", rank=4, update_proj_gap=2, lazy_refresh_threshold=here)
    with pytest.raises(ValueError, match=f"lazy_refresh_threshold={saved} \\(this optimizer: {here}\\).*proj_lazy"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("name", ["galore_adamw", "adamw_snsm"])
def test_layerwise_step_param_follows_the_lazy_schedule(name):
    """step_param (layerwise mode's step) refreshes on the same lazy schedule as step()."""
    shape, kw = (40, 24), {"rank": 4, "update_proj_gap": 2, "lazy_refresh_threshold": 0.9, "lazy_refresh_patience": 2,
                           "lr": 1e-2}
    grads = _grads(shape, steps=20)
    opt, p, p_init, ws, _ = _run(name, shape, grads, **kw)
    q = torch.nn.Parameter(p_init.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = create_optimizer([q], name, **kw)
    for g in grads:
        other.step_param(q, g.clone())
    torch.testing.assert_close(q.detach(), ws[-1], rtol=1e-5, atol=1e-6)
    assert torch.equal(other.state[q]["proj_lazy"], opt.state[p]["proj_lazy"])


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_threshold_out_of_range_is_an_error(value):
    p = torch.nn.Parameter(torch.randn(40, 24))
    with pytest.raises(ValueError, match=r"lazy_refresh_threshold.*\(0, 1\]"):
        create_optimizer([p], "galore_adamw", rank=4, lazy_refresh_threshold=value)


@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_patience_below_one_is_an_error(value):
    p = torch.nn.Parameter(torch.randn(40, 24))
    with pytest.raises(ValueError, match=r"lazy_refresh_patience.*int >= 1"):
        create_optimizer([p], "galore_adamw", rank=4, lazy_refresh_threshold=0.4, lazy_refresh_patience=value)


@pytest.mark.parametrize("name,kw", [
    ("galore_adamw", {"projection": "random"}), ("galore_adamw", {"projection": "gaussian"}),
    ("frugal", {"projection": "columns"}), ("frugal", {"projection": "randk"}), ("osd_adamw", {}),
    ("galore_adamw8bit", {"projection": "random", "min_quant_size": 16}),
    ("adamw_snsm", {"projection": "random"}), ("sgd_sm", {"projection": "columns"}),
    ("adagrad_snsm", {"projection": "blocks"}),
])
def test_refresh_that_is_not_a_gradient_svd_is_refused(name, kw):
    """Named: the projections and recipes that take it."""
    p = torch.nn.Parameter(torch.randn(40, 24))
    with pytest.raises(ValueError, match=r"lazy_refresh_threshold.*\['svd', 'rsvd'\].*galore_adamw.*frugal.*adamw_snsm.*adagrad_snsm.*sgd_sm"):
        create_optimizer([p], name, rank=4, lazy_refresh_threshold=0.4, **kw)


@pytest.mark.parametrize("name", ["galore_adamw", "adamw_snsm", "adagrad_snsm", "sgd_sm"])
def test_batch_of_matrices_is_refused(name):
    p = torch.nn.Parameter(torch.randn(3, 40, 24))
    with pytest.raises(ValueError, match="lazy_refresh_threshold is not supported on a batch of matrices"):
        create_optimizer([p], name, rank=4, lazy_refresh_threshold=0.4)


@pytest.mark.parametrize("name,extra", [
    ("galore_adamw", {}), ("galore_adamw", {"projection": "rsvd"}), ("fira_adamw", {}), ("frugal", {}),
    ("galore_adafactor", {}), ("galore_adamw", {"proj_type": "full"}), ("adamw_snsm", {}), ("adagrad_snsm", {}),
    ("sgd_sm", {}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_refresh_step_allocates_what_it_reports(name, extra, dtype):
    """A refresh step that compares the bases (step 3; patience 1 and a tiny threshold: the interval doubles there)
    allocates what the per-parameter report says (traced, the LAPACK workspace left out: as
    tests/test_galoreexact_per_parameter.py): the similarity's 0-d product comes after the SVD's other outputs are
    freed, inside the refresh's peak."""
    from test_galoreexact_per_parameter import _check, _traced_steps

    lazy = {"lazy_refresh_threshold": 0.01, "lazy_refresh_patience": 1, **extra}
    peaks, steady, any_step, (meta, mp) = _traced_steps(name, (200, 128), 16, dtype, "default", **lazy)
    if extra.get("projection") == "rsvd":  # (its first refresh, the range finder, outweighs the later one)
        assert peaks[1] == steady and any_step == max(peaks)
    else:
        _check(name, peaks, steady, any_step)
    assert "proj_lazy" in meta.state[mp]


def test_similarity_is_the_first_vectors_absolute_cosine():
    """A sign-flipped first vector spans the same subspace (similarity 1); orthogonal ones 0; the left basis's first
    column where there is one, else the right basis's first row."""
    from lowmem.optim.subspace import basis_similarity

    q = torch.linalg.qr(torch.randn(30, 4, generator=torch.Generator().manual_seed(0))).Q
    assert basis_similarity((q, None), (-q, None)) == pytest.approx(1.0, abs=1e-6)
    assert basis_similarity((q, None), (q[:, [1, 0, 2, 3]], None)) == pytest.approx(0.0, abs=1e-6)
    assert basis_similarity((None, q.t()), (None, -q.t())) == pytest.approx(1.0, abs=1e-6)
    mixed = q[:, [0, 1]] @ torch.tensor([[0.6, 0.8], [0.8, -0.6]])  # first column 0.6 q0 + 0.8 q1
    assert basis_similarity((q, None), (mixed, None)) == pytest.approx(0.6, abs=1e-6)


_FSDP2 = r"""
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from lowmem.optim import create_optimizer
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)  # (no port to collide)
m = torch.nn.Linear(24, 40, bias=False)
fully_shard(m)
for name in ("galore_adamw", "adamw_snsm", "adagrad_snsm", "sgd_sm"):
    try:
        create_optimizer([m.weight], name, rank=4, lazy_refresh_threshold=0.4)
        print(name, "ACCEPTED")
    except ValueError as err:
        print(name, "REFUSED", err)
    create_optimizer([m.weight], name, rank=4)  # (off: FSDP2 as before)
dist.destroy_process_group()
"""


@pytest.mark.slow  # (a subprocess with torch.distributed: 5-30 s)
def test_fsdp2_parameters_are_refused(tmp_path):
    """An FSDP2-sharded parameter (a DTensor, one gloo process): refused with an error naming the setting, not
    silently stepped on the plain schedule; off, the same parameter is accepted."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FSDP2, str(tmp_path / "init")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 4, out.stdout
    for line in lines:  # galore_adamw and the Subspace-Momentum recipes
        assert " REFUSED " in line and "lazy_refresh_threshold is not supported on FSDP2-sharded" in line, line
