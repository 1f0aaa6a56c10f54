"""The vanilla arm on a stock Debian kernel, without building the kernel.

Theory of operation
-------------------
Debian's cloud kernels have ``CONFIG_LIVEPATCH=y`` and do not force module
signatures (research notes §8), so two small modules built out of tree against
the kernel's own headers switch the arm on the very binaries the patched arm
runs:

``nbd.ko``
    ``drivers/block/nbd.c`` from the ``linux-source`` package of the *same*
    Debian version as the kernel, with ``vm/image/kpatch/<series>/nbd-memalloc-switch.patch``:
    a ``memalloc`` parameter (default on, as upstream) that skips
    ``sk_set_memalloc()``, ``PF_MEMALLOC`` and ``__GFP_MEMALLOC`` when off. It
    replaces the stock nbd.ko in the initramfs for both arms.
``swapnbd_nothrottle.ko``
    a livepatch (``vm/image/kmod_src/swapnbd_nothrottle.c``) replacing the static
    ``throttle_direct_reclaim()`` with one that never throttles; the initramfs
    loads it only when the command line says ``pfmemalloc_throttle=0``.

The headers are fetched with ``apt-get download`` and unpacked into the cache,
never installed (the 6.12 headers package would pull in a kernel image and
systemd); the unpacked tree's top Makefile names its ``-common`` half by
absolute path, which is rewritten to the unpacked copy. Building takes about
ten seconds; :mod:`vm.image.image` caches the result by every input.

Debian sid's 7.2 kernel (``--kernel 7.2``) was built with gcc-16 against a newer
libc than bookworm's, and its ``linux-kbuild`` host programs (fixdep, modpost)
link to that libc, so its modules cannot be built on the host. They are built in
a sid chroot (:data:`SID_PACKAGES`, made and cached by :mod:`vm.image.chroot`):
sid's apt fetches the headers and ``linux-source-7.2`` of the image's exact
version, the work directory lies inside the root, and ``make`` runs under
``chroot``; the patch is applied and the result checked on the host. The
compiler a build needs is read from the headers' ``CONFIG_CC_VERSION_TEXT``
(:func:`kernel_compiler`), so a new gcc is named, not guessed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vm.image import arms, buildlog, kernel
from vm.image.chroot import DebianChroot
from vm.image.progress import Step, run_with_progress

__all__ = [
    "SID_PACKAGES",
    "ArmModules",
    "KmodError",
    "build_arm_modules",
    "headers_packages",
    "source_tarball",
]


#: The sid chroot that builds 7.2's modules: gcc-16 as the kernel's Makefile calls it
#: (``gcc-16-for-host``, a Depends of linux-headers-7.2.*), make, libc headers, pahole
#: for BTF, kmod, patch, and the libraries linux-kbuild's host programs link to.
SID_PACKAGES = (
    "gcc-16-for-host",
    "make",
    "libc6-dev",
    "pahole",
    "kmod",
    "patch",
    "xz-utils",
    "libelf1t64",
    "libssl3t64",
    "zlib1g",
)
#: A file that exists only in a complete sid build root.
SID_READY = "usr/bin/x86_64-linux-gnu-gcc-16"


class KmodError(RuntimeError):
    """The arm modules could not be built; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class ArmModules:
    """The two modules, built for one kernel release."""

    nbd: Path
    livepatch: Path
    release: str


def _run(argv: Sequence[str], what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, check=False, cwd=cwd, timeout=900
        )
    except FileNotFoundError as exc:
        raise KmodError(f"{what}: {argv[0]} is not installed") from exc
    if done.returncode != 0:
        raise KmodError(f"{what}: {' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


_DEPENDENCY = re.compile(r"([a-z0-9][a-z0-9+.\-]*)(?::\w+)?(?:\s*\(\s*([<>=]+)\s*(\S+)\s*\))?")


def parse_depends(depends: str) -> list[tuple[str, str | None, str | None]]:
    """``Depends:`` text -> [(package, relation, version)], first alternative of each clause.

    >>> parse_depends("a (= 1), b (>= 2) | c, gcc-12")
    [('a', '=', '1'), ('b', '>=', '2'), ('gcc-12', None, None)]
    """
    found = []
    for clause in depends.split(","):
        first = clause.split("|", 1)[0].strip()
        match = _DEPENDENCY.fullmatch(first)
        if match:
            found.append((match.group(1), match.group(2), match.group(3)))
    return found


def headers_packages(
    release: str, version: str, root: DebianChroot | None = None
) -> list[tuple[str, str]]:
    """The header packages (and exact versions) to build modules for ``release``.

    ``linux-headers-RELEASE`` plus its ``linux-headers-*`` and ``linux-kbuild-*``
    dependencies; nothing else (no kernel image, no compiler packages). ``root``: ask
    that chroot's apt (sid for 7.2), None for the host's.
    """
    top = f"linux-headers-{release}"
    argv = ["apt-cache", "show", f"{top}={version}"]
    show = _run(root.argv(*argv) if root is not None else argv, f"apt-cache show {top}")
    match = re.search(r"^Depends:\s*(.+)$", show, re.MULTILINE)
    if match is None:
        raise KmodError(f"apt-cache show {top}={version} has no Depends field")
    wanted = [(top, version)]
    for name, relation, dep_version in parse_depends(match.group(1)):
        if not name.startswith(("linux-headers-", "linux-kbuild-")):
            continue
        exact = dep_version if relation == "=" else kernel.apt_candidate(name, root)
        if exact is None:
            raise KmodError(f"apt has no candidate for {name} (needed by {top})")
        wanted.append((name, exact))
    return wanted


def rewrite_headers_makefile(text: str, tree: str) -> str:
    """Point the headers Makefile's absolute ``/usr/src/`` paths into the unpacked ``tree``.

    6.x has one (``include``); 7.2 also sets ``KBUILD_OUTPUT``.

    >>> rewrite_headers_makefile("KBUILD_OUTPUT=/usr/src/h\ninclude /usr/src/c/Makefile\n", "/t")
    'KBUILD_OUTPUT=/t/usr/src/h\ninclude /t/usr/src/c/Makefile\n'
    """
    return re.sub(
        r"(^include |^KBUILD_OUTPUT\s*:?=\s*)/usr/src/", rf"\g<1>{tree}/usr/src/", text, flags=re.M
    )


def unpack_headers(
    release: str, version: str, root: Path, step: Step, chroot: DebianChroot | None = None
) -> Path:
    """Download and unpack the headers for ``release`` under ``root``; return the build dir.

    With ``chroot``, sid's apt downloads them and ``root`` must lie inside that chroot:
    the Makefile's absolute include is rewritten to the path the chroot sees.
    """
    packages = headers_packages(release, version, chroot)
    for name, exact in packages:
        step.update(f"apt-get download {name}={exact}", force=True)
        deb = kernel.download_deb(name, exact, root / "download", chroot)
        _run(["dpkg-deb", "-x", str(deb), str(root / "tree")], f"unpack {deb.name}")
    shutil.rmtree(root / "download")
    build = root / "tree" / "usr" / "src" / f"linux-headers-{release}"
    makefile = build / "Makefile"
    if not makefile.is_file():
        raise KmodError(f"linux-headers-{release} has no Makefile at {makefile}")
    seen = chroot.inside(root / "tree") if chroot is not None else str(root / "tree")
    text = makefile.read_text()
    fixed = rewrite_headers_makefile(text, seen)
    makefile.write_text(fixed)
    return build


def source_tarball(
    series: str, version: str, downloads: Path, step: Step, chroot: DebianChroot | None = None
) -> Path:
    """The ``linux-source-SERIES`` tarball of exactly ``version``.

    The installed ``/usr/src/linux-source-SERIES.tar.xz`` when dpkg says it is
    that version; otherwise the package is downloaded (about 140 MB, once) into
    ``downloads`` and its tarball taken from there (by ``chroot``'s apt when given:
    sid's source is never installed on the host).
    """
    package = f"linux-source-{series}"
    installed = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    tarball = Path(f"/usr/src/{package}.tar.xz")
    if installed.returncode == 0 and installed.stdout.strip() == version and tarball.is_file():
        return tarball
    unpacked = downloads / f"{package}_{version}"
    found = unpacked / "tree" / "usr" / "src" / f"{package}.tar.xz"
    if found.is_file():
        return found
    step.update(f"apt-get download {package}={version} (about 140 MB, once)", force=True)
    tmp = downloads / f".tmp-{package}_{version}"
    shutil.rmtree(tmp, ignore_errors=True)
    deb = kernel.download_deb(package, version, tmp / "download", chroot)
    _run(["dpkg-deb", "-x", str(deb), str(tmp / "tree")], f"unpack {deb.name}")
    shutil.rmtree(tmp / "download")
    if not unpacked.exists():
        tmp.rename(unpacked)
    if not found.is_file():
        raise KmodError(f"{deb.name} has no usr/src/{package}.tar.xz")
    return found


def extract_member(tarball: Path, member: str, dest: Path) -> Path:
    """Extract one file (``drivers/block/nbd.c``) of a linux-source tarball into ``dest``."""
    with tarfile.open(tarball, "r:xz") as archive:
        for info in archive:
            parts = info.name.split("/", 1)
            if len(parts) == 2 and parts[1] == member and info.isfile():
                handle = archive.extractfile(info)
                if handle is None:
                    break
                out = dest / Path(member).name
                out.write_bytes(handle.read())
                return out
    raise KmodError(f"{tarball} has no {member}")


def apply_patch(patch: Path, target: Path, log: Path, *, source: str) -> None:
    """``patch`` one file of ``source`` (e.g. ``linux-source-6.12 6.12.118-1``).

    A point release moves lines, so an offset is accepted; fuzz is not (``--fuzz=0``): a
    hunk whose context changed may land in the wrong place, so it fails and names itself.
    """
    argv = ["patch", "--forward", "--fuzz=0", "--no-backup-if-mismatch", str(target), str(patch)]
    with log.open("ab") as sink:
        sink.write(f"$ {' '.join(argv)}\n".encode())
        sink.flush()
        done = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        why = buildlog.diagnose(log.read_text(errors="replace")) or f"exit {done.returncode}"
        raise KmodError(
            f"{patch.name} does not apply to {target.name} of {source}: {why}; log: {log}"
        )


def kernel_compiler(config_text: str, default: str = "gcc-12") -> str:
    """The gcc a kernel was built with, from ``CONFIG_CC_VERSION_TEXT`` (``default`` if absent).

    >>> kernel_compiler('CONFIG_CC_VERSION_TEXT="x86_64-linux-gnu-gcc-16 (Debian 16.2.0-4) 16.2.0"')
    'x86_64-linux-gnu-gcc-16'
    >>> kernel_compiler('CONFIG_CC_VERSION_TEXT="gcc-12 (Debian 12.2.0-14) 12.2.0"')
    'gcc-12'
    >>> kernel_compiler("")
    'gcc-12'
    """
    match = re.search(r'^CONFIG_CC_VERSION_TEXT="([\w.+-]*gcc-\d+) ', config_text, re.MULTILINE)
    return match.group(1) if match else default


def needed_tools(config_text: str) -> dict[str, str]:
    """{program: why} that building modules against a kernel with this .config runs.

    >>> needed_tools("CONFIG_DEBUG_INFO_BTF_MODULES=y\\n")["pahole"]
    'BTF for modules (CONFIG_DEBUG_INFO_BTF_MODULES=y)'
    """
    tools = {
        "make": "kbuild",
        kernel_compiler(config_text): "the compiler the kernel was built with",
    }
    if re.search(r"^CONFIG_DEBUG_INFO_BTF_MODULES=y$", config_text, re.MULTILINE):
        tools["pahole"] = "BTF for modules (CONFIG_DEBUG_INFO_BTF_MODULES=y)"
    return tools


def check_tools(config_text: str, what: str, chroot: DebianChroot | None = None) -> None:
    """Fail before building if a program the build runs is missing (names its package)."""

    def found(tool: str) -> bool:
        if chroot is None:
            return shutil.which(tool) is not None
        return any((chroot.path / d / tool).exists() for d in ("usr/bin", "usr/sbin", "bin"))

    where = f" in the {chroot.suite} chroot {chroot.path}" if chroot is not None else ""
    missing = [
        f"{buildlog.install_hint(tool)}{where}, needed for {why}"
        for tool, why in needed_tools(config_text).items()
        if not found(tool)
    ]
    if missing:
        raise KmodError(f"cannot build {what}: " + "; ".join(missing))


def build_arm_modules(
    work: Path,
    release: str,
    version: str,
    series: str,
    *,
    downloads: Path,
    step: Step,
    chroot: DebianChroot | None = None,
) -> ArmModules:
    """Build nbd.ko (with the memalloc switch) and the no-throttle livepatch in ``work``.

    Args:
        work: an empty directory; the modules and build log end up here. With
            ``chroot`` it must lie inside that root.
        release: ``uname -r`` of the kernel, e.g. ``6.1.0-57-cloud-amd64``.
        version: its Debian version, e.g. ``6.1.192-3`` (headers and source must match).
        series: ``6.1``, ``6.12`` or ``7.2``.
        downloads: where a downloaded linux-source package is kept.
        chroot: the root whose apt and compiler build these modules (sid's for 7.2);
            None for the host.

    Raises:
        KmodError: a package is missing, a patch does not apply, or make failed.
    """
    what = f"the arm modules for {release} (Debian {version})"
    if chroot is None and (shutil.which("make") is None or shutil.which("gcc-12") is None):
        check_tools("", what)
    headers = unpack_headers(release, version, work / "headers", step, chroot)
    config = headers / ".config"
    check_tools(config.read_text() if config.is_file() else "", what, chroot)
    src = work / "src"
    src.mkdir()
    step.update(f"extracting drivers/block/nbd.c of linux-source-{series} {version}", force=True)
    tarball = source_tarball(series, version, downloads, step, chroot)
    nbd_c = extract_member(tarball, "drivers/block/nbd.c", src)
    log = work / "build.log"
    patch = arms.patch_files(series, (arms.MODULE_PATCH,))[0]
    apply_patch(patch, nbd_c, log, source=f"linux-source-{series} {version}")
    shutil.copy2(arms.KMOD_DIR / arms.LIVEPATCH_SOURCE, src / arms.LIVEPATCH_SOURCE)
    (src / "Kbuild").write_text(f"obj-m += nbd.o {arms.LIVEPATCH_MODULE}.o\n")
    make = ["make", "-C", str(headers), f"M={src}", "modules"]
    env = None
    if chroot is not None:
        make = chroot.argv_with_proc(
            "make", "-C", chroot.inside(headers), f"M={chroot.inside(src)}", "modules"
        )
        env = chroot.env()
    try:
        run_with_progress(make, step, log=log, env=env, heartbeat="make modules")
    except OSError as exc:
        raise KmodError(f"make modules failed to start for {what}: {exc}") from exc
    except Exception as exc:  # CommandError: the cause is in the log
        why = buildlog.diagnose(log.read_text(errors="replace")) or "see the log"
        raise KmodError(f"building {what} failed at make modules: {why}; log: {log}") from exc
    modules = ArmModules(
        nbd=src / "nbd.ko",
        livepatch=src / f"{arms.LIVEPATCH_MODULE}.ko",
        release=release,
    )
    for path in (modules.nbd, modules.livepatch):
        if not path.is_file():
            raise KmodError(f"make modules produced no {path.name}; log: {log}")
        magic = _run(["modinfo", "-F", "vermagic", str(path)], f"modinfo {path.name}").split()
        if not magic or magic[0] != release:
            raise KmodError(f"{path.name} was built for {magic[:1]}, not {release}; log: {log}")
    shutil.rmtree(work / "headers")  # about 80 MB, not needed again
    return modules
