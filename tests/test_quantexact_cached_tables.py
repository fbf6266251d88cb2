"""The quantized codecs' process-wide tables (issue 12): made at the first step that codes a moment and kept for the
process (``lru_cache``: the code maps, the 8-bit CPU quantizer's 64 KiB point tables, the 4-bit lookup pairs, cell
table or midpoints), neither state nor a later step's allocation. ``Quantized.cached_bytes`` reports them
(:func:`lowmem.optim.functional.quant.kept_table_bytes`); here they are measured: every storage the first step
allocates (``torch.tensor``'s data included) that is still alive after it, less the state. Before, they were counted
nowhere: GPT-NeoX (h=128, 2 layers) layerwise adamw8bit fp32 estimate/measured 0.989, 133,148 B under."""

import gc

import bitsandbytes.functional  # noqa: F401  (its import keeps 128 B of tensors: before any traced step)
import pytest
import torch

from lowmem.optim import bnb_fused, create_optimizer
from lowmem.optim.functional import quant as Q
from test_transient_per_parameter import _Traced


@pytest.fixture(autouse=True)
def _tables_made_again():
    """These tests clear the process's tables; afterwards the CPU's are made again, so that a later test in this
    process finds them as a process that stepped a quantized optimizer before does."""
    yield
    for name in ("dynamic8_signed", "dynamic8_unsigned"):
        Q._point_table(name)
    for name in ("dynamic8_signed", "dynamic8_unsigned", "dynamic4_signed", "linear4_nozero"):
        Q.code_map(name, "cpu")
    for name in ("dynamic4_signed", "linear4_nozero"):
        Q.lookup_pairs(name, "cpu")
    Q._cell_table("dynamic4_signed", "cpu")
    bnb_fused.code_maps("cpu")


class _WithFresh(_Traced):
    """:class:`_Traced`, with the storages ``torch.tensor`` fills (``lift_fresh``: its input is the new tensor
    itself) counted as new too (bitsandbytes' dynamic maps are made so)."""

    _FRESH = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in self._FRESH:
            return super().__torch_dispatch__(func, types, args, kwargs)
        out = func(*args, **(kwargs or {}))
        ptr = out.untyped_storage().data_ptr()
        if ptr not in self.seen:
            nbytes = out.untyped_storage().nbytes()
            self.seen.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            import weakref

            weakref.finalize(out, self._drop, nbytes, ptr)
        return out


def _left_after_steps(name, shape=(200, 128), steps=1, **kw):
    """Bytes the first ``steps`` steps leave alive beyond the state, from a process state without tables."""
    Q.clear_kept_tables()
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = create_optimizer([p], name, **kw)
    with _WithFresh() as t:
        for _ in range(steps):
            p.grad = torch.randn(shape)
            opt.step()
        p.grad = None
        gc.collect()
        left = t.live
    return left - opt.state_bytes(), opt.recipe.moment.cached_bytes([opt.state[p]], p.device)


@pytest.mark.parametrize("name,expected", [("adamw8bit", 2 * (65536 + 1024)), ("adamw4bit", 8384),
                                           ("adamw4bit_rank1", 8384)])
def test_cached_bytes_are_the_tables_the_first_step_leaves(name, expected):
    """CPU: 8-bit, per map the point table (65,536 B) and the map (256 float32); 4-bit, the two maps (16 float32
    each), their lookup pairs (2 x 2,048) and dynamic4_signed's cell table (1,024 int32, 16 float32)."""
    left, reported = _left_after_steps(name)
    assert left == reported == expected


def test_a_later_step_keeps_nothing_more_and_small_tensors_make_no_table():
    left, reported = _left_after_steps("adamw8bit", steps=3)
    assert left == reported == 2 * (65536 + 1024)
    left, reported = _left_after_steps("adamw8bit", min_quant_size=10**6)  # (float32 moments: nothing coded)
    assert left == reported == 0


@pytest.mark.parametrize("name", ["adamw4bit", "adamw4bit_rank1"])
def test_cached_bytes_with_the_device_forms(monkeypatch, name):
    """Off the CPU (forced here, Q.launch_bound) the 4-bit encode searches the midpoints (15 float32 per map, kept
    per device) instead of the cell table."""
    monkeypatch.setattr(Q, "launch_bound", lambda device: True)
    left, reported = _left_after_steps(name)
    assert left == reported == 2 * (64 + 2048 + 60)


def test_kept_table_bytes_names_the_valid_maps():
    with pytest.raises(ValueError, match="unknown code map 'nf4'.*dynamic8_signed"):
        Q.kept_table_bytes(["nf4"], "cpu")
    # a meta device (the estimator's, the device unknown): the forms off the CPU, as the step's transient there
    assert Q.kept_table_bytes(["dynamic8_signed", "dynamic8_unsigned"], "meta") == 2 * 1024


def _storages_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors``."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_bytes_on_cuda():
    """CUDA: the maps copied to the device (bitsandbytes' kernels read them; no point table), measured with the
    allocator's requested bytes (the tensors' own sizes, no 512 B block rounding) across the first step, less the
    state's storages. The garbage of the tests before it is collected before the first reading and the gradient
    stays alive across the step: session 14's H200 run read -21,055,780 and -11,892,004 B here, an earlier test's
    cyclic garbage (the process's other CUDA tensors) freed by the gc.collect() between the two readings, and the
    gradient (102,400 B) freed after the step."""
    gc.collect()
    Q.clear_kept_tables()
    p = torch.nn.Parameter(torch.randn(200, 128, device="cuda"))
    opt = create_optimizer([p], "adamw8bit")
    p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    gc.collect()
    before = torch.cuda.memory_stats()["requested_bytes.all.current"]
    opt.step()
    torch.cuda.synchronize()
    gc.collect()
    after = torch.cuda.memory_stats()["requested_bytes.all.current"]
    state = [v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.device.type == "cuda"]
    left = after - before - _storages_bytes(state)
    assert left == 2 * 1024 == opt.recipe.moment.cached_bytes([opt.state[p]], p.device), (left, opt.state_bytes())


@pytest.mark.parametrize("name", ["dynamic8_signed", "dynamic8_unsigned"])
def test_point_table_is_made_in_pieces(name):
    """The first 8-bit CPU encode makes the point table beside the step's own temporaries: a piece of
    TABLE_BUILD_PIECE points at a time (float32 values, int32 codes) and the 255 midpoints, 17,404 B beyond the
    table and the map it keeps (was 787,452: all 65,536 points' values and int64 codes at once)."""
    Q.clear_kept_tables()
    with _WithFresh() as t:
        Q._point_table(name)
        gc.collect()
    assert t.live == Q.TABLE_POINTS + 4 * 256
    assert t.peak - t.live == 2 * 4 * Q.TABLE_BUILD_PIECE + 4 * 255
