"""An outside user's HF Trainer habits under ``lowmem train``: configs written for the Trainer or
``trl sft``, other model architectures than Llama, data as users bring it. Each test here reproduces
something that once went wrong silently or with a traceback (tiny models, a few steps)."""

import json

import pytest

from lowmem.config import ConfigError
from lowmem.train import TrainRecipe, build_training_args, load_recipe, run


def _recipe_file(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_num_train_epochs_trains_by_epochs(tmp_path):
    """``num_train_epochs`` in a Trainer config was passed to the Trainer beside the recipe's default
    ``steps: 200`` (``max_steps=200``), which the Trainer lets win: 1 epoch ran 200 steps (16.7 epochs)."""
    out = tmp_path / "out"
    path = _recipe_file(tmp_path, f"num_train_epochs: 1\ntrain_size: 40\nper_device_train_batch_size: 16\n"
                                  f"optim: adamw\nlogging_steps: 1\noutput_dir: {out}\nsave_model: false\n")
    recipe = load_recipe(path)
    assert recipe.steps is None and build_training_args(recipe).max_steps == -1
    metrics = run(recipe)
    assert metrics["steps"] == 3  # ceil(40 / 16) batches, one epoch
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    # the Trainer's own "max_steps: -1" means the same
    assert load_recipe(_recipe_file(tmp_path, "max_steps: -1\nnum_train_epochs: 2\n")).steps is None
    # a --steps override wins over the file's epochs (overrides win), and the file's epochs over the default
    assert load_recipe(path, steps=5).steps == 5 and "num_train_epochs" not in load_recipe(path, steps=5).training_args
    assert load_recipe(_recipe_file(tmp_path, "steps: 7\n"), num_train_epochs=1).steps is None


def test_steps_and_epochs_in_one_place_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"steps=10 and num_train_epochs=2 both set the length of the run"):
        load_recipe(_recipe_file(tmp_path, "num_train_epochs: 2\nmax_steps: 10\n"))
    with pytest.raises(ConfigError, match=r"steps=200 and num_train_epochs=1 .*give one"):
        TrainRecipe(training_args={"num_train_epochs": 1})
    assert TrainRecipe(steps=None, training_args={"num_train_epochs": 1}).steps is None


@pytest.fixture(scope="module")
def gpt2_dir(bpe_model_dir, tmp_path_factory):
    """A GPT-2-style model directory (Conv1D projections, a learned position table of 32 positions,
    tied embeddings) with conftest's byte-level BPE tokenizer stripped of its pad token, as GPT-2's has none."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    tok.pad_token = None
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    path = tmp_path_factory.mktemp("gpt2-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory):
    """Rows of ~100 BPE tokens: longer than the GPT-2 fixture's 32 positions."""
    path = tmp_path_factory.mktemp("long-data") / "long.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(f"{a}+{a}={2 * a}" for a in range(i, i + 20))}) + "\n"
                            for i in range(24)))
    return str(path)


def test_max_length_fits_the_models_context(gpt2_dir, long_rows, tmp_path, capsys):
    """TRL's default ``max_length=1024`` on a model with fewer positions: GPT-2's learned position table
    failed mid-training with ``IndexError: index out of range in self``. The default now becomes the
    model's context, with a note; a ``max_length`` the user sets beyond it is an error naming both."""
    recipe = load_recipe(None, model=gpt2_dir, dataset=long_rows, optim="adamw", steps=2, batch_size=4, lr=1e-3,
                         output_dir=str(tmp_path / "out"), save_model=False, track_memory=False)
    metrics = run(recipe)
    assert metrics["steps"] == 2 and recipe.training_args["max_length"] == 32
    assert "note: max_length=32, the model's context (max_position_embeddings=32 in" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"max_length=64 is longer than the model's context \(max_position_embeddings=32 "
                                          r"in .*config.json\).*set max_length <= 32"):
        run(load_recipe(None, model=gpt2_dir, dataset=long_rows, optim="adamw", steps=2, max_length=64, lr=1e-3,
                        output_dir=str(tmp_path / "out2")))


def test_recipe_fields_in_training_args_are_the_recipes(tmp_path):
    """``training_args: {output_dir: ..., save_steps: 4, eval_steps: 4, max_steps: 5, lowmem_optim: ...}``
    reached the Trainer while the recipe kept its own values: checkpoints went to one folder and
    metrics.json / the model to another, save_steps and eval_steps stayed inert (save_strategy and
    eval_strategy "no"), metrics.json named another optimizer than the one trained."""
    out = str(tmp_path / "mine")
    recipe = load_recipe(None, training_args={"output_dir": out, "save_steps": 4, "eval_steps": 4, "max_steps": 5,
                                              "learning_rate": 3e-3, "per_device_train_batch_size": 8,
                                              "lr_scheduler_type": "cosine", "seed": 3, "lowmem_optim": "galore_adamw",
                                              "lowmem_optim_args": "rank=4"})
    assert (recipe.output_dir, recipe.save_steps, recipe.eval_steps, recipe.steps, recipe.lr, recipe.batch_size,
            recipe.lr_scheduler, recipe.seed, recipe.optim, recipe.optim_args) == (
        out, 4, 4, 5, 3e-3, 8, "cosine", 3, "galore_adamw", {"rank": 4})
    assert recipe.training_args == {}
    args = build_training_args(recipe)
    assert (args.output_dir, args.save_strategy, args.eval_strategy, args.max_steps) == (out, "steps", "steps", 5)
    # the Trainer's max_steps=-1 there too; a recipe value set otherwise is an error, not a silent choice
    assert load_recipe(None, training_args={"max_steps": -1, "num_train_epochs": 1}).steps is None
    with pytest.raises(ConfigError, match=r"lr is 0.1 in the recipe and training_args.learning_rate is 0.5; give it once"):
        load_recipe(None, lr=0.1, training_args={"learning_rate": 0.5})
    with pytest.raises(ConfigError, match=r"training_args.save_steps=0: expected an integer > 0"):
        load_recipe(None, training_args={"save_steps": 0})


def test_trl_sft_and_llama_factory_keys(tmp_path, tiny_model_path):
    """A ``trl sft`` config names the model ``model_name_or_path`` (accepted as ``model``); its ModelConfig
    keys and LLaMA-Factory's were 'unknown recipe key(s)' with no hint (``lora_r`` -> did you mean
    ['local_rank', 'lora', 'use_cpu']?): the error now says what lowmem writes instead."""
    path = _recipe_file(tmp_path, "model_name_or_path: model\nlearning_rate: 2.0e-5\n")
    (tmp_path / "model").symlink_to(tiny_model_path)  # relative to the recipe's folder, as model is
    assert load_recipe(path).model == str(tmp_path / "model")
    with pytest.raises(ConfigError, match=r"'model_name_or_path' and 'model' set the same value"):
        load_recipe(_recipe_file(tmp_path, f"model: {tiny_model_path}\nmodel_name_or_path: {tiny_model_path}\n"))
    with pytest.raises(ConfigError, match=r"unknown recipe key\(s\) \['lora_r', 'use_peft'\]; lowmem's spelling: "
                                          r"lora_r -> lora: \{r: ...\}; use_peft -> lora: \{r: 16"):
        load_recipe(None, use_peft=True, lora_r=8)
    for key, hint in [("torch_dtype", "dtype"), ("cutoff_len", "max_length"), ("load_in_4bit", "quantization: nf4"),
                      ("dataset_name", "dataset")]:
        with pytest.raises(ConfigError, match=rf"\['{key}'\]; lowmem's spelling: {key} -> {hint}"):
            load_recipe(None, **{key: "x"})


def test_llama_target_modules_on_another_architecture_name_its_layers(gpt2_dir, tmp_path):
    """``optim_target_modules: [q_proj, v_proj]`` (written for Llama) on GPT-2 said only
    "target_modules=['q_proj', 'v_proj'] matched no linear layer of the model"; it names the field
    the user set and GPT-2's Conv1D layers now, through the Trainer and through optimizer_cls_and_kwargs."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments, optimizer_cls_and_kwargs

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    message = (r"optim_target_modules=\['q_proj', 'v_proj'\] matched no projection layer of GPT2LMHeadModel; its "
               r"projection layers \(nn.Linear / Conv1D, output head excluded\) are named \['c_attn', 'c_fc', 'c_proj'\]")
    kw = dict(report_to="none", use_cpu=True, optim_target_modules=["q_proj", "v_proj"])
    for layerwise in (False, True):
        args = LowMemTrainingArguments(str(tmp_path), lowmem_optim="galore_adamw", lowmem_layerwise=layerwise, **kw)
        with pytest.raises(ValueError, match=message):
            LowMemTrainer(model=model, args=args).create_optimizer()
    with pytest.raises(ValueError, match=message):
        optimizer_cls_and_kwargs(model, "galore_adamw", args=TrainingArguments(str(tmp_path), **kw))
    with pytest.raises(ValueError, match=r"^target_modules=\('q_proj',\) matched no projection layer .*\['c_attn', "):
        optimizer_cls_and_kwargs(model, "galore_adamw", args=TrainingArguments(str(tmp_path), report_to="none"),
                                 target_modules=["q_proj"])


def test_bfloat16_runs_on_a_machine_without_gpu(tmp_path, long_rows):
    """``dtype: bfloat16`` (and a Trainer config's ``bf16: true``) with a dataset or a TRL trainer was
    ``LowMemSFTConfig: Your setup doesn't support bf16/gpu. You need to assign use_cpu`` on a CPU-only
    machine: the recipe sets ``bf16`` from ``dtype`` for TRL's configs, which transformers refuses
    without ``use_cpu``. Where no GPU is visible, lowmem sets it."""
    from lowmem.train import _accelerator_visible

    if _accelerator_visible():
        pytest.skip("a GPU is visible: bf16 runs there without use_cpu")
    for kw in (dict(dtype="bfloat16"), dict(bf16=True), dict(trainer="dpo", dtype="bfloat16")):
        recipe = load_recipe(None, **{"dataset": long_rows, **kw} if "trainer" not in kw else kw,
                             output_dir=str(tmp_path))
        args = build_training_args(recipe)
        assert args.bf16 is True and args.use_cpu is True, kw


def test_errors_of_flags_do_not_blame_the_default_recipe(long_rows):
    """``lowmem train --dataset d.jsonl --eval-steps 1`` (no recipe file) said
    ``/.../configs/default.yaml: eval_steps=1 needs a held-out set ...``: a file the user never wrote."""
    with pytest.raises(ConfigError, match=r"^eval_steps=1 needs a held-out set for dataset="):
        load_recipe(None, dataset=long_rows, eval_steps=1)
    with pytest.raises(ConfigError, match=r"^steps=0: expected an integer > 0"):
        load_recipe(None, steps=0)


def test_a_saved_training_arguments_json_runs(tmp_path):
    """``TrainingArguments.to_dict()`` as users save it (``training_args.json``: 100+ keys, every default
    written out) stopped at ``optim_args=None: expected a mapping or a string``."""
    from transformers import TrainingArguments

    out = tmp_path / "out"
    dump = TrainingArguments(str(out), learning_rate=1e-3, num_train_epochs=1, per_device_train_batch_size=8,
                             optim="adafactor", report_to="none", use_cpu=True, save_strategy="no").to_dict()
    assert dump["optim_args"] is None and dump["max_steps"] == -1
    path = tmp_path / "training_args.json"
    path.write_text(json.dumps(dump))
    recipe = load_recipe(path, train_size=16, save_model=False, track_memory=False)
    assert (recipe.optim, recipe.optim_args, recipe.lr, recipe.steps, recipe.batch_size) == ("adafactor", {}, 1e-3, None, 8)
    assert run(recipe)["steps"] == 2  # one epoch of 16 rows in batches of 8


def test_a_saved_sft_config_with_max_steps(tmp_path, long_rows):
    """A saved ``SFTConfig`` of a ``max_steps`` run also holds ``num_train_epochs: 3.0`` (the default, written
    out) and TRL's ``eos_token`` / ``pad_token`` as the placeholders ``<EOS_TOKEN>`` / ``<PAD_TOKEN>``
    (``to_dict`` masks every ``*_token``), which TRL then looked up in the vocabulary."""
    from trl import SFTConfig

    dump = SFTConfig(str(tmp_path / "out"), max_steps=2, max_length=32, report_to="none", use_cpu=True,
                     bf16=False).to_dict()
    assert (dump["num_train_epochs"], dump["eos_token"], dump["hub_token"]) == (3.0, "<EOS_TOKEN>", "<HUB_TOKEN>")
    path = tmp_path / "sft.json"
    path.write_text(json.dumps({**dump, "dataset": long_rows}))
    with pytest.raises(ConfigError, match=r"training_args \['eos_token', 'pad_token'\] hold the placeholders "
                                          r"\['<EOS_TOKEN>', '<PAD_TOKEN>'\] that TrainingArguments.to_dict writes"):
        load_recipe(path)
    del dump["eos_token"], dump["pad_token"]
    path.write_text(json.dumps({**dump, "dataset": long_rows}))
    recipe = load_recipe(path)  # the default num_train_epochs beside max_steps is inert, as in the Trainer
    assert recipe.steps == 2 and "num_train_epochs" not in recipe.training_args and "hub_token" not in recipe.training_args
    # a num_train_epochs of the user's own beside max_steps is still refused
    path.write_text(json.dumps({**dump, "dataset": long_rows, "num_train_epochs": 1}))
    with pytest.raises(ConfigError, match=r"steps=2 and num_train_epochs=1 both set the length of the run"):
        load_recipe(path)


@pytest.mark.parametrize("columns, trainer, hint", [
    (["chosen", "rejected"], "sft", r"These columns are the format of trainer: dpo \(set it in the recipe, or --trainer dpo\)$"),
    (["prompt", "answer"], "sft", r"These columns are the format of trainer: bnpo / grpo / gvpo \(set it in the recipe, or --trainer grpo\)$"),
    (["instruction", "input", "output"], "sft", r"They look alpaca-style 'instruction' / 'input' / 'output': write 'prompt'"),
    (["conversations"], "sft", r"They look sharegpt-style 'conversations': rename it 'messages'"),
    (["txt"], "sft", r"Did you mean to name the column\(s\) 'txt' -> 'text' \(or keep 'txt' and set dataset_text_field: txt\)\?$"),
    (["promt", "completion"], "sft", r"'promt' -> 'prompt'\?$"),
    (["text"], "dpo", r"These columns are the format of trainer: sft \(set it in the recipe, or --trainer sft\)$"),
    (["messages"], "dpo", r"These columns are the format of trainer: sft \(set it in the recipe, or --trainer sft\)$"),
    (["prompt", "completion"], "dpo", r"the format of trainer: bnpo / grpo / gvpo / sft \(set it in the recipe, or --trainer sft\)$"),
    (["text"], "grpo", r"These columns are the format of trainer: sft \(set it in the recipe, or --trainer sft\)$"),
])
def test_columns_of_another_format_say_which(columns, trainer, hint):
    """Columns that fit no format of the trainer listed the accepted ones only: DPO pairs given to SFT,
    LLaMA-Factory's alpaca / sharegpt files, a misspelt column now say what they are."""
    import datasets

    from lowmem.data import detect_format

    with pytest.raises(ValueError, match=r"fit no .* dataset format; accepted: .*" + hint):
        detect_format(datasets.Dataset.from_dict({c: ["a"] for c in columns}), trainer, source="d.jsonl")


def test_eval_strategy_without_a_held_out_set_fails_before_the_model_loads(long_rows):
    """``eval_strategy: epoch`` (a Trainer config's way to evaluate) on a dataset without an eval set
    passed the recipe checks and failed when the Trainer was built, after the model loaded."""
    with pytest.raises(ConfigError, match=r"eval_strategy='epoch' needs a held-out set for dataset="):
        load_recipe(None, dataset=long_rows, eval_strategy="epoch")
    assert load_recipe(None, dataset=long_rows, eval_strategy="epoch", eval_split=0.25).eval_split == 0.25
    assert load_recipe(None, dataset=long_rows, eval_strategy="no").training_args == {"eval_strategy": "no"}


def test_a_saved_grpo_config_loads(tmp_path):
    """A saved ``GRPOConfig`` holds both ``generation_batch_size`` and ``steps_per_generation`` (GRPOConfig
    derives each from the other), and GRPOConfig refused its own dump: "'generation_batch_size' and
    'steps_per_generation' can not be both configured at the same time". The derived pair loads; a
    pair that disagrees is still TRL's error."""
    from trl import GRPOConfig

    dump = GRPOConfig(str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                      report_to="none", use_cpu=True, bf16=False).to_dict()
    assert (dump["generation_batch_size"], dump["steps_per_generation"]) == (4, 1)
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps({**dump, "trainer": "grpo"}))
    args = build_training_args(load_recipe(path))
    assert (args.generation_batch_size, args.steps_per_generation) == (4, 1)
    path.write_text(json.dumps({**dump, "trainer": "grpo", "generation_batch_size": 8}))
    with pytest.raises(ConfigError, match="can not be both configured"):
        build_training_args(load_recipe(path))
