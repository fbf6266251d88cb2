"""Resume audit through TRL's trainers (lowmem.trainers): checkpoint inside a schedule window, resumed, compared
bit for bit (``torch.equal``) with the uninterrupted run: every trainable weight and every optimizer state tensor.
tests/test_trl_trainers.py resumes each trainer with Adafactor (no schedule, no layerwise); here the state that
carries a position: BAdam's block inside DPO, and SFT in layerwise mode with gradient accumulation (APOLLO's random basis)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from trl_helpers import inner_optimizer, make_trainer  # noqa: E402

CASES = {
    # DPO with BAdam: the block switches every 2 steps, the checkpoint (step 3) is 1 step into the second block
    "dpo-badam": ("dpo", dict(optim="badam", lowmem_optim_args={"switch_every": 2, "freeze_inactive": True})),
    # SFT, layerwise, accumulation 2, APOLLO's random basis refreshed every 2 steps
    "sft-layerwise-apollo": ("sft", dict(optim="apollo_adamw", lowmem_optim_args={"rank": 8, "update_proj_gap": 2},
                                         lowmem_layerwise=True, gradient_accumulation_steps=2, per_device_train_batch_size=4)),
}


def _state(trainer):
    sd = inner_optimizer(trainer).state_dict()
    return {(i, k): v for i, st in sd["state"].items() for k, v in st.items()}


@pytest.mark.slow  # ~4 s each (TRL trainers build datasets and tokenizers)
@pytest.mark.parametrize("case", list(CASES))
def test_trl_resume_inside_the_window_is_bit_exact(case, tiny_model_path, tmp_path):
    kind, kw = CASES[case]
    full = make_trainer(kind, tiny_model_path, str(tmp_path / "full"), 5, save_strategy="steps", save_steps=3, **kw)
    full.train()
    resumed = make_trainer(kind, tiny_model_path, str(tmp_path / "resumed"), 5, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.state.global_step == 5
    # every weight (BAdam freezes the inactive blocks: requires_grad alone would compare the active one only)
    a, b = (dict(t.model.named_parameters()) for t in (full, resumed))
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"{case}: {n} max |d| = {(a[n] - b[n]).abs().max().item():.3g}"
    sa, sb = _state(full), _state(resumed)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
