"""Children that die with the harness, whatever kills it (issue 9 §4 "No orphans").

Theory of operation
-------------------
A ``swapnbd run`` killed with SIGKILL cannot stop anything itself, and a QEMU or NBD
server left behind spins at full CPU and skews every run after it.  So the children are
tied to the harness from their side:

* :func:`die_with_parent` is a ``preexec_fn`` that sets ``PR_SET_PDEATHSIG``: the kernel
  sends the child a signal when its parent dies.  Linux fires it when the *thread* that
  forked the child exits, not the process, so it is only used when forking from the main
  thread (:func:`parent_death_signal` returns None otherwise).
* A child that daemonizes (nbd-server forks into the background, and the flag is cleared
  across fork) cannot carry the flag.  :func:`guard` starts a small watcher,
  ``python -m peers.lifeline PID...``, which does carry it and, when the harness dies, stops
  the given processes and everything they forked (SIGTERM, then SIGKILL).
* nbd-serve and nbdkit watch their parent themselves (``--exit-with-parent``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import psutil

PR_SET_PDEATHSIG = 1
GRACE_S = 5.0


def _set_pdeathsig(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when the forking thread exits."""
    parent = os.getpid()

    def preexec() -> None:
        _set_pdeathsig(sig)
        # The parent may have died between fork and prctl: then no signal would come.
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def parent_death_signal(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """:func:`die_with_parent`, or None when not called from the main thread (where the
    signal would fire as soon as this thread ends, not when the process does)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return die_with_parent(sig)


def guard(pids: Sequence[int]) -> subprocess.Popen[bytes]:
    """Start a watcher that stops ``pids`` (and their children) when this process dies.

    The watcher exits by itself once all of them are gone, so it never outlives them;
    stop it earlier with ``.terminate()`` only after the pids themselves are stopped.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "peers.lifeline", str(os.getpid()), *map(str, pids)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509 - async-signal-safe enough
    )


def _tree(pids: Sequence[int]) -> list[psutil.Process]:
    procs: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
    return procs


def stop_tree(pids: Sequence[int], grace_s: float = GRACE_S) -> None:
    """SIGTERM ``pids`` and their descendants, then SIGKILL what is left after ``grace_s``."""
    procs = _tree(pids)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def _watch(parent: int, pids: list[int]) -> int:
    """Body of the watcher: wait for the parent's death (or SIGTERM from PDEATHSIG)."""
    fired = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: fired.set())
    pidfd: int | None = None
    with contextlib.suppress(OSError):
        pidfd = os.pidfd_open(parent)
    while not fired.is_set():
        if os.getppid() != parent:  # the parent died before or while we got here
            break
        if not any(psutil.pid_exists(p) for p in pids):
            return 0  # nothing left to guard
        if pidfd is not None:
            if select.select([pidfd], [], [], 1.0)[0]:
                break
        else:
            time.sleep(1.0)
    stop_tree(pids)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m peers.lifeline PARENT PID...`` (started by :func:`guard`)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or not all(a.isdigit() for a in args):
        print("usage: python -m peers.lifeline PARENT_PID PID...", file=sys.stderr)
        return 2
    return _watch(int(args[0]), [int(a) for a in args[1:]])


if __name__ == "__main__":
    sys.exit(main())
