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

from lowmem.io import write_text_atomic

BASELINE = "torch_adamw"


@dataclass
class BenchResult:
    """One optimizer's row. Times in seconds, memory in bytes, losses in nats per token."""

    optimizer: str
    hparams: dict[str, Any]
    trainable_params: int
    state_bytes: int
    bytes_per_param: float
    step_time_s: float
    step_time_ratio: float = float("nan")
    final_train_loss: float = float("nan")
    eval_loss: float = float("nan")
    eval_loss_ratio: float = float("nan")
    losses: list[float] = field(default_factory=list)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


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
) -> list[BenchResult]:
    """Run the benchmark; ``torch_adamw`` is always measured first, as the baseline.

    Args:
        optimizers: Registered optimizer names, or variants ``NAME:key=value,...`` (each its own row,
            labelled by the entry as written; its values override ``optim_args[NAME]``).
        steps: Training steps per optimizer.
        model_path: Local causal-LM directory; ``None`` uses the embedded tiny Llama.
        lr: Learning rate for every optimizer (override per optimizer with ``optim_args``).
        rank: Rank for subspace recipes; ``None`` = a quarter of the model's hidden size.
        batch_size: Sequences per step.
        seed: Model initialisation and data seed.
        warmup: Steps excluded from the step-time median.
        optim_args: Per-optimizer hyperparameter overrides, ``{name: {key: value}}``.
        device: ``"cuda"`` or ``"cpu"``; default CUDA when available.
    """
    from tqdm.auto import tqdm

    from lowmem.kit import load_model_and_tokenizer
    from lowmem.optim import build_param_groups, create_optimizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    optim_args = optim_args or {}
    model, tokenizer = load_model_and_tokenizer(model_path, seed=seed)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if rank is None:
        rank = max(1, model.config.hidden_size // 4)
    batches, eval_batch = _batches(tokenizer, steps, batch_size, seed)
    move = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    eval_batch = move(eval_batch)
    model.to(device)

    results: list[BenchResult] = []
    names = [BASELINE] + [n for n in optimizers if n != BASELINE]
    for label in names:
        name, variant = parse_variant(label)
        model.load_state_dict(init_state)
        model.train()
        torch.manual_seed(seed)
        if name == BASELINE:
            hp = {"lr": lr, "weight_decay": 0.01, **optim_args.get(name, {}), **variant}
            opt = torch.optim.AdamW(build_param_groups(model), **hp)
        else:
            hp = {**default_hparams(name, lr, rank), **optim_args.get(name, {}), **variant}
            opt = create_optimizer(model, name, **hp)
        times, losses = [], []
        for batch in tqdm(batches, desc=f"bench {label}", disable=not progress, leave=False):
            loss = model(**move(batch)).loss
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        sb = _state_bytes(opt)
        steady = times[warmup:] if len(times) > warmup else times
        results.append(BenchResult(
            optimizer=label, hparams=hp, trainable_params=n_params, state_bytes=sb, bytes_per_param=sb / n_params,
            step_time_s=statistics.median(steady), final_train_loss=statistics.fmean(losses[-10:]),
            eval_loss=_eval_loss(model, eval_batch), losses=losses,
        ))
        del opt
    base = results[0]
    for r in results:
        r.step_time_ratio = r.step_time_s / base.step_time_s
        r.eval_loss_ratio = r.eval_loss / base.eval_loss
    return results


def to_markdown(results: list[BenchResult], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| optimizer | state bytes / param | step time vs torch AdamW | final train loss | eval loss | eval loss vs AdamW |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.optimizer} | {r.bytes_per_param:.3f} | {r.step_time_ratio:.2f}x | {r.final_train_loss:.4f} "
            f"| {r.eval_loss:.4f} | {r.eval_loss_ratio:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(results: list[BenchResult], out_dir: str | Path, meta: dict[str, Any]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": [asdict(r) for r in results]}
    write_text_atomic(out / "bench.json", json.dumps(payload, indent=2, default=str))
    write_text_atomic(out / "bench.md", to_markdown(results, title=meta.get("title", "lowmem bench")))
    return out


def print_table(results: list[BenchResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lowmem bench (baseline: torch.optim.AdamW)")
    for col in ("optimizer", "bytes/param", "step time", "train loss", "eval loss", "vs AdamW"):
        table.add_column(col, justify="left" if col == "optimizer" else "right")
    for r in results:
        table.add_row(r.optimizer, f"{r.bytes_per_param:.3f}", f"{r.step_time_ratio:.2f}x", f"{r.final_train_loss:.4f}",
                      f"{r.eval_loss:.4f}", f"{r.eval_loss_ratio:.3f}")
    Console().print(table)


def parse_variant(entry: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME:key=value[,key=value]`` -> ``(NAME, {key: value})``; values are YAML scalars."""
    import yaml

    name, sep, kvs = entry.partition(":")
    if not sep:
        return name, {}
    if not kvs:
        raise ValueError(f"expected NAME:key=value[,key=value], got {entry!r}")
    out: dict[str, Any] = {}
    for kv in kvs.split(","):
        k, eq, v = kv.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"{entry!r}: {kv!r} is not key=value")
        out[k.strip()] = yaml.safe_load(v)
    return name, out


def _parse_optim_args(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--optim-args NAME:key=value,key=value`` (repeatable) -> ``{NAME: {key: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, kv = parse_variant(item)
        if not kv:
            raise ValueError(f"--optim-args expects NAME:key=value[,key=value], got {item!r}")
        out.setdefault(name, {}).update(kv)
    return out


def main(args) -> int:
    from lowmem.optim import get_entry, list_optimizers

    names = args.optimizers or [e.name for e in list_optimizers() if e.recipe is not None]
    for n in names:  # fail early, listing valid names
        name, variant = parse_variant(n)
        if name != BASELINE:
            valid = get_entry(name).valid_hparams()
            unknown = sorted(set(variant) - set(valid))
            if unknown:
                raise ValueError(f"{n!r}: unknown hyperparameter(s) {unknown} for {name!r}; valid: {', '.join(valid)}")
    results = run_bench(
        names, steps=args.steps, model_path=args.model, lr=args.lr, rank=args.rank, batch_size=args.batch_size,
        seed=args.seed, device=args.device, optim_args=_parse_optim_args(args.optim_args),
    )
    meta = {
        "title": f"lowmem bench: {args.steps} steps, lr {args.lr}, batch {args.batch_size}",
        "torch": torch.__version__, "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "model": args.model or "embedded tiny Llama", "date": time.strftime("%Y-%m-%d"),
    }
    out = write_results(results, args.output_dir, meta)
    print_table(results)
    bad = [r.optimizer for r in results if not math.isfinite(r.eval_loss)]
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 1 if bad else 0
