"""TRL's fused LM head (SFT, GRPO, DPO, ... ``model(..., fused_lm_head=True)``) allocates its projection tile at a width
of 32768 columns whatever the vocabulary: a tiny GPT-2 (vocab ~400) trained by ``lowmem train`` reported 683-714 MiB
of activations at batch 16 x 256 where a plain forward and backward measures 177 MiB (510 MiB of them the tile).
LowMemOptimizerMixin sizes the tile to the vocabulary (``trainers.hf.fused_head_tiles``); results are unchanged."""

from __future__ import annotations

import contextlib
import json

import pytest

from lowmem.train import load_recipe, run


@pytest.fixture(scope="module")
def gpt2_long(bpe_model_dir, tmp_path_factory):
    """A GPT-2-style directory (Conv1D, 64 positions, tied embeddings, no pad token) and rows longer than its context."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    tok.pad_token = None
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    path = tmp_path_factory.mktemp("gpt2-fused")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    data = path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"{a}+{a}={2 * a}" for a in range(i, i + 40))}) + "\n"
                            for i in range(32)))
    return str(path), str(data), len(tok)


def _sft(model, data, out, batch_size=8):
    return run(load_recipe(None, model=model, dataset=data, optim="adamw", lr=1e-3, steps=2, batch_size=batch_size,
                           output_dir=str(out), save_model=False, training_args={"logging_steps": 1}))


def test_sft_fused_head_tile_is_sized_to_the_vocabulary(gpt2_long, tmp_path, monkeypatch):
    """Batch 8 x 64 (504 scored tokens): TRL's tile alone is 504 x 32768 x 4 B = 63 MiB; sized to the vocabulary
    (~400) it is 0.8 MiB, and the run's measured activations are below 16 MiB. Losses equal TRL's own tiling."""
    import lowmem.trainers.hf as hf

    model, data, vocab = gpt2_long
    fixed = _sft(model, data, tmp_path / "fixed")
    tokens = 8 * 63
    assert fixed["memory"]["activations"] < 16 * 2**20 < tokens * 32768 * 4
    monkeypatch.setattr(hf, "fused_head_tiles", lambda model: contextlib.nullcontext())
    trl_own = _sft(model, data, tmp_path / "trl")
    assert trl_own["memory"]["activations"] > tokens * 32768 * 4  # the reported number: TRL's full-width tile
    assert fixed["train_loss_history"] == trl_own["train_loss_history"] and fixed["final_loss"] == trl_own["final_loss"]


def test_fused_head_tiles_restores_trl_and_leaves_large_vocabularies():
    import trl.trainer.utils as trl_utils
    from transformers import GPT2Config

    import lowmem.trainers.hf as hf

    default = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE

    class M:
        config = GPT2Config(vocab_size=391)

    with hf.fused_head_tiles(M()):
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 391
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == default
    M.config = GPT2Config(vocab_size=50257)
    with hf.fused_head_tiles(M()):
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == default
