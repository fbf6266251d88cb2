"""AUDQLORA19 1 (fixed by FIXMODELS19): the output head (and input embedding) stays out of the targeted group of
every recipe that targets matrices (Muon / NorMuon / SinkGD orthogonalise or normalise, GaLore & co. project) when
peft wraps it: ``modules_to_save=["lm_head"]`` (``ModulesToSaveWrapper``: a trainable copy, another ``nn.Linear``),
LoRA on the head (``lora.Linear``), a tied head. Checked on the tiny Llama and on GPT-2 (Conv1D, tied head) and an
untied Qwen2, through ``create_optimizer``, the Trainer integration (``optimizer_cls_and_kwargs`` and
``LowMemTrainer``) and ``lowmem train``'s startup line.

Reference: a plain loop over ``named_modules`` keeping the trainable weights of the LoRA factors (``lora_A`` /
``lora_B``) of layers outside the head, the only hidden matrices a LoRA model trains.
Mutation: ``embedding_param_ids`` returning an empty set (the identity of the wrapped head no longer seen) -> every
modules_to_save case red."""

import io
import warnings

import pytest
import torch
from torch import nn

import lowmem
from lowmem.optim.registry import embedding_param_ids, get_entry

TARGETED = [("muon", {}), ("normuon", {}), ("sinkgd", {}), ("galore_adamw", {"rank": 2}), ("apollo_adamw", {"rank": 2}),
            ("fira_adamw", {"rank": 2}), ("adamw_snsm", {"rank": 2}), ("frugal", {"rank": 2})]


def _llama():
    from lowmem.kit import build_tiny_model

    return build_tiny_model(seed=0)[0]


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))


ARCHS = {"llama": (_llama, ["q_proj", "v_proj"], "lm_head", "embed_tokens"),
         "gpt2": (_gpt2, ["c_attn", "c_fc"], "lm_head", "wte"),
         "qwen2": (_qwen2, ["q_proj", "v_proj"], "lm_head", "embed_tokens")}


def _peft(arch, modules_to_save, head_lora=False):
    import peft

    build, targets, head, _ = ARCHS[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(build(), peft.LoraConfig(
            r=4, target_modules=targets + ([head] if head_lora else []), modules_to_save=modules_to_save,
            fan_in_fan_out=arch == "gpt2"))


def _reference(model, head_name):
    """The hidden matrices: trainable LoRA factor weights of layers that are not the head (a plain loop)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (".lora_A." in name or ".lora_B." in name) and f".{head_name}." not in name:
            if mod.weight.requires_grad:
                out.append(f"{name}.weight")
    return sorted(out)


def _targeted(model, groups, key):
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted(names[id(p)] for g in groups if g.get(key) not in (None, False) for p in g["params"])


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("name, kw", TARGETED)
@pytest.mark.parametrize("save", ["head", "head+embed"])
def test_modules_to_save_head_stays_out_of_the_targeted_group(arch, name, kw, save):
    _, _, head, embed = ARCHS[arch]
    pm = _peft(arch, [head] if save == "head" else [head, embed])
    head_copy = [n for n, p in pm.named_parameters() if p.requires_grad and f"{head}.modules_to_save" in n]
    assert head_copy  # peft made the trainable copy the test is about (tied GPT-2 too)
    opt = lowmem.create_optimizer(pm, name, lr=1e-3, **kw)
    key = get_entry(name).target_key
    assert _targeted(pm, opt.param_groups, key) == _reference(pm, head)
    # every trainable parameter is still trained, once
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted({id(p) for p in pm.parameters() if p.requires_grad})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name, kw", [("muon", {}), ("galore_adamw", {"rank": 2})])
def test_lora_factors_on_the_head_are_the_heads(arch, name, kw):
    """LoRA targeting lm_head (peft's lora.Linear around it): its factors belong to the head, not the hidden layers."""
    _, _, head, _ = ARCHS[arch]
    pm = _peft(arch, None, head_lora=True)
    assert any(f"{head}.lora_A" in n for n, p in pm.named_parameters() if p.requires_grad)
    opt = lowmem.create_optimizer(pm, name, lr=1e-3, **kw)
    assert _targeted(pm, opt.param_groups, get_entry(name).target_key) == _reference(pm, head)


def test_scale_gives_the_head_copy_its_head_role():
    """SCALE (and adamw_sn) find the head through its weight: the trainable copy gets scale_role 'head'."""
    pm = _peft("llama", ["lm_head", "embed_tokens"])
    opt = lowmem.create_optimizer(pm, "scale", lr=1e-3)
    names = {id(p): n for n, p in pm.named_parameters()}
    roles = {names[id(p)]: g.get("scale_role") for g in opt.param_groups for p in g["params"]}
    assert roles["base_model.model.lm_head.modules_to_save.default.weight"] == "head"
    assert roles["base_model.model.model.embed_tokens.modules_to_save.default.weight"] == "embedding"


def test_tied_and_plain_heads():
    """Without peft: a tied head (GPT-2: lm_head.weight is wte.weight) and an untied one are excluded by identity."""
    for build, head in ((_gpt2, "lm_head"), (_qwen2, "lm_head"), (_llama, "lm_head")):
        model = build()
        ids = embedding_param_ids(model)
        assert id(model.get_output_embeddings().weight) in ids and id(model.get_input_embeddings().weight) in ids
        opt = lowmem.create_optimizer(model, "muon", lr=1e-3)
        assert not any(head in n or "embed" in n or "wte" in n for n in _targeted(model, opt.param_groups, "use_muon"))


def test_trainer_integration_keeps_the_head_copy_out():
    """optimizer_cls_and_kwargs (plain Trainer) and LowMemTrainer build the same groups from the PeftModel."""
    from transformers import TrainingArguments

    from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments, optimizer_cls_and_kwargs

    pm = _peft("qwen2", ["lm_head"])
    _, kwargs = optimizer_cls_and_kwargs(pm, "muon", args=TrainingArguments("/tmp/unused", learning_rate=1e-3,
                                                                               report_to=[]))
    assert _targeted(pm, kwargs["params"], "use_muon") == _reference(pm, "lm_head")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = LowMemTrainer(model=pm, args=LowMemTrainingArguments("/tmp/unused", lowmem_optim="normuon",
                                                                       learning_rate=1e-3, report_to=[], use_cpu=True))
    opt = trainer.create_optimizer()
    assert _targeted(pm, opt.param_groups, "use_muon") == _reference(pm, "lm_head")


def test_lowmem_train_startup_line_counts_the_lora_matrices_only(tmp_path, own_model_dir):
    """lowmem train, optim muon, lora all-linear + modules_to_save lm_head: the targeted group holds the LoRA
    matrices (r=4 on the tiny Llama's 7 projections x layers), not the head's copy."""
    import json

    from rich.console import Console

    from lowmem.train import TrainRecipe, run

    rows = [{"messages": [{"role": "user", "content": f"{a}+1="}, {"role": "assistant", "content": str(a + 1)}]}
            for a in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    buf = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(TrainRecipe(model=own_model_dir, dataset=str(data), steps=1, lr=1e-3, batch_size=4, optim="muon",
                        lora={"r": 4, "target_modules": "all-linear", "modules_to_save": ["lm_head"]},
                        output_dir=str(tmp_path / "o"), track_memory=False, save_model=False),
            console=Console(file=buf, width=400))
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]))
    lora = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and "lora_" in n)
    total = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert total > lora  # the head's copy is trainable
    assert f"targeted group, {lora:,} of {total:,} parameters" in buf.getvalue(), buf.getvalue()
