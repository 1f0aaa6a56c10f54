"""``swapnbd report --publish``: a published result, from one archive of raw runs.

A published result is ``runs.tar.xz`` and what it regenerates: ``report.md``,
``report.csv``, ``report.json``, ``plots/`` (``overlays.png`` with every arm on shared
axes and ``arms.png`` with a row per arm, when the runs kept their samples and events;
``boundary.png`` for a boundary) and ``report.html`` (the report with the plots embedded).
However many arms a result has, it is at most these nine files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vm.campaign.archive import load_runs, write_archive
from vm.campaign.plots import ARMS_PNG, BOUNDARY_PNG, OVERLAY_FILE, write_plots
from vm.campaign.report import RunData, build_report, render
from vm.campaign.report_html import render_html


def plot_images(plot_dir: Path) -> list[tuple[str, bytes]]:
    """The PNGs in ``plot_dir`` as (name, bytes), what report.html embeds: the overlays of
    every arm, the boundary curve and each arm's runs, in that order, then any other by
    name."""
    if not plot_dir.is_dir():
        return []
    order = {OVERLAY_FILE: 0, BOUNDARY_PNG: 1, ARMS_PNG: 2}
    paths = sorted(plot_dir.glob("*.png"), key=lambda p: (order.get(p.name, 3), p.name))
    return [(p.name, p.read_bytes()) for p in paths]


def publish(
    runs: Sequence[RunData],
    out: Path,
    *,
    baseline: str | None = None,
    reference_2012: bool = False,
    boundary: bool | None = None,
) -> list[Path]:
    """A published result in ``out``: ``runs.tar.xz``, then from it alone ``report.md``,
    ``report.csv``, ``report.json``, ``plots/`` and ``report.html``. Returns the files
    written.

    The report is made from the archive just written, not from the store, so what a reader
    regenerates from the committed archive is what was published.
    """
    archive = out / "runs.tar.xz"
    write_archive(runs, archive)
    relative = Path(archive.name)
    published = load_runs([archive])
    rep = build_report(
        [
            RunData(relative / r.path.relative_to(archive), r.run, r.samples, r.events)
            for r in published
        ],
        baseline=baseline,
        reference_2012=reference_2012,
        boundary=boundary,
    )
    written = [archive]
    for fmt in ("md", "csv", "json"):
        path = out / f"report.{fmt}"
        path.write_text(render(rep, fmt))
        written.append(path)
    written.extend(write_plots(published, out / "plots", boundary=boundary))
    page = out / "report.html"
    page.write_text(render_html(rep, plot_images(out / "plots")))
    written.append(page)
    return written
