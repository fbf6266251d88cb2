"""A new user's TRL / HF Trainer config fields that lowmem cannot honour here: each is one error naming the
field before the model loads (before: a traceback after it loaded, or a request to the Hub)."""

import pytest

from lowmem.config import ConfigError
from lowmem.train import load_recipe


def _recipe(tmp_path, trainer="sft", **training_args):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2", "answer": "2"}\n' if trainer == "grpo"
                    else '{"text": "1+1=2"}\n')
    kw = dict(trainer=trainer, output_dir=str(tmp_path / "out"), dataset=str(data), batch_size=4)
    if trainer == "grpo":
        kw["reward_funcs"] = ["exact_match"]
        training_args = {"num_generations": 4, **training_args}
    return load_recipe(None, **kw, **training_args)


@pytest.mark.parametrize("trainer, fields, message", [
    ("sft", {"push_to_hub": True}, r"push_to_hub=true: lowmem train runs offline and uploads nothing"),
    ("grpo", {"log_completions": True, "log_completions_hub_repo": "me/x"},
     r"log_completions_hub_repo='me/x': lowmem train runs offline"),
    ("sft", {"chat_template_path": "chat.jinja"}, r"chat_template_path='chat.jinja': write chat_template"),
    ("sft", {"activation_offloading": True}, r"activation_offloading=true .* no GPU is visible"),
    ("sft", {"use_liger_kernel": True}, r"use_liger_kernel=true needs the liger-kernel package"),
    ("grpo", {"use_vllm": True}, r"training_args\.use_vllm=true needs the vllm package"),
])
def test_fields_that_cannot_apply_are_errors_naming_them(trainer, fields, message, tmp_path, monkeypatch):
    """Before: push_to_hub / log_completions_hub_repo called the Hub when the Trainer was built ("Cannot reach
    https://huggingface.co/api/repos/create"); use_liger_kernel / use_vllm were an ImportError traceback after the
    model loaded (exit 1); activation_offloading on a CPU an AttributeError traceback in TRL; chat_template_path
    was unseen by lowmem's template check (a missing-template error) or looked up on the Hub."""
    import lowmem.train

    monkeypatch.setattr(lowmem.train, "_accelerator_visible", lambda: False)
    monkeypatch.setattr(lowmem.train, "_liger_available", lambda: False)
    monkeypatch.setattr(lowmem.train, "_vllm_available", lambda: False)
    with pytest.raises(ConfigError, match=message):
        _recipe(tmp_path, trainer, **fields)


def test_fields_that_can_apply_pass(tmp_path, monkeypatch):
    """The same fields where they can apply: off, or their package / device present."""
    import lowmem.train

    _recipe(tmp_path, push_to_hub=False, hub_model_id="me/x", activation_offloading=False, use_liger_kernel=False)
    _recipe(tmp_path, "grpo", log_completions=True, use_vllm=False)
    monkeypatch.setattr(lowmem.train, "_accelerator_visible", lambda: True)
    monkeypatch.setattr(lowmem.train, "_liger_available", lambda: True)
    monkeypatch.setattr(lowmem.train, "_vllm_available", lambda: True)
    assert _recipe(tmp_path, activation_offloading=True, use_liger_kernel=True).training_args["use_liger_kernel"]
    assert _recipe(tmp_path, "grpo", use_vllm=True).training_args["use_vllm"]


@pytest.mark.parametrize("columns, text_field, hint", [
    (["text"], "content", r"dataset_text_field='content' names no column of the data \(its default, 'text', is one: "
                          r"drop dataset_text_field\)$"),
    (["body"], "bdy", r"dataset_text_field='bdy' names no column of the data; did you mean dataset_text_field: body\?$"),
])
def test_dataset_text_field_naming_no_column(columns, text_field, hint):
    """Before: "Missing column(s) [] of the 'text' (language modeling) format (found ['text'])" for a text dataset
    with a dataset_text_field naming no column (the hints read the table's 'text' column, not the field's)."""
    from datasets import Dataset

    from lowmem.data import detect_format

    with pytest.raises(ValueError, match=hint) as err:
        detect_format(Dataset.from_list([{c: "1+1=2" for c in columns}]), "sft", text_field=text_field)
    assert "Missing column(s) []" not in str(err.value)


@pytest.mark.parametrize("split_named", [True, False])
def test_hub_snapshot_folder_with_dataset_card(tmp_path, split_named):
    """A dataset downloaded from the Hub (``huggingface-cli download --local-dir``) is ``README.md`` (the dataset
    card) + ``data/*.parquet``; ``datasets.load_dataset(folder)`` reads it. Before: "files of no split
    ['README.md']" (split-named files) or "unknown file extension(s) ['.md']"."""
    import json

    from lowmem.data import load_local_dataset

    folder = tmp_path / "snapshot"
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# my data\n")
    (folder / ".gitattributes").write_text("*.parquet filter=lfs\n")
    names = ["train-00000-of-00001.jsonl", "test-00000-of-00001.jsonl"] if split_named else ["part-0.jsonl", "part-1.jsonl"]
    for name, rows in zip(names, (["1+1=2", "2+2=4", "3+3=6"], ["4+4=8"])):
        (folder / "data" / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    train = load_local_dataset(folder)
    assert len(train) == (3 if split_named else 4)
    if split_named:
        assert load_local_dataset(folder, split="eval", field_name="eval_dataset")["text"] == ["4+4=8"]


@pytest.mark.parametrize("key", ["lr_scheduler", "lr_scheduler_type"])
def test_unknown_lr_scheduler_names_the_field(key, tmp_path):
    """Before: "LowMemSFTConfig: cosine_warmup is not a valid SchedulerType, ..." (no field named)."""
    with pytest.raises(ConfigError, match=r"lr_scheduler='cosine_warmup' \(TrainingArguments.lr_scheduler_type\): "
                                          r"unknown scheduler, did you mean \['cosine_warmup_with_min_lr'.*valid: \["):
        load_recipe(None, output_dir=str(tmp_path), **{key: "cosine_warmup"})
    assert load_recipe(None, output_dir=str(tmp_path), **{key: "cosine"}).lr_scheduler == "cosine"


def _checkpoint(folder, weights):
    """A complete checkpoint (small, whole files: --resume skips truncated ones)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text('{"global_step": 1}')
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save({}, folder / name)
    save_file({"w": torch.zeros(1)}, folder / weights)


@pytest.mark.parametrize("weights, lora, message", [
    ("model.safetensors", {"r": 4}, r"holds the whole model \(a full fine-tune\), but this run trains LoRA adapters"),
    ("adapter_model.safetensors", None, r"holds LoRA adapters \(adapter_model.safetensors\), but this run trains the "
                                        r"whole model"),
])
def test_resume_checkpoint_of_the_other_kind(weights, lora, message, tmp_path):
    """Before: a whole-model checkpoint resumed under lora was `TypeError: PeftModel.from_pretrained() missing 1
    required positional argument: 'model_id'` (exit 1) and an adapter checkpoint without lora "Can't find a checkpoint
    index", both after the model loaded; now one error before it (resolve_checkpoint, which run() calls first)."""
    from lowmem.train import resolve_checkpoint

    _checkpoint(tmp_path / "checkpoint-1", weights)
    kw = dict(output_dir=str(tmp_path), steps=5, resume_from_checkpoint=True)
    with pytest.raises(ConfigError, match=message):
        resolve_checkpoint(load_recipe(None, lora=lora, **kw))
    assert resolve_checkpoint(load_recipe(None, lora=None if lora else {"r": 4}, **kw)).endswith("checkpoint-1")


def test_recipe_key_given_twice_is_an_error(tmp_path):
    """PyYAML keeps a repeated key's last value silently (before: `lr: 1e-4` ... `lr: 1e-2` trained at 1e-2)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\nlr: 1.0e-4\nsteps: 3\nlr: 1.0e-2\n")
    with pytest.raises(ConfigError, match=r"r.yaml: invalid YAML: key 'lr' is given twice \(lines 2 and 4\); give it once"):
        load_recipe(recipe)
    recipe.write_text(f"output_dir: {tmp_path}\nlora:\n  r: 4\n  r: 8\n")
    with pytest.raises(ConfigError, match=r"key 'r' is given twice \(lines 3 and 4\)"):
        load_recipe(recipe)
    # a YAML merge key's values may be overridden (YAML's meaning); safe_load's refusals stay
    recipe.write_text(f"output_dir: {tmp_path}\nlora:\n  <<: {{r: 4, lora_alpha: 8}}\n  r: 8\n")
    assert load_recipe(recipe).lora == {"r": 8, "lora_alpha": 8}
    recipe.write_text("x: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match=r"invalid YAML: could not determine a constructor for the tag"):
        load_recipe(recipe)


def test_json_object_wrapping_the_rows(tmp_path):
    """A JSON file `{"version": 1, "data": [{"prompt": ..., "completion": ...}, ...]}` (a common export) reads as one
    row; before, the error listed its columns ['version', 'data'] and the formats, not that the rows were inside."""
    import json

    from lowmem.data import load_train_data

    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps({"version": 1, "data": rows}))
    with pytest.raises(ValueError, match=r"It is one row whose 'data' holds a list of 3 objects: write those rows "
                                         r"themselves \(a JSON array, or JSON Lines"):
        load_train_data(str(tmp_path / "d.json"), "sft")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert len(load_train_data(str(tmp_path / "d.json"), "sft").train) == 3


def test_sharegpt_turns_in_a_messages_column():
    """`messages` holding sharegpt {from, value} turns (LLaMA-Factory's sharegpt with a renamed column): the error
    says how to write them; before only "expected a list of {'role': ..., 'content': ...} messages"."""
    from datasets import Dataset

    from lowmem.data import detect_format

    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    with pytest.raises(ValueError, match=r"sharegpt-style \{from, value\} turns: write from/value -> role/content, "
                                         r"human -> user, gpt -> assistant"):
        detect_format(Dataset.from_list([{"messages": turns}]), "sft")


def test_recipe_chat_template_replacing_the_models_own_warns():
    """A shipped recipe (configs/sft_jsonl.yaml: the tiny tokenizer's template) run with --model on a model that has its
    own template replaced it silently, and the trained model was saved with the tiny template."""
    import types
    import warnings

    from lowmem.data import DatasetFormat, ensure_chat_template

    chat = DatasetFormat(name="messages", columns=("messages",), conversational=True, extra_columns=())
    own, other = "{{ messages[0]['content'] }}", "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = types.SimpleNamespace(chat_template=own)
    with pytest.warns(UserWarning, match=r"replaces the chat template of the tokenizer of model 'my-model': the data is "
                                         r"rendered with it and the trained model is saved with it"):
        ensure_chat_template(tok, chat, other, model="my-model")
    assert tok.chat_template == other
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensure_chat_template(types.SimpleNamespace(chat_template=own), chat, own, model="my-model")  # the same one
        ensure_chat_template(types.SimpleNamespace(chat_template=None), chat, other, model="my-model")  # it had none


def test_dpo_loss_type_as_one_string(tmp_path):
    """TRL's DPOConfig takes `loss_type: ipo` (its __post_init__ makes it ["ipo"]); before, the strict checker refused
    it ("training_args.loss_type='ipo': expected a list"). SFT / GRPO's loss_type stays a string."""
    from lowmem.train import build_training_args

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n')
    recipe = load_recipe(None, trainer="dpo", dataset=str(data), output_dir=str(tmp_path), loss_type="ipo", batch_size=2)
    assert recipe.training_args["loss_type"] == ["ipo"] and build_training_args(recipe).loss_type == ["ipo"]
    recipe = load_recipe(None, trainer="grpo", output_dir=str(tmp_path), loss_type="bnpo", batch_size=8)
    assert recipe.training_args["loss_type"] == "bnpo"


@pytest.mark.parametrize("trainer, key, value, hint", [
    ("sft", "use_rslora", True, "use_rslora -> lora: {use_rslora: true}"),
    ("sft", "lora_modules_to_save", ["lm_head"], "lora_modules_to_save -> lora: {modules_to_save: [...]}"),
    ("sft", "model_revision", "main", "model_revision -> nothing: a local model directory has no revisions"),
    ("dpo", "rpo_alpha", 0.5, "rpo_alpha -> loss_type: [sigmoid, sft] and loss_weights: [1.0, <rpo_alpha>]"),
    ("dpo", "ref_model", "path/to/model", "ref_model -> nothing: DPO / GRPO's reference model is the policy"),
])
def test_trl_and_older_keys_get_lowmems_spelling(trainer, key, value, hint, tmp_path):
    """Before: "did you mean ['hub_revision']?" for model_revision, ['ld_alpha'] for rpo_alpha, nothing for use_rslora."""
    with pytest.raises(ConfigError, match=r"lowmem's spelling: " + __import__("re").escape(hint)):
        load_recipe(None, trainer=trainer, output_dir=str(tmp_path), **{key: value})


def test_reward_file_imports_a_module_beside_it(tmp_path, monkeypatch):
    """A reward file importing its helper module from the same folder (`from helpers import norm`), run from another
    folder: before, "ModuleNotFoundError: No module named 'helpers'"; the folder is on sys.path only while it imports."""
    import sys

    from lowmem.rewards import resolve_reward

    folder = tmp_path / "rw_useraudit"
    folder.mkdir()
    (folder / "helpers_useraudit.py").write_text("def norm(t):\n    return t.strip()\n")
    (folder / "rew.py").write_text("from helpers_useraudit import norm\n\n"
                                   "def r(completions, **kwargs):\n    return [float(norm(c) == '2') for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "helpers_useraudit", raising=False)
    fn = resolve_reward(f"{folder / 'rew.py'}:r")
    assert fn(prompts=["1+1="] * 2, completions=[" 2 ", "3"]) == [1.0, 0.0]
    assert str(folder) not in sys.path
    sys.modules.pop("helpers_useraudit", None)


def test_output_dir_that_is_the_model_directory(own_model_dir, tmp_path):
    """Before: the run saved the trained model over the user's model (`--output-dir` = `--model`), silently."""
    with pytest.raises(ConfigError, match=r"output_dir=.* is the model directory .*would overwrite the one it started "
                                          r"from.*set another output_dir"):
        load_recipe(None, model=str(own_model_dir), output_dir=str(own_model_dir) + "/", lr=1e-4)
    load_recipe(None, model=str(own_model_dir), output_dir=str(own_model_dir), lr=1e-4, save_model=False)
    load_recipe(None, model=str(own_model_dir), output_dir=str(tmp_path), lr=1e-4)


def test_messages_as_json_text_in_a_csv(tmp_path):
    """A CSV whose `messages` cells hold the messages as JSON text (pandas' to_csv of a chat dataset): before, only
    "column 'messages' of row 0 is str '[{...'; expected a list of {role, content} messages"."""
    import csv
    import json

    from lowmem.data import load_train_data

    with open(tmp_path / "chat.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerow([json.dumps([{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}])])
    with pytest.raises(ValueError, match=r"column 'messages' of row 0 is JSON text of messages, not a list: CSV cells "
                                         r"are strings only; write the rows as JSON Lines"):
        load_train_data(str(tmp_path / "chat.csv"), "sft")
