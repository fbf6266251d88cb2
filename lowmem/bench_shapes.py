"""``lowmem bench --shapes SET``: ``optimizer.step()`` time alone on real-size weight shapes (issue 15).

No model forward or backward: the parameters of one Llama decoder layer (:data:`SHAPE_SETS`) get fixed
random gradients, and each optimizer's step is timed against ``torch.optim.AdamW(foreach=True)`` on
the same parameters, interleaved: every round times one baseline step and one step of the optimizer,
in an order that alternates from round to round, so both see the same machine load; the row reports
the median (and spread) of the per-round ratios. Steps are timed in **CPU time of this process**
(``time.process_time``), not wall time: on a machine shared with other jobs, wall time also counts
the time slices the scheduler gave to others; the CPU time of a one-thread step is the work it did
(with more threads, the work of all of them). Memory bandwidth and caches stay shared, so a busy
machine still widens the spread. Gradients are copied in from a fixed tensor before
each step (untimed), so an optimizer that modified ``p.grad`` would not change what the next one sees.

The **first step** is timed apart: it allocates the state and, for the subspace recipes, computes the
first projection (an SVD of every targeted weight for GaLore / Fira / FRUGAL; a seeded random matrix
for APOLLO), which recurs every ``update_proj_gap`` steps. ``first_step_adamw`` is its cost beyond a
steady step, in AdamW steps; ``amortised_ratio = step_time_ratio + first_step_adamw / update_proj_gap``
for the rows that refresh (the refresh amortised over its gap; the state allocation counted with it,
which overstates it slightly), the plain ratio for the others.

All contenders step the same parameters (``requires_grad`` turned back on for all of them before each
contender is built: BAdam freezes its inactive blocks), one contender's state alive at a time (besides the
baseline's), so a 7B layer (202M parameters) needs weights, gradients, the fixed gradients and two
optimizers' state: about 6 GB for AdamW-sized states. The learning rate is 1e-5 for every row (step
time does not depend on it; the weights stay sane over the few steps taken).

Besides the single layers, sets of many small tensors time the multi-tensor (foreach) paths, where a step's
per-tensor overheads dominate (:data:`TENSOR_SETS`: tensors held as plain parameters, no ``nn.Linear``, so
subspace recipes train them full-rank and Muon / SCALE / SinkGD with their AdamW, except the weights of
:data:`LINEAR_SETS`, which are targeted; :data:`LAYER_STACKS`: several
small Llama layers with their norms, whose weights are targeted as in a model). Their steps take a few
milliseconds, so each round times :func:`steps_per_round` steps of each optimizer (20) instead of one.

:data:`MOE_SETS`: one Qwen3-30B-A3B decoder layer (:class:`MoeLayerWeights`, transformers' parameter names): its fused
experts are batches of matrices (3-D parameters ``[E, A, B]``), which racs / adamw_sn / adagrad_sn step in blocks of
whole matrices (``batch_direction``). ``qwen3-moe-layer`` (128 experts, 623.1M parameters: 2.5 GB per float32 copy,
about 7 copies in a timing run) is counted by ``--launches`` on meta tensors only (:data:`META_ONLY_SETS`: timing it
is refused, naming the small variant); ``qwen3-moe-layer-small`` is the same layer with 16 experts (94.4M) for CPU
timing.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from lowmem.bench import BASELINE, SPREAD_LIMIT, _state_bytes, parse_variant, summarize_ratios
from lowmem.bench_peers import PEERS, get_peer, peer_label, peers_for, probe_peer, recommended
from lowmem.io import write_files_atomic

#: ``name -> (hidden, intermediate, with the two RMSNorm weights)``: one Llama decoder layer; hidden-N has
#: Llama-2's MLP ratio 11008 / 4096 (hidden 1024: 12.65M parameters, 2048: 50.6M, as in issue 15's table).
SHAPE_SETS: dict[str, tuple[int, int, bool]] = {
    "llama-7b-layer": (4096, 11008, True),
    "hidden-1024": (1024, 2752, False),
    "hidden-2048": (2048, 5504, False),
}
#: ``name -> ((count, shape), ...)``: many small tensors, vectors first, as measured in docs/benchmarks.md:
#: 64 vectors of 1024 + 32 weights of 64 x 64 (196,608 parameters), 32 vectors of 256 + 16 batched weights of
#: 4 x 64 x 64 (270,336): plain parameters; 64 vectors of 128 + 32 weights of 128 x 128 (532,480): the weights
#: are ``nn.Linear`` (:data:`LINEAR_SETS`), so subspace recipes project them (Subspace-Momentum's set, at rank 16).
TENSOR_SETS: dict[str, tuple[tuple[int, tuple[int, ...]], ...]] = {
    "small-tensors": ((64, (1024,)), (32, (64, 64))),
    "small-batched": ((32, (256,)), (16, (4, 64, 64))),
    "small-linear": ((64, (128,)), (32, (128, 128))),
}
LINEAR_SETS = frozenset({"small-linear"})
#: ``name -> (layers, hidden)``: that many Llama decoder layers (with their two RMSNorm weights, Llama-2's MLP
#: ratio: hidden 128 -> MLP 344) under ``layers.i.``; 8 x 128: 1.57M parameters, 8 x 256: 6.29M.
LAYER_STACKS: dict[str, tuple[int, int]] = {"llama-8x128": (8, 128), "llama-8x256": (8, 256)}
#: Qwen3-30B-A3B's layer (Hugging Face ``Qwen/Qwen3-30B-A3B`` config.json; transformers' ``Qwen3MoeConfig`` defaults
#: give the same hidden size, MoE intermediate size, expert count and head counts, but ``head_dim=None``, i.e.
#: hidden / heads = 64: the checkpoint's 128 is used here, so q_proj has 32 x 128 = 4096 outputs, k/v 4 x 128 = 512)
QWEN3_MOE = dict(hidden_size=2048, moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4, head_dim=128)
#: ``name -> number of experts`` of a :class:`MoeLayerWeights` set
MOE_SETS: dict[str, int] = {"qwen3-moe-layer": 128, "qwen3-moe-layer-small": 16}
#: ``name -> why``: sets ``--launches`` counts on meta tensors but ``--shapes`` does not time on the CPU
META_ONLY_SETS: dict[str, str] = {
    "qwen3-moe-layer": "623,120,640 parameters (2.5 GB per float32 copy; a timing run holds about 7: weights, "
                       "gradients, the fixed gradients, two optimizers' states) is counted on meta tensors only "
                       "(--launches --shapes qwen3-moe-layer); time --shapes qwen3-moe-layer-small (the same layer with "
                       "16 experts, 94.4M parameters)",
}
#: optimizer steps per interleaved round for the small sets (a single-layer set times one step per round)
SMALL_SET_STEPS = 20
HEAD_DIM = 128
LR = 1e-5
DEFAULT_RANK = 128


def all_sets() -> list[str]:
    """Every named set: the CLI's ``--shapes`` choices."""
    return [*SHAPE_SETS, *LAYER_STACKS, *TENSOR_SETS, *MOE_SETS]


def shape_set(name: str) -> tuple[int, int, bool]:
    """``(hidden, intermediate, norms)`` of a single-layer set (``hidden-N`` with N >= 8 for tests)."""
    if name in SHAPE_SETS:
        return SHAPE_SETS[name]
    if name.startswith("hidden-") and name[7:].isdigit() and int(name[7:]) >= 8:  # tests: small layers
        h = int(name[7:])
        return h, h * 11008 // 4096, False
    raise ValueError(f"unknown shape set {name!r}; valid: {', '.join(all_sets())} (or hidden-N, N >= 8)")


def steps_per_round(name: str) -> int:
    """Steps of each optimizer per interleaved round: one for a single layer, :data:`SMALL_SET_STEPS` for the
    sets of small tensors and stacks of small layers."""
    return SMALL_SET_STEPS if name in TENSOR_SETS or name in LAYER_STACKS else 1


def set_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of any set (the names of :func:`build_set`'s module)."""
    if name in TENSOR_SETS:
        out: dict[str, tuple[int, ...]] = {}
        (nv, sv), (nm, sm) = TENSOR_SETS[name]
        out.update({f"vecs.{i}": sv for i in range(nv)})
        out.update({f"mats.{i}.weight" if name in LINEAR_SETS else f"mats.{i}": sm for i in range(nm)})
        return out
    if name in LAYER_STACKS:
        n, h = LAYER_STACKS[name]
        one = _layer_shapes(h, h * 11008 // 4096, True)
        return {f"layers.{i}.{k}": s for i in range(n) for k, s in one.items()}
    if name in MOE_SETS:
        return moe_layer_shapes(MOE_SETS[name])
    return layer_shapes(name)


def moe_layer_shapes(experts: int) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of one Qwen3-MoE decoder layer (:data:`QWEN3_MOE`) with ``experts`` experts, under
    transformers' names (``Qwen3MoeDecoderLayer``: fused ``mlp.experts.gate_up_proj [E, 2 I, H]`` and
    ``mlp.experts.down_proj [E, H, I]``, router ``mlp.gate``, per-head ``q_norm`` / ``k_norm``)."""
    h, i, d = QWEN3_MOE["hidden_size"], QWEN3_MOE["moe_intermediate_size"], QWEN3_MOE["head_dim"]
    q, kv = QWEN3_MOE["num_attention_heads"] * d, QWEN3_MOE["num_key_value_heads"] * d
    return {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q), "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
            "mlp.experts.gate_up_proj": (experts, 2 * i, h), "mlp.experts.down_proj": (experts, h, i),
            "mlp.gate.weight": (experts, h), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}


def describe_set(name: str) -> str:
    """One line on what the set is (the markdown's footnote)."""
    if name in TENSOR_SETS:
        return " + ".join(f"{c} {'vectors' if len(s) == 1 else 'weights'} of {' x '.join(map(str, s))}"
                          for c, s in TENSOR_SETS[name]) + (" (the weights nn.Linear)" if name in LINEAR_SETS
                                                            else " (plain parameters, no nn.Linear)")
    if name in LAYER_STACKS:
        n, h = LAYER_STACKS[name]
        return f"{n} Llama decoder layers, hidden {h}, MLP {h * 11008 // 4096}, 2 RMSNorm weights each"
    if name in MOE_SETS:
        e, c = MOE_SETS[name], QWEN3_MOE
        return (f"one Qwen3-30B-A3B decoder layer with {e} experts: fused experts [{e}, {2 * c['moe_intermediate_size']},"
                f" {c['hidden_size']}] + [{e}, {c['hidden_size']}, {c['moe_intermediate_size']}], router {e} x "
                f"{c['hidden_size']}, attention {c['num_attention_heads']} x {c['head_dim']} query / "
                f"{c['num_key_value_heads']} x {c['head_dim']} key-value heads, q/k norms, 2 RMSNorm weights")
    h, i, norms = shape_set(name)
    return f"one Llama decoder layer, hidden {h}, MLP {i}" + (", 2 RMSNorm weights" if norms else "")


def layer_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of one decoder layer of the set ``name``."""
    return _layer_shapes(*shape_set(name))


def _layer_shapes(h: int, i: int, norms: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {f"self_attn.{k}.weight": (h, h) for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
    shapes.update({"mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)})
    if norms:
        shapes.update({"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)})
    return shapes


class LayerWeights(nn.Module):
    """The weights of one Llama decoder layer under Llama's names (``self_attn.q_proj``, ``mlp.gate_proj``,
    ``input_layernorm``, ...), with a ``config`` giving the head layout (for Adam-mini's partition).
    Linear weights are N(0, 0.02^2), norm weights ones; nothing is computed with them."""

    def __init__(self, hidden: int, intermediate: int, norms: bool, seed: int = 0):
        super().__init__()
        heads = max(1, hidden // HEAD_DIM)
        self.config = SimpleNamespace(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                                      head_dim=hidden // heads)
        lin = lambda i, o: nn.Linear(i, o, bias=False, device="meta")  # noqa: E731
        self.self_attn = nn.ModuleDict({k: lin(hidden, hidden) for k in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = nn.ModuleDict({"gate_proj": lin(hidden, intermediate), "up_proj": lin(hidden, intermediate),
                                  "down_proj": lin(intermediate, hidden)})
        if norms:
            from transformers.models.llama.modeling_llama import LlamaRMSNorm

            self.input_layernorm = LlamaRMSNorm(hidden)
            self.post_attention_layernorm = LlamaRMSNorm(hidden)
        self.to_empty(device="cpu")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)


class MoeLayerWeights(nn.Module):
    """One Qwen3-MoE decoder layer's weights (:func:`moe_layer_shapes`, transformers' names) with ``experts``
    experts; the fused experts are plain 3-D parameters (batches of matrices), the rest ``nn.Linear`` weights and
    RMSNorm weights. ``config`` gives the head layout (Adam-mini's partition). Matrices N(0, 0.02^2), norm
    weights ones; nothing is computed with them."""

    def __init__(self, experts: int, seed: int = 0):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        c = QWEN3_MOE
        h, i, d = c["hidden_size"], c["moe_intermediate_size"], c["head_dim"]
        q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
        self.config = SimpleNamespace(**c, num_experts=experts)
        lin = lambda i, o: nn.Linear(i, o, bias=False, device="meta")  # noqa: E731
        self.self_attn = nn.ModuleDict({"q_proj": lin(h, q), "k_proj": lin(h, kv), "v_proj": lin(h, kv),
                                        "o_proj": lin(q, h), "q_norm": LlamaRMSNorm(d), "k_norm": LlamaRMSNorm(d)})
        experts_mod = nn.Module()
        experts_mod.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * i, h, device="meta"))
        experts_mod.down_proj = nn.Parameter(torch.empty(experts, h, i, device="meta"))
        self.mlp = nn.ModuleDict({"experts": experts_mod, "gate": lin(h, experts)})
        self.input_layernorm = LlamaRMSNorm(h)
        self.post_attention_layernorm = LlamaRMSNorm(h)
        self.to_empty(device="cpu")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)


class TensorSet(nn.Module):
    """Many small tensors of a :data:`TENSOR_SETS` entry as plain parameters ``vecs.i`` (N(0, 1)) and ``mats.i``
    (N(0, 0.02^2); for :data:`LINEAR_SETS` the weights ``mats.i.weight`` of bias-free ``nn.Linear`` layers);
    nothing is computed with them."""

    def __init__(self, name: str, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        (nv, sv), (nm, sm) = TENSOR_SETS[name]
        self.vecs = nn.ParameterList([nn.Parameter(torch.randn(sv, generator=g)) for _ in range(nv)])
        mats = [torch.randn(sm, generator=g) * 0.02 for _ in range(nm)]
        if name in LINEAR_SETS:
            self.mats = nn.ModuleList([nn.Linear(sm[1], sm[0], bias=False) for _ in range(nm)])
            with torch.no_grad():
                for lin, w in zip(self.mats, mats):
                    lin.weight.copy_(w)
        else:
            self.mats = nn.ParameterList([nn.Parameter(w) for w in mats])


class LayerStack(nn.Module):
    """:data:`LAYER_STACKS` entry: ``layers.i`` are :class:`LayerWeights` (seeds 0, 1, ...); ``config`` is theirs."""

    def __init__(self, name: str):
        super().__init__()
        n, h = LAYER_STACKS[name]
        self.layers = nn.ModuleList([LayerWeights(h, h * 11008 // 4096, True, seed=i) for i in range(n)])
        self.config = self.layers[0].config


def build_set(name: str) -> nn.Module:
    """The module whose parameters the set ``name`` times (names and shapes: :func:`set_shapes`)."""
    if name in TENSOR_SETS:
        return TensorSet(name)
    if name in LAYER_STACKS:
        return LayerStack(name)
    if name in MOE_SETS:
        return MoeLayerWeights(MOE_SETS[name])
    return LayerWeights(*shape_set(name))


@dataclass
class ShapeResult:
    """One optimizer's row. ``step_time_ratio`` etc.: per-round ratios to ``torch_adamw`` (median, extremes,
    spread); ``first_step_adamw``: the first step's time beyond a steady step, in AdamW steps;
    ``refresh_gap``: steps between projection refreshes (``None``: none); ``amortised_ratio``: see the
    module docstring; ``peer_of``: for a peer row, the lowmem recipe it compares to."""

    optimizer: str
    hparams: dict[str, Any]
    params: int
    state_bytes: int
    bytes_per_param: float
    step_time_s: float
    step_time_ratio: float
    ratio_min: float
    ratio_max: float
    ratio_spread: float
    first_step_s: float
    first_step_adamw: float
    refresh_gap: int | None
    amortised_ratio: float
    round_ratios: list[float] = field(default_factory=list)
    peer_of: str | None = None


def _gap(hp: dict[str, Any], subspace: bool) -> int | None:
    if not subspace:
        return None
    return int(hp.get("update_proj_gap", 200))


def _build(label: str, module: LayerWeights, rank: int) -> tuple[torch.optim.Optimizer, dict[str, Any], int | None, str | None]:
    """The optimizer of a row: a registered name or variant, or ``peer:NAME``; returns it, its settings, its
    refresh gap and (for peers) the recipe it stands for."""
    from lowmem.optim import create_optimizer, get_entry

    if label.startswith("peer:"):
        peer = get_peer(label)
        st = dict(recommended(peer.recipe).hparams)
        opt = peer.build(module, LR, rank, st)
        sub = get_entry(peer.recipe).subspace
        return opt, {"lr": LR, "rank": rank if sub else None, **st}, _gap(st, sub), peer.recipe
    name, variant = parse_variant(label)
    entry = get_entry(name)
    valid = set(entry.valid_hparams())
    hp = {k: v for k, v in recommended(name).hparams.items() if k in valid}
    hp["lr"] = LR
    if entry.subspace and "rank" in valid and name != "apollo_mini":
        hp["rank"] = rank
    hp.update(variant)
    opt = create_optimizer(module, name, **hp)
    gap = _gap(opt.param_groups[0] if entry.subspace else hp, entry.subspace)
    return opt, hp, gap, None


def _import_bitsandbytes() -> None:
    """Import bitsandbytes once before timing, when installed: the 8-bit recipes' codec (and the
    bitsandbytes peer) use it, and a process's first import costs ~0.8 s (its package setup imports
    ``torch._inductor``), which would otherwise land in the first step of whichever row touches it first."""
    try:
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        pass


def run_shapes_bench(optimizers: list[str], shapes: str = "hidden-1024", peers: bool = False, rank: int | None = None,
                     repeats: int = 5, threads: int | None = None, progress: bool = True) -> tuple[list[ShapeResult], dict[str, Any]]:
    """Time each optimizer's step on the shapes of ``shapes`` (see the module docstring); returns the rows
    (``torch_adamw`` first) and the run's metadata (shapes, skipped peers). ``peers`` adds the peers of the
    named recipes (every peer when only the baseline or ``peer:NAME`` rows are named); the others are in
    ``meta["left_out_peers"]``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if shapes in META_ONLY_SETS:
        raise ValueError(f"--shapes {shapes}: {META_ONLY_SETS[shapes]}")
    module = build_set(shapes)  # an unknown name is a ValueError naming the valid sets
    n_steps = steps_per_round(shapes)
    rank = rank or DEFAULT_RANK
    prev = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    try:
        labels = [n for n in optimizers if n != BASELINE]
        skipped: dict[str, str] = {}
        left_out: dict[str, str] = {}
        if peers:  # the named recipes' peers only (all when none is named); a peer row named twice runs once
            chosen, left_out = peers_for({parse_variant(n)[0] for n in labels if not n.startswith("peer:")}, PEERS)
            left_out = {k: v for k, v in left_out.items() if k not in labels}
            for p in chosen:
                if peer_label(p) in labels:
                    continue
                why = probe_peer(p)
                if why is None:
                    labels.append(peer_label(p))
                else:
                    skipped[peer_label(p)] = why
        _import_bitsandbytes()  # (its first import, ~0.8 s of torch._inductor, is not a first step's cost)
        params = [p for p in module.parameters()]
        n_params = sum(p.numel() for p in params)
        g = torch.Generator().manual_seed(1)
        fixed = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
        for p in params:
            p.grad = torch.empty_like(p)

        def timed(opt, steps: int = 1) -> float:  # CPU seconds per step, the mean over ``steps`` steps
            total = 0.0
            for _ in range(steps):
                for p, f in zip(params, fixed):
                    if p.grad is None:  # an optimizer freed it (BAdam frees the inactive blocks' gradients)
                        p.grad = torch.empty_like(p)
                    p.grad.copy_(f)
                t0 = time.process_time()
                opt.step()
                total += time.process_time() - t0
            return total / steps

        base = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, foreach=True)
        timed(base)
        timed(base)
        base_state = _state_bytes(base)
        results: list[ShapeResult] = []
        all_base: list[float] = []
        for i, label in enumerate(labels):
            if progress:
                print(f"[{i + 1}/{len(labels)}] {label} ...", flush=True)
            for p in params:  # a previous contender may have frozen some (BAdam freezes its inactive blocks)
                p.requires_grad_(True)
            try:
                opt, hp, gap, peer_of = _build(label, module, rank)
            except ValueError as e:  # a peer that cannot run on this set (adam-mini without a model config)
                if label not in {peer_label(p) for p in PEERS}:
                    raise
                skipped[label] = str(e)
                continue
            first = timed(opt)
            timed(opt)  # warm
            bt, xt = [], []
            for r in range(repeats):
                if r % 2 == 0:
                    bt.append(timed(base, n_steps))
                    xt.append(timed(opt, n_steps))
                else:
                    xt.append(timed(opt, n_steps))
                    bt.append(timed(base, n_steps))
            ratios = [x / b for x, b in zip(xt, bt)]
            all_base += bt
            steady, b_med = statistics.median(xt), statistics.median(bt)
            first_adamw = (first - steady) / b_med
            s = summarize_ratios(ratios)
            sb = _state_bytes(opt)
            results.append(ShapeResult(
                optimizer=label, hparams=hp, params=n_params, state_bytes=sb, bytes_per_param=sb / n_params,
                step_time_s=steady, first_step_s=first, first_step_adamw=first_adamw, refresh_gap=gap,
                amortised_ratio=s["step_time_ratio"] + (max(0.0, first_adamw) / gap if gap else 0.0),
                round_ratios=ratios, peer_of=peer_of, **s,
            ))
            del opt
            gc.collect()
        b_med = statistics.median(all_base) if all_base else timed(base)  # CPU seconds
        results.insert(0, ShapeResult(
            optimizer=BASELINE, hparams={"lr": LR, "foreach": True}, params=n_params, state_bytes=base_state,
            bytes_per_param=base_state / n_params, step_time_s=b_med, step_time_ratio=1.0, ratio_min=1.0, ratio_max=1.0,
            ratio_spread=0.0, first_step_s=float("nan"), first_step_adamw=float("nan"), refresh_gap=None,
            amortised_ratio=1.0,
        ))
    finally:
        torch.set_num_threads(prev)
    meta = {"shapes": shapes, "description": describe_set(shapes), "params": n_params, "rank": rank,
            "repeats": repeats, "steps_per_round": n_steps, "lr": LR, "skipped_peers": skipped, "left_out_peers": left_out, "torch": torch.__version__,
            "threads": torch.get_num_threads() if threads is None else threads, "wall_s": time.perf_counter() - t_start}
    return results, meta


def fastest_peers(results: list[ShapeResult]) -> list[tuple[ShapeResult, ShapeResult | None]]:
    """Per lowmem row (not the baseline), the peer row for the same recipe with the lowest amortised ratio
    (``None`` when no peer ran); the baseline is adamw's peer (torch = 1.00)."""
    out = []
    for r in results:
        if r.optimizer == BASELINE or r.peer_of is not None:
            continue
        name = parse_variant(r.optimizer)[0]
        peers = [p for p in results if p.peer_of == name]
        if name == "adamw":
            peers.append(results[0])
        out.append((r, min(peers, key=lambda p: p.amortised_ratio) if peers else None))
    return out


def _row(r: ShapeResult) -> str:
    first = "" if r.first_step_adamw != r.first_step_adamw else f"{r.first_step_adamw:.1f}"
    gap = f"{r.amortised_ratio:.2f}x (gap {r.refresh_gap})" if r.refresh_gap else f"{r.amortised_ratio:.2f}x"
    ms = r.step_time_s * 1e3
    ms_txt = f"{ms:.0f}" if ms >= 10 else f"{ms:.2f}"  # the small sets' steps take a few ms
    return (f"| {r.optimizer} | {r.bytes_per_param:.3f} | {ms_txt} | {r.step_time_ratio:.2f}x | "
            f"{100 * r.ratio_spread:.0f}% | {first} | {gap} |")


def to_markdown(results: list[ShapeResult], meta: dict[str, Any]) -> str:
    lines = ["| optimizer | state bytes / param | step CPU ms | step time vs torch AdamW | spread | first step (AdamW steps) "
             "| amortised |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [_row(r) for r in results]
    lines += ["", "| recipe | lowmem (amortised) | fastest peer | peer (amortised) | lowmem / peer |", "|---|---:|---|---:|---:|"]
    for r, p in fastest_peers(results):
        if p is None:
            lines.append(f"| {r.optimizer} | {r.amortised_ratio:.2f}x | — | | |")
        else:
            lines.append(f"| {r.optimizer} | {r.amortised_ratio:.2f}x | {p.optimizer} | {p.amortised_ratio:.2f}x "
                         f"| {r.amortised_ratio / p.amortised_ratio:.2f} |")
    per_round = "" if meta["steps_per_round"] == 1 else f" of {meta['steps_per_round']} steps"
    lines += ["", (f"`{meta['shapes']}`: {meta['description']}: {meta['params']:,} parameters; optimizer.step() only, "
                   f"random gradients; {meta['repeats']} interleaved rounds{per_round} (median ratio of CPU times, spread = (max - min) / median); subspace rank {meta['rank']}; "
                   f"{meta['threads']} CPU thread(s); torch {meta['torch']}; {meta['wall_s']:.0f} s.")]
    if meta.get("skipped_peers"):
        lines += ["", "Skipped peers: " + "; ".join(f"{k}: {v}" for k, v in meta["skipped_peers"].items()) + "."]
    if meta.get("left_out_peers"):
        lines += ["", "Peers left out (their recipe is not among the named optimizers): "
                  + ", ".join(meta["left_out_peers"]) + "."]
    wide = [r.optimizer for r in results if not r.ratio_spread <= SPREAD_LIMIT]
    if wide:
        lines += ["", f"Spread over {100 * SPREAD_LIMIT:.0f}% (not rankable from this run): {', '.join(wide)}."]
    return "\n".join(lines) + "\n"


def main(args, names: list[str], threads: int) -> int:
    """``lowmem bench --shapes SET``."""
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.device == "cuda":
        raise ValueError("--shapes times the CPU step for now; --device cuda is not supported with --shapes")
    results, meta = run_shapes_bench(names, args.shapes, peers=args.peers, rank=args.rank, repeats=args.repeats,
                                     threads=threads)
    meta["date"] = time.strftime("%Y-%m-%d")
    import json

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = f"### lowmem bench --shapes {args.shapes}\n\n" + to_markdown(results, meta)
    write_files_atomic({out / "bench_shapes.json": json.dumps({"meta": meta, "results": [asdict(r) for r in results]},
                                                              indent=2, default=str),
                        out / "bench_shapes.md": md})
    print(md)
    print(f"wrote {out / 'bench_shapes.json'} and {out / 'bench_shapes.md'}")
    return 0
