"""A tiny, seeded Llama that runs anywhere (CPU, offline), and a loader for local HF checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .tokenizer import build_tokenizer

# The embedded default: ~0.1M parameters, trains at hundreds of steps per second on one CPU core.
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def tiny_config(tokenizer: PreTrainedTokenizerBase | None = None, **overrides) -> LlamaConfig:
    """The tiny Llama's config; ``vocab_size`` and special-token ids follow ``tokenizer``.

    Args:
        tokenizer: Defaults to :func:`~lowmem.kit.tokenizer.build_tokenizer`.
        **overrides: Any ``LlamaConfig`` field (e.g. ``num_hidden_layers=4``).
    """
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    return LlamaConfig(
        **{**TINY_LLAMA, **overrides}, vocab_size=len(tok),
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )


def build_tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Build the tiny Llama and its tokenizer in memory; identical weights for identical ``seed``.

    The global RNG is left untouched (initialisation runs under ``torch.random.fork_rng``).
    """
    tok = build_tokenizer()
    config = tiny_config(tok, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(dtype), tok


def save_tiny_model(path: str | os.PathLike, seed: int = 0) -> str:
    """Write the tiny model and its tokenizer with ``save_pretrained``; return the directory.

    Anything that loads by path works offline on the result: ``AutoModelForCausalLM.from_pretrained``,
    ``AutoTokenizer.from_pretrained``, TRL trainers given a model name or a reference-model path.

    Nothing is written in place: the files go to ``PARENT/.lowmem-saving-<name>`` first and are renamed into
    ``path`` once all are written (:func:`lowmem.io.install_staged`, the weights last), so a save interrupted while
    writing leaves no half-written model in ``path`` (an earlier model there stays as it was; the next save removes
    the leftover staging folder). Files of ``path`` the model does not write are kept.
    """
    from lowmem.io import install_staged, staging_dir, weights_last

    model, tok = build_tiny_model(seed)
    out = Path(path)
    staging = staging_dir(out.parent, f"saving-{out.name}")
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    install_staged(staging, out, aside_stem=f".lowmem-previous-{out.name}", order=weights_last)
    return str(path)


def save_embedded_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: str | os.PathLike) -> str:
    """Save the embedded model (built in memory) as ``OUTPUT_DIR/base_model`` and return that absolute path.

    Trainers that need a model *path* (TRL reloads its reference model by name; 4-bit loading goes
    through ``from_pretrained``) get one that lives with the run's outputs: LoRA adapters saved by the
    run record it as ``base_model_name_or_path``, and nothing is left behind in a temporary folder.
    Only the main process writes (``accelerate``'s ``main_process_first``; the others wait and reuse it).
    The folder is written beside its final place and swapped in, so a reader never sees half a model,
    and an earlier run's base model (another seed) is replaced.
    """
    import shutil
    import tempfile

    from accelerate import PartialState

    dest = Path(output_dir).resolve() / "base_model"
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".base_model."))
            try:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                tmp.chmod(0o755)  # mkdtemp makes it 0700
                old = None
                if dest.exists():
                    old = dest.with_name(f".base_model.old.{os.getpid()}")
                    os.replace(dest, old)
                os.replace(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    return str(dest)


def load_model_and_tokenizer(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer without touching the network.

    Args:
        path (`str` or `None`, defaults to `None`): ``None`` builds the embedded tiny Llama in memory
            (weights from ``seed``); otherwise a local directory holding an HF causal-LM checkpoint
            and its tokenizer. Hub names are refused (nothing is ever downloaded).
        dtype (`torch.dtype` or `str`, defaults to `torch.float32`): Parameter dtype, e.g. ``"bfloat16"``.
        seed (`int`, defaults to `0`): Initialisation seed of the embedded model; ignored with ``path``.
        trust_remote_code (`bool`, defaults to `False`): Forwarded to ``from_pretrained``; only set it
            for checkpoints whose code you trust.

    A tokenizer without a pad token gets ``pad_token = eos_token``. A tokenizer that cannot train the model (no
    ``eos_token``, or special tokens beyond its embedding rows: a ``tokenizer.json`` saved with ``tokenizers``
    alone) is a ``ValueError`` naming the fix (:func:`lowmem.data.check_tokenizer_fits`), before the weights load.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if path is None:
        return build_tiny_model(seed, dtype)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a local directory (lowmem never downloads models)")
    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    from lowmem.data import check_tokenizer_fits

    check_tokenizer_fits(tok, str(path))  # an eos token, and no special token beyond the embedding: before the weights load
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    return model, tok
