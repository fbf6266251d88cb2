"""BAdam (Luo et al. 2024) on a tiny Llama: blocks are the decoder layers, only the active block
changes (Adam restarted at each visit, equal to torch.optim.AdamW run block by block), the switching
order, state freed at a switch, gradients only for the active block, exact resume across a switch
through a weights_only checkpoint, layerwise mode, and the estimator's numbers."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from lowmem.optim import bytes_per_param, create_optimizer
from lowmem.optim.functional.badam import badam_block_position
from lowmem.optim.layerwise import LayerwiseOptimizer

LAYERS = 3


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=LAYERS,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def batch(k):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randint(0, 48, (2, 12), generator=g)


def loss_of(model, k):
    ids = batch(k)
    return model(input_ids=ids, labels=ids).loss


def layer_of(name):
    return int(name.split("layers.")[1].split(".")[0]) if "layers." in name else None


def train(model, opt, steps, start=0, on_step=None):
    for k in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, k).backward()
        opt.step()
        if on_step is not None:
            on_step(k)


def test_blocks_are_the_decoder_layers_and_the_rest_is_frozen():
    model = tiny_llama()
    opt = create_optimizer(model, "badam")
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = {}
    for g in opt.param_groups:
        for p in g["params"]:
            blocks.setdefault(g["block"], set()).add(layer_of(names[id(p)]))
    assert blocks == {i: {i} for i in range(LAYERS)}
    frozen = sorted(n for n, p in model.named_parameters() if layer_of(n) is None)
    assert frozen == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)
    # only the active layer trains: one block's parameters require gradients
    active = {layer_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert active == {opt.active_block}
    # the authors' include_embedding / include_lm_head: a first and a last block
    model = tiny_llama()
    opt = create_optimizer(model, "badam", include_embedding=True, include_lm_head=True, freeze_inactive=False)
    names = {id(p): n for n, p in model.named_parameters()}
    first = sorted(names[id(p)] for g in opt.param_groups if g["block"] == 0 for p in g["params"])
    last = sorted(names[id(p)] for g in opt.param_groups if g["block"] == LAYERS + 1 for p in g["params"])
    assert first == ["model.embed_tokens.weight"] and last == ["lm_head.weight", "model.norm.weight"]
    assert all(p.requires_grad for p in model.parameters())  # freeze_inactive=False touches nothing
    # no weight decay on the norms of a layer (the Trainer's rule), per block
    opt = create_optimizer(tiny_llama(), "badam", weight_decay=0.1)
    assert sorted({(g["block"], g["weight_decay"]) for g in opt.param_groups}) == [(b, w) for b in range(LAYERS) for w in (0.0, 0.1)]


@pytest.mark.parametrize("mode,start,expect", [
    ("ascending", None, [0, 1, 2, 0, 1]),
    ("descending", None, [2, 1, 0, 2, 1]),
    ("ascending", 1, [1, 2, 0, 1, 2]),
    ("descending", 0, [0, 2, 1, 0, 2]),
])
def test_switching_order(mode, start, expect):
    model = tiny_llama()
    opt = create_optimizer(model, "badam", switch_every=2, switch_mode=mode, start_block=start)
    seen = []
    train(model, opt, 2 * len(expect), on_step=lambda k: seen.append(opt.active_block) if k % 2 == 0 else None)
    # the block after each first step of a visit (a switch comes after every second step)
    assert [b for b in seen] == expect


def test_random_order_reshuffles_every_block_epoch():
    orders = [[badam_block_position(k, 5, "random", seed=s) for k in range(15)] for s in (0, 1)]
    for order in orders:
        for e in range(3):  # every block-epoch visits every block once
            assert sorted(order[5 * e:5 * e + 5]) == list(range(5))
    assert orders[0] != orders[1]  # the seed matters
    assert orders[0][:5] != orders[0][5:10] or orders[0][5:10] != orders[0][10:15]  # a new permutation per epoch
    model = tiny_llama()
    opt = create_optimizer(model, "badam", switch_every=1, seed=3)
    got = []
    train(model, opt, 6, on_step=lambda k: got.append(opt.active_block))
    assert got == [badam_block_position(k + 1, LAYERS, "random", seed=3) for k in range(6)]


@pytest.mark.parametrize("freeze", [True, False])
def test_only_the_active_block_changes_and_equals_adamw_block_by_block(freeze):
    """Each visit of K steps is torch.optim.AdamW started afresh on the active layer (layer 2 is
    visited twice); the other parameters never move, also when their gradients exist
    (freeze_inactive=False). rtol 1e-6."""
    k_steps, steps = 3, 11
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    model = tiny_llama()
    ref = copy.deepcopy(model)
    opt = create_optimizer(model, "badam", switch_every=k_steps, switch_mode="descending", freeze_inactive=freeze, **hp)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def check(k):
        visit = k // k_steps
        layer = (LAYERS - 1 - visit) % LAYERS
        for n, p in model.named_parameters():
            moved = not torch.equal(p, before[n])
            assert moved == (layer_of(n) == layer), (k, n)  # every parameter of the layer has a gradient
            before[n] = p.detach().clone()

    train(model, opt, steps, on_step=check)
    # the plain version: AdamW on one layer at a time, a fresh optimizer for every visit
    for p in ref.parameters():
        p.requires_grad_(False)
    for visit in range((steps + k_steps - 1) // k_steps):
        layer = (LAYERS - 1 - visit) % LAYERS
        params = [p for n, p in ref.named_parameters() if layer_of(n) == layer]
        for p in params:
            p.requires_grad_(True)
        # (torch's fused kernel: the one lowmem's AdamW buckets take on the CPU too, functional.adam.FUSED_ON_CPU)
        adamw = torch.optim.AdamW(params, weight_decay=0.0, fused=True, **hp)
        for k in range(visit * k_steps, min(steps, (visit + 1) * k_steps)):
            adamw.zero_grad()
            loss_of(ref, k).backward()
            adamw.step()
        for p in params:
            p.requires_grad_(False)
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=n)


def test_state_and_gradients_only_for_the_active_block():
    model = tiny_llama()
    opt = create_optimizer(model, "badam", switch_every=2, switch_mode="ascending")
    numel = {i: sum(p.numel() for n, p in model.named_parameters() if layer_of(n) == i) for i in range(LAYERS)}
    tensors = sum(1 for n, _ in model.named_parameters() if layer_of(n) == 0)
    loss_of(model, 0).backward()
    # gradients exist for the active layer only (the others were frozen before the forward pass)
    assert {layer_of(n) for n, p in model.named_parameters() if p.grad is not None} == {0}
    opt.step()
    assert opt.state_bytes() == 8 * numel[0] + 4 * tensors  # Adam's two float32 moments + step counters
    opt.zero_grad()
    loss_of(model, 1).backward()
    opt.step()  # the second step of block 0: the switch frees its state
    assert opt.state_bytes() == 0 and len(opt.state) == 0
    assert opt.active_block == 1
    assert {layer_of(n) for n, p in model.named_parameters() if p.requires_grad} == {1}
    opt.materialize_state()  # what the estimator sizes: the active block only
    assert opt.state_bytes() == 8 * numel[1] + 4 * tensors
    assert bytes_per_param("badam") == 8.0


def test_resume_across_a_switch_is_exact_with_weights_only():
    steps, first = 9, 4
    hp = dict(lr=1e-2, switch_every=3, seed=5)
    full = tiny_llama()
    resumed = copy.deepcopy(full)
    train(full, create_optimizer(full, "badam", **hp), steps)

    opt = create_optimizer(resumed, "badam", **hp)
    train(resumed, opt, first)  # 3 steps on one block, a switch, 1 step on the next
    buf = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["optim"]["badam"]["period"].item() == 1 and ckpt["optim"]["badam"]["steps"].item() == 1
    fresh = tiny_llama(seed=7)
    fresh.load_state_dict(ckpt["model"])
    opt2 = create_optimizer(fresh, "badam", **hp)
    opt2.load_state_dict(ckpt["optim"])
    assert opt2.active_block == opt.active_block
    assert {layer_of(n) for n, p in fresh.named_parameters() if p.requires_grad} == {opt.active_block}
    assert opt2.state_bytes() == opt.state_bytes() > 0
    train(fresh, opt2, steps - first, start=first)
    for (n, a), b in zip(full.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)
    with pytest.raises(ValueError, match="badam"):
        create_optimizer(tiny_llama(), "badam").load_state_dict(create_optimizer(tiny_llama(), "adamw").state_dict())


def test_layerwise_mode_equals_the_plain_optimizer():
    hp = dict(lr=1e-2, switch_every=2, switch_mode="ascending", foreach=False)  # the per-parameter path both ways
    plain = tiny_llama()
    lw = copy.deepcopy(plain)
    train(plain, create_optimizer(plain, "badam", **hp), 7)
    opt = LayerwiseOptimizer(lw, "badam", **hp)
    alive = []
    for k in range(7):
        loss_of(lw, k).backward()
        alive.append(sum(p.grad is not None for p in lw.parameters()))
        opt.step()
    assert alive == [0] * 7 and opt.inner.active_block == 0  # 7 steps: blocks 0, 1, 2, then 0 again
    for (n, a), b in zip(plain.named_parameters(), lw.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="switch_mode"):
        create_optimizer(tiny_llama(), "badam", switch_mode="cyclic")
    with pytest.raises(ValueError, match="start_block"):
        create_optimizer(tiny_llama(), "badam", start_block=1)  # the random order has no start
    with pytest.raises(ValueError, match="start_block"):
        create_optimizer(tiny_llama(), "badam", switch_mode="ascending", start_block=LAYERS)
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="switch_every"):
        create_optimizer([{"params": [p], "block": 0}, {"params": [q], "block": 1, "switch_every": 7}], "badam")
    with pytest.raises(ValueError, match="freeze_inactive"):
        create_optimizer(tiny_llama(), "badam", freeze_inactive="yes")


def test_freezing_is_refused_under_several_processes(monkeypatch):
    """DDP registers the parameters that require gradients when it wraps the model: a block unfrozen
    later would train on each rank's local gradient. With several processes freezing is an error."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    model = tiny_llama()
    with pytest.raises(ValueError, match="freeze_inactive=False"):
        create_optimizer(model, "badam")
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen
    create_optimizer(tiny_llama(), "badam", freeze_inactive=False)  # every gradient all-reduced: allowed


def test_estimate_counts_one_block():
    from lowmem.memory import estimate_memory

    badam = estimate_memory("llama-2-7b", "badam", batch_size=1, seq_len=512)
    adamw = estimate_memory("llama-2-7b", "adamw", batch_size=1, seq_len=512)
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # one decoder layer of Llama-2-7B
    # float32 m, v and master copy of one bf16 layer, 9 step counters
    assert badam.optimizer_states == 12 * layer + 4 * 9
    assert badam.gradients == 2 * layer  # bf16 gradients of the active layer only
    assert adamw.optimizer_states > 20 * badam.optimizer_states  # 22x on 32 layers (a master copy in bf16)


def test_master_weights_keep_updates_below_bf16_resolution():
    """Steps of 1e-4 on a bf16 parameter of 1.0 (half an ulp is 2e-3): rounded into the parameter every
    step they vanish; accumulated in the float32 copy of the active block (the authors' mixed
    precision) they move it. The copy is state (4 bytes per parameter) and goes at a switch."""
    out = {}
    for master in (True, False):
        p = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
        opt = create_optimizer([p], "badam", lr=1e-4, switch_every=40, master_weights=master)
        for k in range(39):
            p.grad = torch.ones_like(p)
            opt.step()
        out[master] = p.detach().float().clone()
        assert opt.state_bytes() == (12 if master else 8) * 64 + 4
        assert ("master" in opt.state[p]) == master and opt.state[p].get("master", p).dtype == (torch.float32 if master else torch.bfloat16)
        p.grad = torch.ones_like(p)
        opt.step()  # the 40th step: a switch (one block: the same one, afresh)
        assert opt.state_bytes() == 0
    assert torch.equal(out[False], torch.ones(64))  # every 1e-4 step rounded away
    torch.testing.assert_close(out[True], torch.full((64,), 1 - 2**-8))  # 39 steps of ~1e-4 accumulated: one ulp down


def test_trainer_resume_across_a_switch_with_frozen_blocks(tmp_path, tokenizer):
    """LowMemTrainer with BAdam's defaults (inactive layers frozen): a run resumed from the step-3
    checkpoint (one step into the second block) ends where the uninterrupted run does."""
    from transformers import default_data_collator

    from lowmem.kit import build_tiny_model, sft_dataset, tokenize_sft
    from lowmem.trainers import LowMemTrainer, LowMemTrainingArguments

    data = tokenize_sft(sft_dataset(48, seed=0), tokenizer)

    def run(out, resume=None):
        torch.manual_seed(0)
        model, _ = build_tiny_model(0)
        args = LowMemTrainingArguments(out, lowmem_optim="badam", lowmem_optim_args={"switch_every": 2}, learning_rate=1e-2,
                                       max_steps=6, per_device_train_batch_size=8, report_to="none", use_cpu=True,
                                       disable_tqdm=True, dataloader_pin_memory=False, save_strategy="steps", save_steps=3,
                                       seed=0)
        trainer = LowMemTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer.optimizer.optimizer

    full, opt = run(tmp_path / "full")
    resumed, opt2 = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-3"))
    assert opt2.active_block == opt.active_block
    trained = {layer_of(n) for n, p in full.named_parameters() if p.requires_grad}
    assert len(trained) == 1 and None not in trained  # one layer trainable, embedding and head frozen
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)
