"""Distinct code paths reached in nbdserver/: branch arcs measured with coverage.py.

Started before the in-process server's thread, coverage traces that thread and the
thread pool's (it installs ``threading.settrace``); arcs are (from line, to line) pairs
per file, so "distinct paths" means distinct line-to-line transitions inside nbdserver/.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import nbdserver

PACKAGE = Path(nbdserver.__file__).parent


@dataclass
class Paths:
    arcs: int = 0
    lines: int = 0
    files: int = 0


@contextlib.contextmanager
def measured() -> Iterator[Paths]:
    try:
        import coverage
    except ImportError:
        pytest.fail("coverage is missing: pip install -e '.[test]'", pytrace=False)
    cov = coverage.Coverage(
        branch=True, data_file=None, include=[f"{PACKAGE}/*"], config_file=False
    )
    result = Paths()
    cov.start()
    try:
        yield result
    finally:
        cov.stop()
        data = cov.get_data()
        files = data.measured_files()
        result.files = len(files)
        result.arcs = sum(len(data.arcs(f) or ()) for f in files)
        result.lines = sum(len(data.lines(f) or ()) for f in files)
