"""Runs on disk: reading run directories, matrix stores and runs archives; writing an archive.

Theory of operation
-------------------
:func:`load_runs` is the only part of the report that reads files: it finds every
``run.json`` under the given paths (a matrix store, a single run directory, a tree of
either, or a published ``runs.tar.xz`` read in place; hidden directories such as a
store's ``.attic`` are skipped) together with the run's ``vmstat.jsonl`` samples and its
``events.jsonl`` phases and heartbeats, as
:class:`vm.campaign.report.RunData`.  :func:`write_archive` writes the one archive of raw
runs that a published result keeps, reproducibly, so the report can be regenerated from it.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from vm.campaign.report import ReportError, RunData


def _read_samples(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return _parse_samples(text)


def _parse_samples(text: str) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line cut by the guest stopping mid-write
        if isinstance(obj, dict) and obj.get("type", "sample") == "sample" and "vmstat" in obj:
            samples.append(obj)
    return samples


#: The event types the report keeps from events.jsonl (the rest, such as the result and
#: the kernel's info line, are in run.json already).
EVENT_TYPES = ("phase", "heartbeat")


def _parse_events(text: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line cut by the guest stopping mid-write
        if isinstance(obj, dict) and obj.get("type") in EVENT_TYPES:
            events.append(obj)
    return events


def _read_events(path: Path) -> list[dict[str, Any]]:
    try:
        return _parse_events(path.read_text(errors="replace"))
    except OSError:
        return []


#: What ``swapnbd report`` reads as an archive of run directories (a published result's
#: ``runs.tar.xz``: run.json, vmstat.jsonl, events.jsonl and console.log of every run).
ARCHIVE_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


def _load_archive(archive: Path) -> list[RunData]:
    """Every run in a tar archive, read in place (no extraction), in member path order.

    A run's ``path`` is ``ARCHIVE/DIR``, so a report made from the archive names its runs
    the same way on every machine.
    """
    runs: list[RunData] = []
    try:
        with tarfile.open(archive) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}

            def text(name: str) -> str | None:
                member = members.get(name)
                handle = tar.extractfile(member) if member is not None else None
                return handle.read().decode(errors="replace") if handle is not None else None

            for name in sorted(members):
                parts = PurePosixPath(name).parts
                if parts[-1] != "run.json" or any(p.startswith(".") for p in parts[:-1]):
                    continue
                raw = text(name) or ""
                try:
                    obj = json.loads(raw)
                except ValueError as exc:
                    raise ReportError(f"{archive}:{name} is not JSON ({exc})") from exc
                if not isinstance(obj, dict):
                    raise ReportError(f"{archive}:{name} is not a run.json object")
                parent = PurePosixPath(name).parent
                vmstat_name = (obj.get("files") or {}).get("vmstat", "vmstat.jsonl")
                samples = _parse_samples(text(str(parent / vmstat_name)) or "")
                events_name = (obj.get("files") or {}).get("events", "events.jsonl")
                events = _parse_events(text(str(parent / events_name)) or "")
                runs.append(RunData(archive / parent, obj, samples, events))
    except (OSError, tarfile.TarError) as exc:
        raise ReportError(f"{archive} is not a readable tar archive ({exc})") from exc
    return runs


#: This checkout's committed results (``docs/results/*/runs.tar.xz``): estimates learn
#: from their measured runs (:func:`vm.campaign.store.estimator_from_store`).
COMMITTED_RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"


def committed_archives(root: Path = COMMITTED_RESULTS) -> list[Path]:
    """The runs archives under ``root`` (one per published result), by path."""
    return sorted(root.glob("*/runs.tar.xz")) if root.is_dir() else []


def read_run_jsons(archive: Path) -> list[dict[str, Any]]:
    """Only the run.json objects of an archive (no samples): cheap enough for every
    ``--dry-run``.  Unreadable members are left out; an unreadable archive is an error.

    Raises:
        ReportError: not a readable tar archive.
    """
    out: list[dict[str, Any]] = []
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if not member.isfile() or parts[-1] != "run.json":
                    continue
                if any(p.startswith(".") for p in parts[:-1]):
                    continue
                handle = tar.extractfile(member)
                try:
                    obj = json.loads(handle.read()) if handle is not None else None
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    out.append(obj)
    except (OSError, tarfile.TarError) as exc:
        raise ReportError(f"{archive} is not a readable tar archive ({exc})") from exc
    return out


def _find(root: Path) -> list[Path]:
    if (root / "run.json").is_file():
        return [root / "run.json"]
    found = []
    for path in sorted(root.rglob("run.json")):
        rel = path.relative_to(root).parts
        if any(part.startswith(".") for part in rel):
            continue
        found.append(path)
    return found


def load_runs(dirs: Sequence[Path]) -> list[RunData]:
    """Every run under ``dirs`` (stores, run directories, or trees of them), in path order.

    Raises:
        ReportError: a path that does not exist, or no run.json anywhere.
    """
    seen: set[Path] = set()
    runs: list[RunData] = []
    for root in dirs:
        if not root.exists():
            raise ReportError(f"{root} does not exist; give a matrix store or a run directory")
        if is_archive(root):
            runs.extend(_load_archive(root))
            continue
        if root.is_file():
            if root.name != "run.json":
                raise ReportError(
                    f"{root} is a file; give a directory, a run.json or a runs archive "
                    f"({', '.join(ARCHIVE_SUFFIXES)})"
                )
            paths = [root]
        else:
            paths = _find(root)
        for path in paths:
            real = path.resolve()
            if real in seen:
                continue
            seen.add(real)
            try:
                obj = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ReportError(
                    f"{path} is not readable JSON ({exc}); remove it or rerun"
                ) from exc
            if not isinstance(obj, dict):
                raise ReportError(f"{path} is not a run.json object")
            files = obj.get("files") or {}
            samples = _read_samples(path.parent / files.get("vmstat", "vmstat.jsonl"))
            events = _read_events(path.parent / files.get("events", "events.jsonl"))
            runs.append(RunData(path.parent, obj, samples, events))
    if not runs:
        raise ReportError(
            "no run.json under " + ", ".join(str(d) for d in dirs) + "; run swapnbd run or "
            "swapnbd matrix first"
        )
    return runs


#: The files of a run that a published archive keeps (the rest, such as the server's own
#: log directory, stay in the store).
ARCHIVED_FILES = (
    "run.json",
    "vmstat.jsonl",
    "events.jsonl",
    "console.log",
    "server-stats.jsonl",
)


def write_archive(runs: Sequence[RunData], archive: Path) -> int:
    """One ``tar.xz`` of the runs' files, each run as ``NAME/FILE``; returns the run count.

    Reproducible: members sorted, owner root, mtime 0, so the same runs give the same
    bytes. Runs read from an archive already are copied over as they are.

    Raises:
        ReportError: two runs with the same directory name.
    """
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ReportError(f"two runs are both named {dup[0]}; publish one store at a time")
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for run in sorted(runs, key=lambda r: r.name):
            for name in ARCHIVED_FILES:
                data = _run_file(run, name)
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{run.name}/{name}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uname = info.gname = "root"
                tar.addfile(info, io.BytesIO(data))
    tmp.replace(archive)
    return len(runs)


def _run_file(run: RunData, name: str) -> bytes | None:
    """A file of a run, from its directory or from the archive it was read from."""
    path = run.path / name
    if path.is_file():
        return path.read_bytes()
    for parent in path.parents:
        if is_archive(parent):
            member = str(path.relative_to(parent))
            with tarfile.open(parent) as tar:
                try:
                    handle = tar.extractfile(member)
                except KeyError:
                    return None
                return handle.read() if handle is not None else None
    return None
