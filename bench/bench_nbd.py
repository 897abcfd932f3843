#!/usr/bin/env python3
"""Benchmark `qed serve` against `qemu-nbd -f qed` serving the same QED image to the
same NBD clients, and `qed check` against `qemu-img check`, in one run.

    /work/venv/bin/python bench/bench_nbd.py [--size 2G] [--runs 3] [--runtime 10]
                                             [--rows ROW[,ROW...]] [--alloc-size 256M]
                                             [--check-size 1T] [--check-clusters 1M]
                                             [--dir DIR] [--keep] [--json FILE]
                                             [--profile ROW[,ROW...]]
    /work/venv/bin/python bench/bench_nbd.py --pool run1.json run2.json ...

Rows (see bench/README.md for what each one measures):
  * whole-image sequential read:  nbdcopy export -> null:       (MB/s)
  * whole-image sequential write: nbdcopy raw file -> export     (MB/s)
  * fio's nbd engine, 4 KiB random read / write at iodepth 1 and 16, --runtime seconds
    each, time based                                             (IOPS)
  * fio's nbd engine, 4 KiB allocating writes at iodepth 1 and 16: every 4 KiB of a
    fresh (empty) image with 4 KiB clusters written once, in random order (IOPS)
  * `qed check` / `qemu-img check` of a synthetic 1 TiB image with 1M allocated
    clusters (seconds, and the peak RSS of each)

The NBD rows: both servers serve the same QED image with the same options: `-e 4`,
unix socket; qemu-nbd also `-t --cache=writeback --aio=threads` (its defaults, plus
persistent). For every measured step the server is started, the client runs, and the
server is stopped (SIGTERM, and waited for: both lock the image). Before each step
`sync` runs and the image (and for the write row the source) is read once, so that it
is in the page cache. The two sides alternate A B A B per row and run. The report
gives the medians and the ratio qed / qemu (higher is better), every run's ratio, the
median of the runs' ratios (the interleaved pairs pooled) and how many pairs qed won;
`--pool` prints the same for the runs of several earlier `--json` files together.

Only the standard library and qedkit are imported; it needs qemu-img, qemu-nbd, nbdcopy,
nbdinfo and fio (with the nbd engine) on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    MiB,
    allocated,
    busy_warning,
    bytecode_env,
    children_cpu,
    human,
    load_average,
    machine_info,
    new_buffer,
    parse_size,
    print_machine,
    print_table,
    qed_command,
    qed_python,
    remove,
    sh,
    sync,
    warm,
    work_dir,
)

IMAGE = "img.qed"
SOURCE = "src.raw"
ALLOC_IMAGE = "alloc.qed"  # fresh before every step of the allocating-write rows
CHECK_IMAGE = "check.qed"  # the synthetic 1 TiB image of the check row
# Allocating-write rows: an image with 4 KiB clusters, so that every 4 KiB write
# allocates exactly one cluster and copies nothing (with 64 KiB clusters each write
# would also write 60 KiB of zeros around it: a bandwidth row, not an allocation one).
ALLOC_CLUSTER = 4096
CHECK_CLUSTER = 64 * 1024  # qemu-img's default; a 1 TiB image then has 512 L2 tables
CHECK_TABLE = 4  # clusters per table (the default)
CHECK_SEED = 20260413
CHECK_RSS_GOAL = 64 * MiB  # peak RSS of `qed check` on the check image (issue goal)
SHARED = 4  # -e: clients allowed at once (both servers then advertise multi-conn)
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 120.0


# --------------------------------------------------------------------------- servers


class Server:
    """One NBD server process on a unix socket: start (wait until it greets), CPU time
    so far, stop (signal, wait for the exit: the next server cannot lock the image
    before)."""

    def __init__(
        self, label: str, cmd: list[str], sock: Path, log: Path, env: dict[str, str] | None
    ) -> None:
        self.label, self.cmd, self.sock, self.log, self.env = label, cmd, sock, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> None:
        remove(self.sock)
        with self.log.open("ab") as log:
            log.write(f"\n---- {time.strftime('%H:%M:%S')} {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"{self.label} exited ({self.proc.returncode}) before serving; "
                    f"its log:\n{self.log_tail()}"
                )
            if self._greets():
                break
            if time.monotonic() > deadline:
                self.kill()
                raise SystemExit(f"{self.label} did not accept on {self.sock} in time")
            time.sleep(0.02)
        # The probe connection counts against -e until the server has seen it close
        # (qed serve refuses connections beyond -e; nbdcopy opens 4 at once).
        time.sleep(0.2)

    def _greets(self) -> bool:
        """Connect and read the NBD greeting ("NBDMAGIC"), then hang up."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            try:
                s.connect(str(self.sock))
                return s.recv(8, socket.MSG_WAITALL) == b"NBDMAGIC"
            except OSError:
                return False

    def cpu(self) -> float:
        """User + system CPU seconds of the server process (all its threads) so far."""
        assert self.proc is not None
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        proc, self.proc = self.proc, None
        proc.send_signal(sig)
        try:
            rc = proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise SystemExit(f"{self.label} did not exit within {STOP_TIMEOUT:.0f} s") from None
        if rc not in (0, -sig):
            raise SystemExit(f"{self.label} exited with {rc}; its log:\n{self.log_tail()}")

    def kill(self) -> None:
        """Clean-up after an error: kill the process this object started, if running."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    key: str  # for --rows and --profile
    name: str
    unit: str  # "MB/s", "IOPS" or "s"
    client: list[str]  # the client command, with {uri} for the export
    kind: str = "fio"  # "copy" (nbdcopy), "fio", "alloc" (fio on a fresh image), "check"
    nbytes: int = 0  # bytes per copy (MB/s rows)
    writes: bool = False
    goal: float = 1.0  # of the ratio (qed ahead: >= 1.0)
    a: list[float] = field(default_factory=list)  # per run: MB/s, IOPS or seconds
    b: list[float] = field(default_factory=list)
    a_secs: list[float] = field(default_factory=list)  # client wall seconds
    b_secs: list[float] = field(default_factory=list)
    a_srv_cpu: list[float] = field(default_factory=list)  # server CPU seconds during it
    b_srv_cpu: list[float] = field(default_factory=list)
    a_cli_cpu: list[float] = field(default_factory=list)  # client CPU seconds
    b_cli_cpu: list[float] = field(default_factory=list)
    a_ios: list[int] = field(default_factory=list)  # fio: I/Os completed
    b_ios: list[int] = field(default_factory=list)
    a_rss: list[int] = field(default_factory=list)  # check: peak RSS of the command, bytes
    b_rss: list[int] = field(default_factory=list)

    @property
    def lower_is_better(self) -> bool:
        return self.unit == "s"

    @property
    def image(self) -> str:
        return {"alloc": ALLOC_IMAGE, "check": CHECK_IMAGE}.get(self.kind, IMAGE)

    def a_med(self) -> float:
        return statistics.median(self.a)

    def b_med(self) -> float:
        return statistics.median(self.b)

    def oriented(self, a: float, b: float) -> float:
        """qed's advantage: > 1 when qed is ahead, whichever way the unit points."""
        return a / b if self.lower_is_better else b / a

    def ratio(self) -> float:
        """The ratio of the two medians."""
        return self.oriented(self.a_med(), self.b_med())

    def pair_ratios(self) -> list[float]:
        """One ratio per interleaved pair (run), in run order."""
        return [self.oriented(a, b) for a, b in zip(self.a, self.b, strict=True)]

    def pooled(self) -> float:
        """The median of the pairs' ratios."""
        return statistics.median(self.pair_ratios())

    def won(self) -> int:
        return sum(r > 1.0 for r in self.pair_ratios())

    def met(self) -> bool:
        return self.ratio() >= self.goal and min(self.pair_ratios()) >= 1.0

    def cell(self, value: float) -> str:
        if self.unit == "s":
            return f"{value:.3f} s"
        return f"{value:,.0f} {self.unit}"

    def cpu_note(self, side: str) -> str:
        cli = statistics.median(getattr(self, side + "_cli_cpu"))
        if self.kind == "check":
            rss = max(getattr(self, side + "_rss"))
            return f"cpu {cli:.3f} s, peak RSS {human(rss)} (largest of the runs)"
        srv = statistics.median(getattr(self, side + "_srv_cpu"))
        ios = getattr(self, side + "_ios")
        per = ""
        if ios and statistics.median(ios) > 0:
            per = f" ({srv / statistics.median(ios) * 1e6:.1f} us/IO)"
        elif self.nbytes:
            per = f" ({srv / (self.nbytes / 1e9):.2f} s/GB)"
        return f"server cpu {srv:.2f} s{per}, client cpu {cli:.2f} s"

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out.update(
            a_median=self.a_med(),
            b_median=self.b_med(),
            ratio=self.ratio(),
            pair_ratios=self.pair_ratios(),
            pooled_ratio=self.pooled(),
            pairs_won=self.won(),
            met=self.met(),
        )
        if self.kind != "check":
            out.update(
                a_server_cpu_median=statistics.median(self.a_srv_cpu),
                b_server_cpu_median=statistics.median(self.b_srv_cpu),
            )
        return out


def fio_client(d: Path, name: str, rw: str, depth: int, runtime: int | None) -> list[str]:
    """fio's nbd engine, one job, 4 KiB; time based for ``runtime`` seconds, or (None)
    once over the whole export: fio's random map then writes every block once."""
    timing = [f"--runtime={runtime}", "--time_based"] if runtime else []
    return ["fio", f"--name={name}", "--ioengine=nbd", "--uri={uri}", f"--rw={rw}",
            "--bs=4k", f"--iodepth={depth}", "--numjobs=1", *timing,
            "--output-format=json", f"--output={d / 'fio.json'}"]  # fmt: skip


def make_rows(d: Path, size: int, runtime: int, alloc_size: int, check: CheckImage) -> list[Row]:
    src = str(d / SOURCE)
    gb = human(size).replace(".00 ", " ")
    rows = [
        Row("seq-read", f"seq read {gb}: nbdcopy export -> null:", "MB/s",
            ["nbdcopy", "{uri}", "null:"], kind="copy", nbytes=size),
        Row("seq-write", f"seq write {gb}: nbdcopy {SOURCE} -> export", "MB/s",
            ["nbdcopy", src, "{uri}"], kind="copy", nbytes=size, writes=True),
    ]  # fmt: skip
    for rw in ("randread", "randwrite"):
        for depth in (1, 16):
            rows.append(
                Row(
                    f"{rw}-qd{depth}",
                    f"fio 4 KiB {rw} QD{depth}, {runtime} s",
                    "IOPS",
                    fio_client(d, f"{rw}-qd{depth}", rw, depth, runtime),
                    writes=rw == "randwrite",
                )
            )
    alloc = human(alloc_size).replace(".00 ", " ")
    for depth in (1, 16):
        rows.append(
            Row(
                f"alloc-qd{depth}",
                f"fio 4 KiB allocating writes QD{depth}, all of a fresh {alloc}",
                "IOPS",
                fio_client(d, f"alloc-qd{depth}", "randwrite", depth, None),
                kind="alloc",
                writes=True,
                goal=2.0 if depth == 16 else 1.0,
            )
        )
    rows.append(
        Row(
            "check",
            f"check {check.describe()}",
            "s",
            ["check", str(d / CHECK_IMAGE)],  # after `qemu-img` or the qed command
            kind="check",
        )
    )
    return rows


def run_client(row: Row, server: Server) -> tuple[float, float, float, int]:
    """Run the row's client against the server: (throughput, wall s, client CPU s, IOs)."""
    cmd = [part.replace("{uri}", server.uri) for part in row.client]
    c0 = children_cpu()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    cli_cpu = children_cpu() - c0
    if p.returncode:
        raise SystemExit(
            f"client failed ({p.returncode}) against {server.label}: {' '.join(cmd)}\n"
            f"{p.stdout[-2000:]}{p.stderr[-2000:]}\nserver log:\n{server.log_tail()}"
        )
    if row.unit == "MB/s":
        return row.nbytes / secs / 1e6, secs, cli_cpu, 0
    out = Path(next(c.split("=", 1)[1] for c in cmd if c.startswith("--output=")))
    job = json.loads(out.read_text())["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"fio reported error {job['error']} against {server.label}")
    side = job["write" if row.writes else "read"]
    return float(side["iops"]), secs, cli_cpu, int(side["total_ios"])


GNU_TIME = "/usr/bin/time"  # GNU time (Debian package "time"): the check row's rusage


def run_measured(
    cmd: list[str], env: dict[str, str] | None, d: Path
) -> tuple[float, float, int, int, str]:
    """Run a command: (wall s, CPU s, peak RSS bytes, exit code, output). CPU and peak
    RSS come from GNU time, which forks the command from its own small process: a
    child forked from this one (large after building the check image) would count
    this process's resident pages in its peak RSS (Linux carries the high-water mark
    over fork and exec)."""
    usage = d / "rusage.txt"
    remove(usage)
    t0 = time.perf_counter()
    p = subprocess.run(
        [GNU_TIME, "-f", "%U %S %M", "-o", str(usage), *cmd],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    secs = time.perf_counter() - t0
    fields = usage.read_text().split()[-3:]
    cpu = float(fields[0]) + float(fields[1])
    return secs, cpu, int(fields[2]) * 1024, p.returncode, p.stdout.decode(errors="replace")


# --------------------------------------------------------------------------- the check image


@dataclass(frozen=True)
class CheckImage:
    """The check row's image: ``size`` bytes of guest disk with ``clusters`` data
    clusters allocated, appended at the end of the file in the order a guest wrote
    them, as QEMU allocates (one new table when a write first lands in its span).
    Layouts: ``scattered`` (the default, a worst case for a checker): single clusters
    at random guest offsets all over the disk, so every L2 table is there and full
    of scattered entries, 99.9% fragmented; ``extents``: runs of 1-1024 clusters
    (64 on average, a guest file system's extents) at random offsets, each written
    in order, the runs in random order. The data clusters are holes of a sparse
    file (a checker never reads data): only the tables take space (~128 MiB for
    1 TiB)."""

    size: int
    clusters: int
    layout: str = "scattered"
    seed: int = CHECK_SEED

    def describe(self) -> str:
        return (f"{human(self.size).replace('.00 ', ' ')}, {self.clusters:,} clusters "
                f"{self.layout}")  # fmt: skip

    def tag(self) -> str:
        return (f"{self.size}:{self.clusters}:{self.layout}:{self.seed}:{CHECK_CLUSTER}:"
                f"{CHECK_TABLE}:v1")  # fmt: skip

    def guest_clusters(self) -> list[int]:
        """The guest clusters in the order they are written."""
        import random

        rng = random.Random(self.seed)
        total = self.size // CHECK_CLUSTER
        if self.layout == "scattered":
            return rng.sample(range(total), self.clusters)
        taken = bytearray(total)
        out: list[int] = []
        while len(out) < self.clusters:
            length = min(self.clusters - len(out), int(rng.expovariate(1 / 64)) + 1, 1024)
            start = rng.randrange(0, total - length + 1)
            if any(taken[start : start + length]):
                continue
            taken[start : start + length] = b"\x01" * length
            out.extend(range(start, start + length))
        return out


def prepare_check(d: Path, image: CheckImage) -> dict[str, Any]:
    """Build check.qed (reused with --keep when built with the same parameters) and
    verify it: `qed check` clean with every cluster counted; `qemu-img check` with no
    corruption and no leak other than the ones its cluster count invents (QEMU divides
    the file size by cluster_size - 1, see DESIGN.md §2 "Check and repair": on a file of
    more than ~65535 clusters it reports about one phantom leak per 65535 clusters; no
    image this size can avoid them)."""
    path, tag_file = d / CHECK_IMAGE, d / (CHECK_IMAGE + ".tag")
    t0 = time.perf_counter()
    if path.exists() and tag_file.exists() and tag_file.read_text() == image.tag():
        print(f"reusing {path}")
    else:
        print(f"building {path}: {image.describe()} ...", flush=True)
        remove(path, tag_file)
        _build_check_image(path, image)
        tag_file.write_text(image.tag())
    file_size = path.stat().st_size
    cs = CHECK_CLUSTER
    phantom = (file_size + cs - 1) // cs * cs // (cs - 1) - (file_size + cs - 1) // cs
    p = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    out = p.stdout + p.stderr
    leaks = 0
    for line in out.splitlines():
        if "leaked clusters were found" in line:
            leaks = int(line.split()[0])
    if p.returncode not in (0, 3) or "corrupt" in out.lower() or leaks != phantom:
        raise SystemExit(
            f"qemu-img check of {path} (exit {p.returncode}): expected no corruption and "
            f"{phantom} phantom leaks:\n{out}"
        )
    print(f"  {path.name} ready in {time.perf_counter() - t0:.1f} s; file {human(file_size)}, "
          f"allocated {human(allocated(path))}; qemu-img check: no corruption, "
          f"{leaks} leaks = the {phantom} its cluster count invents")  # fmt: skip
    return {"file_size": file_size, "qemu_img_phantom_leaks": phantom, "qemu_img_check": out}


def _build_check_image(path: Path, image: CheckImage) -> None:
    """qemu-img makes the empty image; the tables are written here (the guest
    clusters of the layout, allocated at the end of the file in that order), the
    file is then extended over the data clusters without writing them (holes)."""
    from array import array

    cs = CHECK_CLUSTER
    sh(["qemu-img", "create", "-q", "-f", "qed", "-o",
        f"cluster_size={cs},table_size={CHECK_TABLE}", str(path), str(image.size)])  # fmt: skip
    fd = os.open(path, os.O_RDWR)
    try:
        header = os.pread(fd, 64, 0)
        l1_offset = int.from_bytes(header[40:48], "little")
        table_bytes = CHECK_TABLE * cs
        entries = table_bytes // 8
        end = -(-os.fstat(fd).st_size // cs) * cs
        l1 = array("Q", os.pread(fd, table_bytes, l1_offset))
        tables: dict[int, array[int]] = {}
        for guest in image.guest_clusters():
            index, entry = divmod(guest, entries)
            table = tables.get(index)
            if table is None:
                table = tables[index] = array("Q", bytes(table_bytes))
                l1[index] = end
                end += table_bytes
            table[entry] = end
            end += cs
        for index, table in tables.items():
            os.pwrite(fd, table.tobytes(), l1[index])
        os.pwrite(fd, l1.tobytes(), l1_offset)
        os.ftruncate(fd, end)
        os.fsync(fd)
    finally:
        os.close(fd)


def warm_tables(path: Path) -> None:
    """Read the check image's L1 and L2 tables once (not the data: holes of 64 GiB)."""
    from array import array

    fd = os.open(path, os.O_RDONLY)
    try:
        header = os.pread(fd, 64, 0)
        cs = int.from_bytes(header[4:8], "little")
        table_bytes = int.from_bytes(header[8:12], "little") * cs
        l1_offset = int.from_bytes(header[40:48], "little")
        l1 = array("Q", os.pread(fd, table_bytes, l1_offset))
        for offset in l1:
            if offset:
                os.pread(fd, table_bytes, offset)
    finally:
        os.close(fd)


def alloc_verified(path: Path, size: int) -> str:
    """After an allocating-write step: qemu-img check must find no corruption and
    every cluster allocated (fio wrote each 4 KiB block once)."""
    p = subprocess.run(
        ["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True
    )
    out = p.stdout + p.stderr
    if p.returncode not in (0, 3):  # 3: leaks (QEMU's phantom ones, see prepare_check)
        raise SystemExit(f"qemu-img check {path} exited {p.returncode}:\n{out}")
    info = json.loads(p.stdout)
    clusters = size // ALLOC_CLUSTER
    if info.get("corruptions", 0) or info.get("allocated-clusters") != clusters:
        raise SystemExit(f"{path} after the allocating writes: expected {clusters} clusters "
                         f"allocated and no corruption:\n{out}")  # fmt: skip
    return f"{clusters} clusters allocated, no corruption"


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--size", type=parse_size, default=parse_size("2G"), help="image size (default 2G)"
    )
    ap.add_argument("--runs", type=int, default=3, help="runs per server and row (default 3)")
    ap.add_argument(
        "--runtime", type=int, default=10, help="seconds per fio row and run (default 10)"
    )
    ap.add_argument(
        "--rows", metavar="ROW[,ROW]", help="only these rows (keys as for --profile, and "
        "alloc-qd1, alloc-qd16, check)"
    )  # fmt: skip
    ap.add_argument(
        "--alloc-size",
        type=parse_size,
        default=parse_size("256M"),
        help="size of the fresh image of the allocating-write rows (default 256M)",
    )
    ap.add_argument(
        "--check-size",
        type=parse_size,
        default=parse_size("1T"),
        help="guest size of the check row's image (default 1T)",
    )
    ap.add_argument(
        "--check-clusters",
        type=lambda t: parse_size(t, 1),
        default=1 << 20,
        help="data clusters allocated in it (default 1M = 1048576)",
    )
    ap.add_argument(
        "--check-layout",
        choices=("scattered", "extents"),
        default="scattered",
        help="where those clusters are (default scattered: single clusters all over)",
    )
    ap.add_argument(
        "--dir", type=Path, help="work directory (default: a new temp dir under /var/tmp)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory's files")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--qed", metavar="CMD", help="qed command (default: the venv's qed script)")
    ap.add_argument(
        "--anchor-qed",
        metavar="CMD",
        help="side A is this qed's serve instead of qemu-nbd (two versions of qedkit "
        'side by side in one run, e.g. --anchor-qed "env PYTHONPATH=OLD python -m qedkit")',
    )
    ap.add_argument(
        "--serve-args",
        default="",
        metavar="ARGS",
        help="more options for qed serve, e.g. --serve-args='--busy-poll 64'",
    )
    ap.add_argument(
        "--profile",
        metavar="ROW[,ROW]",
        help="after the runs, run these rows (keys: seq-read, seq-write, randread-qd1, "
        "randread-qd16, randwrite-qd1, randwrite-qd16, alloc-qd1, alloc-qd16) once more "
        "against qed serve under cProfile and print the top functions by tottime; "
        "--runs 0 skips the timing",
    )
    ap.add_argument(
        "--pool",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="run nothing: report the runs of these --json files together (every "
        "run's ratio, the median of all of them, pairs won)",
    )
    args = ap.parse_args()
    if args.pool:
        return pool(args.pool)
    if args.runs < 0 or (args.runs == 0 and not args.profile):
        ap.error("--runs must be >= 1 (or 0 with --profile)")
    if args.runtime < 1:
        ap.error("--runtime must be >= 1")
    if args.alloc_size % ALLOC_CLUSTER:
        ap.error("--alloc-size must be a multiple of 4 KiB")
    if not 0 < args.check_clusters <= args.check_size // CHECK_CLUSTER:
        ap.error("--check-clusters must be between 1 and --check-size / 64 KiB")
    for tool in ("qemu-img", "qemu-nbd", "nbdcopy", "nbdinfo", "fio", GNU_TIME):
        if not shutil.which(tool):
            ap.error(f"{tool} not found")

    files = (IMAGE, SOURCE, ALLOC_IMAGE, CHECK_IMAGE, CHECK_IMAGE + ".tag", "fio.json",
             "prof.out", "qemu-nbd.log", "qed.log", "qed-a.log", "rusage.txt")  # fmt: skip
    with work_dir(args.dir, "qedkit-nbd-", keep=args.keep, files=files) as d:
        if len(str(d / "qed.sock")) > 100:
            ap.error(f"work directory path too long for a unix socket: {d}")
        return bench(args, d)


def prepare(d: Path, size: int) -> None:
    """src.raw: `size` bytes of random data (kept with --keep and reused when the size
    matches); img.qed: converted from it by qemu-img every time (the write rows modify
    it), so every cluster is allocated, in order."""
    src, img = d / SOURCE, d / IMAGE
    t0 = time.perf_counter()
    if src.exists() and src.stat().st_size == size and allocated(src) >= size:
        print(f"reusing {src}")
    else:
        print(f"writing {human(size)} of random data to {src} ...", flush=True)
        remove(src)
        fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for off in range(0, size, MiB):
                os.pwrite(fd, os.urandom(MiB), off)
        finally:
            os.close(fd)
    remove(img)
    sh(["qemu-img", "convert", "-f", "raw", "-O", "qed", str(src), str(img)])
    sync()
    print(f"  image ready in {time.perf_counter() - t0:.1f} s", flush=True)


def fresh_alloc_image(path: Path, size: int) -> None:
    remove(path)
    sh(["qemu-img", "create", "-q", "-f", "qed", "-o", f"cluster_size={ALLOC_CLUSTER}",
        str(path), str(size)])  # fmt: skip


def bench(args: argparse.Namespace, d: Path) -> int:
    size, runtime = args.size, args.runtime
    qed = qed_command(args.qed)
    anchor = qed_command(args.anchor_qed) if args.anchor_qed else None
    qed_env, bytecode = bytecode_env(d)
    python = qed_python(qed)
    uv = subprocess.run(
        [python, "-c", "import uvloop; print(uvloop.__version__)"],
        capture_output=True,
        text=True,
        env=qed_env,
    )
    uvloop = f"uvloop {uv.stdout.strip()}" if uv.returncode == 0 else "not installed (asyncio)"
    machine = machine_info(
        {
            "qemu_img": ["qemu-img", "--version"],
            "qemu_nbd": ["qemu-nbd", "--version"],
            "nbdcopy": ["nbdcopy", "--version"],
            "fio": ["fio", "--version"],
        }
    )
    machine["uvloop"] = uvloop
    busy_warning(machine["load_at_start"])
    check_image = CheckImage(args.check_size, args.check_clusters, args.check_layout)
    rows = make_rows(d, size, runtime, args.alloc_size, check_image)
    if args.rows:
        wanted = [k.strip() for k in args.rows.split(",")]
        unknown = set(wanted) - {r.key for r in rows}
        if unknown:
            raise SystemExit(f"--rows: no row {sorted(unknown)} (rows: "
                             f"{', '.join(r.key for r in rows)})")  # fmt: skip
        rows = [r for r in rows if r.key in wanted]
    kinds = {r.kind for r in rows} | ({"fio"} if args.profile else set())
    img, src, alloc_img = d / IMAGE, d / SOURCE, d / ALLOC_IMAGE
    check_info: dict[str, Any] = {}
    if kinds & {"copy", "fio"}:
        prepare(d, size)
    if "check" in kinds:
        check_info = prepare_check(d, check_image)
    sock = d / "nbd.sock"

    def servers_for(image: Path) -> dict[str, Server]:
        qemu_cmd = ["qemu-nbd", "-f", "qed", "-k", str(sock), "-e", str(SHARED), "-t",
                    "--cache=writeback", "--aio=threads", str(image)]  # fmt: skip
        qed_cmd = [*qed, "serve", "--socket", str(sock), "-e", str(SHARED),
                   *args.serve_args.split(), str(image)]  # fmt: skip
        if anchor is not None:
            anchor_cmd = [*anchor, "serve", "--socket", str(sock), "-e", str(SHARED), str(image)]
            return {
                "a": Server("qed serve (A)", anchor_cmd, sock, d / "qed-a.log", qed_env),
                "b": Server("qed serve", qed_cmd, sock, d / "qed.log", qed_env),
            }
        return {
            "a": Server("qemu-nbd", qemu_cmd, sock, d / "qemu-nbd.log", None),
            "b": Server("qed serve", qed_cmd, sock, d / "qed.log", qed_env),
        }

    servers = {IMAGE: servers_for(img), ALLOC_IMAGE: servers_for(alloc_img)}
    buf = new_buffer(MiB)

    # ---- verification, untimed (doubles as a warm-up) ------------------------------
    exports: dict[str, dict[str, Any]] = {}
    if kinds & {"copy", "fio"}:
        print("verifying both exports (untimed): nbdinfo, qemu-img compare with the source ...")
        for side, server in servers[IMAGE].items():
            server.start()
            try:
                info = json.loads(
                    sh(["nbdinfo", "--json", "--no-content", server.uri], capture=True)
                )
                sh(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(src), server.uri])
            finally:
                server.stop()
            ex = info["exports"][0]
            exports[side] = {k: v for k, v in ex.items() if k.startswith(("can_", "block_size"))}
            exports[side]["contexts"] = ex.get("contexts", [])
            if ex["export-size"] != size:
                raise SystemExit(f"{server.label} exports {ex['export-size']} bytes, not {size}")
        multi = ", ".join(
            f"{s.label} {exports[k]['can_multi_conn']}" for k, s in servers[IMAGE].items()
        )
        print(f"  both exports have the source's contents; multi-conn: {multi}")
    alloc_checks: list[str] = []

    def step(row: Row, side: str) -> None:
        if row.kind == "check":
            check_step(row, side)
            return
        server = servers[row.image][side]
        sync()  # write-back of the previous step's data must not compete with this one
        if row.kind == "alloc":
            fresh_alloc_image(alloc_img, args.alloc_size)
            sync()
        else:
            warm(img, buf)
        if row.writes and row.kind == "copy":
            warm(src, buf)
        server.start()
        try:
            c0 = server.cpu()
            value, secs, cli_cpu, ios = run_client(row, server)
            srv_cpu = server.cpu() - c0
        finally:
            server.stop()
        if row.kind == "alloc":
            if ios != args.alloc_size // ALLOC_CLUSTER:
                raise SystemExit(f"{row.key}: fio did {ios} writes, not one per 4 KiB block")
            alloc_checks.append(f"{server.label}: {alloc_verified(alloc_img, args.alloc_size)}")
        getattr(row, side).append(value)
        getattr(row, side + "_secs").append(secs)
        getattr(row, side + "_srv_cpu").append(srv_cpu)
        getattr(row, side + "_cli_cpu").append(cli_cpu)
        if row.unit == "IOPS":
            getattr(row, side + "_ios").append(ios)

    def check_step(row: Row, side: str) -> None:
        if side == "a":
            cmd, env, expect = ["qemu-img", *row.client], None, 0
            if check_info["qemu_img_phantom_leaks"]:
                expect = 3  # leaks only: the phantom ones (prepare_check)
        else:
            cmd, env, expect = [*qed, *row.client], qed_env, 0
        warm_tables(d / CHECK_IMAGE)
        secs, cpu, rss, rc, out = run_measured(cmd, env, d)
        if rc != expect:
            raise SystemExit(f"{' '.join(cmd)} exited {rc}, not {expect}:\n{out}")
        getattr(row, side).append(secs)
        getattr(row, side + "_secs").append(secs)
        getattr(row, side + "_cli_cpu").append(cpu)
        getattr(row, side + "_rss").append(rss)

    try:
        if args.runs:
            print(f"timing {args.runs} runs, interleaved (qemu then qed, per row) ...")
        for i in range(args.runs):
            for row in rows:
                step(row, "a")
                step(row, "b")
            print(
                f"  run {i + 1}/{args.runs}: "
                + "  ".join(f"{r.key} {r.pair_ratios()[-1]:.2f}" for r in rows),
                flush=True,
            )
        machine["load_at_end"] = load_average()
        profiles = profile(args, d, rows, servers, python, qed_env, buf)
    finally:
        for pair in servers.values():
            for server in pair.values():
                server.kill()
        buf.close()

    # ---- final check --------------------------------------------------------------
    check = ""
    if kinds & {"copy", "fio"}:
        check = sh(["qemu-img", "check", "-f", "qed", str(img)], capture=True).strip()
        print(f"\nqemu-img check after all rows: {check.splitlines()[0] if check else 'clean'}")
    if alloc_checks:
        print(f"allocating-write images, qemu-img check after every step: "
              f"{'; '.join(sorted(set(alloc_checks)))}")  # fmt: skip
    if not args.runs:
        return 0

    # ---- report -------------------------------------------------------------------
    print()
    print_machine(machine, ["qemu_img"])
    print(f"tools    {machine['qemu_nbd']}; {machine['nbdcopy']}; {machine['fio']}")
    if anchor is not None:
        print(f"side A   {' '.join(anchor)} serve (--anchor-qed: in place of qemu-nbd)")
    print(f"qed      {' '.join(qed)} (python {python}; event loop: {uvloop}); {bytecode}")
    if kinds & {"copy", "fio"}:
        print(
            f"image    {img.name}: {human(size)} QED, every cluster allocated in order "
            f"(qemu-img convert of {SOURCE}, {human(size)} of random data); "
            f"file {human(img.stat().st_size)}, allocated {human(allocated(img))}"
        )
    if "alloc" in kinds:
        print(
            f"alloc    {alloc_img.name}: a fresh {human(args.alloc_size)} QED with 4 KiB "
            "clusters before every step (qemu-img create); fio writes every 4 KiB block "
            "once in random order, so every write allocates one cluster"
        )
    if "check" in kinds:
        print(
            f"check    {CHECK_IMAGE}: {check_image.describe()} (see CheckImage), "
            f"allocated at the end in the order written; file "
            f"{human(check_info['file_size'])}, data clusters are holes; tables read once "
            f"before every step (cached); `qemu-img check` vs `{' '.join(qed)} check`"
        )
    sides = servers[IMAGE]
    print(f"A        {' '.join(sides['a'].cmd)}")
    print(f"B        {' '.join(sides['b'].cmd)}")
    if exports:
        print(
            f"exports  multi-conn {exports['a']['can_multi_conn']}/"
            f"{exports['b']['can_multi_conn']}, min block "
            f"{exports['a'].get('block_size_minimum')}/"
            f"{exports['b'].get('block_size_minimum')} (qemu-nbd/qed)"
        )
    print(
        f"runs     {args.runs}, A/B interleaved per row; before every step: sync, "
        f"image read once (page cache warm; seq write: source too), server started and "
        f"waited for; after it: SIGTERM + wait for exit (outside the timing). nbdcopy rows "
        f"time the whole nbdcopy (defaults: multi-conn, min(4, nproc) connections x 64 "
        f"requests x 256 KiB, no --flush); fio rows report fio's IOPS over --runtime "
        f"{runtime} s (1 job, 1 connection; allocating rows: once over the image)"
    )
    print()
    report(rows)

    if args.json:
        doc = {
            "machine": machine,
            "size": size,
            "runs": args.runs,
            "runtime": runtime,
            "alloc_size": args.alloc_size,
            "check_image": {"size": check_image.size, "clusters": check_image.clusters,
                            **{k: v for k, v in check_info.items() if k != "qemu_img_check"}},
            "qed_command": qed,
            "qed_python": python,
            "event_loop": uvloop,
            "qed_bytecode": bytecode,
            "server_commands": {"qemu-nbd": sides["a"].cmd, "qed serve": sides["b"].cmd},
            "exports": {"qemu-nbd": exports.get("a"), "qed serve": exports.get("b")},
            "image_check": check,
            "rows": [r.as_json() for r in rows],
            "profiles": profiles,
        }  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def report(rows: list[Row]) -> None:
    """The medians table, every run's ratio with the pooled median and pairs won, and
    each side's spread and CPU."""
    header = ("row", "qemu (A)", "qed (B)", "ratio", "goal", "met")
    table = [
        (
            r.name,
            r.cell(r.a_med()),
            r.cell(r.b_med()),
            f"{r.ratio():.2f}",
            f">= {r.goal:.1f}, every run >= 1.0",
            "yes" if r.met() else "NO",
        )
        for r in rows
    ]
    print_table(header, table)
    print()
    print("ratio = qed / qemu throughput (MB/s = 10^6 bytes/s, IOPS), or qemu-img time / qed")
    print("time for the check row: higher is better for qed; ratio of the two medians")
    print()
    runs = max(len(r.a) for r in rows)
    header2 = ("row", *(f"run {i + 1}" for i in range(runs)), "pooled median", "pairs won")
    table2 = []
    for r in rows:
        ratios = r.pair_ratios()
        cells = [f"{x:.2f}" if x >= 1.0 else f"{x:.2f} <" for x in ratios]
        cells += [""] * (runs - len(cells))
        table2.append((r.key, *cells, f"{r.pooled():.2f}", f"{r.won()}/{len(ratios)}"))
    print("every run's ratio (its interleaved pair; '<' marks a pair qed lost), the median")
    print("of those ratios, and how many pairs qed won:")
    print_table(header2, table2)
    print()
    print("spread (min-max per side) and median CPU seconds during the client run:")
    for r in rows:
        print(f"  {r.name}")
        for side, label in (("a", "qemu     "), ("b", "qed      ")):
            vals = getattr(r, side)
            print(f"    {label} {r.cell(min(vals))}-{r.cell(max(vals))}; {r.cpu_note(side)}")
        if r.kind == "check":
            rss = max(r.b_rss)
            verdict = "under" if rss < CHECK_RSS_GOAL else "NOT under"
            print(f"    qed's peak RSS {human(rss)}: {verdict} the {human(CHECK_RSS_GOAL)} goal")


def pool(paths: list[Path]) -> int:
    """--pool: the rows of several --json files, their runs together."""
    merged: dict[str, Row] = {}
    for path in paths:
        doc = json.loads(path.read_text())
        for data in doc["rows"]:
            known = {k: v for k, v in data.items() if k in Row.__dataclass_fields__}
            row = merged.get(data["key"])
            if row is None:
                merged[data["key"]] = Row(**known)
                continue
            for name, value in known.items():
                if isinstance(value, list) and name != "client":
                    getattr(row, name).extend(value)
    print(f"pooled: {', '.join(str(p) for p in paths)}")
    report(list(merged.values()))
    return 0


def profile(
    args: argparse.Namespace,
    d: Path,
    rows: list[Row],
    servers: dict[str, dict[str, Server]],
    python: str,
    env: dict[str, str],
    buf: Any,
) -> dict[str, str]:
    """--profile: each named row once more, `qed serve` under cProfile (stopped with
    SIGINT, which dumps the profile); print the top 25 functions by tottime."""
    import io
    import pstats

    if not args.profile:
        return {}
    by_key = {r.key: r for r in rows if r.kind != "check"}
    out: dict[str, str] = {}
    prof = d / "prof.out"
    for key in args.profile.split(","):
        row = by_key.get(key.strip())
        if row is None:
            raise SystemExit(f"--profile: no row {key!r} (rows: {', '.join(by_key)})")
        qed_server = servers[row.image]["b"]
        cmd = [python, "-m", "cProfile", "-o", str(prof), "-m", "qedkit",
               *qed_server.cmd[qed_server.cmd.index("serve"):]]  # fmt: skip
        server = Server("qed serve (cProfile)", cmd, qed_server.sock, d / "qed.log", env)
        remove(prof)
        sync()
        if row.kind == "alloc":
            fresh_alloc_image(d / ALLOC_IMAGE, args.alloc_size)
        else:
            warm(d / IMAGE, buf)
        if row.writes and row.kind == "copy":
            warm(d / SOURCE, buf)
        server.start()
        try:
            value = run_client(row, server)[0]
        finally:
            server.stop(signal.SIGINT)
        text = io.StringIO()
        stats = pstats.Stats(str(prof), stream=text)
        stats.sort_stats("tottime").print_stats(25)
        report_text = text.getvalue()
        out[row.key] = f"{row.cell(value)} under cProfile\n{report_text}"
        print(f"\n---- profile of qed serve, {row.name}: {row.cell(value)} under cProfile")
        start = report_text.find("   ncalls")
        print(report_text[start:] if start >= 0 else report_text)
    return out


if __name__ == "__main__":
    sys.exit(main())
