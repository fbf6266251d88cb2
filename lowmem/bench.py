"""``lowmem bench``: optimizers side by side in one run, on the tiny task or a local model.

For each optimizer, from the same initial weights and the same batches:

* **state bytes per trained parameter** (``state_bytes() / trainable parameters``; exact),
* **steady-state step time** of ``optimizer.step()`` (median after warm-up) relative to
  ``torch.optim.AdamW`` measured in the same run,
* **loss**: mean training loss of the last 10 steps and the held-out loss after training, and its
  ratio to ``torch.optim.AdamW``'s.

An entry ``NAME:key=value,...`` is a variant of a registered optimizer with those
hyperparameters, measured as its own row (e.g. ``microadam microadam:k_init=0.05,m=2`` compares two
settings of one optimizer in one run).

``dtype="bfloat16"`` (``--dtype bfloat16``) trains every contender's copy of the model in bfloat16 (pure bfloat16:
no float32 master copy; ``torch.optim.AdamW``, the baseline, keeps its moments in bfloat16 then), so ``lowmem bench
adamw adamw:bf16_stochastic_round=true adamw:kahan_summation=true --dtype bfloat16`` puts round-to-nearest,
stochastic rounding and Kahan summation side by side. A row whose settings cannot apply to that dtype (a rounding
option on float32 weights) is refused before anything is loaded, naming the row and the option
(:func:`check_dtype_rows`). ``--task text`` and ``--shapes`` take it too (:mod:`lowmem.bench_text`,
:mod:`lowmem.bench_shapes`: peer rows probed on weights of that dtype first); ``--launches`` counts the step on
meta weights of that dtype (:mod:`lowmem.bench_launches`).

It is a benchmark, not a test: numbers depend on the machine. Results go to ``bench.json`` and
``bench.md`` in the output directory.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowmem.io import write_files_atomic

BASELINE = "torch_adamw"

#: ``--dtype``: the dtypes of the weights of the tiny task, ``--task text`` and ``--shapes``
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: the engine's settings that round a step's write-back into bfloat16 weights (they apply to bfloat16 weights only)
ROUNDING = ("bf16_stochastic_round", "kahan_summation")


def check_dtype_rows(names: list[str], optim_args: dict[str, dict[str, Any]], dtype: str) -> None:
    """Refuse, before the model is loaded, a row that cannot train at ``dtype`` (``--dtype``): an unknown dtype,
    and ``bf16_stochastic_round`` / ``kahan_summation`` (from the row ``NAME:key=value`` or ``--optim-args NAME:...``)
    on float32 weights, which every engine optimizer refuses at construction (nothing is rounded into bfloat16).

    Raises:
        ValueError: Naming the row, the option and what to do instead.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16":
        return
    for label in names:
        if label.startswith("peer:"):
            continue
        name, variant = parse_variant(label)
        settings = {**optim_args.get(name, {}), **variant}
        on = [k for k in ROUNDING if settings.get(k)]
        if on:
            raise ValueError(
                f"{label!r}: {on[0]}=True rounds the step's updates into bfloat16 weights, and --dtype {dtype} trains"
                f" {dtype} weights (nothing to round: the optimizer refuses it); valid: --dtype bfloat16, or the row"
                f" without {on[0]}")


@dataclass
class BenchResult:
    """One optimizer's row. Times in seconds, memory in bytes, losses in nats per token.

    ``step_time_ratio`` is the median over the rounds of (this optimizer's median step time in the round)
    / (``torch.optim.AdamW``'s in the same round); ``ratio_min`` / ``ratio_max`` are the extreme rounds and
    ``ratio_spread = (ratio_max - ratio_min) / step_time_ratio``.
    """

    optimizer: str
    hparams: dict[str, Any]
    trainable_params: int
    state_bytes: int
    bytes_per_param: float
    step_time_s: float
    step_time_ratio: float = float("nan")
    ratio_min: float = float("nan")
    ratio_max: float = float("nan")
    ratio_spread: float = float("nan")
    round_ratios: list[float] = field(default_factory=list)
    final_train_loss: float = float("nan")
    eval_loss: float = float("nan")
    eval_loss_ratio: float = float("nan")
    losses: list[float] = field(default_factory=list)
    step_times_s: list[float] = field(default_factory=list)


#: A row whose step-time ratio varies by more than this over the rounds ((max - min) / median) cannot be
#: ranked against the others: the machine was too busy (or the step too short) for the measurement.
SPREAD_LIMIT = 0.10


def _tensor_bytes(value: Any, depth: int = 0) -> int:
    """Bytes of the tensors in one optimizer-state value: a tensor, a list / tuple / dict of them, or an
    object holding them as attributes (galore-torch keeps its projection matrix in a projector object;
    two levels deep is enough for every peer package we bench)."""
    if torch.is_tensor(value):
        if hasattr(value, "__tensor_flatten__"):  # a wrapper subclass (torchao's OptimState4bit): its inner tensors
            return sum(_tensor_bytes(getattr(value, n), depth) for n in value.__tensor_flatten__()[0])
        return value.numel() * value.element_size()
    if depth >= 2:
        return 0
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, depth + 1) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return sum(_tensor_bytes(v, depth + 1) for v in vars(value).values())
    return 0


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """Optimizer-state bytes: lowmem's exact ``state_bytes()``, else every tensor reachable from ``opt.state``
    (including those inside objects, see :func:`_tensor_bytes`)."""
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    # a package may keep counters beside the per-parameter dicts (pytorch_optimizer's SPAM: state["total_step"])
    return sum(_tensor_bytes(v) for st in opt.state.values() if isinstance(st, dict) for v in st.values())


def default_hparams(name: str, lr: float, rank: int | None) -> dict[str, Any]:
    """Settings that make a fair comparison: one learning rate for all, Adafactor on that external
    learning rate (as the Trainer does), subspace recipes at ``rank``."""
    from lowmem.optim import get_entry

    entry = get_entry(name)
    valid = set(entry.valid_hparams())
    hp: dict[str, Any] = {}
    if "lr" in valid:
        hp["lr"] = lr
    if "relative_step" in valid:
        hp.update(relative_step=False, scale_parameter=False)
    if entry.subspace and rank is not None and "rank" in valid:
        hp["rank"] = rank
    return hp


def _batches(tokenizer, steps: int, batch_size: int, seed: int):
    from lowmem.kit.tasks import sft_dataset, tokenize_sft

    train = tokenize_sft(sft_dataset(steps * batch_size, seed=seed), tokenizer).with_format("torch")
    evals = tokenize_sft(sft_dataset(256, seed=seed, split="eval"), tokenizer).with_format("torch")
    cols = ["input_ids", "attention_mask", "labels"]
    batches = [{c: train[i * batch_size:(i + 1) * batch_size][c] for c in cols} for i in range(steps)]
    return batches, {c: evals[:][c] for c in cols}


@torch.no_grad()
def _eval_loss(model, batch) -> float:
    model.eval()
    loss = model(**batch).loss.item()
    model.train()
    return loss


def round_slices(n_timed: int, repeats: int) -> list[slice]:
    """Split ``n_timed`` consecutive timed steps into ``repeats`` contiguous rounds of (nearly) equal length."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if n_timed < repeats:
        raise ValueError(f"{n_timed} timed steps cannot make {repeats} rounds: need steps >= warmup + repeats")
    bounds = [round(i * n_timed / repeats) for i in range(repeats + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def step_time_ratios(times: list[float], base_times: list[float], rounds: list[slice]) -> list[float]:
    """Per round: median step time of one optimizer / median step time of the baseline in the same round
    (the same steps, interleaved, so both saw the same machine load)."""
    return [statistics.median(times[r]) / statistics.median(base_times[r]) for r in rounds]


def summarize_ratios(ratios: list[float]) -> dict[str, float]:
    """Median, min, max and relative spread ``(max - min) / median`` of per-round ratios."""
    med = statistics.median(ratios)
    lo, hi = min(ratios), max(ratios)
    return {"step_time_ratio": med, "ratio_min": lo, "ratio_max": hi, "ratio_spread": (hi - lo) / med if med > 0 else math.inf}


def spread_warning(results: list[BenchResult], limit: float = SPREAD_LIMIT) -> str | None:
    """A one-line warning naming the rows whose step-time spread exceeds ``limit``, or ``None``."""
    wide = [r for r in results if not r.ratio_spread <= limit]
    if not wide:
        return None
    rows = ", ".join(f"{r.optimizer} ({100 * r.ratio_spread:.0f}%)" for r in wide)
    return (f"warning: step-time ratios vary by more than {100 * limit:.0f}% across rounds for {rows}; step times "
            "cannot be ranked from this run (busy machine or too short steps: rerun idle, or with more --steps/--repeats)")


def _rng_state(device: str) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if device == "cuda" else None)


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


@dataclass
class _Contender:
    label: str
    hp: dict[str, Any]
    model: Any
    opt: Any
    rng: tuple
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    scheduler: Any = None


def train_interleaved(contenders: list[_Contender], batches, device: str, progress: bool = True, desc: str = "bench") -> None:
    """Train every contender on the same batches, interleaved: at each step all of them take that step's
    batch in an order that rotates from step to step, so that a change in machine load hits every one
    alike. Only ``optimizer.step()`` is timed (``c.times``); ``c.scheduler.step()`` (if any) follows it,
    untimed. Each contender runs on its own random stream (``c.rng``), so its losses are those of a run
    on its own. ``batches`` yields dicts of CPU tensors for ``model(**batch)``."""
    from tqdm.auto import tqdm

    n = len(contenders)
    for i, batch in enumerate(tqdm(batches, desc=f"{desc}: {n} optimizers", disable=not progress, leave=False)):
        batch = {k: v.to(device) for k, v in batch.items()}
        for j in range(n):  # rotate who goes first
            c = contenders[(i + j) % n]
            _set_rng_state(c.rng)
            loss = c.model(**batch).loss
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            c.opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            c.times.append(time.perf_counter() - t0)
            if c.scheduler is not None:
                c.scheduler.step()
            c.opt.zero_grad(set_to_none=True)
            c.losses.append(loss.item())
            c.rng = _rng_state(device)


def run_bench(
    optimizers: list[str],
    steps: int = 100,
    model_path: str | None = None,
    lr: float = 3e-3,
    rank: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    warmup: int = 5,
    optim_args: dict[str, dict[str, Any]] | None = None,
    device: str | None = None,
    progress: bool = True,
    repeats: int = 5,
    threads: int | None = None,
    dtype: str = "float32",
) -> list[BenchResult]:
    """Run the benchmark; ``torch_adamw`` is always the first row, the baseline.

    The contenders are interleaved: every optimizer has its own copy of the model (same initial
    weights) and at each step all of them take that step's batch, in an order that rotates from
    step to step, so that a change in machine load hits every optimizer alike. Each contender keeps
    its own random-number stream, so its losses are those of a run on its own. The steps after
    ``warmup`` are split into ``repeats`` rounds; each round gives a step-time ratio to the baseline,
    and a row reports their median and spread.

    Args:
        optimizers: Registered optimizer names, or variants ``NAME:key=value,...`` (each its own row,
            labelled by the entry as written; its values override ``optim_args[NAME]``).
        steps: Training steps per optimizer.
        model_path: Local causal-LM directory; ``None`` uses the embedded tiny Llama. Each contender
            holds a copy of the model and its gradients.
        lr: Learning rate for every optimizer (override per optimizer with ``optim_args``).
        rank: Rank for subspace recipes; ``None`` = a quarter of the model's hidden size.
        batch_size: Sequences per step.
        seed: Model initialisation and data seed.
        warmup: Steps excluded from the step times.
        optim_args: Per-optimizer hyperparameter overrides, ``{name: {key: value}}``.
        device: ``"cuda"`` or ``"cpu"``; default CUDA when available.
        repeats: Rounds the timed steps are split into (at least 1; ``steps >= warmup + repeats``).
        threads: torch CPU threads during the run (restored after); ``None`` leaves them as they are.
        dtype: ``"float32"`` or ``"bfloat16"``: the model's weights (every contender's copy, the baseline's too);
            rows checked first by :func:`check_dtype_rows`.
    """
    import copy

    from lowmem.kit import load_model_and_tokenizer
    from lowmem.optim import build_param_groups, create_optimizer

    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    rounds = round_slices(steps - warmup, repeats)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    optim_args = optim_args or {}
    check_dtype_rows(optimizers, optim_args, dtype)
    prev_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        model, tokenizer = load_model_and_tokenizer(model_path, seed=seed)
        if rank is None:
            rank = max(1, model.config.hidden_size // 4)
        batches, eval_batch = _batches(tokenizer, steps, batch_size, seed)
        move = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
        eval_batch = move(eval_batch)
        model.to(device=device, dtype=DTYPES[dtype])
        model.train()

        contenders: list[_Contender] = []
        names = [BASELINE] + [n for n in optimizers if n != BASELINE]
        for label in names:
            name, variant = parse_variant(label)
            m = copy.deepcopy(model)
            torch.manual_seed(seed)
            if name == BASELINE:
                hp = {"lr": lr, "weight_decay": 0.01, **optim_args.get(name, {}), **variant}
                opt = torch.optim.AdamW(build_param_groups(m), **hp)
            else:
                hp = {**default_hparams(name, lr, rank), **optim_args.get(name, {}), **variant}
                try:
                    opt = create_optimizer(m, name, **hp)
                except ValueError as err:  # (the row named: several rows may share an optimizer)
                    raise ValueError(f"{label!r} on {dtype} weights: {err}") from None
            contenders.append(_Contender(label, hp, m, opt, _rng_state(device)))
        del model

        train_interleaved(contenders, batches, device, progress=progress)

        results: list[BenchResult] = []
        base_times = contenders[0].times[warmup:]
        for c in contenders:
            n_params = sum(p.numel() for p in c.model.parameters() if p.requires_grad)
            sb = _state_bytes(c.opt)
            steady = c.times[warmup:]
            ratios = step_time_ratios(steady, base_times, rounds)
            results.append(BenchResult(
                optimizer=c.label, hparams=c.hp, trainable_params=n_params, state_bytes=sb, bytes_per_param=sb / n_params,
                step_time_s=statistics.median(steady), round_ratios=ratios, **summarize_ratios(ratios),
                final_train_loss=statistics.fmean(c.losses[-10:]), eval_loss=_eval_loss(c.model, eval_batch),
                losses=c.losses, step_times_s=c.times,
            ))
    finally:
        torch.set_num_threads(prev_threads)
    base = results[0]
    for r in results:
        r.eval_loss_ratio = r.eval_loss / base.eval_loss
    return results


def _caption(meta: dict[str, Any]) -> str:
    return (f"{meta.get('threads', '?')} CPU thread(s), device {meta.get('device', '?')}; contenders interleaved step by step, "
            f"{meta.get('repeats', '?')} rounds; step time = median over rounds of the ratio to torch.optim.AdamW in the "
            "same round, spread = (max - min) / median")


def _spread_cell(r: BenchResult) -> str:
    return f"{100 * r.ratio_spread:.0f}% ({r.ratio_min:.2f}-{r.ratio_max:.2f})"


def _spread_cell_short(r: BenchResult) -> str:
    return f"{100 * r.ratio_spread:.0f}%"


def to_markdown(results: list[BenchResult], title: str = "", meta: dict[str, Any] | None = None) -> str:
    meta = meta or {}
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| optimizer | state bytes / param | step time vs torch AdamW (median) | spread (min-max) | final train loss "
        "| eval loss | eval loss vs AdamW |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.optimizer} | {r.bytes_per_param:.3f} | {r.step_time_ratio:.2f}x | {_spread_cell(r)} "
            f"| {r.final_train_loss:.4f} | {r.eval_loss:.4f} | {r.eval_loss_ratio:.3f} |"
        )
    lines += ["", _caption(meta) + "."]
    if meta.get("warning"):
        lines += ["", f"**{meta['warning']}**"]
    return "\n".join(lines) + "\n"


def write_results(results: list[BenchResult], out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``bench.json`` and ``bench.md`` from one payload with :func:`lowmem.io.write_files_atomic`
    (both written in full before either replaces its old file); both carry the same ``run_id``."""
    import uuid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"run_id": uuid.uuid4().hex[:12], "spread_limit": SPREAD_LIMIT, "warning": spread_warning(results), **meta}
    payload = {"meta": meta, "results": [asdict(r) for r in results]}
    text_json = json.dumps(payload, indent=2, default=str)
    text_md = to_markdown(results, title=meta.get("title", "lowmem bench"), meta=meta) + f"\n<!-- run_id {meta['run_id']} -->\n"
    write_files_atomic({out / "bench.json": text_json, out / "bench.md": text_md})
    return out


def print_table(results: list[BenchResult], meta: dict[str, Any] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    meta = meta or {}
    table = Table(title="lowmem bench (baseline: torch.optim.AdamW)", caption=_caption(meta))
    for col in ("optimizer", "B/param", "step time", "spread", "train loss", "eval loss", "vs AdamW"):
        table.add_column(col, justify="left" if col == "optimizer" else "right", no_wrap=True)
    for r in results:
        table.add_row(r.optimizer, f"{r.bytes_per_param:.3f}", f"{r.step_time_ratio:.2f}x", _spread_cell_short(r),
                      f"{r.final_train_loss:.4f}", f"{r.eval_loss:.4f}", f"{r.eval_loss_ratio:.3f}")
    console = Console()
    if not console.is_terminal:  # a pipe or a file: no terminal to wrap for
        console = Console(width=120)
    console.print(table)
    warning = spread_warning(results)
    if warning:
        console.print(warning, style="bold yellow", markup=False)


def parse_variant(entry: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME:key=value[,key=value]`` -> ``(NAME, {key: value})``; the part after the colon is
    read by :func:`lowmem.optim.hparams.parse_optim_args` (the reader of ``lowmem train`` and ``budget``)."""
    from lowmem.optim.hparams import parse_optim_args

    name, sep, kvs = entry.partition(":")
    if not sep:
        return name, {}
    if not kvs.strip():
        raise ValueError(f"expected NAME:key=value[,key=value], got {entry!r}")
    try:
        return name, parse_optim_args(kvs)
    except ValueError as err:
        raise ValueError(f"{entry!r}: {err}") from None


def _parse_optim_args(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--optim-args NAME:key=value,key=value`` (repeatable) -> ``{NAME: {key: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, kv = parse_variant(item)
        if not kv:
            raise ValueError(f"--optim-args expects NAME:key=value[,key=value], got {item!r}")
        out.setdefault(name, {}).update(kv)
    return out


WARMUP = 5


def bench_threads(requested: int | None) -> int:
    """torch CPU threads for the timed run: ``--threads``, else ``OMP_NUM_THREADS``, else 1 (one thread
    measures the optimizer's own work, and does not fight other processes for the cores)."""
    from lowmem.threads import env_threads

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested
    return env_threads() or 1


TINY_DEFAULTS = {"steps": 100, "lr": 3e-3, "batch_size": 16, "seed": 0}

# flags of the tiny task alone (the other modes read none of them): (attribute, flag, what the other modes take)
TINY_ONLY = (("optim_args", "--optim-args", "rows NAME:key=value (e.g. galore_adamw:rank=4) or --rank"),
             ("model", "--model", "their own model or weight set"),
             ("seed", "--seed", "--seeds N with --task text (seeds 0..N-1); --shapes / --launches: no seed"))


def check_tiny_only_flags(args: Any) -> None:
    """Refuse ``--optim-args``, ``--model`` and ``--seed`` with ``--launches``, ``--shapes`` or ``--task text``,
    naming the flag and the mode: those modes never read them (before, GaLore benched at its default rank under
    ``--optim-args galore_adamw:rank=4`` and a nonexistent ``--model`` was ignored).

    Raises:
        ValueError: ``"--optim-args applies to the tiny task only, not --shapes ..."``.
    """
    mode = ("--launches" if getattr(args, "launches", False) else f"--shapes {args.shapes}" if getattr(args, "shapes", None)
            else "--task text" if getattr(args, "task", "tiny") == "text" else None)
    if mode is None:
        return
    for attr, flag, instead in TINY_ONLY:
        if getattr(args, attr, None) not in (None, []):
            raise ValueError(f"{flag} applies to the tiny task only, not {mode}, which does not read it; there: {instead}")


def main(args) -> int:
    """``lowmem bench``: the tiny task (default), ``--task text`` (:mod:`lowmem.bench_text`) or ``--shapes SET``
    (:mod:`lowmem.bench_shapes`)."""
    from lowmem.optim import get_entry, optimizer_entries

    names = args.optimizers or [e.name for e in optimizer_entries() if e.recipe is not None]
    for n in names:  # fail early, listing valid names
        if n.startswith("peer:"):  # a peer package's row, named explicitly (--task text, --shapes)
            from lowmem.bench_peers import get_peer, peer_missing

            missing = peer_missing(get_peer(n))
            if missing is not None:  # (named explicitly: an error, not --peers' skipped line)
                raise ValueError(f"{n!r}: {missing}")
            if not (getattr(args, "shapes", None) or getattr(args, "task", "tiny") == "text"):
                dt = getattr(args, "dtype", "float32") or "float32"
                raise ValueError(f"{n!r}: peer rows need --task text or --shapes" + (
                    f"; {n!r} cannot run in {dt} here (with --dtype {dt}: --task text or --shapes, which probe it on"
                    f" {dt} weights first)" if dt != "float32" else ""))
            continue
        name, variant = parse_variant(n)
        if name != BASELINE:
            valid = get_entry(name).valid_hparams()
            unknown = sorted(set(variant) - set(valid))
            if unknown:
                raise ValueError(f"{n!r}: unknown hyperparameter(s) {unknown} for {name!r}; valid: {', '.join(valid)}")
    dtype = getattr(args, "dtype", "float32") or "float32"
    check_dtype_rows(names, {}, dtype)  # (a rounding option on float32 weights: every mode; --optim-args: below)
    check_tiny_only_flags(args)
    if getattr(args, "launches", False):
        if args.task != "tiny" or any(n.startswith("peer:") for n in names):
            raise ValueError("--launches counts lowmem's optimizer.step() on meta tensors: it does not combine with "
                             "--task or peer rows")
        from lowmem.bench_launches import main as launches_main

        # (by default every registered optimizer: bitsandbytes' own ones as skipped rows, with the reason)
        return launches_main(args, args.optimizers or [e.name for e in optimizer_entries()])
    if getattr(args, "shapes", None) == "llama-368m":
        raise ValueError("--shapes llama-368m is the --launches set (meta tensors); timed sets: the others")
    threads = bench_threads(getattr(args, "threads", None))
    if getattr(args, "seeds", 1) < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if getattr(args, "shapes", None):
        if args.task != "tiny":
            raise ValueError("--shapes times optimizer.step() alone: it does not combine with --task")
        from lowmem.bench_shapes import main as shapes_main

        return shapes_main(args, names, threads)
    if getattr(args, "task", "tiny") == "text":
        from lowmem.bench_text import main as text_main

        return text_main(args, names, threads)
    for flag in ("peers", "lr_sweep"):
        if getattr(args, flag, False):
            raise ValueError(f"--{flag.replace('_', '-')} needs --task text (or --shapes for --peers)")
    if getattr(args, "seeds", 1) != 1:
        raise ValueError("--seeds needs --task text (the tiny task runs one seed: --seed)")
    steps = args.steps if args.steps is not None else TINY_DEFAULTS["steps"]
    lr = args.lr if args.lr is not None else TINY_DEFAULTS["lr"]
    batch_size = args.batch_size if args.batch_size is not None else TINY_DEFAULTS["batch_size"]
    repeats = getattr(args, "repeats", 5)
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if steps < WARMUP + repeats:  # too few steps for the rounds: fail before loading anything
        raise ValueError(f"--steps must be >= {WARMUP + repeats} ({WARMUP} warm-up steps + one per round of"
                         f" --repeats {repeats}), got {steps}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"--lr must be a finite number > 0, got {lr}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    optim_args = _parse_optim_args(args.optim_args)
    benched = list(dict.fromkeys(parse_variant(n)[0] for n in names))
    unbenched = [n for n in optim_args if n not in benched]
    if unbenched:  # (a typo, or a name left off the list: its overrides would apply to nothing)
        raise ValueError(f"--optim-args names {unbenched}, which are not benched; benched: {benched} (add the name to "
                         "the optimizers, or fix the name)")
    check_dtype_rows(names, optim_args, dtype)  # (before the model is loaded)
    seed = args.seed if getattr(args, "seed", None) is not None else TINY_DEFAULTS["seed"]
    results = run_bench(
        names, steps=steps, model_path=args.model, lr=lr, rank=args.rank, batch_size=batch_size,
        seed=seed, device=args.device, optim_args=optim_args, warmup=WARMUP,
        repeats=repeats, threads=threads, dtype=dtype,
    )
    meta = {
        "title": f"lowmem bench: {steps} steps, lr {lr}, batch {batch_size}" + (
            f", {dtype} weights" if dtype != "float32" else ""),
        "dtype": dtype,
        "torch": torch.__version__, "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "model": args.model or "embedded tiny Llama", "date": time.strftime("%Y-%m-%d"),
        "threads": threads, "repeats": repeats, "warmup": WARMUP,
    }
    out = write_results(results, args.output_dir, meta)
    print_table(results, meta)
    bad = [r.optimizer for r in results if not math.isfinite(r.eval_loss)]
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 1 if bad else 0
