"""The contract between GVPO/BNPO and TRL's GRPOTrainer: the private methods they override or call, with the
signatures they rely on. TRL changes its private methods between minor versions, so pyproject's `trl` range
covers only versions where this test passes (widen it after running this file on a new version)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

trl = pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402

from lowmem.trainers.bnpo import BNPOTrainer  # noqa: E402
from lowmem.trainers.gvpo import GVPOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

#: GRPOTrainer's private methods GVPO/BNPO override (and call through super()), with the parameter
#: names they are called with.
OVERRIDDEN = {
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],  # GVPO, BNPO
    "_generate_and_score_completions": ["self", "inputs"],  # GVPO, BNPO: reads output["advantages"]
    "_prepare_inputs": ["self", "generation_batch"],  # GVPO: slices whole groups per process
    "_compute_loss": ["self", "model", "inputs"],  # GVPO: its own loss
}

#: Private methods GVPO calls without overriding: name -> leading positional parameters, keyword parameters.
CALLED = {
    "_get_per_token_logps_and_entropies": (
        ["self", "model", "input_ids", "attention_mask", "logits_to_keep"],
        ["pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
         "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids"],
    ),
}

#: Attributes GRPOTrainer.__init__ sets that GVPO/BNPO read or write (reward_func_names: LowMemGRPOTrainer renames
#: functions of one name in it, the metric names TRL logs under).
ATTRIBUTES = ["_buffered_inputs", "_step", "_metrics", "_logs", "reward_func_names"]

#: trl.trainer.utils functions GVPO's _prepare_inputs uses, as GRPOTrainer's does.
UTILS = ["split_pixel_values_by_grid", "split_tensor_dict", "unsplit_pixel_values_by_grid"]


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_overridden_private_methods_exist_with_the_expected_signature(name):
    assert hasattr(GRPOTrainer, name), f"trl {trl.__version__}: GRPOTrainer.{name} is gone"
    params = list(inspect.signature(getattr(GRPOTrainer, name)).parameters)
    assert params == OVERRIDDEN[name], f"trl {trl.__version__}: GRPOTrainer.{name}{params}"


def test_called_private_methods_accept_the_arguments_given():
    for name, (positional, keywords) in CALLED.items():
        params = list(inspect.signature(getattr(GRPOTrainer, name)).parameters)
        assert params[: len(positional)] == positional, (name, params)
        assert set(keywords) <= set(params), (name, sorted(set(keywords) - set(params)))


def test_attributes_and_utils_exist():
    init = inspect.getsource(GRPOTrainer.__init__)
    assert all(f"self.{a} =" in init for a in ATTRIBUTES), [a for a in ATTRIBUTES if f"self.{a} =" not in init]
    import trl.trainer.utils as utils

    assert all(hasattr(utils, f) for f in UTILS)


def test_every_private_override_is_listed():
    """A new override of a GRPOTrainer private method must join the contract above."""
    for cls in (GVPOTrainer, BNPOTrainer):
        private = {n for n, v in vars(cls).items()
                   if n.startswith("_") and not n.startswith("__") and callable(v) and hasattr(GRPOTrainer, n)}
        assert private <= set(OVERRIDDEN), (cls.__name__, sorted(private - set(OVERRIDDEN)))


def test_pyproject_trl_range_is_the_verified_one():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if Requirement(d).name == "trl")
    assert req.specifier.contains(trl.__version__), f"installed trl {trl.__version__} outside {req.specifier}"
    assert any(s.operator == "<" for s in req.specifier), "the trl range needs an upper bound (private API)"
