"""An export as the server describes it to the core: size, capabilities, block sizes.

References: proto.md: Transmission flags, Block size constraints.

An :class:`Export` is validated once, when it is made; the handshake turns it into
transmission flags and NBD_INFO replies, and the transmission phase refuses the
commands and flags it does not advertise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ...errors import InvalidRequestError
from .wire import (
    DEFAULT_PREFERRED_BLOCK_SIZE,
    MAX_MIN_BLOCK_SIZE,
    MAX_PAYLOAD,
    MAX_STRING,
    MIN_PREFERRED_BLOCK_SIZE,
    U64_MAX,
    TransmissionFlag,
)


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _check_string(what: str, text: str) -> None:
    if "\0" in text:
        raise InvalidRequestError(f"{what} {text!r} contains a NUL character")
    if len(text.encode("utf-8")) > MAX_STRING:
        raise InvalidRequestError(f"{what} is longer than {MAX_STRING} bytes of UTF-8")


# Export attribute -> the transmission flag it sets (before the rules in
# Export.transmission_flags clear the ones that make no sense).
_EXPORT_FLAGS: Final[tuple[tuple[str, TransmissionFlag], ...]] = (
    ("read_only", TransmissionFlag.READ_ONLY),
    ("can_flush", TransmissionFlag.SEND_FLUSH),
    ("can_fua", TransmissionFlag.SEND_FUA),
    ("rotational", TransmissionFlag.ROTATIONAL),
    ("can_trim", TransmissionFlag.SEND_TRIM),
    ("can_write_zeroes", TransmissionFlag.SEND_WRITE_ZEROES),
    ("can_multi_conn", TransmissionFlag.CAN_MULTI_CONN),
    ("can_cache", TransmissionFlag.SEND_CACHE),
    ("can_fast_zero", TransmissionFlag.SEND_FAST_ZERO),
)
# Flags that expose writing commands: never advertised on a read-only export.
_WRITE_FLAGS: Final = (
    TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
)


@dataclass(frozen=True, slots=True)
class Export:
    """One export as the server describes it to the core.

    The ``can_*`` fields say what the server will implement; the core turns them into
    transmission flags (:meth:`transmission_flags`) and refuses, with an
    ``InvalidRequest``, commands and flags that were not advertised. Block sizes
    follow proto.md: Block size constraints (validated here); the default minimum of 1
    means "any alignment" and the maximum bounds READ, WRITE, CACHE and WRITE_ZEROES.
    Invalid values raise :class:`~qedkit.errors.InvalidRequestError`.
    """

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = False
    can_write_zeroes: bool = False
    can_fast_zero: bool = False
    can_cache: bool = False
    can_multi_conn: bool = False
    rotational: bool = False
    min_block_size: int = 1
    preferred_block_size: int = DEFAULT_PREFERRED_BLOCK_SIZE
    max_block_size: int = MAX_PAYLOAD

    def __post_init__(self) -> None:
        _check_string("export name", self.name)
        _check_string("export description", self.description)
        if not 0 <= self.size <= U64_MAX:
            raise InvalidRequestError(f"export size {self.size} does not fit in 64 bits")
        low = self.min_block_size
        if not _is_power_of_two(low) or low > MAX_MIN_BLOCK_SIZE:
            raise InvalidRequestError(
                f"minimum block size {low} must be a power of two no larger than "
                f"{MAX_MIN_BLOCK_SIZE}"
            )
        preferred = self.preferred_block_size
        if not _is_power_of_two(preferred) or preferred < max(low, MIN_PREFERRED_BLOCK_SIZE):
            raise InvalidRequestError(
                f"preferred block size {preferred} must be a power of two of at least "
                f"max(minimum block size, {MIN_PREFERRED_BLOCK_SIZE})"
            )
        high = self.max_block_size
        if high % low or high < low or high < min(preferred, self.size) or high > MAX_PAYLOAD:
            raise InvalidRequestError(
                f"maximum block size {high} must be a multiple of the minimum block size, "
                f"at least min(preferred block size, export size) and at most {MAX_PAYLOAD}"
            )

    def transmission_flags(self, *, structured_replies: bool = False) -> TransmissionFlag:
        """The 16-bit transmission flags for this export. NBD_FLAG_SEND_DF depends on
        the connection: it is set exactly when structured replies were negotiated."""
        flags = TransmissionFlag.HAS_FLAGS
        for attribute, flag in _EXPORT_FLAGS:
            if getattr(self, attribute):
                flags |= flag
        if self.read_only:
            flags &= ~_WRITE_FLAGS
        if not flags & TransmissionFlag.SEND_WRITE_ZEROES:
            flags &= ~TransmissionFlag.SEND_FAST_ZERO  # proto.md: MUST be 0 then
        if structured_replies:
            flags |= TransmissionFlag.SEND_DF
        return flags
