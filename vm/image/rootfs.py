"""The guest's root file system: debootstrap bookworm minbase, trimmed, as a raw ext4 image.

Theory of operation: debootstrap installs Debian bookworm (``--variant=minbase``
plus :data:`PACKAGES`) into a directory, from the Debian mirror this host's apt
uses (:func:`debian_mirror`), so a lab behind a local mirror or proxy builds from it;
``$SWAPNBD_MIRROR`` overrides it. The tree is then adjusted for a guest whose PID 1
is ``guest_init.py`` (no init system, no services): hostname, a harmless fstab,
no resolver, a ``poweroff`` command, and no apt caches, documentation or
locales. ``mke2fs -d`` turns it into an ext4 image without loop devices or
mounts; the image is sized to the tree plus a fixed amount of free space and
then checked with ``dumpe2fs`` and ``e2fsck``.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vm.image.progress import Step, run_with_progress

__all__ = [
    "MIRROR_ENV",
    "PACKAGES",
    "SUITE",
    "AptSource",
    "DebootstrapProgress",
    "ImageInfo",
    "RootfsError",
    "customize",
    "debian_mirror",
    "debootstrap",
    "installed_packages",
    "make_image",
    "package_versions",
    "parse_deb822_sources",
    "parse_one_line_sources",
]

SUITE = "bookworm"
VARIANT = "minbase"
#: Environment variable that overrides the mirror read from the host's apt sources.
MIRROR_ENV = "SWAPNBD_MIRROR"
_MIRROR_SCHEMES = ("http://", "https://", "file:/")
PACKAGES: tuple[str, ...] = (
    "python3",
    "nbd-client",
    "kmod",
    "iproute2",
    "procps",
    "e2fsprogs",
    "util-linux",
    # sshd: the lab-client test (tests/ansible) boots this image as an Ansible-managed host.
    # Nothing starts it in the experiment (PID 1 is guest_init.py there).
    "openssh-server",
)
HOSTNAME = "swapnbd-guest"
# The swap experiment puts its swapfile on ext4 on /dev/nbd0, not here; the
# root fs only needs room for logs and small files.
FREE_MIB = 64
MIB = 1024 * 1024
# Trimmed from the tree: nothing in the guest reads them.
TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/cache/debconf/templates.dat-old",
    "var/log",
)

POWEROFF = '''#!/usr/bin/python3
"""poweroff [-f] [-n]: power the guest off now (it has no init system); -n: no sync."""
import ctypes
import os
import sys

if "-n" not in sys.argv[1:]:
    os.sync()
libc = ctypes.CDLL(None, use_errno=True)
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
if libc.reboot(LINUX_REBOOT_CMD_POWER_OFF) != 0:
    sys.exit("poweroff: reboot(POWER_OFF) failed: " + os.strerror(ctypes.get_errno()))
'''


class RootfsError(RuntimeError):
    """The root file system could not be built."""


@dataclass(frozen=True, slots=True)
class AptSource:
    """One ``deb`` source of apt (deb822 stanza or one-line entry)."""

    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    types: tuple[str, ...] = ("deb",)
    enabled: bool = True


def parse_deb822_sources(text: str) -> list[AptSource]:
    """Parse a deb822 ``*.sources`` file (stanzas separated by blank lines)."""
    sources: list[AptSource] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and key:  # continuation line
                fields[key] += " " + line.strip()
                continue
            key, sep, value = line.partition(":")
            if not sep:
                continue
            key = key.strip().lower()
            fields[key] = value.strip()
        if "uris" not in fields or "suites" not in fields:
            continue
        sources.append(
            AptSource(
                uris=tuple(fields["uris"].split()),
                suites=tuple(fields["suites"].split()),
                components=tuple(fields.get("components", "").split()),
                types=tuple(fields.get("types", "deb").split()),
                enabled=fields.get("enabled", "yes").lower() not in ("no", "false", "0"),
            )
        )
    return sources


def parse_one_line_sources(text: str) -> list[AptSource]:
    """Parse one-line ``sources.list`` entries (``deb [opts] URI SUITE COMPONENT...``)."""
    sources: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)  # drop [arch=amd64 signed-by=...]
        words = line.split()
        if len(words) < 3 or words[0] not in ("deb", "deb-src"):
            continue
        sources.append(
            AptSource(
                uris=(words[1],),
                suites=(words[2],),
                components=tuple(words[3:]),
                types=(words[0],),
            )
        )
    return sources


def debian_mirror(
    suite: str = SUITE, etc_apt: Path = Path("/etc/apt"), *, override: str | None = None
) -> str:
    """The Debian mirror to build from: ``override``, else ``$SWAPNBD_MIRROR``, else the
    first enabled ``deb`` URI of the host's apt sources that serves ``suite``.

    The host's sources are ``etc_apt/sources.list.d/*.sources`` (deb822), then the
    one-line ``etc_apt/sources.list`` and ``sources.list.d/*.list``.

    Raises:
        RootfsError: the override is not a URL, or no source serves ``suite`` (the
            message says where it looked and how to give a mirror).
    """
    given = override if override is not None else os.environ.get(MIRROR_ENV) or None
    if given is not None:
        if not given.startswith(_MIRROR_SCHEMES):
            raise RootfsError(
                f"mirror {given!r} is not a URL; give one like http://HOST/debian "
                f"(override or ${MIRROR_ENV})"
            )
        return given.rstrip("/")
    sources: list[AptSource] = []
    listd = etc_apt / "sources.list.d"
    deb822 = sorted(listd.glob("*.sources")) if listd.is_dir() else []
    one_line = [etc_apt / "sources.list"]
    one_line += sorted(listd.glob("*.list")) if listd.is_dir() else []
    for path in deb822:
        sources += parse_deb822_sources(path.read_text(errors="replace"))
    for path in one_line:
        if path.is_file():
            sources += parse_one_line_sources(path.read_text(errors="replace"))
    for source in sources:
        if source.enabled and "deb" in source.types and suite in source.suites and source.uris:
            return source.uris[0].rstrip("/")
    raise RootfsError(
        f"no enabled 'deb' source for {suite} in {etc_apt / 'sources.list'} or "
        f"{listd}/*.sources|*.list ({len(sources)} sources read); add the Debian mirror "
        f"this host should use to apt's sources, or name one with {MIRROR_ENV}=URL "
        f"(e.g. http://HOST/debian)"
    )


def _apt_madison(packages: Sequence[str]) -> str:
    done = subprocess.run(
        ["apt-cache", "madison", *packages], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RootfsError(f"apt-cache madison failed: {done.stderr.strip()}")
    return done.stdout


def split_madison(madison: str) -> dict[str, str]:
    """``apt-cache madison A B`` output -> {package: its lines}."""
    per: dict[str, list[str]] = {}
    for line in madison.splitlines():
        name = line.split("|", 1)[0].strip()
        if name:
            per.setdefault(name, []).append(line)
    return {name: "\n".join(lines) for name, lines in per.items()}


def pick_version(madison: str, mirror: str, suite: str) -> str | None:
    """The version ``apt-cache madison`` lists for ``suite`` on ``mirror`` (or any mirror)."""
    fallback: str | None = None
    for line in madison.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 3:
            continue
        where = cells[2].split()
        if len(where) < 2 or not where[1].startswith(f"{suite}/"):
            continue
        if where[0].rstrip("/") == mirror.rstrip("/"):
            return cells[1]
        fallback = fallback or cells[1]
    return fallback


def package_versions(
    packages: Iterable[str], mirror: str, suite: str = SUITE, *, update: bool = True
) -> dict[str, str]:
    """{package: version in ``suite``} as apt on this host knows them (part of the cache key).

    Runs ``apt-get update`` once if apt does not know a package.

    Raises:
        RootfsError: a package is unknown to apt even after updating.
    """
    wanted = list(packages)

    def lookup() -> dict[str, str | None]:
        per = split_madison(_apt_madison(wanted))
        return {p: pick_version(per.get(p, ""), mirror, suite) for p in wanted}

    found = lookup()
    if update and None in found.values():
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
        found = lookup()
    versions: dict[str, str] = {}
    for package, version in found.items():
        if version is None:
            raise RootfsError(
                f"apt knows no {package!r} in {suite}: check the package name and that {suite} "
                "is in /etc/apt/sources.list(.d)"
            )
        versions[package] = version
    return versions


_NOT_PACKAGES = frozenset({"InRelease", "Release", "Packages", "required", "base", "the"})


class DebootstrapProgress:
    """Turns debootstrap's ``I: ...`` log lines into (detail, fraction)."""

    _VERBS = ("Retrieving", "Validating", "Extracting", "Unpacking", "Configuring")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self._VERBS, 0)
        self.finished = False

    def __call__(self, line: str) -> tuple[str, float | None] | None:
        match = re.match(r"I: (\w+) (\S+)", line)
        if match is None:
            return None
        verb, what = match.groups()
        if verb == "Base" and "successfully" in line:
            self.finished = True
        elif verb in self.counts:
            # Phase lines ("I: Unpacking required packages...", "I: Configuring the base
            # system...") and index files ("I: Retrieving InRelease") are not packages.
            if what.removesuffix("...") in _NOT_PACKAGES:
                return None
            self.counts[verb] += 1
        else:
            return None
        c = self.counts
        total = max(c["Retrieving"], c["Validating"], 1)
        detail = (
            f"{total} packages fetched, {c['Extracting']} extracted, "
            f"{c['Unpacking']} unpacked, {c['Configuring']} configured"
        )
        if self.finished:
            return detail + ", base system installed", 1.0
        if c["Unpacking"] == 0 and c["Configuring"] == 0:
            return detail, 0.15 * min(c["Extracting"] / total, 1.0) if c["Extracting"] else None
        return detail, 0.15 + 0.85 * min((c["Unpacking"] + c["Configuring"]) / (2 * total), 1.0)


def debootstrap(
    target: Path,
    *,
    mirror: str,
    packages: Sequence[str],
    step: Step,
    log: Path,
    deb_cache: Path,
    suite: str = SUITE,
) -> None:
    """Run debootstrap ``--variant=minbase`` into ``target`` (needs root).

    Raises:
        RootfsError: not root, or debootstrap is not installed.
        vm.progress.CommandError: debootstrap failed (the message has its log's tail).
    """
    if os.geteuid() != 0:
        raise RootfsError(
            "building the guest root fs runs debootstrap, which needs root: run as root "
            "(e.g. sudo python -m vm.image) or use a cache dir that already holds the image"
        )
    program = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(program).exists():
        raise RootfsError("debootstrap is not installed (Debian: apt-get install debootstrap)")
    deb_cache.mkdir(parents=True, exist_ok=True)
    argv = [
        program,
        f"--variant={VARIANT}",
        f"--include={','.join(packages)}",
        "--components=main",
        f"--cache-dir={deb_cache.resolve()}",
        suite,
        str(target),
        mirror,
    ]
    env = dict(os.environ)
    env.update(
        DEBIAN_FRONTEND="noninteractive",
        LC_ALL="C",
        PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    )
    run_with_progress(
        argv, step, log=log, on_line=DebootstrapProgress(), env=env, heartbeat="debootstrap"
    )


def customize(root: Path) -> None:
    """Adjust a debootstrap'd tree for the guest (no services, small, hostname, poweroff)."""
    for rel in TRIM:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for rel in ("var/cache/apt/archives/partial", "var/lib/apt/lists/partial", "var/log"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    etc = root / "etc"
    (etc / "hostname").write_text(HOSTNAME + "\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n")
    (etc / "fstab").write_text(
        "# swapnbd guest: the initramfs mounts / from /dev/vda; guest_init.py mounts the rest.\n"
    )
    resolv = etc / "resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.write_text("# swapnbd guest: no name service (the guest talks to 10.0.2.2 only)\n")
    (root / "opt" / "swapnbd").mkdir(parents=True, exist_ok=True)
    poweroff = root / "usr" / "local" / "sbin" / "poweroff"
    poweroff.parent.mkdir(parents=True, exist_ok=True)
    poweroff.write_text(POWEROFF)
    poweroff.chmod(0o755)


def installed_packages(root: Path) -> str:
    """``package version`` lines of every package installed in ``root``."""
    done = subprocess.run(
        ["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W", "-f=${Package} ${Version}\n"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RootfsError(f"dpkg-query on {root} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """Sizes of a root fs image, from ``dumpe2fs -h``."""

    size_bytes: int
    free_bytes: int
    files: int


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes of blocks used, number of inodes) of a directory tree, hard links once."""
    seen: set[tuple[int, int]] = set()
    used = 0
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            count += 1
            used += max(st.st_blocks * 512, 4096 if stat.S_ISDIR(st.st_mode) else 0)
    return used, count + 1


def parse_dumpe2fs(text: str) -> Mapping[str, str]:
    """``dumpe2fs -h`` output -> {field: value}."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not Path(path).exists():
        raise RootfsError(f"{name} is not installed (Debian: apt-get install e2fsprogs)")
    return path


def make_image(
    tree: Path, image: Path, *, free_mib: int = FREE_MIB, label: str = "swapnbd-root"
) -> ImageInfo:
    """``mke2fs -t ext4 -d tree`` into ``image``, with at least ``free_mib`` MiB free.

    Raises:
        RootfsError: mke2fs, dumpe2fs or e2fsck failed, or the free space came out short.
    """
    used, inodes = tree_usage(tree)
    inodes = max(inodes + inodes // 4, inodes + 4096)
    # Journal (16 MiB below 1 GiB) + inode tables (256 B each) + block bitmaps and slack.
    overhead = 16 * MIB + inodes * 256 + used // 20 + 8 * MIB
    size = used + overhead + free_mib * MIB
    for _attempt in range(3):
        size = -(-size // (4 * MIB)) * (4 * MIB)
        if image.exists():
            image.unlink()
        mke2fs = [
            _tool("mke2fs"), "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256",
            "-N", str(inodes), "-m", "0", "-L", label, "-d", str(tree),
            str(image), f"{size // 1024}k",
        ]  # fmt: skip
        done = subprocess.run(mke2fs, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RootfsError(f"mke2fs failed ({done.returncode}): {done.stderr.strip()}")
        info = image_info(image)
        if info.free_bytes >= free_mib * MIB:
            break
        size += free_mib * MIB - info.free_bytes + 8 * MIB
    else:
        raise RootfsError(
            f"{image}: only {info.free_bytes // MIB} MiB free after 3 tries, wanted {free_mib}"
        )
    fsck = subprocess.run(
        [_tool("e2fsck"), "-fn", str(image)], capture_output=True, text=True, check=False
    )
    if fsck.returncode != 0:
        raise RootfsError(f"e2fsck -fn {image} found problems:\n{fsck.stdout}{fsck.stderr}")
    return info


def image_info(image: Path) -> ImageInfo:
    """Size, free space and file count of an ext4 image (``dumpe2fs -h``)."""
    done = subprocess.run(
        [_tool("dumpe2fs"), "-h", str(image)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RootfsError(f"dumpe2fs -h {image} failed: {done.stderr.strip()}")
    fields = parse_dumpe2fs(done.stdout)
    try:
        block = int(fields["Block size"])
        total = int(fields["Block count"]) * block
        free = int(fields["Free blocks"]) * block
        files = int(fields["Inode count"]) - int(fields["Free inodes"])
    except (KeyError, ValueError) as exc:
        raise RootfsError(f"dumpe2fs -h {image}: unexpected output ({exc})") from exc
    return ImageInfo(size_bytes=total, free_bytes=free, files=files)
