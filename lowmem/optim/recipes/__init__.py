"""Recipes: each paper's optimizer as a short composition of engine parts, plus its registry line.

* :mod:`.full_rank` - AdamW (reference baseline), Adafactor.
* :mod:`.subspace` - GaLore, Fira, FRUGAL, Online Subspace Descent (projected state).
* :mod:`.compressed` - MicroAdam, 8-bit / 4-bit states, SPAM / Stable-SPAM.
* :mod:`.adam_mini` - Adam-mini (one second moment per block: head, row, tensor).
* :mod:`.normalized` - Muon, SCALE, SinkGD (normalized updates of 2-D weights, AdamW elsewhere).
* :mod:`.apollo` - APOLLO, APOLLO-Mini (a new combine-back step on the subspace parts).
* :mod:`.lomo` - LOMO, AdaLomo (update rules fused into the backward pass by layerwise mode).
* :mod:`.badam` - BAdam (block coordinate descent over layers, Adam on the active block).
* :mod:`.lion` - Lion, Lion with an 8-bit momentum (sign of an interpolated momentum).
* :mod:`.normuon` - NorMuon (Muon's step with a neuron-wise second moment).
* :mod:`.sm3` - SM3-II (Adagrad bounded by row / column accumulators).
* :mod:`.racs` - RACS (SGD scaled by row / column mean squares, norm growth limited).
* :mod:`.ademamix` - AdEMAMix, AdEMAMix with 8-bit moments (Adam + a slow EMA mixed in).
* :mod:`.classic` - SGD (momentum, Nesterov), Adagrad, RMSprop (torch.optim's, on the engine).
* :mod:`.stable_adamw` - StableAdamW (AdamW with debiased rates and per-tensor update clipping).

Importing this package registers every recipe.
"""

from . import adam_mini, apollo, bnb, compressed, full_rank, subspace  # noqa: F401  (registration happens on import)
from .full_rank import ADAFACTOR, ADAMW, Adafactor, AdamW
from . import came  # noqa: F401, E402  (CAME)
from . import normalized  # noqa: F401, E402  (Muon, SCALE, SinkGD)
from . import lomo  # noqa: F401, E402  (LOMO, AdaLomo)
from . import badam  # noqa: F401, E402  (BAdam)
from . import subset_norm  # noqa: F401, E402  (AdamSN, AdamSNSM, SGD with Subspace-Momentum)
from . import lion  # noqa: F401, E402  (Lion, Lion8bit)
from . import normuon  # noqa: F401, E402  (NorMuon)
from . import sm3  # noqa: F401, E402  (SM3)
from . import alice  # noqa: F401, E402  (Alice)
from . import racs  # noqa: F401, E402  (RACS)
from . import ademamix  # noqa: F401, E402  (AdEMAMix, AdEMAMix8bit)
from . import classic  # noqa: F401, E402  (SGD, Adagrad, RMSprop: torch.optim's, as transformers' optim names)
from . import stable_adamw  # noqa: F401, E402  (StableAdamW: transformers' optim="stable_adamw")

__all__ = ["ADAFACTOR", "ADAMW", "Adafactor", "AdamW"]
