"""Transmission replies: simple replies, structured chunks, READ data, BLOCK_STATUS.

References: proto.md: Simple reply message, Structured reply chunk message,
Structured reply types, NBD_CMD_BLOCK_STATUS.

:class:`Replies` answers the requests of the :class:`~.transmission.InFlightTable`.
Each method checks that the request awaits exactly that reply (LocalProtocolError
otherwise: nothing emitted, nothing changed), encodes it and marks the request
answered. The result is a list of buffers for ``writelines``: headers as ``bytes``,
data as views of the caller's buffers (nothing is copied), holes that must be spelled
out as views of one shared zero block.

Choices: errors always use structured error chunks (with the message) when structured
replies were negotiated; successful non-READ replies are simple replies (allowed, and
4 bytes shorter). All of NBD_CMD_BLOCK_STATUS's encoding (extent trimming, descriptor
layout, one chunk per context) is :meth:`Replies.block_status` and ``_trim_extents``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from .buffer import byte_view
from .errors import LocalProtocolError
from .events import DataChunk, HoleChunk, ReadChunk
from .transmission import COMMAND_RULES, InFlight, InFlightTable
from .wire import (
    CHUNK,
    CHUNK_HOLE,
    CHUNK_OFFSET,
    CMD_READ,
    DESCRIPTOR,
    ERROR_HEAD,
    FLAG_DF,
    FLAG_DONE,
    FLAG_REQ_ONE,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U32_FIELD,
    U32_MAX,
    U64_FIELD,
    Buffer,
    Errno,
    MetaContext,
    ReplyType,
    command_name,
    encode_message,
)

# Shared zeros for holes that must be spelled out (simple READ replies, DF replies).
# bytes(n) is calloc'ed: the pages cost nothing until a reply actually sends them.
_ZERO_BLOCK_SIZE: Final = 1 << 20
_ZERO_BLOCK: Final = bytes(_ZERO_BLOCK_SIZE)

# A tuple, not ``bytes | bytearray | memoryview``: a union is built anew on every call.
_BUFFERS = (bytes, bytearray, memoryview)


def _zeros(length: int) -> list[Buffer]:
    """Views of the shared zero block covering ``length`` bytes."""
    block = memoryview(_ZERO_BLOCK)
    out: list[Buffer] = []
    while length > 0:
        step = min(length, _ZERO_BLOCK_SIZE)
        out.append(block[:step])
        length -= step
    return out


def _chunk(flags: int, kind: ReplyType, cookie: int, payload: bytes) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload


class Replies:
    """The reply half of one connection: what each reply looks like on the wire.
    Simple replies until :meth:`begin` says structured replies were negotiated."""

    __slots__ = ("_contexts", "_structured", "_table")

    def __init__(self, table: InFlightTable) -> None:
        self._table = table
        self._structured = False
        self._contexts: tuple[MetaContext, ...] = ()

    def begin(self, *, structured: bool, contexts: tuple[MetaContext, ...]) -> None:
        self._structured = structured
        self._contexts = contexts

    def ok(self, cookie: int) -> list[Buffer]:
        """Success without reply data: a simple reply."""
        self._table.settle(cookie, "reply_ok")
        return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)]

    def error(
        self, cookie: int, errno: int, message: str = "", *, offset: int | None = None
    ) -> list[Buffer]:
        """Failure of any request (see ``ServerConnection.reply_error``)."""
        table = self._table
        entry = table.awaiting(cookie, "reply_error")
        code = Errno._value2member_map_.get(errno)
        if not isinstance(code, Errno):
            raise LocalProtocolError(
                f"reply_error: {errno!r} is not an NBD error value", cookie=cookie
            )
        if offset is not None:
            rule = COMMAND_RULES.get(entry.command)
            if rule is None or not rule.ranged:
                raise LocalProtocolError(
                    f"reply_error: an error offset is not valid for {command_name(entry.command)}",
                    cookie=cookie,
                )
            if not entry.offset <= offset < entry.offset + entry.length:
                raise LocalProtocolError(
                    f"reply_error: offset {offset} is outside the request "
                    f"[{entry.offset}, {entry.offset + entry.length})",
                    cookie=cookie,
                )
        table.done(cookie)
        if not self._structured:
            return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, code, cookie)]
        text = encode_message(message)
        payload = ERROR_HEAD.pack(code, len(text)) + text
        if offset is None:
            return [_chunk(FLAG_DONE, ReplyType.ERROR, cookie, payload)]
        payload += U64_FIELD.pack(offset)
        return [_chunk(FLAG_DONE, ReplyType.ERROR_OFFSET, cookie, payload)]

    def read(self, cookie: int, chunks: Iterable[ReadChunk] | Buffer) -> list[Buffer]:
        """Success for a READ (see ``ServerConnection.reply_read``)."""
        table = self._table
        if isinstance(chunks, _BUFFERS):
            # Fast path: one buffer answering the oldest READ with this cookie.
            entries = table.entries.get(cookie)
            if entries:
                first = entries[0]
                if first.valid and first.command == CMD_READ and len(chunks) == first.length:
                    table.done(cookie)
                    if not self._structured:
                        return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie), chunks]
                    if not first.length:
                        return [_chunk(FLAG_DONE, ReplyType.NONE, cookie, b"")]
                    head = CHUNK_OFFSET.pack(
                        STRUCTURED_REPLY_MAGIC, FLAG_DONE, ReplyType.OFFSET_DATA, cookie,
                        8 + first.length, first.offset,
                    )  # fmt: skip
                    return [head, chunks]
        entry = table.awaiting(cookie, "reply_read")
        if isinstance(chunks, _BUFFERS):
            chunks = [DataChunk(entry.offset, chunks)]
        pieces = _cover(entry, chunks, cookie)
        table.done(cookie)
        out: list[Buffer] = []
        if not self._structured:
            out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
            for _, length, view in pieces:
                out.extend([view] if view is not None else _zeros(length))
            return out
        if not pieces:
            return [_chunk(FLAG_DONE, ReplyType.NONE, cookie, b"")]
        if entry.flags & FLAG_DF and len(pieces) > 1:
            out.append(
                CHUNK_OFFSET.pack(
                    STRUCTURED_REPLY_MAGIC, FLAG_DONE, ReplyType.OFFSET_DATA, cookie,
                    8 + entry.length, entry.offset,
                )
            )  # fmt: skip
            for _, length, view in pieces:
                out.extend([view] if view is not None else _zeros(length))
            return out
        last = len(pieces) - 1
        for index, (offset, length, view) in enumerate(pieces):
            flags = FLAG_DONE if index == last else 0
            if view is None:
                out.append(
                    CHUNK_HOLE.pack(
                        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_HOLE, cookie, 12,
                        offset, length,
                    )
                )  # fmt: skip
            else:
                out.append(
                    CHUNK_OFFSET.pack(
                        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_DATA, cookie,
                        8 + length, offset,
                    )
                )  # fmt: skip
                out.append(view)
        return out

    def block_status(
        self, cookie: int, extents: Mapping[int, Sequence[tuple[int, int]]]
    ) -> list[Buffer]:
        """Success for a BLOCK_STATUS (see ``ServerConnection.reply_block_status``)."""
        table = self._table
        entry = table.awaiting(cookie, "reply_block_status")
        wanted = sorted(self._contexts)
        if sorted(extents) != wanted:
            raise LocalProtocolError(
                f"reply_block_status: extents must be given for exactly the contexts "
                f"{[int(c) for c in wanted]}, not {sorted(extents)}",
                cookie=cookie,
            )
        req_one = bool(entry.flags & FLAG_REQ_ONE)
        payloads = [
            U32_FIELD.pack(context)
            + b"".join(
                DESCRIPTOR.pack(length, flags)
                for length, flags in _trim_extents(extents[context], entry.length, req_one, cookie)
            )
            for context in wanted
        ]
        table.done(cookie)
        last = len(payloads) - 1
        return [
            _chunk(FLAG_DONE if index == last else 0, ReplyType.BLOCK_STATUS, cookie, payload)
            for index, payload in enumerate(payloads)
        ]


def _cover(
    entry: InFlight, chunks: Iterable[ReadChunk], cookie: int
) -> list[tuple[int, int, memoryview | None]]:
    """(offset, length, view or None for a hole) sorted, checked to tile the request."""
    pieces: list[tuple[int, int, memoryview | None]] = []
    for chunk in chunks:
        if isinstance(chunk, DataChunk):
            view = byte_view(chunk.data)
            pieces.append((chunk.offset, len(view), view))
        elif isinstance(chunk, HoleChunk):
            pieces.append((chunk.offset, chunk.length, None))
        else:
            raise LocalProtocolError(
                f"reply_read: {chunk!r} is neither a DataChunk nor a HoleChunk", cookie=cookie
            )
    pieces.sort(key=lambda piece: piece[0])
    position = entry.offset
    for offset, length, _ in pieces:
        if length <= 0 or offset != position:
            raise LocalProtocolError(
                f"reply_read: chunks must tile [{entry.offset}, {entry.offset + entry.length}) "
                f"without gaps, overlaps or empty chunks; found {length} bytes at {offset} "
                f"where {position} was expected",
                cookie=cookie,
            )
        position += length
    if position != entry.offset + entry.length:
        raise LocalProtocolError(
            f"reply_read: chunks end at {position}, the request at {entry.offset + entry.length}",
            cookie=cookie,
        )
    return pieces


def _trim_extents(
    extents: Sequence[tuple[int, int]], length: int, req_one: bool, cookie: int
) -> list[tuple[int, int]]:
    """The extents of one context cut to the request: those after the one reaching
    ``length`` dropped and that one shortened; only the first with ``req_one``."""
    if not extents:
        raise LocalProtocolError("reply_block_status: a context has no extent", cookie=cookie)
    out: list[tuple[int, int]] = []
    covered = 0
    for extent_length, flags in extents:
        if not 0 < extent_length <= U32_MAX or not 0 <= flags <= U32_MAX:
            raise LocalProtocolError(
                f"reply_block_status: extent ({extent_length}, {flags}) needs a length in "
                f"1..2**32-1 and flags in 0..2**32-1",
                cookie=cookie,
            )
        if length and covered + extent_length > length:
            extent_length = length - covered
        out.append((extent_length, flags))
        covered += extent_length
        if req_one or covered >= length:
            break
    return out
