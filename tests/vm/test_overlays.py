"""The overlay figure (vm/campaign/plots.py) drawn from a committed archive: every arm on
shared axes, one colour per arm, each arm in every panel, and the files --plots writes."""

from __future__ import annotations

from pathlib import Path

import matplotlib.colors
import matplotlib.pyplot as plt
import pytest

from vm.campaign import archive, plots, publish
from vm.campaign.report import RunData

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
SEED_ARMS = (
    "6.1-patched-slub-nbd-serve",
    "6.1-vanilla-slub-nbd-serve",
    "6.12-patched-slub-nbd-serve",
    "6.12-vanilla-slub-nbd-serve",
    "6.1-vanilla-slab-nbd-serve",
    "7.2-patched-slub-nbd-serve",
    "7.2-vanilla-slub-nbd-serve",
)


@pytest.fixture(scope="module")
def seed() -> list[RunData]:
    return archive.load_runs([RESULTS / "seed-2026-12-06" / "runs.tar.xz"])


def test_every_arm_has_one_colour_in_every_panel(seed: list[RunData]) -> None:
    drawn = plots.draw_overlays(seed)
    assert drawn is not None
    fig, desc = drawn
    try:
        assert desc.arms == SEED_ARMS
        assert {arm: len(runs) for arm, runs in desc.runs.items()} == dict(
            zip(SEED_ARMS, (5,) * 7, strict=True)
        )
        assert desc.left_out == ()
        axes = fig.axes
        titles = [ax.get_title() for ax in axes[: len(plots.OVERLAY_PANELS)]]
        assert titles == [title for _key, title in plots.OVERLAY_PANELS]
        legend = axes[len(plots.OVERLAY_PANELS)].get_legend()
        labels = [t.get_text() for t in legend.get_texts()]
        assert labels == [
            "6.1-patched-slub-nbd-serve: completed 5/5",
            "6.1-vanilla-slub-nbd-serve: lockup 5/5",
            "6.12-patched-slub-nbd-serve: completed 5/5",
            "6.12-vanilla-slub-nbd-serve: lockup 5/5",
            "6.1-vanilla-slab-nbd-serve: lockup 5/5",
            "7.2-patched-slub-nbd-serve: completed 5/5",
            "7.2-vanilla-slub-nbd-serve: lockup 5/5",
        ]
        colours = [matplotlib.colors.to_hex(h.get_color()) for h in legend.legend_handles]
        assert len(set(colours)) == 7
        for ax, (key, _title) in zip(axes, plots.OVERLAY_PANELS, strict=False):
            traces = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
            per_colour = dict.fromkeys(colours, 0)
            for ln in traces:
                per_colour[matplotlib.colors.to_hex(ln.get_color())] += 1
            # one line per run; the progress panel's per run too (empty where no heartbeat)
            assert list(per_colour.values()) == [5] * 7, key
            assert ax.get_xscale() == "symlog"
            # an x where each of the 20 lockup runs stopped, in its arm's colour
            stops = [ln for ln in ax.get_lines() if ln.get_marker() == "x"]
            expected = 20 if key != "pages_done" else 3  # 3 lockups had a heartbeat
            assert len(stops) == expected, key
        memfree = axes[1]
        dashed = [ln for ln in memfree.get_lines() if ln.get_linestyle() == "--"]
        assert [ln.get_ydata()[0] for ln in dashed] == [1448 / 1024]
        assert desc.min_free.startswith(
            "dashed: vm.min_free_kbytes (1448 kB, read back in the guest)"
        )
    finally:
        plt.close(fig)


def test_plots_writes_the_overlays_first_then_one_row_per_arm(
    seed: list[RunData], tmp_path: Path
) -> None:
    """Two files however many arms: the overlays, and arms.png with a row per arm (its
    height says how many rows were drawn)."""
    written = plots.write_plots(seed, tmp_path)
    assert [p.name for p in written] == [plots.OVERLAY_FILE, plots.ARMS_PNG]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height = int.from_bytes((tmp_path / plots.ARMS_PNG).read_bytes()[20:24], "big")
    assert height == round((0.6 + 2.7 * len(SEED_ARMS)) * 72)
    names = [name for name, _png in publish.plot_images(tmp_path)]
    assert names == [plots.OVERLAY_FILE, plots.ARMS_PNG]


def test_runs_without_events_are_left_out_and_named(seed: list[RunData]) -> None:
    bare = [RunData(r.path, r.run, r.samples) for r in seed[:2]]
    assert plots.draw_overlays(bare) is None
    mixed = [*bare, *seed[2:]]
    drawn = plots.draw_overlays(mixed)
    assert drawn is not None
    fig, desc = drawn
    plt.close(fig)
    assert desc.left_out == (seed[0].name, seed[1].name)
    assert desc.runs["6.1-vanilla-slub-nbd-serve"] == tuple(
        r.name for r in seed[2:] if "6.1-vanilla-slub" in r.name
    )
