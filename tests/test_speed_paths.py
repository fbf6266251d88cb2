"""Fast paths of the step (issue 15), each tested equal to the reference form it replaces."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim.functional import quant as Q


def _probe_values(name: str) -> torch.Tensor:
    """Random values, every code value, every midpoint and its float32 neighbours, 0, -0, tiny,
    subnormal, values above 1 and below -1, infinities and NaN."""
    code = Q.code_map(name)
    mid = (code[1:] + code[:-1]) / 2
    g = torch.Generator().manual_seed(0)
    near = torch.cat([mid, code])
    up, down = torch.nextafter(near, torch.tensor(math.inf)), torch.nextafter(near, torch.tensor(-math.inf))
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, 1e-30, 1e-7, 1.0, -1.0, 1.0000001, 1.5, 2.0, 16.0,
                            -2.0, 1e30, -1e30, 3e38, math.inf, -math.inf, math.nan])
    rand = torch.rand(200_000, generator=g) * 2.2 - 1.1
    fine = torch.linspace(-1.05, 1.05, 100_003)
    vals = torch.cat([rand, fine, near, up, down, special, -near, -up, -down])
    if name == "linear4_nozero":
        vals = torch.cat([vals, rand.abs(), torch.rand(10_000, generator=g) * 1e-6])
    return vals.float()


@pytest.mark.parametrize("name", ["linear4_nozero", "dynamic4_signed"])
def test_fast_nearest_code_equals_the_search(name):
    """Arithmetic (linear map) and cell table (dynamic map) give the search's indices bit for bit:
    ties (values on a midpoint) go to the lower code, NaN to the last, out-of-range values clamp."""
    code = Q.code_map(name)
    x = _probe_values(name)
    ref = Q.nearest_code_search(x, code)
    fast = Q.nearest_code(x, code, name)
    assert fast.dtype == ref.dtype == torch.int32
    assert torch.equal(fast, ref), x[fast != ref][:10]
    mid = (code[1:] + code[:-1]) / 2  # a value on a midpoint takes the lower code
    assert torch.equal(Q.nearest_code(mid, code, name), torch.arange(15, dtype=torch.int32))
    # a 2-d input (rank-1 normalization passes a flat view, but the shape must not matter)
    assert torch.equal(Q.nearest_code(x[:200_000].view(400, 500), code, name), ref[:200_000].view(400, 500))


@pytest.mark.parametrize("name", ["linear4_nozero", "dynamic4_signed"])
def test_fast_4bit_quantizers_equal_the_search(name):
    g = torch.Generator().manual_seed(1)
    code = Q.code_map(name)
    x = torch.randn(4096 * 3 + 77, generator=g) * torch.logspace(-6, 2, 4096 * 3 + 77)
    if name == "linear4_nozero":
        x = x.abs()
        x[::97] = 0.0
    fast = Q.quantize_blockwise_4bit(x, code, 128, name)
    ref = Q.quantize_blockwise_4bit(x, code, 128)
    assert all(torch.equal(a, b) for a, b in zip(fast, ref))
    if name == "linear4_nozero":
        m = x[: 64 * 192].view(64, 192)
        assert all(torch.equal(a, b) for a, b in zip(Q.quantize_rank1_4bit(m, code, None, name), Q.quantize_rank1_4bit(m, code)))



@pytest.mark.parametrize("n", [512, 511, 1])
def test_4bit_lookup_equals_unpack_and_index(n):
    """Decoding through the 256 x 2 byte table gives ``values[unpack_4bit(packed, n)]`` element for
    element (every byte value, odd lengths), for the code maps and MicroAdam's integer levels."""
    g = torch.Generator().manual_seed(n)
    packed = torch.cat([torch.arange(256, dtype=torch.uint8), torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)])
    packed = packed[: -(-n // 2)] if n < 512 else packed
    m = 2 * packed.numel() - (n % 2)
    for values in (Q.code_map("dynamic4_signed"), Q.code_map("linear4_nozero"), torch.arange(16, dtype=torch.float32)):
        ref = values[Q.unpack_4bit(packed, m)]
        assert torch.equal(Q.lookup_4bit(packed, values, m), ref)
    lo, hi = torch.randn(-(-m // 64)), torch.randn(-(-m // 64)) + 3
    q = torch.nn.functional.pad(Q.unpack_4bit(packed, m).float(), (0, (-m) % 64)).view(-1, 64)
    assert torch.equal(Q.dequantize_minmax_4bit_blocks(packed, lo, hi, 64, m), lo.unsqueeze(1) + q * ((hi - lo) / 15.0).unsqueeze(1))

# ---- GaLore: project-back and update as one addmm_ ----------------------------------------------

GALORE = {
    "right": {"rank": 4, "update_proj_gap": 2, "scale": 0.5, "weight_decay": 0.1},
    "left": {"rank": 4, "update_proj_gap": 2, "proj_type": "left", "weight_decay": 0.1},
    "full": {"rank": 4, "update_proj_gap": 2, "proj_type": "full", "scale": 0.3},
    "rsvd": {"rank": 4, "update_proj_gap": 3, "projection": "rsvd", "weight_decay": 0.05},
}


def _galore_run(hparams, fused: bool, monkeypatch, name="galore_adamw", decay_after_update=None, steps=5):
    import dataclasses

    from lowmem.optim.engine import LowMemOptimizer
    from lowmem.optim.registry import create_optimizer
    from lowmem.optim.subspace import SubspaceProjection

    with monkeypatch.context() as mp:
        if not fused:
            mp.setattr(SubspaceProjection, "can_add_up_rows", lambda self, state: False)
        else:  # the fused path must not build a row block of the direction
            mp.setattr(SubspaceProjection, "up_rows", lambda *a, **k: pytest.fail("unfused combine-back ran"))
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(37, 29))
        opt = create_optimizer([p], name, **hparams)
        if decay_after_update is not None:
            opt = LowMemOptimizer([p], recipe=dataclasses.replace(opt.recipe, decay_after_update=decay_after_update), **hparams)
        opt.chunk_numel = 128  # the unfused path: 4 rows of 29 per block, 10 blocks, the last partial
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            p.grad = torch.randn(37, 29, generator=gen)
            opt.step()
    return p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}


@pytest.mark.parametrize("label", sorted(GALORE))
@pytest.mark.parametrize("decay_after_update", [None, False])
def test_galore_fused_combine_back_equals_the_row_blocks(label, decay_after_update, monkeypatch):
    """``p_rows.addmm_(P_rows, d_low, alpha=-lr * scale)`` against ``p_rows - lr * (scale * P_rows d_low)``
    (weight decay before or after, as the recipe says). Not bit-equal: the GEMM's sum is scaled and
    added to the parameter in one rounding instead of three, so they agree to float32 rounding of
    the update (a few ulps after 5 steps); the state does not depend on the parameter and is equal."""
    hp = GALORE[label]
    ref_p, ref_s = _galore_run(hp, False, monkeypatch, decay_after_update=decay_after_update)
    fast_p, fast_s = _galore_run(hp, True, monkeypatch, decay_after_update=decay_after_update)
    torch.testing.assert_close(fast_p, ref_p, rtol=1e-6, atol=1e-6)  # a few float32 ulps after 5 steps
    for k in ref_s:
        assert torch.equal(fast_s[k], ref_s[k]), k


def test_galore_fused_combine_back_keeps_unfused_cases(monkeypatch):
    """A tensor learning rate or a bf16 parameter takes the row blocks (addmm_'s alpha is a number)."""
    from lowmem.optim.subspace import SubspaceProjection

    calls = []
    orig = SubspaceProjection.add_up_rows_
    monkeypatch.setattr(SubspaceProjection, "add_up_rows_", lambda self, *a: calls.append(1) or orig(self, *a))
    for p, lr in ((torch.nn.Parameter(torch.randn(37, 29)), torch.tensor(1e-3)),
                  (torch.nn.Parameter(torch.randn(37, 29).bfloat16()), 1e-3)):
        from lowmem.optim.registry import create_optimizer

        opt = create_optimizer([p], "galore_adamw", rank=4)
        opt.param_groups[0]["lr"] = lr  # a scheduler may set a tensor
        opt.chunk_numel = 128
        for _ in range(2):
            p.grad = torch.randn_like(p)
            opt.step()
    assert not calls
    p = torch.nn.Parameter(torch.randn(37, 29))
    opt = create_optimizer([p], "galore_adamw", rank=4)
    opt.chunk_numel = 128
    p.grad = torch.randn_like(p)
    opt.step()
    assert len(calls) == 1  # in place, so all rows in one GEMM (nothing of the direction's size is allocated)


# ---- host reads per step ------------------------------------------------------------------------

# recipe -> (all reads of a tensor's value by Python, those of tensors that are not CPU bookkeeping)
# in one step of a 64 x 48 matrix (projected for subspace recipes) and a 48-vector, after two steps.
# Bookkeeping (state["step"], state["proj_meta"]) is kept on the CPU: reading it never waits for a
# device; the others do (on CUDA a synchronisation each): the engine's one finite check per step
# (which also reads Online Subspace Descent's usability check of the gradients before their PCA steps).
HOST_READS = {
    "adafactor": (3, 1), "adamw": (3, 1), "adamw4bit": (3, 1), "adamw4bit_rank1": (3, 1), "adamw8bit": (3, 1),
    # + the CPU moment_start; + proj_meta once more: whether an SVD refresh is due, its gradient then checked
    # with the finite check (engine._refresh_checks; GaLore's checks its projected gradients: not asked)
    "fira_adamw": (6, 1), "fira_adamw8bit": (6, 1), "frugal": (6, 1), "frugal8bit": (6, 1),
    "galore_adafactor": (4, 1), "galore_adamw": (4, 1), "galore_adamw8bit": (4, 1), "microadam": (3, 1),
    # the CPU PCA-step count read twice (pre_check, foreach_post_update) and once whether a refresh is due;
    # usability: the check's read
    "osd_adamw": (8, 1),
    "spam": (3, 1), "stable_spam": (3, 1),
    "muon": (3, 1), "scale": (3, 1), "sinkgd": (3, 1), "normuon": (3, 1),
    "apollo_adamw": (5, 1), "apollo_mini": (5, 1),  # as Fira: the bias-correction unit scale reads the CPU step
    "alice": (6, 1),  # as Fira: + proj_meta (a refresh due?) and the CPU step read by the bias-correction unit scale
    "adam_mini": (3, 1),
    "came": (3, 1), "sm3": (3, 1), "racs": (3, 1),
    "lion": (3, 1), "lion8bit": (3, 1),  # as AdamW
    "ademamix": (3, 1), "ademamix8bit": (3, 1),  # as AdamW
    # SNSM: its step scale reads the CPU step; Subspace-Momentum: + whether an SVD refresh is due, as Fira
    "adamw_sn": (3, 1), "adamw_snsm": (6, 1), "sgd_sm": (5, 1),
    "adagrad_sn": (3, 1), "adagrad_snsm": (5, 1),  # AdaGrad: no bias correction, no step read
    "lomo": (3, 1), "adalomo": (3, 1), "badam": (3, 1),  # BAdam's schedule is Python ints: no read
    "sgd": (3, 1), "adagrad": (3, 1), "rmsprop": (3, 1),  # as AdamW (torch's first step / lr_decay read the CPU step)
    "stable_adamw": (3, 1),  # as AdamW: the clip scales a tensor step size on the device, no read
}


def _count_host_reads(name: str) -> tuple[int, int, list[str]]:
    import traceback
    from unittest import mock

    from lowmem.optim.registry import create_optimizer, get_entry

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 48)), torch.nn.Parameter(torch.randn(48))]
    recipe = get_entry(name).recipe
    hp = {"rank": 8, "update_proj_gap": 100} if recipe.projection is not None else {}
    if "min_quant_size" in recipe.all_hparams():
        hp["min_quant_size"] = 1
    opt = create_optimizer(ps, name, **hp)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    bookkeeping = {id(t) for st in opt.state.values() for k, t in st.items() if k in ("step", "proj_meta", "moment_start")}
    reads, device_reads, sites = [0], [0], []

    def counted(orig):
        def read(self, *args, **kwargs):
            reads[0] += 1
            if id(self) not in bookkeeping and id(self._base) not in bookkeeping:
                device_reads[0] += 1
                frame = traceback.extract_stack()[-2]
                sites.append(f"{frame.filename}:{frame.lineno}")
            return orig(self, *args, **kwargs)
        return read

    T = torch.Tensor
    patches = [mock.patch.object(T, m, counted(getattr(T, m)))
               for m in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")]
    for p in ps:
        p.grad = torch.randn_like(p)
    for pt in patches:
        pt.start()
    try:
        opt.step()
    finally:
        for pt in patches:
            pt.stop()
    return reads[0], device_reads[0], sites


@pytest.mark.parametrize("name", sorted(HOST_READS))
def test_host_reads_per_step_are_pinned(name):
    """Each recipe's host reads of tensor values in a step, pinned: a new ``.item()``, ``float(t)``,
    ``if t:`` in the step shows here (on CUDA a read of a device tensor waits for the device)."""
    reads, device_reads, sites = _count_host_reads(name)
    assert (reads, device_reads) == HOST_READS[name], sites


def test_host_reads_cover_every_recipe():
    from lowmem.optim.registry import get_entry, list_optimizers

    assert sorted(n for n in list_optimizers() if get_entry(n).recipe is not None) == sorted(HOST_READS)


# ---- Online Subspace Descent: the PCA gradient reuses the step's projected gradient --------------


@pytest.mark.parametrize("proj_type", ["std", "left"])
@pytest.mark.parametrize("chunk_numel", [None, 128])
def test_osd_pca_step_reusing_the_projected_gradient_is_identical(proj_type, chunk_numel, monkeypatch):
    """``G Q^T`` (or ``P^T G``) in the PCA gradient is the step's projected gradient, the same
    product: reusing it gives bit-identical weights and state."""
    from lowmem.optim.functional import osd as OSD
    from lowmem.optim.registry import create_optimizer

    def run(reuse: bool):
        calls = []
        orig = OSD.pca_loss_grad

        def spy(basis, g, side, g_norm=None, g_proj=None):
            calls.append(g_proj is not None)
            return orig(basis, g, side, g_norm, g_proj if reuse else None)

        with monkeypatch.context() as mp:
            mp.setattr(OSD, "pca_loss_grad", spy)
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(37, 29))
            opt = create_optimizer([p], "osd_adamw", rank=4, proj_lr=1e-2, proj_type=proj_type, weight_decay=0.1)
            opt.chunk_numel = chunk_numel
            gen = torch.Generator().manual_seed(1)
            for _ in range(5):
                p.grad = torch.randn(37, 29, generator=gen)
                opt.step()
        assert calls and all(calls)  # the engine passes the projected gradient on every PCA step
        return p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}

    ref_p, ref_s = run(False)
    fast_p, fast_s = run(True)
    assert torch.equal(fast_p, ref_p)
    for k in ref_s:
        assert torch.equal(fast_s[k], ref_s[k]), k


# ---- Muon / SCALE / SinkGD: the AdamW parameters of a hybrid take the foreach buckets -------------


@pytest.mark.parametrize("name,key,hparams", [
    ("muon", {"use_muon": True}, {"adamw_lr_ratio": 0.3, "ns_steps": 2}),
    ("scale", {"scale_role": "hidden"}, {"adamw_lr_ratio": 0.3}),  # the authors' eps placement ("hf")
    ("sinkgd", {"use_sinkgd": True}, {"sinkhorn_iters": 2}),
])
def test_hybrid_adamw_parameters_take_the_foreach_path_equal_to_single_tensor(name, key, hparams, monkeypatch):
    """The hybrids' AdamW parameters (vectors, and 2-D weights of groups without the target key;
    one larger than ``chunk_numel``, bucketed in pieces) are stepped by the foreach kernel, and
    only they; weights and state equal the single-tensor path (``chunk_numel=None, foreach=False``)
    at rtol 1e-6, with ``adamw_lr_ratio != 1``, weight decay and an ``eps`` large enough for its
    placement to matter."""
    from itertools import chain

    from lowmem.optim import functional as F
    from lowmem.optim.registry import get_entry

    shapes = {"target": [(12, 10), (8, 16)], "adamw_in_target_group": [(10,), (7,)], "adamw": [(9, 6), (20, 8), (5,)]}
    adamw_numel = sum(math.prod(s) for s in shapes["adamw_in_target_group"] + shapes["adamw"])

    def run(fast: bool):
        calls: list[int] = []
        orig = F.adamw_foreach_

        def spy(params, *args, **kwargs):
            calls.append(sum(p.numel() for p in params))
            return orig(params, *args, **kwargs)

        gen = torch.Generator().manual_seed(0)
        ps = {k: [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in v] for k, v in shapes.items()}
        groups = [{"params": ps["target"] + ps["adamw_in_target_group"], **key}, {"params": ps["adamw"]}]
        opt = get_entry(name).factory(groups, lr=1e-2, weight_decay=0.1, eps=1e-3, **hparams)
        opt.chunk_numel = 64 if fast else None
        if not fast:
            for g in opt.param_groups:
                g["foreach"] = False
        with monkeypatch.context() as mp:
            mp.setattr(F, "adamw_foreach_", spy)
            for _ in range(4):
                for p in chain(*ps.values()):
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
        flat = list(chain(*ps.values()))
        return calls, [p.detach().clone() for p in flat], [{k: v.clone() for k, v in opt.state[p].items()} for p in flat]

    fast_calls, fast_p, fast_s = run(True)
    single_calls, ref_p, ref_s = run(False)
    assert single_calls == []
    assert len(fast_calls) >= 4 and sum(fast_calls) == 4 * adamw_numel  # every AdamW element, every step, and no target
    for a, b in zip(fast_p, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for sa, sb in zip(fast_s, ref_s):
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-9)


# ---- Subset-Norm: parameters with one second moment per element take a foreach kernel --------------


@pytest.mark.parametrize("name,hparams", [
    ("adamw_sn", {}),
    ("adamw_sn", {"betas": (0.0, 0.999)}),  # RMSPropSN: no first moment, the numerator is g
    ("adagrad_sn", {"momentum": 0.9}),
])
def test_subset_norm_elementwise_parameters_take_the_foreach_path_bit_for_bit(name, hparams, monkeypatch):
    """Vectors (and 2-D weights of a group with ``subset_norm=False``; one larger than
    ``chunk_numel``, bucketed in pieces) are stepped by ``elementwise_foreach_``, the subset-normed
    2-D weights not by it (by ``subset_foreach_``, tested below); weights and state equal the
    single-tensor path bit for bit (the kernel
    runs the same operations in the same order), weight decay after the update included."""
    from itertools import chain

    from lowmem.optim.functional import subset_norm as SN
    from lowmem.optim.registry import get_entry

    shapes = {"sn": [(12, 10), (8, 16)], "sn_vectors": [(10,), (7,)], "plain": [(9, 6), (20, 8), (5,)]}
    elementwise = sum(math.prod(s) for s in shapes["sn_vectors"] + shapes["plain"])

    def run(fast: bool):
        calls: list[int] = []
        orig = SN.elementwise_foreach_

        def spy(params, *args, **kwargs):
            calls.append(sum(p.numel() for p in params))
            return orig(params, *args, **kwargs)

        gen = torch.Generator().manual_seed(0)
        ps = {k: [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in v] for k, v in shapes.items()}
        groups = [{"params": ps["sn"] + ps["sn_vectors"], "subset_norm": True}, {"params": ps["plain"], "subset_norm": False}]
        opt = get_entry(name).factory(groups, lr=1e-2, weight_decay=0.1, eps=1e-3, **hparams)
        opt.chunk_numel = 64 if fast else None
        if not fast:
            for g in opt.param_groups:
                g["foreach"] = False
        with monkeypatch.context() as mp:
            mp.setattr(SN, "elementwise_foreach_", spy)
            for _ in range(4):
                for p in chain(*ps.values()):
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
        flat = list(chain(*ps.values()))
        return calls, [p.detach().clone() for p in flat], [{k: v.clone() for k, v in opt.state[p].items()} for p in flat]

    fast_calls, fast_p, fast_s = run(True)
    single_calls, ref_p, ref_s = run(False)
    assert single_calls == []
    assert len(fast_calls) >= 4 and sum(fast_calls) == 4 * elementwise  # every element-wise parameter, every step
    n_sn = len(shapes["sn"])  # (the subset-normed weights: chunked vs whole column sums, ulps apart)
    for i, (a, b, sa, sb) in enumerate(zip(fast_p, ref_p, fast_s, ref_s)):
        assert sa.keys() == sb.keys()
        for x, y in [(a, b), *((sa[k], sb[k]) for k in sa)]:
            if i < n_sn:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
            else:
                assert torch.equal(x, y), i


# ---- multi-tensor paths of the block-wise rules: Adam-mini, Subset-Norm, AdamW with the hf eps ------


def _foreach_vs_plain(name, groups_spec, hparams, spies, monkeypatch, steps=4, chunk_numel=64):
    """Step the same parameters and gradients three ways: the default path (foreach buckets, chunks
    of ``chunk_numel``), ``foreach=False`` with the same chunks, and one tensor at a time
    (``chunk_numel=None, foreach=False``). ``spies``: (module, function name) pairs whose calls are
    recorded (the numel of each call's parameters, or 0 for a split tensor's first piece).
    Returns {path: (calls per spy, parameters, states)} and the flat list of shapes."""
    from itertools import chain

    from lowmem.optim.registry import get_entry

    def run(path):
        calls = {fn: [] for _, fn in spies}
        gen = torch.Generator().manual_seed(0)
        ps, groups = [], []
        for spec in groups_spec:
            dtype = spec.get("dtype", torch.float32)
            group = [torch.nn.Parameter(torch.randn(*s, generator=gen).to(dtype)) for s in spec["shapes"]]
            ps.append(group)
            groups.append({"params": group, **{k: v for k, v in spec.items() if k not in ("shapes", "dtype")}})
        opt = get_entry(name).factory(groups, **hparams)
        opt.chunk_numel = None if path == "whole" else chunk_numel
        if path != "foreach":
            for g in opt.param_groups:
                g["foreach"] = False
        with monkeypatch.context() as mp:
            for module, fn in spies:
                orig = getattr(module, fn)

                def spy(params, *args, _orig=orig, _fn=fn, **kwargs):
                    calls[_fn].append(sum(p.numel() for p in params) if isinstance(params, list) else 0)
                    return _orig(params, *args, **kwargs)

                mp.setattr(module, fn, spy)
            for _ in range(steps):
                for p in chain(*ps):
                    p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
                opt.step()
        flat = list(chain(*ps))
        return calls, [p.detach().clone() for p in flat], [{k: v.clone() for k, v in opt.state[p].items()} for p in flat]

    return {path: run(path) for path in ("foreach", "chunked", "whole")}


def _assert_same(a, b, exact, rtol=1e-6, atol=1e-7):
    (_, pa, sa), (_, pb, sb) = a, b
    for i, (x, y, u, w) in enumerate(zip(pa, pb, sa, sb)):
        assert u.keys() == w.keys()
        for s, t in [(x, y), *((u[k], w[k]) for k in u)]:
            if exact:
                assert torch.equal(s, t), i
            else:
                torch.testing.assert_close(s, t, rtol=rtol, atol=atol, msg=lambda m, i=i: f"tensor {i}: {m}")


ADAM_MINI_GROUPS = [
    # whole-tensor blocks: equal shapes (stacked), odd sizes, one larger than chunk_numel (pieces)
    {"shapes": [(33,), (33,), (33,), (7, 5), (7, 5), (1,), (9, 3, 2), (12, 10)], "block": "tensor"},
    {"shapes": [(12, 10), (8, 16), (12, 10), (5, 7), (300, 7)], "block": "row", "weight_decay": 0.0},  # (300, 7): pieces cut rows
    {"shapes": [(12, 10), (8, 10), (40, 9)], "block": "head", "head_dim": 4},
    {"shapes": [(12, 10), (9,), (0,), (70,)], "block": "element"},
    {"shapes": [(6, 4), (6,)], "block": "row", "dtype": torch.bfloat16},  # bfloat16: the bucket's float32 copies
]


def test_adam_mini_foreach_equals_the_per_tensor_step(monkeypatch):
    """Adam-mini's multi-tensor path: every block kind (whole tensor, rows, heads, elements), tensors
    of equal and odd shapes, an empty one, weight decay, 4 steps; tensors larger than
    ``chunk_numel`` arrive in pieces (whole blocks cut by the pieces) and are stepped whole,
    chunked. Weights and state equal the ``foreach=False`` step with the same chunks bit for bit,
    and the one-tensor-at-a-time step (a large whole-tensor block's mean from chunk sums: to
    rtol 1e-6). bf16 parameters take the bucket on their float32 copies (BF16RULES)."""
    from lowmem.optim import moments
    from lowmem.optim.functional import adam_mini as AM

    out = _foreach_vs_plain("adam_mini", ADAM_MINI_GROUPS, {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-3},
                            [(AM, "adam_mini_foreach_"), (moments, "step_whole_from_piece_")], monkeypatch)
    shapes = [s for g in ADAM_MINI_GROUPS for s in g["shapes"]]
    float32 = [s for g in ADAM_MINI_GROUPS if "dtype" not in g for s in g["shapes"]]
    small = sum(math.prod(s) for s in shapes if math.prod(s) <= 64)
    calls = out["foreach"][0]
    assert sum(calls["adam_mini_foreach_"]) == 4 * small  # every small tensor, every step (bf16: on float32 copies)
    large = [s for s in float32 if math.prod(s) > 64]
    assert len(calls["step_whole_from_piece_"]) == 4 * len(large)  # each large tensor once per step
    assert all(c == {"adam_mini_foreach_": [], "step_whole_from_piece_": []} for c in (out["chunked"][0], out["whole"][0]))
    _assert_same(out["foreach"], out["chunked"], exact=True)
    _assert_same(out["foreach"], out["whole"], exact=False)
    assert len(out["foreach"][1]) == len(shapes)


def test_adam_mini_foreach_on_one_tensor_and_empty_lists():
    """The kernel alone: a bucket of one tensor equals the per-tensor functions; an empty list or
    an empty tensor is a no-op."""
    from lowmem.optim import functional as F
    from lowmem.optim.functional import adam_mini as AM

    gen = torch.Generator().manual_seed(3)
    p, g = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    m, v = torch.randn(6, 5, generator=gen), torch.rand(6, generator=gen)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    AM.adam_mini_foreach_([p], [g], [m], [v], 3.0, 0.9, 0.99, 0.1, 0.2, 1e-3)
    AM.first_moment_(m2, g, 0.9)
    AM.block_second_moment_(v2, g, 0.99)
    F.decoupled_weight_decay_(p2, 0.1, 0.2)
    F.apply_update_(p2, AM.adam_mini_direction(m2, v2, 3.0, 0.9, 0.99, 1e-3), 0.1)
    assert torch.equal(p, p2) and torch.equal(m, m2) and torch.equal(v, v2)
    AM.adam_mini_foreach_([], [], [], [], 1.0, 0.9, 0.99, 0.1, 0.0, 1e-8)
    e = torch.zeros(0)
    AM.adam_mini_foreach_([e], [e.clone()], [e.clone()], [torch.zeros(0)], 1.0, 0.9, 0.99, 0.1, 0.1, 1e-8)


SUBSET_NORM_GROUPS = [
    # per row (tall and square, equal shapes stacked), per column (wide), vectors element-wise,
    # one tall and one wide weight larger than chunk_numel (pieces)
    {"shapes": [(12, 10), (12, 10), (8, 16), (3, 40), (10,), (7,), (0, 5), (5, 5), (3, 7), (4, 12), (4, 12)],
     "subset_norm": True},
    {"shapes": [(9, 6), (5,)], "subset_norm": False},
    {"shapes": [(12, 10), (30,), (7, 11)], "subset_norm": True, "subset_size": 8},  # flat subsets
    {"shapes": [(6, 4), (4, 9)], "subset_norm": True, "dtype": torch.bfloat16},
]


@pytest.mark.parametrize("name,hparams", [
    ("adamw_sn", {}),
    ("adamw_sn", {"betas": (0.0, 0.999)}),  # RMSPropSN: no first moment, the numerator is g
    ("adagrad_sn", {"momentum": 0.9}),
])
def test_subset_norm_foreach_equals_the_per_tensor_step(name, hparams, monkeypatch):
    """Subset-Norm's multi-tensor path: element-wise tensors by ``elementwise_foreach_``, the
    subset-normed ones (per row, per column, flat subsets) by ``subset_foreach_``, tensors larger
    than ``chunk_numel`` whole from their first piece; weight decay after the update, 4 steps.
    Bit for bit equal to ``foreach=False`` with the same chunks and to the one-tensor-at-a-time step
    (per-column sums of a large wide weight from chunk sums: to rtol 1e-6); bf16 stays off it."""
    from lowmem.optim import moments
    from lowmem.optim.functional import subset_norm as SN

    out = _foreach_vs_plain(name, SUBSET_NORM_GROUPS, {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-3, **hparams},
                            [(SN, "elementwise_foreach_"), (SN, "subset_foreach_"), (moments, "step_whole_from_piece_")],
                            monkeypatch)
    calls = out["foreach"][0]
    float32 = [(s, g) for g in SUBSET_NORM_GROUPS if "dtype" not in g for s in g["shapes"]]
    is_elementwise = lambda s, g: not g["subset_norm"] or (len(s) != 2 and "subset_size" not in g)  # noqa: E731
    elementwise = [s for s, g in float32 if is_elementwise(s, g)]
    subsets = [s for s, g in float32 if not is_elementwise(s, g)]
    small = lambda ss: sum(math.prod(s) for s in ss if math.prod(s) <= 64)  # noqa: E731
    assert sum(calls["elementwise_foreach_"]) == 4 * small(elementwise)
    assert sum(calls["subset_foreach_"]) == 4 * small(subsets)
    assert len(calls["step_whole_from_piece_"]) == 4 * sum(math.prod(s) > 64 for s in subsets)
    assert not any(out["chunked"][0].values()) and not any(out["whole"][0].values())
    _assert_same(out["foreach"], out["chunked"], exact=True)
    _assert_same(out["foreach"], out["whole"], exact=False)


@pytest.mark.parametrize("name,groups", [
    # GaLore (hf eps, decay after the update): the projected weight alone, the rest in buckets
    ("galore_adamw", [{"shapes": [(16, 12)], "rank": 4, "update_proj_gap": 2}, {"shapes": [(9, 6), (20, 8), (5,), (5,)]}]),
    ("fira_adamw", [{"shapes": [(16, 12)], "rank": 4, "update_proj_gap": 2}, {"shapes": [(9, 6), (20, 8), (5,)]}]),
])
def test_hf_eps_adamw_parameters_take_the_foreach_path(name, groups, monkeypatch):
    """``AdamMoments(eps_placement="hf")``'s multi-tensor path (decay after the update, as every
    recipe with that placement): the full-rank parameters of GaLore / Fira are bucketed (one larger
    than ``chunk_numel``: in pieces), the projected weight is not; equal to the per-tensor step at
    rtol 1e-6 with weight decay and an ``eps`` large enough for its placement to matter."""
    from lowmem.optim import functional as F

    out = _foreach_vs_plain(name, groups, {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-3}, [(F, "adamw_foreach_")],
                            monkeypatch)
    full_rank = sum(math.prod(s) for g in groups if "rank" not in g for s in g["shapes"])
    assert sum(out["foreach"][0]["adamw_foreach_"]) == 4 * full_rank
    assert out["chunked"][0]["adamw_foreach_"] == [] == out["whole"][0]["adamw_foreach_"]
    _assert_same(out["foreach"], out["whole"], exact=False)


def test_whole_tensor_statistics_of_sharded_groups_stay_off_the_foreach_path(tmp_path):
    """An FSDP2 (DTensor) parameter's local shard would give a whole-tensor block (Adam-mini) or a
    column norm (Subset-Norm) of its own rows only: groups holding one leave those layouts to the
    per-parameter step (which all-reduces them); rows, heads and elements are shard-local and stay
    on the multi-tensor path. (One process: the check is on the group, not on the numbers.)"""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lowmem.optim.registry import get_entry

    am, sn = get_entry("adam_mini").recipe.moment, get_entry("adamw_sn").recipe.moment
    plain = torch.nn.Parameter(torch.randn(8, 4))
    tall, wide = torch.Size((8, 4)), torch.Size((4, 8))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        shard = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), init_device_mesh("cpu", (1,)), [Shard(0)]))
        for params, sharded in (([plain], False), ([plain, shard], True)):
            assert am.supports_foreach_for(tall, {"block": "tensor", "params": params}, {}) is not sharded
            assert sn.supports_foreach_for(wide, {"subset_norm": True, "params": params}, {}) is not sharded
            assert am.supports_foreach_for(tall, {"block": "row", "params": params}, {})
            assert am.supports_foreach_for(tall, {"block": "head", "head_dim": 2, "params": params}, {})
            assert sn.supports_foreach_for(tall, {"subset_norm": True, "params": params}, {})
    finally:
        dist.destroy_process_group()
    assert am.supports_foreach_for(tall, {"block": "tensor", "params": [shard]}, {})  # no process group: not sharded
