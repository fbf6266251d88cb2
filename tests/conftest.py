"""Shared fixtures. Everything runs offline: the Hub is disabled for the whole session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """Directory holding the tiny Llama (seed 0) and its tokenizer, written with save_pretrained."""
    from lowmem.kit import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tokenizer():
    from lowmem.kit import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def tiny_model():
    """A fresh tiny Llama (seed 0) and its tokenizer, built in memory."""
    from lowmem.kit import build_tiny_model

    return build_tiny_model(seed=0)


def pytest_collection_modifyitems(config, items):
    """``slow`` tests run with LOWMEM_SLOW=1 or when selected with ``-m slow``; ``cuda`` tests skip
    cleanly without a GPU."""
    import torch

    run_slow = os.environ.get("LOWMEM_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    skip_slow = pytest.mark.skip(reason="slow: set LOWMEM_SLOW=1 or select with -m slow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


# A chat template over the kit's character alphabet (no newlines): "u:12+7=|a:19<eos>|".
# Each assistant turn ends with eos, and the generation prompt is exactly the prefix "a:" that
# an assistant turn starts with (TRL checks prompt-completion prefixes).
OWN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}|{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


@pytest.fixture(scope="session")
def own_model_dir(tmp_path_factory):
    """A user's model directory, written offline: the tiny Llama (seed 0, transformers' LlamaConfig) and
    the kit's character tokenizer (built with ``tokenizers``) carrying a Jinja chat template."""
    from lowmem.kit import build_tiny_model

    model, tok = build_tiny_model(seed=0)
    tok.chat_template = OWN_CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("own-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
