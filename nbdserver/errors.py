"""The error vocabulary of the NBD server.

Every exception the server raises on purpose derives from :class:`NBDServerError`.
Errors that travel on the wire as an NBD error reply derive from :class:`NBDError` and
carry the NBD errno as the class attribute ``errno`` (doc/proto.md, "Error values").
:func:`errno_from_oserror` is the one place an ``OSError`` becomes an NBD errno.
"""

from __future__ import annotations

import enum
import errno as _errno


class NBDErrno(enum.IntEnum):
    """Error values allowed on the wire (doc/proto.md, section "Error values")."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class NBDServerError(Exception):
    """Root of every exception raised by the nbdserver package."""


class ConfigError(NBDServerError):
    """Bad command line or configuration file; the message says what and how to fix it."""


class NBDError(NBDServerError):
    """A request failed; the server answers with ``errno`` and keeps the connection."""

    errno: NBDErrno = NBDErrno.EIO


class PermissionDenied(NBDError):
    """Write-type request on a read-only export."""

    errno = NBDErrno.EPERM


class IOFailure(NBDError):
    """The backend failed to read or write."""

    errno = NBDErrno.EIO


class PartialReply(IOFailure):
    """A read's data failed after its reply header left: ``sent`` bytes of the data are
    on the wire (raised by the sendfile path; the adapter finishes or drops the reply)."""

    def __init__(self, message: str, sent: int, errno: NBDErrno) -> None:
        super().__init__(message)
        self.sent = sent
        self.errno = errno


class InvalidRequest(NBDError):
    """Bad offset/length, unknown command or unknown flag."""

    errno = NBDErrno.EINVAL


class NoSpace(NBDError):
    """Write or write-zeroes beyond the end of the export."""

    errno = NBDErrno.ENOSPC


class Overflow(NBDError):
    """A request too large to serve, e.g. a read longer than the maximum payload."""

    errno = NBDErrno.EOVERFLOW


class NotSupported(NBDError):
    """The operation (e.g. a fast zero) cannot be done as asked."""

    errno = NBDErrno.ENOTSUP


class ShuttingDown(NBDError):
    """The server is shutting down: the client must disconnect (NBD_CMD_DISC)."""

    errno = NBDErrno.ESHUTDOWN


_OSERROR_MAP: dict[int, NBDErrno] = {
    _errno.EPERM: NBDErrno.EPERM,
    _errno.EACCES: NBDErrno.EPERM,
    _errno.EROFS: NBDErrno.EPERM,
    _errno.EIO: NBDErrno.EIO,
    _errno.ENOMEM: NBDErrno.ENOMEM,
    _errno.EINVAL: NBDErrno.EINVAL,
    _errno.ENOSPC: NBDErrno.ENOSPC,
    _errno.EDQUOT: NBDErrno.ENOSPC,
    _errno.EFBIG: NBDErrno.ENOSPC,
    _errno.EOVERFLOW: NBDErrno.EOVERFLOW,
    _errno.ENOTSUP: NBDErrno.ENOTSUP,
    _errno.EOPNOTSUPP: NBDErrno.ENOTSUP,
    _errno.ESHUTDOWN: NBDErrno.ESHUTDOWN,
}


def errno_from_oserror(exc: OSError) -> NBDErrno:
    """Map an ``OSError`` from a backend to the NBD errno sent to the client.

    Unknown errnos become EIO, which the spec names as the general fallback.
    """
    if exc.errno is None:
        return NBDErrno.EIO
    return _OSERROR_MAP.get(exc.errno, NBDErrno.EIO)


def errno_of(exc: BaseException) -> NBDErrno:
    """The NBD errno for any exception a request handler may see."""
    if isinstance(exc, NBDError):
        return exc.errno
    if isinstance(exc, OSError):
        return errno_from_oserror(exc)
    if isinstance(exc, MemoryError):
        return NBDErrno.ENOMEM
    return NBDErrno.EIO
