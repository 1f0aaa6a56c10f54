"""Swap-safe memory figure: nbd-serve's locked RSS against nbdkit's peak RSS, same load.

Usage: ``nice -n 19 python -m bench.locked_rss [--runtime 10] [--size 64M]``

Both servers export a RAM disk of ``--size`` on loopback and take 4 connections x QD128
x 1 MiB sequential writes from fio's nbd engine (``--numjobs=4``: one connection per job)
for ``--runtime`` seconds. Every 20 ms the script reads, for every process of the server,
VmLck and VmRSS from /proc/PID/status; it prints the peaks of the sums (and nbdkit's
VmHWM). nbd-serve runs with ``--swap-safe`` (mlockall in every process), so its VmLck is
what it pins in RAM. nbdkit's memory plugin keeps the written data in its heap, while
nbd-serve's memory export is a memfd that is never mapped, so the report also gives
nbdkit's peak minus the export size (its memory for everything but the data).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from nbdserver.sizes import parse_size

NBD_SERVE = str(Path(sys.executable).parent / "nbd-serve")


def status_kib(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Peaks:
    """Samples the summed VmLck/VmRSS of a process tree until stopped."""

    def __init__(self, root: int) -> None:
        self.root = psutil.Process(root)
        self.lck = self.rss = self.hwm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pids = [self.root.pid, *(c.pid for c in self.root.children(recursive=True))]
            except psutil.NoSuchProcess:
                return
            self.lck = max(self.lck, sum(status_kib(p, "VmLck") for p in pids))
            self.rss = max(self.rss, sum(status_kib(p, "VmRSS") for p in pids))
            self.hwm = max(self.hwm, sum(status_kib(p, "VmHWM") for p in pids))
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise SystemExit("server did not listen")
        time.sleep(0.05)


def fio(uri: str, runtime: int, size: int) -> dict[str, float]:
    argv = [
        "fio",
        "--name=w",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=write",
        "--bs=1M",
        "--iodepth=128",
        "--numjobs=4",
        f"--size={size}",
        "--time_based",
        f"--runtime={runtime}",
        "--group_reporting",
        "--output-format=json",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    job = json.loads(done.stdout[done.stdout.index("{") :])["jobs"][0]["write"]
    return {"MiB_s": job["bw"] / 1024, "iops": job["iops"]}


def measure(argv: list[str], port: int, uri: str, runtime: int, size: int) -> dict[str, object]:
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_listening(port, proc)
            peaks = Peaks(proc.pid)
            result = fio(uri, runtime, size)
            peaks.stop()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        log.seek(0)
        text = log.read().decode(errors="replace")
    if "Traceback" in text:
        raise SystemExit(text)
    return {"peak_VmLck_MiB": peaks.lck / 1024, "peak_VmRSS_MiB": peaks.rss / 1024,
            "VmHWM_MiB": peaks.hwm / 1024, **result}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--size", default="64M")
    parser.add_argument("--workers", default=None)
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install {tool}")
    port = free_port()
    serve = [NBD_SERVE, "--memory", args.size, "--swap-safe", "--port", str(port)]
    if args.workers:
        serve += ["--workers", args.workers]
    ours = measure(serve, port, f"nbd://127.0.0.1:{port}/", args.runtime, size)
    port = free_port()
    kit = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", str(size)]
    theirs = measure(kit, port, f"nbd://127.0.0.1:{port}/", args.runtime, size)
    theirs["peak_VmRSS_minus_data_MiB"] = float(theirs["peak_VmRSS_MiB"]) - size / (1 << 20)  # type: ignore[arg-type]
    print(json.dumps({"nbd-serve --swap-safe": ours, "nbdkit memory": theirs}, indent=2))
    locked, peak = float(ours["peak_VmLck_MiB"]), float(theirs["peak_VmRSS_MiB"])  # type: ignore[arg-type]
    print(
        f"nbd-serve locked RSS {locked:.1f} MiB vs nbdkit peak RSS {peak:.1f} MiB"
        f" ({'within' if locked <= peak else f'over by {locked - peak:.1f} MiB'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
