"""systemd socket activation: listening sockets handed over as fds 3.. (sd_listen_fds).

Theory of operation: a service manager (systemd, ``systemd-socket-activate``, or
libnbd when a client runs ``nbdinfo [ nbd-serve ... ]``) binds the listening
sockets itself, starts nbd-serve with them as file descriptors 3, 4, ... and sets
``LISTEN_PID`` to nbd-serve's pid and ``LISTEN_FDS`` to their count. nbd-serve
then serves on exactly those sockets and binds nothing of its own. The
variables are removed once read, as sd_listen_fds(unset=1) does, so children
(the workers) never take them for their own.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

__all__ = ["FIRST_FD", "ActivationError", "activation_fds", "listening_sockets"]

#: SD_LISTEN_FDS_START
FIRST_FD = 3


class ActivationError(ValueError):
    """The activation variables are set but unusable; the message says which."""


def activation_fds(env: MutableMapping[str, str], pid: int) -> list[int]:
    """The descriptors passed to ``pid`` (pure apart from ``env``, which loses the variables).

    Returns [] when the variables are absent or meant for another process.

    Raises:
        ActivationError: LISTEN_FDS is not a positive number.
    """
    listen_pid = env.pop("LISTEN_PID", None)
    listen_fds = env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if listen_pid is None or listen_fds is None:
        return []
    if listen_pid.strip() != str(pid):
        return []
    try:
        count = int(listen_fds)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={listen_fds!r} is not a number") from None
    if count < 1:
        raise ActivationError(f"LISTEN_FDS={count}: socket activation passed no socket")
    return list(range(FIRST_FD, FIRST_FD + count))


def listening_sockets(fds: list[int]) -> list[socket.socket]:
    """Socket objects for passed descriptors, each checked to be a listening stream socket.

    Raises:
        ActivationError: a descriptor is not an open listening SOCK_STREAM socket.
    """
    found = []
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"activation fd {fd} is not a socket: {exc}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sock.detach()
            raise ActivationError(f"activation fd {fd} is not a listening stream socket")
        os.set_inheritable(fd, False)
        found.append(sock)
    return found
