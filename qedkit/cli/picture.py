"""Pictures of a QED image's layout (``qed frag --picture FILE.svg|FILE.png``).

One scene, two renderers, standard library only:

* a scatter of guest cluster (x) against host cluster (y): each cell of the grid is
  a bucket of clusters (jobs.frag.LayoutSample), green where the clusters sit at
  home, red where they are away, darker where the cell is fuller. A dashed line
  marks the home positions: a defragmented image is that straight diagonal, a
  fragmented one a cloud. Grey ticks left of the y axis are metadata (header, L1,
  L2 tables).
* under it, a strip along the guest axis: each column a stacked bar of what its
  guest clusters are: at home (green), away from home (red), zero clusters (light
  blue), unallocated (light grey).
* a title with the figures of the report.
* both axes labelled with ticks at round binary offsets (0, 256M, 512M ...), light
  grid lines through the plot at each tick.

When only part of the disk is written, the guest axis zooms to it (``zoom_window``:
the range from the first to the last data or zero cluster, rounded out to ticks,
when it is less than half of the disk), and the title says so and gives the range:
a 1 GiB disk with 5 MiB written is a picture of those 5 MiB, not a blank square.
The host axis always spans the file (its header and tables start at 0).

SVG is written as XML text (runs of equal cells merged into one ``rect``); PNG is
drawn into an RGB ``bytearray`` and encoded by hand (IHDR, IDAT with zlib, IEND),
with a built-in 5x7 bitmap font for the text.
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

if TYPE_CHECKING:
    from ..jobs.frag import FragReport, LayoutSample

GRID = 256  # buckets per axis at most (fragmentation_report(grid=GRID))
FORMATS = (".svg", ".png")
ZOOM_BELOW = 0.5  # zoom the guest axis when the written range is less than this share
ZOOM_LEAST = 16  # clusters a zoomed guest axis spans at least (one is 1/16 of the plot)

Colour = tuple[int, int, int]

WHITE: Colour = (255, 255, 255)
INK: Colour = (33, 33, 33)
GRID_INK: Colour = (190, 190, 190)
HOME: Colour = (44, 160, 44)
AWAY: Colour = (222, 60, 30)
ZERO: Colour = (158, 202, 225)
UNALLOCATED: Colour = (224, 224, 224)
META: Colour = (110, 110, 110)
HOME_LINE: Colour = (150, 150, 150)
TICK_LINE: Colour = (232, 232, 232)

# Layout, in pixels.
WIDTH = 900
LEFT = 96  # left margin: host axis labels and the metadata ticks
PLOT = 768  # the scatter is PLOT x PLOT
TOP = 136  # title lines (three, and a fourth when zoomed) and an axis title above the plot
STRIP = 40  # height of the guest strip
TEXT = 2  # scale of the bitmap font (5x7 glyphs in 6x8 cells) for titles
SMALL = 1  # scale of axis labels (PNG); SVG uses font sizes to match
PLOT_BOTTOM = TOP + PLOT
STRIP_TOP = PLOT_BOTTOM + 40  # below the guest axis' tick labels and title
LEGEND_TOP = STRIP_TOP + STRIP + 14
HEIGHT = LEGEND_TOP + 30


@dataclass(frozen=True, slots=True)
class Rect:
    x: int
    y: int
    w: int
    h: int
    colour: Colour


@dataclass(frozen=True, slots=True)
class Line:
    x0: float
    y0: float
    x1: float
    y1: float
    colour: Colour
    dashed: bool = False


@dataclass(frozen=True, slots=True)
class Text:
    x: int  # left edge (anchor "start"), right edge ("end") or centre ("middle")
    y: int  # top of the glyph cells
    text: str
    scale: int
    colour: Colour = INK
    anchor: str = "start"  # or "end", "middle"


Item = Rect | Line | Text


@dataclass
class Scene:
    width: int
    height: int
    items: list[Item]


# ---- the scene --------------------------------------------------------------------


def _size(value: int) -> str:
    """``value`` bytes with three significant digits and a binary unit."""
    if value < 1024:
        return f"{value} B"
    scaled = float(value)
    for unit in ("Ki", "Mi", "Gi", "Ti", "Pi"):
        scaled /= 1024
        if scaled < 1000 or unit == "Pi":
            break
    return f"{scaled:.3g} {unit}B"


def tick_label(value: int) -> str:
    """``value`` bytes, short, for an axis: 0, 512, 64K, 256M, 1.5G, 5.06M."""
    for shift, suffix in ((50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if value >= 1 << shift:
            q = value / (1 << shift)
            text = str(int(q)) if q.is_integer() else f"{q:.2f}".rstrip("0").rstrip(".")
            return text + suffix
    return str(value)


def tick_step(span: int) -> int:
    """The tick spacing for an axis of ``span`` bytes: the largest power of two that
    gives at least four intervals (so four to eight of them)."""
    return 1 << max(0, (span // 4).bit_length() - 1) if span >= 4 else 1


def _ticks(lo: int, hi: int) -> list[int]:
    """The multiples of ``tick_step(hi - lo)`` from ``lo`` to ``hi`` (bytes)."""
    step = tick_step(hi - lo)
    return list(range(-(-lo // step) * step, hi + 1, step))


def zoom_window(report: FragReport) -> tuple[int, int] | None:
    """The guest clusters ``(first, end)`` the picture should span, or None for the
    whole disk: the written range (``allocated_start .. allocated_end``), at least
    ZOOM_LEAST clusters, rounded out to its ticks, when that is less than
    ZOOM_BELOW of the disk."""
    cs, disk = report.cluster_size, report.image_size
    start, end = report.allocated_start, report.allocated_end
    if end <= start or disk <= 0:
        return None
    span = max(end - start, ZOOM_LEAST * cs)
    step = tick_step(span)
    lo = start // step * step
    hi = min(disk, max(-(-end // step) * step, -(-(lo + span) // step) * step))
    if hi - lo >= ZOOM_BELOW * disk:
        return None
    return lo // cs, -(-hi // cs)


@dataclass(frozen=True, slots=True)
class Axes:
    """Byte offsets to pixels: the guest axis spans ``guest_lo .. guest_hi``, the host
    axis ``0 .. host_hi``."""

    guest_lo: int
    guest_hi: int
    host_hi: int

    @classmethod
    def of(cls, report: FragReport) -> Axes:
        layout, cs = report.layout, report.cluster_size
        if layout is None:
            return cls(0, max(1, report.image_size), max(1, report.file_size))
        start, end = layout.guest_start * cs, (layout.guest_start + layout.guest_clusters) * cs
        return cls(start, max(start + 1, min(end, report.image_size)), layout.host_clusters * cs)

    def x(self, guest: int) -> float:
        return LEFT + (guest - self.guest_lo) * PLOT / (self.guest_hi - self.guest_lo)

    def y(self, host: int) -> float:
        return PLOT_BOTTOM - host * PLOT / self.host_hi


def zoomed(report: FragReport) -> bool:
    """Whether the picture of ``report`` spans only part of the guest disk."""
    layout = report.layout
    return layout is not None and (
        layout.guest_start > 0 or layout.guest_clusters < report.total_clusters
    )


def _edge(index: int, buckets: int) -> int:
    """Pixel offset of the start of bucket ``index`` along a PLOT-long axis."""
    return index * PLOT // buckets


def _shade(colour: Colour, level: int) -> Colour:
    """``colour`` faded towards white: level 0 (a cell under a quarter full) to 3
    (a cell at least three quarters full, as on the diagonal of a raw-like image)."""
    strength = 0.55 + 0.15 * level
    r, g, b = (round(255 - (255 - c) * strength) for c in colour)
    return (r, g, b)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def title_lines(report: FragReport) -> list[str]:
    name = os.path.basename(report.filename)
    if len(name) > 40:
        name = name[:37] + "..."
    lines = [
        f"{name}: {_size(report.image_size)} disk, {_size(report.cluster_size)} clusters",
        f"fragmented {report.fragmented_percent:.2f}% (qemu-img check), "
        f"away from home {report.away_percent:.2f}%",
    ]
    runs = _plural(report.runs, "run")
    if not report.runs:
        lines.append("no data clusters")
    elif report.raw_like:
        lines.append(f"raw-like: {runs}, 1 host extent each")
    else:
        lines.append(
            f"{_plural(report.extents, 'host extent')} for {runs} "
            f"(max {report.max_extents}, mean {report.mean_extents:.1f})"
        )
    if zoomed(report):
        axes = Axes.of(report)
        lines.append(
            f"zoomed to guest {tick_label(axes.guest_lo)}-{tick_label(axes.guest_hi)} "
            f"of {tick_label(report.image_size)}: nothing is written outside"
        )
    return lines


def build_scene(report: FragReport) -> Scene:
    """The picture of ``report`` (which needs a ``layout``) as shapes and text."""
    items: list[Item] = []
    for n, line in enumerate(title_lines(report)):
        items.append(Text(16, 12 + n * 26, line, TEXT))
    items.append(Rect(LEFT, TOP, PLOT, PLOT, (250, 250, 250)))
    axes = Axes.of(report)
    items += _grid(axes)
    layout = report.layout
    if layout is not None:
        items += _home_line(layout)
        items += _cells(layout)
        items += _meta_ticks(layout)
        items += _strip(layout)
    items += _frame_and_labels(report, axes)
    items += _legend()
    return Scene(WIDTH, HEIGHT, items)


def _home_line(layout: LayoutSample) -> list[Item]:
    """Where the clusters belong (the target layout's homes), as a dashed polyline
    clipped to the plot (the guest window, the file): a diagonal for the identity
    layout, a staircase for the packed one."""
    gs, gc, hc = layout.guest_start, layout.guest_clusters, layout.host_clusters
    out: list[Item] = []
    for (g0, h0), (g1, h1) in itertools.pairwise(layout.home_line):
        if g1 <= g0:
            continue
        # Clip the segment to guest [gs, gs + gc] and host [0, hc] (it rises).
        lo, hi = float(max(g0, gs)), float(min(g1, gs + gc))
        slope = (h1 - h0) / (g1 - g0)
        if slope > 0:
            hi = min(hi, g0 + (hc - h0) / slope)
        if hi <= lo or h0 + (lo - g0) * slope >= hc:
            continue
        y_lo, y_hi = h0 + (lo - g0) * slope, h0 + (hi - g0) * slope
        out.append(
            Line(
                LEFT + (lo - gs) * PLOT / gc,
                PLOT_BOTTOM - y_lo * PLOT / hc,
                LEFT + (hi - gs) * PLOT / gc,
                PLOT_BOTTOM - y_hi * PLOT / hc,
                HOME_LINE,
                dashed=True,
            )
        )
    return out


def _grid(axes: Axes) -> list[Item]:
    """Light lines through the plot at the ticks of both axes."""
    right = LEFT + PLOT
    out: list[Item] = []
    for v in _ticks(axes.guest_lo, axes.guest_hi):
        x = axes.x(v)
        if LEFT < x < right:
            out.append(Line(x, TOP, x, PLOT_BOTTOM, TICK_LINE))
    for v in _ticks(0, axes.host_hi):
        y = axes.y(v)
        if TOP < y < PLOT_BOTTOM:
            out.append(Line(LEFT, y, right, y, TICK_LINE))
    return out


def _cells(layout: LayoutSample) -> list[Item]:
    out: list[Item] = []
    gn, hn = layout.guest_buckets, layout.host_buckets
    home, away = layout.home, layout.away
    host_sizes = [layout.host_bucket_size(hb) for hb in range(hn)]
    shades: dict[tuple[Colour, int], Colour] = {}
    for gb in range(gn):
        x0 = LEFT + _edge(gb, gn)
        w = max(1, _edge(gb + 1, gn) - _edge(gb, gn))
        gsize = layout.guest_bucket_size(gb)
        row = gb * hn
        for hb in range(hn):
            at_home, off_home = home[row + hb], away[row + hb]
            count = at_home + off_home
            if not count:
                continue
            base = AWAY if off_home >= at_home else HOME
            level = min(3, 4 * count // max(1, min(gsize, host_sizes[hb])))
            colour = shades.get((base, level))
            if colour is None:
                colour = shades[base, level] = _shade(base, level)
            y1 = PLOT_BOTTOM - _edge(hb, hn)
            h = max(1, _edge(hb + 1, hn) - _edge(hb, hn))
            out.append(Rect(x0, y1 - h, w, h, colour))
    return out


def _meta_ticks(layout: LayoutSample) -> list[Item]:
    hn = layout.host_buckets
    out: list[Item] = []
    for hb, flag in enumerate(layout.host_meta):
        if flag:
            y1 = PLOT_BOTTOM - _edge(hb, hn)
            h = max(1, _edge(hb + 1, hn) - _edge(hb, hn))
            out.append(Rect(LEFT - 10, y1 - h, 7, h, META))
    return out


def _stack(counts: list[int], total: int, height: int, least: int = 4) -> list[int]:
    """Heights of stacked parts for ``counts`` out of ``total`` in ``height`` pixels:
    proportional, but a part that is there gets ``least`` pixels at least (one data
    cluster in a bucket of a million must still show); the largest part gives way."""
    heights = [0 if not c else max(least, round(c * height / total)) for c in counts]
    if any(heights):
        largest = max(range(len(counts)), key=lambda k: counts[k])
        heights[largest] = max(0, heights[largest] + height - sum(heights))
    return heights


def _strip(layout: LayoutSample) -> list[Item]:
    gn = layout.guest_buckets
    out: list[Item] = []
    colours = (HOME, AWAY, ZERO, UNALLOCATED)
    for gb in range(gn):
        x0 = LEFT + _edge(gb, gn)
        w = max(1, _edge(gb + 1, gn) - _edge(gb, gn))
        size = max(1, layout.guest_bucket_size(gb))
        counts = [layout.guest_home[gb], layout.guest_away[gb], layout.guest_zero[gb]]
        counts.append(max(0, size - sum(counts)))
        bottom = STRIP_TOP + STRIP  # stacked from the bottom up
        for h, colour in zip(_stack(counts, size, STRIP), colours, strict=True):
            if h:
                out.append(Rect(x0, bottom - h, w, h, colour))
                bottom -= h
    return out


def _frame_and_labels(report: FragReport, axes: Axes) -> list[Item]:
    right, bottom = LEFT + PLOT, PLOT_BOTTOM
    frame: list[Item] = [
        Line(LEFT, TOP, right, TOP, GRID_INK),
        Line(LEFT, bottom, right, bottom, INK),
        Line(LEFT, TOP, LEFT, bottom, INK),
        Line(right, TOP, right, bottom, GRID_INK),
        Line(LEFT, STRIP_TOP, right, STRIP_TOP, GRID_INK),
        Line(LEFT, STRIP_TOP + STRIP, right, STRIP_TOP + STRIP, GRID_INK),
    ]
    small = 8 * SMALL
    labels: list[Item] = [
        Text(LEFT - 14, TOP - small - 6, "host offset", SMALL, anchor="end"),
        Text(LEFT - 14, TOP, tick_label(report.file_size), SMALL, anchor="end"),
        Text(LEFT - 14, TOP + small + 2, "end of file", SMALL, anchor="end"),
        Text(LEFT + PLOT // 2, bottom + 6 + small + 4, "guest offset", SMALL, anchor="middle"),
        Text(LEFT - 14, STRIP_TOP + STRIP // 2 - small // 2, "guest", SMALL, anchor="end"),
    ]
    # Host ticks: a mark left of the axis (right of the metadata marks) and a label,
    # except where the end-of-file label is.
    for v in _ticks(0, axes.host_hi):
        y = round(axes.y(v))
        if y < TOP + 2 * small + 10:
            continue
        labels.append(Line(LEFT - 3, y, LEFT, y, INK))
        labels.append(Text(LEFT - 14, y - small // 2, tick_label(v), SMALL, anchor="end"))
    # Guest ticks: a mark under the axis and a centred label; the end of the axis is
    # labelled too when it is not a tick.
    guest = _ticks(axes.guest_lo, axes.guest_hi)
    if not guest or axes.x(axes.guest_hi) - axes.x(guest[-1]) > 40:
        guest.append(axes.guest_hi)
    for v in guest:
        x = round(axes.x(v))
        labels.append(Line(x, bottom, x, bottom + 4, INK))
        labels.append(Text(x, bottom + 6, tick_label(v), SMALL, anchor="middle"))
    return frame + labels


def _legend() -> list[Item]:
    out: list[Item] = []
    x = LEFT
    for colour, label in (
        (HOME, "at home"),
        (AWAY, "away from home"),
        (ZERO, "zero cluster"),
        (UNALLOCATED, "unallocated"),
        (META, "header, L1, L2 tables"),
    ):
        out.append(Rect(x, LEGEND_TOP, 12, 12, colour))
        out.append(Text(x + 18, LEGEND_TOP + 2, label, SMALL))
        x += 18 + 6 * SMALL * len(label) + 22
    out.append(Text(x, LEGEND_TOP + 2, "- - home line", SMALL, HOME_LINE))
    return out


# ---- SVG ----------------------------------------------------------------------------


def _hex(colour: Colour) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def _merge(rects: list[Rect]) -> list[Rect]:
    """Horizontally adjacent rects of one height and colour, as one."""
    out: list[Rect] = []
    for r in sorted(rects, key=lambda r: (r.y, r.h, r.colour, r.x)):
        if out:
            last = out[-1]
            if (last.y, last.h, last.colour) == (r.y, r.h, r.colour) and last.x + last.w == r.x:
                out[-1] = Rect(last.x, last.y, last.w + r.w, last.h, last.colour)
                continue
        out.append(r)
    return out


def render_svg(scene: Scene) -> str:
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>\n',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{scene.width}" '
        f'height="{scene.height}" viewBox="0 0 {scene.width} {scene.height}" '
        'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace">\n',
        f'<rect x="0" y="0" width="{scene.width}" height="{scene.height}" fill="#ffffff"/>\n',
    ]
    # Keep the drawing order (cells over the home line, text last) but merge runs
    # of rects that are drawn one after the other.
    pending: list[Rect] = []

    def flush() -> None:
        for r in _merge(pending):
            parts.append(
                f'<rect x="{r.x}" y="{r.y}" width="{r.w}" height="{r.h}" '
                f'fill="{_hex(r.colour)}"/>\n'
            )
        pending.clear()

    for item in scene.items:
        if isinstance(item, Rect):
            pending.append(item)
            continue
        flush()
        if isinstance(item, Line):
            dash = ' stroke-dasharray="6 4"' if item.dashed else ""
            parts.append(
                f'<line x1="{item.x0:.1f}" y1="{item.y0:.1f}" x2="{item.x1:.1f}" '
                f'y2="{item.y1:.1f}" stroke="{_hex(item.colour)}" stroke-width="1"{dash}/>\n'
            )
        else:
            size = 10 * item.scale  # DejaVu Sans Mono: 6 px advance per 10 px
            anchor = f' text-anchor="{item.anchor}"' if item.anchor != "start" else ""
            parts.append(
                f'<text x="{item.x}" y="{item.y + 7 * item.scale}" font-size="{size}" '
                f'fill="{_hex(item.colour)}"{anchor}>{escape(item.text)}</text>\n'
            )
    flush()
    parts.append("</svg>\n")
    return "".join(parts)


# ---- PNG ----------------------------------------------------------------------------

# 5x7 glyphs, rows top to bottom; '#' is ink. g, j, p, q, y have two more rows
# (descenders, drawn into the space between lines).
_FONT_ART = {
    " ": "..... ..... ..... ..... ..... ..... .....",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "a": "..... ..... .###. ....# .#### #...# .####",
    "b": "#.... #.... #.##. ##..# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.",
    "d": "....# ....# .##.# #..## #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.",
    "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... ..... .#### #...# #...# #...# .#### ....# .###.",
    "h": "#.... #.... #.##. ##..# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",
    "j": "...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #...# #...#",
    "n": "..... ..... #.##. ##..# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.",
    "p": "..... ..... ####. #...# #...# #...# ####. #.... #....",
    "q": "..... ..... .#### #...# #...# #...# .#### ....# ....#",
    "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .###. #.... .###. ....# ####.",
    "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#",
    "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.",
    "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# #...# #...# .#### ....# .###.",
    "z": "..... ..... ##### ...#. ..#.. .#... #####",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    ";": "..... .##.. .##.. ..... .##.. ..#.. .#...",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "\\": "..... #.... .#... ..#.. ...#. ....# .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "[": ".###. .#... .#... .#... .#... .#... .###.",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "|": "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    "^": "..#.. .#.#. #...# ..... ..... ..... .....",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",
    "'": "..#.. ..#.. .#... ..... ..... ..... .....",
    '"': ".#.#. .#.#. ..... ..... ..... ..... .....",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
    "*": "..... ..#.. #.#.# .###. #.#.# ..#.. .....",
    "~": "..... ..... .#... #.#.# ...#. ..... .....",
    "&": ".##.. #..#. #.#.. .#... #.#.# #..#. .##.#",
    "@": ".###. #...# #.### #.#.# #.### #.... .###.",
    "$": "..#.. .#### #.#.. .###. ..#.# ####. ..#..",
}
# Each glyph as the (column, row) pairs of its ink.
_FONT: dict[str, tuple[tuple[int, int], ...]] = {
    ch: tuple(
        (col, row)
        for row, bits in enumerate(art.split())
        for col, mark in enumerate(bits)
        if mark == "#"
    )
    for ch, art in _FONT_ART.items()
}
_CELL = 6  # glyph advance (5 columns and a space), in font pixels


class Canvas:
    """An RGB image in a bytearray, clipped drawing."""

    def __init__(self, width: int, height: int, background: Colour = WHITE) -> None:
        self.width = width
        self.height = height
        self.pixels = bytearray(bytes(background) * (width * height))

    def fill(self, x: int, y: int, w: int, h: int, colour: Colour) -> None:
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        if x0 >= x1 or y0 >= y1:
            return
        span = bytes(colour) * (x1 - x0)
        stride = self.width * 3
        for row in range(y0, y1):
            start = row * stride + x0 * 3
            self.pixels[start : start + len(span)] = span

    def dot(self, x: int, y: int, colour: Colour) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i : i + 3] = bytes(colour)

    def line(self, item: Line) -> None:
        dx, dy = item.x1 - item.x0, item.y1 - item.y0
        steps = max(1, int(max(abs(dx), abs(dy))))
        for k in range(steps + 1):
            if item.dashed and k % 10 >= 6:
                continue
            t = k / steps
            self.dot(round(item.x0 + dx * t), round(item.y0 + dy * t), item.colour)

    def text(self, item: Text) -> None:
        s = item.scale
        width = len(item.text) * _CELL * s
        x = item.x - {"end": width, "middle": width // 2}.get(item.anchor, 0)
        for ch in item.text:
            for col, row in _FONT.get(ch, _FONT["?"]):
                self.fill(x + col * s, item.y + row * s, s, s, item.colour)
            x += _CELL * s

    def png(self) -> bytes:
        """The canvas as a PNG file (8-bit RGB, no filtering, zlib level 6)."""
        stride = self.width * 3
        raw = b"".join(
            b"\x00" + self.pixels[row * stride : (row + 1) * stride] for row in range(self.height)
        )
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b"")
        )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def render_png(scene: Scene) -> bytes:
    canvas = Canvas(scene.width, scene.height)
    for item in scene.items:
        if isinstance(item, Rect):
            canvas.fill(item.x, item.y, item.w, item.h, item.colour)
        elif isinstance(item, Line):
            canvas.line(item)
        else:
            canvas.text(item)
    return canvas.png()


# ---- entry point --------------------------------------------------------------------


def picture_format(path: str) -> str | None:
    """The picture format ``path``'s extension names (".svg" or ".png", any case), or None."""
    ext = os.path.splitext(path)[1].lower()
    return ext if ext in FORMATS else None


def render(report: FragReport, path: str) -> bytes:
    """The picture of ``report`` in the format ``path``'s extension names."""
    scene = build_scene(report)
    if picture_format(path) == ".svg":
        return render_svg(scene).encode()
    if picture_format(path) == ".png":
        return render_png(scene)
    raise ValueError(f"{path}: unknown picture format (use .svg or .png)")
