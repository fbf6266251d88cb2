"""``lowmem bench --launches``: what one ``optimizer.step()`` dispatches on the CUDA code path, without a GPU
(issue 15).

On a GPU this engine's step was launch-bound (an H200, a 368M Llama: AdamW 105.6 ms with 6,033 kernel launches
in chunks of 2^19 elements, 10.2 ms with 177 on whole tensors; docs/benchmarks.md "First GPU run"), so the number
of kernels a step launches is the first thing to keep down. This audit counts them on **meta tensors**: every
parameter and gradient is a meta tensor, so the step takes the code path of a non-CPU device (the chunk of
:func:`~lowmem.optim.engine.default_chunk_numel`, torch's fused AdamW kernel, no MKL buffers) and nothing is
computed. A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten operation the step
dispatches and counts, per step:

* ``kernels``: operations that would launch a kernel on the device: views and allocations excluded
  (:data:`NO_KERNEL`), and operations on CPU tensors only (a step counter's arithmetic) excluded;
* ``syncs``: reads of a device value on the host (``.item()``, ``bool()``, a copy to the CPU): each one waits
  for the GPU (the non-finite check's one read per step is by design);
* ``h2d``: copies from the CPU to the device (a CPU scalar tensor turned into a device one);
* ``host_reads``: ``.item()`` of CPU tensors (step counters; no device wait).

Each recipe (or ``NAME:key=value`` variant) steps a model of the chosen shape set (:data:`LAUNCH_SETS`:
``llama-368m``, the model of the H200 run, and every ``lowmem bench --shapes`` set) built on the meta device, with
zero gradients, under the settings ``lowmem bench --shapes`` uses (recommended hyperparameters, subspace rank
``--rank``, default 128), its weights and gradients in ``--dtype`` (:data:`LAUNCH_DTYPES`: ``float32``, the default,
or ``bfloat16``: pure bfloat16 weights, the optimizer's state as it makes it for them), twice: with the default chunk
(the device's, 2^24 elements) and with ``chunk_numel=None`` (whole tensors). Without a projection the **steady step** is step :data:`STEADY_STEP`.
Recipes with a projection refresh it every :data:`REFRESH_GAP` steps here (``update_proj_gap`` set to it; their
schedules differ: GaLore refreshes at steps 1, 4, 7, Subspace-Momentum at 3, 6), and step 2 to
``2 * REFRESH_GAP + 1`` are counted: the steady step is the most frequent count among them, the **refresh
step** the one with the most kernels (:func:`steady_and_refresh`). The **first step** (state allocation, first
refresh) is counted apart (the ``first kernels`` column), never as a steady or refresh step. A meta device value read on the host answers ``True`` / ``1``: every gradient counts
as finite.

**Host time** (the ``host ms`` column): the wall time of a steady step on the meta tensors of the default chunk
(no kernel runs: all of it is the host's work, the engine's Python and the dispatch of its operations), the median
of :data:`HOST_STEPS` steps after the counted ones, and the part of it **after the sync**, from the non-finite
check's device read (:class:`SyncClock`: on meta it answers ``True`` at once) to the end of the step. On a GPU
the device waits at that read for the host, so the host's work after it is added to the step's GPU wall time
(issue 15: AdamW 1.44x torch's fused AdamW on the H200 with ~9 kernels). Machine-dependent (this machine's
CPU, its load) and not a GPU time: on meta many operations (multi-tensor and elementwise ones, ``torch.stack``)
run torch's Python reference implementations, far slower than CUDA's dispatch (most of the time of the steps with
hundreds of operations: GaLore's, the 8-bit ones), and a CUDA launch costs a few microseconds that meta does not;
a step with few operations (AdamW's fused kernel) is mostly the engine's own Python.
The reference, ``torch.optim.AdamW(fused=True)`` on the same meta tensors (:func:`torch_fused_host_ms`; no
sync), is in the footnote.

What the meta device cannot show is said in the row: a recipe whose CUDA path is not the one meta tensors take
(:func:`cuda_path_note`: MicroAdam's ``torch.compile`` direction, adamw8bit's bitsandbytes kernel, counted on
their plain paths) and one that cannot run on meta at all (bitsandbytes' own optimizers: skipped, the reason in
the table).
"""

from __future__ import annotations

import collections
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

#: aten operations that launch no kernel: views, allocations without a fill, the host read itself
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "slice", "t", "unsqueeze", "squeeze", "as_strided", "detach", "alias", "expand", "permute",
    "select", "narrow", "transpose", "_reshape_alias", "reshape", "split", "split_with_sizes", "chunk", "unbind",
    "view_as_real", "view_as_complex", "unfold", "diagonal", "_local_scalar_dense", "empty", "empty_like",
    "new_empty", "empty_strided", "lift_fresh", "_to_copy_noop",
})
#: the step counted as steady without a projection, and the refresh gap (``update_proj_gap``) of recipes with
#: one (:func:`steady_and_refresh`)
STEADY_STEP = 4
REFRESH_GAP = 3
#: steps timed for the host time (their median): after the counted ones; with a projection refreshing every
#: REFRESH_GAP steps a third of them refresh, so the median is a steady step's
HOST_STEPS = 9
#: ``llama-368m``: the model of the H200 run (docs/benchmarks.md "First GPU run"), as a transformers LlamaConfig
LLAMA_368M = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
DEFAULT_SET = "llama-368m"
DEFAULT_RANK = 128
#: ``--dtype`` of ``--launches``: the dtype of the meta model's weights and gradients
LAUNCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def launch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of ``--dtype`` ``dtype`` (:data:`LAUNCH_DTYPES`).

    Raises:
        ValueError: An unsupported dtype, naming the valid choices.
    """
    if dtype not in LAUNCH_DTYPES:
        raise ValueError(f"--dtype {dtype!r} for --launches: valid: {', '.join(LAUNCH_DTYPES)}")
    return LAUNCH_DTYPES[dtype]


def launch_sets() -> list[str]:
    """Every shape set ``--launches`` takes: ``llama-368m`` and the ``--shapes`` sets."""
    from lowmem.bench_shapes import all_sets

    return [DEFAULT_SET, *all_sets()]


@dataclass
class Counts:
    """What one step dispatched (see the module docstring); ``top``: the most frequent kernels."""

    kernels: int = 0
    syncs: int = 0
    h2d: int = 0
    host_reads: int = 0
    top: list[tuple[str, int]] = field(default_factory=list)


class LaunchCounter(TorchDispatchMode):
    """Counts the kernels, device syncs, host-to-device copies and host reads of the aten operations dispatched
    under it (:class:`Counts`). A device value read on the host (on meta: nothing to read) answers ``True`` for
    a bool, ``1.0`` for a float, ``1`` for an int."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = collections.Counter()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = func.overloadpacket.__name__
        if func is torch.ops.aten._local_scalar_dense.default:
            x = args[0]
            if x.device.type == "cpu":
                self.counts["host_reads"] += 1
                return func(*args, **kwargs)
            self.counts["syncs"] += 1
            return True if x.dtype is torch.bool else (1.0 if x.is_floating_point() else 1)
        out = func(*args, **kwargs)
        devices = {a.device.type for a in _tensors(args, kwargs)}
        dst = out.device.type if isinstance(out, torch.Tensor) else None
        if op in ("_to_copy", "copy_", "_copy_from"):
            if "cpu" in devices and dst not in (None, "cpu"):
                self.counts["h2d"] += 1  # a transfer, not a kernel
                return out
            if devices and "cpu" not in devices and dst == "cpu":
                self.counts["syncs"] += 1
                return out
        if op not in NO_KERNEL and (devices or {dst}) != {"cpu"}:  # (a factory: its output's device)
            self.counts["kernels"] += 1
            self.ops[op] += 1
        return out

    def result(self, top: int = 5) -> Counts:
        return Counts(self.counts["kernels"], self.counts["syncs"], self.counts["h2d"], self.counts["host_reads"],
                      self.ops.most_common(top))


class SyncClock:
    """Within it, a meta tensor read on the host (``bool()``, ``.item()``, ``.tolist()``: the non-finite check's
    flag) answers at once as :class:`LaunchCounter` does (``True`` / ``1.0`` / ``1``) and its time is kept in
    :attr:`last` (``perf_counter``): the step's sync. Patches those three methods of ``torch.Tensor`` instead of a
    dispatch mode, so that every other operation runs at its own cost (a Python dispatch mode adds a few
    microseconds to each, the step counters' reads included); tensors on other devices read as before."""

    _METHODS = ("__bool__", "item", "tolist")

    def __init__(self) -> None:
        self.last: float | None = None

    def _answer(self, x: torch.Tensor) -> Any:
        self.last = time.perf_counter()
        return True if x.dtype is torch.bool else (1.0 if x.is_floating_point() else 1)

    def __enter__(self) -> "SyncClock":
        self.saved = {m: torch.Tensor.__dict__.get(m) for m in self._METHODS}
        for m in self._METHODS:
            orig = getattr(torch.Tensor, m)

            def read(x, *args, _orig=orig, _m=m):
                if x.device.type != "meta":
                    return _orig(x, *args)
                v = self._answer(x)
                return [v] * x.numel() if _m == "tolist" and x.dim() else v

            setattr(torch.Tensor, m, read)
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, orig in self.saved.items():
            if orig is None:
                delattr(torch.Tensor, m)
            else:
                setattr(torch.Tensor, m, orig)


def host_ms(opt: torch.optim.Optimizer, steps: int = HOST_STEPS) -> tuple[float, float]:
    """The median host wall time of ``steps`` steps of ``opt`` on meta tensors and of their part after the sync
    (:class:`SyncClock`; 0 for a step without one), in milliseconds."""
    import statistics

    total, after = [], []
    with SyncClock() as clock:
        for _ in range(steps):
            clock.last = None
            start = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            total.append(end - start)
            after.append(0.0 if clock.last is None else end - clock.last)
    return statistics.median(total) * 1e3, statistics.median(after) * 1e3


def torch_fused_host_ms(shapes: str = DEFAULT_SET, steps: int = HOST_STEPS,
                        dtype: str = "float32") -> tuple[float | None, str | None]:
    """:func:`host_ms` of ``torch.optim.AdamW(fused=True)`` on the meta model of ``shapes`` (``dtype`` weights) after
    ``STEADY_STEP - 1`` steps: the reference for the host time. torch refuses ``fused=True`` on meta tensors in
    its device check (``torch.optim.adam._device_dtype_check_for_fused``), which is bypassed for it (its fused
    kernel has a meta implementation: step counters on the device, no sync); ``(None, reason)`` where that fails."""
    import torch.optim.adam as torch_adam

    check = getattr(torch_adam, "_device_dtype_check_for_fused", None)
    if check is None:
        return None, "torch.optim.adam has no _device_dtype_check_for_fused to bypass (torch changed)"
    model = build_meta_model(shapes, dtype)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch_adam._device_dtype_check_for_fused = lambda p, cuda_unsupported=False: None
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        for _ in range(STEADY_STEP - 1):
            opt.step()
        return host_ms(opt, steps)[0], None
    except Exception as err:  # noqa: BLE001 (reported in the footnote)
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    finally:
        torch_adam._device_dtype_check_for_fused = check


def _tensors(args: Any, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among an operation's arguments, lists of tensors (foreach operations) included."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found += [x for x in a if isinstance(x, torch.Tensor)]
    return found


def build_meta_model(shapes: str, dtype: str = "float32") -> nn.Module:
    """The model of the shape set ``shapes`` (:func:`launch_sets`) with every parameter on the meta device, in
    ``dtype`` (:func:`launch_dtype`): ``llama-368m`` a transformers ``LlamaForCausalLM`` (:data:`LLAMA_368M`), the
    others the modules of :func:`lowmem.bench_shapes.build_set` under the same names, built without allocating."""
    dt = launch_dtype(dtype)
    if shapes == DEFAULT_SET:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(**LLAMA_368M)).to(dt)
    from lowmem import bench_shapes

    try:
        bench_shapes.set_shapes(shapes)
    except ValueError:
        raise ValueError(f"unknown shape set {shapes!r} for --launches; valid: {', '.join(launch_sets())}"
                         " (or hidden-N, N >= 8)") from None
    with torch.device("meta"), _no_cpu_init(bench_shapes):
        return bench_shapes.build_set(shapes).to(dt)


class _no_cpu_init:
    """The ``--shapes`` modules initialise their weights on the CPU (``to_empty(device="cpu")``, ``normal_``):
    on the meta device that allocates nothing and computes nothing."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.saved = nn.Module.to_empty
        nn.Module.to_empty = lambda m, *, device=None, recurse=True: m  # (stays on meta)

    def __exit__(self, *exc: Any) -> None:
        nn.Module.to_empty = self.saved


def cuda_path_note(name: str, hparams: dict[str, Any]) -> str | None:
    """What a recipe does on CUDA that meta tensors cannot show (``None``: the counted path is CUDA's)."""
    if name == "microadam" and hparams.get("compile", "auto") != "never":
        return "CUDA runs the direction under torch.compile (fewer kernels); counted: the eager path"
    if name == "adamw8bit" and hparams.get("fused") is not False:
        return "CUDA's default (fused=None) is bitsandbytes' 8-bit kernel; counted: lowmem's own 8-bit path"
    return None


@dataclass
class LaunchRow:
    """One optimizer's row: per first, steady and refresh step, the counts with the default chunk (``default``)
    and with whole tensors (``whole``); ``transient_*``: ``step_transient_bytes()`` of each; ``skipped``: why it
    could not run on meta; ``note``: :func:`cuda_path_note`; ``host_ms`` / ``host_after_sync_ms``: :func:`host_ms` of
    the default chunk's steady step (``None`` with ``host_steps=0``)."""

    optimizer: str
    hparams: dict[str, Any]
    chunk: int | None = None
    steady_default: Counts | None = None
    steady_whole: Counts | None = None
    refresh_default: Counts | None = None
    refresh_whole: Counts | None = None
    transient_default: int | None = None
    transient_whole: int | None = None
    skipped: str | None = None
    note: str | None = None
    host_ms: float | None = None
    host_after_sync_ms: float | None = None
    first_default: Counts | None = None
    first_whole: Counts | None = None


def _build(label: str, model: nn.Module, rank: int) -> tuple[torch.optim.Optimizer, dict[str, Any], bool]:
    """The optimizer of a row (``lowmem bench --shapes``' settings), with projection refreshes every
    :data:`REFRESH_GAP` steps; returns it, its settings and whether it refreshes a projection."""
    from lowmem.bench_shapes import _build as shapes_build

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (rank >= a side: trained full-rank, as in training)
        opt, hp, gap, _ = shapes_build(label, model, rank)
    refreshes = gap is not None and getattr(getattr(opt, "recipe", None), "projection", None) is not None
    if refreshes:
        for group in opt.param_groups:
            if group.get("update_proj_gap") is not None:
                group["update_proj_gap"] = REFRESH_GAP
    return opt, hp, refreshes


def steady_and_refresh(counts: list[Counts], refreshes: bool) -> tuple[Counts, Counts | None]:
    """The steady and the refresh step of a run's :class:`Counts` (steps 1, 2, ...): step :data:`STEADY_STEP`
    and no refresh for a recipe without a projection; else, among step 2 on, the latest step whose kernel count
    is the most frequent one, and the first with the most kernels (``None`` when no step has more)."""
    if not refreshes:
        return counts[STEADY_STEP - 1], None
    later = counts[1:]
    modes = collections.Counter(c.kernels for c in later)
    top = max(modes.values())
    steady = [c for c in later if modes[c.kernels] == top and c.kernels == min(k for k, n in modes.items() if n == top)][-1]
    refresh = max(later, key=lambda c: c.kernels)
    return steady, (refresh if refresh.kernels > steady.kernels else None)


def count_steps(opt: torch.optim.Optimizer, steps: int) -> list[Counts]:
    """:class:`Counts` of each of ``steps`` steps of ``opt`` (its parameters' gradients set)."""
    out = []
    for _ in range(steps):
        with LaunchCounter() as counter:
            opt.step()
        out.append(counter.result())
    return out


def audit(label: str, shapes: str = DEFAULT_SET, rank: int = DEFAULT_RANK, host_steps: int = HOST_STEPS,
          dtype: str = "float32") -> LaunchRow:
    """The :class:`LaunchRow` of one optimizer (a registered name or ``NAME:key=value`` variant) on ``shapes``
    with ``dtype`` weights (:func:`launch_dtype`); its host time from ``host_steps`` steps after the counted ones
    (0: not timed)."""
    from lowmem.bench import parse_variant
    from lowmem.optim import get_entry

    name, variant = parse_variant(label)
    entry = get_entry(name)
    if entry.recipe is None:
        return LaunchRow(label, variant, skipped="bitsandbytes' own optimizer: CUDA kernels with no meta-device path")
    row = LaunchRow(label, variant)
    for whole in (False, True):
        model = build_meta_model(shapes, dtype)
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        try:
            opt, hp, refreshes = _build(label, model, rank)
            if whole:
                opt.chunk_numel = None
            else:
                row.chunk = opt.chunk_numel
            counts = count_steps(opt, 2 * REFRESH_GAP + 1 if refreshes else STEADY_STEP)
            transient = opt.step_transient_bytes() if hasattr(opt, "step_transient_bytes") else None
            if not whole and host_steps:
                row.host_ms, row.host_after_sync_ms = host_ms(opt, host_steps)
        except Exception as err:  # noqa: BLE001 (reported in the row: the audit goes on)
            row.skipped = f"cannot step on meta tensors: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            return row
        row.hparams = {k: v for k, v in hp.items() if k != "lr"}
        row.note = cuda_path_note(name, {**hp, **variant})
        steady, refresh = steady_and_refresh(counts, refreshes)
        if whole:
            row.steady_whole, row.refresh_whole, row.transient_whole, row.first_whole = steady, refresh, transient, counts[0]
        else:
            row.steady_default, row.refresh_default, row.transient_default = steady, refresh, transient
            row.first_default = counts[0]
    return row


def run_launches(optimizers: list[str], shapes: str = DEFAULT_SET, rank: int | None = None,
                 progress: bool = True, host_steps: int = HOST_STEPS,
                 dtype: str = "float32") -> tuple[list[LaunchRow], dict[str, Any]]:
    """:func:`audit` of each optimizer on ``dtype`` weights; returns the rows and the run's metadata (with torch's
    fused AdamW's host time on the same weights, :func:`torch_fused_host_ms`, when ``host_steps``)."""
    from lowmem.optim.engine import DEVICE_CHUNK_NUMEL

    build_meta_model(shapes, dtype)  # an unknown set or dtype: the ValueError naming the valid ones
    rank = DEFAULT_RANK if rank is None else rank
    start, rows = time.perf_counter(), []
    for label in optimizers:
        rows.append(audit(label, shapes, rank, host_steps, dtype))
        if progress:
            r = rows[-1]
            print(f"  {label}: " + (f"skipped ({r.skipped})" if r.skipped else
                                    f"{r.steady_default.kernels} kernels / step, {r.steady_whole.kernels} whole"
                                    + ("" if r.host_ms is None else f", host {_host(r)} ms")), flush=True)
    model = build_meta_model(shapes, dtype)
    meta = {"shapes": shapes, "dtype": dtype, "params": sum(p.numel() for p in model.parameters()), "tensors": len(list(model.parameters())),
            "rank": rank, "device_chunk": DEVICE_CHUNK_NUMEL, "steady_step": STEADY_STEP, "refresh_gap": REFRESH_GAP,
            "torch": torch.__version__, "host_steps": host_steps}
    meta["torch_fused_host_ms"], meta["torch_fused_host_error"] = (torch_fused_host_ms(shapes, host_steps, dtype) if host_steps
                                                                   else (None, None))
    meta["wall_s"] = time.perf_counter() - start
    return rows, meta


def _cell(c: Counts | None) -> tuple[str, ...]:
    return ("",) * 4 if c is None else (f"{c.kernels:,}", str(c.syncs), str(c.h2d), str(c.host_reads))


def _mib(b: int | None) -> str:
    return "" if b is None else f"{b / 2**20:,.1f}"


def _host(r: LaunchRow) -> str:
    return "" if r.host_ms is None else f"{r.host_ms:,.2f} / {r.host_after_sync_ms:,.2f}"


def _host_note(meta: dict[str, Any]) -> str:
    """The footnote's sentence on the host time (:func:`host_ms`, :func:`torch_fused_host_ms`)."""
    if not meta.get("host_steps"):
        return ""
    ref = (f"torch.optim.AdamW(fused=True) on the same meta tensors: {meta['torch_fused_host_ms']:.2f} ms (no sync)"
           if meta.get("torch_fused_host_ms") is not None else
           f"torch.optim.AdamW(fused=True) could not step on meta ({meta.get('torch_fused_host_error')})")
    return (f" Host ms: the median wall time of {meta['host_steps']} steady steps of the default chunk on this machine's "
            "CPU (no kernel runs on meta), and its part after the non-finite check's device read (on a GPU the device "
            "idles there while the host works); not a GPU time: meta runs Python reference implementations of many "
            f"operations (multi-tensor, elementwise), which dominate the steps with many operations; {ref}.")


def to_markdown(rows: list[LaunchRow], meta: dict[str, Any]) -> str:
    """The table: per steady and refresh step, kernels with the default chunk and with whole tensors, then the
    default chunk's syncs / h2d / host reads; the transient of each; the host time; the first step's kernels (state
    allocation); skips and notes below it."""
    lines = ["| optimizer | steady kernels (default / whole) | syncs | h2d | host reads | refresh kernels (default / whole) "
             "| syncs | h2d | host reads | transient MiB (default / whole) | host ms (step / after sync) "
             "| first kernels (default / whole) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.optimizer} | skipped: {r.skipped} | | | | | | | | | | |")
            continue
        s, rf = _cell(r.steady_default), _cell(r.refresh_default)
        refresh = f"{rf[0]} / {_cell(r.refresh_whole)[0]}" if r.refresh_default is not None else "—"
        rf = rf if r.refresh_default is not None else ("",) * 4
        mark = f" [{len(notes) + 1}]" if r.note else ""
        if r.note:
            notes.append(r.note)
        lines.append(f"| {r.optimizer}{mark} | {s[0]} / {_cell(r.steady_whole)[0]} | {s[1]} | {s[2]} | {s[3]} | {refresh} "
                     f"| {rf[1]} | {rf[2]} | {rf[3]} | {_mib(r.transient_default)} / {_mib(r.transient_whole)} | {_host(r)} "
                     f"| {_cell(r.first_default)[0]} / {_cell(r.first_whole)[0]} |")
    lines += ["", (f"`{meta['shapes']}`: {meta['params']:,} parameters in {meta['tensors']} tensors of "
                   f"{meta.get('dtype', 'float32')} on the meta device (the "
                   f"CUDA code path, nothing computed); default chunk = the device's, {meta['device_chunk']:,} elements; "
                   f"steady step: step {meta['steady_step']}, or with a projection (update_proj_gap {meta['refresh_gap']}) "
                   f"the most frequent count of steps 2-{2 * meta['refresh_gap'] + 1}, refresh step: their largest; first step: "
                   f"step 1 (the state allocated, the first refresh); subspace "
                   f"rank {meta['rank']}; syncs / h2d / host reads of the default chunk's step; kernels: device operations "
                   f"other than views and allocations; torch {meta['torch']}; {meta['wall_s']:.0f} s." + _host_note(meta))]
    lines += [f"[{i}] {n}." for i, n in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def main(args, names: list[str]) -> int:
    """``lowmem bench --launches``."""
    import json

    from lowmem.io import write_files_atomic

    shapes = args.shapes or DEFAULT_SET
    dtype = getattr(args, "dtype", None) or "float32"
    rows, meta = run_launches(names, shapes, rank=args.rank, dtype=dtype)
    meta["date"] = time.strftime("%Y-%m-%d")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dt = "" if dtype == "float32" else f" --dtype {dtype}"
    md = f"### lowmem bench --launches --shapes {shapes}{dt}\n\n" + to_markdown(rows, meta)
    write_files_atomic({out / "bench_launches.json": json.dumps({"meta": meta, "results": [asdict(r) for r in rows]},
                                                                indent=2, default=str),
                        out / "bench_launches.md": md})
    print(md)
    print(f"wrote {out / 'bench_launches.json'} and {out / 'bench_launches.md'}")
    return 0
