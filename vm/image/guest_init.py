"""PID 1 of the swapnbd guest: set up swap over NBD, run swapstress, report, power off.

Theory of operation
-------------------
The project's initramfs switch_roots into the bookworm root file system and execs
``/usr/bin/python3 /opt/swapnbd/guest_init.py`` with the guest tools (``stress/``)
next to this file.  This program then:

1. mounts /proc, /sys, /dev (devtmpfs) and /run (tmpfs), and creates the
   ``/dev/virtio-ports/NAME`` links that udev would normally make (there is no udev);
2. reads its parameters from ``/proc/cmdline``: ``swapnbd.cfg=`` carries one
   base64url-encoded JSON object written by the host (vm/run/experiment.py);
3. brings up eth0 as 10.0.2.15/24 via 10.0.2.2 (QEMU user networking);
4. pins the sysctls (``vm.min_free_kbytes``) and records the values in effect;
5. connects /dev/nbd0 with nbd-client (``-N`` the run's random export name);
6. puts swap on /dev/nbd0 directly, or on a swapfile in ext4 on /dev/nbd0;
7. starts the vmstat collector on the ``swapnbd.samples`` port;
8. runs swapstress, whose heartbeats go straight to the ``swapnbd.events`` port;
9. sends the result over ``swapnbd.events``, stops the collector, powers off.

A virtio-serial port can be open by one process at a time (the driver answers
EBUSY to a second open), so this program closes the events port while swapstress
owns it and reopens it afterwards.

Every event is one JSON line: ``{"type": "phase" | "info" | "result" | "error", ...}``.
Any failure sends an ``error`` event with the message and powers off, so the host never
waits for a guest that has given up.  The kernel runs with ``panic=-1`` and QEMU with
``-no-reboot``: power-off, a panic and PID 1 exiting all end QEMU.

This file runs on the guest's python3 (3.11) and uses the standard library only.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stress import nbdclient

PAYLOAD_DIR = Path(__file__).resolve().parent
EVENTS_PORT = "swapnbd.events"
SAMPLES_PORT = "swapnbd.samples"
PORTS_DIR = Path("/dev/virtio-ports")
RUN_DIR = Path("/run/swapnbd")
NBD_DEVICE = "/dev/nbd0"
SWAPFILE_MOUNT = Path("/mnt/swapnbd")

#: Values read back and reported, so run.json shows what the kernel really used.
RECORDED_SETTINGS = {
    "vm.min_free_kbytes": "/proc/sys/vm/min_free_kbytes",
    "vm.swappiness": "/proc/sys/vm/swappiness",
    "vm.overcommit_memory": "/proc/sys/vm/overcommit_memory",
    "vm.watermark_scale_factor": "/proc/sys/vm/watermark_scale_factor",
    "vm.page-cluster": "/proc/sys/vm/page-cluster",
    "kernel.hung_task_timeout_secs": "/proc/sys/kernel/hung_task_timeout_secs",
    "transparent_hugepage.enabled": "/sys/kernel/mm/transparent_hugepage/enabled",
    "zswap.enabled": "/sys/module/zswap/parameters/enabled",
    "lru_gen.enabled": "/sys/kernel/mm/lru_gen/enabled",
}


class GuestError(Exception):
    """A setup step failed; the message says which and why."""


class Events:
    """Writer for the swapnbd.events virtio-serial port (or a file when testing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def send(self, kind: str, **fields: Any) -> None:
        record = {"type": kind, "t_mono": time.monotonic(), "t_wall": time.time(), **fields}
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        print(f"swapnbd-guest: {kind} {json.dumps(fields)[:300]}", flush=True)
        if self._fd is None:
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except InterruptedError:
                continue
            except BlockingIOError:
                time.sleep(0.01)
                continue
            view = view[n:]


def log(msg: str) -> None:
    print(f"swapnbd-guest: {msg}", flush=True)


def run(argv: list[str], what: str, timeout: float = 120.0) -> str:
    """Run a setup command; raise GuestError naming ``what`` when it fails."""
    log("$ " + " ".join(argv))
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise GuestError(f"{what}: {argv[0]} is not installed in the guest root fs") from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestError(f"{what}: {' '.join(argv)} did not finish in {timeout:.0f}s") from exc
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().replace("\n", " | ")
        raise GuestError(f"{what}: {' '.join(argv)} exited {proc.returncode}: {err}")
    return proc.stdout


# --- step 1: the minimal userland a PID 1 needs ------------------------------------


MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8


def mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
    """mount(2) through libc: /proc is not there yet for mount(8) to read its tables."""
    os.makedirs(target, exist_ok=True)
    if os.path.ismount(target):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode(),
        ctypes.c_ulong(flags),
        data.encode() or None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise GuestError(f"mount -t {fstype} {source} {target}: {os.strerror(err)}")


def mount_basics() -> None:
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC)
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")
    RUN_DIR.mkdir(parents=True, exist_ok=True)


def link_virtio_ports() -> dict[str, str]:
    """Create /dev/virtio-ports/NAME -> /dev/vportXpY from sysfs, as udev would."""
    PORTS_DIR.mkdir(parents=True, exist_ok=True)
    found: dict[str, str] = {}
    base = Path("/sys/class/virtio-ports")
    for _ in range(50):  # the driver may still be probing
        if base.is_dir():
            for port in sorted(base.iterdir()):
                name_file = port / "name"
                name = name_file.read_text().strip() if name_file.exists() else ""
                if name:
                    found[name] = f"/dev/{port.name}"
        if EVENTS_PORT in found and SAMPLES_PORT in found:
            break
        time.sleep(0.1)
    for name, dev in found.items():
        link = PORTS_DIR / name
        if not link.exists():
            link.symlink_to(dev)
    return found


# --- step 2: configuration -------------------------------------------------------


def read_config(cmdline: str) -> dict[str, Any]:
    """Decode ``swapnbd.cfg=<base64url JSON>`` from the kernel command line."""
    blob = None
    for word in cmdline.split():
        if word.startswith("swapnbd.cfg="):
            blob = word.split("=", 1)[1]
    if blob is None:
        raise GuestError("no swapnbd.cfg= parameter on the kernel command line")
    try:
        raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
        cfg = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GuestError(f"swapnbd.cfg is not base64url JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise GuestError("swapnbd.cfg must decode to a JSON object")
    for key in ("server", "nbd", "swap", "stress"):
        if key not in cfg:
            raise GuestError(f"swapnbd.cfg lacks the {key!r} section")
    return cfg


# --- steps 3-6: network, sysctls, NBD, swap -------------------------------------------


def bring_up_network(net: dict[str, Any]) -> str:
    ifaces = sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name != "lo")
    if not ifaces:
        raise GuestError("no network interface: is virtio_net loaded by the initramfs?")
    dev = "eth0" if "eth0" in ifaces else ifaces[0]
    run(["ip", "link", "set", "lo", "up"], "network")
    run(["ip", "link", "set", dev, "up"], "network")
    run(["ip", "addr", "add", net.get("address", "10.0.2.15/24"), "dev", dev], "network")
    run(["ip", "route", "add", "default", "via", net.get("gateway", "10.0.2.2")], "network")
    return dev


def read_setting(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def apply_sysctls(sysctls: dict[str, Any]) -> dict[str, str | None]:
    for key, value in sysctls.items():
        if value is None:
            continue
        path = Path("/proc/sys") / key.replace(".", "/")
        try:
            path.write_text(f"{value}\n")
        except OSError as exc:
            raise GuestError(f"cannot set {key}={value}: {exc}") from exc
    return {key: read_setting(path) for key, path in RECORDED_SETTINGS.items()}


def nbd_client_argv(server: dict[str, Any], nbd: dict[str, Any]) -> list[str]:
    """The guest config's server and nbd sections as nbd-client's command line."""
    return nbdclient.nbd_client_argv(
        str(server.get("host", "10.0.2.2")),
        server["port"],
        NBD_DEVICE,
        str(server["name"]),
        block_size=int(nbd.get("block_size", 4096)),
        timeout=int(nbd.get("timeout", 0)),
        connections=int(nbd.get("connections", 1)),
        resident=bool(nbd.get("resident", False)),
    )


def connect_nbd(server: dict[str, Any], nbd: dict[str, Any]) -> int:
    if not Path(NBD_DEVICE).exists():
        raise GuestError(f"{NBD_DEVICE} does not exist: the nbd module is not loaded")
    run(nbd_client_argv(server, nbd), "nbd-client", timeout=60)
    size_file = Path("/sys/block/nbd0/size")
    for _ in range(100):
        sectors = int(size_file.read_text().strip() or 0)
        if sectors > 0:
            return sectors * 512
        time.sleep(0.1)
    raise GuestError("nbd-client returned but /dev/nbd0 still has size 0")


def setup_swap(swap: dict[str, Any], device_bytes: int) -> str:
    mode = swap.get("mode", "device")
    limit = swap.get("size_bytes")
    if mode == "device":
        size_kib = [str(int(limit) // 1024)] if limit else []  # mkswap's size is in KiB
        run(["mkswap", NBD_DEVICE, *size_kib], "mkswap")
        run(["swapon", NBD_DEVICE], "swapon")
        return NBD_DEVICE
    if mode != "file":
        raise GuestError(f"swap mode must be 'device' or 'file', not {mode!r}")
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            NBD_DEVICE,
        ],
        "mkfs.ext4 on /dev/nbd0",
        timeout=600,
    )
    SWAPFILE_MOUNT.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "ext4", NBD_DEVICE, str(SWAPFILE_MOUNT)], "mount ext4 on /dev/nbd0")
    swapfile = SWAPFILE_MOUNT / "swapfile"
    size = int(limit or swap.get("file_bytes") or device_bytes * 9 // 10)
    size -= size % 4096
    run(["fallocate", "-l", str(size), str(swapfile)], "fallocate swapfile")
    os.chmod(swapfile, 0o600)
    run(["mkswap", str(swapfile)], "mkswap swapfile")
    run(["swapon", str(swapfile)], "swapon swapfile")
    return str(swapfile)


def read_swaps() -> list[str]:
    return Path("/proc/swaps").read_text().splitlines()[1:]


def vmstat_counter(name: str) -> int | None:
    for line in Path("/proc/vmstat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return None


# --- steps 7-8: collector and workload -------------------------------------------------


def check_tools() -> None:
    for mod in ("stress/__init__.py", "stress/vmstat.py", "stress/swapstress.py"):
        if not (PAYLOAD_DIR / mod).is_file():
            raise GuestError(
                f"guest tools missing: {PAYLOAD_DIR / mod} is not in the payload "
                "(the image's initramfs copies stress/*.py next to guest_init.py)"
            )


def tool_env() -> dict[str, str]:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": str(PAYLOAD_DIR),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/root",
    }
    return env


def protect_from_oom(pid: int) -> None:
    # Children inherit oom_score_adj, so only the collector is protected, not the workers.
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/oom_score_adj").write_text("-1000\n")


def start_collector(interval: float) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "stress.vmstat",
        "--out",
        str(PORTS_DIR / SAMPLES_PORT),
        "--interval",
        str(interval),
        "--mlock",  # keep sampling while everything else thrashes
    ]
    log("$ " + " ".join(argv))
    proc = subprocess.Popen(argv, env=tool_env(), cwd=str(PAYLOAD_DIR), stdin=subprocess.DEVNULL)
    protect_from_oom(proc.pid)
    return proc


def stop_collector(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def run_swapstress(args: list[str], result_path: Path) -> int:
    argv = [
        sys.executable,
        "-m",
        "stress.swapstress",
        *args,
        "--heartbeat",
        str(PORTS_DIR / EVENTS_PORT),
        "--json",
        str(result_path),
    ]
    log("$ " + " ".join(argv))
    proc = subprocess.Popen(argv, env=tool_env(), cwd=str(PAYLOAD_DIR), stdin=subprocess.DEVNULL)
    return proc.wait()


# --- the kernel arm's proof, and the test-only crash ----------------------------------

#: The switches of the vanilla arm, read back so run.json shows what the kernel used.
ARM_SWITCHES = {
    "nbd.memalloc": "/sys/module/nbd/parameters/memalloc",
    "pfmemalloc_throttle": "/sys/module/kernel/parameters/pfmemalloc_throttle",
    "livepatch.swapnbd_nothrottle": "/sys/kernel/livepatch/swapnbd_nothrottle/enabled",
}
ARM_CMDLINE_PREFIXES = ("nbd.memalloc=", "pfmemalloc_throttle=")


def kernel_log_lines(needle: str) -> list[str]:
    """Lines of the kernel log containing ``needle`` (dmesg from util-linux)."""
    try:
        proc = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"(dmesg failed: {exc})"]
    return [line.strip() for line in proc.stdout.splitlines() if needle in line]


def read_arm_proof(cmdline: str) -> dict[str, Any]:
    """Which arm this kernel really runs, read inside the guest (None: switch absent)."""
    return {
        "switches": {name: read_setting(path) for name, path in ARM_SWITCHES.items()},
        "cmdline": [w for w in cmdline.split() if w.startswith(ARM_CMDLINE_PREFIXES)],
        "dmesg": kernel_log_lines("swapnbd"),
        # SLUB publishes /sys/kernel/slab; SLAB (6.1 and older) has no such directory.
        "allocator": "slub" if Path("/sys/kernel/slab").is_dir() else "slab",
    }


def arm_test_panic(after_s: float | None) -> None:
    """TEST ONLY: crash the kernel (sysrq ``c``) ``after_s`` seconds from now."""
    if after_s is None:
        return

    def crash() -> None:
        log(f"test fault: crashing the kernel after {after_s}s of stress (sysrq c)")
        Path("/proc/sysrq-trigger").write_text("c\n")

    timer = threading.Timer(float(after_s), crash)
    timer.daemon = True
    timer.start()


# --- the end ---------------------------------------------------------------------------


def power_off() -> None:
    """Power the guest off now; with -no-reboot QEMU exits."""
    os.sync()
    time.sleep(0.5)  # let the last virtio-serial writes drain to the host
    libc = ctypes.CDLL(None, use_errno=True)
    linux_reboot_cmd_power_off = 0x4321FEDC
    libc.reboot(ctypes.c_int(linux_reboot_cmd_power_off))
    # Only reached when reboot(2) failed (not PID 1, no CAP_SYS_BOOT).
    with contextlib.suppress(OSError):
        Path("/proc/sysrq-trigger").write_text("o\n")
    time.sleep(5)
    os._exit(1)  # PID 1 exiting panics the kernel; panic=-1 then reboots, QEMU exits.


@dataclass
class Boot:
    """What the steps of :func:`main` share: the events port, the current phase (named in
    an ``error`` event if a step fails), the run's parameters and the collector."""

    events: Events
    phase: str = "mount"
    cmdline: str = ""
    cfg: dict[str, Any] = field(default_factory=dict)
    collector: subprocess.Popen[bytes] | None = None

    def step(self, phase: str) -> None:
        self.phase = phase


def boot_basics(b: Boot) -> None:
    """Steps 1-2: mounts, virtio-serial ports, parameters."""
    mount_basics()
    b.step("virtio-ports")
    ports = link_virtio_ports()
    if EVENTS_PORT not in ports:
        raise GuestError(f"virtio-serial port {EVENTS_PORT} not found (virtio_console loaded?)")
    b.events.open()
    b.events.send("phase", phase="boot", kernel_release=os.uname().release, ports=ports)
    b.step("config")
    b.cmdline = Path("/proc/cmdline").read_text().strip()
    b.cfg = read_config(b.cmdline)
    check_tools()


def setup_system(b: Boot) -> None:
    """Steps 3-4: network, sysctls, and the info event (with the arm's proof)."""
    b.step("network")
    dev = bring_up_network(b.cfg.get("net", {}))
    b.events.send("phase", phase="network", interface=dev)
    b.step("sysctl")
    settings = apply_sysctls(b.cfg.get("sysctl", {}))
    mem_total = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    b.events.send(
        "info",
        kernel_release=os.uname().release,
        kernel_version=os.uname().version,
        cmdline=b.cmdline,
        settings=settings,
        mem_total_bytes=mem_total,
        cpus=os.cpu_count(),
        python=sys.version.split()[0],
        arm=read_arm_proof(b.cmdline),
    )


def setup_nbd_swap(b: Boot) -> None:
    """Steps 5-6: /dev/nbd0 and swap on it."""
    b.step("nbd-connect")
    t0 = time.monotonic()
    device_bytes = connect_nbd(b.cfg["server"], b.cfg["nbd"])
    b.events.send(
        "phase", phase="nbd-connect", device_bytes=device_bytes, seconds=time.monotonic() - t0
    )
    b.step("swapon")
    t0 = time.monotonic()
    target = setup_swap(b.cfg["swap"], device_bytes)
    b.events.send(
        "phase", phase="swapon", target=target, swaps=read_swaps(), seconds=time.monotonic() - t0
    )


def start_sampling(b: Boot) -> None:
    """Step 7: the collector, and a first sample before the pressure starts."""
    b.step("collector")
    vmstat_cfg = b.cfg.get("vmstat", {})
    b.collector = start_collector(float(vmstat_cfg.get("interval", 1.0)))
    # A first sample before the pressure starts gives the delta a clean baseline.
    time.sleep(float(vmstat_cfg.get("settle_s", 2.0)))
    if b.collector.poll() is not None:
        raise GuestError(f"the vmstat collector exited early with status {b.collector.returncode}")
    b.events.send("phase", phase="collector", pid=b.collector.pid)


def stress(b: Boot) -> None:
    """Steps 8-9: swapstress (which owns the events port meanwhile), then its result."""
    b.step("stress")
    args = [str(a) for a in b.cfg["stress"].get("args", [])]
    result_path = RUN_DIR / "swapstress.json"
    oom_before = vmstat_counter("oom_kill")
    b.events.send("phase", phase="stress", args=args)
    b.events.close()  # swapstress owns the port now (one opener at a time)
    arm_test_panic((b.cfg.get("fault") or {}).get("panic_after_s"))
    t0 = time.monotonic()
    rc = run_swapstress(args, result_path)
    stress_s = time.monotonic() - t0
    b.events.open()
    oom_after = vmstat_counter("oom_kill")
    result: Any = None
    if result_path.exists():
        try:
            result = json.loads(result_path.read_text())
        except ValueError as exc:
            raise GuestError(f"swapstress wrote invalid JSON: {exc}") from exc
    oom_delta = None
    if oom_after is not None and oom_before is not None:
        oom_delta = oom_after - oom_before
    b.events.send(
        "result", exit_code=rc, seconds=stress_s, swapstress=result, oom_kill_delta=oom_delta
    )
    if result is None:
        how = f"killed by signal {-rc}" if rc < 0 else f"exited {rc}"
        raise GuestError(f"swapstress {how} without writing its result")


def finish(b: Boot) -> None:
    """Stop the collector and report the final state."""
    b.step("stop")
    collector_rc = stop_collector(b.collector) if b.collector is not None else None
    b.collector = None
    b.events.send(
        "phase",
        phase="done",
        collector_exit=collector_rc,
        swaps=read_swaps(),
        settings={k: read_setting(p) for k, p in RECORDED_SETTINGS.items()},
    )


def main() -> int:
    """Run the steps of the module docstring; any failure becomes an ``error`` event."""
    b = Boot(Events(PORTS_DIR / EVENTS_PORT))
    try:
        for step in (boot_basics, setup_system, setup_nbd_swap, start_sampling, stress, finish):
            step(b)
    except Exception as exc:
        log(traceback.format_exc(limit=3))
        with contextlib.suppress(Exception):
            if b.collector is not None:
                stop_collector(b.collector)
        with contextlib.suppress(Exception):
            b.events.open()
            b.events.send("error", phase=b.phase, message=str(exc) or type(exc).__name__)
    finally:
        with contextlib.suppress(Exception):
            b.events.close()
    return 0


if __name__ == "__main__":
    main()
    if os.getpid() == 1:
        power_off()
