"""Issue 12, FOUND_QUANTEXACT 6: a projected parameter with 8-bit moments (galore_adamw8bit, fira_adamw8bit,
frugal8bit) stepped alone (layerwise mode's ``step_param``) allocates what the engine reports, traced. Before the
engine counted projected parameters phase by phase (26d9ac8, ``subspace.projected_alone_bytes``), the quantized
moment rule's whole transient (both moments decoded, the codec's workspace) was counted beside the combine-back,
where only its 4 B-per-element direction is alive: (2000, 128) float32 whole, rank 16, steady step reported
1,824,500 for 1,280,000 traced (galore_adamw8bit), 4,896,500 for 4,352,004 (fira_adamw8bit) and for 3,328,000
(frugal8bit); now equal. The first step also makes the codecs' process-wide tables (``Quantized.cached_bytes``,
counted once by the estimator), so the steps compared are the second (steady) and third (a refresh)."""

import pytest
import torch

from test_galoreexact_per_parameter import RECIPES, _traced_steps


@pytest.mark.parametrize("chunk", ["default", None], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["galore_adamw8bit", "fira_adamw8bit", "frugal8bit"])
def test_projected_8bit_step_allocates_what_the_engine_reports(name, dtype, chunk, monkeypatch):
    monkeypatch.setitem(RECIPES, name, {})  # (default min_quant_size: compared with the whole parameter's size)
    peaks, steady, any_step, (meta, mp) = _traced_steps(name, (300, 128), 16, dtype, chunk)
    state = meta.state[mp]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.uint8  # (the moments are coded)
    engine_steady = meta._transient_bytes(True, steady=True) - meta._kept_gemm_bytes()
    assert peaks[1] == steady == engine_steady
    assert any_step == max(peaks[1:])  # (the refresh step: without the SVD's LAPACK workspace, invisible to the trace)
