"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; Liu et al.
2025, "Muon is Scalable for LLM Training"): momentum SGD whose update of a 2-D weight is
orthogonalised by a Newton-Schulz iteration.

Notation as in ``torch.optim.Muon`` (torch 2.13, the implementation lowmem is tested equal to):
``B`` momentum buffer, ``mu`` momentum, ``(a, b, c)`` the quintic's coefficients, ``k`` steps.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
from torch import Tensor

#: Keller Jordan's quintic coefficients, chosen to maximise the slope at zero (the iteration then
#: maps singular values to roughly [0.5, 1.5] instead of exactly 1, which does not hurt training).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
#: ``adjust_lr_fn`` choices: Keller Jordan's ``sqrt(max(1, A/B))`` and Moonshot's ``0.2 sqrt(max(A, B))``.
ADJUST_LR_FNS = ("original", "match_rms_adamw")


def muon_momentum_(buf: Tensor, g: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """The momentum step and the matrix to orthogonalise (torch.optim.Muon's algorithm)::

        B_t = mu B_{t-1} + (1 - mu) g_t                 (the EMA form of Keller Jordan's code)
        U_t = g_t + mu (B_t - g_t)  if nesterov  else  B_t

    ``buf`` is updated in place; with ``nesterov`` a new tensor in ``buf``'s layout is returned (not ``g``'s: a
    non-contiguous gradient, e.g. a matrix of a channels_last weight, gives the same ``U`` in the same layout as a
    contiguous one, so the iteration reads it in the same order), otherwise ``buf`` itself.
    """
    buf.lerp_(g, 1.0 - momentum)
    return torch.lerp(g, buf, momentum, out=torch.empty_like(buf)) if nesterov else buf


def newton_schulz(u: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """The zeroth power (orthogonalisation) of the matrix ``u`` by ``steps`` quintic Newton-Schulz
    iterations in bfloat16, as in Keller Jordan's reference and ``torch.optim.Muon``::

        X_0 = U / max(||U||_F, eps)          (bfloat16; transposed when U is tall, so X X^T is small)
        A = X X^T ;  B = b A + c A A ;  X <- a X + B X      (k times)

    Returns a new bfloat16 tensor of ``u``'s shape (``u`` is not modified).
    """
    a, b, c = coefficients
    tall = u.size(0) > u.size(1)
    x = u.to(torch.bfloat16, copy=True)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


#: Elements of a column block of the in-place Newton-Schulz update (:func:`newton_schulz_`): its
#: ``a X_j + P X_j`` is a bfloat16 ``r x (2^22 / r)`` temporary, 8 MiB. Chosen by measurement on an
#: 8192 x 8192 weight (CPU): 2^19-element blocks made the iteration about 1.5x slower, 2^22 within 5%
#: of the whole-matrix GEMM.
NS_COLUMN_BLOCK_NUMEL = 2**22


def ns_shape(shape: torch.Size | tuple[int, int]) -> tuple[int, int]:
    """The shape the iteration works in: ``(rows, cols)`` of ``U``, transposed when ``U`` is tall, so
    that the Gram matrix ``X X^T`` is ``r x r`` with ``r = min(rows, cols)``."""
    rows, cols = shape
    return (cols, rows) if rows > cols else (rows, cols)


def ns_rows(x: Tensor, shape: torch.Size | tuple[int, int], start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of the ``shape``-shaped matrix whose iterate ``x`` (:func:`ns_shape`, the
    transpose of a tall matrix) holds: a view, written by the momentum pass, read by the step."""
    return x[:, start:stop].T if shape[0] > shape[1] else x[start:stop]


def newton_schulz_(x: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                   column_block_numel: int = NS_COLUMN_BLOCK_NUMEL) -> Tensor:
    """:func:`newton_schulz` in place on the bfloat16 matrix ``x = U`` (already in :func:`ns_shape`,
    ``rows <= cols``), with no second iterate::

        X_0 = U / max(||U||_F, eps) ;  A = X X^T ;  P = b A + c A A ;  X_j <- a X_j + P X_j

    The last update is done a block of columns ``X_j`` at a time: column ``j`` of ``a X + P X`` needs
    only column ``j`` of ``X``, so each block is overwritten once it is computed (``A`` is freed before
    it; the blocks have about ``column_block_numel`` elements). Every product is the one
    :func:`newton_schulz` computes (the same operands, layouts and bfloat16 roundings), so the result
    is the same; the live memory is ``X`` plus ``A`` and ``P`` (``2 r^2`` bytes each) instead of
    ``U``, two iterates, ``A`` and ``P``. Returns ``x``.
    """
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.size(0) > x.size(1):
        raise ValueError(f"x must be a bfloat16 matrix with rows <= cols (ns_shape), got {x.dtype} {tuple(x.shape)}")
    a, b, c = coefficients
    x.div_(x.norm().clamp(min=eps))
    blocks = ns_column_blocks(x.shape, column_block_numel)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        del gram
        for s, e in blocks:
            xj = x[:, s:e]
            xj.copy_(torch.addmm(xj, poly, xj, beta=a))
        del poly
    return x


#: Whether :func:`ns_column_block_numel` sizes the column blocks by the step's row blocks on the CPU
#: too (tests force the launch-bound path there; the CPU keeps :data:`NS_COLUMN_BLOCK_NUMEL`).
NS_CHUNK_BLOCKS_ON_CPU = False


def ns_column_block_numel(device: torch.device, row_block_numel: int) -> int:
    """The column blocks' size of :func:`newton_schulz_` in the chunked (lean) Muon step whose row
    blocks have at most ``row_block_numel`` elements (the engine's ``chunk_numel``, whole rows).

    On the CPU :data:`NS_COLUMN_BLOCK_NUMEL` (measured the fastest there). Elsewhere (a GPU, where the
    step is launch-bound: issue 15) blocks as large as a row block, at least that: on a 32000 x 1024
    head at the GPU's ``2^24``-element chunk 2 column blocks per iteration instead of 8 (18 -> 6
    kernels an iteration). A block's bfloat16 result (``2 r w <= 2 row_block_numel`` bytes) stays
    below the float32 block of rows the step holds anyway (``4 row_block_numel``), so the step's
    bound does not grow (:func:`newton_schulz_transient_bytes` of it, reported). Each column of the
    result is the same product of the same operands whatever the block (``a X_j + P X_j``)."""
    if device.type == "cpu" and not NS_CHUNK_BLOCKS_ON_CPU:
        return NS_COLUMN_BLOCK_NUMEL
    return max(NS_COLUMN_BLOCK_NUMEL, row_block_numel)


#: The narrowest column block :func:`newton_schulz_` uses (unless the matrix is narrower): a single
#: column is a matrix-vector product, which BLAS computes with another kernel than the matrix product
#: of the whole iterate (different roundings; measured on CPU), so a narrow last block joins the one
#: before it.
NS_MIN_COLUMNS = 16


def ns_column_blocks(shape: torch.Size | tuple[int, int], column_block_numel: int = NS_COLUMN_BLOCK_NUMEL
                     ) -> list[tuple[int, int]]:
    """Column ranges ``[start, stop)`` of :func:`newton_schulz_`'s in-place update of a ``rows x cols``
    iterate: about ``column_block_numel`` elements each, at least :data:`NS_MIN_COLUMNS` columns, the
    last one widened instead of narrower than that."""
    rows, cols = shape
    block = max(NS_MIN_COLUMNS, column_block_numel // max(rows, 1))
    out = [(s, min(s + block, cols)) for s in range(0, cols, block)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < NS_MIN_COLUMNS:
        out[-2:] = [(out[-2][0], cols)]
    return out


#: whether :func:`bf16_gemm_workspace_bytes` counts the BLAS's workspace (:func:`bf16_workspace_left_out`)
_BF16_WORKSPACE_COUNTED: contextvars.ContextVar[bool] = contextvars.ContextVar("lowmem_bf16_workspace_counted",
                                                                               default=True)


@contextlib.contextmanager
def bf16_workspace_left_out():
    """Within it :func:`bf16_gemm_workspace_bytes` is 0: the estimator sizes a step with and without the bfloat16
    products' BLAS workspace to name the part of the transient that is process memory, not torch tensors
    (``optimizer_transient_blas_workspace``), which a live-tensor measurement cannot see (as
    :func:`~lowmem.optim.functional.galore.svd_mkl_left_out` for MKL's SVD buffers)."""
    token = _BF16_WORKSPACE_COUNTED.set(False)
    try:
        yield
    finally:
        _BF16_WORKSPACE_COUNTED.reset(token)


def bf16_gemm_workspace_bytes(r: int, threads: int = 1) -> int:
    """Workspace of a bfloat16 matrix product with inner dimension ``r`` (the iteration's ``A A`` and
    ``P X_j``) beyond its output, per CPU thread (packed panels of the operands): the BLAS's, not traced, so a
    bound, by the CPU's vendor (MKL and oneDNN pick their kernels by it:
    :func:`~lowmem.optim.functional.galore.mkl_generic_kernels`).

    Intel Xeon (torch 2.13, one thread; ``r`` x ``r`` x ``r``): 1.6 MiB at ``r`` = 1024, 6.1 at 2048, 17.6 at
    3000, 15.8 at 4096, 19.1 at 8192, 29.8 at 12288, 37.5 at 16384 (two threads: 11, 28, 36 MiB at
    2048 / 4096 / 8192); bounded by ``min(2 r^2 + 2 MiB, 16 MiB + 1600 r)`` per thread (a whole
    Muon step on 4096 x 11008 measured 1.3 MiB above ``X + A + P`` plus 14 MiB + 1600 r).

    AMD EPYC: 3 MiB per thread whatever ``r``. A whole Muon step's first step of a shape in a fresh process (one
    thread, ``MALLOC_MMAP_THRESHOLD_=65536``, 2026-11-30, 33 shapes from 256 x 512 to 4096 x 4096, Nesterov and
    plain, per parameter and in buckets) grew 0.4-2.8 MiB above its traced tensors: 0.4-1.7 MiB for wide and
    square weights up to ``r`` = 2048, 2.6-2.8 at 4096 x 4096, and 1.5-2.6 MiB for tall ones of any size (the
    reference iteration's first products read the transposed iterate: 1024 x 256 2.30, 2048 x 512 2.56, 1280 x
    640 2.60, 4096 x 1024 2.38); later steps of the shape 0-1.6 (the BLAS keeps part of it). The former
    ``min(2 r^2 + 2 MiB, 3 MiB)`` was below the tall weights' (1024 x 256 reported 4.38 MiB for 4.55 grown).
    Measured again 2026-11-30 (session 13; ``step_memory.measure_steps``, its small Muon step first, three steps of
    one shape, a fresh process each): 0.34-1.18 MiB above the traced tensors at 10 shapes from 256 x 512 to
    4096 x 1024 (1024 x 256 0.34, 256 x 512 0.70, 2048 x 2048 1.07, 4096 x 1024 1.18), so the report is 1.08-2.6x
    the growth (2.4-2.6x where the step's tensors are under 1 MiB). It stays a bound, not tightened: what the BLAS
    keeps depends on the process's earlier products (the measurement above read up to 2.8 MiB, tall weights 2.3-2.6,
    with another history), and an estimate must hold for the first step of a shape in a training process.
    0 within :func:`bf16_workspace_left_out`."""
    from .galore import mkl_generic_kernels

    if not _BF16_WORKSPACE_COUNTED.get():
        return 0
    if mkl_generic_kernels():
        return threads * 3 * 2**20
    return threads * min(2 * r * r + 2 * 2**20, 16 * 2**20 + 1600 * r)


def newton_schulz_transient_bytes(shape: torch.Size | tuple[int, int],
                                  column_block_numel: int = NS_COLUMN_BLOCK_NUMEL, threads: int = 1) -> int:
    """Bytes :func:`newton_schulz_` allocates beyond ``x``: ``A`` and ``P`` together (``4 r^2``), or
    ``P`` and a column block's result; ``r`` the smaller side; plus the products' workspace
    (:func:`bf16_gemm_workspace_bytes`, ``threads`` CPU threads)."""
    rows, cols = ns_shape(shape)
    widest = max(e - s for s, e in ns_column_blocks((rows, cols), column_block_numel))
    return max(4 * rows * rows, 2 * rows * rows + 2 * rows * widest) + bf16_gemm_workspace_bytes(rows, threads)


def muon_whole_step_bytes(shape: torch.Size | tuple[int, int], nesterov: bool, low_buffer: bool, threads: int = 1,
                          width: int = 4) -> int:
    """Bytes Muon's whole-tensor step of one ``m x n`` matrix allocates (:func:`muon_momentum_`, :func:`newton_schulz`,
    the float32 step ``O.to(float32) * scale``): during the iteration the Nesterov matrix (float32, ``4 m n``), two
    bfloat16 iterates (``4 m n``) and the two ``r x r`` bfloat16 Gram products (``4 r^2``, ``r`` the smaller side),
    beside a low-precision momentum buffer's float32 copy (``low_buffer``, ``4 m n``, freed before the step); after
    it the float32 step next to the last iterate (``6 m n``): exactly the traced tensors. Plus the bfloat16 products'
    workspace (:func:`bf16_gemm_workspace_bytes`, ``threads`` CPU threads), which the BLAS keeps after a shape's
    first step. ``width``: bytes per element of the gradient, which the Nesterov matrix, the buffer's copy (``low_buffer``:
    stored in another dtype) and the step take (8 for a float64 gradient: ``buf.to(g.dtype)``, ``o.to(g.dtype)``)."""
    m, n = shape
    numel, r = m * n, min(m, n)
    during = width * numel * nesterov + 2 * 2 * numel + 2 * 2 * r * r
    return max(width * numel * low_buffer + during, (2 + width) * numel) + bf16_gemm_workspace_bytes(r, threads)


def newton_schulz_batched(x: Tensor | list[Tensor], coefficients: tuple[float, float, float], steps: int,
                          eps: float) -> Tensor:
    """:func:`newton_schulz_` of every matrix of a stack ``x`` (bfloat16, ``k x rows x cols``,
    ``rows <= cols``: :func:`ns_shape`), with batched products::

        X_0 = U / max(||U||_F, eps)  (each matrix: torch._foreach_norm)
        A = X X^T (bmm) ;  P = b A + c A A (baddbmm) ;  X <- a X + P X (baddbmm)

    Each matrix gets the same operations as :func:`newton_schulz` (the norm, its floor and the
    division per matrix). On the CPU the products are ``mm`` / ``addmm`` of each slice, written into the
    stacks (``out=``), so every slice equals :func:`newton_schulz` of it bit for bit (tested,
    tests/test_foreach_normalized.py): ``torch.baddbmm``'s slices differ from ``addmm``'s in rare bfloat16
    roundings on the CPU (torch 2.13: one of four 16 x 16 matrices, ``a X + P X`` in the second iteration, 1.2e-4
    after 4 Muon steps). Elsewhere (a GPU: launch-bound) one ``bmm`` / ``baddbmm`` per product for the stack. ``x`` is normalised in place; the result is a new stack after the
    first iteration (``x`` itself for ``steps=0``). Live memory: ``X``, then ``A`` and ``P``
    (``2 k r^2`` bytes each), or ``P`` and the next iterate (:func:`muon_foreach_transient_bytes`). ``x`` given as a
    one-element list ``[stack]`` is taken out of it (the list is emptied): the caller then holds no reference to
    the stack, which is freed after the first iteration instead of staying beside every later one (a caller's
    reference kept it: ``muon_foreach_`` of square matrices allocated 8 bytes per element, not 6).
    """
    if isinstance(x, list):
        x = x.pop()
    if x.dtype != torch.bfloat16 or x.dim() != 3 or x.size(1) > x.size(2):
        raise ValueError(f"x must be a bfloat16 stack k x rows x cols with rows <= cols, got {x.dtype} {tuple(x.shape)}")
    a, b, c = coefficients
    xs = list(x.unbind(0))
    norms = torch._foreach_norm(xs)
    torch._foreach_clamp_min_(norms, eps)
    torch._foreach_div_(xs, norms)
    del xs, norms
    for _ in range(steps):
        if x.device.type == "cpu":
            x = _newton_schulz_slices_step(x, a, b, c)
            continue
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        del gram
        x = torch.baddbmm(x, poly, x, beta=a)
        del poly
    return x


def _newton_schulz_slices_step(x: Tensor, a: float, b: float, c: float) -> Tensor:
    """One iteration of :func:`newton_schulz_batched` with the products of each slice (``mm`` / ``addmm``, as
    :func:`newton_schulz`), into stacks of the batched form's shapes (the same live memory); returns the next
    iterate (a new stack)."""
    k, r, _ = x.shape
    gram = x.new_empty((k, r, r))
    for i in range(k):
        torch.mm(x[i], x[i].T, out=gram[i])
    poly = x.new_empty((k, r, r))
    for i in range(k):
        torch.addmm(gram[i], gram[i], gram[i], beta=b, alpha=c, out=poly[i])
    del gram
    nxt = torch.empty_like(x)
    for i in range(k):
        torch.addmm(x[i], poly[i], x[i], beta=a, out=nxt[i])
    return nxt


def muon_foreach_iterate(grads: list[Tensor], bufs: list[Tensor], shape: tuple[int, int], momentum: float,
                         nesterov: bool, overwrite_grads: bool = False) -> Tensor:
    """The momentum step of ``k`` matrices of one ``shape`` and the bfloat16 stack to orthogonalise (``k`` x
    :func:`ns_shape`), one multi-tensor kernel per operation::

        B <- lerp(B, g, 1 - mu) ;  U = lerp(g, B, mu) (Nesterov) or B ;  X = U in bfloat16   (:func:`muon_momentum_`)

    ``bufs`` float32 (a bfloat16 buffer's float32 copies: the caller writes them back). Allocates the stack
    (``2 k m n``) beside the Nesterov matrices (``4 k m n``, freed on return); ``overwrite_grads`` (the gradients are
    the caller's float32 copies, read no more): the Nesterov matrices are computed into them in place (the same
    ``lerp``), nothing beside the stack."""
    m = shape[0]
    torch._foreach_lerp_(bufs, grads, 1.0 - momentum)
    x = torch.empty((len(grads), *ns_shape(shape)), dtype=torch.bfloat16, device=grads[0].device)
    # views in the matrices' own layout (a conv kernel [out, in, kh, kw]: its [out, in kh kw] rows split back into the
    # kernel's shape, so its gradient is read in whatever layout it has: muon_matrices)
    xs = [ns_rows(xi, shape, 0, m).view(g.shape) for xi, g in zip(x.unbind(0), grads)]
    if nesterov and overwrite_grads:
        torch._foreach_lerp_(grads, bufs, momentum)
        torch._foreach_copy_(xs, grads)
    elif nesterov:
        us = torch._foreach_lerp(grads, bufs, momentum)
        torch._foreach_copy_(xs, us)  # the bfloat16 cast, element-wise as U.to(bfloat16)
        del us
    else:
        torch._foreach_copy_(xs, bufs)
    return x


def muon_foreach_direction(stack: list[Tensor], coefficients: tuple[float, float, float], steps: int, eps: float,
                           scale: float) -> Tensor:
    """The float32 step ``scale * O`` of a stack of iterates (``[X]``, :func:`muon_foreach_iterate`'s, handed over:
    the list is emptied) after :func:`newton_schulz_batched`: a new ``k`` x :func:`ns_shape` float32 stack (row
    ``ns_rows(d_i, shape, 0, m)`` of matrix ``i``), the per-matrix step's ``O.to(float32) * scale``."""
    x = newton_schulz_batched(stack, coefficients, steps, eps)  # (the stack handed over: freed after its first iteration)
    d = x.to(torch.float32)
    del x
    return d.mul_(scale)


def muon_foreach_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], shape: tuple[int, int],
                  momentum: float, nesterov: bool, coefficients: tuple[float, float, float], steps: int, eps: float,
                  lr: float, weight_decay: float, scale: float) -> None:
    """Muon's whole step for ``k`` float32 matrices of one ``shape`` (parameters, gradients, momentum
    buffers; or ``k`` conv kernels whose :func:`muon_matrix_shape` is ``shape``: :func:`muon_matrices`), one
    multi-tensor or batched kernel per operation::

        B <- lerp(B, g, 1 - mu) ;  U = lerp(g, B, mu) (Nesterov) or B     (:func:`muon_foreach_iterate`)
        O = newton_schulz_batched(stack of U in bfloat16)                 (:func:`muon_foreach_direction`)
        p <- p (1 - lr wd) ;  p <- p - scale O                           (``scale = lr * ratio``)

    The operations of the per-matrix step (momentum, the bfloat16 cast, the iteration, the float32
    step ``O.to(float32) * scale``, decay, subtraction) in the same order: equal to it bit for bit on
    the CPU. Transient: :func:`muon_foreach_transient_bytes` of the ``k m n`` elements."""
    m = shape[0]
    stack = [muon_foreach_iterate(grads, bufs, shape, momentum, nesterov)]
    d = muon_foreach_direction(stack, coefficients, steps, eps, scale)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_sub_(params, [ns_rows(di, shape, 0, m).view(p.shape) for di, p in zip(d.unbind(0), params)])


def muon_foreach_transient_bytes(numel: int, threads: int = 1) -> int:
    """Bytes :func:`muon_foreach_` allocates for matrices of ``numel`` elements in all: the bfloat16
    stack (``2 numel``) and at most one of: the Nesterov matrices (float32, ``4 numel``); ``A`` and
    ``P`` (``4 k r^2 <= 4 numel``); ``P`` and the next iterate; the float32 step (``4 numel``) (6 bytes per
    element, exactly as traced for every shape); plus the bfloat16 products' workspace
    (:func:`bf16_gemm_workspace_bytes` of ``r <= sqrt(numel)``, per CPU thread)."""
    return 6 * numel + bf16_gemm_workspace_bytes(math.isqrt(numel), threads)


def muon_lr_ratio(shape: torch.Size | tuple[int, ...], adjust_lr_fn: str) -> float:
    """The shape-based factor of Muon's step size for an ``A x B`` weight:

    * ``"original"`` (Keller Jordan): ``sqrt(max(1, A / B))``, with a learning rate tuned for Muon
      (about 0.02);
    * ``"match_rms_adamw"`` (Liu et al. 2025, the per-parameter update scale): ``0.2 sqrt(max(A, B))``, which gives the
      update the RMS of a typical AdamW update, so the learning rate and weight decay tuned for
      AdamW carry over (fine-tuning a model trained with AdamW).
    """
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be one of {list(ADJUST_LR_FNS)}, got {adjust_lr_fn!r}")


# ---- batches of matrices (fused MoE experts [E, A, B]) and conv kernels [out, in, kh, kw] -------------
# Muon's update is defined per matrix (Jordan et al. 2024; Liu et al. 2025 orthogonalise each weight
# matrix on its own): a 3-D tensor is the batch of the matrices over its last two, each stepped exactly as
# a 2-D weight of its own. A 4-D tensor is a convolution kernel, one linear map of in x kh x kw inputs:
# Keller Jordan's muon.py (muon_update, 00ba60d: ``if update.ndim == 4: update = update.view(len(update),
# -1)``; its docstring: "viewing them as 2D and then collapsing their last 3 dimensions") orthogonalises it as
# the one matrix [out, in kh kw]. More dimensions: refused (MuonMoments' group check, no reference reading).


def muon_matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The shape Muon steps a tensor of ``shape`` as: a 4-D conv kernel ``[out, in, kh, kw]`` as the matrix
    ``(out, in kh kw)`` (Keller Jordan's rule, above; its step size from these rows and columns, e.g.
    ``sqrt(max(1, out / (in kh kw)))``: his code reads ``kh / kw`` of the 4-D tensor instead, the same 1 for a square
    kernel with ``out <= in kh kw``); a 2-D weight and a batch ``[E, A, B]`` as they are."""
    if len(shape) == 4:
        return (shape[0], shape[1] * shape[2] * shape[3])
    return tuple(shape)


def muon_matrices(x: Tensor) -> list[Tensor]:
    """The tensors Muon's multi-tensor step stacks as its matrices: :func:`matrices` of a 2-D weight or a batch
    ``[E, A, B]``; a conv kernel ``[out, in, kh, kw]`` whole (``[x]``: one matrix of :func:`muon_matrix_shape`,
    whose rows :func:`muon_foreach_iterate` and :func:`muon_foreach_` view in the kernel's shape, so a
    channels_last kernel is read in its own layout, never copied)."""
    return [x] if x.dim() == 4 else matrices(x)


def matrices(x: Tensor) -> list[Tensor]:
    """The ``A x B`` matrices of ``x`` (``[..., A, B]``) as views, in row-major order of the leading dimensions;
    ``[x]`` for a matrix. Views in every layout (a channels_last conv weight ``[O, I, H, W]``, whose leading
    dimensions cannot be flattened into one without a copy, included): the multi-tensor steps write the
    parameters through them (FOUND_AUDITOPT 2: ``x.view(-1, A, B)`` raised for channels_last)."""
    if x.dim() == 2:
        return [x]
    if x.dim() == 3:
        return list(x.unbind(0))
    return [m for sub in x.unbind(0) for m in matrices(sub)]


def matrix_index(x: Tensor, e: int) -> Tensor:
    """Matrix ``e`` of ``x`` (``[..., A, B]``, its leading dimensions in row-major order, as :func:`matrices`):
    a view in every layout, never a copy (before, ``x.flatten(0, -3)[e]`` copied the whole of a channels_last
    gradient for each of its matrices, beside what the step reports)."""
    if x.dim() == 2:
        return x
    idx = []
    for n in reversed(x.shape[:-2]):
        e, i = divmod(e, n)
        idx.append(i)
    return x[tuple(reversed(idx))]


def row_block_spans(shape: torch.Size | tuple[int, ...], size: int) -> tuple[int, int]:
    """The blocks of ``size`` elements (whole rows) that the chunked step visits a batch ``[..., A, B]`` in:
    ``(within, spanning)``, the most elements of a block inside one matrix and of a block over two or more
    (0 when there is none). A block over several matrices holds its float32 step while the next matrix's
    iterate is computed; one inside a matrix allocates it after (``MuonMoments._batched_transient_bytes``)."""
    total = math.prod(shape)
    mat = shape[-1] * shape[-2]
    within = spanning = 0
    for a in range(0, total, size):
        b = min(a + size, total)
        if a // mat == (b - 1) // mat:
            within = max(within, b - a)
        else:
            spanning = max(spanning, b - a)
    return within, spanning
