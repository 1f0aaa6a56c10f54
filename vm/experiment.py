"""One swap-over-NBD experiment: image, server, QEMU, watchdog, run.json.

Theory of operation
-------------------
:func:`run_experiment` does, in order:

1. builds (or finds in the cache) the guest image through :mod:`vm.image`;
2. resolves the accelerator (``auto`` boot-probes KVM, see :mod:`vm.qemu`);
3. starts the NBD server on 127.0.0.1 at a confirmed free port, exporting a fresh
   random name sized at least 5x guest RAM (:mod:`vm.servers`);
4. encodes the guest's parameters as one base64url JSON blob on the kernel command line
   (``swapnbd.cfg=``), read by :mod:`vm.guest_init` (PID 1 in the guest);
5. starts QEMU and polls the files it writes through a :class:`vm.watchdog.Watchdog`,
   printing progress; a silent guest becomes a ``lockup``, an overall timeout kills QEMU;
6. stops the server (its final stats line), summarizes the samples with
   ``stress.vmstat.summarize`` and writes ``OUT/run.json``.

Every path out of step 5 writes run.json: the harness records every outcome, not just
the happy one.  Any exception before QEMU starts is recorded as outcome ``error``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import platform
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from vm import qemu, servers, watchdog

log = logging.getLogger(__name__)

SwapMode = Literal["device", "file"]
Emit = Callable[[str], None]
MIB = 1024 * 1024

#: Seconds the guest gets to power off after it sent its result.
POWEROFF_GRACE_S = 60.0
POLL_INTERVAL_S = 0.5
STATUS_INTERVAL_S = 10.0


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
    """Kernel name understood by vm.image (``6.1`` or ``6.12``)."""
    flavour: str = "cloud"
    """Debian kernel flavour."""
    arm: str = "patched"
    """Kernel arm: patched (today's code) or vanilla (nbd memalloc and the pfmemalloc
    throttle switched off)."""
    allocator: str | None = None
    """Slab allocator of a built kernel (e.g. ``slab``); None: the kernel as packaged."""
    swap: SwapMode = "device"
    """Swap on /dev/nbd0 directly, or on a swapfile in ext4 on /dev/nbd0."""
    server: servers.ServerKind = "nbd-serve"
    """NBD server that backs the swap."""
    backing: servers.Backing | None = None
    """Server storage: memory or a sparse file (None: the server's default)."""
    accel: qemu.AccelRequest = "auto"
    """auto (boot-probe KVM, else TCG), tcg or kvm."""
    lockup_after_s: float = 180.0
    """No heartbeat and no sample (or, in the stress phase, no page progress) for this long
    => lockup."""
    timeout_s: float | None = None
    """Overall limit for the guest, QEMU is killed after it; None: sized from the workload
    (a safety net only: hangs are caught by ``lockup_after_s``)."""
    nbd_timeout: int = 0
    """nbd-client -t; 0 (requests never fail) keeps the deadlock observable."""
    nbd_connections: int = 1
    """nbd-client -C."""
    nbd_swap_flag: bool = True
    """nbd-client -swap."""
    resident_client: bool = False
    """Use the 2012-style resident client (nbd-client -L -swap, ioctl mode, mlockall)."""
    min_free_kbytes: int | None = None
    """vm.min_free_kbytes to pin; None = the kernel's formula for this RAM size, pinned."""
    vmstat_interval_s: float = 1.0
    """Collector sampling interval."""
    cache_dir: Path | None = None
    """Image and probe cache (None: vm.image.default_cache_dir())."""
    export_factor: int = 5
    """Export size as a multiple of guest RAM (issue 5: at least 5x)."""
    payload_dir: Path | None = None
    """Source tree of the guest payload (stress/, vm/guest_init.py); None = this checkout."""

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
        if self.nbd_timeout < 0 or self.nbd_connections < 1:
            raise ValueError("--nbd-timeout must be >= 0 and --nbd-connections >= 1")
        if self.min_free_kbytes is not None and self.min_free_kbytes < 128:
            raise ValueError(f"--min-free-kbytes must be >= 128, got {self.min_free_kbytes}")
        if self.export_factor < 5:
            raise ValueError("the export must be at least 5x guest RAM")

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
        d["pinned_min_free_kbytes"] = self.pinned_min_free_kbytes
        d["export_bytes"] = self.export_bytes
        d["effective_timeout_s"] = self.effective_timeout_s
        return d


def guest_config(cfg: RunConfig, server: servers.RunningServer) -> dict[str, Any]:
    """The object vm.guest_init reads from ``swapnbd.cfg=``."""
    return {
        "v": 1,
        "server": {"host": "10.0.2.2", "port": server.port, "name": server.export_name},
        "net": {"address": "10.0.2.15/24", "gateway": "10.0.2.2"},
        "nbd": {
            "block_size": 4096,
            "timeout": cfg.nbd_timeout,
            "connections": cfg.nbd_connections,
            "swap_flag": cfg.nbd_swap_flag or cfg.resident_client,
            "resident": cfg.resident_client,
        },
        "swap": {"mode": cfg.swap},
        "sysctl": {"vm.min_free_kbytes": cfg.pinned_min_free_kbytes},
        "stress": {"args": cfg.swapstress_args()},
        "vmstat": {"interval": cfg.vmstat_interval_s},
    }


def encode_guest_config(obj: dict[str, Any]) -> str:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    tail = watchdog.JsonlTail(path)
    return tail.read_new()


def vmstat_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``stress.vmstat.summarize`` plus the guarantee that pgscan_direct_throttle is there."""
    samples = [s for s in samples if s.get("type", "sample") == "sample"]
    summary: dict[str, Any]
    try:
        from stress.vmstat import (  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
            summarize,
        )
    except ImportError:
        summary = _fallback_summary(samples)
    else:
        summary = dict(summarize(samples)) if samples else _fallback_summary(samples)
    delta = summary.setdefault("vmstat_delta", {})
    if samples and "pgscan_direct_throttle" not in delta:
        first = samples[0].get("vmstat", {})
        last = samples[-1].get("vmstat", {})
        if "pgscan_direct_throttle" in first and "pgscan_direct_throttle" in last:
            delta["pgscan_direct_throttle"] = (
                last["pgscan_direct_throttle"] - first["pgscan_direct_throttle"]
            )
    return summary


def _fallback_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    if not samples:
        return {"vmstat_delta": {}, "rates": {}, "absent": []}
    first = samples[0].get("vmstat", {})
    last = samples[-1].get("vmstat", {})
    delta = {k: last[k] - first[k] for k in last if k in first and isinstance(last[k], int)}
    absent = sorted(set(first) ^ set(last))
    return {"vmstat_delta": delta, "rates": {}, "absent": absent}


def server_stats_summary(path: Path) -> dict[str, Any] | None:
    """Totals from nbd-serve's last stats line (None when there is none)."""
    lines = [r for r in read_jsonl(path) if "exports" in r]
    if not lines:
        return None
    last = lines[-1]
    exports = last.get("exports", {})
    totals: dict[str, int] = {}
    for exp in exports.values():
        for kind, n in (exp.get("requests") or {}).items():
            totals[f"requests_{kind}"] = totals.get(f"requests_{kind}", 0) + int(n)
        for kind, n in (exp.get("bytes") or {}).items():
            totals[f"bytes_{kind}"] = totals.get(f"bytes_{kind}", 0) + int(n)
    return {"lines": len(lines), "totals": totals, "connections": last.get("connections")}


@dataclass(slots=True)
class RunContext:
    """Handed to hooks while the guest runs (e.g. the test that kills the server)."""

    cfg: RunConfig
    server: servers.RunningServer
    state: watchdog.WatchState
    qemu_pid: int
    marks: dict[str, float] = field(default_factory=dict)
    """Free-form host-monotonic marks a hook can set (recorded in timings)."""


Hook = Callable[[dict[str, Any], RunContext], None]


def _format_s(seconds: float) -> str:
    seconds = max(0.0, seconds)
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def status_line(state: watchdog.WatchState, now: float, passes: int | None = None) -> str:
    """One progress line: phase, elapsed, pages done from the heartbeats, ETA.

    ``passes`` is the number of passes over the mapping (the write plus ``loops``
    verify passes); the ETA uses the average rate since the first heartbeat.
    """
    parts = [f"[{_format_s(now - state.started):>6}] phase {state.phase}"]
    hb, hb0 = state.last_heartbeat, state.first_heartbeat
    if hb is not None and hb0 is not None and state.phase == "stress":
        done = int(hb.get("pages_done") or 0)
        per_pass = int(hb.get("pages_total") or 0)
        total = per_pass * passes if passes else 0
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        work = f"/{total}" if total else ""
        parts.append(f"pass {hb.get('pass')}, pages {done}{work}{pct}")
        span = float(hb.get("t_mono", 0.0)) - float(hb0.get("t_mono", 0.0))
        rate = (done - int(hb0.get("pages_done") or 0)) / span if span > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:.0f} pages/s")
            if total > done:
                parts.append(f"ETA {_format_s((total - done) / rate)}")
    sample = state.last_sample
    if sample is not None:
        vm = sample.get("vmstat", {})
        parts.append(f"pswpout {vm.get('pswpout', '?')} pswpin {vm.get('pswpin', '?')}")
    parts.append(f"samples {state.samples}")
    return ", ".join(parts)


def _kill_qemu(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def run_experiment(
    cfg: RunConfig, emit: Emit | None = None, hook: Hook | None = None
) -> dict[str, Any]:
    """Run one experiment and return the run.json object (also written to ``cfg.out``).

    Raises:
        ValueError: invalid configuration (nothing is started).
    """
    cfg.validate()
    say = emit or (lambda _m: None)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    timings: dict[str, Any] = {}
    run: dict[str, Any] = {
        "schema": 1,
        "config": cfg.to_json(),
        "host": {"python": platform.python_version(), "kernel": platform.release()},
        "kernel": {"name": cfg.kernel, "flavour": cfg.flavour},
        "outcome": None,
        "outcome_reason": None,
        "swapstress": None,
        "vmstat_delta": {},
        "timings": timings,
        "files": {
            "vmstat": "vmstat.jsonl",
            "events": "events.jsonl",
            "console": "console.log",
            "server_stats": "server-stats.jsonl",
        },
    }
    server: servers.RunningServer | None = None
    try:
        _run_guest(cfg, run, timings, say, hook)
    except KeyboardInterrupt:
        run["outcome"] = watchdog.Outcome.ERROR.value
        run["outcome_reason"] = "interrupted by the user (SIGINT); QEMU and the server were stopped"
        run["interrupted"] = True
        say("interrupted: stopping QEMU and the server, writing run.json")
    except Exception as exc:  # recorded, never lost: the harness records every outcome
        log.debug("run failed", exc_info=True)
        run["outcome"] = watchdog.Outcome.ERROR.value
        run["outcome_reason"] = f"{type(exc).__name__}: {exc}"
        run["traceback"] = traceback.format_exc(limit=8)
        say(f"error: {run['outcome_reason']}")
    finally:
        server = run.pop("_server", None)
        if server is not None:
            server.stop()
            run["server"] = server.describe()
            if server.kind == "nbd-serve" and server.stats_path is not None:
                run["server"]["stats"] = server_stats_summary(server.stats_path)
        timings["total_s"] = round(time.monotonic() - t_start, 2)
        for name in ("vmstat.jsonl", "events.jsonl", "console.log", "server-stats.jsonl"):
            (out / name).touch(exist_ok=True)
        _write_json(out / "run.json", run)
    return run


def _run_guest(
    cfg: RunConfig, run: dict[str, Any], timings: dict[str, Any], say: Emit, hook: Hook | None
) -> None:
    from vm import image as vm_image  # noqa: PLC0415 - heavy, and built by another part

    out = cfg.out
    cache_dir = cfg.cache_dir or vm_image.default_cache_dir()
    t0 = time.monotonic()
    say(f"guest image: kernel {cfg.kernel} ({cfg.flavour}), cache {cache_dir}")
    img = vm_image.build_guest(cfg.kernel, cfg.flavour, cache_dir, say, payload_dir=cfg.payload_dir)
    timings["image_s"] = round(time.monotonic() - t0, 2)
    run["kernel"].update(
        release=img.kernel_release,
        package=img.kernel_package,
        image_key=img.key,
        vmlinuz=str(img.kernel),
        initrd=str(img.initrd),
        rootfs=str(img.rootfs),
    )

    t0 = time.monotonic()
    choice = qemu.resolve_accel(cfg.accel, img.kernel, cache_dir, progress=say)
    timings["accel_s"] = round(time.monotonic() - t0, 2)
    run["accel"] = {
        "requested": cfg.accel,
        "used": choice.accel,
        "reason": choice.reason,
        "cached": choice.cached,
        "cpu": choice.cpu,
    }
    say(f"accelerator: {choice.accel} ({choice.reason})")

    t0 = time.monotonic()
    stats_path = out / "server-stats.jsonl"
    server = servers.launch_server(
        cfg.server, cfg.export_bytes, out / "server", stats_path=stats_path, backing=cfg.backing
    )
    run["_server"] = server
    timings["server_start_s"] = round(time.monotonic() - t0, 2)
    if server.kind != "nbd-serve":
        stats_path.write_text(
            json.dumps(
                {
                    "server": server.kind,
                    "stats": None,
                    "note": f"{server.kind} has no --stats; only nbd-serve records them",
                }
            )
            + "\n"
        )
    say(
        f"server: {server.kind} on {server.host}:{server.port}, export {server.export_name[:8]}…"
        f" ({server.size_bytes // MIB} MiB, {server.backing})"
    )

    gcfg = guest_config(cfg, server)
    cmdline = qemu.kernel_cmdline({"cfg": encode_guest_config(gcfg)})
    qcfg = qemu.QemuConfig(
        kernel=img.kernel,
        initrd=img.initrd,
        rootfs=img.rootfs,
        memory_mib=cfg.memory_mib,
        cpus=cfg.cpus,
        accel=choice.accel,
        cpu=choice.cpu,
        cmdline=cmdline,
        console_path=out / "console.log",
        events_path=out / "events.jsonl",
        samples_path=out / "vmstat.jsonl",
    )
    argv = qemu.build_argv(qcfg)
    run["qemu"] = {"argv": argv, "guest_config": gcfg}
    for name in ("console.log", "events.jsonl", "vmstat.jsonl"):
        (out / name).unlink(missing_ok=True)

    t_qemu = time.monotonic()
    with open(out / "qemu.log", "wb") as qlog:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=qlog,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    say(f"QEMU started (pid {proc.pid}, {cfg.memory_mib} MiB, {cfg.cpus} vCPUs, {choice.accel})")
    wd = watchdog.Watchdog(out / "events.jsonl", out / "vmstat.jsonl", t_qemu)
    ctx = RunContext(cfg=cfg, server=server, state=wd.state, qemu_pid=proc.pid)
    lockup = timed_out = host_killed = False
    result_at: float | None = None
    last_status = t_qemu
    last_phase = ""
    try:
        while True:
            now = time.monotonic()
            for rec in wd.poll(now):
                kind = rec.get("type")
                if kind == "phase" and wd.state.phase != last_phase:
                    last_phase = wd.state.phase
                    say(f"[{_format_s(now - t_qemu):>6}] guest phase: {last_phase}")
                elif kind == "error":
                    say(f"guest error in phase {rec.get('phase')}: {rec.get('message')}")
                elif kind == "result":
                    result_at = now
                if hook is not None:
                    hook(rec, ctx)
            if proc.poll() is not None:
                break
            if now - last_status >= STATUS_INTERVAL_S:
                last_status = now
                say(status_line(wd.state, now, cfg.passes))
            if result_at is None and wd.state.silent_for(now) >= cfg.lockup_after_s:
                lockup = True
                say(f"watchdog: no heartbeat and no sample for {cfg.lockup_after_s:.0f}s: lockup")
                break
            if result_at is None and wd.state.stalled_for(now) >= cfg.lockup_after_s:
                lockup = True
                say(
                    f"watchdog: heartbeats arrive but pages_done has not grown for "
                    f"{cfg.lockup_after_s:.0f}s: lockup"
                )
                break
            if now - t_qemu >= cfg.effective_timeout_s:
                timed_out = True
                say(f"overall timeout of {cfg.effective_timeout_s:.0f}s reached")
                break
            if result_at is not None and now - result_at >= POWEROFF_GRACE_S:
                say("guest sent its result but did not power off; stopping QEMU")
                break
            time.sleep(POLL_INTERVAL_S)
    finally:
        if proc.poll() is None:
            host_killed = True
            _kill_qemu(proc)
    qemu_exit = None if host_killed else proc.returncode
    end = time.monotonic()
    list(wd.poll(end))  # whatever arrived in the last moments
    timings["qemu_s"] = round(end - t_qemu, 2)
    timings["phases_s"] = {k: round(v, 2) for k, v in wd.state.phases.items()}
    timings.update({f"mark_{k}_s": round(v - t_qemu, 2) for k, v in ctx.marks.items()})
    run["qemu"].update(exit_status=proc.returncode, killed_by_host=host_killed)

    console = (
        (out / "console.log").read_text(errors="replace") if (out / "console.log").exists() else ""
    )
    st = wd.state
    verdict = watchdog.classify(
        result_event=st.result,
        error_event=st.error,
        lockup=lockup,
        silent_s=st.silent_for(end),
        stalled_s=st.stalled_for(end),
        timed_out=timed_out,
        qemu_exit=qemu_exit,
        console_text=console,
    )
    run["outcome"] = verdict.outcome.value
    run["outcome_reason"] = verdict.reason
    run["evidence"] = verdict.evidence
    if st.result is not None:
        run["swapstress"] = st.result.get("swapstress")
        run["swapstress_exit_code"] = st.result.get("exit_code")
        timings["stress_s"] = st.result.get("seconds")
    if st.error is not None:
        run["guest_error"] = {"phase": st.error.get("phase"), "message": st.error.get("message")}
    if st.info is not None:
        run["kernel"]["guest_release"] = st.info.get("kernel_release")
        run["kernel"]["cmdline"] = st.info.get("cmdline")
        run["guest"] = {
            k: st.info.get(k) for k in ("settings", "mem_total_bytes", "cpus", "python")
        }
    samples = read_jsonl(out / "vmstat.jsonl")
    summary = vmstat_summary(samples)
    run["vmstat_delta"] = summary.get("vmstat_delta", {})
    run["vmstat_rates"] = summary.get("rates", {})
    run["vmstat_absent"] = summary.get("absent", [])
    run["counts"] = {
        "samples": len(samples),
        "heartbeats": st.heartbeats,
        "events": st.events,
        "bad_lines": wd.events.bad_lines + wd.samples.bad_lines,
    }
    run["last_heartbeat"] = st.last_heartbeat
    run["last_sample_vmstat"] = (st.last_sample or {}).get("vmstat")
