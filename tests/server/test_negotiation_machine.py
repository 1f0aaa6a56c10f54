"""A hypothesis state machine drives the handshake with options in any order, cut
into arbitrary pieces, and checks every reply against a small model of the spec."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nbdserver.negotiation import Closed, ExportInfo, Negotiation, OptionHandled, Phase, Ready
from nbdserver.protocol import (
    CLIENT_FLAGS,
    ClientFlag,
    Info,
    Opt,
    OptionReply,
    OptionRequest,
    Rep,
    TransmissionFlag,
    pack_info_go,
    pack_meta_context,
)

FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_DF
EXPORTS = {
    "a": ExportInfo("a", "first", 1 << 20, FLAGS),
    "b": ExportInfo("b", "", 2 << 20, FLAGS | TransmissionFlag.READ_ONLY),
}
NAMES = st.sampled_from([b"a", b"b", b"", b"zz"])


class Handshake(RuleBasedStateMachine):
    @initialize(cut=st.integers(1, 7))
    def start(self, cut: int) -> None:
        self.neg = Negotiation(EXPORTS)
        self.out = self.neg.data_to_send()
        self.cut = cut
        self.structured = False
        self.extended = False
        self.closed = False
        self.meta_export: str | None = None
        self.ready: Ready | None = None
        self._send(CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
        assert self.neg.phase is Phase.OPTION_HEADER

    def _send(self, data: bytes) -> list[object]:
        events: list[object] = []
        for i in range(0, len(data), self.cut):
            events += self.neg.receive_data(data[i : i + self.cut])
        return events

    def _option(self, option: int, data: bytes) -> tuple[list[OptionReply], list[object]]:
        events = self._send(OptionRequest(option, data).pack())
        raw = self.neg.data_to_send()
        replies, pos = [], 0
        while pos < len(raw):
            reply, used = OptionReply.unpack(raw[pos:])
            replies.append(reply)
            pos += used
        assert all(r.option == option for r in replies)
        return replies, events

    @staticmethod
    def _resolve(name: bytes) -> str | None:
        text = name.decode()
        # No export is called "", so the empty name is refused like any unknown one.
        return text if text in EXPORTS else None

    def _open(self) -> bool:
        return self.ready is None and not self.closed

    def _chunked(self) -> bool:
        return self.structured or self.extended

    @precondition(_open)
    @rule()
    def structured_reply(self) -> None:
        replies, _ = self._option(Opt.STRUCTURED_REPLY, b"")
        if self.extended:
            # "The client has already successfully negotiated extended headers, which
            # takes precedence over this option."
            assert [r.reply for r in replies] == [Rep.ERR_EXT_HEADER_REQD]
            return
        assert [r.reply for r in replies] == [Rep.ACK]
        self.structured = True

    @precondition(_open)
    @rule(data=st.sampled_from([b"", b"", b"x", b"\0\0\0\0"]))
    def extended_headers(self, data: bytes) -> None:
        replies, _ = self._option(Opt.EXTENDED_HEADERS, data)
        if data:
            assert [r.reply for r in replies] == [Rep.ERR_INVALID]
            return
        assert [r.reply for r in replies] == [Rep.ACK]  # repeats too
        self.extended = True

    @precondition(lambda self: self._open() and self.extended)
    @rule()
    def export_name_after_extended(self) -> None:
        """ "MUST NOT use this option" once extended headers are on: the session ends."""
        replies, events = self._option(Opt.EXPORT_NAME, b"a")
        assert replies == []
        assert isinstance(events[-1], Closed) and events[-1].violation
        self.closed = True

    @precondition(_open)
    @rule(name=NAMES, query=st.sampled_from([b"base:allocation", b"base:", b"other:x"]))
    def set_meta_context(self, name: bytes, query: bytes) -> None:
        replies, _ = self._option(Opt.SET_META_CONTEXT, pack_meta_context(name, [query]))
        self.meta_export = None
        kinds = [r.reply for r in replies]
        if not self._chunked():
            assert kinds == [Rep.ERR_INVALID]
        elif self._resolve(name) is None:
            assert kinds == [Rep.ERR_UNKNOWN]
        elif query == b"base:allocation":
            assert kinds == [Rep.META_CONTEXT, Rep.ACK]
            assert replies[0].data == b"\0\0\0\1base:allocation"
            self.meta_export = self._resolve(name)
        else:
            assert kinds == [Rep.ACK]

    @precondition(_open)
    @rule(name=NAMES)
    def info(self, name: bytes) -> None:
        replies, events = self._option(Opt.INFO, pack_info_go(name, [Info.BLOCK_SIZE]))
        target = self._resolve(name)
        if target is None:
            assert [r.reply for r in replies] == [Rep.ERR_UNKNOWN]
            return
        assert replies[-1].reply == Rep.ACK
        export = next(r.data for r in replies if r.data[:2] == b"\0\0")
        assert int.from_bytes(export[2:10], "big") == EXPORTS[target].size
        flags = int.from_bytes(export[10:12], "big")
        assert bool(flags & TransmissionFlag.SEND_DF) == self._chunked()
        assert not flags & TransmissionFlag.BLOCK_STAT_PAYLOAD
        assert isinstance(events[-1], OptionHandled)

    @precondition(_open)
    @rule(option=st.integers(12, 2**32 - 1), data=st.binary(max_size=20))
    def unknown_option(self, option: int, data: bytes) -> None:
        replies, _ = self._option(option, data)
        assert [r.reply for r in replies] == [Rep.ERR_UNSUP]

    @precondition(_open)
    @rule(name=NAMES)
    def go(self, name: bytes) -> None:
        replies, events = self._option(Opt.GO, pack_info_go(name, []))
        target = self._resolve(name)
        if target is None:
            assert [r.reply for r in replies] == [Rep.ERR_UNKNOWN]
            return
        assert replies[-1].reply == Rep.ACK
        ready = events[-1]
        assert isinstance(ready, Ready)
        assert ready.export.name == target and ready.structured == self._chunked()
        assert ready.extended == self.extended
        # Block status only for the export the final SET_META_CONTEXT named.
        assert (ready.meta_context is not None) == (self.meta_export == target)
        self.ready = ready

    @precondition(lambda self: self.ready is not None or self.closed)
    @rule()
    def negotiation_is_over(self) -> None:
        """After GO the bytes belong to transmission, after a close to nobody; the
        handshake refuses them."""
        try:
            self.neg.receive_data(b"x")
        except RuntimeError as exc:
            assert "negotiation is over" in str(exc)
        else:
            raise AssertionError("receive_data after GO must raise")

    @invariant()
    def phase_matches_model(self) -> None:
        if hasattr(self, "neg"):
            if self.closed:
                expected = Phase.CLOSED
            elif self.ready is not None:
                expected = Phase.TRANSMISSION
            else:
                expected = Phase.OPTION_HEADER
            assert self.neg.phase is expected


Handshake.TestCase.settings = settings(max_examples=150, stateful_step_count=12, deadline=None)
TestHandshake = Handshake.TestCase
