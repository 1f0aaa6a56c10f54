"""The handshake phase of NBD as a sans-IO state machine (server side).

Theory of operation
-------------------
:class:`Negotiation` is fed the bytes the client sends (:meth:`Negotiation.receive_data`)
and answers with events; the bytes it wants sent accumulate in an outgoing buffer
(:meth:`Negotiation.data_to_send`). It never touches a socket or a clock.

Only fixed newstyle is spoken: the greeting is NBDMAGIC + IHAVEOPT + FIXED_NEWSTYLE|NO_ZEROES,
so an oldstyle client (which expects ``cliserv_magic`` and a size right away) cannot
proceed: "The server SHOULD refuse to allow oldstyle negotiations on the newstyle port"
(doc/proto.md "Newstyle negotiation").

The phase changes are data (:data:`TRANSITIONS`): a (phase, trigger) pair not in the
table is a bug and raises. A client that breaks a MUST of the handshake (unknown client
flags, bad option magic, an oversized EXPORT_NAME) moves the machine to CLOSED with a
:class:`Closed` event saying why; the adapter then drops only that connection.

Bounds: option data is buffered only up to :data:`MAX_OPTION_DATA`. A longer option is
read and thrown away as it arrives (never allocated) and then answered with
NBD_REP_ERR_TOO_BIG, so the session survives a client that merely *announces* 4 GiB.

TLS (doc/proto.md "TLS support"): :class:`TlsMode` OFF is the spec's NOTLS mode, ON its
SELECTIVETLS mode with no TLS-only export (a client may upgrade, never must), REQUIRE its
FORCEDTLS mode. An accepted NBD_OPT_STARTTLS queues the ACK, emits :class:`StartTLS` and
parks the machine in TLS_HANDSHAKE; the adapter sends the ACK, runs the TLS handshake and
calls :meth:`Negotiation.tls_established`, after which option haggling starts afresh.

Extended headers (NBD_OPT_EXTENDED_HEADERS, doc/proto.md of the extension-ext-header
branch): once acknowledged, :attr:`Negotiation.extended` makes the session speak 32-byte
requests and extended reply chunks (:class:`Ready` says so); the option can be switched
off per server (``extended_headers=False``), which answers it NBD_REP_ERR_UNSUP like a
server that predates it.

Allow-lists: an export whose :attr:`ExportInfo.allow` does not hold the client's address
is refused (NBD_REP_ERR_POLICY, or the end of the session for NBD_OPT_EXPORT_NAME) and left
out of NBD_OPT_LIST, and a :class:`Refused` event says so for the log.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

from nbdserver.protocol import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    EXPORT_NAME_ZEROES,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBDMAGIC,
    OPTION_HEADER,
    U16,
    U32,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    OptionReply,
    Rep,
    TransmissionFlag,
    unpack_info_go,
    unpack_meta_context,
)

#: Largest option payload that is buffered; longer ones are discarded as they arrive.
MAX_OPTION_DATA: Final = 64 * 1024

#: The context id the server hands out for base:allocation after SET_META_CONTEXT.
BASE_ALLOCATION_ID: Final = 1

SERVER_HANDSHAKE_FLAGS: Final = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class TlsMode(enum.Enum):
    """``--tls``: the server's TLS mode, named after doc/proto.md "Server-side requirements"."""

    #: NOTLS: NBD_OPT_STARTTLS is refused with NBD_REP_ERR_POLICY.
    OFF = "off"
    #: SELECTIVETLS with no TLS-only export: clients may upgrade; plain ones are served.
    ON = "on"
    #: FORCEDTLS: every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD until TLS runs.
    REQUIRE = "require"


def address_allowed(allow: tuple[IPNetwork, ...] | None, peer: IPAddress | None) -> bool:
    """Whether ``peer`` may use an export with allow-list ``allow`` (None = everyone).

    A client without an IP address (a Unix socket) is on no IP list, so an export with an
    allow-list refuses it; an IPv4 client seen on a dual-stack socket (``::ffff:a.b.c.d``)
    is checked as the IPv4 address it is.
    """
    if allow is None:
        return True
    if peer is None:
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    return any(peer in network for network in allow)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; :func:`transmission_flags` turns it into the flags an
    export advertises. Backends return it (re-exported by :mod:`nbdserver.backends.base`);
    it lives here so the core never imports a backend."""

    read_only: bool = False
    flush: bool = True
    fua: bool = True
    trim: bool = True
    zero: bool = True
    fast_zero: bool = True
    cache: bool = True
    extents: bool = True
    # True only when a flush through any connection covers writes completed on all
    # the others (doc/proto.md, NBD_FLAG_CAN_MULTI_CONN).
    multi_conn: bool = True
    # NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum payload.
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024
    #: Every call returns without waiting for storage (a RAM disk), so the adapter may
    #: run all of them on its event loop instead of the thread pool.
    never_blocks: bool = False


def transmission_flags(caps: Capabilities, read_only: bool) -> TransmissionFlag:
    """The flags an export advertises, before the per-session SEND_DF.

    SEND_DF depends on whether this client negotiated structured replies, so
    :class:`Negotiation` adds it per session (see ``_transmission_flags``).
    """
    flags = TransmissionFlag.HAS_FLAGS
    if read_only or caps.read_only:
        flags |= TransmissionFlag.READ_ONLY
    if caps.flush:
        flags |= TransmissionFlag.SEND_FLUSH
    if caps.fua:
        flags |= TransmissionFlag.SEND_FUA
    if caps.trim:
        flags |= TransmissionFlag.SEND_TRIM
    if caps.zero:
        flags |= TransmissionFlag.SEND_WRITE_ZEROES
        if caps.fast_zero:
            flags |= TransmissionFlag.SEND_FAST_ZERO
    if caps.cache:
        flags |= TransmissionFlag.SEND_CACHE
    # CAN_MULTI_CONN: "the effects of NBD_CMD_FLUSH and NBD_CMD_FLAG_FUA MUST be visible
    # across all connections" - only when the backend says its cache is shared.
    if caps.multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return flags


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the core needs to know about one export: the handshake's facts, and whether
    its backend can block (which decides where commands run)."""

    name: str
    description: str
    size: int
    #: Transmission flags from :func:`transmission_flags`; SEND_DF is decided per
    #: session (set with structured replies, cleared without).
    flags: TransmissionFlag
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024
    #: Client addresses that may use the export; None = every client.
    allow: tuple[IPNetwork, ...] | None = None
    #: The backend's calls never block (a RAM disk): every command but a large read runs
    #: on the event loop (:meth:`nbdserver.connection.NBDConnection.route`).
    never_blocks: bool = False


# --- events ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OptionHandled:
    """An option was answered (for logging): the final reply type and why."""

    option: int
    reply: Rep
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Ready:
    """Negotiation finished; transmission starts with these parameters."""

    export: ExportInfo
    flags: TransmissionFlag
    #: Replies are chunked: NBD_OPT_STRUCTURED_REPLY, or extended headers, which take
    #: its place ("this option takes precedence over structured replies").
    structured: bool
    #: Context id for base:allocation, or None when no context was selected.
    meta_context: int | None
    no_zeroes: bool
    client_flags: ClientFlag
    #: NBD_OPT_EXTENDED_HEADERS was acknowledged: 32-byte requests, extended replies only.
    extended: bool = False


@dataclass(frozen=True, slots=True)
class Closed:
    """The session ends (client abort or protocol violation); drop the connection."""

    reason: str
    violation: bool


@dataclass(frozen=True, slots=True)
class StartTLS:
    """NBD_OPT_STARTTLS was accepted and its ACK queued: send it, run the server side of
    the TLS handshake, then call :meth:`Negotiation.tls_established` (or drop the
    connection if the handshake fails: "the server MUST terminate the session",
    doc/proto.md "FORCEDTLS mode")."""


@dataclass(frozen=True, slots=True)
class Refused:
    """A client was turned away by policy (TLS required, or not on an export's
    allow-list); emitted besides the reply, so the adapter can log who and why."""

    option: int
    reason: str


Event = OptionHandled | Ready | Closed | StartTLS | Refused


class Phase(enum.Enum):
    CLIENT_FLAGS = enum.auto()
    OPTION_HEADER = enum.auto()
    OPTION_DATA = enum.auto()
    DISCARD = enum.auto()
    #: STARTTLS was acknowledged; no plaintext may follow until tls_established().
    TLS_HANDSHAKE = enum.auto()
    TRANSMISSION = enum.auto()
    CLOSED = enum.auto()


class Trigger(enum.Enum):
    FLAGS_OK = enum.auto()
    HEADER = enum.auto()
    HEADER_OVERSIZE = enum.auto()
    OPTION_DONE = enum.auto()
    DISCARD_DONE = enum.auto()
    GO = enum.auto()
    STARTTLS = enum.auto()
    TLS_DONE = enum.auto()
    ABORT = enum.auto()
    VIOLATION = enum.auto()
    REFUSED = enum.auto()


#: The handshake as a table: (phase, trigger) -> next phase.
TRANSITIONS: Final[Mapping[tuple[Phase, Trigger], Phase]] = {
    (Phase.CLIENT_FLAGS, Trigger.FLAGS_OK): Phase.OPTION_HEADER,
    (Phase.CLIENT_FLAGS, Trigger.VIOLATION): Phase.CLOSED,
    (Phase.OPTION_HEADER, Trigger.HEADER): Phase.OPTION_DATA,
    (Phase.OPTION_HEADER, Trigger.HEADER_OVERSIZE): Phase.DISCARD,
    (Phase.OPTION_HEADER, Trigger.VIOLATION): Phase.CLOSED,
    (Phase.OPTION_DATA, Trigger.OPTION_DONE): Phase.OPTION_HEADER,
    (Phase.OPTION_DATA, Trigger.GO): Phase.TRANSMISSION,
    (Phase.OPTION_DATA, Trigger.ABORT): Phase.CLOSED,
    (Phase.OPTION_DATA, Trigger.VIOLATION): Phase.CLOSED,
    (Phase.OPTION_DATA, Trigger.REFUSED): Phase.CLOSED,
    (Phase.DISCARD, Trigger.DISCARD_DONE): Phase.OPTION_HEADER,
    (Phase.OPTION_DATA, Trigger.STARTTLS): Phase.TLS_HANDSHAKE,
    # "the server MUST NOT preserve any negotiation state ... issued before this command"
    # (doc/proto.md NBD_OPT_STARTTLS): haggling starts afresh, over TLS.
    (Phase.TLS_HANDSHAKE, Trigger.TLS_DONE): Phase.OPTION_HEADER,
    (Phase.TLS_HANDSHAKE, Trigger.VIOLATION): Phase.CLOSED,
}


class _OptionFailed(Exception):
    """Internal: answer the current option with an error reply."""

    def __init__(self, reply: Rep, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


class Negotiation:
    """Server side of the fixed-newstyle handshake for one connection."""

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        *,
        refusal: str | None = None,
        tls: TlsMode = TlsMode.OFF,
        peer: IPAddress | None = None,
        extended_headers: bool = True,
    ) -> None:
        """Args:
        exports: the exports by name.
        refusal: set when the server will not serve this connection (e.g. past
            ``--max-connections``): every option but NBD_OPT_ABORT is then answered
            NBD_REP_ERR_POLICY with this text, and NBD_OPT_EXPORT_NAME closes.
        tls: the server's TLS mode (the adapter must be able to run a handshake unless OFF).
        peer: the client's IP address for allow-lists (None: a Unix-socket client).
        extended_headers: offer NBD_OPT_EXTENDED_HEADERS (False: answer it
            NBD_REP_ERR_UNSUP, so clients fall back to compact headers).
        """
        if not exports:
            raise ValueError("at least one export is needed")
        self._exports = dict(exports)
        self.refusal = refusal
        self._tls_mode = tls
        self._peer = peer
        #: TLS is running on this connection (tls_established() was called).
        self.tls_active = False
        # "A special, "empty", name ... is reserved for a "default" export"
        # (doc/proto.md NBD_OPT_EXPORT_NAME). Only an export actually named "" is the
        # default: a client that gives no name must never land on a named export, or a
        # guest started without -N could swap onto another run's disk.
        self.phase = Phase.CLIENT_FLAGS
        self._in = bytearray()
        self._out: list[bytes] = [GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)]
        self._option = 0
        self._option_length = 0
        self._discard_left = 0
        self.client_flags = ClientFlag(0)
        self.structured = False
        self._extended_headers = extended_headers
        #: NBD_OPT_EXTENDED_HEADERS was acknowledged (and not undone by STARTTLS).
        self.extended = False
        self._meta_context: int | None = None
        self._meta_export: str | None = None
        #: Bytes received after the option that started transmission.
        self.trailing_data = b""

    # --- public API ----------------------------------------------------------------
    def data_to_send(self) -> bytes:
        """Everything queued for the client since the last call."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Consume client bytes; return the events they caused, in order."""
        if self.phase in (Phase.TRANSMISSION, Phase.CLOSED):
            raise RuntimeError(f"negotiation is over (phase {self.phase.name})")
        if self.phase is Phase.TLS_HANDSHAKE:
            raise RuntimeError("bytes fed during the TLS handshake: call tls_established()")
        events: list[Event] = []
        view = memoryview(data)
        if self.phase is Phase.DISCARD:
            view = self._discard(view, events)
        self._in += view
        while not self._over():
            if not self._step(events):
                break
        if self._in_phase(Phase.TRANSMISSION):
            self.trailing_data = bytes(self._in)
            self._in.clear()
        return events

    def tls_established(self) -> None:
        """The adapter finished the TLS handshake that :class:`StartTLS` asked for.

        Option haggling restarts: "When this command succeeds, the server MUST NOT
        preserve any negotiation state (such as a request for NBD_OPT_STRUCTURED_REPLY or
        NBD_OPT_EXTENDED_HEADERS, or metadata contexts from NBD_OPT_SET_META_CONTEXT)
        issued before this command" (doc/proto.md NBD_OPT_STARTTLS).
        """
        self._go(Trigger.TLS_DONE)
        self.tls_active = True
        self.structured = False
        self.extended = False
        self._meta_context = None
        self._meta_export = None

    # --- machinery -----------------------------------------------------------------
    def _in_phase(self, phase: Phase) -> bool:
        # A method rather than an inline test: handlers change self.phase, which
        # mypy's narrowing of the attribute would not see.
        return self.phase is phase

    def _over(self) -> bool:
        return self.phase in (Phase.TRANSMISSION, Phase.CLOSED, Phase.TLS_HANDSHAKE)

    def _go(self, trigger: Trigger) -> None:
        try:
            self.phase = TRANSITIONS[(self.phase, trigger)]
        except KeyError:
            raise RuntimeError(f"no transition from {self.phase.name} on {trigger.name}") from None

    def _violation(self, events: list[Event], reason: str) -> None:
        self._go(Trigger.VIOLATION)
        events.append(Closed(reason, violation=True))

    def _discard(self, view: memoryview, events: list[Event]) -> memoryview:
        take = min(self._discard_left, len(view))
        self._discard_left -= take
        if self._discard_left == 0:
            self._go(Trigger.DISCARD_DONE)
            refusal = self._tls_refusal(self._option)
            if refusal is not None:
                reply, message = refusal
                events.append(Refused(self._option, message))
            else:
                reply = Rep.ERR_TOO_BIG
                message = (
                    f"option data of {self._option_length} bytes is longer than the"
                    f" {MAX_OPTION_DATA}-byte limit"
                )
            self._reply(self._option, reply, message.encode())
            events.append(OptionHandled(self._option, reply, message))
        return view[take:]

    def _step(self, events: list[Event]) -> bool:
        """Handle one unit of input if complete; return False when more bytes are needed."""
        if self.phase is Phase.CLIENT_FLAGS:
            if len(self._in) < CLIENT_FLAGS.size:
                return False
            (raw,) = CLIENT_FLAGS.unpack_from(self._in)
            del self._in[: CLIENT_FLAGS.size]
            known = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
            if raw & ~known:
                # "the server MUST drop the TCP connection if the client sets an unknown
                # flag, or a flag that does not match something advertised by the
                # server" (doc/proto.md "Client flags").
                self._violation(events, f"unknown client flags {raw:#x}")
                return False
            self.client_flags = ClientFlag(raw)
            # "The server MUST operate in NOTLS mode unless the server set flag
            # NBD_FLAG_FIXED_NEWSTYLE and the client replied with NBD_FLAG_C_FIXED_NEWSTYLE"
            # (doc/proto.md "Server-side requirements"); _tls_refusal reads this.
            self._go(Trigger.FLAGS_OK)
            return True
        if self.phase is Phase.OPTION_HEADER:
            if len(self._in) < OPTION_HEADER.size:
                return False
            magic, option, length = OPTION_HEADER.unpack_from(self._in)
            del self._in[: OPTION_HEADER.size]
            if magic != IHAVEOPT:
                self._violation(events, f"bad option magic {magic:#x}")
                return False
            self._option, self._option_length = option, length
            if length > MAX_OPTION_DATA:
                if option == Opt.EXPORT_NAME:
                    # EXPORT_NAME cannot be answered with an error; a name this long
                    # breaks "MUST be no longer than 4096 bytes" (doc/proto.md
                    # "Conventions"), so terminate the session.
                    self._violation(events, f"NBD_OPT_EXPORT_NAME of {length} bytes")
                    return False
                self._go(Trigger.HEADER_OVERSIZE)
                self._discard_left = length
                rest = self._discard(memoryview(bytes(self._in)), events)
                self._in = bytearray(rest)
                return not self._in_phase(Phase.DISCARD)
            self._go(Trigger.HEADER)
            return True
        if self.phase is Phase.DISCARD:
            return False
        if self.phase is Phase.OPTION_DATA:
            if len(self._in) < self._option_length:
                return False
            data = bytes(self._in[: self._option_length])
            del self._in[: self._option_length]
            self._handle_option(self._option, data, events)
            return True
        raise RuntimeError(f"unexpected phase {self.phase.name}")  # pragma: no cover

    def _reply(self, option: int, reply: Rep, data: bytes = b"") -> None:
        self._out.append(OptionReply(option, reply, data).pack())

    def _lookup(self, raw_name: bytes) -> ExportInfo:
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            # "a string ... is a sequence of UTF-8 code points" (doc/proto.md
            # "Conventions"): the option is syntactically invalid. The message shows the
            # bytes escaped, so it is readable text in the client's error and our log.
            shown = raw_name[:64].decode("utf-8", "backslashreplace")
            raise _OptionFailed(
                Rep.ERR_INVALID, f"export name '{shown}' is not valid UTF-8"
            ) from None
        export = self._exports.get(name)
        if export is None:
            raise _OptionFailed(Rep.ERR_UNKNOWN, f"no export named {name!r} on this server")
        if not address_allowed(export.allow, self._peer):
            # NBD_REP_ERR_POLICY: "server-side policy forbids the server to allow the
            # option" (doc/proto.md "Option reply types").
            who = "a client without an IP address" if self._peer is None else str(self._peer)
            raise _OptionFailed(
                Rep.ERR_POLICY, f"export {name!r} is not available to {who} (allow-list)"
            )
        return export

    def _tls_refusal(self, option: int) -> tuple[Rep, str] | None:
        """The error for ``option`` before TLS runs in TLS-required mode, else None."""
        if self._tls_mode is not TlsMode.REQUIRE or self.tls_active:
            return None
        if option in (Opt.STARTTLS, Opt.ABORT):
            return None
        if not self.client_flags & ClientFlag.FIXED_NEWSTYLE:
            # NOTLS is forced for such a client, which "MUST NOT" get ERR_TLS_REQD.
            return Rep.ERR_POLICY, "this server requires TLS, which needs fixed newstyle"
        # FORCEDTLS: "If the server receives any other option, including NBD_OPT_INFO and
        # unsupported options, it MUST reply with NBD_REP_ERR_TLS_REQD if TLS has not
        # been initiated" (doc/proto.md "FORCEDTLS mode").
        return Rep.ERR_TLS_REQD, "this server requires TLS: send NBD_OPT_STARTTLS first"

    def _transmission_flags(self, export: ExportInfo) -> TransmissionFlag:
        flags = export.flags | TransmissionFlag.HAS_FLAGS
        # SEND_DF: "MUST leave this flag clear if neither structured replies nor extended
        # headers have been negotiated" (doc/proto.md "Transmission flags").
        if self.structured or self.extended:
            flags |= TransmissionFlag.SEND_DF
        else:
            flags &= ~TransmissionFlag.SEND_DF
        # BLOCK_STATUS_PAYLOAD: "Servers MUST NOT advertise this bit unless the client
        # successfully negotiates extended headers"; the payload form of
        # NBD_CMD_BLOCK_STATUS is optional and not implemented, so it is never advertised.
        return flags & ~TransmissionFlag.BLOCK_STAT_PAYLOAD

    def _ready(self, export: ExportInfo, events: list[Event]) -> None:
        meta = self._meta_context if self._meta_export == export.name else None
        self._go(Trigger.GO)
        events.append(
            Ready(
                export=export,
                flags=self._transmission_flags(export),
                structured=self.structured or self.extended,
                meta_context=meta,
                no_zeroes=bool(self.client_flags & ClientFlag.NO_ZEROES),
                client_flags=self.client_flags,
                extended=self.extended,
            )
        )

    def _handle_option(self, option: int, data: bytes, events: list[Event]) -> None:
        if self.refusal is not None and option != Opt.ABORT:
            self._refuse(option, events)
            return
        refusal = self._tls_refusal(option)
        if option == Opt.EXPORT_NAME:
            try:
                if refusal is not None:
                    raise _OptionFailed(*refusal)
                if self.extended:
                    # "a client that has used NBD_OPT_EXTENDED_HEADERS to negotiate
                    # extended headers MUST NOT use this option" (doc/proto.md
                    # NBD_OPT_EXPORT_NAME), and it has no reply that could carry headers.
                    raise _OptionFailed(
                        Rep.ERR_INVALID,
                        "not allowed after NBD_OPT_EXTENDED_HEADERS; use NBD_OPT_GO",
                    )
                export = self._lookup(data)
            except _OptionFailed as exc:
                # "If the server is unwilling to allow the export, it MUST terminate
                # the session" (doc/proto.md "Newstyle negotiation"); likewise "when TLS
                # has not been initiated, then as this request cannot error, it MUST
                # terminate the session" (doc/proto.md "FORCEDTLS mode").
                if exc.reply in (Rep.ERR_POLICY, Rep.ERR_TLS_REQD):
                    events.append(Refused(option, exc.message))
                self._violation(events, f"NBD_OPT_EXPORT_NAME: {exc.message}")
                return
            flags = self._transmission_flags(export)
            reply = EXPORT_NAME_REPLY.pack(export.size, flags)
            # "124 bytes, zeroes (reserved) (unless NBD_FLAG_C_NO_ZEROES was negotiated)"
            if not self.client_flags & ClientFlag.NO_ZEROES:
                reply += EXPORT_NAME_ZEROES
            self._out.append(reply)
            self._ready(export, events)
            return
        if option == Opt.ABORT:
            # "The server MUST reply with NBD_REP_ACK" (doc/proto.md NBD_OPT_ABORT).
            self._reply(option, Rep.ACK)
            self._go(Trigger.ABORT)
            events.append(Closed("client sent NBD_OPT_ABORT", violation=False))
            return
        handler = _HANDLERS.get(option)
        try:
            if refusal is not None:
                raise _OptionFailed(*refusal)
            if handler is None:
                # "Servers that receive messages which they do not implement MUST reply
                # to them with NBD_REP_ERR_UNSUP" (doc/proto.md "Baseline").
                raise _OptionFailed(Rep.ERR_UNSUP, f"option {option} is not supported")
            go = handler(self, option, data)
        except _OptionFailed as exc:
            self._reply(option, exc.reply, exc.message.encode())
            self._go(Trigger.OPTION_DONE)
            if exc.reply in (Rep.ERR_POLICY, Rep.ERR_TLS_REQD):
                events.append(Refused(option, exc.message))
            events.append(OptionHandled(option, exc.reply, exc.message))
            return
        if option == Opt.STARTTLS:
            self._go(Trigger.STARTTLS)
            events.append(OptionHandled(option, Rep.ACK))
            if self._in:
                # "After an NBD_REP_ACK reply has been sent ... all further data MUST be
                # sent and received over TLS" (doc/proto.md "FORCEDTLS mode"); the client
                # must wait for the ACK, so bytes already here are plaintext it had no
                # right to send: no handshake is started.
                self._violation(events, f"{len(self._in)} plaintext bytes after NBD_OPT_STARTTLS")
            else:
                events.append(StartTLS())
        elif go is not None:
            self._ready(go, events)
        else:
            self._go(Trigger.OPTION_DONE)
            events.append(OptionHandled(option, Rep.ACK))

    def _refuse(self, option: int, events: list[Event]) -> None:
        assert self.refusal is not None
        if option == Opt.EXPORT_NAME:
            # It cannot carry an error: "the server MUST terminate the session"
            # (doc/proto.md NBD_OPT_EXPORT_NAME).
            self._go(Trigger.REFUSED)
            events.append(Closed(f"NBD_OPT_EXPORT_NAME refused: {self.refusal}", False))
            return
        # "it MUST ... simply error inbound options until the client gets the hint that
        # it is unwelcome" (doc/proto.md "Termination of the session during option
        # haggling"); ERR_POLICY: "server-side policy forbids the server to allow the
        # option".
        self._reply(option, Rep.ERR_POLICY, self.refusal.encode())
        self._go(Trigger.OPTION_DONE)
        events.append(OptionHandled(option, Rep.ERR_POLICY, self.refusal))

    # --- individual options (return an export to enter transmission) ---------------
    def _opt_list(self, option: int, data: bytes) -> ExportInfo | None:
        if data:
            # "the server SHOULD reject a request that includes data with
            # NBD_REP_ERR_INVALID" (doc/proto.md NBD_OPT_LIST).
            raise _OptionFailed(Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
        for export in self._exports.values():
            # An export the client may not use is not shown to it either.
            if not address_allowed(export.allow, self._peer):
                continue
            name = export.name.encode()
            self._reply(
                option, Rep.SERVER, U32.pack(len(name)) + name + export.description.encode()
            )
        self._reply(option, Rep.ACK)
        return None

    def _opt_starttls(self, option: int, data: bytes) -> ExportInfo | None:
        if data:
            # "The client MUST NOT send any additional data with the option" (NBD_OPT_STARTTLS).
            raise _OptionFailed(Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self.tls_active:
            # "If the server receives NBD_OPT_STARTTLS when TLS has already been
            # negotiated, it it MUST reply with NBD_REP_ERR_INVALID" (doc/proto.md).
            raise _OptionFailed(Rep.ERR_INVALID, "TLS is already running on this connection")
        if self._tls_mode is TlsMode.OFF:
            # NOTLS mode: "it MUST respond with NBD_REP_ERR_POLICY (if it does not support
            # TLS for policy reasons)" (doc/proto.md "NOTLS mode").
            raise _OptionFailed(Rep.ERR_POLICY, "TLS is switched off on this server (--tls off)")
        if not self.client_flags & ClientFlag.FIXED_NEWSTYLE:
            raise _OptionFailed(Rep.ERR_POLICY, "TLS needs fixed newstyle negotiation")
        # FORCEDTLS/SELECTIVETLS: "it MUST reply with NBD_REP_ACK"; the caller moves to
        # TLS_HANDSHAKE and emits StartTLS.
        self._reply(option, Rep.ACK)
        return None

    def _opt_info_go(self, option: int, data: bytes) -> ExportInfo | None:
        try:
            name, _requests = unpack_info_go(data)
        except ValueError as exc:
            raise _OptionFailed(Rep.ERR_INVALID, str(exc)) from None
        export = self._lookup(name)
        flags = self._transmission_flags(export)
        # "The server MUST send an NBD_INFO_EXPORT information type at some point before
        # sending an NBD_REP_ACK" (doc/proto.md NBD_REP_INFO); the others are optional
        # and the server "MAY send information requests back which are not explicitly
        # requested".
        self._reply(option, Rep.INFO, INFO_EXPORT.pack(Info.EXPORT, export.size, flags))
        self._reply(option, Rep.INFO, U16.pack(Info.NAME) + export.name.encode())
        if export.description:
            self._reply(option, Rep.INFO, U16.pack(Info.DESCRIPTION) + export.description.encode())
        self._reply(
            option,
            Rep.INFO,
            INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block
            ),
        )
        self._reply(option, Rep.ACK)
        return export if option == Opt.GO else None

    def _opt_structured_reply(self, option: int, data: bytes) -> ExportInfo | None:
        if data:
            raise _OptionFailed(Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        if self.extended:
            # "NBD_REP_ERR_EXT_HEADER_REQD: The client has already successfully negotiated
            # extended headers, which takes precedence over this option" (doc/proto.md
            # NBD_OPT_STRUCTURED_REPLY).
            raise _OptionFailed(Rep.ERR_EXT_HEADER_REQD, "extended headers are already negotiated")
        self.structured = True
        self._reply(option, Rep.ACK)
        return None

    def _opt_extended_headers(self, option: int, data: bytes) -> ExportInfo | None:
        if not self._extended_headers:
            # "For backwards compatibility, clients SHOULD be prepared to also handle
            # NBD_REP_ERR_UNSUP; in this case, only the compact transmission headers will
            # be used" (doc/proto.md NBD_OPT_EXTENDED_HEADERS).
            raise _OptionFailed(Rep.ERR_UNSUP, "extended headers are switched off on this server")
        if data:
            # "The client MUST NOT send any additional data with the option, and the server
            # SHOULD reject a request that includes data with NBD_REP_ERR_INVALID."
            raise _OptionFailed(Rep.ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")
        # "A client MAY request structured replies first, although a server SHOULD support
        # this option even if structured replies are not negotiated": no precondition. A
        # repeat is acknowledged again; the state does not change.
        self.extended = True
        self._reply(option, Rep.ACK)
        return None

    def _opt_meta_context(self, option: int, data: bytes) -> ExportInfo | None:
        setting = option == Opt.SET_META_CONTEXT
        if setting:
            # "Issuing this command replaces all previously-set metadata contexts
            # (including when this command fails)" (doc/proto.md SET_META_CONTEXT).
            self._meta_context = None
            self._meta_export = None
        if not (self.structured or self.extended):
            # "This option MUST NOT be requested unless structured replies or extended
            # headers have been negotiated first. If a client attempts to do so, a server
            # SHOULD send NBD_REP_ERR_INVALID or NBD_REP_ERR_EXT_HEADER_REQD." Only
            # base:allocation exists here, a 32-bit context, so ERR_EXT_HEADER_REQD ("MUST
            # NOT use this failure for a client request that is limited to contexts in the
            # "base:" namespace") never applies.
            raise _OptionFailed(
                Rep.ERR_INVALID,
                "negotiate NBD_OPT_STRUCTURED_REPLY or NBD_OPT_EXTENDED_HEADERS first",
            )
        name, queries = _parse_meta_context(data)
        export = self._lookup(name)
        matched = False
        if not queries:
            # LIST: "If zero queries are sent, then the server MUST return all the
            # metadata contexts"; SET: "the server MUST select no metadata contexts".
            matched = not setting
        for raw in queries:
            try:
                query = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _OptionFailed(Rep.ERR_INVALID, "query is not valid UTF-8") from None
            namespace, colon, leaf = query.partition(":")
            if not colon:
                raise _OptionFailed(Rep.ERR_INVALID, f"query {query!r} lacks a namespace colon")
            # "the server MUST ignore query strings belonging to an unknown namespace".
            if namespace == "base" and (leaf == "allocation" or (leaf == "" and not setting)):
                matched = True
        if matched:
            context_id = BASE_ALLOCATION_ID if setting else 0
            self._reply(option, Rep.META_CONTEXT, U32.pack(context_id) + BASE_ALLOCATION.encode())
            if setting:
                self._meta_context = BASE_ALLOCATION_ID
                self._meta_export = export.name
        self._reply(option, Rep.ACK)
        return None


def _parse_meta_context(data: bytes) -> tuple[bytes, list[bytes]]:
    try:
        return unpack_meta_context(data)
    except ValueError as exc:
        raise _OptionFailed(Rep.ERR_INVALID, str(exc)) from None


_Handler = Callable[[Negotiation, int, bytes], ExportInfo | None]
_HANDLERS: Final[dict[int, _Handler]] = {
    Opt.LIST: Negotiation._opt_list,
    Opt.STARTTLS: Negotiation._opt_starttls,
    Opt.INFO: Negotiation._opt_info_go,
    Opt.GO: Negotiation._opt_info_go,
    Opt.STRUCTURED_REPLY: Negotiation._opt_structured_reply,
    Opt.EXTENDED_HEADERS: Negotiation._opt_extended_headers,
    Opt.LIST_META_CONTEXT: Negotiation._opt_meta_context,
    Opt.SET_META_CONTEXT: Negotiation._opt_meta_context,
}
