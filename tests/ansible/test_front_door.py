"""``swapnbd matrix FILE --inventory INV``: the lab front door refuses bad input clearly.

The real drive over two hosts is tests/ansible/test_matrix_scaleout.py (vm.campaign.lab, which
this front door calls); these check the CLI's own rules without hosts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def swapnbd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vm.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=120,
    )


def test_a_missing_inventory_is_a_usage_error() -> None:
    done = swapnbd("matrix", "vm/campaign/matrices/seed.toml", "--inventory", "/no/such/inventory")
    assert done.returncode == 2
    assert "inventory /no/such/inventory does not exist (see ansible/inventories/lab)" in (
        done.stderr
    )


def test_inventory_does_its_own_sharding() -> None:
    done = swapnbd(
        "matrix",
        "vm/campaign/matrices/seed.toml",
        "--inventory",
        "ansible/inventories/lab",
        "--shard",
        "1/2",
    )
    assert done.returncode == 2
    assert "--inventory shards by host itself; drop --shard and --only" in done.stderr


def test_help_names_the_front_door() -> None:
    done = swapnbd("matrix", "--help")
    assert done.returncode == 0
    assert "--inventory INV" in done.stdout
