"""``lowmem bench --task text``: every optimizer on real text, side by side in one run.

The model is a byte-level causal LM built from a ``transformers.LlamaConfig`` (vocabulary: the 256
byte values plus BOS, EOS and PAD; no tokenizer files, no download). The text is the Python standard
library's own source files (``sysconfig.get_paths()["stdlib"]``, ``*.py``; every Python installation
has them), split *by file* into train and held-out sets at run time: a file is held out when a hash of
its path relative to the library root falls in the held-out fraction (:func:`is_heldout`), so the
split is the same on every machine with the same Python, and no file is in both sets.

Every contender trains its own copy of the model from the same initial weights on the same batches,
interleaved step by step with ``torch.optim.AdamW(foreach=True)`` (the baseline, ``torch_adamw``) as in
``lowmem bench`` (:func:`lowmem.bench.train_interleaved`), under warm-up and cosine decay
(``transformers.get_cosine_schedule_with_warmup``). Each optimizer runs at its recommended settings
(:data:`lowmem.bench_peers.RECOMMENDED`, with sources); ``lr_sweep`` adds, per optimizer, the
recommended lr times each factor of ``LR_SWEEP_FACTORS`` as rows of their own and reports the best.
``seeds`` repeats the run with other initial weights and batches (the held-out text stays the same):
each row reports the mean and the min-max of the held-out loss over the seeds.
"""

from __future__ import annotations

import copy
import hashlib
import math
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowmem.bench import (
    BASELINE, DTYPES, SPREAD_LIMIT, _Contender, check_dtype_rows, _rng_state, _state_bytes, parse_variant, round_slices, step_time_ratios,
    summarize_ratios, train_interleaved,
)
from lowmem.bench_peers import PEERS, Recommended, get_peer, peer_label, peers_for, probe_peer, recommended
from lowmem.io import write_files_atomic

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259
#: Multiples of the recommended lr that ``--lr-sweep`` tries (1 is the recommended run itself).
LR_SWEEP_FACTORS = (1 / 3, 1.0, 3.0)


@dataclass(frozen=True)
class TextTask:
    """The text task's size.

    Attributes:
        hidden_size: Model width.
        num_layers: Decoder layers.
        num_heads: Attention heads (key/value heads: half of them).
        intermediate_size: MLP width.
        seq_len: Bytes per training sequence.
        batch_size: Sequences per step.
        steps: Optimizer steps.
        warmup_steps: Linear warm-up steps of the cosine schedule.
        eval_sequences: Held-out sequences the final loss is averaged over (the same for every seed).
        heldout_percent: Percent of the library's files held out (by a hash of the relative path).
        timing_warmup: Steps excluded from the step-time ratios.
        max_bytes: Read files (in path order) only until this many bytes are read; ``None`` = all.
    """

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 352
    seq_len: int = 64
    batch_size: int = 4
    steps: int = 200
    warmup_steps: int = 20
    eval_sequences: int = 64
    heldout_percent: int = 10
    timing_warmup: int = 5
    max_bytes: int | None = None

    def validate(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "seq_len", "batch_size", "steps",
                     "eval_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or self.num_heads % 2 and self.num_heads != 1:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads}), "
                             "and num_heads even (key/value heads are half) or 1")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps} with steps={self.steps}")
        if not 0 < self.heldout_percent < 100:
            raise ValueError(f"heldout_percent must be in (0, 100), got {self.heldout_percent}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {self.max_bytes}")


# ---- data ----------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str, percent: int) -> bool:
    """Whether the file at ``relpath`` (POSIX path relative to the library root) is held out: the first
    8 hex digits of its SHA-256, modulo 100, below ``percent``. Deterministic, and by file."""
    return int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) % 100 < percent


def split_files(root: Path, percent: int) -> tuple[list[str], list[str]]:
    """``(train, heldout)`` relative paths of the ``*.py`` files under ``root`` (sorted; installed
    packages under ``site-packages`` / ``dist-packages`` are not the standard library and are left out)."""
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                  if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    if not rels:
        raise ValueError(f"no *.py files under {root}: cannot build the text task")
    train = [r for r in rels if not is_heldout(r, percent)]
    held = [r for r in rels if is_heldout(r, percent)]
    return train, held


def encode_files(root: Path, rels: list[str], max_bytes: int | None = None) -> torch.Tensor:
    """The files' bytes as one token stream (``BOS file EOS`` each; int64), in the given order, stopping
    after the file that reaches ``max_bytes``."""
    parts: list[torch.Tensor] = []
    total = 0
    for rel in rels:
        data = (root / rel).read_bytes()
        parts += [torch.tensor([BOS]), torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else
                  torch.empty(0, dtype=torch.long), torch.tensor([EOS])]
        total += len(data) + 2
        if max_bytes is not None and total >= max_bytes:
            break
    return torch.cat(parts)


@dataclass
class TextData:
    train: torch.Tensor
    heldout: torch.Tensor
    train_files: list[str]
    heldout_files: list[str]


def load_text(task: TextTask, root: Path | None = None) -> TextData:
    root = root or stdlib_root()
    train_files, held_files = split_files(root, task.heldout_percent)
    half = None if task.max_bytes is None else max(1, task.max_bytes // 2)
    train = encode_files(root, train_files, task.max_bytes)
    held = encode_files(root, held_files, half)
    need = task.seq_len + 1
    if len(train) < need or len(held) < need:
        raise ValueError(f"too little text for seq_len={task.seq_len}: {len(train)} train / {len(held)} held-out tokens")
    return TextData(train, held, train_files, held_files)


def train_batches(stream: torch.Tensor, task: TextTask, seed: int) -> list[dict[str, torch.Tensor]]:
    """``task.steps`` batches of random windows of the training stream (seeded)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - task.seq_len, (task.steps, task.batch_size), generator=g)
    idx = starts[..., None] + torch.arange(task.seq_len)
    return [{"input_ids": stream[i], "labels": stream[i]} for i in idx]


def eval_batches(stream: torch.Tensor, task: TextTask) -> list[dict[str, torch.Tensor]]:
    """``task.eval_sequences`` held-out windows, evenly spaced over the held-out stream (no randomness)."""
    n = task.eval_sequences
    span = len(stream) - task.seq_len
    starts = torch.tensor([round(i * span / max(1, n - 1)) for i in range(n)]) if n > 1 else torch.tensor([0])
    idx = starts[:, None] + torch.arange(task.seq_len)
    seqs = stream[idx]
    return [{"input_ids": b, "labels": b} for b in seqs.split(task.batch_size)]


# ---- model, contenders ---------------------------------------------------------------------------


def build_model(task: TextTask, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=task.hidden_size, intermediate_size=task.intermediate_size,
        num_hidden_layers=task.num_layers, num_attention_heads=task.num_heads,
        num_key_value_heads=max(1, task.num_heads // 2), max_position_embeddings=task.seq_len,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@dataclass(frozen=True)
class Entry:
    """One row to train: ``name`` is a registry name, ``torch_adamw`` or ``peer:NAME``; ``lr`` its peak lr."""

    label: str
    name: str
    lr: float
    lr_source: str
    variant: dict[str, Any] = field(default_factory=dict)
    sweep_of: str | None = None  # the row this lr-sweep point belongs to


def _settings(name: str) -> Recommended:
    return recommended(get_peer(name).recipe) if name.startswith("peer:") else recommended(name)


def build_optimizer(entry: Entry, model, rank: int) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """The optimizer of one row at its settings; returns it and the hyperparameters it got."""
    from lowmem.optim import build_param_groups, create_optimizer, get_entry

    rec = _settings(entry.name)
    if entry.name == BASELINE:
        hp = {"lr": entry.lr, "weight_decay": rec.hparams.get("weight_decay", 0.01), "foreach": True, **entry.variant}
        return torch.optim.AdamW(build_param_groups(model), **hp), hp
    if entry.name.startswith("peer:"):
        peer = get_peer(entry.name)
        st = dict(rec.hparams)
        return peer.build(model, entry.lr, rank, st), {"lr": entry.lr, "rank": rank, **st}
    reg = get_entry(entry.name)
    valid = set(reg.valid_hparams())
    hp = {k: v for k, v in rec.hparams.items() if k in valid}
    hp["lr"] = entry.lr
    if reg.subspace and "rank" in valid and entry.name != "apollo_mini":
        hp["rank"] = rank
    hp.update(entry.variant)
    return create_optimizer(model, entry.name, **hp), hp


def plan_entries(optimizers: list[str], peers: bool, lr_sweep: bool, lr: float | None = None,
                 device: str = "cpu", left_out: dict[str, str] | None = None,
                 dtype: str = "float32") -> tuple[list[Entry], dict[str, str]]:
    """The rows to train (baseline first) and the peers skipped with their reasons. ``lr`` replaces
    every recommended lr (one lr for all); a row's own ``lr=`` (``lion:lr=1e-3``) replaces its recommended
    lr and is an error beside ``lr`` or ``lr_sweep`` (both would set the lr that row trains at). ``peers`` adds
    the peers of the named recipes (:func:`~lowmem.bench_peers.peers_for`; every peer when only the baseline or
    ``peer:NAME`` rows are named, as ``--shapes`` does), each probed first; a peer row named too runs once. The
    others are put into ``left_out`` (``peer:NAME`` -> why), when given. With ``dtype`` other than float32 every
    peer is probed on weights of that dtype (:func:`~lowmem.bench_peers.probe_peer`): one added by ``peers`` that
    fails is skipped with the reason, one named explicitly is a ValueError naming it.

    Raises:
        ValueError: A ``peer:NAME`` row named explicitly that fails the probe at ``dtype`` (not float32), or a row
            setting ``lr`` beside ``lr`` / ``lr_sweep``.
    """
    names = [BASELINE] + [n for n in optimizers if n != BASELINE]
    skipped: dict[str, str] = {}
    if dtype != "float32":
        for label in names:
            if label.startswith("peer:"):
                why = probe_peer(get_peer(label), device, DTYPES[dtype])
                if why is not None:
                    raise ValueError(f"{label!r} cannot train {dtype} weights: {why}; valid: --dtype float32, or "
                                     f"the run without {label!r}")
    if peers:
        named = {parse_variant(n)[0] for n in names if not n.startswith("peer:")} - {BASELINE}
        chosen, left = peers_for(named, PEERS)
        if left_out is not None:
            left_out.update({k: v for k, v in left.items() if k not in names})
        for p in chosen:
            if peer_label(p) in names:
                continue
            why = probe_peer(p, device, DTYPES[dtype]) if dtype != "float32" else probe_peer(p, device)
            if why is None:
                names.append(peer_label(p))
            else:
                skipped[peer_label(p)] = why
    rows: list[Entry] = []
    for label in names:
        name, variant = (label, {}) if label.startswith("peer:") else parse_variant(label)
        rec = _settings(name)
        if "lr" in variant:  # the row's own lr: Entry.lr is what trains and what the table shows
            if lr is not None:
                raise ValueError(f"{label!r} sets lr={variant['lr']} and --lr sets {lr}: give one of them")
            if lr_sweep:
                raise ValueError(f"{label!r} sets lr={variant['lr']} and --lr-sweep sweeps the lr: "
                                 f"drop one of them (the sweep starts from the recommended lr)")
            variant = dict(variant)
            base_lr, src = float(variant.pop("lr")), "the row's variant"
        elif lr is not None:
            base_lr, src = lr, "--lr (one lr for every optimizer)"
        else:
            base_lr, src = rec.lr, rec.source
        rows.append(Entry(label, name, base_lr, src, variant))
        if lr_sweep:
            for f in LR_SWEEP_FACTORS:
                if f != 1.0:
                    rows.append(Entry(f"{label}@lr={base_lr * f:.3g}", name, base_lr * f, f"{f:.3g} x {label}'s lr",
                                      variant, sweep_of=label))
    return rows, skipped


# ---- results -------------------------------------------------------------------------------------


@dataclass
class TextResult:
    """One row over all seeds. Losses in nats per byte.

    ``eval_loss`` is the mean held-out loss over the seeds (``eval_min`` / ``eval_max`` the extremes);
    ``eval_loss_ratio`` the mean over seeds of (this row's / ``torch_adamw``'s held-out loss in the same
    seed). Step time as in ``lowmem bench``: median over all rounds of all seeds of the per-round ratio to
    ``torch_adamw``'s median step time; spread = (max - min) / median. With an lr sweep, ``best_lr`` and
    ``best_eval_loss`` are the sweep point (this row's lr included) with the lowest mean held-out loss.
    """

    optimizer: str
    lr: float
    lr_source: str
    hparams: dict[str, Any]
    trainable_params: int
    state_bytes: int
    bytes_per_param: float
    eval_loss: float
    eval_min: float
    eval_max: float
    eval_loss_ratio: float
    eval_losses: list[float]
    final_train_loss: float
    step_time_ratio: float
    ratio_min: float
    ratio_max: float
    ratio_spread: float
    round_ratios: list[float] = field(default_factory=list)
    sweep_of: str | None = None
    best_lr: float | None = None
    best_eval_loss: float | None = None


@torch.no_grad()
def heldout_loss(model, batches, device: str) -> float:
    """Mean held-out loss per predicted byte over ``batches`` (equal-length sequences)."""
    model.eval()
    losses = [model(**{k: v.to(device) for k, v in b.items()}).loss.item() * len(b["input_ids"]) for b in batches]
    model.train()
    return sum(losses) / sum(len(b["input_ids"]) for b in batches)


def run_text_bench(
    optimizers: list[str],
    task: TextTask | None = None,
    seeds: int = 1,
    peers: bool = False,
    lr_sweep: bool = False,
    lr: float | None = None,
    rank: int | None = None,
    repeats: int = 5,
    device: str | None = None,
    threads: int | None = None,
    progress: bool = True,
    root: Path | None = None,
    dtype: str = "float32",
) -> tuple[list[TextResult], dict[str, Any]]:
    """Run the text benchmark; returns the rows (``torch_adamw`` first) and the run's metadata (the split,
    the model size, skipped peers).

    Args:
        optimizers: Registered names or variants ``NAME:key=value,...``; a variant's ``lr=`` is the lr that
            row trains at and shows (an error with ``lr`` or ``lr_sweep``).
        task: The model and data size (:class:`TextTask`).
        seeds: Runs with seeds 0..seeds-1 (initial weights and batches).
        peers: Add the installed peer packages' rows (``peer:NAME``) of the named recipes (all of them when none
            is named; the others in ``meta["left_out_peers"]``); missing ones are listed as skipped.
        lr_sweep: Also train each row at its lr times each factor of :data:`LR_SWEEP_FACTORS`.
        lr: One peak lr for every row instead of the recommended ones.
        rank: Rank of the subspace recipes (and peers); default hidden size / 4.
        repeats: Step-time rounds per seed.
        device: ``"cpu"`` or ``"cuda"`` (default: CUDA when available).
        threads: torch CPU threads during the run (restored after).
        root: Library root to read ``*.py`` files from (default: the standard library).
        dtype: ``"float32"`` or ``"bfloat16"`` (:data:`lowmem.bench.DTYPES`): the model's weights, every
            contender's copy (the baseline's too); rows checked first by :func:`lowmem.bench.check_dtype_rows`,
            peers probed at that dtype (:func:`plan_entries`).
    """
    from transformers import get_cosine_schedule_with_warmup

    task = task or TextTask()
    task.validate()
    check_dtype_rows(optimizers, {}, dtype)  # (an unknown dtype, a rounding option on float32 weights)
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    rounds = round_slices(task.steps - task.timing_warmup, repeats)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank = rank or max(1, task.hidden_size // 4)
    prev_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    try:
        left_out: dict[str, str] = {}
        entries, skipped = plan_entries(optimizers, peers, lr_sweep, lr, device, left_out, dtype)  # (refusals first)
        data = load_text(task, root)
        evals = eval_batches(data.heldout, task)
        per_seed: list[dict[str, dict[str, Any]]] = []
        for seed in range(seeds):
            model = build_model(task, seed).to(device=device, dtype=DTYPES[dtype])
            model.train()
            batches = train_batches(data.train, task, seed)
            contenders = []
            for e in entries:
                m = copy.deepcopy(model)
                torch.manual_seed(seed)
                opt, hp = build_optimizer(e, m, rank)
                c = _Contender(e.label, hp, m, opt, _rng_state(device))
                c.scheduler = get_cosine_schedule_with_warmup(opt, task.warmup_steps, task.steps)
                contenders.append(c)
            del model
            train_interleaved(contenders, batches, device, progress=progress, desc=f"text seed {seed}")
            base = contenders[0].times[task.timing_warmup:]
            seed_rows = {}
            for c in contenders:
                seed_rows[c.label] = {
                    "hp": c.hp, "params": sum(p.numel() for p in c.model.parameters() if p.requires_grad),
                    "state_bytes": _state_bytes(c.opt), "eval": heldout_loss(c.model, evals, device),
                    "train": statistics.fmean(c.losses[-10:]),
                    "ratios": step_time_ratios(c.times[task.timing_warmup:], base, rounds),
                }
            per_seed.append(seed_rows)
            del contenders
    finally:
        torch.set_num_threads(prev_threads)
    results = aggregate(entries, per_seed)
    meta = {
        "task": asdict(task), "seeds": seeds, "rank": rank, "repeats": repeats, "device": device, "dtype": dtype,
        "threads": torch.get_num_threads() if threads is None else threads,
        "params": results[0].trainable_params, "train_files": len(data.train_files),
        "heldout_files": len(data.heldout_files), "train_bytes": len(data.train), "heldout_bytes": len(data.heldout),
        "stdlib": str(root or stdlib_root()), "skipped_peers": skipped, "left_out_peers": left_out,
        "lr_sweep": list(LR_SWEEP_FACTORS) if lr_sweep else None,
        "wall_s": time.perf_counter() - t_start, "torch": torch.__version__,
    }
    return results, meta


def aggregate(entries: list[Entry], per_seed: list[dict[str, dict[str, Any]]]) -> list[TextResult]:
    """One :class:`TextResult` per entry from the per-seed measurements; sweep points fill their row's
    ``best_lr`` / ``best_eval_loss``."""
    out: list[TextResult] = []
    for e in entries:
        runs = [s[e.label] for s in per_seed]
        evals = [r["eval"] for r in runs]
        ratios = [x for r in runs for x in r["ratios"]]
        ratio_to_base = [r["eval"] / s[BASELINE]["eval"] for r, s in zip(runs, per_seed)]
        out.append(TextResult(
            optimizer=e.label, lr=e.lr, lr_source=e.lr_source, hparams=runs[0]["hp"], trainable_params=runs[0]["params"],
            state_bytes=runs[0]["state_bytes"], bytes_per_param=runs[0]["state_bytes"] / runs[0]["params"],
            eval_loss=statistics.fmean(evals), eval_min=min(evals), eval_max=max(evals),
            eval_loss_ratio=statistics.fmean(ratio_to_base), eval_losses=evals,
            final_train_loss=statistics.fmean(r["train"] for r in runs), round_ratios=ratios, sweep_of=e.sweep_of,
            **summarize_ratios(ratios),
        ))
    by_label = {r.optimizer: r for r in out}
    for r in out:
        points = [r] + [s for s in out if s.sweep_of == r.optimizer]
        if r.sweep_of is None and len(points) > 1:
            best = min(points, key=lambda p: p.eval_loss if math.isfinite(p.eval_loss) else math.inf)
            r.best_lr, r.best_eval_loss = best.lr, best.eval_loss
    assert all(s.sweep_of in by_label for s in out if s.sweep_of)
    return out


# ---- output --------------------------------------------------------------------------------------


def _loss_cell(r: TextResult) -> str:
    return f"{r.eval_loss:.4f} ({r.eval_min:.4f}-{r.eval_max:.4f})" if len(r.eval_losses) > 1 else f"{r.eval_loss:.4f}"


def to_markdown(results: list[TextResult], meta: dict[str, Any]) -> str:
    rows = [r for r in results if r.sweep_of is None]
    sweep = any(r.best_lr is not None for r in rows)
    head = ("| optimizer | lr | state bytes / param | step time vs torch AdamW | spread | held-out loss, mean (min-max) "
            "| vs AdamW |" + (" best lr | held-out loss at best lr |" if sweep else ""))
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if sweep else "")]
    for r in rows:
        line = (f"| {r.optimizer} | {r.lr:.3g} | {r.bytes_per_param:.3f} | {r.step_time_ratio:.2f}x "
                f"| {100 * r.ratio_spread:.0f}% | {_loss_cell(r)} | {r.eval_loss_ratio:.3f} |")
        if sweep:
            line += (f" {r.best_lr:.3g} | {r.best_eval_loss:.4f} |" if r.best_lr is not None else " | |")
        lines.append(line)
    t = meta["task"]
    lines += ["", (f"Byte-level Llama, {meta['params']:,} parameters (hidden {t['hidden_size']}, {t['num_layers']} layers, "
                   f"{t['num_heads']} heads), {t['steps']} steps of {t['batch_size']} x {t['seq_len']} bytes, cosine "
                   f"schedule with {t['warmup_steps']} warm-up steps; Python standard library: {meta['train_files']} train "
                   f"files ({meta['train_bytes']:,} bytes) / {meta['heldout_files']} held-out ({meta['heldout_bytes']:,}); "
                   f"held-out loss in nats per byte over {t['eval_sequences']} sequences; {meta['seeds']} seed(s); "
                   f"subspace rank {meta['rank']}; {meta['threads']} CPU thread(s), device {meta['device']}; "
                   f"{meta.get('dtype', 'float32')} weights.")]
    if meta.get("skipped_peers"):
        lines += ["", "Skipped peers: " + "; ".join(f"{k}: {v}" for k, v in meta["skipped_peers"].items()) + "."]
    if meta.get("left_out_peers"):
        lines += ["", "Peers left out (their recipe is not among the named optimizers): "
                  + ", ".join(meta["left_out_peers"]) + "."]
    lines += ["", "lr sources: " + "; ".join(f"{r.optimizer}: {r.lr_source}" for r in rows) + "."]
    return "\n".join(lines) + "\n"


def spread_rows(results: list[TextResult]) -> list[str]:
    return [r.optimizer for r in results if r.sweep_of is None and not r.ratio_spread <= SPREAD_LIMIT]


def _dtype_title(meta: dict[str, Any]) -> str:
    dtype = meta.get("dtype", "float32")
    return "" if dtype == "float32" else f" --dtype {dtype}"


def write_text_results(results: list[TextResult], meta: dict[str, Any], out_dir: str | Path) -> Path:
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": [asdict(r) for r in results]}
    write_files_atomic({out / "bench_text.json": json.dumps(payload, indent=2, default=str),
                        out / "bench_text.md": f"### lowmem bench --task text{_dtype_title(meta)}\n\n"
                        + to_markdown(results, meta)})
    return out


def print_text_table(results: list[TextResult], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [r for r in results if r.sweep_of is None]
    sweep = any(r.best_lr is not None for r in rows)
    table = Table(title=f"lowmem bench --task text{_dtype_title(meta)} (baseline: torch.optim.AdamW(foreach=True))",
                  caption=f"held-out loss in nats per byte, mean (min-max) over {meta['seeds']} seed(s); "
                  f"{meta['params']:,} parameters; {meta['threads']} CPU thread(s)")
    cols = ["optimizer", "lr", "B/param", "step time", "spread", "held-out loss", "vs AdamW"] + (["best lr", "at best"] if sweep else [])
    for col in cols:
        table.add_column(col, justify="left" if col == "optimizer" else "right", no_wrap=True)
    for r in rows:
        cells = [r.optimizer, f"{r.lr:.3g}", f"{r.bytes_per_param:.3f}", f"{r.step_time_ratio:.2f}x",
                 f"{100 * r.ratio_spread:.0f}%", _loss_cell(r), f"{r.eval_loss_ratio:.3f}"]
        if sweep:
            cells += [f"{r.best_lr:.3g}", f"{r.best_eval_loss:.4f}"] if r.best_lr is not None else ["", ""]
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    console.print(table)
    for k, v in meta.get("skipped_peers", {}).items():
        console.print(f"skipped {k}: {v}", markup=False)
    wide = spread_rows(results)
    if wide:
        console.print(f"warning: step-time ratios vary by more than {100 * SPREAD_LIMIT:.0f}% across rounds for "
                      f"{', '.join(wide)}; those step times cannot be ranked from this run", style="bold yellow", markup=False)


#: ``--text-size``: the model and data sizes of the text task.
TEXT_SIZES = {
    "small": TextTask(),  # 0.62M parameters: 27 optimizers + 6 peers x 2 seeds in about 9 minutes on one loaded CPU core
    "medium": TextTask(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=688, seq_len=128, batch_size=8,
                       steps=300, warmup_steps=30),  # 3.03M parameters: ~29x the compute of "small"
    "smoke": TextTask(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seq_len=32, batch_size=2,
                      steps=8, warmup_steps=2, eval_sequences=4, timing_warmup=2, max_bytes=200_000),
}


def main(args, names: list[str], threads: int) -> int:
    """``lowmem bench --task text``."""
    from dataclasses import replace

    if args.text_size not in TEXT_SIZES:
        raise ValueError(f"--text-size must be one of {', '.join(TEXT_SIZES)}, got {args.text_size!r}")
    task = TEXT_SIZES[args.text_size]
    if args.steps is not None:
        task = replace(task, steps=args.steps, warmup_steps=min(task.warmup_steps, max(0, args.steps // 10)))
    if args.batch_size is not None:
        task = replace(task, batch_size=args.batch_size)
    task.validate()
    round_slices(task.steps - task.timing_warmup, args.repeats)  # fail before reading anything
    results, meta = run_text_bench(names, task=task, seeds=args.seeds, peers=args.peers, lr_sweep=args.lr_sweep,
                                   lr=args.lr, rank=args.rank, repeats=args.repeats, device=args.device, threads=threads,
                                   dtype=getattr(args, "dtype", None) or "float32")
    meta.update(date=time.strftime("%Y-%m-%d"), text_size=args.text_size)
    out = write_text_results(results, meta, args.output_dir)
    print_text_table(results, meta)
    print(f"wrote {out / 'bench_text.json'} and {out / 'bench_text.md'} ({meta['wall_s']:.0f} s)")
    return 1 if any(not math.isfinite(r.eval_loss) for r in results if r.sweep_of is None) else 0
