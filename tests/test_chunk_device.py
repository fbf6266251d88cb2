"""The chunk of the chunked step by device (issue 15): ``chunk_numel`` defaults to 2^19 elements on the CPU
(issue 12's measured step time and peak RSS) and to ``engine.DEVICE_CHUNK_NUMEL`` (2^24) on any other device
(CUDA; the meta and fake CUDA tensors the estimator and the launch audit run on), where CPU-sized chunks made
the step launch-bound (H200: AdamW 105.6 ms at 2^19 vs 10.2 ms whole). A value set applies everywhere;
each parameter resolves the default by its own device, in the step and in ``step_transient_bytes()``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lowmem.optim import create_optimizer
from lowmem.optim.engine import DEFAULT_CHUNK_NUMEL, DEVICE_CHUNK_NUMEL, default_chunk_numel

SHAPE = (4096, 8192)  # 2^25 elements: 64 chunks of the CPU's default, 2 of the GPU's


def _sized(name: str, device: str, chunk: object = "default", shape=SHAPE):
    """An optimizer of one ``shape`` parameter on ``device`` (CPU / CUDA as fake tensors, nothing allocated;
    meta as it is), its state materialized; ``chunk``: a value to set, or the default."""
    mode = FakeTensorMode(allow_non_fake_inputs=True) if device != "meta" else None
    with mode if mode is not None else torch.device("meta"):
        p = torch.nn.Parameter(torch.empty(shape, device=device))
    opt = create_optimizer([p], name)
    if chunk != "default":
        opt.chunk_numel = chunk
    with mode if mode is not None else torch.device("meta"):
        opt.materialize_state()
        transient = opt.step_transient_bytes()
        bounds = opt._chunk_bounds(p, opt.param_groups[0], opt.state[p])
    return opt, p, transient, bounds


@pytest.mark.parametrize("device,expected", [("cpu", DEFAULT_CHUNK_NUMEL), ("meta", DEVICE_CHUNK_NUMEL),
                                             ("cuda", DEVICE_CHUNK_NUMEL)])
def test_the_default_chunk_follows_the_parameters_device(device, expected):
    assert (DEFAULT_CHUNK_NUMEL, DEVICE_CHUNK_NUMEL) == (2**19, 2**24)
    assert default_chunk_numel(device) == default_chunk_numel(torch.device(device)) == expected
    opt, p, transient, bounds = _sized("adamw4bit", device)
    assert opt.chunk_numel == opt.chunk_numel_for(device) == expected
    assert len(bounds) == p.numel() // expected and max(b - a for a, b in bounds) == expected
    # what the estimator counts: the transient of that chunk, the same as with the value set explicitly
    other = DEVICE_CHUNK_NUMEL if expected == DEFAULT_CHUNK_NUMEL else DEFAULT_CHUNK_NUMEL
    assert transient == _sized("adamw4bit", device, expected)[2] != _sized("adamw4bit", device, other)[2]
    # a foreach bucket (adam_mini's multi-tensor step: no fused kernel) takes its pieces at the same size
    ada, q, _, _ = _sized("adam_mini", device)
    assert len(ada._foreach_pieces(q)) == q.numel() // expected


def test_a_chunk_numel_set_applies_on_every_device():
    cpu = torch.nn.Parameter(torch.zeros(4, 4))
    meta = torch.nn.Parameter(torch.empty(SHAPE, device="meta"))
    opt = create_optimizer([cpu, meta], "adamw")
    assert opt.chunk_numel_for("cpu") == DEFAULT_CHUNK_NUMEL and opt.chunk_numel_for("meta") == DEVICE_CHUNK_NUMEL
    with pytest.raises(ValueError, match=r"chunk_numel of optimizer 'adamw' is not set.*\['cpu', 'meta'\]"):
        opt.chunk_numel  # noqa: B018  (unset, and the two devices' defaults differ: no silent pick)
    assert len(opt._foreach_pieces(meta)) == 2 and len(opt._foreach_pieces(torch.zeros(2**20))) == 2
    for value, pieces in ((2**20, 32), (None, 1), (2**25, 1)):
        opt.chunk_numel = value
        assert opt.chunk_numel == opt.chunk_numel_for("cpu") == opt.chunk_numel_for("cuda") == value
        assert len(opt._foreach_pieces(meta)) == pieces
        assert len(opt._foreach_pieces(torch.zeros(2**21))) == (1 if value is None else max(1, 2**21 // value))
    del opt.chunk_numel  # back to the default by device
    assert opt.chunk_numel_for("cpu") == DEFAULT_CHUNK_NUMEL and opt.chunk_numel_for("meta") == DEVICE_CHUNK_NUMEL
    for bad in (0, 1.5, True, "device"):
        with pytest.raises(ValueError, match="chunk_numel"):
            opt.chunk_numel = bad


def _fake_model_transient(config, name: str, device: str, chunk: int) -> int:
    """``step_transient_bytes()`` of ``name`` on the model of ``config`` as fake tensors of ``device`` (the
    estimator's sizing), with ``chunk_numel`` set to ``chunk``, plus the tables the moment rule keeps for the process
    (``_kept_table_bytes``: 4-bit codecs' 4,344 B off the CPU), which the estimate counts with the transient."""
    from lowmem.memory.estimate import _kept_table_bytes, _sizing_mode, build_meta_model, on_fake_device

    model = build_meta_model(config, torch.float32)
    on_fake_device(model, device)
    opt = create_optimizer(model, name)
    opt.chunk_numel = chunk
    with _sizing_mode(model):
        opt.materialize_state()
        return opt.step_transient_bytes() + _kept_table_bytes(opt)


@pytest.mark.parametrize("name", [pytest.param("adamw4bit", marks=pytest.mark.slow), "adam_mini"])
def test_the_estimate_sizes_the_step_at_the_runs_devices_chunk(name):
    """``estimate_memory(device=...)``: the optimizer transient is the engine's at that device's chunk (a
    32768 x 1024 embedding and head: 2 chunks on CUDA, 64 on the CPU)."""
    from transformers import LlamaConfig

    from lowmem.memory import estimate_memory

    config = LlamaConfig(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = {d: estimate_memory(config, name, dtype="fp32", seq_len=16, device=d).optimizer_transient for d in ("cpu", "cuda")}
        assert est["cuda"] == _fake_model_transient(config, name, "cuda", DEVICE_CHUNK_NUMEL)
        assert est["cpu"] == _fake_model_transient(config, name, "cpu", DEFAULT_CHUNK_NUMEL)
    assert est["cuda"] >= 8 * est["cpu"], est  # 32x the elements per chunk (buckets of the small ones aside)


@pytest.mark.parametrize("name", ["adamw", pytest.param("adamw8bit", marks=pytest.mark.slow)])
def test_the_cpu_step_at_the_device_chunk_equals_the_reference(name):
    """The chunked step at the GPU's chunk (set on the CPU), where a tensor is split at exactly 2^24 (the
    last integer float32 counts exactly: offsets must stay integer arithmetic) and 4096 elements remain,
    equals the plain reference loop (tests/test_reference.py's tolerance), next to a vector in the same bucket."""
    from lowmem.optim.references import get_reference

    ref = get_reference(name)
    config = ref.configs[1]  # decay on, 8-bit moments in blocks of 64 for adamw8bit
    gen = torch.Generator().manual_seed(0)
    shapes = ((4097, 4096), (300,))
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    starts = [p.detach().clone() for p in params]
    steps = 2
    grads = [[torch.randn(s, generator=gen) for _ in range(steps)] for s in shapes]
    opt = create_optimizer(params, name, **config)
    opt.chunk_numel = DEVICE_CHUNK_NUMEL
    assert len(opt._foreach_pieces(params[0])) == 2 or name != "adamw"
    for t in range(steps):
        for p, g in zip(params, grads):
            p.grad = g[t].clone()
        opt.step()
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    for i, (start, g, p) in enumerate(zip(starts, grads, params)):
        want = ref.loop(start.clone(), [x.clone() for x in g], index=i, **group)[-1]
        torch.testing.assert_close(p.detach(), want, rtol=ref.rtol, atol=ref.atol)
