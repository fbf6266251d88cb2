"""Offline tiny-model kit: a character tokenizer, a seeded tiny Llama, and synthetic tasks.

Everything here runs on a CPU without network access, so examples and tests need no downloads::

    from lowmem.kit import load_model_and_tokenizer, sft_dataset, tokenize_sft
    model, tok = load_model_and_tokenizer()          # the embedded tiny Llama
    train = tokenize_sft(sft_dataset(512), tok)      # "12+7=19" addition, with labels
"""

from .model import build_tiny_model, load_model_and_tokenizer, save_embedded_model, save_tiny_model, tiny_config
from .tasks import (
    addition_problems,
    preference_dataset,
    reward_dataset,
    reward_fn,
    score,
    sft_collator,
    sft_dataset,
    tokenize_sft,
)
from .tokenizer import ALPHABET, SPECIAL_TOKENS, build_tokenizer

__all__ = [
    "ALPHABET",
    "SPECIAL_TOKENS",
    "addition_problems",
    "build_tiny_model",
    "build_tokenizer",
    "load_model_and_tokenizer",
    "preference_dataset",
    "reward_dataset",
    "save_embedded_model",
    "reward_fn",
    "save_tiny_model",
    "score",
    "sft_collator",
    "sft_dataset",
    "tiny_config",
    "tokenize_sft",
]
