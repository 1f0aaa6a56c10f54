"""Debian's stock kernel packages for the guest: resolve, download, unpack, read modules.

Theory of operation: a kernel name (``"6.1"``, ``"6.12"``, ``"7.2"``) and a
flavour (``"cloud"``) name a Debian metapackage; its apt candidate depends on
exactly one versioned ``linux-image-*`` package, which is fetched with ``apt-get
download`` and unpacked with ``dpkg-deb -x`` (never installed on the host).
6.1 and 6.12 come from the host's own bookworm apt. 7.2 is Debian sid's: sid's
apt is asked inside a sid chroot (:mod:`vm.image.chroot`, :data:`SUITES`), the
download lands there and is moved out, and nothing of sid touches the host's
dpkg. Every apt function takes that chroot as ``root`` (None: the host).
The .deb has no ``modules.dep`` (the postinst makes it), so ``depmod -b`` runs
on the unpacked tree. :func:`module_load_order` then turns ``modules.dep`` and
``modules.builtin`` into the list of .ko files the initramfs must ``insmod``,
dependencies first; it is pure and tested with tables.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vm.image.chroot import DebianChroot

__all__ = [
    "FLAVOURS",
    "INITRAMFS_MODULES",
    "KERNELS",
    "KernelError",
    "KernelPackage",
    "UnpackedKernel",
    "apt_candidate",
    "download_deb",
    "metapackage",
    "module_load_order",
    "module_name",
    "parse_modules_builtin",
    "parse_modules_dep",
    "resolve_kernel",
    "unpack_kernel",
]

KERNELS: Mapping[str, str] = {
    # kernel name -> metapackage prefix; the flavour suffix is appended.
    "6.1": "linux-image",  # bookworm: linux-image-cloud-amd64 -> linux-image-6.1.0-N-cloud-amd64
    "6.12": "linux-image-6.12",  # bookworm-security: -> linux-image-6.12.N+deb12-cloud-amd64
    "7.2": "linux-image",  # sid: linux-image-cloud-amd64 -> linux-image-7.2.N+deb14-cloud-amd64
}
#: The Debian suite whose apt has a kernel, when it is not the host's (bookworm).
SUITES: Mapping[str, str] = {"7.2": "sid"}
FLAVOURS: Mapping[str, str] = {"cloud": "cloud-amd64", "generic": "amd64"}

# What the initramfs loads, in this order, when modular (see kernel-notes.md §3).
# ext4 and crc32c matter only where they are modules (the generic flavour):
# ext4 asks the crypto API for "crc32c" at mount time, which no symbol
# dependency in modules.dep reveals, so crc32c_generic is named explicitly.
INITRAMFS_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "nbd",
    "crc32c_generic",
    "ext4",
)

#: A module renamed in a later series: the name in INITRAMFS_MODULES -> later names.
#: 6.14 moved crc32c to lib/crc; the crypto API's "crc32c" is crc32c-cryptoapi in 7.2.
MODULE_RENAMES: Mapping[str, tuple[str, ...]] = {"crc32c_generic": ("crc32c_cryptoapi",)}

_KO_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


class KernelError(RuntimeError):
    """A kernel package could not be resolved, fetched or read."""


@dataclass(frozen=True, slots=True)
class KernelPackage:
    """A versioned Debian kernel image package."""

    name: str
    """e.g. ``linux-image-6.1.0-56-cloud-amd64``."""
    version: str
    """Debian version, e.g. ``6.1.192-2``."""
    metapackage: str
    """The metapackage it was resolved from, e.g. ``linux-image-cloud-amd64``."""


@dataclass(frozen=True, slots=True)
class UnpackedKernel:
    """A kernel .deb unpacked in the cache (with modules.dep made by depmod)."""

    root: Path
    """Directory the .deb was unpacked into."""
    release: str
    """``uname -r`` of the kernel, e.g. ``6.1.0-56-cloud-amd64``."""

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release


def metapackage(kernel: str, flavour: str) -> str:
    """The metapackage naming the newest kernel of ``kernel``/``flavour``.

    Raises:
        KernelError: unknown kernel or flavour.
    """
    if kernel not in KERNELS:
        raise KernelError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    if flavour not in FLAVOURS:
        raise KernelError(f"unknown flavour {flavour!r}: choose one of {', '.join(FLAVOURS)}")
    return f"{KERNELS[kernel]}-{FLAVOURS[flavour]}"


def _run(argv: Sequence[str], *, cwd: Path | None = None, root: DebianChroot | None = None) -> str:
    """Run ``argv`` on the host, or inside ``root`` (then ``cwd`` is a path the root sees)."""
    if root is not None:
        inner = list(argv) if cwd is None else ["sh", "-c", 'cd "$0" && exec "$@"', str(cwd), *argv]
        command, env, cwd = root.argv(*inner), root.env(), None
    else:
        command, env = list(argv), None
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, cwd=cwd, timeout=900, env=env
        )
    except FileNotFoundError as exc:
        raise KernelError(
            f"{argv[0]} is not installed (Debian: apt-get install apt dpkg kmod)"
        ) from exc
    if done.returncode != 0:
        where = f" (in the {root.suite} chroot {root.path})" if root is not None else ""
        raise KernelError(
            f"{' '.join(argv)}{where} failed with status {done.returncode}: {done.stderr.strip()}"
        )
    return done.stdout


def parse_policy(text: str) -> dict[str, str | None]:
    """``apt-cache policy A B`` output -> {package: candidate version or None}."""
    found: dict[str, str | None] = {}
    current = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
            found[current] = None
            continue
        match = re.match(r"\s+Candidate:\s*(\S+)", line)
        if match and current is not None and match.group(1) != "(none)":
            found[current] = match.group(1)
    return found


def apt_candidates(
    packages: Sequence[str], root: DebianChroot | None = None
) -> dict[str, str | None]:
    """{package: apt candidate version, or None if apt does not know one} in one call."""
    found = parse_policy(_run(["apt-cache", "policy", *packages], root=root))
    return {p: found.get(p) for p in packages}


def apt_candidate(package: str, root: DebianChroot | None = None) -> str | None:
    """The apt candidate version of ``package``, or ``None`` if apt does not know one."""
    return apt_candidates([package], root)[package]


_apt_updated: set[str] = set()


def apt_update_once(root: DebianChroot | None = None) -> None:
    """Run ``apt-get update`` (on the host or in ``root``) at most once per process (root)."""
    where = str(root.path) if root is not None else "/"
    if where in _apt_updated:
        return
    _run(["apt-get", "update", "-q"], root=root)
    _apt_updated.add(where)


def check_series(kernel: str, pkg: KernelPackage) -> None:
    """Fail when ``kernel``'s metapackage has moved to another series (sid moves on).

    >>> check_series("7.2", KernelPackage("linux-image-7.2.13+deb14-cloud-amd64", "7.2.13-1", "m"))
    >>> check_series("7.2", KernelPackage("linux-image-7.3.1+deb14-cloud-amd64", "7.3.1-1", "m"))
    Traceback (most recent call last):
    ...
    vm.image.kernel.KernelError: m now depends on linux-image-7.3.1+deb14-cloud-amd64 7.3.1-1, ...
    """
    if not pkg.version.startswith(kernel + ".") and not pkg.version.startswith(kernel + "-"):
        raise KernelError(
            f"{pkg.metapackage} now depends on {pkg.name} {pkg.version}, not a {kernel} "
            "kernel: the suite has moved on; pin an older snapshot or add the new series"
        )


def parse_image_dependency(depends: str) -> tuple[str, str | None]:
    """The ``linux-image-*`` package (and its ``=`` version) in a metapackage's Depends.

    >>> parse_image_dependency("linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)")
    ('linux-image-6.1.0-56-cloud-amd64', '6.1.192-2')
    """
    for clause in depends.split(","):
        alternative = clause.split("|", 1)[0].strip()
        match = re.fullmatch(r"(linux-image-\S+)(?:\s*\(\s*(=|>=)\s*(\S+)\s*\))?", alternative)
        if match:
            name, relation, version = match.groups()
            return name, version if relation == "=" else None
    raise KernelError(f"no linux-image-* package in Depends: {depends!r}")


def resolve_kernel(kernel: str, flavour: str, root: DebianChroot | None = None) -> KernelPackage:
    """Resolve ``kernel``/``flavour`` to the newest versioned image package apt offers.

    Runs ``apt-get update`` once if apt does not know the metapackage. ``root`` is the
    chroot whose apt has the kernel (:data:`SUITES`), None for the host's.

    Raises:
        KernelError: unknown name, apt has no candidate even after updating, or the
            suite's metapackage now names another series.
    """
    meta = metapackage(kernel, flavour)
    version = apt_candidate(meta, root)
    if version is None:
        apt_update_once(root)
        version = apt_candidate(meta, root)
    if version is None:
        where = (
            f"the {root.suite} chroot {root.path}"
            if root is not None
            else "bookworm and bookworm-security in /etc/apt/sources.list(.d)"
        )
        raise KernelError(f"apt has no candidate for {meta}: check {where} and run apt-get update")
    show = _run(["apt-cache", "show", f"{meta}={version}"], root=root)
    match = re.search(r"^Depends:\s*(.+)$", show, re.MULTILINE)
    if match is None:
        raise KernelError(f"apt-cache show {meta}={version} has no Depends field")
    image, image_version = parse_image_dependency(match.group(1))
    if image_version is None:
        image_version = apt_candidate(image, root)
    if image_version is None:
        raise KernelError(f"apt knows {meta} {version} but has no candidate for {image}")
    pkg = KernelPackage(name=image, version=image_version, metapackage=meta)
    if root is not None:
        check_series(kernel, pkg)
    return pkg


_PART = re.compile(r"(linux-(?:binary|modules|base)-\S+)\s*\(\s*=\s*(\S+)\s*\)")


def parse_image_parts(depends: str) -> list[tuple[str, str]]:
    """The packages an image package is split into, from its ``Depends``.

    Since 7.x (sid) ``linux-image-REL`` is a shell: the kernel is in ``linux-binary-REL``
    (``usr/lib/modules/REL/vmlinuz``), the modules in ``linux-modules-REL`` and the
    config and ``modules.builtin`` in ``linux-base-REL``, each at ``=`` the image's
    version. Bookworm's image packages hold all of it themselves and yield ``[]``.

    >>> deps = "linux-base (>= 4.1), linux-base-7.2.13+deb14-cloud-amd64 (= 7.2.13-1)"
    >>> parse_image_parts(deps + ", linux-binary-7.2.13+deb14-cloud-amd64 (= 7.2.13-1)")[1]
    ('linux-binary-7.2.13+deb14-cloud-amd64', '7.2.13-1')
    >>> parse_image_parts("kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2)")
    []
    """
    found = []
    for clause in depends.split(","):
        match = _PART.fullmatch(clause.split("|", 1)[0].strip())
        if match:
            found.append((match.group(1), match.group(2)))
    return found


def image_debs(pkg: KernelPackage, root: DebianChroot | None = None) -> list[tuple[str, str]]:
    """[(package, version)] to download and unpack for ``pkg``: the image and its parts."""
    show = _run(["apt-cache", "show", f"{pkg.name}={pkg.version}"], root=root)
    match = re.search(r"^Depends:\s*(.+)$", show, re.MULTILINE)
    parts = parse_image_parts(match.group(1)) if match else []
    return [(pkg.name, pkg.version), *parts]


def download_deb(package: str, version: str, dest: Path, root: DebianChroot | None = None) -> Path:
    """``apt-get download package=version`` into ``dest``; returns the .deb path.

    With ``root``, apt runs in that chroot: the .deb is fetched into a scratch
    directory inside it and moved to ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    argv = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{package}={version}"]
    if root is None:
        _run(argv, cwd=dest)
    else:
        with root.scratch() as (host, inside):
            _run(argv, cwd=Path(inside), root=root)
            for deb in host.glob("*.deb"):
                shutil.move(str(deb), dest / deb.name)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise KernelError(f"apt-get download {package}={version} left {len(debs)} .deb files")
    return debs[0]


def unpack_kernel(debs: Path | Sequence[Path], root: Path) -> UnpackedKernel:
    """``dpkg-deb -x`` the image .deb (and its parts) into ``root``; ``depmod -b`` on it.

    A merged-/usr package (sid's) gets ``lib -> usr/lib``, so its modules are where
    bookworm's depmod and the initramfs builder look, and ``boot/vmlinuz-REL`` and
    ``boot/config-REL`` link to the files its split packages keep beside the modules.
    """
    debs = [debs] if isinstance(debs, Path) else list(debs)
    deb = debs[0]
    root.mkdir(parents=True, exist_ok=True)
    for part in debs:
        _run(["dpkg-deb", "-x", str(part), str(root)])
    if not (root / "lib").exists() and (root / "usr" / "lib" / "modules").is_dir():
        # sid's packages are merged-/usr (usr/lib/modules); bookworm's depmod -b looks
        # under lib/modules, as does everything downstream.
        (root / "lib").symlink_to("usr/lib")
    modules = root / "lib" / "modules"
    releases = sorted(p.name for p in modules.iterdir() if p.is_dir()) if modules.is_dir() else []
    if len(releases) != 1:
        raise KernelError(f"{deb.name} has {len(releases)} module trees, expected one: {releases}")
    unpacked = UnpackedKernel(root=root, release=releases[0])
    # The split packages keep vmlinuz and config beside the modules; boot/ is where
    # everything downstream (and run.json's config hash) looks.
    for name in ("vmlinuz", "config"):
        beside = unpacked.modules_dir / name
        link = root / "boot" / f"{name}-{unpacked.release}"
        if beside.is_file() and not link.exists():
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(Path("..") / beside.relative_to(root))
    if not unpacked.vmlinuz.is_file():
        raise KernelError(f"{deb.name} has no {unpacked.vmlinuz.relative_to(root)}")
    if shutil.which("depmod") is None and not Path("/usr/sbin/depmod").exists():
        raise KernelError("depmod is not installed (Debian: apt-get install kmod)")
    depmod = shutil.which("depmod") or "/usr/sbin/depmod"
    _run([depmod, "-b", str(root), unpacked.release])
    if not (unpacked.modules_dir / "modules.dep").is_file():
        raise KernelError(f"depmod made no modules.dep under {unpacked.modules_dir}")
    return unpacked


def module_name(path: str) -> str:
    """``kernel/drivers/net/virtio_net.ko.xz`` -> ``virtio_net`` (dashes become underscores)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _KO_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    else:
        raise KernelError(f"not a kernel module path: {path!r}")
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``modules.dep`` text -> {module path: [dependency paths]}."""
    deps: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        path, sep, rest = line.partition(":")
        if not sep:
            raise KernelError(f"modules.dep line {lineno} has no ':': {line!r}")
        deps[path.strip()] = rest.split()
    return deps


def parse_modules_builtin(text: str) -> set[str]:
    """``modules.builtin`` text -> set of built-in module names."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def module_load_order(
    deps: Mapping[str, Sequence[str]], builtin: Iterable[str], wanted: Sequence[str]
) -> list[str]:
    """Module paths to insmod, every dependency before its users, built-ins left out.

    Args:
        deps: parsed ``modules.dep``.
        builtin: names of built-in modules (``modules.builtin``).
        wanted: module names to load; each must be built in or modular, under its
            own name or a later one (:data:`MODULE_RENAMES`).

    Raises:
        KernelError: a wanted module or a dependency is missing, or deps have a cycle.
    """
    by_name: dict[str, str] = {}
    for path in deps:
        by_name[module_name(path)] = path
    builtin_set = set(builtin)
    order: list[str] = []
    state: dict[str, str] = {}  # path -> "visiting" | "done"

    def visit(path: str, chain: tuple[str, ...]) -> None:
        mark = state.get(path)
        if mark == "done":
            return
        if mark == "visiting":
            raise KernelError(f"dependency cycle in modules.dep: {' -> '.join((*chain, path))}")
        if path not in deps:
            user = chain[-1] if chain else "the initramfs"
            raise KernelError(f"modules.dep names {path} (needed by {user}) but has no entry")
        state[path] = "visiting"
        for dep in deps[path]:
            visit(dep, (*chain, path))
        state[path] = "done"
        order.append(path)

    for wanted_name in wanted:
        names = (wanted_name, *MODULE_RENAMES.get(wanted_name, ()))
        if any(name in builtin_set for name in names):
            continue
        found = next((by_name[n] for n in names if n in by_name), None)
        name = wanted_name
        if found is None:
            raise KernelError(
                f"module {name!r} is neither built in nor in modules.dep of this kernel"
            )
        visit(found, ())
    return order
