"""``lowmem train``: fine-tune a model from a YAML recipe with a low-memory optimizer.

A recipe is a flat YAML mapping whose keys are the fields of :class:`TrainRecipe`; anything not
given keeps its default, unknown keys are an error listing the valid ones. ``trainer`` selects the
training method (``sft``, ``dpo``, ``grpo``, ``gvpo``, ``bnpo``: the entries of :data:`TRAINERS`);
``quantization``, ``lora``, ``gradient_checkpointing``, ``layerwise`` and ``track_memory`` set the
memory side of the run::

    from lowmem.train import load_recipe, run
    metrics = run(load_recipe("configs/adafactor.yaml", steps=50))

A recipe may also use the trainer's config fields (``TrainingArguments``, ``SFTConfig``,
``DPOConfig``, ``GRPOConfig``) at the top level and Hugging Face optimizer names
(:data:`HF_OPTIM_NAMES`). Every value is type- and range-checked before any model loads
(:mod:`lowmem.config`; errors are :class:`~lowmem.config.ConfigError`), and :func:`run` builds the
trainer's config and locates the checkpoint to resume (:func:`resolve_checkpoint`) before loading
the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from .config import RANGES, ConfigError, Range, check_dataclass, check_value, field_types
from .io import install_staged, saved_model_file, staging_dir, umask_permissions, weights_last, write_text_atomic
from .optim import create_optimizer, get_entry

AVAILABLE_TRAINERS = ("sft", "dpo", "grpo", "gvpo", "bnpo")
TASKS = ("addition",)
from .kit.shipped import DEFAULT_RECIPE  # noqa: E402  (configs/ of the checkout, or lowmem/configs of a wheel)


@dataclass
class TrainRecipe:
    """A training run. Every field is a YAML key and most have a ``lowmem train`` flag.

    Parameters:
        > What to train

        trainer (`str`, defaults to `"sft"`):
            Training method. ``"sft"``: plain causal-LM fine-tuning (loss on every token) with
            :class:`~lowmem.trainers.LowMemTrainer`. ``"dpo"`` (preference pairs), ``"grpo"``,
            ``"gvpo"``, ``"bnpo"`` (verifiable reward :func:`lowmem.kit.reward_fn`): the TRL trainers of
            :mod:`lowmem.trainers` (docs/post_training.md); ``train_size`` is then the number of
            pairs / prompts, ``batch_size`` the per-device number of pairs / completions, and
            ``training_args`` takes their config fields (``num_generations``, ``max_completion_length``,
            ``beta``, ``reward_range``, ...).
        model (`str` or `None`, defaults to `None`):
            Local directory of an HF causal LM and its tokenizer (``--model``). `None`: the embedded
            tiny Llama (~83k parameters, character tokenizer). Nothing is downloaded.
        dtype (`str`, defaults to `"float32"`):
            Parameter dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        task (`str` or `None`, defaults to `None`):
            Synthetic dataset from :mod:`lowmem.kit.tasks`; ``"addition"`` is ``"12+7=19"`` text.
            `None` means ``"addition"`` when no ``dataset`` is given. Exclusive with ``dataset``.
        train_size (`int`, defaults to `2000`):
            Training examples of ``task`` (drawn by ``seed`` from the training pool).
        eval_size (`int`, defaults to `128`):
            Held-out examples of ``task`` (a fixed pool disjoint from training) for ``initial_loss``
            and ``final_loss``.

        > Your own data (docs/training.md, "Training on your own data"). Relative paths written in a
        > recipe file (here and in ``model``) are from the recipe file's folder (:func:`resolve_recipe_paths`).

        dataset (`str`, `list[str]` or `None`, defaults to `None`):
            Local training data (``--dataset``), loaded with ``datasets`` and never downloaded: a
            ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` / ``.txt`` file, a folder of such files,
            or a folder written by ``save_to_disk`` (its ``train`` split for a ``DatasetDict``); a
            list of such paths is concatenated in order (one format, the same columns).
            Columns in TRL's formats: SFT ``text``, ``messages``, or ``prompt`` + ``completion``;
            DPO ``prompt`` + ``chosen`` + ``rejected`` (or ``chosen`` + ``rejected`` with an implicit
            prompt); GRPO/GVPO/BNPO ``prompt`` plus any columns, passed to the reward functions as
            keyword arguments. Standard (strings) or conversational (lists of ``{role, content}``
            messages, rendered with the chat template). SFT then runs TRL's ``SFTTrainer``
            (:class:`~lowmem.trainers.LowMemSFTTrainer`), so ``max_length``, ``packing``,
            ``completion_only_loss``, ``assistant_only_loss``, ``dataset_text_field`` are its
            ``SFTConfig`` fields (top-level recipe keys or ``training_args``). See :mod:`lowmem.data`.
        eval_dataset (`str`, `list[str]` or `None`, defaults to `None`):
            Local held-out data (one path or a list; ``--eval-dataset``) in the same format; for a saved ``DatasetDict``
            or a folder of split-named files, its ``validation`` or ``test`` split. SFT reports its
            loss before and after training (``initial_loss``, ``final_loss``); DPO its margin and
            accuracy. Requires ``dataset``.
        eval_split (`float` or `None`, defaults to `None`):
            Fraction of ``dataset`` in ``(0, 1)`` held out for evaluation instead, shuffled by ``seed``.
            Exclusive with ``eval_dataset``.
        chat_template (`str` or `None`, defaults to `None`):
            Jinja chat template (the text, or the path of a ``.jinja`` file; ``--chat-template``) set on the tokenizer and
            saved with the model. Conversational data needs one, here or in the tokenizer.
        reward_funcs (`list` or `None`, defaults to `None`):
            GRPO/GVPO/BNPO rewards (``--reward-funcs``): built-in names (``exact_match``, ``format``, ``addition``),
            ``"package.module:function"``, ``"path/to/file.py:function"`` (your code, imported only
            because the recipe names it), or ``{name: ..., <keyword>: value}`` to bind keyword
            arguments. See :mod:`lowmem.rewards`. `None`: ``addition`` on the synthetic task;
            required with ``dataset``.
        reward_weights (`list[float]` or `None`, defaults to `None`):
            One weight per reward function (TRL's ``reward_weights``; ``--reward-weights``); `None` weighs each 1.0.

        > Optimizer

        optim (`str`, defaults to `"adafactor"`):
            Registered lowmem optimizer (``lowmem list``; ``--optim``). The recipe's ``optim_source``
            attribute (not a key) records where it was named (:data:`OPTIM_SOURCES`: ``"recipe"``, ``"override"``,
            ``"default"``, ...; set by :func:`load_recipe`, else ``"default"`` when ``optim`` is left at
            ``"adafactor"``); the startup line and ``metrics.json`` say it (TRL's default is AdamW, lowmem's Adafactor).
        optim_args (`dict`, `str` or `None`, defaults to `{}`):
            Extra hyperparameters of ``optim``: mapping, JSON object or ``"k=v,k=v"``
            (``--optim-args``); `None` is none (the ``TrainingArguments`` default, as a saved
            ``training_args.json`` writes it). Their ``lr`` (``weight_decay``) beside a different ``lr`` (a
            ``weight_decay`` other than 0.0) is an error naming both: give one.
        lr (`float` or `None`, defaults to `None`):
            Learning rate (``--lr``); the Trainer's scheduler drives it. Required with a ``model`` of
            your own (a :class:`ConfigError` otherwise, unless ``optim_args`` sets ``lr``): no value
            suits every model and optimizer, and the demo's ``1e-2`` would wreck a pretrained model.
            `None` with the embedded tiny model (``model: null``) is the demo's ``1e-2``.
        weight_decay (`float`, defaults to `0.0`):
            Decoupled weight decay; never applied to biases and norm weights.
        lr_scheduler (`str`, defaults to `"constant"`):
            ``TrainingArguments.lr_scheduler_type`` (``"linear"``, ``"cosine"``, ...).
        warmup_steps (`float`, defaults to `0`):
            Linear warm-up steps; a value below 1 is a fraction of ``steps`` (transformers 5's
            ``TrainingArguments.warmup_steps``, which replaced ``warmup_ratio``). A value of 1 or more
            must be a whole number.

        > Run

        steps (`int` or `None`, defaults to `200`):
            Optimizer steps (``--steps``; ``max_steps`` in a config written for the Hugging Face
            Trainer). `None` (or the Trainer's ``-1``) trains by epochs instead: ``num_train_epochs``
            (a ``TrainingArguments`` field, at the top level or in ``training_args``; the Trainer's
            default 3 when absent). A recipe file or a ``load_recipe`` call that gives
            ``num_train_epochs`` but no ``steps`` trains by epochs; giving both in one place is an
            error (the Trainer would silently let ``max_steps`` win), while a ``--steps`` override
            wins over the file's ``num_train_epochs``.
        batch_size (`int`, defaults to `16`):
            Per-device train batch size (``--batch-size``); evaluation uses 64.
        seed (`int`, defaults to `0`):
            Seed of data sampling, the embedded model's initialisation and the Trainer (``--seed``).
        logging_steps (`int`, defaults to `20`):
            Log the training loss every this many steps.
        output_dir (`str`, defaults to `"outputs/lowmem-train"`):
            Where ``metrics.json``, the final model and checkpoints go (``--output-dir``).
        save_model (`bool`, defaults to `True`):
            Save the trained model and tokenizer to ``output_dir``.
        save_steps (`int` or `None`, defaults to `None`):
            Write a resumable checkpoint (weights, optimizer and scheduler state) every this many
            steps; `None` writes none.
        resume_from_checkpoint (`bool`, `str` or `None`, defaults to `None`):
            Continue a run from a checkpoint (``--resume [PATH]``): a ``checkpoint-N`` directory, or
            `True` for the latest *complete* one in ``output_dir`` (a directory a killed run left
            without its ``trainer_state.json``, weights, ``optimizer.pt`` or ``scheduler.pt`` is
            skipped with a warning). `True` with no complete checkpoint, or a `PATH` that is
            missing or incomplete, is an error (as ``Trainer.train(resume_from_checkpoint=True)``
            does). The resumed run reaches the same weights as an uninterrupted one. Also read from
            ``training_args``.
        merge_adapters (`bool`, defaults to `False`):
            With ``lora`` or ``quantization``: besides the adapter (``output_dir``), write the base
            model with the adapters merged to ``output_dir/merged`` (loadable with
            ``AutoModelForCausalLM.from_pretrained``). The base is reloaded in ``dtype`` (not in 4
            bits) before merging, as PEFT recommends for QLoRA.
        eval_steps (`int` or `None`, defaults to `None`):
            Evaluate on the held-out set every this many steps (``eval_strategy="steps"``): the eval
            loss (DPO: margins; GRPO/GVPO/BNPO: the mean reward of completions sampled for held-out
            prompts, and TRL's loss) appears in the log and in ``metrics.json`` (``eval_history``).
            The held-out set is ``eval_dataset`` / ``eval_split`` with ``dataset`` (one of them is then
            required, except for DPO), else the synthetic task's ``eval_size`` held-out rows. `None`:
            only before and after training (GRPO/GVPO/BNPO on the synthetic task: no evaluation).
        report_to (`str` or `list[str]`, defaults to `"none"`):
            ``TrainingArguments.report_to`` (``"tensorboard"``, ``"wandb"``, ...). An integration
            whose package is not installed is an error naming the package.

        > Memory

        quantization (`str`, `dict` or `None`, defaults to `None`):
            Load the model in 4 bits through bitsandbytes (``BitsAndBytesConfig``): ``"nf4"``,
            ``"fp4"``, or ``{quant_type, double_quant, compute_dtype}`` (double quantization is on
            by default); or in 8 bits (LLM.int8): ``"int8"`` or ``{quant_type: int8, threshold}``
            (``llm_int8_threshold``, default 6.0; ``double_quant`` / ``compute_dtype`` do not apply and
            are an error with it). The model is prepared with ``peft.prepare_model_for_kbit_training`` and
            LoRA adapters are attached (``lora``, default ``r=16, lora_alpha=32,
            target_modules="all-linear"``): only the adapters train (QLoRA). The embedded tiny model
            is saved to a temporary directory first, since bitsandbytes quantizes while loading.
            Works for every ``trainer``; DPO then uses the base model with adapters disabled as its
            reference. See :func:`lowmem.quant.load_quantized_model`.
        lora (`dict` or `None`, defaults to `None`):
            ``peft.LoraConfig`` fields (e.g. ``{r: 8, lora_alpha: 16, target_modules: all-linear}``);
            ``task_type`` is ``CAUSAL_LM``. Without ``quantization`` the adapters go on the full
            precision model. Unknown fields raise an error listing the valid ones.
        gradient_checkpointing (`bool`, defaults to `False`):
            Recompute activations in the backward pass (``TrainingArguments.gradient_checkpointing``).
        layerwise (`bool`, defaults to `False`):
            Step each parameter from its gradient hook and free the gradient at once
            (``lowmem_layerwise``; works with gradient accumulation and checkpoints).
        track_memory (`bool`, defaults to `True`):
            Attach :class:`~lowmem.trainers.memory_callback.MemoryCallback` and write the peak bytes
            of ``weights``, ``gradients``, ``optimizer_states``, ``activations``, ``peak`` (of a training
            step) and ``evaluation`` (the peak of an evaluation) to ``metrics.json`` (``memory``). On CUDA
            from the allocator's statistics at every step and evaluation; on CPU the first 2 steps and the
            first batch of each evaluation run under a live-tensor tracker (slower), later steps count
            weights, gradients and optimizer state only.

        > Escape hatch

        training_args (`dict`, defaults to `{}`):
            Any other ``TrainingArguments`` fields, passed through (e.g. ``{gradient_accumulation_steps: 2}``);
            they win over the values derived from the fields above.
    """

    trainer: str = "sft"
    model: str | None = None
    dtype: str = "float32"
    task: str | None = None
    train_size: int = 2000
    eval_size: int = 128
    dataset: str | list[str] | None = None
    eval_dataset: str | list[str] | None = None
    eval_split: float | None = None
    chat_template: str | None = None
    reward_funcs: list[str | dict[str, Any]] | None = None
    reward_weights: list[float] | None = None
    optim: str = "adafactor"
    optim_args: dict[str, Any] | str | None = field(default_factory=dict)
    lr: float | None = None
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    warmup_steps: float = 0
    steps: int | None = 200
    batch_size: int = 16
    seed: int = 0
    logging_steps: int = 20
    output_dir: str = "outputs/lowmem-train"
    save_model: bool = True
    save_steps: int | None = None
    resume_from_checkpoint: bool | str | None = None
    merge_adapters: bool = False
    eval_steps: int | None = None
    report_to: str | list[str] = "none"
    quantization: str | dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    gradient_checkpointing: bool = False
    layerwise: bool = False
    track_memory: bool = True
    training_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from lowmem.trainers.hf import parse_optim_args

        if self.steps == -1 and not isinstance(self.steps, bool):  # the Trainer's max_steps=-1: train by epochs
            self.steps = None
        check_dataclass(self)  # every field: its type (numeric strings converted) and range (lowmem.config)
        if self.trainer not in AVAILABLE_TRAINERS:
            raise ConfigError(f"Unknown trainer {self.trainer!r}; available: {list(AVAILABLE_TRAINERS)}")
        from lowmem.data import validate_data_fields

        validate_data_fields(self)  # dataset, eval_*, chat_template, reward_* (lowmem.data, lowmem.rewards)
        _check_synthetic_sizes(self)
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r}; valid: {list(TASKS)}")
        from transformers import SchedulerType

        schedulers = [t.value for t in SchedulerType]
        if self.lr_scheduler not in schedulers:  # (the config class said "'x' is not a valid SchedulerType", no field)
            import difflib

            close = difflib.get_close_matches(self.lr_scheduler, schedulers, n=2)
            raise ConfigError(f"lr_scheduler={self.lr_scheduler!r} (TrainingArguments.lr_scheduler_type): unknown "
                              + (f"scheduler, did you mean {close}? " if close else "scheduler; ")
                              + f"valid: {schedulers}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"Invalid dtype {self.dtype!r}; valid: ['float32', 'bfloat16', 'float16']")
        if isinstance(self.output_dir, str):  # a file there (or above) was found after the model loaded, as [Errno 17]
            out_dir = Path(self.output_dir).expanduser()
            blocker = next((d for d in (out_dir, *out_dir.parents) if d.exists()), None)
            if blocker is not None and not blocker.is_dir():
                raise ConfigError(f"output_dir={self.output_dir!r}: {str(blocker)!r} is a file, not a folder; set "
                                  "output_dir to a folder (an existing one or a new path)")
        if self.model is not None:
            check_model_dir(self.model)
            if self.save_model and Path(self.output_dir).expanduser().resolve() == Path(self.model).expanduser().resolve():
                raise ConfigError(f"output_dir={self.output_dir!r} is the model directory (model={self.model!r}): saving the "
                                  "trained model would overwrite the one it started from (a run stopped while saving "
                                  "leaves neither); set another output_dir")
        if self.merge_adapters and self.lora is None and self.quantization is None:
            raise ConfigError("merge_adapters=true needs lora or quantization (a full fine-tune saves the whole model)")
        if self.merge_adapters and not self.save_model:
            raise ConfigError("merge_adapters=true needs save_model=true (the merge reads the saved adapter)")
        given_optim = self.optim
        if not hasattr(self, "optim_source"):  # built directly (not by load_recipe): the default only if unchanged
            ta = self.training_args if isinstance(self.training_args, dict) else {}
            self.optim_source = ("default" if given_optim == "adafactor" and not any(k in ta for k in OPTIM_KEYS)
                                 else "recipe")
        if hf_keeps_embeddings_32bit(given_optim) or not hasattr(self, "hf_embeddings_32bit"):
            # an HF bitsandbytes 8-bit name (lion_8bit, adamw_8bit, ...): its embeddings' state stays 32-bit
            self.hf_embeddings_32bit = hf_keeps_embeddings_32bit(given_optim)
        if not hasattr(self, "hf_optim"):  # a Hugging Face optim name that is not lowmem's (lion_32bit): built as the
            self.hf_optim = bool(_hf_name_only(given_optim))  # HF Trainer does, with TrainingArguments' betas and eps
        self.optim, hf_layerwise = resolve_optim_name(self.optim)
        self.layerwise = self.layerwise or hf_layerwise
        self.optim_args = {**_hf_only_defaults(given_optim), **parse_optim_args(self.optim_args)}
        _lift_training_args(self)  # recipe fields, optim*, resume_from_checkpoint given in training_args; types of the rest
        _check_run_length(self.steps, self.training_args)
        if self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps):
            raise ConfigError(f"warmup_steps={self.warmup_steps}: expected a whole number of steps, or a fraction of "
                              "steps below 1")
        self.optim_args = check_optim_args(self.optim, self.optim_args)
        _resolve_lr(self)
        from lowmem.optim.recipes.lomo import FUSED_BACKWARD

        if self.optim in FUSED_BACKWARD:
            refuse_fused_backward_under_fsdp(self.optim, self.training_args)
        if self.optim in FUSED_BACKWARD and not self.layerwise:
            raise ConfigError(f"optim={self.optim!r} fuses its update into the backward pass (LOMO / AdaLomo): set "
                              f"layerwise: true (or optim: {self.optim}_layerwise); without it every gradient is kept")
        _check_report_to(self.report_to)
        if (self.eval_steps is not None and self.dataset is not None and self.trainer != "dpo"
                and self.eval_dataset is None and self.eval_split is None):
            raise ConfigError(f"eval_steps={self.eval_steps} needs a held-out set for dataset={self.dataset!r}: "
                              "set eval_dataset (a file, --eval-dataset) or eval_split (a fraction)"
                              + _held_out_hint(self.dataset))
        strategy = self.training_args.get("eval_strategy")
        if (strategy is not None and str(getattr(strategy, "value", strategy)) != "no" and self.dataset is not None
                and self.trainer != "dpo" and self.eval_dataset is None and self.eval_split is None):
            # the Trainer refuses it when built, after the model loaded
            raise ConfigError(f"eval_strategy={getattr(strategy, 'value', strategy)!r} needs a held-out set for "
                              f"dataset={self.dataset!r}: set eval_dataset (a file, --eval-dataset) or eval_split (a fraction)")
        if (self.training_args.get("do_eval") is True and self.dataset is not None and self.trainer != "dpo"
                and self.eval_dataset is None and self.eval_split is None):  # (a script's switch: nothing to evaluate)
            raise ConfigError(f"do_eval=true needs a held-out set for dataset={self.dataset!r}, and none is given: set "
                              "eval_dataset (a file, --eval-dataset) or eval_split (a fraction), with eval_steps to "
                              "evaluate every that many steps; or drop do_eval" + _held_out_hint(self.dataset))
        if self.quantization is not None:
            from lowmem.quant import bnb_config

            # 'nf4' / 'fp4' (4-bit) / 'int8' (8-bit) / dict, else a ValueError naming the choices, or the field that
            # does not apply to the type (int8: double_quant, compute_dtype, blocksize; 4-bit: threshold)
            bnb_config(self.quantization)
        if self.lora is not None:
            lora_config(self.lora)
        if self.model is not None:
            _check_stored_quantization(self)


RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(TrainRecipe))


def _check_stored_quantization(recipe: TrainRecipe) -> None:
    """A model directory stored quantized (config.json's bitsandbytes ``quantization_config``, a '...-bnb-4bit'
    checkpoint; :func:`lowmem.quant.stored_quantization`), read before the model loads. transformers applies the stored
    quantization whatever lowmem asks, so: ``quantization`` of another type is an error naming both; ``lora`` without
    ``quantization`` takes the stored one (``recipe.quantization`` set to it, ``recipe.quantization_source = "model"``,
    a note at loading), so the base gets k-bit preparation and the CPU packing guard as with ``quantization:`` (before,
    LoRA went on the loaded 4-bit layers without them: wrong adapter gradients after an evaluation on CPUs with
    AVX512-BF16, a bitsandbytes crash on a small Qwen2), as the estimate takes it; neither ``lora`` nor
    ``quantization`` (a full fine-tune of quantized weights) and ``merge_adapters`` (no full-precision weights to
    merge into) are errors naming the field.

    Raises:
        ConfigError: Naming the field, the stored quantization and what applies.
    """
    from lowmem.quant import check_stored_quantization

    try:
        stored = check_stored_quantization(recipe.model, recipe.quantization)
    except ValueError as err:
        raise ConfigError(f"model={recipe.model!r}: {err}") from None
    if stored is None:
        return
    what = f"stored {stored.quant_type} (its config.json has a bitsandbytes quantization_config)"
    if recipe.quantization is None and recipe.lora is None:
        raise ConfigError(f"model={recipe.model!r} is {what}: a full fine-tune cannot train quantized weights; set lora "
                          f"(adapters on the quantized base) or quantization: {stored.quant_type} (lowmem's default "
                          "adapters), or start from the unquantized checkpoint")
    if recipe.merge_adapters:
        raise ConfigError(f"merge_adapters=true but model={recipe.model!r} is {what}: it holds no full-precision weights "
                          f"to merge the adapters into (transformers cannot save LoRA merged into {stored.quant_type} "
                          "layers); drop merge_adapters and merge the saved adapter into the unquantized checkpoint "
                          "(PeftModel.from_pretrained(base, OUTPUT_DIR).merge_and_unload())")
    if recipe.quantization is None:
        recipe.quantization = ({"quant_type": "int8", "threshold": stored.threshold} if stored.is_int8 else
                               {"quant_type": stored.quant_type, "double_quant": stored.double_quant})
        recipe.quantization_source = "model"


def _check_synthetic_sizes(recipe: TrainRecipe) -> None:
    """``train_size`` / ``eval_size`` size the synthetic task only: given with a ``dataset`` (named by the recipe or
    :func:`load_recipe`'s keywords, which record ``given_keys``; built directly: a value other than the default),
    they would be dropped.

    Raises:
        ConfigError: Naming the field and what does apply with a dataset.
    """
    if recipe.dataset is None:
        return
    given = getattr(recipe, "given_keys", None)
    fixes = {"train_size": "every row of the dataset trains: subsample the file itself, or drop train_size",
             "eval_size": "the held-out set is eval_dataset (a file) or eval_split (a fraction of the dataset): use one, "
                          "or drop eval_size"}
    for key, fix in fixes.items():
        default = TrainRecipe.__dataclass_fields__[key].default
        if (key in given) if given is not None else getattr(recipe, key) != default:
            raise ConfigError(f"{key}={getattr(recipe, key)!r} sizes the synthetic task, and dataset="
                              f"{recipe.dataset!r} is given: {fix}")


def _held_out_hint(dataset: Any) -> str:
    """``"; <path> also holds held-out data (its 'validation' split) ..."`` when the
    ``dataset`` folder has an eval split (:func:`lowmem.data.held_out_split`), else ``""``."""
    from lowmem.data import held_out_split

    held = held_out_split(dataset)
    return (f"; {dataset} also holds held-out data ({held}), unused as dataset: eval_dataset: {dataset} "
            f"(--eval-dataset {dataset}) evaluates on it" if held else "")

#: The embedded tiny model's learning rate (the demo trains it from a random init): what ``lr: null`` means there.
DEMO_LR = 1e-2


def _resolve_lr(recipe: TrainRecipe) -> None:
    """``lr`` unset: the demo's :data:`DEMO_LR` on the embedded tiny model, ``optim_args``' ``lr``
    when it sets one, else a :class:`ConfigError` for a user's model (no default fits a pretrained
    model and every optimizer; the demo's would diverge). ``lr`` and a different ``optim_args``' ``lr`` together
    (or a ``weight_decay`` other than 0.0 and a different ``optim_args``' ``weight_decay``): a :class:`ConfigError`
    naming both, since one of the two would be dropped."""
    given = recipe.optim_args.get("lr") if isinstance(recipe.optim_args, dict) else None
    if recipe.lr is not None and given is not None and float(given) != float(recipe.lr):
        raise ConfigError(f"lr={recipe.lr:g} and optim_args.lr={float(given):g} both set the learning rate, to different "
                          "values (one would be dropped); give one of them")
    given_wd = recipe.optim_args.get("weight_decay") if isinstance(recipe.optim_args, dict) else None
    if (recipe.weight_decay != 0.0 and given_wd is not None and not isinstance(given_wd, (list, tuple))
            and float(given_wd) != float(recipe.weight_decay)):
        # (weight_decay's default 0.0 beside optim_args.weight_decay is no conflict: the recipe never named it)
        raise ConfigError(f"weight_decay={recipe.weight_decay:g} and optim_args.weight_decay={float(given_wd):g} both set "
                          "the weight decay, to different values (one would be dropped); give one of them")
    if recipe.lr is not None:
        return
    if isinstance(recipe.optim_args, dict) and recipe.optim_args.get("lr") is not None:
        recipe.lr = float(recipe.optim_args["lr"])
    elif recipe.model is None:
        recipe.lr = DEMO_LR
    else:
        raise ConfigError(
            f"lr: no learning rate given for model={recipe.model!r}; set one with --lr or `lr:` in the recipe "
            f"(a positive float; e.g. 2e-5 for a full fine-tune with AdamW, 1e-4 for LoRA, 1e-6 for DPO/GRPO; this run's "
            f"optimizer is optim={recipe.optim}{', lowmem default' if recipe.optim_source == 'default' else ''}). "
            f"The demo's {DEMO_LR:g} is for the embedded tiny model trained from scratch")


_TA_NUM_TRAIN_EPOCHS = 3.0  # TrainingArguments.num_train_epochs' default


def _check_run_length(steps: int | None, training_args: Any) -> None:
    """``steps`` and ``training_args.num_train_epochs`` both fix the length of the run: the Trainer
    lets ``max_steps`` win and ignores the epochs without a word, so giving both is an error, unless
    ``num_train_epochs`` is the Trainer's default 3 (a saved config writes it beside ``max_steps``; it
    is then dropped, as the Trainer would ignore it)."""
    if not isinstance(training_args, dict) or "num_train_epochs" not in training_args:
        return
    if steps is not None and training_args["num_train_epochs"] == _TA_NUM_TRAIN_EPOCHS:
        # the Trainer's default, as every saved config (TrainingArguments.to_dict) writes it beside max_steps
        training_args.pop("num_train_epochs")
        return
    if steps is not None:
        raise ConfigError(f"steps={steps} and num_train_epochs={training_args['num_train_epochs']!r} both set the length "
                          "of the run (the Trainer would let max_steps win and ignore the epochs); give one: drop "
                          "steps / max_steps (or set it to null) to train by epochs")

# A tokenizer saved with save_pretrained writes at least one of these (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def check_model_dir(model: str) -> None:
    """``model`` is a local directory written by ``save_pretrained``: it has ``config.json`` and a
    tokenizer file (:data:`TOKENIZER_FILES`). Checked with the recipe, before anything loads.

    Raises:
        ConfigError: Naming the directory and what it lacks.
    """
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model={model!r}: no such directory (a local model directory; nothing is downloaded)")
    lacks = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        lacks.append(f"a tokenizer file (one of {list(TOKENIZER_FILES)})")
    if lacks:
        raise ConfigError(f"model={model!r}: the directory lacks {' and '.join(lacks)}; expected a model and its "
                          "tokenizer saved with save_pretrained (model.save_pretrained(dir); tokenizer.save_pretrained(dir))")

# Hugging Face ``TrainingArguments.optim`` names -> lowmem registry names (``optim: galore_adamw_8bit``
# in a config written for the HF Trainer runs the equivalent lowmem optimizer). ``<name>_layerwise``
# also turns on ``layerwise``.
HF_OPTIM_NAMES: dict[str, str] = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adafactor": "adafactor",
    "adamw_torch_4bit": "adamw4bit", "adamw_torch_8bit": "adamw8bit",
    "adamw_bnb_8bit": "bnb_adamw8bit", "adamw_8bit": "bnb_adamw8bit",
    "paged_adamw_32bit": "bnb_paged_adamw", "paged_adamw_8bit": "bnb_paged_adamw8bit",
    "galore_adamw": "galore_adamw", "galore_adamw_8bit": "galore_adamw8bit", "galore_adafactor": "galore_adafactor",
    "apollo_adamw": "apollo_adamw",  # optim_args proj=random|svd, scale_type, rank, scale, update_proj_gap, proj_type
    "lion_32bit": "lion", "lion_8bit": "lion8bit",  # bnb's Lion(optim_bits=32 / 8): the same state format, tested
    # equal (the 8-bit names with the embeddings' state 32-bit, as transformers' Trainer: HF_EMBEDDINGS_32BIT)
    "paged_lion_32bit": "bnb_paged_lion", "paged_lion_8bit": "bnb_paged_lion8bit",  # no engine recipe pages memory
    "ademamix": "ademamix", "ademamix_8bit": "ademamix8bit",  # bnb's AdEMAMix(optim_bits=32 / 8): the same state
    # format and defaults, tested equal; optim_args alpha, beta3, t_alpha, t_beta3, eps are the recipe's own keys
    # torch.optim.SGD / Adagrad / RMSprop (transformers' _get_sgd / _get_adagrad / _get_rmsprop: the learning rate and
    # the optim_args keys each reads; torch's defaults otherwise): the engine recipes of lowmem/optim/recipes/classic.py,
    # tested equal to the torch classes (weight_decay > 0 only where the engine's decay is torch's: SGD without momentum)
    "sgd": "sgd", "adagrad": "adagrad", "rmsprop": "rmsprop",
    # torch-optimi's StableAdamW (transformers' _get_stable_adamw: TrainingArguments' betas, eps, weight decay; optim_args
    # decouple_lr, max_lr): the engine recipe of lowmem/optim/recipes/stable_adamw.py (Wortsman et al. 2023, Algorithm 2)
    "stable_adamw": "stable_adamw",
    # bitsandbytes' RMSprop (optim_bits 32 / 8; no momentum, not centered: refused there) and paged AdEMAMix (CUDA only,
    # as the other paged entries: lowmem/optim/recipes/bnb.py)
    "rmsprop_bnb": "bnb_rmsprop", "rmsprop_bnb_32bit": "bnb_rmsprop", "rmsprop_bnb_8bit": "bnb_rmsprop8bit",
    "paged_ademamix_32bit": "bnb_paged_ademamix", "paged_ademamix_8bit": "bnb_paged_ademamix8bit",
}

# transformers' ``optim`` names lowmem does not map, and why (resolve_optim_name's error names the field, says why and
# lists the mapped names): none is a low-memory method, and each needs a package or hardware lowmem does not use
_NOT_LOW_MEMORY = "not a low-memory method (full-size float32 states of its own, nothing compressed or projected)"
HF_OPTIM_REFUSED: dict[str, str] = {
    "grokadamw": f"it needs the grokadamw package, which lowmem does not use, and it is {_NOT_LOW_MEMORY}",
    **{n: f"it needs the schedulefree package, which lowmem does not use (schedule-free averaging, with its own "
          f"train / eval modes), and it is {_NOT_LOW_MEMORY}"
       for n in ("schedule_free_adamw", "schedule_free_radam", "schedule_free_sgd")},
    "adamw_anyprecision": "it needs the torchdistx package, which lowmem does not use; lowmem's adamw with state_dtype='bfloat16' and "
                          "kahan_summation=True is the same idea (bfloat16 moments, compensated bfloat16 weights)",
    "adamw_torch_xla": "it needs an XLA device (TPU), which lowmem does not use; adamw_torch is the same AdamW on CPU / CUDA",
    "adamw_torch_npu_fused": "it needs an Ascend NPU (torch_npu), which lowmem does not use; adamw_torch is the same AdamW "
                             "on CPU / CUDA",
}
HF_LAYERWISE_SUFFIX = "_layerwise"

# The ``optim`` names transformers' Trainer builds as a bitsandbytes class with ``optim_bits=8``
# (``trainer_optimizer._get_bitsandbytes_optimizer``), for which ``Trainer.create_optimizer`` keeps every
# ``nn.Embedding`` weight's state 32-bit (``GlobalOptimManager.register_module_override(module, "weight",
# {"optim_bits": 32})``). lowmem does the same for them (``LowMemArguments.lowmem_embeddings_32bit``, on by
# default for these names); lowmem's own names (``lion8bit``, ``bnb_adamw8bit``, ...) quantize the embeddings too.
HF_EMBEDDINGS_32BIT = frozenset({"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "lion_8bit", "paged_lion_8bit",
                                 "ademamix_8bit", "rmsprop_bnb_8bit", "paged_ademamix_8bit"})


def hf_keeps_embeddings_32bit(name: Any) -> bool:
    """Whether ``name`` is a Hugging Face ``optim`` name (:data:`HF_EMBEDDINGS_32BIT`) for which transformers' Trainer
    keeps the ``nn.Embedding`` weights' optimizer state 32-bit."""
    return isinstance(name, str) and name.strip().lower().replace("-", "_") in HF_EMBEDDINGS_32BIT


# transformers' own Trainer builds these ``optim`` names with defaults of its own for what its ``optim_args``
# string leaves out (``trainer_optimizer._get_apollo_optimizer``: ``rank`` 128; ``_get_torchao_optimizer``:
# ``block_size`` 256 for the 4-bit class too), which differ from the lowmem recipe's (256 and 128). A config
# written for the HF Trainer (``TrainingArguments.optim`` naming one of them) gets the run it was tuned for.
# GaLore's HF defaults (rank 128, gap 200, scale 0.25, std) and APOLLO's others are lowmem's already
# (tests/test_audit_parity_peers.py reads them from transformers itself). ``<name>_layerwise`` too.
HF_OPTIM_DEFAULTS: dict[str, dict[str, Any]] = {
    "apollo_adamw": {"rank": 128},
    "adamw_torch_4bit": {"block_size": 256},
    # transformers builds torch's Adagrad / RMSprop without adam_epsilon (eps from optim_args only, else torch's 1e-10 /
    # 1e-8): these replace the TrainingArguments' adam_epsilon that would otherwise reach the recipe's eps
    "adagrad": {"eps": 1e-10}, "rmsprop": {"eps": 1e-8},
    # bitsandbytes' RMSprop likewise (optim_args only: _get_bitsandbytes_optimizer's rmsprop branch)
    **dict.fromkeys(("rmsprop_bnb", "rmsprop_bnb_32bit", "rmsprop_bnb_8bit"), {"eps": 1e-8}),
}

# Keys of `trl sft` configs (TRL's ModelConfig / ScriptArguments) and LLaMA-Factory that are no
# TrainingArguments field: an unknown-key error says what lowmem's recipe writes instead.
FOREIGN_KEYS: dict[str, str] = {
    "torch_dtype": "dtype", "dataset_name": "dataset (a local file or folder; nothing is downloaded)",
    "dataset_train_split": "dataset (a saved DatasetDict gives its train split)",
    "dataset_test_split": "eval_dataset or eval_split", "val_size": "eval_split",
    "use_peft": "lora: {r: 16, lora_alpha: 32, target_modules: all-linear}",
    "finetuning_type": "lora: {...} for LoRA (leave it out for a full fine-tune)",
    "lora_r": "lora: {r: ...}", "lora_rank": "lora: {r: ...}", "lora_alpha": "lora: {lora_alpha: ...}",
    "lora_dropout": "lora: {lora_dropout: ...}", "lora_target_modules": "lora: {target_modules: ...}",
    "lora_target": "lora: {target_modules: ...}", "lora_task_type": "lora (task_type is CAUSAL_LM)",
    "load_in_4bit": "quantization: nf4", "load_in_8bit": "quantization: int8",
    "bnb_4bit_quant_type": "quantization: {quant_type: ...}", "use_bnb_nested_quant": "quantization: {double_quant: ...}",
    "quantization_bit": "quantization: nf4 (quantization_bit: 4) or int8 (quantization_bit: 8)", "cutoff_len": "max_length", "max_seq_length": "max_length",
    "template": "chat_template (a Jinja text or .jinja file; the tokenizer's own is used by default)",
    "trust_remote_code": "nothing: lowmem never runs a model's remote code",
    "attn_implementation": "model_init_kwargs: {attn_implementation: ...} for trainer: dpo / grpo / gvpo / bnpo without "
                           "lora or quantization (TRL loads the model there); sft and adapter runs load it in lowmem with "
                           "transformers' default attention (sdpa where the model supports it)",
    "use_rslora": "lora: {use_rslora: true}", "lora_modules_to_save": "lora: {modules_to_save: [...]}",
    "use_dora": "lora: {use_dora: true}", "model_revision": "nothing: a local model directory has no revisions",
    "dataset_config": "dataset (a local file or folder; there are no Hub dataset configurations to choose)",
    "dataset_streaming": "nothing: lowmem reads local files (Arrow memory-maps them; nothing streams from the Hub)",
    "ref_model": "nothing: DPO / GRPO's reference model is the policy as loaded from model (TRL loads it again); "
                 "with lora / quantization, the base with adapters disabled",
    "rpo_alpha": "loss_type: [sigmoid, sft] and loss_weights: [1.0, <rpo_alpha>] (TRL 1.16's DPOConfig dropped rpo_alpha)",
    # TrainingArguments fields of transformers 4 that transformers 5 renamed or dropped
    "evaluation_strategy": "eval_strategy (transformers 5's name)", "no_cuda": "use_cpu (transformers 5's name)",
    "group_by_length": "train_sampling_strategy: group_by_length (transformers 5)",
    "logging_dir": "nothing: transformers 5 dropped it; TensorBoard logs go to output_dir/runs, or to the "
                   "TENSORBOARD_LOGGING_DIR environment variable",
    "overwrite_output_dir": "nothing: transformers 5 dropped it; lowmem train writes into output_dir (an earlier run's "
                            "checkpoints there are moved to output_dir/earlier-run-K, named in a warning; --resume "
                            "continues them instead)",
    # TRL before 1.0; TRL 1.16's configs have neither (GRPO does not truncate prompts)
    "max_prompt_length": "nothing in TRL 1.16 (its configs dropped it): max_length bounds SFT / DPO prompt + completion "
                         "(truncation_mode keeps its start or end); GRPO prompts are not truncated, shorten them in the data",
    "max_completion_length": "max_length for sft / dpo (TRL 1.16's DPOConfig bounds prompt + completion together); "
                             "max_completion_length is a field of trainer: grpo / gvpo / bnpo",
}

# keys of a TRL script's config that name its data (FOREIGN_KEYS: lowmem's `dataset`): the other keys of such a config
# are checked as fields of the trainer's config on a dataset (SFTConfig's max_length is no unknown key there)
DATASET_KEYS = frozenset({"dataset_name", "dataset_train_split", "dataset_config"})

# TrainingArguments names of recipe fields: accepted at the top level of a recipe as the recipe field.
RECIPE_ALIASES: dict[str, str] = {
    "learning_rate": "lr", "max_steps": "steps", "per_device_train_batch_size": "batch_size",
    "lr_scheduler_type": "lr_scheduler", "lowmem_optim": "optim", "lowmem_optim_args": "optim_args",
    "lowmem_layerwise": "layerwise", "model_name_or_path": "model",
}


def _hf_optim_defaults(name: str) -> dict[str, Any]:
    """transformers' Trainer's own defaults for HF ``optim`` name ``name`` where they differ from lowmem's
    (:data:`HF_OPTIM_DEFAULTS`: ``apollo_adamw`` rank 128, ``adamw_torch_4bit`` block_size 256)."""
    key = name.strip().lower().replace("-", "_")
    base = key[: -len(HF_LAYERWISE_SUFFIX)] if key.endswith(HF_LAYERWISE_SUFFIX) else key
    return dict(HF_OPTIM_DEFAULTS.get(base, {}))


def _hf_name_only(name: Any) -> bool:
    """Whether ``name`` is a Hugging Face ``optim`` name (:data:`HF_OPTIM_NAMES`, optionally ``_layerwise``) that is
    not a lowmem name too (``lion_32bit``, ``adamw_torch``; not ``adafactor`` or ``galore_adamw``)."""
    from lowmem.optim import list_optimizers

    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else ""
    base = key[: -len(HF_LAYERWISE_SUFFIX)] if key.endswith(HF_LAYERWISE_SUFFIX) else key
    return base in HF_OPTIM_NAMES and base not in list_optimizers()


def _hf_only_defaults(name: str) -> dict[str, Any]:
    """:func:`_hf_optim_defaults` of a recipe's ``optim`` when it is an HF name only (``adamw_torch_4bit``); a name
    that is lowmem's too (``apollo_adamw``) keeps lowmem's defaults there (``training_args.optim`` is HF's)."""
    from lowmem.optim import list_optimizers

    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else ""
    base = key[: -len(HF_LAYERWISE_SUFFIX)] if key.endswith(HF_LAYERWISE_SUFFIX) else key
    return {} if not base or base in list_optimizers() else _hf_optim_defaults(base)


def resolve_optim_name(name: str) -> tuple[str, bool]:
    """``(lowmem registry name, layerwise)`` for a lowmem name or a Hugging Face ``optim`` name
    (:data:`HF_OPTIM_NAMES`, optionally with ``_layerwise``).

    Raises:
        ConfigError: Neither; the message lists both sets of names.
    """
    from lowmem.optim import list_optimizers

    lowmem_names = list_optimizers()
    key = name.strip().lower().replace("-", "_")
    layerwise = key.endswith(HF_LAYERWISE_SUFFIX)
    base = key[: -len(HF_LAYERWISE_SUFFIX)] if layerwise else key
    if base in lowmem_names:
        return base, layerwise
    if base in HF_OPTIM_NAMES:
        return HF_OPTIM_NAMES[base], layerwise
    if base in HF_OPTIM_REFUSED:
        raise ConfigError(f"optim={name!r} is a Hugging Face optimizer name lowmem does not map: "
                          f"{HF_OPTIM_REFUSED[base]}. Hugging Face names lowmem maps: {sorted(HF_OPTIM_NAMES)} (each also "
                          f"as <name>_layerwise); lowmem's own: {lowmem_names}")
    import difflib

    close = difflib.get_close_matches(base, list(dict.fromkeys([*lowmem_names, *HF_OPTIM_NAMES])), n=3)  # galore_adamw is both
    raise ConfigError(
        f"optim={name!r} is neither a lowmem optimizer nor a Hugging Face optimizer name lowmem maps"
        + (f"; did you mean {close}?" if close else "") + f" lowmem: {lowmem_names}; Hugging Face: "
        f"{sorted(HF_OPTIM_NAMES)} (each also as <name>_layerwise)"
    )


def check_optim_args(name: str, optim_args: dict[str, Any]) -> dict[str, Any]:
    """``optim_args`` checked against optimizer ``name`` before any model loads
    (:func:`lowmem.trainers.hf.validate_optim_args`): unknown names are an error listing the valid
    ones; each value is validated by the optimizer's own hyperparameter spec (a string that reads as
    a number, as PyYAML leaves ``3e-4``, is converted first).

    Raises:
        ConfigError: naming ``optim_args.<key>``, the value and what is valid.
    """
    from lowmem.trainers.hf import validate_optim_args

    try:
        return validate_optim_args(name, optim_args)
    except ValueError as err:
        raise ConfigError(str(err) if str(err).startswith("optim_args.") else f"optim_args: {err}") from None


def config_class(trainer: str, dataset: Any = None) -> type:
    """The ``TrainingArguments`` subclass a recipe's ``trainer`` builds: ``LowMemTrainingArguments``
    for ``sft`` on the synthetic task, ``LowMemSFTConfig`` for ``sft`` on a ``dataset`` (TRL's
    ``SFTTrainer``), the TRL configs for the others."""
    from lowmem import trainers as t

    if trainer == "sft":
        return t.LowMemSFTConfig if dataset is not None else t.LowMemTrainingArguments
    return _trl_config_and_trainer(trainer)[0]


def _lift_training_args(recipe: TrainRecipe) -> None:
    """Move the keys of ``training_args`` that lowmem handles itself onto the recipe
    (``resume_from_checkpoint``; ``optim``, ``optim_args``, ``optim_target_modules`` in the HF
    Trainer's meaning), then type- and range-check the rest against the trainer's config class."""
    from lowmem.trainers.hf import parse_optim_args

    ta = dict(recipe.training_args)
    _redacted_tokens(ta)
    if "lowmem_optim" in ta or "lowmem_optim_args" in ta or "lowmem_layerwise" in ta:
        for key in ("lowmem_optim", "lowmem_optim_args"):
            if key in ta and key[len("lowmem_"):] in ta:
                raise ConfigError(f"training_args holds both {key} and {key[len('lowmem_'):]}; give one")
            if key in ta:
                ta[key[len("lowmem_"):]] = ta.pop(key)
        if "lowmem_layerwise" in ta:
            recipe.layerwise = recipe.layerwise or check_value("lowmem_layerwise", ta.pop("lowmem_layerwise"), bool,
                                                               where="training_args.")
    for kind in ("save", "eval"):  # a config's save_steps / eval_steps under another strategy: the Trainer ignores them
        if _strategy(ta.get(f"{kind}_strategy", "steps")) != "steps":
            ta.pop(f"{kind}_steps", None)
    _lift_recipe_fields(recipe, ta)
    for kind in ("save", "eval"):
        steps, strategy = getattr(recipe, f"{kind}_steps"), _strategy(ta.get(f"{kind}_strategy", "steps"))
        if steps is not None and strategy != "steps":
            raise ConfigError(f"{kind}_steps={steps} and {kind}_strategy={strategy!r} (the config's): the Trainer would "
                              + ("save" if kind == "save" else "evaluate")
                              + (" nothing" if strategy == "no" else f" by {strategy}, never every {steps} steps")
                              + f"; drop {kind}_strategy (or set it to 'steps'), or drop {kind}_steps")
    if "generation_batch_size" in ta and "steps_per_generation" in ta:
        # GRPOConfig fills both from each other, so its saved config holds both and GRPOConfig refuses them
        # ("can not be both configured"); the pair TRL derived itself says nothing more than steps_per_generation
        derived = recipe.batch_size * launched_processes() * ta["steps_per_generation"]
        if ta["generation_batch_size"] == derived:
            del ta["generation_batch_size"]
    _lift_model_loading(recipe, ta)
    if "resume_from_checkpoint" in ta:
        value = check_value("resume_from_checkpoint", ta.pop("resume_from_checkpoint"), bool | str | None,
                            where="training_args.")
        if recipe.resume_from_checkpoint is not None and value != recipe.resume_from_checkpoint:
            raise ConfigError(f"resume_from_checkpoint is {recipe.resume_from_checkpoint!r} in the recipe and "
                              f"{value!r} in training_args; give it once")
        recipe.resume_from_checkpoint = value
    hf_defaults: dict[str, Any] = {}
    if "optim" in ta:
        value = check_value("optim", ta.pop("optim"), str, where="training_args.")
        recipe.optim, layerwise = resolve_optim_name(value)
        recipe.layerwise = recipe.layerwise or layerwise
        recipe.hf_embeddings_32bit = hf_keeps_embeddings_32bit(value)
        recipe.hf_optim = True  # TrainingArguments.optim: the HF Trainer's meaning (its betas / eps apply, set or not)
        hf_defaults = _hf_optim_defaults(value)  # TrainingArguments.optim: the HF Trainer's meaning, its defaults
    if "optim_args" in ta:
        value = check_value("optim_args", ta.pop("optim_args"), dict[str, Any] | str | None, where="training_args.")
        recipe.optim_args = {**recipe.optim_args, **parse_optim_args(value)}
    recipe.optim_args = {**hf_defaults, **recipe.optim_args}
    if "optim_target_modules" in ta:
        value = check_value("optim_target_modules", ta.pop("optim_target_modules"), str | list[str] | None,
                            where="training_args.")
        if value is not None:
            if get_entry(recipe.optim).target_key is None:
                raise ConfigError(f"optim_target_modules={value!r} selects the layers an optimizer treats apart (a "
                                  f"subspace optimizer's projected weights, Muon's orthogonalized ones); "
                                  f"optim={recipe.optim!r} treats every parameter alike")
            ta["optim_target_modules"] = value  # matched by the Trainer's rules (trainers.hf.OptimTargetModules)
    cls = config_class(recipe.trainer, getattr(recipe, "dataset", None))
    types_ = field_types(cls)
    unknown = sorted(set(ta) - set(types_))
    if unknown:
        import difflib

        foreign = [f"{k} -> {FOREIGN_KEYS[k]}" for k in unknown if k in FOREIGN_KEYS]
        close = sorted({m for k in unknown if k not in FOREIGN_KEYS
                        for m in difflib.get_close_matches(k, list(types_), n=3)})
        raise ConfigError(f"training_args: unknown field(s) {unknown} of {cls.__name__}"
                          + (f"; lowmem's spelling: {'; '.join(foreign)}" if foreign else "")
                          + (f"; did you mean {close}?" if close else "") + " (the valid fields are those of "
                          f"{cls.__mro__[1].__name__ if cls.__name__.startswith('LowMem') else cls.__name__} in the "
                          "transformers / TRL documentation)")
    for key in STRING_AS_LIST:  # DPOConfig's `loss_type: ipo`: TRL's __post_init__ makes a string a one-item list
        if isinstance(ta.get(key), str) and key in types_ and not isinstance(cls.__dataclass_fields__[key].default, str):
            ta[key] = [ta[key]]
    recipe.training_args = {k: check_value(k, v, types_[k], where="training_args.") for k, v in ta.items()}
    check_unavailable_fields(recipe.training_args)
    check_script_fields(recipe.training_args)
    if recipe.trainer in ("grpo", "gvpo", "bnpo"):  # the trainer configs' checks, naming the recipe's keys
        check_generation_kwargs(recipe.training_args)
        check_batch_generation_kwargs(recipe.training_args)
        check_training_args_reward_weights(recipe)
    if recipe.trainer == "sft" and getattr(recipe, "dataset", None) is not None:
        check_padding_free(recipe.training_args)
    get_entry(recipe.optim).valid_hparams()  # registered (resolve_optim_name checked it)


def check_script_fields(ta: dict[str, Any]) -> None:
    """``TrainingArguments.do_train`` / ``do_predict``: "not directly used by Trainer", only by scripts, and
    LLaMA-Factory's YAMLs mean them (``do_train: false`` = evaluate or predict only, ``do_predict: true`` = generate on
    the eval set). ``lowmem train`` always trains and predicts nothing, so ``do_train: false`` and ``do_predict: true``
    are refused; a whole saved ``training_args.json`` (``TrainingArguments.to_dict()``, more than half of its fields:
    it writes ``do_train: false`` for every run of a script that never set it) keeps passing ``do_train: false``.

    Raises:
        ConfigError: Naming the field and what lowmem does instead.
    """
    from transformers import TrainingArguments

    if ta.get("do_predict") is True:
        raise ConfigError("do_predict=true: lowmem train has no prediction step (it trains, then evaluates on "
                          "eval_dataset / eval_split when eval_steps is set); drop do_predict, and generate with the "
                          "saved model (transformers' model.generate, or the trl / LLaMA-Factory predict scripts)")
    if ta.get("do_train") is False:
        fields = {f for f, v in TrainingArguments.__dataclass_fields__.items() if v.init}
        if len(fields & set(ta)) <= len(fields) // 2:  # not a whole saved config
            raise ConfigError("do_train=false: lowmem train always trains (do_train is a script's switch, as in "
                              "LLaMA-Factory's evaluate-only configs, which the Trainer never reads); drop do_train to "
                              "train, or evaluate a model with your own script (Trainer.evaluate)")


# generation_kwargs keys that TRL 1.16's GRPOTrainer sets from its own config fields (grpo_trainer.py:1155-1173, then
# `generation_kwargs.update(args.generation_kwargs)`) or from the tokenizer: -> what to set instead.
GENERATION_KWARGS_FIELDS: dict[str, str] = {
    "max_new_tokens": "max_completion_length", "max_length": "max_completion_length",
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "pad_token_id": "the tokenizer's pad token", "bos_token_id": "the tokenizer's bos token",
    "eos_token_id": "the tokenizer's eos token",
}


def check_generation_kwargs(ta: dict[str, Any]) -> None:
    """GRPO / GVPO / BNPO ``generation_kwargs`` that override a GRPOConfig field: TRL builds the sampling config from
    ``max_completion_length``, ``temperature``, ``top_p``, ... and updates it with ``generation_kwargs``, so
    ``{max_new_tokens: 100}`` generated past ``max_completion_length`` (and lowmem's context check), and
    ``{temperature: 0.5}`` sampled at 0.5 while the loss's log-probabilities used the config's ``temperature``: the
    gradient was for another distribution than the sampled one. ``do_sample: false`` made a group's completions equal.
    Keys TRL does not set (``no_repeat_ngram_size``, ...) pass.

    Raises:
        ConfigError: Naming ``generation_kwargs.<key>`` and the field to set instead.
    """
    gk = ta.get("generation_kwargs")
    if not isinstance(gk, dict):
        return
    for key in gk:
        if key in GENERATION_KWARGS_FIELDS:
            target = GENERATION_KWARGS_FIELDS[key]
            where = target if target.startswith("the ") else f"training_args.{target}"
            raise ConfigError(f"generation_kwargs.{key}={gk[key]!r} overrides what TRL sets from {where} (the loss "
                              f"reads {where}, the sampling would use generation_kwargs); set {where} instead and "
                              f"drop generation_kwargs.{key}")
    if gk.get("do_sample") is False:
        raise ConfigError("generation_kwargs.do_sample=false: GRPO samples num_generations completions per prompt and "
                          "learns from their differences; greedy decoding makes them equal (every advantage 0); drop it "
                          "(lower training_args.temperature for less varied samples)")


def check_batch_generation_kwargs(ta: dict[str, Any]) -> None:
    """GRPO / GVPO / BNPO ``generation_kwargs`` that break the batch TRL's generation returns
    (``lowmem.trainers.trl.BATCH_GENERATION_KWARGS``: ``num_return_sequences`` > 1, ``return_dict_in_generate``,
    ``output_scores``, ``stop_strings``, ...), refused as the trainer config refuses them, naming the recipe's key
    (before: ``LowMemGRPOConfig: LowMemGRPOConfig.generation_kwargs.<key>``). Under ``use_vllm`` they go to vLLM and pass.

    Raises:
        ConfigError: ``generation_kwargs.<key>=<value>: <why>; drop generation_kwargs.<key>``.
    """
    from types import SimpleNamespace

    from lowmem.trainers.trl import ConfigFieldError, check_batch_generation_kwargs as check  # the config's check

    gk = ta.get("generation_kwargs")
    if isinstance(gk, str):  # (a JSON string, as TrainingArguments takes one)
        try:
            gk = json.loads(gk)
        except ValueError:
            return
    try:
        check(SimpleNamespace(generation_kwargs=gk, use_vllm=ta.get("use_vllm")))
    except ConfigFieldError as err:
        raise ConfigError(err.named(lambda field: field)) from None


def check_training_args_reward_weights(recipe: Any) -> None:
    """``training_args.reward_weights`` without ``reward_funcs``: the synthetic task's reward (``lowmem.kit.reward_fn``)
    is one function, so it takes one weight, not 0 (:func:`lowmem.rewards.check_some_weight`). With ``reward_funcs``,
    :func:`lowmem.rewards.validate_reward_fields` checks them. Before, the trainer refused a count after the run started
    (``LowMemGRPOConfig.reward_weights has 2 entries ... but reward_funcs has 1``) and a 0 as
    ``LowMemGRPOConfig.reward_weights=[0.0]``; now both name the recipe's key, before any model loads.

    Raises:
        ValueError: Naming ``training_args.reward_weights``.
    """
    from lowmem.rewards import check_reward_weights

    weights = recipe.training_args.get("reward_weights")
    if recipe.reward_funcs is not None or not isinstance(weights, (list, tuple)):
        return
    try:  # (the Python API's rule too: lowmem.trainers.trl.check_reward_weights_count)
        check_reward_weights(weights, None, prefix="training_args.")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_padding_free(ta: dict[str, Any]) -> None:
    """SFTConfig's ``padding_free: true`` without ``packing``: TRL (1.16) does not truncate the rows then and refuses any
    ``max_length`` (its default 1024 included, and the model's context lowmem sets in its place), a ``ValueError``
    after the model loaded. Refused before; ``max_length: null`` or ``packing: true`` (``packing_strategy: bfd`` is
    padding-free itself) pass.

    Raises:
        ConfigError: Naming both fields and the two fixes.
    """
    if ta.get("padding_free") is True and not ta.get("packing") and ta.get("max_length", 1024) is not None:
        raise ConfigError(f"padding_free=true without packing: TRL does not truncate the rows then and refuses any "
                          f"max_length (here {ta.get('max_length', 1024)}{'' if 'max_length' in ta else ', its default'});"
                          " set max_length: null (rows as long as they are: each must fit the model's context) or "
                          "packing: true (its default packing_strategy bfd is padding-free and truncates)")


def _liger_available() -> bool:
    from transformers.utils import is_liger_kernel_available

    return is_liger_kernel_available()


def _vllm_available() -> bool:
    from trl.import_utils import is_vllm_available

    return is_vllm_available()


def check_unavailable_fields(ta: dict[str, Any]) -> None:
    """Config fields (already type-checked, in ``training_args``) that ask for something this run cannot do,
    refused before the model loads. Passed on, each failed later: ``push_to_hub`` and a GRPO
    ``log_completions_hub_repo`` (with ``log_completions``) reached the Hub when the Trainer was built
    ("Cannot reach https://huggingface.co/api/repos/create"; lowmem runs offline and uploads nothing);
    ``use_liger_kernel`` / ``use_vllm`` without their packages raised an ``ImportError`` traceback after the
    model loaded; a ``vllm_*`` setting away from TRL's default without ``use_vllm`` was ignored without a word; TRL's ``activation_offloading`` without a GPU raised ``AttributeError: 'NoneType' object has
    no attribute 'type'`` (it offloads activations from an accelerator to the CPU); ``chat_template_path`` (an
    ``SFTConfig`` field) was not seen by lowmem's template check, and a path that was no file was looked up on
    the Hub.

    Raises:
        ConfigError: Naming the field, its value and the fix.
    """
    if ta.get("push_to_hub"):
        raise ConfigError("push_to_hub=true: lowmem train runs offline and uploads nothing; drop push_to_hub and "
                          "upload OUTPUT_DIR yourself afterwards (huggingface_hub.upload_folder)")
    if ta.get("log_completions") and ta.get("log_completions_hub_repo"):
        raise ConfigError(f"log_completions_hub_repo={ta['log_completions_hub_repo']!r}: lowmem train runs offline and "
                          "uploads nothing; drop log_completions_hub_repo (log_completions alone logs them locally)")
    if ta.get("use_liger_kernel"):
        if not _liger_available():
            raise ConfigError("use_liger_kernel=true needs the liger-kernel package, which is not installed: "
                              "pip install liger-kernel (or drop use_liger_kernel)")
    if ta.get("use_vllm"):  # (the Python configs' rule too: one implementation, naming training_args.use_vllm here)
        from lowmem.trainers.trl import refuse_use_vllm_without_vllm

        refuse_use_vllm_without_vllm(ta, prefix="training_args.")
    if any(k.startswith("vllm_") for k in ta) and not ta.get("use_vllm"):  # TRL reads none of them then
        from lowmem.trainers.trl import refuse_vllm_fields_without_use_vllm  # (the Python configs' rule too)

        refuse_vllm_fields_without_use_vllm(ta, prefix="training_args.")
    if ta.get("activation_offloading") and not _accelerator_visible():
        raise ConfigError("activation_offloading=true moves activations from a GPU to the CPU, and no GPU is visible; "
                          "drop it (gradient_checkpointing: true saves activation memory on any device)")
    if ta.get("chat_template_path") is not None:
        raise ConfigError(f"chat_template_path={ta['chat_template_path']!r}: write chat_template: <the .jinja path> "
                          "(lowmem's field: read and compiled before the model loads, relative to the recipe file, "
                          "saved with the model); a tokenizer folder's template: its chat_template.jinja file")


# list-typed config fields that TRL also takes as one string (DPOConfig.__post_init__: `loss_type="ipo"` ->
# ["ipo"]); the strict checker refused `loss_type: ipo`, the way every DPO recipe writes it
STRING_AS_LIST: tuple[str, ...] = ("loss_type",)

DTYPES = ("float32", "bfloat16", "float16")


def _lift_model_loading(recipe: TrainRecipe, ta: dict[str, Any]) -> None:
    """The model-loading fields of TRL's configs in ``training_args`` (``ta``, in place). ``trust_remote_code``
    (a field of ``SFTConfig`` / ``DPOConfig`` / ``GRPOConfig``, passed by TRL to ``from_pretrained``) and
    ``model_init_kwargs.trust_remote_code``: ``true`` is an error (lowmem never runs a model's remote code; TRL
    ran it), ``false`` is dropped. ``model_init_kwargs.dtype`` (or ``torch_dtype``) is the recipe's ``dtype``:
    lifted onto it (a different ``dtype`` in the recipe is an error), since TRL loads DPO/GRPO policies and
    reference models by path with ``model_init_kwargs`` (:func:`build_training_args` gives it the recipe's).
    Other ``model_init_kwargs`` where lowmem loads the model itself (``sft``, ``lora``, ``quantization``) are an
    error: TRL ignores them for a loaded model (with a warning in the log).

    Raises:
        ConfigError: Naming the field and value.
    """
    if "trust_remote_code" in ta:
        if check_value("trust_remote_code", ta.pop("trust_remote_code"), bool, where="training_args."):
            raise ConfigError("trust_remote_code=true: lowmem never runs a model's remote code (TRL would import "
                              "Python files from the model directory); use a model whose architecture transformers has")
    if "model_init_kwargs" not in ta:
        return
    kwargs = check_value("model_init_kwargs", ta.pop("model_init_kwargs"), dict[str, Any] | None, where="training_args.")
    kwargs = dict(kwargs or {})
    if kwargs.pop("trust_remote_code", False):
        raise ConfigError("model_init_kwargs.trust_remote_code=true: lowmem never runs a model's remote code (TRL would "
                          "import Python files from the model directory); use a model whose architecture transformers has")
    names = [k for k in ("dtype", "torch_dtype") if k in kwargs]
    if len(names) == 2:
        raise ConfigError("model_init_kwargs holds both dtype and torch_dtype; give dtype once")
    if names:
        value = kwargs.pop(names[0])
        value = str(value).removeprefix("torch.") if value is not None else value
        if value not in DTYPES:
            raise ConfigError(f"model_init_kwargs.{names[0]}={value!r}: expected one of {list(DTYPES)} (lowmem loads the "
                              "model in the recipe's dtype; 'auto' is not supported)")
        default = next(f.default for f in dataclasses.fields(TrainRecipe) if f.name == "dtype")
        if recipe.dtype != default and recipe.dtype != value:
            raise ConfigError(f"dtype is {recipe.dtype!r} in the recipe and model_init_kwargs.{names[0]} is {value!r}; "
                              "give it once")
        recipe.dtype = value
    if kwargs and (recipe.trainer == "sft" or recipe.lora is not None or recipe.quantization is not None):
        raise ConfigError(f"model_init_kwargs={kwargs!r}: lowmem loads the model itself here ("
                          + ("trainer sft" if recipe.trainer == "sft" else "lora / quantization attach adapters to it")
                          + "), and TRL ignores model_init_kwargs for a loaded model; only dtype applies (the recipe's "
                          "dtype field). They apply to dpo / grpo / gvpo / bnpo without lora or quantization, where TRL "
                          "loads the model from its directory")
    if kwargs:
        ta["model_init_kwargs"] = kwargs


def _strategy(value: Any) -> Any:
    """A ``*_strategy`` value as its string (``IntervalStrategy.NO`` -> ``"no"``)."""
    return getattr(value, "value", value)


def _redacted_tokens(ta: dict[str, Any]) -> None:
    """``TrainingArguments.to_dict()`` (a saved ``training_args.json``) writes every ``*_token`` field as
    the placeholder ``"<NAME>"``, not its value. ``hub_token``'s is dropped (lowmem train pushes nothing);
    another (TRL's ``eos_token`` / ``pad_token``) would reach TRL as a token to look up ("The specified
    `eos_token` ('<EOS_TOKEN>') is not found in the vocabulary"): an error naming the keys."""
    masked = sorted(k for k, v in ta.items() if k.endswith("_token") and v == f"<{k.upper()}>")
    if "hub_token" in masked:
        del ta["hub_token"]
        masked.remove("hub_token")
    if masked:
        raise ConfigError(f"training_args {masked} hold the placeholders {[ta[k] for k in masked]} that "
                          "TrainingArguments.to_dict writes instead of token values (a saved config): remove these "
                          "keys to use the tokenizer's own tokens, or write the tokens")


# TrainingArguments fields in ``training_args`` that a recipe field sets (the recipe's own name, or its alias).
TRAINING_ARGS_RECIPE_FIELDS: dict[str, str] = {
    "learning_rate": "lr", "max_steps": "steps", "per_device_train_batch_size": "batch_size",
    "lr_scheduler_type": "lr_scheduler", "output_dir": "output_dir", "seed": "seed", "logging_steps": "logging_steps",
    "save_steps": "save_steps", "eval_steps": "eval_steps", "weight_decay": "weight_decay",
    "warmup_steps": "warmup_steps", "report_to": "report_to",
}


def _lift_recipe_fields(recipe: TrainRecipe, ta: dict[str, Any]) -> None:
    """Move the ``training_args`` fields of :data:`TRAINING_ARGS_RECIPE_FIELDS` onto the recipe, in
    place. Passed through, they reached the Trainer while the recipe kept its own value for the rest
    of the run: ``output_dir`` wrote checkpoints in one folder and ``metrics.json`` and the model in
    another, ``save_steps`` / ``eval_steps`` left ``save_strategy`` / ``eval_strategy`` at ``"no"``
    (nothing saved or evaluated), ``max_steps`` escaped the resume check. ``training_args`` wins over
    a recipe field at its default (as documented); over one set to another value it is an error."""
    types_ = field_types(TrainRecipe)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainRecipe)}
    for key, name in TRAINING_ARGS_RECIPE_FIELDS.items():
        if key not in ta:
            continue
        raw = ta.pop(key)
        if name == "steps" and raw == -1 and not isinstance(raw, bool):  # the Trainer's "train by epochs"
            raw = None
        value = check_value(key, raw, types_[name], where="training_args.",
                            ranges={key: RANGES[name]} if name in RANGES else {})
        current = getattr(recipe, name)
        if current != defaults[name] and current != value:
            raise ConfigError(f"{name} is {current!r} in the recipe and training_args.{key} is {value!r}; give it once")
        setattr(recipe, name, value)


def _check_report_to(report_to: str | list[str]) -> None:
    """``report_to`` names known integrations whose packages are installed, or ``"none"`` / ``"all"``."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n for n in names if n not in ("none", "all")]
    if not names:
        return
    from transformers.integrations import integration_utils as iu

    known = sorted(iu.INTEGRATION_TO_CALLBACK)
    available = set(iu.get_available_reporting_integrations())
    for n in names:
        if n not in known:
            raise ConfigError(f"report_to={n!r}: unknown integration; valid: ['none', 'all'] + {known}")
        if n not in available:
            package = {"comet_ml": "comet-ml", "neptune": "neptune", "azure_ml": "azureml-core"}.get(n, n)
            raise ConfigError(f"report_to={n!r}: the {n} integration needs its package, which is not installed: "
                              f"pip install {package}")


def lora_config(fields: dict[str, Any]):
    """``peft.LoraConfig(task_type="CAUSAL_LM", **fields)``, with an error listing valid fields."""
    import difflib

    from peft import LoraConfig

    if not isinstance(fields, dict):
        raise ValueError(f"lora must be a mapping of peft.LoraConfig fields; got {fields!r}")
    valid = sorted(f.name for f in dataclasses.fields(LoraConfig))
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        # the names people write for peft's (LLaMA-Factory's lora_rank, ...), then close spellings
        close = sorted({m for k in unknown for m in ([_LORA_SYNONYMS[k]] if k in _LORA_SYNONYMS
                                                     else difflib.get_close_matches(k, valid, n=2))})
        raise ValueError(f"Unknown lora field(s) {unknown}" + (f"; did you mean {close}?" if close else "")
                         + f"; valid: {valid}")
    # peft checks r only when the adapters are attached, after the model loaded, in words without the field's
    # name ("`r` should be a positive integer value but the value passed is 0"); lora_alpha and lora_dropout not at all
    fields = dict(fields)
    for name, tp, rng in _LORA_RANGES:
        if name in fields:
            fields[name] = check_value(name, fields[name], tp, where="lora.", ranges={name: rng})
    return LoraConfig(**{"task_type": "CAUSAL_LM", **fields})


_LORA_RANGES = (("r", int, Range(0, lo_open=True)), ("lora_alpha", int | float, Range(0, lo_open=True)),
                ("lora_dropout", float, Range(0, 1, hi_open=True)))


_LORA_SYNONYMS = {"rank": "r", "lora_rank": "r", "lora_r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                  "lora_target": "target_modules", "targets": "target_modules", "target": "target_modules"}


def _rebuild_aliased_config(base: type, state: dict[str, Any]) -> Any:
    """Unpickle a config :func:`alias_num_experts` aliased: the model's own class, aliased again."""
    config = base.__new__(base)
    config.__dict__.update(state)
    return alias_num_experts(config)


def alias_num_experts(config: Any) -> Any:
    """Give a Mixture-of-Experts config that names its expert count ``num_local_experts`` only (transformers'
    ``PhimoeConfig``) the name ``num_experts``, which TRL 1.16's SFT loss reads for the router load-balancing loss
    (trl/trainer/utils.py ``_fused_forward``: ``text_config.num_experts``; Mixtral's config maps the name, PhiMoE's does
    not, so SFT on a PhiMoE model stopped at the first step with ``AttributeError: 'PhimoeConfig' object has no
    attribute 'num_experts'``). The alias is a class-level ``attribute_map`` entry on a subclass of the config's own
    class (same name, ``model_type`` and ``isinstance``): nothing is added to the instance, so ``config.json`` is saved
    byte for byte as before; the loss is the model's own (``PhimoeForCausalLM`` calls the same
    ``load_balancing_loss_func`` with ``num_local_experts``). Configs that have ``num_experts`` are left alone.
    Returns ``config``."""
    cls = type(config)
    if hasattr(config, "num_experts") or not hasattr(config, "num_local_experts"):
        return config
    aliased = type(cls.__name__, (cls,), {
        "attribute_map": {**getattr(cls, "attribute_map", {}), "num_experts": "num_local_experts"},
        "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "__reduce__": lambda self: (_rebuild_aliased_config, (cls, dict(self.__dict__))),
    })
    config.__class__ = aliased
    return config


def load_policy(recipe: TrainRecipe) -> tuple[nn.Module, Any, str | None]:
    """The model to train, its tokenizer, and a local directory holding the base model.

    Applies ``quantization`` (4-bit base + LoRA, via :func:`lowmem.quant.load_quantized_model`) or
    ``lora`` (adapters on the full-precision model). The directory is ``recipe.model``, or for the
    embedded tiny model a temporary copy when something must reload it by path (4-bit loading); else
    ``None``.
    """
    from lowmem.kit import load_model_and_tokenizer, save_embedded_model

    model, tok = load_model_and_tokenizer(recipe.model, dtype=recipe.dtype, seed=recipe.seed)
    model_dir = recipe.model
    layers = lora_layer_names(model)
    try:
        if recipe.quantization is not None:
            from lowmem.quant import load_quantized_model

            if model_dir is None:  # bitsandbytes quantizes while loading: the embedded model needs a path
                model_dir = save_embedded_model(model, tok, recipe.output_dir)
            if getattr(recipe, "quantization_source", None) == "model" and is_main_process():
                print(f"note: model {recipe.model!r} is stored quantized: quantization {recipe.quantization} from its "
                      "config.json (k-bit preparation and LoRA, as with quantization:)")
            model = load_quantized_model(
                model_dir, quantization=recipe.quantization, lora=lora_config(recipe.lora) if recipe.lora else None,
                dtype=recipe.dtype, gradient_checkpointing=recipe.gradient_checkpointing,
            )
        elif recipe.lora is not None:
            from lowmem.quant import attach_lora

            model = attach_lora(model, lora_config(recipe.lora))
    except ValueError as err:
        if "not found in the base model" not in str(err):
            raise
        # peft's words name neither the field nor what the model has
        targets = (recipe.lora or {}).get("target_modules", "all-linear")
        raise ConfigError(f"lora.target_modules={targets!r} matched no layer of {type(model).__name__}: its linear "
                          f"layers are named {layers} (a list matches these names, a string is a regular expression "
                          f"over the full module name; 'all-linear' takes every one but the output head)") from err
    if model_dir is not None:
        for cfg in getattr(model, "peft_config", {}).values():
            # adapter_config.json names the base: absolute, so AutoPeftModelForCausalLM finds it from any directory
            # (peft wrote the path as typed, and from elsewhere a relative one was looked up on the Hub)
            cfg.base_model_name_or_path = str(Path(model_dir).resolve())
    return model, tok, model_dir


def lora_layer_names(model: nn.Module) -> list[str]:
    """The last name segment of every linear layer (``nn.Linear``, transformers' ``Conv1D``) of
    ``model``: what a ``lora.target_modules`` list can name."""
    from lowmem.optim.registry import is_projection_layer

    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if name and is_projection_layer(mod)})


def _policy_tokenizer_and_dir(recipe: TrainRecipe) -> tuple[Any, str]:
    """The tokenizer and the model directory TRL loads a DPO/GRPO policy (and reference) from, without
    loading the model here: a second copy of the weights stayed alive beside TRL's for the whole run, and
    TRL loaded the policy in its own default dtype (float32), not the recipe's (``model_init_kwargs``
    now carries it). The embedded tiny model is built in ``dtype`` and saved first."""
    from lowmem.kit import load_model_and_tokenizer, save_embedded_model

    if recipe.model is None:
        model, tok = load_model_and_tokenizer(None, dtype=recipe.dtype, seed=recipe.seed)
        return tok, save_embedded_model(model, tok, recipe.output_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(recipe.model, local_files_only=True)
    if tok.pad_token is None:  # as load_model_and_tokenizer does
        tok.pad_token = tok.eos_token
    return tok, recipe.model


def _memory_args(recipe: TrainRecipe) -> dict[str, Any]:
    """``lowmem_layerwise`` and the recipe's ``gradient_checkpointing``, always given: TRL's configs
    default ``gradient_checkpointing`` to ``True``, so leaving it out turned it on for every SFT-on-data,
    DPO and GRPO run of ``gradient_checkpointing: false``. Given under transformers 5's name
    ``activation_checkpointing`` (the old one warns), unless ``training_args`` sets either name."""
    out: dict[str, Any] = {"lowmem_layerwise": recipe.layerwise}
    if not {"activation_checkpointing", "gradient_checkpointing"} & set(recipe.training_args):
        out["activation_checkpointing"] = recipe.gradient_checkpointing
    return out


def _memory_callbacks(recipe: TrainRecipe) -> list[Any]:
    from lowmem.trainers.memory_callback import MemoryCallback

    return (([MemoryCallback(track_steps=2)] if recipe.track_memory else [])
            + [_batched_weights_note(recipe.optim), _best_metric_check(), _run_record_writer()])


def untargeted_batched_weights(optimizer: torch.optim.Optimizer, model: nn.Module,
                               target_key: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of the trainable weights of 3 or more dimensions (the fused experts of
    Mixtral, Qwen2-MoE, Qwen3-MoE in transformers 5: ``experts.gate_up_proj`` ``[E, 2i, h]``,
    ``experts.down_proj`` ``[E, h, i]``) that sit in a parameter group without ``target_key``
    (``rank``, ``use_muon``, ...), so they train in the untargeted group with full-size AdamW state.
    Recipes registered with ``batched_targets`` (Muon, SinkGD, SCALE, the subspace recipes GaLore, Fira,
    FRUGAL, Online Subspace Descent, APOLLO, and Subset-Norm / Subspace-Momentum) step them per matrix
    and leave them untargeted only where ``target_modules`` leaves them out; the others (those not yet
    registered so) target 2-D ``nn.Linear`` / ``Conv1D`` weights only."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    names = {id(p): n for n, p in model.named_parameters()}
    convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}  # (not experts)
    return [(names.get(id(p), "?"), tuple(p.shape)) for g in opt.param_groups
            if g.get(target_key) in (None, False) for p in g["params"] if p.dim() >= 3 and id(p) not in convs]


def batched_weights_message(optim: str, target_key: str, found: list[tuple[str, tuple[int, ...]]], trainable: int) -> str:
    """The note :func:`untargeted_batched_weights` gives a user (see there)."""
    n = sum(torch.Size(s).numel() for _, s in found)
    name, shape = found[0]
    if get_entry(optim).batched_targets:  # Muon, SinkGD, SCALE, the subspace recipes: per matrix when target_modules selects them
        return (f"{optim}: {len(found)} weights of 3 or more dimensions ({n:,} of {trainable:,} trainable parameters, "
                f"{100 * n / max(trainable, 1):.0f}%; e.g. {name} {list(shape)}, fused MoE experts) are not selected by "
                f"target_modules and train in its AdamW group with full-size state; add their names (e.g. "
                f"'{name.rsplit('.', 1)[-1]}') to target_modules, or leave target_modules unset, to train them per matrix")
    return (f"{optim} targets 2-D projection layers (nn.Linear / Conv1D; {target_key}) only: {len(found)} weights of 3 "
            f"or more dimensions ({n:,} of {trainable:,} trainable parameters, {100 * n / max(trainable, 1):.0f}%; e.g. "
            f"{name} {list(shape)}, fused MoE experts) train in its untargeted group with full-size AdamW state; "
            "to save that memory, freeze them or train with lora: (peft adapts fused experts through target_parameters)")


def _batched_weights_note(optim: str) -> Any:
    from transformers import TrainerCallback

    class BatchedWeightsNote(TrainerCallback):
        """Warn once, when training starts, about :func:`untargeted_batched_weights`."""

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            key = get_entry(optim).target_key
            if key is None or model is None or optimizer is None or not state.is_world_process_zero:
                return
            found = untargeted_batched_weights(optimizer, model, key)
            if found:
                from lowmem._warn import warn_user

                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                warn_user(batched_weights_message(get_entry(optim).name, key, found, trainable))

    return BatchedWeightsNote()


# what every evaluation logs besides its metrics (transformers' speed metrics)
EVAL_TIMINGS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def best_metric_problem(name: str | None, metrics: dict[str, Any]) -> str | None:
    """Why ``metric_for_best_model`` (``name``; transformers adds the ``eval_`` prefix) names no metric of an
    evaluation's ``metrics``, or ``None``."""
    if not name:
        return None
    key = name if name.startswith("eval_") else f"eval_{name}"
    if key in metrics:
        return None
    reported = sorted(k for k in metrics if k.startswith("eval_") and k not in EVAL_TIMINGS)
    example = "eval_loss" if "eval_loss" in reported or not reported else reported[0]
    return (f"metric_for_best_model={name!r}: the evaluation reports no {key!r}; it reports {reported}: set "
            f"metric_for_best_model to one of them (the eval_ prefix may be left out: {example[len('eval_'):]!r})")


def _best_metric_check() -> Any:
    from transformers import TrainerCallback

    class BestMetricCheck(TrainerCallback):
        """At the first evaluation (``eval_on_start``: before any step), a ``metric_for_best_model`` the evaluation
        does not report is a :class:`ConfigError`: transformers raised a ``KeyError`` at the first checkpoint,
        after training steps had run (:func:`best_metric_problem`)."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            problem = best_metric_problem(args.metric_for_best_model, metrics or {})
            if problem is not None:
                raise ConfigError(problem)

    return BestMetricCheck()


def _memory_metrics(trainer: Any) -> dict[str, Any]:
    """``{"memory": {component: peak bytes}}`` from the run's MemoryCallback, if any."""
    from lowmem.trainers.memory_callback import COMPONENTS, MemoryCallback

    cb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, MemoryCallback)), None)
    return {"memory": dict(sorted(cb.peak.items(), key=lambda kv: COMPONENTS.index(kv[0])))} if cb is not None else {}


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (same tags refused) that also refuses a key given twice in one mapping:
    PyYAML keeps the last value silently (``lr: 1e-4`` ... ``lr: 1e-2`` trained at 1e-2; so do ``trl``'s
    ``TrlParser`` and LLaMA-Factory, which read YAML with it)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: the keys after it override, as YAML says
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); give it once", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


class _Null:
    """An override that sets its key to null (the YAML file's ``key: null``); a plain ``None`` means "not given"."""

    def __repr__(self) -> str:
        return "NULL"


#: ``load_recipe(path, max_length=NULL)``: the key set to null, as ``max_length: null`` in the file or
#: ``--max_length null`` on the command line (a keyword override of ``None`` is skipped: argparse's unset flags).
NULL = _Null()


def load_recipe(path: str | Path | None = None, **overrides: Any) -> TrainRecipe:
    """Read a YAML recipe (``yaml.safe_load``; a key given twice in a mapping is an error) and apply ``overrides`` (``None`` values are skipped;
    :data:`NULL` sets a key to null).

    ``overrides`` take the same keys as the YAML file, mapped the same way (``learning_rate=1e-3``
    sets ``lr``; ``max_length=64`` joins ``training_args``), with the same errors (``lr`` and
    ``learning_rate`` together; an unknown key); they win over the file's values, and their
    ``training_args`` entries are merged into the file's. Relative paths in the file are from its
    folder (:func:`resolve_recipe_paths`), those in ``overrides`` from the current directory.

    ``path=None`` reads ``configs/default.yaml`` of the lowmem checkout when present, else uses
    the :class:`TrainRecipe` defaults. Keys are :class:`TrainRecipe` fields, their
    ``TrainingArguments`` names (:data:`RECIPE_ALIASES`: ``learning_rate`` for ``lr``, ...), or any
    field of the trainer's config class (:func:`config_class`: ``TrainingArguments``,
    ``SFTConfig``, ``DPOConfig``, ``GRPOConfig``, ...), which joins ``training_args``.

    Raises:
        ConfigError: (a ``ValueError``) The file cannot be read or is not a YAML mapping
            (malformed YAML, a ``!!python`` tag, binary data), unknown keys (the message lists the
            valid ones and close matches), a key given twice, or an invalid value (the message
            names the field).
    """
    data: dict[str, Any] = {}
    # errors name the recipe file the user gave; the implicit default.yaml is no file of theirs (an error then
    # comes from their flags or keyword overrides, and "configs/default.yaml: ..." blamed a file they never wrote)
    where = f"{path}: " if path is not None else ""
    if path is None and DEFAULT_RECIPE.is_file():
        path = DEFAULT_RECIPE
    if path is not None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"recipe file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{where}cannot read the recipe as YAML text: {err}") from None
        try:
            data = yaml.load(text, Loader=_RecipeLoader) or {}  # yaml.safe_load, duplicate keys refused
        except yaml.YAMLError as err:  # malformed YAML, or a tag safe_load refuses (!!python/object)
            raise ConfigError(f"{where}invalid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}a recipe is a YAML mapping of keys {list(RECIPE_KEYS)}")
    given = {k: None if v is NULL else v for k, v in overrides.items() if v is not None}
    # the config class (for top-level TRL fields) follows the trainer and dataset in effect: --dataset makes
    # SFT TRL's SFTTrainer, so SFTConfig's fields are valid in the file too
    written = frozenset(k for k in (*data, *given) if isinstance(k, str))  # top-level keys as written (recipe_key)
    context = {k: given.get(k, data.get(k)) for k in ("trainer", "dataset")}
    source = optim_source(data if where else {}, given)  # configs/default.yaml's optim is lowmem's default
    data = _recipe_keys(data, where, base=Path(path).resolve().parent if path is not None else None, **context)
    _drop_inert_steps(data)
    if path is not None:  # the recipe's relative input paths are relative to its folder (overrides: to the cwd)
        data = resolve_recipe_paths(data, Path(path).resolve().parent)
    # keyword overrides (CLI flags, Python) go through the same mapping as YAML keys and win over them
    extra = _recipe_keys(given, "", **context)
    _run_length_precedence(data, extra)
    _data_precedence(data, extra)
    if isinstance(data.get("training_args"), dict) and isinstance(extra.get("training_args"), dict):
        extra["training_args"] = {**data["training_args"], **extra["training_args"]}  # merged, overrides win
    data.update(extra)
    recipe = TrainRecipe.__new__(TrainRecipe)
    recipe.optim_source = source  # known before __post_init__'s checks, whose messages may name it
    recipe.given_keys = frozenset(data)  # the keys the recipe file and the overrides name (not the defaults)
    recipe.written_keys = written
    try:
        recipe.__init__(**data)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
    return recipe


# the recipe keys (and TrainingArguments / LowMemTrainingArguments fields) that name the optimizer
OPTIM_KEYS = ("optim", "lowmem_optim")

# TrainRecipe.optim_source: where the optimizer of a run was named, as the startup line and metrics.json say it
OPTIM_SOURCES = {
    "override": "a flag / keyword override", "override training_args": "training_args.optim of a flag / override",
    "recipe": "the recipe", "recipe training_args": "the recipe's training_args.optim (the HF Trainer's optim)",
    "default": "lowmem's default; TRL's and the HF Trainer's is adamw_torch",
}


def optim_source(data: dict[str, Any], overrides: dict[str, Any]) -> str:
    """Where a recipe's optimizer is named (a key of :data:`OPTIM_SOURCES`): an override (a ``lowmem train``
    flag, a keyword of :func:`load_recipe`) wins over the recipe file ``data``; in each, ``optim`` /
    ``lowmem_optim`` or ``training_args: {optim: ...}`` (the HF Trainer's field, which wins there, as
    :func:`_lift_training_args` applies it last). ``"default"`` when neither names one: lowmem's default
    optimizer (``adafactor``; ``configs/default.yaml``'s when no recipe is given) runs, where ``trl sft`` and the
    Hugging Face Trainer run AdamW for the same config."""
    for name, keys in (("override", overrides), ("recipe", data)):
        ta = keys.get("training_args")
        if isinstance(ta, dict) and any(k in ta for k in OPTIM_KEYS):
            return f"{name} training_args"
        if any(keys.get(k) is not None for k in OPTIM_KEYS):
            return name
    return "default"


def _drop_inert_steps(data: dict[str, Any]) -> None:
    """A recipe file's ``save_steps`` / ``eval_steps`` beside its own ``save_strategy`` / ``eval_strategy``
    other than ``"steps"`` (``"no"``, ``"epoch"``, ``"best"``) are dropped, in place: the Trainer ignores them (a saved ``training_args.json`` with saving off
    still holds ``save_steps: 500``), and as recipe keys they would turn saving / evaluation on. A
    ``--save-steps`` / ``--eval-steps`` against such a strategy is an error (:func:`_lift_training_args`)."""
    ta = data.get("training_args")
    if not isinstance(ta, dict):
        return
    for kind in ("save", "eval"):
        if _strategy(ta.get(f"{kind}_strategy", "steps")) != "steps":
            data.pop(f"{kind}_steps", None)


def _run_length_precedence(data: dict[str, Any], extra: dict[str, Any]) -> None:
    """``steps`` against ``num_train_epochs`` between a recipe file (``data``) and its overrides
    (``extra``), in place: an override of one wins over the file's other (``--steps 5`` on a recipe of
    ``num_train_epochs: 3`` runs 5 steps), and ``num_train_epochs`` without any ``steps`` trains by
    epochs (``steps: None``; else the default 200 steps would silently win). Both in one place stay
    for :func:`_check_run_length` to refuse."""
    def epochs(d: dict[str, Any]) -> bool:
        return isinstance(d.get("training_args"), dict) and "num_train_epochs" in d["training_args"]

    if "steps" in extra and not epochs(extra) and epochs(data):
        data["training_args"] = {k: v for k, v in data["training_args"].items() if k != "num_train_epochs"}
    if epochs(extra) and "steps" not in extra:
        data.pop("steps", None)
    if (epochs(data) or epochs(extra)) and "steps" not in data and "steps" not in extra:
        extra["steps"] = None


# Recipe fields that exclude each other: an override of one replaces the file's other (``--dataset`` on a
# recipe of ``task: addition`` trains on the dataset; ``--eval-dataset`` on one of ``eval_split: 0.1`` evaluates
# on the file), as an override of a field replaces the file's value of that field.
EXCLUSIVE_FIELDS: tuple[tuple[str, str], ...] = (("dataset", "task"), ("eval_dataset", "eval_split"))


def _data_precedence(data: dict[str, Any], extra: dict[str, Any]) -> None:
    """The data fields of a recipe file (``data``) against its overrides (``extra``, CLI flags or keyword
    overrides), in place: an override of one of a pair of :data:`EXCLUSIVE_FIELDS` drops the file's other
    (both overridden stay for the recipe's check to refuse); a ``dataset`` override on a file without one drops the
    file's ``train_size`` / ``eval_size`` (the synthetic task's). ``reward_funcs`` overridden without
    ``reward_weights`` while the file has ``reward_weights``: those weights were the file's functions', so
    this is an error asking for the weights of the new functions (keeping them would weigh other functions,
    dropping them would silently change the file's weighting)."""
    for a, b in EXCLUSIVE_FIELDS:
        for mine, other in ((a, b), (b, a)):
            if mine in extra and other not in extra and data.get(other) is not None:
                data.pop(other)
    if extra.get("dataset") is not None and data.get("dataset") is None:
        # --dataset on a recipe written for the synthetic task (configs/dpo.yaml's train_size: 256): the file's sizes
        # of that task go with it, as the file's half of an exclusive pair does (an override's own is refused)
        for key in ("train_size", "eval_size"):
            if key not in extra:
                data.pop(key, None)
    if "reward_funcs" in extra and "reward_weights" not in extra and data.get("reward_weights") is not None \
            and extra["reward_funcs"] != data.get("reward_funcs"):
        raise ConfigError(f"reward_funcs={extra['reward_funcs']!r} (--reward-funcs) replaces the recipe's "
                          f"reward_funcs={data.get('reward_funcs')!r}, whose reward_weights={data['reward_weights']!r} "
                          "the recipe also sets: give the weights of the new functions too (--reward-weights, one per "
                          "function)")


# Recipe fields naming files or folders the run reads. In a recipe file, relative paths in them are
# relative to the recipe file's folder (resolve_recipe_paths); output_dir, and a checkpoint to resume,
# are where runs write, relative to the current directory like every command-line flag.
INPUT_PATH_FIELDS = ("model", "dataset", "eval_dataset", "chat_template", "reward_funcs")


def _rebase(value: Any, base: Path) -> Any:
    """``base / value`` for a relative path string; anything else (absolute, ``~``, not a string) unchanged."""
    if not isinstance(value, str) or not value.strip():
        return value  # the field's own check reports it
    p = Path(value.strip()).expanduser()
    return value if p.is_absolute() else str(base / p)


def _rebase_reward(entry: Any, base: Path) -> Any:
    """A ``reward_funcs`` entry with its file part rebased: ``path/to/file.py:function`` and a
    reward-model directory; built-in names and ``package.module:function`` are not paths."""
    from lowmem.rewards import BUILTIN_REWARDS

    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        return {**entry, "name": _rebase_reward(entry["name"], base)}
    if not isinstance(entry, str) or entry.strip() in BUILTIN_REWARDS:
        return entry
    ref = entry.strip()
    if ":" in ref:
        target, func = ref.rsplit(":", 1)
        return f"{_rebase(target, base)}:{func}" if target.endswith(".py") else entry
    if "/" in ref or "\\" in ref or (base / ref).is_dir():  # a reward-model directory (lowmem.rewards' rule)
        return _rebase(ref, base)
    return entry  # a bare name: a misspelt built-in stays one ("Unknown reward ...")


def resolve_recipe_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """``data`` (recipe keys read from a file in folder ``base``) with the relative paths of
    :data:`INPUT_PATH_FIELDS` made relative to ``base``: ``model``, ``dataset`` and
    ``eval_dataset`` (a path or a list), ``chat_template`` when it is a path (not Jinja text), the
    file part of ``reward_funcs`` entries. So a recipe and its data move together, and a recipe
    shipped in the wheel finds the data shipped beside it. Types are not checked here."""
    out = dict(data)
    for name in ("model", "dataset", "eval_dataset"):
        value = out.get(name)
        out[name] = [_rebase(v, base) for v in value] if isinstance(value, list) else _rebase(value, base)
    template = out.get("chat_template")
    if isinstance(template, str) and "{{" not in template and "{%" not in template:
        out["chat_template"] = _rebase(template, base)
    if isinstance(out.get("reward_funcs"), list):
        out["reward_funcs"] = [_rebase_reward(e, base) for e in out["reward_funcs"]]
    return {k: v for k, v in out.items() if k in data}


def _local_path(value: Any, base: Path | None) -> bool:
    """Whether ``value`` names an existing local file or folder (a relative one from ``base``, the recipe's folder,
    else the current directory): ``trl sft``'s ``dataset_name`` that lowmem reads as ``dataset``; a Hub id names none."""
    if not isinstance(value, str) or not value.strip():
        return False
    p = Path(value.strip()).expanduser()
    return (p if p.is_absolute() or base is None else base / p).exists()


def _recipe_keys(data: dict[str, Any], where: str, trainer: str | None = None,
                 dataset: str | list[str] | None = None, base: Path | None = None) -> dict[str, Any]:
    """Recipe fields of ``data``; aliases (``learning_rate``) renamed, fields of the trainer's
    config class moved into ``training_args``, anything else an error: every refused key in one error
    (a pasted TRL config's ``warmup_ratio``, ``dataset_name`` of a Hub id, ... together), each with its fix.
    ``dataset_name`` naming an existing local file or folder (relative: from ``base``, the recipe's folder;
    else the current directory) is ``dataset``, as TRL reads it. ``trainer`` and ``dataset``
    (those in effect, overrides included) choose the config class; default: ``data``'s own."""
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    refused: dict[str, str] = {}  # keys refused with their fix (warmup_ratio), reported with the unknown keys in one error
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}recipe keys are names; got {key!r}")
        if key in RECIPE_KEYS:
            out[key] = value
        elif key == "warmup_ratio":  # HF configs before transformers 5; TrainingArguments has no such field now
            warmup = (f"transformers 5 has no warmup_ratio; write warmup_steps: {value!r} (a warmup_steps below 1 is a "
                      "fraction of the steps)")
            refused[key] = f"warmup_ratio -> warmup_steps: {value!r} ({warmup.split('; ', 1)[0]}; below 1 is a fraction)"
        elif key == "dataset_name" and _local_path(value, base):  # `trl sft`'s local dataset_name (TRL loads the folder)
            if "dataset" in data:
                raise ConfigError(f"{where}'dataset_name' and 'dataset' set the same value; give one")
            out["dataset"] = value
        elif key in RECIPE_ALIASES:
            if RECIPE_ALIASES[key] in data:
                raise ConfigError(f"{where}{key!r} and {RECIPE_ALIASES[key]!r} set the same value; give one")
            out[RECIPE_ALIASES[key]] = value
        else:
            extra[key] = value
    if not extra and refused:
        raise ConfigError(f"{where}warmup_ratio={data['warmup_ratio']!r}: {warmup}")
    if not extra:
        return out
    trainer = trainer if trainer is not None else out.get("trainer", TrainRecipe.trainer)
    if trainer not in AVAILABLE_TRAINERS:
        raise ConfigError(f"{where}Unknown trainer {trainer!r}; available: {list(AVAILABLE_TRAINERS)}")
    given = dataset if dataset is not None else out.get("dataset")
    if given is None and set(extra) & DATASET_KEYS:  # `trl sft --config`'s dataset_name: its SFTConfig fields are valid
        given = next(k for k in sorted(extra) if k in DATASET_KEYS)
    cls = config_class(trainer, given)
    valid = set(field_types(cls))
    unknown = sorted(set(extra) - valid)
    if refused and not unknown:  # every other key is the trainer's: warmup_ratio's own message
        raise ConfigError(f"{where}warmup_ratio={data['warmup_ratio']!r}: {warmup}")
    if unknown:
        import difflib

        # a config written for another trainer (a saved DPOConfig / GRPOConfig run without `trainer:`); SFTConfig's
        # fields under sft without a dataset are not that case (they need the dataset)
        sft_fields = set(field_types(config_class("sft", True)))
        others = [t for t in AVAILABLE_TRAINERS if t != trainer and not (trainer == "sft" and set(unknown) <= sft_fields)
                  and set(unknown) <= set(field_types(config_class(t, True)))
                  and not set(unknown) <= set(FOREIGN_KEYS)]  # an older TRL's key: its hint, not another trainer
        if others:
            raise ConfigError(
                f"{where}unknown recipe key(s) "
                f"{unknown if len(unknown) <= 6 else str(unknown[:5])[:-1] + f', ... ({len(unknown)} keys)]'} for the "
                f"{trainer} trainer's {cls.__name__}" + (" (trainer: sft is the default)" if "trainer" not in out else "")
                + f"; they are fields of {', '.join(config_class(t, True).__name__ for t in others)}: set trainer: "
                f"{' / '.join(others)} in the recipe (or --trainer {others[0]})"
                + (f"; and {'; '.join(refused.values())}" if refused else "")
            )
        foreign = [f"{k} -> {FOREIGN_KEYS[k]}" for k in unknown if k in FOREIGN_KEYS] + list(refused.values())
        close = sorted({m for k in unknown if k not in FOREIGN_KEYS
                        for m in difflib.get_close_matches(k, list(RECIPE_KEYS) + sorted(valid), n=3)})
        raise ConfigError(
            f"{where}unknown recipe key(s) {sorted(unknown + list(refused))}"
            + (f"; lowmem's spelling: {'; '.join(foreign)}" if foreign else "")
            + (f"; did you mean {close}?" if close else "")
            + f"; valid keys: {list(RECIPE_KEYS)}, or any field of the {trainer} trainer's {cls.__name__}"
        )
    ta = out.get("training_args") or {}
    if not isinstance(ta, dict):
        raise ConfigError(f"{where}training_args={ta!r}: expected a mapping")
    both = sorted(set(ta) & set(extra))
    if both:
        raise ConfigError(f"{where}{both} given both at the top level and in training_args; give each once")
    out["training_args"] = {**ta, **extra}
    return out


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters, each once (tied weights are shared)."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return list(seen.values())


def adamw_state_bytes(model: nn.Module) -> int:
    """Exact AdamW state bytes for ``model``'s trainable parameters (float32 moments + step
    counters), computed by lowmem's AdamW over meta-device copies: nothing is allocated. The copies take each
    parameter's whole shape: an FSDP2 ``DTensor``'s ``shape`` is the global one (``empty_like`` would keep it a
    ``DTensor``, whose state AdamW sizes by this process's shard), so this is the unsharded state on every rank."""
    metas = [nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta")) for p in trainable_parameters(model)]
    opt = create_optimizer(metas, "adamw")
    opt.materialize_state()
    return opt.state_bytes()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's state (``state_bytes()`` for lowmem optimizers, else every tensor).
    Unwraps accelerate's ``AcceleratedOptimizer``."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))


def optimizer_state_sharded(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer steps FSDP2 shards (``DTensor`` parameters): its :func:`optimizer_state_bytes`
    is then this process's part of the state (its shards and what it keeps whole), not the whole."""
    from torch.distributed.tensor import DTensor

    optimizer = getattr(optimizer, "optimizer", optimizer)
    return any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])


def build_training_args(recipe: TrainRecipe) -> Any:
    """The trainer's config object (:func:`config_class`) for ``recipe``: the fields derived from
    the recipe, then ``training_args`` (which win). Built by :func:`run` before any model loads, so
    a value the config class rejects fails early."""
    cls = config_class(recipe.trainer, getattr(recipe, "dataset", None))
    from lowmem.trainers import LowMemTrainingArguments

    fields: dict[str, Any] = {
        "output_dir": recipe.output_dir, "lowmem_optim": recipe.optim, "lowmem_optim_args": dict(recipe.optim_args),
        "learning_rate": recipe.lr, "weight_decay": recipe.weight_decay, "lr_scheduler_type": recipe.lr_scheduler,
        "warmup_steps": recipe.warmup_steps, "max_steps": -1 if recipe.steps is None else recipe.steps,
        "per_device_train_batch_size": recipe.batch_size,
        "logging_steps": recipe.logging_steps, "seed": recipe.seed,
        "save_strategy": "steps" if recipe.save_steps else "no", "save_steps": recipe.save_steps or 500,
        "eval_strategy": "steps" if recipe.eval_steps else "no", "report_to": recipe.report_to,
        "disable_tqdm": False, "dataloader_pin_memory": False, **_memory_args(recipe),
    }
    if getattr(recipe, "hf_embeddings_32bit", False) and not recipe.layerwise:
        fields["lowmem_embeddings_32bit"] = True  # as transformers' Trainer for this HF optim name
    if recipe.eval_steps:
        fields["eval_steps"] = recipe.eval_steps
    if recipe.trainer in ("sft", "dpo"):
        fields["per_device_eval_batch_size"] = 64
    else:  # whole groups of num_generations completions per eval batch, as in training (TRL and GVPO check it)
        fields["per_device_eval_batch_size"] = recipe.batch_size
    if cls is not LowMemTrainingArguments:
        fields["bf16"] = recipe.dtype == "bfloat16"
    if getattr(recipe, "reward_weights", None) is not None:
        fields["reward_weights"] = recipe.reward_weights
    if recipe.trainer != "sft":  # TRL loads the policy (without adapters) and the reference by path: in dtype
        fields["model_init_kwargs"] = {**(recipe.training_args.get("model_init_kwargs") or {}), "dtype": recipe.dtype}
    if launched_processes() > 1 and not torch.cuda.is_available():
        # several processes (torchrun / accelerate launch) and no GPU: data-parallel on the CPU over gloo.
        # Without use_cpu, transformers would leave each process training on its own (issue 16).
        fields["use_cpu"] = True
        _refuse_fsdp_on_cpu(recipe.training_args)
    # training_args win, except model_init_kwargs: fields holds it merged with the recipe's dtype
    kwargs = {**fields, **{k: v for k, v in recipe.training_args.items() if not (k == "model_init_kwargs" and k in fields)}}
    if ((kwargs.get("bf16") or kwargs.get("bf16_full_eval")) and "use_cpu" not in recipe.training_args
            and not _accelerator_visible()):
        # bf16 autocast (bf16_full_eval: the model cast for evaluation) on a machine without a GPU: transformers
        # refuses it ("Your setup doesn't support bf16/gpu. You need to assign use_cpu") unless use_cpu is set,
        # which here changes no device
        kwargs["use_cpu"] = True
    check_half_precision(kwargs)
    check_fsdp_conflicts(recipe, kwargs)
    if kwargs.get("load_best_model_at_end") and _strategy(kwargs.get("eval_strategy", "no")) == "no":
        # the Trainer keeps the last weights and says nothing: no evaluation ever picks a best checkpoint
        raise ConfigError("load_best_model_at_end=true needs evaluations to pick the best checkpoint from, and this run "
                          "evaluates never: set eval_steps (with eval_dataset or eval_split, and save_steps a multiple of "
                          "it), or drop load_best_model_at_end")
    if (kwargs.get("bf16") or kwargs.get("bf16_full_eval")) and not kwargs.get("use_cpu") and torch.cuda.is_available() \
            and not _cuda_bf16_supported():
        # transformers: "Your setup doesn't support bf16/gpu. You need to assign use_cpu ... Ampere+": use_cpu is no fix
        given = [k for k in ("bf16", "bf16_full_eval") if recipe.training_args.get(k)]
        raise ConfigError(f"{' and '.join(f'{k}=true' for k in given) or repr(recipe.dtype).join(('dtype=', ' (which sets bf16: true)'))}: "
                          f"this GPU ({torch.cuda.get_device_name()}) has no bfloat16 support (an Ampere or newer GPU has); "
                          "use fp16: true with dtype float32 (float16 mixed precision), or dtype float32 alone")
    if kwargs.get("fp16") and recipe.dtype == "bfloat16" and "bf16" not in recipe.training_args:
        # bf16 above came from dtype: transformers' "At most one of fp16 and bf16 can be True" names a field the
        # user never wrote
        raise ConfigError("fp16=true (float16 mixed precision) and dtype='bfloat16' (bfloat16 weights, which sets bf16: "
                          "true) conflict; give one: dtype: bfloat16 without fp16, or fp16: true with dtype float32 "
                          "(or float16 for a LoRA / QLoRA base)")
    _check_generation_groups(recipe, cls, kwargs)
    if recipe.layerwise:  # a bnb_* optim: the recipe's keys named (before the paged check: layerwise is the cause)
        from lowmem.optim.layerwise import layerwise_refusal

        refused = layerwise_refusal(recipe.optim, "layerwise")
        if refused is not None:
            raise ConfigError(f"optim={recipe.optim!r} with {refused}")
    from lowmem.optim.recipes.bnb import BNB_OPTIMIZERS, unpaged_names

    if BNB_OPTIMIZERS.get(recipe.optim, (None, 0, False))[2] and (kwargs.get("use_cpu") or not torch.cuda.is_available()):
        # (refused by the optimizer too, after the model loaded: bitsandbytes fell back to unpaged state on the CPU)
        unpaged = unpaged_names(BNB_OPTIMIZERS[recipe.optim][0])
        raise ConfigError(f"optim={recipe.optim!r} is bitsandbytes' paged optimizer (state in CUDA unified memory), and "
                          f"this run trains on the CPU ({'use_cpu' if kwargs.get('use_cpu') else 'no GPU is visible'}), "
                          f"where bitsandbytes falls back to unpaged state; use {unpaged} on the "
                          "CPU (adamw_8bit / lion_8bit for the Hugging Face names), or train on a GPU")
    check_schedule(kwargs)
    check_dependent_fields(cls, kwargs, recipe_key(recipe))  # the field named as the recipe writes it
    if recipe.trainer == "dpo":
        check_dpo_fields(kwargs, recipe_key(recipe))
    from lowmem.trainers.trl import ConfigFieldError, check_eval_groups

    key = recipe_key(recipe)
    try:
        args = cls(**kwargs)
    except ConfigFieldError as err:  # the config's own check, its fields named as the recipe writes them
        raise ConfigError(err.named(key)) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{cls.__name__}: {err}") from None
    try:  # checks the trainer makes when built, after the model loaded (lowmem train: TRL loads it by path)
        if (recipe.trainer in ("grpo", "gvpo", "bnpo") and args.eval_strategy == "no"
                and (getattr(recipe, "eval_dataset", None) is not None or getattr(recipe, "eval_split", None))):
            check_eval_groups(args, launched_processes())  # evaluate() before and after training (rl_eval_prompts)
        if recipe.trainer == "bnpo":  # one reward_range pair per reward function (the synthetic task: one)
            from lowmem.trainers.bnpo import _ranges

            funcs = recipe.reward_funcs
            _ranges(args.reward_range, len(funcs) if isinstance(funcs, (list, tuple)) else 1)
    except ConfigFieldError as err:
        raise ConfigError(err.named(key)) from None
    from lowmem.trainers.hf import NAMED_FIELDS_ATTR, OPTIONAL_FIELDS

    # the adam_* fields the recipe names apply to the optimizer even at their TrainingArguments defaults
    # (trainers.hf.user_set_fields); those it does not name leave the optimizer's own defaults
    setattr(args, NAMED_FIELDS_ATTR, frozenset(OPTIONAL_FIELDS) if getattr(recipe, "hf_optim", False)  # (HF's meaning)
            else frozenset(k for k in recipe.training_args if k in OPTIONAL_FIELDS))
    return args


def recipe_key(recipe: TrainRecipe) -> Callable[[str], str]:
    """How ``lowmem train``'s errors name a trainer-config field (``lowmem.trainers.trl.ConfigFieldError.named``):
    as the recipe wrote it: its own key where lowmem sets the field from one (``batch_size`` for
    ``per_device_train_batch_size``; ``per_device_eval_batch_size``, unset, is GRPO's ``batch_size`` too), ``training_args.
    <field>`` where ``training_args`` holds it, the bare field name when written at the top level (or left at the
    config's default)."""
    written = getattr(recipe, "written_keys", frozenset())
    ta = recipe.training_args

    def key(field: str) -> str:
        alias = RECIPE_ALIASES.get(field)
        if alias is not None:  # per_device_train_batch_size -> batch_size, ...
            return alias
        if field == "per_device_eval_batch_size" and field not in ta and recipe.trainer in ("grpo", "gvpo", "bnpo"):
            return "batch_size"  # (build_training_args sets the eval batch from it)
        if field in ta and field not in written:
            return f"training_args.{field}"
        return field

    return key


# transformers' get_scheduler builds these without num_warmup_steps (constant: without its kwargs either)
NO_WARMUP_SCHEDULERS = ("constant", "reduce_lr_on_plateau", "greedy")
_SCHEDULER_OWN_ARGS = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# (test(value, lr), the valid range in words; "{lr}" is the run's learning rate)
_Rule = tuple[Callable[[Any, float], bool], str]
_CYCLES: _Rule = (lambda v, lr: _real(v) and v > 0, "a number > 0 (the cosine waves over the decay; 0.5, the default, "
                                                     "is one half wave down to the minimum)")
_RATE: _Rule = (lambda v, lr: _real(v) and 0 <= v <= 1, "a number in [0, 1] (a fraction of lr)")
_COUNT: _Rule = (lambda v, lr: _whole(v) and v >= 0, "an integer >= 0")
_NONNEG: _Rule = (lambda v, lr: _real(v) and v >= 0, "a number >= 0")
_FACTOR: _Rule = (lambda v, lr: _real(v) and 0 < v < 1, "a number in (0, 1) (torch: 'Factor should be < 1.0')")
_LR_BOUND: _Rule = (lambda v, lr: (_real(v) and v >= 0) or (isinstance(v, (list, tuple)) and len(v) > 0
                                                            and all(_real(x) and x >= 0 for x in v)),
                    "a number >= 0, or a list of them (one per parameter group)")
_MIN_LR: _Rule = (lambda v, lr: v is None or (_real(v) and 0 <= v <= lr), "a number in [0, lr] ([0, {lr}]), or null")
_MIN_LR_RATE: _Rule = (lambda v, lr: v is None or _RATE[0](v, lr), "a number in [0, 1] (min_lr / lr), or null")


def _choice(*names: str) -> _Rule:
    return (lambda v, lr: v in names, f"one of {list(names)}")


_PLATEAU_COMMON: dict[str, _Rule] = {
    "mode": _choice("min", "max"), "factor": _FACTOR, "patience": _COUNT, "threshold": _NONNEG,
    "threshold_mode": _choice("rel", "abs"), "cooldown": _COUNT, "min_lr": _LR_BOUND, "eps": _NONNEG,
}
# transformers 5's get_scheduler: the arguments each scheduler reads from lr_scheduler_kwargs, and the values for which
# it computes the schedule its name promises (lowmem.train.check_scheduler_kwargs). Outside them transformers either
# fails after the model loaded (num_cycles: null, a TypeError at the first step; lr_end >= lr, a ValueError), or runs a
# different schedule without a word (min_lr_rate -1: lr 0 for the second half of the run; 2: up to twice lr; a
# negative lr_end, power, min_lr_ratio or warmup_lr_rate: a negative learning rate; num_cycles 0: a constant lr).
SCHEDULER_KWARG_RANGES: dict[str, dict[str, _Rule]] = {
    "cosine": {"num_cycles": _CYCLES},
    "cosine_with_restarts": {"num_cycles": (_CYCLES[0], "a number > 0 (the hard restarts; transformers' default 1)")},
    "polynomial": {"lr_end": (lambda v, lr: _real(v) and 0 <= v < lr, "a number >= 0 and below lr ({lr})"),
                   "power": (lambda v, lr: _real(v) and v > 0, "a number > 0 (1: linear decay)")},
    "inverse_sqrt": {"timescale": (lambda v, lr: v is None or (_real(v) and v > 0),
                                   "a number > 0, or null (num_warmup_steps, else 10000)")},
    "cosine_with_min_lr": {"num_cycles": _CYCLES, "min_lr": _MIN_LR, "min_lr_rate": _MIN_LR_RATE},
    "cosine_warmup_with_min_lr": {"num_cycles": _CYCLES, "min_lr": _MIN_LR, "min_lr_rate": _MIN_LR_RATE,
                                  "warmup_lr_rate": (lambda v, lr: v is None or _RATE[0](v, lr),
                                                     "a number in [0, 1] (the first warm-up step's fraction of lr), or null")},
    "warmup_stable_decay": {"num_decay_steps": _COUNT, "num_stable_steps": (lambda v, lr: v is None or _COUNT[0](v, lr),
                                                                            "an integer >= 0, or null (steps - warm-up - decay)"),
                            "warmup_type": _choice("linear", "cosine", "1-sqrt"),
                            "decay_type": _choice("linear", "cosine", "1-sqrt"), "min_lr_ratio": _RATE,
                            "num_cycles": _CYCLES},
    "reduce_lr_on_plateau": _PLATEAU_COMMON,
    "greedy": {**_PLATEAU_COMMON, "warmup": _COUNT, "max_lr": _LR_BOUND, "verbose": _choice(True, False),
               "smooth": _choice(True, False), "window_size": (lambda v, lr: _whole(v) and v >= 1, "an integer >= 1"),
               "reset_start": _COUNT},
}


def _scheduler_params(name: str) -> list[str]:
    """The arguments transformers' scheduler ``name`` takes from ``lr_scheduler_kwargs`` (for the schedulers built
    from ``**kwargs``, ``reduce_lr_on_plateau`` and ``greedy``, those of the class they build)."""
    import inspect

    from transformers import SchedulerType
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    func = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    params = inspect.signature(func).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        if name == "reduce_lr_on_plateau":
            from torch.optim.lr_scheduler import ReduceLROnPlateau as built
        else:
            from transformers.optimization import GreedyLR as built
        params = inspect.signature(built.__init__).parameters
    return [k for k, p in params.items() if k not in (*_SCHEDULER_OWN_ARGS, "self")
            and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]


def check_scheduler_kwargs(name: str, extra: Any, lr: float, prefix: str = "") -> None:
    """``lr_scheduler_kwargs`` (``extra``) for transformers' scheduler ``name`` at learning rate ``lr``, as
    ``get_scheduler`` passes them: ``constant`` takes none (transformers drops them), a key the scheduler does not take
    is a TypeError at the first step, a required one missing (``warmup_stable_decay``'s ``num_decay_steps``;
    ``cosine_with_min_lr``'s one of ``min_lr`` / ``min_lr_rate``) a TypeError / ValueError after the model loaded, and a
    value outside :data:`SCHEDULER_KWARG_RANGES` a failure or a different schedule. Fields are named
    ``<prefix>lr_scheduler_kwargs.<key>`` (``lowmem train``: ``training_args.``; the Python API: ``<Config>.``).

    Raises:
        ConfigError: Naming the key, its value and the valid range (or the valid keys).
    """
    field = f"{prefix}lr_scheduler_kwargs"
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except ValueError:
            raise ConfigError(f"{field}={extra!r}: expected a mapping (or a JSON object)") from None
    extra = extra or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{field}={extra!r}: expected a mapping of the scheduler's arguments")
    if extra and name == "constant":
        raise ConfigError(f"{field}={extra!r} with lr_scheduler='constant': the constant scheduler takes "
                          "no arguments (transformers drops them); drop lr_scheduler_kwargs, or pick the scheduler "
                          "that reads them")
    if name == "constant":
        return
    valid = _scheduler_params(name)
    unknown = sorted(set(extra) - set(valid))
    if unknown:
        import difflib

        close = sorted({m for k in unknown for m in difflib.get_close_matches(k, valid, n=2)})
        raise ConfigError(f"{field}.{unknown[0]}: lr_scheduler={name!r} takes no such argument"
                          + (f"; did you mean {close}?" if close else "") + f"; valid: {valid}")
    for key, (ok, words) in SCHEDULER_KWARG_RANGES.get(name, {}).items():
        if key in extra and not ok(extra[key], lr):
            raise ConfigError(f"{field}.{key}={extra[key]!r} with lr_scheduler={name!r}: expected "
                              f"{words.replace('{lr}', f'{lr:g}')}")
    if name == "warmup_stable_decay" and "num_decay_steps" not in extra:
        raise ConfigError(f"{field}.num_decay_steps is required by lr_scheduler='warmup_stable_decay' (transformers' "
                          "get_wsd_schedule has no default: a TypeError at the first step): an integer >= 0, the steps "
                          "of the decay phase")
    if name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        given = [k for k in ("min_lr", "min_lr_rate") if extra.get(k) is not None]
        if len(given) != 1:
            raise ConfigError(f"{field} with lr_scheduler={name!r} needs exactly one of min_lr (in [0, lr]) and "
                              f"min_lr_rate (in [0, 1]); {'both are' if given else 'neither is'} set (transformers "
                              "refuses it with a ValueError when the scheduler is built, after the model loaded)")


def check_schedule(kwargs: dict[str, Any], prefix: str = "training_args.") -> None:
    """The schedule fields of a trainer's config (``kwargs``, before the class is built) that would not apply: a
    warm-up under a scheduler that has none (``constant``, lowmem's default; transformers' ``get_scheduler`` drops
    ``num_warmup_steps`` there), ``lr_scheduler_kwargs`` under ``constant`` (dropped too) or a key the scheduler
    function does not take (a TypeError at the first step otherwise) or a value out of its range
    (:func:`check_scheduler_kwargs`, its fields named with ``prefix``), and, for a run of ``max_steps`` steps, a
    ``warmup_steps`` that is not below it (the learning rate would never reach ``lr``), or an ``eval_delay`` beyond it
    (no evaluation would run during training). A ``save_steps`` / ``eval_steps`` beyond it is valid: the Trainer saves
    / evaluates at the last step under the ``steps`` strategies.

    Raises:
        ConfigError: Naming the field, the value and what is valid (and the fix, where there is one).
    """
    sched = kwargs.get("lr_scheduler_type", "linear")
    name = str(getattr(sched, "value", sched))
    warm = kwargs.get("warmup_steps") or 0
    ratio = kwargs.get("warmup_ratio") or 0
    if name in NO_WARMUP_SCHEDULERS and (warm or ratio):
        field, value = ("warmup_steps", warm) if warm else ("warmup_ratio", ratio)
        fix = "lr_scheduler: constant_with_warmup" if name == "constant" else "a scheduler with a warm-up (lr_scheduler: " \
              "constant_with_warmup, linear, cosine, ...)"
        raise ConfigError(f"{field}={value:g} with lr_scheduler={name!r}: this scheduler has no warm-up (transformers' "
                          f"get_scheduler drops it), so the run would start at the full lr; use {fix}, or drop {field}")
    check_scheduler_kwargs(name, kwargs.get("lr_scheduler_kwargs"), kwargs.get("learning_rate", 5e-5), prefix)
    steps = kwargs.get("max_steps", -1)
    if not isinstance(steps, int) or steps <= 0:
        return  # by epochs: the length is known only with the data
    if warm >= 1 and warm >= steps and name not in NO_WARMUP_SCHEDULERS:
        raise ConfigError(f"warmup_steps={warm:g} with steps={steps}: the learning rate would never reach lr; valid: "
                          f"a whole number below steps (1 .. {steps - 1}), or a fraction of steps below 1")
    # A save_steps / eval_steps beyond max_steps is valid: transformers' DefaultFlowCallback saves and evaluates at the
    # last step under the 'steps' strategies whatever the interval (so it acts as one equal to max_steps). The
    # evaluation there is skipped only while the step is below eval_delay: a delay beyond the run evaluates never.
    delay = kwargs.get("eval_delay") or 0
    if (_strategy(kwargs.get("eval_strategy", "no")) == "steps" and isinstance(delay, (int, float))
            and delay > steps):
        raise ConfigError(f"eval_delay={delay:g} with steps={steps}: transformers evaluates only from step eval_delay "
                          f"on, so no evaluation would run during training; valid: 0 .. {steps}")


# TRL 1.16 dpo_trainer: the loss types whose loss reads label_smoothing (sigmoid, TRL's default, does not any more)
DPO_LABEL_SMOOTHING_LOSSES = ("exo_pair", "robust", "aot", "aot_unpaired")


def _loss_types(kwargs: dict[str, Any]) -> list[str]:
    losses = kwargs.get("loss_type", "sigmoid")
    losses = [losses] if isinstance(losses, str) else list(losses or ["sigmoid"])
    return [str(getattr(t, "value", t)) for t in losses]


# TRL 1.16's GRPO loss types whose loss is the clipped surrogate (grpo_trainer._compute_loss): epsilon, epsilon_high, delta
GRPO_CLIP_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _grpo_loss(kwargs: dict[str, Any]) -> str:
    loss = kwargs.get("loss_type", "dapo")  # GRPOConfig's default (BNPO's too)
    return str(getattr(loss, "value", loss))


def _checkpointing_on(kwargs: dict[str, Any]) -> bool:
    # transformers 5's name, else its deprecated alias (lowmem's _memory_args always gives one of them)
    return bool(kwargs.get("activation_checkpointing", kwargs.get("gradient_checkpointing", True)))


# Config fields that only another setting reads (TRL 1.16, transformers 5): (field, the setting that reads it, whether
# that setting is on in the config's kwargs). A field set away from its default while its setting is off is refused
# (check_dependent_fields): it would be accepted and never read.
DEPENDENT_FIELDS: tuple[tuple[str, str, Any], ...] = (
    ("discopop_tau", "loss_type: discopop (alone or in the list; TRL's DiscoPOP loss)",
     lambda kw: "discopop" in _loss_types(kw)),
    ("f_alpha_divergence_coef", "f_divergence_type: alpha_divergence",
     lambda kw: str(getattr(kw.get("f_divergence_type"), "value", kw.get("f_divergence_type"))) == "alpha_divergence"),
    ("ref_model_sync_steps", "sync_ref_model: true (TR-DPO's SyncRefModelCallback)", lambda kw: bool(kw.get("sync_ref_model"))),
    ("ref_model_mixup_alpha", "sync_ref_model: true (TR-DPO's SyncRefModelCallback)", lambda kw: bool(kw.get("sync_ref_model"))),
    ("packing_strategy", "packing: true", lambda kw: bool(kw.get("packing"))),
    ("activation_checkpointing_kwargs", "gradient_checkpointing: true (activation_checkpointing)", _checkpointing_on),
    ("gradient_checkpointing_kwargs", "gradient_checkpointing: true (activation_checkpointing)", _checkpointing_on),
    # GRPO (TRL 1.16 grpo_trainer._compute_loss: the SAPO / VESPO branches of `loss_type`; the adaptive entropy
    # controller runs only `if self.use_adaptive_entropy`)
    *((name, "loss_type: sapo (SAPO's soft gate)", lambda kw: "sapo" in _loss_types(kw))
      for name in ("sapo_temperature_pos", "sapo_temperature_neg")),
    *((name, "loss_type: vespo (VESPO's gamma weights)", lambda kw: "vespo" in _loss_types(kw))
      for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")),
    # TRL 1.16 grpo_trainer._compute_loss reads the clipping fields only in the clipped-surrogate branch (grpo, bnpo,
    # dr_grpo, dapo, luspo); cispo reads epsilon_high as its eps_max (epsilon when epsilon_high is unset:
    # `self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon`); sapo / vespo none
    ("delta", f"loss_type: {' / '.join(GRPO_CLIP_LOSSES)} (the clipped surrogate; INTELLECT-2's two-sided clip)",
     lambda kw: _grpo_loss(kw) in GRPO_CLIP_LOSSES),
    ("epsilon", f"loss_type: {' / '.join(GRPO_CLIP_LOSSES)} (the clip's lower bound), or cispo without epsilon_high "
     "(TRL's cispo then takes epsilon as its eps_max)",
     lambda kw: _grpo_loss(kw) in GRPO_CLIP_LOSSES or (_grpo_loss(kw) == "cispo" and kw.get("epsilon_high") is None)),
    ("epsilon_high", f"loss_type: {' / '.join(GRPO_CLIP_LOSSES)} / cispo (the clip's upper bound; cispo's eps_max)",
     lambda kw: _grpo_loss(kw) in (*GRPO_CLIP_LOSSES, "cispo")),
    *((name, "use_adaptive_entropy: true (the adaptive entropy-bonus controller)",
       lambda kw: bool(kw.get("use_adaptive_entropy")))
      for name in ("entropy_target", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta")),
)


def check_dependent_fields(cls: type, kwargs: dict[str, Any], key: Callable[[str], str] = str) -> None:
    """Fields of ``cls`` (the trainer's config class) in ``kwargs`` that only another setting reads
    (:data:`DEPENDENT_FIELDS`), set away from the class default while that setting is off: TRL / transformers accept
    them and never read them (``ref_model_sync_steps: 10`` without ``sync_ref_model`` trained plain DPO against the
    frozen reference, ``packing_strategy: wrapped`` without ``packing`` an unpacked run). ``key`` names a field
    (``lowmem train``: :func:`recipe_key`, ``training_args.<field>`` where the recipe wrote it there).

    Raises:
        ConfigError: Naming the field, its value and the setting that reads it.
    """
    fields = getattr(cls, "__dataclass_fields__", {})
    refused = getattr(cls, "UNUSED_FIELDS", ())  # a class that refuses the field whatever the setting (GVPO) says so
    for name, setting, on in DEPENDENT_FIELDS:
        if name not in kwargs or name not in fields or name in refused:
            continue
        default = fields[name].default
        value = kwargs[name]
        if value == default or value in (None, {}) or on(kwargs):
            continue
        raise ConfigError(f"{key(name)}={value!r} is read only with {setting}, which this config does not set, so it "
                          f"would have no effect; set {setting.split(' (')[0]}, or drop {key(name)}")


def check_dpo_losses(kwargs: dict[str, Any], key: Callable[[str], str] = lambda field: field) -> None:
    """DPO's ``loss_type`` list and its ``loss_weights`` as TRL 1.16's DPOTrainer combines them: the loss is
    ``sum(weight_i x loss_i)`` over the ``loss_type`` entries (``loss_weights`` null or empty: 1.0 each), so an empty
    ``loss_type`` leaves the loss the float 0.0 (``AttributeError: 'float' object has no attribute 'repeat'`` at the
    first step), a negative weight trains that loss backwards (sigmoid at -1: towards the rejected answers) and
    weights that are all 0 train nothing. ``key`` names the fields (``lowmem train``: the recipe's keys).

    Raises:
        ConfigError: Naming the field, its value and what is valid.
    """
    if "loss_type" in kwargs:
        losses = kwargs["loss_type"]
        if losses is None or (not isinstance(losses, str) and len(list(losses)) == 0):
            raise ConfigError(f"{key('loss_type')}={losses!r}: expected a loss type or a non-empty list of them (TRL "
                              "sums weight x loss over the list; with none the loss is no tensor: an AttributeError at "
                              "the first step); TRL's default ['sigmoid']")
    weights = kwargs.get("loss_weights")
    if weights is None:
        return
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
        raise ConfigError(f"{key('loss_weights')}={weights!r}: expected a list of numbers >= 0, one per loss_type entry")
    weights = list(weights)
    bad = [w for w in weights if not _real(w) or w < 0]
    if bad:
        raise ConfigError(f"{key('loss_weights')}={weights!r}: expected numbers >= 0, one per loss_type entry (TRL's "
                          f"loss is sum(weight x loss): a negative weight trains that loss backwards, DPO's sigmoid "
                          f"towards the rejected answers); {bad[0]!r} is not")
    if weights and not any(weights):
        raise ConfigError(f"{key('loss_weights')}={weights!r}: every weight is 0, so the loss (sum of weight x loss) would "
                          "be 0 and nothing would train; give at least one weight > 0 (null: 1.0 for each loss_type)")


def check_dpo_fields(kwargs: dict[str, Any], key: Callable[[str], str] = lambda field: field) -> None:
    """DPO fields that the loss would not apply: ``beta`` 0 (the sigmoid loss is then a constant without gradient,
    IPO and SPPO divide by it), an empty ``loss_type`` or ``loss_weights`` negative or all 0
    (:func:`check_dpo_losses`, its fields named by ``key``), a ``label_smoothing`` none of the ``loss_type`` entries
    reads, and the fields only another setting reads (:func:`check_dependent_fields`: ``discopop_tau``,
    ``f_alpha_divergence_coef``, ``ref_model_sync_steps``, ``ref_model_mixup_alpha``).

    Raises:
        ConfigError: Naming the field and what is valid.
    """
    check_dpo_losses(kwargs, key)
    beta = kwargs.get("beta")
    if beta is not None and not isinstance(beta, bool) and beta == 0:
        raise ConfigError("beta=0 for DPO: beta scales the implicit reward, so the loss would have no gradient (ipo / "
                          "sppo_hard divide by it); valid: a float > 0 (TRL's default 0.1)")
    from trl import DPOConfig

    check_dependent_fields(DPOConfig, kwargs)  # discopop_tau, f_alpha_divergence_coef, ref_model_sync_steps, ...
    smoothing = kwargs.get("label_smoothing") or 0
    if smoothing:
        losses = kwargs.get("loss_type", "sigmoid")
        losses = [losses] if isinstance(losses, str) else list(losses or ["sigmoid"])
        losses = [str(getattr(t, "value", t)) for t in losses]
        if not set(losses) & set(DPO_LABEL_SMOOTHING_LOSSES):
            raise ConfigError(f"label_smoothing={smoothing:g} with loss_type={losses}: no loss of these reads it (TRL's "
                              f"sigmoid loss has none); valid: a loss_type among {list(DPO_LABEL_SMOOTHING_LOSSES)} "
                              "(robust is the conservative, cDPO-style loss), or drop label_smoothing")


def _cuda_bf16_supported() -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)


def check_half_precision(kwargs: dict[str, Any], where: str = "") -> None:
    """``fp16: true`` (float16 mixed precision: autocast and a gradient scaler) where training runs on the CPU (no
    GPU visible, or ``use_cpu: true``): accelerate sets ``mixed_precision="fp16"`` there but no autocast (its
    ``native_amp`` stays false), so the run trained in float32 and said nothing (transformers 5.23, accelerate;
    a forward hook saw float32 outputs). ``bf16`` applies on the CPU (CPU autocast in bfloat16); ``fp16_full_eval``
    casts the model to float16 for evaluation, which the CPU does. ``where`` prefixes the field
    (``"LowMemSFTConfig."``: the configs of :mod:`lowmem.trainers` check it too). accelerate's own fp16
    (``ACCELERATE_MIXED_PRECISION=fp16``, which TrainingArguments takes when neither ``fp16`` nor ``bf16`` is set) is
    refused on the CPU the same way.

    Raises:
        ConfigError: Naming ``fp16`` (or accelerate's ``mixed_precision`` / ``ACCELERATE_MIXED_PRECISION``), why it
            cannot apply, and what can (``bf16: true``, ``dtype``; accelerate's ``no`` / ``bf16``).
    """
    import os

    device = "use_cpu=true" if kwargs.get("use_cpu") else "no GPU is visible"
    if not kwargs.get("fp16"):
        # accelerate's own fp16 (``accelerate launch --mixed_precision fp16``, ``mixed_precision: fp16`` in the
        # accelerate config) reaches TrainingArguments as ACCELERATE_MIXED_PRECISION, which it takes as its
        # mixed_precision when neither fp16 nor bf16 is set: the same float32 run on the CPU (final loss equal to the
        # run without it, FOUND_DIST18 1)
        if (not kwargs.get("bf16") and os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower() == "fp16"
                and (kwargs.get("use_cpu") or not _accelerator_visible())):
            raise ConfigError(f"{where}mixed_precision: fp16 from accelerate (ACCELERATE_MIXED_PRECISION=fp16: "
                              "`accelerate launch --mixed_precision fp16` or mixed_precision: fp16 in the accelerate "
                              "config) applies on a GPU only, and this run trains on the CPU "
                              f"({device}): transformers would train in float32 without a word. On the CPU use "
                              "accelerate's mixed_precision `no` or `bf16` (or bf16: true / dtype: bfloat16 in the recipe)")
        return
    if kwargs.get("use_cpu") or not _accelerator_visible():
        raise ConfigError(f"{where}fp16=true (float16 mixed precision) applies on a GPU only, and this run trains on the CPU "
                          f"({device}): transformers would train in float32 without a word. Drop fp16, or set bf16: true "
                          "(bfloat16 autocast, which the CPU runs) or dtype: bfloat16")


def read_fsdp_config(value: Any) -> dict[str, Any]:
    """``training_args.fsdp_config`` as transformers reads it (5.x, ``TrainingArguments.__post_init__`` and
    ``_process_fsdp_args``): ``None`` -> ``{}``; a dict as given; a string starting with ``{`` -> its JSON; any
    other string -> the JSON of the file at that path. Keys as written (``fsdp_``-prefixed or not).

    Raises:
        ConfigError: Naming ``training_args.fsdp_config``: unreadable file, invalid JSON, or not a JSON object.
    """
    import json

    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if not isinstance(value, str):
        raise ConfigError(f"training_args.fsdp_config={value!r}: expected a dict, a JSON object string or the path of a "
                          "JSON file")
    try:
        if value.startswith("{"):
            loaded = json.loads(value)
        else:  # (transformers: a string not starting with '{' is a path)
            with open(value, encoding="utf-8") as f:
                loaded = json.load(f)
    except OSError as e:
        raise ConfigError(f"training_args.fsdp_config={value!r}: cannot read the JSON file ({e.strerror}); "
                          "transformers reads a string not starting with '{' as a file path") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"training_args.fsdp_config={value!r}: not valid JSON ({e})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"training_args.fsdp_config={value!r}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def fsdp_activation_checkpointing(value: Any) -> str | None:
    """The key of ``fsdp_config`` (:func:`read_fsdp_config`) that turns FSDP's activation checkpointing on, as the
    user wrote it, or ``None``: transformers strips an ``fsdp_`` prefix (the prefixed key wins over the plain one)
    and reads the value with its own ``str_to_bool(str(value).lower())``.

    Raises:
        ConfigError: A value transformers cannot read as a truth value, naming the key.
    """
    from transformers.training_args import str_to_bool

    config = read_fsdp_config(value)
    key = next((k for k in ("fsdp_activation_checkpointing", "activation_checkpointing") if k in config), None)
    if key is None:
        return None
    try:
        on = str_to_bool(str(config[key]).lower())
    except ValueError:
        raise ConfigError(f"training_args.fsdp_config.{key}={config[key]!r}: expected true or false") from None
    return key if on else None


def refuse_fused_backward_under_fsdp(optim: str, training_args: dict[str, Any]) -> None:
    """``optim: lomo`` / ``adalomo`` under FSDP (``ACCELERATE_USE_FSDP=true`` or ``training_args.fsdp``): ``lowmem
    train`` runs them in layerwise mode only, which FSDP refuses, so the two refusals sent the user back and forth
    (without ``layerwise``: "set layerwise: true"; with it: "Drop layerwise"; AUDDIST21 2). One message instead.

    Raises:
        ConfigError: Naming ``optim``, the FSDP source and what works."""
    import os

    env_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not env_fsdp and not training_args.get("fsdp"):
        return
    fsdp = ("ACCELERATE_USE_FSDP=true (accelerate launch with an FSDP configuration)" if env_fsdp
            else f"training_args.fsdp={training_args['fsdp']!r}")
    raise ConfigError(
        f"optim={optim!r} does not run under FSDP ({fsdp}) in lowmem train: lowmem train runs LOMO / AdaLomo in "
        "layerwise mode only (the update fused into the backward pass; layerwise: true), and layerwise mode does not "
        "work under FSDP (its hooks sit on the unsharded parameters, which FSDP replaces). Launch with DDP "
        "(accelerate launch --multi_gpu) or one process, choose another optimizer (e.g. adafactor), or from Python "
        f"use LowMemTrainer with lowmem_optim={optim!r} without lowmem_layerwise (a plain optimizer that keeps every "
        "gradient; supported under FSDP2, docs/distributed.md)")


def check_fsdp_conflicts(recipe: TrainRecipe, kwargs: dict[str, Any]) -> None:
    """What FSDP refuses, refused before any model loads, in the words the user wrote. FSDP comes from accelerate's
    environment (``ACCELERATE_USE_FSDP=true``: ``accelerate launch`` with an FSDP configuration) or the training
    arguments' ``fsdp``. Layerwise mode (``layerwise: true`` / ``lowmem_layerwise``) was refused only by
    ``LowMemTrainer.create_optimizer``, after every rank loaded the model (its hooks sit on the unsharded parameters,
    which FSDP2 replaces); FSDP's own activation checkpointing (the accelerate config's
    ``fsdp_activation_checkpointing``, exported as ``FSDP_ACTIVATION_CHECKPOINTING``, or ``fsdp_config``'s
    ``activation_checkpointing``: a dict, a JSON string or a JSON file's path, :func:`read_fsdp_config`) with
    ``gradient_checkpointing`` by transformers' Trainer ``__init__``, naming
    ``fsdp_config['activation_checkpointing']`` and ``activation_checkpointing`` (FOUND_DIST18 2, 3).

    Raises:
        ConfigError: Naming the recipe's key, the FSDP source, and what to drop.
    """
    import os

    env_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not env_fsdp and not kwargs.get("fsdp"):
        return
    fsdp = ("ACCELERATE_USE_FSDP=true (accelerate launch with an FSDP configuration)" if env_fsdp
            else f"training_args.fsdp={kwargs['fsdp']!r}")
    if recipe.layerwise or kwargs.get("lowmem_layerwise"):  # (load_recipe moves training_args' lowmem_layerwise here)
        raise ConfigError(f"layerwise: true (layerwise mode) does not work under FSDP ({fsdp}): its hooks are registered on the "
                          "unsharded parameters, which FSDP replaces, so it would train nothing. Drop layerwise, or "
                          "launch with DDP (accelerate launch --multi_gpu) or one process")
    # (transformers reads fsdp_config only with training_args' fsdp; under accelerate's FSDP its plugin comes from the
    # environment, FSDP_ACTIVATION_CHECKPOINTING below)
    config_key = fsdp_activation_checkpointing(kwargs.get("fsdp_config")) if kwargs.get("fsdp") else None
    config_ac = config_key is not None
    env_ac = env_fsdp and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true"
    if not (config_ac or env_ac):
        return
    given = [k for k in ("activation_checkpointing", "gradient_checkpointing") if recipe.training_args.get(k)]
    if not given and not kwargs.get("activation_checkpointing"):
        return
    ours = (" and ".join(f"training_args.{k}=true" for k in given) if given
            else "gradient_checkpointing: true (the recipe)")
    theirs = ("fsdp_activation_checkpointing: true in the accelerate config (FSDP_ACTIVATION_CHECKPOINTING=true)"
              if env_ac else f"training_args.fsdp_config.{config_key}=true")
    raise ConfigError(f"{ours} and {theirs} both ask for activation checkpointing; keep one: FSDP's own "
                      "(fsdp_activation_checkpointing, recommended under FSDP) or the model's (gradient_checkpointing)")


def _check_generation_groups(recipe: TrainRecipe, cls: type, kwargs: dict[str, Any]) -> None:
    """GRPO/GVPO/BNPO generate ``num_generations`` completions per prompt in batches of ``batch_size`` x
    processes x ``steps_per_generation`` (TRL's ``generation_batch_size``), which must hold whole groups.
    TRL refuses it in its own terms ("generation_batch_size (4) must be divisible by num_generations (8)")
    when the user set neither; this names the recipe's ``batch_size`` and ``num_generations`` (TRL's
    default 8 when not set) and what to change. A given ``generation_batch_size`` must hold whole training
    batches (``batch_size`` x processes): TRL's "generation_batch_size (12) must be divisible by the global batch size
    (8)" named no recipe key; its other checks of it name the user's own fields."""
    if recipe.trainer not in ("grpo", "gvpo", "bnpo"):
        return
    given_batch = kwargs.get("generation_batch_size")
    if given_batch is not None:
        per_step = recipe.batch_size * launched_processes()
        if (isinstance(given_batch, int) and not isinstance(given_batch, bool) and given_batch > 0 and per_step > 0
                and kwargs.get("steps_per_generation") is None and given_batch % per_step):
            fits = sorted({m for m in (given_batch // per_step * per_step, -(-given_batch // per_step) * per_step) if m})
            raise ConfigError(f"generation_batch_size={given_batch} is not a multiple of batch_size x processes ("
                              f"{recipe.batch_size} x {launched_processes()} = {per_step}): TRL trains each generation "
                              f"batch in whole training batches; set generation_batch_size to a multiple of {per_step} "
                              f"({' or '.join(map(str, fits))}), or steps_per_generation instead")
        return
    groups = kwargs.get("num_generations", getattr(cls, "num_generations", None))
    steps = kwargs.get("steps_per_generation") or kwargs.get("gradient_accumulation_steps", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (groups, steps, recipe.batch_size)):
        return  # TRL's own checks report these
    per_generation = recipe.batch_size * launched_processes() * steps
    if per_generation % groups == 0:
        return
    given = "num_generations" in kwargs
    divisors = [d for d in range(2, per_generation + 1) if per_generation % d == 0]
    multiple = -(-recipe.batch_size // groups) * groups
    raise ConfigError(
        f"batch_size={recipe.batch_size} gives {per_generation} completions per generation (batch_size x "
        f"{launched_processes()} process(es) x {steps} steps_per_generation), not whole groups of num_generations="
        f"{groups}{'' if given else ' (TRL default)'}: set batch_size to a multiple of {groups} (e.g. {multiple}) or "
        f"num_generations to a divisor of {per_generation}" + (f" ({divisors})" if divisors else " (at least 2)"))


def _accelerator_visible() -> bool:
    """Whether transformers could train on something other than the CPU (CUDA / ROCm, Apple MPS, Intel XPU)."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or (mps is not None and mps.is_available())
            or (xpu is not None and xpu.is_available()))


# What a checkpoint directory must hold to resume exactly (any one name of each entry; a name ending
# in "/" is a directory: FSDP's sharded checkpoints, torch.distributed.checkpoint's files of every
# process, as accelerate names them under fsdp_state_dict_type SHARDED_STATE_DICT).
CHECKPOINT_FILES: tuple[tuple[str, ...], ...] = (
    ("trainer_state.json",),
    ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
     "adapter_model.safetensors", "adapter_model.bin", "pytorch_model_fsdp_0/"),
    ("optimizer.pt", "optimizer.bin", "optimizer_0/"),
    ("scheduler.pt",),
)


def checkpoint_missing(path: str | Path) -> list[str]:
    """The files of :data:`CHECKPOINT_FILES` that ``path`` lacks (empty: complete). A sharded
    directory counts when it holds torch.distributed.checkpoint's metadata (``.metadata``, written
    last)."""
    p = Path(path)

    def present(name: str) -> bool:
        return (p / name / ".metadata").is_file() if name.endswith("/") else (p / name).is_file()

    missing = [names[0] for names in CHECKPOINT_FILES if not any(present(n) for n in names)]
    if not missing and not (p / RUN_RECORD).is_file() and RUN_RECORD_CALLBACK in _stateful_callbacks(p):
        missing.append(RUN_RECORD)  # lowmem train's: killed between trainer_state.json and the record (AUDIT-RESUME18 3)
    return missing


def _stateful_callbacks(path: Path) -> dict[str, Any]:
    """``trainer_state.json``'s ``stateful_callbacks`` in ``path`` (empty when the file is missing or does not parse:
    :func:`file_damage` reports that)."""
    try:
        data = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}
    found = data.get("stateful_callbacks") if isinstance(data, dict) else None
    return found if isinstance(found, dict) else {}


def file_damage(path: str | Path) -> str | None:
    """Why the file ``path`` is not whole as written (truncated by a kill mid-write, unreadable), or
    `None`. Cheap, nothing is loaded: ``*.pt`` / ``*.bin`` (``torch.save``'s zip format) must be a
    zip archive with its central directory (written last; :func:`zipfile.is_zipfile` reads the end
    of the file), ``*.safetensors`` must open with ``safetensors.safe_open`` (a header whose tensors
    cover the file exactly), ``*.json`` must parse; a sharded weights index
    (``*.index.json``) must name shards that are each whole."""
    import zipfile

    p = Path(path)
    try:
        if p.suffix in (".pt", ".bin", ".pth"):
            if not zipfile.is_zipfile(p):
                return "truncated or unreadable: not a complete zip archive (torch.save's format)"
            with zipfile.ZipFile(p) as z:  # the central directory, not the contents
                z.namelist()
        elif p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt"):
                pass
        elif p.suffix == ".json":
            data = json.loads(p.read_text())
            if p.name.endswith(".index.json"):
                for shard in sorted(set((data.get("weight_map") or {}).values())):
                    why = file_damage(p.parent / shard) if (p.parent / shard).is_file() else "missing"
                    if why is not None:
                        return f"its shard {shard} is {why}"
    except Exception as err:  # noqa: BLE001 - any failure to read the header is damage
        line = str(err).strip().splitlines()
        return f"truncated or unreadable ({type(err).__name__}: {line[0] if line else ''})"
    return None


def checkpoint_damaged(path: str | Path) -> dict[str, str]:
    """``{file: why}`` for the files of :data:`CHECKPOINT_FILES` present in ``path`` that are not
    whole (:func:`file_damage`): a run killed while the Trainer wrote ``optimizer.pt`` left half of
    it (and, overwriting a checkpoint, the earlier ``trainer_state.json`` beside it). Sharded
    directories are judged by :func:`checkpoint_missing` (their ``.metadata``)."""
    p = Path(path)
    damaged = {}
    for names in CHECKPOINT_FILES:
        for n in names:
            if not n.endswith("/") and (p / n).is_file() and (why := file_damage(p / n)) is not None:
                damaged[n] = why
    return damaged


def weights_only_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint written with ``save_only_model: true``: whole weights and
    ``trainer_state.json`` (the Trainer writes it last) and no optimizer, scheduler or RNG state, which that setting
    leaves out. It cannot resume (transformers: "you can't resume training from a checkpoint saved with
    save_only_model"), and it is no interrupted save either."""
    p = Path(path)
    return (checkpoint_missing(p) == ["optimizer.pt", "scheduler.pt"] and not checkpoint_damaged(p)
            and not any(p.glob("rng_state*.pth")))


SAVE_ONLY_MODEL = ("hold the weights only (save_only_model: true writes no optimizer, scheduler or RNG state), so they "
                   "cannot resume a run; start a new run from the weights instead (model: {path}, without "
                   "resume_from_checkpoint)")


def checkpoint_problems(path: str | Path) -> str | None:
    """What makes ``path`` an incomplete checkpoint (missing files, damaged ones), or `None`."""
    missing, damaged = checkpoint_missing(path), checkpoint_damaged(path)
    parts = ([f"missing {missing}"] if missing else []) + [f"{n} {why}" for n, why in damaged.items()]
    return "; ".join(parts) or None


def move_earlier_checkpoints(output_dir: str | Path, names: list[str]) -> Path:
    """Move an earlier run's ``checkpoint-N`` directories ``names`` into ``output_dir/earlier-run-K`` (the first
    free K) before a run that starts from step 0 writes its own; returns that folder.

    The Trainer writes a checkpoint into an existing directory file by file (``trainer_state.json`` last), so a
    new run killed while overwriting one would leave its weights and half an ``optimizer.pt`` next to the earlier
    run's ``trainer_state.json``: a directory :func:`checkpoint_missing` takes as complete, which ``--resume``
    would pick (and die in ``torch.load``, or resume a mix of both runs). Moved aside, the earlier checkpoints
    stay intact (nothing is lost; move one back to resume that run) and the new run's checkpoints are complete
    only once written whole. (A rename on the same file system: no copy.)"""
    out = Path(output_dir)
    k = 1
    while (out / f"earlier-run-{k}").exists():
        k += 1
    aside = out / f"earlier-run-{k}"
    aside.mkdir()
    for name in names:
        (out / name).rename(aside / name)
    return aside


def later_checkpoints(names: list[str], resumed_from: str | Path) -> list[str]:
    """The ``checkpoint-M`` among ``names`` (folders of the output directory) after the one a run resumes from
    (``M > N`` for ``.../checkpoint-N``): the resumed run writes its own there, file by file, so a kill inside one
    would leave a mix of both runs that :func:`checkpoint_problems` takes as complete; they are moved aside first
    (:func:`move_earlier_checkpoints`). Empty when ``resumed_from`` is no ``checkpoint-N``."""
    def step(name: str) -> int | None:
        tail = name.rsplit("-", 1)[-1] if name.startswith("checkpoint-") else ""
        return int(tail) if tail.isdigit() else None

    n = step(Path(resumed_from).name)
    return [] if n is None else [m for m in names if (k := step(m)) is not None and k > n]


def interrupted_saves(output_dir: str | Path) -> list[str]:
    """One message per folder an interrupted final save left: ``OUTPUT_DIR/.lowmem-previous-model-K`` (and
    ``OUTPUT_DIR/merged/.lowmem-previous-merged-K``), where :func:`lowmem.io.install_staged` keeps the files a save
    replaces until the new set is whole and then deletes it. Still there, the save was interrupted between its
    renames: it holds (part of) the earlier model, and the model files in the directory above it may be a mix of
    both saves. Each message names the folder, its files, whether the directory above holds weights, and what to
    do (move the files back to restore the earlier model, or delete the folder). Nothing is deleted here: these
    are the user's files (``lowmem train`` prints them as warnings at its start, ``--resume`` included)."""
    out = Path(output_dir)
    found = []
    for d, stem in ((out, ".lowmem-previous-model-"), (out / "merged", ".lowmem-previous-merged-")):
        if not d.is_dir():
            continue
        for aside in sorted(p for p in d.glob(f"{stem}*") if p.is_dir() and p.name[len(stem):].isdigit()):
            files = sorted(p.name for p in aside.iterdir())
            weights = [p.name for p in d.iterdir() if p.is_file() and weights_last(p.name) > 0]
            has = (f"{d} holds weights ({', '.join(sorted(weights))}) that may be the interrupted save's"
                   if weights else f"{d} holds no model weights: the interrupted save's never came in")
            found.append(
                f"{aside} holds files of the earlier model that a final save moved aside and was interrupted before "
                f"finishing ({', '.join(files) or 'empty'}); {has}. To restore the earlier model, move the files of "
                f"{aside} back into {d} (replacing those there) and delete the empty folder; if the model in {d} is "
                f"the one you want (it loads), delete {aside}. lowmem leaves it as it is")
    return found


def resolve_checkpoint(recipe: TrainRecipe, warn: Callable[[str], None] | None = None) -> str | None:
    """The checkpoint directory ``recipe.resume_from_checkpoint`` designates, or `None`.

    `True`: the highest-numbered complete ``output_dir/checkpoint-N``; incomplete ones (a run killed
    while writing: a file missing, or truncated, :func:`checkpoint_problems`) are reported to
    ``warn`` and skipped. A path must be a complete checkpoint.
    (``Trainer.train`` itself would resume from an incomplete directory, silently with a fresh
    optimizer when ``optimizer.pt`` is missing.) The checkpoint must be before ``steps``.

    Raises:
        ConfigError: No complete checkpoint for `True`; a path that is missing or incomplete; a
            checkpoint at or past ``steps`` (the Trainer would report it as trained, with nothing or
            one more step done).
    """
    ckpt = _find_checkpoint(recipe, warn)
    if ckpt is not None:
        _check_fsdp_matches(ckpt, recipe.training_args)
        _check_adapters_match(ckpt, recipe)
        state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
        done = state.get("global_step")
        if isinstance(done, int) and recipe.steps is not None and done >= recipe.steps:
            raise ConfigError(f"steps={recipe.steps}: the checkpoint to resume, {ckpt}, is already at step {done}; "
                              f"steps is the total to reach (not the steps to add): set steps > {done}")
    return ckpt


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _check_adapters_match(ckpt: str, recipe: TrainRecipe) -> None:
    """A checkpoint of LoRA adapters resumes a run that trains adapters (``lora`` / ``quantization``), one of
    the whole model a run that does not. Crossed, the Trainer failed after the model loaded: a whole-model
    checkpoint under ``lora`` with ``TypeError: PeftModel.from_pretrained() missing 1 required positional
    argument`` (exit 1), an adapter checkpoint without ``lora`` with "Can't find a checkpoint index".

    Raises:
        ConfigError: Naming the checkpoint, what it holds and the recipe fields.
    """
    p = Path(ckpt)
    adapter = any((p / n).is_file() for n in ADAPTER_FILES)
    whole = any((p / n).exists() for n in CHECKPOINT_FILES[1] if n not in ADAPTER_FILES)
    sharded = sharded_checkpoint_holds_adapters(p)
    if sharded is not None:  # FSDP's SHARDED_STATE_DICT: no adapter file, the model's keys say (AUDDIST21 3)
        adapter, whole = sharded, not sharded
    adapters_train = recipe.lora is not None or recipe.quantization is not None
    if adapters_train and not adapter:
        raise ConfigError(f"checkpoint {ckpt!r} holds the whole model (a full fine-tune), but this run trains LoRA "
                          "adapters (lora / quantization is set): resume without lora and quantization, or train the "
                          "adapters into another output_dir (or without --resume)")
    if not adapters_train and adapter and not whole:
        held = next((n for n in ADAPTER_FILES if (p / n).is_file()), "pytorch_model_fsdp_0/, the adapters' entries")
        raise ConfigError(f"checkpoint {ckpt!r} holds LoRA adapters ({held}), "
                          "but this run trains the whole model: resume with the lora (and quantization) that wrote it")
    if adapters_train and adapter and (p / "adapter_config.json").is_file():
        from lowmem.quant import DEFAULT_LORA

        fields = dict(recipe.lora) if recipe.lora is not None else dict(DEFAULT_LORA)
        changed = adapter_changes(json.loads((p / "adapter_config.json").read_text()), lora_config(fields))
        if changed:
            raise ConfigError(f"checkpoint {ckpt!r} holds adapters of another shape or scaling than this run's lora: "
                              + "; ".join(changed) + ". peft would load the adapter weights and apply this run's "
                              "settings to them (another lora_alpha scales every adapter's output by the ratio); "
                              "resume with the lora that wrote the checkpoint")


def sharded_checkpoint_holds_adapters(ckpt: str | Path) -> bool | None:
    """Whether a checkpoint's FSDP ``SHARDED_STATE_DICT`` model (``pytorch_model_fsdp_0/``, torch.distributed.checkpoint)
    holds LoRA adapters: accelerate saves a peft model's state dict there, the adapters' entries only
    (``...q_proj.lora_A.weight``), and no ``adapter_model.safetensors`` beside it, so :func:`_check_adapters_match`
    took a LoRA run's checkpoint for a whole model and refused to resume it (AUDDIST21 3). `None` when there is no
    such directory (or its metadata cannot be read: :func:`checkpoint_missing` reports that)."""
    d = Path(ckpt) / "pytorch_model_fsdp_0"
    if not (d / ".metadata").is_file():
        return None
    import torch.distributed.checkpoint as dcp

    try:
        keys = dcp.FileSystemReader(str(d)).read_metadata().state_dict_metadata
    except Exception:  # (a damaged checkpoint: refused as incomplete elsewhere)
        return None
    return any(".lora_" in k for k in keys)


# LoraConfig fields that fix what trained adapter weights compute: their shapes and their scaling
ADAPTER_FIELDS = ("r", "lora_alpha", "use_rslora", "use_dora", "bias", "rank_pattern", "alpha_pattern")


def adapter_changes(saved: dict[str, Any], config: Any) -> list[str]:
    """``lora.<field>=<this run's> (the checkpoint's adapters: <saved>)`` for each of :data:`ADAPTER_FIELDS` in
    which this run's ``peft.LoraConfig`` differs from a checkpoint's ``adapter_config.json``."""
    out = []
    for name in ADAPTER_FIELDS:
        if name in saved and getattr(config, name, saved[name]) != saved[name]:
            out.append(f"lora.{name}={getattr(config, name)!r} (the checkpoint's adapters: {saved[name]!r})")
    return out


# what the Trainer writes under FSDP (accelerate's names), and what it writes without
FSDP_CHECKPOINT_FILES = ("pytorch_model_fsdp_0/", "pytorch_model_fsdp.bin", "optimizer_0/", "optimizer.bin")


def _check_fsdp_matches(ckpt: str, training_args: dict[str, Any]) -> None:
    """The Trainer resumes a checkpoint written under FSDP only under FSDP, and one written without FSDP
    (``optimizer.pt``) only without: otherwise transformers fails with "Checkpoint found at ... is only
    supported when using PyTorch FSDP", or under FSDP with a missing ``pytorch_model_fsdp.bin`` on one
    process while the others crash in gloo. Say so before any model loads."""
    import os

    written = [n for n in FSDP_CHECKPOINT_FILES if (Path(ckpt) / n.rstrip("/")).exists()]
    fsdp_now = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(training_args.get("fsdp"))
    if written and not fsdp_now:
        raise ConfigError(
            f"the checkpoint to resume, {ckpt}, was written under FSDP ({', '.join(written)}); the Trainer resumes it "
            "only under FSDP: launch with the accelerate FSDP configuration that wrote it (a FULL_STATE_DICT "
            "checkpoint also on another number of processes; docs/distributed.md)")
    if fsdp_now and not written and (Path(ckpt) / "optimizer.pt").is_file():
        raise ConfigError(
            f"the checkpoint to resume, {ckpt}, was written without FSDP (optimizer.pt, model.safetensors); under FSDP "
            "the Trainer reads pytorch_model_fsdp* / optimizer.bin or optimizer_0/: resume it without FSDP (one "
            "process or DDP, accelerate launch --multi_gpu), as it was written")


def _find_checkpoint(recipe: TrainRecipe, warn: Callable[[str], None] | None) -> str | None:
    value = recipe.resume_from_checkpoint
    if value is None or value is False:
        return None
    if value is True:
        out = Path(recipe.output_dir)
        found = [d for d in out.glob("checkpoint-*") if d.is_dir() and d.name[len("checkpoint-"):].isdigit()]
        skipped = []
        newest_first = sorted(found, key=lambda d: int(d.name[len("checkpoint-"):]), reverse=True)
        for i, d in enumerate(newest_first):
            problems = checkpoint_problems(d)
            if problems is None:
                return str(d)
            if weights_only_checkpoint(d):
                # the latest checkpoint holds the weights only: resuming an older complete one would drop its
                # progress silently (LowMemTrainer.train(resume_from_checkpoint=True) refuses it too)
                older = next((o for o in newest_first[i + 1:] if checkpoint_problems(o) is None), None)
                raise ConfigError(
                    f"resume_from_checkpoint=true: the latest checkpoint, {d}, holds the weights only (save_only_model: "
                    "true writes no optimizer, scheduler or RNG state), so it cannot resume a run; start a new run from "
                    f"its weights instead (model: {d}, without resume_from_checkpoint)"
                    + (f", or resume the older complete checkpoint by its path (resume_from_checkpoint: {older}; the "
                       "steps after it are trained again)" if older is not None else "")
                )
            skipped.append(d.name)
            if warn is not None:
                warn(f"skipping incomplete checkpoint {d} ({problems}; an interrupted run?)")
        raise ConfigError(
            f"resume_from_checkpoint=true: no complete checkpoint-N directory in {out}"
            + (f" (incomplete: {skipped})" if skipped else "")
            + "; give a path, or drop resume_from_checkpoint to start from step 0"
        )
    p = Path(value)
    if not p.is_dir():
        raise ConfigError(f"resume_from_checkpoint={value!r}: no such directory")
    if weights_only_checkpoint(p):
        raise ConfigError(f"resume_from_checkpoint={value!r}: its files " + SAVE_ONLY_MODEL.format(path=value))
    problems = checkpoint_problems(p)
    if problems is not None:
        raise ConfigError(f"resume_from_checkpoint={value!r} is not a complete checkpoint: {problems}")
    return str(p)


def _refuse_fsdp_on_cpu(training_args: dict[str, Any]) -> None:
    """accelerate (1.15) turns FSDP on only for GPU / accelerator processes (``AcceleratorState``:
    ``MULTI_GPU``, ``MULTI_NPU``, ..., not ``MULTI_CPU``): several CPU processes with an FSDP
    configuration (``accelerate launch --config_file configs/accelerate/fsdp2.yaml``, which exports
    ``ACCELERATE_USE_FSDP=true``, or ``training_args: {fsdp: ...}``) would train with DDP instead,
    unsharded. Refuse that. (With accelerate's FSDP branch applied to CPU processes, as
    tests/test_trainer_fsdp.py does, `lowmem train` runs FSDP2 on the CPU; the shipped configuration
    is tested that way.)

    Raises:
        ConfigError: FSDP asked for through accelerate's environment or ``training_args`` on the CPU.
    """
    import os

    env = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if env or training_args.get("fsdp"):
        source = ("ACCELERATE_USE_FSDP=true (accelerate launch with an FSDP configuration)" if env
                  else f"training_args.fsdp={training_args['fsdp']!r}")
        raise ConfigError(
            f"FSDP through accelerate / the Trainer needs GPUs: {source} on CPU processes, but accelerate enables "
            "FSDP only for GPU / accelerator processes (MULTI_GPU, MULTI_NPU, ..., not MULTI_CPU) and would train "
            "these with DDP instead, each holding the whole model and optimizer state. On the CPU use DDP "
            "(accelerate launch --multi_gpu, docs/training.md) or FSDP2 from Python with fully_shard "
            "(examples/fsdp2.py, docs/distributed.md)"
        )


# config.json fields holding a model's context length (Llama / Qwen / Mistral / Gemma / Phi / NeoX; GPT-2; others)
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")


def model_context_length(model: str | None) -> tuple[int, str] | None:
    """``(positions, where)``: the longest sequence ``model`` (a local directory, or `None` for the
    embedded tiny Llama) has positions for, read from its config (:data:`CONTEXT_FIELDS`; the text
    config of a multimodal one), and where that number comes from. `None` when the config has none."""
    if model is None:
        from lowmem.kit.model import TINY_LLAMA

        return TINY_LLAMA["max_position_embeddings"], "max_position_embeddings of the embedded tiny Llama"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, local_files_only=True)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, f"{name}={value} in {Path(model) / 'config.json'}"
    return None


def fit_max_length(recipe: TrainRecipe, args: Any) -> str | None:
    """Keep TRL's ``max_length`` (SFT, DPO on a ``dataset``) within the model's context
    (:func:`model_context_length`). Rows truncated to TRL's default 1024 tokens overflow a model with
    fewer positions: a learned position table (GPT-2's ``n_positions``) fails mid-training with
    ``IndexError: index out of range in self``, rotary models run on positions they never saw. A
    ``max_length`` the recipe sets is an error then; TRL's default becomes the model's length (set in
    ``recipe.training_args``), and the returned notice says so (else `None`).

    Raises:
        ConfigError: The recipe's ``max_length`` exceeds the model's context, naming both.
    """
    value = getattr(args, "max_length", None)
    if recipe.trainer not in ("sft", "dpo") or recipe.dataset is None or not isinstance(value, int):
        return None
    context = model_context_length(recipe.model)
    if context is None or value <= context[0]:
        return None
    limit, where = context
    if "max_length" in recipe.training_args:
        raise ConfigError(f"max_length={value} is longer than the model's context ({where}): longer rows would fail "
                          f"inside the model (a learned position table: IndexError) or run on positions it never saw; "
                          f"set max_length <= {limit}")
    recipe.training_args = {**recipe.training_args, "max_length": limit}
    return (f"max_length={limit}, the model's context ({where}): TRL's default max_length={value} is longer; rows "
            f"are truncated to {limit} tokens (set max_length to choose)")


def processed_row_lengths(dataset: Any) -> list[int] | None:
    """Tokens per row of a dataset TRL prepared: SFT's ``input_ids``; DPO's ``prompt_ids`` plus the longer of
    ``chosen_ids`` / ``rejected_ids`` (TRL 1.16's collator concatenates them); `None` for other columns."""
    columns = getattr(dataset, "column_names", None) or []
    if "input_ids" in columns:
        return [len(ids) for ids in dataset["input_ids"]]
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
        return [len(p) + max(len(c), len(r))
                for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]
    return None


def check_untruncated_rows(trainer: Any, recipe: TrainRecipe, args: Any) -> None:
    """``max_length: null`` (TRL: no truncation) beside a model with a context (:func:`model_context_length`): every
    row TRL prepared must fit it. Before, a longer row reached the model: a learned position table (GPT-2's
    ``n_positions``) failed mid-training with ``IndexError: index out of range in self`` (a 100-line traceback), a
    rotary model trained on positions it never saw. Checked once TRL tokenized the rows (their length is TRL's
    tokenization: chat template, EOS), before the first evaluation and training step; ``packing`` (TRL's own checks) is
    left alone. An int ``max_length`` is :func:`fit_max_length`'s.

    Raises:
        ConfigError: Naming ``max_length``, the rows, the longest row's tokens and the model's context.
    """
    if getattr(args, "max_length", 0) is not None or getattr(args, "packing", False):
        return
    context = model_context_length(recipe.model)
    if context is None:
        return
    limit, where = context
    evals = trainer.eval_dataset
    named = [(f"eval_dataset[{k!r}]", d) for k, d in evals.items()] if isinstance(evals, dict) else [("eval_dataset", evals)]
    for name, dataset in [("dataset", trainer.train_dataset), *named]:
        lengths = processed_row_lengths(dataset) if dataset is not None else None
        long = [i for i, n in enumerate(lengths or []) if n > limit]
        if long:
            shown = long[:5] + (["..."] if len(long) > 5 else [])
            raise ConfigError(
                f"{recipe_key(recipe)('max_length')}=None (no truncation): {len(long)} of {len(lengths)} rows of {name} "
                f"(rows {shown}, 0-based; the longest {max(lengths)} tokens) are longer than the model's context "
                f"({where}): they would fail inside the model (a learned position table: IndexError) or run on "
                f"positions it never saw; set max_length <= {limit} (longer rows truncated) or shorten those rows")


def prompt_token_lengths(prompts: list[Any], tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Tokens of each GRPO prompt as the policy sees it: a string tokenized as is, a conversational prompt
    (a list of messages) rendered by the chat template with the generation prompt appended and GRPOConfig's
    ``chat_template_kwargs`` (as TRL renders it: Qwen3's ``enable_thinking: false`` adds an empty think block)."""
    chats = [p for p in prompts if isinstance(p, list)]
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False, **(chat_template_kwargs or {}))
             for p in chats]
    rendered = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    plain = [p for p in prompts if not isinstance(p, list)]
    plain_ids = iter(tokenizer(plain)["input_ids"] if plain else [])
    return [len(next(rendered) if isinstance(p, list) else next(plain_ids)) for p in prompts]


def fit_completion_length(recipe: TrainRecipe, tokenizer: Any, datasets: list[Any]) -> str | None:
    """Keep GRPO/GVPO/BNPO's prompt + ``max_completion_length`` within the model's context
    (:func:`model_context_length`). TRL (1.16) neither truncates prompts nor bounds generation by the
    context: with its default ``max_completion_length=512`` a model of fewer positions failed mid-step in a
    learned position table (GPT-2: ``IndexError: index out of range in self``) or generated on positions it
    never saw (rotary models; slow too). The longest prompt of ``datasets`` (their ``prompt`` column,
    :func:`prompt_token_lengths`) plus the completion must fit: a ``max_completion_length`` the recipe sets
    beyond that is an error; TRL's default becomes the room left (set in ``recipe.training_args``) and the
    returned notice says so (else `None`).

    Raises:
        ConfigError: The recipe's ``max_completion_length`` does not fit beside the longest prompt, or a
            prompt alone fills the context; naming the numbers and where they come from.
    """
    if recipe.trainer not in ("grpo", "gvpo", "bnpo"):
        return None
    context = model_context_length(recipe.model)
    if context is None:
        return None
    limit, where = context
    kwargs = recipe.training_args.get("chat_template_kwargs") or {}
    kwargs = json.loads(kwargs) if isinstance(kwargs, str) else kwargs  # GRPOConfig takes a JSON string too
    lengths = [n for ds in datasets if ds is not None
               for n in prompt_token_lengths(list(ds["prompt"]), tokenizer, kwargs)]
    if not lengths:
        return None
    longest = max(lengths)
    given = "max_completion_length" in recipe.training_args
    completion = recipe.training_args.get("max_completion_length",
                                          getattr(config_class(recipe.trainer), "max_completion_length", None))
    if not isinstance(completion, int) or longest + completion <= limit:
        return None
    if longest >= limit:
        raise ConfigError(f"the longest prompt has {longest} tokens, the whole context of the model ({where}): no room "
                          "for a completion; shorten the prompts (TRL does not truncate them) or use a model with a "
                          "longer context")
    room = limit - longest
    if given:
        raise ConfigError(f"max_completion_length={completion} plus the longest prompt ({longest} tokens) exceeds the "
                          f"model's context ({where}): generation would fail inside the model (a learned position "
                          f"table: IndexError) or run on positions it never saw; set max_completion_length <= {room}")
    recipe.training_args = {**recipe.training_args, "max_completion_length": room}
    return (f"max_completion_length={room}, the room the longest prompt ({longest} tokens) leaves in the model's "
            f"context ({where}): TRL's default max_completion_length={completion} is longer (set "
            "max_completion_length to choose)")


def launched_processes() -> int:
    """``WORLD_SIZE`` as ``torchrun`` / ``accelerate launch`` set it (1 when launched plainly)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this is process 0 of a ``torchrun`` / ``accelerate launch`` group (or the only one)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) or v is None for v in value)


def effective_hparams(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The hyperparameters the built optimizer really uses, read back from its ``param_groups``:
    one dict per group with its plain values (``lr`` is the scheduler's base ``initial_lr`` when
    there is one, ``last_lr`` the value at the end), ``num_tensors`` and ``num_params``."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    groups = []
    for g in opt.param_groups:
        hp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params" and _plain(v)}
        if "initial_lr" in hp:
            hp["last_lr"] = hp["lr"]
            hp["lr"] = hp.pop("initial_lr")
        hp["num_tensors"] = len(g["params"])
        hp["num_params"] = sum(p.numel() for p in g["params"])
        groups.append(hp)
    return groups


def best_model_step(trainer: Any) -> int | None:
    """The step of the checkpoint ``load_best_model_at_end`` loaded at the end of training (the weights then
    evaluated and saved), or ``None`` when the run does not load the best model or kept none."""
    args, state = trainer.args, trainer.state
    if not getattr(args, "load_best_model_at_end", False) or not state.best_model_checkpoint:
        return None
    step = getattr(state, "best_global_step", None)
    return step if isinstance(step, int) else int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[-1])


def _run_metrics(trainer: Any) -> dict[str, Any]:
    """``effective_hparams`` of the trained optimizer and ``eval_history`` (step and eval loss, DPO
    margin and accuracy, GRPO/GVPO/BNPO mean reward, of every evaluation: the one before training,
    during training and the one after it). With ``load_best_model_at_end``: ``best_model_step``,
    ``metric_for_best_model`` and ``best_metric``; when the best checkpoint is not the last step, the
    evaluations after training are of its weights, so they are not entered under the last step."""
    logs, best = trainer.state.log_history, best_model_step(trainer)
    end = max((i for i, h in enumerate(logs) if "train_runtime" in h), default=len(logs))  # train()'s summary
    reloaded = best is not None and best != trainer.state.global_step
    by_step = {  # the evaluation after training repeats the last step's when eval_steps divides steps
        h["step"]: {"step": h["step"], **{k: h[k] for k in ("eval_loss", "eval_reward", "eval_rewards/margins",
                                                             "eval_rewards/accuracies") if k in h}}
        for i, h in enumerate(logs) if "eval_loss" in h and not (reloaded and i > end)
    }
    out = {"effective_hparams": effective_hparams(trainer.optimizer), "eval_history": list(by_step.values())}
    if getattr(trainer.args, "load_best_model_at_end", False):
        out.update(best_model_step=best, metric_for_best_model=trainer.args.metric_for_best_model,
                   best_metric=trainer.state.best_metric)
    return out


def _train(trainer: Any, recipe: TrainRecipe) -> Any:
    """``trainer.train`` from the recipe's checkpoint. The evaluation before training runs inside it
    (``eval_on_start``, set by the caller): a ``trainer.evaluate()`` before ``train()`` makes
    transformers (5.x) skip the DDP wrapping under several processes, which then train apart."""
    check_eval_batches(trainer, recipe_key(recipe))
    _load_converted_checkpoints(trainer)
    ckpt = resolve_checkpoint(recipe)
    if ckpt is not None and is_main_process():
        _warn_data_order(trainer, ckpt)
    return trainer.train(resume_from_checkpoint=ckpt)


# lowmem train's record of a run in each checkpoint it writes: what decides the order of the training rows
RUN_RECORD = "lowmem_run.json"
# the callback writing it: an ExportableState, so trainer_state.json (written before the record) names it, and a
# checkpoint whose trainer_state.json names it without the record is incomplete (checkpoint_missing)
RUN_RECORD_CALLBACK = "LowmemRunRecord"


def _rows(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # an IterableDataset
        return None


# the config fields that define what a step's loss is (TRL's SFT / DPO / GRPO configs, GVPO's, BNPO's): a resume with
# another value trains another objective after the checkpoint than before it (the Trainer reads the new config)
LOSS_FIELDS = (
    "assistant_only_loss", "completion_only_loss", "dataset_text_field", "max_length", "packing", "packing_strategy",
    "padding_free", "truncation_mode", "loss_type", "loss_weights", "beta", "label_smoothing", "f_divergence_type",
    "use_weighting", "ld_alpha", "num_generations", "max_completion_length", "reward_weights", "temperature", "top_p",
    "top_k", "epsilon", "epsilon_high", "scale_rewards", "num_iterations", "mask_truncated_completions",
    "reference_policy", "reward_range",
)


def _json_value(value: Any) -> Any:
    """``value`` as JSON keeps it (enums by their value, tuples as lists); `None` when JSON cannot."""
    value = getattr(value, "value", value)
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None


def run_record(args: Any, train_rows: int | None) -> dict[str, Any]:
    """The settings that decide which rows each step after a checkpoint trains on: the sampler's seeds, the rows
    (after TRL's processing) and the global batch (per device x accumulation x processes); and under ``loss`` the
    config's :data:`LOSS_FIELDS` it has (what each step's loss is)."""
    return {"seed": args.seed, "data_seed": args.data_seed, "train_rows": train_rows,
            "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size),
            "loss": {k: _json_value(getattr(args, k)) for k in LOSS_FIELDS if hasattr(args, k)}}


def loss_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The :data:`LOSS_FIELDS` whose value differs between the checkpoint's :func:`run_record` and this run's (each a
    phrase; empty: nothing, or a record written before the loss fields were kept)."""
    before, after = saved.get("loss") or {}, now.get("loss") or {}
    return [f"{k}={after[k]!r} (the checkpoint's run: {k}={before[k]!r})" for k in after
            if k in before and before[k] != after[k]]


def data_order_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the checkpoint's :func:`run_record` and this run's (each a phrase; empty: nothing)."""
    out = [f"{k}={now[k]} (the checkpoint's run: {k}={saved[k]})" for k in ("seed", "data_seed")
           if k in saved and saved[k] != now[k]]
    if None not in (saved.get("train_rows"), now["train_rows"]) and saved["train_rows"] != now["train_rows"]:
        out.append(f"{now['train_rows']} training rows (the checkpoint's run: {saved['train_rows']})")
    if "global_batch" in saved and saved["global_batch"] != now["global_batch"]:
        out.append(f"a global batch of {now['global_batch']} rows (the checkpoint's run: {saved['global_batch']})")
    return out


def _warn_data_order(trainer: Any, ckpt: str) -> None:
    """A ``UserWarning`` when this run's :func:`run_record` differs from the checkpoint's: the new values apply,
    but the Trainer skips the checkpoint's number of batches of the new order, so the rows after the checkpoint
    are not the interrupted run's. (Settings the Trainer would ignore are refused instead:
    :class:`lowmem.trainers.LowMemOptimizerMixin`.) A checkpoint without the record (not written by lowmem
    train, or before 2026-11-30) is not compared."""
    path = Path(ckpt) / RUN_RECORD
    if not path.is_file():
        return
    saved, now = json.loads(path.read_text()), run_record(trainer.args, _rows(trainer.train_dataset))
    changes = data_order_changes(saved, now)
    from lowmem._warn import warn_user

    if changes:
        warn_user(f"resuming from {ckpt} with " + "; ".join(changes) + ": these apply, but the Trainer skips the "
                  "checkpoint's number of batches in the new data order, so the rows trained after the checkpoint are "
                  "not the ones the interrupted run would have trained on (the result is not the uninterrupted run's)")
    changes = loss_changes(saved, now)
    if changes:
        warn_user(f"resuming from {ckpt} with " + "; ".join(changes) + ": the new value applies from the checkpoint on, "
                  "so the steps after it train another loss than the steps before it (the result is not the "
                  "uninterrupted run's); resume with the checkpoint's value to continue that run")


def _run_record_writer() -> Any:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class LowmemRunRecord(TrainerCallback, ExportableState):
        """Writes :func:`run_record` into each checkpoint, after the Trainer wrote it (process 0), and gives its
        files the umask's permissions (safetensors writes 0600: :func:`lowmem.io.umask_permissions`); where the Trainer
        writes ``trainer_state.json`` (``args.should_save``: process 0, or each node's with ``save_on_each_node``). Its (empty)
        state in ``trainer_state.json`` marks the checkpoint as lowmem train's, so one a run left without the record
        (killed after ``trainer_state.json``, the Trainer's last file) counts as incomplete: ``--resume`` skips it
        with a warning (:func:`checkpoint_missing`) instead of resuming it uncompared."""

        def state(self) -> dict[str, Any]:
            return {"args": {}, "attributes": {}}

        def on_save(self, args, state, control, train_dataloader=None, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if args.should_save and folder.is_dir():  # (every folder with a trainer_state.json naming it gets it)
                umask_permissions(folder)
                rows = _rows(getattr(train_dataloader, "dataset", None)) if train_dataloader is not None else None
                write_text_atomic(folder / RUN_RECORD, json.dumps(run_record(args, rows), indent=2) + "\n")

    return LowmemRunRecord()


def checkpoint_weight_names(checkpoint: str | Path) -> set[str] | None:
    """Names of the weights in a checkpoint directory's ``model.safetensors`` (or its sharded
    index); ``None`` when it has neither (a LoRA adapter, an FSDP or ``.bin`` checkpoint)."""
    from safetensors import safe_open

    folder = Path(checkpoint)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), framework="pt") as f:
        return set(f.keys())


def load_converted_checkpoint(model: nn.Module, checkpoint: str | Path) -> bool:
    """Load a checkpoint's weights saved in another layout than the model's parameters; return
    whether it did (``False``: the names match, and the Trainer's own load is exact).

    transformers 5 loads some architectures through a weight conversion (Mixtral, Qwen2-MoE,
    Qwen3-MoE: per-expert ``experts.N.w1.weight`` on disk, fused 3-D ``experts.gate_up_proj`` in the
    model) and ``save_pretrained`` writes checkpoints back in the disk layout, but
    ``Trainer._load_from_checkpoint`` loads them with ``load_state_dict(strict=False)``: the
    converted weights (the experts and the router) kept the values they had before resuming, with
    only a log warning, and the resumed run went on from other weights than it saved
    (huggingface/transformers#48805, open in 5.23). Here the checkpoint is read through
    ``from_pretrained``, which applies the conversion, and copied into the model (strict: every
    weight), so resuming is exact.

    Raises:
        ValueError: The checkpoint's weights do not convert to exactly the model's.
    """
    names = checkpoint_weight_names(checkpoint)
    if names is None:
        return False
    config = Path(checkpoint) / "config.json"
    saved_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    own_type = getattr(getattr(model, "config", None), "model_type", None)
    if saved_type is not None and own_type is not None and saved_type != own_type:
        raise ValueError(f"checkpoint {str(checkpoint)!r} holds a {saved_type} model ({config}), but this run trains a "
                         f"{own_type} model ({type(model).__name__}): resume with the model that wrote it")
    if names <= set(model.state_dict()):  # tied weights are saved once: a subset is the plain layout
        return False
    dtype = next(model.parameters()).dtype
    try:
        loaded, info = type(model).from_pretrained(str(checkpoint), dtype=dtype, local_files_only=True,
                                                   output_loading_info=True)
    except (RuntimeError, ValueError, KeyError) as err:  # shapes of another configuration
        raise ValueError(f"checkpoint {str(checkpoint)!r}: its weights do not load into {type(model).__name__}: "
                         + " ".join(str(err).split())[:300]) from err
    bad = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"checkpoint {str(checkpoint)!r}: its weights do not load into {type(model).__name__} "
                         f"through transformers' weight conversion ({bad}); resuming would train other weights")
    model.load_state_dict(loaded.state_dict(), strict=True)
    return True


def load_trainer_checkpoint(trainer: Any, own_load: Any, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
    """A Trainer's ``_load_from_checkpoint`` (``own_load``) with :func:`load_converted_checkpoint`
    first when the checkpoint's weight names differ from the model's (a weight conversion), and a
    checkpoint of other shapes one ``ValueError`` naming it (``load_state_dict``'s ``RuntimeError``
    before). Sharded parameters (FSDP, DeepSpeed) keep the Trainer's own loaders. Every lowmem
    trainer loads this way (:class:`lowmem.trainers.LowMemOptimizerMixin`)."""
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        return own_load(resume_from_checkpoint, model)
    target = model if model is not None else trainer.model
    if load_converted_checkpoint(getattr(target, "module", target), resume_from_checkpoint):
        return None
    try:
        return own_load(resume_from_checkpoint, model)
    except RuntimeError as err:  # load_state_dict's shape check: a checkpoint of another size
        if "size mismatch" not in str(err):
            raise
        raise ValueError(f"checkpoint {resume_from_checkpoint!r} does not fit the model: "
                         + " ".join(str(err).split())[:300]) from err


def _load_converted_checkpoints(trainer: Any) -> None:
    """Route a Trainer's checkpoint load through :func:`load_trainer_checkpoint` (a trainer that is not
    a lowmem one: those load so themselves)."""
    from lowmem.trainers.hf import LowMemOptimizerMixin

    if isinstance(trainer, LowMemOptimizerMixin):
        return
    own_load = trainer._load_from_checkpoint
    trainer._load_from_checkpoint = lambda path, model=None: load_trainer_checkpoint(trainer, own_load, path, model)


def check_eval_batches(trainer: Any, key: Callable[[str], str] = lambda field: field) -> None:
    """With ``dataloader_drop_last: true`` a training set of fewer rows (after TRL's processing and packing) than one
    batch (``per_device_train_batch_size`` x processes) gives no batch at all: transformers stopped "at step 0" and the
    run exited 0 with the model saved untouched. An eval set of fewer rows than one eval batch
    (``per_device_eval_batch_size`` x processes; lowmem's default 64 for SFT and DPO) gives no eval batch: the
    evaluation returns no loss, and the run failed after training with ``KeyError: 'eval_loss'`` before saving the
    model. Checked once the trainer holds its processed sets, before training (GRPO/GVPO/BNPO batch completions of
    repeated prompts: not checked here). ``key`` names the fields (``lowmem train``: the recipe's keys).

    Raises:
        ConfigError: Naming both fields, the row count and the fixes.
    """
    args = trainer.args
    if not args.dataloader_drop_last or hasattr(args, "num_generations"):
        return
    procs = max(1, args.world_size)
    packed = getattr(args, "packing", False)
    train = getattr(trainer, "train_dataset", None)
    if train is not None and hasattr(train, "__len__") and len(train) < args.per_device_train_batch_size * procs:
        batch = args.per_device_train_batch_size
        raise ConfigError(f"{key('dataloader_drop_last')}=true drops every training batch: the training set has "
                          f"{len(train)} rows" + (" after packing" if packed else "")
                          + f" and one batch is {batch * procs} ({key('per_device_train_batch_size')}={batch}"
                          + (f" x {procs} processes" if procs > 1 else "")
                          + "), so the run would train 0 steps: set "
                          f"{key('per_device_train_batch_size')} <= {len(train) // procs}, or dataloader_drop_last: false")
    evals = getattr(trainer, "eval_dataset", None)
    if evals is None or isinstance(evals, dict):
        return
    per_batch = args.per_device_eval_batch_size * procs
    packed = packed and getattr(args, "eval_packing", None) is not False  # TRL's rule
    if len(evals) < per_batch:
        raise ConfigError(f"{key('dataloader_drop_last')}=true drops every eval batch: the eval set has {len(evals)} rows"
                          + (" after packing" if packed else "")
                          + f" and one eval batch is {per_batch} ({key('per_device_eval_batch_size')}="
                          f"{args.per_device_eval_batch_size}"
                          + (f" x {args.world_size} processes" if args.world_size > 1 else "")
                          + f"): set {key('per_device_eval_batch_size')} <= {len(evals) // procs}, "
                          "or dataloader_drop_last: false")


def _eval_on_start(trainer: Any, recipe: TrainRecipe, wanted: bool) -> None:
    """Evaluate before training (``eval_on_start``) for the before/after numbers of the summary, unless
    the user's config sets ``eval_on_start`` itself: theirs wins (``false``: the initial numbers are
    ``null`` in metrics.json and the summary says they were not evaluated)."""
    if "eval_on_start" not in recipe.training_args:
        trainer.args.eval_on_start = wanted


def _num(value: float | None) -> str:
    """A summary number; ``None``: the user's ``eval_on_start: false`` skipped the evaluation before training."""
    return "not evaluated (eval_on_start: false)" if value is None else f"{value:.4f}"


def _first_eval(trainer: Any) -> dict[str, Any]:
    """The first evaluation in the log (step 0; from the checkpoint's log when resumed)."""
    return next((h for h in trainer.state.log_history if "eval_loss" in h), {})


def merge_adapter(recipe: TrainRecipe, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Reload the base model in ``recipe.dtype`` (full precision, also for QLoRA), apply the adapter
    saved in ``adapter_dir``, merge it (``merge_and_unload``) and save model and tokenizer to
    ``out_dir``: a plain checkpoint for ``AutoModelForCausalLM.from_pretrained``."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from lowmem.kit import load_model_and_tokenizer

    base, tok = load_model_and_tokenizer(recipe.model, dtype=recipe.dtype, seed=recipe.seed)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if (Path(adapter_dir) / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(adapter_dir))  # as trained (e.g. with a chat template)
    out = Path(out_dir)
    staging = _staging(out.parent, f"saving-{out.name}")
    merged.save_pretrained(staging)
    tok.save_pretrained(staging)
    install_staged(staging, out, aside_stem=f".lowmem-previous-{out.name}", order=_weights_last, replaces=saved_model_file)
    return out


_weights_last, _staging = weights_last, staging_dir  # (lowmem.io)


def _save_outputs(trainer: Any, recipe: TrainRecipe) -> dict[str, Any]:
    """Save the model (the adapter for LoRA / QLoRA) and tokenizer to ``output_dir``, and with
    ``merge_adapters`` the merged model to ``output_dir/merged``.

    Atomically: the Trainer writes into ``output_dir/.lowmem-saving-model`` (same path on every process),
    then process 0 renames the files into ``output_dir`` (:func:`lowmem.io.install_staged`: the files they
    replace kept in ``output_dir/.lowmem-previous-model-K`` until every new one is in, the weights last).
    A run killed while saving leaves the earlier model in ``output_dir`` as it was."""
    if not recipe.save_model:
        return {}
    out = Path(recipe.output_dir)
    staging = out / ".lowmem-saving-model"
    if trainer.args.should_save:
        _staging(out, "saving-model")
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        # FSDP with sharded state dicts: Trainer.save_model writes no model at all (transformers 5.23 saves
        # one only for FULL_STATE_DICT). Gather the whole one (accelerate's get_state_dict: a collective,
        # every process takes part; FSDP2 returns it on process 0) and save it as save_model would.
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
        if trainer.args.should_save:
            trainer._save(str(staging), state_dict=state_dict)
    else:
        trainer.save_model(str(staging))  # main process only; PEFT models save adapter_model.safetensors + adapter_config.json
    if trainer.args.should_save:
        # an earlier model's files the new save lacks leave too (an adapter beside a full model loaded with it)
        install_staged(staging, out, aside_stem=".lowmem-previous-model", order=_weights_last, replaces=saved_model_file)
    if trainer.args.should_save:
        fix_model_card(out / "README.md", recipe.model, out)
    saved: dict[str, Any] = {"saved_model": recipe.output_dir}
    if recipe.merge_adapters:
        saved["merged_model"] = str(Path(recipe.output_dir) / "merged")
        if is_main_process():
            merge_adapter(recipe, recipe.output_dir, saved["merged_model"])
    return saved


def fix_model_card(card: Path, model: str | None, out: Path) -> None:
    """TRL's model card (``README.md``, written into ``output_dir`` at each checkpoint) names a local base model
    ``[None](https://huggingface.co/None)`` and the model to load ``pipeline(..., model="None")`` (its ``hub_model_id``,
    ``None`` offline): run as written, the snippet asked the Hub for "None". Both name the local paths instead."""
    if not card.is_file():
        return
    text = card.read_text()
    base = f"`{Path(model).resolve()}`" if model else "the embedded tiny Llama (`lowmem.kit`)"
    fixed = text.replace("[None](https://huggingface.co/None)", base).replace('model="None"', f'model="{out.resolve()}"')
    if fixed != text:
        write_text_atomic(card, fixed)


def _run_sft(recipe: TrainRecipe) -> dict[str, Any]:
    from transformers import set_seed

    from lowmem.data import prepare_tokenizer, recipe_data
    from lowmem.kit import sft_collator, sft_dataset, tokenize_sft
    from lowmem.quant import trainable_dtypes_kept
    from lowmem.trainers import LowMemSFTTrainer, LowMemTrainer

    set_seed(recipe.seed)
    data = recipe_data(recipe)  # the user's dataset (checked before the model loads), or None: synthetic task
    model, tok, _ = load_policy(recipe)
    prepare_tokenizer(recipe, data, tok)
    _print_format_notes(data, tok, recipe)
    if data is None:
        # unpadded rows; each batch padded to its own longest row (labels with -100, outside the loss)
        train = tokenize_sft(sft_dataset(recipe.train_size, recipe.seed, "train"), tok, padding=False)
        evals = tokenize_sft(sft_dataset(recipe.eval_size, 0, "eval"), tok, padding=False)  # fixed held-out set
        trainer_cls, trainer_kw = LowMemTrainer, {"data_collator": sft_collator(tok)}
    else:  # TRL's SFTTrainer: formats, chat template, max_length, packing, completion-only loss (SFTConfig)
        train, evals = data.train, data.eval
        trainer_cls, trainer_kw = LowMemSFTTrainer, {}  # build_training_args picks LowMemSFTConfig
        alias_num_experts(model.config.get_text_config())  # TRL's SFT router aux loss reads num_experts
    args = build_training_args(recipe)
    try:
        with trainable_dtypes_kept(model):  # TRL casts a quantized model's adapters to bfloat16 (lowmem.quant)
            trainer = trainer_cls(
                model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tok,
                callbacks=_memory_callbacks(recipe), **trainer_kw,
            )
    except ValueError as err:
        if getattr(args, "assistant_only_loss", False) and "chat template" in str(err):
            # TRL's words name neither the field nor the template's source
            raise ConfigError(f"assistant_only_loss=true needs a chat template that marks the assistant's turns with "
                              f"{{% generation %}} ... {{% endgeneration %}} (the "
                              + ("recipe's chat_template" if recipe.chat_template else f"tokenizer's of {recipe.model or 'the embedded model'}")
                              + f"; set chat_template / --chat-template to one, or drop assistant_only_loss): {err}") from None
        raise
    if data is not None:
        check_dropped_rows(trainer, data, args)
        check_untruncated_rows(trainer, recipe, args)
    _eval_on_start(trainer, recipe, evals is not None)  # initial eval loss (see _train)
    out = _train(trainer, recipe)
    initial = _first_eval(trainer).get("eval_loss")
    final = trainer.evaluate()["eval_loss"] if evals is not None else None
    saved = _save_outputs(trainer, recipe)
    return {
        "initial_loss": initial, "final_loss": final, "steps": trainer.state.global_step,
        "train_runtime_s": out.metrics.get("train_runtime"),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer), "adamw_state_bytes": adamw_state_bytes(model),
        "optimizer_state_sharded": optimizer_state_sharded(trainer.optimizer),
        "trainable_params": sum(p.numel() for p in trainable_parameters(model)), **_memory_metrics(trainer),
        **_run_metrics(trainer), **saved,
        **({"data": data.summary(), "train_loss_history": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
           if data is not None else {}),
    }


def _print_format_notes(data: Any, tokenizer: Any, recipe: TrainRecipe) -> None:
    """Print :func:`lowmem.data.format_notes` of the recipe's data (process 0)."""
    from lowmem.data import format_notes

    if data is not None and is_main_process():
        for notice in format_notes(data, tokenizer, f"dataset {str(recipe.dataset)!r}"):
            print(f"note: {notice}")


def dropped_rows(before: Any, after: Any, columns: tuple[str, ...]) -> list[int] | None:
    """The rows of ``before`` missing from ``after``, an ordered subset of it (a ``filter``), matched on
    ``columns`` (a string of ``after`` may end with what TRL appended: its "Adding EOS" step); ``None`` when
    ``after`` lacks those columns."""
    if any(c not in after.column_names for c in columns):
        return None

    def same(a: Any, b: Any) -> bool:
        return a == b or isinstance(a, str) and isinstance(b, str) and b.startswith(a)

    kept = iter(zip(*(after[c] for c in columns)))
    want, out = next(kept, None), []
    for i, row in enumerate(zip(*(before[c] for c in columns))):
        if want is not None and all(same(a, b) for a, b in zip(row, want)):
            want = next(kept, None)
        else:
            out.append(i)
    return out


def check_dropped_rows(trainer: Any, data: Any, args: Any) -> None:
    """TRL's ``SFTTrainer`` and ``DPOTrainer`` drop the rows that truncation to ``max_length`` left without a trained
    token (a prompt filling ``max_length`` under ``truncation_mode: keep_start``; SFT with ``completion_only_loss`` /
    ``assistant_only_loss``), without a word: on a 12-row file with 3 long prompts SFT trained on 9 and
    ``metrics.json`` said 12; DPO on 8 pairs with 4 long prompts trained on 4. Refused here, after TRL prepared the data and before training, naming the rows (0-based) and the fixes.

    Raises:
        ConfigError: Naming ``max_length``, the dataset, how many rows and which.
    """
    if getattr(args, "packing", False):
        return  # packed rows are not the dataset's rows
    for name, before, after in (("dataset", data.train, trainer.train_dataset),
                                ("eval_dataset", data.eval, trainer.eval_dataset)):
        if before is None or after is None or not hasattr(after, "column_names") or len(after) >= len(before):
            continue
        lost = dropped_rows(before, after, data.format.columns)
        count = len(before) - len(after)
        if lost is not None and len(lost) != count:  # TRL rewrote the columns (an implicit prompt extracted)
            lost = None
        shown = f" (rows {lost[:5] + (['...'] if len(lost) > 5 else [])}, 0-based)" if lost else ""
        raise ConfigError(
            f"max_length={args.max_length}: {count} of {len(before)} rows of {name}{shown} keep no trained token after "
            f"truncation (their prompt fills max_length; truncation_mode={getattr(args, 'truncation_mode', None)!r}), and "
            f"TRL's {_trl_class_name(trainer)} would drop them without a word; raise max_length, set truncation_mode: "
            "keep_end, or "
            "shorten or remove those rows")


def _trl_class_name(trainer: Any) -> str:
    """The TRL class a lowmem trainer derives from (``SFTTrainer``, ``DPOTrainer``), for messages."""
    return next((c.__name__ for c in type(trainer).__mro__ if c.__module__.startswith("trl.")), type(trainer).__name__)


def _trl_config_and_trainer(kind: str) -> tuple[type, type]:
    from lowmem import trainers as t

    return {
        "dpo": (t.LowMemDPOConfig, t.LowMemDPOTrainer), "grpo": (t.LowMemGRPOConfig, t.LowMemGRPOTrainer),
        "gvpo": (t.GVPOConfig, t.GVPOTrainer), "bnpo": (t.BNPOConfig, t.BNPOTrainer),
    }[kind]


def _run_trl(recipe: TrainRecipe) -> dict[str, Any]:
    """DPO: margin and accuracy on a fixed set of 64 training pairs before and after training.
    GRPO/GVPO/BNPO: mean reward of the first 5 and the last 10 logged rewards (:data:`REWARD_WINDOWS`; and every
    logged one's, ``reward_history``, at the steps of ``reward_steps``)."""
    from transformers import set_seed

    from lowmem.data import dpo_eval_rows, prepare_tokenizer, recipe_data
    from lowmem.kit import preference_dataset, reward_dataset, reward_fn
    from lowmem.quant import trainable_dtypes_kept
    from lowmem.rewards import load_reward_funcs, reward_histories

    set_seed(recipe.seed)
    _, trainer_cls = _trl_config_and_trainer(recipe.trainer)  # its config: build_training_args
    data = recipe_data(recipe)  # the user's dataset (checked before the model loads), or None: synthetic task
    synthetic = reward_dataset(recipe.train_size, recipe.seed) if data is None and recipe.trainer != "dpo" else None
    columns = (data.train if data is not None else synthetic).column_names if recipe.trainer != "dpo" else None
    # each function's signature checked against TRL's call (and its outputs when called) before the model loads
    eval_columns = data.eval.column_names if data is not None and data.eval is not None and columns is not None else None
    reward_funcs = load_reward_funcs(recipe.reward_funcs, columns, eval_columns) if recipe.reward_funcs is not None \
        else reward_fn
    if data is not None and recipe.trainer != "dpo":  # the trainer's check, made after TRL loaded the model: here before
        from types import SimpleNamespace

        from lowmem.trainers.trl import ConfigFieldError, check_kept_columns

        try:  # (GRPOConfig's default is False)
            check_kept_columns(SimpleNamespace(remove_unused_columns=recipe.training_args.get("remove_unused_columns")),
                               data.train, data.eval)
        except ConfigFieldError as err:
            raise ConfigError(err.named(recipe_key(recipe))) from None
    if recipe.trainer != "dpo":  # one generation batch of distinct prompts, else TRL's sampler yields none: 0 steps
        from lowmem.trainers.trl import ConfigFieldError, check_generation_batch_prompts

        try:
            check_generation_batch_prompts(build_training_args(recipe), synthetic if data is None else data.train)
        except ConfigFieldError as err:
            raise ConfigError(err.named(recipe_key(recipe))) from None
    if recipe.quantization is not None or recipe.lora is not None:
        model, tok, model_dir = load_policy(recipe)
    else:  # TRL loads the policy and the reference by path (model_init_kwargs: dtype): not a second copy here
        model, tok, model_dir = None, *_policy_tokenizer_and_dir(recipe)
    prepare_tokenizer(recipe, data, tok)
    _print_format_notes(data, tok, recipe)
    if recipe.trainer != "dpo":  # prompt + completion within the model's context (TRL's default is 512 tokens)
        notice = fit_completion_length(recipe, tok, [synthetic] if data is None else [data.train, data.eval])
        if notice is not None and is_main_process():
            print(f"note: {notice}")
    # adapters attached here, TRL's reference is the base with adapters disabled; else TRL loads both by path
    policy_arg: Any = model if model is not None else model_dir
    args = build_training_args(recipe)
    if recipe.trainer == "dpo":
        train, evals = ((preference_dataset(recipe.train_size, recipe.seed), preference_dataset(64, recipe.seed))
                        if data is None else (data.train, dpo_eval_rows(data)))
        with trainable_dtypes_kept(model):  # TRL casts a quantized model's adapters to bfloat16 (lowmem.quant)
            trainer = trainer_cls(model=policy_arg, args=args, train_dataset=train, eval_dataset=evals,
                                  processing_class=tok, callbacks=_memory_callbacks(recipe))
        if data is not None:
            check_dropped_rows(trainer, data, args)
            check_untruncated_rows(trainer, recipe, args)
        alias_num_experts(trainer.model.config.get_text_config())  # TRL's router aux loss reads num_experts
        _eval_on_start(trainer, recipe, True)  # margins before training (see _train)
        out = _train(trainer, recipe)
        before = _first_eval(trainer)
        after = trainer.evaluate()
        result = {
            "initial_margin": before.get("eval_rewards/margins"), "final_margin": after["eval_rewards/margins"],
            "margin_pairs": len(evals),  # the pairs the margins are measured on (fewer than 64 in a small dataset)
            "initial_accuracy": before.get("eval_rewards/accuracies"), "final_accuracy": after["eval_rewards/accuracies"],
            "margin_history": [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h],
        }
    else:
        evals = rl_eval_prompts(recipe, data)
        with trainable_dtypes_kept(model):  # TRL casts a quantized model's adapters to bfloat16 (lowmem.quant)
            trainer = trainer_cls(model=policy_arg, reward_funcs=reward_funcs, args=args, processing_class=tok,
                                  train_dataset=synthetic if data is None else data.train,
                                  eval_dataset=evals, callbacks=_memory_callbacks(recipe))
        alias_num_experts(trainer.model.config.get_text_config())  # TRL's router aux loss reads num_experts
        _eval_on_start(trainer, recipe, evals is not None)  # the held-out reward before training (see _train)
        out = _train(trainer, recipe)
        # None: a step in which every reward function returned None for every completion (TRL logs None then)
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        head, tail = REWARD_WINDOWS
        result = {
            "initial_reward": mean_reward(rewards[:head]), "final_reward": mean_reward(rewards[-tail:]),
            "reward_history": rewards, "reward_steps": [h["step"] for h in trainer.state.log_history if "reward" in h],
            "reward_func_histories": reward_histories(trainer.state.log_history),  # each function's mean per step
        }
        if evals is not None:  # mean reward of completions sampled for the held-out prompts, before and after
            result["initial_eval_reward"] = _first_eval(trainer).get("eval_reward")
            result["final_eval_reward"] = trainer.evaluate().get("eval_reward")
    saved = _save_outputs(trainer, recipe)
    policy = trainer.model
    return {
        **result, "steps": trainer.state.global_step, "train_runtime_s": out.metrics.get("train_runtime"),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer), "adamw_state_bytes": adamw_state_bytes(policy),
        "optimizer_state_sharded": optimizer_state_sharded(trainer.optimizer),
        "trainable_params": sum(p.numel() for p in trainable_parameters(policy)), **_memory_metrics(trainer),
        **_run_metrics(trainer), **saved,
        **({"data": data.summary()} if data is not None else {}),
    }


# how many logged rewards initial_reward / final_reward average: the first 5 and the last 10
REWARD_WINDOWS = (5, 10)


def _step_range(first: int, last: int) -> str:
    return f"step {last}" if first >= last else f"steps {first}-{last}"


def reward_summary(metrics: dict[str, Any]) -> str:
    """The summary line of a GRPO/GVPO/BNPO run: ``initial_reward`` and ``final_reward`` with the training steps they
    average (:data:`REWARD_WINDOWS` logged rewards, each the mean over its ``logging_steps`` steps; ``reward_steps``:
    the step of each), e.g. ``mean reward: steps 1-5 0.1 -> steps 191-200 0.6 after 200 steps``. A run shorter than
    the windows averages what it logged: one range when the two windows are the same logged rewards (before, a 2-step
    run said "first 5 steps ... -> last 10 steps")."""
    rewards, at, steps = metrics["reward_history"], metrics.get("reward_steps"), metrics["steps"]
    if not rewards:
        return f"mean reward: none logged in {steps} steps (logging_steps is more than the steps)"
    at = at if at and len(at) == len(rewards) else list(range(1, len(rewards) + 1))
    given = lambda v: "none given" if v is None else f"{v:.4f}"  # noqa: E731
    n = len(rewards)
    k, m = min(REWARD_WINDOWS[0], n), min(REWARD_WINDOWS[1], n)
    first = _step_range(1, at[k - 1])
    last = _step_range(at[n - m - 1] + 1 if n > m else 1, at[-1])
    if k == n and m == n:  # the same logged rewards: one mean, one range
        return f"mean reward over {first}: {given(metrics['initial_reward'])} after {steps} step{'s' * (steps != 1)}"
    return (f"mean reward: {first} {given(metrics['initial_reward'])} -> {last} {given(metrics['final_reward'])} "
            f"after {steps} steps")


def mean_reward(values: list[float | None]) -> float | None:
    """The mean of the steps' rewards that were given (``None`` left out); ``None`` when no step had one.
    Before, ``sum`` over a ``None`` (TRL allows a reward function to return ``None`` for a completion, and every
    function did for a whole step) failed after training with ``TypeError``, and ``metrics.json`` was not written."""
    given = [v for v in values if v is not None]
    return sum(given) / len(given) if given else None


def rl_eval_prompts(recipe: TrainRecipe, data: Any) -> Any:
    """GRPO/GVPO/BNPO's held-out prompts: the user's eval set (``eval_dataset`` / ``eval_split``)
    whenever there is one; on the synthetic task, its ``eval_size`` held-out prompts when
    ``eval_steps`` asks for evaluation; else `None` (no evaluation: the training reward is reported)."""
    from lowmem.kit import reward_dataset

    if data is not None:
        return data.eval
    return reward_dataset(recipe.eval_size, 0, "eval") if recipe.eval_steps else None


TRAINERS: dict[str, Callable[[TrainRecipe], dict[str, Any]]] = {
    "sft": _run_sft, "dpo": _run_trl, "grpo": _run_trl, "gvpo": _run_trl, "bnpo": _run_trl,
}


def check_optimizer_on_meta(recipe: TrainRecipe, args: Any) -> None:
    """Build the run's optimizer, as the trainer will (:class:`~lowmem.trainers.hf.LowMemOptimizerMixin`: the same
    hyperparameters, ``optim_target_modules``, layerwise mode), over the model built on the meta device from its
    ``config.json`` (the embedded tiny Llama's config without ``model``), before the model and the data load: the
    optimizer's own checks of shape-dependent values then fail here, with their own messages (a subspace ``rank``
    that applies to none of the weights: :func:`~lowmem.optim.recipes.subspace.check_rank_applies`; target modules
    that match no layer). Nothing is allocated (meta tensors). With ``lora`` the adapters peft adds are what trains:
    they are attached on the meta device too (3 s for a 7B shape; a 4-bit base's adapters have the shapes of the
    unquantized one's). ``quantization`` without ``lora`` trains lowmem.quant's default adapters
    (:data:`~lowmem.quant.DEFAULT_LORA`): those are attached. A model or adapter setting the meta build cannot take
    (remote code, a multimodal model, ``target_modules`` matching no layer) skips this check: the real build reports it. Warnings of this build are dropped (the real build gives
    them once).

    Raises:
        ValueError: The optimizer refuses a value for this model's shapes (the run would fail after loading)."""
    import warnings

    from transformers import AutoConfig

    from lowmem.kit import tiny_config
    from lowmem.memory.estimate import build_meta_model
    from lowmem.trainers.hf import _explain_targets, target_modules_hparam, trainer_hparams

    name = recipe.optim
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = tiny_config() if recipe.model is None else AutoConfig.from_pretrained(recipe.model)
            model = build_meta_model(config, getattr(torch, recipe.dtype))
            lora = recipe.lora
            if lora is None and recipe.quantization is not None:  # what load_quantized_model attaches
                from lowmem.quant import DEFAULT_LORA

                lora = dict(DEFAULT_LORA)
            if lora is not None:
                from lowmem.quant import attach_lora

                with torch.device("meta"):
                    model = attach_lora(model, lora_config(lora))
        except Exception:  # a model the meta build does not cover (multimodal, remote code): the real build checks it
            return
        hp = target_modules_hparam(name, args, trainer_hparams(name, args, recipe.optim_args))
        with _explain_targets(model, hp, get_entry(name).batched_targets):
            if recipe.layerwise:
                from lowmem.optim.layerwise import LayerwiseOptimizer

                LayerwiseOptimizer(model, name, accumulation_steps=args.gradient_accumulation_steps,
                                   max_grad_norm=args.max_grad_norm or None, clip_mode="global_prev", **hp)
            else:
                opt = create_optimizer(model, name, **hp)
                _check_sharded_projection(opt, name, args)


def _check_sharded_projection(opt: Any, name: str, args: Any) -> None:
    """Under FSDP (``ACCELERATE_USE_FSDP=true`` or ``training_args.fsdp``) every 2-D weight is sharded by rows
    (FSDP2's ``Shard(0)``), and a row or flat coordinate subspace of a projected weight (FRUGAL's ``projection:
    rows`` / ``randk`` / left ``blocks``; a column subspace with ``moment_policy: rotate``) is refused by the optimizer
    at the first step (:func:`lowmem.optim.sharded.coordinate_refusal`), after every rank loaded the model and ran
    the evaluation on start: the same refusal here, from the meta build's groups, before anything loads. A batch of
    matrices (fused experts, FSDP2 gives each rank whole ones) is stepped exactly and is not concerned.

    Raises:
        ConfigError: Naming ``optim_args.<key>=<value>``, the FSDP source and the first weight's shape."""
    import os

    from lowmem.optim.sharded import coordinate_refusal

    env_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not (env_fsdp or getattr(args, "fsdp", None)):
        return
    recipe = getattr(opt, "recipe", None)
    if recipe is None or recipe.projection is None:
        return
    for group in opt.param_groups:
        for p in group["params"]:
            if p.ndim != 2 or group.get("rank") is None or group["rank"] >= min(p.shape):
                continue
            why = coordinate_refusal(recipe, group, p.shape)
            if why is not None:
                key = "moment_policy" if "rotate" in why else "projection"
                fsdp = ("ACCELERATE_USE_FSDP=true (accelerate launch with an FSDP configuration)" if env_fsdp
                        else "training_args.fsdp")
                raise ConfigError(f"optim_args.{key}={group[key]!r}: '{name}' under FSDP ({fsdp}) would refuse its "
                                  f"{tuple(p.shape)} weights at the first step: {why}. Use a column subspace "
                                  "(projection: columns) or a basis (svd, random), or launch with DDP")


def run(recipe: TrainRecipe, console: Any = None) -> dict[str, Any]:
    """Run a recipe; print the losses and optimizer-state memory; write ``output_dir/metrics.json``.

    Returns the metrics: ``optimizer``, ``optim_source`` (where it was named: :data:`OPTIM_SOURCES`), ``optim_args``, ``trainer``, ``model``, ``seed``,
    ``initial_loss`` and ``final_loss`` (held-out eval loss before and after training), ``steps``,
    ``optimizer_state_bytes`` (measured after training; under FSDP2 process 0's part,
    ``optimizer_state_sharded``), ``adamw_state_bytes`` (exact, for the same parameters, unsharded), ``trainable_params``, ``train_runtime_s``, ``wall_time_s``,
    ``effective_hparams`` (read back from the optimizer), ``eval_history``, ``resumed_from``.

    The trainer's config and the checkpoint to resume from are checked before any model loads.
    Under ``torchrun`` / ``accelerate launch`` only process 0 prints and writes ``metrics.json``.
    """
    from rich.console import Console

    console = console or Console(soft_wrap=True)  # whole lines in logs and pipes
    main = is_main_process()
    start = time.perf_counter()
    from lowmem.trainers.hf import trainer_hparams

    args = build_training_args(recipe)  # the config class's own checks, before any model loads
    notice = fit_max_length(recipe, args)  # TRL's default max_length to a shorter model context
    if notice is not None:
        args = build_training_args(recipe)
        if main:
            console.print(f"[yellow]note[/]: {notice}")
    hf_logger = logging.getLogger("lowmem.trainers.hf")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # its warnings come once, when the trainer builds the optimizer
    try:  # TrainingArguments values the optimizer rejects (adam_epsilon with Adafactor's pair), also early
        trainer_hparams(recipe.optim, args, recipe.optim_args)
        check_optimizer_on_meta(recipe, args)  # shape-dependent values (a rank too large for every weight), also early
    except ValueError as err:
        raise ConfigError(str(err)) from None
    finally:
        hf_logger.setLevel(level)
    if main:  # a final save interrupted between its renames: its aside folder named, never deleted
        from rich.markup import escape

        for m in interrupted_saves(recipe.output_dir):
            console.print(f"[yellow]warning[/]: {escape(m)}")
    resumed_from = resolve_checkpoint(recipe, warn=lambda m: main and console.print(f"[yellow]warning[/]: {m}"))
    earlier = sorted(p.name for p in Path(recipe.output_dir).glob("checkpoint-*") if p.is_dir())
    if main and resumed_from is None and earlier:
        aside = move_earlier_checkpoints(recipe.output_dir, earlier)
        console.print(f"[yellow]warning[/]: {recipe.output_dir} holds {earlier} from an earlier run; this run starts "
                      f"from step 0 and moved them to {aside} (delete it when not needed; "
                      "resume_from_checkpoint: true / --resume continues the earlier run instead)")
    later = later_checkpoints(earlier, resumed_from) if resumed_from is not None else []
    if main and later:  # the resumed run would rewrite them file by file (AUDIT-RESUME18 5)
        aside = move_earlier_checkpoints(recipe.output_dir, later)
        console.print(f"[yellow]warning[/]: {recipe.output_dir} holds {later} from an earlier run, after the checkpoint "
                      f"this run resumes from ({resumed_from}); they were moved to {aside} before this run writes its "
                      "own (delete it when not needed; move one back to resume from it instead)")
    if main:
        console.print(f"[bold]lowmem train[/]: trainer={recipe.trainer} optim={recipe.optim} "
                      f"({OPTIM_SOURCES[recipe.optim_source]}) {recipe.optim_args or ''} "
                      f"model={recipe.model or 'embedded tiny Llama'} "
                      + (f"steps={recipe.steps}" if recipe.steps is not None else f"epochs={args.num_train_epochs:g}")
                      + (f" resuming from {resumed_from}" if resumed_from else ""))
    hint = _held_out_hint(recipe.dataset) if recipe.eval_dataset is None and recipe.eval_split is None else ""
    if main and hint:
        console.print(f"[yellow]note[/]: no eval set{hint}")
    result = TRAINERS[recipe.trainer](recipe)
    metrics = {
        "optimizer": get_entry(recipe.optim).name, "optim_source": recipe.optim_source, "optim_args": recipe.optim_args,
        "trainer": recipe.trainer,
        "model": recipe.model, "seed": recipe.seed, "quantization": recipe.quantization, "lora": recipe.lora,
        "layerwise": recipe.layerwise, "resumed_from": resumed_from, "processes": launched_processes(), **result,
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    if not main:
        return metrics
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    ours, adamw = metrics["optimizer_state_bytes"], metrics["adamw_state_bytes"]
    if "initial_reward" in metrics:
        console.print(reward_summary(metrics))
        missing = sum(r is None for r in metrics["reward_history"])
        if missing:
            console.print(f"note: in {missing} of {len(metrics['reward_history'])} logged steps every reward function "
                          "returned None for every completion (no reward signal in those steps)")
        if metrics.get("final_eval_reward") is not None:
            console.print(f"held-out prompts' mean reward: initial {_num(metrics['initial_eval_reward'])} -> final "
                          f"{metrics['final_eval_reward']:.4f}")
    elif "initial_margin" in metrics:
        n = metrics.get("margin_pairs", 64)
        pairs = f"{n} training pairs" if not metrics.get("data") or not recipe.eval_dataset and not recipe.eval_split else f"eval set, {n} pairs"
        console.print(f"chosen-minus-rejected margin ({pairs}): {_num(metrics['initial_margin'])} -> "
                      f"{metrics['final_margin']:.4f}, accuracy {metrics['final_accuracy']:.3f} after {metrics['steps']} steps")
    elif metrics.get("initial_loss") is None and metrics.get("final_loss") is None:  # no eval set: the training loss
        hist = metrics.get("train_loss_history")
        console.print(f"training loss (no eval set): first logged {hist[0]:.4f} -> last logged {hist[-1]:.4f} after "
                      f"{metrics['steps']} steps" if hist else
                      f"no eval set and no training loss logged in {metrics['steps']} steps (logging_steps > steps)")
    else:
        console.print(f"eval loss: initial {_num(metrics['initial_loss'])} -> final {metrics['final_loss']:.4f} "
                      f"after {metrics['steps']} steps")
    if metrics.get("optimizer_state_sharded"):  # FSDP2: process 0's part against the whole AdamW state
        console.print(f"optimizer state: {metrics['optimizer']} {ours:,} bytes on process 0 of {metrics['processes']} "
                      f"(its shards, FSDP2) vs AdamW {adamw:,} bytes unsharded ({100 * ours / adamw:.1f}%) for "
                      f"{metrics['trainable_params']:,} trainable parameters")
    else:
        console.print(f"optimizer state: {metrics['optimizer']} {ours:,} bytes vs AdamW {adamw:,} bytes "
                      f"({100 * ours / adamw:.1f}% of AdamW) for {metrics['trainable_params']:,} trainable parameters")
    if metrics.get("best_model_step") is not None and metrics["best_model_step"] != metrics["steps"]:
        console.print(f"saved model: the best checkpoint, step {metrics['best_model_step']} of {metrics['steps']} "
                      f"(load_best_model_at_end, {metrics['metric_for_best_model']} {metrics['best_metric']:.4f}); "
                      "the final values above are its")
    if metrics.get("effective_hparams"):
        groups, key = metrics["effective_hparams"], get_entry(recipe.optim).target_key
        targeted = [g for g in groups if key is not None and g.get(key) not in (None, False)]
        # the targeted group (where rank / use_muon ... apply), else the largest
        g = max(targeted or groups, key=lambda g: g["num_params"])
        keys = ("lr", "weight_decay", "betas", "eps", "rank", "update_proj_gap")
        if targeted and key == "use_muon":  # the Muon family's group: its own settings, not AdamW's betas / eps
            keys = ("lr", "weight_decay", "momentum", "nesterov", "beta2", "row_eps", "update_scale", "adjust_lr_fn")
        set_here = [k for k in (recipe.optim_args or {}) if k not in keys and k != "target_modules"]
        keys = (*keys, *set_here)  # what the user set in optim_args (racs' gamma, sm3's momentum, ...): shown applied
        shown = {k: v for k, v in g.items() if k in keys}
        which = (f"targeted group, {g['num_params']:,} of {sum(h['num_params'] for h in groups):,} parameters"
                 if targeted else "largest group")
        console.print(f"optimizer hyperparameters in effect ({which}): " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    if metrics.get("memory"):
        mem = metrics["memory"]
        shown = {"peak": "training step peak", "evaluation": "evaluation peak"}  # MemoryCallback's components
        console.print("peak memory (MiB): " + ", ".join(f"{shown.get(k, k)} {v / 2**20:.2f}" for k, v in mem.items()))
    console.print(f"metrics: {out / 'metrics.json'}  ({metrics['wall_time_s']:.1f} s)")
    return metrics
