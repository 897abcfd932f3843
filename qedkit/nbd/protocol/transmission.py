"""The transmission phase: the command table, the one request validator, the fast lane.

References: proto.md: Transmission phase, Request types, Error values, Block size
constraints.

Every request is checked against its row of ``COMMAND_RULES`` by one validator,
:meth:`Transmission.request_refusal`, in a fixed order (the order is listed in the
package docstring). It has two halves: :meth:`~Transmission.command_refusal` (what
depends on the command, its flags and the negotiated state) and
:meth:`~Transmission.range_refusal` (what depends on offset and length).

The fast lane is a precheck in front of that validator, not a second one. The bulk of
traffic is READ and WRITE without flags; whenever the negotiated state changes
(transmission begins, shutdown starts), :meth:`Transmission._open_lane` asks
``command_refusal`` once about a flagless READ and a flagless WRITE and reduces
``range_refusal`` for them to two bounds: the end of the export and a longest length.
A request then passes the precheck with three comparisons, and one that does not pass
goes to the validator, which refuses it with the right error or accepts it. So a rule
lives in the table and the validator alone, and the lane can only say "valid" where
the validator would.

:meth:`Transmission.receive_requests` runs the precheck over a chunk just read from
the socket, in place; :meth:`Transmission.on_request` runs it for a header taken off
the receive buffer. Requests that pass the validator are tracked in the
:class:`InFlightTable` until their reply; refused ones too (they await reply_error).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from .buffer import Allocate, Input, Payload, Skip
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    BlockStatus,
    Cache,
    Disconnect,
    Event,
    Flush,
    HandshakeComplete,
    InvalidRequest,
    Read,
    Request,
    Trim,
    Write,
    WriteZeroes,
)
from .export import Export
from .state import ConnectionState, State, Trigger
from .wire import (
    CMD_READ,
    CMD_WRITE,
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    MAX_PAYLOAD,
    REQUEST,
    REQUEST_MAGIC,
    REQUEST_SIZE,
    U64_MAX,
    Buffer,
    Cmd,
    CmdFlag,
    Errno,
    MetaContext,
    TransmissionFlag,
    command_name,
)

_NO_CMD_FLAGS: Final = CmdFlag(0)

# ---- the command table -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRule:
    """How one command is validated, turned into an event and answered.

    flags         command flags documented for it (FUA is valid for every command)
    needs         the transmission flag that exposes the command (HAS_FLAGS: always)
    needs_context refused unless a metadata context was negotiated
    writes        refused with EPERM on a read-only export
    ranged        offset/length address the export: bounds and alignment are checked,
                  and an error reply may carry an offset (proto.md lists exactly these
                  commands for NBD_REPLY_TYPE_ERROR_OFFSET)
    zero_range    offset and length MUST be zero
    limited       length is bounded by the export's maximum block size ...
    unlimited_by  ... unless this flag is set (FAST_ZERO for WRITE_ZEROES, proto.md)
    beyond_end    the error for a range past the end of the export
    reply         the method that answers it successfully (any request may get
                  reply_error)
    build         makes the event from (transmission, cookie, offset, length, flags);
                  None for WRITE, whose event is made when its payload is complete
    """

    flags: CmdFlag = _NO_CMD_FLAGS
    needs: TransmissionFlag = TransmissionFlag.HAS_FLAGS
    needs_context: bool = False
    writes: bool = False
    ranged: bool = True
    zero_range: bool = False
    limited: bool = False
    unlimited_by: CmdFlag = _NO_CMD_FLAGS
    beyond_end: Errno = Errno.EINVAL
    reply: str = "reply_ok"
    build: Callable[[Transmission, int, int, int, int], Request] | None = None
    # Derived plain-int masks for the per-request checks.
    allowed_bits: int = field(init=False)
    needs_bits: int = field(init=False)
    unlimited_bits: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_bits", int(self.flags) | FLAG_FUA)
        object.__setattr__(self, "needs_bits", int(self.needs))
        object.__setattr__(self, "unlimited_bits", int(self.unlimited_by))


# A command flag is only valid if the transmission flag that exposes it was advertised.
_FLAG_NEEDS: Final[tuple[tuple[int, int, str], ...]] = tuple(
    (int(flag), int(needed), f"NBD_CMD_FLAG_{flag.name}")
    for flag, needed in (
        (CmdFlag.FUA, TransmissionFlag.SEND_FUA),
        (CmdFlag.DF, TransmissionFlag.SEND_DF),
        (CmdFlag.FAST_ZERO, TransmissionFlag.SEND_FAST_ZERO),
    )
)


def _fua(flags: int) -> bool:
    return bool(flags & FLAG_FUA)


def _build_read(tx: Transmission, cookie: int, offset: int, length: int, flags: int) -> Request:
    return Read(
        cookie=cookie, offset=offset, length=length, fua=_fua(flags), df=bool(flags & FLAG_DF)
    )


def _build_flush(tx: Transmission, cookie: int, offset: int, length: int, flags: int) -> Request:
    return Flush(cookie=cookie, offset=offset, length=length, fua=_fua(flags))


def _build_trim(tx: Transmission, cookie: int, offset: int, length: int, flags: int) -> Request:
    return Trim(cookie=cookie, offset=offset, length=length, fua=_fua(flags))


def _build_cache(tx: Transmission, cookie: int, offset: int, length: int, flags: int) -> Request:
    return Cache(cookie=cookie, offset=offset, length=length, fua=_fua(flags))


def _build_write_zeroes(
    tx: Transmission, cookie: int, offset: int, length: int, flags: int
) -> Request:
    return WriteZeroes(
        cookie=cookie,
        offset=offset,
        length=length,
        fua=_fua(flags),
        no_hole=bool(flags & FLAG_NO_HOLE),
        fast_zero=bool(flags & FLAG_FAST_ZERO),
    )


def _build_block_status(
    tx: Transmission, cookie: int, offset: int, length: int, flags: int
) -> Request:
    return BlockStatus(
        cookie=cookie,
        offset=offset,
        length=length,
        fua=_fua(flags),
        req_one=bool(flags & FLAG_REQ_ONE),
        context_ids=tx.meta_contexts,
    )


COMMAND_RULES: Final[Mapping[int, CommandRule]] = {
    Cmd.READ: CommandRule(flags=CmdFlag.DF, limited=True, reply="reply_read", build=_build_read),
    Cmd.WRITE: CommandRule(writes=True, limited=True, beyond_end=Errno.ENOSPC),
    Cmd.FLUSH: CommandRule(
        needs=TransmissionFlag.SEND_FLUSH, ranged=False, zero_range=True, build=_build_flush
    ),
    Cmd.TRIM: CommandRule(needs=TransmissionFlag.SEND_TRIM, writes=True, build=_build_trim),
    Cmd.CACHE: CommandRule(needs=TransmissionFlag.SEND_CACHE, limited=True, build=_build_cache),
    Cmd.WRITE_ZEROES: CommandRule(
        flags=CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
        needs=TransmissionFlag.SEND_WRITE_ZEROES,
        writes=True,
        limited=True,
        unlimited_by=CmdFlag.FAST_ZERO,
        beyond_end=Errno.ENOSPC,
        build=_build_write_zeroes,
    ),
    Cmd.BLOCK_STATUS: CommandRule(
        flags=CmdFlag.REQ_ONE,
        needs_context=True,
        reply="reply_block_status",
        build=_build_block_status,
    ),
}


# ---- requests awaiting replies -----------------------------------------------------------


@dataclass(slots=True)
class InFlight:
    """A request awaiting its reply (the event itself is not kept: it may hold a
    32 MiB payload)."""

    command: int
    offset: int
    length: int
    flags: int
    valid: bool


class InFlightTable:
    """The requests that await a reply, by cookie, oldest first. proto.md allows, but
    discourages, reusing a cookie that is in flight; replies then pair in order."""

    __slots__ = ("count", "entries")

    def __init__(self) -> None:
        self.entries: dict[int, list[InFlight]] = {}
        self.count = 0

    def track(
        self, cookie: int, command: int, offset: int, length: int, flags: int, *, valid: bool
    ) -> None:
        self.entries.setdefault(cookie, []).append(InFlight(command, offset, length, flags, valid))
        self.count += 1

    def awaiting(self, cookie: int, method: str) -> InFlight:
        """The oldest request with this cookie, checked to be one that ``method`` may
        answer (LocalProtocolError otherwise, nothing changed)."""
        entries = self.entries.get(cookie)
        if not entries:
            raise LocalProtocolError(
                f"{method}: no request with cookie {cookie:#x} awaits a reply", cookie=cookie
            )
        entry = entries[0]
        rule = COMMAND_RULES.get(entry.command)
        expected = rule.reply if rule is not None else "reply_error"
        if method != "reply_error" and (not entry.valid or method != expected):
            need = expected if entry.valid else "reply_error"
            raise LocalProtocolError(
                f"{method}: request {cookie:#x} ({command_name(entry.command)}"
                f"{'' if entry.valid else ', refused'}) must be answered with {need}()",
                cookie=cookie,
            )
        return entry

    def done(self, cookie: int) -> None:
        """The oldest request with this cookie got its reply."""
        entries = self.entries[cookie]
        del entries[0]
        if not entries:
            del self.entries[cookie]
        self.count -= 1

    def settle(self, cookie: int, method: str) -> None:
        """``awaiting`` and ``done`` in one, for replies that cannot fail once the
        request is found (reply_ok): the check inlined, as it runs for every WRITE."""
        entries = self.entries.get(cookie)
        if entries:
            entry = entries[0]
            if entry.valid and _REPLY_METHODS.get(entry.command) == method:
                del entries[0]
                if not entries:
                    del self.entries[cookie]
                self.count -= 1
                return
        self.awaiting(cookie, method)  # raises: the reply does not fit
        raise AssertionError(f"{method}: request {cookie:#x} awaits it, yet was refused")


# The reply method that answers each command successfully.
_REPLY_METHODS: Final[Mapping[int, str]] = {
    command: rule.reply for command, rule in COMMAND_RULES.items()
}


# ---- the transmission phase --------------------------------------------------------------


class Transmission:
    """The request side of one connection's transmission phase (see the module
    docstring). Idle (every request refused by the lane, none parsed) until
    :meth:`begin`; ``state``, ``source`` and ``table`` are shared with the
    connection."""

    def __init__(self, state: ConnectionState, source: Input, table: InFlightTable) -> None:
        self._state = state
        self._source = source
        self._table = table
        self.export: Export | None = None
        self.transmission_flags = TransmissionFlag(0)
        self.meta_contexts: tuple[MetaContext, ...] = ()
        self._tflag_bits = 0
        self._shutting_down = False
        # The fast lane's precheck (see _open_lane): the end of the export, and the
        # longest flagless READ and WRITE it admits (-1: none).
        self._size = 0
        self._lane_read = -1
        self._lane_write = -1

    def begin(self, event: HandshakeComplete) -> None:
        """The handshake chose ``event.export``: requests may come."""
        self.export = event.export
        self.transmission_flags = event.transmission_flags
        self._tflag_bits = int(event.transmission_flags)
        self.meta_contexts = event.meta_contexts
        self._open_lane()

    def shut_down(self) -> None:
        """From now on every request is refused with ESHUTDOWN."""
        self._shutting_down = True
        self._open_lane()

    # ---- the one validator -------------------------------------------------------------

    def request_refusal(
        self, command: int, flags: int, offset: int, length: int
    ) -> tuple[Errno, str] | None:
        """Why a request must be refused (proto.md: Error values), in a fixed order;
        None when it is valid."""
        rule = COMMAND_RULES.get(command)
        name = command_name(command)
        if rule is None:
            return Errno.EINVAL, f"{name} is not supported"
        refusal = self.command_refusal(rule, name, flags)
        if refusal is None:
            refusal = self.range_refusal(rule, name, flags, offset, length)
        return refusal

    def command_refusal(self, rule: CommandRule, name: str, flags: int) -> tuple[Errno, str] | None:
        """The checks that depend on the command, its flags and what was negotiated."""
        if self._shutting_down:
            return Errno.ESHUTDOWN, "the server is shutting down"
        export = self.export
        if export is None:  # pragma: no cover - requests are only parsed in transmission
            raise AssertionError("request outside the transmission phase")
        if rule.writes and export.read_only:
            return Errno.EPERM, f"{name} on a read-only export"
        extra = flags & ~rule.allowed_bits
        if extra:
            return Errno.EINVAL, f"flags {extra:#x} are not valid for {name}"
        for flag, needed, flag_name in _FLAG_NEEDS:
            if flags & flag and not self._tflag_bits & needed:
                return Errno.EINVAL, f"{flag_name} was not negotiated"
        if not self._tflag_bits & rule.needs_bits:
            return Errno.EINVAL, f"{name} was not negotiated"
        if rule.needs_context and not self.meta_contexts:
            return Errno.EINVAL, "no metadata context was negotiated"
        return None

    def range_refusal(
        self, rule: CommandRule, name: str, flags: int, offset: int, length: int
    ) -> tuple[Errno, str] | None:
        """The checks that depend on offset and length (``_open_lane`` reduces them to
        two bounds for flagless requests: keep the two in step)."""
        export = self.export
        assert export is not None  # command_refusal ran first
        if rule.zero_range and (offset or length):
            return Errno.EINVAL, f"{name} needs offset and length 0"
        if rule.ranged:
            end = offset + length
            if end > export.size:
                return rule.beyond_end, (
                    f"{name} of [{offset}, {end}) is past the end of the export ({export.size})"
                )
            block = export.min_block_size
            if offset % block or (length % block and end != export.size):
                return Errno.EINVAL, f"{name} is not aligned to the minimum block size {block}"
        if rule.limited and length > export.max_block_size and not flags & rule.unlimited_bits:
            return Errno.EINVAL, (
                f"{name} of {length} bytes is over the maximum block size {export.max_block_size}"
            )
        return None

    def _open_lane(self) -> None:
        """Derive the fast lane's precheck from the validator (module docstring)."""
        export = self.export
        self._size = export.size if export is not None else 0
        self._lane_read = self._lane_bound(CMD_READ)
        self._lane_write = self._lane_bound(CMD_WRITE)

    def _lane_bound(self, command: int) -> int:
        """The longest flagless ``command`` that the validator accepts whenever it ends
        inside the export; -1 when the lane must leave every such request to it."""
        rule = COMMAND_RULES[command]
        export = self.export
        if export is None or self.command_refusal(rule, "", 0) is not None:
            return -1
        # With no flags, range_refusal checks zero_range, the end, the alignment and
        # the maximum length. The lane tests the end itself; alignment always holds
        # for a minimum block size of 1; zero-range commands are not worth a lane.
        if rule.zero_range or not rule.ranged or export.min_block_size != 1:
            return -1
        return export.max_block_size if rule.limited else U64_MAX

    # ---- parsing -----------------------------------------------------------------------

    def on_request_header(self, raw: bytes) -> Event | None:
        return self.on_request(*REQUEST.unpack(raw))

    def on_request(
        self, magic: int, flags: int, command: int, cookie: int, offset: int, length: int
    ) -> Event | None:
        """One request header: its event, or None when a WRITE payload is pending."""
        # The lane's precheck (as in receive_requests), then the validator.
        if not flags and magic == REQUEST_MAGIC and offset + length <= self._size:
            if command == CMD_READ and length <= self._lane_read:
                self._table.track(cookie, command, offset, length, 0, valid=True)
                return Read(cookie=cookie, offset=offset, length=length, fua=False, df=False)
            if command == CMD_WRITE and length <= self._lane_write:
                self._table.track(cookie, command, offset, length, 0, valid=True)
                buffer = self._source.buffer
                if len(buffer) >= length:  # the payload is here already
                    data = memoryview(buffer.take(length))
                    return Write(cookie=cookie, offset=offset, length=length, fua=False, data=data)
                self._source.pending = _lane_payload(cookie, offset, length, self._source.allocate)
                return None
        return self._checked_request(magic, flags, command, cookie, offset, length)

    def _checked_request(
        self, magic: int, flags: int, command: int, cookie: int, offset: int, length: int
    ) -> Event | None:
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#010x}")
        if command == Cmd.DISC:
            self._state.transition(Trigger.DISCONNECT)
            return Disconnect(cookie=cookie, offset=offset, length=length, fua=_fua(flags))
        table = self._table
        has_payload = command == Cmd.WRITE
        if has_payload and length > MAX_PAYLOAD:
            table.track(cookie, command, offset, length, flags, valid=False)
            raise RemoteProtocolError(
                f"NBD_CMD_WRITE of {length} bytes is over the {MAX_PAYLOAD}-byte limit; "
                "its payload cannot be consumed safely",
                cookie=cookie,
            )
        refusal = self.request_refusal(command, flags, offset, length)
        if refusal is not None:
            errno, message = refusal
            table.track(cookie, command, offset, length, flags, valid=False)
            if has_payload:
                self._source.pending = Skip(length, "a refused NBD_CMD_WRITE payload", lambda: None)
            return InvalidRequest(
                cookie=cookie,
                offset=offset,
                length=length,
                fua=_fua(flags),
                command=command,
                errno=errno,
                message=message,
            )
        table.track(cookie, command, offset, length, flags, valid=True)
        if has_payload:

            def written(data: memoryview) -> Event:
                return Write(
                    cookie=cookie, offset=offset, length=length, fua=_fua(flags), data=data
                )

            self._source.pending = Payload(length, written, self._source.allocate)
            return None
        build = COMMAND_RULES[command].build
        if build is None:  # pragma: no cover - only WRITE, handled above
            raise AssertionError(f"no event builder for {command_name(command)}")
        return build(self, cookie, offset, length, flags)

    def receive_requests(
        self, data: Buffer, limit: int, read_bytes: int
    ) -> tuple[list[Read | Write], int]:
        """The fast lane; see ``ServerConnection.receive_requests``."""
        events: list[Read | Write] = []
        source = self._source
        if self._state.state is not State.TRANSMISSION or source.eof or len(source.buffer):
            return events, 0
        size = len(data)
        pos = 0
        view: memoryview | None = None
        pending = source.pending
        if pending is not None:
            if type(pending) is not Payload:
                return events, 0
            view = memoryview(data)
            pos = pending.missing()
            if pos > size:
                pending.absorb(view)
                return events, size
            source.pending = None
            event = pending.finish(view[:pos])
            assert isinstance(event, Write)
            events.append(event)
        unpack = REQUEST.unpack_from
        table = self._table
        entries = table.entries
        end_of_export = self._size
        read_bound = self._lane_read
        write_bound = self._lane_write
        taken = 0
        while size - pos >= REQUEST_SIZE and len(events) < limit:
            magic, flags, command, cookie, offset, length = unpack(data, pos)
            # The precheck (see the module docstring); anything that fails it stops the
            # lane, and the general path validates it (or refuses it with the right error).
            if flags or magic != REQUEST_MAGIC or offset + length > end_of_export:
                break
            start = pos + REQUEST_SIZE
            if command == CMD_READ:
                if length > read_bound or (events and length > read_bytes):
                    break
                read_bytes -= length
                entries.setdefault(cookie, []).append(InFlight(command, offset, length, 0, True))
                taken += 1
                events.append(
                    Read(cookie=cookie, offset=offset, length=length, fua=False, df=False)
                )
                pos = start
                continue
            if command != CMD_WRITE or length > write_bound:
                break
            entries.setdefault(cookie, []).append(InFlight(command, offset, length, 0, True))
            taken += 1
            end = start + length
            if end > size:  # the payload goes on in the next chunks
                if view is None:
                    view = memoryview(data)
                collector = _lane_payload(cookie, offset, length, source.allocate)
                collector.absorb(view[start:])
                source.pending = collector
                pos = size
                break
            if view is None:
                view = memoryview(data)
            events.append(
                Write(cookie=cookie, offset=offset, length=length, fua=False, data=view[start:end])
            )
            pos = end
        table.count += taken
        return events, pos


def _lane_payload(cookie: int, offset: int, length: int, allocate: Allocate) -> Payload:
    """The collector of an accepted flagless WRITE's payload."""

    def written(data: memoryview) -> Event:
        return Write(cookie=cookie, offset=offset, length=length, fua=False, data=data)

    return Payload(length, written, allocate)
