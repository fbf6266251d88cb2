"""`lowmem bench`: side-by-side measurement in one run (a benchmark; here only its correctness)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from lowmem.bench import BASELINE, BenchResult, round_slices, run_bench, spread_warning, step_time_ratios, summarize_ratios
from lowmem.cli import main


def test_bench_rows_are_comparable():
    results = run_bench(["adamw", "adafactor"], steps=8, batch_size=4, progress=False, repeats=3)
    assert [r.optimizer for r in results] == [BASELINE, "adamw", "adafactor"]
    base, ours, ada = results
    # same weights, same batches, same math: lowmem's AdamW reproduces torch's losses
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(ours.losses, base.losses))
    assert base.step_time_ratio == 1.0 and ours.step_time_ratio > 0
    assert base.ratio_spread == 0.0 and len(ours.round_ratios) == 3
    assert ours.ratio_min <= ours.step_time_ratio <= ours.ratio_max
    assert 8.0 <= base.bytes_per_param < 8.01  # two float32 moments (+ 4-byte step counters)
    assert ada.bytes_per_param < 1.0  # factored second moment
    assert ada.hparams["relative_step"] is False  # one external lr for every optimizer


def test_bench_cli_writes_json_and_markdown(tmp_path):
    rc = main(["bench", "adamw", "--steps", "8", "--repeats", "3", "--threads", "1", "--batch-size", "4",
               "--output-dir", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert [r["optimizer"] for r in payload["results"]] == [BASELINE, "adamw"]
    meta = payload["meta"]
    assert meta["threads"] == 1 and meta["repeats"] == 3 and "warning" in meta and meta["spread_limit"] == 0.10
    assert all(len(r["round_ratios"]) == 3 for r in payload["results"])
    md = (tmp_path / "bench.md").read_text()
    assert "| adamw |" in md and "1 CPU thread(s)" in md and "3 rounds" in md
    assert f"run_id {meta['run_id']}" in md  # the two files are one pair
    assert not list(tmp_path.glob(".*.tmp"))


def test_bench_too_few_steps_for_the_rounds_is_a_clear_error(capsys):
    assert main(["bench", "adamw", "--steps", "6", "--repeats", "5"]) == 2
    assert "repeats" in capsys.readouterr().err


def test_rounds_ratios_and_spread():
    """Round r's ratio compares the two optimizers on the same steps; the spread is (max - min) / median."""
    rounds = round_slices(10, 3)
    assert [(r.start, r.stop) for r in rounds] == [(0, 3), (3, 7), (7, 10)]
    base = [1.0] * 3 + [2.0] * 4 + [1.0] * 3  # the machine got busy in round 2: both got slower
    other = [1.5] * 3 + [3.0] * 4 + [1.5] * 3
    assert step_time_ratios(other, base, rounds) == [1.5, 1.5, 1.5]  # interleaving cancels the load
    s = summarize_ratios([1.0, 1.2, 1.1, 0.9, 1.0])
    assert s["step_time_ratio"] == 1.0 and s["ratio_min"] == 0.9 and s["ratio_max"] == 1.2
    assert s["ratio_spread"] == pytest.approx(0.3)


def _row(name, spread):
    return BenchResult(name, {}, 1, 8, 8.0, 1e-3, step_time_ratio=1.0, ratio_spread=spread)


def test_spread_warning_names_the_rows_that_cannot_be_ranked(capsys):
    assert spread_warning([_row(BASELINE, 0.0), _row("adamw", 0.05)]) is None
    w = spread_warning([_row(BASELINE, 0.0), _row("adamw", 0.05), _row("microadam", 0.4)])
    assert "microadam (40%)" in w and "adamw (" not in w and "cannot be ranked" in w
    assert "microadam" in spread_warning([_row("microadam", float("nan"))])  # NaN is not "small"
    from lowmem.bench import print_table, to_markdown

    rows = [_row(BASELINE, 0.0), _row("microadam", 0.4)]
    print_table(rows, {"threads": 1, "repeats": 5})
    out = capsys.readouterr().out
    assert "40%" in out and "cannot be ranked" in out and "1 CPU thread(s)" in out
    assert "cannot be ranked" in to_markdown(rows, meta={"warning": w})


def test_bench_unknown_optimizer_is_a_clear_error(capsys):
    assert main(["bench", "no_such_optim", "--steps", "2"]) == 2
    assert "valid:" in capsys.readouterr().err


def test_bench_on_a_local_model_directory(tiny_model_path):
    """`lowmem bench --model DIR`: any local causal-LM directory, loaded offline."""
    results = run_bench(["galore_adamw"], steps=4, batch_size=4, model_path=tiny_model_path, progress=False, rank=8,
                        warmup=1, repeats=1)
    assert [r.optimizer for r in results] == [BASELINE, "galore_adamw"]
    assert results[1].hparams["rank"] == 8 and results[1].bytes_per_param < results[0].bytes_per_param
    assert all(math.isfinite(r.eval_loss) for r in results)


def test_bench_variants_are_rows_of_their_own():
    """`NAME:key=value,...` benches one optimizer at another setting, side by side in the same run."""
    results = run_bench(["microadam", "microadam:k_init=0.05,m=2"], steps=4, batch_size=4, progress=False, warmup=1,
                        repeats=1)
    assert [r.optimizer for r in results] == [BASELINE, "microadam", "microadam:k_init=0.05,m=2"]
    default, variant = results[1].hparams, results[2].hparams
    assert "k_init" not in default and variant["k_init"] == 0.05 and variant["m"] == 2
    # same state bytes by construction: m * density is 0.1 in both
    assert abs(results[1].bytes_per_param - results[2].bytes_per_param) < 0.05
    assert results[1].losses != results[2].losses


def test_bench_variant_with_unknown_hyperparameter_is_a_clear_error(capsys):
    assert main(["bench", "microadam:densty=0.05", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "densty" in err and "k_init" in err


def test_interleaved_contenders_do_not_disturb_each_other(tmp_path):
    """Each contender has its own model copy and random stream: its losses are those of a run on its own,
    even with dropout drawing from the global generator between the contenders' steps."""
    from lowmem.kit import build_tiny_model

    model, tok = build_tiny_model(seed=0)
    model.config.attention_dropout = 0.3
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    kw = dict(steps=4, batch_size=4, progress=False, warmup=1, repeats=1, model_path=str(tmp_path))
    alone = run_bench(["osd_adamw"], **kw)[1]
    crowd = run_bench(["adafactor", "osd_adamw", "frugal"], **kw)
    assert crowd[2].optimizer == "osd_adamw" and crowd[2].losses == alone.losses


# ---- lowmem bench --task text (issue 14) ------------------------------------------------------------

from lowmem import bench_text  # noqa: E402
from lowmem.bench_peers import PEERS, RECOMMENDED, get_peer, peer_status, probe_peer, recommended  # noqa: E402

SMOKE = bench_text.TEXT_SIZES["smoke"]


def test_text_split_is_by_file_deterministic_and_disjoint():
    root = bench_text.stdlib_root()
    train, held = bench_text.split_files(root, 10)
    assert train and held and not set(train) & set(held)  # no file in both sets
    assert sorted(train + held) == sorted(set(train + held))
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.15  # ~10% of the files
    assert "os.py" in train + held and not any("site-packages" in r for r in train + held)
    assert bench_text.split_files(root, 10) == (train, held)  # same split every run
    assert all(bench_text.is_heldout(r, 10) for r in held) and not any(bench_text.is_heldout(r, 10) for r in train)


def test_text_batches_come_from_the_stream_and_eval_is_seed_independent(tmp_path):
    for i, body in enumerate(["a = 1\n" * 50, "b = 2\n" * 50, "c = 3\n" * 50]):
        (tmp_path / f"m{i}.py").write_text(body)
    task = bench_text.TextTask(seq_len=8, batch_size=2, steps=3, warmup_steps=0, eval_sequences=3, heldout_percent=50)
    train, held = bench_text.split_files(tmp_path, 50)
    stream = bench_text.encode_files(tmp_path, train)
    assert stream[0] == bench_text.BOS and stream[-1] == bench_text.EOS and stream.max() <= bench_text.PAD
    b = bench_text.train_batches(stream, task, seed=0)
    assert len(b) == 3 and b[0]["input_ids"].shape == (2, 8) and torch.equal(b[0]["input_ids"], b[0]["labels"])
    assert torch.equal(b[1]["input_ids"], bench_text.train_batches(stream, task, seed=0)[1]["input_ids"])
    assert not torch.equal(b[1]["input_ids"], bench_text.train_batches(stream, task, seed=1)[1]["input_ids"])
    e = bench_text.eval_batches(stream, task)
    assert sum(len(x["input_ids"]) for x in e) == 3


def test_text_bench_smoke_two_optimizers_two_seeds_and_sweep():
    """A CI-sized run of the text task: the same weights and batches for every row, recommended lrs, seeds, sweep."""
    results, meta = bench_text.run_text_bench(["galore_adamw"], task=SMOKE, seeds=2, lr_sweep=True, repeats=2,
                                              progress=False, threads=1)
    rows = {r.optimizer: r for r in results}
    base, galore = rows["torch_adamw"], rows["galore_adamw"]
    assert results[0] is base and base.step_time_ratio == 1.0 and base.eval_loss_ratio == 1.0
    assert len(base.eval_losses) == 2 and base.eval_losses[0] != base.eval_losses[1]  # seeds differ
    assert base.eval_min <= base.eval_loss <= base.eval_max
    assert galore.lr == RECOMMENDED["galore_adamw"].lr == 1e-2 and galore.hparams["rank"] == SMOKE.hidden_size // 4
    assert galore.bytes_per_param < base.bytes_per_param and 8.0 <= base.bytes_per_param < 8.01
    assert galore.eval_loss_ratio == pytest.approx(sum(g / b for g, b in zip(galore.eval_losses, base.eval_losses)) / 2)
    # the sweep: 1/3 and 3 x the recommended lr, the best of the three reported
    sweep = [r for r in results if r.sweep_of == "galore_adamw"]
    assert sorted(r.lr for r in sweep) == pytest.approx([1e-2 / 3, 3e-2])
    assert galore.best_eval_loss == min(r.eval_loss for r in sweep + [galore])
    md = bench_text.to_markdown(results, meta)
    assert "| galore_adamw | 0.01 |" in md and "best lr" in md and "@lr=" not in md
    assert meta["train_files"] > 0 and meta["heldout_files"] > 0


def test_text_bench_cli_peers_and_skips(tmp_path, monkeypatch):
    """--peers adds the installed peers as peer:NAME rows; a missing one is listed as skipped, never an error."""
    missing = bench_text.PEERS[-1]
    monkeypatch.setattr("lowmem.bench_text.PEERS", (get_peer("transformers_adafactor"),
                                                    missing.__class__("nope", "no_such_package_xyz", "adafactor", missing.build)))
    rc = main(["bench", "adafactor", "--task", "text", "--text-size", "smoke", "--peers", "--repeats", "2",
               "--output-dir", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "bench_text.json").read_text())
    labels = [r["optimizer"] for r in payload["results"]]
    assert labels == [BASELINE, "adafactor", "peer:transformers_adafactor"]
    assert "no_such_package_xyz is not installed" in payload["meta"]["skipped_peers"]["peer:nope"]
    rc = main(["bench", "adamw", "--task", "text", "--text-size", "smoke", "--seeds", "2", "--repeats", "2",
               "--output-dir", str(tmp_path / "adamw")])
    base, adamw = json.loads((tmp_path / "adamw" / "bench_text.json").read_text())["results"]
    # lowmem's AdamW equals torch's under the same schedule: the same held-out losses in every seed
    assert rc == 0 and adamw["eval_losses"] == pytest.approx(base["eval_losses"], rel=1e-5)
    ours, peer = payload["results"][1], payload["results"][2]
    # lowmem's Adafactor follows transformers' (tested elsewhere): the same held-out loss here
    assert ours["eval_loss"] == pytest.approx(peer["eval_loss"], rel=1e-4)
    assert "Skipped peers: peer:nope" in (tmp_path / "bench_text.md").read_text()


def test_recommended_settings_have_sources_and_cover_the_registry():
    import ast
    import inspect

    import lowmem.bench_peers as bp
    from lowmem.optim import optimizer_entries

    # a key written twice in the dict literal would silently keep only the later value and source
    tree = ast.parse(inspect.getsource(bp))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "RECOMMENDED")
    keys = [k.value for k in node.value.keys]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)

    for name, rec in RECOMMENDED.items():
        assert rec.lr > 0 and len(rec.source) > 10, name
    for e in optimizer_entries():
        if e.recipe is not None:
            assert recommended(e.name).lr > 0  # an unlisted name falls back to its recipe default, said in source
    assert all(peer_status(p) is None or "not installed" in peer_status(p) for p in PEERS)
    with pytest.raises(ValueError, match="valid: peer:"):
        get_peer("peer:nope")


def test_text_flags_are_refused_where_they_do_not_apply(capsys):
    assert main(["bench", "adamw", "--lr-sweep", "--steps", "8"]) == 2
    assert "--lr-sweep needs --task text" in capsys.readouterr().err
    assert main(["bench", "adamw", "--task", "text", "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


# ---- lowmem bench --shapes (issue 15) -----------------------------------------------------------------

from lowmem import bench_shapes  # noqa: E402


def test_shape_sets_are_the_llama_layers_of_issue_15():
    import math as m

    seven = bench_shapes.layer_shapes("llama-7b-layer")
    assert seven["self_attn.q_proj.weight"] == (4096, 4096) and seven["mlp.gate_proj.weight"] == (11008, 4096)
    assert seven["mlp.down_proj.weight"] == (4096, 11008) and seven["input_layernorm.weight"] == (4096,)
    count = lambda n: sum(m.prod(s) for s in bench_shapes.layer_shapes(n).values())  # noqa: E731
    assert count("llama-7b-layer") == 4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096  # 202.4M
    assert 12.6e6 < count("hidden-1024") < 12.7e6 and 50.5e6 < count("hidden-2048") < 50.7e6  # issue 15: 12.7M, 50.6M
    m_ = bench_shapes.LayerWeights(*bench_shapes.shape_set("hidden-64"))
    assert {n: tuple(p.shape) for n, p in m_.named_parameters()} == bench_shapes.layer_shapes("hidden-64")
    with pytest.raises(ValueError, match="valid: llama-7b-layer"):
        bench_shapes.shape_set("llama-70b")


@pytest.mark.filterwarnings("ignore:the optimizer found no trainable projection layer")
def test_small_shape_sets_are_the_recorded_ones_and_run_from_the_cli(tmp_path, monkeypatch):
    """The sets of docs/benchmarks.md's small-tensor and 8-layer measurements: their shapes, the CLI's choices,
    and a CLI run writes its table (CI-sized: one step per round)."""
    import argparse

    from lowmem.cli import build_parser

    small = bench_shapes.set_shapes("small-tensors")
    assert list(small.values()) == [(1024,)] * 64 + [(64, 64)] * 32  # vectors first, as measured
    assert list(bench_shapes.set_shapes("small-batched").values()) == [(256,)] * 32 + [(4, 64, 64)] * 16
    linear = bench_shapes.build_set("small-linear")  # Subspace-Momentum's set: the weights are projection layers
    assert [n for n, m in linear.named_modules() if isinstance(m, torch.nn.Linear)] == [f"mats.{i}" for i in range(32)]
    assert list(bench_shapes.set_shapes("small-linear").values()) == [(128,)] * 64 + [(128, 128)] * 32
    stack = bench_shapes.set_shapes("llama-8x128")
    assert len(stack) == 8 * 9 and stack["layers.7.mlp.gate_proj.weight"] == (344, 128)
    assert stack["layers.0.input_layernorm.weight"] == (128,)
    for name in ("small-tensors", "small-batched", "small-linear", "llama-8x128", "llama-8x256"):
        mod = bench_shapes.build_set(name)
        assert {n: tuple(p.shape) for n, p in mod.named_parameters()} == bench_shapes.set_shapes(name)
        assert bench_shapes.steps_per_round(name) == bench_shapes.SMALL_SET_STEPS
    assert bench_shapes.steps_per_round("hidden-1024") == 1
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    shapes_arg = next(a for a in sub.choices["bench"]._actions if a.dest == "shapes")
    from lowmem.bench_launches import launch_sets

    # every set is a CLI choice, and llama-368m for --launches (meta tensors, not timed)
    assert sorted(shapes_arg.choices) == sorted(launch_sets()) == sorted([*bench_shapes.all_sets(), "llama-368m"])
    with pytest.raises(ValueError, match="small-tensors"):
        bench_shapes.shape_set("small-vectors")

    monkeypatch.setattr(bench_shapes, "SMALL_SET_STEPS", 1)
    rc = main(["bench", "adamw", "sgd_sm", "--shapes", "small-tensors", "--repeats", "2", "--output-dir", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "bench_shapes.json").read_text())
    assert [r["optimizer"] for r in payload["results"]] == [BASELINE, "adamw", "sgd_sm"]
    assert payload["meta"]["params"] == 64 * 1024 + 32 * 64 * 64 and payload["meta"]["steps_per_round"] == 1
    md = (tmp_path / "bench_shapes.md").read_text()
    assert "### lowmem bench --shapes small-tensors" in md and "| sgd_sm |" in md
    assert "64 vectors of 1024 + 32 weights of 64 x 64" in md and "196,608 parameters" in md


def test_shapes_bench_ratio_direction_refresh_and_peers(monkeypatch):
    """A step that is slower than AdamW's gets a ratio above 1 (not inverted); GaLore's first step (its SVD)
    is reported apart and amortised over update_proj_gap; peers run on the same parameters."""
    real_build = bench_shapes._build

    class Slow(torch.optim.AdamW):
        def step(self, closure=None):
            t0 = time.process_time()
            while time.process_time() - t0 < 0.02:  # 20 ms of CPU work (steps are timed in CPU time)
                pass
            return super().step(closure)

    def build(label, module, rank):
        if label == "slow":
            return Slow(module.parameters(), lr=1e-5), {}, None, None
        return real_build(label, module, rank)

    monkeypatch.setattr(bench_shapes, "_build", build)
    results, meta = bench_shapes.run_shapes_bench(["slow", "badam", "galore_adamw", "adamw"], "hidden-64", peers=False,
                                                  rank=8, repeats=3, threads=1, progress=False)
    rows = {r.optimizer: r for r in results}
    # every contender gets every parameter, whatever the one before did (BAdam freezes its inactive blocks)
    assert rows["adamw"].bytes_per_param == pytest.approx(results[0].bytes_per_param, rel=1e-3)
    assert results[0].optimizer == BASELINE and results[0].step_time_ratio == 1.0
    assert rows["slow"].step_time_ratio > 3  # 20 ms of CPU work against a sub-millisecond AdamW step
    g = rows["galore_adamw"]
    assert g.refresh_gap == 200 and g.first_step_adamw > 0 and g.amortised_ratio >= g.step_time_ratio
    assert g.bytes_per_param < 8 <= results[0].bytes_per_param < 8.01  # two float32 moments + step counters
    md = bench_shapes.to_markdown(results, meta)
    assert "| galore_adamw |" in md and "fastest peer" in md and "(gap 200)" in md


def test_shapes_cli_with_a_peer(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lowmem.bench_shapes.PEERS", (get_peer("galore_torch"),))
    monkeypatch.setitem(bench_shapes.SHAPE_SETS, "hidden-1024", (64, 172, False))  # CI-sized
    rc = main(["bench", "galore_adamw", "--shapes", "hidden-1024", "--peers", "--repeats", "2", "--rank", "8",
               "--output-dir", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "bench_shapes.json").read_text())
    labels = [r["optimizer"] for r in payload["results"]]
    assert labels == [BASELINE, "galore_adamw", "peer:galore_torch"]
    assert payload["results"][2]["peer_of"] == "galore_adamw" and payload["results"][2]["refresh_gap"] == 200
    assert "| galore_adamw |" in (tmp_path / "bench_shapes.md").read_text().split("fastest peer")[1]


def test_explicit_peer_rows_and_their_errors(capsys):
    results, _ = bench_shapes.run_shapes_bench(["peer:transformers_adafactor"], "hidden-32", repeats=1, threads=1,
                                               progress=False)
    assert [(r.optimizer, r.peer_of) for r in results] == [(BASELINE, None), ("peer:transformers_adafactor", "adafactor")]
    assert main(["bench", "peer:nope", "--shapes", "hidden-1024"]) == 2
    assert "valid: peer:transformers_adafactor" in capsys.readouterr().err
    assert main(["bench", "peer:fira", "--steps", "8"]) == 2
    assert "need --task text or --shapes" in capsys.readouterr().err


def test_torch_muon_peer_equals_lowmem_muon_on_the_text_task():
    """peer:torch_muon is torch.optim.Muon on the hidden 2-D weights + AdamW on the rest, under one scheduler:
    lowmem's muon (tested equal to torch's step by step elsewhere) reaches the same held-out loss."""
    results, _ = bench_text.run_text_bench(["muon", "peer:torch_muon"], task=SMOKE, repeats=2, progress=False, threads=1)
    base, muon, peer = results
    assert peer.optimizer == "peer:torch_muon" and peer.lr == muon.lr == RECOMMENDED["muon"].lr
    assert muon.eval_loss == pytest.approx(peer.eval_loss, rel=1e-5) and muon.eval_loss != base.eval_loss
    assert muon.bytes_per_param == pytest.approx(peer.bytes_per_param, rel=1e-3)


# ---- the peers of pytorch_optimizer and torchao (issue 15) --------------------------------------------

PO_PEERS = {"po_spam": "spam", "po_stable_spam": "stable_spam", "po_galore": "galore_adamw", "po_fira": "fira_adamw",
            "po_apollo": "apollo_adamw", "po_adafactor": "adafactor"}


def test_peer_list_covers_every_recipe_with_a_peer_package():
    """Each peer names a registered recipe; pytorch_optimizer's and torchao's rows are in the list under their
    recipes; names are unique (get_peer would return the first of two)."""
    from lowmem.optim.registry import list_optimizers

    names = [p.name for p in PEERS]
    assert len(names) == len(set(names))
    assert all(p.recipe in list_optimizers() for p in PEERS)
    recipes = {p.name: (p.module, p.recipe) for p in PEERS}
    assert {n: recipes[n] for n in PO_PEERS} == {n: ("pytorch_optimizer", r) for n, r in PO_PEERS.items()}
    assert recipes["torchao"] == ("torchao", "adamw4bit") and recipes["torchao_8bit"] == ("torchao", "adamw8bit")
    covered = {p.recipe for p in PEERS}
    assert {"adafactor", "galore_adamw", "fira_adamw", "apollo_adamw", "apollo_mini", "adam_mini", "adamw8bit",
            "adamw4bit", "muon", "spam", "stable_spam"} <= covered


@pytest.mark.parametrize("name", sorted(PO_PEERS))
def test_pytorch_optimizer_peers_build_and_step(name):
    pytest.importorskip("pytorch_optimizer")
    assert probe_peer(get_peer(name)) is None


def _peer_vs_lowmem(peer: str, recipe: str, steps: int, **st):
    """``steps`` steps of the peer (built by its bench builder, with ``st`` as the recommended settings) and of
    lowmem's recipe at the same settings, on a 40 x 24 weight and a 40-vector with spiky gradients."""
    from lowmem.optim import create_optimizer

    out = []
    for kind in ("peer", "lowmem"):
        torch.manual_seed(0)
        model = torch.nn.Module()
        model.lin = torch.nn.Linear(24, 40, bias=False)
        model.norm = torch.nn.Parameter(torch.ones(40))
        opt = (get_peer(peer).build(model, 1e-2, 8, dict(st)) if kind == "peer"
               else create_optimizer(list(model.parameters()), recipe, lr=1e-2, **st))
        gen = torch.Generator().manual_seed(1)
        for i in range(steps):
            for p in model.parameters():
                g = torch.randn(p.shape, generator=gen)
                if i % 3 == 1:
                    g.view(-1)[:2] *= 50.0  # spikes: the clipping paths run
                p.grad = g
            opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def test_stable_spam_peer_is_lowmems_stable_spam():
    """The settings the Stable-SPAM peer is built with are lowmem's: over 20 steps with a momentum reset every
    7 (``reset_interval`` -> ``update_proj_gap``), clipped spikes and AdaGN, the two reach the same weights."""
    pytest.importorskip("pytorch_optimizer")
    theirs, ours = _peer_vs_lowmem("po_stable_spam", "stable_spam", 20, reset_interval=7)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # measured 1.2e-7


def test_spam_peer_is_lowmems_spam_without_the_warmup():
    """The SPAM peer at lowmem's settings (threshold, grad_accu_steps, reset every ``reset_interval``) steps as
    lowmem's spam when no warm-up follows a reset; pytorch_optimizer's warm-up multiplier differs (its
    CosineDecay drives torch's recursive CosineAnnealingLR from a set ``last_epoch``: 0.155 where the closed
    form gives 0.01 on a 3-step warm-up), which costs the same per step."""
    pytest.importorskip("pytorch_optimizer")
    st = {"reset_interval": 7, "grad_accu_steps": 2, "threshold": 5000.0}
    theirs, ours = _peer_vs_lowmem("po_spam", "spam", 20, warmup_steps=0, **st)
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    theirs, ours = _peer_vs_lowmem("po_spam", "spam", 20, warmup_steps=3, **st)
    assert not torch.allclose(theirs[0], ours[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchao", "torchao_8bit"])
def test_torchao_peers_build_and_step(name):
    """torchao's AdamW4bit / AdamW8bit on the CPU: the step is torch.compile-d (about 20 s to import and compile
    on a 2-core machine, hence slow)."""
    pytest.importorskip("torchao")
    assert probe_peer(get_peer(name)) is None


def test_state_bytes_of_a_peer_count_tensor_subclasses_and_skip_counters():
    """A peer's state held in a tensor subclass (torchao's OptimState4bit: codes + scales) counts its inner
    tensors, not its nominal float32 size; a counter kept beside the per-parameter dicts (pytorch_optimizer's
    SPAM: ``state["total_step"]``) is skipped."""
    from torch.testing._internal.two_tensor import TwoTensor

    from lowmem.bench import _state_bytes, _tensor_bytes

    t = TwoTensor(torch.zeros(10), torch.zeros(10))  # nominal 40 bytes, two inner tensors of 40
    assert _tensor_bytes(t) == 80 and _tensor_bytes({"x": t}) == 80
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p]["m"] = torch.zeros(3)
    opt.state["total_step"] = 4
    assert _state_bytes(opt) == 12


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= "),
    (["--steps", "6", "--repeats", "5"], "--steps must be >= 10"),
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_bad_tiny_task_flags_name_the_flag(argv, message, capsys):
    """The tiny task's numeric flags are checked before anything loads, naming the flag and its range
    (--steps 0 said '-5 timed steps cannot make 5 rounds'; --lr -1 was torch's 'Invalid learning rate')."""
    assert main(["bench", "adamw", *argv]) == 2
    assert message in capsys.readouterr().err
