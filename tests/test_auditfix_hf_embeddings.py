"""AUDITFIX (FOUND_AUDITNEW 6): the Hugging Face ``optim`` names that transformers' Trainer builds as a bitsandbytes
8-bit optimizer (``lion_8bit``, ``paged_lion_8bit``, ``adamw_bnb_8bit``, ``adamw_8bit``, ``paged_adamw_8bit``) keep
every ``nn.Embedding`` weight's optimizer state 32-bit there (``Trainer.create_optimizer``:
``GlobalOptimManager.register_module_override(module, "weight", {"optim_bits": 32})``). Under lowmem the same names
give the same run (``LowMemArguments.lowmem_embeddings_32bit``, on by default for them); lowmem's own names
(``lion8bit``, ``bnb_adamw8bit``) keep quantizing the embeddings, as documented.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

HF_8BIT = ["lion_8bit", "paged_lion_8bit", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit"]


@pytest.fixture(autouse=True)
def _fresh_bnb_overrides():
    """bitsandbytes' GlobalOptimManager is process-wide: the embedding overrides a run registers (transformers' and
    lowmem's alike) would otherwise reach later tests' optimizers (its ``pid2config`` is keyed by ``id(param)``)."""
    yield
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    bnb.optim.GlobalOptimManager.get_instance().initialize()


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(80, 64)  # 5,120 elements: quantized unless kept 32-bit
        self.proj = nn.Linear(64, 80)
        self.norm = nn.LayerNorm(64)

    def get_input_embeddings(self):
        return self.embed


def _args(**kw):
    from lowmem.trainers import LowMemTrainingArguments

    return LowMemTrainingArguments(output_dir="unused", report_to=[], use_cpu=True, **kw)


def test_the_setting_follows_the_name():
    """``lowmem_embeddings_32bit`` defaults to True for the five HF names (also when ``optim`` names one meaning the
    same optimizer), False for lowmem's names and the HF names transformers builds otherwise (``lion_32bit``,
    ``adamw_torch_8bit``: torchao's, no override there)."""
    from lowmem.train import hf_keeps_embeddings_32bit

    assert [n for n in HF_8BIT + ["lion8bit", "bnb_adamw8bit", "lion_32bit", "adamw_torch_8bit", "lion_8bit_layerwise"]
            if hf_keeps_embeddings_32bit(n)] == HF_8BIT
    for name in ("lion_8bit", "paged_adamw_8bit"):
        assert _args(lowmem_optim=name).lowmem_embeddings_32bit is True, name
    for name in ("lion8bit", "bnb_adamw8bit", "adamw_torch_8bit"):
        assert _args(lowmem_optim=name).lowmem_embeddings_32bit is False, name
    assert _args(optim="lion_8bit", lowmem_optim="lion8bit").lowmem_embeddings_32bit is True
    assert _args(lowmem_optim="lion_8bit", lowmem_embeddings_32bit=False).lowmem_embeddings_32bit is False
    assert _args(lowmem_optim="lion8bit", lowmem_embeddings_32bit=True).lowmem_embeddings_32bit is True


@pytest.mark.parametrize("kw, says", [
    (dict(lowmem_optim="adamw", lowmem_embeddings_32bit=True), "expected an 8-bit optimizer"),
    (dict(lowmem_embeddings_32bit=True), "requires lowmem_optim"),
    (dict(lowmem_optim="lion8bit", lowmem_layerwise=True, lowmem_embeddings_32bit=True), "layerwise"),
    (dict(lowmem_optim="lion8bit", lowmem_embeddings_32bit="yes"), "expected True, False or None"),
], ids=["not-8bit", "no-optim", "layerwise", "not-bool"])
def test_a_setting_that_cannot_apply_is_refused(kw, says):
    with pytest.raises(ValueError, match="lowmem_embeddings_32bit") as e:
        _args(**kw)
    assert says in str(e.value)


def test_lion8bit_groups_keep_the_embedding_float32_and_nothing_else_changes():
    """The engine's ``lion8bit``: the embedding in a group of its own (its decay group's settings) with
    ``min_quant_size`` above its size: its moment float32 after a step; the Linear weight (5,120 elements) still
    8-bit; the other groups as ``create_optimizer`` builds them; ``state_bytes()`` the layout's sum."""
    import lowmem
    from lowmem.trainers.hf import create_optimizer_embeddings_32bit

    model = TinyLM()
    opt = create_optimizer_embeddings_32bit(model, "lion8bit", lr=1e-3, weight_decay=0.1)
    ref = lowmem.create_optimizer(TinyLM(), "lion8bit", lr=1e-3, weight_decay=0.1)
    assert len(opt.param_groups) == len(ref.param_groups) + 1
    emb_group = [g for g in opt.param_groups if any(p is model.embed.weight for p in g["params"])]
    assert len(emb_group) == 1 and emb_group[0]["params"] == [model.embed.weight]
    assert emb_group[0]["min_quant_size"] == 5121 and emb_group[0]["weight_decay"] == 0.1
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[model.embed.weight]["exp_avg"].dtype == torch.float32
    assert opt.state[model.proj.weight]["exp_avg"].dtype == torch.uint8
    assert opt.state_bytes() == sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())


def test_an_optimizer_without_8bit_state_is_refused():
    from lowmem.trainers.hf import create_optimizer_embeddings_32bit

    with pytest.raises(ValueError, match="'adamw' cannot keep the embeddings' state 32-bit"):
        create_optimizer_embeddings_32bit(TinyLM(), "adamw")


def test_lowmem_train_passes_the_setting(tmp_path):
    """``lowmem train --optim lion_8bit`` (or ``training_args: {optim: adamw_8bit}``) builds its arguments with
    ``lowmem_embeddings_32bit=True``; ``--optim lion8bit`` without."""
    from lowmem.train import build_training_args, load_recipe

    def built(**kw):
        return build_training_args(load_recipe(None, output_dir=str(tmp_path / "out"), **kw)).lowmem_embeddings_32bit

    assert built(optim="lion_8bit") is True
    if torch.cuda.is_available():  # (on the CPU a paged optimizer is refused with the recipe: SILENT 27)
        assert built(optim="paged_adamw_8bit") is True
    assert built(optim="lion8bit") is False
    assert built(training_args={"optim": "adamw_8bit"}) is True


def _run(label, optim, tmp_path, how="lowmem"):
    from transformers import Trainer, TrainingArguments

    from lowmem.kit import build_tiny_model
    from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments, optimizer_cls_and_kwargs

    import bitsandbytes as bnb

    bnb.optim.GlobalOptimManager.get_instance().initialize()  # (the overrides are process-wide)
    model, _ = build_tiny_model(seed=0)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in (torch.randint(0, vocab, (16,), generator=g)
                                                                   for _ in range(12))]
    common = dict(per_device_train_batch_size=4, max_steps=3, learning_rate=3e-3, weight_decay=0.1, adam_beta2=0.95,
                  lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=1.0, report_to=[], save_strategy="no",
                  use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if label == "hf":
            args = TrainingArguments(output_dir=str(tmp_path / label), optim=optim, **common)
            trainer = Trainer(model=model, args=args, train_dataset=data)
        elif how == "plain":  # transformers' Trainer with lowmem's optimizer_cls_and_kwargs
            args = TrainingArguments(output_dir=str(tmp_path / label), **common)
            trainer = Trainer(model=model, args=args, train_dataset=data,
                              optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, optim, args=args))
        else:
            args = LowMemTrainingArguments(output_dir=str(tmp_path / label), lowmem_optim=optim, **common)
            trainer = LowMemTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
    return model, getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def _tensor_state(opt, p):
    return {k: t for k, t in opt.state[p].items() if isinstance(t, torch.Tensor) and t.numel() > 1}


@pytest.mark.slow  # two Trainer runs per case, 2-3 s
@pytest.mark.parametrize("optim, how", [("adamw_bnb_8bit", "lowmem"), ("adamw_8bit", "lowmem"),
                                        pytest.param("paged_adamw_8bit", "lowmem", marks=pytest.mark.cuda),
                                        ("lion_8bit", "plain"),  # (paged: CPU parameters refused, SILENT 27)
                                        pytest.param("paged_lion_8bit", "plain", marks=pytest.mark.cuda)])
def test_hf_8bit_names_equal_what_the_hf_trainer_builds(optim, how, tmp_path):
    """``Trainer(optim=<name>)`` and ``LowMemTrainer(lowmem_optim=<name>)`` (or a plain Trainer with
    ``optimizer_cls_and_kwargs(model, <name>)``) on the tiny Llama, 3 steps with decay, warm-up and clipping: the
    embedding's state is float32 in both and every weight is equal bit for bit (0.0 measured; before: the embedding
    quantized, 1,187 of its weights differing after 3 steps for lion_8bit)."""
    hf_model, hf_opt = _run("hf", optim, tmp_path)
    lm_model, lm_opt = _run("lowmem", optim, tmp_path, how=how)
    emb = lm_model.get_input_embeddings().weight
    assert all(t.dtype == torch.float32 for t in _tensor_state(lm_opt, emb).values())
    assert any(t.dtype == torch.uint8 for s in lm_opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))  # the rest is still 8-bit
    for (n, a), b in zip(hf_model.named_parameters(), lm_model.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.slow  # one Trainer run, ~1.5 s
def test_lowmem_names_keep_quantizing_the_embedding(tmp_path):
    """lowmem's own ``lion8bit`` keeps its documented layout: every tensor of >= 4096 elements 8-bit, the tiny Llama's
    embedding (4,672) included."""
    model, opt = _run("lowmem", "lion8bit", tmp_path)
    assert opt.state[model.get_input_embeddings().weight]["exp_avg"].dtype == torch.uint8
