"""The ``lowmem`` command.

Each subcommand is one ``add_*(subparsers)`` function that creates its parser and sets
``handler`` (``handler(args) -> exit code``); :data:`SUBCOMMANDS` lists them. Adding ``bench``
or ``budget`` means writing such a function (in its own module if large) and appending it there.
Heavy imports (torch, transformers) happen inside handlers, so ``lowmem --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

from .dist_exit import exit_if_distributed
from .threads import set_train_threads

LIST_SHAPE = (4096, 4096)
# narrower consoles list the optimizers' descriptions below the table (run_list)
LIST_MIN_WIDTH = 110


# ---- lowmem train ---------------------------------------------------------------------------


def add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune from a YAML recipe (default: the tiny model on synthetic addition)",
        description="Fine-tune a model with a low-memory optimizer. Without RECIPE, configs/default.yaml "
        "(the embedded tiny Llama on synthetic addition). Flags override recipe keys; the TrainingArguments / "
        "`trl sft` spellings of the flags (--max_steps, --learning_rate, --per_device_train_batch_size, "
        "--model_name_or_path, --output_dir, ...) work too, and any other recipe key or TrainingArguments / TRL "
        "config field is a flag as in `trl sft` (--num_train_epochs 1, --gradient_accumulation_steps 4, "
        "--max_length 512, --packing): checked as the recipe's top-level key.",
    )
    p.register("action", None, _StoreOnce)  # a flag's spellings given with two values: an error (_StoreOnce)
    p.register("action", "store", _StoreOnce)
    p.add_argument("recipe", nargs="?", help="YAML recipe (keys: see docs/training.md)")
    p.add_argument("--config", dest="config", metavar="RECIPE",
                   help="the YAML recipe, as `trl sft --config x.yaml` spells it (the same as the positional RECIPE)")
    p.add_argument("--trainer", help="training method: sft, dpo, grpo, gvpo or bnpo (the recipe's trainer; default sft)")
    p.add_argument("--optim", help="optimizer: a name of `lowmem list`, or a Hugging Face Trainer `optim` name lowmem "
                   "implements (adamw_torch, galore_adamw_8bit, adamw_torch_4bit, ...; docs/training.md). Default: the "
                   "recipe's, else adafactor (lowmem's default, which a note names; `trl sft` and the HF Trainer "
                   "default to adamw_torch)")
    p.add_argument("--optim-args", "--optim_args", dest="optim_args", help="optimizer hyperparameters: 'k=v,k=v' or a JSON object")
    p.add_argument("--steps", "--max-steps", "--max_steps", dest="steps", type=int, help="optimizer steps")
    p.add_argument("--lr", "--learning-rate", "--learning_rate", dest="lr", type=float, help="learning rate")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", help="where metrics.json and the model go")
    p.add_argument("--model", "--model-name-or-path", "--model_name_or_path", dest="model", help="local directory of an HF causal LM (never downloaded)")
    p.add_argument("--seed", type=int, help="seed of data, init and trainer")
    p.add_argument("--batch-size", "--per-device-train-batch-size", "--per_device_train_batch_size", dest="batch_size",
                   type=int, help="per-device train batch size (also --batch_size, the recipe key's spelling)")
    p.add_argument("--save-steps", "--save_steps", dest="save_steps", type=int, help="write a resumable checkpoint every N steps")
    p.add_argument("--eval-steps", "--eval_steps", dest="eval_steps", type=int, help="evaluate every N steps (eval loss in the log and metrics.json)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue from a checkpoint: the latest complete one in OUTPUT_DIR, or PATH "
                        "(put --resume after RECIPE, or write --resume=PATH; also --resume_from_checkpoint, the "
                        "TrainingArguments spelling)")
    p.add_argument("--dataset", action="append", metavar="PATH",
                   help="local training data: a .json/.jsonl/.csv/.parquet/.txt file, a folder of them, or a "
                   "save_to_disk folder, in a TRL format (see docs/training.md); repeat to concatenate several; "
                   "replaces the synthetic task")
    p.add_argument("--eval-dataset", "--eval_dataset", dest="eval_dataset", action="append", metavar="PATH",
                   help="local held-out data in the training data's format (the recipe's eval_dataset): a file, a folder "
                   "(its validation/test files) or a save_to_disk folder; repeat to concatenate several; replaces the "
                   "recipe's eval_dataset or eval_split")
    p.add_argument("--chat-template", "--chat_template", dest="chat_template", metavar="TEXT_OR_FILE",
                   help="Jinja chat template (the recipe's chat_template): the text, or the path of a .jinja/.j2 file; "
                   "set on the tokenizer and saved with the model")
    p.add_argument("--reward-funcs", "--reward_funcs", dest="reward_funcs", action="extend", nargs="+", metavar="REF",
                   help="GRPO/GVPO/BNPO reward functions (the recipe's reward_funcs): a built-in name (exact_match, "
                   "format, addition), package.module:function, path/to/file.py:function or a reward-model folder; "
                   "several after one flag or the flag repeated (put them after RECIPE)")
    p.add_argument("--reward-weights", "--reward_weights", dest="reward_weights", action="extend", nargs="+",
                   metavar="W", help="one weight per --reward-funcs entry (the recipe's reward_weights; default 1 each)")
    p.set_defaults(handler=run_train)


class FlagConflict(ValueError):
    """Two spellings of one ``lowmem train`` flag (``--lr`` and ``--learning_rate``), or one spelling given twice,
    with different values: a user's error (exit 2), as a recipe naming ``lr`` and ``learning_rate`` is."""


class _StoreOnce(argparse._StoreAction):
    """argparse's ``store`` that refuses a second value for its ``dest`` that differs from the first
    (:class:`FlagConflict`, naming the flag's spellings); the same value again is accepted. Before, the last one won
    without a word (``--steps 5 --max_steps 6`` ran 6 steps)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, self.default)
        if option_string is not None and current is not self.default and current != values:
            raise FlagConflict(f"{option_string} {values!r} after {current!r}: {' / '.join(self.option_strings)} set "
                               f"the same value ({self.dest}); give one")
        super().__call__(parser, namespace, values, option_string)


# spellings of lowmem train's flags that split_field_flags rewrites (as options of the parser, argparse would call
# their abbreviations ambiguous: `--batch` matching --batch-size and --batch_size)
FLAG_SPELLINGS = {"--batch_size": "--batch-size", "--resume_from_checkpoint": "--resume",
                  "--resume-from-checkpoint": "--resume"}


def run_train(args: argparse.Namespace) -> int:
    from .train import run

    recipe = recipe_from_args(args)
    note = default_optim_note(recipe)
    if note is not None and int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"note: {note}", flush=True)
    set_train_threads(recipe.model)  # lowmem/threads.py: OMP_NUM_THREADS, else 1 for the tiny model, else cores/procs
    run(recipe)
    return 0


def default_optim_note(args: Any, optim: str | None = None) -> str | None:
    """The line ``lowmem train`` prints before the model loads when no argument names the optimizer: which one
    runs and that it is lowmem's default, not the AdamW (``adamw_torch``) that ``trl sft`` and the Hugging Face
    Trainer run for the same config. ``None`` when one is named (the startup line names it and where from).
    ``args``: a :class:`~lowmem.train.TrainRecipe` (its ``optim_source``, set by :func:`lowmem.train.load_recipe`:
    the one source of truth, which ``run()``'s startup line and ``metrics.json`` read too), or parsed
    ``lowmem train`` arguments (their recipe is loaded: nothing else). ``optim``: the name to print (default: the
    recipe's). A config pasted from TRL sets no ``optim``; before, nothing said that its run used Adafactor."""
    recipe = args if hasattr(args, "optim_source") else recipe_from_args(args)
    if recipe.optim_source != "default":
        return None
    return (f"optim={optim or recipe.optim} is lowmem's default (neither the recipe nor a flag names an optimizer); "
            "`trl sft` and the Hugging Face Trainer default to AdamW: set optim: adamw_torch (--optim adamw_torch) to "
            "train as they would, or any name of `lowmem list`")


def recipe_from_args(args: argparse.Namespace):
    """The :class:`~lowmem.train.TrainRecipe` of parsed ``lowmem train`` arguments: the recipe file (or
    configs/default.yaml) with the flags as overrides (:func:`lowmem.train.load_recipe`; relative paths in
    flags are from the current directory, those in the file from its folder). Nothing is loaded."""
    from .train import load_recipe

    recipe_path, resume = args.recipe, args.resume
    config = getattr(args, "config", None)
    if config is not None:  # `trl sft --config x.yaml`'s spelling
        if recipe_path is not None and recipe_path != config:
            from .config import ConfigError

            raise ConfigError(f"two recipes: {recipe_path!r} and --config {config!r}; give one")
        recipe_path = config
    if recipe_path is None and isinstance(resume, str) and resume.endswith((".yaml", ".yml")):
        recipe_path, resume = resume, True  # `lowmem train --resume recipe.yaml`: the flag took the recipe
    rewards, weights = args.reward_funcs, args.reward_weights
    for name in ("reward_funcs", "reward_weights"):  # `--reward-funcs f.py:r recipe.yaml`: nargs took the recipe
        values = rewards if name == "reward_funcs" else weights
        if recipe_path is None and values and str(values[-1]).strip().endswith((".yaml", ".yml")):
            recipe_path, values = values[-1], values[:-1]
            rewards, weights = (values, weights) if name == "reward_funcs" else (rewards, values)
    flags = dict(
        trainer=args.trainer, save_steps=args.save_steps, eval_steps=args.eval_steps, resume_from_checkpoint=resume,
        optim=args.optim, optim_args=args.optim_args, steps=args.steps, lr=args.lr,
        output_dir=args.output_dir, model=args.model, seed=args.seed, batch_size=args.batch_size,
        dataset=_one_or_list(args.dataset), eval_dataset=_one_or_list(args.eval_dataset),
        chat_template=args.chat_template, reward_funcs=rewards or None, reward_weights=weights or None,
    )
    fields = dict(getattr(args, "fields", {}))
    for key in sorted(set(fields) & set(flags)):  # a field flag spelling a dedicated flag's key: one value
        if flags[key] is not None:
            from .config import ConfigError

            raise ConfigError(f"--{key} is given twice (as --{key} and as its flag's other spelling); give it once")
        flags[key] = fields.pop(key)
    return load_recipe(recipe_path, **flags, **fields)


def _scalar(value: str, yaml: Any) -> Any:
    """A flag's value as YAML reads it (``1`` -> 1, ``true`` -> True, ``{a: 1}`` -> a mapping); text that is
    no YAML value (``{a``), or blank, stays the string given."""
    try:
        return yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        return value


def _field_types_of(key: str) -> list[Any]:
    """The types recipe key ``key`` can have: its :class:`~lowmem.train.TrainRecipe` field's (``learning_rate`` is
    ``lr``'s), else its field's in the config class of any trainer (:func:`lowmem.train.config_class`); ``[]`` for
    a key of neither (``load_recipe`` refuses it)."""
    from .config import field_types
    from .train import AVAILABLE_TRAINERS, RECIPE_ALIASES, TrainRecipe, config_class

    recipe = field_types(TrainRecipe)
    name = RECIPE_ALIASES.get(key, key)
    if name in recipe:
        return [recipe[name]]
    classes = [config_class("sft")] + [config_class(t, True) for t in AVAILABLE_TRAINERS]
    return [field_types(c)[key] for c in dict.fromkeys(classes) if key in field_types(c)]


def _as_field(key: str, text: str, value: Any) -> Any:
    """A field flag's value ``value`` (``text`` as YAML reads it) as its field takes it, the way HfArgumentParser
    (``trl sft``) reads the flag by the field's type: YAML 1.1 reads ``no`` / ``off`` / ``yes`` as booleans, ``2024-01-01``
    as a date and ``123`` as a number, and a field of strings (``--save_strategy no``, ``--run_name 2024-01-01``)
    keeps the text as typed when none of its types takes that reading; a boolean field still reads ``--packing yes``
    as true. A date is never a field's value: its text is kept. Other values are returned as read (an invalid one
    is then refused by :func:`lowmem.train.load_recipe`, naming the field)."""
    import datetime

    if isinstance(value, (datetime.date, datetime.datetime)):
        return text
    if not isinstance(value, (bool, int, float)):
        return value
    from .config import ConfigError, check_value

    def takes(v: Any, tp: Any) -> bool:
        try:
            check_value(key, v, tp, ranges={})
        except ConfigError:
            return False
        return True

    types_ = _field_types_of(key)
    if any(takes(value, tp) for tp in types_):
        return value
    return text if any(takes(text, tp) for tp in types_) else value


def split_field_flags(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, Any]]:
    """``lowmem train``'s flags that are no option of its parser, as recipe keys: ``--num_train_epochs 1``
    (or ``--num-train-epochs=1``) -> ``{"num_train_epochs": 1}``, the way ``trl sft`` takes every config field
    as a flag. A flag followed by nothing (or by another flag, or the ``*.yaml`` recipe) is ``true``
    (``--packing``); several values make a list (``--optim_target_modules q_proj v_proj``); each value is read
    as a YAML scalar (``1`` -> 1, ``true`` -> True), kept as typed where the field takes text and not that
    reading (``--save_strategy no``: :func:`_as_field`). :func:`lowmem.train.load_recipe` then maps and checks
    them as top-level recipe keys: an unknown one is an error with its close matches and lowmem's spelling of
    ``trl sft``'s model arguments (``--lora_r 8`` -> ``lora: {r: ...}``). Before, such a flag was argparse's
    "unrecognized arguments", and the value after it was taken for the recipe.

    Returns:
        The remaining arguments for the parser, and the keys with their values.
    """
    import yaml

    train = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    known = {s.split("=")[0] for a in train._actions for s in a.option_strings}
    rest: list[str] = argv[:1]
    fields: dict[str, Any] = {}
    i = 1
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in FLAG_SPELLINGS:  # `--batch_size 4`: the parser's --batch-size (before, a field flag: a TypeError)
            arg = FLAG_SPELLINGS[name] + arg[len(name):]
            name = FLAG_SPELLINGS[name]
        if not arg.startswith("--") or arg == "--" or any(k.startswith(name) for k in known):  # (argparse's prefixes)
            rest.append(arg)
            i += 1
            continue
        key = name[2:].replace("-", "_")
        values: list[str] = [arg.split("=", 1)[1]] if "=" in arg else []
        i += 1
        while "=" not in arg and i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2) \
                and not argv[i].endswith((".yaml", ".yml")):
            values.append(argv[i])
            i += 1
        if key in fields:
            raise ValueError(f"--{key} is given twice; give it once")
        parsed = [_scalar(v, yaml) for v in values]
        fields[key] = True if not parsed else _as_field(key, values[0], parsed[0]) if len(parsed) == 1 else parsed
        if fields[key] is None:  # `--max_length null`: the key set to null, not "not given" (load_recipe's None)
            from .train import NULL

            fields[key] = NULL
    return rest, fields


def _one_or_list(paths: list[str] | None) -> str | list[str] | None:
    """A repeatable path flag as the recipe writes it: one path as a string, several as a list."""
    return paths[0] if paths and len(paths) == 1 else paths


# ---- lowmem list ----------------------------------------------------------------------------


def add_list(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("list", help="registered optimizers with their state memory per parameter")
    p.add_argument("--shape", metavar="MODEL",
                   help="also size each optimizer's whole state on this model (a named shape such as llama-2-7b, "
                        "see `lowmem budget --help`, or a local directory), built on the meta device: nothing is allocated")
    p.set_defaults(handler=run_list)


def run_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .optim import bytes_per_param, optimizer_entries

    shape = "x".join(map(str, LIST_SHAPE))
    console = Console()
    # an 80-column terminal (or a pipe, which rich sizes at 80) left the description 4 characters wide, one word
    # per line: there the descriptions follow the table, one line each
    narrow = console.width < LIST_MIN_WIDTH
    table = Table(
        title="lowmem optimizers",
        caption=f"optimizer-state bytes per parameter of one {shape} weight at each optimizer's default "
        "hyperparameters (subspace recipes at their default rank), sized by the optimizer itself on the "
        "meta device; AdamW float32 = 8",
    )
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("state B/param" if narrow else f"state B/param ({shape})", justify="right", no_wrap=True)
    table.add_column("vs AdamW", justify="right", no_wrap=True)
    table.add_column("at", no_wrap=True)
    if not narrow:
        table.add_column("description")
    at_scale, unsized = {}, {}
    if args.shape:
        from .memory import state_bytes_at_scale
        from .optim.recipes.subspace import RankError

        for e in optimizer_entries():
            try:
                at_scale[e.name] = state_bytes_at_scale(e.name, args.shape)
            except RankError as err:  # the default rank applies to none of the model's weights: not sized
                unsized.setdefault((err.rank, err.side), []).append(e.name)
        table.add_column(f"on {args.shape}" if narrow else f"state on {args.shape}", justify="right", no_wrap=True)
    adamw = bytes_per_param("adamw", LIST_SHAPE)
    for e in optimizer_entries():
        scale = []
        if args.shape and e.name not in at_scale:
            scale = ["n/a (rank)"]
        elif at_scale:
            r = at_scale[e.name]
            closed = (" *" if narrow else " (closed form)") if r["how"] != "exact" else ""
            scale = [f"{r['state_bytes'] / 2**30:.2f} GiB{closed}"]
        about = [] if narrow else [e.summary]
        if e.recipe is None:  # not an engine optimizer: its state cannot be sized on the meta device
            table.add_row(e.name, "n/a", "", "", *about, *scale)
            continue
        size = bytes_per_param(e.name, LIST_SHAPE)
        rank = {h.name: h.default for h in e.recipe.group_hparams}.get("rank")
        table.add_row(e.name, f"{size:.3g}", f"{100 * size / adamw:.3g}%", f"rank {rank}" if rank else "", *about,
                      *scale)
    console.print(table)
    if narrow and any(r["how"] != "exact" for r in at_scale.values()):
        console.print("* closed form (not sized by the optimizer itself on the meta device)")
    if narrow:
        from rich.markup import escape

        console.print(f"descriptions (in the table on a terminal of {LIST_MIN_WIDTH}+ columns):")
        for e in optimizer_entries():
            console.print(f"  [bold]{e.name}[/]: {escape(e.summary)}")
    for (rank, side), names in unsized.items():
        print(f"n/a (rank): the default rank {rank} of {', '.join(names)} applies to none of {args.shape}'s weights"
              f" (valid: rank 1 .. {side - 1}); size one at a valid rank with `lowmem budget {args.shape} --optimizer"
              f" {names[0]} --optim-args rank=R`")
    return 0


# ---- lowmem bench ---------------------------------------------------------------------------


def add_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="measure optimizers side by side (state bytes, step time vs torch AdamW, loss)",
        description="Train the same model from the same weights on the same batches with each optimizer, "
        "and report state bytes per parameter, steady-state step time relative to torch.optim.AdamW "
        "(interleaved with it step by step; median and spread over --repeats rounds) and loss. Three tasks: "
        "the embedded tiny model (default; writes bench.json and bench.md), --task text (a byte-level Llama on the "
        "Python standard library's source, recommended settings per optimizer, peers, lr sweep, seeds; writes "
        "bench_text.json/.md) and --shapes SET (optimizer.step() alone on real-size weight shapes; writes "
        "bench_shapes.json/.md). docs/benchmarks.md has the recorded runs.",
    )
    p.add_argument("optimizers", nargs="*", metavar="NAME[:k=v,...]",
                   help="registered optimizer names (default: every engine optimizer); NAME:key=value,... "
                   "benches that setting as a row of its own, e.g. microadam:k_init=0.05,m=2; peer:NAME (--task text, "
                   "--shapes) adds one peer package's row, e.g. peer:galore_torch")
    p.add_argument("--task", choices=["tiny", "text"], default="tiny",
                   help="str: 'tiny' = the embedded tiny Llama on synthetic addition, one lr for all; 'text' = a "
                   "byte-level Llama (transformers LlamaConfig, 256 bytes + 3 specials) trained on the Python standard "
                   "library's *.py files, split by file into train / held-out by a hash of the path, warm-up + cosine "
                   "decay, each optimizer at its recommended lr (table with sources in lowmem/bench_peers.py). Default: tiny")
    p.add_argument("--shapes", choices=["llama-7b-layer", "hidden-1024", "hidden-2048", "llama-8x128", "llama-8x256",
                                        "small-tensors", "small-batched", "small-linear", "qwen3-moe-layer",
                                        "qwen3-moe-layer-small", "llama-368m"], default=None,
                   help="str: time optimizer.step() alone (random gradients, no forward/backward) on a set of weights: "
                   "'llama-7b-layer' (one Llama decoder layer: 4096x4096 q/k/v/o, 11008x4096 gate/up, 4096x11008 down, 2 "
                   "norms), the linear layers of a hidden-1024 / hidden-2048 layer, 'llama-8x128' / 'llama-8x256' (8 Llama "
                   "layers of hidden 128 / 256 with their norms), or many small tensors for the multi-tensor paths: "
                   "'small-tensors' (64 vectors of 1024 + 32 weights of 64x64), 'small-batched' (32 vectors of 256 + 16 "
                   "weights of 4x64x64), 'small-linear' (64 vectors of 128 + 32 nn.Linear weights of 128x128, projected by "
                   "the subspace recipes: use --rank 16), 'qwen3-moe-layer-small' (one Qwen3-30B-A3B decoder layer with 16 of its "
                   "128 experts: fused experts [16, 1536, 2048] + [16, 2048, 768], router, attention 4096 / 512 / 512 / "
                   "4096x2048, q/k norms, 2 norms); ratio to torch.optim.AdamW(foreach=True), medians of --repeats interleaved rounds "
                   "(of 20 steps on the small sets), first step (SVD / projection refresh) reported apart; with --launches "
                   "also 'llama-368m' (the model of the H200 run, its default) and 'qwen3-moe-layer' (all 128 experts, 623M "
                   "parameters: meta tensors only, refused for timing). Default: none (train a task)")
    p.add_argument("--launches", action="store_true",
                   help="bool: count what optimizer.step() dispatches on the CUDA code path, on meta tensors of the "
                   "--shapes set (default llama-368m; no GPU needed, nothing computed): kernels, device syncs, "
                   "host-to-device copies and host reads per steady step and per projection-refresh step (and the first "
                   "step's kernels: state allocation), with the "
                   "default chunk and with chunk_numel=None side by side, with the host time of a steady step on "
                   "meta and its part after the non-finite check's device read (host ms column; "
                   "torch.optim.AdamW(fused=True) on the same meta tensors in the footnote), on --dtype weights (writes "
                   "bench_launches.json/.md; lowmem/bench_launches.py). Default: off")
    p.add_argument("--peers", action="store_true",
                   help="bool: add the installed peer packages as rows peer:NAME (galore-torch, fira, apollo-torch, "
                   "adam-mini, bitsandbytes' 8-bit AdamW / Lion / Lion8bit, transformers' Adafactor, torchao 4- and "
                   "8-bit, torch.optim.Muon, pytorch_optimizer's SPAM / StableSPAM / GaLore / Fira / APOLLO / AdaFactor "
                   "/ CAME / NorMuon / Lion / SM3, the CAME authors' came-pytorch); one not installed or unable to run "
                   "here is listed as skipped with the reason (--task text and --shapes). With named optimizers "
                   "(--task text or --shapes), only the peers of those recipes (the others are listed as left out); none named: "
                   "all. Default: off")
    p.add_argument("--lr-sweep", action="store_true",
                   help="bool: --task text: also train every row at 1/3 and 3 x its recommended lr and report the best "
                   "lr and its held-out loss next to the recommended one. Default: off")
    p.add_argument("--seeds", type=int, default=1,
                   help="int: --task text: runs with seeds 0..N-1 (initial weights and batches); rows show the mean and "
                   "min-max held-out loss. Default: 1")
    p.add_argument("--text-size", choices=["small", "medium", "smoke"], default="small",
                   help="str: --task text: model and data size; 'small' = hidden 128, 3 layers (0.62M parameters), 200 "
                   "steps of 4 x 64 bytes (docs/benchmarks.md), 'medium' = hidden 256, 4 layers (3.03M), 300 steps of "
                   "8 x 128 bytes, 'smoke' = a one-layer model on 200 kB for a seconds-long check. Default: small")
    p.add_argument("--steps", type=int, default=None,
                   help="int: training steps per optimizer (default: 100 on the tiny task, the --text-size's on text)")
    p.add_argument("--model", default=None, help="str: tiny task only: local causal-LM directory (default: the embedded tiny Llama)")
    p.add_argument("--lr", type=float, default=None,
                   help="float: one learning rate for every optimizer (default: 3e-3 on the tiny task; on text each "
                   "optimizer's recommended lr)")
    p.add_argument("--rank", type=int, default=None,
                   help="int: rank of subspace recipes and peers (default: hidden size / 4; --shapes: 128)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="int: sequences per step (default: 16 on the tiny task, the --text-size's on text)")
    p.add_argument("--seed", type=int, default=None,
                   help="int: tiny task only (--task text: --seeds): seed of the model and data (default 0)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="str: where to train and time (default: cuda when available, else cpu)")
    p.add_argument("--optim-args", action="append", default=[], metavar="NAME:k=v,...",
                   help="str, repeatable: tiny task only (other modes: NAME:k=v rows): per-optimizer overrides of a "
                   "benched NAME, e.g. galore_adamw:rank=8,update_proj_gap=50 (default: none)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="str: tiny task, --task text and --shapes: the dtype of every contender's copy of the weights ('bfloat16': pure "
                   "bfloat16 weights, no float32 master copy; compare e.g. adamw adamw:bf16_stochastic_round=true "
                   "adamw:kahan_summation=true); a row with bf16_stochastic_round or kahan_summation at float32 is "
                   "refused naming it; with --task text or --shapes a peer row is probed on bfloat16 weights first (one named "
                   "that fails is refused naming it; --peers lists it as skipped with the reason); --launches: the meta "
                   "model's weights and gradients in that dtype (the optimizer's state as it makes it for them). "
                   "Default: float32")
    p.add_argument("--output-dir", default="runs/bench", help="str: where the json and md results go (default runs/bench)")
    p.add_argument("--repeats", type=int, default=5,
                   help="int: rounds the timed steps (after the warm-up steps) are split into; each gives a step-time "
                   "ratio, the table shows their median and spread (--task text: per seed; --shapes: interleaved rounds "
                   "of one step each). Default: 5")
    p.add_argument("--threads", type=int, default=None,
                   help="int: torch CPU threads during the run (default: OMP_NUM_THREADS if set, else 1)")
    p.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


from .cli_budget import add_parser as add_budget  # noqa: E402  (lowmem budget)

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_train, add_list, add_bench, add_budget]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lowmem", description="Memory-efficient LLM fine-tuning.")
    parser.add_argument("--version", action="version", version=f"lowmem {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a user's error, printed as one line with exit code 2: a wrong value or key
    (``ValueError``, which :class:`lowmem.config.ConfigError` is), a file that is missing or cannot
    be read (``OSError``), malformed YAML or a tag ``yaml.safe_load`` refuses, a pickle that
    ``torch.load(weights_only=True)`` refuses. Anything else is a bug and keeps its traceback."""
    import pickle

    kinds: tuple[type[BaseException], ...] = (ValueError, OSError, pickle.UnpicklingError)
    yaml = sys.modules.get("yaml")
    if yaml is not None:
        kinds += (yaml.YAMLError,)
    return isinstance(err, kinds)


def error_line(err: BaseException) -> str:
    """``err`` as one line: its lines joined, or only the first when that would be long (torch's
    refusal to unpickle is a paragraph; its first line says what and where)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()] or [type(err).__name__]
    text = " ".join(lines)
    if len(text) > 400:
        text = lines[0] + " (LOWMEM_DEBUG=1 shows the details)"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lowmem``; returns the exit code (2 for a user's error, see :func:`is_user_error`).

    A user's error prints one line, ``lowmem: error: ...`` (once under several processes, by process 0 or, when
    only another one failed, by that one: :func:`report_error`); ``LOWMEM_DEBUG=1`` shows the traceback instead.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    fields: dict[str, Any] = {}
    if argv[:1] == ["train"]:
        try:
            argv, fields = split_field_flags(argv, parser)
        except ValueError as err:
            report_error(err)
            return 2
    try:
        args = parser.parse_args(argv)
    except FlagConflict as err:
        report_error(err)
        return 2
    if fields:
        args.fields = fields
    if not os.environ.get("LOWMEM_DEBUG"):
        # bitsandbytes warns on CPU that an optional hub-downloaded kernel is missing; lowmem never
        # downloads, and its CPU fallback is what we test
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        # a process of a torch.distributed group (torchrun / accelerate launch) ends without interpreter
        # finalization, which can abort a gloo process after the run (lowmem/dist_exit.py)
        return exit_if_distributed(args.handler(args))
    except Exception as err:
        if os.environ.get("LOWMEM_DEBUG") or not is_user_error(err):
            raise
        report_error(err)
        return exit_if_distributed(2)


# seconds a process other than RANK 0 of a launch waits before printing its error line itself (report_error)
OTHER_RANK_ERROR_WAIT_S = 10.0


def report_error(err: BaseException) -> None:
    """Print a user's error as one line, ``lowmem: error: ...``, on stderr. Under ``torchrun`` /
    ``accelerate launch`` (``WORLD_SIZE`` > 1) every process meets the same error in the same recipe: process 0
    (``RANK``) prints it at once; another waits :data:`OTHER_RANK_ERROR_WAIT_S` first, then prints it with its rank
    (``lowmem: error: [rank 1] ...``). When process 0 failed too, it has printed and exited by then and the launcher
    has ended the others, so the line appears once. Before, the others exited quietly at once: when one of them exited
    first, the launcher ended process 0 before it printed, and no process said why (measured 3 of 6 launches)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank == 0:
        print(f"lowmem: error: {error_line(err)}", file=sys.stderr, flush=True)
    elif int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        import time

        time.sleep(OTHER_RANK_ERROR_WAIT_S)
        print(f"lowmem: error: [rank {rank}] {error_line(err)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
