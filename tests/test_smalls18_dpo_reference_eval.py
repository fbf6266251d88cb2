"""SMALLS18: lowmem's DPO trainer puts the reference model in eval mode (``trainers.trl.freeze_reference``). A reference
given in train mode (a ``copy.deepcopy`` of a policy built in memory) kept its dropout active; with TRL's
``disable_dropout=False`` its log-probabilities, the fixed target of DPO's loss, changed from call to call."""

import copy
import random
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_memory_trl_estimate import _digits  # noqa: E402


def test_dpo_reference_log_probs_are_deterministic_with_dropout_kept(tmp_path):
    from datasets import Dataset

    from lowmem.kit import build_tiny_model
    from lowmem.trainers import LowMemDPOConfig, LowMemDPOTrainer

    model, tok = build_tiny_model(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, attention_dropout=0.5)
    assert model.training  # (built in memory: train mode, dropout live)
    rng = random.Random(0)
    rows = [{"prompt": _digits(rng, 8), "chosen": _digits(rng, 12), "rejected": _digits(rng, 12)} for _ in range(2)]
    args = LowMemDPOConfig(output_dir=str(tmp_path), lowmem_optim="adafactor", per_device_train_batch_size=2,
                           max_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_dropout=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = LowMemDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                                   train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert trainer.model.config.attention_dropout == 0.5 and trainer.ref_model.config.attention_dropout == 0.5
    batch = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(0)
    first = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    torch.manual_seed(1)  # (another dropout draw, were dropout live)
    second = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), (first, second)
    assert not any(m.training for m in trainer.ref_model.modules())
    # the policy keeps its dropout (disable_dropout=False): two training-mode forwards differ
    trainer.model.train()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        a, b = trainer.model(**inputs).logits, trainer.model(**inputs).logits
    assert not torch.equal(a, b)
