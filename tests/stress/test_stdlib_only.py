"""stress/ runs where only it is deployed: in the QEMU guest's initramfs, in a lab
machine's tools directory, beside the lab swap helper. Each module imports the standard
library and its own package only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

STRESS = Path(__file__).resolve().parents[2] / "stress"


@pytest.mark.parametrize("module", sorted(p.name for p in STRESS.glob("*.py")))
def test_a_guest_tool_imports_only_the_standard_library(module: str) -> None:
    tree = ast.parse((STRESS / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("stress" if node.level else (node.module or "").split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__", "stress"}, module
