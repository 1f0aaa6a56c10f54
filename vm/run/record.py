"""Step 6 of a run: the verdict and everything run.json keeps of the guest.

Theory of operation
-------------------
:func:`vm.run.experiment.run_experiment` watches the guest until the watch loop stops with
an :class:`Ending`; :func:`record_run` then reads what the guest left (its last events,
the console, the vmstat samples), has :func:`vm.run.watchdog.classify` give the verdict
and fills the :class:`stress.runrecord.RunRecord`: the outcome and its evidence, the
guest's own report (swapstress, kernel, the arm it had, checked by :func:`check_arm`), the
vmstat summary and the swap device's I/O.  The server's stats summary
(:func:`server_stats_summary`) is taken when the server stops.  This module imports nothing
of :mod:`vm.run.experiment`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from stress.runrecord import FILES, Outcome, RunRecord
from stress.vmstat import summarize
from vm.image import arms, guest_init
from vm.run import forensics, watchdog
from vm.run.config import RunConfig


class Ending(StrEnum):
    """Why the watch loop stopped (the input of the classification, not the verdict)."""

    QEMU_EXITED = "qemu-exited"
    """QEMU exited by itself: the guest powered off or its kernel panicked."""
    SILENT = "silent"
    """No heartbeat and no sample for ``lockup_after_s``: a lockup."""
    STALLED = "stalled"
    """Heartbeats arrive but ``pages_done`` has not grown for ``lockup_after_s``: a lockup."""
    CONFIRMED = "confirmed"
    """A stall whose two looks gave the same deadlock signature: a lockup, on evidence."""
    TIMEOUT = "timeout"
    """The overall limit was reached."""
    NO_POWEROFF = "no-poweroff"
    """The guest sent its result but did not power off within the grace period."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    tail = watchdog.JsonlTail(path)
    return tail.read_new()


def vmstat_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``stress.vmstat.summarize`` plus the guarantee that pgscan_direct_throttle is there."""
    samples = [s for s in samples if s.get("type", "sample") == "sample"]
    summary: dict[str, Any] = (
        dict(summarize(samples)) if samples else {"vmstat_delta": {}, "rates": {}, "absent": []}
    )
    delta = summary.setdefault("vmstat_delta", {})
    if samples and "pgscan_direct_throttle" not in delta:
        first = samples[0].get("vmstat", {})
        last = samples[-1].get("vmstat", {})
        if "pgscan_direct_throttle" in first and "pgscan_direct_throttle" in last:
            delta["pgscan_direct_throttle"] = (
                last["pgscan_direct_throttle"] - first["pgscan_direct_throttle"]
            )
    return summary


def swap_device(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The NBD device's /proc/diskstats over the run, as the guest counted it.

    ``{"name": "nbd0", "interval_s", "reads", "read_ms", "writes", "write_ms", ...}``
    (:data:`stress.procfs.DISKSTATS_FIELDS` but ``in_flight``); the report turns them into
    await and queue depth.  Swap sits on /dev/nbd0 in both swap modes (``vm.image.guest_init``).
    None when the guest's samples had no diskstats or the device did no I/O.
    """
    name = os.path.basename(guest_init.NBD_DEVICE)
    delta = (summary.get("diskstats_delta") or {}).get(name)
    if delta is None:
        return None
    return {"name": name, "interval_s": summary.get("interval_s"), **delta}


def server_stats_summary(path: Path) -> dict[str, Any] | None:
    """Totals from nbd-serve's last stats line (None when there is none)."""
    lines = [r for r in read_jsonl(path) if "exports" in r]
    if not lines:
        return None
    last = lines[-1]
    exports = last.get("exports", {})
    totals: dict[str, int] = {}
    for exp in exports.values():
        for kind, n in (exp.get("requests") or {}).items():
            totals[f"requests_{kind}"] = totals.get(f"requests_{kind}", 0) + int(n)
        for kind, n in (exp.get("bytes") or {}).items():
            totals[f"bytes_{kind}"] = totals.get(f"bytes_{kind}", 0) + int(n)
        for kind, n in (exp.get("errors") or {}).items():
            totals[f"errors_{kind}"] = totals.get(f"errors_{kind}", 0) + int(n)
        # A bug in the server answered a swap request with EIO: never a quiet figure.
        totals["internal_errors"] = totals.get("internal_errors", 0) + int(
            exp.get("internal_errors", 0)
        )
    return {"lines": len(lines), "totals": totals, "connections": last.get("connections")}


def check_arm(run: RunRecord, arm: str) -> None:
    """Hold the run to the arm it asked for, as the guest itself reported it.

    A measurement of the wrong arm is worse than none: when the guest says its
    switches did not take, the outcome becomes ``error`` (the measured one is
    kept as ``outcome_unchecked``).
    """
    proof = run.kernel.get("in_guest")
    reverted = run.kernel.get("fixed_arm") == "vanilla"
    own = run.kernel.get("route") in ("bzimage", "tree")
    ok, why = arms.arm_in_effect(arm, proof, reverted=reverted, own=own)
    run.kernel["arm_check"] = {"ok": ok, "reason": why}
    if not ok and proof is not None and run.outcome is not Outcome.ERROR:
        run.outcome_unchecked = run.outcome
        run.judge(Outcome.ERROR, f"the {arm} arm was not in effect in the guest: {why}")


def record_run(
    cfg: RunConfig,
    run: RunRecord,
    wd: watchdog.Watchdog,
    ending: Ending,
    *,
    qemu_exit: int | None,
    marks: Mapping[str, float],
    t_qemu: float,
    stalls: watchdog.StallWatch | None = None,
    looks: forensics.Forensics | None = None,
) -> None:
    """Step 6: the verdict and everything run.json keeps of the guest."""
    out = cfg.out
    timings = run.timings
    end = time.monotonic()
    list(wd.poll(end))  # whatever arrived in the last moments
    timings["qemu_s"] = round(end - t_qemu, 2)
    timings["phases_s"] = {k: round(v, 2) for k, v in wd.state.phases.items()}
    timings.update({f"mark_{k}_s": round(v - t_qemu, 2) for k, v in marks.items()})
    run.ending = ending.value
    console_path = out / FILES["console"]
    console = console_path.read_text(errors="replace") if console_path.exists() else ""
    st = wd.state
    lockup = ending in (Ending.SILENT, Ending.STALLED, Ending.CONFIRMED)
    kernel_evidence: dict[str, Any] | None = None
    pressure: watchdog.Pressure | None = None
    if lockup and st.phase in watchdog.LOCKUP_PHASES:
        pressure = watchdog.Pressure(pswpout=st.pswpout())
        if looks is not None:
            kernel_evidence = looks.kernel_evidence()
            pressure = forensics.pressure(st, (kernel_evidence or {}).get("memory"))
        stall = stalls.at_stall(st) if stalls is not None else None
        if stall is not None:
            last = st.last_sample or {}
            vm = last.get("vmstat") or {}
            stall.update(pswpout=vm.get("pswpout"), pswpin=vm.get("pswpin"))
            kernel_evidence = {**(kernel_evidence or {}), "stall": stall}
    verdict = watchdog.classify(
        result_event=st.result,
        error_event=st.error,
        lockup=lockup,
        silent_s=st.silent_for(end),
        stalled_s=st.stalled_for(end),
        timed_out=ending is Ending.TIMEOUT,
        qemu_exit=qemu_exit,
        console_text=console,
        phase=st.phase,
        corrupt_seen=st.max_corrupt,
        heartbeats=st.heartbeats,
        heartbeat_silent_s=(
            end - st.last_heartbeat_at if st.last_heartbeat_at is not None else None
        ),
        pressure=pressure,
        kernel=kernel_evidence,
    )
    run.footprint = st.footprint()
    if stalls is not None:
        run.stalls = list(stalls.stalls)
        run.stall_count = len(stalls.stalls)
        run.stall_s_total = round(sum(x["length_s"] for x in stalls.stalls), 1)
    run.judge(verdict.outcome, verdict.reason)
    run.evidence = verdict.evidence
    if st.result is not None:
        run.swapstress = st.result.get("swapstress")
        run.swapstress_exit_code = st.result.get("exit_code")
        timings["stress_s"] = st.result.get("seconds")
    if st.error is not None:
        run.guest_error = {"phase": st.error.get("phase"), "message": st.error.get("message")}
    if st.info is not None:
        run.kernel["guest_release"] = st.info.get("kernel_release")
        run.kernel["cmdline"] = st.info.get("cmdline")
        run.kernel["in_guest"] = st.info.get("arm")
        check_arm(run, cfg.arm)
        run.guest = {k: st.info.get(k) for k in ("settings", "mem_total_bytes", "cpus", "python")}
    samples = read_jsonl(out / FILES["vmstat"])
    summary = vmstat_summary(samples)
    run.vmstat_delta = summary.get("vmstat_delta", {})
    run.vmstat_rates = summary.get("rates", {})
    run.vmstat_absent = summary.get("absent", [])
    run.swap_device = swap_device(summary)
    run.counts = {
        "samples": len(samples),
        "heartbeats": st.heartbeats,
        "events": st.events,
        "bad_lines": wd.events.bad_lines + wd.samples.bad_lines,
    }
    run.last_heartbeat = st.last_heartbeat
    run.last_sample_vmstat = (st.last_sample or {}).get("vmstat")
