"""One error hierarchy for the whole tool.

Every message is a sentence a user can act on: what is wrong, then what to do next.
Library code raises these; only the CLI turns them into text and exit codes.
"""

from __future__ import annotations


class ScorerError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(ScorerError):
    """The command line or an input file asks for something impossible."""

    exit_code = 2


class NotACheckpointError(ScorerError):
    """A folder holds no model or adapter weights we recognise."""

    exit_code = 3


class CheckpointError(ScorerError):
    """A checkpoint exists but is broken, inconsistent or unsupported."""

    exit_code = 4


class UnsupportedModelError(ScorerError):
    """A real checkpoint of an architecture (or a setting of one) paddle-scorer cannot compute yet: the message names
    what is supported."""

    exit_code = 7


class UnsafeCheckpointError(CheckpointError):
    """A weights file tries to run code (or reference objects) on load."""


class WeightMismatchError(CheckpointError):
    """Weights do not fit the model (missing, unexpected, wrong shape, NaN/inf)."""

    def __init__(self, headline: str, problems: list[str], hint: str = ""):
        self.headline = headline
        self.problems = list(problems)
        self.hint = hint
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        lines = [headline] + [f"  {p}" for p in shown]
        if more > 0:
            lines.append(f"  ... and {more} more")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class DtypeError(ScorerError):
    """The requested compute dtype cannot run on the chosen device."""

    exit_code = 2


class SetupError(ScorerError):
    """The environment lacks something the command needs (paddle, a model library): install it."""

    exit_code = 2


class IncompleteRunError(ScorerError):
    """A sharded run has workers that have not finished."""

    exit_code = 5


class ScoringError(ScorerError):
    """A record could not be scored honestly (non-finite probabilities)."""
