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
