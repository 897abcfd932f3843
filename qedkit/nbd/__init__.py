"""NBD (Network Block Device) server support.

:mod:`qedkit.nbd.protocol` is the sans-I/O protocol core: bytes in, events and bytes
out, no sockets. Its public names are re-exported here; the module docstring explains
how a server drives it.
"""

from __future__ import annotations

from .protocol import *  # noqa: F403
from .protocol import __all__ as __all__
