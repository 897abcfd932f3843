#!/usr/bin/env python3
"""Benchmark defragmentation: what a QEMU-fragmented QED image costs, what `qed defrag`
gives back, and what online defragmentation costs a client while it runs, in one run.

    /work/venv/bin/python bench/bench_defrag.py [--size 2G] [--runs 3] [--dir DIR]
                                                [--keep] [--json FILE]
                                                [--latency-runs 1] [--runtime 10]
                                                [--modes batch=16 batch=256 ...]

1. Images (untimed, reused with --keep): `src.raw` (--size bytes of seeded random
   data); `frag.qed` made by QEMU itself: `qemu-img create -f qed`, then one `qemu-io`
   writing every 64 KiB cluster in a shuffled order (commands on its stdin), so QEMU
   allocates the clusters in that order, then `qemu-img convert -n` puts src.raw's data
   into the allocated clusters in place; `defrag.qed`: a copy of frag.qed defragmented
   with `qed defrag --output=json` (timed: MB/s moved, seconds, clusters moved).
2. Sequential read of the whole guest disk, fragmented vs defragmented vs raw, the
   three interleaved per run, medians over --runs, three ways:
     a. library: qedkit.open + readinto 1 MiB vs os.preadv of the raw file (cached);
     b. NBD: `qed serve -r` (`-f raw` for the raw file) + `nbdcopy URI null:` (cached);
     c. direct I/O: `qemu-img bench -t none -s 1M -S 1M -d 1 -c size/1M`.
4. Sparse disks (--sparse-size, default 4G, with --sparse-data of data, default 1G, in
   runs of 64 KiB to 8 MiB at seeded random places): `sparse.raw`; `sparse-frag.qed`
   (qemu-io writes every data cluster once in a shuffled order, then `qemu-img convert
   -n --target-is-zero` fills in the data); `qed defrag` of a copy (packed layout).
   Rows: file sizes (apparent, allocated) against a `qed convert` of the raw file,
   qemu-img check's exit code, the direct-I/O sequential read of the whole disk
   (`qemu-img bench -t none`, fragmented / defragmented / raw interleaved, medians;
   goal defragmented >= 0.95x raw), and what a sequential fill of new clusters does to
   extents per run afterwards (qemu-io writes 1 MiB pieces front to back into the
   largest gap, and past the last data), in the packed and in the identity layout.
3. Client latency under online defragmentation: a fresh copy of frag.qed served by
   `qed serve --control`; fio (nbd engine, 4 KiB randread / randwrite, QD1, --runtime
   s) with no job, then while `job-start type=defrag` runs with each --modes argument
   set; p50/p99/p99.9 latency, IOPS and the job's MB/s moved during the fio run. After
   every cell: qemu-img check, and for read cells qemu-img compare with src.raw.

See bench/README.md. Only the standard library and qedkit are imported; it needs
qemu-img, qemu-io, nbdcopy and fio (with the nbd engine) on PATH.
"""

from __future__ import annotations

import argparse
import itertools
import json
import mmap
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
from _common import (
    MiB,
    allocated,
    busy_warning,
    bytecode_env,
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
    sync,
    warm,
    work_dir,
)
from bench_convert import read_api, read_raw
from bench_nbd import Server

from qedkit.cli.ctl import ControlClient
from qedkit.errors import QedError

CLUSTER = 64 * 1024  # QED cluster size of the fragmented image (qemu-img's default too)
SEED = 20240611
LAYOUT_VERSION = 1  # bump when the way the images are built changes
SRC, FRAG, DEFRAG, ONLINE = "src.raw", "frag.qed", "defrag.qed", "online.qed"
KINDS = ("fragmented", "defragmented", "raw")
DEFAULT_MODES = ("batch=16", "batch=256", "batch=256,rate=50M")
JOB_WAIT = 120.0  # seconds to wait for a cancelled job to stop
ENV: dict[str, str] | None = None  # environment of the qed subprocesses (bytecode cache)


def sh(cmd: list[str], *, capture: bool = False) -> str:
    return _common.sh(cmd, capture=capture, env=ENV)


# --------------------------------------------------------------------------- images


def build_raw(path: Path, size: int, seed: int) -> None:
    """Seeded pseudo-random data, fast: a random 1 MiB block rotated by a random offset
    per 1 MiB, each 64 KiB cluster stamped with its guest offset, so that no two
    clusters are alike (a cluster read from the wrong place shows in a compare)."""
    rng = random.Random(seed)
    base = rng.randbytes(MiB)
    remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, size, MiB):
            k = rng.randrange(1, MiB)
            block = bytearray(base[k:] + base[:k])
            for c in range(0, MiB, CLUSTER):
                block[c : c + 16] = (off + c).to_bytes(8, "little") + seed.to_bytes(8, "little")
            os.pwrite(fd, block, off)
    finally:
        os.close(fd)


def build_frag(path: Path, src: Path, size: int, seed: int) -> None:
    """QEMU allocates QED clusters at the end of the file in the order of first writes:
    write every cluster once in a shuffled order (one qemu-io, commands on stdin,
    -t unsafe: no flush per allocating write), then fill the allocated clusters with
    src's data in place (qemu-img convert -n: overwrites do not move clusters)."""
    remove(path)
    sh(["qemu-img", "create", "-q", "-f", "qed", "-o", f"cluster_size={CLUSTER}",
        str(path), str(size)])  # fmt: skip
    order = list(range(size // CLUSTER))
    random.Random(seed + 1).shuffle(order)
    script = "".join(f"write -q -P {g % 255 + 1} {g * CLUSTER} {CLUSTER}\n" for g in order)
    p = subprocess.run(
        ["qemu-io", "-t", "unsafe", "-f", "qed", str(path)],
        input=script.encode(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if p.returncode or p.stderr.strip():
        raise SystemExit(f"qemu-io failed ({p.returncode}): {p.stderr.decode(errors='replace')}")
    sh(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qed", str(src), str(path)])


def prepare(d: Path, size: int, seed: int, rebuild: bool) -> None:
    stamp = d / "images.json"
    params = {"size": size, "seed": seed, "layout": LAYOUT_VERSION}
    if (
        not rebuild
        and stamp.exists()
        and (d / SRC).exists()
        and (d / FRAG).exists()
        and json.loads(stamp.read_text()) == params
    ):
        print(f"reusing {SRC} and {FRAG} in {d} (same size/seed; --rebuild to rebuild)")
        return
    remove(stamp)
    t0 = time.perf_counter()
    print(f"building {SRC} ({human(size)}, seed {seed}) ...", flush=True)
    build_raw(d / SRC, size, seed)
    print(f"building {FRAG}: qemu-io writes {size // CLUSTER} clusters shuffled ...", flush=True)
    build_frag(d / FRAG, d / SRC, size, seed)
    sync()
    stamp.write_text(json.dumps(params))
    print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)


def copy_file(src: Path, dst: Path) -> None:
    remove(dst)
    shutil.copyfile(src, dst)


def frag_report(qed: list[str], path: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(sh([*qed, "frag", "--output=json", str(path)], capture=True))
    return out


def host_extents(path: Path) -> int | None:
    """ext4 extents of the file (filefrag), if filefrag is installed."""
    if not shutil.which("filefrag"):
        return None
    p = subprocess.run(["filefrag", str(path)], capture_output=True, text=True)
    m = re.search(r"(\d+) extents? found", p.stdout)
    return int(m.group(1)) if m else None


def qemu_check(path: Path) -> tuple[int, str]:
    """qemu-img check: (exit code, summary). 0 clean, 2 corruptions, 3 leaks only."""
    p = subprocess.run(
        ["qemu-img", "check", "-f", "qed", str(path)], capture_output=True, text=True
    )
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.strip()]
    notes = [x for x in lines if "rror" in x or "leak" in x.lower()]
    first = notes[0] if notes else (lines[0] if lines else "")
    return p.returncode, first.strip()


def compare(src: Path, image: Path) -> None:
    sh(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qed", str(src), str(image)])


def offline_defrag(qed: list[str], d: Path) -> dict[str, Any]:
    """Copy frag.qed to defrag.qed, sync, read it once (cached), time `qed defrag`."""
    frag, out = d / FRAG, d / DEFRAG
    copy_file(frag, out)
    sync()
    buf = new_buffer(MiB)
    warm(out, buf)
    buf.close()
    t0 = time.perf_counter()
    stdout = sh([*qed, "defrag", "--output=json", str(out)], capture=True)
    wall = time.perf_counter() - t0
    stats: dict[str, Any] = json.loads(stdout)
    stats["wall-seconds"] = round(wall, 3)
    return stats


# --------------------------------------------------------------------------- section 2


@dataclass
class ReadRow:
    way: str  # "api", "nbd", "direct"
    label: str
    size: int
    secs: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def med(self, kind: str) -> float:
        return statistics.median(self.secs[kind])

    def mbs(self, kind: str) -> float:
        return self.size / self.med(kind) / 1e6

    def ratio(self, kind: str) -> float:
        return self.mbs(kind) / self.mbs("raw")

    def as_json(self) -> dict[str, Any]:
        return {
            "way": self.way,
            "label": self.label,
            "seconds": self.secs,
            "median_seconds": {k: self.med(k) for k in KINDS},
            "mb_s": {k: self.mbs(k) for k in KINDS},
            "defragmented_over_raw": self.ratio("defragmented"),
            "fragmented_over_raw": self.ratio("fragmented"),
        }


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def qemu_bench(path: Path, fmt: str, size: int) -> float:
    """`qemu-img bench` O_DIRECT sequential read of the whole disk; its own seconds."""
    out = sh(
        ["qemu-img", "bench", "-f", fmt, "-t", "none", "-s", "1M", "-S", "1M", "-d", "1",
         "-c", str(size // MiB), str(path)],
        capture=True,
    )  # fmt: skip
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise SystemExit(f"cannot parse qemu-img bench output:\n{out}")
    return float(m.group(1))


# --------------------------------------------------------------------------- section 3


def parse_mode(text: str) -> dict[str, Any]:
    """'batch=256,rate=50M,idle=5' -> job-start arguments (rate in bytes/s, binary
    suffixes; idle in ms; batch in clusters)."""
    args: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in ("batch", "rate", "idle"):
            raise argparse.ArgumentTypeError(f"bad mode {text!r}: use batch=N,rate=SIZE,idle=MS")
        args[key] = parse_size(value, 1) if key == "rate" else int(value)
    return args


@dataclass
class LatCell:
    rw: str  # randread / randwrite
    mode: str  # "none" or the --modes text
    job_args: dict[str, Any] | None
    p50: list[float] = field(default_factory=list)  # microseconds, per run
    p99: list[float] = field(default_factory=list)
    p999: list[float] = field(default_factory=list)
    iops: list[float] = field(default_factory=list)
    moved_mbs: list[float] = field(default_factory=list)  # job MB/s during the fio run
    moved_pct: list[float] = field(default_factory=list)  # % of misplaced clusters moved
    job_status: list[str] = field(default_factory=list)
    job_result: list[Any] = field(default_factory=list)
    frag_after: list[float] = field(default_factory=list)  # fragmented-percent after
    check: list[str] = field(default_factory=list)
    compared: list[bool] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "no defrag" if self.job_args is None else f"defrag {self.mode}"

    def med(self, name: str) -> float:
        values = getattr(self, name)
        return statistics.median(values) if values else float("nan")


def fio_cmd(uri: str, rw: str, runtime: int, out: Path) -> list[str]:
    return [
        "fio", f"--name={rw}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
        "--iodepth=1", "--numjobs=1", f"--runtime={runtime}", "--time_based",
        "--lat_percentiles=1", "--output-format=json", f"--output={out}",
    ]  # fmt: skip


def fio_latency(out: Path, rw: str) -> tuple[float, float, float, float]:
    """(p50, p99, p99.9 in microseconds, IOPS) of total latency (lat_ns, submission +
    completion), from fio's JSON."""
    job = json.loads(out.read_text())["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"fio reported error {job['error']}")
    side = job["read" if rw == "randread" else "write"]
    lat = side.get("lat_ns") or side["clat_ns"]
    pct = lat["percentile"]
    return (
        pct["50.000000"] / 1000,
        pct["99.000000"] / 1000,
        pct["99.900000"] / 1000,
        float(side["iops"]),
    )


def connect_control(path: Path, server: Server) -> ControlClient:
    deadline = time.monotonic() + 30
    while True:
        try:
            return ControlClient(str(path))
        except QedError:
            if time.monotonic() > deadline:
                raise SystemExit(f"no control socket at {path}:\n{server.log_tail()}") from None
            time.sleep(0.05)


def job_info(client: ControlClient, job_id: str) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = client.execute("query-jobs")
    return next(j for j in jobs if j["id"] == job_id)


def latency_cell(cell: LatCell, d: Path, qed: list[str], runtime: int, buf: mmap.mmap) -> None:
    img, sock, ctl, out = d / ONLINE, d / "online.sock", d / "ctl.sock", d / "fio.json"
    copy_file(d / FRAG, img)
    sync()
    warm(img, buf)
    server = Server(
        "qed serve --control",
        [*qed, "serve", "--socket", str(sock), "--control", str(ctl), "-e", "4", str(img)],
        sock,
        d / "online.log",
        ENV,
    )
    server.start()
    status, result = "-", None
    try:
        client = connect_control(ctl, server)
        try:
            t_job = time.perf_counter()
            job_id = None
            if cell.job_args is not None:
                job_id = client.execute("job-start", {"type": "defrag", **cell.job_args})["id"]
            p = subprocess.run(
                fio_cmd(server.uri, cell.rw, runtime, out),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
            )
            if p.returncode:
                raise SystemExit(f"fio failed: {p.stdout[-2000:]}{p.stderr[-2000:]}")
            if job_id is not None:
                info = job_info(client, job_id)
                elapsed = time.perf_counter() - t_job
                status = info["status"]
                if status in ("concluded", "failed", "cancelled"):
                    result = info["result"]
                    mbs = float(result["mb-per-second"]) if result else 0.0
                    pct = 100.0
                else:
                    # Still running: its rate over the fio run, from the progress
                    # (clusters moved, evictions included, capped at the number of
                    # misplaced clusters), then cancel it (it stops between rounds).
                    cur, total = info["current-progress"], max(1, info["total-progress"])
                    mbs = cur * CLUSTER / elapsed / 1e6
                    pct = 100.0 * cur / total
                    status = "running (cancelled after fio)"
                    client.execute("job-cancel", {"id": job_id})
                    deadline = time.monotonic() + JOB_WAIT
                    while job_info(client, job_id)["status"] not in ("cancelled", "concluded",
                                                                      "failed"):  # fmt: skip
                        if time.monotonic() > deadline:
                            raise SystemExit("the defrag job did not stop after job-cancel")
                        time.sleep(0.05)
                cell.moved_mbs.append(mbs)
                cell.moved_pct.append(pct)
            image = client.execute("query-image", {})
            cell.frag_after.append(float(image.get("fragmented-percent", float("nan"))))
        finally:
            client.close()
    finally:
        server.stop()
    p50, p99, p999, iops = fio_latency(out, cell.rw)
    cell.p50.append(p50)
    cell.p99.append(p99)
    cell.p999.append(p999)
    cell.iops.append(iops)
    cell.job_status.append(status)
    cell.job_result.append(result)
    rc, summary = qemu_check(img)
    if rc not in (0, 3):
        raise SystemExit(
            f"qemu-img check of {img} failed ({rc}) after {cell.rw} {cell.label}: {summary}"
        )
    cell.check.append("clean" if rc == 0 else f"leaks only: {summary}")
    if cell.rw == "randread":
        compare(d / SRC, img)  # exits on a difference
        cell.compared.append(True)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"),
                    help="virtual size (default 2G)")  # fmt: skip
    ap.add_argument("--runs", type=int, default=3,
                    help="interleaved runs of the sequential read rows (default 3)")  # fmt: skip
    ap.add_argument("--latency-runs", type=int, default=1,
                    help="runs of the fio latency cells (default 1; 0 skips them)")  # fmt: skip
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio cell (default 10)")
    ap.add_argument(
        "--modes",
        nargs="+",
        type=str,
        default=list(DEFAULT_MODES),
        metavar="MODE",
        help="job-start arguments of the online defrag cells, e.g. 'batch=256,rate=50M' "
        f"(default: {' '.join(DEFAULT_MODES)})",
    )
    ap.add_argument("--sparse-size", type=lambda t: 0 if t == "0" else parse_size(t),
                    default=parse_size("4G"),
                    help="size of the sparse section's disk (default 4G; 0 skips it)")  # fmt: skip
    ap.add_argument("--sparse-data", type=parse_size, default=parse_size("1G"),
                    help="data in the sparse disk (default 1G)")  # fmt: skip
    ap.add_argument("--only-sparse", action="store_true",
                    help="run only the sparse section (section 4)")  # fmt: skip
    ap.add_argument("--dir", type=Path,
                    help="work directory (default: a new temp dir under /var/tmp)")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the work directory's files")
    ap.add_argument("--rebuild", action="store_true",
                    help="rebuild images kept from an earlier run")  # fmt: skip
    ap.add_argument("--seed", type=int, default=SEED, help=f"data/layout seed (default {SEED})")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--qed", metavar="CMD", help="qed command (default: the venv's qed script)")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.latency_runs < 0 or args.runtime < 1:
        ap.error("--latency-runs must be >= 0 and --runtime >= 1")
    if args.size % CLUSTER:
        ap.error("--size must be a multiple of 64 KiB")
    try:
        args.mode_args = [parse_mode(m) for m in args.modes]
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    for tool in ("qemu-img", "qemu-io", "nbdcopy", "fio"):
        if not shutil.which(tool):
            ap.error(f"{tool} not found")

    files = (SRC, FRAG, DEFRAG, ONLINE, "images.json", "fio.json", "serve.log", "online.log",
             *SPARSE_FILES)  # fmt: skip
    with work_dir(args.dir, "qedkit-defrag-", keep=args.keep, files=files) as d:
        if len(str(d / "online.sock")) > 100:
            ap.error(f"work directory path too long for a unix socket: {d}")
        if args.only_sparse:
            busy_warning(load_average())
            return sparse_section(args, d, qed_command(args.qed))
        code = bench(args, d)
        if code == 0 and args.sparse_size:
            code = sparse_section(args, d, qed_command(args.qed))
        return code


def bench(args: argparse.Namespace, d: Path) -> int:
    global ENV
    size = args.size
    qed = qed_command(args.qed)
    ENV, bytecode = bytecode_env(d)
    python = qed_python(qed)
    machine = machine_info(
        {
            "qemu_img": ["qemu-img", "--version"],
            "nbdcopy": ["nbdcopy", "--version"],
            "fio": ["fio", "--version"],
        }
    )
    busy_warning(machine["load_at_start"])
    t_start = time.perf_counter()
    prepare(d, size, args.seed, args.rebuild)
    src, frag, dfr = d / SRC, d / FRAG, d / DEFRAG

    # ---- 1. offline defrag (timed once) + verification -----------------------------
    print("checking the fragmented image (untimed): qemu-img check, compare ...", flush=True)
    rc, summary = qemu_check(frag)
    if rc:
        raise SystemExit(f"qemu-img check of {frag}: {summary}")
    compare(src, frag)
    frag_info = frag_report(qed, frag)
    print("defragmenting a copy: qed defrag --output=json defrag.qed (timed) ...", flush=True)
    stats = offline_defrag(qed, d)
    rc, summary = qemu_check(dfr)
    if rc:
        raise SystemExit(f"qemu-img check of {dfr} after qed defrag ({rc}): {summary}")
    compare(src, dfr)
    dfr_info = frag_report(qed, dfr)
    print(
        f"  moved {stats['clusters-moved']} clusters ({human(stats['bytes-moved'])}) in "
        f"{stats['seconds']} s = {stats['mb-per-second']} MB/s; check clean, data identical",
        flush=True,
    )
    files: dict[str, dict[str, Any]] = {
        p.name: {
            "apparent": p.stat().st_size,
            "allocated": allocated(p),
            "host_extents": host_extents(p),
        }
        for p in (src, frag, dfr)
    }

    # ---- 2. sequential reads ----------------------------------------------------------
    gb = human(size).replace(".00 ", " ")
    rows = [
        ReadRow("api", "library: qedkit readinto 1 MiB (raw: os.preadv), cached", size),
        ReadRow("nbd", "NBD: qed serve -r + nbdcopy -> null:, cached", size),
        ReadRow("direct", "direct I/O: qemu-img bench -t none -s 1M -d 1", size),
    ]
    paths = {"fragmented": frag, "defragmented": dfr, "raw": src}
    fmts = {"fragmented": "qed", "defragmented": "qed", "raw": "raw"}
    sock = d / "nbd.sock"
    servers = {
        kind: Server(
            f"qed serve ({kind})",
            [*qed, "serve", "--socket", str(sock), "-r", "-e", "4",
             *(["-f", "raw"] if fmts[kind] == "raw" else []), str(paths[kind])],
            sock, d / "serve.log", ENV,
        )
        for kind in KINDS
    }  # fmt: skip
    buf = new_buffer(MiB)

    # untimed: the API and the NBD export read the same bytes as the raw file
    print("verifying reads (untimed): qemu-img compare src.raw with each export ...", flush=True)
    for kind in KINDS:
        servers[kind].start()
        try:
            sh(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(src), servers[kind].uri])
        finally:
            servers[kind].stop()

    def api_step(kind: str) -> float:
        path = paths[kind]
        warm(path, buf)
        if kind == "raw":
            return timed(lambda: read_raw(path, buf, size))
        return timed(lambda: read_api(path, buf, size))

    def nbd_step(kind: str) -> float:
        server = servers[kind]
        warm(paths[kind], buf)
        server.start()
        try:
            t0 = time.perf_counter()
            p = subprocess.run(
                ["nbdcopy", server.uri, "null:"], stdin=subprocess.DEVNULL, capture_output=True
            )
            secs = time.perf_counter() - t0
        finally:
            server.stop()
        if p.returncode:
            raise SystemExit(f"nbdcopy failed: {p.stderr.decode(errors='replace')}")
        return secs

    def direct_step(kind: str) -> float:
        return qemu_bench(paths[kind], fmts[kind], size)

    steps = {"api": api_step, "nbd": nbd_step, "direct": direct_step}
    print(f"timing {args.runs} runs of the reads, interleaved (order rotated per run) ...")
    for i in range(args.runs):
        order = KINDS[i % 3 :] + KINDS[: i % 3]  # rotated per run: no fixed position
        for row in rows:
            for kind in order:
                row.secs[kind].append(steps[row.way](kind))
        print(
            f"  run {i + 1}/{args.runs} MB/s (frag/defrag/raw): "
            + "  ".join(
                f"{r.way} " + "/".join(f"{size / r.secs[k][-1] / 1e6:.0f}" for k in KINDS)
                for r in rows
            ),
            flush=True,
        )

    # ---- 3. latency under online defrag ----------------------------------------------
    cells: list[LatCell] = []
    for rw in ("randread", "randwrite"):
        cells.append(LatCell(rw, "none", None))
        for text, job_args in zip(args.modes, args.mode_args, strict=True):
            cells.append(LatCell(rw, text, job_args))
    if args.latency_runs:
        print(
            f"timing {args.latency_runs} run(s) of fio 4 KiB QD1 x {len(cells)} cells, "
            f"{args.runtime} s each, each on a fresh copy of {FRAG} ...",
            flush=True,
        )
    for i in range(args.latency_runs):
        for cell in cells:
            latency_cell(cell, d, qed, args.runtime, buf)
            mb = f", job {cell.moved_mbs[-1]:.1f} MB/s" if cell.moved_mbs else ""
            print(
                f"  run {i + 1} {cell.rw} {cell.label}: p50 {cell.p50[-1]:.0f} us "
                f"p99 {cell.p99[-1]:.0f} us, {cell.iops[-1]:,.0f} IOPS{mb}; {cell.check[-1]}",
                flush=True,
            )
    buf.close()
    machine["load_at_end"] = load_average()
    total_secs = time.perf_counter() - t_start

    # ---- report ---------------------------------------------------------------------
    print()
    print_machine(machine, ["qemu_img"])
    print(f"tools    {machine['nbdcopy']}; {machine['fio']}")
    print(f"qed      {' '.join(qed)} (python {python}); {bytecode}")
    print(
        f"images   {gb} virtual, {CLUSTER // 1024} KiB clusters, seed {args.seed}: {SRC} "
        f"(seeded random data); {FRAG}: qemu-io wrote every cluster once in shuffled "
        f"order, then qemu-img convert -n filled in {SRC}'s data; {DEFRAG}: copy + qed defrag"
    )
    for name, info in (("fragmented", frag_info), ("defragmented", dfr_info)):
        print(
            f"         {name:13} fragmented-percent {info['fragmented-percent']}, "
            f"away-from-home {info['away-from-home-percent']}%, "
            f"host extents (QED) {info['host-extents']}"
        )
    for name, f in files.items():
        ext = f", ext4 extents {f['host_extents']}" if f["host_extents"] is not None else ""
        print(
            f"         {name:13} file {human(f['apparent']):>10}, allocated "
            f"{human(f['allocated']):>10}{ext}"
        )
    print(
        f"defrag   qed defrag --output=json (cached copy, once): {stats['clusters-moved']} "
        f"clusters / {human(stats['bytes-moved'])} moved ({stats['bytes-moved'] / size:.2f}x "
        f"the disk), {stats['tables-moved']} L2 tables, {stats['rounds']} rounds, "
        f"{stats['seconds']} s = {stats['mb-per-second']} MB/s moved "
        f"(process wall {stats['wall-seconds']} s); truncated {human(stats['truncated-bytes'])}"
    )
    print(
        f"runs     reads: {args.runs}, fragmented/defragmented/raw interleaved per way (order "
        f"rotated per run), medians; "
        f"library and NBD rows cached (file read once right before), NBD timed around nbdcopy "
        f"only (server start/stop outside); direct rows O_DIRECT (qemu-img bench's own time)"
    )
    print()
    header = ("sequential read " + gb, "fragmented", "defragmented", "raw",
              "defrag/raw", "goal", "met", "frag/raw")  # fmt: skip
    table = []
    for r in rows:
        met = r.ratio("defragmented") >= 0.95
        table.append(
            (
                r.label,
                *(f"{r.mbs(k):,.0f} MB/s" for k in KINDS),
                f"{r.ratio('defragmented'):.2f}",
                ">= 0.95",
                "yes" if met else "NO",
                f"{r.ratio('fragmented'):.2f}",
            )
        )
    print_table(header, table)
    print()
    print("MB/s = 10^6 bytes of guest disk per second (median); spread (min-max MB/s):")
    for r in rows:
        spread = "; ".join(
            f"{k} {size / max(r.secs[k]) / 1e6:,.0f}-{size / min(r.secs[k]) / 1e6:,.0f}"
            for k in KINDS
        )
        print(f"  {r.way:6} {spread}")

    if args.latency_runs:
        print()
        print(
            f"latency  fio --ioengine=nbd --bs=4k --iodepth=1 --runtime={args.runtime} "
            f"--time_based, one connection to `qed serve --control C -e 4 {ONLINE}` (a fresh "
            f"copy of {FRAG} per cell, read once before); total latency (lat_ns); "
            f"{args.latency_runs} run(s), medians; job started right before fio, cancelled "
            "after it if still running"
        )
        print()
        lat_header = ("fio 4 KiB QD1", "p50 us", "p99 us", "p99.9 us", "IOPS", "p99/none",
                  "job MB/s moved", "moved", "frag% after", "check")  # fmt: skip
        lat_table = []
        for rw in ("randread", "randwrite"):
            base = next(c for c in cells if c.rw == rw and c.job_args is None)
            for c in (c for c in cells if c.rw == rw):
                lat_table.append(
                    (
                        f"{rw}, {c.label}",
                        f"{c.med('p50'):.0f}",
                        f"{c.med('p99'):.0f}",
                        f"{c.med('p999'):.0f}",
                        f"{c.med('iops'):,.0f}",
                        f"{c.med('p99') / base.med('p99'):.2f}",
                        "-" if c.job_args is None else f"{c.med('moved_mbs'):.1f}",
                        "-" if c.job_args is None else f"{c.med('moved_pct'):.0f}%",
                        f"{c.med('frag_after'):.1f}",
                        "clean" if all(x == "clean" for x in c.check) else "; ".join(c.check),
                    )
                )
        print_table(lat_header, lat_table)
        print()
        print(
            "job MB/s moved = clusters moved (query-jobs current-progress) x 64 KiB / time "
            "from job-start to the end of fio, or the result's mb-per-second if it finished; "
            "moved = share of the misplaced clusters; frag% after = query-image "
            "fragmented-percent when the cell ended; check = qemu-img check (randread cells "
            f"also: qemu-img compare with {SRC}: identical)"
        )
        states = sorted({s for c in cells for s in c.job_status if s != "-"})
        print(f"job states at the end of fio: {', '.join(states) or '-'}")
    print(f"\ntotal benchmark time {total_secs:.0f} s")

    if args.json:
        doc = {
            "machine": machine,
            "size": size,
            "seed": args.seed,
            "cluster_size": CLUSTER,
            "runs": args.runs,
            "latency_runs": args.latency_runs,
            "runtime": args.runtime,
            "qed_command": qed,
            "qed_bytecode": bytecode,
            "files": files,
            "frag_report": {"fragmented": frag_info, "defragmented": dfr_info},
            "offline_defrag": stats,
            "reads": [r.as_json() for r in rows],
            "latency": [{**c.__dict__, "label": c.label} for c in cells]
            if args.latency_runs
            else [],
            "total_seconds": total_secs,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


# --------------------------------------------------------------------------- section 4

SPARSE_FILES = ("sparse.raw", "sparse-frag.qed", "sparse-defrag.qed", "sparse-conv.qed",
                "sparse-fill.qed", "sparse-identity.qed")  # fmt: skip


def sparse_runs(size: int, data: int, seed: int) -> list[tuple[int, int]]:
    """(first cluster, count) of the data runs: 1 to 128 clusters each (64 KiB to
    8 MiB), at seeded random places, until ``data`` bytes; sorted, not touching."""
    rng = random.Random(seed)
    total = size // CLUSTER
    want = data // CLUSTER
    taken = bytearray(total)
    runs: list[tuple[int, int]] = []
    have = 0
    while have < want:
        n = min(rng.randint(1, 128), want - have)
        start = rng.randrange(total - n)
        if any(taken[max(0, start - 1) : start + n + 1]):
            continue
        taken[start : start + n] = b"\x01" * n
        runs.append((start, n))
        have += n
    return sorted(runs)


def build_sparse(d: Path, size: int, data: int, seed: int) -> list[tuple[int, int]]:
    raw, frag = d / "sparse.raw", d / "sparse-frag.qed"
    runs = sparse_runs(size, data, seed)
    rng = random.Random(seed + 2)
    base = rng.randbytes(MiB)
    remove(raw, frag)
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for start, n in runs:
            for c in range(start, start + n):
                k = rng.randrange(MiB - CLUSTER)
                block = bytearray(base[k : k + CLUSTER])
                block[:16] = (c * CLUSTER).to_bytes(8, "little") + seed.to_bytes(8, "little")
                os.pwrite(fd, block, c * CLUSTER)
    finally:
        os.close(fd)
    sh(["qemu-img", "create", "-q", "-f", "qed", "-o", f"cluster_size={CLUSTER}",
        str(frag), str(size)])  # fmt: skip
    order = [c for start, n in runs for c in range(start, start + n)]
    random.Random(seed + 3).shuffle(order)
    script = "".join(f"write -q -P {c % 255 + 1} {c * CLUSTER} {CLUSTER}\n" for c in order)
    p = subprocess.run(
        ["qemu-io", "-t", "unsafe", "-f", "qed", str(frag)],
        input=script.encode(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if p.returncode or p.stderr.strip():
        raise SystemExit(f"qemu-io failed: {p.stderr.decode(errors='replace')}")
    sh(["qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", "-O", "qed",
        str(raw), str(frag)])  # fmt: skip
    sync()
    return runs


def fill_extents(qed: list[str], image: Path, ranges: list[tuple[int, int]]) -> dict[str, Any]:
    """`qed io` (the engine, so the image's allocation policy applies: QEMU would clear
    the home allocation bit) writes each [start, end) front to back in 1 MiB pieces;
    then qed frag."""
    commands: list[str] = []
    for start, end in ranges:
        for off in range(start, end, MiB):
            commands += ["-c", f"write -P 0x5a {off} {min(MiB, end - off)}"]
    sh([*qed, "io", *commands, str(image)], capture=True)
    return frag_report(qed, image)


def sparse_section(args: argparse.Namespace, d: Path, qed: list[str]) -> int:
    size, data = args.sparse_size, args.sparse_data
    print(f"sparse: building a {human(size)} disk with {human(data)} of data ...", flush=True)
    runs = build_sparse(d, size, data, args.seed)
    raw, frag = d / "sparse.raw", d / "sparse-frag.qed"
    dfr, conv = d / "sparse-defrag.qed", d / "sparse-conv.qed"
    compare(raw, frag)
    remove(conv)
    sh([*qed, "convert", "-f", "raw", "-O", "qed", str(raw), str(conv)])
    copy_file(frag, dfr)
    sync()
    t0 = time.perf_counter()
    stats = json.loads(sh([*qed, "defrag", "--output=json", str(dfr)], capture=True))
    wall = time.perf_counter() - t0
    compare(raw, dfr)
    rc_frag, _ = qemu_check(frag)
    rc_dfr, summary = qemu_check(dfr)
    info = {k: frag_report(qed, p) for k, p in (("fragmented", frag), ("defragmented", dfr))}
    paths = {"fragmented": frag, "defragmented": dfr, "raw": raw}
    fmts = {"fragmented": "qed", "defragmented": "qed", "raw": "raw"}
    secs: dict[str, list[float]] = {k: [] for k in KINDS}
    print(f"sparse: {args.runs} runs of the direct-I/O read, interleaved ...", flush=True)
    for i in range(args.runs):
        for kind in KINDS[i % 3 :] + KINDS[: i % 3]:
            secs[kind].append(qemu_bench(paths[kind], fmts[kind], size))
    med = {k: statistics.median(v) for k, v in secs.items()}
    # Follow-up sequential fills: into the largest gap, and past the last data.
    gaps = [(a + n, b) for (a, n), (b, _) in itertools.pairwise(runs)]
    g0, g1 = max(gaps, key=lambda g: g[1] - g[0])
    fill = min(128 * MiB, (g1 - g0) * CLUSTER // 2)
    last = (runs[-1][0] + runs[-1][1]) * CLUSTER
    tail = min(64 * MiB, size - last)
    ranges = [(g0 * CLUSTER, g0 * CLUSTER + fill), (last, last + tail)]
    fills = {}
    for layout, name in (("packed", "sparse-fill.qed"), ("identity", "sparse-identity.qed")):
        image = d / name
        copy_file(frag, image)
        sh([*qed, "defrag", "-q", "--layout", layout, str(image)])
        fills[layout] = fill_extents(qed, image, ranges)
        fills[layout]["file"] = image.stat().st_size
        fills[layout]["check"] = qemu_check(image)[0]
    print()
    print(
        f"sparse   {human(size)} disk, {human(data)} of data in {len(runs)} runs of 64 KiB to "
        f"8 MiB; sparse-frag.qed written by qemu-io in shuffled cluster order; qed defrag "
        f"(packed): {stats['clusters-moved']} clusters moved in {wall:.1f} s, "
        f"qemu-img check exit {rc_dfr} ({summary or 'clean'}; fragmented image: {rc_frag})"
    )
    print()
    print_table(
        ("file", "apparent", "allocated", "vs qed convert"),
        [
            (p.name, human(p.stat().st_size), human(allocated(p)),
             f"{p.stat().st_size / conv.stat().st_size:.3f}x")
            for p in (raw, frag, dfr, conv)
        ],
    )  # fmt: skip
    print()
    ratio = (size / med["defragmented"]) / (size / med["raw"])
    print_table(
        ("direct-I/O sequential read " + human(size), *KINDS, "defrag/raw", "goal", "met"),
        [(
            "qemu-img bench -t none -s 1M -S 1M -d 1",
            *(f"{size / med[k] / 1e6:,.0f} MB/s" for k in KINDS),
            f"{ratio:.2f}", ">= 0.95", "yes" if ratio >= 0.95 else "NO",
        )],
    )  # fmt: skip
    print()
    print(
        f"after a sequential fill of {human(fill)} into the largest gap and {human(tail)} "
        f"past the last data (qed io, 1 MiB writes, front to back):"
    )
    print_table(
        ("layout", "runs", "host extents", "max extents/run", "mean", "file", "qemu-img check"),
        [
            (layout, str(f["runs"]), str(f["host-extents"]), str(f["max-extents-per-run"]),
             f"{f['mean-extents-per-run']:.2f}", human(f["file"]), str(f["check"]))
            for layout, f in fills.items()
        ],
    )  # fmt: skip
    before = info["defragmented"]
    print(
        f"(before the fill: {before['runs']} runs, {before['host-extents']} extents; "
        f"fragmented image: {info['fragmented']['host-extents']} extents)"
    )
    return 0 if rc_dfr == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
