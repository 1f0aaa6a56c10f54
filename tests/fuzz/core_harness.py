"""Coverage-guided fuzzing of the sans-IO core (negotiation.py, transmission.py) with atheris.

:func:`check_stream` feeds arbitrary client bytes, cut into chunks the input chooses,
into :class:`~nbdserver.negotiation.Negotiation` and then, after a ``Ready``, into
:class:`~nbdserver.transmission.Transmission`, and builds every reply the adapter would
ask for. The core's contract: it only ever returns events (``OptionHandled``, ``Ready``,
``Command``, ``Rejected``, ``Closed``) and raises nothing for any input, so *any*
exception here is a bug, and so is a broken invariant (consumed bytes, WRITE payloads).

Sessions with extended headers (NBD_OPT_EXTENDED_HEADERS) get the extended decoder and
framing, as in the server; the seeds include them (tests/fuzz/sessions.py).

Run (from the repository root)::

    python tests/fuzz/core_harness.py -runs=20000            # what CI runs, seconds
    python tests/fuzz/core_harness.py -max_total_time=3600 CORPUS_DIR   # an hour
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # run as a script: make nbdserver and fuzz importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).parents[1])]

import atheris

from fuzz.sessions import session

with atheris.instrument_imports(include=["nbdserver"]):
    from nbdserver.extended import open_transmission
    from nbdserver.negotiation import Closed, ExportInfo, Negotiation, OptionHandled, Ready
    from nbdserver.protocol import REQUEST, Cmd, Extent, TransmissionFlag
    from nbdserver.transmission import Command, Rejected, Session, Transmission

_ALL = TransmissionFlag(0)
for _flag in TransmissionFlag:
    _ALL |= _flag
EXPORTS = {
    "": ExportInfo("", "scratch", 128 * 1024, _ALL & ~TransmissionFlag.READ_ONLY),
    "ro": ExportInfo(
        "ro", "", 64 * 1024, TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY, 512
    ),
}


#: Seed WRITEs stay short so whole sessions fit in MAX_INPUT (inputs are cut there).
MAX_WRITE = 2048
MAX_INPUT = 16 * 1024


def _chunks(data: bytes) -> list[bytes]:
    """The first byte picks how the rest is cut (as TCP might deliver it)."""
    if not data:
        return []
    step = data[0] or len(data)
    body = data[1:]
    return [body[i : i + step] for i in range(0, len(body), step)]


def _answer(tx: Transmission, event: Command | Rejected | Closed) -> None:
    """Build the reply the adapter would send for ``event``."""
    if isinstance(event, Rejected):
        reply = tx.error_reply(event.cookie, event.error.errno, str(event.error), event.offset)
        assert isinstance(reply, bytes)
        return
    if isinstance(event, Closed):
        return
    if event.type == Cmd.DISC:  # its offset and length are reserved, never used
        return
    assert event.offset >= 0 and event.offset + event.length <= tx.session.size, event
    if event.type == Cmd.WRITE:
        assert event.payload is not None and len(event.payload) == event.length
    elif event.type == Cmd.READ:
        tx.read_prefix(event)
        tx.sendfile_frame(event)
        data = bytes(event.length // 2) + b"\1" * (event.length - event.length // 2)
        tx.read_reply(event, data)
    elif event.type == Cmd.BLOCK_STATUS:
        half = event.length // 2
        extents = [
            Extent(event.offset, half, True, True),
            Extent(event.offset + half, event.length - half, False, False),
        ]
        tx.block_status_reply(event, [e for e in extents if e.length])
    else:
        assert tx.ack_command(event)


def _transmit(ready: Ready, first: bytes, rest: list[bytes], budget: int | None) -> None:
    tx = open_transmission(Session.from_ready(ready))
    pending = first
    for chunk in [b"", *rest]:
        pending += chunk
        while pending:
            view = memoryview(pending)
            events, used = tx.receive(view, budget)
            assert 0 <= used <= len(pending), (used, len(pending))
            for event in events:
                assert isinstance(event, (Command, Rejected, Closed)), event
                _answer(tx, event)
            del view, events
            pending = pending[used:]
            if not used:
                break
        if tx.closed is not None:
            break
    assert tx.needed >= REQUEST.size
    tx.shutdown()
    tx.drained()
    tx.lost()


def check_stream(data: bytes) -> None:
    """Feed ``data`` as a client's byte stream; raise only on a bug."""
    chunks = _chunks(data)
    budget = None if not data or data[0] & 1 else 64 * 1024
    neg = Negotiation(EXPORTS)
    assert neg.data_to_send()  # the greeting
    for i, chunk in enumerate(chunks):
        for event in neg.receive_data(chunk):
            assert isinstance(event, (OptionHandled, Ready, Closed)), event
            if isinstance(event, Ready):
                neg.data_to_send()
                _transmit(event, neg.trailing_data, chunks[i + 1 :], budget)
                return
            if isinstance(event, Closed):
                return
        neg.data_to_send()


def write_seeds(directory: Path, count: int = 64) -> Path:
    """Valid sessions (tests/fuzz/sessions.py) as the starting corpus, each cut into
    chunks of a different size (the first byte)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        frames = session(random.Random(f"seed:{i}"), max_length=MAX_WRITE).frames()
        step = (0, 1, 3, 28, 100, 255)[i % 6]
        (directory / f"session-{i}").write_bytes(bytes([step]) + b"".join(frames))
    return directory


def main() -> None:
    argv = list(sys.argv)
    if not [a for a in argv[1:] if not a.startswith("-")]:  # no corpus given: seeds
        argv.append(str(write_seeds(Path(tempfile.mkdtemp(prefix="nbd-core-corpus-")))))
    if not [a for a in argv if a.startswith("-max_len=")]:
        argv.append(f"-max_len={MAX_INPUT}")
    atheris.Setup(argv, lambda data: check_stream(bytes(data)))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
