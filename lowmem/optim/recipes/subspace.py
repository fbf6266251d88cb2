"""Subspace recipes: GaLore, Fira, FRUGAL and Online Subspace Descent on the engine.

All four keep the optimizer state of a 2-D weight in a small subspace (rank ``r``); they differ in
how the subspace is chosen (``projection``), what happens to the gradient outside it (the residual
rule) and what the moments do when the subspace changes (``moment_policy``). The parts live in
:mod:`lowmem.optim.subspace`; each recipe below is a few lines plus its registry entry.

Parameter groups: a group with ``rank`` is projected (its 2-D parameters; others in it are trained
full-rank), a group without is trained full-rank with the same moment rule, as in galore-torch.
``create_optimizer(model, "galore_adamw", rank=64, target_modules=[...])`` builds them.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from ..engine import LowMemOptimizer, Recipe, moment_step
from ..functional import galore as GL
from ..hparams import BETAS, EPS, LR, WEIGHT_DECAY, HParam, nonneg, one_of, optional, positive, positive_int
from ..moments import AdamMoments, FactoredMoments, adafactor_lr
from ..registry import register
from ..subspace import (
    BASIS_METHODS,
    COORDINATE_METHODS,
    MOMENT_POLICIES,
    PROJ_TYPES,
    DropResidual,
    FiraResidual,
    StateFreeResidual,
    SubspaceProjection,
)
from .full_rank import ADAFACTOR_HPARAMS, Adafactor, _check_adafactor_group


def _nonneg_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _choice(name: str, default: str, choices: Iterable[str], doc: str) -> HParam:
    choices = tuple(choices)
    return HParam(name, default, one_of(*choices), f"one of {list(choices)}", doc)


#: the refresh schedules (SubspaceProjection.init_state's phase)
REFRESH_PHASES = ("aligned", "multiples", "staggered")


def subspace_hparams(
    projection: str, methods: Iterable[str], scale: float, moment_policy: str, rank: int = 128,
    refresh_phase: str = "aligned",
) -> tuple[HParam, ...]:
    """The per-group settings every subspace recipe shares (defaults differ per recipe)."""
    return (
        HParam("rank", rank, optional(positive_int), "None or an int > 0",
               "subspace rank r (a parameter whose smaller side is <= r is trained full-rank, with a warning;"
               " a group where that holds for every 2-D parameter is an error naming the valid range)"),
        HParam("update_proj_gap", 200, positive_int, "an int > 0", "steps between projection refreshes (T)"),
        HParam("scale", scale, positive, "a finite float > 0", "alpha: multiplies the projected-back update"),
        _choice("proj_type", "std", PROJ_TYPES, "which side a basis projects (galore-torch's proj_type)"),
        _choice("projection", projection, methods, "how the subspace is chosen (see docs/subspace.md)"),
        _choice("moment_policy", moment_policy, MOMENT_POLICIES, "moments when the subspace changes"),
        _choice("refresh_phase", refresh_phase, REFRESH_PHASES,
                "'aligned': refreshes at steps 1, T+1, 2T+1, ... (galore-torch); 'multiples': at 1, T, 2T, ..."
                " (timmytonga/sn-sm); 'staggered' spreads the parameters' refreshes over the update_proj_gap steps"),
        HParam("seed", 0, _nonneg_int, "an int >= 0", "seed of random projections and coordinate choices"),
        HParam("power_iters", 2, _nonneg_int, "an int >= 0", "subspace iterations per 'rsvd' refresh"),
    )


def _unit_interval_open_left(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1


#: Q-GaLore's layer-adaptive lazy refresh (lowmem.optim.subspace.lazy_interval), opt-in: the recipes whose refresh
#: is an SVD of the gradient (LAZY_RECIPES; OSD takes the keys only to refuse them by name)
LAZY_REFRESH_HPARAMS = (
    HParam("lazy_refresh_threshold", None, optional(_unit_interval_open_left), "None or a float in (0, 1]",
           "Q-GaLore's lazy refresh (Zhang et al. 2024, Section 3): when the mean |cos| of the first basis vectors"
           " of the last lazy_refresh_patience successive refreshes is >= this, the parameter's refresh interval"
           " doubles (projection 'svd' or 'rsvd'; the authors' 0.4); None: off, every update_proj_gap steps"),
    HParam("lazy_refresh_patience", 5, positive_int, "an int >= 1",
           "how many successive refresh similarities the lazy refresh averages (the authors' queue_size, 5)"),
)
#: the recipes that take lazy_refresh_threshold (and their 8-bit variants)
LAZY_RECIPES = ("galore_adamw", "galore_adafactor", "fira_adamw", "frugal", "adamw_snsm", "adagrad_snsm", "sgd_sm")


def _check_lazy_refresh(group: dict[str, Any]) -> None:
    """Refuse a lazy refresh where the refresh is not an SVD of the gradient, or where its path differs (a batch of
    matrices, FSDP2 shards): not silently every update_proj_gap steps."""
    if group.get("lazy_refresh_threshold") is None:
        return
    from ..sharded import is_dtensor
    from ..subspace import LAZY_METHODS

    if group.get("projection") not in LAZY_METHODS:
        raise ValueError(
            f"lazy_refresh_threshold (Q-GaLore's lazy refresh) compares successive SVD bases of the gradient: it"
            f" applies to projection in {list(LAZY_METHODS)} of {list(LAZY_RECIPES)} (and their 8-bit variants), got"
            f" projection={group.get('projection')!r}; valid here: lazy_refresh_threshold=None")
    params = group.get("params", ())
    if any(p.ndim > 2 for p in params if p.ndim >= 2 and group["rank"] < min(p.shape[-2:])):
        raise ValueError("lazy_refresh_threshold is not supported on a batch of matrices [..., A, B] (fused MoE"
                         " experts share one refresh schedule); valid here: lazy_refresh_threshold=None")
    if any(is_dtensor(p) for p in params):
        raise ValueError("lazy_refresh_threshold is not supported on FSDP2-sharded parameters yet (its per-parameter"
                         " CPU state is not converted for sharded checkpoints); valid here: lazy_refresh_threshold=None")


def _shapes_summary(shapes: list[tuple[int, ...]], most: int = 6) -> str:
    """``(64, 64) x4, (32, 64) x2, ...``: the distinct shapes in first-seen order with their counts."""
    counts: dict[tuple[int, ...], int] = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    parts = [f"{s}" + (f" x{n}" if n > 1 else "") for s, n in counts.items()]
    more = len(parts) - most
    return ", ".join(parts[:most]) + (f", and {more} more shapes" if more > 0 else "")


class RankError(ValueError):
    """A ``rank`` that applies to none of its group's 2-D parameters (:func:`check_rank_applies`).

    Attributes:
        rank (`int`): The rank given.
        side (`int`): The largest smaller side of the group's 2-D parameters (valid: ``1 .. side - 1``).
    """

    def __init__(self, message: str, rank: int, side: int):
        super().__init__(message)
        self.rank, self.side = rank, side


def check_rank_applies(group: dict[str, Any]) -> None:
    """Refuse a projected group whose ``rank`` applies to none of its 2-D parameters.

    A 2-D ``m x n`` parameter is projected when ``rank < min(m, n)`` (else it is trained full-rank,
    with a warning: :meth:`LowMemOptimizer.add_param_group`). When that holds for none of the group's
    2-D parameters, the user's rank cannot apply anywhere and the whole group would silently train
    full-rank (full-size optimizer state): a :class:`RankError` (a ``ValueError``) naming ``rank``, the shapes and the valid
    range ``1 .. max(min(m, n)) - 1`` instead. A group with no 2-D parameter (or no ``rank``) is left
    alone. A batch of matrices ``[..., A, B]`` (fused MoE experts, projected per matrix) counts as its
    ``A x B`` matrices. Called from each projection recipe's ``validate_group``, before any state exists.
    """
    rank = group.get("rank")
    if rank is None:
        return
    shapes = [tuple(p.shape[-2:]) for p in group.get("params", ()) if p.ndim >= 2]
    if not shapes or any(rank < min(s) for s in shapes):
        return
    top = max(min(s) for s in shapes)
    valid = (f"valid: rank 1 .. {top - 1} (the largest smaller side, {top}, minus 1)" if top > 1 else
             "no rank applies to a parameter with a side of 1")
    raise RankError(
        f"rank {rank} >= the smaller side of every 2-D parameter of this group ({_shapes_summary(shapes)}), so it"
        f" applies to none of them: the group would train full-rank; {valid}, or rank=None for a full-rank group",
        rank, top,
    )


def check_projected_state_dtype(group: dict[str, Any]) -> None:
    """Refuse ``state_dtype="param"`` on float64 parameters projected through a basis.

    A projected parameter's moments live in the subspace, where the state and math stay float32
    (docs/ARCHITECTURE.md, "float64 parameters stay float64"): the projection's basis is float32 and the
    projected gradient is float32 for every parameter dtype. ``state_dtype="param"`` on a float64 parameter
    asks float64 projected moments; their float64 direction then met the float32 basis in the combine-back
    (``RuntimeError: expected m1 and m2 to have the same dtype`` at the first step: GaLore, Fira, OSD,
    FRUGAL with ``projection`` in :data:`~lowmem.optim.subspace.BASIS_METHODS`, the Subset-Norm /
    Subspace-Momentum recipes, and their 8-bit variants for a projected moment left unquantized, below
    ``min_quant_size``: FOUND_AUDITOPT 4). Refused here, before any state exists, naming ``state_dtype`` and what
    is valid: ``"float32"`` (the default) or ``"bfloat16"``, which store the projected moments as a float32 or
    bfloat16 parameter's ``"param"`` does (the float64 parameter itself stays float64, its update applied in
    float64). Coordinate projections (:data:`~lowmem.optim.subspace.COORDINATE_METHODS`: a selection, no basis),
    8-bit moments that are quantized (decoded to float32), Adafactor's factored statistics (GaLore-Adafactor does
    not call this) and groups without float64 projected parameters keep ``"param"``."""
    rank = group.get("rank")
    if rank is None or group.get("state_dtype") != "param" or group.get("projection") not in BASIS_METHODS:
        return

    def unquantized(shape: tuple[int, int]) -> bool:  # (8-bit variants: Quantized's rule, on one matrix's moments)
        if "min_quant_size" not in group:
            return True
        low = GL.low_rank_shape(shape, GL.galore_side(shape, group["proj_type"]), rank)
        return math.prod(low) < group["min_quant_size"]

    shapes = [tuple(p.shape) for p in group.get("params", ())
              if p.dtype == torch.float64 and p.ndim >= 2 and rank < min(p.shape[-2:])
              and unquantized(tuple(p.shape[-2:]))]
    if shapes:
        raise ValueError(
            f"state_dtype='param' on float64 parameters projected through a {group['projection']!r} basis"
            f" ({_shapes_summary(shapes)}) would make their projected moments float64, but the subspace state and"
            " math stay float32 (the basis and the projected gradient are float32); valid for them:"
            " state_dtype='float32' (the default) or 'bfloat16' (the parameters themselves stay float64)")


def _check_subspace_settings(group: dict[str, Any]) -> None:
    if group.get("rank") is None:
        return
    check_rank_applies(group)
    _check_lazy_refresh(group)
    if group.get("proj_type") == "full" and group.get("projection") not in ("svd", "rsvd", "random", "gaussian"):
        raise ValueError(
            f"proj_type='full' (two-sided) needs projection in ['svd', 'rsvd', 'random', 'gaussian'],"
            f" got projection={group.get('projection')!r}"
        )


def _check_subspace_group(group: dict[str, Any]) -> None:
    _check_subspace_settings(group)
    check_projected_state_dtype(group)


def _check_fira_group(group: dict[str, Any]) -> None:
    _check_subspace_group(group)
    if group.get("rank") is not None and group["proj_type"] == "full":
        raise ValueError("fira_adamw scales the residual per column (left side) or per row (right side) of a"
                         " one-sided projection: proj_type must be one of ['std', 'reverse_std', 'left', 'right'],"
                         " got 'full' (fira 1.0.2 crashes on it)")


def adam_hf_unit_scale(state: dict, group: dict) -> float:
    """``sqrt(1 - beta2^t) / (1 - beta1^t)``: the bias correction folded into ``eps_placement="hf"``
    (``t`` as the moment rule counts it: from the last reset of ``moment_policy="reset"``)."""
    beta1, beta2 = group["betas"]
    t = moment_step(state, state["step"].item())
    return math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


SVD_LIKE = ("svd", "rsvd", "random", "gaussian")
GALORE_ADAM_HPARAMS = (LR(1e-3), BETAS(), EPS(1e-6), WEIGHT_DECAY(0.0))

GALORE_ADAMW = Recipe(
    name="galore_adamw",
    summary="GaLore: AdamW state in a rank-r SVD subspace of each 2-D gradient, refreshed every T steps",
    reference="Zhao et al. 2024, GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection, Algorithm 2",
    moment=AdamMoments(eps_placement="hf"),
    hparams=GALORE_ADAM_HPARAMS,
    group_hparams=(*subspace_hparams("svd", SVD_LIKE, scale=0.25, moment_policy="keep"), *LAZY_REFRESH_HPARAMS),
    projection=SubspaceProjection(),
    residual=DropResidual(),
    decay_after_update=True,
    validate_group=_check_subspace_group,
)


def _check_galore_adafactor_group(group: dict[str, Any]) -> None:
    _check_adafactor_group(group)
    _check_subspace_settings(group)  # (factored statistics: float64 ones under state_dtype="param" step, as before)


GALORE_ADAFACTOR = Recipe(
    name="galore_adafactor",
    summary="GaLore with Adafactor: factored second moment of the rank-r projected gradient",
    reference="Zhao et al. 2024 (GaLore, Section 4.3) with Shazeer & Stern 2018 (Adafactor)",
    moment=FactoredMoments(),
    hparams=ADAFACTOR_HPARAMS,
    group_hparams=(*subspace_hparams("svd", SVD_LIKE, scale=0.25, moment_policy="keep"), *LAZY_REFRESH_HPARAMS),
    projection=SubspaceProjection(),
    lr_rule=adafactor_lr,
    validate_group=_check_galore_adafactor_group,
)

FIRA_ADAMW = Recipe(
    name="fira_adamw",
    summary="Fira: GaLore's AdamW plus the residual gradient, norm-scaled and growth-limited",
    reference="Chen et al. 2024, Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?, Algorithm 1",
    moment=AdamMoments(eps_placement="hf"),
    hparams=GALORE_ADAM_HPARAMS,
    group_hparams=(
        *subspace_hparams("svd", SVD_LIKE, scale=1.0, moment_policy="keep"),
        *LAZY_REFRESH_HPARAMS,
        HParam("gamma", 1.01, lambda x: positive(x) and x >= 1, "a finite float >= 1",
               "norm-growth limiter: the residual's norm grows at most by this factor per step"),
    ),
    projection=SubspaceProjection(),
    residual=FiraResidual(unit_scale=adam_hf_unit_scale),
    decay_after_update=True,
    validate_group=_check_fira_group,
)

FRUGAL = Recipe(
    name="frugal",
    summary="FRUGAL: AdamW in a subspace (SVD, random, columns, rows, RandK, blocks), signSGD on the rest",
    reference="Zmushko et al. 2024, FRUGAL: Memory-Efficient Optimization by Reducing State Overhead, Algorithm 1",
    moment=AdamMoments(eps_placement="torch"),
    hparams=(LR(1e-3), BETAS(), EPS(1e-8), WEIGHT_DECAY(0.0)),
    group_hparams=(
        *subspace_hparams("svd", (*SVD_LIKE, *COORDINATE_METHODS), scale=1.0, moment_policy="reset"),
        *LAZY_REFRESH_HPARAMS,
        _choice("free_rule", "signsgd", ("signsgd", "sgd"), "state-free update of the residual"),
        HParam("free_lr_scale", 1.0, nonneg, "a finite float >= 0", "learning rate of the state-free part / lr"),
    ),
    projection=SubspaceProjection(),
    residual=StateFreeResidual(),
    validate_group=_check_subspace_group,
)

OSD_ADAMW = Recipe(
    name="osd_adamw",
    summary="Online Subspace Descent: GaLore's AdamW with the projection learned online (no SVD after the first)",
    reference="Liang et al. 2024, Memory-Efficient LLM Training with Online Subspace Descent, Algorithm 1",
    moment=AdamMoments(eps_placement="hf"),
    hparams=GALORE_ADAM_HPARAMS,
    group_hparams=(
        *subspace_hparams("online_pca", ("online_pca",), scale=1.0, moment_policy="keep"),
        *LAZY_REFRESH_HPARAMS,
        HParam("proj_lr", 5e-3, nonneg, "a finite float >= 0",
               "step size of the projection's own optimizer, times lr / initial_lr under an LR scheduler (the authors')"),
        _choice("proj_optimizer", "adam", ("adam", "sgd"), "optimizer of the projection (on the PCA loss)"),
        HParam("proj_weight_decay", None, optional(nonneg), "None or a finite float >= 0",
               "weight decay of the projection's optimizer; None: the authors' (torch's defaults), 0.01 for"
               " 'adam' (AdamW, decoupled), 0 for 'sgd'"),
    ),
    projection=SubspaceProjection(),
    residual=DropResidual(),
    decay_after_update=True,
    validate_group=_check_subspace_group,
)

assert set(BASIS_METHODS) >= set(SVD_LIKE)


# ---- classes for people migrating from galore-torch and fira ------------------------------------


class GaLoreAdamW(LowMemOptimizer):
    """Drop-in for ``galore_torch.GaLoreAdamW`` (galore-torch 1.0), on the lowmem engine.

    Parameter groups carry galore-torch's keys: a group with ``rank`` (and ``update_proj_gap``,
    ``scale``, ``proj_type``) is projected; other groups are plain AdamW. Same trajectory as
    galore-torch 1.0 on the same inputs (tested to float32 precision across refreshes): ``eps`` on the
    raw ``sqrt(v)``, step size ``lr sqrt(1 - beta2^t) / (1 - beta1^t)``, weight decay after the
    update, SVD refreshes at steps 1, T+1, 2T+1, ...; the state is plain tensors, so checkpoints
    load with ``weights_only=True`` (galore-torch pickles its projector objects).

    Args:
        params: Parameters or parameter groups (``rank``, ``update_proj_gap``, ``scale``,
            ``proj_type`` and lowmem's other subspace keys, see ``docs/subspace.md``).
        lr (`float`, defaults to `1e-3`): Learning rate.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): Moment decay rates.
        eps (`float`, defaults to `1e-6`): Added to ``sqrt(v)`` (before bias correction).
        weight_decay (`float`, defaults to `0.0`): Decoupled, applied after the update.
        correct_bias (`bool`, defaults to `True`): Only ``True`` is supported (galore-torch's default).
        no_deprecation_warning (`bool`, defaults to `False`): Accepted and ignored.
        state_dtype (`str`, defaults to `"float32"`): Storage of the moments.
        foreach (`bool` or `None`, defaults to `None`): Accepted for uniformity.
    """

    recipe = GALORE_ADAMW

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        *,
        state_dtype: str = "float32",
        foreach: bool | None = None,
    ):
        if not correct_bias:
            raise ValueError("correct_bias=False is not supported; valid: correct_bias=True")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype, foreach=foreach)


class GaLoreAdafactor(Adafactor):
    """Drop-in for ``galore_torch.GaLoreAdafactor``: transformers' Adafactor arguments, galore-torch's
    group keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``). See
    :class:`~lowmem.optim.Adafactor` for the arguments (the signature is Adafactor's; the recipe
    adds the projection)."""

    recipe = GALORE_ADAFACTOR


class FiraAdamW(GaLoreAdamW):
    """Drop-in for ``fira.FiraAdamW`` (fira 1.0.2): the arguments of :class:`GaLoreAdamW`; projected
    groups carry fira's keys ``rank``, ``update_proj_gap``, ``alpha`` (lowmem's ``scale``) and
    ``proj_type``, plus ``gamma`` (the norm-growth limit, 1.01 in fira). Same trajectory as fira 1.0.2
    on the same inputs (tested to float32 precision across refreshes)."""

    recipe = FIRA_ADAMW

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "alpha" in param_group:  # fira's name for the scale
            param_group = {**{k: v for k, v in param_group.items() if k != "alpha"}, "scale": param_group["alpha"]}
        super().add_param_group(param_group)


class Frugal(LowMemOptimizer):
    """FRUGAL (Zmushko et al. 2024) on the engine; keyword arguments as in ``lowmem list frugal``."""

    recipe = FRUGAL


class OnlineSubspaceDescent(LowMemOptimizer):
    """Online Subspace Descent (Liang et al. 2024) with AdamW; keyword arguments as in
    ``lowmem list osd_adamw``."""

    recipe = OSD_ADAMW


_EXAMPLE = {"rank": 4, "update_proj_gap": 5}
register(GALORE_ADAMW, GaLoreAdamW, batched_targets=True, state_precision="fp32", second_moment="full", example_hparams={**_EXAMPLE, "scale": 1.0})
register(
    GALORE_ADAFACTOR, GaLoreAdafactor, batched_targets=True, state_precision="fp32", second_moment="factored",
    example_hparams={**_EXAMPLE, "scale": 1.0, "lr": 1e-2, "relative_step": False, "scale_parameter": False},
)
register(FIRA_ADAMW, FiraAdamW, batched_targets=True, state_precision="fp32", second_moment="full", example_hparams=_EXAMPLE)
register(FRUGAL, Frugal, batched_targets=True, state_precision="fp32", second_moment="full", example_hparams={**_EXAMPLE, "projection": "columns"})
register(OSD_ADAMW, OnlineSubspaceDescent, batched_targets=True, state_precision="fp32", second_moment="full", example_hparams={"rank": 4, "proj_lr": 1e-2})
