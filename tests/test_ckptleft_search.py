"""``search_budget``'s ``top``: ``None`` keeps every candidate, an integer >= 1 the best ``top``; ``0`` or a
negative number is a ``ValueError`` naming ``top`` and the valid range (it meant "all" in the library while
``lowmem budget --top 0`` was refused)."""

import pytest

from lowmem.memory.search import search_budget

KW = dict(seq_len=16, batch_size=2, dtype="fp32", device="cpu", optimizers=["adamw", "adafactor"], lora_ranks=(4,),
          checkpointing=(False,), layerwise=(False,))


@pytest.mark.parametrize("top", [0, -1, -5, True, 2.0])
def test_top_zero_or_negative_is_refused(top):
    with pytest.raises(ValueError, match=r"top=.*None \(every candidate\) or an integer >= 1"):
        search_budget("tiny", "1TiB", top=top, **KW)


def test_top_none_keeps_every_candidate_and_k_the_best_k():
    every = search_budget("tiny", "1TiB", **KW)
    assert len(every) >= 3
    for k in (1, 2, len(every) + 3):
        best = search_budget("tiny", "1TiB", top=k, **KW)
        assert [c.settings for c in best] == [c.settings for c in every[:k]]
