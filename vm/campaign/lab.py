"""The matrix on lab machines: drive ``ansible/matrix.yml`` and merge the hosts' shares.

Theory of operation
-------------------
``swapnbd matrix FILE.toml --inventory INV`` spreads a matrix over the inventory's
``runners`` group: host K of N runs ``swapnbd matrix FILE --resume --shard K/N`` into its
own store. :func:`run_matrix_on_inventory` drives ``matrix.yml`` in three steps so the user
sees progress while the hosts work:

1. ``matrix_action=start``: every host starts its share in the background (a host whose
   share still runs is left alone; one that stopped resumes where it was);
2. ``matrix_action=status``, every ``poll_s`` seconds: each host reports whether its share
   runs and the status of every run in its index; this module prints one line per host
   (finished/total of its shard, its last log line) and one overall line with an ETA from
   the rate of finished runs, until no share runs any more;
3. ``matrix_action=collect``: the shares are fetched as tarballs, unpacked under
   ``STORE/.shares/HOST`` and merged with :func:`merge_stores` (run directories copied in,
   a finished run never replaced by an unfinished one, ``index.json`` rebuilt from the
   run directories by :mod:`vm.campaign.store`), then ``swapnbd report`` writes ``report.md``.

A host that fails loses only its share's unfinished runs: running the same command again
resumes it. ``python -m vm.campaign.lab merge STORE SHARE_DIR...`` is the merge step alone (the
playbook calls it); ``python -m vm.campaign.lab run FILE.toml --inventory INV --out STORE`` is the
whole drive, as ``swapnbd matrix --inventory`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vm.campaign.plan import load_matrix, plan_runs
from vm.campaign.store import write_index

__all__ = [
    "ANSIBLE_DIR",
    "HostStatus",
    "LabError",
    "merge_stores",
    "overall_line",
    "parse_status",
    "parse_status_output",
    "run_matrix_on_inventory",
]

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "ansible"
STATUS_MARK = "SWAPNBD-MATRIX-STATUS "
Emit = Callable[[str], None]


class LabError(RuntimeError):
    """The lab run could not be driven (no ansible-playbook, bad inventory ...)."""


# --------------------------------------------------------------------------- merging


def _run_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _finished(run: dict[str, Any] | None) -> bool:
    return (
        bool(run)
        and run is not None
        and run.get("outcome") is not None
        and not run.get("interrupted")
    )


def merge_stores(store: Path, shares: Sequence[Path]) -> dict[str, Any]:
    """Copy every share's run directories into ``store`` and rebuild its index.

    A run directory is copied when ``store`` has none of that name, or has one whose run is
    not finished while the share's is. Hidden directories (``.attic``, ``.shares``) are
    skipped. ``matrix.toml`` comes from the first share that has it; all shares must hold
    the same matrix.

    Raises:
        LabError: the shares hold different matrix files.
    """
    store.mkdir(parents=True, exist_ok=True)
    copied: list[str] = []
    kept: list[str] = []
    matrix_text: str | None = None
    for share in shares:
        toml = share / "matrix.toml"
        if toml.is_file():
            text = toml.read_text()
            if matrix_text is not None and text != matrix_text:
                raise LabError(
                    f"{share} holds a different matrix.toml than the other shares; "
                    "every host must run the same matrix file"
                )
            matrix_text = text
        for rdir in sorted(p for p in share.iterdir() if p.is_dir()):
            if rdir.name.startswith("."):
                continue
            dest = store / rdir.name
            src_run = _run_json(rdir / "run.json")
            if dest.exists():
                if _finished(_run_json(dest / "run.json")) or not _finished(src_run):
                    kept.append(rdir.name)
                    continue
                shutil.rmtree(dest)
            shutil.copytree(rdir, dest)
            copied.append(rdir.name)
    if matrix_text is not None and not (store / "matrix.toml").exists():
        (store / "matrix.toml").write_text(matrix_text)
    index = _rebuild_index(store)
    return {"copied": copied, "kept": kept, "index": index is not None}


def _rebuild_index(store: Path) -> dict[str, Any] | None:
    """``index.json`` from the run directories, through vm.campaign.store (None without one)."""
    toml = store / "matrix.toml"
    if not toml.is_file():
        return None
    parsed = load_matrix(toml)
    return write_index(parsed, plan_runs(parsed), store, None)


# --------------------------------------------------------------------------- progress


@dataclass(slots=True)
class HostStatus:
    """One runner's share as the ``status`` step reports it."""

    host: str
    k: int
    n: int
    running: bool
    finished: int = 0
    total: int | None = None
    """Runs in this host's shard (None before its index exists)."""
    last_line: str = ""
    statuses: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        what = "running" if self.running else "stopped"
        if self.total is None:
            done = "no index yet"
        else:
            done = f"{self.finished}/{self.total} runs finished"
        if not self.running and self.total is not None and self.finished < self.total:
            what = "stopped early (run again to resume this share)"
        tail = f": {self.last_line[:120]}" if self.last_line else ""
        return f"[{self.host} {self.k}/{self.n}] {done}, {what}{tail}"


def parse_status(msg: str) -> HostStatus | None:
    """A ``SWAPNBD-MATRIX-STATUS {json}`` debug message -> HostStatus (None if not one)."""
    if not msg.startswith(STATUS_MARK):
        return None
    obj = json.loads(msg[len(STATUS_MARK) :])
    k_text, _, n_text = str(obj["shard"]).partition("/")
    k, n = int(k_text), int(n_text)
    running = obj.get("running") in (True, "True", "true")
    mine = [str(status) for index, status in obj.get("runs") or [] if int(index) % n == k - 1]
    counts: dict[str, int] = {}
    for status in mine:
        counts[status] = counts.get(status, 0) + 1
    return HostStatus(
        host=str(obj["host"]),
        k=k,
        n=n,
        running=running,
        finished=counts.get("finished", 0),
        total=len(mine) if obj.get("runs") else None,
        last_line=str(obj.get("last_line") or "").strip(),
        statuses=counts,
    )


def _fmt_s(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def overall_line(hosts: Sequence[HostStatus], elapsed_s: float, finished_at_start: int) -> str:
    """``overall: F/T runs finished, R hosts running, ETA ...`` from the run rate so far."""
    total = sum(h.total or 0 for h in hosts)
    done = sum(h.finished for h in hosts)
    running = sum(1 for h in hosts if h.running)
    parts = [f"overall: {done}/{total or '?'} runs finished, {running}/{len(hosts)} hosts running"]
    new = done - finished_at_start
    if new > 0 and total > done and running:
        parts.append(f"ETA {_fmt_s((total - done) * elapsed_s / new)}")
    parts.append(f"elapsed {_fmt_s(elapsed_s)}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- driving


def _playbook_argv(
    inventory: Path, matrix_file: Path, store: Path, action: str, extra: Sequence[str]
) -> list[str]:
    exe = shutil.which("ansible-playbook") or str(
        Path(sys.executable).with_name("ansible-playbook")
    )
    if not Path(exe).exists():
        raise LabError(
            "ansible-playbook is not installed: pip install 'swapnbd[lab]' "
            "(./dev setup installs it into .venv)"
        )
    return [
        exe,
        "-i",
        str(inventory),
        str(ANSIBLE_DIR / "matrix.yml"),
        "-e",
        json.dumps(
            {
                "matrix_file": str(matrix_file.resolve()),
                "matrix_store": str(store.resolve()),
                "matrix_action": action,
            }
        ),
        *extra,
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"))
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_STDOUT_CALLBACK"] = "ansible.builtin.default"
    env["ANSIBLE_CALLBACK_RESULT_FORMAT"] = "json"
    return env


def _stream(argv: list[str], emit: Emit, prefix: str) -> int:
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=str(ANSIBLE_DIR),
    )
    assert proc.stdout is not None
    for raw in proc.stdout:
        if raw.strip():
            emit(f"{prefix} {raw.rstrip()}")
    return proc.wait()


#: The debug task's message as the default callback prints it (a JSON string literal).
_STATUS_RE = re.compile(r'"msg": ("SWAPNBD-MATRIX-STATUS (?:[^"\\]|\\.)*")')


def parse_status_output(text: str) -> list[HostStatus]:
    """Every host's status from the ``status`` step's output (default callback)."""
    found: list[HostStatus] = []
    for match in _STATUS_RE.finditer(text):
        status = parse_status(json.loads(match.group(1)))
        if status is not None:
            found.append(status)
    return sorted(found, key=lambda h: h.k)


def status_once(
    inventory: Path, matrix_file: Path, store: Path, extra: Sequence[str] = ()
) -> list[HostStatus]:
    """Run the ``status`` step once and return every reachable host's status.

    Raises:
        LabError: no host reported (the inventory has no reachable runner).
    """
    argv = _playbook_argv(inventory, matrix_file, store, "status", extra)
    done = subprocess.run(
        argv, capture_output=True, text=True, env=_env(), cwd=str(ANSIBLE_DIR), check=False
    )
    found = parse_status_output(done.stdout)
    if not found:
        raise LabError(
            f"matrix.yml status step reported no host (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-800:]}"
        )
    return found


def run_matrix_on_inventory(
    matrix_file: Path,
    inventory: Path,
    store: Path,
    emit: Emit,
    *,
    poll_s: float = 30.0,
    extra_args: Sequence[str] = (),
) -> int:
    """Run ``matrix_file`` over the inventory's runners into ``store``; 0 if every run finished.

    Prints progress per host and overall through ``emit``. Returns 1 when some runs did
    not finish (rerun to resume them), 2 when the playbook itself failed.

    Raises:
        LabError: ansible-playbook is missing, or the matrix file or inventory is not there.
    """
    if not matrix_file.is_file():
        raise LabError(f"matrix file {matrix_file} does not exist")
    if not inventory.exists():
        raise LabError(f"inventory {inventory} does not exist (see ansible/inventories/lab)")
    t0 = time.monotonic()
    emit(f"lab: starting the shares of {matrix_file} on the runners of {inventory}")
    rc = _stream(
        _playbook_argv(inventory, matrix_file, store, "start", extra_args), emit, "start |"
    )
    if rc != 0:
        emit(
            f"lab: starting the shares failed (ansible-playbook exit {rc}); "
            "collecting what is there"
        )
    first: int | None = None
    while True:
        hosts = status_once(inventory, matrix_file, store, extra_args)
        if first is None:
            first = sum(h.finished for h in hosts)
        for host in hosts:
            emit(host.line())
        emit(overall_line(hosts, time.monotonic() - t0, first))
        if not any(h.running for h in hosts):
            break
        time.sleep(poll_s)
    emit("lab: collecting the shares")
    rc_collect = _stream(
        _playbook_argv(inventory, matrix_file, store, "collect", extra_args), emit, "collect |"
    )
    if rc_collect != 0:
        emit(f"lab: collecting failed (ansible-playbook exit {rc_collect})")
        return 2
    index = _run_json(store / "index.json") or {}
    counts = index.get("counts") or {}
    total = len(index.get("runs") or [])
    finished = int(counts.get("finished", 0))
    emit(
        f"lab: {finished}/{total} runs finished in {store} after {_fmt_s(time.monotonic() - t0)}"
        + (f"; report {store / 'report.md'}" if (store / "report.md").exists() else "")
    )
    return 0 if total and finished == total and rc == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vm.campaign.lab", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge fetched shares into one matrix store")
    merge.add_argument("store", type=Path)
    merge.add_argument("shares", type=Path, nargs="+")
    run = sub.add_parser("run", help="run a matrix over an inventory's runners (matrix.yml)")
    run.add_argument("matrix_file", type=Path)
    run.add_argument("--inventory", type=Path, required=True)
    run.add_argument("--out", type=Path, required=True, help="the merged store")
    run.add_argument("--poll", type=float, default=30.0, help="seconds between status checks")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return run_matrix_on_inventory(
                args.matrix_file,
                args.inventory,
                args.out,
                lambda line: print(line, flush=True),
                poll_s=args.poll,
            )
        summary = merge_stores(args.store, args.shares)
    except LabError as exc:
        print(f"vm.campaign.lab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
