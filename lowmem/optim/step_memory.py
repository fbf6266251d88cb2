"""Measure the transient memory of an optimizer step: peak RSS above weights + gradients + state.

:func:`measure_step` runs one registered engine optimizer on a single weight in a fresh Python
process (so nothing else shares its heap): it allocates the weight, its gradient and the state
(``materialize_state()``), touches all of them, warms the libraries up on a small tensor, then
resets the kernel's peak-RSS counter (``/proc/self/clear_refs``, Linux) and runs the measured
steps. The growth of the peak RSS (``VmHWM``) over the resident size before the steps is the
step's transient memory, what :meth:`~lowmem.optim.engine.LowMemOptimizer.step_transient_bytes`
predicts.

``python -m lowmem.optim.step_memory`` prints the table of ``docs/memory.md`` ("The step's transient
memory"): one 8192 x 8192 float32 weight, every family, plain step and (subspace recipes) a step
that refreshes the projection; ``--shape 4096 4096`` for a quicker run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

MiB = 2**20

# Large allocations straight from mmap and back to the kernel when freed: the peak RSS then counts
# the bytes live at the peak (glibc's default raises its mmap threshold after the first free of a
# large block and serves later ones from the heap, where freed chunk-sized blocks fragment).
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

# name, label, hyperparameters, mode ("plain": steps after the first, "refresh": a step that refreshes
# the projection). The table of docs/memory.md.
TABLE: tuple[tuple[str, str, dict[str, Any], str], ...] = (
    ("adamw", "adamw", {}, "plain"),
    ("adamw8bit", "adamw8bit", {}, "plain"),
    ("adamw4bit", "adamw4bit", {}, "plain"),
    ("adamw4bit_rank1", "adamw4bit_rank1", {}, "plain"),
    ("microadam", "microadam", {}, "plain"),
    ("spam", "spam", {"grad_accu_steps": 0}, "plain"),
    ("stable_spam", "stable_spam", {}, "plain"),
    ("adafactor", "adafactor", {}, "plain"),
    ("galore_adamw", "galore_adamw", {"rank": 128, "update_proj_gap": 200}, "plain"),
    ("galore_adamw", "galore_adamw (refresh)", {"rank": 128, "update_proj_gap": 200}, "refresh"),
    ("galore_adamw", "galore_adamw rsvd (refresh)", {"rank": 128, "update_proj_gap": 200, "projection": "rsvd"}, "refresh"),
    ("fira_adamw", "fira_adamw", {"rank": 128, "update_proj_gap": 200}, "plain"),
    ("fira_adamw", "fira_adamw rsvd (refresh)", {"rank": 128, "update_proj_gap": 200, "projection": "rsvd"}, "refresh"),
    ("frugal", "frugal", {"rank": 128, "update_proj_gap": 200}, "plain"),
    ("osd_adamw", "osd_adamw", {"rank": 128}, "plain"),
    # added in the 2026-11-29 session (issue 12's table, second part)
    ("apollo_adamw", "apollo_adamw", {"rank": 128, "update_proj_gap": 200}, "plain"),
    ("apollo_adamw", "apollo_adamw (refresh)", {"rank": 128, "update_proj_gap": 200}, "refresh"),
    ("apollo_mini", "apollo_mini", {"update_proj_gap": 200}, "plain"),
    ("apollo_mini", "apollo_mini (refresh)", {"update_proj_gap": 200}, "refresh"),
    ("adam_mini", "adam_mini", {}, "plain"),
    ("scale", "scale (hidden)", {"scale_role": "hidden"}, "plain"),
    ("scale", "scale (head)", {"scale_role": "head"}, "plain"),
    ("scale", "scale (embedding)", {"scale_role": "embedding"}, "plain"),
    ("adamw_sn", "adamw_sn", {}, "plain"),
    ("adagrad_sn", "adagrad_sn", {}, "plain"),
    ("adamw_snsm", "adamw_snsm", {"rank": 128, "update_proj_gap": 200}, "plain"),
    ("adamw_snsm", "adamw_snsm (refresh)", {"rank": 128, "update_proj_gap": 200}, "refresh"),
    ("adamw_snsm", "adamw_snsm rsvd (refresh)", {"rank": 128, "update_proj_gap": 200, "projection": "rsvd"}, "refresh"),
    ("sgd_sm", "sgd_sm", {"rank": 128, "update_proj_gap": 200}, "plain"),
    ("sgd_sm", "sgd_sm (refresh)", {"rank": 128, "update_proj_gap": 200}, "refresh"),
    ("adagrad_snsm", "adagrad_snsm", {"rank": 128, "update_proj_gap": 200}, "plain"),
    ("adagrad_snsm", "adagrad_snsm (refresh)", {"rank": 128, "update_proj_gap": 200}, "refresh"),
    ("lomo", "lomo", {}, "plain"),
    ("adalomo", "adalomo", {}, "plain"),
    ("badam", "badam", {}, "plain"),
    ("sinkgd", "sinkgd", {}, "plain"),
    ("muon", "muon", {}, "plain"),
    ("muon", "muon (no nesterov)", {"nesterov": False}, "plain"),
)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _child(name: str, shape: tuple[int, ...], hparams: dict[str, Any], mode: str, steps: int,
           fused_on_cpu: bool | None = None) -> dict[str, Any]:
    import torch

    from lowmem.optim.functional import adam as FA
    from lowmem.optim.registry import create_optimizer

    if fused_on_cpu is not None:  # torch's fused AdamW kernel on the CPU (functional.adam.FUSED_ON_CPU)
        FA.FUSED_ON_CPU = fused_on_cpu

    torch.manual_seed(0)
    # warm-up: load every library and cache (code maps, compiled kernels) on a small tensor
    small = torch.nn.Parameter(torch.randn(256, 384))
    small.grad = torch.randn_like(small)
    warm_hp = {**hparams, **({"rank": 8} if "rank" in hparams else {})}
    warm_hp.pop("chunk_numel", None)
    if name in ("adamw8bit", "adamw4bit", "adamw4bit_rank1"):
        warm_hp["min_quant_size"] = 1
    warm = create_optimizer([small], name, **warm_hp)
    for _ in range(3):
        warm.step()
    if hasattr(warm, "chunk_numel"):
        # and the path of a tensor larger than chunk_numel (its chunks / foreach pieces): its first use in
        # a process keeps ~0.4 MiB (code paths' one-time allocations, whatever the size; issue 12: a
        # 2048 x 2048 AdamW step measured 2.4 MiB on the first step, 2.0 on the next = the report)
        warm.chunk_numel = 2**14
        warm.step()
    del warm, small

    p = torch.nn.Parameter(torch.randn(shape))
    p.grad = torch.randn(shape)
    opt = create_optimizer([p], name, **hparams)
    opt.materialize_state()
    state = opt.state[p]
    for v in state.values():
        if v.device.type != "meta":
            v.copy_(v.clone()) if v.dtype == torch.int64 else v.zero_()  # touch every page
    if mode == "plain" and "proj_meta" in state:
        # a step that does not refresh: a random orthonormal basis as if refreshed at step 1
        # (a batch of matrices [..., A, B], fused experts, holds one basis / index / meta row per matrix)
        for key in ("proj_left", "proj_right"):
            if key in state:
                for b in state[key].view(-1, *state[key].shape[-2:]):
                    q = torch.linalg.qr(torch.randn(max(b.shape), min(b.shape))).Q
                    b.copy_(q if b.shape[0] >= b.shape[1] else q.t())
        if "proj_index" in state:
            idx = state["proj_index"]
            idx.copy_(torch.arange(idx.shape[-1]).expand_as(idx))
        state["proj_meta"][..., 2] = 1
        state["step"].fill_(1)
    transient = opt.step_transient_bytes() if hasattr(opt, "step_transient_bytes") else None
    state_bytes = opt.state_bytes()
    import gc

    gc.collect()
    times, cpu = [], []
    _reset_peak()
    base = _status_kib("VmRSS")
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = _status_kib("VmHWM")
    return {
        "name": name, "shape": list(shape), "mode": mode, "hparams": hparams, "state_bytes": state_bytes,
        "growth_bytes": (peak - base) * 1024, "step_s": times, "step_cpu_s": cpu, "transient_bytes": transient,
        "step_after": int(state["step"].item()),
    }


def measure_step(
    name: str, shape: tuple[int, ...] = (8192, 8192), hparams: dict[str, Any] | None = None, mode: str = "plain",
    steps: int = 2, env: dict[str, str] | None = None, pythonpath: str | None = None,
) -> dict[str, Any]:
    """Run ``steps`` steps of optimizer ``name`` on one float32 weight of ``shape`` in a fresh process.

    Args:
        name: A registered engine optimizer.
        shape: The weight's shape.
        hparams: Its hyperparameters (``rank`` etc. for subspace recipes).
        mode: ``"plain"``: for subspace recipes the basis is set as if refreshed at step 1, so the
            measured steps do not refresh (unless ``update_proj_gap`` makes them); ``"refresh"``:
            the first measured step computes the projection.
        steps: Number of measured steps.
        env: Extra environment variables (``OMP_NUM_THREADS`` defaults to 1).
        pythonpath: Import lowmem from this directory (to measure another checkout).

    Returns:
        ``state_bytes``, ``growth_bytes`` (peak RSS during the steps minus RSS before them),
        ``step_s`` (seconds per step), ``transient_bytes`` (``step_transient_bytes()``, if the
        optimizer has it).
    """
    spec = {"name": name, "shape": list(shape), "hparams": hparams or {}, "mode": mode, "steps": steps}
    return measure_steps([spec], env=env, pythonpath=pythonpath)[0]


def measure_steps(specs: list[dict[str, Any]], env: dict[str, str] | None = None,
                  pythonpath: str | None = None) -> list[dict[str, Any]]:
    """:func:`measure_step` for several ``{"name", "shape", "hparams", "mode", "steps"}`` specs, one
    after another in one fresh process (the peak is reset before each). Use it with
    :data:`LIVE_ENV`, so that what one spec freed is returned to the kernel before the next. A spec's
    optional ``"fused_on_cpu"`` (bool) sets :data:`lowmem.optim.functional.adam.FUSED_ON_CPU` for it
    (``False``: AdamW's multi-tensor operations instead of torch's fused kernel on the CPU)."""
    for spec in specs:
        if spec["mode"] not in ("plain", "refresh"):
            raise ValueError(f"mode must be 'plain' or 'refresh', got {spec['mode']!r}")
    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("measure_step needs Linux's /proc/self/clear_refs to reset the peak RSS")
    payload = json.dumps(specs)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if pythonpath is not None:
        full_env["PYTHONPATH"] = pythonpath + os.pathsep + full_env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-m", "lowmem.optim.step_memory", "--child", payload],
        capture_output=True, text=True, env=full_env, cwd=pythonpath or None,
    )
    if out.returncode != 0:
        raise RuntimeError(f"step measurement of {[s['name'] for s in specs]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--shape", type=int, nargs="+", default=[8192, 8192])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="labels of TABLE rows to run")
    ap.add_argument("--pythonpath", help="measure the lowmem found in this directory")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--live", action="store_true", help=f"fix glibc's mmap threshold ({LIVE_ENV}): the growth is then"
                    " the bytes live at the peak, without the heap fragmentation the default allocator adds")
    args = ap.parse_args(argv)
    if args.child:
        specs = json.loads(args.child)
        print(json.dumps([_child(s["name"], tuple(s["shape"]), s["hparams"], s["mode"], s["steps"], s.get("fused_on_cpu"))
                          for s in specs]))
        return
    rows = []
    print("| optimizer | state MiB | peak growth MiB | step_transient_bytes MiB | step CPU s | step wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, label, hp, mode in TABLE:
        if args.only and label not in args.only and name not in args.only:
            continue
        steps = 1 if mode == "refresh" else args.steps
        r = measure_step(name, tuple(args.shape), hp, mode, steps, pythonpath=args.pythonpath,
                         env=LIVE_ENV if args.live else None)
        r["label"] = label
        rows.append(r)
        tr = "-" if r["transient_bytes"] is None else f"{r['transient_bytes'] / MiB:.0f}"
        step_s, cpu_s = min(r["step_s"]), min(r["step_cpu_s"])
        print(f"| {label} | {r['state_bytes'] / MiB:.0f} | {r['growth_bytes'] / MiB:.0f} | {tr} | {cpu_s:.2f} | {step_s:.2f} |",
              flush=True)
    if args.json:
        from ..io import write_text_atomic

        write_text_atomic(args.json, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
