"""Lion and Lion8bit (lowmem/optim/recipes/lion.py): the paper's loop, the peers on the CPU, the paths.

* the engine against the plain loop of Algorithm 2 (lowmem/optim/references/lion.py) on configurations
  of lr, betas and weight decay, float32 and bf16 parameters (the loop rounded to bf16 each step);
* ``pytorch_optimizer.Lion`` and ``bitsandbytes.optim.Lion`` / ``Lion8bit``: bitsandbytes runs both on
  the CPU (its ``optimizer_update_32bit`` / ``optimizer_update_8bit_blockwise`` CPU kernels, measured:
  bitsandbytes 0.50.2), so they are compared here, the 8-bit codes and block maxima bit for bit;
* the multi-tensor buckets equal to the single-tensor step, bit for bit (the pieces of a tensor larger
  than ``chunk_numel`` included);
* the state: 4 bytes per parameter, 1 byte + 4 per block of 256 in 8 bits.
"""

from __future__ import annotations

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.references.lion import lion as lion_reference
from lowmem.optim.registry import bytes_per_param

SHAPES = ((48, 40), (40,), (3, 8, 10))
CONFIGS = (
    {},  # the defaults: lr 1e-4, betas (0.9, 0.99), no decay
    {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.5},
    {"lr": 1e-2, "betas": (0.0, 0.9), "weight_decay": 0.1},
    {"lr": 3e-4, "betas": (0.95, 0.98), "weight_decay": 1.0},
)


def _problem(steps: int, seed: int = 0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * (1 + 10 * (t == 2)) for s in shapes] for t in range(steps)]
    return init, grads


def _run(make, init, grads, dtype=torch.float32):
    ps = [torch.nn.Parameter(x.clone().to(dtype)) for x in init]
    opt = make(ps)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.to(dtype)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("config", CONFIGS, ids=["defaults", "wd0.5", "beta1_0", "wd1"])
@pytest.mark.parametrize("foreach", [False, None])
def test_lion_matches_the_paper_loop(config, foreach):
    init, grads = _problem(8)
    ps, _ = _run(lambda ps: create_optimizer(ps, "lion", foreach=foreach, **config), init, grads)
    hp = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, **config}
    for i, (x0, p) in enumerate(zip(init, ps)):
        want = lion_reference(x0.clone(), [gs[i] for gs in grads], index=i, **hp)[-1]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)


def test_lion_bf16_parameters_round_once_per_step():
    """bf16 parameters: float32 moment (4 B/param), the step computed in float32 and rounded to bf16 once
    per step, the paper's loop with the same rounding."""
    cfg = {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.5}
    init, grads = _problem(6, seed=1)
    ps, opt = _run(lambda ps: create_optimizer(ps, "lion", **cfg), init, grads, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32 for p in ps)
    b1, b2 = cfg["betas"]
    for i, x0 in enumerate(init):
        p, m = x0.bfloat16(), torch.zeros_like(x0)
        for gs in grads:
            g = gs[i].bfloat16().float()
            c = b1 * m + (1 - b1) * g
            # (the engine's float order, so the one bf16 rounding per step is compared bit for bit on any CPU)
            p32 = p.float() * (1 - cfg["lr"] * cfg["weight_decay"])
            p = torch.add(p32, torch.sign(c), alpha=-cfg["lr"]).bfloat16()
            m = b2 * m + (1 - b2) * g
        torch.testing.assert_close(ps[i].detach(), p, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[ps[i]]["exp_avg"], m, rtol=1e-6, atol=1e-7)


def test_lion_bfloat16_moment_is_updated_in_float32_and_stored_rounded():
    """state_dtype="bfloat16": 2 B/param, the EMA computed in float32 from the stored moment and rounded
    to bf16 each step (the loop with the same rounding)."""
    cfg = {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.5}
    init, grads = _problem(6, seed=6)
    ps, opt = _run(lambda ps: create_optimizer(ps, "lion", state_dtype="bfloat16", **cfg), init, grads)
    b1, b2 = cfg["betas"]
    for i, x0 in enumerate(init):
        p, m = x0.clone(), torch.zeros(x0.shape, dtype=torch.bfloat16)
        for gs in grads:
            c = b1 * m.float() + (1 - b1) * gs[i]
            p = p * (1 - cfg["lr"] * cfg["weight_decay"]) - cfg["lr"] * torch.sign(c)
            m = torch.add(m.float() * b2, gs[i], alpha=1 - b2).bfloat16()  # (the engine's float order: bit for bit)
        assert opt.state[ps[i]]["exp_avg"].dtype == torch.bfloat16
        torch.testing.assert_close(opt.state[ps[i]]["exp_avg"], m, rtol=0, atol=0)
        torch.testing.assert_close(ps[i].detach(), p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [None, True], ids=["engine", "fused"])
@pytest.mark.parametrize("config", CONFIGS[1:], ids=["wd0.5", "beta1_0", "wd1"])
def test_lion_equals_pytorch_optimizer_and_bitsandbytes(config, fused):
    """``fused=True``: bitsandbytes' optimizer_update_32bit on lowmem's moment (tests/test_fusedlion_fp32.py)."""
    po = pytest.importorskip("pytorch_optimizer")
    bnb = pytest.importorskip("bitsandbytes")
    init, grads = _problem(6, seed=2)
    ours, opt = _run(lambda ps: create_optimizer(ps, "lion", fused=fused, **config), init, grads)
    theirs, _ = _run(lambda ps: po.Lion(ps, **config), init, grads)
    bnbs, bopt = _run(lambda ps: bnb.optim.Lion(ps, **config), init, grads)
    for p, q, r, b in zip(ours, theirs, bnbs, bopt.param_groups[0]["params"]):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg"], bopt.state[b]["state1"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [None, True], ids=["engine", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lion8bit_equals_bitsandbytes_lion8bit(dtype, fused):
    """Same 8-bit format as bitsandbytes' Lion8bit (signed dynamic map, absmax per block of 256): the codes,
    the block maxima and the parameters equal bnb's CPU step; tensors under the size threshold keep a
    float32 moment in both. ``fused=True``: bitsandbytes' kernel on lowmem's own codes (tests/test_fusedlion_cpu.py)."""
    bnb = pytest.importorskip("bitsandbytes")
    cfg = {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.5}
    shapes = ((64, 80), (40,), (16, 33))  # 5120 (quantized, 20 blocks), 40 and 528 (a partial block)
    init, grads = _problem(6, seed=3, shapes=shapes)
    ours, opt = _run(lambda ps: create_optimizer(ps, "lion8bit", min_quant_size=500, fused=fused, **cfg), init, grads,
                     dtype)
    theirs, bopt = _run(lambda ps: bnb.optim.Lion8bit(ps, min_8bit_size=500, **cfg), init, grads, dtype)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
        st, bst = opt.state[p], bopt.state[q]
        if p.numel() >= 500:
            assert st["exp_avg"].dtype == torch.uint8 and torch.equal(st["exp_avg"], bst["state1"].view(-1))
            torch.testing.assert_close(st["exp_avg_absmax"], bst["absmax1"], rtol=0, atol=0)
        else:
            assert st["exp_avg"].dtype == torch.float32
            torch.testing.assert_close(st["exp_avg"], bst["state1"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["lion", "lion8bit"])
def test_foreach_buckets_equal_the_single_tensor_step(name):
    """The multi-tensor buckets (a tensor larger than chunk_numel joins them in pieces) equal foreach=False,
    bit for bit: parameters and state."""
    shapes = ((48, 40), (40,), (7, 9), (3, 8, 10), (64,))
    init, grads = _problem(5, seed=4, shapes=shapes)
    hp = {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.5}
    if name == "lion8bit":
        hp.update(min_quant_size=64, block_size=64)

    def make(foreach):
        def build(ps):
            opt = create_optimizer(ps, name, foreach=foreach, **hp)
            opt.chunk_numel = 512  # (48 x 40 = 1920: four pieces)
            return opt
        return build

    single, sopt = _run(make(False), init, grads)
    multi, mopt = _run(make(None), init, grads)
    for p, q in zip(single, multi):
        assert torch.equal(p, q)
        for k, v in sopt.state[p].items():
            assert torch.equal(v, mopt.state[q][k]), k


def test_foreach_path_is_the_bucket_step(monkeypatch):
    """The default path of float32 parameters is the multi-tensor one (so the equality above compares two paths)."""
    from lowmem.optim.functional import lion as FL

    calls = []
    orig = FL.lion_direction_foreach
    monkeypatch.setattr(FL, "lion_direction_foreach", lambda *a, **k: calls.append(1) or orig(*a, **k))
    init, grads = _problem(2, seed=5)
    _run(lambda ps: create_optimizer(ps, "lion"), init, grads)
    assert calls
    calls.clear()
    _run(lambda ps: create_optimizer(ps, "lion", foreach=False), init, grads)
    assert not calls


def test_state_bytes_per_parameter():
    assert bytes_per_param("lion") == 4.0
    assert bytes_per_param("lion8bit") == 1.0 + 4 / 256
    assert bytes_per_param("lion", state_dtype="bfloat16") == 2.0
    p = torch.nn.Parameter(torch.zeros(100, 50))
    opt = create_optimizer([p], "lion8bit", min_quant_size=64, block_size=64)
    opt.materialize_state()
    assert opt.state_bytes() == 5000 + 4 * 79 + 4  # ceil(5000 / 64) = 79 blocks, and the float32 step count


def test_defaults_are_the_papers_and_bad_values_name_the_field():
    """Chen et al. 2023 (Section 3 and Program 1; bitsandbytes' and pytorch-optimizer's defaults): lr 1e-4,
    betas (0.9, 0.99), no weight decay in the optimizer; Lion8bit: blocks of 256, 4096-element threshold."""
    from lowmem.optim.recipes.lion import LION, LION8BIT, Lion, Lion8bit

    for recipe in (LION, LION8BIT):  # (the recipe's defaults: `lowmem list`, the references, validation)
        d = {h.name: h.default for h in recipe.hparams}
        assert (d["lr"], tuple(d["betas"]), d["weight_decay"]) == (1e-4, (0.9, 0.99), 0.0)
    p = torch.nn.Parameter(torch.zeros(4))
    for opt in (Lion([p]), create_optimizer([p], "lion"), Lion8bit([p])):
        g = opt.param_groups[0]
        assert (g["lr"], tuple(g["betas"]), g["weight_decay"]) == (1e-4, (0.9, 0.99), 0.0)
    g = Lion8bit([p]).param_groups[0]
    assert (g["block_size"], g["min_quant_size"]) == (256, 4096)
    with pytest.raises(ValueError, match="betas"):
        create_optimizer([p], "lion", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        create_optimizer([p], "lion8bit", weight_decay=-0.1)


@pytest.mark.parametrize("bnb_name, cls, ours", [("bnb_lion8bit", "Lion8bit", "lion8bit"),
                                                 ("bnb_paged_lion8bit", "PagedLion8bit", "lion8bit"),
                                                 ("bnb_paged_lion", "PagedLion", "lion")])
def test_registered_bitsandbytes_lions_equal_the_engines(bnb_name, cls, ours):
    """bitsandbytes' own Lions by registry name (recipes/bnb.py; the Hugging Face ``paged_lion_*`` names); each
    equals the engine's recipe of the same format. The paged ones are refused on CPU parameters (bitsandbytes fell
    back to unpaged there with a warning: SILENT 27), so they are compared on CUDA only."""
    pytest.importorskip("bitsandbytes")
    import warnings


    cfg = {"lr": 3e-3, "betas": (0.8, 0.95), "weight_decay": 0.5}
    init, grads = _problem(4, seed=7, shapes=((64, 80), (40,)))
    if "paged" in bnb_name:
        with pytest.raises(ValueError, match="pages its state in CUDA unified memory"):
            create_optimizer([torch.nn.Parameter(t.clone()) for t in init], bnb_name)
        if not torch.cuda.is_available():
            return
        init, grads = [t.cuda() for t in init], [[g.cuda() for g in gs] for gs in grads]
    extra = {"min_quant_size": 4096} if ours == "lion8bit" else {}
    engine, _ = _run(lambda ps: create_optimizer(ps, ours, **cfg, **extra), init, grads)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        theirs, opt = _run(lambda ps: create_optimizer(ps, bnb_name, **cfg), init, grads)
    assert type(opt).__name__ == cls
    for p, q in zip(engine, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", ["default", 4096, None], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["lion", "lion8bit"])
def test_transient_bytes_equal_the_traced_step(name, dtype, chunk, state_dtype):
    """What a step allocates (every dispatched output alive together: tests/test_transient_per_parameter.py's
    trace) equals ``step_transient_bytes()``: a parameter stepped alone (``per_parameter=True``: the sign, a
    low-precision moment's float32 copy, the 8-bit codec) and a whole ``step()`` (the buckets' directions, the
    non-finite check), the default chunk, 4096 and whole tensors."""
    from test_nonfinite_check_bytes import _AllLive
    from test_transient_per_parameter import _traced_and_reported

    traced, reported = _traced_and_reported(name, dtype, (200, 128), chunk, state_dtype=state_dtype)
    assert traced == reported > 0
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in [(200, 128), (300,), (64, 64), (5000,)]]
    opt = create_optimizer(ps, name, state_dtype=state_dtype)
    if chunk != "default":
        opt.chunk_numel = chunk
    for step in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        if step < 2:
            opt.step()
    with _AllLive() as t:
        opt.step()
    assert t.peak == opt.step_transient_bytes() > 0


def test_lion8bit_bucket_of_a_chunk_counts_the_inner_direction():
    """A bucket of 2**19 quantized values (the CPU chunk): past 2**17 values the codec's table pass stops growing,
    so the decoded moment beside the inner rule's directions (4 B per value each) and the encode are what the
    count must get right; traced equal."""
    from test_nonfinite_check_bytes import _AllLive

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(1024, 512)), torch.nn.Parameter(torch.randn(512))]
    opt = create_optimizer(ps, "lion8bit")
    for step in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        if step == 0:
            opt.step()
    with _AllLive() as t:
        opt.step()
    assert t.peak == opt.step_transient_bytes() > 0


@pytest.mark.parametrize("optim, name", [("lion_32bit", "lion"), ("lion_8bit", "lion8bit")])
def test_under_training_arguments_equal_what_the_hf_trainer_builds(optim, name, tmp_path):
    """The Hugging Face Trainer's ``optim="lion_32bit"`` / ``"lion_8bit"`` builds bitsandbytes' ``Lion`` with
    ``optim_bits`` 32 / 8 and ``betas=(adam_beta1, adam_beta2)`` (transformers' ``_get_bitsandbytes_optimizer``);
    lowmem's ``lion`` / ``lion8bit`` under the same ``TrainingArguments`` (lr, betas, weight decay on the Trainer's
    decay groups) steps the same weights (the names' mapping: lowmem/train.py, placed as FOUND_LION 1-7)."""
    pytest.importorskip("bitsandbytes")
    from transformers import Trainer, TrainingArguments

    from lowmem.trainers.hf import optimizer_cls_and_kwargs

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    args = TrainingArguments(str(tmp_path), optim=optim, learning_rate=3e-3, weight_decay=0.3, adam_beta2=0.95,
                             report_to=[], use_cpu=True)
    hf_cls, hf_kw = Trainer.get_optimizer_cls_and_kwargs(args, base)
    models = {}
    for who in ("hf", "lowmem"):
        model = __import__("copy").deepcopy(base)
        cls, kw = optimizer_cls_and_kwargs(model, name, args=args)
        if who == "hf":  # the Trainer's decay groups (lowmem's are the same rule, tested in test_registry.py)
            opt = hf_cls([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in kw["params"]], **hf_kw)
        else:
            opt = cls(**kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(16, 96, generator=gen)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        models[who] = model
    assert hf_kw["betas"] == (0.9, 0.95) and hf_kw["optim_bits"] == (8 if optim == "lion_8bit" else 32)
    for p, q in zip(models["hf"].parameters(), models["lowmem"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
