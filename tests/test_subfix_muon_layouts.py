"""FOUND_AUDITOPT 2: Muon on a channels_last (or any non-contiguous) weight. ``functional.muon.matrices`` viewed a batch
``[..., A, B]`` as ``[-1, A, B]``, which raised for a channels_last conv weight in the multi-tensor buckets; and
``matrix_index`` copied the whole gradient for each of its matrices in the per-parameter step (beside what
``step_transient_bytes()`` reports: 9600 bytes traced for 5100 reported on an [8, 6, 5, 5] weight). Now both are views
in every layout: every path steps such a weight bit for bit as its contiguous twin, keeps its layout, and allocates
exactly what it reports."""

from __future__ import annotations

import pytest
import torch
from test_nonfinite_check_bytes import _AllLive
from torch import nn

import lowmem.optim.functional.muon as M
from lowmem.optim import create_optimizer


def _channels_last(w):
    return w.to(memory_format=torch.channels_last)


def _lead_permuted(w):  # [E1, E2, A, B] stored as [E2, E1, A, B]: leading dimensions not mergeable into one view
    return w.transpose(0, 1).contiguous().transpose(0, 1)


def _last_two_transposed(w):
    return w.transpose(-1, -2).contiguous().transpose(-1, -2)


LAYOUTS = [("channels_last", (8, 6, 5, 5), _channels_last), ("lead-permuted", (2, 3, 12, 20), _lead_permuted),
           ("transposed-3d", (3, 12, 20), _last_two_transposed), ("transposed-2d", (20, 12), _last_two_transposed)]
PATHS = [(True, "default"), (True, None), (False, "default"), (False, None), (False, 60)]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("foreach,chunk", PATHS, ids=[f"foreach={f}-chunk={c}" for f, c in PATHS])
@pytest.mark.parametrize("layout,shape,lay", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_a_non_contiguous_weight_steps_as_its_contiguous_twin_bit_for_bit(layout, shape, lay, foreach, chunk, nesterov):
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(shape, generator=gen) for _ in range(2)]
    odd = [nn.Parameter(lay(w.clone())) for w in ws]
    plain = [nn.Parameter(w.clone()) for w in ws]
    assert not any(p.is_contiguous() for p in odd)
    opts = [create_optimizer(ps, "muon", lr=0.02, nesterov=nesterov, foreach=foreach) for ps in (odd, plain)]
    if chunk != "default":
        for o in opts:
            o.chunk_numel = chunk
    for _ in range(3):
        for p, q in zip(odd, plain):
            q.grad = torch.randn(shape, generator=gen)
            p.grad = lay(q.grad.clone())
        for o in opts:
            o.step()
    for p, q in zip(odd, plain):
        assert torch.equal(p, q)
        assert p.stride() == lay(q.detach()).stride()  # stepped in place: the layout kept


@pytest.mark.parametrize("foreach,chunk", PATHS, ids=[f"foreach={f}-chunk={c}" for f, c in PATHS])
@pytest.mark.parametrize("nesterov", [True, False])
def test_a_channels_last_weights_step_allocates_what_it_reports(foreach, chunk, nesterov, monkeypatch):
    """Traced tensors == step_transient_bytes() with the bfloat16 products' workspace (not traced, a bound) set to 0."""
    monkeypatch.setattr(M, "bf16_gemm_workspace_bytes", lambda r, threads=1: 0)
    gen = torch.Generator().manual_seed(1)
    ps = [nn.Parameter(_channels_last(torch.randn(4, 3, 12, 20, generator=gen))) for _ in range(2)]
    opt = create_optimizer(ps, "muon", lr=0.02, nesterov=nesterov, foreach=foreach)
    if chunk != "default":
        opt.chunk_numel = chunk
    opt.skip_nonfinite = False
    for _ in range(2):
        for p in ps:
            p.grad = _channels_last(torch.randn(p.shape, generator=gen))
        with _AllLive() as t:
            opt.step()
    assert t.peak == opt.step_transient_bytes()


@pytest.mark.parametrize("layout,shape,lay", LAYOUTS[:3], ids=[x[0] for x in LAYOUTS[:3]])
def test_matrices_and_matrix_index_are_views_in_row_major_order(layout, shape, lay):
    x = lay(torch.randn(shape))
    ms = M.matrices(x)
    ref = list(x.contiguous().view(-1, *shape[-2:]).unbind(0))
    assert len(ms) == len(ref)
    for e, (m, r) in enumerate(zip(ms, ref)):
        assert m.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and torch.equal(m, r)
        v = M.matrix_index(x, e)
        assert v.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and torch.equal(v, r)
    for m in ms:
        m.add_(1.0)  # written through
    assert torch.equal(x, lay(torch.stack(ref).view(shape) + 1.0))


def test_nesterov_matrix_takes_the_buffers_layout_not_the_gradients():
    buf = torch.randn(12, 20)
    g = torch.randn(20, 12).T
    u = M.muon_momentum_(buf.clone(), g, 0.9, True)
    assert u.is_contiguous()
    b2 = buf.clone()
    assert torch.equal(u, torch.lerp(g.contiguous(), b2.lerp_(g.contiguous(), 0.1), 0.9))


@pytest.mark.parametrize("foreach,chunk", PATHS, ids=[f"foreach={f}-chunk={c}" for f, c in PATHS])
def test_a_channels_last_sinkgd_weights_step_allocates_what_it_reports(foreach, chunk):
    """SinkGD shares matrix_index: its whole step of a channels_last batch copied the whole gradient for each matrix
    (traced 92,160 bytes for 50,336 reported on two [4, 3, 24, 40] weights). Its values: bit for bit its contiguous
    twin's when stepped whole (``chunk_numel=None``, since 9978fb7), within 2.4e-7 with a chunk (the twin takes the
    chunked form): tests/test_muonfix_layouts.py. Since AUDMATH21 1 SinkGD refuses a tensor of 4 dimensions (a conv
    kernel: no reference reading), so the batch here is a non-contiguous 3-D one ([12, 12, 20] with its last two
    dimensions transposed in memory), and the channels_last kernel is refused."""
    gen = torch.Generator().manual_seed(2)
    with pytest.raises(ValueError, match=r"shape \[4, 3, 12, 20\] in a use_sinkgd group"):
        create_optimizer([nn.Parameter(_channels_last(torch.randn(4, 3, 12, 20)))], "sinkgd")
    ps = [nn.Parameter(_last_two_transposed(torch.randn(12, 12, 20, generator=gen))) for _ in range(2)]
    opt = create_optimizer(ps, "sinkgd", lr=1e-2, scale=0.5, sinkhorn_iters=3, foreach=foreach)
    if chunk != "default":
        opt.chunk_numel = chunk
    opt.skip_nonfinite = False
    for _ in range(2):
        for p in ps:
            p.grad = _last_two_transposed(torch.randn(p.shape, generator=gen))
        with _AllLive() as t:
            opt.step()
    assert t.peak == opt.step_transient_bytes()
