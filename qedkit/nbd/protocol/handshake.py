"""The fixed newstyle handshake: the client's flags, then options until GO/EXPORT_NAME.

References: proto.md: Newstyle negotiation, Fixed newstyle negotiation, TLS support,
Metadata querying, Option types.

:class:`Negotiation` holds what the client and the server agreed so far (client flags,
TLS, structured replies, the selected metadata contexts) and answers options. It
writes its replies itself into ``out`` (the glue sends them with ``data_to_send``),
because they depend only on the export list and on what was negotiated.

Options are dispatched through the table ``OPTION_RULES``: before an option's data is
read, :meth:`Negotiation.on_option_header` decides from the rule alone whether the
option is refused (shutting down, TLS required, unknown, too much data) and schedules
the data to be collected or skipped; the rule's handler then parses the data and
replies. Adding an option is a table row and a handler.

Choices where the spec leaves room are listed in the package docstring.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ...errors import InvalidRequestError
from .buffer import Collect, Input, Skip
from .errors import RemoteProtocolError
from .events import Abort, Event, HandshakeComplete, StartTLS
from .export import Export
from .state import ConnectionState, Trigger
from .wire import (
    CLIENT_FLAGS,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    KNOWN_CLIENT_FLAGS,
    MAX_OPTION_DATA,
    MAX_STRING,
    META_CONTEXT_NAMES,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    SERVER_HANDSHAKE_FLAGS,
    U16_FIELD,
    U32_FIELD,
    ClientFlag,
    Info,
    MetaContext,
    Opt,
    Rep,
    decode_string,
    encode_message,
    option_name,
)


class TlsMode(enum.Enum):
    """How the server answers NBD_OPT_STARTTLS (proto.md: TLS support, Server-side
    requirements). The mode is fixed for the life of a connection."""

    #: NOTLS, STARTTLS answered NBD_REP_ERR_UNSUP (a server built without TLS).
    UNSUPPORTED = "unsupported"
    #: NOTLS, STARTTLS answered NBD_REP_ERR_POLICY (no TLS configured): the default.
    DISABLED = "disabled"
    #: SELECTIVETLS without TLS-only exports: STARTTLS is acknowledged, the client chooses.
    OPTIONAL = "optional"
    #: FORCEDTLS: every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD until the
    #: glue reports the TLS session up with ``tls_established()``.
    REQUIRED = "required"


# How NBD_OPT_STARTTLS is refused in the NOTLS modes.
_STARTTLS_REFUSALS: Final[Mapping[TlsMode, Rep]] = {
    TlsMode.UNSUPPORTED: Rep.ERR_UNSUP,
    TlsMode.DISABLED: Rep.ERR_POLICY,
}


# ---- option data -------------------------------------------------------------------------


class _Malformed(Exception):
    """Option data that does not parse; answered with NBD_REP_ERR_INVALID."""


class _Fields:
    """Bounds-checked big-endian reader over one option's data."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _raw(self, size: int, what: str) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise _Malformed(f"option data ends inside the {what}")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u16(self, what: str) -> int:
        value: int = U16_FIELD.unpack(self._raw(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = U32_FIELD.unpack(self._raw(4, what))[0]
        return value

    def string(self, size: int, what: str) -> str:
        if size > MAX_STRING:
            raise _Malformed(f"the {what} is longer than {MAX_STRING} bytes")
        text = decode_string(self._raw(size, what))
        if text is None:
            raise _Malformed(f"the {what} is not valid UTF-8 without NUL characters")
        return text

    def end(self) -> None:
        if self._pos != len(self._data):
            raise _Malformed(f"{len(self._data) - self._pos} unexpected bytes after the option")


def match_meta_queries(queries: Sequence[str], *, listing: bool) -> list[MetaContext]:
    """The contexts a LIST (``listing``) or SET query list selects.

    proto.md: Metadata querying. No query: LIST returns everything, SET selects nothing.
    A full name selects that context. An empty leaf name (``"base:"``, ``"qemu:"``) is a
    wildcard over its namespace for LIST and selects nothing for SET. Anything else,
    including unknown namespaces and queries without a colon, is ignored.
    """
    if not queries:
        return list(META_CONTEXT_NAMES) if listing else []
    selected: set[MetaContext] = set()
    for query in queries:
        namespace, colon, leaf = query.partition(":")
        if not colon:
            continue
        for context, name in META_CONTEXT_NAMES.items():
            if name == query or (listing and not leaf and name.startswith(namespace + ":")):
                selected.add(context)
    return sorted(selected)


# ---- the negotiation ---------------------------------------------------------------------


class Negotiation:
    """The handshake of one connection (see the module docstring).

    ``state`` is the connection's state machine, ``source`` its input (option data is
    collected from it); ``enter`` is called with the HandshakeComplete event when the
    transmission phase begins, before the event is returned. Names of ``exports``
    must be unique (InvalidRequestError). The greeting is queued at construction.
    """

    def __init__(
        self,
        exports: Iterable[Export],
        tls: TlsMode,
        state: ConnectionState,
        source: Input,
        enter: Callable[[HandshakeComplete], None],
    ) -> None:
        self.exports: tuple[Export, ...] = tuple(exports)
        self._by_name: dict[str, Export] = {}
        for export in self.exports:
            if export.name in self._by_name:
                raise InvalidRequestError(f"two exports are named {export.name!r}")
            self._by_name[export.name] = export
        self._tls_mode = tls
        self._state = state
        self._source = source
        self._enter = enter
        self.out = bytearray(GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS))
        self.tls_active = False
        self.client_flags = ClientFlag(0)
        self.structured = False
        self.shutting_down = False
        self.transmission_refusal: str | None = None
        self._meta_export: Export | None = None
        self._meta_selected: tuple[MetaContext, ...] = ()

    def tls_established(self) -> None:
        """TLS is up: negotiation restarts from scratch, as proto.md requires."""
        self.tls_active = True
        self.structured = False
        self._forget_meta_contexts()

    # ---- message boundaries ------------------------------------------------------------

    def on_client_flags(self, raw: bytes) -> Event | None:
        (flags,) = CLIENT_FLAGS.unpack(raw)
        unknown = flags & ~KNOWN_CLIENT_FLAGS
        if unknown:
            raise RemoteProtocolError(f"the client set unknown flags {unknown:#x}")
        self.client_flags = ClientFlag(flags)
        if self._tls_mode is TlsMode.REQUIRED and not flags & ClientFlag.FIXED_NEWSTYLE:
            raise RemoteProtocolError(
                "TLS is required but the client did not set NBD_FLAG_C_FIXED_NEWSTYLE, "
                "without which TLS cannot be negotiated"
            )
        self._state.transition(Trigger.CLIENT_FLAGS)
        return None

    def on_option_header(self, raw: bytes) -> Event | None:
        magic, option, length = OPTION_HEADER.unpack(raw)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic {magic:#018x} (expected IHAVEOPT)")
        rule = OPTION_RULES.get(option)
        what = f"the data of {option_name(option)}"
        refusal = self._option_refusal(option, rule, length)
        source = self._source
        if refusal is not None:
            reply, message = refusal
            if rule is not None and not rule.can_fail:
                raise RemoteProtocolError(f"{message}; {option_name(option)} cannot fail")
            source.pending = Skip(length, what, lambda: self._refuse_option(option, reply, message))
        elif rule is not None and length > rule.max_length:
            # Data the spec says to ignore (NBD_OPT_ABORT): skip it unread.
            source.pending = Skip(length, what, lambda: rule.handler(self, option, b""))
        elif rule is not None:
            source.pending = Collect(length, what, lambda data: rule.handler(self, option, data))
        return None

    def _option_refusal(
        self, option: int, rule: _OptionRule | None, length: int
    ) -> tuple[Rep, str] | None:
        """The error reply an option gets without looking at its data, if any."""
        name = option_name(option)
        if self.shutting_down and (rule is None or rule.refused_on_shutdown):
            return Rep.ERR_SHUTDOWN, "the server is shutting down"
        tls_missing = self._tls_mode is TlsMode.REQUIRED and not self.tls_active
        if tls_missing and (rule is None or not rule.before_tls):
            return Rep.ERR_TLS_REQD, f"TLS is required before {name}"
        if rule is None:
            return Rep.ERR_UNSUP, f"{name} is not supported"
        if rule.enters_transmission and self.transmission_refusal is not None:
            return Rep.ERR_POLICY, self.transmission_refusal
        if length > rule.max_length and rule.oversize is not None:
            return rule.oversize, f"{name}: {length} bytes of option data is too much"
        return None

    # ---- replies -----------------------------------------------------------------------

    def _refuse_option(self, option: int, reply: Rep, message: str) -> Event | None:
        if option == Opt.SET_META_CONTEXT:
            self._forget_meta_contexts()  # proto.md: replaced even when it fails
        self._send_option_reply(option, reply, encode_message(message))
        return None

    def _send_option_reply(self, option: int, reply: Rep, data: bytes = b"") -> None:
        self.out += OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data))
        self.out += data

    def _option_error(self, option: int, reply: Rep, message: str) -> Event | None:
        self._send_option_reply(option, reply, encode_message(message))
        return None

    # ---- helpers -----------------------------------------------------------------------

    def _find_export(self, name: str) -> Export | None:
        export = self._by_name.get(name)
        if export is None and name == "" and self.exports:
            export = self.exports[0]
        return export

    def _forget_meta_contexts(self) -> None:
        self._meta_export = None
        self._meta_selected = ()

    def _enter_transmission(
        self, export: Export, via: Opt, *, block_size_requested: bool
    ) -> HandshakeComplete:
        event = HandshakeComplete(
            export=export,
            via=via,
            transmission_flags=export.transmission_flags(structured_replies=self.structured),
            structured_replies=self.structured,
            meta_contexts=self._meta_selected if self._meta_export is export else (),
            block_size_requested=block_size_requested,
        )
        self._state.transition(Trigger.ENTER)
        self._enter(event)
        return event

    # ---- the options -------------------------------------------------------------------

    def _opt_export_name(self, option: int, data: bytes) -> Event | None:
        name = decode_string(data)
        if name is None:
            raise RemoteProtocolError(
                "NBD_OPT_EXPORT_NAME: the name is not valid UTF-8 without NUL; "
                "the option cannot fail, so the session ends"
            )
        export = self._find_export(name)
        if export is None:
            raise RemoteProtocolError(
                f"NBD_OPT_EXPORT_NAME: no export named {name!r}; "
                "the option cannot fail, so the session ends"
            )
        flags = export.transmission_flags(structured_replies=self.structured)
        self.out += EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self.client_flags & ClientFlag.NO_ZEROES:
            self.out += bytes(EXPORT_NAME_PADDING)
        return self._enter_transmission(export, Opt.EXPORT_NAME, block_size_requested=False)

    def _opt_abort(self, option: int, data: bytes) -> Event | None:
        self._send_option_reply(option, Rep.ACK)
        self._state.transition(Trigger.ABORT)
        return Abort()

    def _opt_list(self, option: int, data: bytes) -> Event | None:
        for export in self.exports:
            name = export.name.encode("utf-8")
            record = U32_FIELD.pack(len(name)) + name + export.description.encode("utf-8")
            self._send_option_reply(option, Rep.SERVER, record)
        self._send_option_reply(option, Rep.ACK)
        return None

    def _opt_starttls(self, option: int, data: bytes) -> Event | None:
        if self.tls_active:
            return self._option_error(option, Rep.ERR_INVALID, "TLS is already active")
        refusal = _STARTTLS_REFUSALS.get(self._tls_mode)
        if refusal is not None:
            return self._option_error(option, refusal, "TLS is not available on this server")
        if not self.client_flags & ClientFlag.FIXED_NEWSTYLE:
            return self._option_error(option, Rep.ERR_POLICY, "TLS needs NBD_FLAG_C_FIXED_NEWSTYLE")
        if len(self._source.buffer):
            raise RemoteProtocolError(
                "the client sent data after NBD_OPT_STARTTLS without waiting for the reply"
            )
        self._send_option_reply(option, Rep.ACK)
        self._state.transition(Trigger.STARTTLS)
        return StartTLS()

    def _opt_info_or_go(self, option: int, data: bytes) -> Event | None:
        fields = _Fields(data)
        try:
            name = fields.string(fields.u32("name length"), "export name")
            count = fields.u16("information request count")
            requests = {fields.u16("information request") for _ in range(count)}
            fields.end()
        except _Malformed as exc:
            return self._option_error(option, Rep.ERR_INVALID, f"{option_name(option)}: {exc}")
        export = self._find_export(name)
        if export is None:
            return self._option_error(option, Rep.ERR_UNKNOWN, f"no export named {name!r}")
        flags = export.transmission_flags(structured_replies=self.structured)
        self._send_option_reply(option, Rep.INFO, INFO_EXPORT.pack(Info.EXPORT, export.size, flags))
        if Info.NAME in requests:
            self._send_option_reply(
                option, Rep.INFO, U16_FIELD.pack(Info.NAME) + export.name.encode("utf-8")
            )
        if Info.DESCRIPTION in requests and export.description:
            self._send_option_reply(
                option,
                Rep.INFO,
                U16_FIELD.pack(Info.DESCRIPTION) + export.description.encode("utf-8"),
            )
        self._send_option_reply(
            option,
            Rep.INFO,
            INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE,
                export.min_block_size,
                export.preferred_block_size,
                export.max_block_size,
            ),
        )
        self._send_option_reply(option, Rep.ACK)
        if option != Opt.GO:
            return None
        return self._enter_transmission(
            export, Opt.GO, block_size_requested=Info.BLOCK_SIZE in requests
        )

    def _opt_structured_reply(self, option: int, data: bytes) -> Event | None:
        if self.structured:
            return self._option_error(
                option, Rep.ERR_INVALID, "structured replies are already negotiated"
            )
        self.structured = True
        self._send_option_reply(option, Rep.ACK)
        return None

    def _opt_meta_context(self, option: int, data: bytes) -> Event | None:
        setting = option == Opt.SET_META_CONTEXT
        if setting:
            self._forget_meta_contexts()
        name = option_name(option)
        if not self.structured:
            return self._option_error(
                option, Rep.ERR_INVALID, f"{name} needs structured replies first"
            )
        fields = _Fields(data)
        try:
            export_name = fields.string(fields.u32("name length"), "export name")
            count = fields.u32("query count")
            queries: list[str] = []
            for _ in range(count):
                queries.append(fields.string(fields.u32("query length"), "query"))
            fields.end()
        except _Malformed as exc:
            return self._option_error(option, Rep.ERR_INVALID, f"{name}: {exc}")
        export = self._find_export(export_name)
        if export is None:
            return self._option_error(option, Rep.ERR_UNKNOWN, f"no export named {export_name!r}")
        contexts = match_meta_queries(queries, listing=not setting)
        for context in contexts:
            context_id = int(context) if setting else 0  # proto.md: LIST ids SHOULD be 0
            self._send_option_reply(
                option,
                Rep.META_CONTEXT,
                U32_FIELD.pack(context_id) + context.context_name.encode("utf-8"),
            )
        if setting:
            self._meta_export = export
            self._meta_selected = tuple(contexts)
        self._send_option_reply(option, Rep.ACK)
        return None


# ---- the option table --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _OptionRule:
    """How one option is handled.

    handler              (negotiation, option, data) -> event or None; replies queued
    max_length           the most option data accepted ...
    oversize             ... and the reply to more (None: skip the data, run the handler)
    before_tls           answered normally before TLS in TlsMode.REQUIRED
    refused_on_shutdown  answered NBD_REP_ERR_SHUTDOWN once shutting down
    can_fail             has error replies (NBD_OPT_EXPORT_NAME has none: any refusal
                         ends the session)
    enters_transmission  ends the handshake: answered NBD_REP_ERR_POLICY once the
                         server refuses transmission (``refuse_transmission``)
    """

    handler: Callable[[Negotiation, int, bytes], Event | None]
    max_length: int
    oversize: Rep | None
    before_tls: bool = False
    refused_on_shutdown: bool = True
    can_fail: bool = True
    enters_transmission: bool = False


OPTION_RULES: Final[Mapping[int, _OptionRule]] = {
    Opt.EXPORT_NAME: _OptionRule(
        handler=Negotiation._opt_export_name,
        max_length=MAX_STRING,
        oversize=Rep.ERR_TOO_BIG,
        refused_on_shutdown=False,
        can_fail=False,
        enters_transmission=True,
    ),
    Opt.ABORT: _OptionRule(
        handler=Negotiation._opt_abort,
        max_length=0,
        oversize=None,  # proto.md: data SHOULD be ignored
        before_tls=True,
        refused_on_shutdown=False,
    ),
    Opt.LIST: _OptionRule(handler=Negotiation._opt_list, max_length=0, oversize=Rep.ERR_INVALID),
    Opt.STARTTLS: _OptionRule(
        handler=Negotiation._opt_starttls,
        max_length=0,
        oversize=Rep.ERR_INVALID,
        before_tls=True,
    ),
    Opt.INFO: _OptionRule(
        handler=Negotiation._opt_info_or_go,
        max_length=MAX_OPTION_DATA,
        oversize=Rep.ERR_TOO_BIG,
    ),
    Opt.GO: _OptionRule(
        handler=Negotiation._opt_info_or_go,
        max_length=MAX_OPTION_DATA,
        oversize=Rep.ERR_TOO_BIG,
        enters_transmission=True,
    ),
    Opt.STRUCTURED_REPLY: _OptionRule(
        handler=Negotiation._opt_structured_reply,
        max_length=0,
        oversize=Rep.ERR_INVALID,
    ),
    Opt.LIST_META_CONTEXT: _OptionRule(
        handler=Negotiation._opt_meta_context,
        max_length=MAX_OPTION_DATA,
        oversize=Rep.ERR_TOO_BIG,
    ),
    Opt.SET_META_CONTEXT: _OptionRule(
        handler=Negotiation._opt_meta_context,
        max_length=MAX_OPTION_DATA,
        oversize=Rep.ERR_TOO_BIG,
    ),
}
