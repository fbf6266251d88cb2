"""GVPO on a user's Mixture-of-Experts model: TRL 1.16's GRPO adds the router's load-balancing loss
(``router_aux_loss_coef`` times the model's ``aux_loss``) whenever the model's config has ``output_router_logits``
(Mixtral, Qwen2-MoE, Qwen3-MoE: the architecture's own coefficient, 0.001 for Mixtral, unless GRPOConfig sets one);
BNPO keeps TRL's loss and so has it. GVPO replaces the loss, and before this fix left it out silently: its experts'
routing drifted unbalanced under GVPO only."""

import pytest
import torch
from datasets import Dataset

from lowmem.trainers import GVPOConfig, GVPOTrainer


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    from lowmem.kit import build_tokenizer

    tok = build_tokenizer()
    cfg = MixtralConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, router_aux_loss_coef=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MixtralForCausalLM(cfg)
    path = tmp_path_factory.mktemp("moe")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _lengths(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize("coef", [None, 0.0])
def test_gvpo_adds_the_router_load_balancing_loss(moe_dir, tmp_path, coef):
    """``None``: the model's own 0.5 applies, and the logged loss is GVPO's plus 0.5 x aux_loss; 0.0 turns it off."""
    args = GVPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=3,
                      max_steps=1, logging_steps=1, learning_rate=1e-3, report_to="none", bf16=False, use_cpu=True,
                      router_aux_loss_coef=coef, save_strategy="no")
    prompts = Dataset.from_list([{"prompt": f"{a}+1="} for a in range(4)])
    trainer = GVPOTrainer(model=moe_dir, reward_funcs=_lengths, args=args, train_dataset=prompts)
    trainer.train()
    log = trainer.state.log_history[0]
    if coef is None:
        assert log["aux_loss"] > 0
        assert log["loss"] == pytest.approx(log["gvpo/loss"] + 0.5 * log["aux_loss"], rel=1e-4)
    else:
        assert "aux_loss" not in log and log["loss"] == pytest.approx(log["gvpo/loss"], rel=1e-4)
