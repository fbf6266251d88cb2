"""`lowmem train` on users' models of architectures other than the tiny Llama (built offline from
transformers configs, saved with the kit's character tokenizer and a chat template): Mixture-of-
Experts models whose checkpoints transformers writes in another layout than their parameters."""

import io
import json
import warnings

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from lowmem.train import TrainRecipe, load_converted_checkpoint, run

CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    """A tiny Mixtral (4 experts, top 2; fused 3-D expert weights in transformers 5) saved with the
    kit's character tokenizer carrying a chat template."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from lowmem.kit import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = CHAT
    cfg = MixtralConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MixtralForCausalLM(cfg)
    path = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def phimoe_dir(tmp_path_factory):
    """A tiny PhiMoE (4 experts, top 2): its config names the experts ``num_local_experts`` only, without the
    ``num_experts`` alias TRL's router aux loss reads (lowmem.train.alias_num_experts gives it), saved as
    mixtral_dir."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    from lowmem.kit import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = CHAT
    cfg = PhimoeConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                       vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = PhimoeForCausalLM(cfg)
    path = tmp_path_factory.mktemp("phimoe")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a}+{a + 3}="}, {"role": "assistant", "content": str(2 * a + 3)}]}
            for a in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(**fields):
    base = dict(lr=1e-2, batch_size=4, logging_steps=1, track_memory=False, save_model=True)
    return run(TrainRecipe(**{**base, **fields}), console=Console(file=io.StringIO(), width=200))


def test_resume_on_a_moe_model_restores_the_expert_weights(tmp_path, mixtral_dir, chat_file):
    """transformers 5 saves Mixtral's fused experts per expert (experts.N.w1.weight) and the Trainer
    resumed with load_state_dict(strict=False): the experts and router kept their pre-resume values
    (huggingface/transformers#48805), and the resumed run ended 5e-3 away from the uninterrupted one.

    Also (the first run): GaLore projected 2-D nn.Linear weights only and the fused 3-D experts, most of a MoE
    model, trained with full-size AdamW state (a warning said so); now it projects each expert matrix
    (tests/test_experts_subspace.py): the experts are in the targeted group and nothing is said."""
    common = dict(model=mixtral_dir, dataset=chat_file, optim="galore_adamw", optim_args={"rank": 4}, steps=2, save_steps=1)
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(TrainRecipe(output_dir=str(tmp_path / "full"), lr=1e-2, batch_size=4, logging_steps=1, track_memory=False,
                        **common), console=Console(file=out, width=300))
    assert not [w for w in caught if "3 or more dimensions" in str(w.message)]
    # (the targeted group: 3,072 of the attention's 2-D weights + 12,288 of the experts')
    assert "hyperparameters in effect (targeted group, 15,360 of " in out.getvalue() and "rank=4" in out.getvalue()
    assert not any("gate_up_proj" in k for k in load_file(tmp_path / "full" / "checkpoint-1" / "model.safetensors"))
    m = _run(output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"), **common)
    assert m["resumed_from"] == str(tmp_path / "full" / "checkpoint-1") and m["steps"] == 2
    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert set(full) == set(resumed)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)
    a = torch.load(tmp_path / "full" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    for pid, st in a["state"].items():
        for key, v in st.items():
            assert torch.equal(v, b["state"][pid][key]), (pid, key)


def test_sft_on_a_phimoe_model_saves_and_reloads_its_experts(tmp_path, phimoe_dir, chat_file):
    """PhiMoE (FOUND_OWNDATA18 5): SFT stopped at the first step (TRL's router aux loss read config.num_experts, which
    PhimoeConfig lacks; lowmem.train.alias_num_experts gives it). It trains, saves its fused experts in the
    per-expert layout, and that checkpoint loads back into the fused experts."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    common = dict(model=phimoe_dir, dataset=chat_file, optim="adamw", steps=2, save_steps=1)
    m = _run(output_dir=str(tmp_path / "full"), **common)
    losses = m["train_loss_history"]
    assert m["steps"] == 2 and len(losses) == 2 and all(0 < x < 100 for x in losses), losses  # (finite, trained)
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as f:
        experts = [k for k in f.keys() if ".experts." in k]
    assert experts and all("gate_up_proj" not in k for k in experts), experts  # (the checkpoint's per-expert names)
    # the checkpoint's per-expert layout loads back into the fused experts (lowmem.train.load_converted_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(phimoe_dir)
    assert load_converted_checkpoint(model, str(tmp_path / "full" / "checkpoint-1")) is True
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full" / "checkpoint-1")).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_resume_on_a_phimoe_model_equals_the_uninterrupted_run(tmp_path, phimoe_dir, chat_file):
    """lowmem train resumed from checkpoint-1 of a tiny PhiMoE: the final weights and optimizer state equal the
    uninterrupted run's bit for bit: the trainers' ``_load_from_checkpoint`` (lowmem.train.load_trainer_checkpoint)
    loads the per-expert checkpoint into the fused experts; without it the resumed run ended away (step-2 loss 3.9624
    vs 3.9561)."""
    common = dict(model=phimoe_dir, dataset=chat_file, optim="adamw", steps=2, save_steps=1)
    _run(output_dir=str(tmp_path / "full"), **common)
    m = _run(output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"), **common)
    assert m["resumed_from"] == str(tmp_path / "full" / "checkpoint-1") and m["steps"] == 2
    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert set(full) == set(resumed)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)
    a = torch.load(tmp_path / "full" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    for pid, st in a["state"].items():
        for key, v in st.items():
            assert torch.equal(v, b["state"][pid][key]), (pid, key)


def test_load_converted_checkpoint_only_acts_on_another_layout(tmp_path, mixtral_dir, own_model_dir):
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(own_model_dir)
    assert load_converted_checkpoint(llama, own_model_dir) is False  # same names: the Trainer's own load
    # a checkpoint of another architecture: one error naming both (was a RuntimeError traceback, or a silent
    # partial load where names and shapes happen to match)
    with pytest.raises(ValueError, match=r"holds a mixtral model .* this run trains a llama model"):
        load_converted_checkpoint(llama, mixtral_dir)
    moe = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    saved = {k: v.clone() for k, v in moe.state_dict().items()}
    with torch.no_grad():
        for p in moe.parameters():
            p.zero_()
    assert load_converted_checkpoint(moe, mixtral_dir) is True
    for k, v in moe.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_untargeted_batched_weights_reads_the_groups():
    from lowmem.train import untargeted_batched_weights

    model = torch.nn.Module()
    model.lin = torch.nn.Linear(4, 4)
    model.experts = torch.nn.Parameter(torch.zeros(2, 4, 4))
    opt = torch.optim.SGD([{"params": [model.lin.weight], "rank": 2},
                           {"params": [model.experts, model.lin.bias]}], lr=0.1)
    assert untargeted_batched_weights(opt, model, "rank") == [("experts", (2, 4, 4))]
    opt.param_groups[1]["rank"] = 2  # targeted: nothing to report
    assert untargeted_batched_weights(opt, model, "rank") == []


def test_unknown_optim_suggests_each_name_once():
    """'galore' suggested ['galore_adamw', 'galore_adamw']: the name is both lowmem's and a Hugging Face one."""
    from lowmem.config import ConfigError
    from lowmem.train import resolve_optim_name

    with pytest.raises(ConfigError, match=r"did you mean \['galore_adamw'\]\? lowmem: "):
        resolve_optim_name("galore")


def test_lr_and_a_different_optim_args_lr_are_refused(own_model_dir):
    """--lr 1e-3 --optim-args lr=5e-4 trained at 5e-4 without a word; then with a warning only; now (SILENT 3, the
    no-silent-fallback standard: a warning is no answer when one of two values is dropped) an error naming both."""
    from lowmem.config import ConfigError
    from lowmem.train import load_recipe

    with pytest.raises(ConfigError, match=r"lr=0.001 and optim_args.lr=0.0005 both set the learning rate, to different "
                                          r"values .*give one of them"):
        load_recipe(None, model=own_model_dir, optim="adamw", lr=1e-3, optim_args="lr=5e-4")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_recipe(None, model=own_model_dir, optim="adamw", lr=5e-4, optim_args="lr=5e-4")  # the same value: quiet


def test_a_checkpoint_of_another_size_is_one_error(own_model_dir):
    """The Trainer's own load of a checkpoint whose shapes differ raised load_state_dict's RuntimeError
    (a traceback from `lowmem train`); it is a ValueError (one line, exit 2) naming the checkpoint."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from lowmem.train import _load_converted_checkpoints

    def trainer_load(path, model=None):
        raise RuntimeError("Error(s) in loading state_dict:\n\tsize mismatch for lm_head.weight: [73, 64] vs [73, 32]")

    trainer = SimpleNamespace(model=AutoModelForCausalLM.from_pretrained(own_model_dir), _load_from_checkpoint=trainer_load)
    _load_converted_checkpoints(trainer)
    with pytest.raises(ValueError, match=r"checkpoint '.*' does not fit the model: Error\(s\) in loading state_dict: size mismatch"):
        trainer._load_from_checkpoint(own_model_dir)


def test_a_dataset_folder_with_held_out_data_names_it(tmp_path, own_model_dir):
    """A saved DatasetDict (or a folder of train / validation files) given as dataset trains on its train
    split and left its validation split unused without a word; eval_steps' error did not say it was there."""
    from datasets import Dataset, DatasetDict

    from lowmem.config import ConfigError
    from lowmem.data import held_out_split

    rows = [{"text": f"{a}+1={a + 1}"} for a in range(8)]
    DatasetDict(train=Dataset.from_list(rows), validation=Dataset.from_list(rows[:2])).save_to_disk(tmp_path / "dd")
    Dataset.from_list(rows).save_to_disk(tmp_path / "plain")
    (tmp_path / "files").mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        (tmp_path / "files" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert held_out_split(str(tmp_path / "dd")) == "its 'validation' split"
    assert held_out_split(str(tmp_path / "files")) == "'validation.jsonl'"
    assert held_out_split(str(tmp_path / "plain")) is None and held_out_split(str(tmp_path / "files" / "train.jsonl")) is None
    with pytest.raises(ConfigError, match=r"eval_steps=1 needs a held-out set .* also holds held-out data \(its 'validation' "
                                          r"split\), unused as dataset: eval_dataset: .*dd \(--eval-dataset"):
        TrainRecipe(model=own_model_dir, dataset=str(tmp_path / "dd"), lr=1e-3, eval_steps=1)
    out = io.StringIO()
    run(TrainRecipe(model=own_model_dir, dataset=str(tmp_path / "files"), lr=1e-3, steps=1, batch_size=4, track_memory=False,
                    save_model=False, output_dir=str(tmp_path / "out")), console=Console(file=out, width=400))
    assert "note: no eval set; " in out.getvalue() and "'validation.jsonl'" in out.getvalue()


def test_lora_target_modules_the_model_lacks_name_its_layers(tmp_path, own_model_dir):
    """peft said "Target modules {'c_attn'} not found in the base model. Please check the target modules
    and try again.": neither the recipe field nor the names the model has."""
    from lowmem.config import ConfigError
    from lowmem.train import load_policy

    recipe = TrainRecipe(model=own_model_dir, lr=1e-3, lora={"r": 2, "target_modules": ["c_attn"]}, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"lora.target_modules=\['c_attn'\] matched no layer of LlamaForCausalLM: its "
                                          r"linear layers are named \['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', "
                                          r"'q_proj', 'up_proj', 'v_proj'\]"):
        load_policy(recipe)


def test_lowmem_trainer_resumes_and_loads_best_on_a_moe_model(tmp_path, mixtral_dir):
    """LowMemTrainer (and the TRL trainers, which share its mixin) resumed a MoE model from
    load_state_dict(strict=False) of the per-expert checkpoint layout: the experts and the router
    kept their pre-resume values (1.8e-2 off the uninterrupted run after one resumed step). And
    load_best_model_at_end (Trainer._load_best_model) had the same defect."""
    from transformers import AutoModelForCausalLM

    from lowmem.kit import build_tokenizer, sft_collator, sft_dataset, tokenize_sft
    from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments

    tok = build_tokenizer()
    train = tokenize_sft(sft_dataset(16, 0, "train"), tok, padding=False)

    def trainer(out):
        args = LowMemTrainingArguments(str(out), lowmem_optim="adamw", learning_rate=1e-2, max_steps=2, save_steps=1,
                                       per_device_train_batch_size=4, report_to="none", use_cpu=True, seed=0)
        return LowMemTrainer(model=AutoModelForCausalLM.from_pretrained(mixtral_dir), args=args, train_dataset=train,
                             data_collator=sft_collator(tok))

    full = trainer(tmp_path / "a")
    full.train()
    resumed = trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    want = full.model.state_dict()
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)
    # the best checkpoint: the weights of checkpoint-1, through the same conversion
    first = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a" / "checkpoint-1")).state_dict()
    resumed.state.best_model_checkpoint = str(tmp_path / "a" / "checkpoint-1")
    resumed._load_best_model()
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, first[k], rtol=0, atol=0, msg=k)


def test_batched_weights_note_says_what_the_recipe_can_do():
    """Muon and SinkGD step fused experts per matrix: their note (experts left out by target_modules) said
    '... targets 2-D projection layers only', which is GaLore's case, not theirs."""
    from lowmem.train import batched_weights_message

    found = [("model.layers.0.mlp.experts.down_proj", (4, 32, 64))]
    for optim in ("muon", "sinkgd"):
        text = batched_weights_message(optim, "use_muon", found, 20_000)
        assert "not selected by target_modules" in text and "'down_proj'" in text and "2-D" not in text, text
    # the subspace recipes step them per matrix too (tests/test_experts_subspace.py)
    text = batched_weights_message("galore_adamw", "rank", found, 20_000)
    assert "not selected by target_modules" in text and "2-D" not in text, text


@pytest.mark.parametrize("name, targets, says", [
    ("galore_adamw", "q_proj", r"matched no .*write '\.\*q_proj' or the list \['q_proj'\]$"),
    ("muon", "experts", r"write '\.\*experts' or the list \['experts'\]$"),  # muon does take them, written as a list
])
def test_target_modules_that_select_nothing_say_why(mixtral_dir, name, targets, says):
    """target_modules='q_proj' said 'matched no projection layer; its projection layers are named [..., 'q_proj',
    ...]' (a string is peft's / the Trainer's full-name regex), and target_modules naming the fused experts did
    not say GaLore cannot project 3-D weights (FOUND_registry items 2-3; fixed in d69b770)."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from lowmem.optim import create_optimizer
    from lowmem.trainers import optimizer_cls_and_kwargs

    model = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    hp = {"rank": 4} if name == "galore_adamw" else {}
    with pytest.raises(ValueError, match=r"target_modules=.*" + says):
        create_optimizer(model, name, target_modules=targets, **hp)
    args = TrainingArguments("unused", optim_target_modules=targets, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"optim_target_modules=.*" + says):
        optimizer_cls_and_kwargs(model, name, args=args, **hp)
