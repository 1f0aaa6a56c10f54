"""Fault tests: one real nbd-serve subprocess per test, checked for health afterwards
(see support.assert_healthy)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server.nbdtest import ServerProcess, running_server

from faults.support import assert_healthy


@pytest.fixture
def memory_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A 64 MiB RAM disk served by two processes (so hand-off is in the path)."""
    with running_server(tmp_path, "--memory", "64M", "--workers", "2") as srv:
        yield srv
        assert_healthy(srv, workers=2)
