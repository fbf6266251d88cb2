"""Low-rank gradient projections: GaLore (Zhao et al. 2024), randomized SVD (Halko, Martinsson &
Tropp 2011), random projections (APOLLO, Zhu et al. 2024; GrassWalk / GrassJump, Robert et al. 2024)
and the basis transition used to carry moments across a refresh.

A basis is a pair ``(left, right)``: ``left`` is ``m x r`` (or ``None``) and ``right`` is ``r x n``
(or ``None``). A gradient ``G`` (``m x n``) is projected to ``left^T G right^T`` and a low-rank
direction ``R`` is mapped back to ``left R right`` (GaLore, Algorithm 2, lines 6 and 10).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import platform

import torch
from torch import Tensor


def galore_side(shape: tuple[int, int], proj_type: str) -> str:
    """Which side GaLore projects: ``"left"``, ``"right"`` or ``"full"`` (galore-torch's ``proj_type``).

    ``std`` projects the smaller side (``right`` when ``m >= n``) so the projected gradient is
    ``max(m, n) x r``; ``reverse_std`` the larger; ``left`` / ``right`` / ``full`` are explicit.
    """
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def low_rank_shape(shape: tuple[int, int], side: str, rank: int) -> tuple[int, ...]:
    m, n = shape
    return {"left": (rank, n), "right": (m, rank), "full": (rank, rank)}[side]


def basis_zeros(rows: int, cols: int, device: torch.device | str | None = None) -> Tensor:
    """A zero ``rows x cols`` float32 basis stored column by column (strides ``(1, rows)``: the
    ``cols x rows`` transpose is contiguous). Where a basis is used, as ``Q`` (``r x n``) in
    ``G Q^T`` / ``N Q`` and as ``P`` (``m x r``) in ``P^T G`` / ``P N``, the transposed operand of the
    project-down GEMM is then contiguous, which MKL's single-thread float32 GEMM multiplies faster
    than a transposed row-major one (min of 30 interleaved runs, rank 128: ``G Q^T`` of 2752 x 1024
    8.1 -> 5.7 ms, of 1024 x 1024 2.3 -> 1.8 ms; ``P^T G`` of 1024 x 2752 6.3 -> 5.7 ms; the
    combine-back's ``addmm_`` 7.3 -> 6.6 ms on 2752 x 1024) and to the same bits (the products are
    the same sums; checked on 8 shapes). The values, shape and bytes are those of a row-major basis;
    only the memory order differs (a checkpoint keeps it: ``torch.save`` stores strides)."""
    return torch.zeros(cols, rows, dtype=torch.float32, device=device).t()


def svd_basis(g: Tensor, rank: int, side: str) -> tuple[Tensor | None, Tensor | None]:
    """Top-``rank`` singular vectors of ``G`` (GaLore, Algorithm 2 line 5: ``U, S, V = SVD(G_t)``).

    ``left`` is ``U[:, :r]`` and ``right`` is ``V^T[:r]``; which are returned depends on ``side``.
    """
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    return (u[:, :rank] if side in ("left", "full") else None, vh[:rank] if side in ("right", "full") else None)


def project_down(g: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``R = P^T G`` / ``G Q^T`` / ``P^T G Q^T`` (GaLore, Algorithm 2 line 6)."""
    out = g if left is None else left.t() @ g
    return out if right is None else out @ right.t()


def project_down_batched(g: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """:func:`project_down` of every matrix of a batch ``g`` ``[..., m, n]`` with its own basis (``left``
    ``[..., m, r]``, ``right`` ``[..., r, n]``, one side): one batched product, ``R_e = P_e^T G_e`` / ``G_e Q_e^T``
    (fused MoE experts; the same bits as the per-matrix products on the CPU, tested)."""
    if (left is None) == (right is None):
        raise ValueError("project_down_batched takes a basis on one side")
    return torch.matmul(left.mT, g) if right is None else torch.matmul(g, right.mT)


def project_up(r: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``G~ = P N`` / ``N Q`` / ``P N Q`` (GaLore, Algorithm 2 line 10, before the scale ``alpha``)."""
    out = r if left is None else left @ r
    return out if right is None else out @ right


def project_down_rows(g: Tensor, left: Tensor | None, right: Tensor | None, bounds: list[tuple[int, int]]) -> Tensor:
    """:func:`project_down` of a low-precision ``g`` converted to float32 a block of rows at a time:
    ``P^T G = sum_b P_b^T G_b``, ``(G Q^T)_b = G_b Q^T`` (no full-size float32 copy of ``G``)."""
    rows = []
    total = None
    for a, b in bounds:
        block = g[a:b].float()
        part = block if right is None else block @ right.t()
        if left is None:
            rows.append(part)
        else:
            contrib = left[a:b].t() @ part
            total = contrib if total is None else total.add_(contrib)
    return torch.cat(rows) if left is None else total


def project_down_rows_bytes(cols: int, rank: int, left: bool, right: bool, bounds: list[tuple[int, int]]) -> int:
    """The peak bytes :func:`project_down_rows` allocates for a gradient of ``cols`` columns in the row blocks
    ``bounds`` (bases of ``rank`` columns or rows on the ``left`` and / or ``right`` side), the result
    included, as the loop runs: a block's float32 copy is made while the previous one (and on the left side
    the previous product ``P_b^T G_b``) is still referenced; the right side's ``G_b Q^T`` parts are kept for
    the final ``cat`` (beside the last block). Exact (traced: tests/test_galoreexact_per_parameter.py)."""
    live: dict[str, int] = {}  # the loop's variables' tensors, by name
    peak = parts = 0

    def alloc(nbytes: int) -> None:
        nonlocal peak
        peak = max(peak, sum(live.values()) + parts + nbytes)

    for i, (a, b) in enumerate(bounds):
        block = 4 * (b - a) * cols
        alloc(block)  # (the previous block is freed when the name is rebound)
        live["block"] = block
        if right:
            part = 4 * (b - a) * rank
            alloc(part)
            if left:
                live["part"] = part
            else:
                parts += part  # (kept in the list for the cat)
        if left:
            contrib = 4 * rank * (rank if right else cols)
            alloc(contrib)
            live["total" if i == 0 else "contrib"] = contrib  # (the first product is the running total)
    if not left:
        alloc(parts)  # torch.cat beside the parts and the last block
    return peak


def project_up_rows(r: Tensor, left: Tensor | None, right: Tensor | None, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of :func:`project_up`: ``P[a:b] N`` / ``N[a:b] Q`` / ``P[a:b] N Q``."""
    if left is not None:
        out = left[start:stop] @ r
    else:
        out = r[start:stop]
    return out if right is None else out @ right


def project_up_rows_add_(out: Tensor, r: Tensor, left: Tensor | None, right: Tensor | None, start: int, stop: int,
                         alpha: float) -> Tensor:
    """``out += alpha * (rows start:stop of project_up(r))`` as one GEMM (``addmm_``), in place on the
    float32 ``out`` (GaLore, Algorithm 2 lines 10-11: ``W <- W - lr alpha P N`` with no full-size
    direction). The products are associated as in :func:`project_up_rows`; the sum rounds once
    instead of after the product and again after each scaling, so it agrees with
    ``out - lr * (scale * project_up_rows(...))`` to float32 rounding, not bit for bit."""
    if left is not None and right is not None:
        return out.addmm_(left[start:stop] @ r, right, alpha=alpha)
    if left is not None:
        return out.addmm_(left[start:stop], r, alpha=alpha)
    return out.addmm_(r[start:stop], right, alpha=alpha)


def project_up_rows_add(g_rows: Tensor, r: Tensor, left: Tensor | None, right: Tensor | None, start: int, stop: int,
                        alpha: float) -> Tensor:
    """``g_rows + alpha * (rows start:stop of project_up(r))`` as one GEMM (``addmm``, a new tensor): Fira's
    residual ``G - alpha P P^T G`` of a block of rows (Chen et al. 2024, Algorithm 1), rounded once."""
    if left is not None and right is not None:
        return torch.addmm(g_rows, left[start:stop] @ r, right, alpha=alpha)
    if left is not None:
        return torch.addmm(g_rows, left[start:stop], r, alpha=alpha)
    return torch.addmm(g_rows, r[start:stop], right, alpha=alpha)


def project_up_add_stacked_(gs: Tensor, r: Tensor, lefts: Tensor | None, rights: Tensor | None, alpha: float) -> Tensor:
    """``G_i + alpha * project_up(r_i)`` of a stack of same-shape parameters (``gs`` ``[B, m, n]``, a copy of
    their gradients, overwritten; ``r`` ``[B, r, n]`` with ``lefts`` ``[B, m, r]``, or ``[B, m, r]`` with
    ``rights`` ``[B, r, n]``; one side) as one batched GEMM (``baddbmm_``): Fira's residuals
    ``G - alpha P P^T G`` (Chen et al. 2024, Algorithm 1) of several parameters in one kernel (issue 15),
    each rounded once as :func:`project_up_rows_add` of its whole rows (equal to float32 rounding: another
    GEMM kernel may sum in another order)."""
    if (lefts is None) == (rights is None):
        raise ValueError("project_up_add_stacked_: exactly one side's bases (lefts or rights), got "
                         f"{'both' if lefts is not None else 'neither'}")
    if lefts is not None:
        return gs.baddbmm_(lefts, r, alpha=alpha)
    return gs.baddbmm_(r, rights, alpha=alpha)


def range_finder(a: Tensor, rank: int, generator: torch.Generator, power_iters: int = 2, oversample: int = 4) -> Tensor:
    """Orthonormal ``m x rank`` basis of ``A``'s dominant column space, randomized.

    Halko, Martinsson & Tropp (2011), Algorithm 4.4 (randomized subspace iteration) followed by the
    small SVD of Algorithm 5.1 to order the basis by singular value. Costs ``O(mn(r+p))`` per
    power iteration instead of the full SVD's ``O(mn min(m, n))``. Each temporary is released as
    soon as it is used (the test matrix before the first QR): :func:`range_finder_bytes`.
    """
    k = min(rank + oversample, min(a.shape))
    omega = torch.randn(a.shape[1], k, generator=generator, device="cpu", dtype=torch.float32).to(a)
    y = a @ omega
    del omega
    q = torch.linalg.qr(y).Q
    del y
    for _ in range(power_iters):
        q = torch.linalg.qr(a @ (a.t() @ q)).Q
    return _rotate_to_singular(a, q, rank)


def subspace_iteration(a: Tensor, q: Tensor, iters: int = 1) -> Tensor:
    """Warm-started subspace iteration: ``Q <- orth(A A^T Q)``, ``iters`` times, then ordered by
    singular value (Halko et al. 2011, Algorithm 4.4 started from the previous basis). One
    iteration costs two ``m x n x r`` products; a slowly rotating subspace needs one or two."""
    rank = q.shape[1]
    for _ in range(iters):
        q = torch.linalg.qr(a @ (a.t() @ q)).Q
    return _rotate_to_singular(a, q, rank)


def _rotate_to_singular(a: Tensor, q: Tensor, rank: int) -> Tensor:
    u_small = torch.linalg.svd(q.t() @ a, full_matrices=False)[0]  # S and V^T freed here
    return q @ u_small[:, :rank]


def range_finder_bytes(rows: int, cols: int, rank: int, power_iters: int, oversample: int | None = 4,
                       first_call: bool = True) -> int:
    """Peak bytes (float32) that :func:`range_finder` (``oversample`` probes) or, with
    ``oversample=None``, :func:`subspace_iteration` (started from a kept basis) allocates for an
    ``A`` of ``rows x cols`` (``d x e``). With ``k = min(rank + p, d, e)`` columns (``k = rank``
    for the subspace iteration), ``dk = 4 d k`` and ``ek = 4 e k`` bytes, phase by phase:

    * the probes: ``Omega`` and ``Y = A Omega`` (``ek + dk``); ``Omega`` freed, ``qr(Y)``: ``Y``,
      ``Q`` and ``R`` (``2 dk + 4 k^2``; LAPACK's ``geqrf`` / ``orgqr`` workspace, ``k nb`` floats,
      is in the slack);
    * each power iteration ``Q <- qr(A (A^T Q)).Q``: the old ``Q``, ``A^T Q`` and ``A A^T Q``
      (``2 dk + ek``), then the old ``Q``, ``Y``, the new ``Q`` and ``R`` (``3 dk + 4 k^2``); the
      subspace iteration's first one starts from the kept basis (one ``dk`` less);
    * Algorithm 5.1's small SVD of ``B = Q^T A`` (``k x e``): ``Q``, ``B``, LAPACK's copy of ``B``,
      ``V^T`` (``k x e``), ``U`` and ``gesdd``'s ``k x k`` work arrays (``dk + 3 ek + 16 k^2``);
      then ``Q``, ``U`` and the result ``Q U[:, :rank]`` (``dk + 4 k^2 + 4 d rank``).

    ``first_call``: add one more ``k x e`` panel, the buffer MKL's ``gesdd`` keeps in its memory
    manager (allocated at the first SVD of a size in the process and never returned: measured one
    panel for most sizes, none for some, e.g. ``260 x 4096``, so this bounds it). Measured (fresh
    process, live bytes, the second call): ``4096 x 11008`` at rank 256, 38.4 MiB for 37.9 here;
    ``8192 x 8192`` at rank 64 / 256, 8.4 / 33.8 MiB for 8.6 / 33.5."""
    d, e = rows, cols
    if oversample is None:
        k, start = min(rank, d, e), 0
    else:
        k, start = min(rank + oversample, d, e), 1
    dk, ek, kk = 4 * d * k, 4 * e * k, 4 * k * k
    phases = [dk + 3 * ek + 4 * kk, dk + kk + 4 * d * min(rank, k)]
    if start:
        phases += [ek + dk, 2 * dk + kk]
    for i in range(power_iters):
        held = dk if (start or i > 0) else 0  # the current Q (the kept basis is not a transient)
        phases += [held + dk + ek, held + 2 * dk + kk]
    return max(phases) + ek * first_call


def range_finder_traced_bytes(rows: int, cols: int, rank: int, power_iters: int, oversample: int | None = 4) -> int:
    """The peak of the tensors :func:`range_finder` (``oversample=None``: :func:`subspace_iteration` from a kept
    basis) returns from its operations, alive together (what a trace of the dispatched operations sees: not
    LAPACK's copies and workspace, nor MKL's kept buffers, which :func:`range_finder_bytes` bounds from peak-RSS
    measurements): the probes ``Omega`` and ``Y``; ``qr``'s ``Q`` and ``R`` beside ``Y``; per iteration ``A^T Q``,
    ``A A^T Q``, then the new ``Q`` and ``R`` beside it and the old ``Q``; ``B = Q^T A`` beside its SVD's ``U``,
    ``S``, ``V^T``; the result ``Q U[:, :rank]`` beside ``Q`` and ``U``. Exact (traced)."""
    d, e = rows, cols
    k = min(rank, d, e) if oversample is None else min(rank + oversample, d, e)
    dk, ek, kk = 4 * d * k, 4 * e * k, 4 * k * k
    phases = []
    q = 0 if oversample is None else dk  # (the kept basis is not new)
    if oversample is not None:
        phases += [ek + dk, 2 * dk + kk]  # Omega and Y; Y, Q and R
    for _ in range(power_iters):
        phases += [q + ek + dk, q + 2 * dk + kk]  # A^T Q and A A^T Q; the old Q, Y, the new Q and R
        q = dk
    phases += [q + 2 * ek + kk + 4 * k, q + kk + 4 * d * min(rank, k)]  # B, U, S, V^T; Q, U and the result
    return max(phases)


# MKL's one-time cost at the first range finder of a size in a process, besides the SVD's kept panel:
# LAPACK / BLAS code paged in and the packing buffers of its first GEMMs and QR (measured, fresh
# process after a small warm-up: 2.2-3.3 MiB at k = 68 and 132 columns, 2.6-4.5 MiB at k = 260),
# with the run-to-run noise of MKL's pool (up to 1 MiB between two runs of the same refresh)
MKL_FIRST_CALL_BYTES = 4 * 2**20
MKL_FIRST_CALL_BYTES_PER_COLUMN = 4 * 2**10


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The running CPU's vendor string (``/proc/cpuinfo``'s ``vendor_id``, else
    :func:`platform.processor`), read once: MKL picks its GEMM kernels, and so the packing buffers it
    keeps, by the CPU it runs on (:func:`gemm_pack_bytes`, :func:`down_pack_bytes`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: the device type of the step whose BLAS / LAPACK terms are being sized (:func:`blas_device`)
_BLAS_DEVICE: contextvars.ContextVar[str] = contextvars.ContextVar("lowmem_blas_device", default="cpu")


@contextlib.contextmanager
def blas_device(device_type: str):
    """Within it, the BLAS / LAPACK terms of a step (MKL's kept buffers, its rsvd refresh bound, Muon's bfloat16 GEMM
    workspace) are sized for a step on ``device_type``: off the CPU no MKL runs the step, so
    :func:`mkl_generic_kernels` does not read the host CPU's vendor (it is ``False``: the vendor-free bounds,
    measured on an Intel Xeon, conservative for CUDA and not measured there). A CUDA optimizer's report, or an
    estimate for a CUDA target computed on an AMD host, is then the same as on an Intel host. ``"meta"`` (the
    device is not known) keeps the host's, as ``"cpu"``."""
    token = _BLAS_DEVICE.set(device_type)
    try:
        yield
    finally:
        _BLAS_DEVICE.reset(token)


def mkl_generic_kernels() -> bool:
    """Whether MKL runs its non-Intel code path here (an ``AuthenticAMD`` / ``HygonGenuine`` CPU),
    whose GEMM keeps other packing buffers than on an Intel CPU (measured: :func:`gemm_pack_bytes`).
    Keyed on the vendor string because that is what MKL itself dispatches on: the same build picks
    its kernels (and their panels) by it, whatever the instruction set (AVX-512 on both machines).
    ``False`` for a step sized for another device (:func:`blas_device`)."""
    return _BLAS_DEVICE.get() in ("cpu", "meta") and cpu_vendor() in ("AuthenticAMD", "HygonGenuine")


def gemm_pack_bytes(rank: int, cols: int) -> int:
    """The packing buffer MKL's float32 GEMM keeps for the process after the first product of a
    ``rank``-deep panel by ``cols`` columns (the combine-back's ``P[a:b] N`` / ``N[a:b] Q``, a block of
    rows times an ``r x n`` matrix). On an Intel CPU ``4 min(rank, 256) cols`` bytes + 0.7 MiB (MKL
    packs 256-deep slices; measured on a Xeon 8.7 MiB at rank 256 and 8192 columns, 4.7 at 4096); on
    an AMD CPU (MKL's other code path, :func:`mkl_generic_kernels`) 0.25 MiB whatever the size
    (measured on an EPYC, fresh process, ``MALLOC_MMAP_THRESHOLD_=65536``: 0.19 MiB at rank 64-512 and
    1024-11008 columns). Counted by :func:`rsvd_refresh_bytes`, and for every step of a projected
    parameter on the CPU (it is alive through every phase of every step after the first) by the
    engine's per-step total, once, with the project-down's :func:`down_pack_bytes`
    (``SubspaceProjection.kept_gemm_bytes``, ``LowMemOptimizer.step_transient_bytes``; docs/memory.md)."""
    if mkl_generic_kernels():
        return 2**18
    return 4 * min(rank, 256) * cols + 7 * 2**20 // 10


#: the project-down's kept packing buffer on an Intel CPU (:func:`down_pack_bytes`)
DOWN_PACK_BYTES_INTEL = 2**20
#: on an AMD CPU, bytes per column of ``G`` and the column count where it stops growing
DOWN_PACK_BYTES_PER_COLUMN_AMD = 768
DOWN_PACK_COLUMNS_AMD = 6656


def down_pack_bytes(cols: int) -> int:
    """The packing buffer MKL keeps after a basis's first project-down GEMM (``P^T G`` / ``G Q^T`` of a
    ``rows x cols`` ``G``). Intel CPU: 1 MiB (measured on a Xeon, fresh process: 1.4-1.6 MiB at rank
    64-256, of which a real step's earlier GEMMs already hold part). AMD CPU: ``768 min(cols, 6656)``
    bytes, MKL packing ``G`` in 192-deep slices of its columns up to a block of ~6.5k columns (measured
    on an EPYC, fresh process: 0.94 / 1.55-1.79 / 3.0-3.2 / 4.7-4.9 MiB at 1024 / 2048 / 4096 /
    8192-11008 columns, rank 32-512)."""
    if mkl_generic_kernels():
        return DOWN_PACK_BYTES_PER_COLUMN_AMD * min(cols, DOWN_PACK_COLUMNS_AMD)
    return DOWN_PACK_BYTES_INTEL


#: the largest rank whose project-down keeps no packing buffer on an AMD CPU (:func:`down_only_pack_bytes`)
SKINNY_DOWN_RANK = 3
#: what a right basis's project-down (``G Q^T``) keeps there at a larger rank
RIGHT_DOWN_PACK_BYTES_AMD = 2**18


def down_only_pack_bytes(rank: int, cols: int, side: str) -> int:
    """The packing buffers MKL keeps after a basis's project-down when no combine-back GEMM follows (APOLLO: its
    update scales ``G``; ``ApolloProjection.kept_gemm_bytes``), of a ``rows x cols`` ``G`` on the running CPU.

    AMD CPU (MKL's other code path, :func:`mkl_generic_kernels`), measured in a fresh process (APOLLO's steps,
    ``lowmem.optim.step_memory.measure_steps``, ``MALLOC_MMAP_THRESHOLD_=65536``, growth beyond the step's own
    tensors): nothing at rank 1-3 (a product of at most 3 columns: 0 B at 2048 x 2048 - 8192 x 8192, left and right
    bases, plain and refresh steps); a left basis (``P^T G``, ``G`` packed by its columns) :func:`down_pack_bytes`
    (``cols``) from rank 4 (2.9-3.0 MiB at 1024 x 4096 rank 128 for 3.0; 4.3-4.6 MiB at 2048 x 8192 rank 4-128
    for 4.9); a right basis (``G Q^T``) at most :data:`RIGHT_DOWN_PACK_BYTES_AMD` (plain steps -0.16 to +0.25 MiB
    at rank 64-512, 2048 x 2048 - 8192 x 8192; refresh steps up to 0.59 MiB at 4096 x 4096 rank 512, the Gaussian
    draw's 16 MiB freed before). Intel CPU: not measured for this product alone; the project-down's
    :data:`DOWN_PACK_BYTES_INTEL` at every rank and side (GaLore's first ``P^T G`` on a Xeon kept 1.4-1.6 MiB at
    rank 64-256), a bound."""
    if not mkl_generic_kernels():
        return DOWN_PACK_BYTES_INTEL
    if rank <= SKINNY_DOWN_RANK:
        return 0
    return down_pack_bytes(cols) if side in ("left", "full") else RIGHT_DOWN_PACK_BYTES_AMD


def kept_pack_bytes(rank: int, cols: int) -> int:
    """All the packing buffers MKL keeps after a basis's first project-down and combine-back on the
    running CPU: :func:`gemm_pack_bytes` + :func:`down_pack_bytes` (``SubspaceProjection.kept_gemm_bytes``)."""
    return gemm_pack_bytes(rank, cols) + down_pack_bytes(cols)


def rsvd_refresh_bytes(rows: int, cols: int, rank: int, power_iters: int, oversample: int = 4) -> int:
    """Peak bytes of the ``rsvd`` refreshes of a ``rows x cols`` ``A`` over a run, the larger of:

    * the first (:func:`range_finder`, its SVD's panel kept by MKL included);
    * a later one (:func:`subspace_iteration`, ``k = rank`` columns) next to that kept panel and one
      more buffer MKL keeps by then: the later SVD's own ``rank x cols`` panel or the packing buffer of
      the combine-back's ``addmm_`` (``4 min(rank, 256) cols`` bytes + 0.7 MiB), the larger (they share
      MKL's pool; measured: a new panel at ``8192 x 8192`` rank 128 and 256, none at rank 64 or for
      ``4096 x 11008``);

    plus MKL's first-call code and packing buffers (:data:`MKL_FIRST_CALL_BYTES` +
    :data:`MKL_FIRST_CALL_BYTES_PER_COLUMN` per column). MKL's pool reuses freed buffers unpredictably,
    so this is a bound: measured 0.97-1.2x of it on an Intel Xeon (``docs/memory.md``).

    On an AMD CPU (MKL's other code path, :func:`mkl_generic_kernels`) ``gesdd`` keeps no panel: after
    the first range finder MKL keeps 2.2-2.4 / 4.1 / 5.5-5.6 MiB at 2048 / 4096 / 8192-11008 columns of
    ``A`` whatever ``k`` (68-260) and the panel (0.5-10.9 MiB), a later refresh 0.12 MiB more (measured on
    an EPYC, fresh process): there the panels are left out, the later refresh sits next to the
    combine-back's buffer (:func:`gemm_pack_bytes`), and the first calls keep the project-down-like
    packing of ``A``'s columns (:func:`down_pack_bytes`) besides the first-call term above. Measured there
    (a whole refresh run, steps 1-3): 4096 x 11008 rank 256 44.0-44.4 MiB for 47.7 (63.9 by the Intel
    bound), 2048 x 2048 rank 64 (fira_adamw) 5.9 for 8.1."""
    k = min(rank + oversample, rows, cols)
    if mkl_generic_kernels():
        first = range_finder_bytes(rows, cols, rank, power_iters, oversample, first_call=False)
        later = range_finder_bytes(rows, cols, rank, power_iters, None, first_call=False) + gemm_pack_bytes(rank, cols)
        return (max(first, later) + MKL_FIRST_CALL_BYTES + MKL_FIRST_CALL_BYTES_PER_COLUMN * k
                + down_pack_bytes(cols))
    first = range_finder_bytes(rows, cols, rank, power_iters, oversample, first_call=True)
    gemm_pack = gemm_pack_bytes(rank, cols)
    later = (range_finder_bytes(rows, cols, rank, power_iters, None, first_call=False) + 4 * cols * k
             + max(4 * cols * min(rank, rows, cols), gemm_pack))
    return max(first, later) + MKL_FIRST_CALL_BYTES + MKL_FIRST_CALL_BYTES_PER_COLUMN * k


def svd_qr_path(rows: int, cols: int) -> bool:
    """Whether LAPACK's ``gesdd`` of a ``rows x cols`` matrix (as :func:`svd_basis` runs it: torch copies
    the input column-major whatever its strides, so LAPACK sees ``rows x cols``) takes its tall path:
    ``rows >= MNTHR = int(11 cols / 6)`` (``sgesdd``'s crossover), a QR factorization first, then the SVD
    of ``R`` (paths 1-4 of ``sgesdd``). MKL's workspace query there returns ``4 k^2`` floats (``R``'s copy
    ``k x k`` beside ``bdsdc``'s ``3 k^2``), ``3 k^2`` elsewhere: square, mildly tall and every wide
    matrix, whose ``gesdd`` MKL runs without an LQ step (queried on an EPYC through torch's own ``sgesdd_``:
    4.007 k^2 at 1900-8192 x 1024, 3.007 k^2 at 1500 x 1024 and 1024 x 1500-4096)."""
    return rows >= int(min(rows, cols) * 11 / 6) and rows > cols


def svd_refresh_bytes(rows: int, cols: int) -> int:
    """Peak bytes of an exact SVD refresh (:func:`svd_basis`, ``torch.linalg.svd(G, full_matrices=False)``,
    LAPACK's divide-and-conquer ``gesdd``, ``jobz='S'``) of a float32 ``rows x cols`` ``G``, ``k = min``:
    LAPACK's column-major copy of ``G``, ``U`` (``m x k``), ``V^T`` (``k x n``) and its workspace,
    ``4 (m n + m k + k n) + 13 k^2``; on the tall path (:func:`svd_qr_path`) ``3 k^2`` more (the copy of
    ``R``: a ``16 k^2`` workspace). With MKL's non-Intel kernels (:func:`mkl_generic_kernels`) MKL's own
    buffers, :func:`svd_mkl_bytes` (measured on an AMD EPYC, fresh process, ``MALLOC_MMAP_THRESHOLD_=65536``).
    The ``3 k^2`` follows ``sgesdd``'s tall path (``R``'s copy beside
    ``bdsdc``'s workspace, LAPACK's algorithm, whoever's library) and is counted on every device; MKL's own
    buffers were not measured on an Intel CPU and are left out there (its count otherwise unchanged). Measured,
    the SVD alone (``docs/subspace.md`` for whole refresh steps): 2048 x 1024 38.1 MiB (counted 33.0 before,
    39.25 now), 4096 x 512 24.5 (20.2 before, 26.6 now); wide and square within 4% below the count."""
    m, n = rows, cols
    k = min(m, n)
    if not _SVD_WORKSPACE_COUNTED.get():  # the outputs U, S, V^T only (svd_workspace_left_out)
        return 4 * (m * k + k + k * n) + svd_mkl_bytes(m, n)
    return 4 * (m * n + m * k + k * n) + (16 if svd_qr_path(m, n) else 13) * k * k + svd_mkl_bytes(m, n)


#: whether :func:`svd_refresh_bytes` counts LAPACK's copy of ``G`` and its workspace (:func:`svd_workspace_left_out`)
_SVD_WORKSPACE_COUNTED: contextvars.ContextVar[bool] = contextvars.ContextVar("lowmem_svd_workspace_counted", default=True)


@contextlib.contextmanager
def svd_workspace_left_out():
    """Within it :func:`svd_refresh_bytes` counts the SVD's outputs (``U``, ``S``, ``V^T``: ``4 (m k + k + k n)``) and
    MKL's buffers (:func:`svd_mkl_bytes`, their own switch) only: not LAPACK's column-major copy of ``G`` and
    ``gesdd``'s workspace, which the kernel allocates inside itself (real memory, but no dispatched operation returns
    them: a live-tensor tracker does not see them). The estimator sizes a step with and without them to name that part
    of the transient (``optimizer_transient_lapack_svd``). Qwen2 h=384, 4 layers, vocabulary 8000, galore_adamw
    rank 128, fp32, 1 x 128: 1,196,032 B of the 9,502,728 reported; without it and MKL's named terms 5,898,248 B, the
    refresh step's traced tensors (5,898,240) and the two 4 B step counts (session 14, ESTFIX). A ``rsvd`` refresh
    within it counts its tensors only too (``subspace.Projection._rsvd_traced_bytes``: what its range finder and
    subspace iteration return), its LAPACK and MKL buffers then named apart by the same split (since 212e763)."""
    token = _SVD_WORKSPACE_COUNTED.set(False)
    try:
        yield
    finally:
        _SVD_WORKSPACE_COUNTED.reset(token)


#: whether :func:`svd_mkl_bytes` counts MKL's SVD buffers (:func:`svd_mkl_left_out`)
_SVD_MKL_COUNTED: contextvars.ContextVar[bool] = contextvars.ContextVar("lowmem_svd_mkl_counted", default=True)


@contextlib.contextmanager
def svd_mkl_left_out():
    """Within it :func:`svd_mkl_bytes` is 0: the estimator sizes a step with and without MKL's SVD buffers to name
    the part of the transient that is not a torch tensor (``optimizer_transient_mkl_svd``), which a live-tensor
    measurement cannot see."""
    token = _SVD_MKL_COUNTED.set(False)
    try:
        yield
    finally:
        _SVD_MKL_COUNTED.reset(token)


def svd_mkl_bytes(rows: int, cols: int) -> int:
    """The part of :func:`svd_refresh_bytes` that is MKL's own buffers (not torch tensors: a live-tensor
    tracker does not see them), counted with its non-Intel kernels only (:func:`mkl_generic_kernels`):
    ``256 (m + n)`` bytes, and on the tall path (:func:`svd_qr_path`) those of its QR and ``Q U_R`` product,
    ``min(2.75 m k, 0.5 MiB + 1 KiB m)``. Measured (AMD EPYC, the SVD alone, fresh process) beyond
    ``4 (m n + m k + k n) + 13 k^2``, ``16 k^2`` on the tall path: wide and square at most 0.33 MiB (512 x 4096;
    0.19 at 512 x 512, none at 96 x 32 - 256 x 1024), 0.28 more within 1024 x 2048's refresh step; tall
    0.16 / 0.66 / 1.36 MB at 512 x 128 / 1024 x 256 / 1024 x 512 (2.4-2.6 B per ``m k``), then about
    1 KiB a row: 2.0-2.2 MB at 1900-2048 rows, 2.9 at 3000, 3.8 at 4096, 5.5 at 8192."""
    if not (_SVD_MKL_COUNTED.get() and mkl_generic_kernels()):
        return 0
    k = min(rows, cols)
    tall = min(11 * rows * k // 4, 2**19 + 1024 * rows) if svd_qr_path(rows, cols) else 0
    return 256 * (rows + cols) + tall


def random_basis(rows: int, rank: int, generator: torch.Generator, orthogonal: bool) -> Tensor:
    """A random ``rows x rank`` basis independent of the gradient.

    ``orthogonal``: Haar-distributed orthonormal columns (QR of a Gaussian; GrassWalk-style random
    subspaces). Otherwise Gaussian entries ``N(0, 1/rank)`` as in APOLLO (Zhu et al. 2024,
    Section 3), for which ``E[P P^T] = I``.
    """
    gauss = torch.randn(rows, rank, generator=generator, dtype=torch.float32)
    if orthogonal:
        q, r = torch.linalg.qr(gauss)
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # sign fix: uniform (Haar) distribution
    return gauss / rank**0.5


def basis_transition(
    old: tuple[Tensor | None, Tensor | None], new: tuple[Tensor | None, Tensor | None]
) -> tuple[Tensor | None, Tensor | None]:
    """Matrices that carry a low-rank tensor from the old basis to the new: ``M' = T_l M T_r`` with
    ``T_l = P_new^T P_old`` (``r x r``) and ``T_r = Q_old Q_new^T``. For a first moment this is exact
    (``M`` is linear in the gradient) when the old subspace lies inside the new one."""
    t_left = None if new[0] is None else new[0].t() @ old[0]
    t_right = None if new[1] is None else old[1] @ new[1].t()
    return t_left, t_right


def rotate_low_rank(x: Tensor, transition: tuple[Tensor | None, Tensor | None], squared: bool = False) -> Tensor:
    """Apply :func:`basis_transition` to a moment. ``squared`` (second moments, which are
    element-wise squares) uses the element-wise squared transition, which keeps them
    non-negative and is exact when the transition is a signed permutation."""
    t_left, t_right = transition
    if squared:
        t_left = None if t_left is None else t_left.square()
        t_right = None if t_right is None else t_right.square()
    out = x if t_left is None else t_left @ x
    return out if t_right is None else out @ t_right
