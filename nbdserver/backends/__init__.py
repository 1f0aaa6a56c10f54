"""Storage backends: the :class:`Backend` protocol and :func:`open_backend`.

``open_backend("file", path=...)`` serves a regular file or block device
(:mod:`nbdserver.backends.file`); ``open_backend("memory", size=...)`` a sparse RAM disk
(:mod:`nbdserver.backends.memory`). Both raise :class:`~nbdserver.errors.ConfigError` with a
message fit for the user when the configuration is wrong.

Read-only is enforced twice: the transmission layer refuses write-type requests before
they reach a backend, and a read-only backend raises
:class:`~nbdserver.errors.PermissionDenied` (EPERM) from ``pwrite``/``trim``/``zero``
anyway, so a missed check can never turn into EBADF/EIO or a write.
"""

from __future__ import annotations

from typing import Final

from nbdserver.backends.base import Backend, Capabilities, Extent
from nbdserver.backends.file import FileBackend, open_file
from nbdserver.backends.memory import MemoryBackend, open_memory
from nbdserver.errors import ConfigError

__all__ = [
    "KINDS",
    "Backend",
    "Capabilities",
    "Extent",
    "FileBackend",
    "MemoryBackend",
    "open_backend",
]

#: Backend kinds accepted by :func:`open_backend`.
KINDS: Final = ("file", "memory")


def open_backend(
    kind: str,
    *,
    path: str | None = None,
    size: int | None = None,
    read_only: bool = False,
) -> Backend:
    """Open the storage behind an export.

    Args:
        kind: ``"file"`` (needs ``path``) or ``"memory"`` (needs ``size``).
        path: regular file or block device for ``"file"``; its size is the export size.
        size: export size in bytes for ``"memory"`` (see :func:`nbdserver.sizes.parse_size`).
        read_only: open read-only; write-type calls raise PermissionDenied.

    Raises:
        ConfigError: unknown kind, missing or extra argument, or an unusable path/size.
    """
    if kind == "file":
        if size is not None:
            raise ConfigError(
                "the file backend takes its size from the file; do not give a size"
                " (resize the file with `truncate -s SIZE PATH` instead)"
            )
        if path is None:
            raise ConfigError("the file backend needs a path to a regular file or block device")
        return open_file(path, read_only=read_only)
    if kind == "memory":
        if path is not None:
            raise ConfigError(f"the memory backend takes a size, not a path (got {path!r})")
        if size is None:
            raise ConfigError("the memory backend needs a size, e.g. --memory 1G")
        return open_memory(size, read_only=read_only)
    raise ConfigError(f"unknown backend kind {kind!r}; choose one of: {', '.join(KINDS)}")
