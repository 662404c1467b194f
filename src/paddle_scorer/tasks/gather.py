"""``gather``: assemble the output of a ``paddle.distributed.launch`` run from its workers' verified part files (the
launcher's last worker does this itself; this is the same, by hand), with the metrics of a classify output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Gathered:
    world: int | None
    status: list[dict]  # per rank: rank, state, path, meta
    meta: dict | None  # the assembled output's provenance; None while a part is missing or running

    @property
    def unfinished(self) -> list[int]:
        return [s["rank"] for s in self.status if s["state"] != "complete"]


def gather_output(output: Path) -> Gathered:
    from paddle_scorer.runs.sharding import gather, part_status
    from paddle_scorer.tasks.metrics import Collector

    world, status = part_status(output)
    return Gathered(world, status, gather(output, Collector))
