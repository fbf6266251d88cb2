"""Outside audit AUDOWN21 (session 21): a user who comes from ``trl sft`` / TRL's DPO and GRPO scripts,
LLaMA-Factory and the HF Trainer, with their own model directories (Llama, GPT-2, Qwen2, Mistral, Gemma, Phi-3
tiny configs and the kit's character tokenizer) and their own data, configs and reward functions, following
README.md, docs/training.md and docs/post_training.md literally.

Each test is a defect found that way, a strict xfail until it is fixed (the reason names the finding id,
``AUDOWN21 n``; /tmp/lm/FOUND_AUDOWN21.md has the reproduction and the place to change)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowmem.cli import main


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A user's GPT-2 (a learned position table of 16 positions, ``n_positions``) with the kit's character
    tokenizer and a chat template, saved with save_pretrained."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lowmem.kit import build_tokenizer

    tok = build_tokenizer(model_max_length=16)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    path = tmp_path_factory.mktemp("gpt2-user")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("trainer", ["sft", "dpo"])
def test_max_length_null_beyond_the_model_context_is_one_line(gpt2_dir, tmp_path, capsys, trainer):
    """docs/training.md: ``--max_length null`` sets the key to null (TRL: no truncation), and "max_length must fit
    the model's context ... a max_length you set beyond it is an error before the model loads (rows that long failed
    mid-training in a learned position table, IndexError: index out of range in self)". ``lowmem.train.fit_max_length``
    checks only an int ``max_length``: with null, rows of 30 tokens reach GPT-2's 16 positions and the run ends in a
    100-line traceback, ``IndexError: index out of range in self``, exit status 1 (SFT in the model's forward; DPO the
    same after TRL's tokenizer warned). Expected: exit status 2, one line naming max_length and the model's context
    (or the rows are truncated to it, with a note)."""
    long = "1+2=3, " * 4  # 28 characters: 29 tokens with <bos>
    if trainer == "sft":
        data = _jsonl(tmp_path / "long.jsonl", [{"text": long + str(a)} for a in range(4)])
    else:
        data = _jsonl(tmp_path / "long.jsonl", [{"prompt": long, "chosen": str(a), "rejected": str(a + 1)}
                                                for a in range(4)])
    argv = ["train", "--trainer", trainer, "--model", gpt2_dir, "--dataset", str(data), "--lr", "1e-3", "--steps",
            "1", "--batch-size", "2", "--optim", "adamw", "--output-dir", str(tmp_path / "out"), "--max_length", "null"]
    try:
        code = main(argv)
    except IndexError:  # today: the model's position table, mid-training
        code = "IndexError"
    err = capsys.readouterr().err
    if code == 0:  # truncated to the context instead: fine too, if it says so
        return
    assert code == 2, code
    assert "max_length" in err and "16" in err, err


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_grpo_max_completion_length_null_is_refused_or_resolved(tiny_model_path, tmp_path, capsys, loss_type):
    """``--max_completion_length null`` (the docs' way to null a field; GRPOConfig types it ``int | None``) passed the
    recipe check (RANGES: ``> 0``, None skipped) and ``fit_completion_length`` (ints only). TRL 1.16 passes
    ``max_new_tokens=None`` to generate, so every completion silently stopped at transformers' default
    ``max_length=20`` (``completions/mean_length: 20``, a default replacing the value), and ``loss_type: dr_grpo``
    (which divides by ``max_completion_length``) stopped at the first step with ``TypeError: unsupported operand
    type(s) for *: 'int' and 'NoneType'`` (a traceback, exit status 1). Expected: an error naming
    max_completion_length and its range (exit status 2), or the room the context leaves, with a note."""
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(8)])
    argv = ["train", "--trainer", "grpo", "--model", tiny_model_path, "--dataset", str(data), "--lr", "1e-3",
            "--steps", "1", "--batch-size", "4", "--num_generations", "4", "--reward-funcs", "exact_match",
            "--output-dir", str(tmp_path / "out"), "--max_completion_length", "null", "--loss_type", loss_type]
    try:
        code = main(argv)
    except TypeError:
        code = "TypeError"
    captured = capsys.readouterr()
    if code == 0:  # resolved to a number: it must say so
        assert "max_completion_length=" in captured.out, captured.out
        return
    assert code == 2, code
    assert "max_completion_length" in captured.err, captured.err


def test_max_completion_length_null_rule_is_one_for_both_routes(tmp_path):
    """AUDOWN21 2, the Python API and the vLLM case: ``LowMemGRPOConfig`` refuses ``max_completion_length=None`` by
    the function ``lowmem train`` runs (``trainers.trl.check_completion_length``), naming ``<Config>.<field>``; under
    ``use_vllm`` (vLLM's ``max_tokens=None``: up to the context, which TRL uses) it passes, except with dr_grpo,
    whose loss divides by it."""
    from lowmem.config import ConfigError
    from lowmem.trainers import LowMemGRPOConfig
    from lowmem.trainers.trl import check_completion_length, config_key

    for loss in ("dapo", "dr_grpo"):
        with pytest.raises(ConfigError, match=r"^LowMemGRPOConfig\.max_completion_length=None: expected an integer > 0"):
            LowMemGRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4, bf16=False,
                             report_to="none", max_completion_length=None, loss_type=loss)
    key = config_key("LowMemGRPOConfig")
    check_completion_length({"max_completion_length": None, "use_vllm": True, "loss_type": "dapo"}, key)
    check_completion_length({"max_completion_length": 8, "loss_type": "dr_grpo"}, key)
    with pytest.raises(ConfigError, match="dr_grpo"):
        check_completion_length({"max_completion_length": None, "use_vllm": True, "loss_type": "dr_grpo"}, key)


def test_grpo_num_generations_null_names_the_field(tiny_model_path, tmp_path, capsys):
    """``num_generations: null`` (``--num_generations null``; GRPOConfig types it ``int | None``) stops with
    ``lowmem: error: LowMemGRPOConfig: unsupported operand type(s) for %: 'int' and 'NoneType'``: GRPOConfig's
    ``__post_init__`` takes the batch modulo None. Every other null of the kind (``temperature``, ``beta``,
    ``num_iterations``, ...) is ``training_args.<field>=None: expected ...``. Expected: the field and its range
    named (``num_generations=None: expected an integer >= 2``)."""
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(8)])
    argv = ["train", "--trainer", "grpo", "--model", tiny_model_path, "--dataset", str(data), "--lr", "1e-3",
            "--steps", "1", "--batch-size", "4", "--num_generations", "null", "--reward-funcs", "exact_match",
            "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "num_generations" in err and "unsupported operand" not in err, err


@pytest.mark.parametrize("scheduler, kwargs", [
    ("cosine_with_min_lr", {"min_lr_rate": -1.0}),  # lr clamped to 0 for the second half: nothing trains, silently
    ("cosine_with_min_lr", {"min_lr_rate": 2.0}),  # the "minimum" is twice lr: the rate climbs to 2 x lr
    ("cosine_with_min_lr", {"min_lr": -1e-3}),  # as -1.0 above
    ("cosine", {"num_cycles": None}),  # TypeError: float() argument ... 'NoneType', a traceback at the first step
])
def test_lr_scheduler_kwargs_values_are_range_checked(tmp_path, scheduler, kwargs):
    """docs/training.md (``lr_scheduler``): "Its training_args.lr_scheduler_kwargs are checked against the scheduler
    function's arguments (an unknown key is an error naming it and the valid ones, not a TypeError at the first
    step)". ``lowmem.train.check_schedule`` checks the keys only: a value out of range is accepted. transformers'
    ``cosine_with_min_lr`` computes ``lr x max(0, cos_factor x (1 - rate) + rate)``: ``min_lr_rate: -1`` (or a
    negative ``min_lr``) holds the rate at 0 for the second half of the run (measured: 0.0 for steps 5-10 of 10), and
    ``min_lr_rate: 2.0`` raises it from lr to 2 x lr (the config named a minimum); ``num_cycles: null`` passed the
    recipe check and failed at the first step with ``TypeError: float() argument must be a string or a real number,
    not 'NoneType'`` (70 lines, exit status 1; ``num_cycles: half``: ``lowmem: error: could not convert string to
    float: 'half'``, naming no field). Expected: ``ConfigError`` naming ``lr_scheduler_kwargs.<key>`` and the valid
    range (``min_lr_rate`` in [0, 1], ``min_lr`` >= 0 and <= lr, ``num_cycles`` a number > 0), before the model loads."""
    from lowmem.config import ConfigError
    from lowmem.train import build_training_args, load_recipe

    data = _jsonl(tmp_path / "pc.jsonl", [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(4)])
    recipe = load_recipe(None, dataset=str(data), lr=1e-3, steps=10, optim="adamw", output_dir=str(tmp_path / "out"),
                         lr_scheduler_type=scheduler, lr_scheduler_kwargs=kwargs)
    with pytest.raises(ConfigError, match=f"lr_scheduler_kwargs.*{next(iter(kwargs))}"):
        build_training_args(recipe)


@pytest.mark.parametrize("scheduler, kwargs, says", [
    ("cosine_with_min_lr", {"min_lr_rate": -1.0}, r"training_args\.lr_scheduler_kwargs\.min_lr_rate=-1\.0 .*\[0, 1\]"),
    ("cosine_with_min_lr", {"min_lr": 2e-3}, r"min_lr=0\.002 .*\[0, lr\] \(\[0, 0\.001\]\)"),
    ("cosine_with_min_lr", {}, r"exactly one of min_lr .* neither"),
    ("cosine_with_min_lr", {"min_lr": 1e-4, "min_lr_rate": 0.1}, r"exactly one of min_lr .* both"),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1, "warmup_lr_rate": -0.5}, r"warmup_lr_rate=-0\.5 .*\[0, 1\]"),
    ("cosine", {"num_cycles": 0}, r"num_cycles=0 .*> 0"),
    ("cosine", {"num_cycles": "half"}, r"num_cycles='half' .*> 0"),
    ("cosine_with_restarts", {"num_cycles": -1}, r"num_cycles=-1 .*> 0"),
    ("polynomial", {"lr_end": 1e-3}, r"lr_end=0\.001 .*below lr \(0\.001\)"),
    ("polynomial", {"lr_end": -1e-4}, r"lr_end=-0\.0001"),
    ("polynomial", {"power": 0.0}, r"power=0\.0 .*> 0"),
    ("inverse_sqrt", {"timescale": 0}, r"timescale=0 .*> 0, or null"),
    ("warmup_stable_decay", {"num_stable_steps": 2}, r"num_decay_steps is required"),
    ("warmup_stable_decay", {"num_decay_steps": 2, "decay_type": "exp"}, r"decay_type='exp' .*'1-sqrt'"),
    ("warmup_stable_decay", {"num_decay_steps": 2, "min_lr_ratio": 1.5}, r"min_lr_ratio=1\.5 .*\[0, 1\]"),
    ("reduce_lr_on_plateau", {"factor": 1.5}, r"factor=1\.5 .*\(0, 1\)"),
    ("reduce_lr_on_plateau", {"patience": -1}, r"patience=-1 .*integer >= 0"),
    ("reduce_lr_on_plateau", {"patiense": 3}, r"lr_scheduler_kwargs\.patiense: .*did you mean \['patience'\]"),
    ("greedy", {"window_size": 0}, r"window_size=0 .*integer >= 1"),
    ("greedy", {"mode": "lowest"}, r"mode='lowest' .*\['min', 'max'\]"),
])
def test_lr_scheduler_kwargs_ranges_of_every_scheduler(tmp_path, scheduler, kwargs, says):
    """AUDOWN21 4, each scheduler as transformers 5's get_scheduler builds it: cosine_with_min_lr needs exactly one of
    min_lr / min_lr_rate (a ValueError once the scheduler is built, after the model loaded), polynomial's lr_end must
    be below lr (a ValueError there too; negative: a negative lr at the end), warmup_stable_decay has no default
    num_decay_steps (a TypeError at the first step), torch's ReduceLROnPlateau and transformers' GreedyLR (built from
    **kwargs, so their keys went unchecked) take the arguments of their classes. Named from ``lowmem train`` as
    ``training_args.lr_scheduler_kwargs.<key>``, with the valid range."""
    from lowmem.config import ConfigError
    from lowmem.train import build_training_args, load_recipe

    data = _jsonl(tmp_path / "pc.jsonl", [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(4)])
    recipe = load_recipe(None, dataset=str(data), lr=1e-3, steps=10, optim="adamw", output_dir=str(tmp_path / "out"),
                         lr_scheduler_type=scheduler, lr_scheduler_kwargs=kwargs)
    with pytest.raises(ConfigError, match=says):
        build_training_args(recipe)


@pytest.mark.parametrize("scheduler, kwargs", [
    ("cosine_with_min_lr", {"min_lr_rate": 0.0}), ("cosine_with_min_lr", {"min_lr_rate": 1.0}),
    ("cosine_with_min_lr", {"min_lr": 1e-3}), ("cosine_warmup_with_min_lr", {"min_lr": 1e-4, "warmup_lr_rate": 0.1}),
    ("cosine", {"num_cycles": 1.5}), ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {"lr_end": 0.0, "power": 2.0}), ("inverse_sqrt", {"timescale": None}),
    ("warmup_stable_decay", {"num_decay_steps": 4, "warmup_type": "1-sqrt", "min_lr_ratio": 0.1}),
    ("reduce_lr_on_plateau", {"factor": 0.5, "patience": 0, "min_lr": 1e-6}), ("greedy", {"factor": 0.9, "max_lr": 0.01}),
])
def test_lr_scheduler_kwargs_in_range_build_the_schedule(tmp_path, scheduler, kwargs):
    """The boundaries of each range are accepted, and transformers builds the scheduler from them."""
    from transformers import get_scheduler

    from lowmem.train import build_training_args, load_recipe

    data = _jsonl(tmp_path / "pc.jsonl", [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(4)])
    evaluated = {"eval_split": 0.5, "eval_steps": 5} if scheduler in ("reduce_lr_on_plateau", "greedy") else {}
    recipe = load_recipe(None, dataset=str(data), lr=1e-3, steps=10, optim="adamw", output_dir=str(tmp_path / "out"),
                         lr_scheduler_type=scheduler, lr_scheduler_kwargs=kwargs, **evaluated)
    args = build_training_args(recipe)
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    get_scheduler(scheduler, opt, num_warmup_steps=0, num_training_steps=10, scheduler_specific_kwargs=args.lr_scheduler_kwargs)


def test_lr_scheduler_kwargs_python_api_names_the_config(tmp_path):
    """The Python API configs run the same check (lowmem.train.check_scheduler_kwargs), naming ``<Config>.``."""
    from lowmem.trainers import LowMemTrainingArguments
    from lowmem.trainers.trl import LowMemSFTConfig

    for cls in (LowMemTrainingArguments, LowMemSFTConfig):
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.lr_scheduler_kwargs\.min_lr_rate=2\.0 .*\[0, 1\]"):
            cls(output_dir=str(tmp_path), lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 2.0},
                use_cpu=True, report_to="none")


@pytest.mark.parametrize("length", [["--steps", "2"], ["--num_train_epochs", "2"]])
def test_grpo_dataset_smaller_than_one_generation_batch_is_refused(tiny_model_path, tmp_path, capsys, length):
    """TRL's GRPO samples ``generation_batch_size / num_generations`` distinct prompts per generation batch
    (``per_device_train_batch_size x steps_per_generation``, which defaults to ``gradient_accumulation_steps``) and
    its RepeatSampler drops an incomplete one. A small file (6 prompts, ``--batch-size 8 --num_generations 4
    --gradient_accumulation_steps 4``: 8 prompts per generation batch; here 1 prompt, batch 4, 2 generations: 2 needed)
    then yields no batch at all: with ``--steps 2`` transformers logs "There seems not to be a single sample in your
    epoch_iterator, stopping training at step 0", the run exits 0 with ``steps: 0``, saves the untouched model, and the
    summary blames ``logging_steps`` ("mean reward: none logged in 0 steps (logging_steps is more than the steps)");
    by epochs it stops with ``lowmem: error: args.max_steps must be set to a positive value if dataloader does not have
    a length, was -1`` (the user's data has a length). Expected: exit 2 before the model loads, naming the prompt count
    and what one generation batch needs (batch_size, num_generations, gradient_accumulation_steps /
    steps_per_generation)."""
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    argv = ["train", "--trainer", "grpo", "--model", tiny_model_path, "--dataset", str(data), "--lr", "1e-3",
            *length, "--batch-size", "4", "--num_generations", "2", "--max_completion_length", "4",
            "--reward-funcs", "exact_match", "--output-dir", str(tmp_path / "out")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, code
    assert "num_generations" in err and "prompt" in err and "dataloader does not have a length" not in err, err


def test_drop_last_training_set_smaller_than_one_batch_is_refused(tiny_model_path, tmp_path, capsys):
    """docs/training.md, Errors: "a config's dataloader_drop_last: true with an SFT / DPO eval set (after packing) smaller
    than one eval batch ... (every eval batch would be dropped; checked once the model is loaded, before training)". The
    training set gets no such check: 4 prompt-completion rows with ``--batch-size 8 --dataloader_drop_last --steps 2``
    drop the only batch, transformers stops "at step 0", and the run exits 0 with ``steps: 0``, the model saved
    untouched, 0 bytes of optimizer state. Expected: exit 2 naming dataloader_drop_last, the rows and the batch."""
    data = _jsonl(tmp_path / "pc.jsonl", [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(4)])
    argv = ["train", "--model", tiny_model_path, "--dataset", str(data), "--lr", "1e-3", "--steps", "2", "--batch-size",
            "8", "--dataloader_drop_last", "--optim", "adamw", "--output-dir", str(tmp_path / "out")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, code
    assert "dataloader_drop_last" in err, err
    assert ("dataloader_drop_last=true drops every training batch: the training set has 4 rows and one "
            "batch is 8 (batch_size=8), so the run would train 0 steps: set batch_size <= 4") in err, err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_drop_last_training_set_of_one_batch_trains(tiny_model_path, tmp_path, capsys):
    """The boundary: as many rows as one batch keep that batch (the run trains its steps)."""
    data = _jsonl(tmp_path / "pc.jsonl", [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(4)])
    out = tmp_path / "out"
    argv = ["train", "--model", tiny_model_path, "--dataset", str(data), "--lr", "1e-3", "--steps", "2", "--batch-size",
            "4", "--dataloader_drop_last", "--optim", "adamw", "--output-dir", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2 if (out / "trainer_state.json").exists() \
        else json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_grpo_generation_batch_prompts_python_api_and_boundary(tiny_model_path, tmp_path):
    """AUDOWN21 5 through the Python API (``LowMemGRPOTrainer`` runs ``trainers.trl.check_generation_batch_prompts``,
    the function ``lowmem train`` runs, before TRL loads the model: naming ``<Config>.<field>``), and the boundary:
    exactly one generation batch of prompts passes."""
    from types import SimpleNamespace

    from datasets import Dataset

    from lowmem.config import ConfigError
    from lowmem.trainers import LowMemGRPOConfig, LowMemGRPOTrainer
    from lowmem.trainers.trl import check_generation_batch_prompts

    args = LowMemGRPOConfig(output_dir=str(tmp_path / "out"), num_generations=2, per_device_train_batch_size=4,
                            gradient_accumulation_steps=2, bf16=False, report_to="none")  # 8 completions: 4 prompts

    def reward(completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ConfigError, match=r"^the training set has 3 prompts, .* 4 distinct prompts .*"
                                          r"LowMemGRPOConfig\.per_device_train_batch_size=4 .*LowMemGRPOConfig\."
                                          r"num_generations=2"):
        LowMemGRPOTrainer(model=tiny_model_path, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["1+1=", "2+2=", "3+3="]}))
    config = SimpleNamespace(generation_batch_size=8, num_generations=2, per_device_train_batch_size=4,
                             steps_per_generation=2, world_size=1)
    check_generation_batch_prompts(config, ["p"] * 4)  # one whole generation batch: trains
    with pytest.raises(ConfigError, match="has 3 prompts"):
        check_generation_batch_prompts(config, ["p"] * 3)


@pytest.fixture(scope="module")
def two_label_classifier(tmp_path_factory):
    """A sequence classifier with two labels (a sentiment / toxicity classifier as people have them), saved with
    save_pretrained and the kit's tokenizer: transformers' LlamaForSequenceClassification, num_labels=2."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from lowmem.kit import build_tokenizer

    tok = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, pad_token_id=tok.pad_token_id, num_labels=2))
    path = tmp_path_factory.mktemp("classifier-2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("which", ["causal_lm", "two_labels"])
def test_reward_model_directory_that_is_no_one_label_classifier_is_refused(tiny_model_path, two_label_classifier,
                                                                           tmp_path, capsys, which):
    """docs/training.md, Rewards: a reward_funcs entry may be "a local directory holding a reward model
    (AutoModelForSequenceClassification with one label, saved with its tokenizer)". ``lowmem.rewards.resolve_reward``
    checks only that the folder holds a ``config.json``. A causal-LM folder (the user's policy or any chat model:
    ``architectures: [LlamaForCausalLM]``) is loaded by TRL as AutoModelForSequenceClassification with a *randomly
    initialised* ``score`` head (transformers' load report: ``score.weight | MISSING``), and GRPO trains on noise,
    exit 0. A two-label classifier stops after the policy loaded with ``RuntimeError: You set
    `ignore_mismatched_sizes` to `False` ...`` (a 40-line traceback, exit 1). Expected: exit 2 before the model loads,
    naming ``reward_funcs[0]``, the folder's architecture / ``num_labels`` and what is needed (a sequence-classification
    head with ``num_labels=1``)."""
    folder = tiny_model_path if which == "causal_lm" else two_label_classifier
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(4)])
    argv = ["train", "--trainer", "grpo", "--model", tiny_model_path, "--dataset", str(data), "--lr", "1e-3",
            "--steps", "1", "--batch-size", "4", "--num_generations", "4", "--max_completion_length", "4",
            "--reward-funcs", folder, "--output-dir", str(tmp_path / "out")]
    try:
        code = main(argv)
    except RuntimeError:  # today, the two-label classifier
        code = "RuntimeError"
    err = capsys.readouterr().err
    assert code == 2, code
    assert "reward_funcs[0]" in err and ("num_labels" in err or "ForSequenceClassification" in err), err
    said = ("architectures ['LlamaForCausalLM'] (num_labels 2): a causal language model" if which == "causal_lm"
            else "architectures ['LlamaForSequenceClassification'] with num_labels 2")
    assert said in err and "num_labels: 1" in err and "Loading weights" not in err, err  # before the policy loads


def test_reward_model_directory_python_api_and_one_label_passes(tiny_model_path, two_label_classifier, tmp_path):
    """AUDOWN21 7 through the Python API (LowMemGRPOTrainer runs the same lowmem.rewards.check_reward_model_dir on a
    folder entry, before TRL loads it), and a one-label classifier passes the check."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from lowmem.kit import build_tokenizer
    from lowmem.rewards import check_reward_model_dir
    from lowmem.trainers.trl import LowMemGRPOConfig, LowMemGRPOTrainer

    config = LowMemGRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                              max_completion_length=4, max_steps=1, use_cpu=True, report_to="none", beta=0.0)
    data = Dataset.from_list([{"prompt": f"{a}+1="} for a in range(4)])
    for folder, said in ((tiny_model_path, "causal language model"), (two_label_classifier, "num_labels 2")):
        with pytest.raises(ValueError, match=rf"reward_funcs\[1\]=.*{said}"):
            LowMemGRPOTrainer(tiny_model_path, reward_funcs=[lambda completions, **k: [0.0] * len(completions), folder],
                              args=config, train_dataset=data)
    tok = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        one = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, pad_token_id=tok.pad_token_id, num_labels=1))
    one.save_pretrained(tmp_path / "rm1")
    check_reward_model_dir(tmp_path / "rm1", "reward_funcs[0]")  # passes
    (tmp_path / "bare").mkdir()
    with pytest.raises(ValueError, match=r"reward_funcs\[0\]=.*no config.json"):
        check_reward_model_dir(tmp_path / "bare", "reward_funcs[0]")


@pytest.mark.parametrize("fields", [
    {"loss_type": ["sigmoid"], "loss_weights": [-1.0]},  # margin 0 -> -0.0118 in 2 steps, eval_loss -0.69
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.0, 0.0]},  # loss 0: margin 0 -> 0, nothing trained
    {"loss_type": []},  # AttributeError: 'float' object has no attribute 'repeat', at the first step
])
def test_dpo_loss_weights_and_loss_types_are_checked(tmp_path, fields):
    """TRL 1.16's DPOConfig takes a list ``loss_type`` with one ``loss_weights`` entry each and sums
    ``weight_i x loss_i``. lowmem refuses a negative ``beta`` ("would train towards the rejected answers"), ``beta: 0``
    ("the loss would have no gradient") and all-zero GRPO ``reward_weights`` ("nothing to learn"), but not the same
    through ``loss_weights``: ``[-1.0]`` on sigmoid ran and moved the chosen-minus-rejected margin 0 -> -0.0118 in 2
    steps (``lowmem train`` on the tiny Llama, lr 1e-3, AdamW), ``[0.0, 0.0]`` trained nothing (margin 0 -> 0, exit 0),
    and ``loss_type: []`` stopped at the first step with ``AttributeError: 'float' object has no attribute 'repeat'``
    (trl dpo_trainer, a traceback). Expected: ``ConfigError`` naming ``loss_weights`` (finite, >= 0, not all 0) or
    ``loss_type`` (at least one), before the model loads (``lowmem.train.check_dpo_fields``, and ``LowMemDPOConfig``)."""
    from lowmem.config import ConfigError
    from lowmem.train import build_training_args, load_recipe

    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)}
                                         for a in range(4)])
    recipe = load_recipe(None, trainer="dpo", dataset=str(data), lr=1e-3, steps=2, optim="adamw",
                         output_dir=str(tmp_path / "out"), **fields)
    with pytest.raises(ConfigError, match="loss_weights" if "loss_weights" in fields else "loss_type"):
        build_training_args(recipe)


@pytest.mark.parametrize("fields, says", [
    ({"loss_type": ["sigmoid"], "loss_weights": [-1.0]}, r"LowMemDPOConfig\.loss_weights=\[-1\.0\]: expected numbers >= 0"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [0.0, 0.0]}, r"LowMemDPOConfig\.loss_weights=.*every weight is 0"),
    ({"loss_type": []}, r"LowMemDPOConfig\.loss_type=\[\]: expected a loss type or a non-empty list"),
])
def test_dpo_loss_weights_python_api_and_training_args_naming(tmp_path, fields, says):
    """AUDOWN21 8 through the Python API (LowMemDPOConfig runs the same lowmem.train.check_dpo_losses) and through a
    recipe's training_args (named ``training_args.<field>``); weights >= 0 with one > 0 (MPO-style [1.0, 0.0]) pass."""
    from lowmem.config import ConfigError
    from lowmem.train import build_training_args, load_recipe
    from lowmem.trainers.trl import LowMemDPOConfig

    with pytest.raises(ValueError, match=says):
        LowMemDPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **fields)
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)}
                                         for a in range(4)])
    recipe = load_recipe(None, trainer="dpo", dataset=str(data), lr=1e-3, steps=2, optim="adamw",
                         output_dir=str(tmp_path / "out"), training_args=fields)
    with pytest.raises(ConfigError, match=says.replace("LowMemDPOConfig", "training_args")):
        build_training_args(recipe)
    ok = load_recipe(None, trainer="dpo", dataset=str(data), lr=1e-3, steps=2, optim="adamw",
                     output_dir=str(tmp_path / "out"), loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.0])
    assert build_training_args(ok).loss_weights == [1.0, 0.0]


@pytest.mark.parametrize("fields, field", [
    ({"loss_type": "sapo", "delta": 1.5}, "delta"),
    ({"loss_type": "cispo", "delta": 1.5}, "delta"),
    ({"loss_type": "vespo", "delta": 1.5}, "delta"),
    ({"loss_type": "sapo", "epsilon_high": 0.28}, "epsilon_high"),
    ({"loss_type": "vespo", "epsilon": 0.3}, "epsilon"),
    # cispo reads epsilon as its eps_max while epsilon_high is unset (TRL 1.16: `args.epsilon_high if args.epsilon_high is
    # not None else args.epsilon`), so only beside epsilon_high is it unread (the audit's case without it is accepted below)
    ({"loss_type": "cispo", "epsilon": 0.3, "epsilon_high": 5.0}, "epsilon"),
])
def test_grpo_clipping_fields_the_loss_never_reads_are_refused(tmp_path, fields, field):
    """docs/training.md, Strict configuration: "fields that only another setting reads, set away from their default
    while that setting is off, are an error naming the field and the setting (lowmem.train.DEPENDENT_FIELDS)" -- it
    lists SAPO's temperatures (loss_type: sapo) and VESPO's k / lambda (loss_type: vespo), not the clipping fields.
    TRL 1.16's GRPOTrainer._compute_loss reads ``delta`` (INTELLECT-2's two-sided clip) only under loss_type grpo /
    bnpo / dr_grpo / dapo / luspo; ``epsilon`` (the lower clip) only there too; ``epsilon_high`` there and under cispo
    (its eps_max); sapo and vespo read neither (their gates are the temperatures / gamma weights). A DAPO-style config
    switched to ``loss_type: sapo`` keeps ``epsilon_high: 0.28`` and ``delta`` and trains without them, silently.
    Expected: ``ConfigError`` naming the field and the loss types that read it, before the model loads."""
    from lowmem.config import ConfigError
    from lowmem.train import build_training_args, load_recipe

    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(8)])
    recipe = load_recipe(None, trainer="grpo", dataset=str(data), lr=1e-3, steps=2, batch_size=4, num_generations=4,
                         reward_funcs=["exact_match"], output_dir=str(tmp_path / "out"), **fields)
    with pytest.raises(ConfigError, match=rf"^{field}=.* is read only with loss_type: "):  # (a top-level recipe key)
        build_training_args(recipe)


@pytest.mark.parametrize("fields", [
    {"loss_type": "cispo", "epsilon": 0.3},  # TRL's cispo: eps_max = epsilon while epsilon_high is unset
    {"loss_type": "cispo", "epsilon_high": 5.0},  # ScaleRL's eps_max
    {"delta": 1.5, "epsilon_high": 0.28},  # TRL's default loss_type dapo reads both
    {"loss_type": "luspo", "importance_sampling_level": "sequence", "epsilon": 0.3},
])
def test_grpo_clipping_fields_the_loss_reads_pass(tmp_path, fields):
    """AUDOWN21 9, the other side: the clipping fields stay accepted where TRL 1.16's loss reads them, in
    ``lowmem train`` and in the Python API's config (the same table, lowmem.train.DEPENDENT_FIELDS)."""
    from lowmem.train import build_training_args, load_recipe
    from lowmem.trainers import LowMemGRPOConfig

    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(8)])
    build_training_args(load_recipe(None, trainer="grpo", dataset=str(data), lr=1e-3, steps=2, batch_size=4,
                                    num_generations=4, reward_funcs=["exact_match"], output_dir=str(tmp_path / "out"),
                                    **fields))
    LowMemGRPOConfig(output_dir=str(tmp_path / "out"), num_generations=4, per_device_train_batch_size=4, bf16=False,
                     report_to="none", **fields)


def test_grpo_clipping_field_refusal_is_the_python_apis_too(tmp_path):
    """AUDOWN21 9 through the Python API: ``LowMemGRPOConfig`` runs the same table and names ``<Config>.<field>``."""
    from lowmem.config import ConfigError
    from lowmem.trainers import BNPOConfig, LowMemGRPOConfig

    for cls in (LowMemGRPOConfig, BNPOConfig):
        with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.delta=1\.5 is read only with loss_type: grpo / "):
            cls(output_dir=str(tmp_path / "out"), num_generations=4, per_device_train_batch_size=4, bf16=False,
                report_to="none", loss_type="sapo", delta=1.5)


def test_save_steps_beyond_steps_writes_the_final_checkpoint(tiny_model_path, tmp_path, capsys):
    """docs/training.md (``save_steps``): "Valid: 1 .. steps (a larger one would write no checkpoint: an error; except
    the Trainer's default 500 ...)", and ``lowmem.train.check_schedule`` says ``save_steps=10 with steps=2: no checkpoint
    would ever be written``. transformers 5's DefaultFlowCallback saves at the last step under ``save_strategy: steps``
    ("Save the model at the end if we have a save strategy", trainer_callback.py): the exempted 500 beside ``--steps 3``
    writes ``checkpoint-3``, and the same run by epochs with ``save_steps: 100`` is accepted and writes it too. So the
    refusal's reason is false and the HF config (save_steps: 100 in a short trial run) is refused for nothing.
    Expected: the run trains and leaves ``checkpoint-2`` (as the HF Trainer does), or an error that does not claim that
    no checkpoint would be written."""
    data = _jsonl(tmp_path / "t.jsonl", [{"text": f"{a}+{a}={2 * a}"} for a in range(8)])
    out = tmp_path / "out"
    argv = ["train", "--model", tiny_model_path, "--dataset", str(data), "--lr", "1e-3", "--steps", "2",
            "--batch-size", "4", "--save_steps", "10", "--optim", "adamw", "--output-dir", str(out)]
    code = main(argv)
    err = capsys.readouterr().err
    if code == 0:
        assert (out / "checkpoint-2").is_dir()
    else:
        assert "no checkpoint would ever be written" not in err, err


def test_eval_steps_beyond_steps_evaluates_at_the_last_step(tiny_model_path, tmp_path):
    """AUDOWN21 10's twin: ``eval_steps`` beyond ``steps`` was refused ("no evaluation would run during training").
    transformers' DefaultFlowCallback evaluates at the last step under ``eval_strategy: steps`` when that step was not
    already an evaluation step (measured: ``--steps 3 --eval_steps 10`` evaluated at steps 0 and 3 and wrote
    checkpoint-3 with ``--save_steps 10``, the same eval losses as ``--eval_steps 3 --save_steps 3``)."""
    data = _jsonl(tmp_path / "t.jsonl", [{"text": f"{a}+{a}={2 * a}"} for a in range(16)])
    out = tmp_path / "out"
    argv = ["train", "--model", tiny_model_path, "--dataset", str(data), "--eval_split", "0.25", "--lr", "1e-3",
            "--steps", "2", "--batch-size", "4", "--eval_steps", "10", "--optim", "adamw", "--output-dir", str(out)]
    assert main(argv) == 0
    history = json.loads((out / "metrics.json").read_text())["eval_history"]
    assert [h["step"] for h in history] == [0, 2], history


def test_grpo_num_generations_eval_zero_is_refused(tmp_path):
    """GRPOConfig's ``num_generations_eval`` (``int | None``: None = ``num_generations``) is not in
    ``lowmem.config.RANGES``: 0 passes the recipe check and the eval-group check, and TRL 1.16 reads it as
    ``self.num_generations_eval = args.num_generations_eval or self.num_generations`` (grpo_trainer.py), so the
    evaluation samples ``num_generations`` (4) completions per prompt: a value silently replaced by a default.
    Expected: ``ConfigError`` naming ``num_generations_eval`` and its range (an integer >= 1, or null)."""
    from lowmem.config import ConfigError
    from lowmem.train import build_training_args, load_recipe

    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(8)])
    with pytest.raises(ConfigError, match=r"num_generations_eval=0: expected an integer >= 1, or null"):
        # (refused while the recipe is read: lowmem.config.RANGES)
        build_training_args(load_recipe(None, trainer="grpo", dataset=str(data), eval_dataset=str(data), lr=1e-3, steps=2,
                                        batch_size=4, num_generations=4, num_generations_eval=0,
                                        reward_funcs=["exact_match"], output_dir=str(tmp_path / "out")))
    from lowmem.trainers import LowMemGRPOConfig  # the Python API's config: the same table

    with pytest.raises(ConfigError, match=r"^LowMemGRPOConfig\.num_generations_eval=0: expected an integer >= 1"):
        LowMemGRPOConfig(output_dir=str(tmp_path / "out"), num_generations=4, num_generations_eval=0,
                         per_device_train_batch_size=4, bf16=False, report_to="none")
