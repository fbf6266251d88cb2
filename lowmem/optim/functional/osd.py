"""Online Subspace Descent (Liang et al. 2024, "Memory-Efficient LLM Training with Online Subspace
Descent"): the projection is learned online, by a small optimizer step on the PCA objective.
"""

from __future__ import annotations

from torch import Tensor


def pca_loss_grad(basis: Tensor, g: Tensor, side: str) -> Tensor:
    """Gradient in ``P`` of the reconstruction loss of the normalized gradient (Section 3, eq. 5):

    ``L(P) = || G_n - P P^T G_n ||_F^2`` for a left basis ``P`` (``m x r``), ``G_n = G / ||G||``;
    for a right basis ``Q`` (``r x n``), ``L(Q) = || G_n - G_n Q^T Q ||_F^2``. In closed form
    (``E`` the reconstruction error): ``dL/dP = 2 (E G_n^T + G_n E^T) P`` and
    ``dL/dQ = 2 Q (E^T G_n + G_n^T E)``. No SVD is needed after the first.
    """
    gn = g / g.norm()
    if side == "left":
        err = basis @ (basis.t() @ gn) - gn
        return 2 * (err @ (gn.t() @ basis) + gn @ (err.t() @ basis))
    err = (gn @ basis.t()) @ basis - gn
    return 2 * ((basis @ err.t()) @ gn + (basis @ gn.t()) @ err)
