#!/usr/bin/python3
"""One swapstress run on a lab machine, written in the layout of ``swapnbd run``.

Why: ``swapnbd report`` reads results directories (``run.json`` + ``vmstat.jsonl`` +
``events.jsonl`` ...). A bare-metal client has no QEMU and no host-side watchdog, so this
program plays both parts on the machine itself: it starts the vmstat collector
(``stress.vmstat``, mlocked), runs ``stress.swapstress`` with its heartbeats in
``events.jsonl``, stops the collector, copies the kernel log lines of the run into
``console.log`` and writes ``run.json``: the same :class:`stress.runrecord.RunRecord` a
VM run writes, so it has the same keys, plus ``lab`` (where it ran).

The verdict is the VM runs' verdict of a finished swapstress,
:func:`stress.runrecord.swapstress_verdict`: completed, corruption, oom or error (a lab
machine that locks up cannot report; the Ansible run times out instead).

Standard library plus the deployed guest tools (``stress/``, deployed beside this file)
only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The guest tools are deployed beside this file (roles/swapstress/tasks/main.yml).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stress.runrecord import RunRecord, swapstress_verdict

SETTINGS = {
    "vm.min_free_kbytes": "/proc/sys/vm/min_free_kbytes",
    "vm.swappiness": "/proc/sys/vm/swappiness",
    "vm.overcommit_memory": "/proc/sys/vm/overcommit_memory",
    "vm.page-cluster": "/proc/sys/vm/page-cluster",
    "transparent_hugepage.enabled": "/sys/kernel/mm/transparent_hugepage/enabled",
    "zswap.enabled": "/sys/module/zswap/parameters/enabled",
}


def read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def vmstat_counter(name: str) -> int | None:
    for line in (read("/proc/vmstat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return None


def kernel_log() -> list[str]:
    done = subprocess.run(["dmesg"], capture_output=True, text=True, check=False)
    return done.stdout.splitlines() if done.returncode == 0 else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, type=Path, help="results directory (created)")
    parser.add_argument("--tools", required=True, type=Path, help="directory holding stress/")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--total", default="192M", help="swapstress --total")
    parser.add_argument("--loops", type=int, default=1)
    parser.add_argument("--interval", type=float, default=1.0, help="collector interval (s)")
    parser.add_argument("--label", default="", help="recorded in run.json as lab.label")
    args = parser.parse_args(argv)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        PYTHONPATH=str(args.tools),
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    t_start = time.monotonic()
    started_at = time.time()
    log_before = len(kernel_log())
    oom_before = vmstat_counter("oom_kill")
    collector = subprocess.Popen(
        [sys.executable, "-m", "stress.vmstat", "--out", str(out / "vmstat.jsonl"),
         "--interval", str(args.interval), "--mlock",
         "--summary", str(out / "vmstat-summary.json")],
        env=env, cwd=str(args.tools), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    # Keep the OOM killer off the collector where the machine allows it (a container
    # without CAP_SYS_RESOURCE does not); run.json says which it was.
    try:
        Path(f"/proc/{collector.pid}/oom_score_adj").write_text("-1000\n")
        collector_oom = "protected (oom_score_adj -1000)"
    except OSError as exc:
        collector_oom = f"not protected: oom_score_adj: {exc.strerror}"
    time.sleep(2.0)  # a first sample before the pressure starts: a clean baseline
    stress_args = ["--workers", str(args.workers), "--total", args.total,
                   "--loops", str(args.loops), "--mlock", "--force"]  # fmt: skip
    t0 = time.monotonic()
    stress = subprocess.run(
        [sys.executable, "-m", "stress.swapstress", *stress_args,
         "--heartbeat", str(out / "events.jsonl"), "--json", str(out / "swapstress.json")],
        env=env, cwd=str(args.tools), stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    stress_s = time.monotonic() - t0
    collector.send_signal(signal.SIGTERM)
    try:
        collector_rc: int | None = collector.wait(timeout=30)
    except subprocess.TimeoutExpired:
        collector.kill()
        collector.wait()
        collector_rc = None
    oom_after = vmstat_counter("oom_kill")
    oom_delta = oom_after - oom_before if oom_after is not None and oom_before is not None else None
    (out / "console.log").write_text("\n".join(kernel_log()[log_before:]) + "\n")
    result: dict[str, Any] | None = None
    if (out / "swapstress.json").exists():
        try:
            result = json.loads((out / "swapstress.json").read_text())
        except ValueError:
            result = None
    summary: dict[str, Any] = {}
    if (out / "vmstat-summary.json").exists():
        summary = json.loads((out / "vmstat-summary.json").read_text())
    outcome, reason = swapstress_verdict(result, stress.returncode, oom_killed=(oom_delta or 0) > 0)
    mem_total = next(
        (int(line.split()[1]) * 1024 for line in (read("/proc/meminfo") or "").splitlines()
         if line.startswith("MemTotal:")),
        None,
    )  # fmt: skip
    run = RunRecord(
        config={
            "workers": args.workers,
            "total": args.total,
            "loops": args.loops,
            "vmstat_interval_s": args.interval,
            "swapstress_args": stress_args,
            "where": "lab",
        },
        kernel={
            "release": platform.release(),
            "guest_release": platform.release(),
            "version": platform.version(),
            "cmdline": read("/proc/cmdline"),
        },
        accel={"used": "bare-metal"},
        lab={
            "label": args.label,
            "hostname": socket.gethostname(),
            "swaps": (read("/proc/swaps") or "").splitlines()[1:],
            "started_at": started_at,
            "collector_oom": collector_oom,
        },
        guest={
            "settings": {key: read(path) for key, path in SETTINGS.items()},
            "mem_total_bytes": mem_total,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        outcome=outcome,
        outcome_reason=reason,
        swapstress=result,
        swapstress_exit_code=stress.returncode,
        oom_kill_delta=oom_delta,
        collector_exit=collector_rc,
        vmstat_delta=summary.get("vmstat_delta", {}),
        vmstat_rates=summary.get("rates", {}),
        vmstat_absent=summary.get("absent", []),
        timings={
            "stress_s": round(stress_s, 2),
            "total_s": round(time.monotonic() - t_start, 2),
        },
    )
    run.write(out)
    print(json.dumps({"outcome": outcome, "reason": reason,
                      "pswpout": run.vmstat_delta.get("pswpout")}))  # fmt: skip
    return 0 if outcome == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
