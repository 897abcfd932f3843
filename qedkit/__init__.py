"""qedkit: QED (QEMU Enhanced Disk) images in Python.

The synchronous API is ``qedkit.open`` / ``qedkit.create`` (see qedkit.api); the
asynchronous engine is ``qedkit.aio``; errors derive from ``qedkit.QedError``.
"""

from typing import TYPE_CHECKING, Any

from .errors import (
    BackingFileError,
    CorruptImageError,
    FormatError,
    ImageLockedError,
    InvalidRequestError,
    JobError,
    QedError,
    ReadOnlyError,
    StoreError,
    UnsupportedFeatureError,
)
from .version import __version__

if TYPE_CHECKING:
    from .api import Image, ImageFile, create, open


_API = ("Image", "ImageFile", "create", "open")


def __getattr__(name: str) -> Any:
    """The API (and with it asyncio) loads on first use: ``qed --version`` stays fast."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'qedkit' has no attribute {name!r}")


__all__ = [
    "BackingFileError",
    "CorruptImageError",
    "FormatError",
    "Image",
    "ImageFile",
    "ImageLockedError",
    "InvalidRequestError",
    "JobError",
    "QedError",
    "ReadOnlyError",
    "StoreError",
    "UnsupportedFeatureError",
    "__version__",
    "create",
    "open",
]
