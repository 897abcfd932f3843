"""Process-kill tests: ``qed io`` killed with SIGKILL at a random moment.

A script of a few hundred commands (``write -P``, ``write -z [-u]``, ``discard``,
``flush``; allocating and in-place, unaligned, crossing cluster and L2 boundaries,
drawn from a fixed-seed RNG) runs in a real ``python -m qedkit io`` process. The
test reads its stdout line by line while it runs and SIGKILLs it either right after
a random number of reported commands or after a random delay. ``qed io`` prints (and
flushes) one line per completed command, so after the kill the lines say exactly
which commands completed; the one after the last reported command may have been in
flight.

The page cache survives a process kill, so **every reported command must be intact
without any flush**: this catches metadata an implementation keeps only in memory,
writes reported before they reach the file, and orderings that leave a window in
which a reopen (with its repair) loses or damages data.

After the kill the image is reopened read-write with qedkit (which repairs it when
NEED_CHECK is set) and:

* every guest byte of the command zones equals the model (the reported commands
  applied in order to the initial content); bytes under the in-flight command may
  read as before it or as after it, each byte independently;
* nothing outside the command zones is allocated in the top image;
* ``qed check`` and ``qemu-img check`` find no corruption (leaks are allowed: a
  killed allocation may leave an unreferenced cluster, and QED has no free list);
* QEMU reads the same guest bytes (``qemu-img convert -O raw``).

Runs: every configuration (two geometries, with and without a raw backing file, and
the small one with the home allocation policy) times a fixed list of seeds;
``QEDKIT_CRASH_SCALE=N`` multiplies the number of seeds (the default run is 40 kills
in about a minute).

The model of ``write -z`` and ``discard`` follows docs/DESIGN.md ("Zero clusters,
write-zeroes, discard"): both make their range read zeros, except that ``discard``
only touches whole *allocated* clusters (it punches holes under them; zero and
unallocated clusters and partial clusters are left alone, so backing data stays
visible there). When the file system cannot punch holes, scripts have no discard.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from qedtest import Qemu, qed

import qedkit
from qedkit.engine.base import ExtentKind
from qedkit.format.header import Feature, Header
from qedkit.store import FileStore

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def _scale() -> int:
    text = os.environ.get("QEDKIT_CRASH_SCALE", "1")
    try:
        return max(1, round(float(text)))
    except ValueError:
        raise pytest.UsageError(f"QEDKIT_CRASH_SCALE={text!r} is not a number") from None


SEEDS_PER_CONFIG = 8
SEEDS = list(range(SEEDS_PER_CONFIG * _scale()))
PROCESS_TIMEOUT = 120.0  # seconds; a script that takes this long is a hang


# =====================================================================================
# Configurations
# =====================================================================================


@dataclass(frozen=True)
class Config:
    """An image geometry, where the commands land, and an optional raw backing file."""

    name: str
    cluster_size: int
    table_size: int
    size: int  # guest size; deliberately not a multiple of the cluster size
    zones: tuple[tuple[int, int], ...]  # (start, length): every command lies in one zone
    backing_size: int | None = None  # raw backing file (random bytes in the zones)
    allocation: str = "end"  # "home": new clusters at data start + guest offset

    @property
    def l2_span(self) -> int:
        return self.table_size * self.cluster_size // 8 * self.cluster_size


def _configs() -> list[Config]:
    small = dict(
        cluster_size=4 * KiB,
        table_size=2,  # one L2 table maps 4 MiB
        size=12 * MiB - 1536,
        zones=(
            (0, 256 * KiB),
            (4 * MiB - 128 * KiB, 256 * KiB),  # L2 boundary at 4 MiB
            (8 * MiB - 64 * KiB, 128 * KiB),  # L2 boundary at 8 MiB
            (12 * MiB - 64 * KiB, 64 * KiB - 1536),  # the partial last cluster
        ),
    )
    big_size = 2 * GiB + 2 * MiB + 512
    default = dict(
        cluster_size=64 * KiB,
        table_size=4,  # one L2 table maps 2 GiB
        size=big_size,
        zones=(
            (0, 1 * MiB),
            (2 * GiB - 512 * KiB, 1 * MiB),  # L2 boundary at 2 GiB
            (big_size - 192 * KiB - 512, 192 * KiB + 512),  # the partial last cluster
        ),
    )
    return [
        Config("small", **small),  # type: ignore[arg-type]
        # The backing file ends inside a zone, in the middle of a cluster.
        Config("small-backing", **small, backing_size=4 * MiB + 10 * KiB),  # type: ignore[arg-type]
        # The home allocation policy: clusters go to their home slots (possibly past
        # the end of the file, or into freed slots inside it).
        Config("small-home", **small, allocation="home"),  # type: ignore[arg-type]
        Config("default", **default),  # type: ignore[arg-type]
        Config("default-backing", **default, backing_size=2 * GiB + 200 * KiB + 512),  # type: ignore[arg-type]
    ]


CONFIGS = _configs()


# =====================================================================================
# Commands and the model
# =====================================================================================


@dataclass(frozen=True)
class Command:
    kind: str  # "write", "zero", "zero-unmap", "discard", "flush"
    offset: int = 0
    length: int = 0
    pattern: int = 0

    @property
    def text(self) -> str:
        if self.kind == "write":
            return f"write -P {self.pattern:#x} {self.offset} {self.length}"
        if self.kind == "zero":
            return f"write -z {self.offset} {self.length}"
        if self.kind == "zero-unmap":
            return f"write -z -u {self.offset} {self.length}"
        if self.kind == "discard":
            return f"discard {self.offset} {self.length}"
        return "flush"

    @property
    def reports(self) -> bool:
        """Whether ``qed io`` prints a line when the command completes."""
        return self.kind != "flush"

    @property
    def expected_line(self) -> str:
        verb = "discard" if self.kind == "discard" else "wrote"
        return f"{verb} {self.length}/{self.length} bytes at offset {self.offset}"


def _range(rng: random.Random, cfg: Config, zone: tuple[int, int]) -> tuple[int, int]:
    """An (offset, length) inside ``zone`` in one of several shapes."""
    start, length = zone
    end = start + length
    cs = cfg.cluster_size
    style = rng.choice(["aligned", "sector", "unaligned", "small", "cross", "cross", "l2"])
    if style == "l2":
        boundaries = [b for b in range(cfg.l2_span, cfg.size, cfg.l2_span) if start < b < end]
        if not boundaries:
            style = "cross"
        else:
            b = rng.choice(boundaries)
            off = b - rng.randrange(1, 2 * cs)
            n = (b - off) + rng.randrange(1, 2 * cs)
    if style == "aligned":
        first = -(-start // cs) * cs
        off = rng.randrange(first, max(first + 1, end - cs), cs)
        n = cs * rng.randint(1, 3)
    elif style == "sector":
        off = rng.randrange(start, end, 512)
        n = 512 * rng.randint(1, 3 * cs // 512)
    elif style == "unaligned":
        off = rng.randrange(start, end)
        n = rng.randint(1, 2 * cs + 100)
    elif style == "small":
        off = rng.randrange(start, end)
        n = rng.randint(1, 64)
    elif style == "cross":
        next_boundary = start + cs - start % cs
        boundary = rng.randrange(next_boundary, end, cs) if next_boundary < end else end
        off = max(start, boundary - rng.randint(1, 700))
        n = boundary - off + rng.randint(1, 700)
    off = max(start, min(off, end - 1))
    n = max(1, min(n, end - off))
    return off, n


def make_script(rng: random.Random, cfg: Config, *, discard: bool) -> list[Command]:
    out: list[Command] = []
    for _ in range(rng.randint(250, 450)):
        roll = rng.random()
        if roll < 0.05:
            out.append(Command("flush"))
            continue
        off, n = _range(rng, cfg, rng.choice(cfg.zones))
        if roll < 0.13:
            out.append(Command("zero", off, n))
        elif roll < 0.16:
            out.append(Command("zero-unmap", off, n))
        elif roll < 0.23 and discard:
            out.append(Command("discard", off, n))
        else:
            out.append(Command("write", off, n, rng.randrange(1, 256)))
    return out


@dataclass
class Model:
    """Expected guest bytes of the zones, and the state of the top image's clusters
    (allocated, zero cluster, or neither), which ``discard`` and ``write -z`` depend on."""

    cfg: Config
    zones: list[bytearray]
    data_clusters: set[int] = field(default_factory=set)
    zero_clusters: set[int] = field(default_factory=set)

    def _zone(self, offset: int, length: int) -> tuple[int, bytearray]:
        for (start, zlen), buf in zip(self.cfg.zones, self.zones, strict=True):
            if start <= offset and offset + length <= start + zlen:
                return start, buf
        raise AssertionError(f"[{offset}, +{length}) is in no zone")

    def copy(self) -> Model:
        return Model(
            self.cfg,
            [bytearray(z) for z in self.zones],
            set(self.data_clusters),
            set(self.zero_clusters),
        )

    def apply(self, cmd: Command) -> None:
        if cmd.kind == "flush":
            return
        cs = self.cfg.cluster_size
        start, buf = self._zone(cmd.offset, cmd.length)
        rel = cmd.offset - start
        end = cmd.offset + cmd.length
        first, last = cmd.offset // cs, (end - 1) // cs
        if cmd.kind == "write":
            buf[rel : rel + cmd.length] = bytes([cmd.pattern]) * cmd.length
            self.data_clusters.update(range(first, last + 1))
            self.zero_clusters.difference_update(range(first, last + 1))
        elif cmd.kind in ("zero", "zero-unmap"):
            buf[rel : rel + cmd.length] = bytes(cmd.length)
            # Whole unallocated clusters become zero clusters; a partial unallocated
            # cluster over backing data gets an allocating write of zeros; allocated
            # clusters are zeroed in place and zero clusters left alone.
            backing = self.cfg.backing_size or 0
            for c in range(first, last + 1):
                if c in self.data_clusters or c in self.zero_clusters:
                    continue
                lo, hi = max(cmd.offset, c * cs), min(end, (c + 1) * cs)
                if lo == c * cs and hi == (c + 1) * cs:
                    self.zero_clusters.add(c)
                elif lo < backing:
                    self.data_clusters.add(c)
        elif cmd.kind == "discard":
            c = -(-cmd.offset // cs)
            while (c + 1) * cs <= end:
                if c in self.data_clusters:
                    buf[c * cs - start : (c + 1) * cs - start] = bytes(cs)
                c += 1
        else:  # pragma: no cover
            raise AssertionError(cmd.kind)


def initial_model(cfg: Config, backing: list[bytes] | None) -> Model:
    """The guest bytes before any command: the backing file's, zeros past its end."""
    parts = backing or [b""] * len(cfg.zones)
    zones = [
        bytearray(part) + bytearray(length - len(part))
        for (_, length), part in zip(cfg.zones, parts, strict=True)
    ]
    return Model(cfg, zones)


# =====================================================================================
# Helpers
# =====================================================================================


def punch_supported(directory: Path) -> bool:
    """Whether FileStore.discard really punches holes here (else discard is a no-op
    and the scripts leave it out)."""
    path = directory / "punch-probe"

    async def probe() -> bool:
        store = FileStore.open(str(path), create=True)
        try:
            await store.write(0, b"\xff" * 16 * KiB)
            await store.discard(4 * KiB, 4 * KiB)
            return await store.read(4 * KiB, 4 * KiB) == bytes(4 * KiB)
        finally:
            await store.close()

    try:
        return asyncio.run(probe())
    finally:
        path.unlink(missing_ok=True)


def make_backing(cfg: Config, path: Path, rng: random.Random) -> list[bytes]:
    """A sparse raw file of ``cfg.backing_size`` bytes with random bytes in the zones
    (holes elsewhere); returns what it holds in each zone (shorter where it ends)."""
    assert cfg.backing_size is not None
    parts = []
    with open(path, "wb") as f:
        f.truncate(cfg.backing_size)
        for start, length in cfg.zones:
            data = rng.randbytes(max(0, min(length, cfg.backing_size - start)))
            f.seek(start)
            f.write(data)
            parts.append(data)
    return parts


LINE = re.compile(r"^(wrote|discard) (\d+)/(\d+) bytes at offset (\d+)$")


@dataclass
class KillResult:
    lines: list[str]
    partial_tail: str
    killed: bool
    returncode: int
    stderr: str
    elapsed: float


def run_and_kill(
    image: Path, script: list[Command], rng: random.Random, reporting: int
) -> KillResult:
    """Run ``qed io`` with ``script`` on ``image`` and SIGKILL it at a random moment
    (after a random number of reported lines, or a random delay after the first)."""
    argv = [sys.executable, "-m", "qedkit", "io", "-f", "qed"]
    for cmd in script:
        argv += ["-c", cmd.text]
    argv.append(str(image))
    by_lines = rng.random() < 0.6
    kill_after = rng.randint(1, max(1, reporting - 1))
    delay = rng.uniform(0.0, 0.15)
    errfile = image.with_suffix(".stderr")
    t0 = time.monotonic()
    with open(errfile, "w+b") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        sent = threading.Event()

        def kill() -> None:
            if not sent.is_set():
                sent.set()
                proc.send_signal(signal.SIGKILL)

        watchdog = threading.Timer(PROCESS_TIMEOUT, kill)
        watchdog.start()
        timer: threading.Timer | None = None
        raw_lines: list[bytes] = []
        try:
            for raw in iter(proc.stdout.readline, b""):
                raw_lines.append(raw)
                if not sent.is_set():
                    if by_lines and len(raw_lines) >= kill_after:
                        kill()
                    elif not by_lines and timer is None:
                        timer = threading.Timer(delay, kill)
                        timer.start()
            returncode = proc.wait()
        finally:
            watchdog.cancel()
            if timer is not None:
                timer.cancel()
            if proc.poll() is None:  # pragma: no cover - only on a test failure
                proc.kill()
                proc.wait()
            proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    elapsed = time.monotonic() - t0
    if elapsed >= PROCESS_TIMEOUT:
        pytest.fail(f"qed io took {elapsed:.0f} s: a hang (killed by the watchdog)")
    partial = ""
    if raw_lines and not raw_lines[-1].endswith(b"\n"):
        partial = raw_lines.pop().decode(errors="replace")
    lines = [r.decode().rstrip("\n") for r in raw_lines]
    return KillResult(lines, partial, returncode == -signal.SIGKILL, returncode, stderr, elapsed)


def mismatches(actual: bytes, old: bytes, new: bytes) -> Iterator[int]:
    """Offsets where ``actual`` is neither ``old`` nor ``new`` (checked in blocks,
    byte by byte only where a block matches neither)."""
    step = 4096
    for pos in range(0, len(actual), step):
        a = actual[pos : pos + step]
        o = old[pos : pos + step]
        if a == o or a == new[pos : pos + step]:
            continue
        n = new[pos : pos + step]
        for i, byte in enumerate(a):
            if byte != o[i] and byte != n[i]:
                yield pos + i


def check_json(result_stdout: str) -> dict[str, int]:
    data = json.loads(result_stdout)
    assert isinstance(data, dict)
    return data


# =====================================================================================
# The test
# =====================================================================================


@pytest.fixture(scope="module")
def can_punch(tmp_path_factory: pytest.TempPathFactory) -> bool:
    return punch_supported(tmp_path_factory.mktemp("punch"))


@dataclass
class Totals:
    runs: int = 0
    killed: int = 0
    in_flight: int = 0
    reported: int = 0
    checked: int = 0  # runs that got through every check


@pytest.fixture(scope="module")
def totals(request: pytest.FixtureRequest) -> Iterator[Totals]:
    """Counts over the module, printed as one line at the end (in the crash suite's
    terminal summary when tests/crash/conftest.py offers ``crash_summary``)."""
    report: Callable[[str], None]
    try:
        report = request.getfixturevalue("crash_summary")
    except pytest.FixtureLookupError:

        def report(line: str) -> None:
            print("\n" + line)

    t = Totals()
    yield t
    if t.runs:
        report(
            f"kill: {t.runs} qed io processes SIGKILLed ({t.killed} before they finished, "
            f"{t.in_flight} with a command in flight), {t.reported} commands reported "
            f"complete, {t.checked} runs intact and checked clean by qed and qemu-img"
        )


@pytest.mark.qemu
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_reported_write_survives_sigkill(
    cfg: Config, seed: int, tmp_path: Path, qemu: Qemu, can_punch: bool, totals: Totals
) -> None:
    rng = random.Random(f"kill-{cfg.name}-{seed}")
    image = tmp_path / "disk.qed"
    backing: list[bytes] | None = None
    create = ["create", "-q", "-f", "qed"]
    options = f"cluster_size={cfg.cluster_size},table_size={cfg.table_size}"
    if cfg.allocation != "end":
        options += f",allocation={cfg.allocation}"
    create += ["-o", options]
    if cfg.backing_size is not None:
        backing = make_backing(cfg, tmp_path / "base.raw", rng)
        create += ["-b", "base.raw", "-F", "raw"]
    qed(*create, image, str(cfg.size), check=True)

    script = make_script(rng, cfg, discard=can_punch)
    reporting = [c for c in script if c.reports]
    result = run_and_kill(image, script, rng, len(reporting))
    context = (
        f"seed {seed}, {cfg.name}: {len(result.lines)} of {len(reporting)} commands reported, "
        f"killed={result.killed}, rc={result.returncode}"
    )

    # ---- what completed ------------------------------------------------------------
    assert "Traceback" not in result.stderr, context + "\n" + result.stderr
    assert result.stderr == "", f"{context}: a command failed:\n{result.stderr}"
    if not result.killed:
        assert result.returncode == 0, context
        assert len(result.lines) == len(reporting), context
    assert len(result.lines) <= len(reporting), context
    for line, cmd in zip(result.lines, reporting, strict=False):
        assert LINE.match(line), f"{context}: unexpected output line {line!r}"
        assert line == cmd.expected_line, f"{context}: {line!r} for {cmd.text!r}"
    done = len(result.lines)
    in_flight = reporting[done] if result.killed and done < len(reporting) else None
    in_flight_text = in_flight.text if in_flight else "none"
    totals.runs += 1
    totals.killed += result.killed
    totals.in_flight += in_flight is not None
    totals.reported += done

    model = initial_model(cfg, backing)
    for cmd in reporting[:done]:
        model.apply(cmd)
    after = model
    if in_flight is not None:
        after = model.copy()
        after.apply(in_flight)

    # ---- reopen (repairing) and compare ----------------------------------------------
    with qedkit.open(str(image)) as img:
        for (start, length), old, new in zip(cfg.zones, model.zones, after.zones, strict=True):
            actual = img.read(start, length)
            bad = list(mismatches(actual, old, new))
            if bad:
                first = bad[0]
                expected = f"{old[first]:#x}"
                if new[first] != old[first]:
                    expected += f" or {new[first]:#x} (in flight: {in_flight_text})"
                pytest.fail(
                    f"{context}: {len(bad)} bytes lost or damaged after the kill, first at "
                    f"guest offset {start + first}: read {actual[first]:#x}, expected {expected}"
                )
        # Nothing outside the zones is allocated in the top image.
        cs = cfg.cluster_size
        allowed = [(s // cs * cs, -(-(s + n) // cs) * cs) for s, n in cfg.zones]
        for ext in img.block_status():
            if ext.kind is ExtentKind.UNALLOCATED:
                continue
            assert any(lo <= ext.start and ext.end <= hi for lo, hi in allowed), (
                f"{context}: {ext} lies outside every zone"
            )

    with open(image, "rb") as f:
        header = Header.unpack(f.read(64))
    assert not header.features & Feature.NEED_CHECK, f"{context}: NEED_CHECK left set by close"

    # ---- the checkers ----------------------------------------------------------------
    ours = qed("check", "--output=json", image)
    assert "Traceback" not in ours.stderr, ours.stderr
    report = check_json(ours.stdout)
    assert ours.returncode in (0, 3), f"{context}: qed check rc {ours.returncode}: {ours.stdout}"
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report

    theirs = qemu.img("check", "--output=json", image, check=False)
    qreport = check_json(theirs.stdout)
    assert theirs.returncode in (0, 3), f"{context}: qemu-img check: {theirs.stdout}"
    assert qreport.get("corruptions", 0) == 0 and qreport.get("check-errors", 0) == 0, qreport

    # ---- QEMU reads what we read ---------------------------------------------------------
    raw = tmp_path / "out.raw"
    qemu.img("convert", "-O", "raw", image, raw)
    with open(raw, "rb") as f, qedkit.open(str(image), readonly=True) as img:
        for start, length in cfg.zones:
            f.seek(start)
            assert f.read(length) == img.read(start, length), (
                f"{context}: QEMU reads other bytes than qedkit in [{start}, +{length})"
            )
    totals.checked += 1
