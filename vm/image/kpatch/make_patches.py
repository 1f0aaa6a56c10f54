"""Make the four arm patches for one Debian kernel series (see README.md here).

Usage::

    tar xJf /usr/src/linux-source-6.12.tar.xz linux-source-6.12/drivers/block/nbd.c \\
        linux-source-6.12/mm/vmscan.c
    python3 vm/image/kpatch/make_patches.py linux-source-6.12 6.12

A stock-only series (7.2: the stock kernel route rebuilds nbd.ko alone) names the
patches it needs after the series::

    python3 vm/image/kpatch/make_patches.py linux-source-7.2 7.2 nbd-memalloc-switch.patch

Every edit is an exact text replacement that must match once, so a source that
moved on fails loudly instead of producing a patch that does something else.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

NBD = "drivers/block/nbd.c"
VMSCAN = "mm/vmscan.c"

NBD_SWITCH = """
/*
 * swapnbd: the memalloc marking of nbd sockets (Mel Gorman's 2012 "nbd: Set
 * SOCK_MEMALLOC for access to PFMEMALLOC reserves") behind a switch, so one
 * kernel runs both arms of the swap-over-NBD experiment. memalloc=Y (the
 * default) is the code as shipped; memalloc=N is nbd as it was before 3.6:
 * no SOCK_MEMALLOC socket, no PF_MEMALLOC while sending, GFP_NOIO only.
 */
static bool memalloc = true;
module_param(memalloc, bool, 0444);
MODULE_PARM_DESC(memalloc, "Mark sockets SOCK_MEMALLOC and transmit with PF_MEMALLOC "
\t\t "(swapnbd switch; default Y, as upstream)");

static void nbd_sock_memalloc(struct nbd_device *nbd, struct socket *sock)
{
\tif (memalloc)
\t\tsk_set_memalloc(sock->sk);
\telse
\t\tdev_info(disk_to_dev(nbd->disk),
\t\t\t "swapnbd: memalloc=N: socket left without SOCK_MEMALLOC\\n");
}
"""

THROTTLE_HEAD = """static bool throttle_direct_reclaim(gfp_t gfp_mask, struct zonelist *zonelist,
\t\t\t\t\tnodemask_t *nodemask)
{
\tstruct zoneref *z;
\tstruct zone *zone;
\tpg_data_t *pgdat = NULL;
"""

THROTTLE_SWITCH = """/*
 * swapnbd: the throttle of direct reclaimers on pfmemalloc_wait (Mel Gorman's
 * 2012 "mm: throttle direct reclaimers if PF_MEMALLOC reserves are low and
 * swap is backed by network storage") behind a boot switch, so one kernel runs
 * both arms of the swap-over-NBD experiment: pfmemalloc_throttle=0 on the
 * command line turns it off and pgscan_direct_throttle then stays 0.
 */
static bool pfmemalloc_throttle = true;
core_param(pfmemalloc_throttle, pfmemalloc_throttle, bool, 0444);

static int __init pfmemalloc_throttle_report(void)
{
\tpr_info("swapnbd: pfmemalloc_throttle=%d\\n", pfmemalloc_throttle);
\treturn 0;
}
late_initcall(pfmemalloc_throttle_report);

"""

INIT_ANCHOR = "\tBUILD_BUG_ON(sizeof(struct nbd_request) != 28);\n"


def replace_once(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced by ``new``; ``old`` must occur exactly once."""
    count = text.count(old)
    if count != 1:
        raise SystemExit(f"expected one occurrence, found {count}: {old!r}")
    return text.replace(old, new)


def replace_line_once(text: str, old: str, new: str) -> str:
    """Replace the one line whose content is ``old`` by ``new``, keeping its indent.

    7.2 moved the send loop into a ``scoped_with_kernel_creds()`` block, one tab deeper.
    """
    lines = text.split("\n")
    hits = [i for i, line in enumerate(lines) if line.strip() == old]
    if len(hits) != 1:
        raise SystemExit(f"expected one line {old!r}, found {len(hits)}")
    line = lines[hits[0]]
    lines[hits[0]] = line[: len(line) - len(line.lstrip())] + new
    return "\n".join(lines)


GFP_LINE = "sock->sk->sk_allocation = GFP_NOIO | __GFP_MEMALLOC;"


def nbd_switch(text: str) -> str:
    text = replace_once(
        text, "\tunsigned int noreclaim_flag;\n", "\tunsigned int noreclaim_flag = 0;\n"
    )
    text = replace_once(
        text,
        "\tnoreclaim_flag = memalloc_noreclaim_save();\n",
        "\tif (memalloc)\n\t\tnoreclaim_flag = memalloc_noreclaim_save();\n",
    )
    text = replace_line_once(
        text, GFP_LINE, "sock->sk->sk_allocation = memalloc ? GFP_NOIO | __GFP_MEMALLOC : GFP_NOIO;"
    )
    text = replace_once(
        text,
        "\tmemalloc_noreclaim_restore(noreclaim_flag);\n",
        "\tif (memalloc)\n\t\tmemalloc_noreclaim_restore(noreclaim_flag);\n",
    )
    text = replace_once(
        text, "\t\tsk_set_memalloc(sock->sk);\n", "\t\tnbd_sock_memalloc(nbd, sock);\n"
    )
    text = replace_once(
        text,
        "\t\tsk_set_memalloc(config->socks[i]->sock->sk);\n",
        "\t\tnbd_sock_memalloc(nbd, config->socks[i]->sock);\n",
    )
    text = replace_once(
        text, INIT_ANCHOR, INIT_ANCHOR + '\tpr_info("swapnbd switch memalloc=%d\\n", memalloc);\n'
    )
    # Last: the helper itself calls sk_set_memalloc(sock->sk), which the edits above match.
    anchor = "static int max_part = 16;\nstatic int part_shift;\n"
    return replace_once(text, anchor, anchor + NBD_SWITCH)


def nbd_revert(text: str) -> str:
    text = replace_once(text, "\tunsigned int noreclaim_flag;\n", "")
    text = replace_once(text, "\tnoreclaim_flag = memalloc_noreclaim_save();\n", "")
    text = replace_line_once(text, GFP_LINE, "sock->sk->sk_allocation = GFP_NOIO;")
    text = replace_once(text, "\tmemalloc_noreclaim_restore(noreclaim_flag);\n", "")
    text = replace_once(text, "\t\tsk_set_memalloc(sock->sk);\n", "")
    text = replace_once(text, "\t\tsk_set_memalloc(config->socks[i]->sock->sk);\n", "")
    note = '\tpr_info("swapnbd compile-time revert of the 2012 memalloc marking\\n");\n'
    return replace_once(text, INIT_ANCHOR, INIT_ANCHOR + note)


def vmscan_switch(text: str) -> str:
    body = THROTTLE_HEAD + "\n\tif (!pfmemalloc_throttle)\n\t\treturn false;\n"
    return replace_once(text, THROTTLE_HEAD, THROTTLE_SWITCH + body)


def vmscan_revert(text: str) -> str:
    note = (
        "\n\t/* swapnbd: compile-time revert of the 2012 pfmemalloc throttle. */\n\treturn false;\n"
    )
    return replace_once(text, THROTTLE_HEAD, THROTTLE_HEAD + note)


PATCHES: tuple[tuple[str, str, Callable[[str], str]], ...] = (
    ("nbd-memalloc-switch.patch", NBD, nbd_switch),
    ("vmscan-throttle-switch.patch", VMSCAN, vmscan_switch),
    ("revert-nbd-memalloc.patch", NBD, nbd_revert),
    ("revert-vmscan-throttle.patch", VMSCAN, vmscan_revert),
)


def unified_diff(rel: str, old: str, new: str) -> str:
    """``diff -u`` of one file, labelled a/REL and b/REL (for ``patch -p1``)."""
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        a.write_text(old)
        b.write_text(new)
        done = subprocess.run(
            ["diff", "-u", "--label", f"a/{rel}", "--label", f"b/{rel}", str(a), str(b)],
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 1:
        raise SystemExit(f"diff of {rel} failed or found no change: {done.stderr}")
    return done.stdout


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    source, series, only = Path(argv[0]), argv[1], set(argv[2:])
    out = Path(__file__).resolve().parent / series
    out.mkdir(exist_ok=True)
    for name, rel, edit in PATCHES:
        if only and name not in only:
            continue
        old = (source / rel).read_text()
        (out / name).write_text(unified_diff(rel, old, edit(old)))
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
