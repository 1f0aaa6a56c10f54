"""swapstress: drive a machine into swap and prove every page comes back intact.

Usage (in the guest: ``PYTHONPATH=/opt/swapnbd python3 -m stress.swapstress ...``)::

    swapstress --dry-run --json -                       # print the plan, touch nothing
    swapstress --workers 4 --total 64M --loops 2 --json out.json --force
    swapstress --ratio 4 --duration 3600 --json /dev/virtio-ports/swapnbd.events \\
               --heartbeat /dev/virtio-ports/swapnbd.events

Theory of operation
-------------------
This reproduces the 2012 swap-over-NBD workload (mmtests ``vmscan-anon-mmap-write``, i.e.
``usemem``): ``8 * cpu_count`` processes share 4x MemTotal of anonymous memory.  The parent
forks the workers with ``os.fork``; each worker maps ``per_worker_bytes`` of anonymous
private memory (``MAP_PRIVATE|MAP_ANONYMOUS``, allocated after the fork so that the parent
stays small) and then:

1. **pass 0** writes generation 0 of the pattern (:mod:`stress.pattern`) into every 4 KiB
   page: a header and trailer naming (worker, page, generation) around a non-zero fill;
2. **pass k >= 1** walks the mapping linearly, 1 MiB at a time.  It compares each chunk
   with the expected bytes (one ``memcmp``).  In the default ``rewrite`` mode it then writes
   generation k into that chunk, as usemem's write+verify loop does: every page is dirtied
   again, so reclaim must write it to swap again rather than drop a clean swap-cache copy.
   ``--mode verify`` only reads after pass 0.

Verification is C speed (memcpy/memcmp on 1 MiB slices; Python runs once per chunk), so the
time spent is the kernel's: faults, reclaim and swap I/O.

Workers send JSON lines to the parent over a pipe each: progress (pass, pages written and
verified, bad pages so far) every 0.25 s, a description of each of their first
:data:`stress.worker.MAX_EXAMPLES_PER_WORKER` bad pages, and a final "done".  Progress lines
are dropped, not waited for, when the pipe is full (the next one supersedes them), so a
parent blocked on a slow heartbeat port never stalls the workload; bad-page and "done" lines
are never dropped.  A worker whose parent died gets EPIPE on its next progress line and exits.  The
parent multiplexes the pipes with ``selectors``, writes heartbeats, reaps the workers and
takes user/system time from ``RUSAGE_CHILDREN`` once all are reaped.

Memory: the parent stays small and forks before any worker maps memory; ``gc.freeze()``
before the forks keeps Python's collector from copying inherited pages.  Each worker adds
about 3 MiB of its own (two pattern templates and one compare buffer) to
``per_worker_bytes``.  ``--mlock`` locks the parent (heartbeats keep flowing while the guest
thrashes; locks are not inherited, so workers stay swappable).  ``--nohugepage`` makes the
workers ``madvise(MADV_NOHUGEPAGE)``, so they use 4 KiB pages whatever the THP setting.

SIGINT and SIGTERM reach the parent (workers ignore SIGINT so a terminal ^C is handled in one
place); the parent forwards SIGTERM, workers stop at the next chunk boundary and exit 130,
and the result JSON is still written.  Workers still alive after ``--stop-grace`` seconds
(or at a second signal) are SIGKILLed.  A worker that dies on its own (a signal, a crash)
stops the run: the others are asked to stop, and the outcome is ``worker-died``.  A SIGKILL
while /proc/vmstat ``oom_kill`` rose is reported as ``oom-kill`` (an inference: the kernel
does not say whom it killed, but nothing else SIGKILLs workers in the guest).

The parts: :mod:`stress.plan` sizes the run, :mod:`stress.worker` is one worker process,
:mod:`stress.runner` the parent that forks and watches them, :mod:`stress.exitcodes` the
outcomes below; this module is the command line, the result file and the exit code.

Outcomes and exit codes (precedence top to bottom):

==============  ====  =====================================================
``corruption``   1    at least one page read back differently than written
``worker-died``  3    a worker was killed (signal, OOM kill) or crashed
``interrupted``  130  SIGINT/SIGTERM stopped the run
``completed``    0    every page verified on every pass
==============  ====  =====================================================

Usage errors (bad flags, a plan that does not fit without ``--force``) exit 2.

Heartbeat line keys (``--heartbeat PATH``, every ``--heartbeat-interval`` seconds, and once at
start and at the end):

- ``type``: always ``"heartbeat"``.
- ``t_mono``: ``time.monotonic()`` of the guest when the line was made (seconds).
- ``t_wall``: ``time.time()`` at the same moment (seconds since the epoch).
- ``pass``: the lowest pass any running worker is in: 0 = initial write, k = verify loop k.
- ``pages_done``: pages written or verified since start, summed over workers; only ever
  grows, so "not growing" means "stuck".
- ``pages_total``: pages in all workers' mappings together (the size of one pass).
- ``rate_pages_s``: growth of ``pages_done`` per second since the previous heartbeat.
- ``elapsed_s``: seconds since the workers were started.
- ``workers_alive``: workers not yet reaped.
- ``corrupt_pages``: bad pages found so far (as of the workers' last progress reports).

Result object keys (``--json PATH``; ``-`` is stdout):

- ``type``: always ``"result"`` (the result may share a stream with heartbeats).
- ``outcome``: ``completed``, ``corruption``, ``worker-died`` or ``interrupted``.
- ``exit_code``: the process exit code matching the outcome.
- ``elapsed_s``: wall time from the first fork to the last reap (monotonic clock).
- ``user_s``: user CPU seconds of all workers (``RUSAGE_CHILDREN``).
- ``sys_s``: system CPU seconds of all workers (``RUSAGE_CHILDREN``).
- ``user_sys_s``: ``user_s + sys_s``, the 2012 cover letters' "User+Sys".
- ``pages_verified``: pages compared against their expected content, all passes, all workers
  (a worker killed before its final report counts up to its last progress report).
- ``pages_written``: pages written (pass 0 plus rewrites), counted the same way.
- ``corrupt_pages``: pages that compared unequal (each bad page counted once per pass).
- ``corrupt_examples``: the first few bad pages, each ``{"worker", "page", "generation",
  "pass", "offset", "bad_bytes", "expected", "found"}``; ``expected``/``found`` are the hex
  of the first differing 32-byte block (``offset`` is its first bad byte in the page).
- ``workers``: per worker ``{"worker", "pid", "status", "exit_code", "signal",
  "pages_verified", "pages_written", "corrupt_pages", "passes_completed"}``; ``status`` is
  ``ok``, ``corruption``, ``interrupted``, ``killed`` (by a signal, named in ``signal``),
  ``oom-kill``, ``killed-after-grace`` or ``error`` (exit code 4: the worker raised).
- ``plan``: the plan (as printed by ``--dry-run``).
- ``oom_kill_delta``: rise of /proc/vmstat ``oom_kill`` over the run (``null`` if unknown).
- ``stop_reason``: why the run stopped early (``"SIGTERM"``, ``"worker 3 died (SIGKILL)"``)
  or ``null``.
- ``heartbeat_errors``: heartbeat lines that could not be written (each also on stderr).
- ``t_wall_start``/``t_wall_end``: wall-clock start and end (seconds since the epoch).

Plan keys (``--dry-run``, which adds ``"type": "plan"``): ``workers``, ``total_bytes`` (what
the workers will touch: ``per_worker_bytes * workers``), ``requested_total_bytes`` (before
rounding to pages), ``mem_total_bytes``, ``per_worker_bytes``, ``pages_per_worker``,
``page_size``, ``loops`` (``null`` with ``--duration``), ``duration_s``, ``mode``,
``nohugepage``, ``mem_available_bytes``, ``swap_free_bytes``, ``fits`` (``total_bytes <=
MemAvailable + SwapFree``).  Each is documented on :class:`stress.plan.Plan`.

Test-only hook: the environment variable ``SWAPSTRESS_TEST_CORRUPT="WORKER:PAGE"`` (or
``WORKER:FIRST-LAST``) makes that worker flip two bytes of each of those pages right after
pass 0, to prove detection end to end.  It is for the test suite only; never set it in an
experiment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import stat
import sys
import tempfile
from typing import Any

from stress import procfs
from stress.exitcodes import EXIT_OK, EXIT_USAGE
from stress.lineout import LineOutError, LineWriter
from stress.memlock import mlockall
from stress.plan import DEFAULT_LOOPS, Plan, UsageError, make_plan
from stress.runner import Runner
from stress.sizes import SizeError, format_size, parse_size

__all__ = ["TEST_CORRUPT_ENV", "build_parser", "main"]

TEST_CORRUPT_ENV = "SWAPSTRESS_TEST_CORRUPT"


# --------------------------------------------------------------------------- CLI


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``swapstress`` argument parser (``--help`` lists every flag with examples)."""
    parser = argparse.ArgumentParser(
        prog="swapstress",
        description=(
            "Fill anonymous memory with a verifiable per-page pattern across many processes\n"
            "(default 8 x CPUs sharing 4 x MemTotal), then re-read and verify every page on\n"
            "every pass.\n\n"
            "exit codes: 0 ok, 1 corruption, 2 usage (or plan refused), 3 worker died,\n"
            "130 interrupted (SIGINT/SIGTERM; the result JSON is still written).\n\n"
            "PATH arguments may be regular files, FIFOs (opening one waits for a reader) or\n"
            "character devices such as /dev/virtio-ports/NAME.  When --json and --heartbeat\n"
            "name the same path, the result goes down the heartbeat stream as its last line\n"
            "(a virtio port can only be open once at a time)."
        ),
        epilog=(
            "examples:\n"
            "  swapstress --dry-run --json -\n"
            "  swapstress --workers 4 --total 64M --loops 2 --json out.json --force\n"
            "  swapstress --ratio 4 --duration 3600 --json /dev/virtio-ports/swapnbd.events \\\n"
            "             --heartbeat /dev/virtio-ports/swapnbd.events\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", type=int, help="worker processes (default 8 x CPUs)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--total", type=_size_arg, help="total memory, e.g. 64M, 8G (K/M/G/T)")
    size.add_argument(
        "--ratio", type=_positive_float, help="total as a multiple of MemTotal (default 4)"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--loops", type=int, help=f"verify passes after the write (default {DEFAULT_LOOPS})"
    )
    length.add_argument(
        "--duration", type=_positive_float, help="run passes for this many seconds instead"
    )
    parser.add_argument(
        "--mode",
        choices=("rewrite", "verify"),
        default="rewrite",
        help="rewrite: verify then write the next generation (usemem); verify: read only",
    )
    parser.add_argument("--json", metavar="PATH", help="write the result here ('-' = stdout)")
    parser.add_argument(
        "--heartbeat",
        metavar="PATH",
        help="heartbeat lines: file, FIFO or char device; '-' = stderr",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_positive_float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between heartbeats (default 1)",
    )
    parser.add_argument(
        "--stop-grace",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="after SIGINT/SIGTERM, SIGKILL workers still running after this long (default 30)",
    )
    parser.add_argument(
        "--nohugepage",
        action="store_true",
        help="madvise(MADV_NOHUGEPAGE) each worker's mapping: 4 KiB pages even with THP=always",
    )
    parser.add_argument(
        "--mlock",
        action="store_true",
        help="mlockall() the parent so heartbeats keep flowing under thrashing "
        "(workers stay swappable: locks are not inherited across fork)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, touch nothing")
    parser.add_argument(
        "--force", action="store_true", help="run even if the plan exceeds MemAvailable + SwapFree"
    )
    parser.add_argument(
        "--proc-root", default=procfs.PROC, help=argparse.SUPPRESS
    )  # tests: read meminfo/vmstat from a fixture tree
    return parser


def _test_corrupt_from_env(plan: Plan) -> tuple[int, range] | None:
    """Parse the test-only hook: ``WORKER:PAGE`` or ``WORKER:FIRST-LAST`` (inclusive)."""
    raw = os.environ.get(TEST_CORRUPT_ENV)
    if not raw:
        return None
    worker_text, sep, pages_text = raw.partition(":")
    first_text, dash, last_text = pages_text.partition("-")
    try:
        if not sep:
            raise ValueError
        worker, first = int(worker_text), int(first_text)
        last = int(last_text) if dash else first
    except ValueError:
        raise UsageError(
            f"{TEST_CORRUPT_ENV}={raw!r}: expected WORKER:PAGE or WORKER:FIRST-LAST, e.g. 1:5"
        ) from None
    if not (0 <= worker < plan.workers and 0 <= first <= last < plan.pages_per_worker):
        raise UsageError(
            f"{TEST_CORRUPT_ENV}={raw!r}: worker must be < {plan.workers} and pages "
            f"< {plan.pages_per_worker}, first <= last"
        )
    return worker, range(first, last + 1)


def _emit_json(path: str, obj: dict[str, Any]) -> None:
    """Write ``obj`` to stdout, a regular file (atomically) or a FIFO/character device."""
    if path == "-":
        sys.stdout.write(json.dumps(obj, indent=None) + "\n")
        sys.stdout.flush()
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        with LineWriter(path) as writer:
            writer.write_json(obj)
        return
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".swapstress-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(obj, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    """Entry point (``swapstress``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        text = procfs.read_text("meminfo", args.proc_root)
        if text is None:
            raise UsageError(f"{args.proc_root}/meminfo does not exist; cannot plan the run")
        plan = make_plan(
            meminfo=procfs.parse_meminfo(text),
            workers=args.workers,
            total_bytes=args.total,
            ratio=args.ratio,
            loops=args.loops,
            duration_s=args.duration,
            mode=args.mode,
            nohugepage=args.nohugepage,
        )
        corrupt = _test_corrupt_from_env(plan)
    except (UsageError, procfs.ProcFormatError) as exc:
        print(f"swapstress: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.dry_run:
        _emit_json(args.json or "-", {"type": "plan", **plan.as_dict()})
        return EXIT_OK

    if not plan.fits and not args.force:
        budget = plan.mem_available_bytes + plan.swap_free_bytes
        print(
            f"swapstress: refusing to run: the plan touches {format_size(plan.total_bytes)} "
            f"({plan.total_bytes} bytes) but MemAvailable + SwapFree is only {budget} bytes "
            f"({plan.mem_available_bytes} + {plan.swap_free_bytes}); the OOM killer would "
            "end the run.  Pass --force to run anyway, or lower --total/--ratio, or add swap.",
            file=sys.stderr,
        )
        return EXIT_USAGE

    if args.mlock:
        problem = mlockall()
        if problem is not None:
            print(f"swapstress: warning: {problem}; parent not locked", file=sys.stderr)
    if args.json not in (None, "-"):
        directory = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(directory):
            print(
                f"swapstress: error: --json {args.json!r}: directory {directory!r} does not exist",
                file=sys.stderr,
            )
            return EXIT_USAGE
    heartbeat: LineWriter | None = None
    shared = args.json is not None and args.json == args.heartbeat and args.json != "-"
    if args.heartbeat is not None:
        try:
            heartbeat = LineWriter(args.heartbeat, std="stderr")
        except LineOutError as exc:
            print(f"swapstress: error: --heartbeat: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        runner = Runner(
            plan,
            heartbeat=heartbeat,
            heartbeat_interval=args.heartbeat_interval,
            stop_grace=args.stop_grace,
            corrupt=corrupt,
            proc_root=args.proc_root,
        )
        result = runner.run()
        try:
            if shared and heartbeat is not None:
                heartbeat.write_json(result)
            elif args.json is not None:
                _emit_json(args.json, result)
        except OSError as exc:  # LineOutError included: never lose the result silently
            print(f"swapstress: error: cannot write the result: {exc}", file=sys.stderr)
            print(json.dumps(result), file=sys.stderr)
    finally:
        if heartbeat is not None:
            heartbeat.close()
    print(
        f"swapstress: {result['outcome']}: {result['pages_verified']} pages verified, "
        f"{result['corrupt_pages']} corrupt, elapsed {result['elapsed_s']:.2f} s, "
        f"user {result['user_s']:.2f} s, sys {result['sys_s']:.2f} s",
        file=sys.stderr,
    )
    return int(result["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
