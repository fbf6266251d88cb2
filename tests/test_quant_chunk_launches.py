"""Kernels of the quantized moments' chunked step on the GPU's code path (issue 15, session 8).

A tensor larger than the chunk (a Llama's embedding and output head) is stepped chunk by chunk, each chunk
decoded, updated and encoded on its own (issue 12's bound). Per chunk the two moments' new codes and scales
are written back by one ``torch._foreach_copy_`` (8-bit: bitsandbytes' quantizer returns new tensors), and a
4-bit code's byte is packed from the search's int32 indices straight into ``uint8`` (no conversion first).
Both are checked on meta tensors (the non-CPU path; ``_Ops`` records each aten op dispatched) and for
the same bits on the CPU with the device's forms forced.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lowmem
from lowmem.optim.functional import quant as Q


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return True if args[0].dtype is torch.bool else 1  # (the non-finite check's read: finite)
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _meta_chunk_ops(name: str, shape=(64, 1024), chunk: int = 16384) -> list[str]:
    """The ops of the third step of one meta parameter stepped in chunks of ``chunk`` elements."""
    p = torch.nn.Parameter(torch.zeros(shape, device="meta"))
    p.grad = torch.zeros_like(p)
    opt = lowmem.create_optimizer([p], name, lr=1e-3, min_quant_size=16)
    opt.chunk_numel = chunk
    for _ in range(2):
        with _Ops():
            opt.step()
    with _Ops() as ops:
        opt.step()
    return ops.ops


@pytest.mark.parametrize("name,per_chunk", [("adamw8bit", 1), ("adamw4bit", 0)])
def test_chunk_writes_both_moments_back_in_one_copy(name, per_chunk):
    """8-bit: one multi-tensor copy per chunk for both moments' codes and absmax (was one per moment); 4-bit:
    none (written in place)."""
    ops = _meta_chunk_ops(name)
    chunks = 64 * 1024 // 16384
    assert ops.count("_foreach_copy_") == per_chunk * chunks, ops
    assert ops.count("copy_") == 0


def test_4bit_chunk_packs_without_conversion():
    """4-bit on the device's path: per chunk and moment the search's int32 indices are packed by one add into
    the state's ``uint8`` codes; the only conversion left is the decode's ``uint8 -> int32`` index."""
    ops = _meta_chunk_ops("adamw4bit")
    chunks = 64 * 1024 // 16384
    assert ops.count("searchsorted") == 2 * chunks
    assert ops.count("_to_copy") == 2 * chunks, ops  # (the two decodes' index conversions only; was 4 per chunk)


@pytest.mark.parametrize("n", [2, 16, 4096, 12288])
def test_pack_from_int32_equals_the_uint8_form(n, monkeypatch):
    """The device form (int32 codes added into ``uint8``) gives the bytes of the CPU form, every code pair
    included, into ``out`` and into a new tensor."""
    g = torch.Generator().manual_seed(n)
    idx = torch.randint(0, 16, (n,), generator=g, dtype=torch.int32)
    cpu = Q.pack_4bit(idx)
    cpu_out = torch.empty(n // 2, dtype=torch.uint8)
    Q.pack_4bit(idx, cpu_out)
    monkeypatch.setattr(Q, "launch_bound", lambda device: True)
    dev = Q.pack_4bit(idx)
    out = torch.full((n // 2,), 7, dtype=torch.uint8)
    res = Q.pack_4bit(idx, out)
    assert dev.dtype == torch.uint8 and res is out
    assert torch.equal(dev, cpu) and torch.equal(out, cpu) and torch.equal(cpu_out, cpu)
    assert torch.equal(Q.unpack_4bit(dev, n), idx)


def test_pack_every_pair_from_int32(monkeypatch):
    """All 256 code pairs, device form against the byte ``16 hi + lo``."""
    pairs = torch.cartesian_prod(torch.arange(16), torch.arange(16)).int()
    monkeypatch.setattr(Q, "launch_bound", lambda device: True)
    packed = Q.pack_4bit(pairs.reshape(-1))
    assert torch.equal(packed, (16 * pairs[:, 0] + pairs[:, 1]).to(torch.uint8))


def _run(name: str, chunk, foreach, steps: int = 4):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(96, 512), (64, 256), (300, 7), (4096,)]]
    opt = lowmem.create_optimizer(ps, name, lr=1e-2, weight_decay=0.1, min_quant_size=16, foreach=foreach)
    opt.chunk_numel = chunk
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in ps] + [v.clone() for p in ps for _, v in sorted(opt.state[p].items())
                                              if torch.is_tensor(v)]


@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit", "adamw4bit_rank1"])
@pytest.mark.parametrize("chunk,foreach", [(None, False), (8192, False), (8192, None), (4096, None)])
def test_chunked_steps_with_the_devices_forms_equal_the_whole_tensor_step(name, chunk, foreach, monkeypatch):
    """The chunked and the whole-tensor steps with the device's forms forced on the CPU (the int32 pack,
    the joint write-back) give the parameters and the state of the plain whole-tensor step, bit for bit."""
    ref = _run(name, None, False)
    monkeypatch.setattr(Q, "launch_bound", lambda device: True)
    got = _run(name, chunk, foreach)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b), (name, chunk, foreach, a.shape)
