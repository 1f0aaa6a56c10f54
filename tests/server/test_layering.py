"""The layering holds: the sans-IO core imports no I/O, no event loop and no backend.

Checked in a fresh interpreter, since this test process has long imported everything.
The control case (the asyncio adapter) shows the check sees what it looks for.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: The pure core: wire format, both protocol phases, and the adapter's pure policies.
CORE = (
    "nbdserver.protocol",
    "nbdserver.negotiation",
    "nbdserver.transmission",
    "nbdserver.extended",
    "nbdserver.readplan",
    "nbdserver.connection",
    "nbdserver.policy",
)
#: What the core must never load: I/O, the event loop, FFI, and any storage backend.
FORBIDDEN = ("asyncio", "socket", "ctypes", "fcntl", "selectors", "subprocess", "uvloop")
FORBIDDEN_PREFIXES = ("nbdserver.backends", "nbdserver.server", "nbdserver.fastpath")


def loaded_by(module: str) -> set[str]:
    """Modules that importing ``module`` adds to a fresh interpreter."""
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        f"import {module}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(proc.stdout))


def impure(modules: set[str]) -> list[str]:
    return sorted(
        m
        for m in modules
        if m.split(".")[0] in FORBIDDEN or m.startswith(FORBIDDEN_PREFIXES) or m == "_socket"
    )


@pytest.mark.parametrize("module", CORE)
def test_core_module_is_pure(module: str) -> None:
    loaded = loaded_by(module)
    assert module in loaded  # it really was imported fresh
    assert impure(loaded) == []


def test_the_check_catches_an_adapter() -> None:
    found = impure(loaded_by("nbdserver.server"))
    assert {"asyncio", "socket", "ctypes", "fcntl", "nbdserver.backends.file"} <= set(found)
