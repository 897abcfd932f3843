"""The NBD wire: magic numbers, limits, message layouts and the spec's named values.

References: NetworkBlockDevice/nbd doc/proto.md (cited as "proto.md: <section>"); QEMU
docs/interop/nbd.rst for the ``qemu:`` metadata namespace.

Everything here is data that both ends of a connection share, so a client can import
it as well as the server core: the constants, the ``struct`` layouts (all big-endian,
proto.md: Conventions), one enum per family of spec names, and the spec's rules for
strings. Nothing here keeps state.

Each enum holds one family of spec names; a member is the spec name without "NBD_" and
the family prefix: NBD_OPT_GO is ``Opt.GO``, NBD_REP_ERR_UNSUP is ``Rep.ERR_UNSUP``,
NBD_CMD_FLAG_FUA is ``CmdFlag.FUA``, NBD_FLAG_C_NO_ZEROES is ``ClientFlag.NO_ZEROES``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from typing import Final, TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview

# ---- magic numbers and limits ------------------------------------------------------------

#: proto.md: Newstyle negotiation. The greeting's first word, ASCII "NBDMAGIC".
NBDMAGIC: Final = 0x4E42444D41474943
#: The greeting's second word and the first word of every option, ASCII "IHAVEOPT".
IHAVEOPT: Final = 0x49484156454F5054
#: proto.md: Fixed newstyle negotiation. The first word of every option reply.
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9
#: proto.md: Request message.
REQUEST_MAGIC: Final = 0x25609513
#: proto.md: Simple reply message.
SIMPLE_REPLY_MAGIC: Final = 0x67446698
#: proto.md: Structured reply chunk message.
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

#: proto.md: Conventions. Strings (export names, descriptions, messages, queries) MUST
#: be no longer than 4096 bytes.
MAX_STRING: Final = 4096
#: The largest WRITE payload the core buffers, and the largest maximum block size an
#: Export may advertise: 2**25 bytes. proto.md (Block size constraints) says a length
#: below 2**25 SHOULD NOT be treated as a denial of service; QEMU uses the same limit
#: (NBD_MAX_BUFFER_SIZE).
MAX_PAYLOAD: Final = 32 * 1024 * 1024
#: The largest option data the core buffers. The biggest legitimate option here is a
#: meta context request: a 4096-byte name plus a few queries of at most 4096 bytes, so
#: 64 KiB leaves room while keeping a handshake's memory bounded. Longer data is skipped
#: unread and answered with NBD_REP_ERR_TOO_BIG.
MAX_OPTION_DATA: Final = 64 * 1024
#: proto.md: Newstyle negotiation. Zero bytes after the NBD_OPT_EXPORT_NAME reply unless
#: the client set NBD_FLAG_C_NO_ZEROES.
EXPORT_NAME_PADDING: Final = 124
#: proto.md: Block size constraints. Limits on advertised block sizes (bytes).
MAX_MIN_BLOCK_SIZE: Final = 65536
MIN_PREFERRED_BLOCK_SIZE: Final = 512
DEFAULT_PREFERRED_BLOCK_SIZE: Final = 4096

U16_MAX: Final = 0xFFFF
U32_MAX: Final = 0xFFFFFFFF
U64_MAX: Final = 0xFFFFFFFFFFFFFFFF

# ---- message layouts (big-endian, proto.md: Conventions) ---------------------------------

GREETING: Final = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS: Final = struct.Struct(">I")
OPTION_HEADER: Final = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY: Final = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")  # size, transmission flags
INFO_EXPORT: Final = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, preferred, max
U16_FIELD: Final = struct.Struct(">H")
U32_FIELD: Final = struct.Struct(">I")
U64_FIELD: Final = struct.Struct(">Q")
REQUEST: Final = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
REQUEST_SIZE: Final = REQUEST.size
SIMPLE_REPLY: Final = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK: Final = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
CHUNK_OFFSET: Final = struct.Struct(">IHHQIQ")  # chunk header + offset (OFFSET_DATA)
CHUNK_HOLE: Final = struct.Struct(">IHHQIQI")  # chunk header + offset + hole size
ERROR_HEAD: Final = struct.Struct(">IH")  # error, message length
DESCRIPTOR: Final = struct.Struct(">II")  # extent length, status flags


# ---- named values ------------------------------------------------------------------------


class HandshakeFlag(enum.IntFlag):
    """NBD_FLAG_* handshake flags (16 bits, sent by the server in the greeting)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


#: What this server always advertises.
SERVER_HANDSHAKE_FLAGS: Final = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


class ClientFlag(enum.IntFlag):
    """NBD_FLAG_C_* client flags (32 bits, the client's answer to the greeting)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


class TransmissionFlag(enum.IntFlag):
    """NBD_FLAG_* transmission flags (16 bits, per export)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(enum.IntEnum):
    """NBD_OPT_* option types."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11  # not implemented: answered NBD_REP_ERR_UNSUP


class Rep(enum.IntEnum):
    """NBD_REP_* option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 2**31 + 1
    ERR_POLICY = 2**31 + 2
    ERR_INVALID = 2**31 + 3
    ERR_PLATFORM = 2**31 + 4
    ERR_TLS_REQD = 2**31 + 5
    ERR_UNKNOWN = 2**31 + 6
    ERR_SHUTDOWN = 2**31 + 7
    ERR_BLOCK_SIZE_REQD = 2**31 + 8
    ERR_TOO_BIG = 2**31 + 9


class Info(enum.IntEnum):
    """NBD_INFO_* information types (NBD_OPT_INFO / NBD_OPT_GO)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    """NBD_CMD_* request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8  # experimental extension: not implemented (EINVAL)


class CmdFlag(enum.IntFlag):
    """NBD_CMD_FLAG_* command flags."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5  # extended headers only: never valid here


class ReplyFlag(enum.IntFlag):
    """NBD_REPLY_FLAG_* structured reply flags."""

    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    """NBD_REPLY_TYPE_* structured reply chunk types; error chunks have bit 15 set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = 2**15 + 1
    ERROR_OFFSET = 2**15 + 2


class Errno(enum.IntEnum):
    """NBD_E* error values: the only values allowed in a reply's error field."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class StateFlag(enum.IntFlag):
    """NBD_STATE_* status flags of the ``base:allocation`` context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class MetaContext(enum.IntEnum):
    """The metadata contexts this server offers, valued by the context id that
    NBD_OPT_SET_META_CONTEXT assigns them (ids are opaque to clients; fixed ids make
    traces readable). ``qemu:allocation-depth`` reports, as the whole 32-bit status,
    the layer of the backing chain that provides the data: 0 unallocated, 1 the top
    image, 2 its backing file, and so on (QEMU docs/interop/nbd.rst)."""

    BASE_ALLOCATION = 1
    QEMU_ALLOCATION_DEPTH = 2

    @property
    def context_name(self) -> str:
        return META_CONTEXT_NAMES[self]


META_CONTEXT_NAMES: Final[Mapping[MetaContext, str]] = {
    MetaContext.BASE_ALLOCATION: "base:allocation",
    MetaContext.QEMU_ALLOCATION_DEPTH: "qemu:allocation-depth",
}

# Plain-int copies of the values tested for every request and reply: IntFlag arithmetic
# costs about a microsecond per operation, more than the rest of parsing a request.
CMD_READ: Final = int(Cmd.READ)
CMD_WRITE: Final = int(Cmd.WRITE)
FLAG_FUA: Final = int(CmdFlag.FUA)
FLAG_NO_HOLE: Final = int(CmdFlag.NO_HOLE)
FLAG_DF: Final = int(CmdFlag.DF)
FLAG_REQ_ONE: Final = int(CmdFlag.REQ_ONE)
FLAG_FAST_ZERO: Final = int(CmdFlag.FAST_ZERO)
FLAG_DONE: Final = int(ReplyFlag.DONE)

# ---- names and strings -------------------------------------------------------------------

_OPTION_NAMES: Final[Mapping[int, str]] = {int(o): f"NBD_OPT_{o.name}" for o in Opt}
_COMMAND_NAMES: Final[Mapping[int, str]] = {int(c): f"NBD_CMD_{c.name}" for c in Cmd}


def option_name(option: int) -> str:
    """The spec name of an option type, for messages (``option 99`` when unknown)."""
    return _OPTION_NAMES.get(option) or f"option {option}"


def command_name(command: int) -> str:
    """The spec name of a request type, for messages (``command 99`` when unknown)."""
    return _COMMAND_NAMES.get(command) or f"command {command}"


def decode_string(raw: bytes) -> str | None:
    """A protocol string (proto.md: Conventions: UTF-8 without NUL), or None."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


def encode_message(message: str) -> bytes:
    """A human-readable message as a protocol string: UTF-8, no NUL, at most 4096 bytes
    (cut at a character boundary)."""
    raw = message.replace("\0", " ").encode("utf-8", "replace")
    if len(raw) > MAX_STRING:
        raw = raw[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return raw
