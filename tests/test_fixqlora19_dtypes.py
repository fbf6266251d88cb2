"""FIXQLORA19 (AUDQLORA19 3 / 4): with ``quantization``, TRL's SFT / DPO / GRPO trainers cast the trainable adapters of
a quantized model to bfloat16 in their ``__init__``; lowmem gives them back the dtype ``load_quantized_model`` made
(float32: peft's ``autocast_adapter_dtype``), bit for bit (lowmem.quant.trainable_dtypes_kept)."""

import io
import json
import warnings

import pytest
import torch
from torch import nn

QLORA = dict(quantization="nf4", lora={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})


def _train(**fields):
    from rich.console import Console

    from lowmem.train import TrainRecipe, run

    base = dict(lr=1e-2, batch_size=4, logging_steps=1, track_memory=False, save_model=True, optim="adamw", steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(TrainRecipe(**{**base, **fields}), console=Console(file=io.StringIO(), width=200))


def test_trainable_dtypes_kept_restores_the_original_tensors():
    """The block casts a trainable weight to bfloat16 (as TRL does): afterwards the parameter holds its original
    float32 values bit for bit (not a bfloat16 round trip); frozen parameters and the Parameter objects are untouched."""
    from lowmem.quant import trainable_dtypes_kept

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    m[1].requires_grad_(False)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    params = list(m.parameters())
    with trainable_dtypes_kept(m):
        for p in m.parameters():
            p.data = p.data.to(torch.bfloat16)
    assert list(m.parameters()) == params
    for n, p in m.named_parameters():
        if n.startswith("0."):
            assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
        else:  # frozen: not the block's business
            assert p.dtype == torch.bfloat16, n
    with trainable_dtypes_kept(None):  # TRL loads the model itself: nothing to keep
        pass


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a}+{a + 3}="}, {"role": "assistant", "content": str(2 * a + 3)}]}
            for a in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("trainer", ["sft", "dpo", "grpo"])
def test_qlora_adapters_keep_float32_through_trl(tmp_path, own_model_dir, chat_file, trainer, monkeypatch):
    """SFT (TRL's SFTTrainer: a dataset), DPO and GRPO (the synthetic tasks): the trainer's adapters are float32 when
    training starts and the saved adapters are float32 (before the fix: bfloat16, TRL's QLoRA cast)."""
    from safetensors.torch import load_file

    from lowmem import train as train_mod

    seen = {}
    real_train = train_mod._train

    def spy(trainer_, recipe):
        seen["dtypes"] = {str(p.dtype) for p in trainer_.model.parameters() if p.requires_grad}
        return real_train(trainer_, recipe)

    monkeypatch.setattr(train_mod, "_train", spy)
    extra = {"sft": dict(dataset=chat_file), "dpo": {},
             "grpo": dict(training_args={"num_generations": 4, "max_completion_length": 6})}[trainer]
    _train(model=own_model_dir, trainer=trainer, output_dir=str(tmp_path / "out"), **extra, **QLORA)
    assert seen["dtypes"] == {"torch.float32"}
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {str(v.dtype) for v in saved.values()} == {"torch.float32"}
