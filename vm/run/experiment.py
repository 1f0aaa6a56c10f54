"""One swap-over-NBD experiment: image, server, QEMU, watchdog, run.json.

Theory of operation
-------------------
:func:`run_experiment` does, in order, one function each:

1. :func:`_image` builds (or finds in the cache) the guest image for the kernel, arm and
   allocator through :mod:`vm.image.image`;
2. :func:`_accelerator` resolves the accelerator (``auto`` boot-probes KVM, :mod:`vm.run.qemu`);
3. :func:`_serving` (a context manager) starts the NBD server on 127.0.0.1 at a confirmed
   free port, exporting a fresh random name sized at least 5x guest RAM
   (:mod:`peers.servers`), and stops it, with its final stats line and its cost, however the
   block is left;
4. :func:`_boot` encodes the guest's parameters as one base64url JSON blob on the kernel
   command line (``swapnbd.cfg=``, read by :mod:`vm.image.guest_init`, PID 1 in the guest), after
   the arm's own words (``nbd.memalloc=0`` ...), and starts QEMU;
5. :func:`_watch` polls the files QEMU writes through a :class:`vm.run.watchdog.Watchdog`,
   printing progress and sampling the server's cost, and returns an :class:`vm.run.record.Ending`:
   the guest powered off, fell silent or stalled (a ``lockup``), the overall timeout hit, or
   the guest sent its result and never powered off;
6. :func:`vm.run.record.record_run` classifies the run, summarizes the samples with
   ``stress.vmstat.summarize`` and fills run.json, which :func:`run_experiment` writes.

A guest that hangs or crashes before it reports anything is booted again (steps 4-5,
up to :data:`BOOT_ATTEMPTS` boots): nothing of the experiment has run yet.
``boot_retries`` in run.json keeps each failed boot's kind (``hung`` or ``crashed``),
silence, panic line, last console line and console file (``console-boot1.log``).

Every path out writes ``OUT/run.json``: the harness records every outcome, not just the
happy one.  Any exception is recorded as outcome ``error``; SIGINT and SIGTERM stop QEMU
and the server and are recorded as ``interrupted`` (``interrupted_by`` names the signal).

No orphans: QEMU is launched with ``PR_SET_PDEATHSIG`` and the servers die with their
parent too (:mod:`peers.lifeline`), so even a SIGKILLed harness leaves nothing running.

The run's settings are a :class:`vm.run.config.RunConfig`; what it costs the host (the
server's CPU, RSS, wake-ups and run-queue wait, QEMU's CPU, steal time) is sampled by
:mod:`vm.run.cost` as the steps go.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from peers import lifeline, servers
from stress.runrecord import FILES, Outcome, RunRecord
from vm.image.progress import format_duration
from vm.run import forensics, qemu, watchdog
from vm.run.config import MIB, RunConfig, encode_guest_config, guest_config
from vm.run.cost import Cost, ServerCost, host_steal_ticks
from vm.run.record import Ending, record_run, server_stats_summary

if TYPE_CHECKING:
    from vm.image.image import GuestImage

log = logging.getLogger(__name__)

Emit = Callable[[str], None]

#: Seconds the guest gets to power off after it sent its result.
POWEROFF_GRACE_S = 60.0
POLL_INTERVAL_S = 0.5
STATUS_INTERVAL_S = 10.0

#: Every file a run leaves in OUT besides run.json (created empty when a run fails early).
OUTPUT_FILES = FILES


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
"""Called with every record the guest sends, and with ``{"type": "qemu-started",
"attempt": N}`` right after each QEMU start (before the guest can report anything)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived during a run (raised by the handler of
    :func:`stop_signals_interrupt`; a BaseException so that no ``except Exception``
    swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into :class:`Interrupted`; ignore later ones, so the
    cleanup they trigger (stop QEMU and the server, write run.json) cannot be cut short.

    Signal handlers exist only in the main thread; elsewhere this does nothing (and
    Ctrl-C still arrives as KeyboardInterrupt in the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def status_line(state: watchdog.WatchState, now: float, passes: int | None = None) -> str:
    """One progress line: phase, elapsed, pages done from the heartbeats, ETA.

    ``passes`` is the number of passes over the mapping (the write plus ``loops``
    verify passes); the ETA uses the average rate since the first heartbeat.
    """
    parts = [f"[{format_duration(now - state.started):>6}] phase {state.phase}"]
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
                parts.append(f"ETA {format_duration((total - done) / rate)}")
    sample = state.last_sample
    if sample is not None:
        vm = sample.get("vmstat", {})
        parts.append(f"pswpout {vm.get('pswpout', '?')} pswpin {vm.get('pswpin', '?')}")
    parts.append(f"samples {state.samples}")
    return ", ".join(parts)


# --- the run -----------------------------------------------------------------------------


def _since(t0: float) -> float:
    return round(time.monotonic() - t0, 2)


def new_run(cfg: RunConfig) -> RunRecord:
    """The run's record, filled in as the run goes."""
    kernel = {
        # An own tree is named by its path, never by --kernel's default.
        "name": f"tree {cfg.kernel_tree}" if cfg.kernel_tree is not None else cfg.kernel,
        "flavour": cfg.flavour,
        "arm": cfg.arm,
        "allocator": cfg.allocator,
    }
    run = RunRecord(config=cfg.to_json(), kernel=kernel, cost=Cost().as_dict())
    run.host["swapnbd_commit"] = swapnbd_commit()
    return run


#: The checkout this module runs from (its git commit goes into run.json's ``host``).
SOURCE_TREE: Final = Path(__file__).resolve().parents[2]


def swapnbd_commit(tree: Path = SOURCE_TREE) -> str | None:
    """The commit of the swapnbd checkout that runs the experiment, ``+dirty`` when its
    tracked files differ; None outside a git checkout (an installed wheel) or without git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(tree), "diff", "--quiet", "HEAD", "--"],
            check=False,
            capture_output=True,
            timeout=10,
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty == 1 else "") if head else None


def run_experiment(
    cfg: RunConfig, emit: Emit | None = None, hook: Hook | None = None
) -> dict[str, Any]:
    """Run one experiment and return the run.json object (also written to ``cfg.out``).

    SIGINT and SIGTERM (in the main thread) stop the run: QEMU and the server are
    stopped and run.json records ``interrupted: true`` and ``interrupted_by``.

    Raises:
        ValueError: invalid configuration (nothing is started).
    """
    cfg.validate()
    say = emit or (lambda _m: None)
    cfg.out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    run = new_run(cfg)
    cost = Cost()
    with stop_signals_interrupt():
        try:
            _run_guest(cfg, run, cost, say, hook)
        except (Interrupted, KeyboardInterrupt) as exc:
            name = exc.args[0] if isinstance(exc, Interrupted) else "SIGINT"
            run.judge(Outcome.ERROR, f"interrupted by {name}; QEMU and the server were stopped")
            run.interrupted = True
            run.interrupted_by = name
            say(f"interrupted by {name}: QEMU and the server were stopped, writing run.json")
        except Exception as exc:  # recorded, never lost: the harness records every outcome
            log.debug("run failed", exc_info=True)
            run.judge(Outcome.ERROR, f"{type(exc).__name__}: {exc}")
            run.traceback = traceback.format_exc(limit=8)
            say(f"error: {run.outcome_reason}")
        finally:
            run.cost = cost.as_dict()
            run.timings["total_s"] = _since(t_start)
            run.write(cfg.out)
    return run.to_json()


def _run_guest(cfg: RunConfig, run: RunRecord, cost: Cost, say: Emit, hook: Hook | None) -> None:
    """Steps 1-6 of the module docstring."""
    from vm.image import image as vm_image  # noqa: PLC0415 - heavy, and built by another part

    cache_dir = cfg.cache_dir or vm_image.default_cache_dir()
    img = _image(cfg, cache_dir, run, say)
    choice = _accelerator(cfg, img, cache_dir, run, say)
    # A unix socket path must fit in 108 bytes: a short directory of its own, not OUT.
    qmp_dir = Path(tempfile.mkdtemp(prefix="swapnbd-qmp-"))
    try:
        with _serving(cfg, run, cost, say) as server:
            for attempt in range(1, BOOT_ATTEMPTS + 1):
                qmp_path = qmp_dir / f"qmp{attempt}.sock"
                proc, wd, t_qemu = _boot(
                    cfg, img, choice, server, run=run, cost=cost, say=say, qmp_path=qmp_path
                )
                ctx = RunContext(cfg=cfg, server=server, state=wd.state, qemu_pid=proc.pid)
                stalls = watchdog.StallWatch(cfg.effective_stall_after_s, cfg.lockup_after_s)
                looks = forensics.Forensics(
                    cfg.out / OUTPUT_FILES["console"],
                    qmp_path,
                    forensics.server_probe(server.pid, server.port, stats_path=server.stats_path),
                    t_qemu,
                    port=server.port,
                )
                if hook is not None:
                    hook({"type": "qemu-started", "attempt": attempt}, ctx)
                try:
                    ending = _watch(
                        cfg,
                        proc,
                        wd,
                        ctx,
                        say=say,
                        hook=hook,
                        cost=cost,
                        stalls=stalls,
                        looks=looks,
                    )
                finally:
                    killed = _stop_qemu(proc, cost)
                    cost.steal_end = host_steal_ticks()
                    assert run.qemu is not None  # _boot recorded it with the process
                    run.qemu.update(exit_status=proc.returncode, killed_by_host=killed)
                failed = _failed_boot(ending, wd.state, cfg.out / OUTPUT_FILES["console"])
                if attempt < BOOT_ATTEMPTS and failed is not None:
                    _keep_failed_boot(cfg, run, wd, attempt, failed, say=say)
                    continue
                break
            exit_status = None if killed else proc.returncode
            record_run(
                cfg,
                run,
                wd,
                ending,
                qemu_exit=exit_status,
                marks=ctx.marks,
                t_qemu=t_qemu,
                stalls=stalls,
                looks=looks,
            )
    finally:
        shutil.rmtree(qmp_dir, ignore_errors=True)


#: A guest kernel that hangs or crashes before it reports anything is booted again, up
#: to this many boots in all; run.json keeps each failed boot's evidence. Hangs: 2 of
#: about 80 boots of the 6.1 cloud kernel under TCG, each at the same early line ("IP
#: idents hash table entries"). Crashes: 3 of 23 boots of sid's 7.2 under bookworm's
#: TCG died with "Oops: int3" where the kernel had just patched its own text (a static
#: key flipped in ``__schedule`` by a livepatch transition, or by the switch to the tsc
#: clocksource): a vCPU ran a stale translation of the int3. Three boots make a run
#: that fails so about 1 in 500 rather than 1 in 60.
BOOT_ATTEMPTS: Final = 3


@dataclass(frozen=True, slots=True)
class FailedBoot:
    """A boot that never reached the experiment: how it failed, and the panic line."""

    how: str
    """``"hung"`` or ``"crashed"``."""
    panic: str | None = None
    """The console's first panic or Oops line, for a crash."""


def _failed_boot(ending: Ending, state: watchdog.WatchState, console: Path) -> FailedBoot | None:
    """A :class:`FailedBoot` when the guest never reported a phase and the watchdog
    stopped it (silent or stalled: hung) or its kernel panicked (crashed: QEMU exits on a
    panic, ``panic=-1`` with ``-no-reboot``); else None. Nothing of the experiment ran
    yet (no swap device, no worker), so another boot is the same run. A guest that
    powered off at boot without a panic (an initramfs error) is not booted again: that
    error would repeat."""
    if state.phase != "boot":
        return None
    if ending in (Ending.SILENT, Ending.STALLED):
        return FailedBoot("hung")
    if ending is Ending.QEMU_EXITED:
        panic = _panic_line(console)
        return None if panic is None else FailedBoot("crashed", panic)
    return None


def _panic_line(console: Path) -> str | None:
    """The console's first panic or Oops line (what the verdict would name), or None."""
    try:
        text = console.read_text(errors="replace")
    except FileNotFoundError:
        return None
    panics = watchdog.console_evidence(text).get("panic")
    return panics[0] if panics else None


def _keep_failed_boot(
    cfg: RunConfig,
    run: RunRecord,
    wd: watchdog.Watchdog,
    attempt: int,
    failed: FailedBoot,
    *,
    say: Emit,
) -> None:
    """Move the failed boot's console aside and record it in ``boot_retries``."""
    console = cfg.out / OUTPUT_FILES["console"]
    how, panic = failed.how, failed.panic
    kept: Path | None = None
    text = ""
    with contextlib.suppress(FileNotFoundError):  # else QEMU never got to open it
        text = console.read_text(errors="replace")
        kept = console.replace(cfg.out / f"console-boot{attempt}.log")
    silent = round(wd.state.silent_for(time.monotonic()), 1)
    last = watchdog.console_last_line(text)
    if run.boot_retries is None:
        run.boot_retries = []
    run.boot_retries.append(
        {
            "attempt": attempt,
            "how": how,
            "silent_s": silent,
            "panic": panic,
            "console_last_line": last,
            "console": kept.name if kept is not None else None,
        }
    )
    if how == "crashed":
        what = f"the guest kernel crashed while booting (attempt {attempt}: {panic!r})"
    else:
        what = (
            f"the guest hung while booting (attempt {attempt}, silent {silent:.0f}s,"
            f" console ends: {last!r})"
        )
    say(f"{what}; booting it again")


def _image(cfg: RunConfig, cache_dir: Path, run: RunRecord, say: Emit) -> GuestImage:
    """Step 1: the guest image for the kernel, arm and allocator."""
    from vm.image import image as vm_image  # noqa: PLC0415

    t0 = time.monotonic()
    what = f"kernel {cfg.kernel} ({cfg.flavour}), arm {cfg.arm}"
    if cfg.allocator:
        what += f", allocator {cfg.allocator}"
    say(f"guest image: {what}, cache {cache_dir}")
    img = vm_image.build_guest(
        cfg.kernel,
        cfg.flavour,
        cache_dir,
        say,
        payload_dir=cfg.payload_dir,
        arm=cfg.arm,
        allocator=cfg.allocator,
        tree=cfg.kernel_tree,
        patch=cfg.kernel_patch,
        config_base=cfg.kernel_config,
    )
    run.timings["image_s"] = _since(t0)
    kernel = run.kernel
    kernel.update(img.identity)
    kernel.update(
        arm=cfg.arm,
        allocator=cfg.allocator,
        cmdline_extra=list(img.cmdline_extra),
        release=img.kernel_release,
        package=img.kernel_package,
        image_key=img.key,
        vmlinuz=str(img.kernel),
        initrd=str(img.initrd),
        rootfs=str(img.rootfs),
    )
    return img


def _accelerator(
    cfg: RunConfig, img: GuestImage, cache_dir: Path, run: RunRecord, say: Emit
) -> qemu.AccelChoice:
    """Step 2: TCG or KVM (``auto`` boot-probes KVM once per kernel and caches it)."""
    t0 = time.monotonic()
    choice = qemu.resolve_accel(cfg.accel, img.kernel, cache_dir, progress=say)
    run.timings["accel_s"] = _since(t0)
    run.accel = {
        "requested": cfg.accel,
        "used": choice.accel,
        "reason": choice.reason,
        "cached": choice.cached,
        "cpu": choice.cpu,
    }
    say(f"accelerator: {choice.accel} ({choice.reason})")
    return choice


#: nbd-serve flags for the experiment only (docs/performance.md, "The swap path" and
#: "Scheduling policy"): under TCG the guest's vCPU threads keep every host core busy, so
#: a busy-polling server spins on CPU the guest needs (a profile of a real run put 7% of
#: the server's CPU in the poll loop, for 240 hits in 1,540 windows). For the same
#: reason the server runs under SCHED_IDLE: it then answers in the moments a vCPU would
#: idle, which is when the guest waits for its swap I/O, instead of preempting a vCPU.
#: Interleaved on the swap-path shape, stress Elapsed fell from a median 46.1 s to 38.2 s
#: (8 runs each); on the quick preset two runs each were level (202 and 225 s against
#: 220 and 204 s). A 100 µs slice (the earlier setting, "Scheduler slice") cut the server's
#: run-queue wait but not Elapsed. The worker count is set to the client's connections
#: beside it: a worker with no connection only holds memory.
SWAP_PATH_ARGS: tuple[str, ...] = ("--poll-us", "0")


@contextlib.contextmanager
def _serving(
    cfg: RunConfig, run: RunRecord, cost: Cost, say: Emit
) -> Iterator[servers.RunningServer]:
    """Step 3: the NBD server, stopped (final stats line, cost) however the block ends."""
    t0 = time.monotonic()
    stats_path = cfg.out / OUTPUT_FILES["server_stats"]
    extra: tuple[str, ...] = ("--fault", cfg.server_fault) if cfg.server_fault else ()
    if cfg.server == "nbd-serve":
        policy = ("--sched-policy", cfg.server_sched_policy)
        extra = (*extra, *SWAP_PATH_ARGS, *policy, "--workers", str(cfg.nbd_connections))
    server = servers.launch_server(
        cfg.server,
        cfg.export_bytes,
        cfg.out / "server",
        stats_path=stats_path,
        backing=cfg.backing,
        extra_args=extra,
    )
    run.timings["server_start_s"] = _since(t0)
    cost.server = ServerCost(server.pid)
    cost.server.sample(time.monotonic(), force=True)
    try:
        if server.kind != "nbd-serve":
            note = f"{server.kind} has no --stats; only nbd-serve records them"
            stats_path.write_text(
                json.dumps({"server": server.kind, "stats": None, "note": note}) + "\n"
            )
        say(
            f"server: {server.kind} on {server.host}:{server.port}, "
            f"export {server.export_name[:8]}… ({server.size_bytes // MIB} MiB, {server.backing})"
        )
        yield server
    finally:
        if not server.killed:
            cost.server.sample(time.monotonic(), force=True)
        server.stop()
        run.server = server.describe()
        if server.kind == "nbd-serve" and server.stats_path is not None:
            run.server["stats"] = server_stats_summary(server.stats_path)


def _boot(
    cfg: RunConfig,
    img: GuestImage,
    choice: qemu.AccelChoice,
    server: servers.RunningServer,
    *,
    run: RunRecord,
    cost: Cost,
    say: Emit,
    qmp_path: Path | None = None,
) -> tuple[subprocess.Popen[bytes], watchdog.Watchdog, float]:
    """Step 4: the kernel command line and QEMU (which dies with us: PDEATHSIG)."""
    out = cfg.out
    gcfg = guest_config(cfg, server)
    words = (*img.cmdline_extra, *evidence_cmdline(cfg))
    cmdline = qemu.kernel_cmdline({"cfg": encode_guest_config(gcfg)}, words)
    qcfg = qemu.QemuConfig(
        kernel=img.kernel,
        initrd=img.initrd,
        rootfs=img.rootfs,
        memory_mib=cfg.memory_mib,
        cpus=cfg.cpus,
        accel=choice.accel,
        cpu=choice.cpu,
        cmdline=cmdline,
        console_path=out / OUTPUT_FILES["console"],
        events_path=out / OUTPUT_FILES["events"],
        samples_path=out / OUTPUT_FILES["vmstat"],
        qmp_path=qmp_path,
    )
    argv = qemu.build_argv(qcfg)
    run.qemu = {"argv": argv, "guest_config": gcfg, "version": qemu.qemu_version()}
    for name in ("console", "events", "vmstat"):
        (out / OUTPUT_FILES[name]).unlink(missing_ok=True)
    cost.steal_start = host_steal_ticks()
    t_qemu = time.monotonic()
    with open(out / "qemu.log", "wb") as qlog:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=qlog,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lifeline.parent_death_signal(signal.SIGKILL),  # noqa: PLW1509 - prctl
        )
    run.qemu["pid"] = proc.pid
    say(f"QEMU started (pid {proc.pid}, {cfg.memory_mib} MiB, {cfg.cpus} vCPUs, {choice.accel})")
    wd = watchdog.Watchdog(out / OUTPUT_FILES["events"], out / OUTPUT_FILES["vmstat"], t_qemu)
    return proc, wd, t_qemu


def evidence_cmdline(cfg: RunConfig) -> tuple[str, ...]:
    """Kernel words that make a stalled guest say why (kernel-notes.md §9).

    Debian's cloud kernels mask SysRq's dump keys (0x01b6): ``sysrq_always_enabled`` lets
    the host's alt-sysrq-w/m/l/t through. The hung-task detector reports D-state tasks
    after ``hung_task_timeout_s`` (below the stall threshold's cutoff), every time
    (``hung_task_warnings=-1``; the default goes quiet after 10).
    """
    return (
        "sysrq_always_enabled",
        f"sysctl.kernel.hung_task_timeout_secs={cfg.hung_task_timeout_s}",
        "sysctl.kernel.hung_task_warnings=-1",
    )


def _reap_qemu(proc: subprocess.Popen[bytes], cost: Cost, *, block: bool) -> bool:
    """wait4() QEMU ourselves, for its rusage; True once it has exited."""
    if proc.returncode is not None:
        return True
    try:
        pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
    except ChildProcessError:  # reaped elsewhere; its rusage is lost
        proc.returncode = proc.returncode if proc.returncode is not None else -1
        return True
    if pid == 0:
        return False
    proc.returncode = os.waitstatus_to_exitcode(status)
    cost.qemu = usage
    return True


def _stop_qemu(proc: subprocess.Popen[bytes], cost: Cost) -> bool:
    """Kill QEMU if it still runs; True when the host had to kill it."""
    if _reap_qemu(proc, cost, block=False):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    _reap_qemu(proc, cost, block=True)
    return True


def _watch(
    cfg: RunConfig,
    proc: subprocess.Popen[bytes],
    wd: watchdog.Watchdog,
    ctx: RunContext,
    *,
    say: Emit,
    hook: Hook | None,
    cost: Cost,
    stalls: watchdog.StallWatch,
    looks: forensics.Forensics,
) -> Ending:
    """Step 5: follow the guest until it ends; say why."""
    t_qemu = wd.state.started
    result_at: float | None = None
    last_status = t_qemu
    last_phase = ""
    while True:
        now = time.monotonic()
        for rec in wd.poll(now):
            kind = rec.get("type")
            if kind == "phase" and wd.state.phase != last_phase:
                last_phase = wd.state.phase
                say(f"[{format_duration(now - t_qemu):>6}] guest phase: {last_phase}")
            elif kind == "error":
                say(f"guest error in phase {rec.get('phase')}: {rec.get('message')}")
            elif kind == "result":
                result_at = now
            if hook is not None:
                hook(rec, ctx)
        if cost.server is not None and not ctx.server.killed:
            cost.server.sample(now)
        if _reap_qemu(proc, cost, block=False):
            return Ending.QEMU_EXITED
        if now - last_status >= STATUS_INTERVAL_S:
            last_status = now
            say(status_line(wd.state, now, cfg.passes))
        ending = _stall_step(cfg, wd.state, now, stalls=stalls, looks=looks, say=say)
        if ending is not None and result_at is None:
            return ending
        if (
            result_at is None
            and wd.state.phase not in watchdog.LOCKUP_PHASES
            and wd.state.silent_for(now) >= cfg.lockup_after_s
        ):
            say(f"watchdog: no heartbeat and no sample for {cfg.lockup_after_s:.0f}s")
            return Ending.SILENT
        if now - t_qemu >= cfg.effective_timeout_s:
            say(f"overall timeout of {cfg.effective_timeout_s:.0f}s reached")
            return Ending.TIMEOUT
        if result_at is not None and now - result_at >= POWEROFF_GRACE_S:
            say("guest sent its result but did not power off; stopping QEMU")
            return Ending.NO_POWEROFF
        time.sleep(POLL_INTERVAL_S)


def _stall_step(
    cfg: RunConfig,
    st: watchdog.WatchState,
    now: float,
    *,
    stalls: watchdog.StallWatch,
    looks: forensics.Forensics,
    say: Emit,
) -> Ending | None:
    """Carry out what the StallWatch asks at ``now``; an Ending when the lockup is confirmed."""
    for action in stalls.step(now, st):
        if isinstance(action, watchdog.Look):
            rec = looks.look(action, now)
            server = f"; server {rec['server']['unresponsive']}" if rec.get("server") else ""
            failed = f" (not sent: {rec['error']})" if rec.get("error") else ""
            say(
                f"watchdog: no page progress for {now - (st.last_progress or now):.0f}s: "
                f"look {action.number}, SysRq {'/'.join(action.keys)}{failed}{server}"
            )
        elif isinstance(action, watchdog.Evaluate):
            judged = looks.judge()
            if stalls.current is not None and judged:
                stalls.current["signature"] = judged[-1][0]
            say("watchdog: the kernel says: " + "; ".join(f"{s} ({w})" for s, w in judged))
            if cfg.early_confirm and looks.confirms():
                say(f"watchdog: {judged[-1][0]} in both looks with no progress: lockup")
                return Ending.CONFIRMED
        elif isinstance(action, watchdog.StallEnded):
            say(
                f"watchdog: progress resumed after a {action.stall['length_s']:.0f}s stall: "
                "a stall, not a lockup"
            )
        elif isinstance(action, watchdog.Confirmed):
            say(f"watchdog: no page progress for {action.idle_s:.0f}s: lockup")
            if st.silent_for(now) >= cfg.lockup_after_s:
                return Ending.SILENT
            return Ending.STALLED
    return None
