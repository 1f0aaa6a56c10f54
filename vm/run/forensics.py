"""Gather the kernel's evidence from a stalled guest, and judge it.

The watch loop's :class:`vm.run.watchdog.StallWatch` decides *when* to look; this module does
the looking, which is I/O: it notes what the host sees of the NBD server (stopped, gone,
or not reading its socket), presses the SysRq keys through QMP (:mod:`vm.run.qmp`), and later
reads what the kernel printed on the console since the stall's first look and judges it
with :mod:`vm.run.evidence`. :meth:`Forensics.confirms` is the early-confirmation rule: the
same deadlock signature in two looks, with no progress in between (the StallWatch ends the
stall as soon as progress resumes, so every look of one stall was taken without progress).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil

from vm.run import evidence, qmp, watchdog

__all__ = ["Forensics", "server_probe"]

#: Signatures that, seen in two looks at one stall, confirm the lockup without waiting.
DECISIVE: Final = frozenset({"memalloc-deadlock", "server-unresponsive"})


def socket_queues(port: int) -> tuple[int, int]:
    """(unsent, unread) bytes on the server's established sockets (host /proc/net/tcp).

    ``unread`` is what the guest sent and the server has not read; ``unsent`` is what the
    server wrote and its peer (QEMU's user network) has not taken yet.
    """
    unsent = unread = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 5 or fields[3] != "01":  # 01: ESTABLISHED
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                tx, rx = fields[4].split(":")
                unsent += int(tx, 16)
                unread += int(rx, 16)
    return unsent, unread


Probe = Callable[[], dict[str, Any] | None]
"""A check of the server: ``{"unresponsive": why, "definitive": bool}``, or None."""


#: A stats line older than this says nothing of the server now (it writes one a second).
STATS_FRESH_S: Final = 5.0


def last_stats_line(path: Path) -> dict[str, Any] | None:
    """The newest complete line of nbd-serve's ``--stats`` file, or None."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read()
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        return obj if isinstance(obj, dict) else None
    return None


def awaits_the_rest(stats_path: Path | None, unread: int) -> bool:
    """Whether nbd-serve's newest stats line, fresh, says it holds part of a request and
    waits for more than the ``unread`` bytes on its socket: its wake mark (SO_RCVLOWAT)
    keeps those unread until the rest comes, so they are the client's stall, not the
    server's (a vanilla guest's sender stuck in tcp_sendmsg mid-request leaves exactly
    that)."""
    line = last_stats_line(stats_path) if stats_path is not None else None
    if line is None:
        return False
    receiving = line.get("receiving")
    t_wall = line.get("t_wall")
    if not isinstance(receiving, dict) or not isinstance(t_wall, int | float):
        return False
    missing = receiving.get("missing_bytes")
    fresh = abs(time.time() - t_wall) <= STATS_FRESH_S
    return fresh and isinstance(missing, int) and missing > unread


def server_probe(
    pid: int, port: int, *, gap_s: float = 1.0, stats_path: Path | None = None
) -> Probe:
    """A check of the server as the host sees it: why it is unresponsive, or None.

    Stopped or exited is definitive; unread bytes are not (see vm.run.evidence.signature).

    Stopped (state T, as SIGSTOP leaves it), exited, or holding the same unread bytes on
    its socket ``gap_s`` apart while it has nothing waiting to go out. A server whose
    replies wait for the guest to take them (unsent bytes) is flow-controlled by the guest,
    not unresponsive: a deadlocked guest stops reading too (seen: 33,580 bytes unread with
    the guest's receive worker blocked on the socket lock its sender held). Nor is one
    whose ``stats_path`` says it waits for the rest of a request (:func:`awaits_the_rest`).
    """

    def probe() -> dict[str, Any] | None:
        try:
            proc = psutil.Process(pid)
            tree = [proc, *proc.children(recursive=True)]
            for p in tree:
                status = p.status()
                if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                    why = f"is stopped (pid {p.pid}, state T): it reads nothing"
                    return {"unresponsive": why, "definitive": True}
                if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    return {"unresponsive": f"has exited (pid {p.pid})", "definitive": True}
        except psutil.NoSuchProcess:
            return {"unresponsive": f"has exited (pid {pid} is gone)", "definitive": True}
        unsent, unread = socket_queues(port)
        if unread == 0 or unsent > 0:
            return None
        time.sleep(gap_s)
        unsent, later = socket_queues(port)
        if later >= unread and unsent == 0 and not awaits_the_rest(stats_path, later):
            why = f"is not reading its socket ({later} bytes unread for {gap_s:g}s)"
            return {"unresponsive": why, "definitive": False}
        return None

    return probe


@dataclass(slots=True)
class _StallLooks:
    offsets: list[int] = field(default_factory=list)
    """The console's size just before each look pressed its keys."""
    looks: list[dict[str, Any]] = field(default_factory=list)


class Forensics:
    """The looks at one run's stalls, and the kernel evidence they gave."""

    def __init__(
        self,
        console: Path,
        qmp_path: Path | None,
        probe: Probe,
        started: float,
        port: int | None = None,
    ) -> None:
        self.console = console
        self.qmp_path = qmp_path
        self.probe = probe
        self.port = port
        self.started = started
        self.stalls: list[_StallLooks] = []
        self.judged: list[tuple[str, str]] = []
        """(signature, why) of each look of the current stall, once judged."""

    def _console_size(self) -> int:
        try:
            return self.console.stat().st_size
        except FileNotFoundError:
            return 0

    def look(self, action: watchdog.Look, now: float) -> dict[str, Any]:
        """Note the server, press the keys; returns the look's record."""
        if action.number == 1:
            self.stalls.append(_StallLooks())
            self.judged = []
        self.stalls[-1].offsets.append(self._console_size())
        record: dict[str, Any] = {
            "number": action.number,
            "keys": action.keys,
            "at_s": round(now - self.started, 1),
        }
        record["server"] = self.probe()
        if self.port:
            unsent, unread = socket_queues(self.port)
            record["socket"] = {"server_unsent": unsent, "server_unread": unread}
        if self.qmp_path is None:
            record["error"] = "no QMP socket"
        else:
            try:
                qmp.sysrq(self.qmp_path, action.keys)
            except (qmp.QmpError, ValueError) as exc:
                record["error"] = str(exc)
        self.stalls[-1].looks.append(record)
        return record

    def _text(self, start: int, end: int | None) -> str:
        try:
            with self.console.open("rb") as f:
                f.seek(start)
                data = f.read() if end is None else f.read(max(0, end - start))
        except FileNotFoundError:
            return ""
        return data.decode(errors="replace")

    def snapshots(self) -> list[evidence.Snapshot]:
        """One snapshot per look of the latest stall: what the console got from that look
        until the next one (nothing, when the guest did not answer the keys)."""
        if not self.stalls:
            return []
        stall = self.stalls[-1]
        ends: list[int | None] = [*stall.offsets[1:], None]
        return [evidence.parse(self._text(a, b)) for a, b in zip(stall.offsets, ends, strict=True)]

    def judge(self, snaps: list[evidence.Snapshot] | None = None) -> list[tuple[str, str]]:
        """(signature, why) per look of the latest stall (``snaps``: already parsed)."""
        if not self.stalls:
            return []
        looks = self.stalls[-1].looks
        parsed = self.snapshots() if snaps is None else snaps
        self.judged = [
            evidence.signature(snap, look.get("server"))
            for snap, look in zip(parsed, looks, strict=False)
        ]
        return self.judged

    def confirms(self) -> bool:
        """The same decisive signature in the two latest looks of this stall."""
        if len(self.judged) < 2:
            return False
        (a, _), (b, _) = self.judged[-2:]
        return a == b and a in DECISIVE

    def kernel_evidence(self) -> dict[str, Any] | None:
        """What run.json's ``evidence`` gets from the latest stall (None: never looked)."""
        if not self.stalls:
            return None
        stall = self.stalls[-1]
        snaps = self.snapshots()
        judged = self.judged or self.judge(snaps)
        # The last look decides; a decisive signature in any look outranks an undecided one.
        signature, why = judged[-1] if judged else ("unknown", "no look was judged")
        for sig, text in judged:
            if sig in DECISIVE and signature not in DECISIVE:
                signature, why = sig, text
        memory = _latest_memory(snaps)
        return {
            "signature": signature,
            "why": why,
            "signatures": [sig for sig, _ in judged],
            "looks": stall.looks,
            "blocked_tasks": evidence.blocked_tasks(snaps),
            "memory": memory.as_dict() if memory is not None else None,
            "sysrq_dumps": [d for s in snaps for d in s.dumps],
        }


def _latest_memory(snaps: list[evidence.Snapshot]) -> evidence.MemoryState | None:
    """The last SysRq-m report of a stall's looks."""
    return next((s.memory for s in reversed(snaps) if s.memory is not None), None)


def pressure(st: watchdog.WatchState, memory: Mapping[str, Any] | None) -> watchdog.Pressure:
    """Swap-out from the samples, and the watermarks from the stall's SysRq-m, if any.

    ``memory`` is the ``memory`` entry of :meth:`Forensics.kernel_evidence`
    (:meth:`vm.run.evidence.MemoryState.as_dict`), so the console is parsed once.
    """
    if not memory:
        return watchdog.Pressure(pswpout=st.pswpout())
    # Swap in use and the zones are separate lines of the report: one may be there
    # without the other (a report cut short, or zone lines this parser did not know).
    return watchdog.Pressure(
        pswpout=st.pswpout(),
        swap_used_kb=memory.get("swap_used_kb"),
        below_high=tuple(memory.get("below_high") or ()) if memory.get("zones") else None,
    )
