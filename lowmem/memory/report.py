"""Readable output: a text table (rich) and a PNG bar chart (matplotlib, imported lazily)."""

from __future__ import annotations

import io
from typing import Any

GIB = 1024**3
UNITS = (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024), ("B", 1))


def fmt_bytes(n: float) -> str:
    for unit, size in UNITS[:-1]:
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def byte_unit(n: float) -> tuple[str, int]:
    """The unit a chart whose largest value is ``n`` bytes is drawn in: the largest of GiB, MiB, KiB, B
    that ``n`` reaches."""
    for unit, size in UNITS:
        if abs(n) >= size:
            return unit, size
    return "B", 1


def _optim_args(args: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in (args or {}).items())


def describe(settings: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    """One line naming what an estimate is for: ``model: optimizer (args), LoRA r=.., nf4, batch B x seq S,
    dtype, checkpointing, layerwise, on device``. ``skip`` leaves out settings said elsewhere (a chart's subtitle)."""
    s = settings
    parts = []
    if "optimizer" not in skip:
        parts.append(f"{s.get('optimizer')}" + (f" ({_optim_args(s.get('optim_args'))})" if s.get("optim_args") else ""))
    if s.get("lora") and "lora" not in skip:
        parts.append(f"LoRA r={s['lora']['r']}")
    q = s.get("quantization")
    if q and "quantization" not in skip:
        parts.append(q["quant_type"] if isinstance(q, dict) else str(q))
    if "batch_size" not in skip and "seq_len" not in skip:
        parts.append(f"batch {s.get('batch_size')} x seq {s.get('seq_len')}")
    elif "batch_size" not in skip:
        parts.append(f"batch {s.get('batch_size')}")
    elif "seq_len" not in skip:
        parts.append(f"seq {s.get('seq_len')}")
    if "dtype" not in skip and s.get("dtype") is not None:
        parts.append(str(s["dtype"]).removeprefix("torch."))
    if s.get("gradient_checkpointing") and "gradient_checkpointing" not in skip:
        parts.append("checkpointing")
    if s.get("layerwise") and "layerwise" not in skip:
        parts.append("layerwise")
    if s.get("trainer") and "trainer" not in skip:
        parts.append(f"TRL {s['trainer']}" + (f" (reference: {s['reference']})" if s.get("reference") not in (None, "none") else ""))
    if s.get("device") and "device" not in skip:
        parts.append(f"on {s['device']}")
    head = f"{s['model']}: " if "model" not in skip and s.get("model") is not None else ""
    return head + ", ".join(parts)


def _render(table: Any) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=110, no_color=True).print(table)
    return buf.getvalue()


def estimate_table(est: Any, measured: dict[str, int] | None = None) -> str:
    """The components of a :class:`~lowmem.memory.estimate.MemoryEstimate` as a text table,
    with a measured column (and the ratio) when ``measured`` is given."""
    from rich.table import Table

    title = describe(est.settings)
    table = Table()
    table.add_column("component")
    table.add_column("estimate", justify="right")
    if measured is not None:
        table.add_column("measured", justify="right")
        table.add_column("est/meas", justify="right")
    rows = {**est.components(), **({"batch inputs": est.details["batch_input_bytes"]} if est.details.get("batch_input_bytes")
                                   else {}), "total": est.total}
    for name, value in rows.items():
        if name in ("quant_constants", "ddp_buckets") and not value and not (measured or {}).get(name):
            continue
        cells = [name, fmt_bytes(value)]
        if measured is not None:
            m = measured.get(name, 0)
            cells += [fmt_bytes(m), f"{value / m:.3f}" if m else "-"]
        table.add_row(*cells)
    d = est.details
    footer = f"parameters {d.get('parameters', 0):,}, trainable {d.get('trainable_parameters', 0):,}"
    if d.get("quantized_parameters"):
        kind = str(est.settings.get("quantization") or "")
        footer += f", {'8-bit' if 'int8' in kind else '4-bit'} {d['quantized_parameters']:,}"
    text = title + "\n" + _render(table) + footer + "\n"
    return text + "".join(f"note: {n}\n" for n in est.notes)


def peak_stack(components: dict[str, int], layerwise: bool = False, gradients_with_activations: int | None = None,
               tied_backward: int = 0, transient_with_activations: int | None = None,
               forward_activations: int | None = None, kept_with_activations: int = 0, embedding_backward: int = 0,
               inputs: int = 0, kept_step_count: int = 0) -> dict[str, int]:
    """The components live at the step's peak, as :func:`~lowmem.memory.estimate.peak_total` counts them:
    without layerwise stepping the optimizer's transient replaces the activations freed by backward, so
    only the larger of the two is kept; with ``gradients_with_activations`` (one micro-batch per step) the
    backward's moment shows those gradients, the step's all of them. The values sum to
    ``peak_total(components, ...)`` with the same arguments (the table's total). The transient's kept part
    (``kept_with_activations``, the codecs' tables; ``kept_step_count``, the fused AdamW kernel's step count) stays at
    the activations' moments. The batch's ``inputs``, live
    at every moment, are shown in ``activations`` (torch's tracker labels them so)."""
    out = _stack_of_components(components, layerwise, gradients_with_activations, tied_backward,
                               transient_with_activations, forward_activations, kept_with_activations + kept_step_count,
                               embedding_backward)
    out["activations"] += int(inputs)
    return out


def _stack_of_components(components: dict[str, int], layerwise: bool, gradients_with_activations: int | None,
                         tied_backward: int, transient_with_activations: int | None, forward_activations: int | None,
                         kept_with_activations: int, embedding_backward: int) -> dict[str, int]:
    """:func:`peak_stack` without the batch's inputs."""
    from .estimate import COMPONENTS

    out = {c: int(components.get(c, 0)) for c in COMPONENTS}
    kept = min(kept_with_activations, out["optimizer_transient"])
    backward = max(tied_backward, embedding_backward)  # the embedding's backward (tied or not), with every gradient
    if layerwise and forward_activations is not None:  # the loss's moment (no gradient), a step's, the embedding's
        grads, transient, act = out["gradients"], out["optimizer_transient"], out["activations"]
        with_act = transient if transient_with_activations is None else min(transient_with_activations, transient)
        live = min(forward_activations, act)
        # the loss's moment: every gradient kept by accumulation is live there (estimate._peak_of_components)
        early = min(gradients_with_activations or 0, grads)
        moments = [(live + grads + with_act, {"activations": live, "optimizer_transient": with_act}),
                   (act + early + kept, {"gradients": early, "optimizer_transient": kept}),
                   (grads + max(transient, backward + kept),
                    {"activations": backward, "optimizer_transient": kept} if backward + kept > transient
                    else {"activations": 0, "optimizer_transient": transient})]
        out.update(max(moments, key=lambda m: m[0])[1])
        return out
    if layerwise and transient_with_activations is not None:  # the larger of the two moments of the backward pass
        with_act = min(transient_with_activations, out["optimizer_transient"])
        live = out["activations"] if forward_activations is None else min(forward_activations, out["activations"])
        moments = [(live + with_act, {"activations": live, "optimizer_transient": with_act}),
                   (out["activations"] + kept, {"optimizer_transient": kept}), (out["optimizer_transient"], {"activations": 0})]
        out.update(max(moments, key=lambda m: m[0])[1])
        return out
    if not layerwise and gradients_with_activations is not None:
        act, transient, grads = out["activations"], out["optimizer_transient"], out["gradients"]
        early = min(gradients_with_activations, grads)
        if act + early + kept >= grads + max(transient, backward + kept):
            out.update(gradients=early, optimizer_transient=kept)
        else:
            out.update(activations=backward if backward + kept > transient else 0,
                       optimizer_transient=kept if backward + kept > transient else transient)
        return out
    if not layerwise:  # (gradient accumulation: the embedding's backward, with every gradient, a moment too)
        moments = [(out["activations"] + kept, {"optimizer_transient": kept}),
                   (out["optimizer_transient"], {"activations": 0}),
                   (embedding_backward + kept, {"activations": embedding_backward, "optimizer_transient": kept})]
        out.update(max(moments, key=lambda m: m[0])[1])
    return out


def measured_stack(at_peak: dict[str, int], measured: dict[str, int]) -> dict[str, int]:
    """The measured components at the moment of the peak (they sum to the table's measured total). The
    tracker counts tensors made inside ``optimizer.step()`` as optimizer state; what exceeds the state it
    keeps (``measured["optimizer_states"]``) is shown as the transient."""
    from .estimate import COMPONENTS

    out = {c: int(at_peak.get(c, 0)) for c in COMPONENTS}
    kept = min(out["optimizer_states"], int(measured.get("optimizer_states", out["optimizer_states"])))
    out["optimizer_transient"] += out["optimizer_states"] - kept
    out["optimizer_states"] = kept
    return out


def chart_labels(settings: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Per-entry labels naming every setting in which the entries differ, and the settings they share
    (for the subtitle). Entries that differ in any setting get different labels."""
    keys = ("model", "optimizer", "lora", "quantization", "batch_size", "seq_len", "dtype", "gradient_checkpointing", "layerwise", "device")

    def value(s, k):
        return repr(s.get("optim_args")) + repr(s.get(k)) if k == "optimizer" else repr(s.get(k))

    shared = tuple(k for k in keys if len({value(s, k) for s in settings}) == 1)
    if len(settings) == 1:
        return [describe(settings[0], skip=("model",))], list(shared)
    labels = [describe(s, skip=shared) or "(same settings)" for s in settings]
    if len(set(labels)) < len(labels):  # differing in something describe() does not show
        labels = [f"#{i + 1} {label}" for i, label in enumerate(labels)]
    return labels, list(shared)


def bar_chart(
    estimates: dict[str, Any] | list[Any],
    path: str,
    budget: int | None = None,
    measured: dict[str, int] | None = None,
    at_peak: dict[str, int] | None = None,
    title: str | None = None,
) -> str:
    """Write a stacked bar chart of training memory by component to ``path`` (PNG, written atomically, 0644).

    Args:
        estimates (`list[MemoryEstimate]` or `dict[str, MemoryEstimate]`): One bar each. Labels name the
            settings in which the estimates differ (a dict's keys are prefixed to them); the settings they
            share go in the subtitle.
        path (`str`): Output file.
        budget (`int` or `None`, defaults to `None`): Draws a horizontal line at this many bytes.
        measured, at_peak (`dict[str, int]` or `None`): With one estimate: a measurement's per-component maxima
            and its breakdown at the peak (:class:`~lowmem.memory.measure.MemoryMeasurement`); a second,
            hatched bar shows the breakdown at the peak, whose height is the table's measured total.
        title (`str` or `None`): Overrides the title (default: the model and "training memory by component").

    Each bar shows the components live at the step's peak (:func:`peak_stack`), so its height is the total of
    the table; the total is written above it. The unit (GiB, MiB, KiB) follows the largest bar.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from ..io import write_bytes_atomic
    from .estimate import COMPONENTS, peak_total

    items = list(estimates.items()) if isinstance(estimates, dict) else [(None, e) for e in estimates]
    settings = [e.settings for _, e in items]
    labels, shared = chart_labels(settings)
    labels = [f"{k} {lab}" if k else lab for (k, _), lab in zip(items, labels)]
    bars = [(lab, peak_stack(e.components(), **e.peak_args()), peak_total(e.components(), **e.peak_args()), None)
            for lab, (_, e) in zip(labels, items)]
    if measured is not None or at_peak is not None:
        if len(items) != 1 or measured is None or at_peak is None:
            raise ValueError("bar_chart: `measured` and `at_peak` go together, with exactly one estimate")
        bars = [("estimate", bars[0][1], bars[0][2], None), ("measured (at its peak)", measured_stack(at_peak, measured), int(measured["total"]), "//")]
    top = max(max(b[2] for b in bars), budget or 0)
    unit, size = byte_unit(top)

    if len(items) == 1 and len(bars) == 1:
        bars[0] = ("estimate",) + bars[0][1:]  # the settings are in the subtitle
    width_in = max(6.5, 1.7 * len(bars) + 2.5)
    fig, ax = plt.subplots(figsize=(width_in, 5.0))
    colors = plt.get_cmap("tab10").colors
    used = [c for c in COMPONENTS if any(b[1].get(c) for b in bars)]
    bottoms = [0.0] * len(bars)
    for comp in used:
        vals = [b[1].get(comp, 0) / size for b in bars]
        for i, (v, b) in enumerate(zip(vals, bars)):
            if v:
                ax.bar(i, v, 0.6, bottom=bottoms[i], color=colors[COMPONENTS.index(comp) % 10], hatch=b[3], edgecolor="white")
        bottoms = [bt + v for bt, v in zip(bottoms, vals)]
    for i, b in enumerate(bars):
        ax.text(i, b[2] / size, fmt_bytes(b[2]), ha="center", va="bottom", fontsize=8,
                bbox=dict(facecolor="white", edgecolor="none", pad=1.0))  # legible over a budget line
    ax.set_ylim(0, 1.15 * top / size)
    handles = [Patch(facecolor=colors[COMPONENTS.index(c) % 10], label=c.replace("_", " ")) for c in reversed(used)]
    if any(b[3] for b in bars):
        handles.append(Patch(facecolor="white", hatch="//", edgecolor="dimgray", label="measured"))
    if budget:
        handles.insert(0, ax.axhline(budget / size, color="black", linestyle="--", linewidth=1, label=f"budget {fmt_bytes(budget)}"))
    chars = int(width_in * 9)  # characters of 8-point text per inch of figure, with margins
    ax.set_xticks(range(len(bars)), [textwrap.fill(b[0], max(12, int(chars / len(bars)))) for b in bars], fontsize=8)
    ax.set_ylabel(unit)
    model = settings[0].get("model") if "model" in shared else None
    head = title or (f"{model}: training memory by component" if model else "Training memory by component")
    keys = ("optimizer", "lora", "quantization", "batch_size", "seq_len", "dtype", "gradient_checkpointing", "layerwise")
    sub = describe(settings[0], skip=("model",) + tuple(k for k in keys if k not in shared))  # what all bars share
    note = "bar = the step's peak (the larger of activations and optimizer transient, unless layerwise)"
    ax.set_title(textwrap.fill(head, chars // 1.2) + ("\n" + textwrap.fill(sub, chars) if sub else "") + "\n" + textwrap.fill(note, chars),
                 fontsize=9)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path
