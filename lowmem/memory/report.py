"""Readable output: a text table (rich) and a PNG bar chart (matplotlib, imported lazily)."""

from __future__ import annotations

import io
from typing import Any

GIB = 1024**3


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _render(table: Any) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=110, no_color=True).print(table)
    return buf.getvalue()


def estimate_table(est: Any, measured: dict[str, int] | None = None) -> str:
    """The components of a :class:`~lowmem.memory.estimate.MemoryEstimate` as a text table,
    with a measured column (and the ratio) when ``measured`` is given."""
    from rich.table import Table

    s = est.settings
    title = f"{s.get('model')}: {s.get('optimizer')} {s.get('optim_args') or ''} batch {s.get('batch_size')} x {s.get('seq_len')} {s.get('dtype')}"
    if s.get("quantization"):
        title += f" {s['quantization']['quant_type']}"
    if s.get("lora"):
        title += f" lora r={s['lora']['r']}"
    if s.get("gradient_checkpointing"):
        title += " ckpt"
    if s.get("layerwise"):
        title += " layerwise"
    table = Table()
    table.add_column("component")
    table.add_column("estimate", justify="right")
    if measured is not None:
        table.add_column("measured", justify="right")
        table.add_column("est/meas", justify="right")
    rows = {**est.components(), "total": est.total}
    for name, value in rows.items():
        if name == "quant_constants" and not value and not (measured or {}).get(name):
            continue
        cells = [name, fmt_bytes(value)]
        if measured is not None:
            m = measured.get(name, 0)
            cells += [fmt_bytes(m), f"{value / m:.3f}" if m else "-"]
        table.add_row(*cells)
    d = est.details
    footer = f"parameters {d.get('parameters', 0):,}, trainable {d.get('trainable_parameters', 0):,}"
    if d.get("quantized_parameters"):
        footer += f", 4-bit {d['quantized_parameters']:,}"
    text = title + "\n" + _render(table) + footer + "\n"
    return text + "".join(f"note: {n}\n" for n in est.notes)


def bar_chart(estimates: dict[str, Any], path: str, budget: int | None = None, measured: dict[str, dict[str, int]] | None = None) -> str:
    """Write a stacked bar chart (GiB by component) of one or more estimates to ``path`` (PNG).

    Args:
        estimates (`dict[str, MemoryEstimate]`): Label -> estimate, one bar each.
        path (`str`): Output file.
        budget (`int` or `None`, defaults to `None`): Draws a horizontal line at this many bytes.
        measured (`dict[str, dict[str, int]]` or `None`): Label -> measured components, drawn as a
            second, hatched bar beside each estimate.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .estimate import COMPONENTS

    labels = list(estimates)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(labels) + 2), 4.5))
    colors = plt.get_cmap("tab10").colors
    width = 0.38 if measured else 0.6
    for offset, source, hatch in ((0.0, "estimate", None), (width, "measured", "//")):
        if source == "measured" and not measured:
            continue
        bottoms = [0.0] * len(labels)
        for ci, comp in enumerate(COMPONENTS):
            vals = [
                (estimates[l].components()[comp] if source == "estimate" else measured.get(l, {}).get(comp, 0)) / GIB for l in labels
            ]
            if not any(vals):
                continue
            ax.bar([i + offset for i in range(len(labels))], vals, width, bottom=bottoms, color=colors[ci % 10], hatch=hatch,
                   label=comp if source == "estimate" else None, edgecolor="white")
            bottoms = [b + v for b, v in zip(bottoms, vals)]
    top = max(sum(e.components().values()) for e in estimates.values()) / GIB
    if measured:
        top = max(top, max(sum(v for k, v in m.items() if k in COMPONENTS) for m in measured.values()) / GIB)
    ax.set_ylim(0, 1.1 * max(top, (budget or 0) / GIB))
    if budget:
        ax.axhline(budget / GIB, color="black", linestyle="--", linewidth=1, label=f"budget {fmt_bytes(budget)}")
    ax.set_xticks([i + (width / 2 if measured else 0) for i in range(len(labels))], labels, rotation=15, ha="right")
    ax.set_ylabel("GiB")
    ax.set_title("Training memory by component" + (" (hatched: measured)" if measured else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
