"""OWNFIXB (session 18): lowmem.train.alias_num_experts, the name TRL's SFT router aux loss reads (AUDIT-OWNDATA18 5)."""

from __future__ import annotations

import pickle

import pytest
import torch


def _phimoe_config():
    import transformers

    return transformers.PhimoeConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, vocab_size=64,
                                     max_position_embeddings=64)


def test_phimoe_config_gets_num_experts_and_saves_as_before(tmp_path):
    import transformers

    from lowmem.train import alias_num_experts

    cfg = _phimoe_config()
    assert not hasattr(cfg, "num_experts")  # the upstream gap (trl reads text_config.num_experts)
    before = cfg.to_json_string(use_diff=False)
    alias_num_experts(cfg)
    assert cfg.num_experts == 4 and isinstance(cfg, transformers.PhimoeConfig) and cfg.model_type == "phimoe"
    assert cfg.to_json_string(use_diff=False) == before  # config.json unchanged: nothing added to the instance
    cfg.save_pretrained(tmp_path)
    assert "num_experts\"" not in (tmp_path / "config.json").read_text()
    back = pickle.loads(pickle.dumps(cfg))  # (a dataloader worker / deepcopy path): the aliased class survives
    assert back.num_experts == 4 and back.to_json_string(use_diff=False) == before
    mixtral = transformers.MixtralConfig(num_local_experts=4)
    assert alias_num_experts(mixtral).__class__ is transformers.MixtralConfig  # has the name: left alone


def test_the_aux_loss_trl_computes_is_the_models_own():
    """TRL's SFT loss: load_balancing_loss_func(router_logits, text_config.num_experts, num_experts_per_tok, mask);
    with the alias it equals PhimoeForCausalLM's own aux_loss (which reads num_local_experts)."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from lowmem.train import alias_num_experts

    torch.manual_seed(0)
    cfg = _phimoe_config()
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 64, (2, 7))
    out = model(ids, output_router_logits=True)
    text = alias_num_experts(model.config.get_text_config())
    trl_aux = load_balancing_loss_func(out.router_logits, text.num_experts, text.num_experts_per_tok, None)
    assert out.aux_loss is not None and torch.equal(trl_aux, out.aux_loss)


@pytest.mark.slow
def test_dpo_on_a_phimoe_model_trains(tmp_path):
    """TRL's DPO (and GRPO) add the same fused forward with the router aux loss, on a model TRL loads by path: lowmem
    aliases the loaded model's config after the trainer is built (lowmem.train._run_trl)."""
    import json

    from lowmem.train import load_recipe, run

    from tests.test_audit18_owndata import _tiny_phimoe

    model = _tiny_phimoe(tmp_path / "phimoe")
    data = tmp_path / "pref.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)}) + "\n"
                            for i in range(8)))
    recipe = load_recipe(None, trainer="dpo", model=model, dataset=str(data), optim="adamw", lr=1e-3, steps=1,
                         batch_size=4, output_dir=str(tmp_path / "out"), save_model=False)
    assert run(recipe)["steps"] == 1
