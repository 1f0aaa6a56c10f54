"""The fuzzers' seed sessions cover both header styles, and their frames parse back."""

from __future__ import annotations

import random

from nbdserver.protocol import Cmd, CmdFlag

from .mutate import reshape_requests
from .sessions import parse_request, session


def test_seed_sessions_cover_extended_headers() -> None:
    sessions = [session(random.Random(f"seed:{i}")) for i in range(200)]
    extended = [s for s in sessions if s.negotiated.extended]
    assert 0 < len(extended) < len(sessions)
    for s in sessions:
        for frame in s.requests:
            is_ext, flags, cmd, _, _, length, payload = parse_request(frame)
            assert is_ext == s.negotiated.extended
            if cmd == Cmd.WRITE:
                assert len(payload) == length
                assert bool(flags & CmdFlag.PAYLOAD_LEN) == is_ext
            else:
                assert payload == b""


def test_reshaped_extended_requests_stay_well_framed() -> None:
    """PAYLOAD_LEN is set exactly when a payload follows, so every reshaped case can be
    answered request by request."""
    rng = random.Random(3)
    checked = 0
    for i in range(300):
        s = session(random.Random(f"ext:{i}"))
        if not s.negotiated.extended:
            continue
        frames, _ = reshape_requests(rng, s.requests)
        for frame in frames:
            is_ext, flags, cmd, _, _, length, payload = parse_request(frame)
            assert is_ext
            carries = bool(flags & CmdFlag.PAYLOAD_LEN) or cmd == Cmd.WRITE
            assert len(payload) == (length if carries else 0)
            checked += 1
    assert checked > 100
