"""qedkit: QED (QEMU Enhanced Disk) images in Python.

The synchronous API is ``qedkit.open`` / ``qedkit.create`` (see qedkit.api); the
asynchronous engine is ``qedkit.aio``; errors derive from ``qedkit.QedError``.
"""

from .api import Image, ImageFile, create, open
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

__version__ = "0.1.0"

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
