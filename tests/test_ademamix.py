"""AdEMAMix (Pagliardini, Ablin, Grangier 2024, arXiv 2409.03137) as engine recipes ``ademamix`` / ``ademamix8bit``.

The generic suite (tests/test_reference.py: the paper's loop, lowmem/optim/references/ademamix.py) covers the math on
both paths; here: parity with bitsandbytes' ``AdEMAMix`` / ``AdEMAMix8bit`` (the same defaults, state format and
operations: equal on the CPU) and pytorch-optimizer's ``AdEMAMix``, the multi-tensor buckets against the single-tensor
step, exact ``state_bytes()``, ``step_transient_bytes()`` against the dispatch trace, validation, and the Hugging Face
``optim`` names (``ademamix``, ``ademamix_8bit`` with transformers' ``optim_args`` keys).
"""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.registry import bytes_per_param

SHAPES = ((64, 80), (40,), (16, 33))  # 5120 (20 blocks of 256), 40, 528 (a partial block)
SCHEDULED = {"lr": 3e-3, "alpha": 8.0, "t_alpha": 5, "t_beta3": 6, "weight_decay": 0.3}


def _problem(steps, seed, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * (1 + t % 3) for s in shapes] for t in range(steps)]
    return init, grads


def _run(make, init, grads, dtype=torch.float32):
    ps = [torch.nn.Parameter(x.clone().to(dtype)) for x in init]
    opt = make(ps)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.to(dtype)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("config", [{}, SCHEDULED, {"betas": (0.8, 0.95, 0.999), "weight_decay": 0.0}],
                         ids=["defaults", "schedulers", "betas3"])
def test_ademamix_equals_bitsandbytes_ademamix(config):
    """bitsandbytes' 32-bit ``AdEMAMix`` (its CPU ``optimizer_update_32bit("ademamix")``): the same operations in the
    same order, so parameters and the three moments agree to float32 rounding (0.0 measured: bit for bit)."""
    bnb = pytest.importorskip("bitsandbytes")
    init, grads = _problem(8, seed=1)
    ours, opt = _run(lambda ps: _ours("ademamix", ps, config), init, grads)
    theirs, bopt = _run(lambda ps: bnb.optim.AdEMAMix(ps, **config), init, grads)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        st, bst = opt.state[p], bopt.state[q]
        torch.testing.assert_close(st["exp_avg"], bst["state1"][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(st["exp_avg_slow"], bst["state1"][1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(st["exp_avg_sq"], bst["state2"], rtol=1e-6, atol=1e-9)


def _ours(name, ps, config):
    """lowmem's class for ``name`` with bitsandbytes' arguments (``betas`` a triple is the classes' form)."""
    from lowmem.optim.recipes.ademamix import AdEMAMix, AdEMAMix8bit

    return (AdEMAMix if name == "ademamix" else AdEMAMix8bit)(ps, **config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [{}, SCHEDULED], ids=["defaults", "schedulers"])
def test_ademamix8bit_is_close_to_bitsandbytes_ademamix8bit(config, dtype):
    """The same 8-bit format as bitsandbytes' ``AdEMAMix8bit`` (m1 and m2 on the signed dynamic map, nu on the unsigned
    one, absmax per block of 256; tensors under the size threshold float32 in both). Measured after 8 steps: the
    movement ``p_8 - p_0`` differs by 0.0 relative (codes and maxima equal); bounded here by 1e-5 relative, and at
    most 0.1% of the codes one apart (a code map or rounding change of bnb's would leave a few such)."""
    bnb = pytest.importorskip("bitsandbytes")
    init, grads = _problem(8, seed=3)
    cfg = {**config, "min_8bit_size": 500}
    ours, opt = _run(lambda ps: _ours("ademamix8bit", ps, {**config, "min_quant_size": 500}), init, grads, dtype)
    theirs, bopt = _run(lambda ps: bnb.optim.AdEMAMix8bit(ps, **cfg), init, grads, dtype)
    for p, q, x in zip(ours, theirs, init):
        x = x.to(dtype).float()
        moved, bmoved = p.detach().float() - x, q.detach().float() - x
        assert (moved - bmoved).norm() <= 1e-5 * bmoved.norm()
        st, bst = opt.state[p], bopt.state[q]
        if p.numel() < 500:
            assert st["exp_avg"].dtype == bst["state1"].dtype == torch.float32
            continue
        for key, code, absmax in (("exp_avg", bst["state1"][0], bst["absmax1"][0]),
                                  ("exp_avg_slow", bst["state1"][1], bst["absmax1"][1]),
                                  ("exp_avg_sq", bst["state2"], bst["absmax2"])):
            assert st[key].dtype == torch.uint8
            off = (st[key].int() - code.reshape(-1).int()).abs()
            assert off.max() <= 1 and (off > 0).float().mean() <= 1e-3, key
            torch.testing.assert_close(st[key + "_absmax"], absmax, rtol=1e-5, atol=0)


def test_ademamix_equals_pytorch_optimizer_ademamix():
    """pytorch-optimizer's ``AdEMAMix`` (its port of the authors' code; one warmup length ``t_alpha_beta3`` for both
    schedulers, ``lerp`` EMAs, the decay decoupled with ``weight_decouple=True``): equal to float32 rounding."""
    po = pytest.importorskip("pytorch_optimizer")
    init, grads = _problem(10, seed=2)
    cfg = {"lr": 3e-3, "betas": (0.9, 0.999, 0.9999), "alpha": 6.0, "weight_decay": 0.1}
    ours, _ = _run(lambda ps: _ours("ademamix", ps, {**cfg, "t_alpha": 7, "t_beta3": 7}), init, grads)
    theirs, _ = _run(lambda ps: po.AdEMAMix(ps, t_alpha_beta3=7, weight_decouple=True, foreach=False, **cfg), init,
                     grads)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_schedulers_are_the_papers():
    """Section 3: alpha rises linearly to alpha at T_alpha; beta3 starts at beta1 (t = 0), reaches beta3 at T_beta3
    with the half-life ln(0.5) / ln(beta) linear in t, and stays there."""
    from lowmem.optim.functional.ademamix import alpha_schedule, beta3_schedule

    assert alpha_schedule(3, 8.0, 6) == 4.0 and alpha_schedule(9, 8.0, 6) == 8.0 and alpha_schedule(1, 8.0, None) == 8.0
    b1, b3, T = 0.9, 0.9999, 100
    assert beta3_schedule(0, b1, b3, T) == pytest.approx(b1, rel=1e-12)
    assert beta3_schedule(T, b1, b3, T) == pytest.approx(b3, rel=1e-12)
    assert beta3_schedule(T + 1, b1, b3, T) == b3 and beta3_schedule(5, b1, b3, None) == b3
    half = [math.log(0.5) / math.log(beta3_schedule(t, b1, b3, T)) for t in (0, 25, 50)]
    assert half[1] - half[0] == pytest.approx(half[2] - half[1], rel=1e-9)


@pytest.mark.parametrize("name", ["ademamix", "ademamix8bit"])
def test_foreach_buckets_equal_the_single_tensor_step(name):
    """The multi-tensor buckets (a tensor larger than chunk_numel joins them in pieces) equal foreach=False, bit for
    bit: parameters and state, with the schedulers on."""
    shapes = ((48, 40), (40,), (7, 9), (3, 8, 10), (64,))
    init, grads = _problem(7, seed=4, shapes=shapes)
    hp = dict(SCHEDULED, betas=(0.8, 0.95))
    if name == "ademamix8bit":
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
    from lowmem.optim.functional import ademamix as FA

    calls = []
    orig = FA.ademamix_direction_foreach
    monkeypatch.setattr(FA, "ademamix_direction_foreach", lambda *a, **k: calls.append(1) or orig(*a, **k))
    init, grads = _problem(2, seed=5)
    _run(lambda ps: create_optimizer(ps, "ademamix"), init, grads)
    assert calls
    calls.clear()
    _run(lambda ps: create_optimizer(ps, "ademamix", foreach=False), init, grads)
    assert not calls


def test_state_bytes_per_parameter():
    """Three moments: 12 B per parameter in float32, 6 in bfloat16; 8-bit: 3 B per parameter plus three float32
    absmax per block (and the float32 step count, 4 B per parameter tensor)."""
    assert bytes_per_param("ademamix") == 12.0
    assert bytes_per_param("ademamix", state_dtype="bfloat16") == 6.0
    assert bytes_per_param("ademamix8bit") == 3.0 + 12 / 256
    p = torch.nn.Parameter(torch.zeros(100, 50))
    opt = create_optimizer([p], "ademamix8bit", min_quant_size=64, block_size=64)
    opt.materialize_state()
    assert opt.state_bytes() == 3 * 5000 + 3 * 4 * 79 + 4  # ceil(5000 / 64) = 79 blocks
    opt = create_optimizer([p], "ademamix")
    opt.materialize_state()
    assert opt.state_bytes() == 12 * 5000 + 4


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", ["default", 4096, None], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["ademamix", "ademamix8bit"])
def test_transient_bytes_equal_the_traced_step(name, dtype, chunk, state_dtype):
    """What a step allocates (every dispatched output alive together: tests/test_transient_per_parameter.py's trace)
    equals ``step_transient_bytes()``: a parameter stepped alone (``per_parameter=True``: the direction and
    ``m1 / c1`` or ``sqrt(nu)``, low-precision moments' float32 copies, the 8-bit codec beside the direction) and a
    whole ``step()`` (the buckets' directions, the non-finite check), the default chunk, 4096 and whole tensors."""
    from test_nonfinite_check_bytes import _AllLive
    from test_transient_per_parameter import _traced_and_reported

    traced, reported = _traced_and_reported(name, dtype, (200, 128), chunk, state_dtype=state_dtype, t_beta3=10)
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


def test_float64_parameter_transient_equals_the_trace():
    """A float64 parameter with float32 moments (its gradient cast once by the engine) and with float64 moments
    (``state_dtype="param"``: a float64 direction and quotient)."""
    from test_transient_per_parameter import _traced_and_reported

    for kw in ({}, {"state_dtype": "param"}):
        traced, reported = _traced_and_reported("ademamix", torch.float64, (200, 128), None, **kw)
        assert traced == reported > 0, kw


def test_defaults_are_bitsandbytes_and_bad_values_name_the_field():
    """bitsandbytes' defaults (``AdEMAMix`` / ``AdEMAMix8bit``): lr 1e-3, betas (0.9, 0.999, 0.9999), alpha 5, no
    schedulers, eps 1e-8, weight decay 1e-2; 8-bit blocks of 256 from 4096 elements."""
    from lowmem.optim.recipes.ademamix import ADEMAMIX, ADEMAMIX8BIT, AdEMAMix, AdEMAMix8bit

    want = {"lr": 1e-3, "betas": (0.9, 0.999), "beta3": 0.9999, "alpha": 5.0, "t_alpha": None, "t_beta3": None,
            "eps": 1e-8, "weight_decay": 1e-2}
    for recipe in (ADEMAMIX, ADEMAMIX8BIT):
        d = {h.name: h.default for h in recipe.hparams}
        assert {k: (tuple(v) if k == "betas" else v) for k, v in d.items() if k in want} == want
    p = torch.nn.Parameter(torch.zeros(4))
    for opt in (AdEMAMix([p]), AdEMAMix8bit([p]), create_optimizer([p], "ademamix")):
        g = opt.param_groups[0]
        assert {k: (tuple(g[k]) if k == "betas" else g[k]) for k in want} == want
    assert (AdEMAMix8bit([p]).param_groups[0]["block_size"], AdEMAMix8bit([p]).param_groups[0]["min_quant_size"]) == (256, 4096)
    assert AdEMAMix([p], betas=(0.8, 0.9), beta3=0.99).param_groups[0]["beta3"] == 0.99
    g = AdEMAMix([p], betas=(0.8, 0.9, 0.99)).param_groups[0]  # bitsandbytes' triple
    assert (tuple(g["betas"]), g["beta3"]) == ((0.8, 0.9), 0.99)
    with pytest.raises(ValueError, match="beta3 given twice"):
        AdEMAMix([p], betas=(0.8, 0.9, 0.99), beta3=0.95)
    with pytest.raises(ValueError, match="beta3"):
        create_optimizer([p], "ademamix", beta3=1.0)
    with pytest.raises(ValueError, match="alpha"):
        create_optimizer([p], "ademamix8bit", alpha=-1.0)
    with pytest.raises(ValueError, match="t_alpha"):
        create_optimizer([p], "ademamix", t_alpha=0)
    with pytest.raises(ValueError, match=r"t_beta3=10 with betas\[0\]=0.0"):
        create_optimizer([p], "ademamix", betas=(0.0, 0.999), t_beta3=10)  # ln(beta1) undefined
    create_optimizer([p], "ademamix", betas=(0.0, 0.999))  # beta1 = 0 without the scheduler: fine


# ---- the Hugging Face names --------------------------------------------------------------------------------------


def test_hf_names_map_and_optim_args_apply(tmp_path):
    """A config written for the HF Trainer, ``optim: ademamix_8bit`` with ``optim_args: "alpha=8,beta3=0.999"``
    (transformers' keys for AdEMAMix), builds lowmem's ``ademamix8bit`` with those values and the embeddings' state
    kept 32-bit (as the Trainer does for bitsandbytes' 8-bit classes); an unknown key is an error naming the valid
    ones; ``ademamix`` is the engine's float32 recipe."""
    from lowmem.config import ConfigError
    from lowmem.train import build_training_args, load_recipe, resolve_optim_name

    assert resolve_optim_name("ademamix_8bit") == ("ademamix8bit", False)
    assert resolve_optim_name("ademamix") == ("ademamix", False)
    recipe = load_recipe(None, output_dir=str(tmp_path / "out"), optim="ademamix_8bit",
                         optim_args="alpha=8,beta3=0.999,t_alpha=100")
    assert recipe.optim_args == {"alpha": 8, "beta3": 0.999, "t_alpha": 100}
    args = build_training_args(recipe)
    assert args.lowmem_embeddings_32bit is True

    from lowmem.kit import build_tiny_model
    from lowmem.trainers.hf import create_optimizer_embeddings_32bit

    model, _ = build_tiny_model(seed=0)
    opt = create_optimizer_embeddings_32bit(model, "ademamix8bit", **args.lowmem_optim_args)
    assert type(opt).__name__ == "AdEMAMix8bit"
    for g in opt.param_groups:
        assert (g["alpha"], g["beta3"], g["t_alpha"], g["t_beta3"]) == (8, 0.999, 100, None)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    emb = model.get_input_embeddings().weight
    assert emb.numel() >= 4096 and opt.state[emb]["exp_avg_slow"].dtype == torch.float32  # kept 32-bit
    assert any(st.get("exp_avg_slow") is not None and st["exp_avg_slow"].dtype == torch.uint8 for st in opt.state.values())
    for paged, entry in (("paged_ademamix_32bit", "bnb_paged_ademamix"), ("paged_ademamix_8bit", "bnb_paged_ademamix8bit")):
        assert resolve_optim_name(paged) == (entry, False)  # bitsandbytes' paged AdEMAMix, CUDA only (test_newopt18_bnb)
    with pytest.raises(ConfigError, match=r"optim_args.*'gamma'.*valid: \[.*'alpha'.*'beta3'"):
        load_recipe(None, output_dir=str(tmp_path / "out"), optim="ademamix_8bit", optim_args="gamma=2")


@pytest.mark.parametrize("optim, name", [("ademamix", "ademamix"), ("ademamix_8bit", "ademamix8bit")])
def test_under_training_arguments_equal_what_the_hf_trainer_builds(optim, name, tmp_path):
    """The Hugging Face Trainer's ``optim="ademamix"`` / ``"ademamix_8bit"`` builds bitsandbytes' ``AdEMAMix`` with
    ``optim_bits`` 32 / 8, ``betas=(adam_beta1, adam_beta2, optim_args beta3)``, ``alpha``, ``t_alpha`` from
    ``optim_args`` (transformers' ``_get_bitsandbytes_optimizer``); lowmem's recipe under the same
    ``TrainingArguments`` (lr, betas, eps, weight decay on the Trainer's decay groups, the same ``optim_args``) steps
    the same weights."""
    pytest.importorskip("bitsandbytes")
    from transformers import Trainer, TrainingArguments

    from lowmem.trainers.hf import optimizer_cls_and_kwargs

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    args = TrainingArguments(str(tmp_path), optim=optim, optim_args="alpha=8,beta3=0.999,t_alpha=3",
                             learning_rate=3e-3, weight_decay=0.3, adam_beta2=0.95, report_to=[], use_cpu=True)
    hf_cls, hf_kw = Trainer.get_optimizer_cls_and_kwargs(args, base)
    assert hf_kw["betas"] == (0.9, 0.95, 0.999) and hf_kw["alpha"] == 8.0 and hf_kw["t_alpha"] == 3
    assert hf_kw["optim_bits"] == (8 if optim == "ademamix_8bit" else 32)
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
    for p, q in zip(models["hf"].parameters(), models["lowmem"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


# ---- the bench peers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peer, recipe, rows, cols", [("bnb_ademamix", "ademamix", 40, 24),
                                                      ("bnb_ademamix8bit", "ademamix8bit", 96, 64)])
@pytest.mark.parametrize("st", [{}, {"weight_decay": 0.1, "t_alpha": 4, "t_beta3": 5}], ids=["defaults", "scheduled"])
def test_bnb_peers_step_like_the_recipes(peer, recipe, rows, cols, st):
    """``lowmem bench ... peer:bnb_ademamix[8bit]``: bitsandbytes' classes built by the peer (lowmem's decay groups,
    the recipes' defaults) step like lowmem's recipe; the 8-bit one on a 96 x 64 weight (6,144 elements: quantized
    under the default min_quant_size 4096 in both) and small float32 tensors."""
    pytest.importorskip("bitsandbytes")
    from test_peers_came_lion import _peer_vs_lowmem

    from lowmem.bench_peers import PEERS

    assert {p.name: (p.module, p.recipe) for p in PEERS}[peer] == ("bitsandbytes", recipe)
    theirs, ours = _peer_vs_lowmem(peer, recipe, 8, rows=rows, cols=cols, **st)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # two Trainer runs per case, 3-9 s
@pytest.mark.parametrize("how", ["lowmem", "plain"])
def test_ademamix_8bit_equals_what_the_hf_trainer_builds_on_the_tiny_llama(how, tmp_path):
    """``Trainer(optim="ademamix_8bit")`` (bitsandbytes' ``AdEMAMix`` with ``optim_bits=8``, the embedding's state
    kept 32-bit by transformers) and ``LowMemTrainer(lowmem_optim="ademamix_8bit")`` (or a plain Trainer with
    ``optimizer_cls_and_kwargs(model, "ademamix_8bit")``) on the tiny Llama, 3 steps with decay, warm-up, clipping and
    adam_beta2 0.95 (tests/test_auditfix_hf_embeddings.py's runs): the embedding's moments float32 in lowmem, the rest
    8-bit, every weight equal bit for bit (0.0 measured)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from test_auditfix_hf_embeddings import _run, _tensor_state

    try:
        hf_model, _ = _run("hf", "ademamix_8bit", tmp_path)
        lm_model, lm_opt = _run("lowmem", "ademamix_8bit", tmp_path, how=how)
    finally:
        bnb.optim.GlobalOptimManager.get_instance().initialize()  # (its overrides are process-wide)
    emb = lm_model.get_input_embeddings().weight
    assert all(t.dtype == torch.float32 for t in _tensor_state(lm_opt, emb).values())
    assert any(t.dtype == torch.uint8 for s in lm_opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    for (n, a), b in zip(hf_model.named_parameters(), lm_model.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", ["ademamix_8bit", "ademamix8bit", "ademamix"])
def test_memory_estimate_equals_the_measured_step(name):
    """``measure_memory`` on the tiny model (one step): the estimate's optimizer state and step transient equal what the
    optimizer holds and what its step allocates, under lowmem's names and under the HF name ``ademamix_8bit`` (built
    as LowMemTrainer builds it: the embedding's moments float32, 372,216 B against ademamix8bit's 330,396)."""
    import warnings

    from lowmem.memory.measure import measure_memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = measure_memory("tiny", optimizer=name, steps=1, seq_len=8, dtype="fp32", device="cpu")
    assert res.measured["optimizer_states"] == res.estimate.optimizer_states > 0
    assert res.measured["optimizer_transient"] == res.estimate.optimizer_transient > 0


@pytest.mark.slow  # 2-2.5 s for the 8-bit case on the loaded 2-core box
@pytest.mark.parametrize("name", ["ademamix", "ademamix8bit"])
def test_bucket_of_a_whole_chunk_equals_the_trace(name):
    """A bucket of 2**18 + 512 values (a 512 x 512 weight and a vector, one bucket): the three decoded moments beside
    the directions and the quotients, then the encodes (past 2**17 values the codec's table pass stops growing); traced
    equal (2,101,248 B float32, 6,043,648 B 8-bit). The 8-bit bucket's peak is the encode beside the directions
    (Quantized.foreach_direction_bucket_transient_bytes), not the inner direction's 8 B per value."""
    from test_nonfinite_check_bytes import _AllLive

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(512, 512)), torch.nn.Parameter(torch.randn(512))]
    opt = create_optimizer(ps, name)
    for step in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        if step == 0:
            opt.step()
    with _AllLive() as t:
        opt.step()
    assert t.peak == opt.step_transient_bytes() > 0
