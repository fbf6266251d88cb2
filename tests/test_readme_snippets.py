"""README.md as a reviewer reads it: its Python snippet runs as written, the commands it shows run (offline, on the
embedded tiny model, a step or two), every flag it names exists, and its optimizer table is what `lowmem list`
computes. The install and test commands are .ci/run's: tests/test_doctruth_install.py."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lowmem.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DATA = ROOT / "configs" / "data"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def test_use_snippet_runs_verbatim():
    from lowmem.kit import build_tiny_model

    block = python_blocks(README.read_text())[0]
    assert "create_optimizer" in block and "step_transient_bytes" in block
    model, _ = build_tiny_model()
    env = {"model": model}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (the snippet builds the tiny model; rank 16 applies to its weights)
        exec(compile(block, "README.md", "exec"), env)
    assert env["opt"].state_bytes() > 0


def test_use_snippet_comments_hold():
    """The snippet's comments: sorted names, ``state_bytes()`` 0 before the state exists, ``rank`` valid
    1 .. 63 on the tiny model (64 wide) and an error naming that range beyond, unknown names a ValueError
    listing the valid ones."""
    import lowmem
    from lowmem.kit import build_tiny_model

    names = lowmem.list_optimizers()
    assert names == sorted(names) and "galore_adamw" in names
    model, _ = build_tiny_model()
    assert model.config.hidden_size == 64
    opt = lowmem.create_optimizer(model, "galore_adamw", lr=1e-3, rank=16)
    assert opt.state_bytes() == 0
    opt.materialize_state()
    assert opt.state_bytes() > 0 and opt.step_transient_bytes() >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rank 63 trains the narrower k/v projections full-rank
        lowmem.create_optimizer(model, "galore_adamw", lr=1e-3, rank=63)
    with pytest.raises(ValueError, match=r"1 \.\. 63"):
        lowmem.create_optimizer(model, "galore_adamw", lr=1e-3, rank=64)
    with pytest.raises(ValueError, match="adamw"):
        lowmem.create_optimizer(model, "galor_adamw", lr=1e-3)


# ---- every flag README names exists ----------------------------------------------------------------------------

# flags of the tools README launches lowmem with (accelerate launch, torchrun), of pip install (the CPU torch
# index) and of pytest (pyproject's addopts)
EXTERNAL = {"--num_processes", "--multi_gpu", "--config_file", "--standalone", "--nproc_per_node", "--dist",
            "--index-url", "--extra-index-url"}


def _lowmem_options() -> set[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {opt for sub in subparsers.choices.values() for a in sub._actions for opt in a.option_strings}


def test_every_flag_readme_names_exists():
    """Each ``--flag`` in README is an option of a `lowmem` command, a field `lowmem train` takes as a flag
    (README: "any other recipe key or TrainingArguments / TRL config field is a flag too"), or one of
    accelerate launch's / torchrun's / pytest-xdist's."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    from trl import DPOConfig, GRPOConfig, SFTConfig

    from lowmem.cli import split_field_flags
    from lowmem.train import RECIPE_KEYS

    trainer_fields = set(RECIPE_KEYS)
    for config in (SFTConfig, DPOConfig, GRPOConfig):
        trainer_fields |= set(config.__dataclass_fields__)
    flags = set(re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*", README.read_text()))
    lowmem_opts = _lowmem_options()
    external = {o for a in launch_command_parser()._actions for o in a.option_strings}
    external |= {o for a in get_args_parser()._actions for o in a.option_strings}
    pip_help = subprocess.run([sys.executable, "-m", "pip", "install", "--help"], capture_output=True, text=True).stdout
    external |= set(re.findall(r"(?<![\w-])--[a-z][\w-]*", pip_help))
    for flag in sorted(flags - lowmem_opts):
        if flag == "--dist":  # pytest-xdist's, in pyproject's addopts
            assert "--dist loadgroup" in (ROOT / "pyproject.toml").read_text()
            continue
        if flag in EXTERNAL:
            assert flag in external, flag
            continue
        _, fields = split_field_flags(["train", flag, "1"], build_parser())
        assert set(fields) <= trainer_fields and fields, \
            f"README names {flag}: neither a lowmem option nor a field lowmem train takes"


def test_bench_shape_sets_and_plot_extra_exist():
    """The `--shapes` sets README names are choices of `lowmem bench --shapes`; `pip install -e ".[plot]"` names
    an extra of pyproject that brings matplotlib (for `lowmem budget --png`), also in `.[dev]`."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

    text = README.read_text().replace("\\|", "|")  # a `|` inside a table cell is written `\|`
    named = set()
    for group in re.findall(r"--shapes ([\w|-]+)", text):
        named |= set(group.split("|"))
    assert {"hidden-1024", "llama-7b-layer", "small-tensors", "llama-8x256"} <= named
    shapes = next(a for a in _subparser("bench")._actions if "--shapes" in a.option_strings)
    assert named <= set(shapes.choices)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert 'pip install -e ".[plot]"' in text
    assert any(r.startswith("matplotlib") for r in extras["plot"]) and any(r.startswith("matplotlib") for r in extras["dev"])


def _subparser(name: str):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return subparsers.choices[name]


# ---- the commands README shows, run ------------------------------------------------------------------------------


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow  # ~30 s: a fresh process with its imports, 200 steps
def test_setup_runs_lowmem_train_verbatim(tmp_path):
    """The "Set up" block ends with `lowmem train`: the installed console script, no arguments, trains the
    embedded tiny model (configs/default.yaml) and writes outputs/lowmem-train/metrics.json in the current folder."""
    exe = shutil.which("lowmem") or str(Path(sys.executable).with_name("lowmem"))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # README: you need not set it
    proc = subprocess.run([exe, "train"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = _metrics(tmp_path / "outputs" / "lowmem-train")
    assert (m["optimizer"], m["steps"], m["model"]) == ("adafactor", 200, None)
    assert m["final_loss"] < 0.5 * m["initial_loss"]


def test_own_data_command_sft_with_trainer_fields(tmp_path, tiny_model_path):
    """`lowmem train --model DIR --dataset FILE --lr LR` with --eval-dataset, --chat-template and the `trl sft`
    style fields README lists (--num_train_epochs, --gradient_accumulation_steps, --max_length, --packing)."""
    out = tmp_path / "sft"
    rc = main(["train", "--model", tiny_model_path, "--dataset", str(DATA / "addition_chat.jsonl"), "--lr", "1e-3",
               "--eval-dataset", str(DATA / "addition_chat_eval.jsonl"),
               "--chat-template", str(DATA / "tiny_chat_template.jinja"), "--steps", "1", "--batch-size", "4",
               "--gradient_accumulation_steps", "2", "--max_length", "64", "--packing", "--output-dir", str(out),
               "--save_model", "false"])
    assert rc == 0
    m = _metrics(out)
    assert (m["trainer"], m["model"], m["steps"]) == ("sft", tiny_model_path, 1)
    assert (m["data"]["format"], m["data"]["train_rows"], m["data"]["eval_rows"]) == ("messages", 500, 64)
    assert m["initial_loss"] is not None  # the held-out file was evaluated
    # the fields are typed as the recipe's keys (checked before the model loads)
    from lowmem.cli import split_field_flags

    _, fields = split_field_flags(["train", "--num_train_epochs", "1", "--gradient_accumulation_steps", "4",
                                   "--max_length", "512", "--packing"], build_parser())
    assert fields == {"num_train_epochs": 1, "gradient_accumulation_steps": 4, "max_length": 512, "packing": True}


@pytest.mark.slow  # 2.6 s under load; DPO on a local model dir and data also runs by default: test_own_work_audit.py
def test_own_data_command_dpo(tmp_path, tiny_model_path):
    out = tmp_path / "dpo"
    rc = main(["train", "--model", tiny_model_path, "--dataset", str(DATA / "addition_prefs.jsonl"), "--lr", "1e-3",
               "--trainer", "dpo", "--chat-template", str(DATA / "tiny_chat_template.jinja"), "--steps", "1",
               "--batch-size", "4", "--output-dir", str(out), "--save_model", "false"])
    assert rc == 0 and _metrics(out)["trainer"] == "dpo"


@pytest.mark.slow
def test_own_data_command_grpo_rewards(tmp_path, tiny_model_path):
    """--reward-funcs from a file and built in, with --reward-weights (3 s: GRPO's generation)."""
    out = tmp_path / "grpo"
    rc = main(["train", "--model", tiny_model_path, "--dataset", str(DATA / "addition_prompts.jsonl"), "--lr", "1e-3",
               "--trainer", "grpo", "--reward-funcs", f"{DATA / 'addition_reward.py'}:digits_and_prefix", "exact_match",
               "--reward-weights", "1.0", "0.5", "--steps", "1", "--batch-size", "4", "--num_generations", "4",
               "--max_completion_length", "4", "--output-dir", str(out), "--save_model", "false"])
    assert rc == 0
    assert set(_metrics(out)["reward_func_histories"]) == {"digits_and_prefix", "exact_match"}


@pytest.mark.slow  # 3.3 s under load (two runs); the exact resume runs by default in tests/test_train_run.py
def test_resume_command(tmp_path):
    """`lowmem train RECIPE.yaml --resume` after `--save-steps N` continues from the latest checkpoint;
    `--eval-steps N` evaluates on the way."""
    recipe = str(ROOT / "configs" / "adamw.yaml")
    out = str(tmp_path / "run")
    assert main(["train", recipe, "--steps", "2", "--save-steps", "1", "--eval-steps", "1", "--output-dir", out]) == 0
    assert main(["train", recipe, "--resume", "--steps", "3", "--output-dir", out]) == 0
    m = _metrics(Path(out))
    assert m["steps"] == 3 and m["resumed_from"] and m["resumed_from"].endswith("checkpoint-2")


def test_list_command_names_every_optimizer(capsys):
    import lowmem

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in lowmem.list_optimizers():
        assert name[:12] in out  # rich may cut a long name in a narrow terminal


def test_bench_commands(tmp_path, capsys):
    """`lowmem bench NAMES` with a `NAME:key=value` row, and `lowmem bench --launches` (meta tensors)."""
    assert main(["bench", "adamw", "microadam:k_init=0.05,m=2", "--steps", "6", "--repeats", "1",
                 "--output-dir", str(tmp_path / "b")]) == 0
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())
    text = json.dumps(rows)
    assert "microadam:k_init=0.05,m=2" in text and "torch_adamw" in text
    assert main(["bench", "--launches", "adamw", "--output-dir", str(tmp_path / "l")]) == 0
    assert (tmp_path / "l" / "bench_launches.json").is_file()


@pytest.mark.slow
def test_budget_command(tmp_path):
    """`lowmem budget MODEL --budget 24GiB --json`, and the estimate flags README names (6-26 s: the search)."""
    assert main(["budget", "llama-2-7b", "--optim", "galore_adamw_8bit", "--dtype", "bf16", "--trainer", "sft",
                 "--device", "cpu", "--json"]) == 0
    assert main(["budget", "llama-2-7b", "--optimizer", "adamw", "--precision", "mixed", "--json"]) == 0
    assert main(["budget", "llama-2-7b", "--budget", "24GiB", "--json"]) == 0
    pytest.importorskip("matplotlib")  # --png needs the plot extra (in .[dev])
    png = tmp_path / "b.png"
    assert main(["budget", "llama-2-7b", "--optim", "adamw", "--png", str(png)]) == 0 and png.stat().st_size > 0


def test_fsdp2_list_names_every_engine_optimizer():
    """README's Guarantees say every engine optimizer steps each rank's FSDP2 shard; docs/optimizers.md, "At a
    glance", lists them (tests/test_fsdp.py::test_every_engine_optimizer_is_supported runs each against one
    process): the list names every engine optimizer."""
    from lowmem.optim import optimizer_entries

    assert "under FSDP2 every engine optimizer steps each rank's shard" in " ".join(README.read_text().split())
    text = (ROOT / "docs" / "optimizers.md").read_text()
    para = next(p for p in text.split("\n\n") if p.startswith("**FSDP2 (`fully_shard`)**:"))
    cell = para.split("step each rank's shard")[0]
    named = set(re.findall(r"`(\w+)`", cell.split("**:", 1)[1]))
    if "their 8-bit variants" in cell:
        named |= {"galore_adamw8bit", "fira_adamw8bit", "frugal8bit"}
    assert named == {e.name for e in optimizer_entries() if e.recipe is not None}


# ---- the optimizer table is what `lowmem list --shape llama-2-7b` computes ------------------------------------------


GLANCE = ROOT / "docs" / "optimizers.md"  # its "At a glance" table: the same rows and state columns, longer text
TABLES = [pytest.param(README, "| name | paper |", id="README"),
          pytest.param(GLANCE, "| name | what (paper), checked against |", id="optimizers.md")]


def _optimizer_table(path: Path = README, header: str = "| name | paper |") -> list[tuple[list[str], str, str]]:
    """(names, state bytes/param cell, Llama-2-7B cell) of each row of README's optimizer table (or of
    docs/optimizers.md's "At a glance")."""
    text = path.read_text()
    table = text[text.index(header):]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((re.findall(r"`(\w+)`", cells[0]), cells[2], cells[3]))
    return rows


def _cell_numbers(cell: str, count: int) -> list[str | None]:
    """``0.375 (rank 128)`` -> ['0.375'] * count; ``4.001 / 0.251`` -> both; ``12.75 / 50.21 GiB``; '' -> None."""
    nums = [n for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", cell.split("(")[0])]
    if not nums:
        return [None] * count
    return nums if len(nums) == count else [nums[0]] * count


@pytest.mark.parametrize("path,header", TABLES)
def test_optimizer_table_lists_every_optimizer(path, header):
    import lowmem

    listed = [n for names, _, _ in _optimizer_table(path, header) for n in names]
    assert sorted(listed) == lowmem.list_optimizers()


@pytest.mark.parametrize("path,header", TABLES)
def test_optimizer_table_bytes_per_param_is_lowmem_list(path, header):
    """README's "state bytes/param, 4096x4096 weight" column (and each "(rank R)" it names) is `lowmem list`'s,
    sized by each optimizer on the meta device, to the digits README prints."""
    from lowmem.cli import LIST_SHAPE
    from lowmem.optim import bytes_per_param, get_entry

    assert LIST_SHAPE == (4096, 4096)
    for names, cell, _ in _optimizer_table(path, header):
        for name, want in zip(names, _cell_numbers(cell, len(names))):
            if want is None:
                assert get_entry(name).recipe is None, name  # only the bitsandbytes rows are not sized
                continue
            decimals = len(want.split(".")[1]) if "." in want else 0
            got = bytes_per_param(name, LIST_SHAPE)
            assert f"{got:.{decimals}f}" == want, (name, got, want)
            rank = re.search(r"rank (\d+)", cell)
            if rank:
                default = {h.name: h.default for h in get_entry(name).recipe.group_hparams}["rank"]
                assert default == int(rank.group(1)), (name, default)


@pytest.mark.slow
@pytest.mark.parametrize("path,header", TABLES)
def test_optimizer_table_llama_state_is_lowmem_list(path, header):
    """The "Llama-2-7B state" column is `lowmem list --shape llama-2-7b` (10-20 s: 33 models on meta tensors)."""
    from lowmem.memory import state_bytes_at_scale

    for names, _, cell in _optimizer_table(path, header):
        for name, want in zip(names, _cell_numbers(cell, len(names))):
            got = state_bytes_at_scale(name, "llama-2-7b")["state_bytes"] / 2**30
            assert f"{got:.2f}" == want, (name, got, want)


def test_optimizer_table_papers_are_the_registered_references():
    """Each "Author et al. YEAR" / "A & B YEAR" in the table's paper column names the first author and year of the
    paper the optimizer registers as its reference (`lowmem list`'s descriptions)."""
    from lowmem.optim import get_entry

    text = README.read_text()
    table = text[text.index("| name | paper |"):]
    checked = 0
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for surname, year in re.findall(r"\b([A-Z][a-z]+) (?:et al\.|& [A-Z][a-z]+) (\d{4})", cells[1]):
            for name in re.findall(r"`(\w+)`", cells[0]):
                ref = get_entry(name).reference or ""
                assert surname in ref and year in ref, (name, surname, year, ref[:120])
                checked += 1
    assert checked >= 20  # 24 citations on 2026-11-30


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_resolve():
    """Every relative link in README names an existing file, and its `#anchor` a heading of that file (or of
    README itself): a renamed section must not leave the front page pointing nowhere."""
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    relative = [link for link in links if not link.startswith(("http://", "https://"))]
    assert len(relative) >= 10
    for link in relative:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else README
        assert target.exists(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.MULTILINE)
            assert anchor in {_slug(h) for h in headings}, link
