"""The registry's public surface: names and entries, the local weight-decay rule, pricing metadata."""

from __future__ import annotations

import lowmem
from lowmem.optim import OptimizerEntry, get_entry, list_optimizers, optimizer_entries


def test_list_optimizers_returns_sorted_names_and_entries_come_separately():
    names = lowmem.list_optimizers()
    assert names == list_optimizers() and names == sorted(names) and len(names) == len(set(names))
    assert all(type(n) is str for n in names) and {"adamw", "adafactor", "galore_adamw"} <= set(names)
    entries = optimizer_entries()
    assert all(isinstance(e, OptimizerEntry) for e in entries)
    assert [e.name for e in entries] == names
    assert all(get_entry(n) is e for n, e in zip(names, entries))
    for n in names:  # every listed name builds (README: "any name from lowmem.list_optimizers()")
        assert get_entry(n).name == n


# ---- the weight-decay rule, written locally and equal to the Trainer's -------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lowmem.optim.registry import decay_parameter_names  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32)


def _hf_model(kind: str) -> nn.Module:
    import transformers as tf

    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**TINY))
    if kind == "llama_untied_bias":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, attention_bias=True, mlp_bias=True, tie_word_embeddings=False))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**TINY))
    if kind == "qwen3":  # q_norm / k_norm inside attention
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**TINY, head_dim=8))
    if kind == "gpt2":  # nn.LayerNorm ln_1 / ln_2 / ln_f, Conv1D with biases
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    if kind == "llama_lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(tf.LlamaForCausalLM(tf.LlamaConfig(**TINY)),
                              LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, bias="lora_only"))
    raise ValueError(kind)


class Custom(nn.Module):
    """Norm layers the name patterns miss (an nn.LayerNorm called ``pre``, an nn.RMSNorm called ``rms``),
    names the patterns catch (``Final_Norm``, ``bias_table``), a root parameter, a shared child."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.pre = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.Final_Norm = nn.RMSNorm(8)
        self.proj = nn.Linear(8, 8)
        self.shared = self.proj
        self.bias_table = nn.Parameter(torch.zeros(4))
        self.scale = nn.Parameter(torch.ones(8))
        self.block = nn.Sequential(nn.Linear(8, 8, bias=False), nn.LayerNorm(8, bias=False), nn.Conv1d(8, 8, 1))
        self.normalizer = nn.Linear(8, 8)  # "norm" only as part of a word: decayed


@pytest.mark.parametrize("kind", ["llama", "llama_untied_bias", "qwen2", "qwen3", "gpt2", "llama_lora", "custom"])
def test_decay_rule_equals_the_trainers(kind):
    from transformers import Trainer

    model = Custom() if kind == "custom" else _hf_model(kind)
    ours = decay_parameter_names(model)
    theirs = set(Trainer.get_decay_parameter_names(None, model))
    assert ours == theirs
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}  # GPT-2's tied lm_head.weight too
    assert ours < names and ours  # some decayed, some not
    assert not any("bias" in n or "norm" in n.lower() for n in ours if kind != "custom")
    if kind == "custom":  # the Trainer's rule, quirks included: an nn.RMSNorm it cannot name is decayed
        assert "rms.weight" in ours and "pre.weight" not in ours and "final_norm" not in " ".join(ours).lower()
        assert {"scale", "normalizer.weight", "proj.weight"} <= ours and "bias_table" not in ours


def test_core_optimizers_do_not_import_transformers():
    code = (
        "import sys\n"
        "import torch\n"
        "import lowmem.optim\n"
        "from torch import nn\n"
        "m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))\n"
        "for name in ('adamw', 'galore_adamw', 'adafactor'):\n"
        "    lowmem.optim.create_optimizer(m, name, **({'rank': 2} if name == 'galore_adamw' else {}))\n"
        "assert 'transformers' not in sys.modules, sorted(k for k in sys.modules if k.startswith('transformers'))[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- memory metadata: the budget search prices optimizers from it, not from their names ---------

import dataclasses  # noqa: E402

from lowmem.memory.search import _optimizer_cost  # noqa: E402
from lowmem.optim.registry import SECOND_MOMENTS, STATE_PRECISIONS, register  # noqa: E402

# (cost at rank None, cost at rank 64) on a 4096-wide model; the subspace rank term is 2 + log2(4096 / (4 r)) / 2
COSTS_4096 = {
    "adamw": 0.0, "adafactor": 1.5, "adamw8bit": 1.0, "adamw4bit": 1.25, "adamw4bit_rank1": 1.25, "microadam": 1.0,
    "bnb_adamw8bit": 1.0, "bnb_paged_adamw8bit": 1.0,
    "spam": 0.0, "stable_spam": 0.0, "bnb_paged_adamw": 0.0,  # fp32 full state (were 1.0 when names were read)
    "adam_mini": 1.5,  # blockwise second moment, priced like a factored one
    "came": 1.5,  # fp32, factored like Adafactor (its first moment and instability statistics are not priced)
    "lion": 1.5, "lion8bit": 2.5,  # second_moment 'none' (sign updates), + 1.0 for 8-bit states
    "ademamix": 0.0, "ademamix8bit": 1.0,  # full second moment: fp32 0.0, 8-bit states +1.0
    "bnb_lion8bit": 2.5, "bnb_paged_lion": 1.5, "bnb_paged_lion8bit": 2.5,
    "muon": 1.5, "scale": 1.5, "sinkgd": 1.5,  # fp32, second_moment 'none': no per-coordinate adaptivity
    "normuon": 1.5,  # (above)
    "sm3": 1.5,  # fp32, factored: one accumulator per row and per column (its optional momentum is not priced)  # fp32, one second moment per row (blockwise, priced as Adam-mini's)
    "racs": 1.5,  # fp32, factored: one statistic per row and per column, plus the kept update norm
    "lomo": 1.5, "adalomo": 1.5,  # SGD (no state, no second moment); AdaLomo factored like Adafactor
    "badam": 0.0,  # Adam (fp32, full) on the active block
    "galore_adamw": (2.0, 4.0), "galore_adafactor": (2.0, 4.0), "fira_adamw": (2.0, 4.0), "frugal": (2.0, 4.0),
    "osd_adamw": (2.0, 4.0), "galore_adamw8bit": (3.0, 5.0), "fira_adamw8bit": (3.0, 5.0), "frugal8bit": (3.0, 5.0),
    "apollo_adamw": (2.0, 4.0), "apollo_mini": (2.0, 4.0),  # subspace, fp32: priced by the rank searched
    "alice": (2.0, 4.0),  # subspace, fp32, Adam moments in the subspace: priced by the rank searched
    "adamw_sn": 1.5, "adamw_snsm": (2.0, 4.0), "sgd_sm": (2.0, 4.0),  # Subset-Norm: blockwise like Adam-mini
    "adagrad_sn": 1.5, "adagrad_snsm": (2.0, 4.0),
    "sgd": 1.5,  # fp32, second_moment 'none' (its optional momentum is not priced)
    "adagrad": 0.0, "rmsprop": 0.0,  # fp32, full second moment (the sum / mean square), as AdamW's
    "stable_adamw": 0.0,  # fp32, full second moment
    "bnb_rmsprop": 0.0, "bnb_rmsprop8bit": 1.0, "bnb_paged_ademamix": 0.0, "bnb_paged_ademamix8bit": 1.0,  # (full)
}


def test_every_registered_optimizer_has_memory_metadata():
    for e in optimizer_entries():
        assert e.state_precision in STATE_PRECISIONS, e.name
        assert e.second_moment in SECOND_MOMENTS, e.name
    assert set(COSTS_4096) == set(list_optimizers())  # a new optimizer gets a row here


def test_search_costs_come_from_metadata():
    for e in optimizer_entries():
        want = COSTS_4096[e.name]
        if e.subspace:
            assert _optimizer_cost(e.name, e, None, 4096)[0] == want[0], e.name
            assert _optimizer_cost(e.name, e, 64, 4096)[0] == want[1], e.name
        else:
            assert _optimizer_cost(e.name, e, None, 4096)[0] == want, e.name
    # the name plays no part: an 'adafactor8bit'-named float32 AdamW costs what AdamW costs
    adamw = get_entry("adamw")
    assert _optimizer_cost("adafactor_4bit8bit", dataclasses.replace(adamw, name="adafactor_4bit8bit"), None, 4096)[0] == 0.0
    assert _optimizer_cost("x", dataclasses.replace(adamw, second_moment="factored", state_precision="4bit"), None, 4096) == (
        2.75, ["x: 4-bit states", "factored second moment"])
    assert _optimizer_cost("x", dataclasses.replace(adamw, second_moment="none"), None, 4096) == (1.5, ["no second moment"])
    with pytest.raises(ValueError, match="state_precision"):
        _optimizer_cost("x", dataclasses.replace(adamw, state_precision=None), None, 4096)


def test_register_rejects_unknown_metadata():
    with pytest.raises(ValueError, match="state_precision='16bit'"):
        register("never_registered", torch.optim.SGD, state_precision="16bit")
    with pytest.raises(ValueError, match="second_moment"):
        register("never_registered", torch.optim.SGD, second_moment="diagonal")
    assert "never_registered" not in list_optimizers()


# ---- Adafactor with an explicit learning rate, as the Trainer builds it ------------------------


@pytest.mark.parametrize("name", ["adafactor", "galore_adafactor"])
def test_adafactor_with_an_lr_turns_the_relative_step_off_like_the_trainer(name):
    from transformers import Trainer, TrainingArguments

    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    rank = {"rank": 4} if name == "galore_adafactor" else {}  # a rank that applies to the 16 x 16 weight
    opt = lowmem.create_optimizer(model, name, lr=1e-3, **rank)
    _, trainer_kwargs = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments("unused", optim="adafactor", learning_rate=1e-3,
                                                                               report_to=[]))
    for g in opt.param_groups:
        assert g["lr"] == trainer_kwargs["lr"] == 1e-3
        assert g["relative_step"] is trainer_kwargs["relative_step"] is False
        assert g["scale_parameter"] is trainer_kwargs["scale_parameter"] is False
    # an explicit relative_step is the user's: lr + relative_step=True is transformers' error, and
    # relative_step=False leaves scale_parameter at its default
    with pytest.raises(ValueError, match="relative_step"):
        lowmem.create_optimizer(model, name, lr=1e-3, relative_step=True, **rank)
    opt = lowmem.create_optimizer(model, name, lr=1e-3, relative_step=False, **rank)
    assert all(g["scale_parameter"] is True for g in opt.param_groups)
    opt = lowmem.create_optimizer(model, name, lr=1e-3, scale_parameter=True, **rank)
    assert all(g["scale_parameter"] is True and g["relative_step"] is False for g in opt.param_groups)
    opt = lowmem.create_optimizer(model, name, **rank)  # no lr: Adafactor's own relative step, as before
    assert all(g["relative_step"] is True and g["lr"] is None for g in opt.param_groups)


def test_adafactor_with_an_lr_steps_like_the_trainers_adafactor():
    from transformers.optimization import Adafactor as HFAdafactor

    torch.manual_seed(0)
    ours_model = nn.Linear(12, 6)
    theirs_model = nn.Linear(12, 6)
    theirs_model.load_state_dict(ours_model.state_dict())
    ours = lowmem.create_optimizer(ours_model, "adafactor", lr=1e-2)
    theirs = HFAdafactor(theirs_model.parameters(), lr=1e-2, scale_parameter=False, relative_step=False)  # the Trainer's
    x = torch.randn(8, 12)
    for _ in range(3):
        for m, o in ((ours_model, ours), (theirs_model, theirs)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_unknown_optimizer_names_the_close_matches():
    """A typo in an optimizer's name (lowmem bench, LowMemTrainingArguments(lowmem_optim=...),
    create_optimizer) names the close registered names before the list."""
    from lowmem.optim import get_entry

    with pytest.raises(ValueError, match=r"Unknown optimizer 'adamw8bitt' \(did you mean \['adamw8bit'"):
        get_entry("adamw8bitt")
    with pytest.raises(ValueError, match=r"Unknown optimizer 'zzzz'; valid: \["):
        get_entry("zzzz")


def test_dict_groups_without_the_target_key_stay_untargeted():
    """galore-torch's rule for groups given as dicts: when some group sets ``rank`` itself, a group without
    it is the full-rank one. ``create_optimizer`` gave it the default rank 128 instead: a (4, 16) bias-like
    group then failed with an error about a rank the user never set, and a wide one was projected."""
    import torch.nn as nn

    from lowmem.optim import create_optimizer

    proj, wide, narrow = (nn.Parameter(torch.randn(*s)) for s in ((256, 256), (256, 256), (4, 16)))
    opt = create_optimizer([{"params": [proj], "rank": 8}, {"params": [wide, narrow]}], "galore_adamw")
    assert opt.param_groups[0]["rank"] == 8 and opt.param_groups[1].get("rank") is None
    # a rank passed here is the default of every group without its own
    opt = create_optimizer([{"params": [proj], "rank": 8}, {"params": [wide]}], "galore_adamw", rank=16)
    assert [g["rank"] for g in opt.param_groups] == [8, 16]
    # no group sets it: each takes the default, as a flat list does
    opt = create_optimizer([{"params": [proj]}, {"params": [wide]}], "galore_adamw")
    assert [g["rank"] for g in opt.param_groups] == [128, 128]
