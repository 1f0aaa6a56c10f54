"""Newer NBD clients from a Debian trixie chroot, for protocol features bookworm's lack.

Bookworm's libnbd 1.14 and qemu 7.2 predate NBD extended headers; trixie's libnbd 1.22
and qemu 10.0 negotiate them. Rather than a second machine, the tests use a minimal
trixie root (:mod:`vm.image.chroot`, shared with the sid root that builds ``--kernel
7.2``'s modules) and run its ``nbdinfo``/``nbdcopy``/``qemu-img`` with ``chroot``. The
chroot shares the host's network namespace, so the tools reach nbd-serve on
``nbd://127.0.0.1:PORT``. Paths given to a tool must be inside the chroot:
``TrixieRoot.scratch`` hands out a directory there with its in-chroot path.

The root lives in the project's cache, ``trixie-chroot/<key>``, keyed by the package
list and suite. Nothing here skips: a missing debootstrap, a non-root user or a failed
build fails the test with what to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vm.image import chroot
from vm.image.image import default_cache_dir

SUITE = "trixie"
PACKAGES = ("libnbd-bin", "python3-libnbd", "qemu-utils")
#: The project's cache (``$SWAPNBD_CACHE``, ``$XDG_CACHE_HOME/swapnbd`` or
#: ``~/.cache/swapnbd``), beside the guest images.
CACHE = default_cache_dir()
TrixieRoot = chroot.DebianChroot
mirror_url = chroot.mirror_url


def cache_key() -> str:
    return chroot.cache_key(SUITE, PACKAGES)


def trixie_root(cache: Path = CACHE) -> TrixieRoot:
    """The cached trixie chroot, built on first use (a few minutes, once per package list)."""
    try:
        return chroot.ensure(cache, SUITE, PACKAGES, ready="usr/bin/nbdinfo")
    except chroot.ChrootError as exc:
        pytest.fail(str(exc), pytrace=False)


if __name__ == "__main__":
    print(trixie_root().path)
