"""``qed frag --picture``: both axes labelled with ticks in human sizes, and the guest
axis zoomed to the written range when only part of the disk is written (the title says
so, with the range), in SVG and in PNG."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

import qedkit
from qedkit.cli import picture
from qedkit.cli.main import main
from qedkit.engine.qed import QedImage
from qedkit.engine.sync import run
from qedkit.jobs.frag import FragReport, fragmentation_report

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SVG = "{http://www.w3.org/2000/svg}"
NewImage = Callable[..., Path]


def image_with(new_image: NewImage, size: int, *writes: tuple[int, int]) -> Path:
    path = new_image("img.qed", size=size)
    with qedkit.open(str(path)) as img:
        for offset, length in writes:
            img.write(offset, b"\x11" * length)
    return path


def report_of(path: Path, window: tuple[int, int] | None = None) -> FragReport:
    with qedkit.open(str(path), readonly=True) as img:
        assert isinstance(img.engine, QedImage)
        return run(fragmentation_report(img.engine, grid=picture.GRID, guest_window=window))


def svg_texts(svg: bytes) -> list[tuple[float, float, str]]:
    root = ET.fromstring(svg)
    return [
        (float(e.attrib["x"]), float(e.attrib["y"]), e.text or "") for e in root.iter(f"{SVG}text")
    ]


def data_rects(svg: bytes) -> list[tuple[int, int]]:
    """(x, width) of the scatter's data cells."""
    shades = {
        picture._hex(picture._shade(c, level))
        for c in (picture.HOME, picture.AWAY)
        for level in range(4)
    }
    root = ET.fromstring(svg)
    return [
        (int(e.attrib["x"]), int(e.attrib["width"]))
        for e in root.iter(f"{SVG}rect")
        if e.attrib["fill"] in shades and picture.TOP <= int(e.attrib["y"]) < picture.PLOT_BOTTOM
    ]


def png_pixels(png: bytes) -> tuple[int, int, bytes]:
    width, height = struct.unpack(">II", png[16:24])
    pos, idat = 8, b""
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        if png[pos + 4 : pos + 8] == b"IDAT":
            idat += png[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    return width, height, b"".join(raw[r * stride + 1 : (r + 1) * stride] for r in range(height))


# ---- tick labels and steps ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (0, "0"),
        (512, "512"),
        (64 * KiB, "64K"),
        (256 * MiB, "256M"),
        (GiB, "1G"),
        (3 * GiB // 2, "1.5G"),
        (5 * GiB // 4, "1.25G"),
        (768 * MiB, "768M"),
        (5832704, "5.56M"),
        (1 << 40, "1T"),
    ],
)
def test_tick_labels_are_short_binary_sizes(value: int, label: str) -> None:
    assert picture.tick_label(value) == label


@pytest.mark.parametrize(
    ("span", "step"),
    [(GiB, 256 * MiB), (80 * MiB, 16 * MiB), (5 * MiB, MiB), (768 * MiB, 128 * MiB), (3, 1)],
)
def test_tick_steps_are_powers_of_two_giving_four_to_eight_intervals(span: int, step: int) -> None:
    assert picture.tick_step(span) == step
    if span >= 4:
        assert 4 <= span // step < 8


# ---- zoom -----------------------------------------------------------------------------------


def test_the_report_knows_the_written_range(new_image: NewImage) -> None:
    path = image_with(new_image, GiB, (3 * MiB, 2 * MiB), (900 * MiB, 64 * KiB))
    r = report_of(path)
    assert (r.allocated_start, r.allocated_end) == (3 * MiB, 900 * MiB + 64 * KiB)
    empty = report_of(new_image("e.qed", size=GiB))
    assert (empty.allocated_start, empty.allocated_end) == (0, 0)
    assert picture.zoom_window(empty) is None


def test_zoom_window_of_a_small_written_range(new_image: NewImage) -> None:
    r = report_of(image_with(new_image, GiB, (0, 5 * MiB)))
    assert picture.zoom_window(r) == (0, 5 * MiB // (64 * KiB))
    far = report_of(image_with(new_image, GiB, (1000 * MiB, 5 * MiB)))
    assert far.allocated_start == 1000 * MiB
    first, end = picture.zoom_window(far) or (0, 0)
    assert first * 64 * KiB <= 1000 * MiB and end * 64 * KiB >= 1005 * MiB
    assert (end - first) * 64 * KiB <= 8 * MiB


def test_no_zoom_when_most_of_the_disk_is_written(new_image: NewImage) -> None:
    r = report_of(image_with(new_image, 64 * MiB, (0, 64 * KiB), (60 * MiB, 64 * KiB)))
    assert picture.zoom_window(r) is None
    assert not picture.zoomed(r)
    assert not any("zoomed" in line for line in picture.title_lines(r))


def test_a_guest_window_changes_the_picture_not_the_figures(new_image: NewImage) -> None:
    path = image_with(new_image, GiB, (0, 3 * MiB), (4 * MiB, 64 * KiB))
    whole = report_of(path)
    window = picture.zoom_window(whole)
    assert window is not None
    zoomed = report_of(path, window)
    assert zoomed.layout is not None and whole.layout is not None
    figures = ("allocated_clusters", "fragmented_clusters", "away_clusters", "runs", "extents")
    assert [getattr(zoomed, f) for f in figures] == [getattr(whole, f) for f in figures]
    assert (zoomed.layout.guest_start, zoomed.layout.guest_clusters) == (
        window[0],
        window[1] - window[0],
    )
    # every written cluster is in the zoomed sample, spread over its buckets
    drawn = sum(zoomed.layout.guest_home) + sum(zoomed.layout.guest_away)
    assert drawn == zoomed.allocated_clusters == 49
    assert (
        sum(
            1
            for b in range(zoomed.layout.guest_buckets)
            if zoomed.layout.guest_home[b] or zoomed.layout.guest_away[b]
        )
        > 40
    )


def test_a_window_that_cuts_a_run_draws_only_its_part(new_image: NewImage) -> None:
    path = image_with(new_image, 64 * MiB, (0, 4 * MiB))
    r = report_of(path, (16, 48))  # clusters 16 .. 48 of the 64 written
    assert r.layout is not None
    assert sum(r.layout.guest_home) + sum(r.layout.guest_away) == 32


# ---- the pictures -----------------------------------------------------------------------------


def test_one_gib_disk_with_5_mib_written_is_drawn_zoomed(
    new_image: NewImage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = image_with(new_image, GiB, (0, 5 * MiB))
    svg_path, png_path = tmp_path / "p.svg", tmp_path / "p.png"
    assert main(["frag", "--picture", str(svg_path), str(path)]) == 0
    assert main(["frag", "--picture", str(png_path), str(path)]) == 0
    capsys.readouterr()
    svg = svg_path.read_bytes()
    texts = [t for _, _, t in svg_texts(svg)]
    assert "zoomed to guest 0-5M of 1G: nothing is written outside" in texts
    for label in ("0", "1M", "2M", "3M", "4M", "5M", "guest offset", "host offset"):
        assert label in texts, label
    # the data fill the plot's width, not a sliver at its left edge
    cells = data_rects(svg)
    assert max(x + w for x, w in cells) > picture.LEFT + picture.PLOT * 0.9
    width, height, pixels = png_pixels(png_path.read_bytes())
    assert (width, height) == (picture.WIDTH, picture.HEIGHT)
    home = {picture._shade(picture.HOME, level) for level in range(4)}
    home |= {picture._shade(picture.AWAY, level) for level in range(4)}
    xs = [
        x
        for y in range(picture.TOP, picture.PLOT_BOTTOM)
        for x in range(picture.LEFT, picture.LEFT + picture.PLOT, 8)
        if tuple(pixels[(y * width + x) * 3 : (y * width + x) * 3 + 3]) in home
    ]
    assert xs and max(xs) - min(xs) > picture.PLOT * 0.8


def test_both_axes_are_labelled_with_ticks(new_image: NewImage) -> None:
    path = image_with(new_image, GiB, (0, 64 * KiB), (GiB - 64 * KiB, 64 * KiB))
    r = report_of(path)
    assert not picture.zoomed(r)
    texts = svg_texts(picture.render(r, "p.svg"))
    below = sorted(
        (x, t)
        for x, y, t in texts
        if x >= picture.LEFT and picture.PLOT_BOTTOM < y < picture.STRIP_TOP and t != "guest offset"
    )
    assert [t for _, t in below] == ["0", "256M", "512M", "768M", "1G"]
    xs = [x for x, _ in below]
    assert xs == [picture.LEFT + k * picture.PLOT // 4 for k in range(5)]
    left = [
        (y, t)
        for x, y, t in texts
        if x <= picture.LEFT - 14 and picture.TOP < y < picture.PLOT_BOTTOM + 8
    ]
    labels = [t for _, t in sorted(left, reverse=True)]
    assert labels[0] == "0" and picture.tick_label(r.file_size) in labels
    assert len(labels) >= 5 + 2  # ticks, the file's end and "end of file"


def test_png_text_can_be_centred() -> None:
    a, b = picture.Canvas(60, 10), picture.Canvas(60, 10)
    a.text(picture.Text(30, 0, "ab", 1, anchor="middle"))
    b.text(picture.Text(24, 0, "ab", 1))
    assert a.pixels == b.pixels
