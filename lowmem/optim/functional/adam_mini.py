"""Adam-mini: one second moment per block of parameters (Zhang et al. 2024, "Adam-mini: Use Fewer
Learning Rates To Gain More", arXiv:2406.16793, ICLR 2025).

Algorithm 1 (Adam-mini), for each block ``b`` of the partition::

    m   <- beta1 m + (1 - beta1) g                          (per element, as Adam)
    v_b <- beta2 v_b + (1 - beta2) mean(g_b * g_b)          (one number per block)
    p_b <- p_b - lr m_hat_b / (sqrt(v_hat_b) + eps)         (m_hat, v_hat: bias-corrected)

so a block shares one learning rate ``lr / (sqrt(v_hat_b) + eps)``. Here a block is a contiguous
run of ``block_numel`` elements of the flattened tensor: one element (Adam), one row of the last
dimension (an output neuron of a linear weight, a token of an embedding), the rows of one attention
head, or the whole tensor (:func:`block_numel`). ``v`` holds the blocks in order, ``v.numel()`` of
them, so every function below reads the partition from the shapes of ``m`` and ``v``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: The partitions a tensor can be cut into (see :func:`block_numel`).
BLOCKS = ("element", "row", "head", "tensor")


def block_numel(shape: torch.Size | tuple[int, ...], block: str, head_dim: int | None = None) -> int:
    """Elements per block of a tensor of ``shape`` (row-major, blocks contiguous):

    * ``"element"``: 1 (every element its own second moment: Adam);
    * ``"row"``: ``shape[-1]``, one block per row of the last dimension (a linear weight
      ``[out, in]``: one per output neuron; an embedding ``[vocab, dim]``: one per token; a vector:
      the whole vector);
    * ``"head"``: ``head_dim * shape[-1]``, the ``head_dim`` consecutive rows of one attention head
      (a query / key projection ``[heads * head_dim, in]``);
    * ``"tensor"``: the whole tensor (one block).

    Raises:
        ValueError: An unknown ``block``, or ``"head"`` without ``head_dim``.
    """
    numel = math.prod(shape)
    last = shape[-1] if len(shape) else 1
    if block == "element":
        return 1
    if block == "row":
        return last
    if block == "head":
        if head_dim is None:
            raise ValueError("block='head' needs head_dim (rows per attention head)")
        return head_dim * last
    if block == "tensor":
        return numel
    raise ValueError(f"block={block!r} is not one of {list(BLOCKS)}")


def block_mean_square(g: Tensor, n_blocks: int) -> Tensor:
    """``mean(g_b * g_b)`` of each of the ``n_blocks`` contiguous blocks of ``g`` (Algorithm 1, the
    second-moment line), a vector of ``n_blocks`` entries."""
    return g.reshape(n_blocks, -1).square().mean(dim=1)


def first_moment_(m: Tensor, g: Tensor, beta1: float) -> None:
    """``m <- beta1 m + (1 - beta1) g`` in place (Algorithm 1; Adam's first moment)."""
    m.lerp_(g.to(m.dtype), 1.0 - beta1)


def block_second_moment_(v: Tensor, g: Tensor, beta2: float, mean_square: Tensor | None = None) -> None:
    """``v_b <- beta2 v_b + (1 - beta2) mean(g_b * g_b)`` in place for the ``v.numel()`` blocks of
    ``g`` (Algorithm 1). ``mean_square``: the blocks' ``mean(g_b * g_b)`` when computed elsewhere (a
    whole-tensor block reduced over the chunks of a large tensor); ``g`` is then not read."""
    if mean_square is None:
        if v.numel() == g.numel():  # one element per block: Adam's v, without a g^2 temporary
            g = g.reshape(v.shape).to(v.dtype)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            return
        mean_square = block_mean_square(g.to(v.dtype), v.numel())
    v.mul_(beta2).add_(mean_square.reshape(v.shape).to(v.dtype), alpha=1.0 - beta2)


def adam_mini_direction(m: Tensor, v: Tensor, t: float, beta1: float, beta2: float, eps: float) -> Tensor:
    """The step direction ``m_hat_b / (sqrt(v_hat_b) + eps)`` of every block (Algorithm 1, the
    update line), a new tensor shaped like ``m`` (unitless: multiply by ``lr``).

    ``eps`` is added after the bias correction of ``v`` (as in ``torch.optim.AdamW`` and adam-mini
    1.1.1): each block's factor is ``(1 / (1 - beta1^t)) / (sqrt(v_b) / sqrt(1 - beta2^t) + eps)``.
    """
    n_blocks = v.numel()
    if m.numel() == 0:
        return torch.zeros_like(m)
    bias_correction1 = 1.0 - beta1**t
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
    denom = v.sqrt().div_(bias_correction2_sqrt).add_(eps)
    scale = (1.0 / bias_correction1) / denom
    del denom
    return (m.reshape(n_blocks, -1) * scale.reshape(n_blocks, 1)).reshape(m.shape)


def adam_mini_foreach_bytes(sizes: list[tuple[int, int]], itemsize: int = 4) -> int:
    """Bytes :func:`adam_mini_foreach_` allocates, at most alive together, for tensors of ``sizes``
    (``(elements, blocks)`` each: ``p.numel()``, ``v.numel()``) whose moments are ``itemsize`` bytes
    an element (4: float32), walked as it runs (contiguous gradients):

    * per block length ``L`` (the tensors with ``1 < elements / blocks``, or one whole-tensor block):
      their stacked or concatenated gradients, squared in place, and their block means,
      ``E_L + B_L`` elements, freed before the next length;
    * then the factors of every block of the list (one ``cat``, ``sum(blocks)``, split into views
      that stay alive) beside the direction of every tensor (``sum(elements)``).

    Empty tensors are left out (no blocks, no step). The second phase holds every length's first
    one's elements and blocks, so it is the peak; both are counted as the code runs."""
    items = [(n, b) for n, b in sizes if n > 0]
    by_length: dict[int, list[int]] = {}
    for n, b in items:
        if b != n:
            acc = by_length.setdefault(n // b, [0, 0])
            acc[0] += n
            acc[1] += b
    reduce = max((e + nb for e, nb in by_length.values()), default=0)
    return itemsize * max(reduce, sum(n + b for n, b in items))


def adam_mini_foreach_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                       t: float, beta1: float, beta2: float, lr: float, weight_decay: float, eps: float) -> None:
    """Multi-tensor Adam-mini step (Algorithm 1) of float32 tensors sharing the step count ``t``,
    each with its own partition (``exp_avg_sqs[i].numel()`` contiguous blocks of ``params[i]``).

    The same operations as the per-tensor path, :func:`first_moment_`, :func:`block_second_moment_`,
    :func:`adam_mini_direction`, then the engine's decoupled decay (before the update) and the update
    ``p <- p - lr * d``, each one kernel for the whole list, except the blocks' ``mean(g_b * g_b)``:
    one reduction per block length over the concatenated gradients of the tensors that share it (a
    row of one tensor is reduced as it is alone; many small whole-tensor blocks of one size, the
    norm weights of a model, take one kernel). Element blocks (Adam) update ``v`` with
    ``addcmul_`` as :func:`block_second_moment_` does.

    Transient (float32): the concatenated gradients of one block length with their block means,
    then every tensor's block factors and the direction, :func:`adam_mini_foreach_bytes`.
    """
    items = [i for i, p in enumerate(params) if p.numel() > 0]  # an empty tensor has no blocks and no step
    if not items:
        return
    params, grads = [params[i] for i in items], [grads[i] for i in items]
    exp_avgs, exp_avg_sqs = [exp_avgs[i] for i in items], [exp_avg_sqs[i] for i in items]
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    element = [i for i, (g, v) in enumerate(zip(grads, exp_avg_sqs)) if v.numel() == g.numel()]
    if element:  # one element per block: Adam's v
        v_e = [exp_avg_sqs[i] for i in element]
        g_e = [g if g.shape == v.shape else g.reshape(v.shape) for g, v in ((grads[i], exp_avg_sqs[i]) for i in element)]
        torch._foreach_mul_(v_e, beta2)
        torch._foreach_addcmul_(v_e, g_e, g_e, value=1.0 - beta2)
    by_length: dict[int, list[int]] = {}
    for i, (g, v) in enumerate(zip(grads, exp_avg_sqs)):
        if v.numel() != g.numel():
            by_length.setdefault(g.numel() // v.numel(), []).append(i)
    for length, idx in by_length.items():
        shape = grads[idx[0]].shape  # tensors of one shape (norm weights, equal layers): stacked as they are
        if all(grads[i].shape == shape for i in idx):
            # (reshape: a view, or a copy for a stack of channels_last gradients)
            sq = torch.stack([grads[i] for i in idx]).reshape(-1, length).square_()
        else:
            sq = torch.cat([grads[i].reshape(-1) for i in idx]).view(-1, length).square_()
        means = sq.mean(dim=1)
        del sq
        v_b = [exp_avg_sqs[i] for i in idx]
        torch._foreach_mul_(v_b, beta2)
        torch._foreach_add_(v_b, list(means.split([v.numel() for v in v_b])), alpha=1.0 - beta2)
        del means
    # each block's factor (1 / (1 - beta1^t)) / (sqrt(v_b) / sqrt(1 - beta2^t) + eps), for every block
    # of the list at once (the per-tensor ops, element by element: the same numbers)
    factors = torch.cat([v.reshape(-1) for v in exp_avg_sqs]).sqrt_().div_(math.sqrt(1.0 - beta2**t)).add_(eps)
    factors.reciprocal_().mul_(1.0 / (1.0 - beta1**t))
    scale = factors.split([v.numel() for v in exp_avg_sqs])
    del factors
    # m_b * factor_b: a whole-tensor block's factor (shape (1,)) and an element-wise vector's broadcast
    # as they are; other layouts as (blocks, elements per block) * (blocks, 1)
    plain = [v.numel() == 1 or v.shape == m.shape for m, v in zip(exp_avgs, exp_avg_sqs)]
    d = torch._foreach_mul([m if ok else m.view(v.numel(), -1) for m, v, ok in zip(exp_avgs, exp_avg_sqs, plain)],
                           [s if ok else s.view(-1, 1) for s, ok in zip(scale, plain)])
    del scale
    torch._foreach_add_(params, [x if x.shape == p.shape else x.view(p.shape) for x, p in zip(d, params)], alpha=-lr)
