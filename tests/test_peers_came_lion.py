"""The peers of ``came``, ``lion`` and ``lion8bit`` in ``lowmem bench`` (issue 15: pytorch_optimizer's ``CAME`` and
``Lion``, bitsandbytes' ``Lion`` / ``Lion8bit``, the CAME authors' ``came_pytorch`` when installed), and Lion's
multi-tensor direction on the CPU (0-d tensor decay rates) against its reference form, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from lowmem.bench import BASELINE
from lowmem.bench_peers import PEERS, get_peer, peer_status
from lowmem.cli import main
from lowmem.optim.functional import lion as FL

NEW_PEERS = {"po_came": ("pytorch_optimizer", "came"), "came_pytorch": ("came_pytorch", "came"),
             "po_lion": ("pytorch_optimizer", "lion"), "bnb_lion": ("bitsandbytes", "lion"),
             "bnb_lion8bit": ("bitsandbytes", "lion8bit")}


def test_the_new_recipes_have_their_peers_listed():
    rows = {p.name: (p.module, p.recipe) for p in PEERS}
    assert {n: rows.get(n) for n in NEW_PEERS} == NEW_PEERS


def _peer_vs_lowmem(peer: str, recipe: str, steps: int, rows: int = 40, cols: int = 24, **st):
    """``steps`` steps of the peer (its bench builder, ``st`` as the recommended settings) and of lowmem's recipe
    (``create_optimizer`` on the same model: the same decay groups) from the same weights and gradients: a
    ``rows x cols`` linear weight with a bias and a vector of ``rows``, gradients with spikes (clipping runs)."""
    from lowmem.optim import create_optimizer

    out = []
    for kind in ("peer", "lowmem"):
        torch.manual_seed(0)
        model = torch.nn.Module()
        model.lin = torch.nn.Linear(cols, rows)
        model.norm = torch.nn.Parameter(torch.ones(rows))
        opt = (get_peer(peer).build(model, 1e-2, 8, dict(st)) if kind == "peer"
               else create_optimizer(model, recipe, lr=1e-2, **st))
        gen = torch.Generator().manual_seed(1)
        for i in range(steps):
            for p in model.parameters():
                g = torch.randn(p.shape, generator=gen)
                if i % 3 == 1:
                    g.view(-1)[:2] *= 50.0
                p.grad = g
            opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("st", [{}, {"weight_decay": 0.1}])
def test_po_came_peer_steps_like_came(st):
    pytest.importorskip("pytorch_optimizer")
    theirs, ours = _peer_vs_lowmem("po_came", "came", 8, **st)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("peer", ["po_lion", "bnb_lion"])
@pytest.mark.parametrize("st", [{}, {"weight_decay": 0.1}])
def test_lion_peers_step_like_lion(peer, st):
    pytest.importorskip("pytorch_optimizer" if peer == "po_lion" else "bitsandbytes")
    theirs, ours = _peer_vs_lowmem(peer, "lion", 8, **st)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bnb_lion8bit_peer_steps_like_lion8bit():
    """A 96 x 64 weight (6,144 elements: quantized under the default min_quant_size 4096 in both) and the small
    tensors (float32 moments in both)."""
    pytest.importorskip("bitsandbytes")
    theirs, ours = _peer_vs_lowmem("bnb_lion8bit", "lion8bit", 8, rows=96, cols=64, weight_decay=0.1)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_came_pytorch_peer_is_skipped_with_the_install_line_when_missing():
    import importlib.util

    if importlib.util.find_spec("came_pytorch") is not None:
        theirs, ours = _peer_vs_lowmem("came_pytorch", "came", 8)
        for a, b in zip(theirs, ours):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        assert peer_status(get_peer("came_pytorch")) == "came_pytorch is not installed (pip install came-pytorch)"


def _side_by_side(md: str) -> dict[str, str]:
    """The markdown's recipe -> fastest peer lines."""
    return {line.split("|")[1].strip(): line.split("|")[3].strip() for line in md.split("fastest peer")[1].splitlines()
            if line.startswith("| ") and "---" not in line}


def test_shapes_bench_puts_the_new_recipes_beside_their_peers(tmp_path, monkeypatch):
    """``lowmem bench came lion lion8bit peer:... --shapes hidden-1024`` (the layer CI-sized): each recipe beside its
    fastest peer."""
    from lowmem import bench_shapes

    pytest.importorskip("pytorch_optimizer")
    pytest.importorskip("bitsandbytes")
    monkeypatch.setitem(bench_shapes.SHAPE_SETS, "hidden-1024", (16, 43, False))
    peers = [f"peer:{n}" for n in NEW_PEERS if n != "came_pytorch"]
    rc = main(["bench", "came", "lion", "lion8bit", *peers, "--shapes", "hidden-1024", "--repeats", "1", "--threads", "1",
               "--output-dir", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "bench_shapes.json").read_text())
    assert [(r["optimizer"], r["peer_of"]) for r in payload["results"]] == [
        (BASELINE, None), ("came", None), ("lion", None), ("lion8bit", None), ("peer:po_came", "came"),
        ("peer:po_lion", "lion"), ("peer:bnb_lion", "lion"), ("peer:bnb_lion8bit", "lion8bit")]
    side = _side_by_side((tmp_path / "bench_shapes.md").read_text())
    assert side["came"] == "peer:po_came" and side["lion8bit"] == "peer:bnb_lion8bit"
    assert side["lion"] in {"peer:po_lion", "peer:bnb_lion"}


@pytest.mark.slow
def test_shapes_bench_peers_flag_adds_them_and_skips_a_missing_one(tmp_path, monkeypatch):
    """``--peers``: every installed peer probed (a toy Llama step each) and added; ``came_pytorch``, when missing, a
    skipped line with its install line."""
    import importlib.util

    from lowmem import bench_shapes

    pytest.importorskip("pytorch_optimizer")
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr("lowmem.bench_shapes.PEERS", tuple(get_peer(n) for n in NEW_PEERS))
    monkeypatch.setitem(bench_shapes.SHAPE_SETS, "hidden-1024", (16, 43, False))
    rc = main(["bench", "came", "lion", "lion8bit", "--shapes", "hidden-1024", "--peers", "--repeats", "1",
               "--threads", "1", "--output-dir", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "bench_shapes.json").read_text())
    have_authors = importlib.util.find_spec("came_pytorch") is not None
    assert [r["optimizer"] for r in payload["results"]] == [
        BASELINE, "came", "lion", "lion8bit", "peer:po_came", *(["peer:came_pytorch"] if have_authors else []),
        "peer:po_lion", "peer:bnb_lion", "peer:bnb_lion8bit"]
    md = (tmp_path / "bench_shapes.md").read_text()
    assert _side_by_side(md)["lion8bit"] == "peer:bnb_lion8bit"
    if not have_authors:
        assert "peer:came_pytorch: came_pytorch is not installed (pip install came-pytorch)" in md


# ---- Lion's multi-tensor direction on the CPU: 0-d decay rates, equal to the reference ------------------------


def _lion_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1024,), (64, 64), (3, 5, 7), (1,), (0,), (4097,)]
    ms = [torch.randn(s, generator=gen) * 10.0 ** torch.randint(-8, 3, (), generator=gen).item() for s in shapes]
    gs = [torch.randn(s, generator=gen) * 10.0 ** torch.randint(-8, 3, (), generator=gen).item() for s in shapes]
    ms[0][:7] = 0.0
    gs[0][3:11] = 0.0  # zero interpolations: sign 0
    gs[1][0, :5] = -ms[1][0, :5] * 0.9 / 0.1  # c = 0 up to rounding
    return ms, gs


@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.95, 0.98), (0.0, 0.0), (0.3, 0.999999), (1 / 3, 2 / 3)])
def test_lion_foreach_direction_equals_its_reference_bit_for_bit(betas):
    """:func:`lion_direction_foreach` (CPU: the decay rates as 0-d tensors) against
    :func:`lion_direction_foreach_reference` (Python numbers) and the per-tensor :func:`lion_direction_`: the
    directions and the updated moments equal bit for bit over rates that float32 does not hold exactly."""
    for seed in range(3):
        ms, gs = _lion_inputs(seed)
        ms_ref, ms_one = [m.clone() for m in ms], [m.clone() for m in ms]
        ds = FL.lion_direction_foreach(ms, gs, *betas)
        ds_ref = FL.lion_direction_foreach_reference(ms_ref, gs, *betas)
        ds_one = [FL.lion_direction_(m, g, *betas) for m, g in zip(ms_one, gs)]
        for d, dr, do, m, mr, mo in zip(ds, ds_ref, ds_one, ms, ms_ref, ms_one):
            assert torch.equal(d, dr) and torch.equal(d, do)
            assert torch.equal(m, mr) and torch.equal(m, mo)


def test_lion_foreach_direction_of_float64_moments_equals_its_reference():
    gen = torch.Generator().manual_seed(5)
    ms = [torch.randn(300, generator=gen, dtype=torch.float64) for _ in range(3)]
    gs = [torch.randn(300, generator=gen, dtype=torch.float64) for _ in range(3)]
    ms_ref = [m.clone() for m in ms]
    for d, dr in zip(FL.lion_direction_foreach(ms, gs, 0.9, 1 / 3), FL.lion_direction_foreach_reference(ms_ref, gs, 0.9, 1 / 3)):
        assert torch.equal(d, dr)
    assert all(torch.equal(m, mr) for m, mr in zip(ms, ms_ref))


def test_lion_engine_multi_tensor_step_equals_the_per_tensor_step():
    """The engine's CPU bucket (``foreach=None``) against ``foreach=False`` over 5 steps, decay on."""
    from lowmem.optim import create_optimizer

    out = []
    for foreach in (None, False):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in ((64, 64), (1024,), (7, 3), (5,))]
        opt = create_optimizer(ps, "lion", lr=1e-2, betas=(0.9, 1 / 3), weight_decay=0.1, foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        out.append(ps)
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_a_missing_peer_named_explicitly_is_a_clear_error(capsys, monkeypatch):
    """``lowmem bench came peer:came_pytorch --shapes ...`` without the package: exit 2 and the install line (was a
    ModuleNotFoundError traceback from the builder, after the other rows' timing)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "came_pytorch" else real(name, *a))
    assert main(["bench", "came", "peer:came_pytorch", "--shapes", "hidden-1024"]) == 2
    assert "'peer:came_pytorch': came_pytorch is not installed (pip install came-pytorch)" in capsys.readouterr().err


@pytest.mark.parametrize("recipe, peer", [("came", "peer:po_came"), ("lion", "peer:po_lion"), ("lion8bit", "peer:bnb_lion8bit")])
def test_text_task_runs_recipe_and_peer_at_the_recommended_settings(recipe, peer):
    """``--task text``: the recipe and its peer train at RECOMMENDED's lr and decay (came: the authors' 2e-4 with
    weight decay 0.01; lion / lion8bit: 1e-3) and reach the same held-out loss on the smoke task."""
    from lowmem import bench_text
    from lowmem.bench_peers import RECOMMENDED

    pytest.importorskip("pytorch_optimizer" if peer.startswith("peer:po_") else "bitsandbytes")
    results, _ = bench_text.run_text_bench([recipe, peer], task=bench_text.TEXT_SIZES["smoke"], repeats=2,
                                           progress=False, threads=1)
    _, ours, theirs = results
    rec = RECOMMENDED[recipe]
    assert ours.lr == theirs.lr == rec.lr and ours.lr_source == rec.source
    assert ours.hparams.get("weight_decay", 0.0) == theirs.hparams.get("weight_decay", 0.0) == rec.hparams.get("weight_decay", 0.0)
    assert ours.eval_loss == pytest.approx(theirs.eval_loss, rel=1e-4)
