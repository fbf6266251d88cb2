"""Memory budgets: estimate a training step's memory by component, measure it, search for configurations that fit.

* :func:`estimate_memory` - weights, quantization constants, gradients, optimizer state,
  activations; built on the meta device, with the optimizer's own ``state_bytes()``.
* :func:`state_bytes_at_scale` - one optimizer's exact state on a real-scale shape (e.g. Llama-2-7B).
* :func:`measure_memory` - run real steps and report what was live at the peak, by component.
* :func:`search_budget` - configurations (optimizer, rank, quantization, checkpointing, batch)
  that fit a budget, ranked by what they give up.
"""

from .activations import llama_activation_bytes
from .estimate import MemoryEstimate, QuantSpec, estimate_memory, state_bytes_at_scale
from .shapes import SHAPES, list_shapes, shape_config

__all__ = ["SHAPES", "MemoryEstimate", "QuantSpec", "estimate_memory", "list_shapes", "llama_activation_bytes", "shape_config", "state_bytes_at_scale"]
