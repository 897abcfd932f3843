"""Byte stores: the protocol layer under the engine (see store.base for the contract)."""

from .base import ByteStore, StoreCapabilities, StoreExtent
from .file import FileStore
from .memory import MemoryStore

__all__ = ["ByteStore", "FileStore", "MemoryStore", "StoreCapabilities", "StoreExtent"]
