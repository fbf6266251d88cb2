"""SM3-II (``sm3``, lowmem/optim/recipes/sm3.py): the engine against the plain loop of the paper's Algorithm 2
(references/sm3.py) and against pytorch_optimizer's ``SM3`` where the two define the same step, the cover layout
(one accumulator per slice of each dimension), the memory claim, the blocked step and its FSDP2 reduction, and the
refused settings."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.recipes.sm3 import SM3, Sm3Moments
from lowmem.optim.references.sm3 import sm3 as sm3_ref

SHAPES = [(24, 40), (40,), (3, 8, 10), ()]
CONFIGS = [
    {"lr": 1e-2},
    {"lr": 1e-2, "momentum": 0.9},
    {"lr": 3e-2, "momentum": 0.5, "weight_decay": 0.2},
    {"lr": 1e-2, "beta2": 0.95, "eps": 1e-4},
]


def _grads(shape, steps, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * (1 + t % 3)).to(dtype) for t in range(steps)]


def _run(shape, config, steps=8, chunk="default", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    start = p.detach().clone()
    opt = create_optimizer([p], "sm3", **config)
    if chunk != "default":
        opt.chunk_numel = chunk
    out = []
    for g in _grads(shape, steps, seed + 1, dtype):
        p.grad = g
        opt.step()
        out.append(p.detach().clone())
    return start, out, opt, p


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_engine_equals_the_paper_loop(shape, config):
    """2-D, 1-D, 3-D and 0-d tensors, momentum on / off, weight decay, the moving-average form: every step equals
    the loop over explicit cover sets, whole (``chunk_numel=None``) and in blocks of one leading index."""
    for chunk in (None, max(1, math.prod(shape[1:]))):
        start, got, opt, _ = _run(shape, config, chunk=chunk)
        group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        want = sm3_ref(start.clone(), _grads(shape, 8, 1), index=0, **group)
        for t, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"chunk {chunk} step {t + 1}: {m}")


def test_covers_are_one_accumulator_per_slice_of_each_dimension():
    """A (3, 8, 10) tensor keeps acc_0 (3,), acc_1 (8,), acc_2 (10,): each the maximum of nu over its slice, nu the
    minimum of the slices' accumulators plus g^2 (two steps, checked by hand)."""
    p = torch.nn.Parameter(torch.zeros(3, 8, 10))
    opt = SM3([p], lr=0.0)
    gs = _grads((3, 8, 10), 2, 5)
    mus = [torch.zeros(n) for n in (3, 8, 10)]
    for g in gs:
        p.grad = g
        opt.step()
        lower = torch.minimum(torch.minimum(mus[0].view(3, 1, 1), mus[1].view(1, 8, 1)), mus[2].view(1, 1, 10))
        nu = lower + g * g
        mus = [nu.amax(dim=(1, 2)), nu.amax(dim=(0, 2)), nu.amax(dim=(0, 1))]
    st = opt.state[p]
    assert sorted(k for k in st if k != "step") == ["acc_0", "acc_1", "acc_2"]
    for i in range(3):
        torch.testing.assert_close(st[f"acc_{i}"], mus[i], rtol=1e-6, atol=0)  # (addcmul's fused rounding)


def test_vectors_and_scalars_are_adagrad():
    """One cover per entry: a vector's and a 0-d tensor's accumulator is the running sum of g^2 (diagonal
    Adagrad), their step ``lr g / sqrt(sum g^2 + eps)``."""
    for shape in [(7,), ()]:
        p = torch.nn.Parameter(torch.ones(shape))
        opt = SM3([p], lr=0.1)
        total, want = torch.zeros(shape), torch.ones(shape)
        for g in _grads(shape, 4, 3):
            p.grad = g
            opt.step()
            total = total + g * g
            want = want - 0.1 * g / torch.sqrt(total + 1e-30)
        torch.testing.assert_close(opt.state[p]["acc"], total, rtol=1e-6, atol=0)
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_equals_pytorch_optimizer_sm3(momentum):
    """pytorch_optimizer 4.1's ``SM3`` (``beta=0``: sums, its default) steps like ``sm3`` (``beta2=1``) to float32
    rounding on a matrix, a vector, a 3-D tensor and a scalar, with and without momentum (its momentum is
    ``lerp`` of the preconditioned gradient, ours too); its accumulators are ours reshaped for broadcasting."""
    from pytorch_optimizer import SM3 as PoSM3

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = SM3(ours, lr=3e-2, momentum=momentum)
    b = PoSM3(theirs, lr=3e-2, momentum=momentum, beta=0.0, eps=1e-30)
    grads = [_grads(s, 10, 20 + i) for i, s in enumerate(SHAPES)]
    for t in range(10):
        for p, q, gs in zip(ours, theirs, grads):
            p.grad, q.grad = gs[t].clone(), gs[t].clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=1e-7)
        if p.dim() >= 2:
            for i in range(p.dim()):
                torch.testing.assert_close(a.state[p][f"acc_{i}"], b.state[q][f"accumulator_{i}"].reshape(-1),
                                           rtol=1e-6, atol=0)


def test_moving_average_form_differs_from_pytorch_optimizer_as_documented():
    """``beta2 < 1``: the authors' TF code (and this recipe) sets ``mu = max nu`` over each set; pytorch_optimizer's
    ``beta > 0`` keeps ``max(mu_old, max nu)``, so its accumulators never decrease. With a gradient that shrinks,
    theirs stay at the first step's maxima while ours decay (the matrix's row accumulators after 3 steps)."""
    from pytorch_optimizer import SM3 as PoSM3

    p = torch.nn.Parameter(torch.zeros(4, 6))
    q = torch.nn.Parameter(torch.zeros(4, 6))
    a, b = SM3([p], lr=1e-2, beta2=0.5), PoSM3([q], lr=1e-2, beta=0.5)
    g0 = _grads((4, 6), 1, 9)[0]
    for scale in (1.0, 0.1, 0.01):
        p.grad, q.grad = g0 * scale, g0 * scale
        a.step()
        b.step()
    first = (0.5 * g0 * g0).amax(dim=1)  # step 1: nu = 0.5 * 0 + 0.5 g^2
    torch.testing.assert_close(b.state[q]["accumulator_0"].view(-1), first)
    assert (a.state[p]["acc_0"] < 0.6 * first).all()  # ours: ~0.25 of step 1's after two halvings


def test_state_is_rows_plus_columns():
    """The memory claim: a 4096 x 11008 weight's state (no momentum) is 4 (4096 + 11008) bytes and the step count,
    O(m + n); AdamW's 8 m n. With momentum a full float32 momentum is added (4 m n). Counted on meta tensors."""
    w = torch.nn.Parameter(torch.empty(4096, 11008, device="meta"))
    v = torch.nn.Parameter(torch.empty(4096, device="meta"))
    for momentum, want in ((0.0, 4 * (4096 + 11008) + 4 * 4096), (0.9, 4 * (4096 + 11008) + 4 * 4096 * 11008 + 8 * 4096)):
        opt = SM3([w, v], momentum=momentum)
        opt.materialize_state()
        steps = sum(st["step"].numel() * st["step"].element_size() for st in opt.state.values())
        assert opt.state_bytes() - steps == want
    adam = create_optimizer([w], "adamw")
    adam.materialize_state()
    assert adam.state_bytes() > 1000 * (opt.state_bytes() - 4 * 4096 * 11008 - 8 * 4096)


def test_bf16_parameters_keep_float32_accumulators():
    """bfloat16 weights: float32 accumulators bit for bit those of a float32 run on the same (bf16-representable)
    gradients (they do not read the weights), the weights within bf16 rounding of the float32 run's."""
    _, got16, opt16, p16 = _run((24, 40), {"lr": 1e-2, "momentum": 0.9}, dtype=torch.bfloat16)
    torch.manual_seed(0)
    p32 = torch.nn.Parameter(torch.randn(24, 40).to(torch.bfloat16).float())
    opt32 = create_optimizer([p32], "sm3", lr=1e-2, momentum=0.9)
    for g in _grads((24, 40), 8, 1, torch.bfloat16):
        p32.grad = g.float()
        opt32.step()
    for k in ("acc_0", "acc_1"):
        assert opt16.state[p16][k].dtype == torch.float32
        assert torch.equal(opt16.state[p16][k], opt32.state[p32][k])
    torch.testing.assert_close(got16[-1].float(), p32.detach(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(24, 40), (3, 8, 10), (40,)], ids=str)
def test_blocked_step_equals_whole_bit_for_bit(shape):
    """Blocks of leading indices (the accumulators of the other dimensions kept aside, written after the last
    block) give the whole step's weights and state bit for bit, at several block sizes."""
    config = {"lr": 1e-2, "momentum": 0.9}
    _, whole, ow, pw = _run(shape, config, chunk=None)
    for chunk in (math.prod(shape[1:]), 3 * math.prod(shape[1:]), 7 * math.prod(shape[1:])):
        _, got, oc, pc = _run(shape, config, chunk=chunk)
        assert all(torch.equal(a, b) for a, b in zip(got, whole)), chunk
        assert all(torch.equal(oc.state[pc][k], ow.state[pw][k]) for k in ow.state[pw]), chunk


class _ThreadReduce:
    """:class:`~lowmem.optim.sharded.ShardReduce`'s ``max_`` across threads (one per shard), with a barrier (a shard
    that skips the collective breaks it after 10 s: the others raise, the test fails instead of hanging)."""

    def __init__(self, n):
        self.barrier, self.slots, self.n = threading.Barrier(n, timeout=10), {}, n
        self.calls = 0

    def bind(self, rank):
        outer = self

        class R:
            def max_(self, t):
                outer.slots[rank] = t.clone()
                outer.barrier.wait()
                t.copy_(torch.stack([outer.slots[r] for r in range(outer.n)]).amax(dim=0))
                outer.barrier.wait()
                outer.calls += rank == 0
                return t
        return R()


@pytest.mark.parametrize("chunk_rows", [None, 1], ids=["one-block", "row-blocks"])
def test_shards_of_rows_with_max_reduce_equal_the_whole_tensor(chunk_rows):
    """FSDP2's layout simulated by threads: a (5, 7) matrix's rows as shards [0:3], [3:5] and an empty one, each
    stepped by the rule's chunked step with ``reduce`` (an all-reduce max of the column accumulators); every shard's
    rows and column accumulators equal the unsharded step's, three steps."""
    # (beta2 < 1: the maxima decay, so a shard contributing stale column accumulators to the max would show)
    rule, group = Sm3Moments(), {"momentum": 0.5, "beta2": 0.5, "eps": 1e-30, "state_dtype": "float32"}
    shape, cuts = torch.Size((5, 7)), [(0, 3), (3, 5), (5, 5)]
    grads = _grads(shape, 3, 4)

    def steps(g_rows, state, shard_shape, reduce):
        numel = shard_shape.numel()
        size = numel if chunk_rows is None else 7 * chunk_rows
        bounds = [(a, min(a + size, numel)) for a in range(0, numel, size)] if numel else []
        flat = g_rows.reshape(-1)
        ctx = rule.prepare_chunks(state, shard_shape, group, 1, 0.1, bounds, lambda a, b, v: flat[a:b], reduce=reduce)
        ds = [rule.direction(flat[a:b], rule.chunk_state(state, a, b, shard_shape, group, ctx), group, 1, 0.1)
              for a, b in bounds]
        rule.finish_chunks(state, ctx)
        return torch.cat(ds) if ds else torch.zeros(0)

    whole = {}
    rule.init_state(whole, shape, group, torch.empty(shape))
    want = [steps(g, whole, shape, None) for g in grads][-1]
    red = _ThreadReduce(len(cuts))
    states, got = [{} for _ in cuts], [None] * len(cuts)

    def run(rank):
        a, b = cuts[rank]
        sh = torch.Size((b - a, 7))
        rule.init_state(states[rank], sh, group, torch.empty(sh))
        for g in grads:
            got[rank] = steps(g[a:b], states[rank], sh, red.bind(rank))

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(len(cuts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert red.calls == 3 and all(x is not None for x in got)  # one all-reduce per step, every shard stepped
    torch.testing.assert_close(torch.cat(got), want.view(-1), rtol=0, atol=0)
    for (a, b), st in zip(cuts, states):
        assert torch.equal(st["acc_0"], whole["acc_0"][a:b])
        assert torch.equal(st["acc_1"], whole["acc_1"])


@pytest.mark.parametrize("key,value,valid", [
    ("eps", 0.0, "a finite float > 0"), ("momentum", 1.0, "0 <= momentum < 1"), ("beta2", 1.5, "0 <= beta2 <= 1"),
    ("beta2", True, "0 <= beta2 <= 1"),
])
def test_invalid_settings_are_refused(key, value, valid):
    p = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=f"Invalid {key}={value!r} in optimizer 'sm3': expected .*{valid}"):
        create_optimizer([p], "sm3", **{key: value})


def test_momentum_switched_on_after_the_first_step_is_refused():
    """``momentum`` 0 keeps no momentum state: switching it on in ``param_groups`` changes the state's layout and is
    refused at the next step (lowmem.optim.group_layout), naming the setting; 0.9 -> 0.5 is the same layout."""
    p = torch.nn.Parameter(torch.zeros(3, 3))
    opt = create_optimizer([p], "sm3")
    p.grad = torch.ones(3, 3)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    with pytest.raises(ValueError, match="momentum"):
        opt.step()
    q = torch.nn.Parameter(torch.zeros(3, 3))
    opt = create_optimizer([q], "sm3", momentum=0.9)
    q.grad = torch.ones(3, 3)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.5
    opt.step()
    assert "momentum" in opt.state[q]


# ---- the multi-tensor step ---------------------------------------------------------------------------------------

BUCKET = [(16, 24)] * 4 + [(24,)] * 3 + [(3, 8, 10)] * 2 + [(), (40, 300)]


STACKS = [(16, 24)] * 8 + [(24,)] * 3 + [(3, 8, 10)] * 2 + [()]  # (a stack of 8 matrices is the largest phase)


def _bucket_run(foreach, momentum, steps=6, chunk=4096, shapes=BUCKET):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = create_optimizer(ps, "sm3", lr=1e-2, momentum=momentum, weight_decay=0.1, foreach=foreach)
    opt.chunk_numel = chunk
    grads = [_grads(s, steps, 30 + i) for i, s in enumerate(shapes)]
    for t in range(steps):
        for p, gs in zip(ps, grads):
            p.grad = gs[t]
        opt.step()
    return ps, opt


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_foreach_buckets_equal_the_per_parameter_step_bit_for_bit(monkeypatch, momentum):
    """float32 tensors in multi-tensor buckets (same-shape matrices, vectors, 3-D tensors stacked; a scalar; a
    40 x 300 matrix above chunk_numel stepped from its first piece in row blocks) reach the per-parameter step's
    weights and state bit for bit over 6 steps; the buckets really run (their stacks are counted)."""
    calls = []
    orig = Sm3Moments._group_direction
    monkeypatch.setattr(Sm3Moments, "_group_direction",
                        staticmethod(lambda g, s, grp: calls.append(len(g)) or orig(g, s, grp)))
    ps, opt = _bucket_run(None, momentum)
    assert max(calls) >= 4  # (the four 16 x 24 matrices stacked)
    calls.clear()
    qs, ref = _bucket_run(False, momentum)
    assert not calls
    for p, q in zip(ps, qs):
        assert torch.equal(p, q), p.shape
        assert all(torch.equal(opt.state[p][k], ref.state[q][k]) for k in ref.state[q]), p.shape


@pytest.mark.parametrize("shapes", [STACKS, BUCKET], ids=["stacks", "with-pieces"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_foreach_step_allocates_what_it_reports(momentum, shapes):
    """step_transient_bytes() of the bucketed step equals the traced step (every new storage a dispatched operation
    returns): a stack of eight matrices the largest phase (its stacked gradients, nu and accumulators), or the
    40 x 300 matrix stepped in row blocks from its first piece."""
    from test_transient_per_parameter import _Traced

    ps, opt = _bucket_run(None, momentum, steps=2, shapes=shapes)
    for i, p in enumerate(ps):
        p.grad = _grads(shapes[i], 1, 90 + i)[0]
    with _Traced() as t:
        opt.step()
    assert t.peak == opt.step_transient_bytes() > 0


def test_per_parameter_step_allocates_what_it_reports():
    """step_transient_bytes(per_parameter=True) equals the traced step of one parameter (layerwise mode's): a matrix
    whole and in blocks (the kept maxima), a 3-D tensor, a vector, a scalar and empty tensors, float32 / bfloat16 /
    float64 weights (a float64 one's gradient cast to float32 once), with and without momentum, float32 and bfloat16
    state (the momentum's float32 copy)."""
    from test_transient_per_parameter import _traced_and_reported

    off = []
    for shape in [(64, 24), (3, 8, 10), (40,), (), (0, 4), (5, 0, 3)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for chunk in (1000, None):
                for kw in ({}, {"momentum": 0.9}, {"state_dtype": "bfloat16", "momentum": 0.9}):
                    traced, reported = _traced_and_reported("sm3", dtype, shape, chunk, **kw)
                    if traced != reported:
                        off.append((shape, dtype, chunk, kw, traced, reported))
    assert not off
