"""Kernel arms and kernel variants: which kernel a run boots and how its arm is chosen.

Theory of operation
-------------------
The experiment compares two *arms* of one kernel:

``patched``
    the kernel as shipped: since 3.6 nbd marks its sockets ``SOCK_MEMALLOC`` and
    sends with ``PF_MEMALLOC`` (Mel Gorman's 2012 series), and direct reclaimers
    are throttled on ``pfmemalloc_wait`` (``pgscan_direct_throttle`` counts them);
``vanilla``
    both switched off, as before the series.

The arm is chosen on the kernel command line, from the same binaries, with two
switches: ``nbd.memalloc=0|1`` and ``pfmemalloc_throttle=0|1``. How a kernel
honours them depends on where it comes from (:func:`resolve`):

* a **stock** Debian kernel (``6.1``, ``6.12``, and sid's ``7.2``, whose modules
  are built in a sid chroot) runs the project's ``nbd.ko``, rebuilt from the
  matching ``linux-source`` with ``vm/image/kpatch/<series>/
  nbd-memalloc-switch.patch`` (a ``memalloc`` module parameter, default on, as
  upstream), and, for ``pfmemalloc_throttle=0`` only, the livepatch
  ``vm/image/kmod_src/swapnbd_nothrottle.c`` that makes ``throttle_direct_reclaim()``
  return false (:mod:`vm.image.kmod`). The initramfs passes ``nbd.*`` words to
  ``insmod`` as modprobe would;
* a **built** variant (``6.1-slab`` ...) is compiled from ``linux-source`` with
  both switch patches and every driver built in (:mod:`vm.image.kbuild`), so the
  words are ordinary boot parameters; a ``*-revert`` variant carries the
  compile-time revert instead and is vanilla only (the cross-check);
* a **bzImage path** is booted as given; the words are passed and the guest
  reports whether the kernel knew them.

Everything here is pure: names in, descriptions out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "ALLOCATORS",
    "ARMS",
    "HOST_SERIES",
    "KPATCH_DIR",
    "STOCK_SERIES",
    "VARIANTS",
    "ArmError",
    "KernelChoice",
    "Variant",
    "arm_cmdline",
    "arm_in_effect",
    "patch_files",
    "patches_hash",
    "resolve",
]

Arm = Literal["patched", "vanilla"]
ARMS: tuple[Arm, ...] = ("patched", "vanilla")
ALLOCATORS = ("slub", "slab")
#: The configurations a ``--kernel-tree`` build starts from (vm/image/kbuild.py, BASES).
CONFIG_BASES = ("full", "minimal")
#: Debian kernel series the project knows (stock cloud kernels and linux-source).
STOCK_SERIES = ("6.1", "6.12", "7.2")
#: The series of the host's own suite (bookworm): linux-source installed under /usr/src,
#: all four patches (built variants too). 7.2 is sid's, stock only, one patch.
HOST_SERIES = ("6.1", "6.12")

IMAGE_DIR = Path(__file__).resolve().parent
KPATCH_DIR = IMAGE_DIR / "kpatch"
KCONFIG_DIR = IMAGE_DIR / "kconfig"
#: The livepatch's C source (``kmod_src``: ``kmod`` is the module that builds it).
KMOD_DIR = IMAGE_DIR / "kmod_src"

SWITCH_PATCHES = ("nbd-memalloc-switch.patch", "vmscan-throttle-switch.patch")
REVERT_PATCHES = ("revert-nbd-memalloc.patch", "revert-vmscan-throttle.patch")
#: The stock-kernel route rebuilds nbd.ko only; the throttle is a livepatch.
MODULE_PATCH = "nbd-memalloc-switch.patch"
LIVEPATCH_SOURCE = "swapnbd_nothrottle.c"
LIVEPATCH_MODULE = "swapnbd_nothrottle"


class ArmError(ValueError):
    """A kernel, allocator or arm that cannot be combined; the message says what works."""


@dataclass(frozen=True, slots=True)
class Variant:
    """A kernel the project builds from Debian's linux-source."""

    name: str
    """What ``--kernel`` accepts, e.g. ``6.1-slab``."""
    series: str
    """Debian source series, ``6.1`` or ``6.12``."""
    allocator: str
    """``slub`` or ``slab`` (a config fragment in vm/image/kconfig/)."""
    patches: tuple[str, ...]
    """Patch files under vm/image/kpatch/<series>/, applied in order."""
    fixed_arm: Arm | None = None
    """The only arm this kernel can run (a compile-time revert), or None (switches)."""
    about: str = ""


VARIANTS: Mapping[str, Variant] = {
    v.name: v
    for v in (
        Variant("6.1-build", "6.1", "slub", SWITCH_PATCHES, about="6.1 SLUB, both switches"),
        Variant("6.1-slab", "6.1", "slab", SWITCH_PATCHES, about="6.1 SLAB (the 2012 baseline)"),
        Variant("6.12-build", "6.12", "slub", SWITCH_PATCHES, about="6.12 SLUB, both switches"),
        Variant(
            "6.1-slab-revert",
            "6.1",
            "slab",
            REVERT_PATCHES,
            fixed_arm="vanilla",
            about="6.1 SLAB with the series reverted at compile time (cross-check)",
        ),
    )
}


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """What :func:`resolve` decided a ``--kernel``/``--allocator``/``--arm`` triple means."""

    route: Literal["stock", "build", "bzimage", "tree"]
    arm: Arm
    series: str | None
    """``6.1``/``6.12`` for stock and built kernels; None for a bzImage path."""
    allocator: str | None
    """``slub``/``slab``; None when unknown (a bzImage path)."""
    variant: Variant | None = None
    bzimage: Path | None = None
    cmdline: tuple[str, ...] = ()
    """The kernel command-line words that select the arm."""
    tree: Path | None = None
    """A kernel source tree to build (``--kernel-tree``), with :attr:`patch` applied."""
    patch: Path | None = None
    config_base: str = "full"
    """The configuration a tree is built with (:data:`vm.image.kbuild.BASES`)."""


def arm_cmdline(arm: str) -> tuple[str, ...]:
    """The two switch words for ``arm`` (explicit for both arms, so the log shows them)."""
    if arm == "patched":
        return ("nbd.memalloc=1", "pfmemalloc_throttle=1")
    if arm == "vanilla":
        return ("nbd.memalloc=0", "pfmemalloc_throttle=0")
    raise ArmError(f"unknown arm {arm!r}: choose one of {', '.join(ARMS)}")


def resolve(kernel: str, allocator: str | None, arm: str) -> KernelChoice:
    """Decide how to get ``kernel`` with ``allocator`` and how to select ``arm``.

    Args:
        kernel: ``6.1``/``6.12`` (stock Debian cloud kernels), a variant name from
            :data:`VARIANTS`, or a path to a bzImage (contains ``/``).
        allocator: None (the kernel's own), ``slub`` or ``slab``.
        arm: ``patched`` or ``vanilla``.

    Raises:
        ArmError: an unknown name, or a combination that does not exist.
    """
    words = arm_cmdline(arm)
    checked_arm: Arm = "vanilla" if arm == "vanilla" else "patched"
    if allocator is not None and allocator not in ALLOCATORS:
        raise ArmError(f"unknown allocator {allocator!r}: choose one of {', '.join(ALLOCATORS)}")
    if "/" in kernel or kernel.endswith(("bzImage", ".img")) or kernel.startswith("vmlinuz"):
        path = Path(kernel)
        if not path.is_file():
            raise ArmError(
                f"--kernel {kernel}: no such file (give a bzImage path, or one of "
                f"{', '.join((*STOCK_SERIES, *VARIANTS))})"
            )
        if allocator is not None:
            raise ArmError(
                "--allocator cannot be chosen for a bzImage path: it is whatever "
                "the image was built with"
            )
        return KernelChoice("bzimage", checked_arm, None, None, bzimage=path, cmdline=words)
    if kernel in STOCK_SERIES:
        if allocator in (None, "slub"):
            return KernelChoice("stock", checked_arm, kernel, "slub", cmdline=words)
        slab = VARIANTS.get(f"{kernel}-slab")
        if slab is None:
            raise ArmError(
                f"kernel {kernel} has no SLAB (it was removed in 6.8): use --allocator slub, "
                "or --kernel 6.1 --allocator slab"
            )
        kernel = slab.name
    variant = VARIANTS.get(kernel)
    if variant is None:
        raise ArmError(
            f"unknown kernel {kernel!r}: choose a stock series ({', '.join(STOCK_SERIES)}), a "
            f"built variant ({', '.join(VARIANTS)}) or a bzImage path"
        )
    if allocator is not None and allocator != variant.allocator:
        raise ArmError(
            f"kernel {variant.name} is built with {variant.allocator}, not {allocator}: "
            f"drop --allocator or pick another kernel"
        )
    if variant.fixed_arm is not None and variant.fixed_arm != arm:
        raise ArmError(
            f"kernel {variant.name} has the series reverted at compile time: it can only run "
            f"--arm {variant.fixed_arm}"
        )
    return KernelChoice(
        "build", checked_arm, variant.series, variant.allocator, variant=variant, cmdline=words
    )


def resolve_tree(
    tree: Path, patch: Path | None, allocator: str | None, arm: str, config_base: str = "full"
) -> KernelChoice:
    """``--kernel-tree``: build ``tree`` (with ``patch``) with ``allocator`` (default SLUB,
    the only one since 6.8); an own kernel, so its arm is the user's word unless it knows
    the switches.

    Raises:
        ArmError: an unknown arm, allocator or config base. (A tree or patch that does
            not exist is refused by RunConfig at the command line and by
            :func:`vm.image.owntree.check_tree` where they are used.)
    """
    words = arm_cmdline(arm)
    if allocator is not None and allocator not in ALLOCATORS:
        raise ArmError(f"unknown allocator {allocator!r}: choose one of {', '.join(ALLOCATORS)}")
    if config_base not in CONFIG_BASES:
        raise ArmError(f"unknown kernel config {config_base!r}: choose one of {CONFIG_BASES}")
    checked: Arm = "vanilla" if arm == "vanilla" else "patched"
    return KernelChoice(
        "tree",
        checked,
        None,
        allocator or "slub",
        cmdline=words,
        tree=tree,
        patch=patch,
        config_base=config_base,
    )


def patch_files(series: str, names: tuple[str, ...]) -> list[Path]:
    """The patch files ``names`` for ``series``; ArmError names a missing one."""
    paths = [KPATCH_DIR / series / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ArmError(f"kernel patches missing from the checkout: {', '.join(missing)}")
    return paths


def patches_hash(paths: list[Path]) -> str:
    """sha256 over the patch files' names and bytes, in order (recorded in run.json)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _flag(value: object) -> bool | None:
    """A sysfs bool (``Y``/``N``/``1``/``0``) as a bool; None when absent or unreadable."""
    if value is None:
        return None
    text = str(value).strip()
    if text in ("Y", "y", "1"):
        return True
    if text in ("N", "n", "0"):
        return False
    return None


def arm_in_effect(
    arm: str, proof: Mapping[str, object] | None, *, reverted: bool = False, own: bool = False
) -> tuple[bool, str]:
    """Did the guest really run ``arm``? ``proof`` is the guest's ``arm`` info record.

    The proof holds what the guest read back: ``nbd.memalloc``
    (/sys/module/nbd/parameters/memalloc), ``pfmemalloc_throttle``
    (/sys/module/kernel/parameters/pfmemalloc_throttle, built kernels) and
    ``livepatch.swapnbd_nothrottle`` (/sys/kernel/livepatch/swapnbd_nothrottle/enabled,
    stock kernels), under ``switches``. Returns (ok, one line saying why).

    A project kernel (stock or built) that knows neither switch is the patched arm as
    shipped, so a patched run on it is fine and a vanilla run is not. A compile-time
    revert (``reverted``) has no switches either: its proof is the line its nbd prints.
    The user's own kernel (``own``: a bzImage path) that knows neither switch is "as
    built": nothing in the guest can say which arm it is, so the arm is the user's word,
    said so in the reason, and the verdict rests on the run's evidence.
    """
    if proof is None:
        return False, "the guest sent no arm proof (it failed before reading its switches)"
    if reverted:
        lines = proof.get("dmesg")
        said = isinstance(lines, list) and any("compile-time revert" in str(x) for x in lines)
        if arm != "vanilla":
            return False, f"{arm} asked of a kernel with the series reverted at compile time"
        if not said:
            return False, "vanilla by revert asked, but the kernel log has no revert line"
        return True, "vanilla in effect: the series is reverted at compile time"
    nested = proof.get("switches")
    switches: Mapping[str, object] = nested if isinstance(nested, Mapping) else proof
    memalloc = _flag(switches.get("nbd.memalloc"))
    param = _flag(switches.get("pfmemalloc_throttle"))
    live = _flag(switches.get("livepatch.swapnbd_nothrottle"))
    if own and memalloc is None and param is None and live is None:
        return True, (
            f"{arm} as built: this kernel has neither switch, so the arm is the user's "
            f"word (--arm {arm}), not read back"
        )
    throttle_off = param is False or live is True
    throttle_on = param is True or (param is None and live is not True)
    if arm == "vanilla":
        if memalloc is not False:
            shown = switches.get("nbd.memalloc")
            return False, f"vanilla asked, but nbd memalloc reads {shown!r}"
        if not throttle_off:
            return False, "vanilla asked, but the pfmemalloc throttle is still on"
        how = "livepatch" if live else "pfmemalloc_throttle=N"
        return True, f"vanilla in effect: nbd memalloc=N, throttle off ({how})"
    if memalloc is False:
        return False, "patched asked, but nbd memalloc reads N"
    if not throttle_on:
        return False, "patched asked, but the pfmemalloc throttle is off"
    return True, "patched in effect: nbd memalloc " + ("Y" if memalloc else "as shipped")
