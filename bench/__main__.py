"""Run nbd-serve beside nbdkit, qemu-nbd and nbd-server on one /dev/shm file, interleaved.

Exit codes: 0 ok, 1 a tool, server or fio failed, 2 usage error, 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from bench.runner import Plan, Terminated, describe, parse_servers, pinning, render, run
from bench.servers import BenchError, ServerError, ServerKind
from bench.workloads import MIB, RSS_WORKLOAD, WORKLOADS, select_workloads

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (rounds, runtime s, ramp s, file MiB, rss scenario runtime s)
PRESETS: dict[str, tuple[int, float, float, int, float]] = {
    "full": (3, 4.0, 1.0, 1024, 4.0),
    "quick": (1, 1.0, 0.3, 256, 1.0),
    "smoke": (1, 1.0, 0.0, 64, 1.0),
}
SMOKE_WORKLOADS = "rand-read-4k-qd32,unix-rand-write-4k-qd32"

EPILOG = f"""\
workloads (for --workloads):
{describe(WORKLOADS)}
peak-RSS scenario (after the table; --no-rss skips it):
{RSS_WORKLOAD.name:<28} {RSS_WORKLOAD.description}

servers (for --servers): {", ".join(k.value for k in ServerKind)}

examples:
  python -m bench                       full run (~13 min), writes bench/results/full.{{md,json}}
  python -m bench --quick               under 2 minutes, bench/results/quick.{{md,json}}
  python -m bench --servers nbdkit,nbd-serve --workloads rand-read-4k-qd32 --rounds 5
  bench/run --smoke --out /tmp/b        a few seconds; what the tests run
  git worktree add /tmp/nbdserve-old HEAD~1
  bench/run --servers nbd-serve --old-nbd-serve /tmp/nbdserve-old --baseline nbd-serve-old
                                        this tree's nbd-serve against an older one's
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 round of short runs (< 2 min)")
    mode.add_argument(
        "--smoke",
        action="store_true",
        help=f"a tiny run for tests: 1 round of 1 s, workloads {SMOKE_WORKLOADS}, no RSS scenario",
    )
    p.add_argument("--servers", help="comma-separated servers to run (default: all four)")
    p.add_argument(
        "--old-nbd-serve",
        type=Path,
        metavar="DIR",
        help="also run server nbd-serve-old: nbd-serve from the swapnbd checkout DIR",
    )
    p.add_argument("--workloads", help="comma-separated workload names (default: all)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (full: 3)")
    p.add_argument("--runtime", type=float, metavar="S", help="seconds per fio run (full: 4)")
    p.add_argument("--ramp", type=float, metavar="S", help="fio ramp-up seconds, not measured")
    p.add_argument("--file-mib", type=int, metavar="MIB", help="size of the shared file")
    p.add_argument(
        "--rss", dest="rss", action="store_true", default=None, help="run the peak-RSS scenario"
    )
    p.add_argument("--no-rss", dest="rss", action="store_false", help="skip the peak-RSS scenario")
    p.add_argument(
        "--baseline",
        help="server the ratios are relative to (default: nbd-serve, else the first server)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="run fio on the first CPU and every server on the others, so the scheduler"
        " cannot put them on one core in some runs and not others (needs 2 CPUs)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for NAME.md/.json")
    p.add_argument("--name", help="result file stem (default: full, quick or smoke)")
    p.add_argument("--list", action="store_true", help="list workloads and servers, then exit")
    p.add_argument(
        "--render",
        type=Path,
        metavar="FILE.json",
        help="run nothing: summarise and render a results JSON again from its cells, into "
        "--out as --name (default: the file's own stem)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Resolve presets and overrides; raises ValueError on bad values."""
    preset = "quick" if args.quick else "smoke" if args.smoke else "full"
    rounds, runtime, ramp, file_mib, rss_runtime = PRESETS[preset]
    rounds = args.rounds if args.rounds is not None else rounds
    runtime = args.runtime if args.runtime is not None else runtime
    ramp = args.ramp if args.ramp is not None else ramp
    file_mib = args.file_mib if args.file_mib is not None else file_mib
    rss = args.rss if args.rss is not None else preset != "smoke"
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    if runtime <= 0:
        raise ValueError(f"--runtime must be > 0 seconds, got {runtime}")
    if ramp < 0:
        raise ValueError(f"--ramp must be >= 0 seconds, got {ramp}")
    if file_mib < 16:
        raise ValueError(f"--file-mib must be >= 16, got {file_mib}")
    servers = parse_servers(args.servers)
    if args.old_nbd_serve is not None and ServerKind.NBD_SERVE_OLD not in servers:
        servers = tuple(k for k in ServerKind if k in servers or k is ServerKind.NBD_SERVE_OLD)
    if ServerKind.NBD_SERVE_OLD in servers and args.old_nbd_serve is None:
        raise ValueError(
            "server nbd-serve-old needs --old-nbd-serve DIR, a swapnbd checkout "
            "(e.g. git worktree add /tmp/nbdserve-old REV)"
        )
    wl_spec = args.workloads if args.workloads is not None else (
        SMOKE_WORKLOADS if preset == "smoke" else None
    )  # fmt: skip
    workloads = select_workloads(wl_spec)
    if args.baseline is not None:
        matches = [k for k in servers if k.value == args.baseline]
        if not matches:
            raise ValueError(
                f"--baseline {args.baseline!r} is not among the servers run: "
                f"{', '.join(k.value for k in servers)}"
            )
        baseline = matches[0]
    else:
        baseline = ServerKind.NBD_SERVE if ServerKind.NBD_SERVE in servers else servers[0]
    name = args.name or preset
    try:
        pin = pinning(os.sched_getaffinity(0)) if args.pin else None
    except BenchError as exc:
        raise ValueError(str(exc)) from None
    return Plan(
        servers=servers,
        workloads=workloads,
        rounds=rounds,
        runtime_s=runtime,
        ramp_s=ramp,
        file_size=file_mib * MIB,
        rss_scenario=rss,
        rss_runtime_s=min(rss_runtime, runtime) if preset == "smoke" else rss_runtime,
        baseline=baseline,
        out_dir=args.out,
        name=name,
        title=f"swapnbd bench: {name} run",
        old_checkout=args.old_nbd_serve,
        pin=pin,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.list:
        print(EPILOG)
        return 0
    if args.render is not None:
        try:
            outcome = render(args.render, args.out, args.name or args.render.stem)
        except BenchError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 1
        print(outcome.markdown)
        print(f"wrote {outcome.md_path} and {outcome.json_path}", file=sys.stderr)
        return 0
    try:
        plan = plan_from_args(args)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        outcome = run(plan)
    except (BenchError, ServerError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130
    except Terminated:
        print("bench: terminated; servers stopped", file=sys.stderr)
        return 143
    print(outcome.markdown)
    print(f"wrote {outcome.md_path} and {outcome.json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
