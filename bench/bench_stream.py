#!/usr/bin/env python3
"""Benchmark image streaming: ``qed stream`` of a base on nginx into an overlay, against
curl downloading the same file, in one run; cold-cluster latency; a guest's first
64 MiB through ``qed serve`` over the remote base and over a local copy.

    /work/venv/bin/python bench/bench_stream.py [--size 2G] [--runs 5] [--dir DIR]
                                                [--keep] [--json FILE] [--clusters 20]

A raw base of ``--size`` bytes (bench_remote.py's: random 1 MiB blocks, each stamped
with its index) is served by Debian's nginx on 127.0.0.1 and a free port, with a
throwaway configuration in the work directory (nothing is written outside it). Rows:

  * **stream**: ``qed stream OVERLAY`` (a new overlay of the URL each run, made
    untimed) against ``curl -s -o FILE URL``, both writing into the work directory,
    both timed as whole processes (the interpreter's start-up counts for qed).
    Ratio: qed MB/s / curl MB/s; the issue's goal is >= 0.8. Note: qed stream flushes
    once per step (the data before the L2 entries that point to it: a crash must not
    show half a cluster) and curl never flushes.
  * **cold cluster**: a 4 KiB guest read of a cluster nobody read before, through an
    open overlay (sync API), without and with copy-on-read (then the read also
    writes the cluster, flushes and writes its L2 entry), against curl's
    ``time_total`` for ``-r`` of the same 64 KiB (without curl's process start-up).
    Medians over ``--clusters`` offsets per run.
  * **first 64 MiB**: ``qemu-io -c "read -q 0 1M" ... (64 reads)`` of ``qed serve``
    exporting an overlay over the base on nginx, against the same over a local copy
    of the base (in the page cache): what a guest's first sequential reads cost when
    its base is remote. Each run starts new servers (a cold remote cache).

Runs alternate the sides; the table shows medians and below it the min-max spread.
Everything is verified once before timing (a streamed overlay equals the base:
qemu-img compare; qemu-img check clean). Needs nginx, curl, qemu-img, qemu-io.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _common import (
    MiB,
    busy_warning,
    bytecode_env,
    human,
    load_average,
    machine_info,
    parse_size,
    print_ab_rows,
    print_machine,
    qed_command,
    work_dir,
)
from bench_remote import BASE, CLUSTER, Nginx, curl_range, make_base

import qedkit

GUEST_READ = 4096  # the guest's read of a cold cluster
FIRST = 64 * MiB  # the guest's first sequential reads, in 1 MiB requests


@dataclass
class Row:
    name: str
    unit: str
    a_name: str
    b_name: str
    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    higher_is_better: bool = True
    goal: str = "-"

    def ratio(self) -> float:
        a, b = statistics.median(self.a), statistics.median(self.b)
        return b / a if self.higher_is_better else a / b


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def new_overlay(qed: list[str], env: dict[str, str], path: Path, backing: str) -> None:
    path.unlink(missing_ok=True)
    argv = [*qed, "create", "-q", "-f", "qed", "-b", backing, "-F", "raw", str(path)]
    subprocess.run(argv, check=True, env=env)


def cold_reads(overlay: Path, offsets: list[int], *, cor: bool) -> list[float]:
    """Seconds per 4 KiB read of a cold cluster through an open overlay."""
    out = []
    with qedkit.open(str(overlay), copy_on_read=cor) as img:
        img.read(0, GUEST_READ)  # the open of the remote store is not what is timed
        for offset in offsets:
            t = time.perf_counter()
            img.read(offset + 512, GUEST_READ)
            out.append(time.perf_counter() - t)
    return out


class Served:
    """``qed serve`` of one overlay on a unix socket, in the work directory."""

    def __init__(self, qed: list[str], env: dict[str, str], d: Path, image: Path) -> None:
        self.sock = d / f"{image.stem}.sock"
        self.sock.unlink(missing_ok=True)
        argv = [*qed, "serve", "--fork", "-k", str(self.sock), "--pid-file"]
        self.pid_file = d / f"{image.stem}.pid"
        subprocess.run([*argv, str(self.pid_file), str(image)], check=True, env=env)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        pid = int(self.pid_file.read_text())
        os.kill(pid, 15)
        deadline = time.monotonic() + 20
        while self.pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)


def first_reads(uri: str) -> float:
    argv = ["qemu-io", "-f", "raw", "-r"]
    for pos in range(0, FIRST, MiB):
        argv += ["-c", f"read -q {pos} {MiB}"]
    return timed([*argv, uri])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--clusters", type=int, default=20, help="cold cluster reads per run")
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--qed", help="the qed command (default: the venv's)")
    args = ap.parse_args()
    if args.size < 2 * FIRST:
        raise SystemExit(f"--size must be at least {human(2 * FIRST)}")
    qed = qed_command(args.qed)
    machine = machine_info(
        {"curl": ["curl", "--version"], "nginx": ["nginx", "-v"], "qemu": ["qemu-io", "--version"]}
    )
    busy_warning(machine["load_at_start"])
    files = [BASE, "local.raw", "curl.raw", "top.qed", "cold.qed", "remote.qed", "local.qed"]
    with work_dir(args.dir, "qedkit-bench-stream-", keep=args.keep, files=files) as d:
        env, bytecode_note = bytecode_env(d)
        base = d / BASE
        make_base(base, args.size)
        local = d / "local.raw"
        if not local.exists() or local.stat().st_size != args.size:
            subprocess.run(["cp", "--reflink=never", str(base), str(local)], check=True)
        server = Nginx(d)
        try:
            url = server.url(BASE)
            top = d / "top.qed"
            # verification (untimed; also warms the page cache and nginx)
            new_overlay(qed, env, top, url)
            subprocess.run([*qed, "stream", "-q", str(top)], check=True, env=env)
            out = subprocess.run(
                ["qemu-img", "compare", "-f", "qed", "-F", "raw", str(top), str(base)],
                capture_output=True,
                text=True,
            )
            if "Images are identical." not in out.stdout:
                raise SystemExit(f"verification failed: {out.stdout}{out.stderr}")
            subprocess.run(["qemu-img", "check", "-q", str(top)], check=True)
            stream = Row("stream -> overlay", "MB/s", "curl -o", "qed stream", goal=">= 0.8")
            # The same copy made durable: curl's file synced, as qed stream's data is
            # before its entries point at it.
            durable = Row("  both durable", "MB/s", "curl -o; sync", "qed stream")
            cold = Row("cold 4 KiB read", "ms", "curl -r 64K", "overlay", higher_is_better=False)
            cold_cor = Row(
                "  with copy-on-read", "ms", "curl -r 64K", "overlay -C", higher_is_better=False
            )
            first = Row(
                "first 64 MiB via qed serve",
                "s",
                "local base",
                "base on nginx",
                higher_is_better=False,
            )
            rng = random.Random(5)
            clusters = args.size // CLUSTER
            for _ in range(args.runs):
                t = timed(["curl", "-s", "-o", str(d / "curl.raw"), url])
                stream.a.append(args.size / t / 1e6)
                (d / "curl.raw").unlink()
                sync = [
                    "sh",
                    "-c",
                    'curl -s -o "$1" "$2" && sync "$1"',
                    "-",
                    str(d / "curl.raw"),
                    url,
                ]
                t = timed(sync)
                durable.a.append(args.size / t / 1e6)
                (d / "curl.raw").unlink()
                new_overlay(qed, env, top, url)
                t = timed([*qed, "stream", "-q", str(top)], env)
                stream.b.append(args.size / t / 1e6)
                durable.b.append(args.size / t / 1e6)
                top.unlink()

                offsets = [rng.randrange(1, clusters) * CLUSTER for _ in range(args.clusters)]
                curl_ms = statistics.median(curl_range(url, o) for o in offsets) * 1000
                overlay = d / "cold.qed"
                for row, cor in ((cold, False), (cold_cor, True)):
                    new_overlay(qed, env, overlay, url)
                    row.a.append(curl_ms)
                    row.b.append(statistics.median(cold_reads(overlay, offsets, cor=cor)) * 1000)
                overlay.unlink()

                sides = {}
                for name, backing in (("local", "local.raw"), ("remote", url)):
                    image = d / f"{name}.qed"
                    new_overlay(qed, env, image, backing)
                    served = Served(qed, env, d, image)
                    try:
                        sides[name] = first_reads(served.uri)
                    finally:
                        served.stop()
                    image.unlink()
                first.a.append(sides["local"])
                first.b.append(sides["remote"])
        finally:
            server.stop()
    machine["load_at_end"] = load_average()
    print_machine(machine, ["curl", "nginx", "qemu"])
    print(
        f"data     {human(args.size)} raw base on nginx (sendfile) over loopback; "
        f"{args.runs} runs, sides alternated; {args.clusters} cold clusters per run; "
        f"{bytecode_note}"
    )
    rows = [stream, durable, cold, cold_cor, first]
    print_ab_rows(rows, "A", "B", named=True)
    print(
        "ratio    stream: B MB/s / A MB/s; the other rows: A / B (below 1: B is slower). "
        "qed stream makes its data durable before the entries that point at it (one flush "
        "per 128 MiB group of steps); curl -o never flushes, hence the durable row"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
