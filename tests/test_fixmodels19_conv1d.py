"""AUDQLORA19 2 (FIXMODELS19): transformers' Conv1D (GPT-2 family) stores its weight transposed, ``[in, out]``. The
rules that read a weight's rows as its output neurons (:data:`lowmem.optim.registry.LAYOUT_AWARE`: NorMuon's
per-neuron second moment, SCALE's per-output-unit normalization, Muon's ``adjust_lr_fn='original'`` ratio) were
refused on such weights from FIXMODELS19 to LEFT21 1; since then ``create_optimizer(model, ...)`` (and so the Trainer
integration, layerwise mode and ``lowmem train``) puts them in a group with ``weight_layout='in_out'`` that those rules
read (tests/test_conv1d_layout21.py). Every other rule gives the transposed update of the equivalent nn.Linear
(measured here, 3 steps of one 8 -> 24 layer), racs and sinkgd nearly (their finite iterations start from one side).

Mutations: see tests/test_conv1d_layout21.py and the LEFT21 1 commit."""

import warnings

import pytest
import torch
from torch import nn

import lowmem
from lowmem.optim.registry import LAYOUT_AWARE as LAYOUT_AWARE_NAMES, conv1d_weights


class _OneLayer(nn.Module):
    """Embedding -> one 8 -> 24 projection (nn.Linear [24, 8] or transformers' Conv1D [8, 24]) -> head."""

    def __init__(self, conv):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = Conv1D(24, 8) if conv else nn.Linear(8, 24, bias=False)
        if conv:
            self.fc.bias.requires_grad_(False)
        self.head = nn.Linear(24, 10, bias=False)

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.head


def _update(name, conv, kw, steps=3):
    torch.manual_seed(0)
    w, gs = torch.randn(24, 8), [torch.randn(24, 8) for _ in range(steps)]
    m = _OneLayer(conv)
    with torch.no_grad():
        m.fc.weight.copy_(w.t() if conv else w)
    opt = lowmem.create_optimizer(m, name, lr=0.1, **kw)
    for g in gs:
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        m.fc.weight.grad = (g.t() if conv else g).clone()
        opt.step()
    d = m.fc.weight.detach() - (w.t() if conv else w)
    return d.t() if conv else d


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2))


LAYOUT_AWARE = [("normuon", {}), ("scale", {}), ("muon", {"adjust_lr_fn": "original"})]


@pytest.mark.parametrize("name, kw", LAYOUT_AWARE)
def test_layout_aware_rules_give_the_transposed_update(name, kw):
    """Refused on Conv1D weights until LEFT21 1; now their group's weight_layout='in_out' makes them read the columns
    as the output side (tests/test_conv1d_layout21.py: bit for bit, scale's float32 to rounding)."""
    a, b = _update(name, True, kw), _update(name, False, kw)
    assert (a - b).abs().max() <= 1e-6 * max(1.0, b.abs().max())
    assert set(LAYOUT_AWARE_NAMES) == {n for n, _ in LAYOUT_AWARE}


@pytest.mark.parametrize("name, kw", LAYOUT_AWARE)
def test_gpt2_conv1d_weights_get_their_own_group(name, kw):
    opt = lowmem.create_optimizer(_gpt2(), name, lr=1e-3, **kw)
    groups = [g for g in opt.param_groups if g.get("weight_layout") == "in_out"]
    assert len(groups) == 1 and len(groups[0]["params"]) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj


def test_layerwise_takes_the_layout_too():
    from lowmem.optim.layerwise import LayerwiseOptimizer

    opt = LayerwiseOptimizer(_gpt2(), "normuon", lr=1e-3)
    assert any(g.get("weight_layout") == "in_out" for g in opt.inner.param_groups)


def test_muon_default_ratio_runs_on_conv1d():
    lowmem.create_optimizer(_gpt2(), "muon", lr=1e-3)


def test_lora_on_gpt2_is_not_refused():
    """peft's LoRA factors on a Conv1D layer are nn.Linear ([r, in], [out, r]): NorMuon reads them right."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    assert not any(id(p) in conv1d_weights(pm) for p in pm.parameters() if p.requires_grad)
    lowmem.create_optimizer(pm, "normuon", lr=1e-3)


@pytest.mark.parametrize("name, kw", [("muon", {}), ("galore_adamw", {"rank": 2}), ("apollo_adamw", {"rank": 2}),
                                      ("fira_adamw", {"rank": 2}), ("adafactor", {}), ("came", {}), ("adam_mini", {}),
                                      ("adamw", {}), ("sm3", {}), ("adamw_snsm", {"rank": 2})])
def test_symmetric_rules_give_the_transposed_update(name, kw):
    """Measured 3 steps: equal to float rounding (max diff <= 1.8e-6 on steps of 0.09 .. 9)."""
    a, b = _update(name, True, kw), _update(name, False, kw)
    assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max())


@pytest.mark.parametrize("name, bound", [("racs", 0.03), ("sinkgd", 3e-3)])
def test_nearly_symmetric_rules(name, bound):
    """racs: Eq. 16's fixed point is symmetric, its 5 iterations start from the rows (measured 0.0044 of 0.26);
    sinkgd: the Sinkhorn normalizations alternate rows then columns (2.9e-5 of 0.028). Not refused."""
    a, b = _update(name, True, {}), _update(name, False, {})
    rel = float((a - b).abs().max() / b.abs().max())
    assert 0 < rel < bound


def test_lowmem_train_trains_gpt2_with_normuon(tmp_path):
    """lowmem train on a GPT-2 directory with optim normuon (refused before the model loaded until LEFT21 1): two
    steps, the 4 Conv1D weights in the in_out group."""
    import io
    import json

    import transformers
    from rich.console import Console

    from lowmem.kit import build_tokenizer
    from lowmem.train import TrainRecipe, run

    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1,
                                                             n_head=2)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"{a}+1={a + 1}"}) + "\n" for a in range(8)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run(TrainRecipe(model=str(tmp_path / "m"), dataset=str(tmp_path / "d.jsonl"), steps=2, lr=1e-3,
                                 batch_size=4, optim="normuon", output_dir=str(tmp_path / "o"), track_memory=False,
                                 save_model=False), console=Console(file=io.StringIO()))
    assert result["steps"] == 2
    assert [g["num_tensors"] for g in result["effective_hparams"] if g.get("weight_layout") == "in_out"] == [4]
