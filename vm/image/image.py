"""Guest images for the VM experiment: kernel, initramfs and root fs, cached by their inputs.

Theory of operation: :func:`build_guest` runs four steps, each a directory in
the cache named by a hash of everything that goes into it:

============  ==================================================  ===========================
step          inputs hashed into its key                          output
============  ==================================================  ===========================
kernel        image package name + version                        vmlinuz, unpacked modules
armmods       release, version, switch patch, livepatch source    nbd.ko, livepatch
busybox       busybox-static version                              bin/busybox
rootfs        mirror, suite, package list + versions, free space  rootfs.ext4, packages.txt
initramfs     kernel + busybox keys, module list, payload files   initrd.img
============  ==================================================  ===========================

Every key also holds :func:`code_version` of the builder functions and
constants that shape that step's output. Package versions come from apt on
this host; its answers are remembered per apt state (``CACHE/resolved/``), so a
fully cached build takes well under a second.

A step with a finished directory is skipped. A step builds into ``.tmp-KEY``
and renames it to ``KEY`` when complete, so an interrupted build leaves only a
tmp directory, which the next build deletes and redoes. One ``flock`` on
``CACHE/lock`` serialises builders (a test may build while a user's run does).
Each build also deletes leftover tmp directories and entries unused for
:data:`PRUNE_AFTER_DAYS` (a cached step touches its directory's mtime).
Step durations are remembered in ``CACHE/durations.json`` and used as the next
estimate. Editing the guest payload (``stress/*.py``, ``vm/image/guest_init.py``)
changes only the initramfs key: the rootfs is never rebuilt for it. A kernel of
another suite (sid's 7.2, :data:`vm.image.kernel.SUITES`) is resolved and fetched
by that suite's apt in a chroot made once under ``CACHE/sid-chroot/``
(:mod:`vm.image.chroot`), which also builds its modules.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vm.image import arms, chroot, initramfs, kbuild, kernel, kmod, owntree, rootfs
from vm.image.progress import CommandError, Progress, Step, format_duration

__all__ = [
    "GuestImage",
    "ImageError",
    "build_guest",
    "default_cache_dir",
    "kernel_chroot",
    "main",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
# First-build estimates (seconds) on a 2-core machine with a fast mirror.
ESTIMATES: Mapping[str, float] = {
    "kernel": 20.0,
    "armmods": 30.0,
    "busybox": 3.0,
    "rootfs": 180.0,
    "initramfs": 5.0,
    "kbuild": 1500.0,
    "kbuild-incremental": 120.0,
    "kbuild-minimal": 480.0,
}
STEPS = ("kernel", "armmods", "busybox", "rootfs", "initramfs")
# Cache entries not used for this long are deleted by the next build.
PRUNE_AFTER_DAYS = 30.0
#: Kernel arms (vm/image/arms.py): "patched" is the kernel as shipped (the 2012 series in
#: place); "vanilla" switches off the nbd socket's memalloc marking and the throttle.
ARMS = arms.ARMS


class ImageError(RuntimeError):
    """The guest image could not be built; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class GuestImage:
    """Paths of a built guest image (all inside the cache; never modify them)."""

    kernel: Path
    """The kernel (bzImage) for ``qemu -kernel``."""
    initrd: Path
    """The initramfs for ``qemu -initrd``."""
    rootfs: Path
    """Raw ext4 root fs for ``-drive file=...,if=virtio,format=raw,snapshot=on``."""
    kernel_release: str
    """``uname -r`` in the guest, e.g. ``6.1.0-56-cloud-amd64``."""
    kernel_package: str
    """Debian package and version, e.g. ``linux-image-6.1.0-56-cloud-amd64 6.1.192-2``."""
    key: str
    """Hash of the three parts' keys: equal keys mean identical images."""
    cmdline_extra: tuple[str, ...] = ()
    """Kernel command-line words that select the arm (e.g. ``nbd.memalloc=0``)."""
    identity: dict[str, Any] = field(default_factory=dict)
    """What run.json records as the kernel's identity: version, release, source,
    allocator, arm, config hash, patch hash."""


def default_cache_dir() -> Path:
    """``$SWAPNBD_CACHE``, else ``$XDG_CACHE_HOME/swapnbd``, else ``~/.cache/swapnbd``."""
    explicit = os.environ.get("SWAPNBD_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "swapnbd"
    return Path.home() / ".cache" / "swapnbd"


def input_key(inputs: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able mapping of inputs."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_version(*parts: object) -> str:
    """Hash of the builder code and constants that shape a step's output (for its key).

    Functions, classes and modules count by their source text, anything else by
    its ``repr``. Only what changes the output is listed, so that editing, say,
    progress reporting does not rebuild a root fs.
    """
    digest = hashlib.sha256()
    for part in parts:
        if inspect.isfunction(part) or inspect.isclass(part) or inspect.ismodule(part):
            text = inspect.getsource(part)
        else:
            text = repr(part)
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:20]


# --------------------------------------------------------------------------- cache


def _mount_points_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (from /proc/self/mountinfo)."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    prefix = str(path.resolve())
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].encode().decode("unicode_escape")  # octal escapes like \040
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Delete a half-built step directory, unmounting what debootstrap left mounted in it."""
    for point in _mount_points_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if _mount_points_under(path):
        raise ImageError(f"cannot clean {path}: still has mounts; unmount them by hand")
    shutil.rmtree(path)


@dataclass(slots=True)
class Cache:
    """The cache directory, held under an exclusive lock for one build."""

    root: Path
    emit: Callable[[str], None]

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``CACHE/lock`` (flock) for the block; if another builder has it, say so and wait."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "lock").open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                self.emit(
                    f"[swapnbd] waiting for the cache lock {self.root}/lock (held by {holder})"
                )
                fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}\n")
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle, fcntl.LOCK_UN)

    def clean(self, note: Callable[[str], None], max_age_days: float = PRUNE_AFTER_DAYS) -> None:
        """Delete half-done builds and entries unused for ``max_age_days`` (hold the lock)."""
        horizon = time.time() - max_age_days * 86400
        for kind in STEPS:
            folder = self.root / kind
            if not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith(".tmp-"):
                    note(f"{kind}: removing the half-done build {entry}")
                    remove_tree(entry)
                elif entry.is_dir() and entry.stat().st_mtime < horizon:
                    note(f"{kind}: removing {entry}, unused for {max_age_days:g} days")
                    remove_tree(entry)

    def final(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def durations(self) -> dict[str, float]:
        try:
            data = json.loads((self.root / "durations.json").read_text())
        except (OSError, ValueError):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(v, int | float)}

    def remember(self, kind: str, seconds: float) -> None:
        data = self.durations()
        data[kind] = round(seconds, 1)
        tmp = self.root / "durations.json.tmp"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.root / "durations.json")

    def step(
        self,
        progress: Progress,
        kind: str,
        key: str,
        title: str,
        build: Callable[[Path, Step], None],
    ) -> Path:
        """The finished directory ``CACHE/kind/key``, built by ``build(tmp, step)`` if missing."""
        final = self.final(kind, key)
        if final.is_dir():
            os.utime(final)  # last use, for clean()
            progress.skip(kind, f"cached ({final})")
            return final
        tmp = final.with_name(f".tmp-{key}")
        if tmp.exists():
            progress.note(f"{kind}: removing the half-done build {tmp}")
            remove_tree(tmp)
        tmp.mkdir(parents=True)
        estimate = self.durations().get(kind, ESTIMATES.get(kind))
        with progress.step(f"{kind}: {title}", estimate) as step:
            build(tmp, step)
        if step.duration is not None:
            self.remember(kind, step.duration)
        os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return final


# --------------------------------------------------------------------------- resolve


@dataclass(frozen=True, slots=True)
class Resolved:
    """What apt says the inputs are: kernel package, busybox version, mirror, package versions."""

    kernel: kernel.KernelPackage
    busybox: str
    mirror: str
    versions: dict[str, str]


def apt_fingerprint(
    etc_apt: Path = Path("/etc/apt"), lists: Path = Path("/var/lib/apt/lists")
) -> str:
    """Changes whenever apt's sources or downloaded lists change (and so may its answers)."""
    digest = hashlib.sha256()
    for path in sorted(lists.glob("*")):
        if path.is_file():
            st = path.stat()
            digest.update(f"{path.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    sources = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]
    for path in sources:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:20]


def kernel_chroot(
    cache_root: Path, series: str, note: Callable[[str], None] | None = None
) -> chroot.DebianChroot | None:
    """The chroot whose apt has ``series`` and builds its modules (made once), or None.

    None for the host's own series (6.1, 6.12); sid's root for 7.2.
    """
    suite = kernel.SUITES.get(series)
    if suite is None:
        return None
    return chroot.ensure(cache_root, suite, kmod.SID_PACKAGES, ready=kmod.SID_READY, note=note)


def _apt_state(root: chroot.DebianChroot | None) -> str:
    """The host's apt fingerprint, or the chroot's (its sources and lists) too."""
    if root is None:
        return apt_fingerprint()
    inner = apt_fingerprint(root.path / "etc" / "apt", root.path / "var" / "lib" / "apt" / "lists")
    return input_key({"host": apt_fingerprint(), root.suite: inner})


def _resolve(
    cache: Cache, kernel_name: str, flavour: str, root: chroot.DebianChroot | None = None
) -> Resolved:
    """Ask apt (about 3 s of apt-cache) unless its answer for this apt state is remembered.

    ``root``: the chroot whose apt has the kernel (sid for 7.2); busybox and the root
    fs always come from the host's bookworm.
    """
    memo_dir = cache.root / "resolved"
    memo = memo_dir / f"{kernel_name}-{flavour}-{_apt_state(root)}.json"
    mirror = rootfs.debian_mirror()  # cheap (files only), and an override may change it
    try:
        data = json.loads(memo.read_text())
        if data["mirror"] != mirror:
            raise ValueError("remembered for another mirror")
        return Resolved(
            kernel=kernel.KernelPackage(**data["kernel"]),
            busybox=data["busybox"],
            mirror=data["mirror"],
            versions=dict(data["versions"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    pkg = kernel.resolve_kernel(kernel_name, flavour, root)
    busybox = kernel.apt_candidate("busybox-static")
    if busybox is None:
        kernel.apt_update_once()
        busybox = kernel.apt_candidate("busybox-static")
    if busybox is None:
        raise ImageError("apt has no candidate for busybox-static (check /etc/apt sources)")
    versions = rootfs.package_versions(rootfs.PACKAGES, mirror)
    resolved = Resolved(kernel=pkg, busybox=busybox, mirror=mirror, versions=versions)
    memo_dir.mkdir(parents=True, exist_ok=True)
    memo = memo_dir / f"{kernel_name}-{flavour}-{_apt_state(root)}.json"  # after any update
    tmp = memo.with_suffix(".tmp")
    _write_json(tmp, asdict(resolved))
    tmp.replace(memo)
    return resolved


# --------------------------------------------------------------------------- steps


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _kernel_step(
    cache: Cache,
    progress: Progress,
    pkg: kernel.KernelPackage,
    root: chroot.DebianChroot | None = None,
) -> Path:
    key = input_key(
        {
            "package": pkg.name,
            "version": pkg.version,
            "code": code_version(
                kernel.download_deb, kernel.unpack_kernel, kernel.image_debs, _kernel_step
            ),
        }
    )

    def build(tmp: Path, step: Step) -> None:
        debs = []
        for name, version in kernel.image_debs(pkg, root):
            step.update(f"apt-get download {name}={version}", force=True)
            debs.append(kernel.download_deb(name, version, tmp / "download", root))
        step.update(f"dpkg-deb -x {' '.join(d.name for d in debs)} and depmod", force=True)
        unpacked = kernel.unpack_kernel(debs, tmp / "tree")
        shutil.rmtree(tmp / "download")
        _write_json(
            tmp / "kernel.json",
            {"package": pkg.name, "version": pkg.version, "release": unpacked.release},
        )

    return cache.step(progress, "kernel", key, f"{pkg.name} {pkg.version}", build)


def _busybox_step(cache: Cache, progress: Progress, version: str) -> Path:
    key = input_key(
        {"package": "busybox-static", "version": version, "code": code_version(_busybox_step)}
    )

    def build(tmp: Path, step: Step) -> None:
        step.update(f"apt-get download busybox-static={version}", force=True)
        deb = kernel.download_deb("busybox-static", version, tmp / "download")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "tree")], check=True)
        binary = tmp / "tree" / "bin" / "busybox"
        if not binary.is_file():
            raise ImageError(f"{deb.name} has no bin/busybox")
        shutil.copy2(binary, tmp / "busybox")
        shutil.rmtree(tmp / "download")
        shutil.rmtree(tmp / "tree")
        _write_json(tmp / "busybox.json", {"version": version})

    return cache.step(progress, "busybox", key, f"busybox-static {version}", build)


def _rootfs_step(cache: Cache, progress: Progress, mirror: str, versions: dict[str, str]) -> Path:
    key = input_key(
        {
            "mirror": mirror,
            "suite": rootfs.SUITE,
            "variant": rootfs.VARIANT,
            "packages": list(rootfs.PACKAGES),
            "versions": versions,
            "code": code_version(
                rootfs.debootstrap,
                rootfs.customize,
                rootfs.make_image,
                rootfs.tree_usage,
                rootfs.VARIANT,
                rootfs.HOSTNAME,
                rootfs.FREE_MIB,
                rootfs.TRIM,
                rootfs.POWEROFF,
                _rootfs_step,
            ),
        }
    )

    def build(tmp: Path, step: Step) -> None:
        tree = tmp / "tree"
        step.update(f"mirror {mirror}, packages {' '.join(rootfs.PACKAGES)}", force=True)
        started = time.monotonic()
        rootfs.debootstrap(
            tree,
            mirror=mirror,
            packages=rootfs.PACKAGES,
            step=step,
            log=tmp / "debootstrap.log",
            deb_cache=cache.root / "debootstrap-debs",
        )
        debootstrap_s = time.monotonic() - started
        if _mount_points_under(tree):
            raise ImageError(f"debootstrap left mounts under {tree}")
        (tmp / "packages.txt").write_text(rootfs.installed_packages(tree))
        rootfs.customize(tree)
        step.update("mke2fs -t ext4 -d (image)", force=True)
        info = rootfs.make_image(tree, tmp / "rootfs.ext4")
        shutil.rmtree(tree)
        _write_json(
            tmp / "rootfs.json",
            {
                "mirror": mirror,
                "suite": rootfs.SUITE,
                "packages": list(rootfs.PACKAGES),
                "debootstrap_s": round(debootstrap_s, 1),
                **asdict(info),
            },
        )
        step.update(
            f"image {info.size_bytes // rootfs.MIB} MiB, {info.free_bytes // rootfs.MIB} MiB free",
            force=True,
        )

    return cache.step(progress, "rootfs", key, f"debootstrap {rootfs.SUITE}", build)


def _armmods_step(
    cache: Cache,
    progress: Progress,
    pkg: kernel.KernelPackage,
    kernel_dir: Path,
    series: str,
    *,
    root: chroot.DebianChroot | None = None,
) -> Path:
    """nbd.ko with the memalloc switch and the no-throttle livepatch, for a stock kernel."""
    release = json.loads((kernel_dir / "kernel.json").read_text())["release"]
    patch = arms.patch_files(series, (arms.MODULE_PATCH,))
    key = input_key(
        {
            "release": release,
            "version": pkg.version,
            "patch": arms.patches_hash(patch),
            "livepatch": file_digest(arms.KMOD_DIR / arms.LIVEPATCH_SOURCE),
            "code": code_version(kmod, _armmods_step),
            "built_in": root.suite if root is not None else "host",
        }
    )

    def build(tmp: Path, step: Step) -> None:
        # A chroot build works inside the root (its make sees only its own files).
        with contextlib.ExitStack() as stack:
            if root is not None:
                host, _ = stack.enter_context(root.scratch())
                work = host / "work"
            else:
                work = tmp / "work"
            try:
                built = kmod.build_arm_modules(
                    work,
                    release,
                    pkg.version,
                    series,
                    downloads=cache.root / "sources",
                    step=step,
                    chroot=root,
                )
            except kmod.KmodError as exc:
                if root is None:
                    raise
                # The scratch directory goes with the root's scratch(): name the kept copy.
                raise kmod.KmodError(
                    str(exc).replace(str(work / "build.log"), str(tmp / "build.log"))
                ) from exc
            finally:
                if root is not None and (work / "build.log").is_file():
                    shutil.copy2(work / "build.log", tmp / "build.log")  # kept on failure too
            shutil.copy2(built.nbd, tmp / "nbd.ko")
            shutil.copy2(built.livepatch, tmp / f"{arms.LIVEPATCH_MODULE}.ko")
            shutil.copy2(work / "build.log", tmp / "build.log")
            shutil.rmtree(work)
        _write_json(
            tmp / "armmods.json",
            {
                "release": release,
                "source": f"linux-source-{series} {pkg.version}",
                "built_in": f"{root.suite} chroot" if root is not None else "host",
                "patch_hash": arms.patches_hash(patch),
                "livepatch_hash": file_digest(arms.KMOD_DIR / arms.LIVEPATCH_SOURCE)[:16],
            },
        )

    return cache.step(progress, "armmods", key, f"nbd.ko + livepatch for {release}", build)


def _kbuild_step(
    cache: Cache, progress: Progress, variant: arms.Variant, version: str
) -> kbuild.BuiltKernel:
    """A kernel built from linux-source (cached under CACHE/kbuild/images/)."""
    final = cache.root / "kbuild" / "images" / kbuild.image_key(variant, version)
    if (final / "bzImage").is_file():
        progress.skip("kbuild", f"cached ({final})")
        os.utime(final)
        return kbuild.load_built(final)
    # A variant that differs from a built one only in patches recompiles a few files.
    first = ESTIMATES["kbuild"]
    if kbuild.has_object_tree(variant, version, cache.root):
        first = ESTIMATES["kbuild-incremental"]
    estimate = cache.durations().get(f"kbuild-{variant.name}", first)
    title = f"kbuild: {variant.name} from linux-source-{variant.series} {version}"
    with progress.step(title, estimate) as step:
        built = kbuild.build_variant(variant, version, cache.root, cache.root / "sources", step)
    if step.duration is not None and step.duration > 60:
        cache.remember(f"kbuild-{variant.name}", step.duration)
    return built


def _tree_step(cache: Cache, progress: Progress, choice: arms.KernelChoice) -> kbuild.BuiltKernel:
    """A kernel built from the user's own tree (cached under CACHE/kbuild/images/tree-*)."""
    assert choice.tree is not None and choice.allocator is not None
    kind = f"kbuild-tree-{choice.config_base}"
    first = ESTIMATES["kbuild" if choice.config_base == "full" else "kbuild-minimal"]
    estimate = cache.durations().get(kind, first)
    title = f"kbuild: {choice.tree} ({choice.config_base} config"
    title += f", {choice.patch.name})" if choice.patch else ")"
    with progress.step(title, estimate) as step:
        built = owntree.build_tree(
            choice.tree,
            cache.root,
            step,
            patch=choice.patch,
            base=choice.config_base,
            allocator=choice.allocator,
        )
    if step.duration is not None and step.duration > 60:
        cache.remember(kind, step.duration)
    return built


def _initramfs_step(
    cache: Cache,
    progress: Progress,
    kernel_dir: Path | None,
    busybox_dir: Path,
    payload_dir: Path,
    *,
    armmods_dir: Path | None = None,
) -> Path:
    """The initramfs: busybox, the payload, and the stock kernel's modules (if any).

    ``kernel_dir`` is None for a kernel with every driver built in (a built
    variant or a bzImage path): the initramfs then loads no module. With
    ``armmods_dir`` the project's nbd.ko replaces the stock one and the
    no-throttle livepatch is added, loaded only for ``pfmemalloc_throttle=0``.
    """
    try:
        payload = initramfs.payload_files(payload_dir)
    except initramfs.InitramfsError as exc:
        raise ImageError(str(exc)) from exc
    key = input_key(
        {
            "kernel": kernel_dir.name if kernel_dir is not None else None,
            "armmods": armmods_dir.name if armmods_dir is not None else None,
            "busybox": busybox_dir.name,
            "modules": list(kernel.INITRAMFS_MODULES) if kernel_dir is not None else [],
            "payload": {rel: file_digest(path) for rel, path in payload},
            "code": code_version(
                initramfs,
                kernel.module_name,
                kernel.parse_modules_dep,
                kernel.parse_modules_builtin,
                kernel.module_load_order,
                _initramfs_step,
            ),
        }
    )
    release = "built-in drivers"
    if kernel_dir is not None:
        release = json.loads((kernel_dir / "kernel.json").read_text())["release"]

    def build(tmp: Path, step: Step) -> None:
        modules: list[tuple[str, bytes]] = []
        optional: dict[str, str] = {}
        builtin: set[str] = set()
        if kernel_dir is not None:
            unpacked = kernel.UnpackedKernel(root=kernel_dir / "tree", release=release)
            mods = unpacked.modules_dir
            deps = kernel.parse_modules_dep((mods / "modules.dep").read_text())
            builtin = kernel.parse_modules_builtin((mods / "modules.builtin").read_text())
            order = kernel.module_load_order(deps, builtin, kernel.INITRAMFS_MODULES)
            step.update(f"{len(order)} modules, decompressing", force=True)
            for rel in order:
                name = kernel.module_name(rel)
                if armmods_dir is not None and name == "nbd":
                    modules.append(("nbd.ko", (armmods_dir / "nbd.ko").read_bytes()))
                else:
                    modules.append((f"{name}.ko", initramfs.decompress_module(mods / rel)))
            if armmods_dir is not None:
                live = f"{arms.LIVEPATCH_MODULE}.ko"
                modules.append((live, (armmods_dir / live).read_bytes()))
                optional[live] = "pfmemalloc_throttle=0"
        files = [(rel, path.read_bytes()) for rel, path in payload]
        archive = initramfs.build_archive(
            (busybox_dir / "busybox").read_bytes(), modules, files, optional=optional
        )
        (tmp / "initrd.img").write_bytes(archive)
        _write_json(
            tmp / "initramfs.json",
            {
                "modules": [name for name, _ in modules],
                "optional": optional,
                "builtin": sorted(m for m in kernel.INITRAMFS_MODULES if m in builtin),
                "payload": [rel for rel, _ in payload],
                "size_bytes": len(archive),
            },
        )

    return cache.step(progress, "initramfs", key, f"busybox + modules for {release}", build)


# --------------------------------------------------------------------------- API


def build_guest(
    kernel: str = "6.1",
    flavour: str = "cloud",
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    *,
    payload_dir: Path | None = None,
    arm: str = "patched",
    allocator: str | None = None,
    tree: Path | None = None,
    patch: Path | None = None,
    config_base: str = "full",
) -> GuestImage:
    """Build (or find in the cache) the guest image for ``kernel``/``flavour``.

    Args:
        kernel: ``"6.1"`` (bookworm) or ``"6.12"`` (bookworm-security).
        flavour: ``"cloud"`` (default) or ``"generic"`` Debian kernel flavour.
        cache_dir: where images live; :func:`default_cache_dir` when ``None``.
        progress: receives progress lines; stderr when ``None``.
        payload_dir: source tree holding ``stress/`` and ``vm/image/guest_init.py``;
            this repository when ``None``.
        arm: ``"patched"`` (the kernel as shipped: nbd memalloc and the pfmemalloc
            throttle) or ``"vanilla"`` (both switched off, as before the 2012 series).
        allocator: ``None`` (the kernel's own), ``"slub"`` or ``"slab"`` (6.1 only,
            a kernel built from linux-source).
        tree: a kernel source tree to build instead of ``kernel`` (``--kernel-tree``),
            with ``patch`` applied to a linked copy and ``config_base`` (``full`` or
            ``minimal``: :data:`vm.image.kbuild.BASES`) under the guest fragments.

    Raises:
        ImageError: bad arguments, missing payload or tools, not root for
            debootstrap, or a failed step (the message names the log).
    """
    try:
        if tree is not None:
            choice = arms.resolve_tree(tree, patch, allocator, arm, config_base)
            owntree.check_tree(tree, patch)  # before the root fs and initramfs, not after
        else:
            choice = arms.resolve(kernel, allocator, arm)
    except (arms.ArmError, owntree.TreeError) as exc:
        raise ImageError(str(exc)) from exc
    return _build(choice, flavour, cache_dir, progress, payload_dir)


def _build(
    choice: arms.KernelChoice,
    flavour: str,
    cache_dir: Path | None,
    emit: Callable[[str], None] | None,
    payload_dir: Path | None,
) -> GuestImage:
    payload_root = payload_dir if payload_dir is not None else REPO_ROOT
    series = choice.series or "6.1"  # a bzImage path still needs busybox and the root fs
    steps = {"stock": 5, "build": 4, "bzimage": 3, "tree": 4}[choice.route]
    try:
        kernel.metapackage(series, flavour)  # validates names before any work
        initramfs.payload_files(payload_root)  # fail before a long build, not after
        job = Progress(steps, emit)
        cache = Cache(root=(cache_dir or default_cache_dir()).absolute(), emit=job.emit)
        with cache.locked():
            cache.clean(job.note)
            root = kernel_chroot(cache.root, series, job.note) if choice.route == "stock" else None
            resolved = _resolve(cache, series, flavour, root)
            kernel_dir = armmods_dir = None
            built: kbuild.BuiltKernel | None = None
            if choice.route == "stock":
                kernel_dir = _kernel_step(cache, job, resolved.kernel, root)
                armmods_dir = _armmods_step(
                    cache, job, resolved.kernel, kernel_dir, series, root=root
                )
            busybox_dir = _busybox_step(cache, job, resolved.busybox)
            rootfs_dir = _rootfs_step(cache, job, resolved.mirror, resolved.versions)
            initrd_dir = _initramfs_step(
                cache, job, kernel_dir, busybox_dir, payload_root, armmods_dir=armmods_dir
            )
        if choice.route == "build" and choice.variant is not None:
            # Outside the cache lock: a 20-minute build must not block other runs' images.
            built = _kbuild_step(cache, job, choice.variant, resolved.kernel.version)
        elif choice.route == "tree":
            built = _tree_step(cache, job, choice)
    except (
        kernel.KernelError,
        kmod.KmodError,
        chroot.ChrootError,
        kbuild.KbuildError,
        arms.ArmError,
        rootfs.RootfsError,
        initramfs.InitramfsError,
        CommandError,
        subprocess.CalledProcessError,
        OSError,
    ) as exc:
        raise ImageError(str(exc)) from exc
    identity: dict[str, Any] = {
        "route": choice.route,
        "arm": choice.arm,
        "allocator": choice.allocator,
        "switches": list(choice.cmdline),
    }
    if kernel_dir is not None and armmods_dir is not None:
        meta = json.loads((kernel_dir / "kernel.json").read_text())
        mods = json.loads((armmods_dir / "armmods.json").read_text())
        vmlinuz = kernel_dir / "tree" / "boot" / f"vmlinuz-{meta['release']}"
        release, package = meta["release"], f"{meta['package']} {meta['version']}"
        identity.update(
            version=meta["version"],
            release=release,
            source=f"{meta['package']} (Debian stock)",
            config_hash=file_digest(kernel_dir / "tree" / "boot" / f"config-{release}")[:16],
            patch_hash=mods["patch_hash"],
            livepatch_hash=mods["livepatch_hash"],
            arm_modules=mods["source"],
        )
        kernel_key = kernel_dir.name
    elif built is not None and choice.route == "tree":
        vmlinuz, release = built.bzimage, f"tree {built.meta['version']}"
        package = built.meta["source"]
        if built.meta["patch"]:
            package += f" + {built.meta['patch']}"
        identity.update(
            version=built.meta["version"],
            release=None,
            source=built.meta["source"],
            tree=built.meta["tree"],
            fingerprint=built.meta["fingerprint"],
            config_base=built.meta["base"],
            config_hash=built.meta["config_hash"],
            patch=built.meta["patch"],
            patch_hash=built.meta["patch_hash"],
            patches=built.meta["patches"],
            bzimage=str(built.bzimage),
        )
        kernel_key = built.bzimage.parent.name
    elif built is not None:
        vmlinuz, release = built.bzimage, f"{built.meta['variant']} ({built.meta['version']})"
        package = built.meta["source"]
        identity.update(
            version=built.meta["version"],
            release=None,
            source=built.meta["source"],
            variant=built.meta["variant"],
            config_hash=built.meta["config_hash"],
            patch_hash=built.meta["patch_hash"],
            patches=built.meta["patches"],
            fixed_arm=built.meta["fixed_arm"],
        )
        kernel_key = built.bzimage.parent.name
    else:
        assert choice.bzimage is not None
        vmlinuz = choice.bzimage.absolute()
        release, package = f"bzImage {vmlinuz.name}", str(vmlinuz)
        digest = file_digest(vmlinuz)
        identity.update(version=None, release=None, source=str(vmlinuz), bzimage_sha256=digest)
        identity.update(config_hash=None, patch_hash=None)
        kernel_key = digest[:20]
    image = GuestImage(
        kernel=vmlinuz,
        initrd=initrd_dir / "initrd.img",
        rootfs=rootfs_dir / "rootfs.ext4",
        kernel_release=release,
        kernel_package=package,
        key=input_key({"kernel": kernel_key, "rootfs": rootfs_dir.name, "initrd": initrd_dir.name}),
        cmdline_extra=choice.cmdline,
        identity=identity,
    )
    job.emit(f"{job.prefix} guest image {image.key} ready in {format_duration(job.elapsed())}")
    return image


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """``python -m vm.image``: build the guest image and print its paths as JSON.

    Exit codes: 0 built (or cached), 1 build failed, 2 usage error.
    """
    parser = argparse.ArgumentParser(
        prog="python -m vm.image",
        description="Build (or find in the cache) swapnbd's QEMU guest image: a Debian stock "
        "kernel, a busybox initramfs with the guest payload, and a debootstrap'd ext4 root fs.",
        epilog="examples:\n  python -m vm.image --kernel 6.1\n"
        "  python -m vm.image --kernel 6.12 --cache-dir /var/tmp/swapnbd-cache\n"
        "  python -m vm.image --kernel 7.2 --arm vanilla   # sid's; modules built in a sid chroot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--kernel",
        default="6.1",
        help="stock series (6.1, 6.12, 7.2: sid), a built variant ("
        + ", ".join(arms.VARIANTS)
        + ") "
        "or a bzImage path",
    )
    parser.add_argument("--arm", default="patched", choices=arms.ARMS, help="kernel arm")
    parser.add_argument("--allocator", default=None, choices=arms.ALLOCATORS, help="allocator")
    parser.add_argument(
        "--flavour", default="cloud", choices=sorted(kernel.FLAVOURS), help="Debian kernel flavour"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help=f"cache (default {default_cache_dir()})"
    )
    parser.add_argument(
        "--payload-dir",
        type=Path,
        default=None,
        help="tree with stress/ and vm/image/guest_init.py (default: this repository)",
    )
    args = parser.parse_args(argv)
    try:
        arms.resolve(args.kernel, args.allocator, args.arm)
    except arms.ArmError as exc:
        parser.error(str(exc))
    # SIGTERM unwinds like Ctrl-C, so a running debootstrap is stopped and cleaned up.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        image = build_guest(
            args.kernel,
            args.flavour,
            args.cache_dir,
            payload_dir=args.payload_dir,
            arm=args.arm,
            allocator=args.allocator,
        )
    except ImageError as exc:
        print(f"swapnbd image: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(image), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
