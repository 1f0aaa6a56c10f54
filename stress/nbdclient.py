"""The nbd-client command line that connects a swap device over NBD.

One builder for both clients the project sets up: the QEMU guest's PID 1
(vm/image/guest_init.py) and a lab machine's swap helper
(ansible/roles/nbd_swap_client/files/swapnbd_nbdswap.py). Standard library only: it is
deployed with the guest tools and beside the lab helper.
"""

from __future__ import annotations

__all__ = ["nbd_client_argv"]


def nbd_client_argv(
    host: str,
    port: int | str,
    device: str,
    export: str,
    *,
    block_size: int = 4096,
    timeout: int = 0,
    connections: int = 1,
    swap: bool = True,
    resident: bool = False,
) -> list[str]:
    """``nbd-client HOST PORT DEVICE -N EXPORT -b BLOCK [-t T] [-C N] [-swap] [-L]``.

    ``timeout`` 0 leaves requests without a timeout (a deadlock stays observable instead
    of turning into I/O errors); ``swap`` asks nbd-client to mlock itself and sets the
    device up for swap (-swap); ``resident`` keeps the 2012-style resident client in
    ioctl mode (-L).
    """
    argv = ["nbd-client", str(host), str(port), device, "-N", str(export), "-b", str(block_size)]
    if int(timeout) > 0:
        argv += ["-t", str(int(timeout))]
    if int(connections) > 1:
        argv += ["-C", str(int(connections))]
    if swap:
        argv.append("-swap")
    if resident:
        argv.append("-L")
    return argv
