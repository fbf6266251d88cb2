"""SMALLS20 1 (AUDQLORA19 8): a quantization that quantizes no layer is an error before training.

transformers' bitsandbytes loading replaces only layers whose type is exactly ``nn.Linear`` (``replace_with_bnb_linear``);
Falcon's linear layers are ``FalconLinear`` subclasses, so ``quantization: nf4`` / ``int8`` loaded a full-precision
base and trained LoRA on it, recorded as quantized, without a word."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def falcon_dir(tmp_path_factory):
    """A tiny Falcon (hidden 32, 1 layer: FalconLinear layers) with the kit's tokenizer."""
    import transformers

    from lowmem.kit import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = CHAT
    cfg = transformers.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=len(tok),
                                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.FalconForCausalLM(cfg)
    path = tmp_path_factory.mktemp("falcon")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a}+1="}, {"role": "assistant", "content": str(a + 1)}]}
            for a in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_lowmem_train_refuses_a_quantization_that_quantizes_nothing(tmp_path, capsys, falcon_dir, chat_file, quant):
    from lowmem.cli import main

    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["train", "--model", falcon_dir, "--dataset", chat_file, "--quantization", quant, "--steps", "1",
                   "--batch-size", "2", "--lr", "1e-3", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lowmem: error: "), err
    for word in (f"quantization={quant!r}", "quantized no layer", "'falcon'", "FalconLinear"):
        assert word in line, (word, line)
    assert not (out / "metrics.json").exists() and not list(out.glob("checkpoint-*"))  # nothing trained


def test_check_names_a_model_with_only_an_output_head():
    from lowmem.quant import check_some_layer_quantized

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"quantization='fp4' quantized no layer of this 'Head' model.*no nn.Linear "
                                         r"layer transformers quantizes"):
        check_some_layer_quantized(Head(), "fp4")


def test_a_quantized_model_passes_the_check(own_model_dir):
    from lowmem.quant import load_quantized_model, quantized_modules

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = load_quantized_model(own_model_dir, "nf4", lora={"r": 2, "target_modules": "all-linear"}, dtype="float32")
    assert len(quantized_modules(m)) > 0
