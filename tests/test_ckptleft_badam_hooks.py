"""torch's ``register_load_state_dict_pre_hook`` / ``_post_hook`` on BAdam: the pre-hooks see the dict as given (its
``"badam"`` schedule entry included; a dict one returns is the one loaded), the post-hooks the fully loaded BAdam
(the checkpoint's active block, its state checked, ``requires_grad`` of the new active block set), and none runs for
a refused load. (They ran inside the engine's load, before BAdam's own steps: a post-hook saw the old block's
``requires_grad``.)"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem.optim import create_optimizer

HP = dict(lr=1e-2, switch_every=2, switch_mode="ascending")


def _llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                        tie_word_embeddings=False))


def _layers_training(model):
    return {int(n.split("layers.")[1].split(".")[0]) for n, p in model.named_parameters() if p.requires_grad}


def _saved_at_block_1():
    model = _llama()
    opt = create_optimizer(model, "badam", **HP)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # block 0 twice, a switch, block 1 (stepped once: it holds state)
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert opt.active_block == 1 and _layers_training(model) == {1}
    return opt.state_dict()


def test_post_hook_sees_the_fully_loaded_badam():
    saved = _saved_at_block_1()
    model = _llama(1)
    opt = create_optimizer(model, "badam", **HP)
    assert opt.active_block == 0 and _layers_training(model) == {0}
    seen = []

    def pre(o, sd):
        seen.append(("pre", "badam" in sd, sorted(sd)))

    def post(o):
        seen.append(("post", o.active_block, _layers_training(model), sum(len(s) > 0 for s in o.state.values())))

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(saved)
    layer1 = sum(1 for n, _ in model.named_parameters() if "layers.1." in n)
    assert seen == [("pre", True, sorted(saved)), ("post", 1, {1}, layer1)], seen


def test_pre_hook_return_is_loaded_and_no_post_hook_after_a_refused_load():
    saved = _saved_at_block_1()
    opt = create_optimizer(_llama(1), "badam", **HP)
    posts = []
    opt.register_load_state_dict_post_hook(lambda o: posts.append(o.active_block))
    handle = opt.register_load_state_dict_pre_hook(lambda o, sd: {**sd, "param_groups": sd["param_groups"][:1]})
    with pytest.raises(ValueError, match="the state dict has 1 parameter groups"):  # (the pre-hook's dict)
        opt.load_state_dict(saved)
    assert posts == [] and opt.active_block == 0
    handle.remove()
    opt.load_state_dict(saved)
    assert posts == [1]
