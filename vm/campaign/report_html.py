"""``report.html``: the report as one self-contained page (pure).

The same header, table and footnotes as ``report.md`` (the cells are the Markdown's,
:func:`vm.campaign.report.cell_text`), with the plots embedded as ``data:`` URIs, so the
page needs nothing but itself: no stylesheet, font or image is fetched.  A table wider
than the window scrolls inside its own box (the table is a block with its own horizontal
scroll) while its row labels stay in view (a sticky first column), so the page itself never
runs off to the right.  A few lines of inline
script mark ``<body>`` once the page has loaded: ``data-images="loaded"`` when every image
decoded (``broken`` otherwise), ``data-page-fits`` whether the page is no wider than the
window, ``data-table-scrolls`` whether the table overflows its box; the browser test
(tests/vm/test_report_html.py) reads those marks.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

from vm.campaign import lockup_curve
from vm.campaign.plots import ARMS_PNG, BOUNDARY_PNG, OVERLAY_FILE
from vm.campaign.report import MEDIAN_KEYS, cell_text, median_text, reference_cells

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: separate; border-spacing: 0; font-size: 0.85em; }
table#report { display: block; overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; vertical-align: top; }
td.num { text-align: right; white-space: nowrap; }
th.arm { max-width: 14em; overflow-wrap: anywhere; }
tbody th { position: sticky; left: 0; z-index: 1; background: #fff; text-align: left;
  min-width: 14em; max-width: 18em; overflow-wrap: break-word; }
td.ref, th.ref { background: #f4f4f4; color: #555; }
tr:nth-child(even) td:not(.ref) { background: #fafafa; }
dl.header { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1em; }
dl.header dt { font-weight: bold; }
dl.header dd { margin: 0; }
figure { margin: 1em 0; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
.sig { font-weight: bold; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute("data-images", ok ? "loaded" : "broken");
  document.body.setAttribute("data-image-count", String(imgs.length));
  var page = document.documentElement.scrollWidth <= window.innerWidth;
  document.body.setAttribute("data-page-fits", page ? "yes" : "no");
  var box = document.getElementById("report");
  if (box) {
    document.body.setAttribute("data-table-scrolls",
      box.scrollWidth > box.clientWidth ? "yes" : "no");
  }
});
"""


#: Captions of plots by file name; another plot is captioned with its name.
CAPTIONS = {
    OVERLAY_FILE: f"{OVERLAY_FILE}: every arm on shared axes, one colour per arm and one line "
    "per run; x is seconds since the guest's stress phase began. The note under the figure "
    "says what the dashed line in the MemFree panel is.",
    BOUNDARY_PNG: f"{BOUNDARY_PNG}: P(lockup) against the overcommit ratio, one line per "
    "curve, with 95% Wilson intervals and lockups/trials beside each point.",
    ARMS_PNG: f"{ARMS_PNG}: each arm's own runs, one row per arm: free memory, swap-in and "
    "swap-out rates and the cumulative pgscan_direct_throttle; x marks where a run that did "
    "not complete stopped.",
}


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _cell(text: str, cls: str = "num") -> str:
    body = _e(text)
    if text.endswith("*"):  # a significant difference: the mark, and bold
        body = f'<span class="sig">{body}</span>'
    return f'<td class="{cls}">{body}</td>'


def render_html(rep: Mapping[str, Any], plots: Sequence[tuple[str, bytes]] = ()) -> str:
    """The page for report ``rep``, with ``plots`` (name, PNG bytes) embedded in order."""
    arms = rep["arms"]
    ref = rep.get("reference_2012")
    ref_names = list(ref["arms"]) if ref else []
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        "<title>swapnbd report</title>",
        f"<style>{STYLE}</style>",
        f"<script>{SCRIPT}</script>",
        "</head>",
        "<body>",
        "<h1>swapnbd report</h1>",
        f"<p>{rep['runs']} run(s) in {len(arms)} arm(s); baseline: "
        f"<code>{_e(rep['baseline'])}</code>.</p>",
        '<dl class="header" id="header">',
    ]
    for item in rep["header"]:
        out.append(f"<dt>{_e(item['name'])}</dt><dd>{_e(item['value'])}</dd>")
    out.append("</dl>")
    out.append('<table id="report">')
    out.append(
        "<thead><tr><th></th>"
        + "".join(f'<th class="arm">{_e(a["label"])}</th>' for a in arms)
        + "".join(f'<th class="ref">{_e(n)} (2012 scale)</th>' for n in ref_names)
        + "</tr></thead>"
    )
    out.append("<tbody>")
    pad = "".join('<td class="ref"></td>' for _ in ref_names)

    def simple(name: str, cells: Sequence[str], ref_cells: Sequence[str] | None = None) -> None:
        refs = "".join(_cell(c, "num ref") for c in ref_cells) if ref_cells is not None else pad
        out.append(f"<tr><th>{_e(name)}</th>" + "".join(_cell(c) for c in cells) + refs + "</tr>")

    simple("runs", [str(a["n"]) for a in arms], ["1"] * len(ref_names))
    simple("outcome", [a["outcome_text"] for a in arms])
    simple("lockup signature", [a["signature_text"] for a in arms])
    simple(
        "kernel",
        [", ".join(a["kernel_release"]) for a in arms],
        ["3.4.0-rc2"] * len(ref_names),
    )
    for row in rep["rows"]:
        unit = f" ({row['unit']})" if row["unit"] else ""
        cells = [
            cell_text(row["values"][a["label"]], row["kind"], a["n"], a["label"] != rep["baseline"])
            for a in arms
        ]
        simple(f"{row['name']}{unit}", cells, reference_cells(rep, row["key"]) or None)
    for row in rep["rows"]:
        if row["key"] in MEDIAN_KEYS:
            unit = f" ({row['unit']})" if row["unit"] else ""
            cells = [median_text(row["values"][a["label"]], row["kind"]) for a in arms]
            simple(f"median {row['name']}{unit}", cells)
    out.append("</tbody></table>")
    out.append('<ul id="footnotes">')
    out.extend(f"<li>{_e(note)}</li>" for note in rep["footnotes"])
    out.append("</ul>")
    if rep.get("boundary"):
        out.append("<h2>Boundary: P(lockup) by overcommit ratio</h2>")
        out.append('<table id="boundary">')
        out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in lockup_curve.HEAD))
        out.append("</tr></thead><tbody>")
        for point in rep["boundary"]:
            cells = lockup_curve.point_cells(point)
            out.append(
                f"<tr><th>{_e(point['curve'])}</th>"
                + "".join(_cell(c) for c in cells[:-1])
                + f"<td>{_e(cells[-1])}</td></tr>"
            )
        out.append("</tbody></table>")
        out.append(f"<p>{_e(lockup_curve.NOTE)}</p>")
    if plots:
        out.append('<h2>Plots</h2><div id="plots">')
        for name, png in plots:
            data = base64.b64encode(png).decode("ascii")
            caption = CAPTIONS.get(name, name)
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{_e(name)}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )
        out.append("</div>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
