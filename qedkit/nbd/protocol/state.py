"""Where a connection is, and the only moves it can make: a table, not scattered ifs.

::

    CLIENT_FLAGS --flags--> NEGOTIATING --GO / EXPORT_NAME--> TRANSMISSION --DISC--> DONE
                             |       ^
           STARTTLS acked    v       |  tls_established()
                            TLS_PENDING
    NEGOTIATING --ABORT--> DONE
    any input state --end of file at a message boundary--> CLOSED
    any input state --RemoteProtocolError--> ERROR

The handshake and the transmission phase share one :class:`ConnectionState` and move
it with :meth:`ConnectionState.transition`; a move the table does not list is a
LocalProtocolError and changes nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from .errors import LocalProtocolError


class State(enum.Enum):
    """Where a connection is; see the module docstring for the transitions."""

    CLIENT_FLAGS = "client-flags"  # greeting queued, waiting for the client's flags
    NEGOTIATING = "negotiating"  # option haggling
    TLS_PENDING = "tls-pending"  # STARTTLS acknowledged; paused until tls_established()
    TRANSMISSION = "transmission"
    DONE = "done"  # NBD_OPT_ABORT or NBD_CMD_DISC received; no more input is allowed
    CLOSED = "closed"  # end of file at a message boundary
    ERROR = "error"  # a RemoteProtocolError was raised; input is dead


class Trigger(enum.Enum):
    """What moves a connection from one state to the next."""

    CLIENT_FLAGS = "client flags accepted"
    STARTTLS = "NBD_OPT_STARTTLS acknowledged"
    TLS_UP = "tls_established()"
    ENTER = "transmission entered"
    ABORT = "NBD_OPT_ABORT"
    DISCONNECT = "NBD_CMD_DISC"
    EOF = "end of file"


TRANSITIONS: Final[Mapping[State, Mapping[Trigger, State]]] = {
    State.CLIENT_FLAGS: {
        Trigger.CLIENT_FLAGS: State.NEGOTIATING,
        Trigger.EOF: State.CLOSED,
    },
    State.NEGOTIATING: {
        Trigger.STARTTLS: State.TLS_PENDING,
        Trigger.ENTER: State.TRANSMISSION,
        Trigger.ABORT: State.DONE,
        Trigger.EOF: State.CLOSED,
    },
    State.TLS_PENDING: {Trigger.TLS_UP: State.NEGOTIATING},
    State.TRANSMISSION: {Trigger.DISCONNECT: State.DONE, Trigger.EOF: State.CLOSED},
    State.DONE: {Trigger.EOF: State.CLOSED},
    State.CLOSED: {},
    State.ERROR: {},
}


class ConnectionState:
    """The state of one connection. ``state`` is read freely (it is tested for every
    chunk of input); it changes only through :meth:`transition` and :meth:`fail`."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = State.CLIENT_FLAGS

    def transition(self, trigger: Trigger) -> None:
        """Move along the table; raises LocalProtocolError (state unchanged) when the
        current state has no move for ``trigger``."""
        target = TRANSITIONS[self.state].get(trigger)
        if target is None:
            raise LocalProtocolError(f"{trigger.value}: not possible in state {self.state.value}")
        self.state = target

    def fail(self) -> None:
        """A RemoteProtocolError was raised: input is dead from now on."""
        self.state = State.ERROR
