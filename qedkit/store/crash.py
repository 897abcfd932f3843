"""Crash simulation: a store that logs every write and flush, and enumerates the disk
states a power loss at any point of the log could leave behind.

Theory of operation
-------------------
``CrashStore`` is a :class:`~qedkit.store.memory.MemoryStore`-like store (reads see
every write) that also appends each modifying call to an ordered log of
:class:`CrashOp`: ``write`` (offset, data), ``truncate`` (new size) and ``flush``.
Like dm-log-writes, the log can afterwards be replayed to any point; like SQLite's
crash-test VFS (src/test6.c), what was written since the last sync may or may not
have reached the disk.

*Crash point* ``k`` (``0 <= k <= crash_points()``) means "power was lost after the
first ``k`` logged operations completed". With ``p = last_flush_before(k)``:

* the **durable state** is the initial image with ``ops[:p]`` applied in order:
  a completed flush makes every write completed before it durable;
* a **possible state** is the durable state plus any *subset* of the non-flush
  operations in ``ops[p:k]`` (the unflushed tail), applied in log order, so a later
  write wins where persisted writes overlap. The disk may have persisted any of
  them, in any order, but a write can never be persisted "under" an earlier one
  that was not overwritten by it.
* with ``torn=True`` each write is split at absolute 512-byte sector boundaries and
  every piece persists independently (sector writes themselves are atomic, the
  assumption QED's metadata updates rely on). So a torn state mixes whole sectors of
  old and new content, never bytes inside a sector.

File size (decided here, documented because real file systems differ):

* size changes persist *with the operation that causes them*: a write that ends past
  the end of the file extends it only if it is persisted, so an extension that is
  lost leaves the file shorter and the data past the old end vanishes. A persisted
  write beyond the end leaves zeros in between (as a hole would read).
* with ``torn=True`` a persisted sector piece extends the file to that piece's end,
  and a write that extended the live file carries one more independent unit, its
  *size*: if persisted, the file is extended to the write's full end (zeros where
  the data did not make it), as when the inode's size reached the disk but the
  data blocks did not.
* ``truncate`` is one unit: persisted or not, as a whole, in log order. A shrink
  that persisted removes everything past the new end, including data persisted
  by earlier writes of the tail.

Zeroing:

* ``write_zeroes`` is logged as a write of zeros. With ``punch=False`` it extends
  the file like a write; with ``punch=True`` it is clipped to the current size
  (``FALLOC_FL_KEEP_SIZE``). It is logged even where the range already reads as
  zeros: an earlier unflushed write there may be the one that is lost.
* ``discard`` (advisory) depends on the ``discard`` argument: ``"zero"`` (default,
  like FileStore's hole punching) makes the range, clipped to the size, read as
  zeros and logs it as a write of zeros, so a crash state shows either the old
  bytes (discard lost) or zeros; ``"keep"`` changes nothing and logs nothing (as
  MemoryStore).

The log holds only modifying calls; reads are not logged. Each :class:`CrashOp` has
an ``index``: crash point ``index + 1`` is the one just after it. ``mark(label)``
records the current log position under a name (dm-log-writes' marks), so a test can
ask "was everything before this mark on disk at crash point k?" with
:meth:`CrashStore.durable_at`, or about one op with :meth:`CrashStore.is_durable`.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from .base import Buffer, ByteStore, StoreCapabilities

SECTOR = 512
EXHAUSTIVE_LIMIT = 10  # unflushed units up to which every subset is produced
DEFAULT_SAMPLES = 64  # states sampled per crash point when not exhaustive

OpKind = Literal["write", "truncate", "flush"]


@dataclass(frozen=True, slots=True)
class CrashOp:
    """One logged operation.

    ``kind`` is what it does to the disk ("write", "truncate" or "flush"); ``source``
    is the store call that made it (write, writev, write_zeroes, discard, truncate,
    flush). For a truncate ``offset`` is the new size. ``extends`` tells that a
    write ended past the end of the live file when it was issued.
    """

    index: int
    kind: OpKind
    source: str
    offset: int = 0
    data: bytes = b""
    extends: bool = False

    @property
    def end(self) -> int:
        return self.offset + len(self.data)

    def describe(self) -> str:
        if self.kind == "flush":
            return f"#{self.index} flush"
        if self.kind == "truncate":
            return f"#{self.index} truncate to {self.offset}"
        what = "zeros" if not any(self.data) else "data"
        ext = ", extends" if self.extends else ""
        return (
            f"#{self.index} {self.source} {len(self.data)} bytes of {what} at "
            f"{self.offset:#x}..{self.end:#x}{ext}"
        )


@dataclass(frozen=True, slots=True)
class CrashUnit:
    """A piece of an operation that persists or not as one: the whole op (``start``
    == ``end`` == -1 for a truncate or an untorn write), one sector piece of a write
    ``[start, end)``, or a write's size extension (``size_only``)."""

    op: int
    start: int = -1
    end: int = -1
    size_only: bool = False

    @property
    def whole(self) -> bool:
        return self.start < 0 and not self.size_only


@dataclass(frozen=True, slots=True)
class CrashState:
    """One possible disk content after a power loss at crash point ``point``."""

    point: int
    data: bytes
    durable: int  # ops[:durable] are on disk for certain
    units: tuple[CrashUnit, ...]  # the unflushed units that were persisted
    candidates: tuple[CrashUnit, ...]  # every unflushed unit of this crash point

    @property
    def persisted_ops(self) -> frozenset[int]:
        """Indices of tail ops persisted completely."""
        chosen = set(self.units)
        per_op: dict[int, list[CrashUnit]] = {}
        for u in self.candidates:
            per_op.setdefault(u.op, []).append(u)
        return frozenset(op for op, us in per_op.items() if all(u in chosen for u in us))

    @property
    def torn_ops(self) -> frozenset[int]:
        """Indices of tail ops of which some units but not all were persisted."""
        some = {u.op for u in self.units}
        return frozenset(some - self.persisted_ops)

    @property
    def lost_ops(self) -> frozenset[int]:
        """Indices of tail ops of which nothing was persisted."""
        return frozenset({u.op for u in self.candidates} - {u.op for u in self.units})

    def describe(self) -> str:
        parts = [f"crash point {self.point}: ops[:{self.durable}] durable"]
        if self.persisted_ops:
            parts.append(f"persisted {sorted(self.persisted_ops)}")
        for op in sorted(self.torn_ops):
            pieces = [
                "size" if u.size_only else f"{u.start:#x}..{u.end:#x}"
                for u in self.units
                if u.op == op
            ]
            parts.append(f"torn #{op} (kept {', '.join(pieces)})")
        if self.lost_ops:
            parts.append(f"lost {sorted(self.lost_ops)}")
        return "; ".join(parts)


def _apply_write(buf: bytearray, offset: int, data: bytes | memoryview) -> None:
    if offset > len(buf):
        buf.extend(bytes(offset - len(buf)))
    buf[offset : offset + len(data)] = data


def _set_size(buf: bytearray, size: int) -> None:
    if size < len(buf):
        del buf[size:]
    else:
        buf.extend(bytes(size - len(buf)))


class CrashStore(ByteStore):
    """An in-memory store that logs writes and flushes for crash simulation.

    ``initial`` is the disk content before the first logged operation (a durable
    state: crash point 0). See the module docstring for the model.
    """

    def __init__(
        self,
        initial: bytes | bytearray = b"",
        *,
        name: str = "<crash>",
        discard: Literal["zero", "keep"] = "zero",
    ) -> None:
        if discard not in ("zero", "keep"):
            raise ValueError(f"discard must be 'zero' or 'keep', not {discard!r}")
        self.name = name
        self.initial = bytes(initial)
        self.data = bytearray(initial)
        self.discard_mode = discard
        self.capabilities = StoreCapabilities(writable=True, punch_holes=discard == "zero")
        self.ops: list[CrashOp] = []
        self._flushes: list[int] = []  # indices of the flush ops, ascending
        self.marks: dict[str, int] = {}
        self._snapshots: dict[int, bytes] = {0: self.initial}

    # ---- the log -------------------------------------------------------------

    @property
    def position(self) -> int:
        """Number of operations logged so far (the crash point "now")."""
        return len(self.ops)

    def mark(self, label: str) -> int:
        """Remember the current log position under ``label``; returns it."""
        self.marks[label] = len(self.ops)
        return len(self.ops)

    def _log(self, kind: OpKind, source: str, offset: int = 0, data: bytes = b"") -> None:
        extends = kind == "write" and offset + len(data) > len(self.data)
        if kind == "flush":
            self._flushes.append(len(self.ops))
        self.ops.append(CrashOp(len(self.ops), kind, source, offset, data, extends))

    def crash_points(self) -> int:
        """The number of logged operations; valid crash points are ``0 .. crash_points()``."""
        return len(self.ops)

    def _check_point(self, k: int) -> None:
        if not 0 <= k <= len(self.ops):
            raise ValueError(f"crash point {k} outside 0..{len(self.ops)}")

    def last_flush_before(self, k: int) -> int:
        """The log position ``p`` up to which everything is durable at crash point
        ``k``: one past the last flush among ``ops[:k]``, or 0 if there is none."""
        self._check_point(k)
        i = bisect.bisect_left(self._flushes, k)  # flushes before index k
        return self._flushes[i - 1] + 1 if i else 0

    def is_durable(self, op_index: int, k: int) -> bool:
        """Was operation ``op_index`` guaranteed on disk at crash point ``k``?"""
        return op_index < self.last_flush_before(k)

    def durable_at(self, position: int | str, k: int) -> bool:
        """Was everything logged before ``position`` (or before a mark) guaranteed
        on disk at crash point ``k``?"""
        pos = self.marks[position] if isinstance(position, str) else position
        return pos <= self.last_flush_before(k)

    def pending(self, k: int) -> list[CrashOp]:
        """The operations that may or may not be on disk at crash point ``k``."""
        p = self.last_flush_before(k)
        return [op for op in self.ops[p:k] if op.kind != "flush"]

    def describe_ops(self, start: int = 0, stop: int | None = None) -> str:
        """The log (or a slice of it), one op a line, for failure reports."""
        stop = len(self.ops) if stop is None else stop
        return "\n".join(op.describe() for op in self.ops[start:stop])

    # ---- replay --------------------------------------------------------------

    def _replay(self, p: int) -> bytes:
        """The content with ``ops[:p]`` applied (cached per position)."""
        cached = self._snapshots.get(p)
        if cached is not None:
            return cached
        start = max(q for q in self._snapshots if q <= p)
        buf = bytearray(self._snapshots[start])
        for op in self.ops[start:p]:
            if op.kind == "write":
                _apply_write(buf, op.offset, op.data)
            elif op.kind == "truncate":
                _set_size(buf, op.offset)
        result = bytes(buf)
        self._snapshots[p] = result
        return result

    def durable_state(self, k: int) -> bytes:
        """What is on disk for certain at crash point ``k``."""
        return self._replay(self.last_flush_before(k))

    def units(self, k: int, *, torn: bool = False) -> list[CrashUnit]:
        """The independently persisted units of the unflushed tail at ``k``."""
        out: list[CrashUnit] = []
        for op in self.pending(k):
            if op.kind != "write" or not torn:
                out.append(CrashUnit(op.index))
                continue
            first = op.offset - op.offset % SECTOR
            for sector in range(first, op.end, SECTOR):
                out.append(
                    CrashUnit(op.index, max(op.offset, sector), min(op.end, sector + SECTOR))
                )
            if op.extends:
                out.append(CrashUnit(op.index, size_only=True))
        return out

    def _build(self, base: bytes, chosen: Sequence[CrashUnit]) -> bytes:
        buf = bytearray(base)
        for u in chosen:
            op = self.ops[u.op]
            if op.kind == "truncate":
                _set_size(buf, op.offset)
            elif u.size_only:
                if len(buf) < op.end:
                    _set_size(buf, op.end)
            elif u.whole:
                _apply_write(buf, op.offset, op.data)
            else:
                view = memoryview(op.data)[u.start - op.offset : u.end - op.offset]
                _apply_write(buf, u.start, view)
        return bytes(buf)

    def scenarios(
        self,
        k: int,
        *,
        max_states: int | None = None,
        torn: bool = False,
        rng: random.Random | None = None,
        exhaustive_limit: int = EXHAUSTIVE_LIMIT,
    ) -> Iterator[CrashState]:
        """Possible disk states at crash point ``k``, with what made each.

        Every subset of the unflushed units when there are at most
        ``exhaustive_limit`` of them (and ``2**n <= max_states`` if given), in
        bitmask order (the durable state first). Otherwise ``max_states`` (default
        DEFAULT_SAMPLES) distinct subsets: nothing persisted, everything persisted,
        then alternately a random prefix of the units in log order (the disk wrote
        in order and stopped) and a uniform random subset. ``rng`` defaults to
        ``random.Random(k)``, so runs are reproducible.
        """
        self._check_point(k)
        p = self.last_flush_before(k)
        base = self._replay(p)
        units = self.units(k, torn=torn)
        n = len(units)
        if n <= exhaustive_limit and (max_states is None or (1 << n) <= max_states):
            masks: Iterator[int] = iter(range(1 << n))
        else:
            limit = DEFAULT_SAMPLES if max_states is None else max_states
            masks = self._sample_masks(n, limit, rng or random.Random(k))
        candidates = tuple(units)
        for mask in masks:
            chosen = tuple(u for i, u in enumerate(units) if mask >> i & 1)
            yield CrashState(k, self._build(base, chosen), p, chosen, candidates)

    @staticmethod
    def _sample_masks(n: int, limit: int, rng: random.Random) -> Iterator[int]:
        full = (1 << n) - 1
        seen: set[int] = set()
        for mask in (0, full):
            if len(seen) < limit and mask not in seen:
                seen.add(mask)
                yield mask
        attempts = 0
        while len(seen) < limit and attempts < 8 * limit:
            attempts += 1
            if attempts % 2:
                mask = (1 << rng.randrange(1, n)) - 1 if n > 1 else 0
            else:
                mask = rng.getrandbits(n)
            if mask not in seen:
                seen.add(mask)
                yield mask

    def states(
        self,
        k: int,
        *,
        max_states: int | None = None,
        torn: bool = False,
        rng: random.Random | None = None,
        exhaustive_limit: int = EXHAUSTIVE_LIMIT,
    ) -> Iterator[bytes]:
        """The bytes of each state :meth:`scenarios` produces."""
        for state in self.scenarios(
            k, max_states=max_states, torn=torn, rng=rng, exhaustive_limit=exhaustive_limit
        ):
            yield state.data

    # ---- ByteStore -----------------------------------------------------------

    async def size(self) -> int:
        return len(self.data)

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> int:
        view = memoryview(buf).cast("B")
        chunk = self.data[offset : offset + len(view)]
        view[: len(chunk)] = chunk
        return len(chunk)

    async def writev(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self._write("writev", offset, b"".join(buffers))

    async def write(self, offset: int, data: Buffer) -> None:
        self._write("write", offset, bytes(data))

    # The synchronous writes of a local file (FileStore's), so that the engine's
    # synchronous paths run against the log too.

    def pwrite_now(self, offset: int, data: Buffer) -> None:
        self._write("pwrite_now", offset, bytes(data))

    def pwritev_now(self, offset: int, buffers: Sequence[Buffer]) -> None:
        self._write("pwritev_now", offset, b"".join(buffers))

    def _write(self, source: str, offset: int, data: bytes) -> None:
        self._check_writable()
        if not data:
            return
        self._log("write", source, offset, data)
        _apply_write(self.data, offset, data)

    async def write_zeroes(self, offset: int, length: int, *, punch: bool = False) -> None:
        self._check_writable()
        if punch:
            length = min(length, len(self.data) - offset)
        self._write("write_zeroes", offset, bytes(max(0, length)))

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        if self.discard_mode == "keep":
            return
        length = min(length, len(self.data) - offset)
        self._write("discard", offset, bytes(max(0, length)))

    async def flush(self) -> None:
        self._log("flush", "flush")

    async def truncate(self, size: int) -> None:
        self._check_writable()
        if size < 0:
            raise ValueError(f"invalid size {size}")
        self._log("truncate", "truncate", size)
        _set_size(self.data, size)

    async def close(self) -> None:
        pass
