"""``lowmem train``: fine-tune a model from a YAML recipe with a low-memory optimizer.

A recipe is a flat YAML mapping whose keys are the fields of :class:`TrainRecipe`; anything not
given keeps its default, unknown keys are an error listing the valid ones. ``trainer`` selects the
training method (``sft``, ``dpo``, ``grpo``, ``gvpo``, ``bnpo``: the entries of :data:`TRAINERS`);
``quantization``, ``lora``, ``gradient_checkpointing``, ``layerwise`` and ``track_memory`` set the
memory side of the run::

    from lowmem.train import load_recipe, run
    metrics = run(load_recipe("configs/adafactor.yaml", steps=50))
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from .io import write_text_atomic
from .optim import create_optimizer, get_entry

AVAILABLE_TRAINERS = ("sft", "dpo", "grpo", "gvpo", "bnpo")
TASKS = ("addition",)
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


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

        > Your own data (docs/training.md, "Training on your own data")

        dataset (`str` or `None`, defaults to `None`):
            Local training data (``--dataset``), loaded with ``datasets`` and never downloaded: a
            ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` / ``.txt`` file, a folder of such files,
            or a folder written by ``save_to_disk`` (its ``train`` split for a ``DatasetDict``).
            Columns in TRL's formats: SFT ``text``, ``messages``, or ``prompt`` + ``completion``;
            DPO ``prompt`` + ``chosen`` + ``rejected`` (or ``chosen`` + ``rejected`` with an implicit
            prompt); GRPO/GVPO/BNPO ``prompt`` plus any columns, passed to the reward functions as
            keyword arguments. Standard (strings) or conversational (lists of ``{role, content}``
            messages, rendered with the chat template). SFT then runs TRL's ``SFTTrainer``
            (:class:`~lowmem.trainers.LowMemSFTTrainer`), so ``max_length``, ``packing``,
            ``completion_only_loss``, ``assistant_only_loss``, ``dataset_text_field`` are its
            ``SFTConfig`` fields (in ``training_args``). See :mod:`lowmem.data`.
        eval_dataset (`str` or `None`, defaults to `None`):
            Local held-out data in the same format (for a saved ``DatasetDict``: its ``validation``,
            ``test`` or ``eval`` split). SFT reports its loss before and after training
            (``initial_loss``, ``final_loss``); DPO its margin and accuracy. Requires ``dataset``.
        eval_split (`float` or `None`, defaults to `None`):
            Fraction of ``dataset`` in ``(0, 1)`` held out for evaluation instead, shuffled by ``seed``.
            Exclusive with ``eval_dataset``.
        chat_template (`str` or `None`, defaults to `None`):
            Jinja chat template (the text, or the path of a ``.jinja`` file) set on the tokenizer and
            saved with the model. Conversational data needs one, here or in the tokenizer.
        reward_funcs (`list` or `None`, defaults to `None`):
            GRPO/GVPO/BNPO rewards: built-in names (``exact_match``, ``format``, ``addition``),
            ``"package.module:function"``, ``"path/to/file.py:function"`` (your code, imported only
            because the recipe names it), or ``{name: ..., <keyword>: value}`` to bind keyword
            arguments. See :mod:`lowmem.rewards`. `None`: ``addition`` on the synthetic task;
            required with ``dataset``.
        reward_weights (`list[float]` or `None`, defaults to `None`):
            One weight per reward function (TRL's ``reward_weights``); `None` weighs each 1.0.

        > Optimizer

        optim (`str`, defaults to `"adafactor"`):
            Registered lowmem optimizer (``lowmem list``; ``--optim``).
        optim_args (`dict` or `str`, defaults to `{}`):
            Extra hyperparameters of ``optim``: mapping, JSON object or ``"k=v,k=v"``
            (``--optim-args``). They win over ``lr`` and ``weight_decay``.
        lr (`float`, defaults to `1e-2`):
            Learning rate (``--lr``); the Trainer's scheduler drives it.
        weight_decay (`float`, defaults to `0.0`):
            Decoupled weight decay; never applied to biases and norm weights.
        lr_scheduler (`str`, defaults to `"constant"`):
            ``TrainingArguments.lr_scheduler_type`` (``"linear"``, ``"cosine"``, ...).
        warmup_steps (`int`, defaults to `0`):
            Linear warm-up steps.

        > Run

        steps (`int`, defaults to `200`):
            Optimizer steps (``--steps``).
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

        > Memory

        quantization (`str`, `dict` or `None`, defaults to `None`):
            Load the model in 4 bits through bitsandbytes (``BitsAndBytesConfig``): ``"nf4"``,
            ``"fp4"``, or ``{quant_type, double_quant, compute_dtype}`` (double quantization is on
            by default). The model is prepared with ``peft.prepare_model_for_kbit_training`` and
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
            of ``weights``, ``gradients``, ``optimizer_states``, ``activations`` and ``peak`` to
            ``metrics.json`` (``memory``). On CUDA from the allocator's statistics at every step; on
            CPU the first 2 steps run under a live-tensor tracker (slower), later steps count
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
    dataset: str | None = None
    eval_dataset: str | None = None
    eval_split: float | None = None
    chat_template: str | None = None
    reward_funcs: list[str | dict[str, Any]] | None = None
    reward_weights: list[float] | None = None
    optim: str = "adafactor"
    optim_args: dict[str, Any] | str = field(default_factory=dict)
    lr: float = 1e-2
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    steps: int = 200
    batch_size: int = 16
    seed: int = 0
    logging_steps: int = 20
    output_dir: str = "outputs/lowmem-train"
    save_model: bool = True
    save_steps: int | None = None
    quantization: str | dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    gradient_checkpointing: bool = False
    layerwise: bool = False
    track_memory: bool = True
    training_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from lowmem.trainers.hf import parse_optim_args

        if self.trainer not in AVAILABLE_TRAINERS:
            raise ValueError(f"Unknown trainer {self.trainer!r}; available: {list(AVAILABLE_TRAINERS)}")
        from lowmem.data import validate_data_fields

        validate_data_fields(self)  # dataset, eval_*, chat_template, reward_* (lowmem.data, lowmem.rewards)
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r}; valid: {list(TASKS)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"Invalid dtype {self.dtype!r}; valid: ['float32', 'bfloat16', 'float16']")
        for name in ("train_size", "eval_size", "steps", "batch_size", "logging_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Invalid {name}={value!r}: expected an integer > 0")
        if not isinstance(self.training_args, dict):
            raise ValueError(f"training_args must be a mapping of TrainingArguments fields; got {self.training_args!r}")
        get_entry(self.optim)  # unknown name -> error listing the registered ones
        self.optim_args = parse_optim_args(self.optim_args)
        if self.quantization is not None:
            from lowmem.quant import bnb_config

            bnb_config(self.quantization)  # 'nf4' / 'fp4' / dict, else a ValueError naming the choices
        if self.lora is not None:
            lora_config(self.lora)


RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(TrainRecipe))


def lora_config(fields: dict[str, Any]):
    """``peft.LoraConfig(task_type="CAUSAL_LM", **fields)``, with an error listing valid fields."""
    from peft import LoraConfig

    if not isinstance(fields, dict):
        raise ValueError(f"lora must be a mapping of peft.LoraConfig fields; got {fields!r}")
    valid = sorted(f.name for f in dataclasses.fields(LoraConfig))
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"Unknown lora field(s) {unknown}; valid: {valid}")
    return LoraConfig(**{"task_type": "CAUSAL_LM", **fields})


def load_policy(recipe: TrainRecipe) -> tuple[nn.Module, Any, str | None]:
    """The model to train, its tokenizer, and a local directory holding the base model.

    Applies ``quantization`` (4-bit base + LoRA, via :func:`lowmem.quant.load_quantized_model`) or
    ``lora`` (adapters on the full-precision model). The directory is ``recipe.model``, or for the
    embedded tiny model a temporary copy when something must reload it by path (4-bit loading); else
    ``None``.
    """
    import tempfile

    from lowmem.kit import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(recipe.model, dtype=recipe.dtype, seed=recipe.seed)
    model_dir = recipe.model
    if recipe.quantization is not None:
        from lowmem.quant import load_quantized_model

        if model_dir is None:
            model_dir = tempfile.mkdtemp(prefix="lowmem-tiny-")
            model.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
        model = load_quantized_model(
            model_dir, quantization=recipe.quantization, lora=lora_config(recipe.lora) if recipe.lora else None,
            dtype=recipe.dtype, gradient_checkpointing=recipe.gradient_checkpointing,
        )
    elif recipe.lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(recipe.lora))
    return model, tok, model_dir


def _memory_args(recipe: TrainRecipe) -> dict[str, Any]:
    return {"gradient_checkpointing": recipe.gradient_checkpointing, "lowmem_layerwise": recipe.layerwise}


def _memory_callbacks(recipe: TrainRecipe) -> list[Any]:
    from lowmem.trainers.memory_callback import MemoryCallback

    return [MemoryCallback(track_steps=2)] if recipe.track_memory else []


def _memory_metrics(trainer: Any) -> dict[str, Any]:
    """``{"memory": {component: peak bytes}}`` from the run's MemoryCallback, if any."""
    from lowmem.trainers.memory_callback import MemoryCallback

    cb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, MemoryCallback)), None)
    return {"memory": dict(cb.peak)} if cb is not None else {}


def load_recipe(path: str | Path | None = None, **overrides: Any) -> TrainRecipe:
    """Read a YAML recipe (``yaml.safe_load``) and apply ``overrides`` (``None`` values are skipped).

    ``path=None`` reads ``configs/default.yaml`` of the lowmem checkout when present, else uses
    the :class:`TrainRecipe` defaults.

    Raises:
        ValueError: Unknown keys (the message lists the valid ones), or invalid values.
        FileNotFoundError: ``path`` does not exist.
    """
    data: dict[str, Any] = {}
    if path is None and DEFAULT_RECIPE.is_file():
        path = DEFAULT_RECIPE
    if path is not None:
        text = Path(path).read_text()  # FileNotFoundError names the path
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe is a YAML mapping of keys {list(RECIPE_KEYS)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}unknown recipe key(s) {unknown}; valid keys: {list(RECIPE_KEYS)}")
    return TrainRecipe(**data)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters, each once (tied weights are shared)."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return list(seen.values())


def adamw_state_bytes(model: nn.Module) -> int:
    """Exact AdamW state bytes for ``model``'s trainable parameters (float32 moments + step
    counters), computed by lowmem's AdamW over meta-device copies: nothing is allocated."""
    metas = [nn.Parameter(torch.empty_like(p, device="meta")) for p in trainable_parameters(model)]
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


def _run_sft(recipe: TrainRecipe) -> dict[str, Any]:
    from transformers import default_data_collator, set_seed

    from lowmem.data import prepare_tokenizer, recipe_data
    from lowmem.kit import sft_dataset, tokenize_sft
    from lowmem.trainers import LowMemSFTConfig, LowMemSFTTrainer, LowMemTrainer, LowMemTrainingArguments

    set_seed(recipe.seed)
    data = recipe_data(recipe)  # the user's dataset (checked before the model loads), or None: synthetic task
    model, tok, _ = load_policy(recipe)
    prepare_tokenizer(recipe, data, tok)
    if data is None:
        train = tokenize_sft(sft_dataset(recipe.train_size, recipe.seed, "train"), tok)
        evals = tokenize_sft(sft_dataset(recipe.eval_size, 0, "eval"), tok)  # fixed held-out set
        args_cls, trainer_cls, args_kw, trainer_kw = LowMemTrainingArguments, LowMemTrainer, {}, {"data_collator": default_data_collator}
    else:  # TRL's SFTTrainer: formats, chat template, max_length, packing, completion-only loss (SFTConfig)
        train, evals = data.train, data.eval
        args_cls, trainer_cls, args_kw, trainer_kw = LowMemSFTConfig, LowMemSFTTrainer, {"bf16": recipe.dtype == "bfloat16"}, {}
    args = args_cls(**{
        "output_dir": recipe.output_dir, "lowmem_optim": recipe.optim, "lowmem_optim_args": dict(recipe.optim_args),
        "learning_rate": recipe.lr, "weight_decay": recipe.weight_decay, "lr_scheduler_type": recipe.lr_scheduler,
        "warmup_steps": recipe.warmup_steps, "max_steps": recipe.steps, "per_device_train_batch_size": recipe.batch_size,
        "per_device_eval_batch_size": 64, "logging_steps": recipe.logging_steps, "seed": recipe.seed,
        "save_strategy": "steps" if recipe.save_steps else "no", "save_steps": recipe.save_steps or 500,
        "report_to": "none", "disable_tqdm": False, "dataloader_pin_memory": False, **_memory_args(recipe),
        **args_kw, **recipe.training_args,
    })
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tok,
        callbacks=_memory_callbacks(recipe), **trainer_kw,
    )
    initial = trainer.evaluate()["eval_loss"] if evals is not None else None
    out = trainer.train()
    final = trainer.evaluate()["eval_loss"] if evals is not None else None
    if recipe.save_model:
        trainer.save_model()
    return {
        "initial_loss": initial, "final_loss": final, "steps": trainer.state.global_step,
        "train_runtime_s": out.metrics.get("train_runtime"),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer), "adamw_state_bytes": adamw_state_bytes(model),
        "trainable_params": sum(p.numel() for p in trainable_parameters(model)), **_memory_metrics(trainer),
        **({"data": data.summary(), "train_loss_history": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
           if data is not None else {}),
    }


def _trl_config_and_trainer(kind: str) -> tuple[type, type]:
    from lowmem import trainers as t

    return {
        "dpo": (t.LowMemDPOConfig, t.LowMemDPOTrainer), "grpo": (t.LowMemGRPOConfig, t.LowMemGRPOTrainer),
        "gvpo": (t.GVPOConfig, t.GVPOTrainer), "bnpo": (t.BNPOConfig, t.BNPOTrainer),
    }[kind]


def _run_trl(recipe: TrainRecipe) -> dict[str, Any]:
    """DPO: margin and accuracy on a fixed set of 64 training pairs before and after training.
    GRPO/GVPO/BNPO: mean reward of the first 5 and the last 10 training steps (and every step's)."""
    import tempfile

    from transformers import set_seed

    from lowmem.data import dpo_eval_rows, prepare_tokenizer, recipe_data
    from lowmem.kit import preference_dataset, reward_dataset, reward_fn
    from lowmem.rewards import load_reward_funcs

    set_seed(recipe.seed)
    config_cls, trainer_cls = _trl_config_and_trainer(recipe.trainer)
    data = recipe_data(recipe)  # the user's dataset (checked before the model loads), or None: synthetic task
    reward_funcs = load_reward_funcs(recipe.reward_funcs) if recipe.reward_funcs is not None else reward_fn
    model, tok, model_dir = load_policy(recipe)
    prepare_tokenizer(recipe, data, tok)
    if recipe.quantization is not None or recipe.lora is not None:
        policy_arg: Any = model  # adapters attached here; TRL's reference is the base with adapters disabled
    else:
        if model_dir is None:  # TRL reloads reference models by path: save the embedded model first
            model_dir = tempfile.mkdtemp(prefix="lowmem-tiny-")
            model.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
        policy_arg = model_dir
    fields = {
        "output_dir": recipe.output_dir, "lowmem_optim": recipe.optim, "lowmem_optim_args": dict(recipe.optim_args),
        "learning_rate": recipe.lr, "weight_decay": recipe.weight_decay, "lr_scheduler_type": recipe.lr_scheduler,
        "warmup_steps": recipe.warmup_steps, "max_steps": recipe.steps, "per_device_train_batch_size": recipe.batch_size,
        "logging_steps": recipe.logging_steps, "seed": recipe.seed, "bf16": recipe.dtype == "bfloat16",
        "save_strategy": "steps" if recipe.save_steps else "no", "save_steps": recipe.save_steps or 500,
        "report_to": "none", "dataloader_pin_memory": False, **_memory_args(recipe),
    }
    if recipe.trainer == "dpo":
        fields["per_device_eval_batch_size"] = 64
    if recipe.reward_weights is not None:
        fields["reward_weights"] = recipe.reward_weights
    args = config_cls(**{**fields, **recipe.training_args})
    if recipe.trainer == "dpo":
        train, evals = ((preference_dataset(recipe.train_size, recipe.seed), preference_dataset(64, recipe.seed))
                        if data is None else (data.train, dpo_eval_rows(data)))
        trainer = trainer_cls(model=policy_arg, args=args, train_dataset=train, eval_dataset=evals, processing_class=tok,
                              callbacks=_memory_callbacks(recipe))
        before = trainer.evaluate()
        out = trainer.train()
        after = trainer.evaluate()
        result = {
            "initial_margin": before["eval_rewards/margins"], "final_margin": after["eval_rewards/margins"],
            "initial_accuracy": before["eval_rewards/accuracies"], "final_accuracy": after["eval_rewards/accuracies"],
            "margin_history": [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h],
        }
    else:
        trainer = trainer_cls(model=policy_arg, reward_funcs=reward_funcs, args=args, processing_class=tok,
                              train_dataset=reward_dataset(recipe.train_size, recipe.seed) if data is None else data.train,
                              callbacks=_memory_callbacks(recipe))
        out = trainer.train()
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        result = {
            "initial_reward": sum(rewards[:5]) / max(len(rewards[:5]), 1),
            "final_reward": sum(rewards[-10:]) / max(len(rewards[-10:]), 1), "reward_history": rewards,
        }
    if recipe.save_model:
        trainer.save_model()
    policy = trainer.model
    return {
        **result, "steps": trainer.state.global_step, "train_runtime_s": out.metrics.get("train_runtime"),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer), "adamw_state_bytes": adamw_state_bytes(policy),
        "trainable_params": sum(p.numel() for p in trainable_parameters(policy)), **_memory_metrics(trainer),
        **({"data": data.summary()} if data is not None else {}),
    }


TRAINERS: dict[str, Callable[[TrainRecipe], dict[str, Any]]] = {
    "sft": _run_sft, "dpo": _run_trl, "grpo": _run_trl, "gvpo": _run_trl, "bnpo": _run_trl,
}


def run(recipe: TrainRecipe, console: Any = None) -> dict[str, Any]:
    """Run a recipe; print the losses and optimizer-state memory; write ``output_dir/metrics.json``.

    Returns the metrics: ``optimizer``, ``optim_args``, ``trainer``, ``model``, ``seed``,
    ``initial_loss`` and ``final_loss`` (held-out eval loss before and after training), ``steps``,
    ``optimizer_state_bytes`` (measured after training), ``adamw_state_bytes`` (exact, for the
    same parameters), ``trainable_params``, ``train_runtime_s``, ``wall_time_s``.
    """
    from rich.console import Console

    console = console or Console(soft_wrap=True)  # whole lines in logs and pipes
    start = time.perf_counter()
    console.print(f"[bold]lowmem train[/]: trainer={recipe.trainer} optim={recipe.optim} {recipe.optim_args or ''} "
                  f"model={recipe.model or 'embedded tiny Llama'} steps={recipe.steps}")
    result = TRAINERS[recipe.trainer](recipe)
    metrics = {
        "optimizer": get_entry(recipe.optim).name, "optim_args": recipe.optim_args, "trainer": recipe.trainer,
        "model": recipe.model, "seed": recipe.seed, "quantization": recipe.quantization, "lora": recipe.lora,
        "layerwise": recipe.layerwise, **result, "wall_time_s": round(time.perf_counter() - start, 3),
    }
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    ours, adamw = metrics["optimizer_state_bytes"], metrics["adamw_state_bytes"]
    if "initial_reward" in metrics:
        console.print(f"mean reward: first 5 steps {metrics['initial_reward']:.4f} -> last 10 steps "
                      f"{metrics['final_reward']:.4f} after {metrics['steps']} steps")
    elif "initial_margin" in metrics:
        pairs = "64 training pairs" if not metrics.get("data") or not recipe.eval_dataset and not recipe.eval_split else "eval set"
        console.print(f"chosen-minus-rejected margin ({pairs}): {metrics['initial_margin']:.4f} -> "
                      f"{metrics['final_margin']:.4f}, accuracy {metrics['final_accuracy']:.3f} after {metrics['steps']} steps")
    elif metrics.get("initial_loss") is None:  # own dataset without an eval set: the logged training loss
        hist = metrics.get("train_loss_history") or [float("nan")]
        console.print(f"training loss (no eval set): first logged {hist[0]:.4f} -> last logged {hist[-1]:.4f} "
                      f"after {metrics['steps']} steps")
    else:
        console.print(f"eval loss: initial {metrics['initial_loss']:.4f} -> final {metrics['final_loss']:.4f} "
                      f"after {metrics['steps']} steps")
    console.print(f"optimizer state: {metrics['optimizer']} {ours:,} bytes vs AdamW {adamw:,} bytes "
                  f"({100 * ours / adamw:.1f}% of AdamW) for {metrics['trainable_params']:,} trainable parameters")
    if metrics.get("memory"):
        mem = metrics["memory"]
        console.print("peak memory (MiB): " + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in mem.items()))
    console.print(f"metrics: {out / 'metrics.json'}  ({metrics['wall_time_s']:.1f} s)")
    return metrics
