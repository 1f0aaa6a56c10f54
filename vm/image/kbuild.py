"""Guest kernels built from Debian's linux-source: SLAB on 6.1, and the compile-time revert.

Theory of operation
-------------------
A :class:`vm.image.arms.Variant` names a source series, an allocator and a set of
patches. Building one takes about 22 minutes on two idle cores, so the work is
arranged for reuse:

``CACHE/kbuild/linux-source-SERIES_VERSION/``
    ``src/``
        the unpacked tarball with one patch set applied; ``applied.json`` says
        which. Switching to another set reverses the applied patches and applies
        the new ones, which touches only the patched files, so make rebuilds
        only them (about a minute: the revert cross-check reuses the switch
        build this way).
    ``out-CONFIGKEY/``
        one ``O=`` object tree per configuration (x86_64 defconfig +
        kvm_guest.config + ``vm/image/kconfig/guest.config`` + the allocator fragment),
        named by a hash of the fragments. An interrupted build resumes here.
    ``lock``
        flock held for the whole build: one builder per source tree.
``CACHE/kbuild/images/KEY/``
    the finished ``bzImage`` and ``.config`` with ``kbuild.json`` (series,
    version, allocator, patches and their hash, config hash), where KEY hashes
    every input. A finished image is never rebuilt.

Progress: the step counts the compile lines make prints against the count the
last full build of that configuration printed (3,100 the first time), so the
percentage and ETA are real. A failure names its log in one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vm.image import arms, buildlog
from vm.image.kmod import source_tarball
from vm.image.progress import CommandError, Step, run_with_progress

__all__ = [
    "BASES",
    "BUILD_TOOLS",
    "BuiltKernel",
    "KbuildError",
    "base_fragments",
    "build_variant",
    "compile_objects",
    "config_key",
    "configure",
    "expected_config",
    "has_object_tree",
    "image_key",
    "load_built",
    "locked",
    "make_bzimage",
    "missing_config",
    "publish",
    "run_patch",
    "why",
]

#: Compile/link lines of a first build of each base, until one has been measured (a
#: minimal 6.1 build printed 1,890 here).
FIRST_BUILD_LINES = {"full": 3100, "minimal": 1900}
_BUILD_LINE = re.compile(r"^\s+(CC|LD|AR|AS|CPP|HOSTCC|OBJCOPY|GEN|CHK|VDSO\w*)\s+(\S+)")
FRAGMENT = "guest.config"
BUILD_TOOLS = (
    "kernel build needs {}: apt-get install build-essential flex bison bc libelf-dev libssl-dev"
)


class KbuildError(RuntimeError):
    """A kernel could not be built; the message says why and names the log."""


@dataclass(frozen=True, slots=True)
class BuiltKernel:
    """A finished guest kernel in the cache."""

    bzimage: Path
    config: Path
    meta: dict[str, Any]


def fragments(allocator: str) -> list[Path]:
    """The config fragments of a build, in merge order (vm/image/kconfig/)."""
    paths = [arms.KCONFIG_DIR / FRAGMENT, arms.KCONFIG_DIR / f"{allocator}.config"]
    for path in paths:
        if not path.is_file():
            raise KbuildError(f"config fragment missing from the checkout: {path}")
    return paths


def config_key(allocator: str) -> str:
    """Names the object tree of a configuration: a hash of the fragments' text."""
    texts = [p.read_text() for p in fragments(allocator)]
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:12]


def parse_config(text: str) -> dict[str, str]:
    """Kconfig lines -> {CONFIG_X: value}, with ``# CONFIG_X is not set`` read as ``n``."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        off = re.fullmatch(r"# (CONFIG_\w+) is not set", line.strip())
        on = re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip())
        if off:
            values[off.group(1)] = "n"
        elif on:
            values[on.group(1)] = on.group(2)
    return values


def expected_config(allocator: str) -> dict[str, str]:
    """{CONFIG_X: "y" | "n" | value} that the fragments ask for."""
    wanted: dict[str, str] = {}
    for path in fragments(allocator):
        wanted.update(parse_config(path.read_text()))
    return wanted


def missing_config(config_text: str, wanted: dict[str, str]) -> list[str]:
    """Fragment settings that did not survive ``olddefconfig`` (pure, for tests).

    A symbol asked to be ``n`` may be absent altogether (its menu is off).
    """
    have = parse_config(config_text)
    return [
        f"{key}={value}"
        for key, value in wanted.items()
        if have.get(key, "n") != value and not (value == "n" and key not in have)
    ]


def image_key(variant: arms.Variant, version: str) -> str:
    patches = arms.patch_files(variant.series, variant.patches)
    blob = json.dumps(
        {
            "series": variant.series,
            "version": version,
            "config": config_key(variant.allocator),
            "patches": arms.patches_hash(patches),
        },
        sort_keys=True,
    )
    return f"{variant.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def locked(path: Path, step: Step) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            step.update(f"waiting for another kernel build ({path})", force=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _unpack_source(tarball: Path, tree: Path, step: Step) -> Path:
    src = tree / "src"
    if (src / "Makefile").is_file():
        return src
    tmp = tree / ".tmp-src"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    step.update(f"unpacking {tarball.name} (about a minute)", force=True)
    with tarfile.open(tarball, "r:xz") as archive:
        archive.extractall(tmp, filter="tar")
    tops = [p for p in tmp.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise KbuildError(f"{tarball} unpacked into {len(tops)} top directories, expected one")
    tops[0].rename(src)
    shutil.rmtree(tmp)
    return src


def run_patch(src: Path, patch: Path, log: Path, *, reverse: bool = False) -> int:
    """``patch -p1`` of ``patch`` in ``src`` (``-R`` to reverse), its output appended to
    ``log``; returns patch's exit status. A point release's line offsets are fine; fuzz
    is not (kmod.apply_patch says why)."""
    argv = ["patch", "-p1", "--forward", "--fuzz=0", "--no-backup-if-mismatch", "-i", str(patch)]
    if reverse:
        argv = ["patch", "-p1", "-R", "--fuzz=0", "--no-backup-if-mismatch", "-i", str(patch)]
    with log.open("ab") as sink:
        sink.write(f"$ {' '.join(argv)}\n".encode())
        sink.flush()
        done = subprocess.run(argv, cwd=src, stdout=sink, stderr=subprocess.STDOUT, check=False)
    return done.returncode


def _patch(src: Path, patch: Path, log: Path, *, reverse: bool = False) -> None:
    status = run_patch(src, patch, log, reverse=reverse)
    if status != 0:
        how = "reverse" if reverse else "apply"
        why = buildlog.diagnose(log.read_text(errors="replace")) or f"exit {status}"
        raise KbuildError(f"cannot {how} {patch.name} in {src.parent.name}: {why}; log: {log}")


def _switch_patches(src: Path, tree: Path, series: str, wanted: tuple[str, ...], log: Path) -> None:
    """Make ``src`` carry exactly the patch set ``wanted`` (recorded in applied.json)."""
    record = tree / "applied.json"
    try:
        applied = json.loads(record.read_text())
    except (OSError, ValueError):
        applied = {"patches": [], "hash": None}
    paths = arms.patch_files(series, wanted)
    digest = arms.patches_hash(paths)
    if applied.get("patches") == list(wanted) and applied.get("hash") == digest:
        return
    if applied.get("patches"):
        # Reverse with the copies saved when they were applied (the checkout may have moved on).
        for name in reversed(applied["patches"]):
            _patch(src, tree / "applied" / name, log, reverse=True)
    record.write_text(json.dumps({"patches": [], "hash": None}) + "\n")
    saved = tree / "applied"
    shutil.rmtree(saved, ignore_errors=True)
    saved.mkdir()
    for path in paths:
        _patch(src, path, log)
        shutil.copy2(path, saved / path.name)
    record.write_text(json.dumps({"patches": list(wanted), "hash": digest}) + "\n")


#: The base configurations fragments go on top of: ``full`` is x86_64's defconfig with
#: kvm_guest.config (the project's built variants, about 3,100 compile steps); ``minimal``
#: starts from allnoconfig and adds only what the guest uses (minimal.config), for
#: ``--kernel-tree`` builds where a bisect step should take minutes, not twenty.
BASES: dict[str, tuple[str, ...]] = {
    "full": ("defconfig", "kvm_guest.config"),
    "minimal": ("allnoconfig",),
}


def base_fragments(base: str, allocator: str) -> list[Path]:
    """Every fragment of a build on ``base``, in merge order."""
    extra = [arms.KCONFIG_DIR / "minimal.config"] if base == "minimal" else []
    for path in extra:
        if not path.is_file():
            raise KbuildError(f"config fragment missing from the checkout: {path}")
    return extra + fragments(allocator)


def configure(src: Path, out: Path, base: str, frags: list[Path], *, log: Path, step: Step) -> None:
    """Write ``out/.config``: ``base``'s targets, then ``frags`` appended (later lines win
    in Kconfig), then ``olddefconfig``. Nothing is written into ``src``: it may be a
    kernel engineer's own tree. Already configured: only ``olddefconfig`` (the source
    may have moved on, adding symbols).

    Raises:
        KbuildError: a fragment setting did not survive (a dependency is off).
        CommandError: make failed.
    """
    config = out / ".config"
    if not config.is_file():
        out.mkdir(parents=True, exist_ok=True)
        targets = BASES[base]
        step.update(f"make {' '.join(targets)} + {len(frags)} swapnbd fragments", force=True)
        run_with_progress(["make", f"O={out}", *targets], step, log=log, cwd=src)
        with config.open("a") as handle:
            for path in frags:
                handle.write(f"\n# --- {path.name} (swapnbd)\n{path.read_text()}")
    run_with_progress(["make", f"O={out}", "olddefconfig"], step, log=log, cwd=src)
    wanted: dict[str, str] = {}
    for path in frags:
        wanted.update(parse_config(path.read_text()))
    missing = missing_config(config.read_text(), wanted)
    if missing:
        raise KbuildError(
            f"the kernel config lost {', '.join(missing)} (a dependency is off); "
            f"see {config} and {log}"
        )


def make_bzimage(
    src: Path,
    out: Path,
    log: Path,
    step: Step,
    *,
    memo: Path,
    memo_key: str,
    about: str,
    base: str = "full",
) -> int:
    """``make bzImage`` in ``out`` with progress: compile steps counted against the count
    the last full build of ``memo_key`` printed (kept in ``memo``). Returns the count.

    Raises:
        CommandError: make failed (the message has the log's tail).
    """
    fresh = not (out / "arch" / "x86" / "boot" / "bzImage").exists()
    memos = _read_memo(memo)
    expected = memos.get(memo_key, FIRST_BUILD_LINES[base]) if fresh else None
    seen = 0

    def on_line(line: str) -> tuple[str, float | None] | None:
        nonlocal seen
        match = _BUILD_LINE.match(line)
        if match is None:
            return None
        seen += 1
        fraction = min(0.99, seen / expected) if expected else None
        return f"{match.group(1)} {match.group(2)} ({seen} steps)", fraction

    jobs = str(max(1, os.cpu_count() or 1))
    step.update(f"make -j{jobs} bzImage ({about}); log {log}", force=True)
    run_with_progress(
        ["make", f"O={out}", f"-j{jobs}", "bzImage"],
        step,
        log=log,
        cwd=src,
        on_line=on_line,
        heartbeat="make bzImage",
    )
    if fresh:
        memos = _read_memo(memo)
        memos[memo_key] = seen
        memo.write_text(json.dumps(memos, indent=1) + "\n")
    return seen


def _read_memo(memo: Path) -> dict[str, int]:
    try:
        data = json.loads(memo.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items()}


def _source_tree(variant: arms.Variant, version: str, cache_root: Path) -> Path:
    """CACHE/kbuild/linux-source-SERIES_VERSION: one per source version, shared by variants."""
    return cache_root / "kbuild" / f"linux-source-{variant.series}_{version}"


def _patched_source(
    variant: arms.Variant, version: str, tree: Path, log: Path, *, downloads: Path, step: Step
) -> Path:
    """The unpacked source in ``tree`` carrying ``variant``'s patches (hold the tree's lock)."""
    tarball = source_tarball(variant.series, version, downloads, step)
    src = _unpack_source(tarball, tree, step)
    _switch_patches(src, tree, variant.series, variant.patches, log)
    return src


def build_variant(
    variant: arms.Variant, version: str, cache_root: Path, downloads: Path, step: Step
) -> BuiltKernel:
    """Build (or find) ``variant`` from linux-source ``version``; returns the cached image.

    Raises:
        KbuildError: missing source, a patch that does not apply, a config that
            lost a setting, or a failed make (the message names the log).
    """
    key = image_key(variant, version)
    images = cache_root / "kbuild" / "images"
    final = images / key
    if (final / "bzImage").is_file():
        os.utime(final)
        return load_built(final)
    tree = _source_tree(variant, version, cache_root)
    with locked(tree / "lock", step):
        if (final / "bzImage").is_file():
            return load_built(final)
        started = time.monotonic()
        log = tree / f"build-{key}.log"
        src = _patched_source(variant, version, tree, log, downloads=downloads, step=step)
        ckey = config_key(variant.allocator)
        out = tree / f"out-{ckey}"
        try:
            configure(src, out, "full", fragments(variant.allocator), log=log, step=step)
            make_bzimage(
                src,
                out,
                log,
                step,
                memo=tree.parent / "build-lines.json",
                memo_key=ckey,
                about=variant.about,
            )
        except CommandError as exc:
            raise KbuildError(
                f"kernel build of {variant.name} from linux-source-{variant.series} {version} "
                f"failed: {why(exc.log)}; log: {exc.log}"
            ) from exc
        except FileNotFoundError as exc:
            raise KbuildError(BUILD_TOOLS.format(exc.filename)) from exc
        patches = arms.patch_files(variant.series, variant.patches)
        meta = {
            "variant": variant.name,
            "series": variant.series,
            "source": f"linux-source-{variant.series} {version}",
            "version": version,
            "allocator": variant.allocator,
            "patches": list(variant.patches),
            "patch_hash": arms.patches_hash(patches),
            "config_hash": hashlib.sha256((out / ".config").read_bytes()).hexdigest()[:16],
            "fixed_arm": variant.fixed_arm,
            "build_s": round(time.monotonic() - started, 1),
            "log": str(log),
        }
        publish(out, images, key, meta)
    return load_built(final)


def publish(out: Path, images: Path, key: str, meta: dict[str, Any]) -> None:
    """Copy the finished ``bzImage`` and ``.config`` of object tree ``out`` into
    ``images/key`` with ``kbuild.json`` (``meta``), atomically."""
    tmp = images / f".tmp-{key}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(out / "arch" / "x86" / "boot" / "bzImage", tmp / "bzImage")
    shutil.copy2(out / ".config", tmp / "config")
    (tmp / "kbuild.json").write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, images / key)


def has_object_tree(variant: arms.Variant, version: str, cache_root: Path) -> bool:
    """Whether a build of ``variant``'s configuration exists (so the next one is incremental)."""
    tree = _source_tree(variant, version, cache_root)
    return (tree / f"out-{config_key(variant.allocator)}" / "vmlinux").exists()


def compile_objects(
    variant: arms.Variant,
    version: str,
    cache_root: Path,
    objects: list[str],
    *,
    downloads: Path,
    step: Step,
) -> Path:
    """Compile only ``objects`` (e.g. ``mm/vmscan.o``) of ``variant``; returns the object tree.

    The cheap proof that the patches build, for machines without 20 minutes to
    spare: same source tree, patches and configuration as :func:`build_variant`,
    so a later full build reuses what this compiled.
    """
    tree = _source_tree(variant, version, cache_root)
    with locked(tree / "lock", step):
        log = tree / "objects.log"
        src = _patched_source(variant, version, tree, log, downloads=downloads, step=step)
        out = tree / f"out-{config_key(variant.allocator)}"
        jobs = str(max(1, os.cpu_count() or 1))
        try:
            configure(src, out, "full", fragments(variant.allocator), log=log, step=step)
            run_with_progress(
                ["make", f"O={out}", f"-j{jobs}", *objects],
                step,
                log=log,
                cwd=src,
                heartbeat=f"make {' '.join(objects)}",
            )
        except CommandError as exc:
            raise KbuildError(
                f"compiling {', '.join(objects)} of linux-source-{variant.series} {version} "
                f"failed: {why(exc.log)}; log: {exc.log}"
            ) from exc
    return out


def why(log: Path) -> str:
    """The cause a build log names (:func:`vm.image.buildlog.diagnose`), or a pointer to it."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "no log was written"
    return buildlog.diagnose(text) or "see the log"


def load_built(final: Path) -> BuiltKernel:
    """The finished kernel in ``final`` (a CACHE/kbuild/images/KEY directory)."""
    meta = json.loads((final / "kbuild.json").read_text())
    return BuiltKernel(bzimage=final / "bzImage", config=final / "config", meta=meta)
