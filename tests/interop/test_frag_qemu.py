"""``qed frag`` on images QEMU fragmented, with QEMU as the judge.

* allocated and fragmented clusters equal ``qemu-img check``'s, on images qemu-io
  wrote in shuffled order (several geometries, zero clusters, multi-cluster writes);
* runs, host extents and clusters away from home equal what ``qemu-img map`` shows:
  each of its data entries is one host-contiguous extent, a run is a chain of
  guest-adjacent data entries, and a cluster is at home when it sits where the
  packed layout puts it: past the L1 table (QEMU's layout: 1 + table_size clusters)
  and the L2 tables (counted in the L1 table, read from the file), the allocated
  clusters one after the other in guest order;
* after ``qed defrag``: nothing away from home, one extent per run, the same guest
  bytes (``qemu-img compare``), and still qemu-img check's figures;
* the pictures are valid and differ between the two; the report never writes.

(Named test_frag_qemu.py, not test_frag.py: pytest's default import mode cannot
collect two test modules with the same basename, and tests/unit/test_frag.py exists.)
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qedtest import Qemu, qed

pytestmark = pytest.mark.qemu

KiB = 1 << 10
MiB = 1 << 20


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def frag_json(path: Path, *extra: str) -> dict[str, Any]:
    result = qed("frag", "--output=json", *extra, path, check=True)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def qemu_check(qemu: Qemu, path: Path) -> dict[str, Any]:
    result = qemu.img("check", "-f", "qed", "--output=json", path, check=False)
    assert result.returncode in (0, 3), result.stderr  # clean, or leaks (after defrag)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@dataclass
class MapFigures:
    runs: int
    extents: int
    max_extents: int
    away: int


def map_figures(qemu: Qemu, path: Path, cluster_size: int, table_size: int) -> MapFigures:
    """Runs, extents and clusters away from home, from ``qemu-img map`` and the L1
    table (how many L2 tables there are)."""
    entries = json.loads(qemu.img("map", "-f", "qed", "--output=json", path).stdout)
    table_bytes = table_size * cluster_size
    with open(path, "rb") as f:
        f.seek(cluster_size)  # QEMU puts the L1 table right after the header cluster
        l1 = struct.unpack(f"<{table_bytes // 8}Q", f.read(table_bytes))
    home = (1 + table_size) * cluster_size + sum(1 for e in l1 if e) * table_bytes
    runs = extents = max_extents = current = away = 0
    end = -1  # guest offset after the previous data entry
    for e in entries:
        if not e["data"]:
            continue
        assert "offset" in e, e
        extents += 1
        if e["start"] == end:
            current += 1
        else:
            runs += 1
            current = 1
        max_extents = max(max_extents, current)
        end = e["start"] + e["length"]
        for k in range(0, e["length"], cluster_size):  # packed homes, cluster by cluster
            away += e["offset"] + k != home
            home += cluster_size
    return MapFigures(runs, extents, max_extents, away)


def qemu_fragment(
    qemu: Qemu, path: Path, size: int, cluster_size: int, table_size: int, seed: int
) -> None:
    """A QED image written by qemu-io: zero clusters first, then single clusters and
    short runs in shuffled order (small requests: QEMU 7.2 mishandles an allocating
    write of about cluster_size clusters)."""
    qemu.img(
        "create", "-f", "qed", "-o", f"cluster_size={cluster_size},table_size={table_size}",
        path, str(size),
    )  # fmt: skip
    rnd = random.Random(seed)
    total = size // cluster_size
    clusters = list(range(total))
    rnd.shuffle(clusters)
    zeroed = set(clusters[: total // 20])
    commands = [f"write -z {c * cluster_size} {cluster_size}" for c in sorted(zeroed)]
    for c in clusters[total // 20 : total * 3 // 4]:
        want, n = rnd.choice((1, 1, 1, 2, 3)), 1
        while n < want and c + n < total and c + n not in zeroed:  # zero clusters stay
            n += 1
        commands.append(f"write -P {c % 250 + 1} {c * cluster_size} {n * cluster_size}")
    for start in range(0, len(commands), 400):
        args: list[str] = []
        for command in commands[start : start + 400]:
            args += ["-c", command]
        qemu.io("-f", "qed", *args, path)


def decode_png(data: bytes) -> tuple[int, int]:
    """Signature, chunk CRCs, IHDR and the size of the decompressed IDAT."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert data[pos + 8 + length : pos + 12 + length] == struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF
        )
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    return width, height


GEOMETRIES = [
    pytest.param(4 * KiB, 2, 12 * MiB + 8 * KiB, id="4k-t2-3tables"),
    pytest.param(64 * KiB, 4, 64 * MiB, id="64k-t4"),
    pytest.param(4 * KiB, 4, 10 * MiB, id="4k-t4-2tables"),
]


@pytest.mark.parametrize(("cluster_size", "table_size", "size"), GEOMETRIES)
def test_figures_match_qemu_img_check_and_map(
    qemu: Qemu, tmp_path: Path, cluster_size: int, table_size: int, size: int
) -> None:
    path = tmp_path / "frag.qed"
    qemu_fragment(qemu, path, size, cluster_size, table_size, seed=size)
    before = sha256(path)
    ours = frag_json(path)
    check = qemu_check(qemu, path)
    assert ours["allocated-clusters"] == check.get("allocated-clusters", 0) > 0
    assert ours["fragmented-clusters"] == check.get("fragmented-clusters", 0) > 0
    assert ours["total-clusters"] == check["total-clusters"]
    assert ours["data-start"] == (1 + table_size) * cluster_size
    assert ours["zero-clusters"] == (size // cluster_size) // 20
    fig = map_figures(qemu, path, cluster_size, table_size)
    assert (ours["runs"], ours["host-extents"], ours["max-extents-per-run"]) == (
        fig.runs,
        fig.extents,
        fig.max_extents,
    )
    assert ours["away-from-home-clusters"] == fig.away
    assert ours["raw-like"] is False
    assert sha256(path) == before


def test_defrag_makes_a_qemu_image_raw_like(qemu: Qemu, tmp_path: Path) -> None:
    cs, ts = 64 * KiB, 4
    path = tmp_path / "frag.qed"
    qemu_fragment(qemu, path, 48 * MiB, cs, ts, seed=7)
    original = tmp_path / "original.qed"
    original.write_bytes(path.read_bytes())
    before = frag_json(path)
    assert before["away-from-home-percent"] > 90
    assert qed("defrag", "-q", path).returncode == 0
    after = frag_json(path)
    assert after["away-from-home-clusters"] == 0
    assert after["host-extents"] == after["runs"] == before["runs"]
    assert after["raw-like"] is True and after["max-extents-per-run"] == 1
    assert after["allocated-clusters"] == before["allocated-clusters"]
    check = qemu_check(qemu, path)
    assert after["allocated-clusters"] == check["allocated-clusters"]
    assert after["fragmented-clusters"] == check.get("fragmented-clusters", 0) == 0
    assert "leaks" not in check, check  # packed: no holes, nothing for a checker to call leaked
    fig = map_figures(qemu, path, cs, ts)
    assert (fig.runs, fig.extents, fig.away) == (after["runs"], after["runs"], 0)
    assert qemu.img("compare", "-f", "qed", "-F", "qed", original, path).returncode == 0


def test_pictures_are_valid_and_show_the_defragmentation(qemu: Qemu, tmp_path: Path) -> None:
    path = tmp_path / "frag.qed"
    qemu_fragment(qemu, path, 32 * MiB, 64 * KiB, 4, seed=3)
    tidy = tmp_path / "tidy.qed"
    tidy.write_bytes(path.read_bytes())
    assert qed("defrag", "-q", tidy).returncode == 0
    pictures: dict[str, bytes] = {}
    for image in (path, tidy):
        before = sha256(image)
        for ext in ("png", "svg"):
            out = tmp_path / f"{image.stem}.{ext}"
            result = qed("frag", "--picture", out, image, check=True)
            assert result.stdout.endswith(f"picture: {out}\n")
            pictures[f"{image.stem}.{ext}"] = out.read_bytes()
        assert sha256(image) == before
    assert decode_png(pictures["frag.png"]) == decode_png(pictures["tidy.png"])
    assert pictures["frag.png"] != pictures["tidy.png"]
    ns = "{http://www.w3.org/2000/svg}"
    frag_svg = ET.fromstring(pictures["frag.svg"])
    tidy_svg = ET.fromstring(pictures["tidy.svg"])
    assert frag_svg.tag == tidy_svg.tag == f"{ns}svg"
    assert pictures["frag.svg"] != pictures["tidy.svg"]
    titles = [t.text or "" for t in tidy_svg.iter(f"{ns}text")]
    assert any("raw-like" in t for t in titles)
    assert any("away from home 0.00%" in t for t in titles)


def test_force_share_reads_an_image_another_process_writes(tmp_path: Path, qemu: Qemu) -> None:
    path = tmp_path / "busy.qed"
    qemu_fragment(qemu, path, 4 * MiB, 64 * KiB, 4, seed=1)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, qedkit; img = qedkit.open(sys.argv[1]); print(flush=True); "
            "sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        holder.stdout.readline()  # the writer has the image open (and locked)
        before = sha256(path)
        locked = qed("frag", path)
        assert locked.returncode == 1
        assert locked.stderr.startswith(f"qed: {path}: ")
        shared = qed("frag", "-U", "--output=json", path, check=True)
        assert json.loads(shared.stdout)["allocated-clusters"] > 0
        assert sha256(path) == before
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.stdout.close()
