"""Parsing py-spy's collapsed stacks into hot spots (pure)."""

from __future__ import annotations

import pytest

from bench.profile import parse_collapsed, render_hotspots

MAIN = "<module> (nbd-serve:8);main (/v/lib/python3.11/site-packages/nbdserver/cli.py:40)"
RUN = f"{MAIN};run (asyncio/runners.py:118)"
AIO = "data_received (/w/nbdserver/aio.py:{})"
RAW = "\n".join(
    [
        f'process 42:"python nbd-serve";{RUN};{AIO.format(120)};'
        "pread (/w/nbdserver/backends/file.py:55) 30",
        f"{RUN};{AIO.format(121)} 50",
        f"{RUN};{AIO.format(130)};{AIO.format(131)} 20",
        "",
    ]
)


def test_self_and_inclusive_counts_merge_lines_of_one_function() -> None:
    h = parse_collapsed(RAW.splitlines())
    assert h.total == 100
    assert h.self_counts["data_received (/w/nbdserver/aio.py)"] == 70
    assert h.self_counts["pread (/w/nbdserver/backends/file.py)"] == 30
    # counted once per sample even when recursive on the stack
    assert h.inclusive["data_received (/w/nbdserver/aio.py)"] == 100
    assert h.inclusive["main (nbdserver/cli.py)"] == 100
    assert not any(k.startswith("process") for k in h.inclusive)


def test_render() -> None:
    text = render_hotspots(parse_collapsed(RAW.splitlines()), top=2).splitlines()
    assert text[0] == "100 samples on CPU."
    assert text[4] == "| 70.0 | `data_received (/w/nbdserver/aio.py)` |"
    assert text[5] == "| 30.0 | `pread (/w/nbdserver/backends/file.py)` |"
    assert len(text) == 2 + 2 + 2 + 1 + 2 + 2
    assert render_hotspots(parse_collapsed([])) == "no samples (was the server idle?)"


def test_bad_line() -> None:
    with pytest.raises(ValueError, match="not a collapsed-stack line"):
        parse_collapsed(["main (x.py:1)"])
