"""``swapnbd``: run the swap-over-NBD experiment in a QEMU guest.

Subcommands:

``swapnbd run``    one experiment (guest image, NBD server, QEMU, watchdog, run.json): vm/run/
``swapnbd image``  build (or find cached) the guest image only: vm/image/
``swapnbd matrix`` a TOML file of cells, run interleaved into a resumable store (vm/campaign/)
``swapnbd boundary`` where lockups begin: P(lockup) per ratio, sampled adaptively (vm/campaign/)
``swapnbd report`` tables (md/csv/json) and plots from run.json files (vm/campaign/)

The parser is built from one function per subcommand, so ``matrix`` (kernel variants x
servers with a comparison report) can be added as another subparser that calls
:func:`vm.run.experiment.run_experiment` once per cell.

Exit codes: 0 the run completed; 1 the run ended with another outcome (lockup,
guest-crash, corruption, oom, error); 2 usage error; 3 the image could not be built;
130 interrupted by SIGINT (Ctrl-C), 143 by SIGTERM (128 + the signal, as a shell reports
it; QEMU and the server are stopped and run.json is still written).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peers import servers
from stress.sizes import SizeError, parse_size
from vm.image import arms, rootfs
from vm.run import experiment
from vm.run.config import ALLOCATORS, ARMS, SCHED_POLICIES, RunConfig

EXIT_OK = 0
EXIT_NOT_COMPLETED = 1
EXIT_USAGE = 2
EXIT_IMAGE = 3
EXIT_INTERRUPTED = 130
"""SIGINT; a run stopped by SIGTERM exits 128 + 15 = 143."""
EXIT_TERMINATED = 143
#: ``swapnbd run --bisect``: the exit codes ``git bisect run`` reads. Good (EXIT_OK): the
#: run completed. Bad: the kernel failed under the pressure (a lockup, corruption, an OOM
#: kill or a guest crash). Skip: it could not be tested (an image or harness error, a stall
#: before pressure). Abort: the command line itself is wrong, which no commit changes.
BISECT_BAD = 1
BISECT_SKIP = 125
BISECT_ABORT = 255
BISECT_BAD_OUTCOMES = frozenset({"lockup", "corruption", "oom", "guest-crash"})

#: Presets.  ``quick`` (the default) is the mission's shape scaled for TCG: 8 x vCPUs
#: workers at 4x guest RAM (128 MiB guest, 2 vCPUs, 16 workers), a few minutes under TCG;
#: ``seed`` is the 2012 setup (2 GiB, 8 x NCPU workers, 4x RAM), practical with KVM.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "memory_mib": 128,
        "cpus": 2,
        "workers": 16,
        "total_bytes": None,
        "ratio": 4.0,
        "loops": 1,
        "lockup_after_s": 180.0,
        "timeout_s": None,
    },
    "seed": {
        "memory_mib": 2048,
        "cpus": os.cpu_count() or 2,
        "workers": 8 * (os.cpu_count() or 2),
        "total_bytes": None,
        "ratio": 4.0,
        "loops": 1,
        "lockup_after_s": 300.0,
        "timeout_s": None,
    },
}

EPILOG = """\
examples:
  swapnbd run                                  # quick: 128M guest, 2 vCPUs, 16 workers, 4x RAM
  swapnbd run --memory 128M --cpus 2 --workers 8 --total 512M --loops 1 --out results/x
  swapnbd run --preset seed --accel kvm        # the 2012 setup: 2 GiB, 8 x NCPU workers, 4x RAM
  swapnbd run --server nbdkit --swap file      # a peer server, swapfile on ext4 on /dev/nbd0
  swapnbd image --kernel 6.12                  # build/cache the 6.12 guest image only

outcomes (run.json "outcome"): completed, lockup, guest-crash, corruption, oom, error
exit codes: 0 completed, 1 another outcome, 2 usage error, 3 image build failed,
            130 interrupted by SIGINT, 143 by SIGTERM (run.json is still written)
  with --bisect, as git bisect run reads them: 0 completed, 1 lockup, corruption, oom
            or guest-crash, 125 error (the kernel could not be tested), 255 usage error
            (aborts the bisect); 130 and 143 still abort it
  git bisect run sh -c 'make bzImage || exit 125
      swapnbd run --bisect --kernel arch/x86/boot/bzImage'
"""


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from exc
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected a number such as 4 or 2.5, got {text!r}"
        ) from exc
    if not 0 < value <= 64:
        raise argparse.ArgumentTypeError(f"--ratio must be in (0, 64], got {text}")
    return value


def _add_image_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kernel",
        default="6.1",
        help="a Debian stock kernel (6.1 bookworm, 6.12 bookworm-security, 7.2 sid), a built "
        "variant by name (e.g. 6.1-build) or a bzImage path (default: 6.1)",
    )
    p.add_argument(
        "--arm",
        choices=list(ARMS),
        default="patched",
        help="patched (nbd memalloc + pfmemalloc throttle, as shipped; the default) or "
        "vanilla (both switched off, as before the 2012 swap-over-NBD series)",
    )
    p.add_argument(
        "--allocator",
        choices=list(ALLOCATORS),
        default=None,
        help="slab allocator of a built kernel (default: the kernel's own)",
    )
    p.add_argument("--flavour", default="cloud", help="Debian kernel flavour (default: cloud)")
    p.add_argument(
        "--kernel-tree",
        type=Path,
        default=None,
        metavar="DIR",
        help="build the kernel source tree DIR (with the guest config fragments, every "
        "driver built in; cached by the tree's content and config) and boot it instead of "
        "--kernel; DIR itself is never written to",
    )
    p.add_argument(
        "--patch",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --kernel-tree: apply FILE (patch -p1) to a linked copy of the tree first",
    )
    p.add_argument(
        "--kernel-config",
        choices=list(arms.CONFIG_BASES),
        default="full",
        help="with --kernel-tree: full (x86_64 defconfig + kvm_guest.config, about 22 min on "
        "two cores; the default) or minimal (allnoconfig + what the guest uses: minutes)",
    )
    p.add_argument(
        "--mirror",
        default=None,
        metavar="URL",
        help="Debian mirror for the guest root fs (default: $SWAPNBD_MIRROR, else the first "
        "bookworm source in the host's /etc/apt sources)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="image cache directory (default: $SWAPNBD_CACHE, "
        "$XDG_CACHE_HOME/swapnbd or ~/.cache/swapnbd)",
    )


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run one swap-over-NBD experiment",
        description="Boot a QEMU guest whose swap is an NBD device served from this host, run "
        "swapstress in it, watch it from outside and write OUT/run.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="quick",
        help="base settings; flags override them (default: quick)",
    )
    p.add_argument("--memory", type=_size, help="guest RAM, e.g. 128M or 2G")
    p.add_argument("--cpus", type=_positive_int, help="guest vCPUs")
    p.add_argument("--workers", type=_positive_int, help="swapstress workers")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--total", type=_size, help="memory the workers touch in all, e.g. 512M")
    amount.add_argument("--ratio", type=_ratio, help="total as a multiple of guest RAM, e.g. 4")
    p.add_argument("--loops", type=_positive_int, help="verification passes")
    _add_image_flags(p)
    p.add_argument(
        "--swap",
        choices=["device", "file"],
        default="device",
        help="swap on /dev/nbd0 (device, default) or a swapfile on ext4 on it (file)",
    )
    p.add_argument(
        "--swap-size",
        type=_size,
        default=None,
        help="size of the swap area (default: the whole export; less than the plan "
        "minus RAM makes the guest run out of memory)",
    )
    p.add_argument(
        "--server",
        choices=list(servers.SERVER_KINDS),
        default=None,
        help="NBD server (default: nbd-serve; nbdkit until nbd-serve is installed)",
    )
    p.add_argument(
        "--backing",
        choices=["memory", "file"],
        default=None,
        help="server storage (default: memory; nbd-server always uses a sparse file)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default: results/run-YYYYmmdd-HHMMSS)",
    )
    p.add_argument(
        "--accel",
        choices=["auto", "tcg", "kvm"],
        default="auto",
        help="auto boot-probes KVM and falls back to TCG (default: auto)",
    )
    p.add_argument(
        "--lockup-after",
        type=_seconds,
        default=None,
        help="seconds without page progress (or, before the stress phase, without any "
        "line from the guest) that confirm a lockup, unless the kernel's evidence did earlier",
    )
    p.add_argument(
        "--stall-after",
        type=_seconds,
        default=None,
        help="seconds without page progress that make a stall: the host presses SysRq "
        "w/m then w/l/t and keeps watching; the same deadlock signature twice confirms the "
        "lockup at once (default: a third of --lockup-after, at most 30)",
    )
    p.add_argument(
        "--no-early-confirm",
        action="store_true",
        help="hold every stall for the whole --lockup-after window even when the kernel "
        "names a deadlock (e.g. --lockup-after 900 --no-early-confirm: a 15-minute hold)",
    )
    p.add_argument(
        "--server-sched-policy",
        choices=list(SCHED_POLICIES),
        default="idle",
        help="nbd-serve's --sched-policy in the experiment (default: idle, see "
        "docs/performance.md); normal shows a verdict does not depend on it",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        help="overall limit in seconds; QEMU is killed after it",
    )
    p.add_argument(
        "--nbd-timeout",
        type=_nonneg_int,
        default=0,
        help="nbd-client -t (0, the default: requests never fail)",
    )
    p.add_argument("--nbd-connections", type=_positive_int, default=1, help="nbd-client -C")
    p.add_argument(
        "--resident-client",
        action="store_true",
        help="2012-style resident client: nbd-client -L -swap (ioctl mode, mlockall)",
    )
    p.add_argument(
        "--min-free-kbytes",
        type=_positive_int,
        default=None,
        help="vm.min_free_kbytes to pin (default: the kernel's formula for --memory)",
    )
    p.add_argument("--json", action="store_true", help="print run.json instead of the summary")
    p.add_argument(
        "--bisect",
        action="store_true",
        help="exit as git bisect run reads it: 0 completed, 1 the kernel failed, 125 untestable",
    )
    p.set_defaults(func=cmd_run)


def _add_image(sub: Any) -> None:
    p = sub.add_parser(
        "image",
        help="build or find the cached guest image",
        description="Build the guest kernel/initramfs/rootfs (cached by inputs).",
    )
    _add_image_flags(p)
    p.set_defaults(func=cmd_image)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swapnbd",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_image(sub)
    _add_matrix(sub)
    _add_boundary(sub)
    _add_report(sub)
    return parser


def default_out(now: dt.datetime | None = None) -> Path:
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"run-{stamp}"


def default_server() -> servers.ServerKind:
    return "nbd-serve" if servers.nbd_serve_available() else "nbdkit"


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Preset first, then only the flags the user gave."""
    base = dict(PRESETS[args.preset])
    if args.memory is not None:
        if args.memory % (1024 * 1024):
            raise ValueError(f"--memory must be a whole number of MiB, got {args.memory} bytes")
        base["memory_mib"] = args.memory // (1024 * 1024)
    for flag, key in (
        ("cpus", "cpus"),
        ("workers", "workers"),
        ("loops", "loops"),
        ("lockup_after", "lockup_after_s"),
        ("stall_after", "stall_after_s"),
        ("timeout", "timeout_s"),
    ):
        value = getattr(args, flag)
        if value is not None:
            base[key] = value
    if args.total is not None:
        base.update(total_bytes=args.total, ratio=None)
    elif args.ratio is not None:
        base.update(total_bytes=None, ratio=args.ratio)
    cfg = RunConfig(
        out=args.out or default_out(),
        kernel=args.kernel,
        flavour=args.flavour,
        arm=args.arm,
        allocator=args.allocator,
        kernel_tree=args.kernel_tree,
        kernel_patch=args.patch,
        kernel_config=args.kernel_config,
        swap=args.swap,
        swap_bytes=args.swap_size,
        server=args.server or default_server(),
        backing=args.backing,
        accel=args.accel,
        nbd_timeout=args.nbd_timeout,
        nbd_connections=args.nbd_connections,
        resident_client=args.resident_client,
        min_free_kbytes=args.min_free_kbytes,
        cache_dir=args.cache,
        server_sched_policy=args.server_sched_policy,
        early_confirm=not args.no_early_confirm,
        **base,
    )
    cfg.validate()
    return cfg


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}{unit}"
    return f"{value}{unit}"


def summary_lines(run: dict[str, Any]) -> list[str]:
    """The short summary printed at the end of a run."""
    sw = run.get("swapstress") or {}
    delta = run.get("vmstat_delta") or {}
    accel = (run.get("accel") or {}).get("used", "n/a")
    kernel = run.get("kernel") or {}
    corrupt = sw.get("corrupt_pages")
    server_cost = (run.get("cost") or {}).get("server") or {}
    server_cpu = None
    if "user_s" in server_cost:
        server_cpu = f"{server_cost['user_s'] + server_cost['system_s']:.2f} s"
        if server_cost.get("wakeups"):
            server_cpu += f", {server_cost['wakeups']:,} wake-ups"
    ev = run.get("evidence") or {}
    lines = [
        f"outcome:                {run.get('outcome')}  ({run.get('outcome_reason')})",
        f"kernel:                 {kernel.get('release') or kernel.get('name')}"
        f"  arm {kernel.get('arm', 'patched')}  accel {accel}",
        f"Sys:                    {_fmt(sw.get('sys_s'), ' s')}",
        f"User+Sys:               {_fmt(sw.get('user_sys_s'), ' s')}",
        f"Elapsed:                {_fmt(sw.get('elapsed_s'), ' s')}",
        f"swap in / out (pages):  {_fmt(delta.get('pswpin'))} / {_fmt(delta.get('pswpout'))}",
        f"pgscan_direct_throttle: {_fmt(delta.get('pgscan_direct_throttle'))}",
        f"corrupt pages:          {_fmt(corrupt)}",
        f"server CPU (user+sys):  {_fmt(server_cpu)}",
        f"results:                {run.get('config', {}).get('out')}",
    ]
    if ev.get("signature"):
        lines.insert(1, f"signature:              {ev['signature']}  ({ev.get('why')})")
        sender = next((t for t in ev.get("blocked_tasks") or [] if t.get("frames")), None)
        if sender is not None:
            frames = " <- ".join(sender["frames"][:8])
            lines.insert(2, f"first stack:            {sender['comm']}: {frames}")
    if run.get("stall_count"):
        lines.insert(1, f"stalls (recovered):     {run['stall_count']}, {run['stall_s_total']} s")
    return lines


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"swapnbd run: error: {exc}", file=sys.stderr)
        return BISECT_ABORT if args.bisect else EXIT_USAGE

    def emit(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    emit(f"swapnbd run: results in {cfg.out}")
    run = experiment.run_experiment(cfg, emit)
    if args.json:
        print(json.dumps(run, indent=2, default=str))
    else:
        print("\n".join(summary_lines(run)))
    return exit_code(run, bisect=args.bisect)


def exit_code(run: dict[str, Any], *, bisect: bool = False) -> int:
    """The exit status of ``swapnbd run`` for a finished run.json (EPILOG); ``bisect``:
    the codes git bisect run reads (EXIT_OK, BISECT_BAD, BISECT_SKIP)."""
    if run.get("interrupted"):
        return EXIT_TERMINATED if run.get("interrupted_by") == "SIGTERM" else EXIT_INTERRUPTED
    outcome = run.get("outcome")
    if outcome == "completed":
        return EXIT_OK
    if bisect:
        return BISECT_BAD if outcome in BISECT_BAD_OUTCOMES else BISECT_SKIP
    return EXIT_NOT_COMPLETED


def cmd_image(args: argparse.Namespace) -> int:
    from vm.image import image as vm_image  # noqa: PLC0415 - only this subcommand needs it

    def emit(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        img = vm_image.build_guest(
            args.kernel,
            args.flavour,
            args.cache,
            emit,
            arm=args.arm,
            allocator=args.allocator,
            tree=args.kernel_tree,
            patch=args.patch,
            config_base=args.kernel_config,
        )
    except Exception as exc:
        print(f"swapnbd image: error: {exc}", file=sys.stderr)
        return EXIT_IMAGE
    print(
        json.dumps({f.name: str(getattr(img, f.name)) for f in dataclasses.fields(img)}, indent=2)
    )
    return EXIT_OK


MATRIX_EPILOG = """\
examples:
  swapnbd matrix vm/campaign/matrices/seed.toml --dry-run          # list the runs and the estimate
  swapnbd matrix vm/campaign/matrices/seed.toml --out results/seed
  swapnbd matrix vm/campaign/matrices/seed.toml --out results/seed --resume   # after a kill/Ctrl-C
  swapnbd matrix vm/campaign/matrices/seed.toml --out results/seed --resume --retry-errors
  swapnbd matrix vm/campaign/matrices/seed.toml --out results/seed --shard 1/2   # half the runs
  swapnbd matrix vm/campaign/matrices/seed.toml --out results/seed --only 6.1-vanilla-slab-nbd-serve

SIGINT and SIGTERM stop the current run cleanly (run.json marked interrupted) and the
matrix; --resume reruns it.  exit codes: 0 every selected run finished (lockups are
results), 1 some run ended in a harness error, 2 usage error, 130 interrupted
"""

REPORT_EPILOG = """\
examples:
  swapnbd report results/seed                              # Markdown on stdout
  swapnbd report results/seed --baseline 6.1-vanilla-slab-nbd-serve --plots results/seed/plots
  swapnbd report results/seed results/run-20261129-101500 --format csv --output seed.csv
  swapnbd report results/seed --reference-2012 --html seed.html  # one page, plots inside

exit codes: 0 ok, 2 usage error (no run.json found, unknown baseline, no matplotlib)
"""


def _add_matrix(sub: Any) -> None:
    p = sub.add_parser(
        "matrix",
        help="run a matrix of experiments from a TOML file",
        description="Expand FILE.toml into runs (interleaved: every cell's repeat 1, then "
        "repeat 2, ...) and run each as `swapnbd run` would, into STORE/<run-id>, keeping "
        "STORE/index.json up to date after every run.",
        epilog=MATRIX_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", type=Path, metavar="FILE.toml", help="the matrix file")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="STORE",
        help="the store (default: results/matrix-FILESTEM-YYYYmmdd-HHMMSS)",
    )
    p.add_argument("--resume", action="store_true", help="skip runs already finished in --out")
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="with --resume, also rerun runs whose outcome is error (a harness failure)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs and the estimate only")
    _add_history_flag(p)
    p.add_argument("--shard", default=None, metavar="K/N", help="only runs with i %% N == K-1")
    p.add_argument(
        "--only", default=None, metavar="ID,...", help="only these run ids or cell labels"
    )
    p.add_argument(
        "--inventory",
        type=Path,
        default=None,
        metavar="INV",
        help="spread the matrix over the runner hosts of this Ansible inventory "
        "(ansible/matrix.yml; each host runs its share with --resume --shard), fetch every "
        "share back into --out and write the merged report; rerun to resume",
    )
    p.set_defaults(func=cmd_matrix)


BOUNDARY_EPILOG = """\
examples:
  swapnbd boundary vm/campaign/matrices/boundary-6.1.toml --dry-run   # settings so far, estimate
  swapnbd boundary vm/campaign/matrices/boundary-6.1.toml --out results/boundary-6.1
  swapnbd boundary vm/campaign/matrices/boundary-6.1.toml --out results/boundary-6.1 --resume
  swapnbd boundary vm/campaign/matrices/boundary-6.1.toml --out results/b61 --curve vanilla  # first
  swapnbd report results/boundary-6.1 --html results/boundary-6.1/report.html

A boundary file is a matrix file whose cells are the arms, plus a [boundary] table
(ratios, min_free_kbytes, level, confidence, max_runs, spare_runs, max_total; see
docs/boundary.md).  Each run goes where P(lockup)'s Wilson interval still straddles the
level, bisecting the ratios; a setting stops once its interval is decisive.
SIGINT and SIGTERM stop the current run cleanly and the boundary; --resume continues
where it stopped.  exit codes: 0 every curve done (or the budget spent), 1 a setting's
runs were used up by harness errors, 2 usage error, 130 interrupted
"""


def _add_boundary(sub: Any) -> None:
    p = sub.add_parser(
        "boundary",
        help="find where lockups begin: P(lockup) per ratio, sampled adaptively",
        description="For each arm of FILE.toml, run the ratios (and min_free_kbytes) of its "
        "[boundary] table where the lockup probability is still undecided, into a matrix "
        "store STORE that swapnbd report turns into the boundary curve.",
        epilog=BOUNDARY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", type=Path, metavar="FILE.toml", help="the boundary file")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="STORE",
        help="the store (default: results/boundary-FILESTEM-YYYYmmdd-HHMMSS)",
    )
    p.add_argument("--resume", action="store_true", help="continue the boundary in --out")
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="with --resume, rerun (once) the harness-error runs of the settings chosen",
    )
    p.add_argument(
        "--curve",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the curves whose name contains TEXT (repeatable), the cheap vanilla "
        "arms first say; a later --resume without it goes on with the rest",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="show the settings so far and the estimate only"
    )
    _add_history_flag(p)
    p.set_defaults(func=cmd_boundary)


def cmd_boundary(args: argparse.Namespace) -> int:
    from vm.campaign import boundary, matrix, plan  # noqa: PLC0415 - only this subcommand

    def emit(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    store: Path = args.out or Path("results") / f"boundary-{args.file.stem}-{stamp}"
    try:
        bnd = boundary.load_boundary(args.file)
        if args.dry_run:
            lines = boundary.dry_run_lines(bnd, args.out, _history(args), args.curve)
            print("\n".join(lines))
            return EXIT_OK
        with matrix.sigterm_as_interrupt():
            result = boundary.run_boundary(
                bnd,
                store,
                source=args.file,
                resume=args.resume,
                retry_errors=args.retry_errors,
                emit=emit,
                history=_history(args),
                only=args.curve,
            )
    except plan.MatrixError as exc:
        print(f"swapnbd boundary: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # a second signal while the index was being written
        print(f"interrupted: continue with --resume --out {store}")
        return EXIT_INTERRUPTED
    counts: dict[str, int] = {}
    for outcome in result.outcomes.values():
        counts[str(outcome)] = counts.get(str(outcome), 0) + 1
    print(
        f"boundary {bnd.matrix.name}: ran {len(result.ran)}; outcomes "
        + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none")
        + f"; store {store}"
    )
    if result.interrupted:
        print(f"interrupted: continue with --resume --out {store}")
        return EXIT_INTERRUPTED
    if result.exhausted:
        print(f"stopped: {result.exhausted}")
        return EXIT_NOT_COMPLETED
    return EXIT_OK


def _add_history_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-history",
        action="store_true",
        help="estimate from the store's runs only, not also from the committed results "
        "(docs/results/*/runs.tar.xz), which estimates otherwise learn from",
    )


def _history(args: argparse.Namespace) -> list[Path]:
    from vm.campaign import archive  # noqa: PLC0415 - only the campaign subcommands need it

    return [] if args.no_history else archive.committed_archives()


def _add_report(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="compare runs: tables and plots from run.json files",
        description="Find every run.json under DIR... (matrix stores or single run "
        "directories), group the runs by arm and print the seed's table.",
        epilog=REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "dirs",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="stores, run directories, or a published runs.tar.xz",
    )
    p.add_argument(
        "--publish",
        type=Path,
        default=None,
        metavar="OUT",
        help="write a published result in OUT: runs.tar.xz (every run's run.json, samples, "
        "events and console), then from it report.md/.csv/.json, plots/ and report.html",
    )
    p.add_argument("--format", choices=["md", "csv", "json"], default="md", help="default md")
    p.add_argument("--output", type=Path, default=None, help="write here instead of stdout")
    p.add_argument(
        "--plots",
        type=Path,
        default=None,
        metavar="DIR",
        help="write PNGs here: overlays.png (every arm on shared axes: progress, swap-in/out, "
        "direct scan and steal, nr_writeback, MemFree against vm.min_free_kbytes; x in "
        "seconds since the stress phase, for runs that kept samples and events), arms.png "
        "(a row of panels per arm) and, for a boundary, boundary.png",
    )
    p.add_argument(
        "--html",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the report as one self-contained HTML page, plots embedded "
        "(drawn into --plots DIR when given; needs the plot extra)",
    )
    p.add_argument(
        "--reference-2012",
        action="store_true",
        help="add the seed's published 2012 figures (V9 on 3.4.0-rc2, vanilla SLAB vs "
        "patched) as reference columns: their scale, not comparable values. The runs do "
        "not record their matrix, so this is asked for; a published report keeps the choice "
        "in report.json",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="ARM",
        help="arm label the ratios are to (default: the first arm)",
    )
    p.set_defaults(func=cmd_report)


def cmd_matrix(args: argparse.Namespace) -> int:
    from vm.campaign import matrix, plan  # noqa: PLC0415 - only this subcommand needs it
    from vm.campaign import store as campaign_store  # noqa: PLC0415 - as above

    def emit(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    store: Path = args.out or Path("results") / f"matrix-{args.file.stem}-{stamp}"
    if args.inventory is not None and not args.dry_run:
        if args.shard or args.only:
            print(
                "swapnbd matrix: error: --inventory shards by host itself; drop --shard and --only",
                file=sys.stderr,
            )
            return EXIT_USAGE
        from vm.campaign import lab  # noqa: PLC0415 - only the lab front door needs Ansible

        try:
            return lab.run_matrix_on_inventory(args.file, args.inventory, store, emit)
        except lab.LabError as exc:
            print(f"swapnbd matrix: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        mx = plan.load_matrix(args.file)
        shard = plan.parse_shard(args.shard) if args.shard else None
        only = [x for x in (args.only or "").split(",") if x.strip()]
        only = [x.strip() for x in only]
        runs = campaign_store.keep_store_ids(plan.plan_runs(mx), args.out)
        selected = plan.select_runs(runs, shard=shard, only=only)
        if args.dry_run:
            lines = matrix.dry_run_lines(mx, args.out, runs, selected, _history(args))
            print("\n".join(lines))
            return EXIT_OK
        with matrix.sigterm_as_interrupt():
            result = matrix.run_matrix(
                mx,
                store,
                source=args.file,
                resume=args.resume,
                retry_errors=args.retry_errors,
                shard=shard,
                only=only,
                emit=emit,
                history=_history(args),
            )
    except plan.MatrixError as exc:
        print(f"swapnbd matrix: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # a second signal while the index was being written
        print(f"interrupted: continue with --resume --out {store}")
        return EXIT_INTERRUPTED
    counts: dict[str, int] = {}
    for outcome in result.outcomes.values():
        counts[str(outcome)] = counts.get(str(outcome), 0) + 1
    print(
        f"matrix {mx.name}: ran {len(result.ran)}, skipped {len(result.skipped)} (finished "
        f"before); outcomes "
        + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none")
        + f"; store {store}"
    )
    if result.interrupted:
        print(f"interrupted: continue with --resume --out {store}")
        return EXIT_INTERRUPTED
    errors = [rid for rid, outcome in result.outcomes.items() if outcome == "error"]
    return EXIT_NOT_COMPLETED if errors else EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from vm.campaign import archive, plots, publish, report  # noqa: PLC0415 - only this subcommand

    # A boundary store (swapnbd boundary leaves boundary.json in it) always gets the curve,
    # even before any arm has run at a second ratio.
    curve = True if any((d / "boundary.json").is_file() for d in args.dirs) else None
    try:
        runs = archive.load_runs(args.dirs)
        if args.publish is not None:
            written = publish.publish(
                runs,
                args.publish,
                baseline=args.baseline,
                reference_2012=args.reference_2012,
                boundary=curve,
            )
            print(f"published {len(runs)} run(s): {len(written)} files in {args.publish}")
            return EXIT_OK
        rep = report.build_report(
            runs, baseline=args.baseline, reference_2012=args.reference_2012, boundary=curve
        )
        text = report.render(rep, args.format)
        if args.plots is not None:
            written = plots.write_plots(runs, args.plots, boundary=curve)
            print(f"plots: {len(written)} PNG(s) in {args.plots}", file=sys.stderr)
        if args.html is not None:
            from vm.campaign import report_html  # noqa: PLC0415 - only --html needs it

            with tempfile.TemporaryDirectory(prefix="swapnbd-plots-") as tmp:
                plot_dir = args.plots if args.plots is not None else Path(tmp)
                if args.plots is None:
                    plots.write_plots(runs, plot_dir, boundary=curve)
                page = report_html.render_html(rep, publish.plot_images(plot_dir))
            args.html.parent.mkdir(parents=True, exist_ok=True)
            args.html.write_text(page)
            print(f"html: {args.html}", file=sys.stderr)
    except report.ReportError as exc:
        print(f"swapnbd report: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        code = int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
        bisecting = "--bisect" in (sys.argv[1:] if argv is None else argv)
        return BISECT_ABORT if code == EXIT_USAGE and bisecting else code
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "mirror", None):
        # The image builder reads the override from the environment (vm.image.rootfs.MIRROR_ENV),
        # so runs a matrix starts in-process see it too.
        os.environ[rootfs.MIRROR_ENV] = args.mirror
    func = args.func
    rc: int = func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
