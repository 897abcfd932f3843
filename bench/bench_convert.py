#!/usr/bin/env python3
"""Benchmark qedkit against qemu-img on the same data, in one run.

    /work/venv/bin/python bench/bench_convert.py [--size 2G] [--runs 5] [--dir DIR]
                                                 [--keep] [--json FILE] [--seed N]

Rows (see bench/README.md for what each one measures):
  * convert raw->qed and qed->raw: `qemu-img convert` vs `qed convert`, both without a
    flush (qemu-img's default cache mode "unsafe", which `qed convert` mirrors);
  * sequential read through the API (qedkit.open + readinto, 1 MiB chunks) vs os.preadv
    of the raw file, on the mixed image and on a fully allocated one;
  * CLI start-up (`--version`), for context only.

Every measurement alternates the two sides (A B A B ...), one pair per run, and the
table shows medians. Before each timed step the previous outputs are deleted, `sync`
runs (pending write-back from the previous step would otherwise slow this one down), and
the source is read once so that it is in the page cache ("cached source").

Only the standard library and qedkit are imported.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common
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
    remove,
    sync,
    warm,
    work_dir,
)

import qedkit

ENV: dict[str, str] | None = None  # environment of every subprocess (see bytecode_env)
_last_cpu = 0.0  # CPU seconds (user + sys) of the last timed_cmd / timed read
BLOCK = MiB  # unit of the source layout and of the API reads
SEED = 20240601
SOURCES = ("src.raw", "src.qed", "full.raw", "full.qed")
LAYOUT_VERSION = 1  # bump when the source layout changes (invalidates reused sources)

# Source layout: share of 1 MiB blocks of each kind (the rest are holes).
P_DATA = 0.68  # random data (a rotated random block, stamped with its index)
P_ZERO = 0.07  # written zeros (allocated in the raw file, all zero)
P_HEAD4K = 0.03  # first 4 KiB random data, the rest a hole
P_ZERO_4K = 0.02  # written zeros with one 4 KiB piece of data at a random 4 KiB offset


# --------------------------------------------------------------------------- helpers


def sh(cmd: list[str], *, capture: bool = False) -> str:
    """Run a command (untimed, in ENV); raise with its stderr on failure."""
    return _common.sh(cmd, capture=capture, env=ENV)


def timed_cmd(cmd: list[str]) -> float:
    """Wall-clock seconds of one command (including process start-up); its CPU time
    (user + sys, less sensitive to other load than wall time) goes to _last_cpu."""
    global _last_cpu
    c0 = children_cpu()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    dt = time.perf_counter() - t0
    _last_cpu = children_cpu() - c0
    if p.returncode:
        raise SystemExit(
            f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr.decode(errors='replace')}"
        )
    return dt


# --------------------------------------------------------------------------- sources


def build_raw(path: Path, size: int, seed: int, *, full: bool) -> dict[str, int]:
    """Write the deterministic raw source; returns how many blocks of each kind."""
    rng = random.Random(seed)
    base = rng.randbytes(BLOCK)
    zero_block = bytes(BLOCK)
    counts = {"data": 0, "zero": 0, "head4k": 0, "zero+4k": 0, "hole": 0}

    def data_block(index: int) -> bytes:
        k = rng.randrange(1, BLOCK)  # rotate so that blocks differ
        rotated = base[k:] + base[:k]
        return index.to_bytes(8, "little") + rotated[8:]  # stamped: no two blocks alike

    remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for i in range(size // BLOCK):
            off = i * BLOCK
            r = 0.0 if full else rng.random()
            if r < P_DATA:
                os.pwrite(fd, data_block(i), off)
                counts["data"] += 1
            elif r < P_DATA + P_ZERO:
                os.pwrite(fd, zero_block, off)
                counts["zero"] += 1
            elif r < P_DATA + P_ZERO + P_HEAD4K:
                os.pwrite(fd, data_block(i)[:4096], off)
                counts["head4k"] += 1
            elif r < P_DATA + P_ZERO + P_HEAD4K + P_ZERO_4K:
                os.pwrite(fd, zero_block, off)
                piece = rng.randrange(BLOCK // 4096) * 4096
                os.pwrite(fd, data_block(i)[:4096], off + piece)
                counts["zero+4k"] += 1
            else:
                counts["hole"] += 1
    finally:
        os.close(fd)
    return counts


def prepare_sources(d: Path, size: int, seed: int, rebuild: bool) -> dict[str, Any]:
    """src.raw / src.qed (mixed) and full.raw / full.qed (no holes); reused from an
    earlier --keep run with the same parameters unless --rebuild."""
    stamp = d / "sources.json"
    params = {"size": size, "seed": seed, "layout": LAYOUT_VERSION}
    if not rebuild and stamp.exists() and all((d / n).exists() for n in SOURCES):
        info: dict[str, Any] = json.loads(stamp.read_text())
        if info.get("params") == params:
            print(f"reusing sources in {d} (same size/seed; --rebuild to rebuild)")
            return info
    remove(stamp)
    t0 = time.perf_counter()
    print(f"building sources in {d} ...", flush=True)
    counts = build_raw(d / "src.raw", size, seed, full=False)
    build_raw(d / "full.raw", size, seed + 1, full=True)
    sh(["qemu-img", "convert", "-f", "raw", "-O", "qed", str(d / "src.raw"), str(d / "src.qed")])
    sh(["qemu-img", "convert", "-f", "raw", "-O", "qed", str(d / "full.raw"), str(d / "full.qed")])
    sync()
    info = {"params": params, "blocks": counts}
    stamp.write_text(json.dumps(info))
    print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    return info


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    name: str
    kind: str  # "time" (ratio = B/A, lower is better) or "read" (ratio = thr B / thr A)
    a_label: str
    b_label: str
    goal: str  # "<= 1.0", ">= 0.9" or "-" (informational)
    nbytes: int = 0  # bytes per run, for MB/s of read rows
    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    a_cpu: list[float] = field(default_factory=list)  # user + sys seconds per sample
    b_cpu: list[float] = field(default_factory=list)

    def add(self, side: str, secs: float) -> None:
        getattr(self, side).append(secs)
        getattr(self, side + "_cpu").append(_last_cpu)

    @property
    def a_med(self) -> float:
        return statistics.median(self.a)

    @property
    def b_med(self) -> float:
        return statistics.median(self.b)

    @property
    def ratio(self) -> float:
        # convert: qed time / qemu-img time; read: qed throughput / raw throughput
        return self.b_med / self.a_med if self.kind == "time" else self.a_med / self.b_med

    @property
    def met(self) -> bool | None:
        if self.goal.startswith("<="):
            return self.ratio <= float(self.goal[2:])
        if self.goal.startswith(">="):
            return self.ratio >= float(self.goal[2:])
        return None

    def cell(self, secs: float) -> str:
        if self.kind == "read":
            return f"{secs:.3f} s {self.nbytes / secs / 1e6:6.0f} MB/s"
        return f"{secs:.3f} s"

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            a_median=self.a_med,
            b_median=self.b_med,
            ratio=self.ratio,
            met=self.met,
            a_cpu_median=statistics.median(self.a_cpu),
            b_cpu_median=statistics.median(self.b_cpu),
        )
        if self.kind == "read":
            out.update(a_mb_s=self.nbytes / self.a_med / 1e6, b_mb_s=self.nbytes / self.b_med / 1e6)
        return out


def read_raw(path: Path, buf: mmap.mmap, size: int) -> None:
    """Sequential os.preadv of a raw file in len(buf) chunks (open + reads + close)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            n = os.preadv(fd, [buf], pos)
            if n <= 0:
                raise OSError(f"short read at {pos} of {path}")
            pos += n
    finally:
        os.close(fd)


def read_api(path: Path, buf: mmap.mmap, size: int) -> None:
    """Sequential readinto() through qedkit's synchronous API (open + reads + close)."""
    chunk = len(buf)
    view = memoryview(buf)
    try:
        with qedkit.open(str(path), readonly=True) as img:
            assert img.size == size, (img.size, size)
            pos = 0
            while pos < size:
                n = min(chunk, size - pos)
                img.readinto(pos, view if n == chunk else view[:n])
                pos += n
    finally:
        view.release()


def verify_read(raw: Path, qed: Path, size: int) -> None:
    """Untimed: the API reads the same bytes as the raw file (compared per 1 MiB)."""
    a, b = new_buffer(BLOCK), new_buffer(BLOCK)
    fd = os.open(raw, os.O_RDONLY)
    try:
        with qedkit.open(str(qed), readonly=True) as img:
            for pos in range(0, size, BLOCK):
                os.preadv(fd, [a], pos)
                img.readinto(pos, memoryview(b))
                if a[:] != b[:]:
                    raise SystemExit(f"API read of {qed} differs from {raw} at offset {pos}")
    finally:
        os.close(fd)
        a.close()
        b.close()


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--size", type=parse_size, default=parse_size("2G"), help="virtual size (default 2G)"
    )
    ap.add_argument("--runs", type=int, default=5, help="timed runs per side and row (default 5)")
    ap.add_argument(
        "--dir", type=Path, help="work directory (default: a new temp dir under /var/tmp)"
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep the work directory's files at the end"
    )
    ap.add_argument(
        "--rebuild", action="store_true", help="rebuild sources kept from an earlier run"
    )
    ap.add_argument("--seed", type=int, default=SEED, help=f"data seed (default {SEED})")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--qed", metavar="CMD", help="qed command (default: the venv's qed script)")
    ap.add_argument(
        "--inherit-bytecode-env",
        action="store_true",
        help="run qed with the inherited environment (PYTHONDONTWRITEBYTECODE etc.) "
        "instead of caching bytecode in the work directory",
    )
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if not shutil.which("qemu-img"):
        ap.error("qemu-img not found")

    qed = qed_command(args.qed)
    global ENV
    names = ("out-qemu.qed", "out-qed.qed", "out-qemu.raw", "out-qed.raw")
    files = (*names, *SOURCES, "sources.json")
    with work_dir(args.dir, "qedkit-bench-", keep=args.keep, files=files) as d:
        if args.inherit_bytecode_env:
            flag = os.environ.get("PYTHONDONTWRITEBYTECODE", "")
            bytecode = f"inherited environment (PYTHONDONTWRITEBYTECODE={flag})"
        else:
            ENV, bytecode = bytecode_env(d)
        outputs = [d / n for n in names]
        return bench(args, d, qed, args.size, outputs, bytecode)


def bench(
    args: argparse.Namespace, d: Path, qed: list[str], size: int, outputs: list[Path], bytecode: str
) -> int:
    machine = machine_info({"qemu_img": ["qemu-img", "--version"]})
    busy_warning(machine["load_at_start"])
    info = prepare_sources(d, size, args.seed, args.rebuild)
    src_raw, src_qed, full_raw, full_qed = (d / n for n in SOURCES)
    out_qemu_qed, out_qed_qed, out_qemu_raw, out_qed_raw = outputs
    buf = new_buffer(BLOCK)

    qemu_to_qed = ["qemu-img", "convert", "-f", "raw", "-O", "qed", str(src_raw), str(out_qemu_qed)]
    qed_to_qed = [*qed, "convert", "-f", "raw", "-O", "qed", str(src_raw), str(out_qed_qed)]
    qemu_to_raw = ["qemu-img", "convert", "-f", "qed", "-O", "raw", str(src_qed), str(out_qemu_raw)]
    qed_to_raw = [*qed, "convert", "-f", "qed", "-O", "raw", str(src_qed), str(out_qed_raw)]

    # ---- verification, untimed (doubles as a warm-up) -------------------------
    print("verifying outputs (untimed) ...", flush=True)
    for cmd in (qemu_to_qed, qed_to_qed, qemu_to_raw, qed_to_raw):
        sh(cmd)
    sh(["qemu-img", "compare", "-q", "-f", "qed", "-F", "qed", str(out_qemu_qed), str(out_qed_qed)])
    sh(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qed", str(src_raw), str(out_qed_qed)])
    sh(["qemu-img", "check", "-q", "-f", "qed", str(out_qed_qed)])
    sh(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(out_qemu_raw), str(out_qed_raw)])
    sh(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(src_raw), str(out_qed_raw)])
    sh(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qed", str(src_raw), str(src_qed)])
    verify_read(src_raw, src_qed, size)
    verify_read(full_raw, full_qed, size)
    out_sizes = {p.name: {"apparent": p.stat().st_size, "allocated": allocated(p)} for p in outputs}
    print(
        "  qemu-img compare: identical (qed vs qemu-img outputs, and vs the source); "
        "qemu-img check: clean; API reads match the raw files",
        flush=True,
    )

    gb = human(size).replace(".00 ", " ")
    conv, api = ("time", "qemu-img", "qed", "<= 1.0"), ("read", "raw preadv", "qed API", ">= 0.9")
    rows = [
        Row(f"convert raw->qed {gb} (cached source, no flush)", *conv),
        Row(f"convert qed->raw {gb} (cached source, no flush)", *conv),
        Row(f"seq read 1 MiB, mixed image {gb} (cached)", *api, size),
        Row(f"seq read 1 MiB, fully allocated {gb} (cached)", *api, size),
        Row("CLI start-up: --version (context)", "time", "qemu-img", "qed", "-"),
    ]
    conv_qed, conv_raw, read_mixed, read_full, startup = rows

    def convert_step(cmd: list[str], source: Path, *stale: Path) -> float:
        remove(*stale)  # previous outputs of this row, of both tools
        sync()  # so pending write-back of the last step does not slow this one
        warm(source, buf)
        return timed_cmd(cmd)

    def read_step(fn: Callable[[Path, mmap.mmap, int], None], path: Path) -> float:
        global _last_cpu
        warm(path, buf)
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn(path, buf, size)
        dt = time.perf_counter() - t0
        _last_cpu = time.process_time() - c0
        return dt

    print(f"timing {args.runs} runs, interleaved (A B per row and run) ...", flush=True)
    for i in range(args.runs):
        conv_qed.add("a", convert_step(qemu_to_qed, src_raw, out_qemu_qed, out_qed_qed))
        conv_qed.add("b", convert_step(qed_to_qed, src_raw, out_qemu_qed, out_qed_qed))
        conv_raw.add("a", convert_step(qemu_to_raw, src_qed, out_qemu_raw, out_qed_raw))
        conv_raw.add("b", convert_step(qed_to_raw, src_qed, out_qemu_raw, out_qed_raw))
        remove(*outputs)
        sync()
        read_mixed.add("a", read_step(read_raw, src_raw))
        read_mixed.add("b", read_step(read_api, src_qed))
        read_full.add("a", read_step(read_raw, full_raw))
        read_full.add("b", read_step(read_api, full_qed))
        startup.add("a", timed_cmd(["qemu-img", "--version"]))
        startup.add("b", timed_cmd([*qed, "--version"]))
        print(
            f"  run {i + 1}/{args.runs}: "
            + "  ".join(f"{r.a[-1]:.3f}/{r.b[-1]:.3f}" for r in rows),
            flush=True,
        )
    buf.close()
    machine["load_at_end"] = load_average()

    # ---- report ------------------------------------------------------------------
    blocks = info["blocks"]
    nblocks = size // BLOCK
    layout = ", ".join(f"{k} {v} ({100 * v / nblocks:.1f}%)" for k, v in blocks.items())
    print()
    print_machine(machine, ["qemu_img"])
    print(f"qed cmd  {' '.join(qed)}; {bytecode}")
    print(f"source   {human(size)} virtual, 1 MiB blocks (seed {args.seed}): {layout}")
    for p in (src_raw, src_qed, full_raw, full_qed):
        print(
            f"         {p.name:9} file {human(p.stat().st_size):>10}, "
            f"allocated {human(allocated(p)):>10}"
        )
    print(
        f"runs     {args.runs}, A/B interleaved, medians; convert: outputs deleted + sync before "
        f"each step, source read once right before; neither tool flushes (qemu-img default "
        f"-t unsafe; qed convert default -t unsafe)"
    )
    print()
    header = ("row", "qemu-img / raw (A)", "qed (B)", "ratio", "goal", "met")
    table = [
        (
            r.name,
            f"{r.a_label}: {r.cell(r.a_med)}",
            r.cell(r.b_med),
            f"{r.ratio:.2f}",
            r.goal,
            {True: "yes", False: "NO", None: "-"}[r.met],
        )
        for r in rows
    ]
    print_table(header, table)
    print()
    print(
        "ratio: convert and start-up rows = qed time / qemu-img time (goal <= 1.0); read rows = "
        "qed API throughput / raw preadv throughput (goal >= 0.9)"
    )
    print(
        "spread (min-max wall seconds) and median CPU seconds (user+sys; the process for "
        "reads, the child for commands):"
    )
    for r in rows:
        print(
            f"  {r.name}: A {min(r.a):.3f}-{max(r.a):.3f} cpu {statistics.median(r.a_cpu):.3f}, "
            f"B {min(r.b):.3f}-{max(r.b):.3f} cpu {statistics.median(r.b_cpu):.3f}"
        )

    if args.json:
        doc = {
            "machine": machine,
            "size": size,
            "seed": args.seed,
            "runs": args.runs,
            "source_blocks": blocks,
            "files": {
                p.name: {"apparent": p.stat().st_size, "allocated": allocated(p)}
                for p in (src_raw, src_qed, full_raw, full_qed)
            },
            "outputs_at_verification": out_sizes,
            "qed_command": qed,
            "qed_bytecode": bytecode,
            "rows": [r.as_json() for r in rows],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
