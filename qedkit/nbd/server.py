"""The NBD server: asyncio glue between sockets, the sans-I/O protocol core
(nbd.protocol) and open images.

Theory of operation
-------------------
One event loop runs everything: listeners, connections, the images' engines and the
control socket. Each connection is an ``asyncio.Protocol``. The flagless READs and
WRITEs a chunk from the socket begins with are parsed in place
(``ServerConnection.receive_requests``) and served by the engine's synchronous fast
paths (``read_now``/``write_batch_now``: cached mappings, allocated clusters,
allocations that need no flush). Everything else goes into the
``ServerConnection`` and each request event is handled by a coroutine that calls
the engine and returns the reply buffers. With a local file,
most engine calls finish without suspending, so the handler is first stepped inline
(``engine.sync.step``) and its reply written at once; only a handler that really
waits (a flush offloaded to a thread, a contended allocation lock) becomes a task.
Replies therefore leave in completion order, which NBD allows; those produced while
handling one chunk leave together. Both paths end in the same accounting
(``_account``): the fast paths (``_serve_now``) add a whole batch's statistics at
once, the general path (``_finished``) one request's.

Bounds: a connection stops reading from its socket while it has
``MAX_INFLIGHT`` requests or ``MAX_INFLIGHT_BYTES`` of write payload in flight, or
while the socket's send buffer is full; the protocol core bounds a single request
(32 MiB). A client that breaks the protocol is dropped; replies to its requests
still in flight are sent first when possible. Other connections never notice.

Admission: at most ``max_connections`` connections are served at once. One more is
held before the handshake (no greeting, input buffered) in a first-come queue and
gets the next slot that frees; after ``connection_wait`` seconds it is greeted and
refused in words instead (NBD_OPT_GO gets NBD_REP_ERR_POLICY with the reason).

All connections to one export share one open image, so a flush on any connection
makes every completed write durable: CAN_MULTI_CONN is advertised when more than
one connection is allowed.

Shutdown (``stop``): listeners close, connections are told to shut down (new
requests get ESHUTDOWN), requests in flight finish, then images are flushed and
closed, which clears NEED_CHECK.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import ssl
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from ..engine.base import BlockImage
from ..engine.mapping import MapEntry, map_chain
from ..engine.sync import step
from ..errors import QedError
from . import protocol as p
from .buffers import MIN_SIZE, BufferPool
from .errors import nbd_errno_for
from .poll import BusyPoller

log = logging.getLogger("qedkit.nbd")

MAX_INFLIGHT = 64  # requests per connection before it stops reading
# How long a connection over the connection limit waits for a slot (seconds). Long
# enough for a client that just left to be forgotten under heavy load, short enough
# that a forgotten client fails with a message rather than hangs.
DEFAULT_CONNECTION_WAIT = 30.0
# What a waiting connection may send before it stops being read (a client waits for
# the greeting before it sends anything; this bounds a hostile one).
_HELD_MAX = 64 * 1024
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024  # write payload per connection before it stops reading
_POOL_MIN = MIN_SIZE  # reads this large get a pooled page-aligned buffer (nbd.buffers)
# Replies are gathered and sent once per batch of requests: a send() wakes the client
# and costs ~50 us here, more than serving a cached 4 KiB read. A batch is sent as
# soon as it holds this much.
_OUT_BATCH = 256 * 1024
# Receiving (see receive_target): what one recv may read into the connection's own
# buffer; the smallest rest of a payload worth a recv straight into its buffer; the
# payloads that are read that way as a rule (their start with their header, then the
# rest); and what is read beyond a short rest of one of those or after a direct read
# (the next header and the start of its payload).
_RECV_SIZE = 256 * 1024
_DIRECT_MIN = 32 * 1024
_LARGE = 64 * 1024
_RECV_SMALL = 4096
# The receive buffer is free when only the connection and getrefcount's argument
# refer to it (a view of it holds a reference through its buffer export).
_RECV_FREE_REFS = 2
# Without a gathering writelines (asyncio's joins its buffers), small batches are
# joined into one send and larger ones written buffer by buffer.
_JOIN_MAX = 64 * 1024
# What serving a request gave: its reply, and whether the engine failed.
_Outcome = tuple[list[p.Buffer], bool]
_Read, _Write = p.Read, p.Write  # tested for every request
# SO_SNDBUF of a unix socket connection (the kernel doubles it; the default is
# 208 KiB). With the default, a 256 KiB READ reply never fits: every one is sent in
# pieces, each a wake-up of the client and a writable event, and asyncio copies the
# rest into its own buffer and shifts it after every send. 2 MiB: nbdcopy's
# sequential read 4.8k -> 8.6-9.3k requests/s, server CPU 185 -> 105 us a request
# (docs/DESIGN.md §3). TCP keeps the kernel's autotuning.
UNIX_SNDBUF = 2 << 20
# Requests that change data: kept in order on a connection (_run_in_order).
_CHANGES = frozenset({p.Write, p.Trim, p.WriteZeroes})
_STATE_HOLE = int(p.StateFlag.HOLE)
_STATE_ZERO = int(p.StateFlag.ZERO)


# ---- exports -------------------------------------------------------------------------


@dataclass
class ExportStats:
    connections: int = 0
    connections_total: int = 0
    requests: int = 0
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


@dataclass
class ServedImage:
    """An image offered as one NBD export."""

    name: str
    image: BlockImage
    description: str = ""
    readonly: bool = False
    stats: ExportStats = field(default_factory=ExportStats)

    def export(self, *, multi_conn: bool) -> p.Export:
        writable = not self.readonly
        return p.Export(
            name=self.name,
            size=self.image.size,
            description=self.description,
            read_only=self.readonly,
            can_flush=True,
            can_fua=writable,
            can_trim=writable,
            can_write_zeroes=writable,
            can_fast_zero=writable,
            can_cache=True,
            can_multi_conn=multi_conn,
            preferred_block_size=4096,
        )


def receive_target(
    conn: p.ServerConnection, recv: memoryview, after_direct: bool
) -> tuple[memoryview, bool]:
    """Where the next recv of a connection goes, and whether that is straight into a
    WRITE payload's own buffer (``receive_window``).

    The rest of a payload (``_DIRECT_MIN`` or more) is read directly into the buffer
    it is written to the image from: no fresh 256 KiB ``bytes`` per recv, no copy out
    of it. Anything else goes to the connection's buffer ``recv``, parsed in place
    (see ``_Connection.get_buffer``): as much as the socket holds, unless a direct
    read came just before or a short rest of a large payload (``_LARGE``) waits.
    Then only that rest, the next request header and a little more are read, so that
    the next large payload's rest is read directly too; a full-size read there would
    end inside the next payload, leave it a short rest again, and keep a stream of
    large WRITEs off the direct path. Small payloads never shorten a read: with
    4 KiB WRITEs that would read about one request per recv."""
    window = conn.receive_window()
    if window is not None:
        if len(window) >= _DIRECT_MIN:
            return window, True
        if conn.payload_length() >= _LARGE:
            return recv[: len(window) + _RECV_SMALL], False
    elif after_direct:
        return recv[:_RECV_SMALL], False
    return recv, False


# ---- one connection ---------------------------------------------------------------------


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: NbdServer, ident: int) -> None:
        self.server = server
        self.ident = ident
        self.conn = p.ServerConnection(
            [s.export(multi_conn=server.max_connections > 1) for s in server.images],
            tls=server.tls_mode,
            payload_buffer=server.payload_buffer,
        )
        # The connection's receive buffer; replaced when a view of it outlives its
        # chunk (see get_buffer).
        self._recv = bytearray(_RECV_SIZE)
        self._direct = False  # the last get_buffer gave the payload's own window
        self.transport: asyncio.Transport | None = None
        self._poller = server.poller  # None unless --busy-poll
        self._fd = -1  # the socket's, registered with the poller
        self.peer = "?"
        self.served: ServedImage | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self.closed = asyncio.get_running_loop().create_future()
        self._payload_bytes = 0
        self._out: list[p.Buffer] = []
        self._out_bytes = 0
        # The last request that changes data still in flight as a task (None: none);
        # later ones run after it (_run_in_order), and WRITEs skip the fast path.
        self._write_chain: asyncio.Task[None] | None = None
        self._gather = False
        self._reading_paused = False
        self._writing_paused = False
        # Admission: a connection over the limit waits (no greeting) for a slot.
        self.waiting = False
        self.holds_slot = False
        self._wait_started = 0.0
        self._wait_timer: asyncio.TimerHandle | None = None
        self._held_bytes = 0
        self._held_paused = False
        self._log = logging.LoggerAdapter(log, {"conn": ident})

    # ---- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        # uvloop's writelines hands all buffers to one writev; asyncio's (3.11) joins.
        self._gather = type(transport).__module__.startswith("uvloop")
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self._log.info("connection %d from %s", self.ident, self.peer)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):  # (the kernel caps it at wmem_max)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        if self._poller is not None and sock is not None:
            self._fd = sock.fileno()
            self._poller.add(self._fd)
        if self.server.stopping:
            self.conn.start_shutdown()
        self.server._arrive(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the transport reads the next bytes into (``receive_target``).

        A chunk read into the connection's buffer is parsed in place: a WRITE's data
        is a view of it, which a write that waits (a task) keeps. Every view of the
        chunk holds one reference to the buffer, so while its reference count says a
        view is still alive the next chunk goes to a fresh buffer (the old one lives
        on as long as those views); most chunks are served before the next read and
        the one buffer is reused, uncopied."""
        if sys.getrefcount(self._recv) > _RECV_FREE_REFS:
            self._recv = bytearray(_RECV_SIZE)
        target, self._direct = receive_target(self.conn, memoryview(self._recv), self._direct)
        return target

    def buffer_updated(self, nbytes: int) -> None:
        if not self._direct:
            self._chunk_received(memoryview(self._recv)[:nbytes])
            return
        if not self.conn.received_into_window(nbytes):
            return
        if self.served is not None and not self._reading_paused and not self.closing:
            self._fast_lane(b"")  # the completed WRITE, served at once
        else:
            self._pump()

    def _chunk_received(self, data: memoryview) -> None:
        if self.waiting:  # parsed once admitted; a client has no reason to send much
            with contextlib.suppress(p.LocalProtocolError):
                self.conn.receive_data(data)
            self._held_bytes += len(data)
            if self._held_bytes > _HELD_MAX and self.transport is not None:
                self.transport.pause_reading()
                self._held_paused = True
            return
        rest = data
        if self.served is not None and not self._reading_paused and not self.closing:
            used = self._fast_lane(data)
            if used == len(data):
                return
            rest = data[used:]
        try:
            self.conn.receive_data(rest)
        except p.LocalProtocolError as exc:  # bytes while TLS is pending
            self._drop(f"unexpected data: {exc}")
            return
        self._pump()

    def _fast_lane(self, data: p.Buffer) -> int:
        """Serve the READs and WRITEs that ``data`` begins with (the steady state):
        parsed in place, no buffering, no copies of payloads, no parser loop. Returns
        the bytes taken; the rest is for the general path."""
        conn = self.conn
        events, used = conn.receive_requests(data, MAX_INFLIGHT - conn.inflight, _OUT_BATCH)
        if not used and not events:  # (no data: the payload received in its window)
            return 0
        try:
            self._serve_now(events)
        finally:
            if used == len(data):
                self._flush_out()  # else the general path's pump sends them with its own
        return used

    def eof_received(self) -> bool | None:
        if self.waiting:  # the client gave up waiting: so do we
            self._log.info("connection %d: the client left while waiting", self.ident)
            self._end_wait()
            self._close_when_idle()
            return None
        with contextlib.suppress(p.LocalProtocolError):
            self.conn.receive_data(b"")
        self._pump()
        return True  # keep the transport until in-flight replies are out

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._poller is not None and self._fd >= 0:
            self._poller.discard(self._fd)
            self._fd = -1
        if exc is not None:
            self._log.info("connection %d lost: %s", self.ident, exc)
        self._maybe_finish()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()
        self._pump()

    # ---- admission (the connection limit) ----------------------------------------

    def admit(self, *, waited: bool) -> None:
        """A slot is ours: send the greeting and start the handshake."""
        self._end_wait()
        if waited:
            self._log.info(
                "connection %d: a slot freed after %.2f s of waiting",
                self.ident,
                time.monotonic() - self._wait_started,
            )
        self._send_handshake()
        self._pump()  # anything the client sent while it waited

    def hold(self, timeout: float) -> None:
        """No slot is free: keep the connection before the handshake (no greeting yet,
        input buffered, unparsed) until ``admit`` or, after ``timeout`` seconds,
        ``_wait_expired``."""
        self.waiting = True
        self._wait_started = time.monotonic()
        self._log.info(
            "connection %d waits for a free slot: %d connection(s) allowed (see --shared); "
            "waiting up to %g s",
            self.ident,
            self.server.max_connections,
            timeout,
        )
        loop = asyncio.get_running_loop()
        self._wait_timer = loop.call_later(timeout, self._wait_expired, timeout)

    def _wait_expired(self, timeout: float) -> None:
        """Refuse, in words the client prints: NBD_OPT_GO gets NBD_REP_ERR_POLICY."""
        self._wait_timer = None
        self.server._forget_waiting(self)
        self._end_wait()
        limit = self.server.max_connections
        self._log.warning(
            "connection %d from %s refused: no slot freed within %g s (%d connection(s) "
            "allowed, see --shared and --shared-wait)",
            self.ident,
            self.peer,
            timeout,
            limit,
        )
        self.conn.refuse_transmission(
            f"qed serve: too many connections ({limit} allowed, see --shared); "
            f"no slot freed within {timeout:g} s"
        )
        self._send_handshake()
        self._pump()

    def _end_wait(self) -> None:
        self.waiting = False
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
        if self._held_paused:
            self._held_paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    # ---- event loop ------------------------------------------------------------------

    def _pump(self) -> None:
        """Handle every complete event the buffered input holds, then send the replies
        produced meanwhile in one go (one syscall for a whole batch of requests)."""
        try:
            self._pump_events()
        finally:
            self._flush_out()

    def _pump_events(self) -> None:
        """The general path's loop. Consecutive READs and WRITEs are gathered and
        handed to ``_serve_now`` together (bounded as the lane's batches: requests in
        flight, bytes of READs) before anything else is handled, so requests are still
        handled in order."""
        conn = self.conn
        batch: list[p.Read | p.Write] = []
        reads = 0
        while self.transport is not None and not self.closing:
            if self._reading_paused:
                break
            try:
                event = conn.next_event()
            except p.RemoteProtocolError as exc:
                if batch:  # requests before the violation are answered first
                    self._serve_now(batch)
                self._send_handshake()
                if exc.cookie is not None:
                    with contextlib.suppress(p.LocalProtocolError):
                        self._write(conn.reply_error(exc.cookie, exc.errno_hint, str(exc)))
                self._drop(f"protocol error: {exc}")
                return
            if type(event) is _Read or type(event) is _Write:
                batch.append(event)
                if type(event) is _Read:
                    reads += event.length
                if conn.inflight < MAX_INFLIGHT and reads < _OUT_BATCH:
                    continue  # the lane's bounds
                self._serve_now(batch)
                batch = []
                reads = 0
                continue
            if batch:
                self._serve_now(batch)
                batch = []
                reads = 0
            self._send_handshake()
            if event is p.NEED_DATA or event is p.PAUSED:
                return
            if isinstance(event, p.Request):
                if isinstance(event, p.Disconnect):
                    self._log.info("connection %d: client disconnected", self.ident)
                    self._close_when_idle()
                    return
                self._dispatch(event)
            elif isinstance(event, p.HandshakeComplete):
                self._start(event)
            elif isinstance(event, p.StartTLS):
                task = asyncio.get_running_loop().create_task(self._start_tls())
                self._track(task)
                return
            elif isinstance(event, (p.Abort, p.ConnectionClosed)):
                self._close_when_idle()
                return
        if batch:  # (nothing that ends the loop happens while a batch gathers)
            self._serve_now(batch)

    def _start(self, event: p.HandshakeComplete) -> None:
        served = self.server.by_name[event.export.name]
        self.served = served
        served.stats.connections += 1
        served.stats.connections_total += 1
        self._log.info(
            "connection %d: export %r (%s), structured replies %s, contexts %s",
            self.ident,
            served.name,
            served.image.filename,
            event.structured_replies,
            [c.context_name for c in event.meta_contexts],
        )

    async def _start_tls(self) -> None:
        if self.transport is None or self.server.ssl_context is None:
            return  # the client went away before the handshake could start
        self._send_handshake()
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(
                self.transport, self, self.server.ssl_context, server_side=True
            )
        except (OSError, ssl.SSLError) as exc:
            self._drop(f"TLS handshake failed: {exc}")
            return
        if new is None or self.closing:
            self._drop("TLS handshake failed")
            return
        self.transport = new
        self.conn.tls_established()
        self._log.info("connection %d: TLS established", self.ident)
        self._pump()

    # ---- requests --------------------------------------------------------------------

    def _serve_now(self, events: Sequence[p.Read | p.Write]) -> None:
        """The fast paths: serve the READs and WRITEs the engine can do at once
        (``read_now``: cached mapping; ``write_batch_now``: allocated clusters, or
        allocations that need no flush nor read; no FUA) without a coroutine or a
        task; dispatch the others to the general path, which also reports errors.
        Called with a whole batch from the lane, so that the statistics of the
        requests served here are added once per batch (the reads) and once per
        group of writes, through the same ``_account`` as the general path's.

        Consecutive WRITEs are held (``pending``) and handed to the engine together
        before the next request of another kind, or at the end of the batch (one
        group commit for their allocations). Writes it cannot do at once are
        gathered for the general path (``write_batch``); once one is waiting, every
        later write of the batch joins it, so writes still reach the engine in
        order, and a READ first sends the gathered writes."""
        served = self.served
        if served is None:  # pragma: no cover - requests come only after the handshake
            raise AssertionError("a request before the handshake")
        read_now = served.image.read_now
        conn = self.conn
        writable = not served.readonly
        count = bytes_read = 0
        pending: list[p.Write] = []
        gathered: list[p.Write] = []
        try:
            for event in events:
                if type(event) is _Write:
                    if event.fua or not writable:
                        if pending or gathered:
                            self._send_writes(pending, gathered)
                        self._dispatch(event)
                    elif gathered or self._write_chain is not None:
                        gathered.append(event)
                    else:
                        pending.append(event)
                    continue
                if pending or gathered:
                    self._send_writes(pending, gathered)
                data: p.Buffer | None = None
                if not self._reading_paused:
                    try:
                        if event.length < _POOL_MIN:
                            data = read_now(event.offset, event.length)
                        else:
                            view = self.server.buffers.get(event.length)
                            done = served.image.readinto_now(event.offset, view)
                            data = view if done else None
                    except QedError:
                        data = None
                if data is None:
                    self._dispatch(event)
                    continue
                self._out += conn.reply_read(event.cookie, data)
                count += 1
                bytes_read += event.length
                self._out_bytes += event.length  # (the header is not worth counting)
                if self._out_bytes >= _OUT_BATCH:
                    self._flush_out()
            if pending or gathered:
                self._send_writes(pending, gathered)
        finally:
            if count:
                self._account(count, bytes_read, 0, 0)

    def _send_writes(self, pending: list[p.Write], gathered: list[p.Write]) -> None:
        """Hand the held WRITEs to ``write_batch_now``, answer and account those it
        did; the rest join ``gathered``, which then go to the general path in
        order. Empties both lists."""
        done = 0
        if pending:
            done = self._write_pending(pending)
            gathered.extend(pending[done:])
            pending.clear()
        if gathered:
            self._dispatch_writes(gathered[:])  # (the handler keeps its own list)
            gathered.clear()

    def _write_pending(self, pending: list[p.Write]) -> int:
        """``write_batch_now`` of the held WRITEs; answer and account those it did,
        and say how many."""
        served = self.served
        assert served is not None
        done = served.image.write_batch_now([(e.offset, e.data) for e in pending])
        written = 0
        if done:
            conn = self.conn
            for event in pending[:done]:
                reply = conn.reply_ok(event.cookie)
                self._out += reply
                self._out_bytes += len(reply[0])
                written += event.length
            self._account(done, 0, written, 0)
            if self._out_bytes >= _OUT_BATCH:
                self._flush_out()
        return done

    def _account(self, requests: int, bytes_read: int, bytes_written: int, errors: int) -> None:
        """The one place the export's statistics change, for the fast paths (a batch
        at a time) and the general path (a request at a time)."""
        served = self.served
        if served is not None:
            stats = served.stats
            stats.requests += requests
            stats.bytes_read += bytes_read
            stats.bytes_written += bytes_written
            stats.errors += errors

    def _dispatch(self, event: p.Request) -> None:
        if isinstance(event, p.Write):
            self._payload_bytes += event.length
        self._update_reading()
        if type(event) in _CHANGES:
            self._run_in_order(lambda: self._handle(event), lambda o: self._finished(event, o))
            return
        done, value = step(self._handle(event))
        if done:
            self._finished(event, value)
            return
        task = asyncio.get_running_loop().create_task(
            self._complete(value, lambda o: self._finished(event, o))
        )
        self._track(task)

    def _dispatch_writes(self, events: list[p.Write]) -> None:
        """The general path for several WRITEs at once (``write_batch``), each
        answered and accounted as ``_dispatch`` would."""
        if len(events) == 1:
            self._dispatch(events[0])
            return
        for event in events:
            self._payload_bytes += event.length
        self._update_reading()
        self._run_in_order(
            lambda: self._handle_writes(events), lambda o: self._writes_finished(events, o)
        )

    def _run_in_order(
        self, handler: Callable[[], Coroutine[Any, Any, Any]], finish: Callable[[Any], None]
    ) -> None:
        """Run a request that changes data (``handler()``, then ``finish`` with its
        outcome) now, or, while an earlier one of this connection is still in
        flight (it waits for a flush or a lock), after that one: requests that
        change data reach the engine in the order the client sent them, so a write
        over the bytes of an earlier one in flight lands after it."""
        chain = self._write_chain
        if chain is None:
            done, value = step(handler())
            if done:
                finish(value)
                return
            task = asyncio.get_running_loop().create_task(self._complete(value, finish))
        else:
            task = asyncio.get_running_loop().create_task(self._after(chain, handler, finish))
        self._write_chain = task
        task.add_done_callback(self._chain_done)
        self._track(task)

    def _chain_done(self, task: asyncio.Task[None]) -> None:
        if self._write_chain is task:
            self._write_chain = None

    async def _after(
        self,
        chain: asyncio.Task[None],
        handler: Callable[[], Coroutine[Any, Any, Any]],
        finish: Callable[[Any], None],
    ) -> None:
        await asyncio.wait([chain])  # its failure is its own (reported there)
        await self._complete(handler(), finish)

    async def _handle_writes(self, events: list[p.Write]) -> list[_Outcome]:
        assert self.served is not None
        conn = self.conn
        results = await self.served.image.write_batch([(e.offset, e.data) for e in events])
        outcomes: list[_Outcome] = []
        for event, exc in zip(events, results, strict=True):
            if exc is None:
                outcomes.append((conn.reply_ok(event.cookie), False))
                continue
            self._log.warning(
                "connection %d: write of %d bytes at %d failed: %s",
                self.ident,
                event.length,
                event.offset,
                exc,
            )
            outcomes.append((conn.reply_error(event.cookie, nbd_errno_for(exc), str(exc)), True))
        return outcomes

    def _writes_finished(self, events: list[p.Write], outcomes: list[_Outcome]) -> None:
        for event, outcome in zip(events, outcomes, strict=True):
            self._finished(event, outcome)

    async def _complete(self, pending: Awaitable[Any], finish: Callable[[Any], None]) -> None:
        finish(await pending)
        # Input may have waited for this request to finish (a full queue).
        if not self.closing and self.transport is not None:
            self._pump()
        self._flush_out()

    def _finished(self, event: p.Request, outcome: _Outcome) -> None:
        if isinstance(event, p.Write):
            self._payload_bytes -= event.length
        reply, failed = outcome
        if type(event) is not p.InvalidRequest:  # a refused request was not served
            done = 0 if failed else event.length
            read = done if type(event) is _Read else 0
            self._account(1, read, done if type(event) is _Write else 0, int(failed))
        self._write(reply)
        self._update_reading()
        if self.closing:
            self._flush_out()
            self._maybe_finish()

    async def _handle(self, event: p.Request) -> _Outcome:
        """Serve one request: its reply, and whether the engine failed. Never raises
        (errors become error replies); ``_finished`` does the accounting."""
        conn = self.conn
        cookie = event.cookie
        if isinstance(event, p.InvalidRequest):
            self._log.info("connection %d: refused %s", self.ident, event.message)
            return conn.reply_error(cookie, event.errno, event.message), False
        assert self.served is not None
        image = self.served.image
        try:
            if isinstance(event, p.Read):
                if event.length >= _POOL_MIN:
                    # A page-aligned buffer (unaligned large buffers copy 5x slower,
                    # see the machine notes), reused once its last reply is sent
                    # (nbd.buffers).
                    view = self.server.buffers.get(event.length)
                    await image.readinto(event.offset, view)
                    return conn.reply_read(cookie, view), False
                data = bytearray(event.length)
                await image.readinto(event.offset, data)
                return conn.reply_read(cookie, data), False
            if isinstance(event, p.Write):
                await image.write(event.offset, event.data)
                if event.fua:
                    await image.flush()
            elif isinstance(event, p.Flush):
                await image.flush()
            elif isinstance(event, p.Trim):
                await image.discard(event.offset, event.length)
                if event.fua:
                    await image.flush()
            elif isinstance(event, p.WriteZeroes):
                await image.write_zeroes(event.offset, event.length, unmap=not event.no_hole)
                if event.fua:
                    await image.flush()
            elif isinstance(event, p.Cache):
                await self._cache(image, event.offset, event.length)
            elif isinstance(event, p.BlockStatus):
                extents = await self._block_status(image, event)
                return conn.reply_block_status(cookie, extents), False
            return conn.reply_ok(cookie), False
        except QedError as exc:
            self._log.warning(
                "connection %d: %s of %d bytes at %d failed: %s",
                self.ident,
                type(event).__name__.lower(),
                event.length,
                event.offset,
                exc,
            )
            return conn.reply_error(cookie, nbd_errno_for(exc), str(exc)), True

    async def _cache(self, image: BlockImage, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: read the range so it is in the page cache."""
        chunk = 1 << 20
        scratch = bytearray(min(chunk, length))
        pos, end = offset, offset + length
        while pos < end:
            n = min(chunk, end - pos)
            await image.readinto(pos, memoryview(scratch)[:n])
            pos += n

    async def _block_status(
        self, image: BlockImage, event: p.BlockStatus
    ) -> dict[int, list[tuple[int, int]]]:
        entries = await map_chain(image, event.offset, event.length)
        out: dict[int, list[tuple[int, int]]] = {}
        for context in event.context_ids:
            if context is p.MetaContext.BASE_ALLOCATION:
                out[context] = _merge((e.length, _allocation_flags(e)) for e in entries)
            else:
                out[context] = _merge((e.length, e.depth + 1 if e.present else 0) for e in entries)
        return out

    # ---- output and lifetime ---------------------------------------------------------

    def _send_handshake(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def _write(self, buffers: Sequence[p.Buffer]) -> None:
        """Queue a reply; ``_flush_out`` sends the queue (or this, if it grew large)."""
        self._out += buffers
        count = len(buffers)
        if count == 1:  # a simple reply
            self._out_bytes += len(buffers[0])
        elif count == 2:  # a READ's header and data
            self._out_bytes += len(buffers[0]) + len(buffers[1])
        else:
            self._out_bytes += sum(map(len, buffers))
        if self._out_bytes >= _OUT_BATCH:
            self._flush_out()

    def _flush_out(self) -> None:
        out = self._out
        if not out:
            return
        transport = self.transport
        size = self._out_bytes
        self._out = []
        self._out_bytes = 0
        if transport is None or transport.is_closing():
            return
        poller = self._poller
        if poller is not None:
            poller.arm()  # spins once the loop has run what is due: after this send
        if len(out) == 1:
            transport.write(out[0])
        elif self._gather:
            transport.writelines(out)  # uvloop: one writev, nothing copied
        elif size <= _JOIN_MAX:
            transport.write(b"".join(out))  # asyncio's writelines joins anyway
        else:
            for buffer in out:  # large payloads: no copy into a joined buffer
                transport.write(buffer)

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None:
            return
        busy = (
            self.conn.inflight >= MAX_INFLIGHT
            or self._payload_bytes >= MAX_INFLIGHT_BYTES
            or self._writing_paused
        )
        if busy and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not busy and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("connection %d: internal error", self.ident, exc_info=task.exception())
            self._drop("internal error")
        self._maybe_finish()

    def shutdown(self) -> None:
        """The server stops: refuse new requests, finish the ones in flight."""
        self.conn.start_shutdown()
        if self.waiting:  # the greeting, then the close: options would get ERR_SHUTDOWN
            self._end_wait()
            self._send_handshake()
        self._pump()
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        self.closing = True
        self._maybe_finish()

    def _drop(self, why: str) -> None:
        self._log.warning("connection %d from %s dropped: %s", self.ident, self.peer, why)
        self._flush_out()
        self.closing = True
        if self.transport is not None:
            self.transport.close()  # replies already queued still go out
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self.closing and self.transport is not None:
            return
        if self.tasks:
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if not self.closed.done():
            if self.served is not None:
                self.served.stats.connections -= 1
            self._end_wait()
            self.closed.set_result(None)
            self.server.connections.pop(self.ident, None)
            self._log.info("connection %d closed", self.ident)
            self.server._leave(self)


def _allocation_flags(entry: MapEntry) -> int:
    """base:allocation as QEMU's NBD server reports it: a hole unless the chain has
    data there, zero where the chain says it reads as zeros."""
    flags = 0 if entry.data else _STATE_HOLE
    if entry.zero:
        flags |= _STATE_ZERO
    return flags


def _merge(extents: Any) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for length, flags in extents:
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))
    return out


# ---- the server -------------------------------------------------------------------------


_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux, the terminating NUL included


def claim_unix_path(path: str) -> None:
    """Make ``path`` free for a new unix socket: a stale socket file is removed, but a
    socket a live server still accepts on is not (QedError), and neither is anything
    that is not a socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise QedError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left over from an earlier run
        return
    finally:
        probe.close()
    raise QedError(f"{path} is in use by a running server")


def bind_unix(path: str, backlog: int = 128) -> socket.socket:
    """A unix socket listening at ``path`` (claimed first, see ``claim_unix_path``).

    The socket is bound under a temporary name beside ``path``, set listening, and
    only then renamed into place, so that a client that sees the path appear can
    connect at once: between bind() and listen() a connect() is refused, and a
    client waiting for the path alone would hit that window on a busy machine.
    A path too long for a temporary twin is bound directly. OSError on failure."""
    claim_unix_path(path)
    head, tail = os.path.split(path)
    temporary = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
    direct = len(os.fsencode(temporary)) >= _SUN_PATH_MAX
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if direct:
            sock.bind(path)
            sock.listen(backlog)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)  # a crashed run of this same pid
            sock.bind(temporary)
            try:
                sock.listen(backlog)
                os.rename(temporary, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
    except BaseException:
        sock.close()
        raise
    return sock


class NbdServer:
    """Serves ``images`` over NBD until ``stop()``. Listen with ``listen_unix`` and/or
    ``listen_tcp`` (the default host is loopback); then ``await wait_stopped()``."""

    def __init__(
        self,
        images: Sequence[ServedImage],
        *,
        max_connections: int = 1,
        connection_wait: float = DEFAULT_CONNECTION_WAIT,
        ssl_context: ssl.SSLContext | None = None,
        busy_poll_ns: int = 0,
    ) -> None:
        names = [s.name for s in images]
        if len(set(names)) != len(names):
            raise QedError(f"export names must be unique: {names}")
        self.images = list(images)
        self.by_name = {s.name: s for s in images}
        self.max_connections = max_connections
        self.connection_wait = connection_wait
        self.ssl_context = ssl_context
        self.tls_mode = p.TlsMode.REQUIRED if ssl_context is not None else p.TlsMode.DISABLED
        self.connections: dict[int, _Connection] = {}
        # Large READ replies and WRITE payloads, shared by the connections.
        self.buffers = BufferPool()
        self._slots_taken = 0
        self._waiting: collections.deque[_Connection] = collections.deque()
        self.stopping = False
        self.started = time.monotonic()
        self._listeners: list[asyncio.Server] = []
        self._next_ident = 1
        self._stopped: asyncio.Future[None] | None = None
        # Awaited by stop(): on_stopping before the drain (cancel jobs), on_stop after
        # it (close the control socket, which reports the drain meanwhile).
        self.on_stopping: list[Callable[[], Awaitable[None]]] = []
        self.on_stop: list[Callable[[], Awaitable[None]]] = []
        # Busy-polling after replies (nbd.poll), made with the first connection,
        # inside the loop; off (None) unless asked for.
        self._busy_poll_ns = busy_poll_ns
        self._poller: BusyPoller | None = None

    def payload_buffer(self, size: int) -> memoryview:
        """A WRITE payload's own buffer: pooled when large (``nbd.buffers``), a fresh
        bytearray when small (malloc's, cheap)."""
        if size >= _POOL_MIN:
            return self.buffers.get(size)
        return memoryview(bytearray(size))

    @property
    def poller(self) -> BusyPoller | None:
        if self._poller is None and self._busy_poll_ns > 0:
            self._poller = BusyPoller(asyncio.get_running_loop(), self._busy_poll_ns)
        return self._poller

    # ---- admission ---------------------------------------------------------------------

    @property
    def connections_waiting(self) -> int:
        """Connections waiting for a slot."""
        return len(self._waiting)

    def _arrive(self, connection: _Connection) -> None:
        """A new connection takes a free slot, or waits for one (first come, first
        served), at most ``connection_wait`` seconds."""
        if self.stopping or (self._slots_taken < self.max_connections and not self._waiting):
            self._take_slot(connection, waited=False)
        elif self.connection_wait <= 0:
            connection.hold(0)  # refused at once, but still in words
        else:
            self._waiting.append(connection)
            connection.hold(self.connection_wait)

    def _take_slot(self, connection: _Connection, *, waited: bool) -> None:
        self._slots_taken += 1
        connection.holds_slot = True
        connection.admit(waited=waited)

    def _forget_waiting(self, connection: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self._waiting.remove(connection)

    def _leave(self, connection: _Connection) -> None:
        """A connection closed: its slot (if it had one) goes to the longest waiter."""
        if connection.holds_slot:
            connection.holds_slot = False
            self._slots_taken -= 1
        else:
            self._forget_waiting(connection)
        while self._waiting and self._slots_taken < self.max_connections and not self.stopping:
            self._take_slot(self._waiting.popleft(), waited=True)

    def _protocol(self) -> _Connection:
        ident = self._next_ident
        self._next_ident += 1
        connection = _Connection(self, ident)
        self.connections[ident] = connection
        return connection

    async def listen_unix(self, path: str) -> None:
        await self.listen_socket(bind_unix(path))
        log.info("listening on unix socket %s", path)

    async def listen_tcp(self, host: str = "127.0.0.1", port: int = 10809) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._protocol, host, port, reuse_address=True)
        self._listeners.append(server)
        bound = server.sockets[0].getsockname()[1]
        log.info("listening on %s:%d", host, bound)
        return int(bound)

    async def listen_socket(self, sock: Any) -> None:
        """Serve on an already bound and listening socket (inherited, or made before a
        fork so the parent can report the address)."""
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(self._protocol, sock=sock)
        else:
            server = await loop.create_server(self._protocol, sock=sock)
        self._listeners.append(server)

    async def wait_stopped(self) -> None:
        if self._stopped is None:
            self._stopped = asyncio.get_running_loop().create_future()
        await self._stopped

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish, close the images."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: %d connections to drain", len(self.connections))
        if self._poller is not None:
            q = self._poller
            log.info("busy-poll: %d spins found a request, %d ran out", q.hits, q.misses)
        for listener in self._listeners:
            listener.close()
        for connection in list(self.connections.values()):
            connection.shutdown()
        # Jobs first: a paused job may hold allocating writes that the drain below
        # would otherwise wait for forever.
        for hook in self.on_stopping:
            await hook()
        waits = [c.closed for c in self.connections.values()]
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)
        for hook in self.on_stop:
            await hook()
        for served in self.images:
            try:
                await served.image.close()
            except QedError as exc:
                log.error("closing %s failed: %s", served.image.filename, exc)
        for listener in self._listeners:
            await listener.wait_closed()
        if self._stopped is None:
            self._stopped = asyncio.get_running_loop().create_future()
        if not self._stopped.done():
            self._stopped.set_result(None)

    def uptime(self) -> float:
        return time.monotonic() - self.started
