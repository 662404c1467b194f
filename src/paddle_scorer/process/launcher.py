"""What ``python -m paddle.distributed.launch`` tells a worker through its environment, parsed in one place:
which worker this is (rank, world, local rank, the GPU it was given) and how many workers share this host
(threads and the default memory budget are divided between them). Pure: environment in, numbers out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from paddle_scorer.errors import UsageError


@dataclass(frozen=True)
class Worker:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_size: int = 1
    selected_gpu: int | None = None
    launch: str | None = None  # identifies one launcher run (its endpoints use fresh ports)

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _int(env, *names, default=None):
    for n in names:
        v = env.get(n)
        if v is not None and str(v).strip().lstrip("-").isdigit():
            return int(v)
    return default


def under_launcher(env=None) -> bool:
    env = os.environ if env is None else env
    return "PADDLE_LOCAL_SIZE" in env or "PADDLE_TRAINERS_NUM" in env


def workers_on_host(env=None) -> int:
    """Workers the launcher started on this host (1 outside the launcher); never raises."""
    env = os.environ if env is None else env
    for n in ("PADDLE_LOCAL_SIZE", "PADDLE_TRAINERS_NUM"):
        v = _int(env, n)
        if v is not None and v > 0:
            return v
    return 1


def worker_from_env(env=None) -> Worker:
    env = os.environ if env is None else env
    world = _int(env, "PADDLE_TRAINERS_NUM", "PADDLE_GLOBAL_SIZE", default=1)
    rank = _int(env, "PADDLE_TRAINER_ID", "PADDLE_GLOBAL_RANK", default=0)
    local_rank = _int(env, "PADDLE_LOCAL_RANK", "PADDLE_RANK_IN_NODE", default=0)
    local_size = _int(env, "PADDLE_LOCAL_SIZE", default=1)
    gpus = env.get("FLAGS_selected_gpus")
    selected = int(gpus.split(",")[0]) if gpus and gpus.split(",")[0].isdigit() else None
    if not (0 <= rank < world):
        raise UsageError(f"launcher environment says rank {rank} of {world} workers; that is inconsistent.")
    launch = "|".join(env.get(k, "") for k in ("PADDLE_JOB_ID", "PADDLE_MASTER", "PADDLE_TRAINER_ENDPOINTS")) or None
    return Worker(rank, world, local_rank, local_size, selected, launch if launch.strip("|") else None)
