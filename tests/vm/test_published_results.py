"""docs/results: every published result is a report, its plots and the archive that gives them.

What a reader can check without a guest (issue 23): each folder holds ``runs.tar.xz``,
``report.md``, ``report.csv``, ``report.json``, ``report.html`` and ``plots/``, nothing
else, and ``swapnbd report runs.tar.xz --baseline B`` (B: the baseline the report names;
``--reference-2012`` when it shows the 2012 figures) prints the committed report byte for
byte; report.html is that report with the committed plots embedded, byte for byte (a
change to the page's style is republished with it), and loads nothing from outside.
The plots are ``overlays.png`` (every arm on shared axes), ``arms.png`` (a row per arm)
and, for a boundary, ``boundary.png`` (P(lockup) against the ratio). A result whose runs
predate the per-second samples has no plots (git history keeps those drawn at the time).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vm.campaign import archive, plots, publish, report, report_html

PUBLISHED = Path(__file__).resolve().parents[2] / "docs" / "results"
LAYOUT = {"runs.tar.xz", "report.md", "report.csv", "report.json", "report.html", "plots"}
RESULTS = sorted(p.name for p in PUBLISHED.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split(page: str) -> tuple[str, str]:
    """A page's ``<head>`` (title, style, script) and its ``<body>``."""
    head, sep, body = page.partition("<body>")
    assert sep, "no <body> in the page"
    return head, body


def test_there_are_published_results() -> None:
    assert len(RESULTS) >= 2, RESULTS


@pytest.mark.parametrize("name", RESULTS)
def test_a_result_folder_holds_the_published_layout_only(name: str) -> None:
    out = PUBLISHED / name
    present = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert present - {"plots"} == LAYOUT - {"plots"}, f"{name}: {sorted(present ^ LAYOUT)}"
    plot_dir = out / "plots"
    if plot_dir.exists():
        assert all(p.suffix in (".png", ".svg") for p in plot_dir.iterdir()), name


@pytest.mark.parametrize("name", RESULTS)
def test_the_committed_report_regenerates_from_its_archive(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report from the committed runs, with the committed report's baseline."""
    out = PUBLISHED / name
    committed = json.loads((out / "report.json").read_text())
    monkeypatch.chdir(out)  # the report names its runs runs.tar.xz/RUN, as publish wrote it
    rep = report.build_report(
        archive.load_runs([Path("runs.tar.xz")]),
        baseline=committed["baseline"],
        reference_2012=committed.get("reference_2012") is not None,
    )
    for fmt in ("md", "csv", "json"):
        assert report.render(rep, fmt) == (out / f"report.{fmt}").read_text(), f"{name} {fmt}"
    page = report_html.render_html(rep, publish.plot_images(out / "plots"))
    committed = (out / "report.html").read_text()
    assert page == committed, f"{name} html"
    head = _split(committed)[0]
    assert "<style>" in head and "<script>" in head and "<link" not in head, name
    plot_dir = out / "plots"
    drawn = {p.name for p in plot_dir.iterdir()} if plot_dir.exists() else set()
    expected = {plots.OVERLAY_FILE, plots.ARMS_PNG}
    expected |= {plots.BOUNDARY_PNG} if rep.get("boundary") else set()
    assert drawn <= expected, f"{name}: plots no report draws: {sorted(drawn - expected)}"


def test_the_results_stay_the_size_a_reader_takes_in() -> None:
    """However many runs or arms: at most 60 files under docs/results (issue 23), each
    result at most nine (the report in four forms, the archive and up to three plots)."""
    files = [p for p in PUBLISHED.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert len(files) <= 60, len(files)
    for name in RESULTS:
        mine = [p for p in files if p.is_relative_to(PUBLISHED / name)]
        assert len(mine) <= 9, (name, sorted(p.name for p in mine))


def test_the_readme_stays_a_front_door() -> None:
    """README.md at most 300 lines (issue 23): measurement history belongs in docs/."""
    lines = (PUBLISHED.parents[1] / "README.md").read_text().splitlines()
    assert len(lines) <= 300, len(lines)
