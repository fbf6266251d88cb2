"""Issue 12: FRUGAL's coordinate projections combined back in several row blocks (BOUNDS, session 13).

``rows`` and ``randk`` selections scatter each block's share of the chosen coordinates
(:func:`lowmem.optim.functional.frugal.scatter_rows`): how many fall in a block is the selection's, so the step's
report is the exact maximum over selections (:meth:`lowmem.optim.subspace.SubspaceProjection.up_rows_bytes`), the
traced peak of a step whose selection puts as many as a block holds in one block. Traced (every new storage a
dispatched operation returns): the scatter of every block of random selections == ``scatter_rows_bytes`` of its count,
and the step with the most clustered selection == ``step_transient_bytes`` (steady, the per-parameter step), a step
with a random one at most that ((200, 128) at rank 16, chunk 4096: 74,752 B traced for 112,768)."""

import warnings

import pytest
import torch

import lowmem.optim.functional.frugal as FR
from lowmem.optim import create_optimizer
from lowmem.optim.subspace import projected_alone_bytes
from test_transient_per_parameter import _Traced


@pytest.mark.parametrize("dim", [0, None, 1], ids=["rows", "randk", "columns"])
@pytest.mark.parametrize("shape,k,rows", [((200, 128), 16, 32), ((200, 128), 3200, 32), ((50, 7), 30, 9),
                                          ((37, 64), 5, 37)])
def test_scatter_rows_bytes_is_what_scatter_rows_allocates(dim, shape, k, rows):
    """Every block of several random selections (and the most clustered one): traced == scatter_rows_bytes of the
    block's count."""
    m, n = shape
    size = m * n if dim is None else shape[dim]
    k = min(k, size)
    gen = torch.Generator().manual_seed(0)
    selections = [FR.random_indices(size, k, gen) for _ in range(3)] + [torch.arange(k)]
    for index in selections:
        low = torch.randn(k) if dim is None else torch.randn((k, n) if dim == 0 else (m, k))
        for a in range(0, m, rows):
            b = min(a + rows, m)
            scale = n if dim is None else 1
            count = int(((index >= a * scale) & (index < b * scale)).sum()) if dim != 1 else k
            with _Traced() as t:
                FR.scatter_rows(low, dim, index, torch.Size(shape), a, b)
            assert t.peak == FR.scatter_rows_bytes(k, count, b - a, n, dim), (a, count)


CASES = [("randk", 16), ("randk", 2), ("rows", 16), ("rows", 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("projection,rank", CASES)
def test_the_most_clustered_selection_allocates_the_report(projection, rank, dtype):
    """A (200, 128) weight at chunk 4096 (7 row blocks): a steady step with the selection a refresh drew <= the
    steady report; with the first coordinates selected (a block holds as many as it can) == the report."""
    shape = (200, 128)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer([p], "frugal", rank=rank, update_proj_gap=1000, projection=projection)
        opt.chunk_numel = 4096
        opt.materialize_state()
        mp = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"))
        meta = create_optimizer([mp], "frugal", rank=rank, update_proj_gap=1000, projection=projection)
        meta.chunk_numel = 4096
        meta.materialize_state()
    steady = projected_alone_bytes(meta, mp, meta.param_groups[0], meta.state[mp], steady=True)
    gen = torch.Generator().manual_seed(1)
    gs = [torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]
    opt.step_param(p, gs[0])  # (the refresh: a random selection)
    with _Traced() as t:
        opt.step_param(p, gs[1])
    assert 0 < t.peak <= steady
    index = opt.state[p]["proj_index"]
    index.copy_(torch.arange(index.numel()))
    with _Traced() as t:
        opt.step_param(p, gs[2])
    assert t.peak == steady
