"""config_support against PaddleFormers: every config field its Llama / ERNIE 4.5 forward (and the nn/ layers they
build from) reads is classified (the PaddleNLP suite checks PaddleNLP's)."""

from __future__ import annotations

import library_reads
from paddle_scorer.compute import config_support


def test_every_field_paddleformers_reads_is_classified():
    missing = library_reads.unclassified(config_support.KNOWN)
    assert not missing, (f"PaddleFormers' forward reads config fields config_support does not classify: "
                         f"{sorted(missing)}; add each to IMPLEMENTED, INERT or CHECKED")
