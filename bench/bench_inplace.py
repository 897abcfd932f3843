#!/usr/bin/env python3
"""In-place qcow2 -> QED conversion against a converted copy, in one run.

    /work/venv/bin/python bench/bench_inplace.py [--size 2G] [--runs 3] [--dir DIR]
                                                 [--keep] [--json FILE] [--seed N]

The source is a mostly allocated qcow2 image (64 KiB clusters): ``--size`` bytes in
1 MiB blocks, ~85% random data, ~5% written zeros, ~2% a single 4 KiB of data, the
rest holes, turned into qcow2 by ``qemu-img convert -O qcow2``. Each run, on a fresh
copy of it (copied untimed, then ``sync``):

* A: ``qemu-img convert -f qcow2 -O qed src.qcow2 out.qed`` (a new file; qemu-img's
  default cache mode, no flush), and the same with ``-t writeback`` (one flush at
  the end, as a copy that must survive a power loss needs);
* B: ``qed convert --in-place work.qcow2`` (every step flushed: it is crash-safe).

Rows (medians over ``--runs``, the sides alternating A B A B): wall time; bytes
written (the bytes each process dirtied, from its rusage ``ru_oublock``: what reaches
the disk); the disk space the result takes and the peak extra space the conversion
needed (a copy needs a whole second image; in place, only what is appended before
the switch). Before timing, one untimed run of each checks the results: ``qemu-img
compare`` with the source identical, ``qemu-img check`` clean.

Only the standard library and qedkit are imported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    MiB,
    allocated,
    busy_warning,
    bytecode_env,
    human,
    load_average,
    machine_info,
    parse_size,
    print_machine,
    print_table,
    qed_command,
    remove,
    sh,
    sync,
    work_dir,
)

BLOCK = MiB
SEED = 20250101
P_DATA, P_ZERO, P_HEAD4K = 0.85, 0.05, 0.02
FILES = ("src.raw", "src.qcow2", "work.qcow2", "out.qed", "sources.json")


def build(d: Path, size: int, seed: int, rebuild: bool) -> dict[str, Any]:
    stamp = d / "sources.json"
    params = {"size": size, "seed": seed, "layout": 1}
    if not rebuild and stamp.exists() and (d / "src.qcow2").exists():
        info: dict[str, Any] = json.loads(stamp.read_text())
        if info.get("params") == params:
            print(f"reusing {d / 'src.qcow2'} (--rebuild to rebuild)")
            return info
    rng = random.Random(seed)
    base = rng.randbytes(BLOCK)
    counts = {"data": 0, "zero": 0, "head4k": 0, "hole": 0}
    raw = d / "src.raw"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for i in range(size // BLOCK):
            r = rng.random()
            k = rng.randrange(1, BLOCK)
            block = i.to_bytes(8, "little") + (base[k:] + base[:k])[8:]
            if r < P_DATA:
                os.pwrite(fd, block, i * BLOCK)
                counts["data"] += 1
            elif r < P_DATA + P_ZERO:
                os.pwrite(fd, bytes(BLOCK), i * BLOCK)
                counts["zero"] += 1
            elif r < P_DATA + P_ZERO + P_HEAD4K:
                os.pwrite(fd, block[:4096], i * BLOCK)
                counts["head4k"] += 1
            else:
                counts["hole"] += 1
    finally:
        os.close(fd)
    sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(d / "src.qcow2")])
    remove(raw)
    sync()
    info = {"params": params, "blocks": counts}
    stamp.write_text(json.dumps(info))
    return info


@dataclass
class Sample:
    seconds: float
    written: int  # bytes dirtied (rusage ru_oublock * 512)
    allocated: int  # of the result
    extra: int  # peak disk space beyond the source's


@dataclass
class Side:
    label: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """(wall seconds, stdout) of one command."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr.decode()}")
    return dt, p.stdout.decode()


def children_oublock() -> int:
    """Bytes the reaped children dirtied so far (rusage ru_oublock, 512-byte units)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock * 512


def run_qemu(d: Path, env: dict[str, str], cache: str) -> Sample:
    out = d / "out.qed"
    remove(out)
    sync()
    before = children_oublock()
    seconds, _ = timed(
        ["qemu-img", "convert", "-t", cache, "-f", "qcow2", "-O", "qed", str(d / "src.qcow2"),
         str(out)], env,
    )  # fmt: skip
    written = children_oublock() - before
    return Sample(seconds, written, allocated(out), allocated(out))


def run_inplace(d: Path, env: dict[str, str], qed: list[str]) -> tuple[Sample, dict[str, Any]]:
    work = d / "work.qcow2"
    remove(work)
    shutil.copyfile(d / "src.qcow2", work)
    sync()
    start_alloc = allocated(work)
    before = children_oublock()
    seconds, out = timed([*qed, "convert", "--in-place", "--output=json", str(work)], env)
    written = children_oublock() - before
    report: dict[str, Any] = json.loads(out)
    # the file's peak: the old file plus what was appended before the switch
    peak = report["allocated-before"] + report["bytes-to-write"]
    return Sample(seconds, written, allocated(work), peak - start_alloc), report


def verify(d: Path, env: dict[str, str], qed: list[str]) -> dict[str, Any]:
    run_qemu(d, env, "unsafe")
    _, report = run_inplace(d, env, qed)
    for image in ("out.qed", "work.qcow2"):
        sh(["qemu-img", "compare", "-f", "qed", "-F", "qcow2", str(d / image),
            str(d / "src.qcow2")])  # fmt: skip
    p = subprocess.run(["qemu-img", "check", "-f", "qed", str(d / "work.qcow2")],
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode:
        raise SystemExit(f"qemu-img check of the converted image: {p.returncode}\n{p.stdout}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--qed", help="the qed command (default: the venv's)")
    args = ap.parse_args()
    qed = qed_command(args.qed)
    machine = machine_info({"qemu_img": ["qemu-img", "--version"]})
    with work_dir(args.dir, "qed-bench-inplace-", keep=args.keep, files=FILES) as d:
        env, note = bytecode_env(d)
        info = build(d, args.size, args.seed, args.rebuild)
        print(f"source   {human(args.size)} qcow2 (64 KiB clusters), blocks {info['blocks']}, "
              f"allocated {human(allocated(d / 'src.qcow2'))}")  # fmt: skip
        print(f"note     {note}")
        report = verify(d, env, qed)
        sides = {
            "qemu-img": Side("qemu-img convert -O qed"),
            "qemu-img-wb": Side("qemu-img convert -t writeback -O qed"),
            "inplace": Side("qed convert --in-place"),
        }
        for _ in range(args.runs):
            sides["qemu-img"].samples.append(run_qemu(d, env, "unsafe"))
            sample, report = run_inplace(d, env, qed)
            sides["inplace"].samples.append(sample)
            sides["qemu-img-wb"].samples.append(run_qemu(d, env, "writeback"))
        machine["load_at_end"] = load_average()
        print_machine(machine, ["qemu_img"])
        busy_warning(machine["load_at_end"])
        print(
            f"in place: reused {report['reused-clusters']} clusters, copied "
            f"{report['copied-clusters']}, zero {report['zero-clusters']}; "
            f"{human(report['bytes-written'])} appended, {human(report['bytes-moved'])} "
            f"moved by the reclaim"
        )
        a, wb, b = sides["qemu-img"], sides["qemu-img-wb"], sides["inplace"]
        rows = []
        for name, attr, fmt in (
            ("wall time", "seconds", lambda v: f"{v:.3f} s"),
            ("bytes written (dirtied)", "written", human),
            ("result's disk space", "allocated", human),
            ("extra disk space needed", "extra", human),
        ):
            va, vwb, vb = a.median(attr), wb.median(attr), b.median(attr)
            rows.append([
                name, fmt(va), fmt(vwb), fmt(vb),
                f"{vb / va:.3f}" if va else "-", f"{vb / vwb:.3f}" if vwb else "-",
            ])  # fmt: skip
        print()
        print_table(["row", a.label, wb.label, b.label, "in place / A", "in place / A wb"], rows)
        spread = ", ".join(
            f"{s.label} {min(x.seconds for x in s.samples):.3f}-"
            f"{max(x.seconds for x in s.samples):.3f} s"
            for s in sides.values()
        )
        print(f"\ntime spread (min-max over {args.runs} runs): {spread}")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "machine": machine,
                        "size": args.size,
                        "report": report,
                        "sides": {k: [vars(s) for s in v.samples] for k, v in sides.items()},
                    },
                    indent=2,
                )
            )


if __name__ == "__main__":
    main()
