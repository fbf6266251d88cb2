"""CAME (Luo et al., ACL 2023) on the engine: parity with pytorch_optimizer's ``CAME`` (its per-tensor and
multi-tensor steps), the state layout (the authors' keys; vectors without the confidence), exact state and
step transients (traced), and the settings' checks. The plain loop from the paper is checked by
tests/test_reference.py (lowmem/optim/references/came.py)."""

import math

import pytest
import torch

from lowmem.optim import create_optimizer
from lowmem.optim.recipes.came import CAME
from test_transient_per_parameter import _traced_and_reported

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

SHAPES = ((24, 40), (40, 24), (40,), (3, 8, 10))
CONFIGS = [
    {},
    {"lr": 1e-2, "betas": (0.8, 0.95, 0.99), "weight_decay": 0.1, "clip_threshold": 0.05},
    {"lr": 3e-3, "eps": (1e-3, 1e-2), "clip_threshold": 100.0, "weight_decay": 0.01},
]


def _grads(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (0.5 + 0.5 * math.sin(t)) for t in range(1, steps + 1)]


def _peer(params, lr=2e-4, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip_threshold=1.0, weight_decay=0.0,
          foreach=False):
    return pytorch_optimizer.CAME(params, lr=lr, betas=betas, eps1=eps[0], eps2=eps[1], clip_threshold=clip_threshold,
                                  weight_decay=weight_decay, weight_decouple=True, fixed_decay=False, foreach=foreach)


def _run(make, steps=15):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    grads = [_grads(s, steps, 10 + i) for i, s in enumerate(SHAPES)]
    opt = make(params)
    for t in range(steps):
        for p, g in zip(params, grads):
            p.grad = g[t].clone()
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("peer_foreach", [False, True], ids=["peer_single", "peer_foreach"])
@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "rows"])
@pytest.mark.parametrize("config", CONFIGS, ids=["defaults", "clip_decay_betas", "eps"])
def test_equals_pytorch_optimizer(config, chunk, peer_foreach):
    """Matrices (each side), a vector and a batch of matrices, 15 steps: the same weights as
    pytorch_optimizer 4.1's CAME (per-tensor and multi-tensor) to float32 rounding, whole and in row blocks."""
    def ours(params):
        opt = create_optimizer(params, "came", **config)
        opt.chunk_numel = chunk
        return opt

    got, _ = _run(ours)
    want, _ = _run(lambda params: _peer(params, **config, foreach=peer_foreach))
    for shape, a, b in zip(SHAPES, got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, msg=lambda m: f"{shape}: {m}")


def test_state_layout_matches_the_authors_and_bytes_are_exact():
    """The authors' state keys and shapes (pytorch_optimizer's, without its unused ``RMS``): a matrix keeps the
    first moment and rows + columns of v and of the instability, a vector a full v and no instability; state_bytes
    is 4 B per element for the first moment plus 4 (n + m) twice per matrix, 8 B per vector element."""
    _, opt = _run(lambda params: CAME(params))
    _, peer = _run(lambda params: _peer(params))
    for p, q in zip(opt.param_groups[0]["params"], peer.param_groups[0]["params"]):
        ours = {k: tuple(v.shape) for k, v in opt.state[p].items() if k != "step"}
        theirs = {k: tuple(v.shape) for k, v in peer.state[q].items() if k != "RMS"}
        assert ours == theirs
        assert all(v.dtype == torch.float32 for v in opt.state[p].values() if v.is_floating_point())
    want = sum(4 * math.prod(s) + (8 * (math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1]) if len(s) >= 2 else 4 * s[0])
               for s in SHAPES)
    assert opt.state_bytes() == want + 4 * len(SHAPES) * opt.state[opt.param_groups[0]["params"][0]]["step"].numel()


def test_vector_step_has_no_confidence():
    """A vector steps by ``lr m`` (the authors' reference): after one step from zero state with d large (no
    clipping), ``m = (1 - b1) g / sqrt((1 - b2) (g^2 + eps1))``: the step is ``lr (1 - b1) / sqrt(1 - b2) sign(g)``."""
    p = torch.nn.Parameter(torch.zeros(16))
    g = torch.randn(16, generator=torch.Generator().manual_seed(3))
    opt = CAME([p], lr=1e-2, clip_threshold=1e6, betas=(0.9, 0.99, 0.999))
    p.grad = g
    opt.step()
    torch.testing.assert_close(p.detach(), -1e-2 * 0.1 / math.sqrt(0.01) * g.sign(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("chunk", ["default", 4096, 100, None], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(200, 128), (37, 53), (40,), (3, 8, 10)], ids=str)
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_step_allocates_what_it_reports(shape, dtype, chunk, state_dtype):
    """step_transient_bytes(per_parameter=True) equals the traced step (every new storage): a matrix whole and in
    row blocks (one block, several, 100 elements = rows of 128 one at a time), a vector and a batch of matrices
    (whole), float32 and bfloat16 weights and state."""
    traced, reported = _traced_and_reported("came", dtype, shape, chunk, state_dtype=state_dtype)
    assert traced == reported > 0


@pytest.mark.parametrize("bad", [{"betas": (0.9, 0.999)}, {"betas": (0.9, 0.999, 1.0)}, {"eps": 1e-30},
                                 {"clip_threshold": 0.0}, {"lr": -1.0}, {"weight_decay": -0.1}], ids=str)
def test_invalid_settings_name_the_field(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=f"Invalid {name}="):
        CAME([torch.nn.Parameter(torch.zeros(3))], **bad)


@pytest.mark.parametrize("shape", [(24, 40), (40,), (3, 8, 10)], ids=str)
def test_shard_path_with_one_shard_equals_the_plain_step(shape):
    """The FSDP2 code path (prepare_chunks / the whole step with ``reduce``) on one process, its all-reduces over no
    group (the identity): the weights of the plain step, 6 steps in row blocks of 200 elements. The reductions
    themselves are checked by tests/test_fsdp.py (two processes, float64, rtol 1e-6)."""
    from lowmem.optim.sharded import ShardReduce

    torch.manual_seed(0)
    p0, gs = torch.randn(shape), _grads(shape, 6, 4)
    out = []
    for sharded in (False, True):
        p = torch.nn.Parameter(p0.clone())
        opt = create_optimizer([p], "came", lr=1e-2, weight_decay=0.1, clip_threshold=0.5)
        opt.chunk_numel = 200
        for g in gs:
            if sharded:
                with torch.no_grad():
                    opt._update(p, g.clone(), opt.param_groups[0], key=p, reduce=ShardReduce([]))
            else:
                opt.step_param(p, g.clone())
        out.append(p.detach().clone())
    torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-7)


STACKED = [(24, 40)] * 3 + [(40,)] * 3 + [(3, 8, 10)] * 2 + [(128, 300), (5000,), (2, 50, 60)]


@pytest.mark.parametrize("chunk", [4096, None], ids=["pieces", "whole"])
def test_multi_tensor_step_equals_the_per_parameter_step(chunk):
    """The foreach buckets (same-shape tensors stacked: three matrices, three vectors, two batches; above
    chunk_numel=4096 a 128 x 300 matrix stepped from its first piece in row blocks, a vector and a batch whole)
    give the weights and every state tensor of foreach=False bit for bit, 10 steps with decay and clipping."""
    out = []
    for foreach in (None, False):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in STACKED]
        gen = torch.Generator().manual_seed(1)
        opt = create_optimizer(ps, "came", lr=1e-2, weight_decay=0.1, clip_threshold=0.5, foreach=foreach)
        opt.chunk_numel = chunk
        for _ in range(10):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        out.append([p.detach() for p in ps] + [v for p in ps for v in opt.state[p].values()])
    assert len(out[0]) == len(out[1]) and all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.parametrize("chunk", ["default", 4096, None], ids=str)
@pytest.mark.parametrize("shapes", [STACKED, [(40,)] * 4, [(64, 64)] * 5 + [(1024,)] * 3, [(600, 1000), (300, 128), (128,)]],
                         ids=["mixed", "vectors", "matrices_vectors", "pieces"])
def test_bucket_step_allocates_what_it_reports(shapes, chunk):
    """step() on the multi-tensor path allocates step_transient_bytes() (traced, every new storage): stacked
    groups of matrices, vectors and batches, a lone tensor of each kind, a matrix in pieces stepped by rows."""
    from test_transient_per_parameter import _Traced

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = create_optimizer(ps, "came", lr=1e-3, weight_decay=0.1)
    if chunk != "default":
        opt.chunk_numel = chunk
    for i in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape)
        if i < 2:
            opt.step()
    with _Traced() as t:
        opt.step()
    assert t.peak == opt.step_transient_bytes() > 0


def test_stacks_of_any_size_as_off_the_cpu(monkeypatch):
    """The grouping of every device but the CPU (``functional.adafactor.stacks_large``: every same-shape set of a
    bucket stacked, whatever its size), run on the CPU with ``STACK_LARGE_ON_CPU``: the weights of foreach=False
    (rtol 1e-6: a stack's reductions may add in another order) and step_transient_bytes() == the traced step."""
    from lowmem.optim.functional import adafactor as FA
    from test_transient_per_parameter import _Traced

    monkeypatch.setattr(FA, "STACK_LARGE_ON_CPU", True)
    shapes = [(200, 180)] * 3 + [(40000,)] * 2 + [(24, 40)]  # (36,000 and 40,000 elements: above STACK_NUMEL)
    out = []
    for foreach in (None, False):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        gen = torch.Generator().manual_seed(1)
        opt = create_optimizer(ps, "came", lr=1e-2, weight_decay=0.1, foreach=foreach)
        opt.chunk_numel = None
        for i in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            if foreach is None and i == 3:
                with _Traced() as t:
                    opt.step()
                assert t.peak == opt.step_transient_bytes() >= 8 * 3 * (200 * 180 + 380)
            else:
                opt.step()
        out.append([p.detach() for p in ps])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk", ["default", 100], ids=str)
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(200, 128), (37, 53), (128,), (3, 8, 10)], ids=str)
def test_shard_step_allocates_at_most_what_it_reports(shape, state_dtype, chunk):
    """The FSDP2 step of a shard (its all-reduces over no group: the same allocations, the sums' buffers
    included) against ``sharded_transient_bytes``: equal when the shard fits in one chunk (a matrix's shard
    takes the three row-block passes even then), never below with smaller chunks."""
    from lowmem.optim.sharded import ShardReduce
    from test_transient_per_parameter import _Traced

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = create_optimizer([p], "came", state_dtype=state_dtype)
    if chunk != "default":
        opt.chunk_numel = chunk
    group = opt.param_groups[0]
    with torch.no_grad():
        for i in range(3):
            g = torch.randn(shape)
            with _Traced() as t:
                opt._update(p, g, group, key=p, reduce=ShardReduce([]))
    reported = opt.recipe.moment.sharded_transient_bytes(p.shape, p.shape, 2, group, opt.state[p])
    if chunk == "default" or len(shape) != 2:
        assert t.peak == reported
    else:
        assert t.peak < reported
