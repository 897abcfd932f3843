#!/usr/bin/env python3
"""Benchmark `qed serve` against `qemu-nbd -f qed` serving the same QED image to the
same NBD clients, in one run.

    /work/venv/bin/python bench/bench_nbd.py [--size 2G] [--runs 3] [--runtime 10]
                                             [--dir DIR] [--keep] [--json FILE]
                                             [--profile ROW[,ROW...]]

Rows (see bench/README.md for what each one measures):
  * whole-image sequential read:  nbdcopy export -> null:       (MB/s)
  * whole-image sequential write: nbdcopy raw file -> export     (MB/s)
  * fio's nbd engine, 4 KiB random read / write at iodepth 1 and 16, --runtime seconds
    each, time based                                             (IOPS)

Both servers serve one fully allocated QED image (made once by `qemu-img convert` from
a raw file of random data, so both see the same sequential layout) with the same
options: `-e 4`, unix socket; qemu-nbd also `-t --cache=writeback --aio=threads` (its
defaults, plus persistent). For every measured step the server is started, the client
runs, and the server is stopped (SIGTERM, and waited for: both lock the image). Before
each step `sync` runs and the image (and for the write row the source) is read once, so
that it is in the page cache. The two servers alternate A B A B per row and run; the
table shows medians and the ratio qed / qemu-nbd (higher is better, goal >= 1.0).

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
    key: str  # for --profile
    name: str
    unit: str  # "MB/s" or "IOPS"
    client: list[str]  # the client command, with {uri} for the export
    nbytes: int = 0  # bytes per copy (MB/s rows)
    writes: bool = False
    a: list[float] = field(default_factory=list)  # throughput per run (MB/s or IOPS)
    b: list[float] = field(default_factory=list)
    a_secs: list[float] = field(default_factory=list)  # client wall seconds
    b_secs: list[float] = field(default_factory=list)
    a_srv_cpu: list[float] = field(default_factory=list)  # server CPU seconds during it
    b_srv_cpu: list[float] = field(default_factory=list)
    a_cli_cpu: list[float] = field(default_factory=list)  # client CPU seconds
    b_cli_cpu: list[float] = field(default_factory=list)
    a_ios: list[int] = field(default_factory=list)  # fio: I/Os completed
    b_ios: list[int] = field(default_factory=list)

    def a_med(self) -> float:
        return statistics.median(self.a)

    def b_med(self) -> float:
        return statistics.median(self.b)

    def ratio(self) -> float:
        return self.b_med() / self.a_med()

    def met(self) -> bool:
        return self.ratio() >= 1.0

    def cell(self, value: float) -> str:
        return f"{value:,.0f} {self.unit}"

    def cpu_note(self, side: str) -> str:
        srv = statistics.median(getattr(self, side + "_srv_cpu"))
        cli = statistics.median(getattr(self, side + "_cli_cpu"))
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
            met=self.met(),
            a_server_cpu_median=statistics.median(self.a_srv_cpu),
            b_server_cpu_median=statistics.median(self.b_srv_cpu),
        )
        return out


def make_rows(d: Path, size: int, runtime: int) -> list[Row]:
    src = str(d / SOURCE)
    gb = human(size).replace(".00 ", " ")
    rows = [
        Row("seq-read", f"seq read {gb}: nbdcopy export -> null:", "MB/s",
            ["nbdcopy", "{uri}", "null:"], nbytes=size),
        Row("seq-write", f"seq write {gb}: nbdcopy {SOURCE} -> export", "MB/s",
            ["nbdcopy", src, "{uri}"], nbytes=size, writes=True),
    ]  # fmt: skip
    for rw in ("randread", "randwrite"):
        for depth in (1, 16):
            rows.append(
                Row(
                    f"{rw}-qd{depth}",
                    f"fio 4 KiB {rw} QD{depth}, {runtime} s",
                    "IOPS",
                    [
                        "fio",
                        f"--name={rw}-qd{depth}",
                        "--ioengine=nbd",
                        "--uri={uri}",
                        f"--rw={rw}",
                        "--bs=4k",
                        f"--iodepth={depth}",
                        "--numjobs=1",
                        f"--runtime={runtime}",
                        "--time_based",
                        "--output-format=json",
                        f"--output={d / 'fio.json'}",
                    ],
                    writes=rw == "randwrite",
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
        "--dir", type=Path, help="work directory (default: a new temp dir under /var/tmp)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory's files")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--qed", metavar="CMD", help="qed command (default: the venv's qed script)")
    ap.add_argument(
        "--profile",
        metavar="ROW[,ROW]",
        help="after the runs, run these rows (keys: seq-read, seq-write, randread-qd1, "
        "randread-qd16, randwrite-qd1, randwrite-qd16) once more against qed serve under "
        "cProfile and print the top functions by tottime; --runs 0 skips the timing",
    )
    args = ap.parse_args()
    if args.runs < 0 or (args.runs == 0 and not args.profile):
        ap.error("--runs must be >= 1 (or 0 with --profile)")
    if args.runtime < 1:
        ap.error("--runtime must be >= 1")
    for tool in ("qemu-img", "qemu-nbd", "nbdcopy", "nbdinfo", "fio"):
        if not shutil.which(tool):
            ap.error(f"{tool} not found")

    files = (IMAGE, SOURCE, "fio.json", "prof.out", "qemu-nbd.log", "qed.log")
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


def bench(args: argparse.Namespace, d: Path) -> int:
    size, runtime = args.size, args.runtime
    qed = qed_command(args.qed)
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
    prepare(d, size)
    img, src = d / IMAGE, d / SOURCE
    sock = d / "nbd.sock"
    qemu_cmd = ["qemu-nbd", "-f", "qed", "-k", str(sock), "-e", str(SHARED), "-t",
                "--cache=writeback", "--aio=threads", str(img)]  # fmt: skip
    qed_cmd = [*qed, "serve", "--socket", str(sock), "-e", str(SHARED), str(img)]
    servers = {
        "a": Server("qemu-nbd", qemu_cmd, sock, d / "qemu-nbd.log", None),
        "b": Server("qed serve", qed_cmd, sock, d / "qed.log", qed_env),
    }
    rows = make_rows(d, size, runtime)
    buf = new_buffer(MiB)

    # ---- verification, untimed (doubles as a warm-up) ------------------------------
    print("verifying both exports (untimed): nbdinfo, qemu-img compare with the source ...")
    exports: dict[str, dict[str, Any]] = {}
    for side, server in servers.items():
        server.start()
        try:
            info = json.loads(sh(["nbdinfo", "--json", "--no-content", server.uri], capture=True))
            sh(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(src), server.uri])
        finally:
            server.stop()
        ex = info["exports"][0]
        exports[side] = {k: v for k, v in ex.items() if k.startswith(("can_", "block_size"))}
        exports[side]["contexts"] = ex.get("contexts", [])
        if ex["export-size"] != size:
            raise SystemExit(f"{server.label} exports {ex['export-size']} bytes, not {size}")
    multi = ", ".join(f"{s.label} {exports[k]['can_multi_conn']}" for k, s in servers.items())
    print(f"  both exports have the source's contents; multi-conn: {multi}")

    def step(row: Row, side: str) -> None:
        server = servers[side]
        sync()  # write-back of the previous step's data must not compete with this one
        warm(img, buf)
        if row.writes and row.unit == "MB/s":
            warm(src, buf)
        server.start()
        try:
            c0 = server.cpu()
            value, secs, cli_cpu, ios = run_client(row, server)
            srv_cpu = server.cpu() - c0
        finally:
            server.stop()
        getattr(row, side).append(value)
        getattr(row, side + "_secs").append(secs)
        getattr(row, side + "_srv_cpu").append(srv_cpu)
        getattr(row, side + "_cli_cpu").append(cli_cpu)
        if row.unit == "IOPS":
            getattr(row, side + "_ios").append(ios)

    try:
        if args.runs:
            print(f"timing {args.runs} runs, interleaved (qemu-nbd then qed serve, per row) ...")
        for i in range(args.runs):
            for row in rows:
                step(row, "a")
                step(row, "b")
            print(
                f"  run {i + 1}/{args.runs}: "
                + "  ".join(f"{r.key} {r.a[-1]:.0f}/{r.b[-1]:.0f}" for r in rows),
                flush=True,
            )
        machine["load_at_end"] = load_average()
        profiles = profile(args, d, rows, servers["b"], python, qed_env, img, src, buf)
    finally:
        for server in servers.values():
            server.kill()
        buf.close()

    # ---- final check --------------------------------------------------------------
    check = sh(["qemu-img", "check", "-f", "qed", str(img)], capture=True).strip()
    print(f"\nqemu-img check after all rows: {check.splitlines()[0] if check else 'clean'}")
    if not args.runs:
        return 0

    # ---- report -------------------------------------------------------------------
    print()
    print_machine(machine, ["qemu_img"])
    print(f"tools    {machine['qemu_nbd']}; {machine['nbdcopy']}; {machine['fio']}")
    print(f"qed      {' '.join(qed)} (python {python}; event loop: {uvloop}); {bytecode}")
    print(
        f"image    {img.name}: {human(size)} QED, every cluster allocated in order "
        f"(qemu-img convert of {SOURCE}, {human(size)} of random data); "
        f"file {human(img.stat().st_size)}, allocated {human(allocated(img))}"
    )
    print(f"A        {' '.join(qemu_cmd)}")
    print(f"B        {' '.join(qed_cmd)}")
    print(
        f"exports  multi-conn {exports['a']['can_multi_conn']}/{exports['b']['can_multi_conn']}, "
        f"min block {exports['a'].get('block_size_minimum')}/"
        f"{exports['b'].get('block_size_minimum')} (qemu-nbd/qed)"
    )
    print(
        f"runs     {args.runs}, A/B interleaved per row, medians; before every step: sync, "
        f"image read once (page cache warm; seq write: source too), server started and "
        f"waited for; after it: SIGTERM + wait for exit (outside the timing). nbdcopy rows "
        f"time the whole nbdcopy (defaults: multi-conn, min(4, nproc) connections x 64 "
        f"requests x 256 KiB, no --flush); fio rows report fio's IOPS over --runtime "
        f"{runtime} s (1 job, 1 connection)"
    )
    print()
    header = ("row", "qemu-nbd (A)", "qed serve (B)", "ratio", "goal", "met")
    table = [
        (
            r.name,
            r.cell(r.a_med()),
            r.cell(r.b_med()),
            f"{r.ratio():.2f}",
            ">= 1.0",
            "yes" if r.met() else "NO",
        )
        for r in rows
    ]
    print_table(header, table)
    print()
    print("ratio = qed serve / qemu-nbd throughput (MB/s = 10^6 bytes/s; higher is better)")
    print("spread (min-max per side) and median CPU seconds during the client run:")
    for r in rows:
        print(f"  {r.name}")
        for side, label in (("a", "qemu-nbd "), ("b", "qed serve")):
            vals = getattr(r, side)
            print(f"    {label} {min(vals):,.0f}-{max(vals):,.0f} {r.unit}; {r.cpu_note(side)}")

    if args.json:
        doc = {
            "machine": machine,
            "size": size,
            "runs": args.runs,
            "runtime": runtime,
            "qed_command": qed,
            "qed_python": python,
            "event_loop": uvloop,
            "qed_bytecode": bytecode,
            "server_commands": {"qemu-nbd": qemu_cmd, "qed serve": qed_cmd},
            "exports": {"qemu-nbd": exports["a"], "qed serve": exports["b"]},
            "image_check": check,
            "rows": [r.as_json() for r in rows],
            "profiles": profiles,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def profile(
    args: argparse.Namespace,
    d: Path,
    rows: list[Row],
    qed_server: Server,
    python: str,
    env: dict[str, str],
    img: Path,
    src: Path,
    buf: Any,
) -> dict[str, str]:
    """--profile: each named row once more, `qed serve` under cProfile (stopped with
    SIGINT, which dumps the profile); print the top 25 functions by tottime."""
    import io
    import pstats

    if not args.profile:
        return {}
    by_key = {r.key: r for r in rows}
    out: dict[str, str] = {}
    prof = d / "prof.out"
    for key in args.profile.split(","):
        row = by_key.get(key.strip())
        if row is None:
            raise SystemExit(f"--profile: no row {key!r} (rows: {', '.join(by_key)})")
        cmd = [python, "-m", "cProfile", "-o", str(prof), "-m", "qedkit",
               *qed_server.cmd[qed_server.cmd.index("serve"):]]  # fmt: skip
        server = Server("qed serve (cProfile)", cmd, qed_server.sock, d / "qed.log", env)
        remove(prof)
        sync()
        warm(img, buf)
        if row.writes and row.unit == "MB/s":
            warm(src, buf)
        server.start()
        try:
            value = run_client(row, server)[0]
        finally:
            server.stop(signal.SIGINT)
        text = io.StringIO()
        stats = pstats.Stats(str(prof), stream=text)
        stats.sort_stats("tottime").print_stats(25)
        report = text.getvalue()
        out[row.key] = f"{row.cell(value)} under cProfile\n{report}"
        print(f"\n---- profile of qed serve, {row.name}: {row.cell(value)} under cProfile")
        print(report[report.find("   ncalls") :] if "   ncalls" in report else report)
    return out


if __name__ == "__main__":
    sys.exit(main())
