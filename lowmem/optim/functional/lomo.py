"""LOMO (Lv et al. 2023) and AdaLomo (Lv et al. 2024): the update rules, fused into the backward pass
by :class:`~lowmem.optim.layerwise.LayerwiseOptimizer`.

LOMO, "Full Parameter Fine-tuning for Large Language Models with Limited Resources", Algorithm 1:
plain SGD, ``theta <- theta - alpha g``, applied to each parameter as soon as its gradient is
computed (the gradient is then freed). The authors' ``lomo-optim`` 0.1.1 adds decoupled weight decay
before the step, ``theta <- (1 - alpha lambda) theta``.

AdaLomo, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate", Algorithm 1: Adafactor's
factored second moment without a first moment, and *grouped update normalization* (line 10)::

    r_t = beta r_{t-1} + (1 - beta) (g^2 + eps1) 1_m          (row statistic)
    c_t = beta c_{t-1} + (1 - beta) 1_n^T (g^2 + eps1)        (column statistic)
    v_t = r_t c_t / (1_n^T r_t)
    u_t = g / sqrt(v_t)
    u_t <- u_t / max(1, RMS(u_t)) * max(eps2, RMS(theta_{t-1}))   (grouped update normalization)
    theta_t = theta_{t-1} - alpha u_t

with ``beta_t = 1 - t^{-0.8}`` and the clipping threshold ``d`` of ``RMS(u) / d`` as in
``lomo-optim`` 0.1.1. The statistics and the RMS clipping are Adafactor's
(:mod:`.adafactor`: :func:`~.adafactor.factored_second_moment_`, :func:`~.adafactor.factored_rsqrt`,
:func:`~.adafactor.clip_by_rms_`); what is AdaLomo's own is the step size below.
"""

from __future__ import annotations

from torch import Tensor

from .adafactor import rms


def lomo_direction(g: Tensor) -> Tensor:
    """LOMO's direction: the gradient itself (Lv et al. 2023, Algorithm 1, ``theta <- theta - alpha g``).
    No state: the step is ``lr * g`` (with decoupled weight decay before it)."""
    return g


def adalomo_step_size(lr: float, p: Tensor | None, eps2: float, p_rms: Tensor | None = None) -> Tensor:
    """The parameter-scaled step size of AdaLomo's grouped update normalization,
    ``alpha * max(eps2, RMS(theta_{t-1}))`` (Lv et al. 2024, Algorithm 1, line 10; ``lomo-optim``
    0.1.1 ``param_scale = max(eps[1], p_rms)``), as a 0-d tensor (no host synchronisation). The
    other factor, ``1 / max(1, RMS(u) / d)``, is Adafactor's update clipping. ``p_rms``: the
    parameter's RMS computed elsewhere (an FSDP2 shard: over every shard); ``p`` is then not read."""
    return (rms(p) if p_rms is None else p_rms).clamp(min=eps2) * lr
