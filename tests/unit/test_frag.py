"""``qed frag``: the fragmentation report (jobs.frag), its pictures (cli.picture) and
the command, on images qedkit makes (the QEMU-made ones are in
tests/interop/test_frag_qemu.py).

Expected figures are computed from the actual layout (the L2 entries read back) by a
naive per-cluster reference, never from where we think the allocator put things.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import tracemalloc
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import qedkit
from qedkit.cli import picture
from qedkit.cli.main import main
from qedkit.cli.output import frag_dict, frag_human
from qedkit.engine.check import check_image
from qedkit.engine.qed import QedImage
from qedkit.engine.sync import run
from qedkit.jobs.frag import FragReport, fragmentation_report

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

NewImage = Callable[..., Path]


# ---- helpers -------------------------------------------------------------------------


def report_of(path: Path, grid: int = 0) -> FragReport:
    with qedkit.open(str(path), readonly=True) as img:
        assert isinstance(img.engine, QedImage)
        return run(fragmentation_report(img.engine, grid=grid))


def l2_entries(path: Path) -> tuple[list[int], int, int]:
    """Every guest cluster's L2 entry (0 where no table), the cluster size and the
    data area start, read back through the engine."""
    with qedkit.open(str(path), readonly=True) as img:
        eng = img.engine
        assert isinstance(eng, QedImage)
        per_table = eng.geo.l2_entries
        total = eng.geo.bytes_to_clusters(eng.size)
        entries: list[int] = []
        for l1_index in range(-(-total // per_table)):
            table = run(eng.get_l2(l1_index))
            entries += list(table) if table is not None else [0] * per_table
        return entries[:total], eng.cluster_size, eng.data_start


@dataclass
class Expected:
    allocated: int = 0
    fragmented: int = 0
    zero: int = 0
    away: int = 0
    runs: int = 0
    extents: int = 0
    max_extents: int = 0


def homes(path: Path) -> Callable[[int, int], int]:
    """home(guest cluster, rank among the allocated ones): where defragmentation puts
    it. Identity layout (home allocation policy): data start + guest offset; packed:
    past the L2 tables, the allocated clusters one after the other."""
    with qedkit.open(str(path), readonly=True) as img:
        eng = img.engine
        assert isinstance(eng, QedImage)
        ds, cs, tables = eng.data_start, eng.cluster_size, sum(1 for e in eng.l1_table if e)
        identity, table_bytes = eng.home_allocation, eng.geo.table_bytes
    if identity:
        return lambda g, rank: ds + g * cs
    return lambda g, rank: ds + tables * table_bytes + rank * cs


def reference(path: Path) -> Expected:
    """The figures, cluster by cluster, straight from the definitions."""
    entries, cs, _ds = l2_entries(path)
    home = homes(path)
    with qedkit.open(str(path), readonly=True) as img:
        assert isinstance(img.engine, QedImage)
        per_table = img.engine.geo.l2_entries
    exp = Expected()
    last = 0  # qemu-img check: the previous allocated entry of the same table
    prev: int | None = None  # host offset of the previous guest cluster, if data
    current = 0
    for g, entry in enumerate(entries):
        if g % per_table == 0:
            last = 0
        if entry <= 1:
            exp.zero += entry == 1
            prev = None
            continue
        exp.allocated += 1
        if last and last + cs != entry:
            exp.fragmented += 1
        last = entry
        exp.away += entry != home(g, exp.allocated - 1)
        if prev is None:
            exp.runs += 1
            exp.extents += 1
            current = 1
        elif entry != prev + cs:
            exp.extents += 1
            current += 1
        exp.max_extents = max(exp.max_extents, current)
        prev = entry
    return exp


def figures(r: FragReport) -> Expected:
    return Expected(
        r.allocated_clusters,
        r.fragmented_clusters,
        r.zero_clusters,
        r.away_clusters,
        r.runs,
        r.extents,
        r.max_extents,
    )


def check_figures(path: Path) -> tuple[int, int]:
    with qedkit.open(str(path), readonly=True, auto_repair=False) as img:
        assert isinstance(img.engine, QedImage)
        report = run(check_image(img.engine))
    return report.allocated_clusters, report.fragmented_clusters


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_shuffled(path: Path, clusters: list[int], cs: int, seed: int = 1) -> None:
    order = list(clusters)
    random.Random(seed).shuffle(order)
    with qedkit.open(str(path)) as img:
        for c in order:
            img.write(c * cs, bytes([c % 251 + 1]) * cs)


def defrag(path: Path) -> None:
    assert main(["defrag", "-q", str(path)]) == 0


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """Check a PNG's structure (signature, CRCs, IHDR, IDAT size, filter bytes) and
    return width, height and the RGB pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for k, body in chunks if k == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    assert all(raw[row * stride] == 0 for row in range(height))
    pixels = b"".join(raw[row * stride + 1 : (row + 1) * stride] for row in range(height))
    return width, height, pixels


AWAY_SHADES = {picture._shade(picture.AWAY, level) for level in range(4)}
HOME_SHADES = {picture._shade(picture.HOME, level) for level in range(4)}


def plot_colours(png: bytes) -> dict[tuple[int, int, int], int]:
    """How many pixels of each colour the scatter area holds."""
    width, _, pixels = decode_png(png)
    counts: dict[tuple[int, int, int], int] = {}
    for y in range(picture.TOP, picture.PLOT_BOTTOM):
        for x in range(picture.LEFT, picture.LEFT + picture.PLOT):
            i = (y * width + x) * 3
            key = (pixels[i], pixels[i + 1], pixels[i + 2])
            counts[key] = counts.get(key, 0) + 1
    return counts


def svg_fills(svg: bytes, plot_only: bool = False) -> list[str]:
    """The fill colours of the rects of an SVG picture (of the scatter only)."""
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    rects = list(root.iter("{http://www.w3.org/2000/svg}rect"))
    if plot_only:
        rects = [
            e
            for e in rects
            if int(e.attrib["x"]) >= picture.LEFT
            and picture.TOP <= int(e.attrib["y"]) < picture.PLOT_BOTTOM
        ]
    return [e.attrib["fill"] for e in rects]


# ---- figures on hand-made images ---------------------------------------------------


def test_empty_image(new_image: NewImage) -> None:
    path = new_image(size=10 * MiB + 512)
    r = report_of(path, grid=picture.GRID)
    assert r.total_clusters == 161  # ceil(10 MiB + 512 / 64 KiB)
    assert figures(r) == Expected()
    assert (r.fragmented_percent, r.away_percent, r.mean_extents) == (0.0, 0.0, 0.0)
    assert r.raw_like  # nothing to read, nothing scattered
    assert r.data_start == 5 * 64 * KiB  # header cluster, then a 4-cluster L1
    assert r.file_size == path.stat().st_size
    assert r.layout is not None
    assert sum(r.layout.home) + sum(r.layout.away) == 0


def test_three_clusters_written_backwards_by_hand(new_image: NewImage) -> None:
    """Guest clusters 3, then 1, then 2: cluster 3 lands first, its L2 table after it,
    then 1 and 2 side by side."""
    path = new_image(size=MiB)
    with qedkit.open(str(path)) as img:
        for c in (3, 1, 2):
            img.write(c * 64 * KiB, b"\xaa" * 64 * KiB)
    entries, cs, ds = l2_entries(path)
    assert ds == 0x50000
    first = entries[3]
    assert entries[:4] == [0, first + 5 * cs, first + 6 * cs, first]  # table in between
    r = report_of(path)
    assert (r.allocated_clusters, r.fragmented_clusters) == (3, 1)  # 3 does not follow 2
    assert r.away_clusters == 3  # the table took cluster 1's home: everything shifted
    assert (r.runs, r.extents, r.max_extents) == (1, 2, 2)  # 1-2 contiguous, 3 apart
    assert r.mean_extents == 2.0
    assert not r.raw_like
    assert figures(r) == reference(path)


def test_zero_clusters_end_runs_and_do_not_count_as_gaps_for_qemu(new_image: NewImage) -> None:
    path = new_image(size=MiB)
    cs = 64 * KiB
    with qedkit.open(str(path)) as img:
        img.write(10 * cs, b"\x03" * cs)  # first: allocates the L2 table
        img.write(0, b"\x01" * 2 * cs)  # clusters 0-1, one allocation
        img.write_zeroes(2 * cs, cs)  # cluster 2: a zero cluster
        img.write(3 * cs, b"\x02" * cs)  # cluster 3: right after 1 in the file
    entries, _, _ = l2_entries(path)
    assert entries[2] == 1 and entries[3] == entries[1] + cs
    r = report_of(path)
    assert r.zero_clusters == 1
    # qemu-img check skips the zero cluster (3 follows 1); 10 does not follow 3
    assert r.fragmented_clusters == 1
    assert (r.runs, r.extents) == (3, 3)  # but the guest sees runs 0-1, 3 and 10
    assert r.raw_like
    assert figures(r) == reference(path)


@pytest.mark.parametrize("seed", range(6))
def test_random_layouts_match_the_reference_and_the_check(new_image: NewImage, seed: int) -> None:
    """4 KiB clusters and 2-cluster tables: 1024 clusters per L2 table, so runs cross
    table boundaries and several tables interleave with the data."""
    rnd = random.Random(seed)
    cs = 4 * KiB
    path = new_image(size=4 * MiB + 3 * cs, cluster_size=cs, table_size=2)
    total = (4 * MiB + 3 * cs) // cs
    with qedkit.open(str(path)) as img:
        for _ in range(rnd.randrange(50, 400)):
            c = rnd.randrange(total)
            n = min(total - c, rnd.choice((1, 1, 1, 2, 5, 40)))
            if rnd.random() < 0.15:
                img.write_zeroes(c * cs, n * cs)
            else:
                img.write(c * cs, bytes([rnd.randrange(1, 256)]) * (n * cs))
    r = report_of(path, grid=64)
    expected = reference(path)
    assert figures(r) == expected
    assert (r.allocated_clusters, r.fragmented_clusters) == check_figures(path)
    assert r.raw_like == (expected.extents == expected.runs)
    # the down-sampled picture accounts for every cluster
    layout = r.layout
    assert layout is not None
    assert layout.guest_buckets == 64 and layout.host_buckets <= 64
    assert sum(layout.home) + sum(layout.away) == r.allocated_clusters
    assert sum(layout.home) == r.allocated_clusters - r.away_clusters
    assert sum(layout.guest_home) + sum(layout.guest_away) == r.allocated_clusters
    assert sum(layout.guest_zero) == r.zero_clusters
    assert sum(layout.guest_bucket_size(b) for b in range(64)) == total
    assert sum(layout.host_bucket_size(b) for b in range(layout.host_buckets)) == (
        layout.host_clusters
    )


def test_sequential_image_is_contiguous_but_shifted_by_its_tables(new_image: NewImage) -> None:
    """Written front to back, a QED image is one host extent per L2 table, not raw-like:
    each new table is allocated in the middle of the data."""
    cs = 4 * KiB
    path = new_image(size=16 * MiB, cluster_size=cs, table_size=2)  # 4 L2 tables
    with qedkit.open(str(path)) as img:
        for pos in range(0, 16 * MiB, 256 * KiB):
            img.write(pos, b"\x11" * (256 * KiB))
    entries, _, ds = l2_entries(path)
    assert entries[0] == ds and entries[64] == ds + 66 * cs  # the first table in between
    r = report_of(path)
    assert r.allocated_clusters == 4096
    assert r.runs == 1
    assert r.extents == 5  # each table is allocated after the first write into its span
    # Packed homes put the four tables first: only the clusters after the last table
    # (the last span but its first write) sit where defragmentation would put them.
    assert r.away_clusters == 4096 - (1024 - 64)
    assert figures(r) == reference(path)
    assert (r.allocated_clusters, r.fragmented_clusters) == check_figures(path)


def test_defragmented_image_is_raw_like_and_at_home(new_image: NewImage) -> None:
    cs = 4 * KiB
    path = new_image(size=2 * MiB, cluster_size=cs, table_size=2)
    clusters = [c for c in range(512) if c % 7 not in (3, 4)]
    write_shuffled(path, clusters, cs)
    before = report_of(path)
    assert before.away_percent > 90 and before.extents > before.runs
    defrag(path)
    after = report_of(path)
    assert after.allocated_clusters == before.allocated_clusters
    assert after.away_clusters == 0
    assert after.extents == after.runs == before.runs
    assert after.raw_like and after.max_extents == 1
    assert figures(after) == reference(path)
    assert (after.allocated_clusters, after.fragmented_clusters) == check_figures(path)


def test_home_allocation_keeps_an_image_raw_like(new_image: NewImage) -> None:
    cs = 64 * KiB
    path = new_image(size=8 * MiB, allocation="home")
    write_shuffled(path, list(range(0, 128, 3)), cs)
    with qedkit.open(str(path), readonly=True) as img:
        eng = img.engine
        assert isinstance(eng, QedImage)
        tables = [(off, off + eng.geo.table_bytes) for off in eng.l1_table if off]
    # a cluster whose home an L2 table took has to live elsewhere
    blocked = [c for c in range(0, 128, 3) if any(a <= 0x50000 + c * cs < b for a, b in tables)]
    r = report_of(path)
    assert r.allocated_clusters == 43
    assert r.away_clusters == len(blocked) <= 1
    assert r.raw_like and r.runs == 43
    assert figures(r) == reference(path)


def test_duplicate_tables_are_skipped_as_the_check_skips_them(new_image: NewImage) -> None:
    """Two L1 entries sharing a table, and a data entry on a third table: the check
    counts neither second table's entries; the report must count as it does."""
    cs = 4 * KiB
    path = new_image(size=16 * MiB, cluster_size=cs, table_size=2)
    with qedkit.open(str(path)) as img:
        for table in range(4):  # one cluster in each of the four 4 MiB spans
            for k in range(3):
                img.write(table * 4 * MiB + (k * 5) * cs, b"\x33" * cs)
        eng = img.engine
        assert isinstance(eng, QedImage)
        l1_offset = eng.header.l1_table_offset
        l1 = list(eng.l1_table[:4])
        entry_offset = l1[0] + 8 * 5  # table 0, entry 5 (a data cluster)
    with path.open("r+b") as f:
        f.seek(l1_offset + 8)
        f.write(struct.pack("<Q", l1[0]))  # L1[1] = L1[0]
        f.seek(entry_offset)
        f.write(struct.pack("<Q", l1[3]))  # a data entry on table 3's first cluster
    r = report_of(path)
    assert (r.allocated_clusters, r.fragmented_clusters) == check_figures(path)
    assert r.allocated_clusters == 6  # tables 0 and 2 only


def test_a_one_tib_image_streams(new_image: NewImage) -> None:
    """1 TiB of guest clusters (16 Mi): the report and the picture cost their tables
    and a few counters, not a list per cluster."""
    path = new_image(size=TiB)
    offsets = [0, 64 * KiB, 3 * GiB, 100 * GiB, 517 * GiB + 7 * 64 * KiB, TiB - 64 * KiB]
    with qedkit.open(str(path)) as img:
        for off in offsets:
            img.write(off, b"\x77" * 64 * KiB)
    tracemalloc.start()
    try:
        r = report_of(path, grid=picture.GRID)
        png = picture.render(r, "x.png")
        svg = picture.render(r, "x.svg")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * MiB, peak
    assert r.total_clusters == 16 * MiB
    assert r.allocated_clusters == 6
    assert r.runs == 5  # clusters 0 and 1 are one run
    assert r.layout is not None and r.layout.guest_buckets == picture.GRID
    assert figures(r).allocated == sum(r.layout.home) + sum(r.layout.away)
    decode_png(png)
    svg_fills(svg)


# ---- never writes --------------------------------------------------------------------


def test_the_report_never_writes(new_image: NewImage, tmp_path: Path) -> None:
    cs = 4 * KiB
    path = new_image(size=MiB, cluster_size=cs, table_size=2)
    write_shuffled(path, list(range(0, 256, 2)), cs)
    before, stat = sha256(path), path.stat()
    for extra in ([], ["--output=json"], ["--picture", str(tmp_path / "p.png")]):
        assert main(["frag", *extra, str(path)]) == 0
    assert sha256(path) == before
    assert path.stat().st_mtime_ns == stat.st_mtime_ns


# ---- pictures --------------------------------------------------------------------------


@pytest.fixture
def fragmented_and_defragmented(new_image: NewImage) -> tuple[FragReport, FragReport]:
    cs = 4 * KiB
    frag = new_image("frag.qed", size=4 * MiB, cluster_size=cs, table_size=2)
    write_shuffled(frag, [c for c in range(1024) if c % 5], cs)
    with qedkit.open(str(frag)) as img:
        img.write_zeroes(600 * cs, 10 * cs)
    tidy = frag.with_name("tidy.qed")
    tidy.write_bytes(frag.read_bytes())
    defrag(tidy)
    return report_of(frag, picture.GRID), report_of(tidy, picture.GRID)


def test_png_is_valid_and_shows_the_difference(
    fragmented_and_defragmented: tuple[FragReport, FragReport],
) -> None:
    frag, tidy = fragmented_and_defragmented
    frag_png, tidy_png = picture.render(frag, "f.png"), picture.render(tidy, "t.PNG")
    assert (
        decode_png(frag_png)[:2]
        == decode_png(tidy_png)[:2]
        == (
            picture.WIDTH,
            picture.HEIGHT,
        )
    )
    assert frag_png != tidy_png
    frag_colours, tidy_colours = plot_colours(frag_png), plot_colours(tidy_png)
    # fragmented: red points all over; defragmented: green ones only
    assert sum(n for c, n in frag_colours.items() if c in AWAY_SHADES) > 1000
    assert not any(c in AWAY_SHADES for c in tidy_colours)
    assert sum(n for c, n in tidy_colours.items() if c in HOME_SHADES) > 1000


def test_svg_is_valid_xml_and_shows_the_difference(
    fragmented_and_defragmented: tuple[FragReport, FragReport],
) -> None:
    frag, tidy = fragmented_and_defragmented
    frag_svg, tidy_svg = picture.render(frag, "f.svg"), picture.render(tidy, "t.svg")
    away = {picture._hex(c) for c in AWAY_SHADES}
    home = {picture._hex(c) for c in HOME_SHADES}
    frag_fills, tidy_fills = svg_fills(frag_svg, True), svg_fills(tidy_svg, True)
    assert sum(f in away for f in frag_fills) > 100
    assert not any(f in away for f in tidy_fills)
    assert any(f in home for f in tidy_fills)
    frag_fills, tidy_fills = svg_fills(frag_svg), svg_fills(tidy_svg)
    # the strip shows zero clusters in both, and the title carries the figures
    assert picture._hex(picture.ZERO) in frag_fills and picture._hex(picture.ZERO) in tidy_fills
    texts = [e.text or "" for e in ET.fromstring(frag_svg).iter("{http://www.w3.org/2000/svg}text")]
    assert any(f"{frag.fragmented_percent:.2f}%" in t for t in texts)
    assert any("raw-like" in t for t in picture.title_lines(tidy))
    assert len(frag_svg) < 2 * MiB


def test_pictures_of_an_empty_and_a_zero_sized_image(new_image: NewImage) -> None:
    for size in (MiB, 0):
        r = report_of(new_image(f"e{size}.qed", size=size), picture.GRID)
        decode_png(picture.render(r, "e.png"))
        svg_fills(picture.render(r, "e.svg"))


def test_picture_format_by_extension() -> None:
    assert picture.picture_format("a/b.SVG") == ".svg"
    assert picture.picture_format("b.png") == ".png"
    assert picture.picture_format("b.jpg") is None
    assert picture.picture_format("png") is None


def test_text_in_png_uses_the_font_and_marks_unknown_characters() -> None:
    canvas = picture.Canvas(40, 10)
    canvas.text(picture.Text(0, 0, "a\u00e9", 1))  # é is not in the font: drawn as ?
    other = picture.Canvas(40, 10)
    other.text(picture.Text(0, 0, "a?", 1))
    assert canvas.pixels == other.pixels != picture.Canvas(40, 10).pixels


# ---- the command --------------------------------------------------------------------


def test_cli_human_and_json(
    new_image: NewImage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cs = 4 * KiB
    path = new_image(size=MiB, cluster_size=cs, table_size=2)
    write_shuffled(path, list(range(100)), cs)
    r = report_of(path)
    assert main(["frag", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == frag_human(r)
    assert f"allocated 100/256 clusters ({100 / 256 * 100:.2f}%)" in out
    assert f"fragmented {r.fragmented_percent:.2f}%" in out
    assert f"host extents {r.extents} for 1 run (max {r.max_extents}" in out
    assert main(["frag", "-f", "qed", "--output=json", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == frag_dict(r)
    assert data["allocated-clusters"] == 100 and data["runs"] == 1
    assert data["raw-like"] is False
    assert list(data)[:2] == ["filename", "format"]
    assert all(key == key.lower() and "_" not in key for key in data)
    pic = tmp_path / "out.svg"
    assert main(["frag", "--picture", str(pic), str(path)]) == 0
    assert capsys.readouterr().out.endswith(f"picture: {pic}\n")
    svg_fills(pic.read_bytes())


def test_cli_defragmented_image_reads_raw_like(
    new_image: NewImage, capsys: pytest.CaptureFixture[str]
) -> None:
    cs = 4 * KiB
    path = new_image(size=MiB, cluster_size=cs, table_size=2)
    write_shuffled(path, list(range(0, 200, 2)), cs)
    defrag(path)
    assert main(["frag", str(path)]) == 0
    out = capsys.readouterr().out
    assert "away from home 0.00% (0 clusters, packed layout)" in out
    assert "raw-like: 100 runs of data, each read with one host read" in out


def test_cli_errors(
    new_image: NewImage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    assert main(["frag", str(raw)]) == 1
    assert capsys.readouterr().err == (
        f"qed: {raw}: this image format (raw) has no clusters to report on\n"
    )
    path = new_image()
    assert main(["frag", "--picture", str(tmp_path / "p.jpg"), str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"qed: {tmp_path / 'p.jpg'}: unknown picture format: use a .svg or .png name\n"
    assert not (tmp_path / "p.jpg").exists()
    missing = tmp_path / "no-dir" / "p.png"
    assert main(["frag", "--picture", str(missing), str(path)]) == 1
    assert capsys.readouterr().err == f"qed: {missing}: No such file or directory\n"
    assert main(["frag", str(tmp_path / "nope.qed")]) == 1
    assert capsys.readouterr().err.startswith(f"qed: {tmp_path / 'nope.qed'}: ")
