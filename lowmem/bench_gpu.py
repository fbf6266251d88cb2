"""``python -m lowmem.bench_gpu``: every GPU check of issues 12 and 15 in one command, with a report.

A session lent a GPU has about 15 minutes of device time, a few of them spent starting the machine, so
the checks run as one prepared command (``bash .ci/gpu_checks.sh``, docs/benchmarks.md "GPU checklist")
that must return numbers even when part of it fails or runs out of time:

* every check runs in a **subprocess of its own** (:func:`run_checks`), under a time budget; one that
  raises, crashes or overruns is recorded (``error`` / ``timeout`` with the end of its output) and the
  next one runs;
* inside a check every optimizer is a **row** of its own: an exception is recorded in the row, and rows
  that the budget leaves no time for are recorded as ``not reached``;
* rows are appended to a JSON-lines file as they come, and ``report.json`` + ``report.md`` + ``results.md`` (both in
  one file: the one to paste, :func:`results_text`) are rewritten every few seconds, so a command killed at its limit
  still brings back what it measured.

The checks (:func:`plan`):

1. ``env``: torch / CUDA / GPU / bitsandbytes versions and whether bitsandbytes' CUDA library loads.
1b. ``bf16:llama-7b-layer`` (session 16), run alone: the layer below in bfloat16, rows :data:`BF16_ROWS`
   (``NAME+SETTING``: round-to-nearest beside ``bf16_stochastic_round`` and ``kahan_summation``), step time against
   ``torch.optim.AdamW(fused=True)`` on the same bfloat16 parameters, and memory as in 3.
2. ``time+memory:llama-350m`` (issue 15, issue 12), run alone on the GPU: on the GaLore paper's 350M Llama
   (368M parameters, :data:`lowmem.memory.shapes.SHAPES`), each optimizer's step time against
   ``torch.optim.AdamW(fused=True)`` on the same parameters, interleaved rounds, the first step (state
   allocation + projection refresh) amortised over a refresh gap of 200 (:func:`amortised_ratio`); and
   its memory (below).
3. ``memory:llama-7b-layer`` (issue 12): one Llama-2-7B decoder layer
   (:data:`lowmem.bench_shapes.SHAPE_SETS`): per optimizer the peak ``torch.cuda.max_memory_allocated``
   above weights and gradients during the first step and a later step, beside the estimator's
   ``state_bytes() + step_transient_bytes()`` (live, and through
   :func:`lowmem.memory.estimate.optimizer_memory` on fake tensors of the run's device, what
   ``estimate_memory(device=)`` adds), and
   the ratio estimate / measured (target within 10%; a recipe with a refresh gap judged on the first step, the one
   its estimate describes). A third step is recorded with the allocator's history: the sites alive at its peak
   (:func:`alive_at_peak`), so a row whose estimate is off names the tensors it missed.
4. ``equal:cuda-vs-cpu``: every optimizer's CUDA path against its CPU path on the same weights and
   gradients (bitsandbytes' CUDA codec of the 8-bit moments against its CPU one, MicroAdam's
   ``torch.compile``'d functions on CUDA against the plain ones on CPU, ...): the relative difference
   of the total update (:func:`relative_update_difference`).
5. ``pytest:cuda``: the suite's ``cuda``-marked tests (the files of ``tests/`` that use the marker), a file that does
   not import there (the device image has no ``datasets`` / ``trl``) one error row.

Checks 3-5 share the GPU (memory is per process; they time nothing); checks 1b and 2 run alone first, optimizers in
:data:`PRIORITY` order.
The report's header lists the CUDA-only code paths of lowmem (:func:`cuda_code_paths`), which no CPU
run exercises.

``--device cpu --smoke`` runs the same code on CPU on tiny shapes in seconds (memory fields are then
empty: there is no allocator peak on CPU); ``tests/test_bench_gpu.py`` runs it. ``--inject KIND:CHECK``
makes a check fail on purpose (``raise``: an exception, ``exit``: a crash, ``hang``: an overrun) to
test the harness.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 2**20
LR = 1e-5
REFRESH_GAP = 200
#: the rows timed first, so a short budget still covers them (session 16): ``adamw`` (session 15's planned step: its
#: ratio to torch's fused AdamW, 1.44x in session 14), the optimizers no GPU has run (racs, alice, sm3, normuon, came),
#: session 14's blind fixes (lion's fused path, microadam's compiled path, the under-counted adafactor / adalomo / scale
#: rows), then issue 15's recipes, then the rest by name
PRIORITY = ("adamw", "racs", "alice", "sm3", "normuon", "lion", "microadam", "adafactor", "adalomo", "scale",
            "came", "galore_adamw", "adamw8bit", "adamw4bit", "fira_adamw", "osd_adamw", "spam", "stable_spam")
#: left out of the default list (``--only`` still takes them): bitsandbytes' paged optimizers run no lowmem code and
#: no check reached their rows in session 14; their unpaged twins (``bnb_adamw8bit``, ``bnb_lion8bit``) stay
SKIP_BY_DEFAULT = ("bnb_paged_adamw", "bnb_paged_adamw8bit", "bnb_paged_lion", "bnb_paged_lion8bit", "bnb_paged_ademamix",
                   "bnb_paged_ademamix8bit")
#: the settings a row's name may add to an optimizer, ``NAME+SETTING`` (each set True): the bfloat16 write-backs
ROW_FLAGS = ("bf16_stochastic_round", "kahan_summation")
#: the ``bf16`` check's rows (bfloat16 weights of a Llama-2-7B layer): round-to-nearest first, the rows to compare with
BF16_ROWS = ("adamw", "adamw+bf16_stochastic_round", "adamw+kahan_summation", "lion", "lion+bf16_stochastic_round",
             "racs", "racs+bf16_stochastic_round", "adamw8bit", "adamw8bit+bf16_stochastic_round")
#: the relative update difference below which a CUDA row equals its CPU row ("ok"), and above which it fails
EQUAL_OK, EQUAL_FAIL = 1e-3, 5e-2
#: the estimator's target: estimate / measured within 10% (issue 12)
ESTIMATE_TOLERANCE = 0.10
INJECT_KINDS = ("raise", "exit", "hang")
ROOT = Path(__file__).resolve().parent.parent
#: the smoke run's Llama (2 layers of width 64, vocabulary 256): a ``config:`` spec, so it needs no lowmem.kit
SMOKE_MODEL = "config:hidden_size=64,intermediate_size=172,num_hidden_layers=2,num_attention_heads=4,vocab_size=256"


# ---- what to run ---------------------------------------------------------------------------------


@dataclass
class Check:
    """One check: ``kind`` is the child function (:data:`CHILD_KINDS`), ``params`` its arguments,
    ``phase`` ``"alone"`` (runs with nothing else on the device, in list order) or ``"shared"`` (runs
    beside the other shared checks), ``budget_s`` its time limit in seconds."""

    name: str
    kind: str
    phase: str
    budget_s: float
    params: dict[str, Any] = field(default_factory=dict)


def optimizer_names(engine_only: bool = False) -> list[str]:
    """Registered optimizers, :data:`PRIORITY` first, then the other engine ones by name, then (unless
    ``engine_only``) bitsandbytes' own (no recipe; their estimate is a closed form)."""
    from lowmem.optim import get_entry, list_optimizers

    names = list_optimizers()
    engine = [n for n in names if get_entry(n).recipe is not None]
    ordered = [n for n in PRIORITY if n in engine] + [n for n in engine if n not in PRIORITY]
    return ordered if engine_only else ordered + [n for n in names if n not in engine and n not in SKIP_BY_DEFAULT]


def split_row(spec: str) -> tuple[str, dict[str, bool]]:
    """``"NAME+SETTING+..."`` -> ``(NAME, {SETTING: True, ...})``, each setting one of :data:`ROW_FLAGS`."""
    name, *flags = spec.split("+")
    bad = [f for f in flags if f not in ROW_FLAGS]
    if bad:
        raise ValueError(f"row {spec!r}: settings {bad} not in {ROW_FLAGS}")
    return name, {f: True for f in flags}


def plan(device: str, smoke: bool, only: list[str] | None = None, budget_s: float = 390.0) -> list[Check]:
    """The checks, with budgets that fit ``budget_s`` (the ``alone`` phase then the ``shared`` one).

    ``smoke``: the same checks on tiny shapes (Llama layers of width 64 and 32, a 2-layer Llama of width 64, rank 8)."""
    names = only or optimizer_names()
    if smoke:
        model, layer, eq_set, rounds, rank = SMOKE_MODEL, "layer:64x172", "layer:32x86", 2, 8
        model_name, layer_name = "smoke-llama", "64x172"
    else:
        model, layer, eq_set, rounds, rank = "model:llama-350m", "set:llama-7b-layer", "set:llama-8x128", 5, None
        model_name, layer_name = "llama-350m", "llama-7b-layer"
    bf16_rows = [r for r in BF16_ROWS if only is None or split_row(r)[0] in only]
    # the equality check's 128-wide weights take no default rank (128 or 256): rank 32 applies to every subspace recipe
    eq_rank = rank if rank is not None else 32
    alone = budget_s * 0.55  # the shared checks then run until the overall deadline
    shared = budget_s
    bf16_budget = min(35.0, budget_s * 0.1)
    return [
        Check("env", "env", "alone", 30, {"device": device}),
        # (a few seconds on an H200: 9 rows of ~2 ms steps on 202M bfloat16 weights)
        Check(f"bf16:{layer_name}", "cells", "alone", bf16_budget,
              {"module": layer, "device": device, "optimizers": bf16_rows, "timing": True, "rounds": rounds,
               "steps_per_round": 3, "rank": rank, "dtype": "bfloat16"}),
        Check(f"time+memory:{model_name}", "cells", "alone", alone - 10 - bf16_budget,
              {"module": model, "device": device, "optimizers": names, "timing": True, "rounds": rounds,
               "steps_per_round": 3, "rank": rank}),
        Check(f"memory:{layer_name}", "cells", "shared", shared,
              {"module": layer, "device": device, "optimizers": names, "timing": False, "rank": rank}),
        Check("equal:cuda-vs-cpu", "equal", "shared", shared,
              {"module": eq_set, "device": device, "optimizers": names, "steps": 5, "rank": eq_rank}),
        Check("pytest:cuda", "pytest", "shared", shared, {}),
    ]


# ---- small pure pieces ---------------------------------------------------------------------------


def amortised_ratio(step_ratio: float, first_s: float, steady_s: float, base_s: float, gap: int | None) -> float:
    """Step time ratio with the first step's extra cost (state allocation + projection refresh) spread
    over the refresh gap: ``ratio + max(0, first - steady) / base / gap`` (as ``lowmem bench --shapes``)."""
    if not gap:
        return step_ratio
    return step_ratio + max(0.0, first_s - steady_s) / base_s / gap


def estimate_ratio(estimate: int | None, measured: int | None) -> float | None:
    """estimate / measured, or ``None`` when either is unknown (CPU) or nothing was measured."""
    if estimate is None or not measured:
        return None
    return estimate / measured


def estimate_within(first: float, later: float, refreshes: bool, tolerance: float = ESTIMATE_TOLERANCE) -> bool:
    """Whether est / measured is within ``tolerance`` of 1 on the first and the later step; for a recipe with a
    refresh gap (``refreshes``) on the first step alone: its estimate is its worst step, the refresh, which only the
    first step takes, so a later step measures less by construction (session 14, the 7B layer: est / later 2.4-8.3)."""
    return max(abs(r - 1) for r in ([first] if refreshes else [first, later])) <= tolerance


def relative_update_difference(w_dev: list, w_ref: list, w0: list) -> tuple[float, float]:
    """``(||w_dev - w_ref|| / ||w_ref - w0||, max |w_dev - w_ref|)`` over all parameters (float64): how much
    two runs of the same steps differ, relative to how far the steps moved the weights."""
    import torch

    diff = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(w_dev, w_ref))
    moved = sum(float((b.double() - c.double()).pow(2).sum()) for b, c in zip(w_ref, w0))
    worst = max((float((a.double() - b.double()).abs().max()) for a, b in zip(w_dev, w_ref)), default=0.0)
    return (math.sqrt(diff) / math.sqrt(moved) if moved > 0 else math.inf), worst


def equal_status(rel: float) -> str:
    """``ok`` below :data:`EQUAL_OK`, ``check`` (look at it: e.g. bfloat16 GEMMs or code flips) below
    :data:`EQUAL_FAIL`, ``FAIL`` above or NaN."""
    if rel <= EQUAL_OK:
        return "ok"
    return "check" if rel <= EQUAL_FAIL else "FAIL"


def cell_hparams(name: str, rank: int | None) -> dict[str, Any]:
    """Default settings, with ``lr`` = :data:`LR` (step time and memory do not depend on it), a refresh
    gap of :data:`REFRESH_GAP` where the recipe has one, when ``rank`` is given (smoke) that rank, and the
    settings a ``NAME+SETTING`` row names (:func:`split_row`)."""
    from lowmem.optim import get_entry

    name, flags = split_row(name)
    entry = get_entry(name)
    valid = set(entry.valid_hparams())
    hp: dict[str, Any] = {"lr": LR} if "lr" in valid or entry.recipe is None else {}
    if "update_proj_gap" in valid:
        hp["update_proj_gap"] = REFRESH_GAP
    if rank is not None and "rank" in valid and entry.subspace and name != "apollo_mini":
        hp["rank"] = rank
    return {**hp, **flags}


_CUDA_PATTERN = re.compile(r"is_cuda|device\.type\s*==\s*[\"']cuda|torch\.compile\(|bnb\.optim|bnbF\.(?!create_dynamic_map)|"
                           r"getattr\(bnb\.optim|\btriton\b|torch\.cuda\.|fused=True")
#: where lowmem's optimizers, memory accounting and trainers live (the bench harnesses are left out)
CODE_PATH_ROOTS = ("lowmem/optim", "lowmem/memory", "lowmem/quant.py", "lowmem/train.py", "trainers")
#: file -> the checks that run its CUDA lines (files not listed: none of them does)
COVERED_BY = {
    "lowmem/optim/functional/quant.py": "equal:cuda-vs-cpu and the memory checks (8-bit rows)",
    "lowmem/optim/microadam.py": "pytest:cuda (test_compiled_path_equals_plain), equal:cuda-vs-cpu (microadam)",
    "lowmem/optim/recipes/bnb.py": "the bnb_* rows of every check",
    "lowmem/memory/measure.py": "pytest:cuda (test_estimate_total_within_10pct_of_cuda_peak)",
    "lowmem/optim/bnb_fused.py": "equal:cuda-vs-cpu and the memory checks (adamw8bit: fused=None takes the kernel on"
                                 " CUDA), pytest:cuda (test_bnb_fused.py::test_cuda_kernel_close_to_cpu_chunked_path)",
    "lowmem/optim/quantized.py": "as lowmem/optim/bnb_fused.py (the fused members of adamw8bit's foreach step)",
}
#: a GPU path issue 12 asks for, and the call that would show it exists
EXPECTED_GPU_PATHS = {"bitsandbytes' fused blockwise 8-bit optimizer kernel in the engine (issue 12)":
                      "optimizer_update_8bit_blockwise"}


def cuda_code_paths(root: Path = ROOT) -> list[dict[str, Any]]:
    """Lines of lowmem's optimizers, memory accounting and trainers (:data:`CODE_PATH_ROOTS`) that take a
    CUDA-only branch or call a GPU kernel on CUDA tensors (``is_cuda``, ``device.type == "cuda"``,
    ``torch.compile(``, bitsandbytes' optimizers and codec, Triton, ``torch.cuda.*``, ``fused=True``):
    ``{"file", "line", "code", "covered_by"}`` (:data:`COVERED_BY`); comments and docstring lines (with rst ````code````) left out. A CPU run
    takes none of these branches (bitsandbytes' codec runs its CPU backend there). Then one row per
    :data:`EXPECTED_GPU_PATHS` entry that no file calls: ``{"file": "-", "code": "missing: ..."}``."""
    rows, text = [], ""
    for entry in CODE_PATH_ROOTS:
        base = root / entry
        for path in sorted([base] if base.is_file() else base.rglob("*.py")):
            source = path.read_text()
            text += source
            for i, line in enumerate(source.splitlines(), 1):
                code = line.strip()
                if code.startswith("#") or "``" in code or not _CUDA_PATTERN.search(code.split(" # ")[0]):
                    continue
                rel = str(path.relative_to(root))
                rows.append({"file": rel, "line": i, "code": code[:140], "covered_by": COVERED_BY.get(rel, "no check")})
    for what, call in EXPECTED_GPU_PATHS.items():
        if call not in text:
            rows.append({"file": "-", "line": 0, "code": f"missing: {what} (no call of {call})", "covered_by": "-"})
    return rows


# ---- modules and measurements (run in the children) ----------------------------------------------


def build_module(spec: str, device: str, seed: int = 0):
    """``(module on device, meta copy, description)`` for ``spec``: ``set:NAME`` (a set of
    :mod:`lowmem.bench_shapes`), ``layer:HxI`` (one Llama layer of hidden H, MLP I, with norms),
    ``model:SHAPE`` (a named Llama of :mod:`lowmem.memory.shapes`) or ``config:key=int,...`` (a
    ``LlamaConfig`` of those fields); a model's weights are N(0, 0.02^2), its norms ones. Nothing is
    computed with them."""
    import torch

    kind, _, name = spec.partition(":")
    if kind in ("model", "config"):
        from transformers import LlamaConfig

        from lowmem.memory.estimate import build_meta_model
        from lowmem.memory.shapes import shape_config

        if kind == "model":
            config = shape_config(name)
        else:
            config = LlamaConfig(**{k: int(v) for k, v in (kv.split("=") for kv in name.split(","))})
        meta = build_meta_model(config, torch.float32)
        module = copy.deepcopy(meta).to_empty(device=device)
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for pname, p in module.named_parameters():
                p.fill_(1.0) if "norm" in pname else p.normal_(0.0, 0.02, generator=g)
    elif kind in ("set", "layer"):
        from lowmem import bench_shapes as BS

        if kind == "set":
            module = BS.build_set(name)
        else:
            h, _, i = name.partition("x")
            module = BS.LayerWeights(int(h), int(i), True, seed=seed)
        meta = copy.deepcopy(module).to("meta")
        module = module.to(device)
    else:
        raise ValueError(f"module spec must be set:NAME, layer:HxI, model:SHAPE or config:key=int,..., got {spec!r}")
    n = sum(p.numel() for p in module.parameters())
    return module, meta, f"{spec} ({n / 1e6:.1f}M parameters, {len(list(module.parameters()))} tensors)"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _allocated(device: str) -> int | None:
    import torch

    return torch.cuda.memory_allocated() if device == "cuda" else None


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def _load_grads(params, fixed) -> None:
    import torch

    for p, f in zip(params, fixed):
        if p.grad is None:  # BAdam frees the inactive blocks' gradients
            p.grad = torch.empty_like(p)
        p.grad.copy_(f)


def timed_steps(opt, params, fixed, device: str, n: int = 1) -> float:
    """Seconds per ``opt.step()``, the mean over ``n`` steps; the device is synchronized before and after
    each step (gradients are copied in beforehand, untimed)."""
    total = 0.0
    for _ in range(n):
        _load_grads(params, fixed)
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        total += time.perf_counter() - t0
    return total / n


def _requested(device: str) -> tuple[int, int] | None:
    """``(current, peak)`` of the allocator's requested bytes (the tensors' own sizes: no 512 B rounding, no
    cached block reused whole), or ``None`` off CUDA."""
    import torch

    if device != "cuda":
        return None
    stats = torch.cuda.memory_stats()
    return stats.get("requested_bytes.all.current", 0), stats.get("requested_bytes.all.peak", 0)


#: the frames of an allocation named in :func:`alive_at_peak`: the first one in lowmem's own code
SITE_ROOT = "lowmem/"


def _site(frames: list[dict[str, Any]]) -> str:
    """Where an allocation was made: the innermost frame in lowmem's code as ``file:line function`` (the path from
    ``lowmem/`` on), else the innermost frame, else ``?``."""
    for f in frames or []:
        name = str(f.get("filename", ""))
        if SITE_ROOT in name and "bench_gpu" not in name:
            return f"{name[name.rindex(SITE_ROOT):]}:{f.get('line')} {f.get('name')}"
    if frames:
        f = frames[0]
        return f"{Path(str(f.get('filename', '?'))).name}:{f.get('line')} {f.get('name')}"
    return "?"


def alive_at_peak(trace: list[dict[str, Any]], top: int = 5) -> tuple[int, list[tuple[str, int]]]:
    """Replay an allocator trace (``torch.cuda.memory._snapshot()["device_traces"][device]``: ``alloc`` and
    ``free_requested`` events with ``addr``, ``size`` and ``frames``) recorded over one step: ``(peak, sites)``,
    the largest sum of the bytes the step had allocated and not yet freed, and the ``top`` allocation sites
    (:func:`_site`) by bytes alive at that moment, as ``(site, bytes)``. What the step's memory columns measure,
    named by the lines that allocated it, so a row whose estimate is off shows which tensors it missed."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for ev in trace:
        action, addr = ev.get("action"), ev.get("addr")
        if action == "alloc":
            live[addr] = (int(ev.get("size", 0)), _site(ev.get("frames", [])))
            total += live[addr][0]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_requested" and addr in live:
            total -= live.pop(addr)[0]
    sites: dict[str, int] = {}
    for size, site in at_peak.values():
        sites[site] = sites.get(site, 0) + size
    return peak, sorted(sites.items(), key=lambda kv: -kv[1])[:top]


def measured_step(opt, params, fixed, device: str, trace: bool = False) -> dict[str, Any]:
    """One step, timed, with its memory: ``peak`` (allocator peak during the step above what was allocated
    before it), ``kept`` (allocated after it minus before: the state a first step allocates),
    ``peak_requested`` (the same peak in requested bytes, :func:`_requested`) and, with ``trace`` on CUDA, the
    allocation sites alive at the step's peak (:func:`alive_at_peak`; the allocator's history is recorded
    through the step, which slows it: not for a timed step)."""
    import torch

    _load_grads(params, fixed)
    _sync(device)
    before = _allocated(device)
    _reset_peak(device)
    req0 = _requested(device)
    recording = trace and device == "cuda"
    if recording:
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=500_000)
    t0 = time.perf_counter()
    opt.step()
    _sync(device)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {}
    if recording:
        try:
            snap = torch.cuda.memory._snapshot()
            traces = snap.get("device_traces") or []
            index = torch.cuda.current_device()
            traced_peak, sites = alive_at_peak(traces[index] if index < len(traces) else [])
            out.update(traced_peak=traced_peak, peak_sites=sites)
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
    after, peak, req1 = _allocated(device), _peak(device), _requested(device)
    out.update({"s": seconds, "peak": None if before is None else peak - before,
                "kept": None if before is None else after - before,
                "peak_requested": None if req0 is None else req1[1] - req0[0]})
    return out


def measure_cell(name: str, module, meta, params, fixed, device: str, rank: int | None,
                 baseline=None, rounds: int = 0, steps_per_round: int = 3) -> dict[str, Any]:
    """One optimizer's row: memory of its first step and of a later step beside the estimator's numbers,
    and (with a ``baseline``) its step time against the baseline's, ``rounds`` interleaved rounds of
    ``steps_per_round`` steps, the order alternating from round to round."""
    import gc

    import torch

    import copy

    from lowmem.memory.estimate import on_fake_device, optimizer_memory
    from lowmem.optim import create_optimizer, get_entry

    spec, (name, _) = name, split_row(name)
    entry = get_entry(name)
    hp = cell_hparams(spec, rank)
    row: dict[str, Any] = {"optimizer": spec, "hparams": hp}
    for p in [*params, *meta.parameters()]:
        p.requires_grad_(True)  # BAdam froze its inactive blocks in the previous row (and on the meta copy)
    try:  # what estimate_memory adds for this optimizer: sized on fake tensors of the run's device
        fake = copy.deepcopy(meta)
        on_fake_device(fake, device)  # (the device's own paths: MicroAdam's compiled step, MKL's buffer on CPU)
        est_state, est_transient, how = optimizer_memory(fake, name, hp)
        del fake
        row.update(estimate_state=est_state, estimate_transient=est_transient, estimate_how=how)
    except Exception as err:  # recorded; the measurement still runs
        row["estimate_error"] = f"{type(err).__name__}: {err}"[:300]
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    opt = create_optimizer(module, name, **hp)
    # a memory-only row of a refreshing recipe traces its first step (the refresh: cuSOLVER's SVD workspace, which
    # the estimate under-counted on the 7B layer in session 14); a timed row does not (the trace slows the step)
    first = measured_step(opt, params, fixed, device, trace=entry.subspace and baseline is None)
    steady = measured_step(opt, params, fixed, device)
    try:  # (a third step: the allocation sites alive at its peak; recorded, never fatal to the row)
        traced = measured_step(opt, params, fixed, device, trace=True)
    except Exception as err:
        traced = {}
        row["trace_error"] = f"{type(err).__name__}: {err}"[:200]
    live_state = opt.state_bytes() if hasattr(opt, "state_bytes") else None
    live_transient = opt.step_transient_bytes() if hasattr(opt, "step_transient_bytes") else None
    row.update(first_step_s=first["s"], peak_first=first["peak"], state_measured=first["kept"],
               peak_steady=steady["peak"], state_bytes=live_state, step_transient_bytes=live_transient,
               peak_first_requested=first["peak_requested"], peak_steady_requested=steady["peak_requested"],
               traced_peak=traced.get("traced_peak"), peak_sites=traced.get("peak_sites"),
               first_traced_peak=first.get("traced_peak"), first_peak_sites=first.get("peak_sites"))
    if first["peak"] is not None and steady["peak"] is not None:
        measured_steady = first["kept"] + steady["peak"]  # state + the step's peak above it
        row["measured_steady"] = measured_steady
        row["measured_first"] = first["peak"]
        if live_state is not None and live_transient is not None:
            row["ratio_live_steady"] = estimate_ratio(live_state + live_transient, measured_steady)
            row["ratio_live_first"] = estimate_ratio(live_state + live_transient, first["peak"])
        if "estimate_state" in row:
            est = row["estimate_state"] + row["estimate_transient"]
            row["ratio_estimate_steady"] = estimate_ratio(est, measured_steady)
            row["ratio_estimate_first"] = estimate_ratio(est, first["peak"])
            row["estimate_within_10pct"] = estimate_within(row["ratio_estimate_first"], row["ratio_estimate_steady"],
                                                           entry.subspace)
    if baseline is not None and rounds > 0:
        bt, xt = [], []
        for r in range(rounds):
            pair = [(bt, baseline), (xt, opt)] if r % 2 == 0 else [(xt, opt), (bt, baseline)]
            for times, o in pair:
                times.append(timed_steps(o, params, fixed, device, steps_per_round))
        ratios = [x / b for x, b in zip(xt, bt)]
        steady_s, base_s = statistics.median(xt), statistics.median(bt)
        gap = opt.param_groups[0].get("update_proj_gap") if entry.subspace else None
        row.update(step_s=steady_s, baseline_step_s=base_s, step_time_ratio=statistics.median(ratios),
                   ratio_min=min(ratios), ratio_max=max(ratios), refresh_gap=gap,
                   amortised_ratio=amortised_ratio(statistics.median(ratios), first["s"], steady_s, base_s, gap))
    del opt
    return row


def equal_cell(name: str, spec: str, device: str, ref_device: str, steps: int, rank: int | None) -> dict[str, Any]:
    """``steps`` steps of ``name`` on ``device`` and on ``ref_device`` from the same weights with the same
    gradients: :func:`relative_update_difference` and :func:`equal_status`."""
    import torch

    from lowmem.optim import create_optimizer

    hp = cell_hparams(name, rank)
    name = split_row(name)[0]
    g = torch.Generator().manual_seed(1)
    module0, _, _ = build_module(spec, "cpu")
    w0 = [p.detach().clone() for p in module0.parameters()]
    grads = [[torch.randn(p.shape, generator=g) * 1e-2 for p in w0] for _ in range(steps)]

    def run(dev: str) -> list:
        module = copy.deepcopy(module0).to(dev)
        opt = create_optimizer(module, name, **{**hp, "lr": 1e-3})
        params = list(module.parameters())
        for step_grads in grads:
            for p in params:
                p.requires_grad_(True)
            _load_grads(params, [x.to(dev) for x in step_grads])
            opt.step()
        return [p.detach().float().cpu() for p in params]

    rel, worst = relative_update_difference(run(device), run(ref_device), w0)
    return {"optimizer": name, "hparams": hp, "device": device, "reference_device": ref_device, "steps": steps,
            "relative_difference": rel, "max_abs_difference": worst, "status": equal_status(rel)}


# ---- children ------------------------------------------------------------------------------------


class RowWriter:
    """Appends one JSON object per line to ``path`` (flushed), so a killed child leaves its rows."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


def _rows_per_optimizer(names: list[str], deadline: float, write: RowWriter, cell) -> None:
    """Call ``cell(name)`` for each name while time is left (a row's exception recorded in it; when the
    time left is under 1.5x the median row so far or 3 s, the remaining names get ``not reached``)."""
    walls: list[float] = []
    for name in names:
        left = deadline - time.time()
        if left < max(3.0, 1.5 * (statistics.median(walls) if walls else 0.0)):
            write({"optimizer": name, "status": "not reached", "error": f"budget: {left:.0f} s left"})
            continue
        t0 = time.time()
        try:
            row = cell(name)
            row.setdefault("status", "ok")
        except Exception as err:
            row = {"optimizer": name, "status": "error", "error": f"{type(err).__name__}: {err}"[:500]}
        row["wall_s"] = round(time.time() - t0, 3)
        walls.append(row["wall_s"])
        write(row)


def child_env(params: dict[str, Any], deadline: float, write: RowWriter) -> None:
    """Versions and the device: torch, CUDA, the GPU, transformers, bitsandbytes and its CUDA library."""
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    for mod in ("transformers", "bitsandbytes", "triton", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as err:
            info[mod] = f"missing ({type(err).__name__}: {err})"[:200]
    if params["device"] == "cuda":
        try:  # the CUDA codec of the 8-bit moments: bitsandbytes' kernel on a CUDA tensor
            import bitsandbytes.functional as bnbF

            x = torch.randn(4096, device="cuda")
            codes, qs = bnbF.quantize_blockwise(x, blocksize=256)
            back = bnbF.dequantize_blockwise(codes, qs)
            info["bnb_cuda_codec_max_err"] = float((back - x).abs().max())
        except Exception as err:
            info["bnb_cuda_codec_error"] = f"{type(err).__name__}: {err}"[:300]
    write({"optimizer": "-", "status": "ok", **info})


def warm_up_linalg(device: str) -> None:
    """Initialise the solver and BLAS libraries (cuSOLVER / cuBLAS handles on CUDA) on small matrices, so
    that the first refreshing row's first step does not pay for it."""
    import torch

    a = torch.randn(64, 32, device=device)
    torch.linalg.svd(a, full_matrices=False)
    torch.linalg.qr(a)
    torch.linalg.eigh(a.T @ a)
    _sync(device)


def child_cells(params: dict[str, Any], deadline: float, write: RowWriter) -> None:
    """Memory rows (and, with ``timing``, step-time rows) of every optimizer on ``params["module"]``."""
    import torch

    device = params["device"]
    module, meta, desc = build_module(params["module"], device)
    if params.get("dtype"):  # (the bf16 check: bfloat16 weights, gradients and baseline)
        dtype = getattr(torch, params["dtype"])
        module, meta, desc = module.to(dtype), meta.to(dtype), f"{desc}, {params['dtype']}"
    module_params = list(module.parameters())
    g = torch.Generator(device=device).manual_seed(1)
    fixed = [(torch.randn(p.shape, generator=g, device=device) * 1e-3).to(p.dtype) for p in module_params]
    for p in module_params:
        p.grad = torch.empty_like(p)
    write({"optimizer": "-", "status": "info", "module": desc,
           "weights_and_grads_bytes": 2 * sum(p.numel() * p.element_size() for p in module_params)})
    warm_up_linalg(device)
    baseline = None
    if params.get("timing"):
        baseline = torch.optim.AdamW(module_params, lr=LR, weight_decay=0.0, fused=True)
        timed_steps(baseline, module_params, fixed, device, 2)  # state + warm-up
    _rows_per_optimizer(params["optimizers"], deadline, write, lambda name: measure_cell(
        name, module, meta, module_params, fixed, device, params.get("rank"), baseline,
        params.get("rounds", 0), params.get("steps_per_round", 3)))


def child_equal(params: dict[str, Any], deadline: float, write: RowWriter) -> None:
    """CUDA path against CPU path of every optimizer (on CPU, the CPU path against itself)."""
    device = params["device"]
    build_module(params["module"], "cpu")  # imports (transformers' RMSNorm) before the first row's clock
    _rows_per_optimizer(params["optimizers"], deadline, write, lambda name: equal_cell(
        name, params["module"], device, "cpu", params["steps"], params.get("rank")))


def cuda_test_files(root: Path = ROOT) -> list[str]:
    """The test files that use the ``cuda`` marker (``pytest.mark.cuda``)."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                  if "mark.cuda" in p.read_text())


def child_pytest(params: dict[str, Any], deadline: float, write: RowWriter) -> None:
    """``pytest -m cuda`` on :func:`cuda_test_files`; a row per test from its JUnit XML (outcome, seconds,
    the failure's message)."""
    import xml.etree.ElementTree as ET

    files = params.get("files") or cuda_test_files()
    xml_path = Path(params["work"]) / "pytest_cuda.xml"
    # --continue-on-collection-errors: a file that does not import there (session 16: tests/test_endrun_memory.py imports
    # lowmem.train -> lowmem.kit -> datasets, which the device image lacks) is one error row, not a run with no tests
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--junitxml={xml_path}", *files]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, deadline - time.time() - 5))
    write({"optimizer": "-", "status": "info", "command": " ".join(cmd[1:]), "rc": out.returncode,
           "summary": (out.stdout.strip().splitlines() or [""])[-1]})
    for case in ET.parse(xml_path).getroot().iter("testcase"):  # our own file, written just now
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:  # (a collection error's message is "collection failure": its text's last line says why)
                why = [line for line in (node.text or "").splitlines() if line.strip()][-1:]
                outcome, message = tag, ": ".join([node.get("message") or ""] + why)[:300]
        write({"optimizer": f"{case.get('classname')}::{case.get('name')}",
               "status": "ok" if outcome in ("passed", "skipped") else "FAIL", "outcome": outcome,
               "seconds": float(case.get("time") or 0), "message": message})
    if out.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest exited {out.returncode}:\n{out.stdout[-2000:]}{out.stderr[-1000:]}")


CHILD_KINDS = {"env": child_env, "cells": child_cells, "equal": child_equal, "pytest": child_pytest}


def child_main(spec: dict[str, Any]) -> None:
    """Run one check in this process (``--child``): ``spec`` = ``{"kind", "params", "deadline", "rows",
    "inject"}``."""
    write = RowWriter(Path(spec["rows"]))
    inject = spec.get("inject")
    if inject == "raise":
        raise RuntimeError("injected failure (--inject raise)")
    if inject == "exit":
        os._exit(3)
    if inject == "hang":
        time.sleep(10**6)
    CHILD_KINDS[spec["kind"]](spec["params"], spec["deadline"], write)


# ---- the parent: run the checks, write the report ------------------------------------------------


@dataclass
class Running:
    check: Check
    proc: subprocess.Popen
    rows_path: Path
    log_path: Path
    started: float
    deadline: float


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def check_status(rc: int | None, timed_out: bool, rows: list[dict[str, Any]]) -> str:
    """``running``, ``timeout``, ``error`` (non-zero exit), ``failed rows`` (a row with status ``error`` /
    ``FAIL``, or an estimate off by more than 10%), ``partial`` (rows not reached) or ``ok``."""
    if timed_out:
        return "timeout"
    if rc is None:
        return "running"
    if rc != 0:
        return "error"
    if any(r.get("status") in ("error", "FAIL") or r.get("estimate_within_10pct") is False for r in rows):
        return "failed rows"
    if any(r.get("status") == "not reached" for r in rows):
        return "partial"
    return "ok"


def run_checks(checks: list[Check], out: Path, work: Path, budget_s: float, inject: dict[str, str] | None = None,
               meta: dict[str, Any] | None = None, poll_s: float = 1.0, write_every_s: float = 10.0,
               kill_grace_s: float = 10.0) -> dict[str, Any]:
    """Run ``checks`` (the ``alone`` ones one after another, then the ``shared`` ones together), each in
    a subprocess killed ``kill_grace_s`` after its budget or the overall ``budget_s`` (a child stops
    starting rows at its deadline; the grace lets the row in progress finish); rewrite
    ``out/report.json`` and ``out/report.md`` every ``write_every_s`` seconds and at the end. Returns
    the report."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    end = t0 + budget_s
    results: dict[str, dict[str, Any]] = {c.name: {"name": c.name, "kind": c.kind, "phase": c.phase, "budget_s": c.budget_s,
                                                   "status": "pending", "rows": []} for c in checks}
    report = {"meta": {**(meta or {}), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
                       "budget_s": budget_s}, "cuda_code_paths": cuda_code_paths(), "checks": list(results.values())}
    last_write = 0.0

    def refresh(running: list[Running], force: bool = False) -> None:
        nonlocal last_write
        for r in running:
            results[r.check.name].update(rows=_read_rows(r.rows_path), status="running",
                                         wall_s=round(time.time() - r.started, 1))
        if force or time.time() - last_write >= write_every_s:
            report["meta"]["wall_s"] = round(time.time() - t0, 1)
            write_report(report, out)
            last_write = time.time()

    def start(c: Check) -> Running:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", c.name)
        rows_path, log_path = work / f"{safe}.jsonl", work / f"{safe}.log"
        rows_path.unlink(missing_ok=True)
        deadline = min(time.time() + c.budget_s, end)
        spec = {"kind": c.kind, "params": {**c.params, "work": str(work)}, "deadline": deadline,
                "rows": str(rows_path), "inject": (inject or {}).get(c.name)}
        log = open(log_path, "w")
        proc = subprocess.Popen([sys.executable, "-m", "lowmem.bench_gpu", "--child", json.dumps(spec)], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        print(f"[{time.time() - t0:6.1f}s] start {c.name} (budget {deadline - time.time():.0f} s)", flush=True)
        return Running(c, proc, rows_path, log_path, time.time(), deadline)

    def finish(r: Running, timed_out: bool) -> None:
        rows = _read_rows(r.rows_path)
        rc = r.proc.returncode
        res = results[r.check.name]
        res.update(rows=rows, rc=rc, wall_s=round(time.time() - r.started, 1), status=check_status(rc, timed_out, rows))
        if res["status"] in ("error", "timeout"):
            res["log_tail"] = _tail(r.log_path)
        print(f"[{time.time() - t0:6.1f}s] {r.check.name}: {res['status']} ({len(rows)} rows)", flush=True)

    def wait(running: list[Running]) -> None:
        while running:
            time.sleep(poll_s)
            for r in list(running):
                over = time.time() > r.deadline + kill_grace_s
                timed_out = r.proc.poll() is None
                if timed_out and not over:
                    continue
                if timed_out:
                    os.killpg(r.proc.pid, signal.SIGKILL)
                    r.proc.wait()
                running.remove(r)
                finish(r, timed_out=timed_out)
                refresh(running, force=True)
            refresh(running)

    try:
        for c in [c for c in checks if c.phase == "alone"]:
            if time.time() >= end - 5:
                results[c.name]["status"] = "not reached"
                continue
            wait([start(c)])
        shared = [c for c in checks if c.phase == "shared"]
        if time.time() < end - 5:
            wait([start(c) for c in shared])
        else:
            for c in shared:
                results[c.name]["status"] = "not reached"
    finally:
        report["meta"]["wall_s"] = round(time.time() - t0, 1)
        write_report(report, out)
    return report


# ---- the report ----------------------------------------------------------------------------------


def _mib(x: Any) -> str:
    return "-" if x is None else f"{x / MiB:,.1f}"


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _sites_note(row: dict[str, Any]) -> str:
    """A later step's peak (:func:`alive_at_peak`) and its largest allocation sites, in MiB; then the first step's
    where it was traced (a refreshing recipe's memory row)."""
    notes = []
    for key, label in (("peak_sites", "peak"), ("first_peak_sites", "first step peak")):
        if row.get(key):
            sites = "; ".join(f"{_mib(b)} {site}" for site, b in row[key][:3])
            notes.append(f"{label} {_mib(row.get(key.replace('peak_sites', 'traced_peak')))}: {sites}")
    return " / ".join(notes)


def rows_markdown(check: dict[str, Any]) -> list[str]:
    """A table of ``check``'s rows, its columns chosen by the check's kind."""
    rows = [r for r in check["rows"] if r.get("status") != "info"]
    info = [r for r in check["rows"] if r.get("status") == "info"]
    lines = [f"- {k}: {v}" for r in info for k, v in r.items() if k not in ("optimizer", "status")]
    if check["kind"] == "env":
        return lines + [f"- {k}: {v}" for r in rows for k, v in r.items() if k not in ("optimizer", "status")]
    if check["kind"] == "cells":
        lines += ["", "| optimizer | status | state MiB (measured / reported) | peak first MiB | peak later MiB |"
                  " estimate MiB (state + transient) | est / measured (first, later) | step ratio | amortised | note |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            est = r.get("estimate_state", 0) + r.get("estimate_transient", 0) if "estimate_state" in r else None
            lines.append(
                f"| {r['optimizer']} | {r.get('status')} | {_mib(r.get('state_measured'))} / {_mib(r.get('state_bytes'))} | "
                f"{_mib(r.get('measured_first'))} | {_mib(r.get('measured_steady'))} | {_mib(est)} | "
                f"{_num(r.get('ratio_estimate_first'))}, {_num(r.get('ratio_estimate_steady'))} | "
                f"{_num(r.get('step_time_ratio'), '{:.2f}x')} | {_num(r.get('amortised_ratio'), '{:.2f}x')} | "
                f"{r.get('error', r.get('estimate_error', ''))[:120] or _sites_note(r)} |")
        return lines
    if check["kind"] == "equal":
        lines += ["", "| optimizer | status | relative update difference | max abs difference | note |", "|---|---|---:|---:|---|"]
        for r in rows:
            lines.append(f"| {r['optimizer']} | {r.get('status')} | {_num(r.get('relative_difference'), '{:.2e}')} | "
                         f"{_num(r.get('max_abs_difference'), '{:.2e}')} | {r.get('error', '')[:120]} |")
        return lines
    lines += ["", "| test | outcome | seconds | message |", "|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r.get('outcome', r.get('status'))} | {_num(r.get('seconds'), '{:.1f}')} | "
                     f"{(r.get('message') or r.get('error') or '')[:150]} |")
    return lines


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One short line per row (printed at the end, so the device tool's output tail holds the numbers even
    if the report files do not come back)."""
    lines = []
    for c in report["checks"]:
        lines.append(f"== {c['name']}: {c['status']} ({c.get('wall_s', '-')} s)")
        for r in c["rows"]:
            if r.get("status") == "info" or c["kind"] == "env":
                continue
            if c["kind"] == "cells":
                lines.append(f"{r['optimizer']:<22} {r.get('status', ''):<11} est/meas first {_num(r.get('ratio_estimate_first'), '{:.2f}')} "
                             f"later {_num(r.get('ratio_estimate_steady'), '{:.2f}')} peak {_mib(r.get('measured_steady'))} MiB "
                             f"step {_num(r.get('step_time_ratio'), '{:.2f}x')} amort {_num(r.get('amortised_ratio'), '{:.2f}x')}")
                if r.get("peak_sites"):
                    lines.append("    " + _sites_note(r)[:300])
            elif c["kind"] == "equal":
                lines.append(f"{r['optimizer']:<22} {r.get('status', ''):<11} rel {_num(r.get('relative_difference'), '{:.1e}')}")
            else:
                lines.append(f"{r['optimizer'][-70:]:<70} {r.get('outcome', r.get('status'))}")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the run's metadata, the untested CUDA code paths, a section per check."""
    m = report["meta"]
    lines = ["# lowmem GPU checks (issues 12 and 15)", ""]
    lines += [f"- {k}: {v}" for k, v in m.items()]
    lines += ["", "Memory: allocator peak (`torch.cuda.max_memory_allocated`) during a step above what was allocated "
              "before it; *peak first* = the first step (allocates the state, computes the first projection), *peak "
              "later* = state + the second step's peak; *estimate* = `optimizer_memory` on fake tensors of the device (what "
              "`estimate_memory` adds: state + step transient); target est / measured within 10% (issue 12; a recipe "
              "with a refresh gap is judged on its first step alone: its estimate is the refresh step's, which a later "
              "step does not take). *note*: a third step's peak and its largest allocation sites (the allocator's "
              "history, `alive_at_peak`, MiB). The JSON rows also hold the peaks in requested bytes (no block rounding). Step ratio: "
              "median over interleaved rounds of the step time / `torch.optim.AdamW(fused=True)`'s; amortised: the "
              f"first step's extra time spread over {REFRESH_GAP} steps (issue 15: at most 1.05x subspace, 1.10x 8-/4-bit "
              "and MicroAdam). Equality: ||w_cuda - w_cpu|| / ||w_cpu - w0|| after the same steps "
              f"(ok <= {EQUAL_OK:g}, FAIL > {EQUAL_FAIL:g})."]
    lines += ["", "## CUDA-only code paths of lowmem (never run on CPU; the checks below are their first run)", ""]
    lines += [f"- `{p['file']}:{p['line']}`: `{p['code']}` (run by: {p.get('covered_by', '-')})"
              for p in report["cuda_code_paths"]]
    for c in report["checks"]:
        lines += ["", f"## {c['name']}: {c['status']}", "",
                  f"kind {c['kind']}, phase {c['phase']}, budget {c['budget_s']:.0f} s, wall {c.get('wall_s', '-')} s, "
                  f"rc {c.get('rc', '-')}, {len(c['rows'])} rows", ""]
        lines += rows_markdown(c)
        if c.get("log_tail"):
            lines += ["", "```", c["log_tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


#: the one file to paste into docs/benchmarks.md's notes: the markdown report, then the JSON report in a fenced block
RESULTS_FILE = "results.md"


def results_text(report: dict[str, Any]) -> str:
    """:data:`RESULTS_FILE`: :func:`to_markdown` followed by the report as compact JSON (one line per check) in a
    ``json`` block, so one file holds both the tables and every number."""
    body = {k: v for k, v in report.items() if k != "checks"}
    lines = ["{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v, default=str)}" for k, v in body.items()) + ","]
    lines.append('"checks": [')
    lines += [json.dumps(c, default=str) + ("," if i < len(report["checks"]) - 1 else "")
              for i, c in enumerate(report["checks"])]
    lines.append("]}")
    return to_markdown(report) + "\n## The report as JSON\n\n```json\n" + "\n".join(lines) + "\n```\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    """``out/report.json``, ``out/report.md`` and ``out/results.md`` (both in one file, :func:`results_text`),
    atomically."""
    from lowmem.io import write_files_atomic

    write_files_atomic({out / "report.json": json.dumps(report, indent=1, default=str),
                        out / "report.md": to_markdown(report), out / RESULTS_FILE: results_text(report)})


def _commit() -> str:
    """The commit of the tree that runs: ``git rev-parse HEAD`` and the commit ``.ci/gpu_checks.sh prepare``
    recorded in ``build/gpu_site/commit.txt``, both named when they differ. On the device the copy's ``git``
    answers with the session's base commit, not the working tree's (the first H200 run reported ``fc688e8``
    for a tree at ``3939bd5``), so there the prepared commit is the one that ran."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        head = None
    f = ROOT / "build" / "gpu_site" / "commit.txt"
    prepared = f.read_text().split("\n", 1)[0].strip() if f.exists() else None
    if head and prepared and head != prepared:
        return f"prepared {prepared} (build/gpu_site/commit.txt); git HEAD {head}"
    return head or prepared or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lowmem.bench_gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where to run the checks (default cuda)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: the same code in seconds (for CPU)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "build/gpu_out", help="folder of report.json / report.md")
    ap.add_argument("--work", default=None, help="folder of the checks' rows and logs (default: a temporary folder)")
    ap.add_argument("--budget", type=float, default=390.0, help="seconds for all checks together (default 390)")
    ap.add_argument("--only", default=None, help="comma-separated optimizers (default: every registered one)")
    ap.add_argument("--checks", default=None, help="comma-separated check names to run (default: all)")
    ap.add_argument("--inject", action="append", default=[], metavar="KIND:CHECK",
                    help=f"make CHECK fail on purpose, KIND one of {INJECT_KINDS} (tests the harness)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    if args.budget <= 0:
        raise ValueError(f"--budget must be > 0 seconds, got {args.budget}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda but torch sees no CUDA device (use --device cpu --smoke on CPU)")
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    if only:
        from lowmem.optim import list_optimizers

        unknown = sorted(set(only) - set(list_optimizers()))
        if unknown:
            raise ValueError(f"--only: unknown optimizers {unknown}; valid: {list_optimizers()}")
    checks = plan(args.device, args.smoke, only, args.budget)
    if args.checks:
        wanted = [s.strip() for s in args.checks.split(",")]
        unknown = sorted(set(wanted) - {c.name for c in checks})
        if unknown:
            raise ValueError(f"--checks: unknown {unknown}; valid: {[c.name for c in checks]}")
        checks = [c for c in checks if c.name in wanted]
        if not any(c.phase == "shared" for c in checks):  # nothing to leave time for
            for c in checks:
                c.budget_s = max(c.budget_s, args.budget)
    inject = {}
    for item in args.inject:
        kind, _, name = item.partition(":")
        if kind not in INJECT_KINDS or name not in {c.name for c in checks}:
            raise ValueError(f"--inject must be KIND:CHECK with KIND in {INJECT_KINDS} and CHECK in "
                             f"{[c.name for c in checks]}, got {item!r}")
        inject[name] = kind
    out = Path(args.out)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lowmem_gpu_"))
    meta = {"command": " ".join(["python -m lowmem.bench_gpu", *(argv if argv is not None else sys.argv[1:])]),
            "device": args.device, "smoke": args.smoke, "commit": _commit(),
            "host": os.uname().nodename, "cpus": os.cpu_count()}
    report = run_checks(checks, out, work, args.budget, inject, meta)
    print("\n".join(summary_lines(report)), flush=True)
    bad = [c["name"] for c in report["checks"] if c["status"] not in ("ok", "partial")]
    print(f"report: {out / 'report.md'}; checks not ok: {bad or 'none'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
