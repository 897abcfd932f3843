"""Byte stores: the protocol layer under the engine (see store.base for the contract).

The test doubles (CrashStore, FaultStore) load on first use, to keep start-up short.
"""

from __future__ import annotations

from typing import Any

from .base import ByteStore, StoreCapabilities, StoreExtent
from .file import FileStore
from .memory import MemoryStore

_LAZY = {
    "CrashOp": "crash",
    "CrashState": "crash",
    "CrashStore": "crash",
    "FaultRule": "faults",
    "FaultStore": "faults",
}

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
