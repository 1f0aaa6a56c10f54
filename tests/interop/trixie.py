"""Newer NBD clients from a Debian trixie chroot, for protocol features bookworm's lack.

Bookworm's libnbd 1.14 and qemu 7.2 predate NBD extended headers; trixie's libnbd 1.22
and qemu 10.0 negotiate them. Rather than a second machine, the tests build a minimal
trixie root once with ``debootstrap`` and run its ``nbdinfo``/``nbdcopy``/``qemu-img``
with ``chroot``. The chroot shares the host's network namespace, so the tools reach
nbd-serve on ``nbd://127.0.0.1:PORT``. Paths given to a tool must be inside the chroot:
:meth:`TrixieRoot.scratch` hands out a directory there with its in-chroot path.

The root lives in the project's cache, ``trixie-chroot/<key>`` (``~/.cache/swapnbd``
unless ``$SWAPNBD_CACHE`` or ``$XDG_CACHE_HOME`` say otherwise), keyed by the package
list and suite, so changing either builds a fresh one. A build goes into a temporary
directory that is renamed into place only when debootstrap succeeded; a lock file
serializes concurrent builders. Nothing here skips: a missing debootstrap, a non-root
user or a failed build fails the test with what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vm.image.image import default_cache_dir

SUITE = "trixie"
PACKAGES = ("libnbd-bin", "python3-libnbd", "qemu-utils")
#: A build downloads ~60 MB; give a slow mirror time, but not forever.
BUILD_TIMEOUT_S = 1800
#: The project's cache (``$SWAPNBD_CACHE``, ``$XDG_CACHE_HOME/swapnbd`` or
#: ``~/.cache/swapnbd``), beside the guest images.
CACHE = default_cache_dir()


def mirror_url(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror the host's own apt uses (the one known to be reachable).

    Reads ``sources.list`` and ``sources.list.d/*`` (one-line and deb822 formats) and
    returns the first URI whose path ends in ``/debian``; deb.debian.org otherwise.
    """
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        for raw in path.read_text(errors="replace").splitlines():
            line = raw.strip()
            if line.startswith("#"):
                continue
            words = line.split()
            if line.startswith("URIs:"):
                urls = words[1:]
            elif words[:1] == ["deb"]:
                urls = [w for w in words[1:] if "://" in w][:1]
            else:
                continue
            for url in urls:
                if url.rstrip("/").endswith("/debian"):
                    return url.rstrip("/")
    return "http://deb.debian.org/debian"


def cache_key() -> str:
    return hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TrixieRoot:
    """A built trixie root filesystem."""

    path: Path

    def run(
        self, *argv: str, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the chroot, capturing text output (never raises on failure)."""
        chroot_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C"}
        chroot_env.update(env or {})
        return subprocess.run(
            ["chroot", str(self.path), *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env=chroot_env,
        )

    @contextlib.contextmanager
    def scratch(self) -> Iterator[tuple[Path, str]]:
        """A fresh directory inside the chroot: (host path, path as the chroot sees it)."""
        tmp = self.path / "tmp"
        tmp.mkdir(exist_ok=True)
        host = Path(tempfile.mkdtemp(prefix="swapnbd-", dir=tmp))
        try:
            yield host, "/tmp/" + host.name
        finally:
            shutil.rmtree(host, ignore_errors=True)


def build(dest: Path, mirror: str) -> None:
    """debootstrap a minimal trixie with :data:`PACKAGES` into ``dest`` (must not exist)."""
    debootstrap = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else None
    )
    if debootstrap is None:
        pytest.fail(
            "debootstrap is not installed: apt-get install debootstrap (./dev setup does)",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail("building the trixie chroot needs root (debootstrap, chroot)", pytrace=False)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        done = subprocess.run(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(work),
                mirror,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=BUILD_TIMEOUT_S,
        )
        if done.returncode != 0:
            log = work / "debootstrap" / "debootstrap.log"
            detail = log.read_text(errors="replace")[-3000:] if log.exists() else done.stderr
            pytest.fail(
                f"debootstrap {SUITE} from {mirror} failed (exit {done.returncode}):\n{detail}",
                pytrace=False,
            )
        work.rename(dest)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def trixie_root(cache: Path = CACHE) -> TrixieRoot:
    """The cached trixie chroot, built on first use (a few minutes, once per package list)."""
    base = cache / "trixie-chroot"
    base.mkdir(parents=True, exist_ok=True)
    dest = base / cache_key()
    with (base / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "usr" / "bin" / "nbdinfo").exists():
            if dest.exists():
                shutil.rmtree(dest)
            build(dest, mirror_url())
    return TrixieRoot(dest)


if __name__ == "__main__":
    print(trixie_root().path)
