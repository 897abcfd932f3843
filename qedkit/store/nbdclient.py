"""An NBD export as a remote source: a small asyncio client (reads only).

References: NetworkBlockDevice/nbd doc/proto.md ("proto.md: <section>") for the
protocol and doc/uri.md for the URLs; the wire constants come from
:mod:`qedkit.nbd.protocol` (the server's sans-I/O core names them once for both ends).

URLs (doc/uri.md): ``nbd://HOST[:PORT]/NAME`` (port 10809 by default) and
``nbd+unix:///NAME?socket=PATH``; the export name is the path without its first
``/``, percent-decoded (``nbd://h/`` and ``nbd://h`` name the default export ""). TLS
(``nbds``) is not supported yet, and an unknown query parameter is refused, as uri.md
asks of a client.

Theory of operation
===================

*Handshake* (proto.md: Fixed newstyle negotiation). The server's greeting must offer
fixed newstyle; the client answers FIXED_NEWSTYLE (and NO_ZEROES when offered), then
sends NBD_OPT_GO with the export name and a request for NBD_INFO_BLOCK_SIZE (a client
that asks promises to honour the constraints). The replies give the size and flags
(NBD_INFO_EXPORT) and the block sizes; NBD_REP_ACK ends the handshake. A server that
answers NBD_REP_ERR_UNSUP to GO gets NBD_OPT_EXPORT_NAME instead (proto.md says a
server that does not know GO may be old). Structured replies are not asked for: only
simple replies come back, and a READ's payload follows its reply header.

*Transmission.* One persistent connection carries every request: ``fetch`` writes an
NBD_CMD_READ at once (the transport sends it without waiting for the loop) and returns
a future; one reader task takes each reply, finds the request by its cookie (replies
may come in any order) and reads the payload in ``piece_size`` pieces. A READ answered
by one OFFSET_DATA chunk (the usual case) keeps those pieces; one answered in several
data and hole chunks is assembled in a buffer. ``extents`` asks NBD_CMD_BLOCK_STATUS
for base:allocation: the store's map then shows the export's zeros as holes (``qed
map``, ``qed convert`` and, later, streaming skip them).
Requests stay inside the maximum block size the server advertised (32 MiB by default,
proto.md: Block size constraints).

*Failures.* A connection that cannot be made, is lost, or gives no reply within
``timeout`` seconds fails every request on it with TransientError and is dropped; the
next fetch connects again (the store's retry policy paces it). A reconnected export
whose size differs from the first one is a StoreError ("the remote size changed"), as
are a refused export, a protocol violation and an error reply (EINVAL, EIO ...).
Messages name the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import os
import struct
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import StoreError, UnsupportedFeatureError
from ..nbd.protocol import (
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    StateFlag,
)
from .base import StoreExtent
from .remote import RemoteSource, TransientError

DEFAULT_PORT = 10809  # IANA's port for NBD (doc/uri.md)
# proto.md: Block size constraints: without NBD_INFO_BLOCK_SIZE a client should not
# send requests larger than 32 MiB.
DEFAULT_MAX_BLOCK = 32 * 1024 * 1024

_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
_INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, preferred, max
_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
_EXPORT_NAME_PADDING = 124  # proto.md: zeros after it unless NO_ZEROES
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_MAGIC = struct.Struct(">I")  # the first word of every reply
_SIMPLE_REST = struct.Struct(">IQ")  # simple reply after its magic: error, cookie
_CHUNK_REST = struct.Struct(">HHQI")  # chunk after its magic: flags, type, cookie, length
_OFFSET = struct.Struct(">Q")  # OFFSET_DATA: offset, then the data
_HOLE = struct.Struct(">QI")  # OFFSET_HOLE: offset, hole size
_MAX_OPTION_REPLY = 1 << 20  # more than any INFO or error message can need
_ALLOCATION = "base:allocation"  # proto.md: Metadata querying
_MAX_STATUS = 1 << 31  # the longest range asked about in one NBD_CMD_BLOCK_STATUS


@dataclass(frozen=True, slots=True)
class NbdAddress:
    """Where an NBD URL points: a TCP host and port, or a unix socket, and an export."""

    export: str
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None


def parse_nbd_url(url: str) -> NbdAddress:
    """Parse ``nbd://`` and ``nbd+unix://`` URLs (doc/uri.md); StoreError if invalid."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix"):
        raise UnsupportedFeatureError("NBD over TLS (nbds://) is not supported yet", filename=url)
    if scheme not in ("nbd", "nbd+unix"):
        raise StoreError(f"not an NBD URL (scheme {parts.scheme!r})", filename=url)
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"socket"})
    if unknown:
        raise StoreError(f"unknown query parameter(s) {', '.join(unknown)}", filename=url)
    if scheme == "nbd+unix":
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise StoreError("an nbd+unix URL needs one ?socket=PATH", filename=url)
        if parts.netloc:
            raise StoreError("an nbd+unix URL has no host (nbd+unix:///NAME?...)", filename=url)
        return NbdAddress(export, socket=sockets[0])
    if "socket" in query:
        raise StoreError("?socket= belongs to nbd+unix URLs", filename=url)
    if not parts.hostname:
        raise StoreError("an nbd URL needs a host", filename=url)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise StoreError(f"invalid port in URL: {exc}", filename=url) from exc
    return NbdAddress(export, host=parts.hostname, port=port)


@dataclass(frozen=True, slots=True)
class _Negotiated:
    """What the handshake settled."""

    size: int
    max_block: int
    structured: bool  # structured replies
    context: int | None  # the id of base:allocation, when the server has it


class _Protocol(Exception):
    """The server broke the protocol (internal; becomes a StoreError)."""


class _Request:
    """A request in flight (internal, mutable): what its reply is gathering."""

    __slots__ = (
        "buffer", "cmd", "covered", "error", "extents", "future", "length", "offset",
        "pieces", "timer",
    )  # fmt: skip

    def __init__(self, cmd: int, offset: int, length: int, future: asyncio.Future[Any]) -> None:
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.future = future
        self.timer: asyncio.TimerHandle | None = None
        self.pieces: list[bytes] | None = None  # a READ answered by one data chunk
        self.buffer: bytearray | None = None  # a READ answered in several chunks
        self.covered = 0  # bytes of a READ answered so far
        self.error: Exception | None = None  # an error chunk, reported at DONE
        self.extents: list[tuple[int, int]] = []  # BLOCK_STATUS: (length, flags)


def _reply_error(error: int, name: str, message: str = "") -> Exception:
    """The exception for an error an NBD reply carries (ESHUTDOWN: try again)."""
    symbol = _errno.errorcode.get(error, str(error))
    reason = os.strerror(error) if error in _errno.errorcode else "error"
    text = f"the server answered {symbol} ({reason})" + (f": {message}" if message else "")
    if error == _errno.ESHUTDOWN:  # the server is going away: another one may come
        return TransientError(text)
    return StoreError(text, filename=name)


class _Connection:
    """One transmission-phase connection: requests out, replies in by cookie."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        size: int,
        max_block: int,
        structured: bool,
        allocation_context: int | None,
        piece_size: int,
        timeout: float,
        name: str,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.size = size
        self.max_block = max_block
        self.structured = structured  # NBD_OPT_STRUCTURED_REPLY was acknowledged
        self.allocation_context = allocation_context  # base:allocation's id, if any
        self.piece_size = piece_size
        self.timeout = timeout
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, _Request] = {}
        self.cookie = 0
        self.dead: BaseException | None = None
        self.task = self.loop.create_task(self._read_replies())

    def _send(self, cmd: int, offset: int, length: int) -> _Request:
        self.cookie += 1
        cookie = self.cookie
        request = _Request(cmd, offset, length, self.loop.create_future())
        request.timer = self.loop.call_later(self.timeout, self._time_out, cookie)
        self.pending[cookie] = request
        self.writer.write(_REQUEST.pack(REQUEST_MAGIC, 0, cmd, cookie, offset, length))
        return request

    def read(self, offset: int, length: int) -> asyncio.Future[list[bytes]]:
        """Send NBD_CMD_READ now; the future completes with the payload's pieces."""
        future: asyncio.Future[list[bytes]] = self._send(Cmd.READ, offset, length).future
        return future

    def block_status(self, offset: int, length: int) -> asyncio.Future[list[tuple[int, int]]]:
        """Send NBD_CMD_BLOCK_STATUS (base:allocation) now; the future completes with
        (length, flags) descriptors from ``offset``."""
        future: asyncio.Future[list[tuple[int, int]]] = self._send(
            Cmd.BLOCK_STATUS, offset, length
        ).future
        return future

    def _time_out(self, cookie: int) -> None:
        if cookie in self.pending:
            self.kill(TransientError(f"no reply within {self.timeout:g} s"))

    def kill(self, exc: BaseException) -> None:
        """Fail every pending request with ``exc`` and drop the connection."""
        if self.dead is None:
            self.dead = exc
        pending, self.pending = self.pending, {}
        for request in pending.values():
            if request.timer is not None:
                request.timer.cancel()
            if not request.future.done():
                request.future.set_exception(exc)
        if not self.task.done() and self.task is not asyncio.current_task():
            self.task.cancel()
        self.writer.close()

    def _take(self, cookie: int, *, last: bool) -> _Request:
        request = self.pending.get(cookie)
        if request is None:
            raise _Protocol(f"a reply to unknown request {cookie}")
        if last:
            del self.pending[cookie]
            if request.timer is not None:
                request.timer.cancel()
        return request

    async def _read_replies(self) -> None:
        reader = self.reader
        try:
            while True:
                (magic,) = _MAGIC.unpack(await reader.readexactly(_MAGIC.size))
                if magic == SIMPLE_REPLY_MAGIC:
                    await self._simple_reply()
                elif magic == STRUCTURED_REPLY_MAGIC and self.structured:
                    await self._chunk()
                else:
                    raise _Protocol(f"bad reply magic {magic:#x}")
        except asyncio.CancelledError:
            raise
        except asyncio.IncompleteReadError:
            self.kill(TransientError("the server closed the connection"))
        except OSError as exc:
            self.kill(TransientError(f"connection lost: {exc.strerror or exc}"))
        except _Protocol as exc:
            self.kill(StoreError(f"protocol error: {exc}", filename=self.name))

    async def _simple_reply(self) -> None:
        """proto.md: Simple reply message (a READ's payload follows unless in error)."""
        error, cookie = _SIMPLE_REST.unpack(await self.reader.readexactly(_SIMPLE_REST.size))
        request = self._take(cookie, last=True)
        if error:
            _settle(request.future, _reply_error(error, self.name))
            return
        if request.cmd != Cmd.READ:
            raise _Protocol(f"a simple reply without error to command {request.cmd}")
        _settle(request.future, None, await self._payload(request.length))

    async def _payload(self, length: int) -> list[bytes]:
        pieces = []
        while length:
            n = min(self.piece_size, length)
            pieces.append(await self.reader.readexactly(n))
            length -= n
        return pieces

    async def _chunk(self) -> None:
        """proto.md: Structured reply chunk message, one of a request's replies."""
        reader = self.reader
        flags, kind, cookie, length = _CHUNK_REST.unpack(await reader.readexactly(_CHUNK_REST.size))
        done = bool(flags & ReplyFlag.DONE)
        request = self._take(cookie, last=done)
        if kind == ReplyType.OFFSET_DATA:
            if length < 8:
                raise _Protocol(f"OFFSET_DATA chunk of {length} bytes")
            (offset,) = _OFFSET.unpack(await reader.readexactly(8))
            size = length - 8
            start = offset - request.offset
            if start < 0 or start + size > request.length:
                raise _Protocol(f"data chunk at {offset}+{size} outside the READ")
            if start == 0 and size == request.length and not request.covered:
                request.pieces = await self._payload(size)  # all of it: pieces, no copy
                request.covered = size
                if done:
                    self._finish(request)
                return
            buf = request.buffer = request.buffer or bytearray(request.length)
            view = memoryview(buf)[start : start + size]
            view[:] = await reader.readexactly(size)
            request.covered += size
        elif kind == ReplyType.OFFSET_HOLE:
            if length != 12:
                raise _Protocol(f"OFFSET_HOLE chunk of {length} bytes")
            offset, size = _HOLE.unpack(await reader.readexactly(12))
            if offset < request.offset or offset + size > request.offset + request.length:
                raise _Protocol(f"hole chunk at {offset}+{size} outside the READ")
            request.buffer = request.buffer or bytearray(request.length)  # zeros already
            request.covered += size
        elif kind == ReplyType.BLOCK_STATUS:
            if length < 4 or (length - 4) % 8:
                raise _Protocol(f"BLOCK_STATUS chunk of {length} bytes")
            payload = await reader.readexactly(length)
            (context,) = struct.unpack_from(">I", payload)
            if context == self.allocation_context:
                request.extents += [d for d in struct.iter_unpack(">II", payload[4:])]
        elif kind in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            payload = await reader.readexactly(length)
            if len(payload) < 6:
                raise _Protocol(f"error chunk of {length} bytes")
            error, size = struct.unpack_from(">IH", payload)
            message = payload[6 : 6 + size].decode("utf-8", "replace")
            request.error = request.error or _reply_error(error or _errno.EIO, self.name, message)
        elif kind == ReplyType.NONE:
            if length:
                raise _Protocol("NONE chunk with a payload")
        else:  # proto.md: a client MUST treat an unknown non-error type as an error
            await reader.readexactly(length)
            request.error = request.error or StoreError(
                f"unknown reply chunk type {kind}", filename=self.name
            )
        if done:
            self._finish(request)

    def _finish(self, request: _Request) -> None:
        """The request's last chunk arrived: complete its future."""
        if request.error is not None:
            _settle(request.future, request.error)
        elif request.cmd == Cmd.BLOCK_STATUS:
            _settle(request.future, None, request.extents)
        elif request.covered != request.length:
            _settle(
                request.future,
                StoreError(
                    f"the server answered {request.covered} of {request.length} bytes "
                    f"of a READ at offset {request.offset}",
                    filename=self.name,
                ),
            )
        elif request.pieces is not None:
            _settle(request.future, None, request.pieces)
        else:
            buf = request.buffer or bytearray(request.length)
            step = self.piece_size
            _settle(
                request.future, None, [bytes(buf[i : i + step]) for i in range(0, len(buf), step)]
            )

    async def close(self) -> None:
        if self.dead is None:
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write(_REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0))
            self.kill(StoreError("store is closed", filename=self.name))
        with contextlib.suppress(OSError, asyncio.CancelledError, RuntimeError):
            await self.writer.wait_closed()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def _settle(future: asyncio.Future[Any], error: BaseException | None, result: Any = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class NbdSource(RemoteSource):
    """One export on an NBD server (see the module docstring)."""

    def __init__(self, url: str, *, piece_size: int, timeout: float = 30.0) -> None:
        self.url = url
        self.name = url
        self.address = parse_nbd_url(url)
        self.piece_size = piece_size
        self.timeout = timeout
        self.max_request = DEFAULT_MAX_BLOCK
        self._size: int | None = None
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False

    # ---- the source -------------------------------------------------------------------

    async def open(self, head: int) -> tuple[int, Sequence[bytes]]:
        conn = await self._connection()
        length = min(head, conn.size)
        return conn.size, (await conn.read(0, length)) if length else []

    def fetch(self, offset: int, length: int) -> asyncio.Future[list[bytes]]:
        if self._closed:
            raise StoreError("store is closed", filename=self.name)
        conn = self._conn
        if conn is not None and conn.dead is None and conn.loop is asyncio.get_running_loop():
            return conn.read(offset, length)
        return asyncio.ensure_future(self._fetch_after_connect(offset, length))

    async def extents(self, offset: int, length: int) -> list[StoreExtent] | None:
        """base:allocation of the range (NBD_CMD_BLOCK_STATUS): ZERO is a hole that
        reads as zeros, anything else data; None when the server has no such context."""
        conn = await self._connection()
        if conn.allocation_context is None:
            return None
        out: list[StoreExtent] = []
        pos, end = offset, offset + length
        while pos < end:
            descriptors = await conn.block_status(pos, min(end - pos, _MAX_STATUS))
            if not descriptors or any(n == 0 for n, _ in descriptors):
                raise StoreError(
                    f"an empty block status answer at offset {pos}", filename=self.name
                )
            for n, flags in descriptors:
                n = min(n, end - pos)
                data = not flags & StateFlag.ZERO
                if out and out[-1].data == data:
                    last = out.pop()
                    out.append(StoreExtent(last.offset, last.length + n, data))
                else:
                    out.append(StoreExtent(pos, n, data))
                pos += n
                if pos >= end:
                    break
        return out

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None and conn.loop is asyncio.get_running_loop():
            await conn.close()

    # ---- connecting -------------------------------------------------------------------

    async def _fetch_after_connect(self, offset: int, length: int) -> list[bytes]:
        conn = await self._connection()
        return await conn.read(offset, length)

    async def _connection(self) -> _Connection:
        """The live connection, made (once, however many callers wait) if needed."""
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is not None and conn.dead is None and conn.loop is loop:
            return conn
        task = self._connecting
        if task is None or task.get_loop() is not loop or task.done():
            task = self._connecting = loop.create_task(self._connect())
        try:
            conn = await asyncio.shield(task)
        finally:
            if task.done() and self._connecting is task:
                self._connecting = None
        if self._closed:
            await conn.close()
            raise StoreError("store is closed", filename=self.name)
        self._conn = conn
        return conn

    async def _connect(self) -> _Connection:
        addr = self.address
        where = addr.socket if addr.socket is not None else f"{addr.host}:{addr.port}"
        limit = 4 * self.piece_size + 1024  # the stream's buffer pauses the socket past 2x
        try:
            if addr.socket is not None:
                coro = asyncio.open_unix_connection(addr.socket, limit=limit)
            else:
                coro = asyncio.open_connection(addr.host, addr.port, limit=limit)
            reader, writer = await asyncio.wait_for(coro, self.timeout)
        except TimeoutError as exc:
            raise TransientError(f"cannot connect to {where}: no answer") from exc
        except OSError as exc:
            raise TransientError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
        try:
            negotiated = await asyncio.wait_for(self._handshake(reader, writer), self.timeout)
        except BaseException as exc:
            writer.close()
            if isinstance(exc, TimeoutError):
                raise TransientError("no answer to the handshake") from exc
            if isinstance(exc, asyncio.IncompleteReadError | OSError):
                raise TransientError("the server closed the connection in the handshake") from exc
            if isinstance(exc, _Protocol):
                raise StoreError(f"handshake failed: {exc}", filename=self.name) from exc
            raise
        size = negotiated.size
        if self._size is not None and size != self._size:
            writer.close()
            raise StoreError(
                f"the remote size changed from {self._size} to {size} bytes", filename=self.name
            )
        self._size = size
        self.max_request = negotiated.max_block
        return _Connection(
            reader,
            writer,
            size=size,
            max_block=negotiated.max_block,
            structured=negotiated.structured,
            allocation_context=negotiated.context,
            piece_size=self.piece_size,
            timeout=self.timeout,
            name=self.name,
        )

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Negotiated:
        """proto.md: Fixed newstyle negotiation, up to the transmission phase."""
        magic, opt_magic, hflags = _GREETING.unpack(await reader.readexactly(_GREETING.size))
        if magic != NBDMAGIC:
            raise _Protocol(f"not an NBD server (greeting {magic:#x})")
        if opt_magic != IHAVEOPT:
            raise _Protocol("oldstyle negotiation is not supported (the server must be newstyle)")
        if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
            raise _Protocol("the server does not offer fixed newstyle negotiation")
        no_zeroes = bool(hflags & HandshakeFlag.NO_ZEROES)
        flags = ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if no_zeroes else 0)
        writer.write(struct.pack(">I", flags))
        name = self.address.export.encode()
        if len(name) > MAX_STRING:
            raise _Protocol(f"export name longer than {MAX_STRING} bytes")
        # Structured replies, so that base:allocation can be asked (block status);
        # a server that refuses either is used with simple replies and no map.
        replies = await self._option(reader, writer, Opt.STRUCTURED_REPLY, b"")
        structured = replies[-1][0] == Rep.ACK
        context: int | None = None
        if structured:
            query = _ALLOCATION.encode()
            data = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(query)) + query
            replies = await self._option(reader, writer, Opt.SET_META_CONTEXT, data)
            for reply, payload in replies:
                if reply == Rep.META_CONTEXT and payload[4:] == query:
                    (context,) = struct.unpack_from(">I", payload)
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, Info.BLOCK_SIZE)
        size: int | None = None
        max_block = DEFAULT_MAX_BLOCK
        replies = await self._option(reader, writer, Opt.GO, data)
        for reply, payload in replies[:-1]:
            if reply == Rep.INFO and len(payload) >= 2:
                (kind,) = struct.unpack_from(">H", payload)
                if kind == Info.EXPORT and len(payload) == _INFO_EXPORT.size:
                    _, size, _tflags = _INFO_EXPORT.unpack(payload)
                elif kind == Info.BLOCK_SIZE and len(payload) == _INFO_BLOCK_SIZE.size:
                    _, _minimum, _preferred, maximum = _INFO_BLOCK_SIZE.unpack(payload)
                    max_block = maximum
        reply, payload = replies[-1]
        if reply == Rep.ACK:
            if size is None:
                raise _Protocol("NBD_OPT_GO was acknowledged without NBD_INFO_EXPORT")
            return _Negotiated(size, max(1, min(max_block, DEFAULT_MAX_BLOCK)), structured, context)
        if reply == Rep.ERR_UNSUP:  # an old server: the option that cannot fail
            writer.write(_OPTION.pack(IHAVEOPT, Opt.EXPORT_NAME, len(name)) + name)
            size, _tflags = _EXPORT_NAME_REPLY.unpack(
                await reader.readexactly(_EXPORT_NAME_REPLY.size)
            )
            if not no_zeroes:
                await reader.readexactly(_EXPORT_NAME_PADDING)
            return _Negotiated(size, DEFAULT_MAX_BLOCK, structured, context)
        message = payload.decode("utf-8", "replace")
        if reply == Rep.ERR_SHUTDOWN:  # a server restarting: try again later
            raise TransientError(_refusal(reply, self.address.export, message))
        raise _Protocol(_refusal(reply, self.address.export, message))

    @staticmethod
    async def _option(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, option: int, data: bytes
    ) -> list[tuple[int, bytes]]:
        """Send one option; its replies up to the final one (ACK or an error), last."""
        writer.write(_OPTION.pack(IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            rmagic, answered, reply, length = _OPTION_REPLY.unpack(
                await reader.readexactly(_OPTION_REPLY.size)
            )
            if rmagic != OPTION_REPLY_MAGIC or answered != option:
                raise _Protocol(f"bad option reply (magic {rmagic:#x}, option {answered})")
            if length > _MAX_OPTION_REPLY:
                raise _Protocol(f"option reply of {length} bytes")
            replies.append((reply, await reader.readexactly(length)))
            if reply not in (Rep.INFO, Rep.META_CONTEXT, Rep.SERVER):
                return replies


def _refusal(reply: int, export: str, message: str) -> str:
    known: dict[int, str] = {
        Rep.ERR_UNKNOWN: f"the server has no export named {export!r}",
        Rep.ERR_POLICY: "the server refused the export (policy)",
        Rep.ERR_TLS_REQD: "the server requires TLS, which is not supported yet",
        Rep.ERR_SHUTDOWN: "the server is shutting down",
        Rep.ERR_BLOCK_SIZE_REQD: "the server requires block size negotiation",
    }
    text = known.get(reply) or f"NBD_OPT_GO refused (reply {reply:#x})"
    return f"{text}: {message}" if message else text
