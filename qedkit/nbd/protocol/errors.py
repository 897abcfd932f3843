"""Protocol errors, split by who is at fault (as h11 splits them).

    QedError (qedkit.errors)
     +-- ProtocolError              abstract; errno_hint, cookie
          +-- RemoteProtocolError   the client broke the protocol: drop the connection
          +-- LocalProtocolError    the glue asked for something the protocol forbids:
                                    nothing was emitted, no state changed

A client's *recoverable* mistakes are not exceptions: a bad option gets an error reply
from the core, and a bad request becomes an ``InvalidRequest`` event.
"""

from __future__ import annotations

from ...errors import QedError
from .wire import Errno


class ProtocolError(QedError):
    """A violation of the NBD protocol; abstract (raise a subclass).

    ``errno_hint`` is the NBD error value that describes the violation, for an error
    reply where one can still be sent (h11's ``error_status_hint``). ``cookie`` is the
    request concerned, when there is one that still awaits a reply.
    """

    def __init__(
        self, message: str, *, errno_hint: Errno = Errno.EINVAL, cookie: int | None = None
    ) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract: raise a subclass")
        super().__init__(message)
        self.errno_hint = errno_hint
        self.cookie = cookie


class LocalProtocolError(ProtocolError):
    """The server (the glue) asked for something the protocol forbids. Nothing was
    emitted and the connection's state did not change."""


class RemoteProtocolError(ProtocolError):
    """The client broke the protocol beyond repair: drop the connection. Replies to
    requests still in flight (including ``cookie``, when set) may still be sent."""
