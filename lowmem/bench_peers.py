"""Peer packages and recommended settings for ``lowmem bench --task text`` and ``--shapes``.

**Peers** are the packages lowmem's recipes replace (galore-torch, fira, apollo-torch, adam-mini,
bitsandbytes, transformers' Adafactor, torchao's 4- and 8-bit AdamW, ``torch.optim.Muon``, and pytorch_optimizer's
SPAM, StableSPAM, GaLore, Fira, APOLLO, AdaFactor, CAME, NorMuon, Lion and SM3 as ``po_*``; the CAME authors' ``came_pytorch``;
bitsandbytes' ``Lion`` / ``Lion8bit`` as ``bnb_lion*``), put in the same table as rows named
``peer:<package>`` when they are installed. They are benchmark extras, never runtime dependencies:
each is imported only when its row is built, and one that is missing (or cannot run here, e.g. a
CUDA-only kernel) becomes a "skipped" line with the reason, never an error. ``torch.optim.AdamW`` is
the baseline row of every table (``torch_adamw``), so it is not repeated as a peer. With ``--shapes``,
``--peers`` beside named optimizers adds only the peers of those recipes (:func:`peers_for`; the others
are listed as left out); with none named, every peer.

**Recommended settings** (:data:`RECOMMENDED`): the learning rate (and any other hyperparameter) each
optimizer's authors recommend for pre-training / training a small LM, with the source of each value.
Optimizers registered later that have no entry run at their recipe's default learning rate, and the
table says so in its ``lr source`` column (``"recipe default (no entry in RECOMMENDED)"``).
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Recommended:
    """One optimizer's recommended settings.

    Attributes:
        lr: Peak learning rate (the cosine schedule's maximum).
        hparams: Other hyperparameters the source sets (besides ``rank``, which the benchmark chooses
            from the model: hidden size / 4 on the text task, 128 on the shapes).
        source: Where the values come from.
    """

    lr: float
    source: str
    hparams: dict[str, Any] = field(default_factory=dict)


_ADAMW_SRC = ("nanoGPT config/train_shakespeare_char.py (a ~10M-parameter character LM): learning_rate = 1e-3; "
              "weight decay 0.01 = torch.optim.AdamW's default")
_SAME_AS_ADAM = "uses the AdamW baseline's hyperparameters: "

#: Recommended settings per registered name (see :class:`Recommended`). Keep the source next to each value.
RECOMMENDED: dict[str, Recommended] = {
    "torch_adamw": Recommended(1e-3, _ADAMW_SRC, {"weight_decay": 0.01}),
    "adamw": Recommended(1e-3, _ADAMW_SRC, {"weight_decay": 0.01}),
    "adamw8bit": Recommended(1e-3, _SAME_AS_ADAM + "Dettmers et al. 2022, Sec. 4 (8-bit optimizers keep the 32-bit "
                             "hyperparameters)", {"weight_decay": 0.01}),
    "adamw4bit": Recommended(1e-3, _SAME_AS_ADAM + "Li et al. 2023, Sec. 5 (4-bit states at the 32-bit baseline's "
                             "hyperparameters)", {"weight_decay": 0.01}),
    "adamw4bit_rank1": Recommended(1e-3, _SAME_AS_ADAM + "Li et al. 2023, Sec. 5", {"weight_decay": 0.01}),
    "adafactor": Recommended(1e-3, "transformers docs, Adafactor: 'Adafactor(..., scale_parameter=False, "
                             "relative_step=False, warmup_init=False, lr=1e-3)' for an external lr schedule"),
    "galore_adamw": Recommended(1e-2, "GaLore README / Zhao et al. 2024 App. C (LLaMA 60M-1B pre-training): lr 0.01, "
                                "galore_scale 0.25, update_proj_gap 200", {"scale": 0.25, "update_proj_gap": 200}),
    "galore_adamw8bit": Recommended(1e-2, "GaLore README (8-bit GaLore at GaLore's settings): lr 0.01, scale 0.25",
                                    {"scale": 0.25, "update_proj_gap": 200}),
    "galore_adafactor": Recommended(1e-2, "GaLore's settings (lr 0.01, scale 0.25) with Adafactor on an external lr",
                                    {"scale": 0.25, "update_proj_gap": 200}),
    "fira_adamw": Recommended(1e-2, "Fira README pre-training scripts (llama_60m): --lr 0.01 --alpha 0.25 "
                              "--update_proj_gap 200", {"scale": 0.25, "update_proj_gap": 200}),
    "fira_adamw8bit": Recommended(1e-2, "Fira's settings (lr 0.01, alpha 0.25) with 8-bit projected moments",
                                  {"scale": 0.25, "update_proj_gap": 200}),
    "apollo_adamw": Recommended(1e-2, "APOLLO README (Zhu et al. 2024) pre-training scripts: lr 0.01, rank 256 "
                                "(here hidden/4), scale_type channel, apollo_scale 1, update_proj_gap 200",
                                {"scale": 1.0, "update_proj_gap": 200}),
    "apollo_mini": Recommended(1e-2, "APOLLO README, APOLLO-Mini: lr 0.01, rank 1, scale_type tensor, apollo_scale 128",
                               {"scale": 128.0, "update_proj_gap": 200}),
    "frugal": Recommended(1e-3, "AdamW's lr for the state-full part, signSGD at the same lr (free_lr_scale 1), as FRUGAL "
                          "(Zmushko et al. 2024) compares them; the paper's exact value for this size not checked"),
    "frugal8bit": Recommended(1e-3, "FRUGAL's settings (lr 1e-3) with 8-bit projected moments"),
    "osd_adamw": Recommended(1e-3, _SAME_AS_ADAM + "Liang et al. 2024 (OSD) run it at AdamW's lr; value for this size not checked"),
    "microadam": Recommended(1e-3, _SAME_AS_ADAM + "Modoranu et al. 2024 run MicroAdam at Adam's learning rates; value for this size not checked"),
    "spam": Recommended(1e-3, _SAME_AS_ADAM + "SPAM (Huang et al. 2025) LLaMA pre-training, as AdamW; value for this size not checked"),
    "stable_spam": Recommended(1e-3, _SAME_AS_ADAM + "Stable-SPAM (Huang et al. 2025) LLaMA pre-training, as AdamW; value for this size not checked"),
    "adam_mini": Recommended(1e-3, "adam-mini README: 'use the same hyperparameters as AdamW' (lr, betas, wd)"),
    "muon": Recommended(1e-3, "Moonlight (Liu et al. 2025): adjust_lr_fn='match_rms_adamw' lets Muon reuse AdamW's "
                        "lr and weight decay (lr 1e-3 here, wd 0.1 = torch.optim.Muon's default)"),
    "normuon": Recommended(1e-3, "NorMuon (Li et al. 2025) Algorithm 1: the update rescaled to RMS 0.2 (update_scale="
                           "'match_rms') so AdamW's lr carries over, as muon's match_rms_adamw (lr 1e-3 here, wd 0.1)"),
    "scale": Recommended(1e-3, "lowmem's recipe default (Glentis et al. 2025 tune lr per model; none given for "
                         "this size)"),
    "sinkgd": Recommended(1e-3, "lowmem's recipe default (Scetbon et al. 2025 tune lr per model; none given for "
                          "this size)"),
    "adamw_sn": Recommended(1e-2, "timmytonga/sn-sm examples.sh and README (LLaMA 60M-350M): AdamSN at lr 5e-2 where "
                            "Adam runs at 5e-3, 'typically 10 times larger than Adam': 10 x the AdamW baseline here"),
    "adamw_snsm": Recommended(1e-2, "timmytonga/sn-sm examples.sh: AdamSNSM at lr 5e-2 (10 x their Adam), rank 128, "
                              "update_proj_gap 100-200: 10 x the AdamW baseline here", {"update_proj_gap": 200}),
    "sgd_sm": Recommended(3e-2, "no value in the authors' scripts; lowmem's tiny task (docs/optimizers.md): 3e-2 "
                          "(1.07 x AdamW's loss; AdamW's 3e-3 is 2.0 x)", {"update_proj_gap": 200}),
    "adagrad_sn": Recommended(3e-2, "the authors' AdaGradSNSM runs at lr 1 (200 x their Adam, examples.sh); lowmem's tiny "
                              "task: 3e-2 (1.02 x AdamW's loss), 3e-3 does not train"),
    "adagrad_snsm": Recommended(3e-2, "as adagrad_sn (the authors' adagrad_snsm: lr 1, rank 128, update_proj_gap 100-200)",
                                {"update_proj_gap": 200}),
    "lomo": Recommended(3e-2, "OpenLMLab/LOMO lomo/config/args_lomo.yaml (LLaMA-7B fine-tuned on SuperGLUE WiC): "
                        "learning_rate 0.03, weight_decay 0; also the best of lowmem's text-task sweep "
                        "(3.3e-3 / 1e-2 / 3e-2, docs/benchmarks.md)"),
    "adalomo": Recommended(3e-2, "lowmem's text-task sweep (docs/benchmarks.md): best of 3.3e-3 / 1e-2 / 3e-2 at 3e-2 "
                           "(0.897 x AdamW's loss) for pre-training from scratch; the authors fine-tune LLaMA-7B at "
                           "5e-4 (OpenLMLab/LOMO adalomo/instruction-tuning/train.py), a fine-tuning rate"),
    "sm3": Recommended(3e-2, "no value for a small LM in the paper or the authors' code (their README: quadratic lr "
                       "warm-up, no decay: the sums decay the step); lowmem's tiny task (docs/optimizers.md): 3e-2 with "
                       "momentum 0.9 (1.00 x AdamW's eval loss), 1e-2 without (1.02 x)", {"momentum": 0.9}),
    "racs": Recommended(2e-2, "Gong et al. 2025, Table 9 (LLaMA 60M-1.3B on C4): lr 0.02, beta 0.9, scale alpha 0.05 "
                        "(0.02 at 1.3B), limiter gamma 1.01, 5 fixed-point iterations: the recipe's defaults; lowmem's "
                        "text task: 0.924 x AdamW's held-out loss (5e-2 0.908)"),
    "alice": Recommended(2e-2, "Gong et al. 2025 (arXiv 2502.07752) and pytorch_optimizer's Alice defaults: lr 0.02, "
                         "alpha 0.3, alpha_c 0.4, update_interval 200, leading_basis 40 of rank 256 (here hidden/4); "
                         "lowmem's text task: 0.881 x AdamW's held-out loss at 2e-2, 0.858 at 1e-2 (docs/subspace.md)",
                         {"scale": 0.3, "update_proj_gap": 200}),
    "came": Recommended(2e-4, "the CAME authors' README (yangluo7/CAME, its came_pytorch usage line): lr=2e-4, "
                        "weight_decay=1e-2, betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16); lowmem's text task (one seed): "
                        "1.036 x AdamW's held-out loss (1.041 without the decay, 1.090 at 1e-3)", {"weight_decay": 0.01}),
    "lion": Recommended(1e-3, "Chen et al. 2023 advise an lr 3-10x smaller than AdamW's and a 3-10x larger decay; on "
                        "lowmem's small tasks that is too small: text task (one seed) 1.343 x AdamW's held-out loss at the "
                        "recipe default 1e-4, 1.103 at 3e-4 with weight decay 0.03, 1.068 at AdamW's 1e-3; tiny task "
                        "(docs/benchmarks.md) 0.997 at 1e-3, 1.785 at 1e-4"),
    "lion8bit": Recommended(1e-3, "lion's (Dettmers et al. 2022: 8-bit states keep the 32-bit hyperparameters); tiny task "
                            "(docs/benchmarks.md) 0.994 x AdamW's loss at 1e-3, 1.789 at 1e-4"),
}

NO_ENTRY = "recipe default (no entry in RECOMMENDED)"


def recommended(name: str) -> Recommended:
    """The recommended settings of a registered optimizer (or ``torch_adamw``); one without an entry in
    :data:`RECOMMENDED` gets its recipe's default lr (``source`` says so), or 1e-3 when the recipe has none."""
    if name in RECOMMENDED:
        return RECOMMENDED[name]
    from lowmem.optim import get_entry

    entry = get_entry(name)
    lr = entry.recipe.all_hparams()["lr"].default if entry.recipe is not None and "lr" in entry.recipe.all_hparams() else None
    if lr is None:
        return Recommended(1e-3, NO_ENTRY + "; the recipe has no default lr: 1e-3")
    return Recommended(float(lr), NO_ENTRY)


# ---- peers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A peer package's optimizer.

    Attributes:
        name: Row label after ``peer:``.
        module: The import name whose presence decides whether the peer runs.
        recipe: The lowmem recipe it compares to (its recommended settings and rank are used).
        build: ``build(model, lr, rank, settings) -> optimizer`` (``settings``: the recipe's recommended
            hyperparameters besides lr and rank).
        cpu: Whether it runs on the CPU (``False``: skipped there with a note).
    """

    name: str
    module: str
    recipe: str
    build: Callable[..., torch.optim.Optimizer]
    cpu: bool = True


def _subspace_groups(model: nn.Module, keys: dict[str, Any], weight_decay: float = 0.0) -> list[dict[str, Any]]:
    from lowmem.optim import build_param_groups

    return build_param_groups(model, weight_decay=weight_decay, subspace=True, subspace_hparams=keys)


def _galore(model, lr, rank, st):
    from galore_torch import GaLoreAdamW

    keys = {"rank": rank, "update_proj_gap": st.get("update_proj_gap", 200), "scale": st.get("scale", 0.25),
            "proj_type": "std"}
    return GaLoreAdamW(_subspace_groups(model, keys), lr=lr, weight_decay=0.0, no_deprecation_warning=True)


def _fira(model, lr, rank, st):
    from fira import FiraAdamW

    keys = {"rank": rank, "update_proj_gap": st.get("update_proj_gap", 200), "alpha": st.get("scale", 0.25),
            "proj_type": "std"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return FiraAdamW(_subspace_groups(model, keys), lr=lr, weight_decay=0.0)


def _apollo(mini: bool):
    def build(model, lr, rank, st):
        from apollo_torch import APOLLOAdamW

        keys = {"rank": 1 if mini else rank, "proj": "random", "scale_type": "tensor" if mini else "channel",
                "update_proj_gap": st.get("update_proj_gap", 200), "scale": st.get("scale", 128.0 if mini else 1.0),
                "proj_type": "std"}
        return APOLLOAdamW(_subspace_groups(model, keys), lr=lr, weight_decay=0.0)

    return build


def _adam_mini(model, lr, rank, st):
    from adam_mini import Adam_mini

    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("adam-mini needs the model's config (hidden_size, num_attention_heads)")
    return Adam_mini(model.named_parameters(), lr=lr, weight_decay=0.0, dim=cfg.hidden_size,
                     n_heads=cfg.num_attention_heads, n_kv_heads=getattr(cfg, "num_key_value_heads", None), verbose=False)


def _bnb(model, lr, rank, st):
    import bitsandbytes as bnb

    from lowmem.optim import build_param_groups

    return bnb.optim.AdamW8bit(build_param_groups(model, weight_decay=st.get("weight_decay", 0.01)), lr=lr)


def _hf_adafactor(model, lr, rank, st):
    from transformers.optimization import Adafactor

    from lowmem.optim import build_param_groups

    return Adafactor(build_param_groups(model, weight_decay=0.0), lr=lr, scale_parameter=False, relative_step=False,
                     warmup_init=False)


class _Chain(torch.optim.Optimizer):
    """Several torch optimizers stepped as one (Muon for the 2-D hidden weights + AdamW for the rest, as
    torch's Muon documentation pairs them), so one LR scheduler and one ``step()`` drive both. Holds no
    state of its own: ``param_groups`` are the members' group dicts (a scheduler's lr reaches them), and
    ``state`` is a merged view for counting bytes."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):  # noqa: D107  (no super().__init__: no groups of its own)
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]
        self.defaults = {}
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    @property
    def state(self):  # type: ignore[override]
        return {p: st for o in self.optimizers for p, st in o.state.items()}

    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def _torch_muon(model, lr, rank, st):
    """``torch.optim.Muon`` (adjust_lr_fn="match_rms_adamw", lowmem's ``muon`` default: AdamW's lr and decay)
    on the targeted 2-D weights, ``torch.optim.AdamW(betas=(0.9, 0.95))`` on the rest, as lowmem's muon."""
    groups = _subspace_groups(model, {"use_muon": True}, weight_decay=0.1)
    muon = [g for g in groups if g.get("use_muon")]
    rest = [{k: v for k, v in g.items() if k != "use_muon"} for g in groups if not g.get("use_muon")]
    opts: list[torch.optim.Optimizer] = []
    if muon:
        opts.append(torch.optim.Muon([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in muon], lr=lr,
                                     adjust_lr_fn="match_rms_adamw"))
    if rest:
        opts.append(torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=True))
    return _Chain(opts)


def _torchao(bits: int):
    """``torchao.optim.AdamW4bit`` / ``AdamW8bit`` (torchao 0.18.0): block-wise quantized moments, block 128
    (4-bit) / 256 (8-bit) and tensors under 4096 elements kept in float32, as lowmem's ``adamw4bit`` /
    ``adamw8bit`` defaults; weight decay 0.01 on the decayed group. Its step is ``torch.compile``-d (on the
    CPU too): the first step of each shape compiles, so it is timed apart as every first step is."""

    def build(model, lr, rank, st):
        import torchao.optim as tao

        from lowmem.optim import build_param_groups

        cls = tao.AdamW4bit if bits == 4 else tao.AdamW8bit
        return cls(build_param_groups(model, weight_decay=st.get("weight_decay", 0.01)), lr=lr)

    return build


# ---- pytorch_optimizer (4.1.0, the dev extra) ------------------------------------------------------


def _po_spam(model, lr, rank, st):
    """pytorch_optimizer's ``SPAM`` as lowmem's ``spam``: ``density=1.0`` (every entry updated: SPAM without
    the sparse masks, which lowmem does not implement; pytorch_optimizer still gathers 2-D gradients through
    an all-true mask), ``threshold=5000``, ``grad_accu_steps=20``, momentum reset every
    ``update_proj_gap=500`` steps (lowmem ``reset_interval``), cosine warm-up over ``warmup_epoch=150`` steps
    (``warmup_steps``), ``eps=1e-6``, betas (0.9, 0.999), no weight decay: lowmem's recipe defaults.
    ``foreach`` at its default (``None``: off on the CPU). Its warm-up multiplier after a reset is not lowmem's
    closed-form cosine (its ``CosineDecay`` drives torch's recursive ``CosineAnnealingLR`` from a set
    ``last_epoch``); without a warm-up the two step alike (tests/test_bench.py), and a step costs the same."""
    from pytorch_optimizer import SPAM

    from lowmem.optim import build_param_groups

    return SPAM(build_param_groups(model, weight_decay=0.0), lr=lr, betas=(0.9, 0.999), density=1.0, weight_decay=0.0,
                warmup_epoch=st.get("warmup_steps", 150), threshold=st.get("threshold", 5000),
                grad_accu_steps=st.get("grad_accu_steps", 20), update_proj_gap=st.get("reset_interval", 500), eps=1e-6)


def _po_stable_spam(model, lr, rank, st):
    """pytorch_optimizer's ``StableSPAM`` as lowmem's ``stable_spam``: ``gamma1=0.7``, ``gamma2=0.9``,
    ``theta=0.999``, momentum reset every ``update_proj_gap=1000`` steps (``reset_interval``), ``t_max=None``
    (no beta1 decay), ``eps=1e-8``, betas (0.9, 0.999), no weight decay: lowmem's recipe defaults (lowmem's
    ``stats_step="global"`` is this package's bias-correction count; the two step alike, tests/test_bench.py).
    ``foreach`` at its default (off)."""
    from pytorch_optimizer import StableSPAM

    from lowmem.optim import build_param_groups

    return StableSPAM(build_param_groups(model, weight_decay=0.0), lr=lr, betas=(0.9, 0.999), gamma1=st.get("gamma1", 0.7),
                      gamma2=st.get("gamma2", 0.9), theta=st.get("theta", 0.999), t_max=None, weight_decay=0.0,
                      update_proj_gap=st.get("reset_interval", 1000), eps=1e-8)


def _po_projected(cls_name: str, default_scale: float):
    """pytorch_optimizer's ``GaLore`` / ``Fira`` / ``APOLLO``: the targeted 2-D weights in one group with
    ``rank``, ``update_proj_gap`` (200), ``scale`` (GaLore 0.25, Fira's alpha 0.25, APOLLO 1) and
    ``projection_type="std"`` (the basis on the shorter side, as lowmem's ``proj_type="std"``), the rest
    plain AdamW; eps 1e-6, betas (0.9, 0.999), no weight decay: lowmem's recipe defaults at the recommended
    settings. GaLore and Fira take an exact SVD at refresh (lowmem ``projection="svd"``); APOLLO a seeded
    Gaussian matrix with ``scale_type="channel"`` (lowmem ``apollo_adamw``'s defaults)."""

    def build(model, lr, rank, st):
        import pytorch_optimizer as po

        keys = {"rank": rank, "update_proj_gap": st.get("update_proj_gap", 200), "scale": st.get("scale", default_scale),
                "projection_type": "std"}
        extra = {"scale_type": "channel"} if cls_name == "APOLLO" else {}
        return getattr(po, cls_name)(_subspace_groups(model, keys), lr=lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-6,
                                     **extra)

    return build


def _po_adafactor(model, lr, rank, st):
    """pytorch_optimizer's ``AdaFactor`` as lowmem's ``adafactor`` on an external lr: no first moment
    (``betas=(None, 0.999)``, lowmem ``beta1=None``), ``decay_rate=-0.8``, ``clip_threshold=1.0``,
    ``eps1=1e-30``, ``eps2=1e-3``, ``scale_parameter=False``, ``relative_step=False``, ``warmup_init=False``,
    no weight decay."""
    from pytorch_optimizer import AdaFactor

    from lowmem.optim import build_param_groups

    return AdaFactor(build_param_groups(model, weight_decay=0.0), lr=lr, betas=(None, 0.999), decay_rate=-0.8,
                     clip_threshold=1.0, scale_parameter=False, relative_step=False, warmup_init=False, eps1=1e-30,
                     eps2=1e-3, weight_decay=0.0)


def _po_came(model, lr, rank, st):
    """pytorch_optimizer's ``CAME`` as lowmem's ``came``: betas (0.9, 0.999, 0.9999), ``eps1=1e-30``,
    ``eps2=1e-16``, ``clip_threshold=1.0`` (lowmem's recipe defaults, the authors'), the recommended settings'
    weight decay on the decayed group (none without an entry); ``foreach`` at its default (``None``: on where the
    group allows, the CPU too). Steps like ``came`` to float32 rounding (tests/test_peers_came_lion.py)."""
    from pytorch_optimizer import CAME

    from lowmem.optim import build_param_groups

    eps = st.get("eps", (1e-30, 1e-16))
    return CAME(build_param_groups(model, weight_decay=st.get("weight_decay", 0.0)), lr=lr,
                betas=st.get("betas", (0.9, 0.999, 0.9999)), eps1=eps[0], eps2=eps[1],
                clip_threshold=st.get("clip_threshold", 1.0))


def _po_normuon(model, lr, rank, st):
    """pytorch_optimizer's ``NorMuon`` as lowmem's ``normuon`` defaults: the targeted 2-D weights (``use_muon``) with
    ``update_scale="match_rms"`` (the paper's RMS 0.2), momentum 0.95 (Nesterov), ``beta2=0.95``, ``eps=1e-10``,
    weight decay 0.1; the rest AdamW at the same lr, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on the decayed
    group (its ``adamw_*`` settings). Steps like ``normuon`` on 2-D weights to float32 rounding
    (tests/test_normuon_peers.py); a weight of more than 2 dimensions is its ``[size(0), -1]`` view there, per
    matrix in lowmem."""
    from pytorch_optimizer import NorMuon

    groups = _subspace_groups(model, {"use_muon": True}, weight_decay=0.1)
    for g in groups:
        g.setdefault("use_muon", False)
        if not g["use_muon"]:
            g.update(betas=(0.9, 0.95), eps=1e-8)
    return NorMuon(groups, lr=lr, momentum=0.95, beta2=0.95, weight_decay=0.1, nesterov=True,
                   update_scale="match_rms", eps=1e-10, adamw_lr=lr)


def _came_pytorch(model, lr, rank, st):
    """The authors' ``came_pytorch.CAME`` (Luo et al. 2023; ``pip install came-pytorch``) at lowmem's ``came``
    settings: betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16), ``clip_threshold=1.0``, weight decay as
    :func:`_po_came`. A plain per-tensor loop."""
    from came_pytorch import CAME

    from lowmem.optim import build_param_groups

    return CAME(build_param_groups(model, weight_decay=st.get("weight_decay", 0.0)), lr=lr,
                eps=st.get("eps", (1e-30, 1e-16)), clip_threshold=st.get("clip_threshold", 1.0),
                betas=st.get("betas", (0.9, 0.999, 0.9999)))


def _po_lion(model, lr, rank, st):
    """pytorch_optimizer's ``Lion`` as lowmem's ``lion``: betas (0.9, 0.99), weight decay as :func:`_po_came`;
    ``foreach`` at its default (``None``: on, the CPU too)."""
    from pytorch_optimizer import Lion

    from lowmem.optim import build_param_groups

    return Lion(build_param_groups(model, weight_decay=st.get("weight_decay", 0.0)), lr=lr,
                betas=st.get("betas", (0.9, 0.99)))


def _po_sm3(model, lr, rank, st):
    """pytorch_optimizer's ``SM3`` as lowmem's ``sm3``: ``beta=0`` (sums: lowmem's ``beta2=1``), ``eps=1e-30``, the
    recommended settings' momentum; no weight decay (it has none; lowmem's entry sets none). Steps like ``sm3`` to
    float32 rounding (tests/test_sm3_core.py)."""
    from pytorch_optimizer import SM3

    from lowmem.optim import build_param_groups

    return SM3(build_param_groups(model, weight_decay=0.0), lr=lr, momentum=st.get("momentum", 0.0), beta=0.0,
               eps=st.get("eps", 1e-30))


def _po_racs(model, lr, rank, st):
    """pytorch_optimizer's ``RACS`` at lowmem's ``racs`` settings (its defaults beta 0.9, alpha 0.05, gamma 1.01;
    no weight decay): a different algorithm under the same name (EMAs of the row and column mean squares, no
    Eq. 16 fixed point; docs/optimizers.md), benched as the package's RACS."""
    from pytorch_optimizer import RACS

    from lowmem.optim import build_param_groups

    return RACS(build_param_groups(model, weight_decay=st.get("weight_decay", 0.0)), lr=lr)


def _po_alice(model, lr, rank, st):
    """pytorch_optimizer's ``Alice`` as lowmem's ``alice``: the targeted 2-D weights in one group with ``rank``,
    ``update_interval`` (``update_proj_gap``, 200) and ``leading_basis = rank - floor(rank * switch_fraction)``
    (lowmem's default fraction: 40 of 256 kept); betas (0.9, 0.9, 0.999), ``alpha`` 0.3, ``alpha_c`` 0.4, ``gamma``
    1.01, eps 1e-8, no weight decay: lowmem's defaults. It has no full-rank rule: its other groups run Alice at
    rank ``min(256, rows)`` (a vector as one column: Adam in a rotated basis, no compensation), where lowmem's
    take AdamW steps; it projects every weight's rows (lowmem the shorter side); its first basis is the
    coordinate axes (docs/subspace.md, "Alice")."""
    import math

    from pytorch_optimizer import Alice

    keys = {"rank": rank, "update_interval": st.get("update_proj_gap", 200),
            "leading_basis": rank - math.floor(rank * st.get("switch_fraction", 0.84375))}
    return Alice(_subspace_groups(model, keys), lr=lr, betas=(0.9, 0.9, 0.999), alpha=st.get("scale", 0.3),
                 alpha_c=st.get("alpha_c", 0.4), weight_decay=0.0)


def _bnb_lion(bits: int):
    """bitsandbytes' ``Lion`` (``optim_bits=32``) / ``Lion8bit`` as lowmem's ``lion`` / ``lion8bit``: betas (0.9,
    0.99), weight decay as :func:`_po_came`; 8-bit: blocks of 256 (its only size) and tensors under
    ``min_8bit_size=4096`` elements in float32 (lowmem's ``min_quant_size``). bitsandbytes 0.50 steps both on the
    CPU with its CPU kernels."""

    def build(model, lr, rank, st):
        import bitsandbytes as bnb

        from lowmem.optim import build_param_groups

        groups = build_param_groups(model, weight_decay=st.get("weight_decay", 0.0))
        betas = st.get("betas", (0.9, 0.99))
        if bits == 8:
            return bnb.optim.Lion8bit(groups, lr=lr, betas=betas, min_8bit_size=st.get("min_quant_size", 4096))
        return bnb.optim.Lion(groups, lr=lr, betas=betas, optim_bits=32)

    return build


def _bnb_ademamix(bits: int):
    """bitsandbytes' ``AdEMAMix`` (``optim_bits=32``) / ``AdEMAMix8bit`` as lowmem's ``ademamix`` / ``ademamix8bit``:
    their shared defaults (betas (0.9, 0.999, 0.9999), alpha 5, no schedulers, eps 1e-8), on lowmem's decay
    groups with the recommended settings' ``weight_decay`` (else the recipes' and bitsandbytes' default 1e-2); 8-bit: blocks of
    256 (its only size) and tensors under ``min_8bit_size=4096`` elements in float32 (lowmem's ``min_quant_size``).
    bitsandbytes 0.50 steps both on the CPU with its CPU kernels (equal to lowmem's: tests/test_ademamix.py)."""

    def build(model, lr, rank, st):
        import bitsandbytes as bnb

        from lowmem.optim import build_param_groups

        groups = build_param_groups(model, weight_decay=st.get("weight_decay", 1e-2))
        betas = (*st.get("betas", (0.9, 0.999)), st.get("beta3", 0.9999))
        kw = dict(lr=lr, betas=betas, alpha=st.get("alpha", 5.0), t_alpha=st.get("t_alpha"),
                  t_beta3=st.get("t_beta3"))
        if bits == 8:
            return bnb.optim.AdEMAMix8bit(groups, min_8bit_size=st.get("min_quant_size", 4096), **kw)
        return bnb.optim.AdEMAMix(groups, optim_bits=32, **kw)

    return build


#: Every peer the benchmarks know, in table order.
PEERS: tuple[Peer, ...] = (
    Peer("transformers_adafactor", "transformers", "adafactor", _hf_adafactor),
    Peer("galore_torch", "galore_torch", "galore_adamw", _galore),
    Peer("fira", "fira", "fira_adamw", _fira),
    Peer("apollo_torch", "apollo_torch", "apollo_adamw", _apollo(False)),
    Peer("apollo_torch_mini", "apollo_torch", "apollo_mini", _apollo(True)),
    Peer("adam_mini", "adam_mini", "adam_mini", _adam_mini),
    Peer("bitsandbytes", "bitsandbytes", "adamw8bit", _bnb),
    Peer("torch_muon", "torch", "muon", _torch_muon),
    Peer("torchao", "torchao", "adamw4bit", _torchao(4)),
    Peer("torchao_8bit", "torchao", "adamw8bit", _torchao(8)),
    Peer("po_spam", "pytorch_optimizer", "spam", _po_spam),
    Peer("po_stable_spam", "pytorch_optimizer", "stable_spam", _po_stable_spam),
    Peer("po_galore", "pytorch_optimizer", "galore_adamw", _po_projected("GaLore", 0.25)),
    Peer("po_fira", "pytorch_optimizer", "fira_adamw", _po_projected("Fira", 0.25)),
    Peer("po_apollo", "pytorch_optimizer", "apollo_adamw", _po_projected("APOLLO", 1.0)),
    Peer("po_adafactor", "pytorch_optimizer", "adafactor", _po_adafactor),
    Peer("po_came", "pytorch_optimizer", "came", _po_came),
    Peer("came_pytorch", "came_pytorch", "came", _came_pytorch),
    Peer("po_normuon", "pytorch_optimizer", "normuon", _po_normuon),
    Peer("po_lion", "pytorch_optimizer", "lion", _po_lion),
    Peer("po_sm3", "pytorch_optimizer", "sm3", _po_sm3),
    Peer("po_racs", "pytorch_optimizer", "racs", _po_racs),
    Peer("po_alice", "pytorch_optimizer", "alice", _po_alice),
    Peer("bnb_lion", "bitsandbytes", "lion", _bnb_lion(32)),
    Peer("bnb_lion8bit", "bitsandbytes", "lion8bit", _bnb_lion(8)),
    Peer("bnb_ademamix", "bitsandbytes", "ademamix", _bnb_ademamix(32)),
    Peer("bnb_ademamix8bit", "bitsandbytes", "ademamix8bit", _bnb_ademamix(8)),
)


def peer_label(peer: Peer) -> str:
    return f"peer:{peer.name}"


def get_peer(label: str) -> Peer:
    """The peer named ``peer:NAME`` (or ``NAME``); a ValueError lists the valid names."""
    name = label.removeprefix("peer:")
    for p in PEERS:
        if p.name == name:
            return p
    raise ValueError(f"unknown peer {label!r}; valid: {', '.join(peer_label(p) for p in PEERS)}")


def peers_for(recipes: set[str] | frozenset[str], peers: tuple[Peer, ...] | list[Peer] = PEERS,
              ) -> tuple[list[Peer], dict[str, str]]:
    """The peers ``--peers`` adds beside the rows of ``recipes`` (registered names, variants stripped): those
    of ``peers`` that stand for one of them (:attr:`Peer.recipe`), or all of them when ``recipes`` is empty
    (no recipe named). Returns them (in order) and, per ``peer:NAME`` left out, why."""
    if not recipes:
        return list(peers), {}
    chosen = [p for p in peers if p.recipe in recipes]
    left = {peer_label(p): f"stands for {p.recipe}, not among the named optimizers"
            for p in peers if p.recipe not in recipes}
    return chosen, left


def peer_missing(peer: Peer) -> str | None:
    """``None`` when the peer's package is installed, else the line saying it is not and how to install it."""
    if importlib.util.find_spec(peer.module) is None:
        return f"{peer.module} is not installed (pip install {peer.module.replace('_', '-')})"
    return None


def peer_status(peer: Peer, device: str = "cpu") -> str | None:
    """``None`` when the peer can run here, else why it is skipped (one line)."""
    missing = peer_missing(peer)
    if missing is not None:
        return missing
    if device == "cpu" and not peer.cpu:
        return f"{peer.module} has no CPU path"
    return None


def probe_peer(peer: Peer, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str | None:
    """Build the peer on a two-layer toy model with ``dtype`` weights and take one step: ``None`` if that works,
    else the reason it cannot run here (its exception, one line, naming the device and a dtype other than
    float32). A peer "supports" bfloat16 weights (``lowmem bench --task text --dtype bfloat16``) when this probe
    succeeds on them. Catches everything: a peer is an optional extra."""
    reason = peer_status(peer, device)
    if reason is not None:
        return reason
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    try:
        opt = peer.build(model, 1e-3, 8, dict(recommended(peer.recipe).hparams))
        ids = torch.randint(0, 64, (2, 8), device=device)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    except Exception as err:  # noqa: BLE001  (an optional package failing here is a skip, not an error)
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        where = device if dtype == torch.float32 else f"{device} with {str(dtype).removeprefix('torch.')} weights"
        return f"{peer.module} failed on {where}: {type(err).__name__}: {msg[:200]}"
    return None
