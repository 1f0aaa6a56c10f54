"""The guest kernel's own account of a stall: blocked-task stacks, memory, and a signature.

Theory of operation
-------------------
When the watch loop sees a stall it presses SysRq keys (vm/run/qmp.py) and the guest kernel
prints, on the serial console:

- ``w``, "Show Blocked State": every task in D state (and, by the kernel's own rule, the
  throttled reclaimers, which sleep TASK_KILLABLE and are never reported by the hung-task
  detector), each as a ``task:COMM state:S ... pid:N`` line and a ``Call Trace:``;
- ``t``, "Show State": every task, the same way (it finds a sender that is runnable at the
  moment ``w`` looks, kernel-notes.md §9);
- ``l``, "Show backtrace of all active CPUs": ``NMI backtrace for cpu N`` blocks;
- ``m``, "Show Memory": ``Node 0 DMA32 free:...kB ... min:...kB low:...kB high:...kB``
  per zone (``DMA32 free:...`` without ``CONFIG_NUMA``), ``writeback:N`` pages,
  ``Free swap``/``Total swap``, ``N pages reserved``.

The hung-task detector adds ``INFO: task COMM:PID blocked for more than N seconds.``
with a stack in the same shape. This module is pure: console text in, :class:`Snapshot`
and a :func:`signature` out. :func:`snapshots` splits the console at each ``sysrq: Show
Blocked State`` so that two looks at the same stall can be compared (the early
confirmation rule: the same deadlock signature twice, with no progress in between).

Signatures (``evidence.signature``), in order of trust:

``server-unresponsive``
    the host saw the NBD server stopped, dead or not reading its socket: the guest waits
    on a server that does not answer (decided by the caller, from host facts).
``memalloc-deadlock``
    the 2012 deadlock: the nbd send path (``nbd_send_cmd``/``__sock_xmit``) is waiting
    for memory (``__alloc_pages_slowpath``) while reclaim waits on swap writeback
    (``__swap_writepage``/``pageout``/``mempool_alloc``; 7.x: ``swap_writeout``) or other
    I/O waits behind the sender on a mutex in ``nbd_queue_rq``. On 6.1 and 6.12 the sender
    is a kblockd worker and reclaim waits in writeback; on 7.2 blk-mq issues from the
    submitter itself, so a faulting worker sends, reclaims inside ``tcp_sendmsg``, and
    kswapd's ``swap_writeout`` and the other swap-ins queue behind it on a mutex there.
``throttled``
    reclaimers asleep in ``throttle_direct_reclaim``, and no deadlock stack.
``unknown``
    none of these; the stacks are kept for a reader.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

__all__ = [
    "BlockedTask",
    "MemoryState",
    "Snapshot",
    "Zone",
    "parse",
    "signature",
    "snapshots",
]

_STAMP = re.compile(r"^\s*\[\s*\d+\.\d+\]\s?")
_TASK = re.compile(r"^task:(?P<comm>.+?)\s+state:(?P<state>\S+)\s.*?\bpid:\s*(?P<pid>\d+)")
_HUNG = re.compile(r"^INFO: task (?P<comm>.+):(?P<pid>\d+) blocked for more than (?P<s>\d+) sec")
_NMI = re.compile(r"^NMI backtrace for cpu (?P<cpu>\d+)")
_CPU_LINE = re.compile(r"^CPU: (?P<cpu>\d+) (?:UID: \d+ )?PID: (?P<pid>\d+) Comm: (?P<comm>\S+)")
_FRAME = re.compile(r"^\s*(?P<unreliable>\? )?(?P<fn>[A-Za-z_][\w.]*)\+0x[0-9a-f]+/0x[0-9a-f]+")
# A kernel without CONFIG_NUMA (the project's built 6.1 variants) prints the zone lines
# without the "Node N " prefix: "DMA32 free:3736kB boost:2772kB min:4004kB ...".
_ZONE = re.compile(
    r"^(?:Node (?P<node>\d+) )?(?P<zone>\w+) free:(?P<free>\d+)kB"
    r"(?:.*?\bmin:(?P<min>\d+)kB)?(?:.*?\blow:(?P<low>\d+)kB)?(?:.*?\bhigh:(?P<high>\d+)kB)?"
)
_WRITEBACK = re.compile(r"\bwriteback:(\d+)\b")
_UNEVICTABLE = re.compile(r"\bunevictable:(\d+)\b")
_FREE_SWAP = re.compile(r"^Free swap\s*=\s*(\d+)kB")
_TOTAL_SWAP = re.compile(r"^Total swap\s*=\s*(\d+)kB")
_RESERVED = re.compile(r"^(\d+) pages reserved")
_SYSRQ = re.compile(r"^sysrq: (?P<what>.+)$")
_BLOCKED_HEADER = "Show Blocked State"

#: Frames of the nbd send path (drivers/block/nbd.c).
SEND_FRAMES: Final = frozenset({"nbd_send_cmd", "__sock_xmit", "sock_xmit", "nbd_queue_rq"})
#: Frames of a task that is itself sending on an nbd socket (``nbd_queue_rq`` alone is a
#: task that may be queued on the socket lock behind the sender).
SENDING_FRAMES: Final = frozenset({"nbd_send_cmd", "__sock_xmit", "sock_xmit"})
#: Frames of a task asleep on a mutex (the nbd socket's tx_lock, taken in nbd_queue_rq).
MUTEX_FRAMES: Final = frozenset({"__mutex_lock", "mutex_lock", "__mutex_lock_slowpath"})
#: Frames of a task waiting for a page allocation to succeed.
ALLOC_FRAMES: Final = frozenset(
    {"__alloc_pages_slowpath", "__alloc_pages", "__alloc_pages_noprof", "sk_page_frag_refill"}
)
#: Frames of reclaim waiting on swap writeback (mm/vmscan.c, mm/page_io.c, mm/mempool.c).
WRITEBACK_FRAMES: Final = frozenset(
    {
        "__swap_writepage",
        "swap_writepage",
        "swap_writeout",
        "pageout",
        "mempool_alloc",
        "mempool_alloc_noprof",
    }
)
THROTTLE_FRAME: Final = "throttle_direct_reclaim"
#: The signatures, most trusted first.
SIGNATURES: Final = ("server-unresponsive", "memalloc-deadlock", "throttled", "unknown")


@dataclass(frozen=True, slots=True)
class BlockedTask:
    """One task's stack as the kernel printed it (SysRq w/t, or a hung-task report)."""

    comm: str
    pid: int
    state: str
    """``D``, ``R``, ``S`` ... as printed; ``D`` for a hung-task report; ``cpu`` for SysRq-l."""
    frames: tuple[str, ...]
    """Function names, innermost first; unreliable (``?``) frames are left out, unless the
    kernel marked every frame so (6.12 prints a sleeping task's whole stack with ``?``)."""
    source: str
    """``w``, ``t``, ``l`` or ``hung_task``."""
    workqueue: str | None = None
    reliable: bool = True
    """False when ``frames`` are the kernel's unreliable (``?``) frames, all it printed."""

    def has(self, names: Iterable[str]) -> bool:
        """Whether a frame is one of ``names`` (compiler suffixes such as ``.constprop.0``
        and ``.cold`` ignored: ``__alloc_pages_slowpath.constprop.0`` is the slow path)."""
        return not {base_name(f) for f in self.frames}.isdisjoint(names)


@dataclass(frozen=True, slots=True)
class Zone:
    node: int
    zone: str
    free_kb: int
    min_kb: int | None
    low_kb: int | None
    high_kb: int | None


@dataclass(slots=True)
class MemoryState:
    """What SysRq-m said (the last report in the text)."""

    zones: list[Zone] = field(default_factory=list)
    writeback_pages: int | None = None
    unevictable_pages: int | None = None
    free_swap_kb: int | None = None
    total_swap_kb: int | None = None
    reserved_pages: int | None = None

    @property
    def swap_used_kb(self) -> int | None:
        if self.free_swap_kb is None or self.total_swap_kb is None:
            return None
        return self.total_swap_kb - self.free_swap_kb

    def below(self, mark: str) -> list[str]:
        """Zones whose free memory is below their ``min``/``low``/``high`` watermark."""
        found = []
        for z in self.zones:
            limit = getattr(z, f"{mark}_kb")
            if limit is not None and z.free_kb < limit:
                found.append(f"{z.zone} free {z.free_kb} kB < {mark} {limit} kB")
        return found

    def as_dict(self) -> dict[str, Any]:
        return {
            "zones": [asdict(z) for z in self.zones],
            "below_high": self.below("high"),
            "writeback_pages": self.writeback_pages,
            "unevictable_pages": self.unevictable_pages,
            "swap_used_kb": self.swap_used_kb,
            "total_swap_kb": self.total_swap_kb,
            "reserved_pages": self.reserved_pages,
        }


@dataclass(slots=True)
class Snapshot:
    """Everything one stretch of console text says: stacks, memory, which dumps it holds."""

    tasks: list[BlockedTask] = field(default_factory=list)
    memory: MemoryState | None = None
    dumps: list[str] = field(default_factory=list)
    """The ``sysrq: ...`` headers seen, in order."""


def base_name(frame: str) -> str:
    """``__alloc_pages_slowpath.constprop.0`` -> ``__alloc_pages_slowpath``."""
    return frame.split(".", 1)[0]


def _strip(line: str) -> str:
    return _STAMP.sub("", line.rstrip("\r\n"))


def parse(text: str) -> Snapshot:
    """Parse console text (SysRq dumps and hung-task reports) into one :class:`Snapshot`."""
    snap = Snapshot()
    source = "w"
    current: dict[str, Any] | None = None
    in_trace = False
    memory: MemoryState | None = None

    def close() -> None:
        nonlocal current, in_trace
        if current is not None and (current["frames"] or current["unreliable"]):
            reliable = bool(current["frames"])
            snap.tasks.append(
                BlockedTask(
                    comm=current["comm"],
                    pid=current["pid"],
                    state=current["state"],
                    frames=tuple(current["frames"] if reliable else current["unreliable"]),
                    source=current["source"],
                    workqueue=current.get("workqueue"),
                    reliable=reliable,
                )
            )
        current = None
        in_trace = False

    for raw in text.splitlines():
        line = _strip(raw)
        sysrq = _SYSRQ.match(line)
        if sysrq:
            close()
            what = sysrq.group("what").strip()
            snap.dumps.append(what)
            if what.startswith("Show Blocked"):
                source = "w"
            elif what.startswith("Show State"):
                source = "t"
            elif what.startswith("Show backtrace"):
                source = "l"
            elif what.startswith("Show Memory"):
                memory = MemoryState()
                snap.memory = memory
            continue
        task = _TASK.match(line)
        hung = _HUNG.match(line)
        nmi = _NMI.match(line)
        if task or hung or nmi:
            close()
            if task:
                current = {
                    "comm": task.group("comm").strip(),
                    "pid": int(task.group("pid")),
                    "state": task.group("state"),
                    "source": source,
                    "frames": [],
                    "unreliable": [],
                }
            elif hung:
                current = {
                    "comm": hung.group("comm"),
                    "pid": int(hung.group("pid")),
                    "state": "D",
                    "source": "hung_task",
                    "frames": [],
                    "unreliable": [],
                }
            else:
                current = {
                    "comm": "?",
                    "pid": -1,
                    "state": "cpu",
                    "source": "l",
                    "frames": [],
                    "unreliable": [],
                }
            continue
        if current is not None:
            cpu = _CPU_LINE.match(line)
            if cpu and current["source"] == "l":
                current["comm"], current["pid"] = cpu.group("comm"), int(cpu.group("pid"))
                continue
            if line.startswith("Workqueue:"):
                current["workqueue"] = line.split(":", 1)[1].strip()
                continue
            if line.startswith("Call Trace:"):
                in_trace = True
                continue
            if in_trace:
                marker = line.strip()
                if marker in ("<IRQ>", "<NMI>"):
                    current["irq"] = True  # the interrupt's frames, not the task's
                    continue
                if marker in ("</IRQ>", "</NMI>"):
                    current["irq"] = False
                    continue
                if marker == "<TASK>":
                    continue
                if current.get("irq"):
                    continue
                if line.strip() == "</TASK>":
                    close()
                    continue
                frame = _FRAME.match(line)
                if frame:
                    key = "unreliable" if frame.group("unreliable") else "frames"
                    current[key].append(frame.group("fn"))
                    continue
                if line.strip().startswith(("RIP:", "Code:", "RSP:", "RAX:", "RDX:", "RBP:")):
                    continue
                if line.strip().startswith(("R", "FS:", "CS:", "CR2:", "DR", "PKRU")):
                    continue
                close()
        if memory is not None:
            _memory_line(memory, line)
    close()
    return snap


def _memory_line(memory: MemoryState, line: str) -> None:
    zone = _ZONE.match(line)
    if zone:

        def num(name: str) -> int | None:
            value = zone.group(name)
            return int(value) if value is not None else None

        memory.zones.append(
            Zone(
                node=int(zone.group("node") or 0),
                zone=zone.group("zone"),
                free_kb=int(zone.group("free")),
                min_kb=num("min"),
                low_kb=num("low"),
                high_kb=num("high"),
            )
        )
        return
    for pattern, attr in (
        (_FREE_SWAP, "free_swap_kb"),
        (_TOTAL_SWAP, "total_swap_kb"),
        (_RESERVED, "reserved_pages"),
    ):
        found = pattern.match(line)
        if found:
            setattr(memory, attr, int(found.group(1)))
            return
    # The global line block ("active_anon:... writeback:N ... unevictable:N ...") comes
    # before the per-node lines, which repeat the names in kB: keep the first, in pages.
    if memory.writeback_pages is None and not line.startswith("Node"):
        wb = _WRITEBACK.search(line)
        if wb:
            memory.writeback_pages = int(wb.group(1))
    if memory.unevictable_pages is None and not line.startswith("Node"):
        un = _UNEVICTABLE.search(line)
        if un:
            memory.unevictable_pages = int(un.group(1))


def snapshots(text: str) -> list[Snapshot]:
    """The console split at each SysRq-w: one :class:`Snapshot` per look at the guest.

    Text before the first ``Show Blocked State`` (hung-task reports, say) belongs to the
    first snapshot; ``m``, ``l`` and ``t`` dumps belong to the look they follow.
    """
    lines = text.splitlines()
    starts = [i for i, raw in enumerate(lines) if _BLOCKED_HEADER in raw and "sysrq:" in raw]
    if not starts:
        return [parse(text)] if text.strip() else []
    bounds = [0, *starts[1:], len(lines)]
    return [parse("\n".join(lines[a:b])) for a, b in itertools.pairwise(bounds)]


def senders_waiting_for_memory(tasks: Sequence[BlockedTask]) -> list[BlockedTask]:
    """Stacks sending on an nbd socket (``nbd_send_cmd``/``__sock_xmit``) from inside a
    page allocation. A reclaimer that flushed its plug into ``nbd_queue_rq`` and sleeps
    on the mutex there is queued behind the sender, not sending."""
    return [t for t in tasks if t.has(SENDING_FRAMES) and t.has(ALLOC_FRAMES)]


def writeback_waiters(tasks: Sequence[BlockedTask]) -> list[BlockedTask]:
    """Reclaim stacks waiting on swap writeback (not a sender itself: kswapd in
    ``swap_writeout`` asleep on the socket lock in ``nbd_queue_rq`` waits on writeback)."""
    return [t for t in tasks if t.has(WRITEBACK_FRAMES) and not t.has(SENDING_FRAMES)]


def lock_waiters(tasks: Sequence[BlockedTask]) -> list[BlockedTask]:
    """I/O asleep on a mutex in ``nbd_queue_rq``, not sending: queued behind the sender
    on its socket's lock (not counted again when it waits on writeback)."""
    return [
        t
        for t in tasks
        if t.has({"nbd_queue_rq"})
        and t.has(MUTEX_FRAMES)
        and not t.has(SENDING_FRAMES | WRITEBACK_FRAMES)
    ]


def throttled(tasks: Sequence[BlockedTask]) -> list[BlockedTask]:
    return [t for t in tasks if t.has({THROTTLE_FRAME})]


def _count(tasks: Sequence[BlockedTask]) -> int:
    """Distinct tasks: a look prints a task in SysRq-w and again in SysRq-t."""
    return len({(t.pid, t.comm) for t in tasks})


def _names(tasks: Sequence[BlockedTask], limit: int = 3) -> str:
    names = sorted({t.comm for t in tasks})
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def signature(snap: Snapshot, server: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """``(signature, why)`` for one look at a stalled guest (see the module docstring).

    ``server`` is what the host saw of the NBD server: ``{"unresponsive": why,
    "definitive": bool}``, or None when it was serving. A stopped or exited server
    (definitive) decides at once. A server merely holding unread bytes does not outrank
    the 2012 deadlock's stacks: a guest whose sender waits for memory cannot finish its
    request whatever the server does (and a starved, SCHED_IDLE server reads late).
    """
    why_server = (server or {}).get("unresponsive")
    if why_server and (server or {}).get("definitive"):
        return "server-unresponsive", f"the NBD server {why_server}"
    senders = senders_waiting_for_memory(snap.tasks)
    waiters = writeback_waiters(snap.tasks)
    queued = lock_waiters(snap.tasks)
    if senders and (waiters or queued):
        send = senders[0]
        inner = next(base_name(f) for f in send.frames if base_name(f) in ALLOC_FRAMES)
        what = []
        if waiters:
            what.append(f"{_count(waiters)} task(s) ({_names(waiters)}) wait on swap writeback")
        if queued:
            what.append(
                f"{_count(queued)} task(s) ({_names(queued)}) wait behind it on a mutex "
                "in nbd_queue_rq"
            )
        return (
            "memalloc-deadlock",
            f"the nbd sender {send.comm} waits for memory in {inner} while " + " and ".join(what),
        )
    if why_server:
        return "server-unresponsive", f"the NBD server {why_server}"
    held = throttled(snap.tasks)
    if held:
        return (
            "throttled",
            f"{len(held)} reclaimer(s) ({_names(held)}) asleep in {THROTTLE_FRAME}",
        )
    if not snap.tasks:
        return "unknown", "the kernel printed no task stacks"
    return "unknown", f"{len(snap.tasks)} stacks, none of a known deadlock"


def task_record(task: BlockedTask) -> dict[str, Any]:
    """A blocked task as run.json keeps it."""
    out: dict[str, Any] = {
        "comm": task.comm,
        "pid": task.pid,
        "state": task.state,
        "source": task.source,
        "frames": list(task.frames),
    }
    if task.workqueue:
        out["workqueue"] = task.workqueue
    if not task.reliable:
        out["reliable"] = False
    return out


def blocked_tasks(snaps: Sequence[Snapshot], limit: int = 40) -> list[dict[str, Any]]:
    """The stacks of every look, each task once (its last stack), sender and D state first.

    SysRq-t lists sleeping tasks too, and SysRq-l idle CPUs; only tasks in D state, or on
    the send, allocation, writeback or throttle paths, are kept: the rest (idle kworkers,
    shells, the idle loop) say nothing about the stall.
    """

    def weight(task: BlockedTask) -> int:
        return (
            4 * task.has(SEND_FRAMES)
            + 2 * task.has(ALLOC_FRAMES | WRITEBACK_FRAMES)
            + (task.state == "D" or task.has({THROTTLE_FRAME}))
        )

    latest: dict[tuple[int, str], BlockedTask] = {}
    for snap in snaps:
        for task in snap.tasks:
            if weight(task) == 0:
                continue
            key = (task.pid, task.comm)
            # The latest look wins, unless an earlier one showed more (the sender's path
            # in SysRq-l, where SysRq-t printed only unreliable frames of a running task).
            if key not in latest or weight(task) >= weight(latest[key]):
                latest[key] = task

    def rank(task: BlockedTask) -> tuple[int, str]:
        if task.has(SEND_FRAMES):
            return (0, task.comm)
        if task.state == "D":
            return (1, task.comm)
        return (2, task.comm)

    return [task_record(t) for t in sorted(latest.values(), key=rank)[:limit]]
