"""Our log-probs against a library's forward recorded in tests/fixtures (by tests/fixtures/make_*_fixtures.py,
in that library's environment). Shared by the PaddleNLP suite and tests/formers (imports only numpy and
paddle_scorer, so it works in both virtualenvs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from paddle_scorer.compute.choose_backend import backend_for

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def recorded(name: str):
    """(token-id sequences, the recorded arrays) of one fixture file."""
    data = np.load(FIXTURES / name)
    return json.loads(str(data["sequences"])), data


def max_delta(loaded, reference: str, prefix: str) -> float:
    """Our per-position log-probs and last-row distribution vs a library's recorded forward."""
    seqs, ref = recorded(reference)
    worst = 0.0
    for i, s in enumerate(backend_for(loaded).sequence_logprobs(seqs)):
        worst = max(worst, float(np.nanmax(np.abs(s.token_logprobs - ref[f"{prefix}_token_{i}"]))),
                    float(np.abs(s.next_logprobs - ref[f"{prefix}_last_{i}"]).max()))
    return worst
