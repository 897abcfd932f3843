"""Crash sweeps of the image verbs (commit, rebase, resize, amend): procedures that
must never change what the guest reads, on one image or across two (commit writes
the base, then the overlay).

Every store involved is an :class:`OrderedCrashStore`; they share one ``order`` list,
so the log of all their operations is known in the order they happened. A crash at
global point ``g`` leaves each store at the crash point its own first operations up
to ``g`` make, and every combination of the stores' possible states there (capped
per store) is handed to the test's ``judge``, which recovers the images as a user
would (a read-write open, which repairs a dirty image) and returns what is wrong.
``qemu-img check`` runs on a sample of the recovered QED files (leaks are allowed
after a crash, corruption is not).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crashkit import SCALE, run

from qedkit.engine.base import BlockImage
from qedkit.engine.chain import open_qed
from qedkit.engine.check import CheckReport, check_image
from qedkit.engine.qed import QedImage
from qedkit.engine.raw import RawImage
from qedkit.store import CrashStore, MemoryStore
from qedkit.store.crash import OpKind


class OrderedCrashStore(CrashStore):
    """A CrashStore that also appends its index to a shared ``order`` list for every
    operation it logs."""

    def __init__(
        self, initial: bytes, *, name: str, order: list[int] | None = None, index: int = 0
    ) -> None:
        super().__init__(initial, name=name)
        self.order: list[int] = [] if order is None else order
        self.index = index

    def _log(self, kind: OpKind, source: str, offset: int = 0, data: bytes = b"") -> None:
        super()._log(kind, source, offset, data)
        self.order.append(self.index)


@dataclass
class SweepTotals:
    states: int = 0
    crash_points: int = 0
    lost: int = 0  # states whose guest view differs from what it must be: must be 0
    corrupt: int = 0  # states check_image (or qemu-img check) finds corrupt: must be 0
    qemu_checks: int = 0
    failures: list[str] = field(default_factory=list)

    def line(self, name: str) -> str:
        return (
            f"{name}: {self.states} states at {self.crash_points} crash points, "
            f"{self.lost} lost, {self.corrupt} corrupt, {self.qemu_checks} qemu-img checks"
        )

    @property
    def ok(self) -> bool:
        return not (self.lost or self.corrupt or self.failures)


# judge(states) -> (problems that lose guest data, problems of corruption)
Judge = Callable[[list[bytes]], Awaitable[tuple[list[str], list[str]]]]


class QemuSample:
    """``qemu-img check`` on every ``every``-th distinct QED file offered; the files
    named in ``extra`` (backing files) are written next to it first."""

    def __init__(
        self, qemu: Any, directory: Path, every: int, extra: dict[str, bytes] | None = None
    ) -> None:
        self.qemu = qemu
        self.directory = directory
        self.every = max(1, every)
        self.seen: set[bytes] = set()
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in (extra or {}).items():
            (directory / name).write_bytes(data)

    def offer(self, name: str, image: bytes, totals: SweepTotals) -> str | None:
        digest = hashlib.blake2b(image, digest_size=16).digest()
        if digest in self.seen:
            return None
        self.seen.add(digest)
        if (len(self.seen) - 1) % self.every:
            return None
        path = self.directory / name
        path.write_bytes(image)
        result = self.qemu.img("check", "-f", "qed", path, check=False)
        totals.qemu_checks += 1
        if result.returncode in (0, 3):
            return None
        keep = self.directory / f"failed-{totals.qemu_checks}-{name}"
        keep.write_bytes(image)
        return f"qemu-img check exited {result.returncode} (kept as {keep}): {result.stdout}"


def sweep(
    stores: Sequence[OrderedCrashStore],
    judge: Judge,
    *,
    torn: bool = False,
    max_states: int = 16,
    points: int | None = None,
    seed: int = 0,
) -> SweepTotals:
    """Judge the states of every global crash point (``points``: a fixed-seed sample
    of that many, scaled by QEDKIT_CRASH_SCALE, the last point always included)."""
    order = stores[0].order
    total = len(order)
    todo = list(range(total + 1))
    if points is not None:
        count = max(1, round(points * SCALE))
        if count < total + 1:
            todo = sorted(set(random.Random(seed).sample(range(total), count - 1)) | {total})
    totals = SweepTotals()
    prefix = [0] * len(stores)
    counts: list[list[int]] = []
    for who in order:
        counts.append(list(prefix))
        prefix[who] += 1
    counts.append(list(prefix))

    async def go() -> None:
        for g in todo:
            totals.crash_points += 1
            per_store = [
                [s.data for s in store.scenarios(counts[g][i], torn=torn, max_states=max_states)]
                for i, store in enumerate(stores)
            ]
            for combo in itertools.product(*per_store):
                totals.states += 1
                lost, corrupt = await judge(list(combo))
                totals.lost += bool(lost)
                totals.corrupt += bool(corrupt)
                if (lost or corrupt) and len(totals.failures) < 5:
                    where = ", ".join(
                        f"{store.name} at {counts[g][i]}/{store.crash_points()}"
                        for i, store in enumerate(stores)
                    )
                    totals.failures.append(f"global point {g} ({where}): {lost + corrupt}")

    run(go())
    return totals


def raw_backing(name: str, data: bytes) -> RawImage:
    return RawImage(MemoryStore(data, name=name, writable=False), len(data))


async def recover(
    data: bytes, name: str, backings: dict[str, Callable[[], BlockImage]] | None = None
) -> tuple[QedImage, CheckReport]:
    """Open a crash state read-write as a user would (repairing a dirty image) over
    the backing image its header names (made by ``backings[name]()``), and check it."""
    store = MemoryStore(data, name=name)
    header, area = await QedImage.read_header(store)
    backing_name = header.backing_filename(area)
    backing = None
    if backing_name is not None:
        assert backings is not None and backing_name in backings, backing_name
        backing = backings[backing_name]()
    img = await open_qed(store, header, area, backing=backing, readonly=False)
    return img, await check_image(img)


def first_difference(got: bytes, want: bytes, base: int = 0) -> str | None:
    if got == want:
        return None
    if len(got) != len(want):
        return f"read {len(got)} bytes, expected {len(want)}"
    i = next(i for i in range(len(got)) if got[i] != want[i])
    return f"guest byte {base + i:#x} reads {got[i]:#04x}, expected {want[i]:#04x}"
