"""Fault injection: a store wrapper that fails chosen calls with chosen errors.

``FaultStore(inner)`` forwards every call to ``inner`` and counts it per operation
(``calls["write"]`` ...). Rules added with :meth:`FaultStore.fail` pick calls to
fail: by operation, by the n-th matching call (1-based, counted per rule, from the
moment the rule is added) and optionally by byte range. A failing call raises
:class:`~qedkit.errors.StoreError` with the rule's errno, naming the store and
chained from an ``OSError`` as a real failure would be, **without performing the
operation**, except in ``partial`` mode, where a write persists only its first
half (``length // 2`` bytes, ``offset`` onwards) and then fails, like a short write
followed by an error.

Operations (the names are the store methods, each counted on its own):

* ``"read"``: ``readinto`` (and ``read``/``read_exact``, which go through it);
* ``"write"``, ``"writev"``, ``"write_zeroes"``, ``"discard"``: the ranges they touch;
* ``"truncate"``: its "range" is the one byte at the new size, so ``offset_range``
  selects truncates to a size inside it;
* ``"flush"``: has no range (a rule with ``offset_range`` for it is an error);
* ``"*"``: any of the above.

A rule with ``once=True`` (default) fires on its n-th matching call and then
disarms; with ``once=False`` it fires on the n-th and every later matching call
(a device that went bad). ``size``, ``extents``, ``allocated_bytes``, ``lock`` and
``close`` are never failed.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import StoreError
from .base import Buffer, ByteStore, StoreExtent

OPS = ("read", "write", "writev", "write_zeroes", "discard", "truncate", "flush")
_WRITES = ("write", "writev", "write_zeroes")


@dataclass(slots=True)
class FaultRule:
    """Which calls fail and how. ``seen`` counts matching calls, ``fired`` failures."""

    op: str
    nth: int = 1
    errno: int = errno_mod.EIO
    offset_range: tuple[int, int] | None = None
    once: bool = True
    partial: bool = False
    seen: int = 0
    fired: int = 0

    @property
    def armed(self) -> bool:
        return not (self.once and self.fired)

    def matches(self, op: str, offset: int | None, length: int) -> bool:
        if self.op != "*" and self.op != op:
            return False
        if self.offset_range is None:
            return True
        if offset is None:
            return False
        lo, hi = self.offset_range
        return offset < hi and offset + max(length, 1) > lo


@dataclass(frozen=True, slots=True)
class InjectedFault:
    """A failure that happened: which call, where, with what errno."""

    op: str
    call: int  # the call's number among calls of op (1-based)
    offset: int | None
    length: int
    errno: int
    partial: bool


class FaultStore(ByteStore):
    """Wrap ``inner`` and fail the calls the rules choose (see the module docstring)."""

    def __init__(self, inner: ByteStore, *, name: str | None = None) -> None:
        self.inner = inner
        self.name = inner.name if name is None else name
        self.capabilities = inner.capabilities
        self.rules: list[FaultRule] = []
        self.calls: Counter[str] = Counter()
        self.injected: list[InjectedFault] = []

    # ---- rules ---------------------------------------------------------------

    def fail(
        self,
        op: str,
        *,
        nth: int = 1,
        errno: int = errno_mod.EIO,
        offset_range: tuple[int, int] | None = None,
        once: bool = True,
        partial: bool = False,
    ) -> FaultRule:
        """Fail the ``nth`` call of ``op`` (matching ``offset_range``) from now on."""
        if op != "*" and op not in OPS:
            raise ValueError(f"unknown operation {op!r} (one of {', '.join(OPS)} or '*')")
        if nth < 1:
            raise ValueError(f"nth counts from 1, not {nth}")
        if offset_range is not None and op == "flush":
            raise ValueError("a flush has no offset range")
        if partial and op not in (*_WRITES, "*"):
            raise ValueError(f"partial failures apply to writes, not {op!r}")
        rule = FaultRule(op, nth, errno, offset_range, once, partial)
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule (counts are kept)."""
        self.rules.clear()

    def _check(self, op: str, offset: int | None = None, length: int = 0) -> FaultRule | None:
        """Count the call; return the rule that fails it, if any. Every armed
        matching rule counts the call; the first one due fires (a once-rule that
        was due but beaten by another fires on the next matching call)."""
        self.calls[op] += 1
        due: FaultRule | None = None
        for rule in self.rules:
            if not rule.armed or not rule.matches(op, offset, length):
                continue
            rule.seen += 1
            if due is None and rule.seen >= rule.nth:
                due = rule
        if due is not None:
            due.fired += 1
        return due

    def _error(self, rule: FaultRule, op: str, offset: int | None, length: int) -> StoreError:
        self.injected.append(
            InjectedFault(
                op, self.calls[op], offset, length, rule.errno, rule.partial and op in _WRITES
            )
        )
        where = "" if offset is None else f" of {length} bytes at offset {offset}"
        strerror = os.strerror(rule.errno)
        cause = OSError(rule.errno, strerror)
        err = StoreError(
            f"{op}{where} failed: {strerror} (injected fault)",
            filename=self.name,
            errno=rule.errno,
        )
        err.__cause__ = cause
        return err

    # ---- ByteStore -----------------------------------------------------------

    async def size(self) -> int:
        return await self.inner.size()

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> int:
        rule = self._check("read", offset, len(buf))
        if rule is not None:
            raise self._error(rule, "read", offset, len(buf))
        return await self.inner.readinto(offset, buf)

    async def write(self, offset: int, data: Buffer) -> None:
        self._check_writable()
        rule = self._check("write", offset, len(data))
        if rule is not None:
            if rule.partial:
                await self.inner.write(offset, memoryview(data).cast("B")[: len(data) // 2])
            raise self._error(rule, "write", offset, len(data))
        await self.inner.write(offset, data)

    async def writev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self._check_writable()
        length = sum(memoryview(b).nbytes for b in buffers)
        rule = self._check("writev", offset, length)
        if rule is not None:
            if rule.partial:
                joined = b"".join(buffers)
                await self.inner.writev(offset, [joined[: length // 2]])
            raise self._error(rule, "writev", offset, length)
        await self.inner.writev(offset, buffers)

    async def write_zeroes(self, offset: int, length: int, *, punch: bool = False) -> None:
        self._check_writable()
        rule = self._check("write_zeroes", offset, length)
        if rule is not None:
            if rule.partial and length // 2:
                await self.inner.write_zeroes(offset, length // 2, punch=punch)
            raise self._error(rule, "write_zeroes", offset, length)
        await self.inner.write_zeroes(offset, length, punch=punch)

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        rule = self._check("discard", offset, length)
        if rule is not None:
            raise self._error(rule, "discard", offset, length)
        await self.inner.discard(offset, length)

    async def flush(self) -> None:
        rule = self._check("flush")
        if rule is not None:
            raise self._error(rule, "flush", None, 0)
        await self.inner.flush()

    async def truncate(self, size: int) -> None:
        self._check_writable()
        rule = self._check("truncate", size, 1)
        if rule is not None:
            raise self._error(rule, "truncate", size, 0)
        await self.inner.truncate(size)

    async def extents(self, offset: int, length: int) -> list[StoreExtent]:
        return await self.inner.extents(offset, length)

    async def allocated_bytes(self) -> int:
        return await self.inner.allocated_bytes()

    def lock(self, *, write: bool, shared: bool) -> None:
        self.inner.lock(write=write, shared=shared)

    async def close(self) -> None:
        await self.inner.close()
