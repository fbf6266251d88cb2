"""AUDMEM21: the memory claims (docs/memory.md) checked from outside on configurations the other memory tests do not
use: state_bytes() against the tensors of ``optimizer.state`` (non-default settings, bf16 with Kahan / stochastic
rounding, param groups with different ranks / block sizes, layerwise with accumulation, after load_state_dict);
estimate_memory against a measured step (GPT-2 / Qwen2 / Mistral shapes, tied and untied, batch and sequence lengths
away from the defaults, gradient accumulation, checkpointing, LoRA with GaLore, layerwise APOLLO, bf16 with
stochastic rounding / Kahan); step transients in a fresh process (rsvd refreshes at non-default ranks, a refresh
reached mid-run through update_proj_gap). The strict xfails are the findings (/tmp/lm/FOUND_AUDMEM21.md)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lowmem.optim.registry import create_optimizer

MiB = 2**20


def _tensor_bytes(opt) -> int:
    inner = getattr(opt, "inner", opt)
    return sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(300, 64), nn.Linear(64, 200), nn.LayerNorm(200),
                         nn.Linear(200, 96, bias=False)).to(dtype)


def _groups(spec):
    def build(m):
        ps = list(m.parameters())
        return create_optimizer([{"params": ps[:3], **spec[1]}, {"params": ps[3:], **spec[2]}], spec[0])
    return build


STATE_CASES = {
    "galore_rank12_gap2_rsvd": (torch.float32, lambda m: create_optimizer(m.parameters(), "galore_adamw", rank=12, update_proj_gap=2, projection="rsvd")),
    "adamw4bit_block64": (torch.float32, lambda m: create_optimizer(m.parameters(), "adamw4bit", block_size=64, min_quant_size=1)),
    "fira_adamw8bit_rank8": (torch.float32, lambda m: create_optimizer(m.parameters(), "fira_adamw8bit", rank=8)),
    "alice_rank8": (torch.float32, lambda m: create_optimizer(m.parameters(), "alice", rank=8)),
    "bf16_adamw_kahan": (torch.bfloat16, lambda m: create_optimizer(m, "adamw", kahan_summation=True)),
    "bf16_adamw8bit_kahan": (torch.bfloat16, lambda m: create_optimizer(m, "adamw8bit", kahan_summation=True, min_quant_size=1)),
    "bf16_galore_kahan": (torch.bfloat16, lambda m: create_optimizer(m, "galore_adamw", rank=8, kahan_summation=True)),
    "bf16_muon_kahan": (torch.bfloat16, lambda m: create_optimizer(m, "muon", kahan_summation=True)),
    "groups_galore_rank4_rank16": (torch.float32, _groups(("galore_adamw", {"rank": 4}, {"rank": 16}))),
    "groups_adamw8bit_blocks": (torch.float32, _groups(("adamw8bit", {"block_size": 64, "min_quant_size": 1},
                                                        {"block_size": 256, "min_quant_size": 1}))),
    "layerwise_galore_acc2": (torch.float32, lambda m: __import__("lowmem.optim.layerwise", fromlist=["x"])
                              .LayerwiseOptimizer(m, "galore_adamw", accumulation_steps=2, rank=6)),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_state_bytes_equal_the_state_tensors_also_after_load(case):
    """state_bytes() is the bytes of the tensors in optimizer.state, after 3 steps and after load_state_dict into a
    fresh optimizer (measured 2026-12-02: equal in all 11 cases, and in 42 registry optimizers at non-default
    settings run by the audit script)."""
    dtype, build = STATE_CASES[case]
    m = _model(dtype)
    opt = build(m)
    for _ in range(3):
        x = torch.randint(0, 300, (4, 16))
        m(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert opt.state_bytes() == _tensor_bytes(opt) > 0
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = build(_model(dtype))
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state_bytes() == _tensor_bytes(opt2) == opt.state_bytes()


def _configs():
    from transformers import GPT2Config, MistralConfig, Qwen2Config

    return {
        "gpt2": GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=4000, n_positions=256),
        "qwen_tied": Qwen2Config(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=4000, tie_word_embeddings=True, max_position_embeddings=512),
        "mistral": MistralConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=8,
                                 num_key_value_heads=2, vocab_size=4000, tie_word_embeddings=False,
                                 max_position_embeddings=512, sliding_window=None),
    }


MEASURE_CASES = {
    # measured 2026-12-02 at h=256, 4 layers, vocabulary 8000 (the audit's models), estimate / live tensors: 1.000 each
    "gpt2_galore_rsvd_refresh_every_step": ("gpt2", dict(optimizer="galore_adamw", batch_size=3, seq_len=40,
                                                          optim_args={"rank": 16, "update_proj_gap": 1, "projection": "rsvd"})),
    "qwen_tied_adamw8bit_block512_ga3": ("qwen_tied", dict(optimizer="adamw8bit", optim_args={"block_size": 512},
                                                            batch_size=2, seq_len=48, gradient_accumulation_steps=3)),
    "mistral_untied_lion_checkpointing_b4_s96": ("mistral", dict(optimizer="lion", batch_size=4, seq_len=96,
                                                                  gradient_checkpointing=True)),
    "qwen_tied_bf16_adafactor_kahan": ("qwen_tied", dict(optimizer="adafactor", optim_args={"kahan_summation": True},
                                                         dtype="bf16", batch_size=1, seq_len=128)),
    "mistral_bf16_adamw_stochastic_round": ("mistral", dict(optimizer="adamw", optim_args={"bf16_stochastic_round": True},
                                                            dtype="bf16", batch_size=2, seq_len=80)),
    "gpt2_muon_ga2_checkpointing": ("gpt2", dict(optimizer="muon", batch_size=2, seq_len=64,
                                                 gradient_accumulation_steps=2, gradient_checkpointing=True)),
}


@pytest.mark.parametrize("case", sorted(MEASURE_CASES))
def test_estimate_matches_measured_step_on_new_configurations(case):
    """estimate_memory's total and components against measure_memory's live tensors (CPU) on settings the other
    tests do not use: within 2% (the claim: 10%); the optimizer state exactly."""
    from lowmem.memory.measure import measure_memory

    model, kw = MEASURE_CASES[case]
    m = measure_memory(_configs()[model], device="cpu", steps=3, **kw)
    est = m.estimate
    assert est.optimizer_states == m.measured["optimizer_states"]
    assert 0.98 <= est.total / m.measured["total"] <= 1.02, m.table()
    # the step's transient: the torch tensors of the estimate (less MKL's / LAPACK's / BLAS' buffers, not tensors)
    tensors = (est.optimizer_transient - m.mkl_gemm_pack_bytes()
               - int(est.details.get("optimizer_transient_lapack_svd") or 0))
    assert abs(tensors - m.measured["optimizer_transient"]) <= 0.02 * m.measured["optimizer_transient"] + 4096, m.table()


_STEP_CHILD = textwrap.dedent("""
    import gc, json, os, sys, torch
    from lowmem.optim.registry import create_optimizer
    from lowmem.optim.step_memory import _status_kib, _reset_peak
    spec = json.loads(sys.argv[1])
    dt = getattr(torch, spec["dtype"]); n = spec["n"]
    s = torch.nn.Parameter(torch.randn(300, 200, dtype=dt)); s.grad = torch.randn(300, 200, dtype=dt)
    w = create_optimizer([s], spec["name"], **spec["warm"]); [w.step() for _ in range(2)]; del w, s; gc.collect()
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(*n, dtype=dt)); p.grad = torch.randn(*n, dtype=dt)
    opt = create_optimizer([p], spec["name"], **spec["hp"])
    report = opt.step_transient_bytes() if hasattr(opt, "materialize_state") and (opt.materialize_state() or True) else 0
    for _ in range(spec["before"]):
        opt.step()
    gc.collect(); _reset_peak(); base = _status_kib("VmRSS")
    for _ in range(spec["steps"]):
        opt.step()
    print(json.dumps({"growth": (_status_kib("VmHWM") - base) * 1024, "report": report}))
""")


def _step_growth(name, n, hp, dtype="float32", before=0, steps=2, warm=None):
    spec = {"name": name, "n": list(n), "hp": hp, "dtype": dtype, "before": before, "steps": steps, "warm": warm if warm is not None else hp}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _STEP_CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,hp,before,steps", [
    # a refresh reached mid-run: update_proj_gap=2, the first step refreshes, then a plain step and a refresh
    ("galore_adamw", {"rank": 64, "projection": "rsvd", "update_proj_gap": 2}, 1, 2),
    # (slow: ~15 s each on 2 busy cores; the default suite's rsvd rows are tests/test_step_memory.py's)
    pytest.param("fira_adamw", {"rank": 300, "projection": "rsvd"}, 0, 1, marks=pytest.mark.slow),  # 14.2 MiB / 17.7
    pytest.param("galore_adamw", {"rank": 512, "projection": "rsvd"}, 0, 1, marks=pytest.mark.slow),  # 23.9 / 27.8
])
def test_rsvd_refresh_transient_bounded_and_reported(name, hp, before, steps):
    """A 2048 x 2048 float32 weight, fresh process, live RSS (fixed mmap threshold): the growth of steps that refresh
    the basis with the randomized SVD at non-default ranks stays under 64 MiB and under step_transient_bytes()
    (the tests' 1.1 x + 1 MiB)."""
    r = _step_growth(name, (2048, 2048), hp, before=before, steps=steps, warm={**hp, "rank": 8})
    assert r["growth"] < 64 * MiB
    assert r["growth"] <= 1.1 * r["report"] + MiB, r


# ---- findings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adafactor", "adalomo"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adafactor_low_precision_step_transient_is_bounded(name, dtype):
    """docs/memory.md, "Chunking": a step's transient is bounded by stepping a large parameter in pieces, Adafactor
    in blocks of whole rows. Measured: bf16 8192 x 8192 adafactor, peak RSS growth of a step 1023.8 MiB (reported
    1024.06 MiB, exact), 2048 x 2048 64.0 MiB (16 B per element); float32 on the CPU 2 MiB. Llama-2-7B pure bf16
    adafactor: optimizer_transient 2000 MiB (the embedding stepped whole), adamw 4 MiB. The report is exact
    (checked in a fresh process), so the meta count is the measurement. Fixed (FIXMEM21): the RMS from a first pass
    over the chunks, then the row-block step: 6.09 MiB reported (tests/test_fixmem21_lowp_chunked.py)."""
    m = nn.Linear(8192, 8192, bias=False, device="meta", dtype=dtype)
    opt = create_optimizer(m.parameters(), name)
    opt.materialize_state()
    opt.chunk_numel = 2**19  # the CPU's chunk, at which float32 reports 2 MiB
    assert opt.step_transient_bytes() <= 64 * MiB


def test_adafactor_bf16_report_is_the_measured_step():
    """The premise of AUDMEM21 1: the bf16 Adafactor step really allocates what step_transient_bytes() reports (so
    the report, not the measurement, is what the test above reads): 1024 x 1024, fresh process (stepped whole
    before FIXMEM21, 16 MiB; in chunks of 512 rows since)."""
    r = _step_growth("adafactor", (1024, 1024), {}, dtype="bfloat16", before=1, steps=2)
    assert 0.9 * r["report"] <= r["growth"] <= 1.1 * r["report"] + MiB, r


_BNB_CHILD = textwrap.dedent("""
    import gc, json, sys, torch
    from lowmem.optim.registry import create_optimizer
    from lowmem.optim.step_memory import _status_kib, _reset_peak
    s = torch.nn.Parameter(torch.randn(300, 200, dtype=torch.bfloat16)); s.grad = torch.randn_like(s)
    w = create_optimizer([s], "bnb_adamw8bit"); [w.step() for _ in range(2)]; del w, s; gc.collect()
    p = torch.nn.Parameter(torch.randn(4000, 128, dtype=torch.bfloat16)); p.grad = torch.randn_like(p)
    opt = create_optimizer([p], "bnb_adamw8bit"); opt.step(); gc.collect()
    _reset_peak(); base = _status_kib("VmRSS")
    for _ in range(2):
        opt.step()
    print(json.dumps({"growth": (_status_kib("VmHWM") - base) * 1024}))
""")


def test_bnb_adamw8bit_cpu_step_transient_is_estimated():
    """The GPT-2 shape below (vocabulary 4000, n_embd 128) in bf16 on the CPU: its largest parameter, the 4000 x 128
    embedding, stepped by bnb_adamw8bit in a fresh process grows the peak RSS by ~12 MB (24 B per element;
    2048 x 2048: 96.0 MiB bf16, 79.9 MiB float32; 4096 x 4096 bf16: 383.8 MiB); estimate_memory(device="cpu")
    counts 0 B of optimizer_transient. Fixed when the estimate counts at least 90% of it (or the CPU search stops
    offering bnb_* candidates and this estimate refuses them). Fixed (FIXMEM21): recipes.bnb.CPU_STEP_BYTES, 24 B per
    element of the largest bf16 parameter: 12,288,000 B estimated."""
    from lowmem.memory.estimate import estimate_memory

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _BNB_CHILD], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    assert growth > 8 * MiB  # the premise: the step's kernel allocates ~24 B per element
    est = estimate_memory(_configs()["gpt2"], "bnb_adamw8bit", batch_size=1, seq_len=64, dtype="bf16", device="cpu")
    assert est.optimizer_transient >= 0.9 * growth, (est.optimizer_transient, growth)
