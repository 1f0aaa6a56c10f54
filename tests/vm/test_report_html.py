"""report.html in a real browser: headless Chromium renders the page (a screenshot that is
not blank), its DOM holds the tables, and every embedded plot decoded.

Chromium is a test dependency (./dev installs it); without it these tests fail and say so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

from vm import cli
from vm.campaign import archive, plots, publish, report, report_html

DATA = Path(__file__).resolve().parent / "data" / "report"
VANILLA = "6.1-vanilla-slub-nbd-serve"


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium not found: apt-get install chromium (./dev setup installs it)")
    return exe


def browse(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on ``page``: no network needed, its own throwaway profile."""
    return subprocess.run(
        [
            chromium(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1400,1800",
            "--virtual-time-budget=5000",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("published")
    publish.publish(archive.load_runs([DATA]), out, baseline=VANILLA, reference_2012=True)
    return out


def test_the_page_is_self_contained(published: Path) -> None:
    text = (published / "report.html").read_text()
    assert text.count('<img src="data:image/png;base64,') == 1  # arms.png, a row per arm
    # nothing fetched: no URL of any scheme in a src or href
    assert not re.search(r'(src|href)="(?!data:)', text)
    assert "<link" not in text and "@import" not in text


def test_chromium_renders_the_tables_and_every_plot(published: Path, tmp_path: Path) -> None:
    page = published / "report.html"
    dom = browse(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # the script ran after load: every <img> complete with a natural width
    assert 'data-images="loaded"' in html, html[:500]
    assert 'data-image-count="1"' in html
    assert '<table id="report">' in html and '<dl class="header" id="header">' in html
    assert f'<th class="arm">{VANILLA}</th>' in html
    assert "2012 vanilla-slab (2012 scale)" in html and "4174.37" in html
    assert "swap outs (pswpout) (pages)" in html and "190985 +93.3%" in html
    assert "Welch" in html  # the method's footnote

    shot = tmp_path / "shot.png"
    run = browse(page, tmp_path, f"--screenshot={shot}")
    assert run.returncode == 0, run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, len(data)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1800, 1400)
    colours = {tuple(p) for p in pixels[::7, ::7].reshape(-1, pixels.shape[2]).tolist()}
    assert len(colours) > 20, len(colours)  # text, table lines and plots, not a blank page


def test_cli_html_writes_the_page_with_the_plots(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    args = ["report", str(DATA), "--baseline", VANILLA, "--html", str(out)]
    assert cli.main(args) == 0
    text = out.read_text()
    rep = report.build_report(archive.load_runs([DATA]), baseline=VANILLA)
    assert text.startswith(report_html.render_html(rep)[:200])
    assert text.count("data:image/png;base64,") == 1
    assert "2012" not in text  # only when asked for


SEED = Path(__file__).resolve().parents[2] / "docs" / "results" / "seed-2026-12-06"


@pytest.fixture(scope="module")
def seed_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed seed of 2026-12-06 (35 runs, 7 arms, the 2012 columns), with the
    overlays and the arms' plot drawn afresh from its archive."""
    out = tmp_path_factory.mktemp("seed")
    runs = archive.load_runs([SEED / "runs.tar.xz"])
    rep = report.build_report(runs, baseline="6.1-patched-slub-nbd-serve", reference_2012=True)
    plots.write_plots(runs, out / "plots")
    page = out / "report.html"
    page.write_text(report_html.render_html(rep, publish.plot_images(out / "plots")))
    return page


def test_the_overlays_come_first_with_their_caption(seed_page: Path) -> None:
    text = seed_page.read_text()
    alts = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)">', text)
    assert alts == ["overlays.png", "arms.png"]
    assert "<figcaption>overlays.png: every arm on shared axes, one colour per arm" in text
    assert "<figcaption>arms.png: each arm&#x27;s own runs, one row per arm" in text


def test_a_wide_table_scrolls_in_its_box_and_the_page_fits(seed_page: Path, tmp_path: Path) -> None:
    """In a window narrower than the table (7 arms and the two 2012 columns), the table
    scrolls inside itself and the page does not run off to the right."""
    dom = browse(seed_page, tmp_path, "--window-size=900,1600", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-images="loaded"' in html and 'data-image-count="2"' in html
    assert 'data-table-scrolls="yes"' in html and 'data-page-fits="yes"' in html
    assert '<table id="report">' in html and '<dl class="header" id="header">' in html
    assert '<th class="arm">6.1-vanilla-slab-nbd-serve</th>' in html
    assert "<th>lockup: time to stall, into stress (s)</th>" in html
    assert "<th>lockup signature</th>" in html and "memalloc-deadlock" in html


BOUNDARY = """
[matrix]
name = "curve"
[defaults]
workers = 4
lockup_after = 60
[axes]
arm = ["vanilla", "patched"]
[boundary]
ratios = [1.5, 2.0, 3.0]
max_runs = 4
"""


def test_chromium_renders_the_boundary_table_and_curve(tmp_path: Path) -> None:
    """A boundary store (its runs scripted: vanilla locks up from ratio 2, patched never):
    report.html shows the P(lockup) table and the embedded curve, and the curve decodes."""
    import json

    from vm.campaign import boundary
    from vm.run.config import RunConfig

    def run(cfg: RunConfig, emit: object) -> dict[str, object]:
        locked = cfg.arm == "vanilla" and (cfg.ratio or 0) >= 2.0
        obj = {
            "config": cfg.to_json(),
            "outcome": "lockup" if locked else "completed",
            "timings": {"total_s": 60.0},
        }
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "run.json").write_text(json.dumps(obj))
        return obj

    store = tmp_path / "store"
    boundary.run_boundary(boundary.parse_boundary(BOUNDARY), store, run_one=run)
    page = tmp_path / "report.html"
    assert cli.main(["report", str(store), "--html", str(page)]) == 0
    dom = browse(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-images="loaded"' in html and 'data-image-count="1"' in html
    assert '<table id="boundary">' in html
    assert (
        "<tr><th>6.1-vanilla-slub-nbd-serve</th>"
        '<td class="num">2</td><td class="num">4/4</td><td class="num">1.00</td>'
        '<td class="num">[0.51, 1.00]</td><td>—</td></tr>'
    ) in html
    assert 'alt="boundary.png"' in html
