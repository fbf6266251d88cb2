"""A user's model of another architecture whose tokenizer is a ``tokenizer.json`` saved with the ``tokenizers``
library alone (no ``tokenizer_config.json``): transformers then gives the tokenizer no special tokens
(``TokenizersBackend``: Mistral, Phi-3) or adds its class defaults as new tokens beyond the model's embedding
(Gemma2's ``<bos>/<eos>/<pad>/<mask>``, GPT-NeoX's ``<|padding|>``). Before: TRL's DPO failed with "The specified
`pad_token` ('None') is not found", GRPO/BNPO with ``TypeError: full() ... NoneType``, and the others with
``IndexError: index out of range in self`` mid-training. Now one error before training, naming the fix."""

import json

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lowmem.data import check_tokenizer_fits

VOCAB = 300
SPECIAL = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # <|endoftext|> is id 1, the config's eos


@pytest.fixture(scope="module")
def bpe():
    corpus = [f"{a}+{b}={a + b}" for a in range(40) for b in range(0, 40, 3)] + ["the sum of two numbers"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _config(arch):
    small = dict(vocab_size=VOCAB, eos_token_id=1, bos_token_id=1, pad_token_id=None)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, **small)
    cls = {"gemma2": transformers.Gemma2Config, "gpt_neox": transformers.GPTNeoXConfig,
           "mistral": transformers.MistralConfig, "phi3": transformers.Phi3Config, "qwen2": transformers.Qwen2Config}[arch]
    return cls(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **small)


def _model_dir(tmp_path, bpe, arch, weights=False):
    """config.json (+ weights) written by save_pretrained, tokenizer.json by ``tokenizers`` alone."""
    path = tmp_path / arch
    if weights:
        transformers.AutoModelForCausalLM.from_config(_config(arch)).save_pretrained(path)
    else:
        _config(arch).save_pretrained(path)
    bpe.save(str(path / "tokenizer.json"))
    return str(path)


def _loaded(path):
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:  # as lowmem's loaders do
        tok.pad_token = tok.eos_token
    return tok


@pytest.mark.parametrize("arch, tokens", [
    ("gemma2", r"bos_token '<bos>' \(id 300\), eos_token '<eos>' \(id 301\), pad_token '<pad>' \(id 302\)"),
    ("gpt_neox", r"pad_token '<\|padding\|>' \(id 300\)"),
])
def test_special_tokens_beyond_the_embedding(tmp_path, bpe, arch, tokens):
    path = _model_dir(tmp_path, bpe, arch)
    with pytest.raises(ValueError, match=rf"model='{path}': its tokenizer \(\w+Tokenizer, 30\d tokens\) has special tokens "
                                         rf"beyond the model's 300 embedding rows .*: {tokens}.*IndexError"):
        check_tokenizer_fits(_loaded(path), path)


@pytest.mark.parametrize("arch", ["mistral", "phi3"])
def test_no_eos_token(tmp_path, bpe, arch):
    path = _model_dir(tmp_path, bpe, arch)
    with pytest.raises(ValueError, match=r"its tokenizer \(TokenizersBackend\) has no eos_token .* "
                                         r"eos_token='<\|endoftext\|>'\)\.save_pretrained.*config.json's eos_token_id 1"):
        check_tokenizer_fits(_loaded(path), path)


@pytest.mark.parametrize("arch", ["gemma2", "gpt_neox", "mistral", "phi3"])
def test_the_fix_the_error_gives_works(tmp_path, bpe, arch):
    """The error's own line, run: the tokenizer then has the vocabulary's eos (pad = eos) and no token beyond."""
    path = _model_dir(tmp_path, bpe, arch)
    transformers.PreTrainedTokenizerFast(tokenizer_file=f"{path}/tokenizer.json",
                                         eos_token="<|endoftext|>").save_pretrained(path)
    tok = _loaded(path)
    check_tokenizer_fits(tok, path)
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (1, 1, VOCAB)


@pytest.mark.parametrize("arch, match", [("mistral", "has no eos_token"), ("gemma2", "beyond the model's 300 embedding rows")])
def test_python_api_loader_refuses_the_tokenizer(tmp_path, bpe, arch, match):
    """lowmem.kit.load_model_and_tokenizer (the Python API) checks what lowmem train checks (it returned pad None
    or out-of-range special tokens silently), and the fixed tokenizer then loads with its model."""
    from lowmem.kit import load_model_and_tokenizer

    path = _model_dir(tmp_path, bpe, arch, weights=True)
    with pytest.raises(ValueError, match=match):
        load_model_and_tokenizer(path)
    transformers.PreTrainedTokenizerFast(tokenizer_file=f"{path}/tokenizer.json",
                                         eos_token="<|endoftext|>").save_pretrained(path)
    model, tok = load_model_and_tokenizer(path)
    assert (tok.eos_token_id, tok.pad_token_id, model.config.vocab_size) == (1, 1, VOCAB)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_class_defaults_inside_the_vocabulary_pass(tmp_path, bpe, arch):
    """Qwen2's and GPT-2's tokenizer classes default to <|endoftext|>, which the vocabulary has."""
    path = _model_dir(tmp_path, bpe, arch)
    tok = _loaded(path)
    check_tokenizer_fits(tok, path)
    assert tok.eos_token == "<|endoftext|>" and len(tok) == VOCAB


def test_lowmem_train_stops_before_training(tmp_path, bpe, capsys):
    """Through the CLI, DPO (TRL loads the model itself: only the tokenizer is loaded here)."""
    from lowmem.cli import main

    path = _model_dir(tmp_path, bpe, "phi3", weights=True)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    assert main(["train", "--trainer", "dpo", "--model", path, "--dataset", str(data), "--lr", "1e-4", "--steps", "1",
                 "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "has no eos_token" in err and "pad_token' ('None')" not in err
    assert not (tmp_path / "out" / "metrics.json").exists()
