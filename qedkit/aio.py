"""The asynchronous API: the engine itself, for asyncio programs.

::

    from qedkit import aio

    img = await aio.open_image("disk.qed")
    await img.write(0, b"data")
    entries = await aio.map_chain(img)
    await img.close()
"""

from .engine.base import BlockImage, Extent, ExtentKind, ImageInfo
from .engine.chain import create_image, open_image
from .engine.check import CheckReport, Reclaim, RepairMode, check_image
from .engine.lostfound import LostFound, LostFoundTar, SavedRun
from .engine.mapping import MapEntry, map_chain
from .engine.qcow2 import Qcow2Image
from .engine.qed import QedImage
from .engine.raw import RawImage

__all__ = [
    "BlockImage",
    "CheckReport",
    "Extent",
    "ExtentKind",
    "ImageInfo",
    "LostFound",
    "LostFoundTar",
    "MapEntry",
    "Qcow2Image",
    "QedImage",
    "RawImage",
    "Reclaim",
    "RepairMode",
    "SavedRun",
    "check_image",
    "create_image",
    "map_chain",
    "open_image",
]
