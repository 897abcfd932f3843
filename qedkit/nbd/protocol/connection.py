"""ServerConnection: one connection's parts wired together, and the parser loop.

The parts, each in its own module: the state machine (``state``), the input
(``buffer``), the handshake (``handshake.Negotiation``), the requests
(``transmission.Transmission`` and its in-flight table) and the replies
(``replies.Replies``). This module only routes: at a message boundary it reads the
fixed-size header that the state expects (``_boundary``) and hands it to the part that
owns it; mid-message it advances the pending collector. The public methods are the
ones the package docstring describes; reply methods delegate to ``Replies``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from .buffer import Allocate, Input, Payload, byte_view
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    CONNECTION_CLOSED,
    NEED_DATA,
    PAUSED,
    Event,
    HandshakeComplete,
    Read,
    ReadChunk,
    Write,
)
from .export import Export
from .handshake import Negotiation, TlsMode
from .replies import Replies
from .state import ConnectionState, State, Trigger
from .transmission import InFlightTable, Transmission
from .wire import (
    CLIENT_FLAGS,
    OPTION_HEADER,
    REQUEST,
    REQUEST_SIZE,
    Buffer,
    ClientFlag,
    MetaContext,
    TransmissionFlag,
)


class ServerConnection:
    """The server side of one NBD connection; see the package docstring.

    ``exports`` are the exports this connection may see (names must be unique); ``tls``
    says how NBD_OPT_STARTTLS is answered. The greeting is queued at construction:
    start by sending ``data_to_send()``.
    """

    def __init__(
        self,
        exports: Iterable[Export],
        *,
        tls: TlsMode = TlsMode.DISABLED,
        payload_buffer: Allocate | None = None,
    ) -> None:
        self._machine = ConnectionState()
        self._input = Input() if payload_buffer is None else Input(payload_buffer)
        self._table = InFlightTable()
        self._negotiation = Negotiation(
            exports, tls, self._machine, self._input, enter=self._enter_transmission
        )
        self._transmission = Transmission(self._machine, self._input, self._table)
        self._replies = Replies(self._table)
        self._shutting_down = False
        negotiation = self._negotiation
        # What the parser waits for at a message boundary in each input state.
        self._boundary: Mapping[State, tuple[int, str, Callable[[bytes], Event | None]]] = {
            State.CLIENT_FLAGS: (CLIENT_FLAGS.size, "client flags", negotiation.on_client_flags),
            State.NEGOTIATING: (OPTION_HEADER.size, "option header", negotiation.on_option_header),
            State.TRANSMISSION: (
                REQUEST.size,
                "request header",
                self._transmission.on_request_header,
            ),
            State.DONE: (1, "trailing data", _data_after_end),
        }

    # ---- introspection -----------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._machine.state

    @property
    def exports(self) -> tuple[Export, ...]:
        return self._negotiation.exports

    @property
    def client_flags(self) -> ClientFlag:
        return self._negotiation.client_flags

    @property
    def tls_active(self) -> bool:
        return self._negotiation.tls_active

    @property
    def structured_replies(self) -> bool:
        """Whether structured replies are negotiated (so far, during the handshake)."""
        return self._negotiation.structured

    @property
    def export(self) -> Export | None:
        """The export in use, once the transmission phase began."""
        return self._transmission.export

    @property
    def transmission_flags(self) -> TransmissionFlag:
        """The flags sent for the export in use (0 before the transmission phase)."""
        return self._transmission.transmission_flags

    @property
    def meta_contexts(self) -> tuple[MetaContext, ...]:
        """The metadata contexts usable with NBD_CMD_BLOCK_STATUS."""
        return self._transmission.meta_contexts

    @property
    def inflight(self) -> int:
        """Requests that still await a reply."""
        return self._table.count

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    # ---- input -------------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Add bytes read from the client; ``b""`` means end of file. The bytes are
        copied, so the caller may reuse its buffer. Nothing is parsed until
        :meth:`next_event`."""
        source = self._input
        if source.eof:
            raise LocalProtocolError("receive_data() called after end of file")
        if self._machine.state is State.TLS_PENDING:
            raise LocalProtocolError(
                "bytes received while waiting for tls_established(): after StartTLS the "
                "glue must run the TLS handshake before feeding the connection again"
            )
        view = byte_view(data)
        if not len(view):
            source.eof = True
            return
        source.feed(view)

    def receive_requests(
        self, data: Buffer, limit: int, read_bytes: int
    ) -> tuple[list[Read | Write], int]:
        """Fast lane for the steady state: parse, in place, the flagless READ and WRITE
        requests that ``data`` (bytes just read from the client) begins with, when
        nothing is buffered: at most ``limit`` requests, and READs for at most
        ``read_bytes`` in all (one READ, whatever its length, when it comes first), so
        that the glue can stop between the others when its output backs up. Returns
        their events (a WRITE's ``data`` is a view of ``data``, not a copy) and how many
        bytes of ``data`` were taken; feed the rest to :meth:`receive_data` as usual.

        Equivalent to ``receive_data`` followed by ``next_event`` calls, minus the
        buffering. It also finishes a WRITE payload that an earlier chunk left
        incomplete, and takes the start of a payload that ``data`` ends with. It
        stops at the first request that is anything else (another command, flags, a
        refusal, a violation, a header cut in two), which the general path then
        handles."""
        return self._transmission.receive_requests(data, limit, read_bytes)

    def receive_window(self) -> memoryview | None:
        """Zero-copy receive: where the glue may read the next bytes from the client
        itself (``recv_into``) instead of handing them to :meth:`receive_data`: the
        unfilled rest of a WRITE payload in progress, in the buffer it will be handed
        over in (``payload_buffer``'s, when the constructor was given one), when
        nothing is buffered before it; None otherwise. Report what was read with
        :meth:`received_into_window`."""
        if self._machine.state is not State.TRANSMISSION:
            return None
        return self._input.window()

    def payload_length(self) -> int:
        """The whole length of the WRITE payload :meth:`receive_window` is part of
        (0 when there is no window)."""
        pending = self._input.pending
        return pending.size if type(pending) is Payload else 0

    def received_into_window(self, count: int) -> bool:
        """``count`` bytes (> 0) were read into the start of :meth:`receive_window`.
        Returns True once the payload is whole: its Write then comes from
        :meth:`next_event`, or from :meth:`receive_requests` called with no data."""
        pending = self._input.pending
        if type(pending) is not Payload:
            raise LocalProtocolError("received_into_window() without a receive_window()")
        pending.received(count)
        return not pending.missing()

    def next_event(self) -> Event:
        """The next event, or NEED_DATA / PAUSED. Raises RemoteProtocolError when the
        client broke the protocol (then drop the connection)."""
        source = self._input
        if self._machine.state is State.TRANSMISSION and source.pending is None:
            # Fast lane for the steady state: a request header straight off the buffer.
            buffer = source.buffer
            if len(buffer) >= REQUEST_SIZE:
                try:
                    event = self._transmission.on_request(*buffer.unpack(REQUEST))
                except RemoteProtocolError:
                    self._fail()
                    raise
                if event is not None:
                    return event
            elif not source.eof:
                return NEED_DATA
        try:
            while True:
                event = self._step()
                if event is not None:
                    return event
        except RemoteProtocolError:
            self._fail()
            raise

    def data_to_send(self) -> bytes:
        """Handshake bytes queued by the core (greeting, option replies): send them after
        every ``next_event()``."""
        out = self._negotiation.out
        if not out:
            return b""
        data = bytes(out)
        out.clear()
        return data

    def tls_established(self) -> None:
        """The glue finished the server-side TLS handshake after a :class:`StartTLS`.
        Negotiation restarts from scratch, as proto.md requires: structured replies and
        metadata contexts chosen before STARTTLS are forgotten."""
        self._machine.transition(Trigger.TLS_UP)
        self._negotiation.tls_established()

    def start_shutdown(self) -> None:
        """The server is going down: further options get NBD_REP_ERR_SHUTDOWN (but
        NBD_OPT_ABORT, and NBD_OPT_EXPORT_NAME, which cannot fail) and further requests
        an InvalidRequest with ESHUTDOWN (proto.md: Terminating the transmission phase).
        Requests already delivered are unaffected; NBD_CMD_DISC is still honoured."""
        self._shutting_down = True
        self._negotiation.shutting_down = True
        self._transmission.shut_down()

    def refuse_transmission(self, message: str) -> None:
        """The server will not serve this connection (its connection limit, say) but
        wants the client told why: from now on NBD_OPT_GO is answered
        NBD_REP_ERR_POLICY carrying ``message``, which clients print. Other options
        are answered as before; NBD_OPT_EXPORT_NAME, which cannot fail, ends the
        session (RemoteProtocolError). Call it before the transmission phase."""
        if self._machine.state not in (State.CLIENT_FLAGS, State.NEGOTIATING, State.TLS_PENDING):
            raise LocalProtocolError(
                f"refuse_transmission: the handshake is over (state {self._machine.state.value})"
            )
        self._negotiation.transmission_refusal = message

    # ---- replies -----------------------------------------------------------------------

    def reply_ok(self, cookie: int) -> list[Buffer]:
        """Success for a request without reply data (all but READ and BLOCK_STATUS):
        a simple reply, which proto.md allows even with structured replies."""
        return self._replies.ok(cookie)

    def reply_error(
        self, cookie: int, errno: int, message: str = "", *, offset: int | None = None
    ) -> list[Buffer]:
        """Failure of any request. ``errno`` must be an :class:`Errno` value (the server
        maps its exceptions with ``qedkit.nbd.errors.nbd_errno_for``). With structured
        replies this is an NBD_REPLY_TYPE_ERROR chunk carrying ``message``
        (NBD_REPLY_TYPE_ERROR_OFFSET when ``offset``, which must lie inside the request,
        is given); otherwise a simple reply with the error and neither message nor
        offset."""
        return self._replies.error(cookie, errno, message, offset=offset)

    def reply_read(self, cookie: int, chunks: Iterable[ReadChunk] | Buffer) -> list[Buffer]:
        """Success for a READ. ``chunks`` (data or holes, any order, absolute offsets)
        must cover the request exactly; a plain buffer means one data chunk for the
        whole request. Without structured replies this is a simple reply followed by
        the data (holes spelled out as zeros). With them, one chunk per item (holes as
        NBD_REPLY_TYPE_OFFSET_HOLE) and NBD_REPLY_FLAG_DONE on the last; when the client
        set NBD_CMD_FLAG_DF, all items travel in a single NBD_REPLY_TYPE_OFFSET_DATA.
        Data buffers are returned as views, never copied."""
        return self._replies.read(cookie, chunks)

    def reply_block_status(
        self, cookie: int, extents: Mapping[int, Sequence[tuple[int, int]]]
    ) -> list[Buffer]:
        """Success for a BLOCK_STATUS: ``extents`` maps every negotiated context id to
        consecutive ``(length, flags)`` extents starting at the request's offset. The
        core trims the list to the request: extents after the one reaching the request's
        end are dropped and that one is shortened (with NBD_CMD_FLAG_REQ_ONE, only the
        first extent is kept). One NBD_REPLY_TYPE_BLOCK_STATUS chunk per context, in id
        order, NBD_REPLY_FLAG_DONE on the last."""
        return self._replies.block_status(cookie, extents)

    # ---- the parser loop ---------------------------------------------------------------

    def _enter_transmission(self, event: HandshakeComplete) -> None:
        self._transmission.begin(event)
        self._replies.begin(structured=event.structured_replies, contexts=event.meta_contexts)

    def _fail(self) -> None:
        self._machine.fail()
        self._input.pending = None

    def _step(self) -> Event | None:
        state = self._machine.state
        if state is State.ERROR:
            raise RemoteProtocolError("the connection already failed with a protocol error")
        if state is State.CLOSED:
            return CONNECTION_CLOSED
        if state is State.TLS_PENDING:
            return PAUSED
        source = self._input
        if source.pending is not None:
            return source.pending.advance(source)
        size, what, handler = self._boundary[state]
        available = len(source.buffer)
        if available >= size:
            return handler(source.buffer.take(size))
        if not source.eof:
            return NEED_DATA
        if available == 0:
            self._machine.transition(Trigger.EOF)
            return CONNECTION_CLOSED
        raise RemoteProtocolError(f"end of file inside the {what} ({available} of {size} bytes)")


def _data_after_end(raw: bytes) -> Event | None:
    raise RemoteProtocolError("the client sent data after ending the session")
