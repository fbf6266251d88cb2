"""The GPU-check harness (lowmem.bench_gpu, .ci/gpu_checks.sh) on CPU: its smoke mode runs the same code
paths on tiny shapes, and a check or a row that fails is recorded without stopping the others."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from lowmem import bench_gpu as BG


def test_smoke_report_structure_and_an_injected_failure_does_not_stop_the_rest(tmp_path, capsys):
    """env crashes (os._exit) and the 64x172 memory check raises, on purpose: both are recorded with their
    output, and the timing check between them still gives its rows."""
    out = tmp_path / "out"
    BG.main(["--device", "cpu", "--smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--budget", "150",
             "--only", "badam,adamw,galore_adamw",
             "--checks", "env,time+memory:smoke-llama,memory:64x172",
             "--inject", "exit:env", "--inject", "raise:memory:64x172"])
    report = json.loads((out / "report.json").read_text())
    assert {"commit", "device", "budget_s", "wall_s", "started"} <= set(report["meta"])
    paths = {(p["file"], p["code"], p["covered_by"]) for p in report["cuda_code_paths"]}
    assert any(f == "lowmem/optim/microadam.py" and "torch.compile(" in c and "pytest:cuda" in by for f, c, by in paths), paths
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["env", "time+memory:smoke-llama", "memory:64x172"]

    assert checks["env"]["status"] == "error" and checks["env"]["rc"] == 3
    assert checks["memory:64x172"]["status"] == "error"
    assert "injected failure" in checks["memory:64x172"]["log_tail"]

    timing = checks["time+memory:smoke-llama"]
    assert timing["status"] == "ok", timing
    rows = {r["optimizer"]: r for r in timing["rows"] if r["status"] != "info"}
    assert list(rows) == ["badam", "adamw", "galore_adamw"]
    for r in (rows["adamw"], rows["galore_adamw"]):  # BAdam's frozen blocks thawed for the next rows (meta copy too)
        assert r["state_bytes"] > 0 and r["estimate_state"] == r["state_bytes"], r
        # on CPU the live count adds MKL's GEMM packing buffers of projected steps, which meta sizing leaves out;
        # adamw's buckets take torch's fused AdamW kernel (the CPU's default too), which allocates nothing
        assert (r["optimizer"] == "adamw" or 0 < r["estimate_transient"]) and r["estimate_transient"] <= r["step_transient_bytes"], r
        assert r["step_time_ratio"] > 0 and r["first_step_s"] > 0, r
        assert r["peak_first"] is None  # no allocator peak on CPU
    assert rows["adamw"]["refresh_gap"] is None and rows["galore_adamw"]["refresh_gap"] == BG.REFRESH_GAP
    assert rows["galore_adamw"]["hparams"]["rank"] == 8

    printed = capsys.readouterr().out  # the summary the device tool's output tail shows
    assert "== time+memory:smoke-llama: ok" in printed and "== memory:64x172: error" in printed
    assert any(line.startswith("galore_adamw ") and "amort" in line for line in printed.splitlines())

    md = (out / "report.md").read_text()
    for c in checks:
        assert f"## {c}: {checks[c]['status']}" in md
    assert "| galore_adamw | ok |" in md and "injected failure" in md


@pytest.mark.parametrize("name", ["galore_adamw", "adamw8bit"])
def test_equal_cell_on_cpu(name):
    """The equality row: CPU against CPU is exact (on a GPU the same row compares CUDA with CPU)."""
    row = BG.equal_cell(name, "layer:32x86", "cpu", "cpu", steps=2, rank=8)
    assert (row["status"], row["relative_difference"], row["max_abs_difference"]) == ("ok", 0.0, 0.0), row


def test_an_overrun_is_killed_and_the_next_check_runs(tmp_path):
    checks = [BG.Check("first", "env", "alone", 1.0, {"device": "cpu"}),
              BG.Check("second", "env", "alone", 30.0, {"device": "cpu"})]
    report = BG.run_checks(checks, tmp_path / "out", tmp_path / "work", 60.0, inject={"first": "hang", "second": "raise"},
                           poll_s=0.1, kill_grace_s=0.5)
    first, second = report["checks"]
    assert first["status"] == "timeout" and first["wall_s"] < 10
    assert second["status"] == "error" and "injected failure" in second["log_tail"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["checks"][0]["status"] == "timeout"


def test_the_report_is_written_while_a_check_runs(tmp_path):
    """A command killed at its limit still brings back a report: it is rewritten while checks run."""
    import threading

    report_path = tmp_path / "out" / "report.json"
    checks = [BG.Check("slow", "env", "alone", 2.0, {"device": "cpu"})]
    t = threading.Thread(target=BG.run_checks, args=(checks, tmp_path / "out", tmp_path / "work", 30.0),
                         kwargs={"inject": {"slow": "hang"}, "poll_s": 0.1, "write_every_s": 0.2, "kill_grace_s": 0.2})
    t.start()
    seen = None
    for _ in range(100):
        if report_path.exists():
            seen = json.loads(report_path.read_text())["checks"][0]["status"]
            if seen == "running":
                break
        threading.Event().wait(0.05)
    t.join()
    assert seen == "running"
    assert json.loads(report_path.read_text())["checks"][0]["status"] == "timeout"


def test_a_failing_row_is_recorded_and_the_next_rows_run(tmp_path):
    rows_path = tmp_path / "rows.jsonl"

    def cell(name):
        if name == "bad":
            raise ValueError("broken on purpose")
        return {"optimizer": name}

    BG._rows_per_optimizer(["a", "bad", "c"], deadline=1e18, write=BG.RowWriter(rows_path), cell=cell)
    rows = BG._read_rows(rows_path)
    assert [(r["optimizer"], r["status"]) for r in rows] == [("a", "ok"), ("bad", "error"), ("c", "ok")]
    assert "ValueError: broken on purpose" in rows[1]["error"]
    assert BG.check_status(0, False, rows) == "failed rows"
    BG._rows_per_optimizer(["late"], deadline=0.0, write=BG.RowWriter(rows_path), cell=cell)
    assert BG._read_rows(rows_path)[-1]["status"] == "not reached"


def test_pure_pieces():
    assert BG.amortised_ratio(1.5, first_s=3.0, steady_s=1.0, base_s=0.5, gap=200) == pytest.approx(1.52)
    assert BG.amortised_ratio(1.5, 3.0, 1.0, 0.5, None) == 1.5
    assert BG.estimate_ratio(110, 100) == 1.1 and BG.estimate_ratio(None, 100) is None and BG.estimate_ratio(5, 0) is None
    w0 = [torch.zeros(3)]
    rel, worst = BG.relative_update_difference([torch.tensor([1.0, 0.0, 0.0])], [torch.tensor([1.0, 0.0, 1e-4])], w0)
    assert rel == pytest.approx(1e-4, rel=1e-6) and worst == pytest.approx(1e-4)
    assert BG.equal_status(rel) == "ok" and BG.equal_status(1e-2) == "check" and BG.equal_status(0.1) == "FAIL"
    assert BG.equal_status(math.nan) == "FAIL"
    # a recipe with a refresh gap is judged on its first step (the refresh its estimate describes)
    assert BG.estimate_within(0.95, 5.5, refreshes=True) and not BG.estimate_within(0.95, 5.5, refreshes=False)
    assert not BG.estimate_within(0.80, 1.0, refreshes=True) and BG.estimate_within(1.05, 0.92, refreshes=False)
    assert BG.check_status(None, True, []) == "timeout" and BG.check_status(1, False, []) == "error"
    assert BG.check_status(0, False, [{"status": "ok", "estimate_within_10pct": False}]) == "failed rows"
    assert BG.check_status(0, False, [{"status": "not reached"}]) == "partial"


def test_alive_at_peak_names_what_a_step_held_at_its_peak():
    """The replay of an allocator trace (what the memory rows record of a later CUDA step, measure_cell): the peak
    of the bytes allocated and not yet freed during the step, and the sites alive then, by bytes (the innermost
    frame in lowmem's code; a free before the peak does not count, an allocation after it neither)."""
    def frame(f, line, name):
        return {"filename": f, "line": line, "name": name}

    ada = [frame("/x/torch/functional.py", 9, "norm"), frame("/w/lowmem/optim/moments.py", 640, "prepare_chunks"),
           frame("/w/lowmem/bench_gpu.py", 1, "measured_step")]
    sq = [frame("/w/lowmem/optim/moments.py", 633, "prepare_chunks")]
    trace = [{"action": "alloc", "addr": 1, "size": 64, "frames": sq},
             {"action": "free_requested", "addr": 1, "size": 64, "frames": sq},
             {"action": "free_completed", "addr": 1, "size": 64, "frames": sq},
             {"action": "alloc", "addr": 2, "size": 40, "frames": ada},
             {"action": "alloc", "addr": 3, "size": 30, "frames": ada},
             {"action": "alloc", "addr": 4, "size": 8, "frames": [frame("/x/torch/cuda.py", 5, "k")]},
             {"action": "free_requested", "addr": 3, "size": 30, "frames": ada},
             {"action": "alloc", "addr": 5, "size": 20, "frames": sq}]
    peak, sites = BG.alive_at_peak(trace)
    assert peak == 78
    assert sites == [("lowmem/optim/moments.py:640 prepare_chunks", 70), ("cuda.py:5 k", 8)]
    assert BG.alive_at_peak([]) == (0, [])
    note = BG._sites_note({"traced_peak": 3 * 2**20, "peak_sites": [("a.py:1 f", 2**20)]})
    assert note == "peak 3.0: 1.0 a.py:1 f"


def test_cli_refuses_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="--only: unknown optimizers"):
        BG.main(["--device", "cpu", "--smoke", "--out", str(tmp_path), "--only", "adamw,nope"])
    with pytest.raises(ValueError, match="--checks: unknown"):
        BG.main(["--device", "cpu", "--smoke", "--out", str(tmp_path), "--checks", "nope"])
    with pytest.raises(ValueError, match="--inject must be KIND:CHECK"):
        BG.main(["--device", "cpu", "--smoke", "--out", str(tmp_path), "--inject", "boom:env"])


def test_cuda_test_files_are_found():
    files = BG.cuda_test_files()
    assert "tests/test_microadam.py" in files and "tests/test_bench_gpu.py" not in files


def test_commit_names_the_prepared_tree_when_git_disagrees(tmp_path, monkeypatch):
    """On the device the copy's git answers with the session's base commit (the first H200 run reported
    fc688e8 for a tree at 3939bd5): the prepared commit is named beside it."""
    import subprocess
    import types

    import lowmem.bench_gpu as B

    monkeypatch.setattr(B, "ROOT", tmp_path)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: types.SimpleNamespace(stdout="base\n"))
    assert B._commit() == "base"
    (tmp_path / "build" / "gpu_site").mkdir(parents=True)
    (tmp_path / "build" / "gpu_site" / "commit.txt").write_text("tree\n0 files changed\n")
    assert B._commit() == "prepared tree (build/gpu_site/commit.txt); git HEAD base"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: types.SimpleNamespace(stdout="tree\n"))
    assert B._commit() == "tree"


def test_plan_puts_this_sessions_rows_first_and_the_bf16_check_before_the_timing():
    """Session 16's plan: the bf16 check (bfloat16 7B layer: round-to-nearest beside stochastic rounding and Kahan)
    runs alone right after env; adamw, then the optimizers no GPU has run, are timed first; bitsandbytes' paged
    optimizers are left out unless named; the budgets of the alone phase still fit 0.55 of the total."""
    names = BG.optimizer_names()
    assert names[:5] == ["adamw", "racs", "alice", "sm3", "normuon"]
    assert not any(n.startswith("bnb_paged") for n in names) and "bnb_adamw8bit" in names
    checks = BG.plan("cuda", smoke=False, budget_s=390)
    assert [c.name for c in checks] == ["env", "bf16:llama-7b-layer", "time+memory:llama-350m", "memory:llama-7b-layer",
                                        "equal:cuda-vs-cpu", "pytest:cuda"]
    bf16 = checks[1]
    assert bf16.phase == "alone" and bf16.params["dtype"] == "bfloat16" and bf16.params["timing"]
    assert bf16.params["optimizers"][:3] == ["adamw", "adamw+bf16_stochastic_round", "adamw+kahan_summation"]
    assert bf16.budget_s + checks[2].budget_s <= 0.55 * 390 - 10
    only = BG.plan("cuda", smoke=False, only=["lion"], budget_s=390)[1].params["optimizers"]
    assert only == ["lion", "lion+bf16_stochastic_round"]
    assert BG.split_row("adamw+kahan_summation") == ("adamw", {"kahan_summation": True})
    with pytest.raises(ValueError, match="not in"):
        BG.split_row("adamw+fused")


def test_bf16_rows_on_cpu(tmp_path):
    """The bf16 check's child in this process on bfloat16 32 x 86 weights: each row steps with its setting (the
    hparams hold it; Kahan's compensation in the state, 2 bytes per weight), and the result file holds the markdown
    and the JSON of the report."""
    rows = []
    BG.child_cells({"module": "layer:32x86", "device": "cpu", "optimizers": ["adamw", "adamw+kahan_summation"],
                    "timing": True, "rounds": 1, "steps_per_round": 1, "rank": 8, "dtype": "bfloat16",
                    "work": str(tmp_path)}, deadline=1e18, write=rows.append)
    info, plain, kahan = rows
    assert "bfloat16" in info["module"] and plain["status"] == kahan["status"] == "ok", rows
    assert kahan["hparams"]["kahan_summation"] is True and "kahan_summation" not in plain["hparams"]
    weights = sum(p.numel() for p in BG.build_module("layer:32x86", "cpu")[0].parameters())
    assert kahan["state_bytes"] - plain["state_bytes"] == 2 * weights
    assert kahan["estimate_state"] == kahan["state_bytes"] and kahan["step_time_ratio"] > 0
    report = {"meta": {"device": "cpu"}, "cuda_code_paths": [],
              "checks": [{"name": "bf16:32x86", "kind": "cells", "phase": "alone", "budget_s": 1, "status": "ok",
                          "rows": rows}]}
    text = BG.results_text(report)
    assert "| adamw+kahan_summation | ok |" in text
    assert json.loads(text.split("```json\n")[1].split("\n```")[0]) == json.loads(json.dumps(report, default=str))


def test_pytest_check_runs_the_files_that_import_and_names_the_one_that_does_not(tmp_path):
    """On the device a cuda test file can fail to import (session 16: tests/test_endrun_memory.py needs datasets, which
    the image lacks); pytest then stops at collection and runs nothing, unless --continue-on-collection-errors: the
    other files' tests run and the broken file is one error row naming the missing module."""
    good, broken = tmp_path / "test_good_cuda.py", tmp_path / "test_broken_cuda.py"
    marker = "@pytest.mark." + "cuda"  # (spelled apart: this file must not look like a cuda test file itself)
    good.write_text(f"import pytest\n\n\n{marker}\ndef test_runs():\n    pass\n")
    broken.write_text(f"import pytest\nimport lowmem_no_such_module  # noqa\n\n\n{marker}\ndef test_x():\n    pass\n")
    rows = []
    with pytest.raises(RuntimeError, match="pytest exited 1"):
        BG.child_pytest({"files": [str(good), str(broken)], "work": str(tmp_path)}, deadline=time.time() + 120,
                        write=rows.append)
    outcomes = {r["optimizer"].split(".")[-1]: (r.get("outcome"), r.get("message", "")) for r in rows if r["status"] != "info"}
    assert outcomes["test_good_cuda::test_runs"] == ("passed", "")
    err = next(v for k, v in outcomes.items() if "test_broken_cuda" in k)
    assert err[0] == "error" and "lowmem_no_such_module" in err[1], outcomes
