"""Prints the fuzzers' figures (cases tried, distinct code paths) after the run."""

from __future__ import annotations

import pytest

from .report import summary_lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = summary_lines()
    if lines:
        terminalreporter.section("fuzzing")
        for line in lines:
            terminalreporter.write_line(line)
