"""One line that says why a build failed: real log lines from failures seen here."""

from __future__ import annotations

import pytest

from vm.image import buildlog

# As a new machine without pahole printed it (paths shortened).
PAHOLE = """\
$ make -C /w/headers/usr/src/linux-headers-6.12.118+deb12-cloud-amd64 M=/src modules
  CC [M]  /src/nbd.o
  LD [M]  /src/nbd.ko
  BTF [M] /src/nbd.ko
/bin/sh: 1: pahole: not found
make[3]: *** [/w/linux-headers-6.12.118+deb12-common/scripts/Makefile.modfinal:56: nbd.ko] Error 127
make[2]: *** [/w/linux-headers-6.12.118+deb12-common/Makefile:1946: modules] Error 2
"""

HUNK = """\
$ patch --forward --fuzz=0 --no-backup-if-mismatch nbd.c nbd-memalloc-switch.patch
patching file nbd.c
Hunk #1 succeeded at 67 (offset 2 lines).
Hunk #4 FAILED at 1455.
1 out of 6 hunks FAILED -- saving rejects to file nbd.c.rej
"""


@pytest.mark.parametrize(
    ("log", "why"),
    [
        (PAHOLE, "pahole is not installed (apt-get install pahole)"),
        ("/bin/sh: 1: bc: not found\n", "bc is not installed (apt-get install bc)"),
        (
            "make[1]: flex: No such file or directory\n",
            "flex is not installed (apt-get install flex)",
        ),
        ("sh: 1: frobnicate: not found\n", "frobnicate is not installed"),
        (
            "scripts/sign-file.c:25:10: fatal error: openssl/opensslv.h: "
            "No such file or directory\n",
            "the header openssl/opensslv.h is missing (apt-get install libssl-dev)",
        ),
        (
            "tools/objtool/elf.c:1:10: fatal error: gelf.h: No such file or directory\n",
            "the header gelf.h is missing (apt-get install libelf-dev)",
        ),
        (
            "  CC [M]  /src/nbd.o\n/src/nbd.c:88:5: error: 'memalloc' undeclared\n"
            "make[2]: *** [scripts/Makefile.build:250: /src/nbd.o] Error 1\n",
            "compile error: /src/nbd.c:88:5: error: 'memalloc' undeclared",
        ),
        (HUNK, "patch: Hunk #4 FAILED at 1455."),
        (
            "make[2]: *** [scripts/Makefile.build:250: mm/vmscan.o] Error 1\n",
            "make failed at scripts/Makefile.build:250: mm/vmscan.o",
        ),
        ("  CC mm/vmscan.o\n", None),
    ],
)
def test_the_cause_of_a_failed_build(log: str, why: str | None) -> None:
    assert buildlog.diagnose(log) == why


def test_only_the_last_command_is_read() -> None:
    """Logs are appended across attempts: an old failure must not name today's cause."""
    log = PAHOLE + "$ make -C headers M=/src modules\n/src/nbd.c:9:1: error: expected ';'\n"
    assert buildlog.diagnose(log) == "compile error: /src/nbd.c:9:1: error: expected ';'"


def test_every_tool_hint_names_a_package_dev_installs() -> None:
    """The packages the hints name are ones ./dev installs, so the advice is the fix."""
    from pathlib import Path

    dev = (Path(__file__).parents[2] / "dev").read_text()
    for tool in ("pahole", "make", "gcc-12", "bc", "flex", "bison", "patch", "cpio", "zstd"):
        package = buildlog.TOOL_PACKAGES[tool]
        assert f" {package} " in dev or f" {package}\n" in dev, (tool, package)
