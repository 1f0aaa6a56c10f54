"""The guest's initramfs: busybox, the kernel modules the guest needs, the payload.

Theory of operation: the archive is written here, in Python, as a gzip'd
``newc`` cpio with fixed owners and mtimes, so the same inputs give the same
bytes and device nodes need no ``mknod`` on the host. Its ``/init`` is a
busybox shell script (:func:`init_script`) that:

1. mounts /proc, /sys and devtmpfs on /dev;
2. ``insmod``\\s the modules, dependencies first, as computed on the host from
   modules.dep (:func:`vm.image.kernel.module_load_order`), decompressed on the host,
   each with the ``MODULE.param=value`` words of the kernel command line as its
   parameters (what modprobe would do; ``nbd.memalloc=0`` picks the arm). An
   *optional* module is loaded only when its trigger word is on the command
   line (the no-throttle livepatch: ``pfmemalloc_throttle=0``);
3. waits for /dev/vda and mounts it (ext4, rw) on /newroot;
4. mounts a tmpfs on /newroot/opt/swapnbd and copies the payload there
   (``stress/`` and ``guest_init.py``);
5. moves /proc, /sys and /dev into the new root and runs
   ``switch_root /newroot /usr/bin/python3 /opt/swapnbd/guest_init.py ARGS``,
   or ``switch_root /newroot CMD ARGS`` when the kernel command line has
   ``swapnbd.init=CMD``. ARGS are the words after ``--`` on the kernel command
   line (the kernel hands them to init), so a test can boot with
   ``swapnbd.init=/bin/sh -- -c "uname -r; lsmod"``.

Any failure prints ``SWAPNBD-INITRAMFS-ERROR: <what>`` on the console and
powers off, so QEMU exits instead of hanging.
"""

from __future__ import annotations

import gzip
import lzma
import shlex
import stat
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ERROR_MARKER",
    "CpioEntry",
    "InitramfsError",
    "decompress_module",
    "init_script",
    "payload_files",
    "write_cpio",
]

ERROR_MARKER = "SWAPNBD-INITRAMFS-ERROR:"
GUEST_DIR = "/opt/swapnbd"
DEFAULT_INIT = ("/usr/bin/python3", f"{GUEST_DIR}/guest_init.py")
# The guest's PID 1 gets this PATH (the kernel gives init none).
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# TCG on a busy 2-core host can take a while to probe virtio-blk.
ROOT_WAIT_S = 60


class InitramfsError(RuntimeError):
    """The initramfs could not be built (bad payload, unreadable module ...)."""


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One member of a newc cpio archive."""

    name: str
    """Path inside the archive, without a leading slash (``bin/busybox``)."""
    mode: int
    """Full st_mode, type bits included (``stat.S_IFREG | 0o755``)."""
    data: bytes = b""
    """File contents, or the target of a symlink."""
    rdev: tuple[int, int] = (0, 0)
    """(major, minor) of a device node."""


def _header(ino: int, entry: CpioEntry, nlink: int) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        nlink,
        0,  # mtime: fixed, for reproducible archives
        len(entry.data),
        0,  # dev major
        0,  # dev minor
        entry.rdev[0],
        entry.rdev[1],
        len(name),
        0,  # check (unused by newc)
    )
    head = b"070701" + b"".join(f"{value:08X}".encode() for value in fields)
    return head + name + b"\0" * (-(len(head) + len(name)) % 4)


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise ``entries`` as an uncompressed newc cpio archive (with trailer)."""
    out = bytearray()
    seen: set[str] = set()
    for ino, entry in enumerate(entries, start=1):
        if entry.name in seen or entry.name.startswith("/") or not entry.name:
            raise InitramfsError(f"bad or duplicate cpio member name {entry.name!r}")
        seen.add(entry.name)
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        out += _header(ino, entry, nlink)
        out += entry.data + b"\0" * (-len(entry.data) % 4)
    out += _header(0, CpioEntry(name="TRAILER!!!", mode=0), 1)
    return bytes(out)


def decompress_module(path: Path) -> bytes:
    """Read a .ko, .ko.xz, .ko.gz or .ko.zst file and return the plain ELF module."""
    name = path.name
    try:
        if name.endswith(".ko"):
            data = path.read_bytes()
        elif name.endswith(".ko.xz"):
            data = lzma.decompress(path.read_bytes())
        elif name.endswith(".ko.gz"):
            data = gzip.decompress(path.read_bytes())
        elif name.endswith(".ko.zst"):
            data = subprocess.run(
                ["zstd", "-dcq", str(path)], capture_output=True, check=True
            ).stdout
        else:
            raise InitramfsError(f"not a kernel module: {path}")
    except FileNotFoundError as exc:
        raise InitramfsError(
            f"cannot decompress {path}: {exc} (for .zst: apt-get install zstd)"
        ) from exc
    except (lzma.LZMAError, OSError, subprocess.CalledProcessError) as exc:
        raise InitramfsError(f"cannot decompress {path}: {exc}") from exc
    if not data.startswith(b"\x7fELF"):
        raise InitramfsError(f"{path} does not decompress to an ELF module")
    return data


def payload_files(source: Path) -> list[tuple[str, Path]]:
    """The guest payload under a source tree: [(path under /opt/swapnbd, file)].

    ``source/stress/*.py`` become ``stress/*.py`` and ``source/vm/image/guest_init.py``
    becomes ``guest_init.py``.

    Raises:
        InitramfsError: the payload is missing (the message says what to create).
    """
    guest_init = source / "vm" / "image" / "guest_init.py"
    stress = source / "stress"
    missing = []
    if not guest_init.is_file():
        missing.append(str(guest_init))
    if not (stress / "__init__.py").is_file():
        missing.append(str(stress / "__init__.py"))
    if missing:
        raise InitramfsError(
            "guest payload missing: " + ", ".join(missing) + f" (payload source dir: {source}; "
            "the guest needs vm/image/guest_init.py and the stress/ package)"
        )
    files = [(f"stress/{p.name}", p) for p in sorted(stress.glob("*.py")) if p.is_file()]
    files.append(("guest_init.py", guest_init))
    return files


def init_script(modules: Sequence[str], optional: Mapping[str, str] | None = None) -> str:
    """The initramfs ``/init``; ``modules`` are file names under /lib/modules, in load order.

    ``optional`` maps a module file to the command-line word that makes the init
    load it; without that word it is skipped.
    """
    default_init = " ".join(shlex.quote(word) for word in DEFAULT_INIT)
    module_words = " ".join(shlex.quote(m) for m in modules)
    triggers = optional or {}
    for name, word in triggers.items():
        if name not in modules or not word or any(c.isspace() or c in "'\"$`\\" for c in word):
            raise InitramfsError(
                f"optional module {name!r} needs a plain trigger word, got {word!r}"
            )
    cases = "".join(
        f"        {shlex.quote(name)}) wanted={shlex.quote(word)} ;;\n"
        for name, word in triggers.items()
    )
    return f"""#!/bin/busybox sh
# swapnbd initramfs: load modules, mount /dev/vda, add the payload, switch_root.
/bin/busybox --install -s /bin
export PATH=/bin

fail() {{
    echo "{ERROR_MARKER} $*"
    poweroff -f
    sleep 10
    exit 1
}}

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs on /dev"
echo "swapnbd-initramfs: kernel $(uname -r), loading modules"

cmdline=$(cat /proc/cmdline)
for m in {module_words}; do
    wanted=""
    case "$m" in
{cases}    esac
    if [ -n "$wanted" ]; then
        case " $cmdline " in
            *" $wanted "*) ;;
            *) echo "swapnbd-initramfs: $m not loaded (no $wanted on the command line)"; continue ;;
        esac
    fi
    mod=${{m%.ko}}
    params=""
    set -f
    for word in $cmdline; do
        case "$word" in
            "$mod".*=*) params="$params ${{word#"$mod".}}" ;;
        esac
    done
    set +f
    echo "swapnbd-initramfs: insmod $m$params"
    insmod "/lib/modules/$m" $params || fail "insmod $m$params"
done

init=""
set -f  # no globbing of command-line words
for word in $(cat /proc/cmdline); do
    case "$word" in
        swapnbd.init=*) init="${{word#swapnbd.init=}}" ;;
    esac
done
set +f

waited=0
while [ ! -b /dev/vda ]; do
    if [ "$waited" -ge {ROOT_WAIT_S * 10} ]; then
        fail "no /dev/vda after {ROOT_WAIT_S} s (is the root image attached with if=virtio?)"
    fi
    usleep 100000
    waited=$((waited + 1))
done

mount -t ext4 -o rw /dev/vda /newroot || fail "mount /dev/vda (ext4) on /newroot"
mkdir -p /newroot{GUEST_DIR} || fail "mkdir {GUEST_DIR} in the root fs"
mount -t tmpfs -o mode=0755,size=64m swapnbd /newroot{GUEST_DIR} ||
    fail "mount tmpfs on {GUEST_DIR}"
cp -a /payload/. /newroot{GUEST_DIR}/ || fail "copy the payload to {GUEST_DIR}"

if [ -n "$init" ]; then
    chroot /newroot /usr/bin/test -x "$init" ||
        fail "swapnbd.init=$init is not executable in the root fs"
    set -- "$init" "$@"
else
    [ -f /newroot{DEFAULT_INIT[1]} ] || fail "{DEFAULT_INIT[1]} is missing"
    chroot /newroot /usr/bin/test -x {DEFAULT_INIT[0]} ||
        fail "{DEFAULT_INIT[0]} is missing in the root fs"
    set -- {default_init} "$@"
fi

mount --move /proc /newroot/proc || fail "move /proc"
mount --move /sys /newroot/sys || fail "move /sys"
mount --move /dev /newroot/dev || fail "move /dev"
echo "swapnbd-initramfs: switch_root to $*"
export PATH={GUEST_PATH}
exec switch_root /newroot "$@"
"""


def base_entries(busybox: bytes, init: str) -> list[CpioEntry]:
    """Directories, device nodes, busybox and /init of the archive."""
    directory = stat.S_IFDIR | 0o755
    entries = [
        CpioEntry(name, directory)
        for name in ("bin", "dev", "lib", "lib/modules", "newroot", "payload", "proc", "sys")
    ]
    entries += [
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        CpioEntry("init", stat.S_IFREG | 0o755, init.encode()),
    ]
    return entries


def build_archive(
    busybox: bytes,
    modules: Sequence[tuple[str, bytes]],
    payload: Sequence[tuple[str, bytes]],
    *,
    optional: Mapping[str, str] | None = None,
) -> bytes:
    """The gzip'd initramfs: busybox, ``modules`` [(file name, ELF)], ``payload`` [(path, data)].

    The payload paths are relative to /opt/swapnbd (``stress/swapstress.py``);
    ``optional`` as in :func:`init_script`.
    """
    entries = base_entries(busybox, init_script([name for name, _ in modules], optional))
    entries += [
        CpioEntry(f"lib/modules/{name}", stat.S_IFREG | 0o644, data) for name, data in modules
    ]
    dirs: set[str] = set()
    for rel, _ in payload:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    entries += [CpioEntry(f"payload/{d}", stat.S_IFDIR | 0o755) for d in sorted(dirs)]
    entries += [CpioEntry(f"payload/{rel}", stat.S_IFREG | 0o644, data) for rel, data in payload]
    return gzip.compress(write_cpio(entries), compresslevel=6, mtime=0)
