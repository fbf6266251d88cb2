"""AUDIT-DIST18: multi-process training on the CPU (DDP / FSDP2 through accelerate) from a user's side.

Each test pinned one defect as ``xfail(strict=True)``; all five are fixed (DISTFIX) and the markers removed, so each
now guards its fix.
The checks run in this process on what ``lowmem train`` does before the model loads (``build_training_args``,
``check_optimizer_on_meta``) with the environment that ``accelerate launch`` exports for a user's configuration
(``ACCELERATE_MIXED_PRECISION``, ``ACCELERATE_USE_FSDP``, ``WORLD_SIZE``); what the whole run did was measured with
real launches (tests' docstrings give the numbers).
"""

import pytest

from lowmem.config import ConfigError
from lowmem.train import build_training_args, check_optimizer_on_meta, load_recipe


@pytest.fixture
def clean_launch_env(monkeypatch):
    """No launcher variables from the calling shell."""
    for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP", "WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_accelerate_mixed_precision_fp16_on_cpu_is_refused_like_training_args_fp16(tmp_path, clean_launch_env):
    """``accelerate launch --mixed_precision fp16`` (or ``mixed_precision: fp16`` in the user's accelerate config)
    exports ACCELERATE_MIXED_PRECISION=fp16, which TrainingArguments reads as its ``mixed_precision``; on the CPU
    accelerate sets no autocast (``native_amp`` False). Measured with ``lowmem train`` (tiny Llama, adamw, 2 steps):
    final eval loss 3.3883 with and without the variable (float32 both times), no word; ``bf16`` changes it
    (3.3899). ``training_args: {fp16: true}`` is refused on the CPU by check_half_precision ("applies on a GPU
    only ... transformers would train in float32 without a word"); the same request through accelerate must be
    refused too, naming accelerate's mixed_precision."""
    import lowmem.train

    clean_launch_env.setattr(lowmem.train, "_accelerator_visible", lambda: False)
    recipe = load_recipe(None, optim="adamw", steps=2, batch_size=4, output_dir=str(tmp_path / "out"))
    build_training_args(recipe)  # the same recipe without the variable builds
    with pytest.raises(ConfigError, match=r"(?i)fp16.*(ACCELERATE_MIXED_PRECISION|mixed_precision)|"
                                          r"(ACCELERATE_MIXED_PRECISION|mixed_precision).*fp16"):
        clean_launch_env.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        build_training_args(recipe)


def test_training_args_fp16_on_cpu_is_refused(tmp_path, clean_launch_env):
    """(The control for item 1: the recipe's own fp16 is refused before any model loads.)"""
    import lowmem.train

    clean_launch_env.setattr(lowmem.train, "_accelerator_visible", lambda: False)
    recipe = load_recipe(None, optim="adamw", steps=2, batch_size=4, output_dir=str(tmp_path / "out"), fp16=True)
    with pytest.raises(ConfigError, match=r"fp16=true .* applies on a GPU only"):
        build_training_args(recipe)


def test_layerwise_under_accelerate_fsdp_is_refused_before_the_model_loads(tmp_path, clean_launch_env):
    """``accelerate launch --config_file configs/accelerate/fsdp2.yaml ... lowmem train`` exports
    ACCELERATE_USE_FSDP=true. With ``layerwise: true`` the refusal comes from LowMemTrainer.create_optimizer
    (trainers/hf.py, "lowmem_layerwise=True does not work under FSDP"), i.e. inside Trainer.train, after the
    model (on GPUs: every rank's whole model) and the data loaded; measured through the project's CPU harness
    (tests/lowmem_train_fsdp_cpu.py, 2 processes): exit after 17.7 s with that message. Everything needed is known
    before: lowmem's own resume check already reads ACCELERATE_USE_FSDP as "FSDP now" (_check_fsdp_matches).
    A GPU machine is assumed (``_accelerator_visible``), one process (one-process FSDP on a GPU, docs/distributed.md)."""
    import lowmem.train

    clean_launch_env.setattr(lowmem.train, "_accelerator_visible", lambda: True)
    clean_launch_env.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = load_recipe(None, optim="adamw", steps=2, batch_size=4, layerwise=True, output_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"layerwise.*FSDP|FSDP.*layerwise"):
        args = build_training_args(recipe)
        check_optimizer_on_meta(recipe, args)  # the last check of lowmem train before the model loads


def test_fsdp_activation_checkpointing_with_gradient_checkpointing_is_refused_before_load(tmp_path, clean_launch_env):
    """A user's FSDP2 accelerate config with ``fsdp_activation_checkpointing: true`` (exported as
    FSDP_ACTIVATION_CHECKPOINTING=true) and a recipe with ``gradient_checkpointing: true``: transformers' Trainer
    raises in its __init__ (after the model loaded) "`fsdp_config['activation_checkpointing']` ... and the
    `activation_checkpointing` training argument can't both be set to True" - names of neither file the user wrote.
    Measured through the CPU harness (tests/lowmem_train_fsdp_cpu.py, 2 processes). Expected: a ConfigError before
    the model loads naming ``gradient_checkpointing`` and ``fsdp_activation_checkpointing``."""
    import lowmem.train

    clean_launch_env.setattr(lowmem.train, "_accelerator_visible", lambda: True)
    clean_launch_env.setenv("ACCELERATE_USE_FSDP", "true")
    clean_launch_env.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    recipe = load_recipe(None, optim="adamw", steps=2, batch_size=4, gradient_checkpointing=True,
                         output_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"gradient_checkpointing.*fsdp_activation_checkpointing|"
                                          r"fsdp_activation_checkpointing.*gradient_checkpointing"):
        args = build_training_args(recipe)
        check_optimizer_on_meta(recipe, args)


def test_memory_callback_counts_fsdp2_parameters(tmp_path):
    """``accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 ... lowmem train`` with the
    default ``track_memory: true`` (measured through the CPU harness tests/lowmem_train_fsdp_cpu.py, adamw and
    frugal, tiny Llama, 2 processes): after the evaluation on start, ``MemoryCallback.on_step_begin`` ->
    ``live_bytes`` -> ``t.untyped_storage().data_ptr()`` on a ``DTensor`` parameter: "RuntimeError: Attempted to
    access the data pointer on an invalid python storage", a traceback on every rank, nothing trained. The same
    call on CUDA (on_step_begin counts the weights before it looks at the device). The project's own FSDP runs of
    lowmem train set ``track_memory: false`` (tests/test_trainer_fsdp.py), so none saw it. Expected: the weights
    component counts each rank's local shards (here one rank: the whole 2 x (8 x 8 + 8) float32 = 576 bytes)."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from lowmem.trainers.memory_callback import MemoryCallback

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        fully_shard(model)
        cb = MemoryCallback(track_steps=0)
        cb.on_step_begin(None, None, None, model=model, optimizer=None)
        assert cb.peak["weights"] == 2 * (8 * 8 + 8) * 4
    finally:
        dist.destroy_process_group()


def test_adamw_state_bytes_of_an_fsdp2_model_is_the_unsharded_state():
    """``lowmem train`` under FSDP2 prints "optimizer state: adamw X bytes on process 0 of 2 (its shards, FSDP2) vs
    AdamW Y bytes unsharded" and metrics.json's ``adamw_state_bytes`` is documented "exact, for the same parameters,
    unsharded" (lowmem/train.py run()). Measured through the CPU harness (configs/accelerate/fsdp2.yaml, 2
    processes, tiny Llama, adamw, track_memory: false): "adamw 667,220 bytes on process 0 of 2 (its shards, FSDP2)
    vs AdamW 334,164 bytes unsharded (199.7%)" - one process's run reports 667,220 for both. adamw_state_bytes
    builds meta copies with ``empty_like`` of the DTensor parameters, whose state lowmem's AdamW sizes by the local
    shard: 2,192 bytes for the 4,368 of this 2-layer model on 2 (fake) ranks. (The 667,220 on process 0 is a second
    oddity: rank 0's adamw state under the Trainer then equals the whole model's; with fully_shard by hand and the
    optimizer switched to the sharded parameters it is the shard's 2,192 here.)"""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from lowmem.train import adamw_state_bytes

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
        unsharded = adamw_state_bytes(model)
        assert unsharded == 2 * (16 * 16 + 16) * 8 + 2 * 8  # float32 m and v, a step counter per parameter
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        assert adamw_state_bytes(model) == unsharded
    finally:
        dist.destroy_process_group()
