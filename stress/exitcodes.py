"""swapstress's outcomes and exit codes (the table in :mod:`stress.swapstress`).

Standard library only, like all of ``stress/``: it runs in the guest.
"""

from __future__ import annotations

from typing import Literal

EXIT_OK = 0
EXIT_CORRUPTION = 1
EXIT_USAGE = 2
EXIT_WORKER_DIED = 3
EXIT_INTERRUPTED = 130
EXIT_WORKER_ERROR = 4  # a worker raised; reported as status "error", outcome worker-died

Outcome = Literal["completed", "corruption", "worker-died", "interrupted"]

OUTCOME_EXIT: dict[Outcome, int] = {
    "completed": EXIT_OK,
    "corruption": EXIT_CORRUPTION,
    "worker-died": EXIT_WORKER_DIED,
    "interrupted": EXIT_INTERRUPTED,
}
