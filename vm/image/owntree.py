"""Guest kernels built from a kernel engineer's own source tree: ``--kernel-tree DIR``.

Theory of operation
-------------------
:func:`build_tree` builds ``DIR`` (optionally with ``--patch FILE`` applied) with the
project's guest configuration and every driver built in, and caches the result:

``CACHE/kbuild/trees/TREEKEY/`` (one per tree path)
    ``src/``
        with ``--patch`` only: a hard-linked copy of the tree with the patch applied
        (GNU patch writes a new file, so the tree's own files are never touched); made
        afresh for each build, so the tree's unchanged files keep their mtimes and make
        rebuilds only what changed.
    ``out-BASE-CONFIGKEY-{plain,patched}/``
        the ``O=`` object tree (one for the tree itself, one for its patched copy),
        reused from build to build: a bisect step rebuilds what the checkout changed.
    ``lock``
        flock held for the whole build.
``CACHE/kbuild/images/tree-KEY/``
    the finished ``bzImage``, its ``config`` and ``kbuild.json``, where KEY hashes the
    tree's content fingerprint (:func:`fingerprint`), the patch and the configuration.
    A finished image is never rebuilt.

Without ``--patch`` make runs on ``DIR`` itself with ``O=``: Kbuild writes nothing into
a source tree then, and refuses one configured in place (``DIR/.config``), which is a
clear error here before make starts. Base ``full`` is the variants' configuration (x86_64
defconfig and kvm_guest.config, about 22 min on two idle cores); ``minimal`` starts
from allnoconfig (:mod:`vm.image.kbuild`, ``BASES``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from vm.image import kbuild
from vm.image.progress import CommandError, Step

__all__ = [
    "TreeError",
    "apply_patch",
    "build_tree",
    "check_tree",
    "fingerprint",
    "image_key",
    "linked_copy",
    "tree_version",
]


class TreeError(kbuild.KbuildError):
    """The tree or the patch cannot be built; the message says why."""


def tree_version(tree: Path) -> str:
    """``6.1.158`` (with any EXTRAVERSION) from the tree's top Makefile.

    Raises:
        TreeError: not a kernel source tree.
    """
    try:
        text = (tree / "Makefile").read_text(errors="replace")[:4000]
    except OSError:
        text = ""
    fields: dict[str, str] = dict(
        re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=[ \t]*(\S*)", text, re.M)
    )
    if not (fields.get("VERSION") and (tree / "Kconfig").is_file()):
        raise TreeError(
            f"--kernel-tree {tree}: not a kernel source tree (no top Makefile with VERSION, "
            "or no Kconfig)"
        )
    version = ".".join(fields[k] for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL") if fields.get(k))
    return version + fields.get("EXTRAVERSION", "")


def check_tree(tree: Path, patch: Path | None = None) -> str:
    """What can be known of ``tree`` before any work: a kernel source tree (its version is
    returned), clean enough for an ``O=`` build, and ``patch`` a file.

    Raises:
        TreeError: which of these is not so, and what to do.
    """
    version = tree_version(tree)
    if patch is not None and not patch.is_file():
        raise TreeError(f"--patch {patch}: no such file")
    built_in_place = [
        rel
        for rel in (".config", "include/config", "arch/x86/include/generated")
        if (tree / rel).exists()
    ]
    if built_in_place:
        raise TreeError(
            f"--kernel-tree {tree} has been configured or built in place "
            f"({', '.join(built_in_place)}); Kbuild builds elsewhere (O=) only from a clean "
            "tree: run 'make mrproper' in it, or give a clean copy"
        )
    return version


def _git(tree: Path, *args: str) -> bytes | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(tree), *args], capture_output=True, check=False, timeout=120
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def fingerprint(tree: Path) -> dict[str, str]:
    """What identifies the tree's content. A git work tree: its HEAD commit, plus a hash
    of the uncommitted diff and of the untracked files' names, sizes and mtimes when it is
    dirty. Any other tree: a hash of every file's path, size and mtime, and of every
    symlink's target (a few seconds for a kernel tree; a change that keeps size and
    mtime is missed)."""
    top = _git(tree, "rev-parse", "--show-toplevel")
    if top is not None and Path(top.decode().strip()).resolve() == tree.resolve():
        head = (_git(tree, "rev-parse", "HEAD") or b"").decode().strip()
        diff = _git(tree, "diff", "HEAD", "--binary") or b""
        untracked = _git(tree, "ls-files", "--others", "--exclude-standard", "-z") or b""
        digest = hashlib.sha256(diff)
        for raw in sorted(n for n in untracked.split(b"\0") if n):
            st = (tree / raw.decode(errors="surrogateescape")).lstat()
            digest.update(b"\0%s\0%d\0%d" % (raw, st.st_size, st.st_mtime_ns))
        dirty = bool(diff or untracked)
        return {"kind": "git", "head": head, "dirty": digest.hexdigest()[:16] if dirty else ""}
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(tree):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files):
            path = Path(root) / name
            rel = str(path.relative_to(tree)).encode(errors="surrogateescape")
            if path.is_symlink():  # its target, not its mtime: tar does not restore that
                target = os.readlink(path).encode(errors="surrogateescape")
                digest.update(b"%s\0->%s\n" % (rel, target))
                continue
            st = path.lstat()
            digest.update(b"%s\0%d\0%d\n" % (rel, st.st_size, st.st_mtime_ns))
    return {"kind": "files", "sha256": digest.hexdigest()[:16]}


def linked_copy(tree: Path, dest: Path, log: Path) -> None:
    """``dest``: the tree hard-linked file by file (a copy where linking cannot cross
    file systems); ``.git`` is left out."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for entry in tree.iterdir():
        if entry.name == ".git":
            continue
        for flags in ("-al", "-a"):
            done = subprocess.run(
                ["cp", flags, str(entry), str(dest / entry.name)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode == 0:
                break
            shutil.rmtree(dest / entry.name, ignore_errors=True)
            with log.open("a") as sink:
                sink.write(f"cp {flags} {entry}: {done.stderr}")
        else:
            raise TreeError(f"cannot copy {entry} into {dest}: {done.stderr.strip()}")


def apply_patch(src: Path, patch: Path, log: Path) -> None:
    if kbuild.run_patch(src, patch, log) != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise TreeError(
            f"--patch {patch} does not apply to the tree: {' | '.join(tail)}; log: {log}"
        )


def image_key(print_: dict[str, str], patch: Path | None, base: str, allocator: str) -> str:
    frags = kbuild.base_fragments(base, allocator)
    blob = json.dumps(
        {
            "tree": print_,
            "patch": hashlib.sha256(patch.read_bytes()).hexdigest() if patch else None,
            "base": base,
            "config": [p.read_text() for p in frags],
        },
        sort_keys=True,
    )
    return "tree-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_tree(
    tree: Path,
    cache_root: Path,
    step: Step,
    *,
    patch: Path | None = None,
    base: str = "full",
    allocator: str = "slub",
) -> kbuild.BuiltKernel:
    """Build (or find in the cache) the kernel in ``tree``; returns the cached image.

    Raises:
        TreeError: not a kernel tree, configured in place, or a patch that does not apply.
        kbuild.KbuildError: a config that lost a setting, or a failed make (the message
            names the log).
    """
    tree = tree.resolve()
    version = check_tree(tree, patch)
    if base not in kbuild.BASES:
        raise TreeError(f"unknown config base {base!r}: choose one of {', '.join(kbuild.BASES)}")
    step.update(f"fingerprinting {tree}", force=True)
    print_ = fingerprint(tree)
    key = image_key(print_, patch, base, allocator)
    images = cache_root / "kbuild" / "images"
    final = images / key
    if (final / "bzImage").is_file():
        os.utime(final)
        return _as_asked(kbuild.load_built(final), tree, patch)
    work = cache_root / "kbuild" / "trees" / hashlib.sha256(str(tree).encode()).hexdigest()[:12]
    frags = kbuild.base_fragments(base, allocator)
    ckey = hashlib.sha256("\0".join(p.read_text() for p in frags).encode()).hexdigest()[:12]
    with kbuild.locked(work / "lock", step):
        if (final / "bzImage").is_file():
            return _as_asked(kbuild.load_built(final), tree, patch)
        started = time.monotonic()
        log = work / f"build-{key}.log"
        src = tree
        if patch is not None:
            src = work / "src"
            step.update(f"linking {tree} into {src} for {patch.name}", force=True)
            linked_copy(tree, src, log)
            apply_patch(src, patch, log)
        # Objects remember the source path they came from: the tree and its patched copy
        # each get their own object tree, so neither sees the other's dependencies.
        out = work / f"out-{base}-{ckey}-{'patched' if patch else 'plain'}"
        about = f"{tree.name} {version}" + (f" + {patch.name}" if patch else "")
        try:
            kbuild.configure(src, out, base, frags, log=log, step=step)
            kbuild.make_bzimage(
                src,
                out,
                log,
                step,
                memo=work.parent / "build-lines.json",
                memo_key=base,
                about=about,
                base=base,
            )
        except CommandError as exc:
            raise kbuild.KbuildError(
                f"kernel build of {about} failed: {kbuild.why(exc.log)}; log: {exc.log}"
            ) from exc
        except FileNotFoundError as exc:
            raise kbuild.KbuildError(kbuild.BUILD_TOOLS.format(exc.filename)) from exc
        meta = {
            "variant": None,
            "series": None,
            "source": f"tree {tree}",
            "tree": str(tree),
            "fingerprint": print_,
            "version": version,
            "allocator": allocator,
            "base": base,
            "patches": [patch.name] if patch else [],
            "patch": str(patch.resolve()) if patch else None,
            "patch_hash": hashlib.sha256(patch.read_bytes()).hexdigest()[:16] if patch else None,
            "config_hash": hashlib.sha256((out / ".config").read_bytes()).hexdigest()[:16],
            "fixed_arm": None,
            "build_s": round(time.monotonic() - started, 1),
            "log": str(log),
        }
        kbuild.publish(out, images, key, meta)
    return kbuild.load_built(final)


def _as_asked(built: kbuild.BuiltKernel, tree: Path, patch: Path | None) -> kbuild.BuiltKernel:
    """A cached image, recorded as this run's tree and patch: the cache key is their
    content, so another checkout (or a copy) of the same source finds the same image, and
    run.json must name the tree the user gave, not the one that happened to build it
    (``built_from``, when they differ)."""
    meta = dict(built.meta)
    if meta.get("tree") != str(tree):
        meta["built_from"] = meta.get("tree")
        meta["tree"] = str(tree)
        meta["source"] = f"tree {tree}"
        meta["patch"] = str(patch.resolve()) if patch else None
    return dataclasses.replace(built, meta=meta)
