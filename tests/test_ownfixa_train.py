"""OWNFIXA (session 18): GRPO generation_kwargs that shadow GRPOConfig fields (FOUND_OWNDATA18 6)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("gk, named", [({"eos_token_id": 2}, "tokenizer's eos"), ({"do_sample": False}, "do_sample"),
                                       ({"min_p": 0.1}, "training_args.min_p")])
def test_generation_kwargs_shadowing_fields_are_refused(gk, named):
    from lowmem.config import ConfigError
    from lowmem.train import check_generation_kwargs

    with pytest.raises(ConfigError, match=named):
        check_generation_kwargs({"generation_kwargs": gk})


def test_generation_kwargs_trl_does_not_set_pass():
    from lowmem.train import check_generation_kwargs

    check_generation_kwargs({"generation_kwargs": {"no_repeat_ngram_size": 3, "do_sample": True}})
    check_generation_kwargs({"temperature": 0.5})
