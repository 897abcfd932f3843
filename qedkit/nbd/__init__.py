"""NBD (Network Block Device) server support.

:mod:`qedkit.nbd.protocol` is the sans-I/O protocol core (a package, one concern per
module): bytes in, events and bytes out, no sockets. Its public names are re-exported
here; its docstring explains how a server drives it. The server side: ``server``
(asyncio glue), ``errors`` (which NBD error an exception becomes), ``control``.
This file imports the core only, so that a store-layer client can import
``qedkit.nbd.protocol`` without pulling in the server.
"""

from __future__ import annotations

from .protocol import *  # noqa: F403
from .protocol import __all__ as __all__
