"""Debian chroots made with debootstrap, cached by suite and package list.

Theory of operation
-------------------
The host is bookworm and stays so: nothing from a newer suite is ever installed
on it. When the project needs a newer Debian (trixie's NBD clients for the
interop tests, sid's kernel, headers and gcc-16 for ``--kernel 7.2``), it makes
a minimal root with ``debootstrap --variant=minbase --include=PACKAGES SUITE``
and runs the newer tools with ``chroot``. The chroot shares the host's network
namespace, so its apt reaches the same mirror.

A root lives in the project's cache as ``<suite>-chroot/<key>``, the key a hash
of the suite and the package list, so changing either makes a fresh one. A
build goes into a temporary directory renamed into place only when debootstrap
succeeded (an interrupted build leaves only that directory, which the next
build deletes); a lock file serialises builders. :func:`cache_key` and
:func:`mirror_url` are pure; :func:`ensure` does the work.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUILD_TIMEOUT_S",
    "ChrootError",
    "DebianChroot",
    "cache_key",
    "ensure",
    "mirror_url",
]

#: A build downloads 60-200 MB; give a slow mirror time, but not forever.
BUILD_TIMEOUT_S = 1800
_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class ChrootError(RuntimeError):
    """A chroot could not be made or used; the message says what to do."""


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


def cache_key(suite: str, packages: Sequence[str]) -> str:
    """The cache directory name of a chroot: suite and package list, in order.

    >>> cache_key("trixie", ("libnbd-bin", "python3-libnbd", "qemu-utils"))
    '40b99f1b461d'
    """
    return hashlib.sha256(f"{suite} {' '.join(packages)}".encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class DebianChroot:
    """A built root filesystem of one Debian suite."""

    path: Path
    suite: str

    def argv(self, *argv: str) -> list[str]:
        """``argv`` as the host runs it inside this root."""
        return ["chroot", str(self.path), *argv]

    def argv_with_proc(self, *argv: str) -> list[str]:
        """``argv`` inside this root with a ``/proc`` of its own (objtool reads it).

        The proc mount lives in a private mount and PID namespace (``unshare``), so it
        ends with the command and nothing stays mounted in the cache.
        """
        return ["unshare", "--fork", "--pid", f"--mount-proc={self.path}/proc", *self.argv(*argv)]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A clean environment for commands in the root (the host's PATH means nothing there)."""
        env = {"PATH": _PATH, "HOME": "/root", "LANG": "C", "DEBIAN_FRONTEND": "noninteractive"}
        env.update(extra or {})
        return env

    def run(
        self, *argv: str, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the root, capturing text output (never raises on failure)."""
        return subprocess.run(
            self.argv(*argv),
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env=self.env(env),
        )

    def inside(self, host_path: Path) -> str:
        """The path the root sees for ``host_path`` (which must lie under the root)."""
        try:
            return "/" + str(host_path.absolute().relative_to(self.path.absolute()))
        except ValueError as exc:
            raise ChrootError(
                f"{host_path} is not inside the {self.suite} root {self.path}"
            ) from exc

    @contextlib.contextmanager
    def scratch(self) -> Iterator[tuple[Path, str]]:
        """A fresh directory inside the root: (host path, path as the root sees it)."""
        tmp = self.path / "tmp"
        tmp.mkdir(exist_ok=True)
        host = Path(tempfile.mkdtemp(prefix="swapnbd-", dir=tmp))
        try:
            yield host, "/tmp/" + host.name
        finally:
            shutil.rmtree(host, ignore_errors=True)


def _debootstrap() -> str:
    found = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else None
    )
    if found is None:
        raise ChrootError("debootstrap is not installed: apt-get install debootstrap (./dev setup)")
    return found


def build(
    dest: Path, suite: str, packages: Sequence[str], mirror: str, log: Path | None = None
) -> None:
    """debootstrap a minimal ``suite`` with ``packages`` into ``dest`` (must not exist).

    The debootstrap log is kept at ``log`` (beside the root) when given, so a failure names it.
    """
    debootstrap = _debootstrap()
    if os.geteuid() != 0:
        raise ChrootError(f"making the {suite} chroot needs root (debootstrap, chroot)")
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    argv = [
        debootstrap,
        "--variant=minbase",
        f"--include={','.join(packages)}",
        suite,
        str(work),
        mirror,
    ]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT_S
        )
        inner = work / "debootstrap" / "debootstrap.log"
        text = inner.read_text(errors="replace") if inner.exists() else ""
        if log is not None:
            log.write_text(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}\n{text}")
        if done.returncode != 0:
            detail = (text or done.stderr)[-3000:]
            where = f"; log: {log}" if log is not None else ""
            raise ChrootError(
                f"debootstrap {suite} from {mirror} failed (exit {done.returncode}){where}:\n"
                f"{detail}"
            )
        work.rename(dest)
    except subprocess.TimeoutExpired as exc:
        raise ChrootError(
            f"debootstrap {suite} from {mirror} took over {BUILD_TIMEOUT_S} s: a slow mirror?"
        ) from exc
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def ensure(
    cache: Path,
    suite: str,
    packages: Sequence[str],
    *,
    ready: str,
    note: Callable[[str], None] | None = None,
) -> DebianChroot:
    """The cached ``suite`` root with ``packages``, made on first use (minutes, once).

    Args:
        cache: the project's cache directory.
        ready: a path inside the root (e.g. ``usr/bin/nbdinfo``) that exists only
            when the root is complete.
        note: receives a line before a build starts, and when it ends.
    """
    base = cache / f"{suite}-chroot"
    base.mkdir(parents=True, exist_ok=True)
    dest = base / cache_key(suite, packages)
    with (base / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / ready).exists():
            if dest.exists():
                shutil.rmtree(dest)
            mirror = mirror_url()
            if note is not None:
                note(
                    f"debootstrap {suite} ({', '.join(packages)}) into {dest}: a few minutes, once"
                )
            started = time.monotonic()
            build(dest, suite, packages, mirror, log=base / f"{dest.name}.log")
            if note is not None:
                note(f"{suite} chroot ready in {time.monotonic() - started:.0f} s")
    return DebianChroot(dest, suite)
