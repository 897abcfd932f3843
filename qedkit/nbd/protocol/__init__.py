"""Sans-I/O NBD server protocol: the fixed newstyle handshake and the transmission phase.

References: the NBD protocol, NetworkBlockDevice/nbd doc/proto.md (cited below as
"proto.md: <section>"); QEMU docs/interop/nbd.rst (the ``qemu:`` metadata namespace);
the sans-I/O design of python-hyper/h11 (bytes in, events and bytes out).

Theory of operation
===================

A :class:`ServerConnection` is one client connection, seen from the server. It does no
I/O and knows no clock: the glue feeds it the bytes it read, takes events out, and
writes the bytes it is handed. A whole server loop looks like this::

    conn = ServerConnection(exports, tls=TlsMode.DISABLED)
    write(conn.data_to_send())                       # the greeting
    while True:
        event = conn.next_event()
        write(conn.data_to_send())                   # option replies, if any
        if event is NEED_DATA:
            conn.receive_data(await read())          # b"" means end of file
        elif isinstance(event, Read):
            data = await image.read(event.offset, event.length)
            writelines(conn.reply_read(event.cookie, data))
        elif isinstance(event, InvalidRequest):
            writelines(conn.reply_error(event.cookie, event.errno, event.message))
        elif isinstance(event, StartTLS):
            await upgrade_the_socket_to_tls()
            conn.tls_established()
        elif isinstance(event, Abort | Disconnect | ConnectionClosed):
            break                                    # after Disconnect, first finish
        ...                                          # the requests in flight

A real server hands each request to its own task, so replies go out as requests
complete, in any order. The connection is not thread-safe: call it from one thread
(the event loop's), which is what asyncio tasks do anyway.

There are two output paths, on purpose:

* **Handshake replies** depend only on the export list and on what was negotiated, so
  the core writes them itself and queues them; :meth:`ServerConnection.data_to_send`
  collects them. Call it after every :meth:`~ServerConnection.next_event`.
* **Transmission replies** depend on the image, so the glue asks for each one with a
  ``reply_*`` method. Replies may be sent in any order and interleaved (proto.md:
  Transmission); each method returns a list of buffers for ``writelines``: headers as
  ``bytes``, payloads as memoryviews of the caller's own buffers (nothing is copied).

States (``State``; the transitions are the table ``state.TRANSITIONS``)::

    CLIENT_FLAGS --flags--> NEGOTIATING --GO / EXPORT_NAME--> TRANSMISSION --DISC--> DONE
                             |       ^
           STARTTLS acked    v       |  tls_established()
                            TLS_PENDING
    NEGOTIATING --ABORT--> DONE
    any input state --end of file at a message boundary--> CLOSED
    any input state --RemoteProtocolError--> ERROR

In each input state the parser waits for one fixed-size header; the header's handler
may schedule a body to collect (option data), a WRITE payload to fill, or bytes to skip
unread. Options are dispatched through ``handshake.OPTION_RULES`` and requests
validated through ``transmission.COMMAND_RULES``: adding an option or a command is a
table row and a handler, not a new branch in the parser.

Modules
=======

As h11 splits its modules, one concern each, listed so that a module imports only
modules above it (no cycles)::

    wire          magic numbers, limits, struct layouts, spec-named enums, the rules
                  for strings: everything both ends share, no state
    errors        the ProtocolError tree
    export        Export: capabilities -> transmission flags; block size rules
    events        the events, and the chunks of a READ reply
    state         State, the transition table, ConnectionState
    buffer        receive buffering and the collectors of a message body
                  (option data, skipped bytes, a WRITE payload)
    handshake     TlsMode, the option table and its rules, Negotiation
    transmission  the command table, the one request validator, the fast lane
                  (a precheck derived from it), the table of requests in flight
    replies       reply encoding: simple replies, structured chunks, READ data and
                  holes, NBD_CMD_BLOCK_STATUS extents (encoded nowhere else)
    connection    ServerConnection: wires the parts together, runs the parser loop

The core imports nothing but the standard library's pure modules and
``qedkit.errors``; a client can use ``wire`` for the constants and layouts. Mapping
an engine's exceptions to NBD error values is the server's policy
(``qedkit.nbd.errors``), not the core's.

Errors
======

Following h11, errors are split by who is at fault; both derive from
:class:`ProtocolError` (itself a :class:`~qedkit.errors.QedError`; module ``errors``):

* :class:`RemoteProtocolError`: the client broke the protocol in a way that leaves no
  reply possible (a bad magic, an oversized WRITE payload, an EXPORT_NAME that cannot
  be satisfied ...). The glue must drop the connection (a "hard disconnect"). Input is
  dead afterwards (state ERROR), but replies to requests still in flight can be sent;
  when ``exc.cookie`` is set the offending request is one of them, and the glue may
  send ``reply_error(exc.cookie, exc.errno_hint, str(exc))`` before closing.
* :class:`LocalProtocolError`: the glue asked for something the protocol forbids (a
  reply to an unknown cookie, a READ reply that does not cover the request ...).
  Nothing is emitted and no state changes, so the glue can still send a correct reply.

A client's *recoverable* mistakes are not exceptions: a bad option gets an error reply
from the core, and a bad request becomes an :class:`InvalidRequest` event that the
glue answers with :meth:`~ServerConnection.reply_error`.

Choices where the spec leaves room
==================================

* Oversized WRITE: a payload up to :data:`MAX_PAYLOAD` (32 MiB) is always consumed;
  when the request is invalid (too long for the export's maximum block size, out of
  range, read-only ...) it is skipped unbuffered and an :class:`InvalidRequest` is
  emitted. A longer payload cannot be told apart from a desynchronised stream, so it
  raises RemoteProtocolError (proto.md: Block size constraints allows the hard
  disconnect; 2**25 is the size it says must not be treated as an attack).
* Out of range: WRITE and WRITE_ZEROES get ``ENOSPC``, other commands ``EINVAL``
  (proto.md: Error values, and QEMU does the same).
* Validation order: unknown command (EINVAL), shutting down (ESHUTDOWN), write to a
  read-only export (EPERM, even for TRIM and WRITE_ZEROES, which read-only exports do
  not advertise), flags not documented for the command, flags or command not
  advertised, FLUSH with a nonzero range, range past the end, misalignment to the
  minimum block size, length over the maximum block size (EINVAL unless noted).
* NBD_CMD_CACHE needs ``Export.can_cache`` (EINVAL otherwise). NBD_CMD_DISC is honoured
  whatever its flags, offset and length. Zero-length requests are passed through.
* Structured replies: errors always use structured error chunks (with the message);
  successful non-READ replies use simple replies (allowed, and 4 bytes shorter).
* The default export (empty name) is the export named ``""`` if there is one, else the
  first export in the list.
* A cookie reused while still in flight (discouraged, not forbidden) is accepted; its
  replies pair with its requests oldest first.
* While shutting down (``start_shutdown()``), NBD_OPT_EXPORT_NAME is still honoured (it
  cannot fail); the requests that follow get ESHUTDOWN, which obliges the client to
  disconnect.
* A connection the server refuses to serve (``refuse_transmission()``, e.g. over its
  connection limit) gets NBD_REP_ERR_POLICY with the server's message for NBD_OPT_GO
  (proto.md: "server-side policy forbids the server to allow the option"), so the
  client can print why; other options still work. NBD_OPT_EXPORT_NAME, which has no
  error reply, ends the session. Shutdown and TLS-required refusals come first.
* NBD_INFO_BLOCK_SIZE is always sent in INFO/GO replies (as QEMU does); the server never
  sends NBD_REP_ERR_BLOCK_SIZE_REQD because misaligned requests are errored cleanly.
* Clients without NBD_FLAG_C_FIXED_NEWSTYLE are still answered as fixed newstyle
  (proto.md allows it), but cannot start TLS; with ``TlsMode.REQUIRED`` they are refused.
* Meta context queries without a namespace colon are ignored, as are unknown namespaces
  and unknown leaf names; the empty leaf (``"base:"``, ``"qemu:"``) is a wildcard for
  LIST and selects nothing for SET (proto.md: Metadata querying).
* Option data longer than :data:`MAX_OPTION_DATA` is skipped unread and answered with
  NBD_REP_ERR_TOO_BIG (NBD_OPT_EXPORT_NAME, which cannot fail, ends the session).
* Extended headers (NBD_OPT_EXTENDED_HEADERS) are not implemented: NBD_REP_ERR_UNSUP.
"""

from __future__ import annotations

from .connection import ServerConnection
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    CONNECTION_CLOSED,
    NEED_DATA,
    PAUSED,
    Abort,
    BlockStatus,
    Cache,
    ConnectionClosed,
    DataChunk,
    Disconnect,
    Event,
    Flush,
    HandshakeComplete,
    HoleChunk,
    InvalidRequest,
    NeedData,
    Paused,
    Read,
    ReadChunk,
    Request,
    StartTLS,
    Trim,
    Write,
    WriteZeroes,
)
from .export import Export
from .handshake import TlsMode
from .state import State
from .wire import (
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Buffer,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    HandshakeFlag,
    Info,
    MetaContext,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    StateFlag,
    TransmissionFlag,
)

__all__ = [
    "CONNECTION_CLOSED",
    "IHAVEOPT",
    "MAX_OPTION_DATA",
    "MAX_PAYLOAD",
    "MAX_STRING",
    "NBDMAGIC",
    "NEED_DATA",
    "OPTION_REPLY_MAGIC",
    "PAUSED",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "Abort",
    "BlockStatus",
    "Buffer",
    "Cache",
    "ClientFlag",
    "Cmd",
    "CmdFlag",
    "ConnectionClosed",
    "DataChunk",
    "Disconnect",
    "Errno",
    "Event",
    "Export",
    "Flush",
    "HandshakeComplete",
    "HandshakeFlag",
    "HoleChunk",
    "Info",
    "InvalidRequest",
    "LocalProtocolError",
    "MetaContext",
    "NeedData",
    "Opt",
    "Paused",
    "ProtocolError",
    "Read",
    "ReadChunk",
    "RemoteProtocolError",
    "Rep",
    "ReplyFlag",
    "ReplyType",
    "Request",
    "ServerConnection",
    "StartTLS",
    "State",
    "StateFlag",
    "TlsMode",
    "TransmissionFlag",
    "Trim",
    "Write",
    "WriteZeroes",
]
