#!/usr/bin/env python3
"""Benchmark remote images: qedkit's HTTP store against curl, on one nginx, in one run.

    /work/venv/bin/python bench/bench_remote.py [--size 2G] [--runs 5] [--dir DIR]
                                                [--keep] [--json FILE] [--clusters 20]

A raw base of ``--size`` bytes (random 1 MiB blocks, each stamped with its index) is
served by Debian's nginx on 127.0.0.1 and a free port, with a throwaway configuration in
the work directory (nothing is written outside it). Rows:

  * **stream**: the whole base read sequentially, 1 MiB at a time, through qedkit's
    remote store (``store.url.open_url``: block cache, readahead, urllib3 on worker
    threads) into /dev/null, against ``curl -s -o /dev/null URL`` of the same file.
    A fresh store (cold cache, new connections) for every run. Ratio: qedkit MB/s / curl
    MB/s; the issue's goal is >= 0.8.
  * **cold cluster**: the latency of one 64 KiB cluster at a random offset read through a
    new store (the size probe, then the block holding it), against curl's own
    ``time_total`` for ``-r`` of the same 64 KiB (curl's process start-up is not in it).
    Medians over ``--clusters`` offsets per run. Shown also: the read alone once the store
    is open, and a read of a cached cluster.

Runs alternate the sides (curl, qedkit, curl, qedkit ...); the table shows medians and
the min-max spread. Everything is verified once before timing (the store's bytes equal
the file's, a hash of both). Needs nginx (/usr/sbin/nginx) and curl. Imports the
standard library, qedkit and (through qedkit's remote extra) urllib3.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _common import (
    MiB,
    busy_warning,
    human,
    load_average,
    machine_info,
    parse_size,
    print_ab_rows,
    print_machine,
    work_dir,
)

from qedkit.store.remote import RemoteStore
from qedkit.store.url import open_url

CLUSTER = 64 * 1024
READ = MiB  # the streaming reader's unit
BASE = "base.raw"
SEED = 20261202

NGINX_CONF = """\
master_process off;
worker_processes 1;
error_log {d}/nginx-error.log;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-tmp/body;
    proxy_temp_path {d}/nginx-tmp/proxy;
    fastcgi_temp_path {d}/nginx-tmp/fastcgi;
    uwsgi_temp_path {d}/nginx-tmp/uwsgi;
    scgi_temp_path {d}/nginx-tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""


@dataclass
class Row:
    name: str
    unit: str
    a: list[float] = field(default_factory=list)  # curl
    b: list[float] = field(default_factory=list)  # qedkit
    higher_is_better: bool = True
    goal: str = "-"
    note: str = ""

    def ratio(self) -> float:
        a, b = statistics.median(self.a), statistics.median(self.b)
        return b / a if self.higher_is_better else a / b


# --------------------------------------------------------------------------- setup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_base(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    rng = random.Random(SEED)
    block = bytearray(rng.randbytes(MiB))
    with open(path, "wb") as f:
        for i in range(size // MiB):
            rot = rng.randrange(MiB)
            data = block[rot:] + block[:rot]
            data[:8] = i.to_bytes(8, "little")
            f.write(data)


class Nginx:
    def __init__(self, d: Path) -> None:
        self.d = d
        (d / "nginx-tmp").mkdir(exist_ok=True)
        self.port = free_port()
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(d=d, port=self.port, root=d))
        binary = "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else "nginx"
        argv = [binary, "-e", f"{d}/nginx-error.log", "-p", str(d), "-c", str(conf)]
        argv += ["-g", "daemon off;"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("nginx did not start; see nginx-error.log") from None
                time.sleep(0.02)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- the sides


def curl_stream(url: str) -> tuple[float, int]:
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{time_total} %{size_download}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0]), int(out[1])


def curl_range(url: str, offset: int) -> float:
    span = f"{offset}-{offset + CLUSTER - 1}"
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-r", span, "-w", "%{time_total}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out)


async def qed_stream(url: str, digest: bool = False) -> tuple[float, int, str, RemoteStore]:
    store = open_url(url)
    assert isinstance(store, RemoteStore)
    buf = bytearray(READ)
    view = memoryview(buf)
    sink = os.open("/dev/null", os.O_WRONLY)
    hasher = hashlib.sha256() if digest else None
    try:
        started = time.perf_counter()
        size = await store.size()
        pos = 0
        while pos < size:
            n = await store.readinto(pos, view)
            os.write(sink, view[:n])
            if hasher is not None:
                hasher.update(view[:n])
            pos += n
        elapsed = time.perf_counter() - started
    finally:
        os.close(sink)
        await store.close()
    return elapsed, pos, hasher.hexdigest() if hasher else "", store


async def qed_cluster(url: str, offsets: list[int]) -> tuple[list[float], list[float], list[float]]:
    """Per offset: (new store: open + read), (read alone after open), (cached read)."""
    cold, after_open, cached = [], [], []
    for offset in offsets:
        store = open_url(url)
        t0 = time.perf_counter()
        await store.size()
        t1 = time.perf_counter()
        await store.read(offset, CLUSTER)
        t2 = time.perf_counter()
        await store.read(offset, CLUSTER)
        t3 = time.perf_counter()
        await store.close()
        cold.append(t2 - t0)
        after_open.append(t2 - t1)
        cached.append(t3 - t2)
    return cold, after_open, cached


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--clusters", type=int, default=20, help="cold cluster reads per run")
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    machine = machine_info({"curl": ["curl", "--version"], "nginx": ["nginx", "-v"]})
    busy_warning(machine["load_at_start"])
    with work_dir(args.dir, "qedkit-bench-remote-", keep=args.keep, files=[BASE]) as d:
        base = d / BASE
        make_base(base, args.size)
        server = Nginx(d)
        try:
            url = server.url(BASE)
            # verification (untimed; also warms the page cache and the connections)
            expected = hashlib.sha256()
            with open(base, "rb") as f:
                while chunk := f.read(8 * MiB):
                    expected.update(chunk)
            _, n, got, _ = asyncio.run(qed_stream(url, digest=True))
            if n != args.size or got != expected.hexdigest():
                raise SystemExit(f"verification failed: {n} bytes, sha256 {got}")
            curl_stream(url)
            stream = Row("stream, 1 MiB reads -> /dev/null", "MB/s", goal=">= 0.8")
            cold = Row("cold 64 KiB cluster (new store)", "ms", higher_is_better=False)
            warm_row = Row("  read alone, store open", "ms", higher_is_better=False)
            hot = Row("  cached cluster", "ms", higher_is_better=False)
            requests = []
            rng = random.Random(SEED)
            for _ in range(args.runs):
                t, n = curl_stream(url)
                stream.a.append(n / t / 1e6)
                t, n, _, store = asyncio.run(qed_stream(url))
                stream.b.append(n / t / 1e6)
                requests.append(store.statistics().requests)
                offsets = [
                    rng.randrange(args.size // CLUSTER) * CLUSTER for _ in range(args.clusters)
                ]
                curl_ms = statistics.median(curl_range(url, o) for o in offsets) * 1000
                c, w, h = asyncio.run(qed_cluster(url, offsets))
                cold.a.append(curl_ms)
                cold.b.append(statistics.median(c) * 1000)
                warm_row.a.append(curl_ms)
                warm_row.b.append(statistics.median(w) * 1000)
                hot.a.append(curl_ms)
                hot.b.append(statistics.median(h) * 1000)
        finally:
            server.stop()
    machine["load_at_end"] = load_average()
    print_machine(machine, ["curl", "nginx"])
    print(
        f"data     {human(args.size)} raw base on nginx (sendfile) over loopback; "
        f"{args.runs} runs, sides alternated; {args.clusters} clusters per run"
    )
    rows = [stream, cold, warm_row, hot]
    print_ab_rows(rows, "curl", "qedkit")
    blocks = args.size // (256 * 1024)
    print(
        f"requests qedkit's stream made {statistics.median(requests):.0f} range requests "
        f"for {blocks} blocks of 256 KiB (readahead)"
    )
    print(
        "ratio    stream: qedkit MB/s / curl MB/s; latency rows: curl ms / qedkit ms "
        "(curl: time_total of one -r request, without its process start-up)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine, "rows": [asdict(r) for r in rows], "requests": requests},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
