"""AUDQLORA19 2 (FIXMODELS19): transformers' Conv1D (GPT-2 family) stores its weight transposed, ``[in, out]``. The
rules that read a weight's rows as its output neurons (:data:`lowmem.optim.registry.ROW_COLUMN_RULES`: NorMuon's
per-neuron second moment, SCALE's per-output-unit normalization, Muon's ``adjust_lr_fn='original'`` ratio) are refused
on such weights by ``create_optimizer(model, ...)`` (and so by the Trainer integration, layerwise mode and ``lowmem
train``), naming the layers; every other rule gives the transposed update of the equivalent nn.Linear (measured here,
3 steps of one 8 -> 24 layer), racs and sinkgd nearly (their finite iterations start from one side).

Mutations: ``refuse_transposed_layouts`` a no-op -> the refusal tests red; ROW_COLUMN_RULES['muon'] applying whatever
adjust_lr_fn -> test_muon_default_ratio_runs_on_conv1d red."""

import warnings

import pytest
import torch
from torch import nn

import lowmem
from lowmem.optim.registry import ROW_COLUMN_RULES, conv1d_weights


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


REFUSED = [("normuon", {}), ("scale", {}), ("muon", {"adjust_lr_fn": "original"})]


@pytest.mark.parametrize("name, kw", REFUSED)
def test_row_rules_refuse_conv1d_weights(name, kw):
    with pytest.raises(ValueError, match=r"Conv1D.*fc \[8, 24\]") as err:
        _update(name, True, kw)
    assert f"'{name}'" in str(err.value)
    _update(name, False, kw)  # the nn.Linear twin steps


@pytest.mark.parametrize("name, kw", REFUSED)
def test_gpt2_refused_naming_its_layers(name, kw):
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel stores 4 targeted weight\(s\) transposed.*"
                                         r"transformer\.h\.0\.attn\.c_attn \[16, 48\]"):
        lowmem.create_optimizer(_gpt2(), name, lr=1e-3, **kw)


def test_layerwise_refuses_too():
    from lowmem.optim.layerwise import LayerwiseOptimizer

    with pytest.raises(ValueError, match="Conv1D"):
        LayerwiseOptimizer(_gpt2(), "normuon", lr=1e-3)


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


def test_every_refused_rule_is_asymmetric(monkeypatch):
    """The table's rules do differ on the transposed layout (not refused for nothing): the check bypassed, measured
    normuon 0.029 of 0.19, scale 0.19 of 0.57, muon original 0.099 of 0.29."""
    import lowmem.optim.registry as reg

    monkeypatch.setattr(reg, "refuse_transposed_layouts", lambda *a, **k: None)
    for name, kw in REFUSED:
        a, b = _update(name, True, kw), _update(name, False, kw)
        assert float((a - b).abs().max() / b.abs().max()) > 0.1, name
    assert set(ROW_COLUMN_RULES) == {n for n, _ in REFUSED}


def test_lowmem_train_refuses_before_the_model_loads(tmp_path, monkeypatch):
    """lowmem train on a GPT-2 directory with optim normuon: a ConfigError naming the layers, no weights loaded."""
    import io
    import json

    import transformers
    from rich.console import Console

    from lowmem.config import ConfigError
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

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    with warnings.catch_warnings(), pytest.raises(ConfigError, match=r"'normuon'.*c_attn \[16, 48\]"):
        warnings.simplefilter("ignore")
        run(TrainRecipe(model=str(tmp_path / "m"), dataset=str(tmp_path / "d.jsonl"), steps=1, lr=1e-3, batch_size=4,
                        optim="normuon", output_dir=str(tmp_path / "o"), track_memory=False, save_model=False),
            console=Console(file=io.StringIO()))
