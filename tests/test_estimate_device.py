"""``estimate_memory(device=...)`` (issue 12): the optimizer is sized on fake tensors of the device the run
will use, so its state and step transient are what a real optimizer on that device reports
(``state_bytes()``, ``step_transient_bytes()``): on CPU a projected step also keeps MKL's GEMM packing
buffer (the engine's ``_kept_gemm_bytes``), which the meta device never counted; on CUDA MicroAdam's
buckets take the compiled path. Nothing is allocated: a 7B estimate stays cheap."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowmem.optim.functional.galore as GL
from lowmem.memory import estimate_memory
from lowmem.memory.estimate import DEVICES, check_device

# ~3.4M parameters: every linear weight has sides >= 256, so rank 32 projects them all
CONFIG = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False)
CASES = {
    "adamw": {},
    "adamw8bit": {},
    "microadam": {},
    "galore_adamw": {"rank": 32},
    "galore_adamw rsvd": {"rank": 32, "projection": "rsvd"},
    "apollo_adamw": {"rank": 32},
}
MKL = torch.backends.mkl.is_available()


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(**CONFIG)


def _tables(opt) -> int:
    """The codecs' tables the optimizer keeps from its first step on (``Quantized.cached_bytes``; 0 without codecs):
    not in ``step_transient_bytes()``, in the estimate's transient (tests/test_estact_codec_tables.py)."""
    cached = getattr(opt.recipe.moment, "cached_bytes", None)
    return cached([opt.state[p] for g in opt.param_groups for p in g["params"]], torch.device("cpu")) if cached else 0


def _real_cpu_sizes(name: str, args: dict, layerwise: bool) -> tuple[int, int]:
    """``state_bytes()`` / ``step_transient_bytes()`` of the optimizer on a real float32 CPU model (``layerwise``:
    of :class:`~lowmem.optim.layerwise.LayerwiseOptimizer`), with the codecs' kept tables (:func:`_tables`)."""
    from transformers import AutoModelForCausalLM

    from lowmem.optim import create_optimizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if layerwise:  # (the hooks' optimizer: the per-parameter step next to its non-finite check)
            from lowmem.optim.layerwise import LayerwiseOptimizer

            lw = LayerwiseOptimizer(model, name, **args)
            lw.inner.materialize_state()
            return lw.state_bytes(), lw.step_transient_bytes() + _tables(lw.inner)
        opt = create_optimizer(model, name, **args)
        opt.materialize_state()
        return opt.state_bytes(), opt.step_transient_bytes() + _tables(opt)


def _check_bytes(device: str) -> int:
    """What the step's non-finite check allocates for the model's float32 gradients on ``device``: on the CPU
    the float32 norms and their stack, 8 bytes per tensor; on CUDA the norms next to the multi-tensor norm
    kernel's partial sums, 4 bytes per tensor and chunk of 65536 elements of the largest tensor (the 256,000
    of the embedding: 4 chunks); beside the fused AdamW kernel's step count kept from the last step (4 bytes)."""
    n = 3 + 9 * CONFIG["num_hidden_layers"]  # embed, norm, lm_head; 7 linears, 2 norms a layer
    if device == "cpu":
        return 4 + 8 * n
    return 4 + 4 * n + 4 * n * -(-CONFIG["vocab_size"] * CONFIG["hidden_size"] // 65536)


@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_estimate_equals_a_real_cpu_optimizer(case, layerwise):
    name, args = case.split()[0], CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (no clipping, as the real optimizer below; clipping's coefficient copy on CUDA: test_memory_layerwise_clip.py)
        cpu = estimate_memory(_config(), name, optim_args=args, dtype="fp32", seq_len=16, layerwise=layerwise, device="cpu",
                              max_grad_norm=None)
        cuda = estimate_memory(_config(), name, optim_args=args, dtype="fp32", seq_len=16, layerwise=layerwise, device="cuda",
                               max_grad_norm=None)
    state, transient = _real_cpu_sizes(name, args, layerwise)
    assert (cpu.optimizer_states, cpu.optimizer_transient) == (state, transient)
    assert cpu.settings["device"] == "cpu" and cuda.settings["device"] == "cuda"
    assert cuda.optimizer_states == state  # the state does not depend on the device
    if name in ("galore_adamw", "apollo_adamw") and MKL:
        # the projected step's kept GEMM packing buffers: CPU only (galore.kept_pack_bytes, by the CPU's vendor:
        # 1.7 MiB on an Intel Xeon, 0.34 MiB on an AMD EPYC here; its value: test_measure_table_says_which_part...)
        assert cpu.optimizer_transient - cuda.optimizer_transient > 0 if "projection" not in args else \
            cpu.optimizer_transient >= cuda.optimizer_transient
    elif name == "adamw8bit":
        # (the multi-tensor step's 8-bit members, and since afc490b a parameter stepped alone (layerwise), take
        # bitsandbytes' fused kernel on CUDA, fused=None: 0 B; lowmem/optim/bnb_fused.py) only the members below
        # min_quant_size remain
        assert cuda.optimizer_transient < cpu.optimizer_transient
    elif name == "adamw" and not layerwise:
        # (its buckets take torch's fused AdamW kernel on CUDA and the CPU, which allocates nothing:
        # functional.adam.adamw_fused_) what remains is the non-finite check's: on CUDA the multi-tensor
        # norm kernel's partial sums too (engine._all_finite_bytes)
        assert (cpu.optimizer_transient, cuda.optimizer_transient) == (_check_bytes("cpu"), _check_bytes("cuda"))
        assert 0 < cpu.optimizer_transient < cuda.optimizer_transient
    elif name != "microadam":
        assert cpu.optimizer_transient == cuda.optimizer_transient


def test_cpu_estimate_of_the_multi_tensor_adamw_equals_a_real_cpu_optimizer(monkeypatch):
    """With torch's fused AdamW kernel off on the CPU (``FUSED_ON_CPU``), the CPU estimate of ``adamw`` is
    the multi-tensor operations' ``sqrt(v)`` of the largest bucket, as a real CPU optimizer reports; CUDA's
    stays 0 (the kernel)."""
    from lowmem.optim.functional import adam as FA

    monkeypatch.setattr(FA, "FUSED_ON_CPU", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpu = estimate_memory(_config(), "adamw", dtype="fp32", seq_len=16, device="cpu")
        cuda = estimate_memory(_config(), "adamw", dtype="fp32", seq_len=16, device="cuda")
    state, transient = _real_cpu_sizes("adamw", {}, False)
    assert (cpu.optimizer_states, cpu.optimizer_transient) == (state, transient)
    assert cuda.optimizer_transient == _check_bytes("cuda") < cpu.optimizer_transient


def test_device_is_validated_and_recorded():
    assert check_device("cpu") == "cpu" and check_device("cuda:1") == "cuda" and check_device(torch.device("cuda", 0)) == "cuda"
    for bad in ("meta", "tpu", "cuda:x", None, "", "CPU"):
        with pytest.raises(ValueError, match=r"device=.*\['cpu', 'cuda'\]"):
            estimate_memory("tiny", device=bad)
    est = estimate_memory("tiny", "adamw", seq_len=16)
    assert est.settings["device"] == "cuda"  # the documented default: a GPU run
    assert any("device='cuda'" in n for n in est.notes) and "on cuda" in est.table()
    assert DEVICES == ("cpu", "cuda")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_a_7b_cpu_estimate_allocates_nothing():
    from lowmem.optim.step_memory import _reset_peak, _status_kib

    estimate_memory("tiny", "galore_adamw", optim_args={"rank": 16}, device="cpu")  # imports and caches (a rank below the tiny sides)
    _reset_peak()
    before = _status_kib("VmRSS")
    est = estimate_memory("llama-2-7b", "galore_adamw", optim_args={"rank": 128}, device="cpu")
    grown_mib = (_status_kib("VmHWM") - before) / 1024
    assert est.optimizer_states > 3.5 * 2**30 and grown_mib < 100, grown_mib  # 3.9 GiB of state sized, not allocated


def test_budget_cli_sizes_for_the_device(capsys):
    import json

    from lowmem.cli import main

    common = ["budget", "tiny", "--optimizer", "galore_adamw", "--optim-args", "rank=16", "--dtype", "fp32", "--json"]
    out = {}
    for device in ("cpu", "cuda"):
        assert main([*common, "--device", device]) == 0
        out[device] = json.loads(capsys.readouterr().out)
        est = estimate_memory("tiny", "galore_adamw", optim_args={"rank": 16}, dtype="fp32", device=device)
        assert out[device]["settings"]["device"] == device
        assert out[device]["optimizer_transient"] == est.optimizer_transient and out[device]["total"] == est.total
    if MKL:
        assert out["cpu"]["optimizer_transient"] > out["cuda"]["optimizer_transient"]
    assert main(common) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["device"] == "cuda"  # the default
    # --measure: the estimate beside the measurement is for the measured device
    assert main(["budget", "tiny", "--optimizer", "galore_adamw", "--optim-args", "rank=16", "--dtype", "fp32", "--measure",
                 "--device", "cpu", "--seq-len", "16", "--steps", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"] == "cpu" and data["estimate"]["settings"]["device"] == "cpu"
    assert data["estimate"]["optimizer_transient"] == out["cpu"]["optimizer_transient"]


@pytest.mark.skipif(not MKL, reason="MKL's packing buffer: CPU builds with MKL")
def test_measure_table_says_which_part_of_the_transient_is_mkls():
    """``--measure`` on CPU tracks live torch tensors; MKL's GEMM packing buffer, which the CPU estimate counts, is
    not one: the table names it and the ratio without it (galore_adamw rank 16 on the tiny Llama: 1.71 MiB (Intel Xeon) / 0.34 MiB (AMD EPYC) of the estimated
    transient, the rest 240 KiB = measured)."""
    from lowmem.memory.measure import measure_memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = measure_memory("tiny", "galore_adamw", optim_args={"rank": 16}, seq_len=16, steps=2, device="cpu")
    mkl = r.mkl_gemm_pack_bytes()
    from lowmem.optim.functional.galore import kept_pack_bytes  # (MKL's, as on the running CPU)

    svd = r.estimate.details["optimizer_transient_mkl_svd"]  # MKL's SVD buffers: on an AMD CPU only (svd_mkl_bytes)
    assert (svd > 0) == GL.mkl_generic_kernels()
    assert mkl == r.estimate.details["optimizer_transient_mkl_gemm_pack"] + svd and mkl - svd == kept_pack_bytes(16, 128) > 0
    assert r.estimate.optimizer_transient - mkl == estimate_memory(
        "tiny", "galore_adamw", optim_args={"rank": 16}, dtype="fp32", seq_len=16, device="cuda").optimizer_transient
    assert r.ratios()["optimizer_transient_tensors"] == pytest.approx(1.0, abs=0.05), r.table()
    assert "MKL's GEMM packing buffer" in r.table()
    plain = measure_memory("tiny", "adamw", seq_len=16, steps=1, device="cpu")
    assert plain.mkl_gemm_pack_bytes() == 0 and "MKL" not in plain.table() and "optimizer_transient_tensors" not in plain.ratios()
