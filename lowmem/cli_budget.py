"""``lowmem budget``: will it fit, and what to change so that it does.

    lowmem budget llama-2-7b --optimizer adamw --batch-size 4 --seq-len 1024
    lowmem budget llama-3-8b --quantization nf4 --lora-r 16 --gradient-checkpointing --json
    lowmem budget llama-2-7b --budget 24GiB            # search configurations that fit
    lowmem budget ./my-model --measure --dtype fp32     # run real steps and compare

Prints a table (estimate by component; with ``--measure`` also measured), writes a PNG bar chart
(``--png``), and ``--json`` prints machine-readable output instead of the table. Torch is only
imported inside the handler.
"""

from __future__ import annotations

import argparse
import json
import sys


def _kv(text: str) -> dict:
    out = {}
    for item in filter(None, (text or "").split(",")):
        if "=" not in item:
            raise ValueError(f"--optim-args expects k=v pairs separated by commas, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "budget", help="estimate (or measure) training memory by component; --budget searches what fits",
        description="Estimate the memory of a training step (weights, 4-bit constants, gradients, optimizer state, "
        "activations) on the meta device, nothing allocated. With --budget, list the configurations that fit, "
        "ranked by what they give up. See docs/memory.md.",
    )
    p.add_argument("model", help="named shape (llama-2-7b, llama-3-8b, tiny, ...) or a local model directory")
    p.add_argument("--optimizer", default="adamw", help="registered optimizer (default adamw)")
    p.add_argument("--optim-args", default="", metavar="k=v,...", help="optimizer hyperparameters, e.g. rank=128")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--quantization", default=None, choices=["nf4", "fp4"], help="4-bit base weights (needs --lora-r)")
    p.add_argument("--no-double-quant", action="store_true", help="4-bit without double quantization")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (all linear layers unless --lora-targets)")
    p.add_argument("--lora-targets", default="all-linear", help="comma-separated module names, or all-linear")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--layerwise", action="store_true", help="per-parameter stepping in the backward pass")
    p.add_argument("--budget", default=None, help="e.g. 24GiB: search optimizer, rank, quantization, checkpointing, batch")
    p.add_argument("--top", type=int, default=15, help="with --budget: how many configurations to show")
    p.add_argument("--measure", action="store_true", help="also run real steps and report what was live (CPU or CUDA)")
    p.add_argument("--steps", type=int, default=2, help="with --measure: training steps")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="with --measure (default: cuda when available)")
    p.add_argument("--png", default=None, metavar="PATH",
                   help='write a bar chart of the components (needs matplotlib: pip install -e ".[plot]")')
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(handler=run)
    return p


def require_matplotlib() -> None:
    """``--png`` needs matplotlib (the ``plot`` extra): a one-line error before any work when it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError('--png needs matplotlib, which is not installed: pip install -e ".[plot]" '
                         "(or pip install matplotlib)") from None


def run(args: argparse.Namespace) -> int:
    if args.png:
        require_matplotlib()
    from .memory import estimate_memory
    from .memory.report import bar_chart, fmt_bytes

    quant = None
    if args.quantization:
        quant = {"quant_type": args.quantization, "double_quant": not args.no_double_quant}
    lora = None
    if args.lora_r:
        targets = args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(",")
        lora = {"r": args.lora_r, "lora_alpha": 2 * args.lora_r, "target_modules": targets}
    common = dict(
        optimizer=args.optimizer, optim_args=_kv(args.optim_args), batch_size=args.batch_size, seq_len=args.seq_len,
        dtype=args.dtype, quantization=quant, lora=lora, gradient_checkpointing=args.gradient_checkpointing, layerwise=args.layerwise,
    )

    if args.budget:
        from .memory.search import parse_bytes, search_budget

        limit = parse_bytes(args.budget)
        found = search_budget(args.model, limit, seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype, top=args.top)
        if args.png and found:
            from .memory.estimate import COMPONENTS, MemoryEstimate

            shown = [MemoryEstimate(**{k: c.components.get(k, 0) for k in COMPONENTS}, settings={"model": args.model, **c.settings})
                     for c in found[:6]]
            bar_chart({f"#{i + 1}": e for i, e in enumerate(shown)}, args.png, budget=limit,
                      title=f"{args.model}: the {len(shown)} configurations that give up least within {fmt_bytes(limit)}")
        if args.json:
            print(json.dumps({"budget": limit, "candidates": [c.to_dict() for c in found]}, indent=2))
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{args.model}: configurations within {fmt_bytes(limit)} (seq {args.seq_len}, {args.dtype}), least given up first")
        for col in ("#", "optimizer", "rank", "LoRA", "4-bit", "ckpt", "layerwise", "batch", "total", "gives up"):
            table.add_column(col, justify="right" if col in ("#", "batch", "total", "rank") else "left")
        for i, c in enumerate(found):
            s = c.settings
            table.add_row(str(i + 1), s["optimizer"], str(s["optim_args"].get("rank", "")), str(s["lora"]["r"]) if s.get("lora") else "",
                          s.get("quantization") or "", "yes" if s["gradient_checkpointing"] else "", "yes" if s["layerwise"] else "",
                          str(s["batch_size"]), fmt_bytes(c.total), "; ".join(c.gives_up) or "nothing")
        Console(width=160).print(table)
        if not found:
            print("nothing fits: try a shorter --seq-len, or a larger budget", file=sys.stderr)
            return 1
        return 0

    if args.measure:
        from .memory.measure import measure_memory

        res = measure_memory(args.model, steps=args.steps, device=args.device, **common)
        est = res.estimate
        if args.png:
            bar_chart([est], args.png, measured=res.measured, at_peak=res.at_peak)
        if args.json:
            print(json.dumps(res.to_dict(), indent=2, default=str))
        else:
            print(res.table(), end="")
        return 0

    est = estimate_memory(args.model, **common)
    if args.png:
        bar_chart([est], args.png)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2, default=str))
    else:
        print(est.table(), end="")
    return 0
