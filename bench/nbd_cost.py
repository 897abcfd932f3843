#!/usr/bin/env python3
"""What one NBD request costs the server, in measures a busy machine disturbs little.

    /work/venv/bin/python bench/nbd_cost.py randread-qd1,alloc-qd16 [--server both]
                          [--reps 3] [--runtime 3] [--dir DIR] [--keep]
    /work/venv/bin/python bench/nbd_cost.py randread-qd1 --callgrind --ios 4000

For each row and rep: the server is started on the row's image (bench_nbd.py's: a
fully allocated 2 GiB QED for the read/write rows, a fresh 4 KiB-cluster image for
the allocating rows), the client runs, and the report gives the client's IOPS and
median completion latency (fio's clat p50) and the server's CPU time per request
(user + system, all threads, from /proc). With ``--callgrind`` the server runs under
valgrind's callgrind, instrumentation on only while the client runs
(``callgrind_control -i on``, then a dump): user-space instructions per request, the
same on a loaded machine as on a quiet one (the kernel's share is not counted).
callgrind slows the server 50-100x: give ``--ios`` (fio ``--number_ios``, a few
thousand) instead of a runtime.

Rows: seq-read, seq-write (nbdcopy, 256 KiB requests), randread-qd1/16,
randwrite-qd1/16 (fio 4 KiB), alloc-qd1/16 (fio 4 KiB over all of a fresh image).
Standard library and the bench helpers only; needs what bench_nbd.py needs, and
valgrind for ``--callgrind``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import MiB, bytecode_env, new_buffer, parse_size, qed_command, warm, work_dir
from bench_nbd import ALLOC_CLUSTER, IMAGE, SHARED, SOURCE, Server, fresh_alloc_image, prepare

ROWS = ("seq-read", "seq-write", "randread-qd1", "randread-qd16", "randwrite-qd1",
        "randwrite-qd16", "alloc-qd1", "alloc-qd16")  # fmt: skip
ALLOC_IMAGE = "cost-alloc.qed"


def server_command(
    side: str, qed: list[str], sock: Path, image: Path, extra: list[str]
) -> list[str]:
    if side == "qed":
        return [*qed, "serve", "--socket", str(sock), "-e", str(SHARED), *extra, str(image)]
    return ["qemu-nbd", "-f", "qed", "-k", str(sock), "-e", str(SHARED), "-t",
            "--cache=writeback", "--aio=threads", str(image)]  # fmt: skip


def client(row: str, uri: str, d: Path, runtime: int, ios: int) -> list[str]:
    if row == "seq-read":
        return ["nbdcopy", uri, "null:"]
    if row == "seq-write":
        return ["nbdcopy", str(d / SOURCE), uri]
    rw, depth = row.rsplit("-qd", 1)
    cmd = ["fio", "--name=cost", "--ioengine=nbd", f"--uri={uri}",
           f"--rw={'randwrite' if rw == 'alloc' else rw}", "--bs=4k", f"--iodepth={depth}",
           "--numjobs=1", "--output-format=json", f"--output={d / 'cost-fio.json'}"]  # fmt: skip
    if rw != "alloc":
        cmd += [f"--number_ios={ios}"] if ios else [f"--runtime={runtime}", "--time_based"]
    return cmd


def instructions(d: Path) -> int:
    """Total Ir of the callgrind dumps in ``d`` (the one triggered, the largest)."""
    total = 0
    for dump in d.glob("callgrind.out.*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


def measure(args: argparse.Namespace, d: Path, row: str, side: str) -> dict[str, float]:
    qed = qed_command(args.qed)
    env, _ = bytecode_env(d)
    sock = d / "cost.sock"
    image = d / (ALLOC_IMAGE if row.startswith("alloc") else IMAGE)
    cmd = server_command(side, qed, sock, image, args.serve_args.split())
    if args.callgrind:
        for old in d.glob("callgrind.out.*"):
            old.unlink()
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={d}/callgrind.out.%p", *cmd]  # fmt: skip
    server = Server(side, cmd, sock, d / f"cost-{side}.log", env if side == "qed" else None)
    if row.startswith("alloc"):
        fresh_alloc_image(image, args.alloc_size)
    else:
        buf = new_buffer(MiB)
        warm(image, buf)
        buf.close()
    server.start()
    try:
        assert server.proc is not None
        pid = str(server.proc.pid)
        if args.callgrind:
            subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
        c0 = server.cpu()
        t0 = time.perf_counter()
        p = subprocess.run(client(row, server.uri, d, args.runtime, args.ios),
                           capture_output=True, text=True)  # fmt: skip
        secs = time.perf_counter() - t0
        cpu = server.cpu() - c0
        if args.callgrind:
            subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
    finally:
        server.stop()
    if p.returncode:
        raise SystemExit(f"{row} against {side} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    out: dict[str, float] = {"cpu_s": cpu}
    if row.startswith("seq"):
        requests = args.size // (256 * 1024)
        out.update(requests=requests, iops=requests / secs, p50_us=0.0)
    else:
        job = json.loads((d / "cost-fio.json").read_text())["jobs"][0]
        io = job["write" if "write" in row or row.startswith("alloc") else "read"]
        out.update(requests=io["total_ios"], iops=io["iops"],
                   p50_us=io["clat_ns"]["percentile"]["50.000000"] / 1000)  # fmt: skip
    out["cpu_us"] = cpu / out["requests"] * 1e6
    if args.callgrind:
        out["instr"] = instructions(d) / out["requests"]
    return out


def line(row: str, side: str, r: dict[str, float]) -> str:
    instr = f", {r['instr']:,.0f} instructions/request" if "instr" in r else ""
    return (f"  {row:15s} {side:5s} {r['iops']:9,.0f} IOPS, p50 {r['p50_us']:6.1f} us, "
            f"server {r['cpu_us']:6.1f} us CPU/request{instr}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("rows", help=f"ROW[,ROW] of: {', '.join(ROWS)}")
    ap.add_argument("--server", choices=("qed", "qemu", "both"), default="qed")
    ap.add_argument("--reps", type=int, default=1, help="runs per row and server, interleaved")
    ap.add_argument("--runtime", type=int, default=3, help="seconds per time-based fio row")
    ap.add_argument("--ios", type=int, default=0, help="fio --number_ios instead of --runtime")
    ap.add_argument("--callgrind", action="store_true", help="count instructions (valgrind)")
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"), help="image size")
    ap.add_argument("--alloc-size", type=parse_size, default=parse_size("256M"))
    ap.add_argument("--dir", type=Path, help="work directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory's files")
    ap.add_argument("--qed", metavar="CMD", help="qed command (default: the venv's)")
    ap.add_argument("--serve-args", default="", metavar="ARGS", help="more qed serve options")
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",")]
    if unknown := [r for r in rows if r not in ROWS]:
        ap.error(f"unknown rows {unknown}")
    if args.callgrind and not args.ios and any(not r.startswith(("alloc", "seq")) for r in rows):
        ap.error("--callgrind needs --ios (a few thousand requests)")
    if args.alloc_size % ALLOC_CLUSTER:
        ap.error("--alloc-size must be a multiple of 4 KiB")
    tools = ["qemu-img", "qemu-nbd", "nbdcopy", "fio"] + (["valgrind"] if args.callgrind else [])
    for tool in tools:
        if not shutil.which(tool):
            ap.error(f"{tool} not found")
    sides = ["qemu", "qed"] if args.server == "both" else [args.server]
    files = (IMAGE, SOURCE, ALLOC_IMAGE, "cost-fio.json", "cost-qed.log", "cost-qemu.log")
    with work_dir(args.dir, "qedkit-cost-", keep=args.keep, files=files) as d:
        if any(not r.startswith("alloc") for r in rows):
            prepare(d, args.size)
        print(f"load {os.getloadavg()[0]:.2f}; rows {', '.join(rows)}; servers "
              f"{', '.join(sides)}; {args.reps} rep(s), interleaved")  # fmt: skip
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for _ in range(args.reps):
            for row in rows:
                for side in sides:
                    r = measure(args, d, row, side)
                    results.setdefault((row, side), []).append(r)
                    print(line(row, side, r), flush=True)
        if args.reps > 1:
            print("medians:")
            for (row, side), rs in results.items():
                print(line(row, side, {k: statistics.median(r[k] for r in rs) for k in rs[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
