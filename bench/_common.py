"""Helpers shared by the benchmarks in bench/ (standard library and qedkit only).

The benchmarks import this module by name: Python puts a script's directory first on
sys.path, so `python bench/bench_X.py` finds it from any working directory.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import mmap
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qedkit.format.sizes import parse_size as parse_bytes

MiB = 1 << 20


def parse_size(text: str, multiple: int = MiB) -> int:
    """'2G', '512M', '1.5G' ... (qedkit's sizes, as qemu-img reads them) -> bytes;
    must be a positive multiple of `multiple`."""
    try:
        value = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0 or value % multiple:
        raise argparse.ArgumentTypeError(
            f"size must be a positive multiple of {human(multiple)}: {text!r}"
        )
    return value


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def sh(cmd: Sequence[str], *, capture: bool = False, env: Mapping[str, str] | None = None) -> str:
    """Run a command (untimed); raise with its stderr on failure."""
    p = subprocess.run(
        list(cmd),
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    if p.returncode:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    return p.stdout if capture else ""


def first_line(cmd: Sequence[str]) -> str:
    """First line of a command's output (a version string), or '?' if it cannot run."""
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (p.stdout or p.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def sync() -> None:
    subprocess.run(["sync"], check=True)


def remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def work_dir(path: Path | None, prefix: str, *, keep: bool, files: Iterable[str]) -> Iterator[Path]:
    """The benchmark's work directory: ``path`` (made if missing) or, when None, a new
    temporary directory under /var/tmp. At the end it is kept as it is with ``keep``;
    otherwise a temporary directory is removed, and in a given one only ``files`` and
    the bytecode cache go (a later ``--keep`` run may have left other things there)."""
    created = path is None
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")) if path is None else path.resolve()
    d.mkdir(parents=True, exist_ok=True)
    try:
        yield d
    finally:
        if keep:
            print(f"\nkept {d}")
        elif created:
            shutil.rmtree(d, ignore_errors=True)
        else:
            remove(*(d / name for name in files))
            shutil.rmtree(d / "pycache", ignore_errors=True)


def new_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer (machine notes: bytearray buffers of >= 256 KiB start at page
    offset 16 and copy from the page cache ~5x slower)."""
    return mmap.mmap(-1, size)


def warm(path: Path, buf: mmap.mmap) -> None:
    """Read a whole file once so that it is in the page cache (idle files leave it after
    about a minute on this machine)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        pos = 0
        while pos < size:
            n = os.preadv(fd, [buf], pos)
            if n <= 0:
                break
            pos += n
    finally:
        os.close(fd)


def load_average() -> str:
    """1/5/15-minute load averages: anything else running on the 2 vCPUs skews the runs."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def busy_warning(load: str) -> None:
    if float(load.split()[0] if load != "?" else 0) > 1.0:
        print(
            f"warning: load average {load} - the machine is busy, "
            "expect noisy timings (medians of interleaved runs still compare like with like)"
        )


def machine_info(versions: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Date, host, CPU, memory, kernel, Python, qedkit, load; plus the first output line
    of each command in `versions` (key -> command, e.g. "qemu_img": qemu-img --version)."""
    import qedkit

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = human(kb * 1024)
    except (OSError, ValueError, IndexError):
        pass
    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "nproc": os.cpu_count(),
        "nproc_affinity": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
    }
    for key, cmd in versions.items():
        info[key] = first_line(cmd)
    info["qedkit"] = getattr(qedkit, "__version__", "?")
    info["load_at_start"] = load_average()
    return info


def print_machine(machine: Mapping[str, Any], tools: Sequence[str]) -> None:
    """The header lines: date, machine, kernel (+ the versions named in `tools`), load."""
    print(f"date     {machine['date']}")
    print(
        f"machine  {machine['host']}: nproc {machine['nproc']} "
        f"(affinity {machine['nproc_affinity']}), "
        f"{machine['cpu']}, {machine['memory']} RAM"
    )
    extra = "".join(f"; {machine[t]}" for t in tools)
    print(
        f"kernel   {machine['kernel']}; Python {machine['python']}{extra}; "
        f"qedkit {machine['qedkit']}"
    )
    print(
        f"load     {machine['load_at_start']} at start, {machine['load_at_end']} at end "
        "(1/5/15 min)"
    )


def print_table(header: Sequence[str], table: Sequence[Sequence[str]]) -> None:
    widths = [max(len(x[c]) for x in (header, *table)) for c in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for t in table:
        print(line.format(*t))


def print_ab_rows(rows: Sequence[Any], a: str, b: str, *, named: bool = False) -> None:
    """Print rows of A/B samples (each with ``name``, ``unit``, lists ``a`` and ``b``,
    ``goal`` and ``ratio()``): a table of the medians under the headings ``a`` and
    ``b``, then a line per row with the spread (min-max) of each side. ``named``: each
    median cell starts with the row's ``a_name`` / ``b_name``. MB/s without decimals,
    other units with two."""
    table = []
    for row in rows:
        fmt = "{:.0f}" if row.unit == "MB/s" else "{:.2f}"
        a_cell = f"{fmt.format(statistics.median(row.a))} {row.unit}"
        b_cell = f"{fmt.format(statistics.median(row.b))} {row.unit}"
        if named:
            a_cell, b_cell = f"{row.a_name}: {a_cell}", f"{row.b_name}: {b_cell}"
        table.append([row.name, a_cell, b_cell, f"{row.ratio():.2f}x", row.goal])
    print()
    print_table(["row", a, b, "ratio", "goal"], table)
    print()
    for row in rows:
        fmt = "{:.0f}" if row.unit == "MB/s" else "{:.2f}"
        spread_a = "-".join(fmt.format(x) for x in (min(row.a), max(row.a)))
        spread_b = "-".join(fmt.format(x) for x in (min(row.b), max(row.b)))
        print(f"spread   {row.name.strip()}: {a} {spread_a}, {b} {spread_b} {row.unit}")


def bytecode_env(d: Path) -> tuple[dict[str, str], str]:
    """The environment for the qed subprocesses: bytecode caching on, with the cache in
    the work directory. With PYTHONDONTWRITEBYTECODE set (as in this project's
    environment) every `qed` run would compile all of qedkit's modules again (~0.1 s),
    which an installed package never does; PYTHONPYCACHEPREFIX keeps the .pyc files out
    of the source tree."""
    env = os.environ.copy()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(d / "pycache")
    return env, f"bytecode cached in {d / 'pycache'} (PYTHONDONTWRITEBYTECODE unset for qed)"


def qed_command(arg: str | None) -> list[str]:
    if arg:
        return arg.split()
    beside = Path(sys.executable).parent / "qed"  # the venv's console script
    if beside.exists():
        return [str(beside)]
    found = shutil.which("qed")
    return [found] if found else [sys.executable, "-m", "qedkit"]


def qed_python(qed: Sequence[str]) -> str:
    """The interpreter that runs `qed`: qed[0] if it is one, else the script's #! line
    (the venv's python for the venv's console script), else this interpreter."""
    first = qed[0]
    if os.path.basename(first).startswith("python"):
        return first
    try:
        with open(shutil.which(first) or first, "rb") as f:
            words = f.readline(512).removeprefix(b"#!").decode(errors="replace").split()
    except OSError:
        return sys.executable
    if words and os.path.basename(words[0]) == "env":
        words = words[1:]
    return words[0] if words and "python" in os.path.basename(words[0]) else sys.executable
