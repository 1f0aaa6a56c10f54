"""JSON-lines output that reaches a file, a pipe/FIFO or a virtio-serial port, or fails loudly.

Theory of operation
-------------------
The host reads the guest's samples and heartbeats through a virtio-serial character device
(``/dev/virtio-ports/NAME``).  A line must leave the guest as soon as it is produced, because
the guest may hang a moment later, and a line must never vanish silently.  So:

* the target is opened with ``os.open`` (``O_WRONLY``; ``O_CREAT|O_APPEND`` only for regular
  files), and every line is written with ``os.write`` straight to the descriptor: no Python
  buffer to flush, no buffer to lose;
* a short write is continued until the whole line is out;
* ``EAGAIN`` (a non-blocking descriptor, or a port whose host side is not reading yet) waits
  for writability with ``select.poll`` and retries; ``EINTR`` is retried by Python itself
  (PEP 475);
* any other error raises :class:`LineOutError` naming the path and the errno, for the
  caller to report.

``-`` means the process's stdout (or stderr, for heartbeats) descriptor.
"""

from __future__ import annotations

import errno
import json
import os
import select
import stat
import sys
from typing import Any

__all__ = ["LineOutError", "LineWriter"]


class LineOutError(OSError):
    """A line could not be written; the message names the target and the reason."""

    def __str__(self) -> str:
        return str(self.strerror)


class LineWriter:
    """Write whole JSON lines to ``path`` (file, FIFO, pipe or character device).

    Args:
        path: target path, or ``-`` for ``std`` (``stdout`` or ``stderr``).
        std: which standard stream ``-`` means.
        poll_timeout_s: how long one ``EAGAIN`` wait may last before retrying the write.
    """

    def __init__(self, path: str, *, std: str = "stdout", poll_timeout_s: float = 1.0) -> None:
        self.path = path
        self._poll_ms = int(poll_timeout_s * 1000)
        self._owned = path != "-"
        self.lines_written = 0
        if path == "-":
            stream = sys.stdout if std == "stdout" else sys.stderr
            stream.flush()
            self._fd = stream.fileno()
            return
        flags = os.O_WRONLY | os.O_CLOEXEC
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = 0
        if mode == 0 or stat.S_ISREG(mode):
            flags |= os.O_CREAT | os.O_APPEND
        try:
            self._fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise LineOutError(
                exc.errno, f"cannot open {path!r} for writing: {exc.strerror}"
            ) from exc

    def fileno(self) -> int:
        """The descriptor lines are written to."""
        return self._fd

    def write_json(self, obj: dict[str, Any]) -> None:
        """Serialise ``obj`` compactly and write it as one line."""
        self.write_line(json.dumps(obj, separators=(",", ":"), sort_keys=False))

    def write_line(self, line: str) -> None:
        """Write ``line`` plus a newline completely, or raise :class:`LineOutError`."""
        data = memoryview((line + "\n").encode())
        while data:
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                self._wait_writable()
                continue
            except OSError as exc:
                raise LineOutError(
                    exc.errno,
                    f"write to {self.path!r} failed after {self.lines_written} lines: "
                    f"{exc.strerror or errno.errorcode.get(exc.errno or 0, exc)}",
                ) from exc
            data = data[written:]
        self.lines_written += 1

    def _wait_writable(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        events = poller.poll(self._poll_ms)
        for _fd, mask in events:
            if mask & (select.POLLERR | select.POLLNVAL):
                raise LineOutError(
                    errno.EIO, f"write to {self.path!r}: descriptor error (poll mask {mask:#x})"
                )

    def close(self) -> None:
        """Close the descriptor if this writer opened it (``-`` is left open)."""
        if self._owned and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LineWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
