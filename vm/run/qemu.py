"""QEMU command lines for the swap experiment, and the choice of accelerator.

Theory of operation
-------------------
A run boots the guest kernel directly (`-kernel/-initrd/-append`), with the root file
system attached read-write but ``snapshot=on`` so the image never changes.  Everything
the host needs to observe goes to files that QEMU itself writes, so nothing on the
host has to keep up with the guest in real time:

* the console (ttyS0)                      -> ``OUT/console.log``
* virtio-serial port ``swapnbd.events``    -> ``OUT/events.jsonl``  (phases, heartbeats, result)
* virtio-serial port ``swapnbd.samples``   -> ``OUT/vmstat.jsonl``  (the collector's samples)

Networking is QEMU user networking only (slirp): the guest reaches the host's loopback
NBD server at 10.0.2.2, and nothing is forwarded into the guest.

``-no-reboot`` together with ``panic=-1`` on the kernel command line makes QEMU exit
when the guest panics or powers off, so "QEMU exited" is a reliable end signal.

Accelerator choice: ``--accel auto`` must not trust the mere presence of /dev/kvm.
On nested hosts KVM can open fine and then hang in SeaBIOS, so ``auto`` boots the
guest kernel once under KVM with a short timeout (no initrd, no root: the kernel
panics at once and QEMU exits) and falls back to TCG when that does not happen.
The verdict is cached per (QEMU version, host kernel, guest kernel).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Accel = Literal["tcg", "kvm"]
AccelRequest = Literal["auto", "tcg", "kvm"]

QEMU_BINARY = "qemu-system-x86_64"
EVENTS_PORT = "swapnbd.events"
SAMPLES_PORT = "swapnbd.samples"

#: The part of the kernel command line every run includes (see docs/architecture.md and
#: kernel-notes.md §3: THP changes the pfmemalloc reserve eightfold; zswap would hide swap I/O).
BASE_CMDLINE = ("console=ttyS0", "panic=-1", "transparent_hugepage=never", "zswap.enabled=0")

#: How long a KVM boot probe may take before KVM is declared unusable.
KVM_PROBE_TIMEOUT_S = 20.0
#: CPU models tried in turn: ``host`` is fastest; QEMU's default model is the fallback
#: for nested hosts that refuse host MSRs.
KVM_PROBE_CPUS = ("host", "qemu64")


class QemuError(Exception):
    """QEMU is missing, or an accelerator that was asked for cannot be used."""


@dataclass(frozen=True, slots=True)
class QemuConfig:
    """Everything that goes on one QEMU command line."""

    kernel: Path
    """bzImage / vmlinuz of the guest."""
    initrd: Path
    """The project's initramfs."""
    rootfs: Path
    """Raw ext4 root image, attached with snapshot=on (appears as /dev/vda)."""
    memory_mib: int
    """Guest RAM in MiB."""
    cpus: int
    """Number of vCPUs."""
    accel: Accel
    """Resolved accelerator (never "auto" here)."""
    cmdline: str
    """Full kernel command line (see :func:`kernel_cmdline`)."""
    console_path: Path
    """File that receives ttyS0."""
    events_path: Path
    """File that receives the swapnbd.events virtio-serial port."""
    samples_path: Path
    """File that receives the swapnbd.samples virtio-serial port."""
    qemu_binary: str = QEMU_BINARY
    """QEMU system emulator to run."""
    extra_args: tuple[str, ...] = field(default=())
    """Appended verbatim (debugging only)."""
    cpu: str | None = None
    """-cpu model; None: ``host`` under KVM, QEMU's default under TCG."""
    qmp_path: Path | None = None
    """A QMP unix socket (vm/run/qmp.py sends SysRq keys to a stuck guest through it)."""


def kernel_cmdline(params: dict[str, str], extra: tuple[str, ...] = ()) -> str:
    """Build the guest kernel command line: the fixed base, then ``swapnbd.KEY=VALUE``.

    Raises:
        ValueError: a key or value contains whitespace (it would split the parameter).
    """
    parts = list(BASE_CMDLINE)
    for key, value in params.items():
        if any(c.isspace() for c in key + value) or not key:
            raise ValueError(f"kernel parameter swapnbd.{key}={value!r} must not contain spaces")
        parts.append(f"swapnbd.{key}={value}")
    parts.extend(extra)
    line = " ".join(parts)
    # x86 COMMAND_LINE_SIZE is 2048 bytes including the terminating NUL.
    if len(line) >= 2048:
        raise ValueError(f"kernel command line is {len(line)} bytes; x86 allows at most 2047")
    return line


def _chardev_path(path: Path) -> str:
    # QEMU's option parser splits on commas; a comma in a path is written twice.
    return str(path).replace(",", ",,")


def build_argv(cfg: QemuConfig) -> list[str]:
    """Return the QEMU argv for one experiment run."""
    if cfg.memory_mib < 64:
        raise ValueError(f"guest memory {cfg.memory_mib} MiB is too small; use at least 64M")
    if cfg.cpus < 1:
        raise ValueError(f"guest cpus must be >= 1, got {cfg.cpus}")
    accel_args = ["-accel", cfg.accel]
    cpu = cfg.cpu or ("host" if cfg.accel == "kvm" else None)
    if cpu is not None:
        accel_args += ["-cpu", cpu]
    qmp_args: list[str] = []
    if cfg.qmp_path is not None:
        qmp_args = ["-qmp", f"unix:{_chardev_path(cfg.qmp_path)},server=on,wait=off"]
    return [
        cfg.qemu_binary,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        *accel_args,
        "-m",
        f"{cfg.memory_mib}M",
        "-smp",
        str(cfg.cpus),
        "-kernel",
        str(cfg.kernel),
        "-initrd",
        str(cfg.initrd),
        "-append",
        cfg.cmdline,
        "-chardev",
        f"file,id=con,path={_chardev_path(cfg.console_path)}",
        "-serial",
        "chardev:con",
        "-drive",
        f"file={_chardev_path(cfg.rootfs)},if=virtio,format=raw,snapshot=on",
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0",
        "-device",
        "virtio-rng-pci",
        "-device",
        "virtio-serial-pci",
        "-chardev",
        f"file,id=ev,path={_chardev_path(cfg.events_path)}",
        "-device",
        f"virtserialport,chardev=ev,name={EVENTS_PORT}",
        "-chardev",
        f"file,id=vs,path={_chardev_path(cfg.samples_path)}",
        "-device",
        f"virtserialport,chardev=vs,name={SAMPLES_PORT}",
        *qmp_args,
        *cfg.extra_args,
    ]


def qemu_version(qemu_binary: str = QEMU_BINARY) -> str:
    """First line of ``qemu --version``.

    Raises:
        QemuError: QEMU is not installed.
    """
    exe = shutil.which(qemu_binary)
    if exe is None:
        raise QemuError(
            f"{qemu_binary} not found; install it with: apt-get install qemu-system-x86"
        )
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.splitlines()[0].strip() if out.stdout else "unknown"


def kvm_device_usable() -> bool:
    """/dev/kvm exists and this process may open it read-write."""
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def probe_kvm(
    kernel: Path,
    qemu_binary: str = QEMU_BINARY,
    timeout_s: float = KVM_PROBE_TIMEOUT_S,
    cpu: str = "host",
) -> tuple[bool, str]:
    """Boot ``kernel`` under KVM without an initrd and see whether it gets anywhere.

    The kernel has no root device, so it panics at once; with ``panic=-1`` and
    ``-no-reboot`` QEMU then exits.  KVM works when QEMU exits within ``timeout_s`` and the
    console shows the kernel's banner.

    Returns:
        (works, reason)
    """
    with tempfile.TemporaryDirectory(prefix="swapnbd-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            qemu_binary,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-accel",
            "kvm",
            "-cpu",
            cpu,
            "-m",
            "256M",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 panic=-1 root=/dev/nonexistent",
            "-chardev",
            f"file,id=con,path={_chardev_path(console)}",
            "-serial",
            "chardev:con",
        ]
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            text = console.read_text(errors="replace") if console.exists() else ""
            where = "in the kernel" if "Linux version" in text else "before the kernel started"
            return False, (
                f"KVM guest (-cpu {cpu}) did not finish booting within {timeout_s:.0f}s "
                f"(hung {where})"
            )
        elapsed = time.monotonic() - t0
        text = console.read_text(errors="replace") if console.exists() else ""
        if "Linux version" not in text:
            msg = out.decode(errors="replace").strip().splitlines()
            detail = msg[-1] if msg else f"exit status {proc.returncode}"
            return False, f"KVM boot probe (-cpu {cpu}) failed: {detail}"
        return True, f"KVM boot probe (-cpu {cpu}) reached the kernel and exited in {elapsed:.1f}s"


@dataclass(frozen=True, slots=True)
class AccelChoice:
    """The accelerator a run uses and why."""

    accel: Accel
    reason: str
    cached: bool = False
    cpu: str | None = None
    """-cpu model that worked under KVM (None under TCG)."""


def _probe_cache_key(qemu_binary: str, kernel: Path) -> str:
    h = hashlib.sha256()
    h.update(qemu_version(qemu_binary).encode())
    h.update(os.uname().release.encode())
    st = kernel.stat()
    h.update(f"{kernel.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def resolve_accel(
    request: AccelRequest,
    kernel: Path,
    cache_dir: Path | None,
    *,
    qemu_binary: str = QEMU_BINARY,
    progress: Callable[[str], None] | None = None,
    probe: Callable[[Path, str, str], tuple[bool, str]] | None = None,
) -> AccelChoice:
    """Turn ``auto|tcg|kvm`` into the accelerator this run uses.

    Raises:
        QemuError: ``kvm`` was requested but /dev/kvm cannot be opened, or the request is
            not one of auto/tcg/kvm.
    """
    say = progress or (lambda _msg: None)
    if request == "tcg":
        return AccelChoice("tcg", "TCG requested")
    if request == "kvm":
        if not kvm_device_usable():
            raise QemuError(
                "--accel kvm: /dev/kvm is missing or not read-write for this user; "
                "use --accel tcg or --accel auto"
            )
        return AccelChoice("kvm", "KVM requested", cpu="host")
    if request != "auto":
        raise QemuError(f"--accel must be auto, tcg or kvm, not {request!r}")
    if not kvm_device_usable():
        return AccelChoice("tcg", "no usable /dev/kvm")
    run_probe = probe or (lambda k, q, c: probe_kvm(k, q, cpu=c))
    cache_file = cache_dir / "accel-probe.json" if cache_dir is not None else None
    key = _probe_cache_key(qemu_binary, kernel)
    if cache_file is not None and cache_file.exists():
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
        entry = cached.get(key) if isinstance(cached, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("works"), bool):
            accel: Accel = "kvm" if entry["works"] else "tcg"
            cpu = entry.get("cpu") if entry["works"] else None
            return AccelChoice(
                accel, f"cached KVM probe: {entry.get('reason', '')}", cached=True, cpu=cpu
            )
    works, reasons, cpu = False, [], None
    for model in KVM_PROBE_CPUS:
        say(f"probing KVM with a short boot, -cpu {model} (up to {KVM_PROBE_TIMEOUT_S:.0f}s)")
        works, why = run_probe(kernel, qemu_binary, model)
        reasons.append(why)
        if works:
            cpu = model
            break
    reason = "; ".join(reasons)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(cache_file.read_text()) if cache_file.exists() else {}
        except (OSError, ValueError):
            table = {}
        if not isinstance(table, dict):
            table = {}
        table[key] = {"works": works, "cpu": cpu, "reason": reason, "t_wall": time.time()}
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(cache_file)
    return AccelChoice("kvm" if works else "tcg", reason, cpu=cpu)
