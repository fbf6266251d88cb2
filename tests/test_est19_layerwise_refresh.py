"""EST19 (issue 12, residual 3): layerwise stepping with 2 micro-batches of 1 x 8 tokens, tiny Mixtral bf16 (h=64, 2
layers, 4 experts), galore_adamw rank 8: the estimate's tensors were 1.108 of the tracked peak (2,173,028 B for
1,961,572). Not a counting shortcut: the estimate's peak is the first micro-batch's refresh of the fused experts'
basis (``LayerwiseOptimizer._on_gradient``, k == 1: ``refresh_projection`` then ``project``), whose refresh phase is
one expert matrix's float32 gradient copy beside the refresh (65,536 + 339,968 = 405,504 B), exactly the bound the
estimate takes (the parameter's whole step with a refresh: its Adam update and combine-back are smaller). 257,792 B
of that refresh are LAPACK's column-major copy of the matrix and its workspace inside ``gesdd``
(``Projection.untraced_refresh_bytes``): memory of the process, not tensors, so the tracker cannot see them. The
estimate's excess over the tracked tensors (211,456 B) is less than those bytes: over the tracked tensors by the
SVD's kernel memory at most."""

from __future__ import annotations

import warnings

import torch

from test_peakgalore_layerwise_accumulation import _mixtral, _tensor_peak


def _experts_refresh_parts():
    from transformers import AutoModelForCausalLM

    from lowmem import create_optimizer
    from lowmem.optim.engine import matrix_index, matrix_state

    model = AutoModelForCausalLM.from_config(_mixtral(), dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = create_optimizer(model, "galore_adamw", rank=8)
        opt.materialize_state()
    P = opt.recipe.projection
    (group, p), = [(g, p) for g in opt.param_groups for p in g["params"]
                   if opt._is_projected(p, g) and p.ndim == 3 and p.shape[-2] == 256][:1]
    state, shape = opt.state[p], p.shape[-2:]
    one = matrix_state(state, matrix_index(0, p.shape[:-2]))
    return (opt._param_transient_bytes(p, group, state), 4 * shape.numel(), P.transient_bytes(shape, group, one, refresh=True),
            P.untraced_refresh_bytes(shape, group))


def test_the_first_micro_batchs_refresh_phase_is_the_bound():
    whole_step, g32, refresh, untraced = _experts_refresh_parts()
    assert (whole_step, g32, refresh, untraced) == (405_504, 65_536, 339_968, 257_792)
    assert whole_step == g32 + refresh  # the refresh phase (one matrix's float32 copy beside it) is the step's peak


def test_the_estimate_is_over_the_tracked_tensors_by_less_than_the_svds_kernel_memory():
    from lowmem.memory.measure import measure_memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = measure_memory(_mixtral(), "galore_adamw", optim_args={"rank": 8}, batch_size=1, seq_len=8, dtype="bf16",
                           steps=2, device="cpu", layerwise=True, gradient_accumulation_steps=2)
    meas, tensors = r.measured["total"], _tensor_peak(r.estimate, r.mkl_gemm_pack_bytes())
    untraced = _experts_refresh_parts()[3]
    assert meas <= tensors <= meas + untraced, (tensors, meas, untraced, r.table())
