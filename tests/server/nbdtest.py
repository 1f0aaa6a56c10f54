"""Test helpers shared by tests/server, tests/interop and tests/badinput.

- :func:`running_server` starts the real ``nbd-serve`` on port 0 and waits for its
  ``--ready-file`` (never a fixed port), and checks it exits 0 on SIGTERM.
- :class:`RawClient` is a tiny blocking NBD client built on the project's own wire
  format (nbdserver.protocol), for byte-level tests where real clients cannot go.
- :func:`require_tool` fails (never skips) with what to install when a peer is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nbdserver.protocol import (
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    EXTENDED_HEADER,
    GREETING,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_HEADER,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_HEADER,
    U32,
    ClientFlag,
    CmdFlag,
    ExtendedChunk,
    ExtendedRequest,
    Opt,
    OptionReply,
    OptionRequest,
    Rep,
    ReplyFlag,
    Request,
    SimpleReply,
    StructuredChunk,
    pack_info_go,
    pack_meta_context,
)

from .crashwatch import assert_log_clean

NBD_SERVE = str(Path(sys.executable).parent / "nbd-serve")
#: Guard against a hung server process; a test never asserts on time.
STARTUP_GUARD_S = 30.0

APT_PACKAGE = {
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdsh": "libnbd-bin",
    "qemu-io": "qemu-utils",
    "qemu-img": "qemu-utils",
    "fio": "fio",
}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: apt-get install {APT_PACKAGE.get(name, name)}",
            pytrace=False,
        )
    return path


def run_tool(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a peer tool to completion, capturing its text output (never raises on failure)."""
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)


def require_python3_libnbd() -> str:
    python = "/usr/bin/python3"
    probe = subprocess.run([python, "-c", "import nbd"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.fail("python3-libnbd is missing: apt-get install python3-libnbd", pytrace=False)
    return python


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    ready: dict[str, object]
    stderr_path: Path
    stats_path: Path | None = None
    extra: dict[str, object] = field(default_factory=dict)
    #: Characters of the log already checked by :meth:`assert_no_crash`.
    checked: int = 0

    @property
    def port(self) -> int:
        for item in self.ready["listen"]:  # type: ignore[attr-defined]
            if item["kind"] == "tcp":
                return int(item["port"])
        raise AssertionError("server has no TCP listener")

    def uri(self, name: str = "") -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def assert_no_crash(self, *, strict: bool = False, what: str = "nbd-serve log") -> None:
        """The log written since the last check shows no unhandled exception (``strict``:
        no ERROR line either), so each crash fails the test that caused it, once."""
        text = self.log()
        new, self.checked = text[self.checked :], len(text)
        assert_log_clean(new, strict=strict, what=what)


@contextlib.contextmanager
def running_server(
    tmp_path: Path, *args: str, expect_exit: int = 0, strict_log: bool = False
) -> Iterator[ServerProcess]:
    """Run ``nbd-serve --port 0 --ready-file ... ARGS``; stop it with SIGTERM afterwards.

    Once it has exited, its log must show no unhandled exception (``strict_log``: and no
    ERROR line at all), see tests/server/crashwatch.py.
    """
    ready_file = tmp_path / f"ready-{time.monotonic_ns()}.json"
    stderr_path = tmp_path / f"nbd-serve-{time.monotonic_ns()}.log"
    argv = [NBD_SERVE, "--ready-file", str(ready_file), *args]
    if "--port" not in args and "--unix" not in args and "--config" not in args:
        argv += ["--port", "0"]
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + STARTUP_GUARD_S
        while not ready_file.exists():
            if proc.poll() is not None:
                pytest.fail(f"nbd-serve exited {proc.returncode}: {stderr_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"nbd-serve did not become ready: {stderr_path.read_text()}")
            time.sleep(0.02)
        ready = json.loads(ready_file.read_text())
        server = ServerProcess(proc, ready, stderr_path)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=STARTUP_GUARD_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    assert code == expect_exit, f"nbd-serve exit code {code}; log:\n{stderr_path.read_text()}"
    server.assert_no_crash(strict=strict_log, what="nbd-serve log up to its exit")


class RawClient:
    """A blocking NBD client speaking exactly what the test tells it to."""

    def __init__(self, port: int | None = None, *, sock: socket.socket | None = None) -> None:
        if sock is None:
            assert port is not None
            sock = socket.create_connection(("127.0.0.1", port), timeout=STARTUP_GUARD_S)
        self.sock = sock
        self.structured = False
        #: NBD_OPT_EXTENDED_HEADERS was acknowledged: requests are 32-byte extended ones
        #: and replies extended chunks.
        self.extended = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"server closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def at_eof(self) -> bool:
        """True when the server closed the connection (reads return EOF or reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # --- handshake ---
    def greeting(self) -> int:
        magic, opt_magic, flags = GREETING.unpack(self.recv_exact(GREETING.size))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        return int(flags)

    def handshake(self, flags: int = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES) -> None:
        self.greeting()
        self.send(CLIENT_FLAGS.pack(flags))

    def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option; collect replies up to the final one (ACK or an error)."""
        self.send(OptionRequest(option, data).pack())
        replies = []
        while True:
            header = self.recv_exact(OPTION_REPLY_HEADER.size)
            length = int.from_bytes(header[-4:], "big")
            reply, _ = OptionReply.unpack(header + self.recv_exact(length))
            replies.append(reply)
            if reply.reply == Rep.ACK or reply.reply & (1 << 31):
                return replies

    def go(
        self,
        name: bytes = b"",
        *,
        structured: bool = True,
        meta: bool = True,
        greet: bool = True,
        extended: bool = False,
    ) -> int:
        """Negotiate and enter transmission; return the export size. ``greet=False``: the
        handshake (greeting and client flags) was done already. ``extended``: negotiate
        NBD_OPT_EXTENDED_HEADERS instead of structured replies."""
        if greet:
            self.handshake()
        if extended:
            assert self.option(Opt.EXTENDED_HEADERS)[-1].reply == Rep.ACK
            self.structured = self.extended = True
        elif structured:
            assert self.option(Opt.STRUCTURED_REPLY)[-1].reply == Rep.ACK
            self.structured = True
        if self.structured and meta:
            replies = self.option(
                Opt.SET_META_CONTEXT, pack_meta_context(name, [b"base:allocation"])
            )
            assert replies[-1].reply == Rep.ACK
        replies = self.option(Opt.GO, pack_info_go(name, []))
        assert replies[-1].reply == Rep.ACK, replies
        info = next(r for r in replies if r.reply == Rep.INFO and r.data[:2] == b"\0\0")
        return int.from_bytes(info.data[2:10], "big")

    def export_name(self, name: bytes = b"") -> tuple[int, int]:
        self.handshake()
        self.send(OptionRequest(Opt.EXPORT_NAME, name).pack())
        size, flags = EXPORT_NAME_REPLY.unpack(self.recv_exact(EXPORT_NAME_REPLY.size))
        return size, flags

    # --- transmission ---
    def request(
        self,
        type_: int,
        offset: int = 0,
        length: int = 0,
        *,
        cookie: int = 1,
        flags: int = 0,
        payload: bytes = b"",
    ) -> None:
        """Send one request. With extended headers a ``payload`` sets
        NBD_CMD_FLAG_PAYLOAD_LEN, as the spec requires of a WRITE, and ``length`` is the
        payload's; send :class:`ExtendedRequest` bytes by hand to break that rule."""
        if self.extended:
            if payload:
                flags |= CmdFlag.PAYLOAD_LEN
                length = len(payload)
            self.send(ExtendedRequest(flags, type_, cookie, offset, length).pack() + payload)
            return
        self.send(Request(flags, type_, cookie, offset, length).pack() + payload)

    def simple_reply(self, read_length: int = 0) -> tuple[SimpleReply, bytes]:
        reply = SimpleReply.unpack(self.recv_exact(SIMPLE_REPLY.size))
        data = self.recv_exact(read_length) if read_length and reply.error == 0 else b""
        return reply, data

    def chunk(self) -> StructuredChunk:
        header = self.recv_exact(STRUCTURED_HEADER.size)
        length = int.from_bytes(header[16:20], "big")
        chunk, _ = StructuredChunk.unpack(header + self.recv_exact(length))
        return chunk

    def ext_reply(self) -> list[ExtendedChunk]:
        """Read one whole extended reply: chunks up to the DONE one."""
        chunks = []
        while True:
            header = self.recv_exact(EXTENDED_HEADER.size)
            length = int.from_bytes(header[24:32], "big")
            chunk, _ = ExtendedChunk.unpack(header + self.recv_exact(length))
            chunks.append(chunk)
            if chunk.flags & ReplyFlag.DONE:
                return chunks

    def reply(self) -> list[StructuredChunk] | SimpleReply:
        """Read one whole reply: a simple reply, or chunks up to the DONE one (extended
        replies: :meth:`ext_reply`)."""
        assert not self.extended, "use ext_reply() with extended headers"
        magic = self.recv_exact(4)
        if magic == U32.pack(SIMPLE_REPLY_MAGIC):
            rest = self.recv_exact(SIMPLE_REPLY.size - 4)
            return SimpleReply.unpack(magic + rest)
        chunks = []
        header = magic + self.recv_exact(STRUCTURED_HEADER.size - 4)
        while True:
            length = int.from_bytes(header[16:20], "big")
            chunk, _ = StructuredChunk.unpack(header + self.recv_exact(length))
            chunks.append(chunk)
            if chunk.flags & ReplyFlag.DONE:
                return chunks
            header = self.recv_exact(STRUCTURED_HEADER.size)


def nbdsh_script(python: str, uri: str, body: str) -> subprocess.CompletedProcess[str]:
    """Run ``body`` under /usr/bin/python3 with ``import nbd`` and ``URI`` defined."""
    script = f"import nbd, sys, json\nURI = {uri!r}\n{body}\n"
    return subprocess.run(
        [python, "-c", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "LIBNBD_DEBUG": "0"},
    )
