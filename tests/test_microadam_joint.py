"""MicroAdam's multi-tensor step joins tensors of whole blocks of different sizes (issue 15, session 8).

A Llama layer's buckets hold several shapes (q/k/v/o, gate/up/down): stacked by layout (one size per
stack) each shape paid the whole compression and window sequence (about 50 kernels on the GPU's path).
``MicroAdamMoments.joint_key`` puts every tensor of whole top-k blocks and whole error-quantization blocks
with the same ``block`` / ``k_block`` into one row (``functional.microadam.joint_layout``): every block is
still one tensor's own, so the result is the per-parameter step's bit for bit (checked here against
``foreach=False``, the reference path, in several configurations), with one sequence per bucket.
"""

from __future__ import annotations

import pytest
import torch

from lowmem.optim.functional import microadam as MA
from lowmem.optim.registry import create_optimizer

# whole blocks of every config below (sizes 256 .. 6144) in three sizes and shapes, a size with whole top-k
# blocks but a partial quantization block at qbs 256 (384), one with a partial top-k block (1000), a vector
CONFIGS = {
    "small blocks": ([(16, 16), (32, 32), (32, 32), (48, 128), (2, 8, 16), (384,), (1000,), (64,)],
                     {"k_init": 0.05, "m": 4, "quant_block_size": 64, "topk_block_size": 128}),
    "wd, qbs over topk": ([(16, 16), (32, 32), (48, 128), (384,), (512,), (24, 64)],
                          {"k_init": 0.1, "m": 3, "quant_block_size": 256, "topk_block_size": 128,
                           "weight_decay": 0.1, "lr": 1e-2}),
    "large k, short ring": ([(64, 64), (32, 64), (32, 64), (16, 256), (100,)],
                            {"k_init": 0.2, "m": 2, "quant_block_size": 128, "topk_block_size": 256}),
}



def _recording(orig, calls):
    """``compress_rows_`` recording the shape of the stacked gradients (``g``: a tensor, or a function that
    makes it)."""
    def wrapped(g, *a):
        g = g() if callable(g) else g
        calls.append(tuple(g.shape))
        return orig(g, *a)
    return wrapped


def _run(shapes, hp, foreach, chunk_numel, steps=6, reload_at=3, compile="auto"):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = create_optimizer(ps, "microadam", foreach=foreach, **hp)
    if compile != "auto":
        from lowmem.optim.microadam import MicroAdamMoments

        opt.recipe = type(opt.recipe)(**{**opt.recipe.__dict__, "moment": MicroAdamMoments(compile=compile)})
    opt.chunk_numel = chunk_numel
    for i in range(steps):  # more steps than the ring's rows
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen) * (10.0 if i % 3 == 1 else 1.0)
        opt.step()
        if i == reload_at:  # (a checkpoint round trip in the middle)
            opt.load_state_dict(opt.state_dict())
    return ps, opt


@pytest.mark.parametrize("chunk_numel", [None, 4096])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_joint_rows_equal_the_per_parameter_step_bit_for_bit(config, chunk_numel, monkeypatch):
    shapes, hp = CONFIGS[config]
    ref, ref_opt = _run(shapes, hp, False, chunk_numel)
    calls = []
    orig = MA.compress_rows_
    monkeypatch.setattr(MA, "compress_rows_", _recording(orig, calls))
    got, got_opt = _run(shapes, hp, None, chunk_numel)
    qbs, blk = hp["quant_block_size"], hp["topk_block_size"]
    whole = [s for s in shapes if torch.Size(s).numel() % qbs == 0 and torch.Size(s).numel() % blk == 0
             and (chunk_numel is None or torch.Size(s).numel() <= chunk_numel)]
    assert len({torch.Size(s).numel() for s in whole}) >= 2  # (several sizes, joined)
    first = calls[: len(calls) // 6]
    joined = [d for n, d in first if n == 1 and d >= 2 * blk and d % qbs == 0 and d % blk == 0]
    assert sum(joined) == sum(torch.Size(s).numel() for s in whole), first
    assert len(joined) <= (1 if chunk_numel is None else 3), first  # (one row per bucket)
    for a, b in zip(ref, got):
        assert torch.equal(a, b), (config, tuple(a.shape), (a - b).abs().max().item())
        sa, sb = ref_opt.state[a], got_opt.state[b]
        assert set(sa) == set(sb)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (config, tuple(a.shape), k)


def test_joint_key_takes_only_whole_blocks():
    lay = MA.topk_layout
    key = __import__("lowmem.optim.microadam", fromlist=["MicroAdamMoments"]).MicroAdamMoments.joint_key
    assert key(lay(4096, 128, 0.05), 64) == key(lay(1024, 128, 0.05), 64) == ("blocks", 128, 7)
    assert key(lay(384, 128, 0.05), 256) == lay(384, 128, 0.05)  # a partial quantization block
    assert key(lay(1000, 128, 0.05), 8) == lay(1000, 128, 0.05)  # a partial top-k block
    assert key(lay(64, 128, 0.05), 64) == ("blocks", 64, 4)  # a tensor smaller than the block: its own size
    with pytest.raises(ValueError, match="multiples of the top-k block"):
        MA.joint_layout([256, 100], 128, 7)


def _meta_kernels(shapes, hp) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                return True if args[0].dtype is torch.bool else 1
            if func.overloadpacket.__name__ not in ("view", "_unsafe_view", "slice", "split", "split_with_sizes",
                                                    "unsqueeze", "select", "reshape", "alias", "detach", "empty",
                                                    "as_strided", "expand", "unflatten"):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    ps = [torch.nn.Parameter(torch.zeros(s, device="meta")) for s in shapes]
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = create_optimizer(ps, "microadam", **hp)
    for _ in range(2):
        with Count():
            opt.step()
    Count.n = 0
    with Count():
        opt.step()
    return Count.n


def test_a_bucket_of_three_shapes_launches_as_one_of_one_shape():
    """On the GPU's path (meta tensors) a bucket of a Llama layer's three matrix shapes dispatches what a
    bucket of one shape does, plus the per-tensor write-back and update (one multi-tensor op each): was
    about 50 kernels more per extra shape."""
    hp = {"k_init": 0.01, "m": 10}
    one = _meta_kernels([(256, 256)] * 4, hp)
    three = _meta_kernels([(256, 256)] * 4 + [(704, 256)] * 3 + [(256, 1024)], hp)
    assert three == one, (one, three)


def _ops(fn) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Record.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    fn()  # (the per-device tables made and kept first)
    Record.ops = []
    with Record():
        fn()
    return Record.ops


@pytest.mark.parametrize("rows", [1, 3])
def test_row_functions_make_no_index_copies(rows):
    """On the GPU's path (meta): the top-k's int64 indices are made global in place (one conversion, to the
    state's int16; was a second, int64 copy of them), and one row (joined tensors) adds no row starts to the
    window's indices (was an arange and an add of zeros)."""
    lay = MA.topk_layout(8192, 4096, 0.01)
    g = torch.zeros(rows, 8192, device="meta")
    err = torch.zeros(rows, 4096, dtype=torch.uint8, device="meta")
    lo = hi = torch.zeros(rows, 4, device="meta")
    ops = _ops(lambda: MA.compress_rows_(g, err, lo, hi, lay, 2048))
    assert ops.count("_to_copy") == 4, ops  # (levels' index, int16 indices, bf16 values, uint8 codes)
    idx = torch.zeros(rows, 10, lay.k, dtype=torch.int16, device="meta")
    vals = torch.zeros(rows, 10, lay.k, dtype=torch.bfloat16, device="meta")
    w = torch.zeros(10, device="meta")
    ops = _ops(lambda: MA.window_direction_rows(idx, vals, w, w, 1e-8, lay))
    assert ops.count("arange") == (1 if rows == 1 else 2), ops


def test_per_tensor_compress_makes_no_index_copies():
    """``compress_`` (a tensor or chunk of its own: the chunked step, the compiled path) likewise: the top-k's
    int64 indices are not concatenated when there is no partial block, and are made global in place."""
    lay = MA.topk_layout(8192, 4096, 0.01)
    g = torch.zeros(8192, device="meta")
    err = torch.zeros(4096, dtype=torch.uint8, device="meta")
    lo = hi = torch.zeros(4, device="meta")
    ops = _ops(lambda: MA.compress_(g, err, lo, hi, lay, 2048))
    assert ops.count("cat") == 0 and ops.count("_to_copy") == 4, ops


@pytest.mark.slow  # (compiling the row functions: 1-3 minutes cold on the loaded 2-core machine)
@pytest.mark.skipif(__import__("shutil").which("g++") is None and __import__("shutil").which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("config", ["small blocks", "wd, qbs over topk"])
def test_compiled_joint_rows_equal_the_per_parameter_step_without_recompiling(config, monkeypatch):
    """The compiled path (CUDA's default; ``compile="always"`` on CPU here) takes the same groups as the eager
    one (``joint_key``): one compiled compression and one compiled window call per group and step, weights and
    state equal to the plain per-parameter step bit for bit; a bucket whose joined row has other sizes
    reuses the compiled graphs (the layout's numbers are symbolic arguments)."""
    from torch._dynamo.utils import counters

    import lowmem.optim.microadam as M

    calls, real = [0, 0], M._compiled

    def counting(device_type):
        fns = real(device_type)

        def wrap(i):
            def call(*a):
                calls[i] += 1
                return fns[i](*a)
            return call
        return wrap(0), wrap(1)
    monkeypatch.setattr(M, "_compiled", counting)
    shapes, hp = CONFIGS[config]
    ref, ref_opt = _run(shapes, hp, False, None)
    got, got_opt = _run(shapes, hp, None, None, compile="always")
    groups = {M.MicroAdamMoments.joint_key(MA.topk_layout(torch.Size(s).numel(), hp["topk_block_size"], hp["k_init"]),
                                           hp["quant_block_size"]) for s in shapes}
    assert calls == [6 * len(groups)] * 2, (calls, groups)
    for a, b in zip(ref, got):
        assert torch.equal(a, b), (config, tuple(a.shape), (a - b).abs().max().item())
        for k in ref_opt.state[a]:
            assert torch.equal(ref_opt.state[a][k], got_opt.state[b][k]), (config, tuple(a.shape), k)
    graphs = counters["stats"]["unique_graphs"]
    wider = [(s[0], 2 * s[1]) if len(s) == 2 else s for s in shapes]  # (the joined row: other sizes)
    ref, _ = _run(wider, hp, False, None, steps=2, reload_at=-1)
    got, _ = _run(wider, hp, None, None, steps=2, reload_at=-1, compile="always")
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert counters["stats"]["unique_graphs"] == graphs  # (no recompilation)


def test_a_groups_error_feedback_is_joined_by_one_cat():
    """The eager path on the GPU's code path (meta tensors): a group of several tensors joins its error feedback's
    codes, minima and maxima by one ``torch.cat`` of their bytes (``Q.joint_codes``; was one each), beside one for
    the gradients and one each for the ring's indices and values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Cats(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                return True if args[0].dtype is torch.bool else 1
            Cats.n += func.overloadpacket.__name__ == "cat"
            return func(*args, **(kwargs or {}))

    ps = [torch.nn.Parameter(torch.zeros(256, 256, device="meta")) for _ in range(4)]
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = create_optimizer(ps, "microadam", k_init=0.01, m=10)
    for _ in range(2):
        with Cats():
            opt.step()
    Cats.n = 0
    with Cats():
        opt.step()
    assert Cats.n == 4
