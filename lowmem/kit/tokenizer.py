"""A deterministic character-level tokenizer, built offline with the ``tokenizers`` library.

Every character of a fixed alphabet (digits, lowercase letters, space, ASCII punctuation) is one
token; anything else maps to ``<unk>``. The vocabulary is identical on every machine and every
run: special tokens first, then the alphabet in sorted order.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
ALPHABET = "".join(sorted(set(" " + string.digits + string.ascii_lowercase + string.punctuation)))


def build_tokenizer(model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """Build the character tokenizer (no files, no network).

    Encoding prepends ``<bos>`` (like Llama tokenizers); ``<eos>`` is appended by the data code
    where a sequence ends. Decoding concatenates characters (no spaces are inserted between
    tokens), so ``decode(encode(text), skip_special_tokens=True) == text`` for any text over the
    alphabet.

    Args:
        model_max_length (`int`, defaults to `128`): Stored on the tokenizer; matches the tiny
            model's ``max_position_embeddings``.
    """
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # join characters without separators
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # matched before pre-tokenization, never split
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        model_max_length=model_max_length, padding_side="right", clean_up_tokenization_spaces=False,
    )
