"""qed compare vs qemu-img compare, qed commit vs qemu-img commit, on the same images.

    python bench/bench_verbs.py                     # 2 GiB sparse images, 5 runs each
    python bench/bench_verbs.py --size 256M --runs 3 --dir /var/tmp/qv --keep

The images (built once, untimed, with a fixed seed):

* ``a.qed`` and ``b.qed``: two sparse QED images of ``--size`` with the same content:
  about 10% of the disk random data in 1 MiB runs, 2% zero clusters, the rest never
  written. ``compare`` reads both allocated parts (they are equal, so nothing stops
  early): the work is the data, and the holes are free for both tools.
* ``base0.qed`` (data in 20% of the disk) and ``top0.qed`` over it (5% of the disk
  rewritten, 1% zeroed); each commit run starts from fresh copies (``cp
  --sparse=always`` and a ``sync``, untimed) so that both tools commit the same
  overlay and flush only their own writes. qemu-img
  commit writes back (its default cache mode flushes at the end) and cannot empty a
  QED overlay; qed commit flushes the base and empties the overlay.

Each row runs qed and qemu-img alternately (A B A B ...) with the files read into the
page cache first (machine notes: idle files leave it after about a minute), and
prints the medians and their ratio (qed / qemu-img: below 1.0 is faster). Results
are checked: ``qemu-img compare`` of each committed base against the overlay as it
was must say identical, for both tools' bases.
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
from pathlib import Path

from _common import (
    MiB,
    busy_warning,
    bytecode_env,
    load_average,
    machine_info,
    new_buffer,
    parse_size,
    print_machine,
    print_table,
    qed_command,
    sh,
    warm,
    work_dir,
)

import qedkit

FILES = ["a.qed", "b.qed", "base0.qed", "top0.qed", "base.qed", "top.qed", "ref.raw"]


def _fill(path: Path, size: int, rng: random.Random, data_share: float, zero_share: float) -> None:
    block = rng.randbytes(MiB)
    with qedkit.open(str(path)) as img:
        for i in range(size // MiB):
            r = rng.random()
            if r < data_share:
                img.write(i * MiB, block[i % 4096 :] + block[: i % 4096])
            elif r < data_share + zero_share:
                img.write_zeroes(i * MiB, MiB)


def build(d: Path, size: int, seed: int) -> None:
    for name in ("a.qed", "b.qed"):
        qedkit.create(str(d / name), size)
        _fill(d / name, size, random.Random(seed), 0.10, 0.02)
    qedkit.create(str(d / "base0.qed"), size)
    _fill(d / "base0.qed", size, random.Random(seed + 1), 0.20, 0.0)
    qedkit.create(str(d / "top0.qed"), size, backing_file="base0.qed", backing_format="qed")
    _fill(d / "top0.qed", size, random.Random(seed + 2), 0.05, 0.01)


def timed(cmd: list[str], env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)) -> float:
    started = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    seconds = time.perf_counter() - started
    if p.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr}")
    return seconds


def fresh_chain(d: Path) -> None:
    for src, dst in (("base0.qed", "base.qed"), ("top0.qed", "top.qed")):
        sh(["cp", "--sparse=always", str(d / src), str(d / dst)])
    sh(["qemu-img", "rebase", "-u", "-b", "base.qed", "-F", "qed", str(d / "top.qed")])
    # The copies are dirty in the page cache: without this, the timed commit's flush
    # of the base also writes back whatever part of cp's 400 MB the kernel has not
    # written yet, which made the commit row swing between runs (0.87x to 3.7x).
    os.sync()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--qed", help="the qed command (default: the venv's)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    qed = qed_command(args.qed)
    machine = machine_info({"qemu_img": ["qemu-img", "--version"]})
    busy_warning(machine["load_at_start"])
    rows: list[dict[str, object]] = []
    with work_dir(args.dir, "qedkit-verbs-", keep=args.keep, files=FILES) as d:
        env, note = bytecode_env(d)
        t0 = time.perf_counter()
        build(d, args.size, args.seed)
        print(f"built the images in {time.perf_counter() - t0:.1f} s ({note})")
        buf = new_buffer(8 * MiB)
        sh(["qemu-img", "convert", "-O", "raw", str(d / "top0.qed"), str(d / "ref.raw")])

        # ---- compare --------------------------------------------------------------
        a, b = str(d / "a.qed"), str(d / "b.qed")
        times: dict[str, list[float]] = {"qed": [], "qemu-img": []}
        for _ in range(args.runs):
            for tool in ("qed", "qemu-img"):
                warm(d / "a.qed", buf)
                warm(d / "b.qed", buf)
                cmd = [*qed, "compare", a, b] if tool == "qed" else ["qemu-img", "compare", a, b]
                times[tool].append(timed(cmd, env if tool == "qed" else None))
        rows.append({"row": f"compare 2 x {args.size // MiB} MiB sparse (equal)", **times})

        # ---- commit ---------------------------------------------------------------
        times = {"qed": [], "qemu-img": []}
        for _ in range(args.runs):
            for tool in ("qed", "qemu-img"):
                fresh_chain(d)
                warm(d / "base.qed", buf)
                warm(d / "top.qed", buf)
                top = str(d / "top.qed")
                cmd = [*qed, "commit", top] if tool == "qed" else ["qemu-img", "commit", top]
                times[tool].append(timed(cmd, env if tool == "qed" else None))
                res = subprocess.run(
                    ["qemu-img", "compare", "-F", "raw", str(d / "base.qed"), str(d / "ref.raw")],
                    capture_output=True,
                    text=True,
                )
                if res.returncode:
                    raise SystemExit(f"{tool} commit: base differs: {res.stdout}{res.stderr}")
        rows.append({"row": f"commit {args.size // MiB} MiB overlay (5% + 1% zeroed)", **times})

    machine["load_at_end"] = load_average()
    print_machine(machine, ["qemu_img"])
    table = []
    for row in rows:
        ours = statistics.median(row["qed"])  # type: ignore[arg-type]
        theirs = statistics.median(row["qemu-img"])  # type: ignore[arg-type]
        table.append([str(row["row"]), f"{ours:.3f} s", f"{theirs:.3f} s", f"{ours / theirs:.2f}x"])
    print_table(["work", "qed (median)", "qemu-img (median)", "ratio"], table)
    print(f"{args.runs} interleaved runs per tool and row; ratio < 1.0: qed is faster")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
