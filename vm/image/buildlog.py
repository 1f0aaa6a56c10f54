"""Why a build failed, in one line a user can act on.

A failed ``make`` or ``patch`` leaves a log of thousands of lines; the user needs the one
that names the cause: the tool that was not found (and the Debian package that has it),
the header that is missing, the first compiler error, the hunk that did not apply. This
module is pure: text in, one line out. The builders (:mod:`vm.image.kmod`,
:mod:`vm.image.kbuild`) put that line next to the package version and the log path in their
error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

__all__ = ["TOOL_PACKAGES", "diagnose", "install_hint"]

#: Programs a kernel or module build runs, and the Debian package that ships each.
TOOL_PACKAGES: Final[Mapping[str, str]] = {
    "pahole": "pahole",
    "gcc-12": "gcc-12",
    # sid, for 7.2's modules (vm/image/kmod.py builds them in a sid chroot)
    "x86_64-linux-gnu-gcc-16": "gcc-16-for-host",
    "gcc": "gcc",
    "make": "make",
    "bc": "bc",
    "flex": "flex",
    "bison": "bison",
    "perl": "perl",
    "openssl": "openssl",
    "patch": "patch",
    "xz": "xz-utils",
    "zstd": "zstd",
    "cpio": "cpio",
    "rsync": "rsync",
    "depmod": "kmod",
    "modinfo": "kmod",
}

#: Headers a kernel build includes from the host, and the package that ships each.
HEADER_PACKAGES: Final[Mapping[str, str]] = {
    "gelf.h": "libelf-dev",
    "libelf.h": "libelf-dev",
    "openssl/opensslv.h": "libssl-dev",
    "openssl/bio.h": "libssl-dev",
    "openssl/evp.h": "libssl-dev",
    "openssl/err.h": "libssl-dev",
}

_NOT_FOUND = re.compile(r"(?:^|[\s:])([\w.+-]+): (?:command )?not found\s*$")
_NO_PROGRAM = re.compile(r"^make(?:\[\d+\])?: ([\w./+-]+): No such file or directory")
_NO_HEADER = re.compile(r"fatal error: ([\w./+-]+\.h): No such file or directory")
_HUNK = re.compile(r"^Hunk #\d+ FAILED at \d+")
_FUZZ = re.compile(r"^Hunk #\d+ succeeded at \d+ .*with fuzz")
_COMPILER = re.compile(r"^\S+:\d+:\d+: error: .+")
_MAKE_ERROR = re.compile(r"^make(?:\[\d+\])?: \*\*\* \[(.+?)\] Error \d+")


def install_hint(tool: str) -> str:
    """``pahole is not installed (apt-get install pahole)``; unknown tools name no package."""
    base = tool.rsplit("/", 1)[-1]
    package = TOOL_PACKAGES.get(base)
    if package is None:
        return f"{base} is not installed"
    return f"{base} is not installed (apt-get install {package})"


def diagnose(text: str) -> str | None:
    """The line of a build log that says why it failed, rewritten to say what to do.

    Only the output of the last command is read (after its ``$ argv`` line). Causes are
    ranked: a missing program or header explains every error after it, so it wins over
    the first compiler error, which wins over a failed patch hunk, which wins
    over make's own ``*** [target] Error`` line. ``None`` when the log names no cause.

    >>> diagnose("  BTF [M] nbd.ko\\n/bin/sh: 1: pahole: not found\\nmake[2]: *** [x] Error 127")
    'pahole is not installed (apt-get install pahole)'
    """
    lines = [line.rstrip() for line in text.splitlines()]
    # Logs are appended to across attempts; the builders write "$ argv" before each command.
    starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
    if starts:
        lines = lines[starts[-1] + 1 :]
    for line in lines:
        missing = _NOT_FOUND.search(line) or _NO_PROGRAM.search(line)
        if missing:
            return install_hint(missing.group(1))
    for line in lines:
        header = _NO_HEADER.search(line)
        if header:
            name = header.group(1)
            package = HEADER_PACKAGES.get(name)
            where = f" (apt-get install {package})" if package else ""
            return f"the header {name} is missing{where}"
    for line in lines:
        if _COMPILER.match(line):
            return f"compile error: {line[:300]}"
    for line in lines:
        if _HUNK.match(line) or _FUZZ.match(line):
            return f"patch: {line[:300]}"
    for line in lines:
        failed = _MAKE_ERROR.match(line)
        if failed:
            return f"make failed at {failed.group(1)}"
    return None
