"""run.json: the record of one run, whoever ran it, and the verdict of a finished one.

Two programs run the experiment: ``swapnbd run`` on a QEMU guest (vm/run/experiment.py) and
the lab runner on a bare-metal machine (ansible/roles/swapstress/files/swapnbd_labrun.py).
Both fill one :class:`RunRecord` and write it with :meth:`RunRecord.write`, so run.json
has the same keys wherever it came from (a key a run knows nothing of is ``null``), and
``swapnbd report`` reads both alike. Both judge a swapstress run that finished with
:func:`swapstress_verdict`; a guest that never finished is judged from outside by
vm/run/watchdog.py, which only a host can do.

Standard library only: this module is deployed with the guest tools.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

__all__ = ["FILES", "SCHEMA", "Outcome", "RunRecord", "swapstress_verdict"]

SCHEMA: Final = 1

#: Every file a run leaves beside run.json (created empty when a run fails early).
FILES: Final[Mapping[str, str]] = {
    "vmstat": "vmstat.jsonl",
    "events": "events.jsonl",
    "console": "console.log",
    "server_stats": "server-stats.jsonl",
}


class Outcome(StrEnum):
    """How a run ended (the ``outcome`` field of run.json)."""

    COMPLETED = "completed"
    LOCKUP = "lockup"
    GUEST_CRASH = "guest-crash"
    CORRUPTION = "corruption"
    OOM = "oom"
    ERROR = "error"


def swapstress_verdict(
    result: Mapping[str, Any] | None, exit_code: int | None, *, oom_killed: bool
) -> tuple[Outcome, str]:
    """The outcome of a swapstress run that ended, from its result object (``--json``).

    Corruption wins over everything: a page that came back wrong is the one finding no
    other outcome may hide. ``oom_killed``: the kernel reported an OOM kill during the
    run (its counter or its console), which tells an OOM from any other dead worker.
    """
    if result is None:
        return Outcome.ERROR, f"swapstress exited {exit_code} without writing its result"
    corrupt = int(result.get("corrupt_pages") or 0)
    outcome = result.get("outcome")
    if corrupt > 0 or outcome == "corruption":
        return Outcome.CORRUPTION, f"swapstress found {corrupt} corrupt pages"
    if outcome == "completed":
        return Outcome.COMPLETED, "swapstress completed and verified every page"
    if outcome == "worker-died" and oom_killed:
        return Outcome.OOM, "a swapstress worker was OOM-killed"
    return Outcome.ERROR, f"swapstress ended with outcome {outcome!r} (exit {exit_code})"


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The first ``model name`` in /proc/cpuinfo (x86; None elsewhere or unreadable)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip() or None
    return None


def host_facts() -> dict[str, Any]:
    """What the machine that runs the experiment is, as the run starts: the report's
    header (``swapnbd report``) shows the CPU, its cores and how loaded it was."""
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg": load,
        "started_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


@dataclass(slots=True)
class RunRecord:
    """One run's run.json. Filled as the run goes; written once, by :meth:`write`.

    The first fields are every run's; the rest are known only to some runs (a VM run
    has QEMU, a lab run has ``lab``) and stay ``None`` otherwise.
    """

    schema: int = SCHEMA
    config: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=host_facts)
    kernel: dict[str, Any] = field(default_factory=dict)
    outcome: Outcome | None = None
    outcome_reason: str | None = None
    swapstress: dict[str, Any] | None = None
    swapstress_exit_code: int | None = None
    vmstat_delta: dict[str, Any] = field(default_factory=dict)
    vmstat_rates: dict[str, Any] | None = None
    vmstat_absent: list[str] | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=lambda: dict(FILES))
    #: Where the guest ran: the accelerator, or ``bare-metal``.
    accel: dict[str, Any] | None = None
    #: The guest's (or the lab machine's) settings, memory, CPUs and Python.
    guest: dict[str, Any] | None = None
    # --- a VM run's (vm/run/experiment.py) ----------------------------------------------
    #: Why the host stopped watching (vm.run.record.Ending).
    ending: str | None = None
    #: What the verdict rests on: the console, the stall, the kernel's own evidence.
    evidence: dict[str, Any] | None = None
    swap_device: dict[str, Any] | None = None
    cost: dict[str, Any] | None = None
    server: dict[str, Any] | None = None
    qemu: dict[str, Any] | None = None
    guest_error: dict[str, Any] | None = None
    footprint: dict[str, Any] | None = None
    stalls: list[dict[str, Any]] | None = None
    stall_count: int | None = None
    stall_s_total: float | None = None
    counts: dict[str, Any] | None = None
    last_heartbeat: dict[str, Any] | None = None
    last_sample_vmstat: dict[str, Any] | None = None
    #: The measured outcome, when the arm check overrode it with ``error``.
    outcome_unchecked: str | None = None
    boot_retries: list[dict[str, Any]] | None = None
    interrupted: bool = False
    interrupted_by: str | None = None
    traceback: str | None = None
    # --- a lab run's (swapnbd_labrun.py) ------------------------------------------
    lab: dict[str, Any] | None = None
    oom_kill_delta: int | None = None
    collector_exit: int | None = None

    def judge(self, outcome: Outcome, reason: str) -> None:
        self.outcome = outcome
        self.outcome_reason = reason

    def to_json(self) -> dict[str, Any]:
        """The run.json object: every field, in order (a shallow copy)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def write(self, out: Path) -> dict[str, Any]:
        """Write ``out/run.json`` atomically, creating the run's other files empty if they
        are missing (a run that failed early still has its layout); returns the object."""
        for name in self.files.values():
            (out / name).touch(exist_ok=True)
        obj = self.to_json()
        tmp = out / "run.json.tmp"
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        tmp.replace(out / "run.json")
        return obj
