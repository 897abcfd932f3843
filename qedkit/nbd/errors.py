"""Server policy: the NBD error value that an exception raised while serving becomes.

The sans-I/O core (``qedkit.nbd.protocol``) only checks that a reply carries one of
the spec's error values; which value describes an engine or store failure is decided
here, by the server, from the exception's type and, for I/O errors, its host errno
(proto.md: Error values). The table is in :func:`nbd_errno_for`'s docstring.
"""

from __future__ import annotations

import errno as _os_errno
from collections.abc import Mapping
from typing import Final

from ..errors import (
    CorruptImageError,
    InvalidRequestError,
    ReadOnlyError,
    StoreError,
    UnsupportedFeatureError,
)
from .protocol import Errno, ProtocolError

__all__ = ["nbd_errno_for"]

# Host errno -> NBD error (proto.md: Error values). EDQUOT and EFBIG become ENOSPC as the
# spec asks; EOVERFLOW and ENOTSUP are reserved by the spec for DF reads and fast zeroes,
# which a generic mapping cannot know about, so they become EINVAL.
_ERRNO_BY_HOST: Final[Mapping[int, Errno]] = {
    code: nbd
    for name, nbd in (
        ("EPERM", Errno.EPERM),
        ("EACCES", Errno.EPERM),
        ("EROFS", Errno.EPERM),
        ("EIO", Errno.EIO),
        ("ENOMEM", Errno.ENOMEM),
        ("EINVAL", Errno.EINVAL),
        ("EOVERFLOW", Errno.EINVAL),
        ("ENOTSUP", Errno.EINVAL),
        ("EOPNOTSUPP", Errno.EINVAL),
        ("ENOSPC", Errno.ENOSPC),
        ("EDQUOT", Errno.ENOSPC),
        ("EFBIG", Errno.ENOSPC),
        ("ESHUTDOWN", Errno.ESHUTDOWN),
    )
    if (code := getattr(_os_errno, name, None)) is not None
}

# qedkit error class -> NBD error, first match wins (subclasses before their bases).
_ERRNO_BY_TYPE: Final[tuple[tuple[type[BaseException], Errno], ...]] = (
    (ReadOnlyError, Errno.EPERM),
    (InvalidRequestError, Errno.EINVAL),
    (UnsupportedFeatureError, Errno.EINVAL),
    (CorruptImageError, Errno.EIO),
    (MemoryError, Errno.ENOMEM),
)


def nbd_errno_for(exc: BaseException) -> Errno:
    """The NBD error value to report for ``exc`` raised while serving a request.

    =========================================  =========================================
    exception                                  NBD error
    =========================================  =========================================
    ReadOnlyError                              EPERM
    InvalidRequestError                        EINVAL
    UnsupportedFeatureError                    EINVAL (the request cannot be honoured)
    StoreError / OSError with an errno         by errno: EPERM/EACCES/EROFS -> EPERM,
                                               ENOSPC/EDQUOT/EFBIG -> ENOSPC, ENOMEM ->
                                               ENOMEM, EINVAL -> EINVAL, ESHUTDOWN ->
                                               ESHUTDOWN, anything else -> EIO
    CorruptImageError                          EIO: the data cannot be produced, which
                                               is a medium error to the client (QEMU's
                                               generic mapping would say EINVAL, which
                                               reads as "your request was wrong")
    MemoryError                                ENOMEM
    ProtocolError                              its ``errno_hint``
    anything else                              EIO
    =========================================  =========================================
    """
    for kind, code in _ERRNO_BY_TYPE:
        if isinstance(exc, kind):
            return code
    if isinstance(exc, ProtocolError):
        return exc.errno_hint
    host: int | None = None
    if isinstance(exc, StoreError):
        host = exc.errno
        if host is None and isinstance(exc.__cause__, OSError):
            host = exc.__cause__.errno
    elif isinstance(exc, OSError):
        host = exc.errno
    if host is not None:
        return _ERRNO_BY_HOST.get(host, Errno.EIO)
    return Errno.EIO
