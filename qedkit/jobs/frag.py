"""Fragmentation report: how far a QED image's layout is from a raw file's.

Figures
-------
* **allocated / fragmented clusters**, counted exactly as ``qemu-img check`` counts
  them (engine.check): every L2 entry other than 0 and 1 is allocated; it is
  fragmented when it does not follow the previous allocated entry *of the same L2
  table* by one cluster. The tables scanned are the ones the check scans (an L1
  entry with an invalid offset, or a table on clusters already in use, is left out),
  so the two figures equal qemu-img check's "allocated-clusters" and
  "fragmented-clusters", damaged images included.
* **away from home**: data clusters not where defragmentation would put them
  (engine.qed.alloc.TargetLayout): in the packed layout the i-th allocated cluster's
  home is ``data_base + i * cluster_size`` (``data_base``: past the L1 and the L2
  tables), in the identity layout (images with the home allocation policy) guest
  cluster g's is ``data_start + g * cluster_size``. 0 means defragmented.
* **host extents per run**: the guest disk split into *runs* of consecutive data
  clusters (a zero or unallocated cluster ends a run), each run counted in
  *extents*, the host-contiguous pieces it needs (1: the run reads with one host
  read). ``extents == runs`` is *raw-like*: every sequential guest read is one
  sequential host read. qemu-img's fragmented count restarts in each L2 table and
  counts a gap (unallocated clusters between two data clusters) as fragmentation;
  runs and extents follow the guest disk, across tables, and gaps only end runs.

The scan streams one L2 table at a time and keeps counters, never per-cluster lists,
so a 1 TiB image costs its tables' reads and a few integers. With ``grid`` it also
fills a down-sampled picture of the layout (``LayoutSample``: at most ``grid``
buckets per axis) for cli.picture to draw; ``guest_window`` limits the picture's
guest axis to a range of clusters (the figures always cover the whole disk), so
that a picture can zoom to ``allocated_start .. allocated_end`` of an earlier scan.

It only reads. On an image that is being written (served), hold
``img.allocations_paused()`` around it for a stable view.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from ..engine.qed import QedImage


@dataclass(frozen=True, slots=True)
class LayoutSample:
    """The guest-to-host layout, down-sampled to buckets of clusters.

    Guest cluster ``guest_start + g`` falls in guest bucket
    ``g * guest_buckets // guest_clusters`` (the guest axis spans ``guest_clusters``
    from ``guest_start``: the whole disk unless the scan had a ``guest_window``),
    host cluster ``h`` in host bucket ``h * host_buckets // host_clusters`` (the host
    axis spans the file). ``home``/``away`` count data clusters per cell
    (``guest_bucket * host_buckets + host_bucket``), split by whether they sit at
    home; ``guest_home``/``guest_away``/``guest_zero`` count them per guest bucket
    (the rest of a bucket is unallocated); ``host_meta`` is 1 for host buckets that
    hold the header, the L1 or an L2 table.
    """

    guest_clusters: int
    host_clusters: int
    guest_buckets: int
    host_buckets: int
    home: array[int]
    away: array[int]
    guest_home: array[int]
    guest_away: array[int]
    guest_zero: array[int]
    host_meta: bytes
    data_start_cluster: int
    guest_start: int = 0
    # The home positions as a polyline of (guest cluster, host cluster) points (guest
    # clusters counted from 0, not from guest_start): a straight line for the
    # identity layout, a staircase for the packed one.
    home_line: tuple[tuple[int, int], ...] = ()

    def guest_bucket_size(self, bucket: int) -> int:
        """How many guest clusters bucket ``bucket`` holds."""
        return _bucket_start(bucket + 1, self.guest_clusters, self.guest_buckets) - _bucket_start(
            bucket, self.guest_clusters, self.guest_buckets
        )

    def host_bucket_size(self, bucket: int) -> int:
        return _bucket_start(bucket + 1, self.host_clusters, self.host_buckets) - _bucket_start(
            bucket, self.host_clusters, self.host_buckets
        )


def _bucket_start(bucket: int, clusters: int, buckets: int) -> int:
    """The first cluster ``c`` with ``c * buckets // clusters >= bucket``."""
    return -(-bucket * clusters // buckets)


@dataclass(frozen=True, slots=True)
class FragReport:
    """What ``fragmentation_report`` found. Sizes and offsets in bytes, the rest in
    clusters; percentages are of the allocated clusters (as qemu-img check prints
    its fragmented figure), except ``allocated_percent`` (of ``total_clusters``).
    ``allocated_start .. allocated_end`` is the guest range from the first to the end
    of the last data or zero cluster (0 .. 0 when there is none)."""

    filename: str
    image_size: int
    cluster_size: int
    file_size: int
    data_start: int
    layout_kind: str  # "packed" or "identity": what "home" means
    total_clusters: int
    allocated_clusters: int
    fragmented_clusters: int
    zero_clusters: int
    away_clusters: int
    runs: int
    extents: int
    max_extents: int
    layout: LayoutSample | None = None
    allocated_start: int = 0
    allocated_end: int = 0

    @property
    def allocated_percent(self) -> float:
        return 100.0 * self.allocated_clusters / self.total_clusters if self.total_clusters else 0.0

    @property
    def fragmented_percent(self) -> float:
        """As ``qemu-img check`` prints it: of the allocated clusters."""
        alloc = self.allocated_clusters
        return 100.0 * self.fragmented_clusters / alloc if alloc else 0.0

    @property
    def away_percent(self) -> float:
        alloc = self.allocated_clusters
        return 100.0 * self.away_clusters / alloc if alloc else 0.0

    @property
    def mean_extents(self) -> float:
        return self.extents / self.runs if self.runs else 0.0

    @property
    def raw_like(self) -> bool:
        """Every run of data clusters reads with one host read."""
        return self.extents == self.runs


class _Sampler:
    """Fills a LayoutSample's counters, a contiguous piece at a time."""

    def __init__(
        self, grid: int, guest_clusters: int, host_clusters: int, ds: int, guest_start: int = 0
    ) -> None:
        self.gs = guest_start  # the guest axis: clusters guest_start .. + guest_clusters
        self.gc = guest_clusters
        self.hc = host_clusters
        self.gn = min(grid, guest_clusters)
        self.hn = min(grid, host_clusters)
        cells = self.gn * self.hn
        self.home = array("q", bytes(8 * cells))
        self.away = array("q", bytes(8 * cells))
        self.guest_home = array("q", bytes(8 * self.gn))
        self.guest_away = array("q", bytes(8 * self.gn))
        self.guest_zero = array("q", bytes(8 * self.gn))
        self.host_meta = bytearray(self.hn)
        self.ds = ds
        self.home_points: list[tuple[int, int]] = []

    def _host_bucket(self, h: int) -> int:
        return min(h * self.hn // self.hc, self.hn - 1)

    def data(self, g: int, h: int, count: int, at_home: bool) -> None:
        """``count`` guest clusters from ``g`` at host clusters from ``h``."""
        g -= self.gs
        if g < 0:  # starts left of the window
            if g + count <= 0:
                return
            h, count, g = h - g, count + g, 0
        gc, gn, hn = self.gc, self.gn, self.hn
        if count == 1:  # the common case of a fragmented image, made short
            if g < gc:
                gb = g * gn // gc
                hb = h * hn // self.hc
                (self.home if at_home else self.away)[gb * hn + min(hb, hn - 1)] += 1
                (self.guest_home if at_home else self.guest_away)[gb] += 1
            return
        hc = self.hc
        cells = self.home if at_home else self.away
        per_guest = self.guest_home if at_home else self.guest_away
        end = min(g + count, gc)  # entries past the image end are not drawn
        while g < end:
            gb = g * gn // gc
            hb = self._host_bucket(h)
            k = end - g
            k = min(k, _bucket_start(gb + 1, gc, gn) - g)
            if hb < hn - 1:
                k = min(k, _bucket_start(hb + 1, hc, hn) - h)
            cells[gb * hn + hb] += k
            per_guest[gb] += k
            g += k
            h += k

    def home_run(self, g: int, home: int, count: int) -> None:
        """Guest clusters ``g`` to ``g + count`` have their homes from host cluster
        ``home`` (a packed layout's step)."""
        points = self.home_points
        if points and points[-1] == (g, home):
            points[-1] = (g + count, home + count)
        else:
            points += [(g, home), (g + count, home + count)]

    def zero(self, g: int, count: int) -> None:
        g -= self.gs
        if g < 0:
            if g + count <= 0:
                return
            count, g = count + g, 0
        gc, gn = self.gc, self.gn
        end = min(g + count, gc)
        while g < end:
            gb = g * gn // gc
            k = min(end - g, _bucket_start(gb + 1, gc, gn) - g)
            self.guest_zero[gb] += k
            g += k

    def meta(self, h: int, count: int) -> None:
        for hb in range(self._host_bucket(h), self._host_bucket(h + count - 1) + 1):
            self.host_meta[hb] = 1

    def sample(self) -> LayoutSample:
        return LayoutSample(
            guest_clusters=self.gc,
            host_clusters=self.hc,
            guest_buckets=self.gn,
            host_buckets=self.hn,
            home=self.home,
            away=self.away,
            guest_home=self.guest_home,
            guest_away=self.guest_away,
            guest_zero=self.guest_zero,
            host_meta=bytes(self.host_meta),
            data_start_cluster=self.ds,
            guest_start=self.gs,
            home_line=tuple(self.home_points),
        )


class _Scan:
    """Counters of one pass over the L2 tables, in guest order."""

    def __init__(
        self,
        img: QedImage,
        watch: set[int],
        sampler: _Sampler | None,
        marked: set[int],
        packed_base: int | None,
    ) -> None:
        geo = img.geo
        self.cs = geo.cluster_size
        self.bits = geo.cluster_bits
        self.ds = img.data_start
        # Packed layout: the home of the next allocated cluster (host offset); None:
        # the identity layout.
        self.packed_home = packed_base
        self.watch = watch  # offsets of the clusters of valid L2 tables
        self.marked = marked  # host clusters in use, as far as ``watch`` needs to know
        self.sampler = sampler
        self.allocated = 0
        self.fragmented = 0
        self.zero = 0
        self.home = 0
        self.runs = 0
        self.extents = 0
        self.max_extents = 0
        self.run_extents = 0
        self.run_end_guest = -1  # guest cluster after the last data cluster seen
        self.run_end_host = -1  # host offset after it
        self.alloc_first = -1  # the first guest cluster with a data or zero entry
        self.alloc_end = 0  # the guest cluster after the last one

    def table(self, table: array[int], base: int) -> None:
        """Scan the L2 table of the guest clusters from ``base``: split it into pieces
        of equal entries (0 or 1) and host-contiguous data, and count those."""
        n = len(table)
        if table.count(0) == n:
            return
        cs, bits, ds = self.cs, self.bits, self.ds
        if self.watch:
            # A data entry on a table's cluster is a duplicate reference; the check
            # then skips that table when it comes to it (every such entry is valid).
            hits = self.watch.intersection(table)
            self.marked.update(h >> bits for h in hits)
        sampler = self.sampler
        allocated = fragmented = zero = home = 0
        runs, extents, max_extents = self.runs, self.extents, self.max_extents
        run_extents, end_guest, end_host = self.run_extents, self.run_end_guest, self.run_end_host
        last = 0  # the previous allocated entry of this table (qemu-img check's rule)
        i = 0
        first = -1  # this table's first and (after) last data or zero entry
        after = 0
        while i < n:
            entry = table[i]
            j = i + 1
            if entry <= 1:
                while j < n and table[j] == entry:
                    j += 1
                if entry == 1:
                    zero += j - i
                    if first < 0:
                        first = i
                    after = j
                    if sampler is not None:
                        sampler.zero(base + i, j - i)
                i = j
                continue
            expect = entry + cs
            while j < n and table[j] == expect:
                j += 1
                expect += cs
            count = j - i
            g = base + i
            if first < 0:
                first = i
            after = j
            allocated += count
            if last and last + cs != entry:
                fragmented += 1
            last = expect - cs
            packed = self.packed_home
            if packed is None:
                at_home = entry == ds + (g << bits)
            else:
                at_home = entry == packed
                if sampler is not None:
                    sampler.home_run(g, packed >> bits, count)
                self.packed_home = packed + (count << bits)
            if at_home:
                home += count
            if g == end_guest:  # the guest run goes on
                if entry != end_host:
                    extents += 1
                    run_extents += 1
            else:
                if run_extents > max_extents:
                    max_extents = run_extents
                runs += 1
                extents += 1
                run_extents = 1
            end_guest = base + j
            end_host = expect
            if sampler is not None:
                sampler.data(g, entry >> bits, count, at_home)
            i = j
        if first >= 0:
            if self.alloc_first < 0:
                self.alloc_first = base + first
            self.alloc_end = base + after
        self.allocated += allocated
        self.fragmented += fragmented
        self.zero += zero
        self.home += home
        self.runs, self.extents, self.max_extents = runs, extents, max_extents
        self.run_extents, self.run_end_guest, self.run_end_host = run_extents, end_guest, end_host

    def end(self) -> None:
        self.max_extents = max(self.max_extents, self.run_extents)


async def fragmentation_report(
    img: QedImage, *, grid: int = 0, guest_window: tuple[int, int] | None = None
) -> FragReport:
    """Scan ``img``'s tables (reading only) and report its fragmentation; see the
    module docstring. ``grid > 0`` also records a LayoutSample of at most ``grid``
    buckets per axis (``report.layout``), over the guest clusters
    ``guest_window = (first, end)`` when given (clipped to the disk), else all."""
    geo = img.geo
    bits = geo.cluster_bits
    ts = geo.table_size
    file_size = await img.store.size()
    file_end = max(img.file_end, file_size - file_size % geo.cluster_size)  # the check's
    total = geo.bytes_to_clusters(img.header.image_size)
    host_clusters = max(1, geo.bytes_to_clusters(file_size))
    ds = img.data_start
    l1 = img.l1_table
    l1_first = img.header.l1_table_offset >> bits
    valid = [
        (l1_index, offset)
        for l1_index, offset in enumerate(l1)
        if offset and geo.is_valid_table_offset(offset, file_end)
    ]
    watch = {offset + (k << bits) for _, offset in valid for k in range(ts)}
    first, end = (0, total) if guest_window is None else guest_window
    first, end = max(0, min(first, total)), max(0, min(end, total))
    if end <= first:
        first, end = 0, total
    sampler = (
        _Sampler(grid, end - first, host_clusters, ds >> bits, first)
        if grid > 0 and total
        else None
    )
    identity = img.home_allocation
    packed_base = None if identity else ds + len(valid) * geo.table_bytes
    if sampler is not None and identity:
        sampler.home_points = [(0, ds >> bits), (total, (ds >> bits) + total)]
    if sampler is not None:
        sampler.meta(0, geo.header_size)
        sampler.meta(l1_first, ts)
        for _, offset in valid:
            sampler.meta(offset >> bits, ts)
    marked = set(range(l1_first, l1_first + ts))
    scan = _Scan(img, watch, sampler, marked, packed_base)
    span = geo.l2_entries
    for l1_index, offset in valid:
        first = offset >> bits
        clusters = range(first, first + ts)
        seen = any(c in marked for c in clusters)
        marked.update(clusters)
        if seen:  # the check counts a table on used clusters as a duplicate, unscanned
            continue
        table = await img.get_l2(l1_index)
        assert table is not None
        scan.table(table, l1_index * span)
    scan.end()
    return FragReport(
        filename=img.filename,
        image_size=img.header.image_size,
        cluster_size=geo.cluster_size,
        file_size=file_size,
        data_start=ds,
        layout_kind="identity" if identity else "packed",
        total_clusters=total,
        allocated_clusters=scan.allocated,
        fragmented_clusters=scan.fragmented,
        zero_clusters=scan.zero,
        away_clusters=scan.allocated - scan.home,
        runs=scan.runs,
        extents=scan.extents,
        max_extents=scan.max_extents,
        layout=sampler.sample() if sampler is not None else None,
        allocated_start=max(0, scan.alloc_first) << bits,
        allocated_end=min(scan.alloc_end << bits, img.header.image_size),
    )
