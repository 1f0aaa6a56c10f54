"""How one run is configured: :class:`RunConfig`, its checks, and what the guest is told.

:class:`RunConfig` is recorded verbatim as ``config`` in run.json; the CLI and the matrix
build it, :meth:`RunConfig.validate` refuses settings that cannot work before anything
starts, and its properties derive what the run needs from it (the export size, the
timeouts, the pinned ``vm.min_free_kbytes``). :func:`guest_config` is the part the guest
sees: one JSON object that :func:`encode_guest_config` puts on the kernel command line as
``swapnbd.cfg=`` for :mod:`vm.image.guest_init`.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from peers import servers
from vm.image import arms
from vm.run import qemu

SwapMode = Literal["device", "file"]
MIB = 1024 * 1024

ARMS = arms.ARMS
ALLOCATORS = ("slub", "slab")
SCHED_POLICIES = ("normal", "batch", "idle")


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything one run is configured with (recorded verbatim as ``config`` in run.json)."""

    out: Path
    """Results directory."""
    memory_mib: int = 128
    """Guest RAM in MiB."""
    cpus: int = 2
    """Guest vCPUs."""
    workers: int = 8
    """swapstress worker processes."""
    total_bytes: int | None = 256 * MIB
    """Total anonymous memory the workers touch (exclusive with ``ratio``)."""
    ratio: float | None = None
    """Total as a multiple of the guest's MemTotal (exclusive with ``total_bytes``)."""
    loops: int = 1
    """Verification passes over the whole mapping."""
    kernel: str = "6.1"
    """Kernel understood by vm.image.image: a stock package (``6.1``, ``6.12``, ``7.2``), a
    built variant (``6.1-build``) or a bzImage path; vm.image.image validates it."""
    arm: str = "patched"
    """``patched`` (nbd memalloc + pfmemalloc throttle, as shipped) or ``vanilla``."""
    allocator: str | None = None
    """None (the kernel's own), ``slub`` or ``slab`` (a built 6.1 kernel)."""
    kernel_tree: Path | None = None
    """A kernel source tree to build and boot instead of ``kernel`` (``--kernel-tree``)."""
    kernel_patch: Path | None = None
    """A patch applied to a linked copy of ``kernel_tree`` before the build (``--patch``)."""
    kernel_config: str = "full"
    """The configuration ``kernel_tree`` is built with: ``full`` (defconfig-based, as the
    project's built variants) or ``minimal`` (allnoconfig-based, builds in minutes)."""
    flavour: str = "cloud"
    """Debian kernel flavour."""
    swap: SwapMode = "device"
    """Swap on /dev/nbd0 directly, or on a swapfile in ext4 on /dev/nbd0."""
    swap_bytes: int | None = None
    """Size of the swap area (mkswap SIZE or the swapfile); None: the whole device (or 90%
    of it for a swapfile).  Smaller than the plan minus RAM makes the guest OOM."""
    server: servers.ServerKind = "nbd-serve"
    """NBD server that backs the swap."""
    backing: servers.Backing | None = None
    """Server storage: memory or a sparse file (None: the server's default)."""
    accel: qemu.AccelRequest = "auto"
    """auto (boot-probe KVM, else TCG), tcg or kvm."""
    lockup_after_s: float = 180.0
    """No heartbeat and no sample (or, in the stress phase, no page progress) for this long
    => lockup, unless the kernel's evidence confirmed it earlier (see ``stall_after_s``)."""
    stall_after_s: float | None = None
    """No page progress for this long in the stress phase is a *stall*: the host presses
    SysRq w/m, then w/l/t, and keeps watching; progress resuming makes it a recorded stall,
    the same deadlock signature in both looks confirms the lockup at once. None: a third
    of ``lockup_after_s``, at most 30 s."""
    early_confirm: bool = True
    """Confirm a lockup as soon as both looks give the same deadlock signature; False holds
    every stall for the whole ``lockup_after_s`` (a held run: does it ever recover?)."""
    server_sched_policy: str = "idle"
    """nbd-serve's ``--sched-policy`` in the experiment (docs/performance.md, "Scheduling
    policy"); ``normal`` shows that a verdict does not depend on it."""
    timeout_s: float | None = None
    """Overall limit for the guest, QEMU is killed after it; None: sized from the workload
    (a safety net only: hangs are caught by ``lockup_after_s``)."""
    nbd_timeout: int = 0
    """nbd-client -t; 0 (requests never fail) keeps the deadlock observable."""
    nbd_connections: int = 1
    """nbd-client -C."""
    resident_client: bool = False
    """Use the 2012-style resident client (nbd-client -L -swap, ioctl mode, mlockall)."""
    min_free_kbytes: int | None = None
    """vm.min_free_kbytes to pin; None = the kernel's formula for this RAM size, pinned."""
    vmstat_interval_s: float = 1.0
    """Collector sampling interval."""
    cache_dir: Path | None = None
    """Image and probe cache (None: vm.image.image.default_cache_dir())."""
    export_factor: int = 5
    """Export size as a multiple of guest RAM (issue 5: at least 5x)."""
    payload_dir: Path | None = None
    """Source tree of the guest payload (stress/, vm/image/guest_init.py); None = this checkout."""
    server_fault: str | None = None
    """TEST ONLY: nbd-serve ``--fault`` spec (corrupts one READ; see
    nbdserver/backends/fault.py)."""
    guest_panic_after_s: float | None = None
    """TEST ONLY: the guest crashes its kernel (sysrq ``c``) this long after the stress
    phase starts."""

    def validate(self) -> None:
        """Raise ValueError with a clear message for settings that cannot work."""
        if self.memory_mib < 64:
            raise ValueError(f"--memory must be at least 64M, got {self.memory_mib}M")
        if self.cpus < 1:
            raise ValueError(f"--cpus must be >= 1, got {self.cpus}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if (self.total_bytes is None) == (self.ratio is None):
            raise ValueError("give exactly one of --total and --ratio")
        if self.total_bytes is not None and self.total_bytes < self.workers * 4096:
            raise ValueError(f"--total {self.total_bytes} is less than one page per worker")
        if self.ratio is not None and not 0 < self.ratio <= 64:
            raise ValueError(f"--ratio must be in (0, 64], got {self.ratio}")
        if self.loops < 1:
            raise ValueError(f"--loops must be >= 1, got {self.loops}")
        if self.swap not in ("device", "file"):
            raise ValueError(f"--swap must be device or file, not {self.swap!r}")
        if self.server not in servers.SERVER_KINDS:
            raise ValueError(f"--server must be one of {', '.join(servers.SERVER_KINDS)}")
        if self.lockup_after_s <= 0 or (self.timeout_s is not None and self.timeout_s <= 0):
            raise ValueError("--lockup-after and --timeout must be positive")
        if self.stall_after_s is not None and not 0 < self.stall_after_s < self.lockup_after_s:
            raise ValueError(
                f"--stall-after must be positive and below --lockup-after "
                f"({self.lockup_after_s:g}s), got {self.stall_after_s:g}s"
            )
        if self.server_sched_policy not in SCHED_POLICIES:
            raise ValueError(
                f"--server-sched-policy must be one of {', '.join(SCHED_POLICIES)}, "
                f"not {self.server_sched_policy!r}"
            )
        if self.nbd_timeout < 0 or self.nbd_connections < 1:
            raise ValueError("--nbd-timeout must be >= 0 and --nbd-connections >= 1")
        if self.min_free_kbytes is not None and self.min_free_kbytes < 128:
            raise ValueError(f"--min-free-kbytes must be >= 128, got {self.min_free_kbytes}")
        if self.export_factor < 5:
            raise ValueError("the export must be at least 5x guest RAM")
        if self.arm not in ARMS:
            raise ValueError(f"--arm must be one of {', '.join(ARMS)}, not {self.arm!r}")
        if self.allocator is not None and self.allocator not in ALLOCATORS:
            raise ValueError(
                f"--allocator must be one of {', '.join(ALLOCATORS)}, not {self.allocator!r}"
            )
        if self.kernel_patch is not None and self.kernel_tree is None:
            raise ValueError("--patch needs --kernel-tree (a tree to apply it to)")
        if self.kernel_tree is not None and not self.kernel_tree.is_dir():
            raise ValueError(f"--kernel-tree {self.kernel_tree}: no such directory")
        if self.kernel_patch is not None and not self.kernel_patch.is_file():
            raise ValueError(f"--patch {self.kernel_patch}: no such file")
        if self.kernel_config not in arms.CONFIG_BASES:
            raise ValueError(
                f"--kernel-config must be one of {', '.join(arms.CONFIG_BASES)}, "
                f"not {self.kernel_config!r}"
            )
        if self.swap_bytes is not None and self.swap_bytes < 40 * 4096:
            raise ValueError(f"--swap-size must be at least 160K, got {self.swap_bytes} bytes")
        if self.server_fault is not None and self.server != "nbd-serve":
            raise ValueError(f"a server fault needs nbd-serve, not {self.server}")

    @property
    def effective_stall_after_s(self) -> float:
        """``stall_after_s``, or a third of the lockup window, at most 30 s."""
        if self.stall_after_s is not None:
            return self.stall_after_s
        return min(30.0, self.lockup_after_s / 3)

    @property
    def hung_task_timeout_s(self) -> int:
        """The guest's hung-task timeout: it reports D-state tasks well before the cutoff."""
        return max(5, int(self.effective_stall_after_s))

    @property
    def pinned_min_free_kbytes(self) -> int:
        """The value pinned in the guest: given, or the kernel's sqrt(lowmem_kB * 16) formula."""
        if self.min_free_kbytes is not None:
            return self.min_free_kbytes
        return max(128, min(262144, math.isqrt(self.memory_mib * 1024 * 16)))

    @property
    def passes(self) -> int:
        """Page operations per page: the initial write, then per loop a verify and a rewrite
        (swapstress's default ``rewrite`` mode counts both in ``pages_done``)."""
        return 1 + 2 * self.loops

    @property
    def workload_bytes(self) -> int:
        """The memory the workers touch (the ratio is taken of the configured RAM)."""
        if self.total_bytes is not None:
            return self.total_bytes
        return int((self.ratio or 0) * self.memory_mib * MIB)

    @property
    def effective_timeout_s(self) -> float:
        """``timeout_s``, or 15 min plus 2 s per MiB per pass (TCG moves >= 1 MiB/s here)."""
        if self.timeout_s is not None:
            return self.timeout_s
        return 900.0 + 2.0 * self.passes * self.workload_bytes / MIB

    @property
    def export_bytes(self) -> int:
        """Export size: >= 5x RAM, and room for the whole workload plus RAM."""
        memory = self.memory_mib * MIB
        need = max(self.export_factor * memory, (self.total_bytes or 0) + memory)
        if self.ratio is not None:
            need = max(need, int((self.ratio + 1) * memory))
        return -(-need // MIB) * MIB

    def swapstress_args(self) -> list[str]:
        args = ["--workers", str(self.workers)]
        if self.total_bytes is not None:
            args += ["--total", str(self.total_bytes)]
        else:
            args += ["--ratio", repr(self.ratio)]
        # The export is sized for the plan; the safety check is for hosts, not this guest.
        # --mlock: the parent (heartbeats) stays resident; the workers stay swappable.
        args += ["--loops", str(self.loops), "--mlock", "--force"]
        return args

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        d["payload_dir"] = str(self.payload_dir) if self.payload_dir else None
        d["kernel_tree"] = str(self.kernel_tree) if self.kernel_tree else None
        d["kernel_patch"] = str(self.kernel_patch) if self.kernel_patch else None
        d["pinned_min_free_kbytes"] = self.pinned_min_free_kbytes
        d["export_bytes"] = self.export_bytes
        d["effective_timeout_s"] = self.effective_timeout_s
        d["effective_stall_after_s"] = self.effective_stall_after_s
        d["hung_task_timeout_s"] = self.hung_task_timeout_s
        if self.server != "nbd-serve":
            d["server_sched_policy"] = None  # only nbd-serve takes the flag
        return d


def guest_config(cfg: RunConfig, server: servers.RunningServer) -> dict[str, Any]:
    """The object vm.image.guest_init reads from ``swapnbd.cfg=``."""
    return {
        "v": 1,
        "server": {"host": "10.0.2.2", "port": server.port, "name": server.export_name},
        "net": {"address": "10.0.2.15/24", "gateway": "10.0.2.2"},
        "nbd": {
            "block_size": 4096,
            "timeout": cfg.nbd_timeout,
            "connections": cfg.nbd_connections,
            "resident": cfg.resident_client,
        },
        "swap": {"mode": cfg.swap, "size_bytes": cfg.swap_bytes},
        "sysctl": {"vm.min_free_kbytes": cfg.pinned_min_free_kbytes},
        "stress": {"args": cfg.swapstress_args()},
        "vmstat": {"interval": cfg.vmstat_interval_s},
        "fault": {"panic_after_s": cfg.guest_panic_after_s},
    }


def encode_guest_config(obj: dict[str, Any]) -> str:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
