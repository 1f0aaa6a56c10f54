"""A fault-injecting TCP proxy for tests, between a real NBD client and nbd-serve.

Theory of operation
-------------------
:class:`FaultProxy` listens on 127.0.0.1 port 0 and runs its own asyncio loop in a
background thread, so the test thread is free to run a client subprocess (libnbd,
nbdcopy, nbdinfo) against it. Every accepted connection opens one to the server and two
pumps copy bytes, one per direction ("up" = client to server, "down" = server to client).

Each connection gets one :class:`Fault` from the proxy's plan (a function of the
connection's index): after ``after`` bytes have passed in ``direction``, the fault fires:

- ``delay``: from then on each chunk waits ``seconds`` and is forwarded in two pieces
  (so messages arrive fragmented and late);
- ``stall``: forwarding in that direction stops for ``seconds``, then resumes;
- ``truncate``: the bytes up to ``after`` are delivered, then both sides get an orderly
  close (FIN): a message is cut in the middle;
- ``reset``: the bytes up to ``after`` are delivered, then both sides are closed with
  SO_LINGER 0, which sends a TCP RST.

:meth:`Fault.random` draws one from a seeded ``random.Random``, so a failing case is
replayed from its seed. :attr:`FaultProxy.records` says what happened on each connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down"]
Action = Literal["pass", "delay", "stall", "truncate", "reset"]

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Fault:
    """What to do to one connection (see the module docstring)."""

    action: Action = "pass"
    direction: Direction = "down"
    after: int = 0
    seconds: float = 0.0

    @classmethod
    def random(cls, rng: random.Random, max_after: int) -> Fault:
        action = rng.choice(["delay", "stall", "truncate", "reset"])
        seconds = {"delay": rng.uniform(0.0005, 0.005), "stall": rng.uniform(0.1, 0.8)}
        return cls(
            action=action,
            direction=rng.choice(["up", "down"]),
            after=rng.randrange(max_after),
            seconds=seconds.get(action, 0.0),
        )


@dataclass
class Record:
    """One proxied connection: its fault, whether it fired, bytes forwarded each way."""

    fault: Fault
    fired: bool = False
    forwarded: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER on, timeout 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """127.0.0.1:port -> 127.0.0.1:target, applying ``plan(index)`` to connection index."""

    def __init__(self, target_port: int, plan: Callable[[int], Fault]) -> None:
        self.target_port = target_port
        self.plan = plan
        self.port = 0
        self.records: list[Record] = []
        self._count = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)

    # --- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> FaultProxy:
        self._thread.start()
        assert self._ready.wait(10), "fault proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "fault proxy did not stop"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            # Connections still open (a client killed mid-run) end with the proxy.
            for writer in self._writers:
                writer.transport.abort()
            await asyncio.gather(*self._handlers, return_exceptions=True)

    # --- one connection ---------------------------------------------------------------
    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(cwriter)
        try:
            await self._proxy(creader, cwriter)
        finally:
            self._writers.discard(cwriter)
            self._handlers.discard(task)

    async def _proxy(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        record = Record(self.plan(next(self._count)))
        self.records.append(record)
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _rst(cwriter)
            return
        self._writers.add(swriter)
        done = asyncio.Event()
        pumps = [
            asyncio.create_task(self._pump(record, "up", (creader, swriter, cwriter), done)),
            asyncio.create_task(self._pump(record, "down", (sreader, cwriter, swriter), done)),
        ]
        await asyncio.gather(*pumps, return_exceptions=True)
        self._writers.discard(swriter)
        for writer in (cwriter, swriter):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _pump(
        self,
        record: Record,
        direction: Direction,
        ends: tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamWriter],
        done: asyncio.Event,
    ) -> None:
        """Copy ``reader`` to ``writer``; ``other`` is the opposite side's writer."""
        reader, writer, other = ends
        fault = record.fault
        armed = fault.action != "pass" and fault.direction == direction
        delaying = False
        try:
            while not done.is_set():
                data = await reader.read(CHUNK)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                if (
                    armed
                    and not record.fired
                    and record.forwarded[direction] + len(data) > (fault.after)
                ):
                    record.fired = True
                    head = fault.after - record.forwarded[direction]
                    await self._send(record, writer, direction, data[:head])
                    data = data[head:]
                    if fault.action in ("truncate", "reset"):
                        done.set()
                        for w in (writer, other):
                            if fault.action == "reset":
                                _rst(w)
                            else:
                                w.close()
                        return
                    if fault.action == "stall":
                        await asyncio.sleep(fault.seconds)
                    delaying = fault.action == "delay"
                if delaying:
                    half = len(data) // 2
                    await asyncio.sleep(fault.seconds)
                    await self._send(record, writer, direction, data[:half])
                    await asyncio.sleep(fault.seconds)
                    data = data[half:]
                await self._send(record, writer, direction, data)
        except (ConnectionError, OSError):
            done.set()
            _rst(other)

    @staticmethod
    async def _send(
        record: Record, writer: asyncio.StreamWriter, direction: str, data: bytes
    ) -> None:
        if not data:
            return
        writer.write(data)
        await writer.drain()
        record.forwarded[direction] += len(data)
