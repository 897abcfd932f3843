"""Byte stores: the protocol layer under the engine (see store.base for the contract)."""

from .base import ByteStore, StoreCapabilities, StoreExtent
from .crash import CrashOp, CrashState, CrashStore
from .faults import FaultRule, FaultStore
from .file import FileStore
from .memory import MemoryStore

__all__ = [
    "ByteStore",
    "CrashOp",
    "CrashState",
    "CrashStore",
    "FaultRule",
    "FaultStore",
    "FileStore",
    "MemoryStore",
    "StoreCapabilities",
    "StoreExtent",
]
