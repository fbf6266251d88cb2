"""CAME (Luo et al., ACL 2023, "CAME: Confidence-guided Adaptive Memory Efficient Optimization").

The paper's CAME algorithm (the authors' figure "Algorithm 2: CAME Optimizer"; lines numbered from
``r_t``), on the last two dimensions of a matrix ``G`` (``n x m``)::

    1  r_t = b2 r_{t-1} + (1 - b2) (G^2 + eps1) 1_m           row statistic
    2  c_t = b2 c_{t-1} + (1 - b2) 1_n^T (G^2 + eps1)         column statistic
    3  v_t = r_t c_t / (1_n^T r_t)
    4  u_t = G / sqrt(v_t)
    5  u^_t = u_t / max(1, RMS(u_t) / d)                      update clipping
    6  m_t = b1 m_{t-1} + (1 - b1) u^_t                       first moment
    7  U_t = (u^_t - m_t)^2                                   instability
    8  R_t = b3 R_{t-1} + (1 - b3) (U_t + eps2) 1_m
    9  C_t = b3 C_{t-1} + (1 - b3) 1_n^T (U_t + eps2)
    10 S_t = R_t C_t / (1_n^T R_t)                            confidence
    11 theta_t = theta_{t-1} - lr m_t / sqrt(S_t)

Lines 1-5 are Adafactor's (:mod:`.adafactor`: :func:`~.adafactor.factored_second_moment_`,
:func:`~.adafactor.factored_rsqrt`, :func:`~.adafactor.clip_by_rms_`; means instead of the paper's
sums, as the authors' code: the ratios in lines 3 and 10 are the same). The functions here are
lines 6-11. A vector has no factored form: the authors' reference keeps a full ``v`` and steps
``lr m_t`` without the confidence (``came_pytorch`` 0.1.3; pytorch_optimizer's ``CAME`` does the same).
"""

from __future__ import annotations

from torch import Tensor

from .adafactor import factored_rsqrt


def came_first_moment_(m: Tensor, u: Tensor, beta1: float) -> Tensor:
    """``m_t = b1 m_{t-1} + (1 - b1) u^_t`` in place (line 6; ``u`` is the clipped update). Returns ``m``."""
    return m.mul_(beta1).add_(u, alpha=1.0 - beta1)


def came_instability_(u: Tensor, m: Tensor, eps2: float) -> Tensor:
    """``U_t + eps2 = (u^_t - m_t)^2 + eps2`` (line 7 with the ``eps2`` of lines 8-9), written into ``u``
    (the clipped update, not needed after it). Returns ``u``."""
    return u.sub_(m).square_().add_(eps2)


def came_direction(res_row: Tensor, res_col: Tensor, m: Tensor) -> Tensor:
    """``m_t / sqrt(S_t)`` with ``S_t = R_t C_t / (1_n^T R_t)`` (lines 10-11 without ``lr``), a new tensor:
    ``(R / mean(R))^-1/2 C^-1/2 m`` (means of the statistics, as :func:`~.adafactor.factored_rsqrt`).
    ``res_row`` / ``res_col``: ``R_t``, ``C_t`` after line 8-9's update; leading dimensions are batch
    dimensions."""
    return factored_rsqrt(res_row, res_col).mul_(m)
