"""nbdinfo, nbdsh/python3-libnbd and nbdcopy against the real nbd-serve."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from server.nbdtest import (
    ServerProcess,
    nbdsh_script,
    require_python3_libnbd,
    require_tool,
)

pytestmark = pytest.mark.interop
MiB = 1 << 20


def run_json_script(srv: ServerProcess, body: str, name: str = "") -> dict[str, object]:
    python = require_python3_libnbd()
    done = nbdsh_script(python, srv.uri(name), body)
    assert done.returncode == 0, f"script failed:\n{done.stderr}\nserver log:\n{srv.log()}"
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_nbdinfo_json_shows_every_capability(memory_server: ServerProcess) -> None:
    nbdinfo = require_tool("nbdinfo")
    out = subprocess.run(
        [nbdinfo, "--json", memory_server.uri()], capture_output=True, text=True, check=True
    )
    info = json.loads(out.stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (export,) = info["exports"]
    assert export["export-size"] == 256 * MiB
    assert export["description"] == "interop disk"
    assert export["contexts"] == ["base:allocation"]
    for cap in (
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ):
        assert export[cap] is True, cap
    assert export["is_read_only"] is False
    assert (
        export["block_size_minimum"],
        export["block_size_preferred"],
        export["block_size_maximum"],
    ) == (1, 4096, 32 * MiB)


def test_nbdinfo_list(multi_server: ServerProcess) -> None:
    nbdinfo = require_tool("nbdinfo")
    out = subprocess.run(
        [nbdinfo, "--list", "--json", multi_server.uri()],
        capture_output=True,
        text=True,
        check=True,
    )
    exports = {e["export-name"]: e for e in json.loads(out.stdout)["exports"]}
    assert set(exports) == {"ram", "disk", "golden"}
    assert exports["ram"]["description"] == "RAM disk"
    assert exports["ram"]["export-size"] == 64 * MiB
    assert exports["disk"]["export-size"] == 32 * MiB
    assert exports["golden"]["is_read_only"] is True
    assert exports["disk"]["is_read_only"] is False
    plain = subprocess.run(
        [nbdinfo, "--list", multi_server.uri()], capture_output=True, text=True, check=True
    )
    assert 'export="golden"' in plain.stdout


def test_opt_mode_negotiation(multi_server: ServerProcess) -> None:
    result = run_json_script(
        multi_server,
        """
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(URI)
names = []
h.opt_list(lambda name, desc: names.append([name, desc]))
h.set_export_name("disk")
h.opt_info()
info = {"size": h.get_size(), "desc": h.get_export_description(),
        "canon": h.get_canonical_export_name(), "ro": h.is_read_only(),
        "min": h.get_block_size(nbd.SIZE_MINIMUM), "max": h.get_block_size(nbd.SIZE_MAXIMUM)}
contexts = []
h.opt_list_meta_context(lambda ctx: contexts.append(ctx))
h.set_export_name("nope")
try:
    h.opt_info()
    unknown = "accepted"
except nbd.Error as e:
    import errno
    unknown = errno.errorcode.get(e.errnum, e.errnum)  # libnbd maps NBD_REP_ERR_UNKNOWN to ENOENT
h.set_export_name("golden")
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.opt_go()
after = {"ro": h.is_read_only(), "meta": h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
         "structured": h.get_structured_replies_negotiated(), "multi": h.can_multi_conn()}
data = h.pread(4, 0)
h.shutdown()
print(json.dumps({"names": names, "info": info, "contexts": contexts, "unknown": unknown,
                  "after": after, "data": data.hex()}))
""",
        "disk",
    )
    assert sorted(result["names"]) == [
        ["disk", "a sparse file"],
        ["golden", ""],
        ["ram", "RAM disk"],
    ]  # type: ignore[arg-type]
    assert result["info"] == {
        "size": 32 * MiB,
        "desc": "a sparse file",
        "canon": "disk",
        "ro": False,
        "min": 1,
        "max": 32 * MiB,
    }
    assert result["contexts"] == ["base:allocation"]
    assert result["unknown"] == "ENOENT"
    assert result["after"] == {"ro": True, "meta": True, "structured": True, "multi": True}
    assert result["data"] == "5a5a5a5a"


def test_out_of_range_errnos_with_strict_mode_off(multi_server: ServerProcess) -> None:
    result = run_json_script(
        multi_server,
        """
import errno
h = nbd.NBD()
h.set_strict_mode(0)  # let every bad request reach the server
h.connect_uri(URI)
size = h.get_size()
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = 0
    except nbd.Error as e:
        out[name] = errno.errorcode.get(e.errnum, e.errnum)
attempt("read_past_end", lambda: h.pread(512, size))
attempt("write_past_end", lambda: h.pwrite(b"x" * 512, size))
attempt("zero_past_end", lambda: h.zero(1024, size - 512))
attempt("trim_past_end", lambda: h.trim(512, size))
attempt("cache_past_end", lambda: h.cache(512, size))
attempt("block_status_past_end", lambda: h.block_status(512, size, lambda *a: 0))
attempt("bad_flag", lambda: h.pread(512, 0, flags=nbd.CMD_FLAG_REQ_ONE))
attempt("ok_read", lambda: h.pread(512, 0))
h2 = nbd.NBD()
h2.set_strict_mode(0)
h2.connect_uri(URI.rsplit("/", 1)[0] + "/golden")
def attempt2(name, fn):
    try:
        fn()
        out[name] = 0
    except nbd.Error as e:
        out[name] = errno.errorcode.get(e.errnum, e.errnum)
attempt2("ro_write", lambda: h2.pwrite(b"x" * 512, 0))
attempt2("ro_trim", lambda: h2.trim(512, 0))
attempt2("ro_zero", lambda: h2.zero(512, 0))
print(json.dumps(out))
""",
        "ram",
    )
    assert result == {
        "read_past_end": "EINVAL",
        "write_past_end": "ENOSPC",
        "zero_past_end": "ENOSPC",
        "trim_past_end": "EINVAL",
        "cache_past_end": "EINVAL",
        "block_status_past_end": "EINVAL",
        "bad_flag": "EINVAL",
        "ok_read": 0,
        "ro_write": "EPERM",
        "ro_trim": "EPERM",
        "ro_zero": "EPERM",
    }


def test_structured_reads_block_status_fast_zero_cache(memory_server: ServerProcess) -> None:
    result = run_json_script(
        memory_server,
        """
import errno
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(URI)
MiB = 1 << 20
h.pwrite(b"\\x11" * 65536, 2 * MiB, nbd.CMD_FLAG_FUA)
KIND = {nbd.READ_DATA: "data", nbd.READ_HOLE: "hole"}
def recorder(into):
    def chunk(subbuf, offset, status, error):
        into.append([offset, len(subbuf), KIND.get(status, status)])
        return 0
    return chunk
chunks, df_chunks, extents, one = [], [], [], []
buf = h.pread_structured(4 * MiB, 0, recorder(chunks))
buf_df = h.pread_structured(4 * MiB, 0, recorder(df_chunks), nbd.CMD_FLAG_DF)
def extent_cb(into):
    return lambda ctx, off, entries, err: into.append([ctx, off, list(entries)]) or 0
h.block_status(4 * MiB, 0, extent_cb(extents))
h.block_status(4 * MiB, 0, extent_cb(one), nbd.CMD_FLAG_REQ_ONE)
h.zero(65536, 2 * MiB, nbd.CMD_FLAG_FAST_ZERO)
zeroed = h.pread(65536, 2 * MiB) == bytes(65536)
try:
    h.zero(65536, 3 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    fast_no_hole = 0
except nbd.Error as e:
    fast_no_hole = errno.errorcode.get(e.errnum, e.errnum)
h.cache(MiB, 0)
h.flush()
ok = buf[2 * MiB : 2 * MiB + 65536] == b"\\x11" * 65536 and buf == buf_df
print(json.dumps({"chunks": chunks, "df": df_chunks, "ok": ok,
                  "extents": extents, "one": one, "zeroed": zeroed, "fast_no_hole": fast_no_hole,
                  "fast_zero": h.can_fast_zero(), "df_ok": h.can_df()}))
""",
    )
    MiB_ = MiB
    assert result["chunks"] == [
        [0, 2 * MiB_, "hole"],
        [2 * MiB_, 65536, "data"],
        [2 * MiB_ + 65536, 2 * MiB_ - 65536, "hole"],
    ]
    assert result["df"] == [[0, 4 * MiB_, "data"]]
    assert result["ok"] is True
    assert result["extents"] == [
        ["base:allocation", 0, [2 * MiB_, 3, 65536, 0, 2 * MiB_ - 65536, 3]]
    ]
    assert result["one"] == [["base:allocation", 0, [2 * MiB_, 3]]]
    assert result["zeroed"] is True
    # The memory backend cannot zero without punching quickly: NO_HOLE+FAST_ZERO fails fast.
    assert result["fast_no_hole"] == "ENOTSUP"
    assert (result["fast_zero"], result["df_ok"]) == (True, True)


def test_nbdcopy_round_trip_multi_conn(export_server: ServerProcess, tmp_path: Path) -> None:
    nbdcopy = require_tool("nbdcopy")
    source = tmp_path / "source.img"
    with source.open("wb") as fh:
        for i in range(48):
            fh.write(os.urandom(MiB) if i % 3 else bytes(MiB))
        fh.truncate(256 * MiB)
    subprocess.run(
        [
            nbdcopy,
            "--connections=4",
            "--threads=4",
            "--requests=16",
            str(source),
            export_server.uri(),
        ],
        check=True,
    )
    back = tmp_path / "back.img"
    subprocess.run(
        [nbdcopy, "--connections=4", "--threads=4", export_server.uri(), str(back)], check=True
    )
    assert back.stat().st_size == source.stat().st_size
    with source.open("rb") as a, back.open("rb") as b:
        while True:
            x, y = a.read(4 * MiB), b.read(4 * MiB)
            assert x == y
            if not x:
                break
    # Multi-conn was really used: the server saw at least 4+4 data connections.
    log = export_server.log()
    assert log.count("export '' size=") >= 8, log
