"""Talk to a running QEMU over its QMP socket: enough to press SysRq keys in a stuck guest.

A deadlocked guest cannot be asked to write ``/proc/sysrq-trigger``, but its keyboard
still interrupts it: QMP ``send-key`` with ``alt``, ``sysrq`` and a letter reaches the
built-in i8042/atkbd driver of Debian's cloud kernels (kernel-notes.md §9), and the
kernel prints the dump on the serial console, which QEMU writes to ``console.log``.
The guest must boot with ``sysrq_always_enabled``: the cloud kernels' default mask has
no dump bit.

The client is blocking and short-lived (connect, negotiate, send, close) so that the
watch loop stays a plain loop; every call has a timeout and failures are
:class:`QmpError` with the reason.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["QmpError", "send_keys", "sysrq"]

#: The SysRq keys of a stall dump: w blocked tasks, m memory, l CPUs' backtraces, t all tasks.
SYSRQ_KEYS = frozenset("wmlt")


class QmpError(RuntimeError):
    """QEMU's QMP socket did not answer as expected (the message says what)."""


class _Session:
    def __init__(self, path: Path, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise QmpError(f"cannot connect to QMP at {path}: {exc}") from exc
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _message(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except OSError as exc:
                raise QmpError(f"QMP read failed: {exc}") from exc
            if not chunk:
                raise QmpError("QMP closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise QmpError(f"QMP sent a line that is not JSON: {line[:200]!r}") from exc
        if not isinstance(obj, dict):
            raise QmpError(f"QMP sent {obj!r}, not an object")
        return obj

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise QmpError(f"QMP write failed: {exc}") from exc
        while True:
            reply = self._message()
            if "event" in reply:
                continue  # asynchronous events may come before the reply
            if "error" in reply:
                raise QmpError(f"QMP {command} failed: {reply['error']}")
            if "return" in reply:
                return reply["return"]
            raise QmpError(f"QMP {command}: unexpected reply {reply!r}")

    def negotiate(self) -> None:
        greeting = self._message()
        if "QMP" not in greeting:
            raise QmpError(f"QMP greeting expected, got {greeting!r}")
        self.execute("qmp_capabilities")


def send_keys(path: Path, chords: Iterable[Sequence[str]], *, timeout: float = 5.0) -> None:
    """Press each chord (keys held together, as QEMU qcodes) in order, in one session."""
    session = _Session(path, timeout)
    try:
        session.negotiate()
        for chord in chords:
            keys = [{"type": "qcode", "data": key} for key in chord]
            session.execute("send-key", {"keys": keys})
    finally:
        session.close()


def sysrq(path: Path, keys: str, *, gap_s: float = 0.5, timeout: float = 5.0) -> None:
    """Alt-SysRq-KEY for each letter of ``keys``, ``gap_s`` apart (the dumps do not interleave).

    Raises:
        ValueError: a key is not one of the dump keys (w, m, l, t).
        QmpError: QEMU did not take the keys.
    """
    bad = sorted(set(keys) - SYSRQ_KEYS)
    if bad or not keys:
        raise ValueError(f"SysRq keys must be some of {''.join(sorted(SYSRQ_KEYS))}, got {keys!r}")
    for i, key in enumerate(keys):
        if i:
            time.sleep(gap_s)
        send_keys(path, [("alt", "sysrq", key)], timeout=timeout)
