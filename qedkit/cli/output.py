"""Every output format of the ``qed`` command, in one place.

JSON objects are printed the way qemu-img prints them: four-space indentation and
keys in the order of QEMU's QDict, which iterates its 512 hash buckets in order and,
inside a bucket, the most recently inserted key first. Reproducing that order makes
our output byte-identical to qemu-img's, not just equal as JSON.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported for the types only: ``qed ctl`` prints without the engine
    from ..engine.base import ImageInfo, SnapshotInfo
    from ..engine.check import CheckReport
    from ..engine.mapping import MapEntry
    from ..jobs.frag import FragReport
    from ..jobs.measure import Measurement

# ---- QEMU's JSON key order ---------------------------------------------------

_QDICT_BUCKETS = 512


def _tdb_hash(key: str) -> int:
    """QEMU's qdict hash (tdb_hash in qobject/qdict.c), on 32-bit unsigned ints."""
    value = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, ch in enumerate(key.encode()):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(pairs: Sequence[tuple[str, object]]) -> dict[str, object]:
    """``pairs`` (in QAPI schema insertion order) reordered as a QDict iterates them."""
    indexed = list(enumerate(pairs))
    indexed.sort(key=lambda item: (_tdb_hash(item[1][0]) % _QDICT_BUCKETS, -item[0]))
    return {key: value for _, (key, value) in indexed}


def dumps_qemu(obj: object, level: int = 0) -> str:
    """JSON as QEMU's pretty printer writes it: ``json.dumps(indent=4)`` except that
    an empty list or object still gets its line break (``[`` newline ``]``)."""
    pad = "    " * level
    if isinstance(obj, dict):
        items = [f"{pad}    {json.dumps(k)}: {dumps_qemu(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + ("\n" if items else "") + pad + "}"
    if isinstance(obj, list):
        items = [f"{pad}    {dumps_qemu(v, level + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + ("\n" if items else "") + pad + "]"
    return json.dumps(obj)


def qobject(value: object) -> object:
    """A nested value with objects given as tuples of (key, value) pairs in QAPI
    order, turned into dicts in QDict order (lists stay lists)."""
    if isinstance(value, tuple):
        return qdict_order([(k, qobject(v)) for k, v in value])
    if isinstance(value, list):
        return [qobject(v) for v in value]
    return value


# ---- sizes ----------------------------------------------------------------------


def size_to_str(value: int) -> str:
    """QEMU's size_to_str: three significant digits and a binary unit ("644 KiB")."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    index = int((exponent - 1) / 10)  # C division truncates toward zero
    index = max(0, min(index, len(suffixes) - 1))
    return f"{value / (1 << (index * 10)):.3g} {suffixes[index]}B"


# ---- info -----------------------------------------------------------------------


def info_dict(info: ImageInfo) -> dict[str, object]:
    """The ImageInfo QAPI object qemu-img prints for one image."""
    pairs: list[tuple[str, object]] = [
        ("filename", info.filename),
        ("format", info.format),
        ("dirty-flag", info.dirty),
        ("actual-size", info.actual_size),
        ("virtual-size", info.virtual_size),
    ]
    if info.cluster_size is not None:
        pairs.append(("cluster-size", info.cluster_size))
    if info.backing_filename is not None:
        pairs.append(("backing-filename", info.backing_filename))
        pairs.append(("full-backing-filename", info.full_backing_filename))
        if info.backing_format is not None:
            pairs.append(("backing-filename-format", info.backing_format))
    if info.snapshots:
        pairs.append(("snapshots", [_snapshot_dict(s) for s in info.snapshots]))
    if info.format_specific:
        data = qobject(info.format_specific)
        pairs.append(("format-specific", qdict_order([("type", info.format), ("data", data)])))
    return qdict_order(pairs)


def _snapshot_dict(snap: SnapshotInfo) -> dict[str, object]:
    pairs: list[tuple[str, object]] = [
        ("id", snap.id),
        ("name", snap.name),
        ("vm-state-size", snap.vm_state_size),
        ("date-sec", snap.date_sec),
        ("date-nsec", snap.date_nsec),
        ("vm-clock-sec", snap.vm_clock_nsec // 1_000_000_000),
        ("vm-clock-nsec", snap.vm_clock_nsec % 1_000_000_000),
    ]
    if snap.icount is not None:
        pairs.append(("icount", snap.icount))
    return qdict_order(pairs)


def snapshot_line(snap: SnapshotInfo | None) -> str:
    """One line of qemu-img's snapshot table (the heading for None); dates in local
    time, as there."""
    if snap is None:
        return f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.date_sec))
    secs = snap.vm_clock_nsec // 1_000_000_000
    millis = snap.vm_clock_nsec // 1_000_000 % 1000
    clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{millis:03d}"
    icount = "" if snap.icount is None else str(snap.icount)
    return (
        f"{snap.id:<9} {snap.name:<16} {size_to_str(snap.vm_state_size):>8}{date:>20}"
        f"{clock:>13}{icount:>11}"
    )


def _dump_human(value: object, level: int) -> list[str]:
    """QEMU's dump_qdict/dump_qlist: four spaces a level, dashes in keys as spaces,
    a composite value on the lines below its key."""
    pad = "    " * level
    items = (
        [(k.replace("-", " "), v) for k, v in value.items()]
        if isinstance(value, dict)
        else [(f"[{i}]", v) for i, v in enumerate(value)]
        if isinstance(value, list)
        else []
    )
    lines = []
    for key, item in items:
        if isinstance(item, dict | list):
            lines.append(f"{pad}{key}:")
            lines.extend(_dump_human(item, level + 1))
        else:
            text = ("true" if item else "false") if isinstance(item, bool) else str(item)
            lines.append(f"{pad}{key}: {text}")
    return lines


def info_json(chain: Sequence[ImageInfo], backing_chain: bool) -> str:
    if backing_chain:
        return dumps_qemu([info_dict(i) for i in chain])
    return dumps_qemu(info_dict(chain[0]))


def info_human(chain: Sequence[ImageInfo]) -> str:
    blocks = []
    for info in chain:
        lines = [
            f"image: {info.filename}",
            f"file format: {info.format}",
            f"virtual size: {size_to_str(info.virtual_size)} ({info.virtual_size} bytes)",
            f"disk size: {size_to_str(info.actual_size)}",
        ]
        if info.cluster_size is not None:
            lines.append(f"cluster_size: {info.cluster_size}")
        if info.dirty:  # qemu-img's wording for a dirty image (it misses QED's flag)
            lines.append("cleanly shut down: no")
        if info.backing_filename is not None:
            line = f"backing file: {info.backing_filename}"
            if info.full_backing_filename != info.backing_filename:
                line += f" (actual path: {info.full_backing_filename})"
            lines.append(line)
            if info.backing_format is not None:
                lines.append(f"backing file format: {info.backing_format}")
        if info.snapshots:
            lines.append("Snapshot list:")
            lines.append(snapshot_line(None))
            lines.extend(snapshot_line(s) for s in info.snapshots)
        if info.format_specific:
            lines.append("Format specific information:")
            lines.extend(_dump_human(qobject(info.format_specific), 1))
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


# ---- map ------------------------------------------------------------------------


def map_json(entries: Sequence[MapEntry], start: int = 0) -> str:
    """qemu-img map's JSON; an empty map is one empty entry at ``start``, as there."""
    if not entries:
        from ..engine.mapping import MapEntry

        entries = [MapEntry(start, 0, 0, False, False, False, None, "")]
    lines = []
    for e in entries:
        text = (
            f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
            f'"present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}'
        )
        if e.offset is not None:
            text += f', "offset": {e.offset}'
        lines.append(text + "}")
    return "[" + ",\n".join(lines) + "]\n"


def _b(value: bool) -> str:
    return "true" if value else "false"


def _hex(value: int) -> str:
    """C's %#x: no 0x prefix for zero."""
    return f"{value:#x}" if value else "0"


def map_human(entries: Iterable[MapEntry]) -> str:
    out = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e.data and not e.zero and e.offset is not None:
            out.append(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset):<16}{e.filename}")
    return "\n".join(out) + "\n"


# ---- check ----------------------------------------------------------------------


def check_dict(report: CheckReport) -> dict[str, object]:
    pairs: list[tuple[str, object]] = [
        ("filename", report.filename),
        ("format", report.format),
        ("check-errors", report.check_errors),
    ]
    for key, value in (
        ("corruptions", report.corruptions),
        ("leaks", report.leaks),
        ("corruptions-fixed", report.corruptions_fixed),
        ("leaks-fixed", report.leaks_fixed),
    ):
        if value:
            pairs.append((key, value))
    for key, value in (
        ("total-clusters", report.total_clusters),
        ("allocated-clusters", report.allocated_clusters),
        ("fragmented-clusters", report.fragmented_clusters),
    ):
        if value:
            pairs.append((key, value))
    # qedkit's own keys, present only when not empty (qemu-img has neither).
    saved = report.lost_found
    if saved is not None:
        inner: list[tuple[str, object]] = [
            ("filename", saved.filename),
            ("run", saved.run),
            ("clusters", saved.clusters),
            ("bytes", saved.bytes),
        ]
        pairs.append(("lost-and-found", qdict_order(inner)))
    if report.notes:
        pairs.append(("notes", list(report.notes)))
    return qdict_order(pairs)


def check_json(report: CheckReport) -> str:
    return dumps_qemu(check_dict(report))


def repaired_human(report: CheckReport) -> str:
    return (
        "The following inconsistencies were found and repaired:\n\n"
        f"    {report.leaks_fixed} leaked clusters\n"
        f"    {report.corruptions_fixed} corruptions\n\n"
        "Double checking the fixed image now...\n"
    )


def check_human(report: CheckReport) -> str:
    out = []
    if not (report.corruptions or report.leaks or report.check_errors):
        out.append("No errors were found on the image.\n")
    else:
        if report.corruptions:
            out.append(
                f"\n{report.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if report.leaks:
            out.append(
                f"\n{report.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if report.check_errors:
            out.append(f"\n{report.check_errors} internal errors have occurred during the check.\n")
    if report.total_clusters and report.allocated_clusters:
        alloc = report.allocated_clusters
        out.append(
            f"{alloc}/{report.total_clusters} = "
            f"{alloc * 100.0 / report.total_clusters:.2f}% allocated, "
            f"{report.fragmented_clusters * 100.0 / alloc:.2f}% fragmented, "
            f"{0.0:.2f}% compressed clusters\n"
        )
    return "".join(out)


def lost_found_human(report: CheckReport) -> str:
    """What the repair saved before reclaiming leaked clusters (stdout), if anything."""
    saved = report.lost_found
    if saved is None:
        return ""
    return (
        f"Saved {saved.clusters} leaked clusters ({size_to_str(saved.bytes)}) that may hold "
        f"lost data to {saved.filename} (run {saved.run}) before reclaiming them.\n"
    )


def notes_human(report: CheckReport) -> str:
    """Why leaks were kept and other remarks of a repair (stderr)."""
    return "".join(f"qed: {report.filename}: {note}\n" for note in report.notes)


def problems_human(report: CheckReport, limit: int = 20) -> str:
    """Details of what was found (stderr, human mode), at most ``limit`` lines."""
    lines = [
        f"  {p.kind} at offset {p.offset:#x}: {p.message}"
        for p in report.problems
        if p.kind != "leak"
    ]
    if len(lines) > limit:
        lines = [*lines[:limit], f"  ... and {len(lines) - limit} more"]
    return "\n".join(lines) + ("\n" if lines else "")


# ---- frag -----------------------------------------------------------------------


def frag_dict(report: FragReport) -> dict[str, object]:
    """``qed frag --output=json``: qemu-img's kebab-case keys, in reading order."""
    return {
        "filename": report.filename,
        "format": "qed",
        "virtual-size": report.image_size,
        "cluster-size": report.cluster_size,
        "file-size": report.file_size,
        "data-start": report.data_start,
        "layout": report.layout_kind,
        "total-clusters": report.total_clusters,
        "allocated-clusters": report.allocated_clusters,
        "zero-clusters": report.zero_clusters,
        "fragmented-clusters": report.fragmented_clusters,
        "fragmented-percent": round(report.fragmented_percent, 2),
        "away-from-home-clusters": report.away_clusters,
        "away-from-home-percent": round(report.away_percent, 2),
        "runs": report.runs,
        "host-extents": report.extents,
        "max-extents-per-run": report.max_extents,
        "mean-extents-per-run": round(report.mean_extents, 2),
        "raw-like": report.raw_like,
    }


def frag_json(report: FragReport) -> str:
    return json.dumps(frag_dict(report), indent=4)


def frag_human(report: FragReport) -> str:
    alloc = report.allocated_clusters
    lines = [
        f"image: {report.filename} ({size_to_str(report.image_size)} disk, "
        f"{size_to_str(report.cluster_size)} clusters; file {size_to_str(report.file_size)}, "
        f"data area from {_hex(report.data_start)})",
        f"allocated {alloc}/{report.total_clusters} clusters ({report.allocated_percent:.2f}%), "
        f"{report.zero_clusters} zero clusters",
        f"fragmented {report.fragmented_percent:.2f}% ({report.fragmented_clusters} clusters, "
        f"as qemu-img check counts), away from home {report.away_percent:.2f}% "
        f"({report.away_clusters} clusters, {report.layout_kind} layout)",
    ]
    runs = f"{report.runs} run" + ("" if report.runs == 1 else "s")
    if not report.runs:
        lines.append("no data clusters: nothing to read from the file")
    elif report.raw_like:
        lines.append(f"raw-like: {runs} of data, each read with one host read (extents == runs)")
    else:
        lines.append(
            f"host extents {report.extents} for {runs} "
            f"(max {report.max_extents}, mean {report.mean_extents:.1f}; raw-like is 1 per run)"
        )
    return "\n".join(lines) + "\n"


# ---- qed convert --in-place ----------------------------------------------------------


def _clusters(n: int, cluster_size: int) -> str:
    return f"{n} cluster{'' if n == 1 else 's'} ({size_to_str(n * cluster_size)})"


def inplace_json(report: dict[str, object]) -> str:
    """``qed convert --in-place --output=json`` (dry run or real run): the report's
    kebab-case keys (jobs.inplace ``ConversionPlan.as_dict``, ``ConversionReport``)."""
    return json.dumps(report, indent=4)


def inplace_human(report: dict[str, Any], *, dry_run: bool) -> str:
    """The same figures for people: what is reused, copied, written, reclaimed."""
    lines: list[str] = []
    if "cluster-size" in report:
        cs = int(report["cluster-size"])
        reasons = report["copied-by-reason"]
        why = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
        head = "would convert" if dry_run else "converted"
        lines += [
            f"{report['filename']}: {head} qcow2 v{report['qcow2-version']} "
            f"({size_to_str(int(report['qcow2-cluster-size']))} clusters) to QED in place "
            f"(cluster_size {cs}, table_size {report['table-size']})",
            f"  reused in place: {_clusters(int(report['reused-clusters']), cs)}",
            f"  copied:          {_clusters(int(report['copied-clusters']), cs)}"
            + (f": {why}" if why else ""),
            f"  zero clusters:   {report['zero-clusters']}; unallocated: "
            f"{report['unallocated-clusters']}",
            f"  new tables:      L1 and {report['l2-tables']} L2 "
            f"({size_to_str(int(report['table-bytes']))})",
            f"  reclaimable:     {size_to_str(int(report['reclaimable-bytes']))} of qcow2 "
            "metadata and unused clusters",
        ]
        dropped = []
        if report["snapshots-discarded"]:
            dropped.append(f"{report['snapshots-discarded']} snapshots")
        if report["bitmaps-discarded"]:
            dropped.append(f"{report['bitmaps-discarded']} bitmaps")
        if dropped:
            lines.append(f"  discarded:       {' and '.join(dropped)}")
        if dry_run:
            lines.append(f"  would write:     {size_to_str(int(report['bytes-to-write']))}")
    elif report.get("resumed"):
        lines.append(f"{report.get('filename', '')}: already QED; finished the reclaim")
    if not dry_run:
        moved = int(report["bytes-moved"])
        lines += [
            f"  written:         {size_to_str(int(report['bytes-written']))} before the "
            f"switch, {size_to_str(moved)} moved by the reclaim ({report['reclaim']}: "
            f"{report['clusters-moved']} clusters, {report['tables-moved']} tables)",
            f"  file:            {size_to_str(int(report.get('file-size-before', 0)))} -> "
            f"{size_to_str(int(report['file-size-after']))}, allocated "
            f"{size_to_str(int(report.get('allocated-before', 0)))} -> "
            f"{size_to_str(int(report['allocated-after']))} ({report['seconds']} s)",
        ]
    return "\n".join(lines) + "\n"


# ---- qed ctl ----------------------------------------------------------------------


def ctl_human(value: Any, indent: str = "") -> str:
    """A control socket reply for people: ``key: value`` lines, nested objects
    indented, list items separated by ``--``."""
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{indent}{key}:")
                lines.append(ctl_human(item, indent + "  "))
            else:
                text = json.dumps(item) if item is None or isinstance(item, bool) else item
                lines.append(f"{indent}{key}: {text}")
        return "\n".join(lines)
    if isinstance(value, list):
        if not value:
            return f"{indent}(none)"
        return f"\n{indent}--\n".join(ctl_human(item, indent) for item in value)
    return f"{indent}{value}"


def _metavar(argument: dict[str, Any]) -> str:
    kind = str(argument["type"])
    if "|" in kind:  # a choice: its values
        return kind
    return {"size": "SIZE", "integer": "N", "number": "N"}.get(kind, str(argument["name"]).upper())


def _entry(call: str, text: str, arguments: Sequence[dict[str, Any]]) -> list[str]:
    """One command or job type: its call and what it does (on one line when the call
    is short), then a line per argument."""
    width = 20
    lines = (
        [f"  {call:<{width}}{text}"]
        if len(call) < width
        else [f"  {call}", f"  {'':<{width}}{text}"]
    )
    column = max([10, *(len(a["name"]) + 2 for a in arguments)])
    lines += [f"      {a['name']:<{column}}{a['help']}" for a in arguments]
    return lines


def _call(name: str, arguments: Sequence[dict[str, Any]], more: str = "") -> str:
    words = [name]
    for a in arguments:
        word = f"{a['name']}={_metavar(a)}"
        words.append(word if a["required"] else f"[{word}]")
    return " ".join([*words, more] if more else words)


def control_reference_human(reference: dict[str, Any]) -> str:
    """The control commands and job types of a ``help`` reply (nbd.control.describe)
    with their arguments, for ``qed ctl SOCKET help`` and ``qed ctl --help``."""
    lines = ["control commands (qed ctl SOCKET COMMAND [KEY=VALUE ...]):"]
    for c in reference["commands"]:
        more = "[KEY=VALUE ...]" if c["name"] == "job-start" else ""
        lines += _entry(_call(c["name"], c["arguments"], more), c["help"], c["arguments"])
    lines.append("job types (qed ctl SOCKET job-start type=TYPE [KEY=VALUE ...]):")
    for j in reference["job-types"]:
        lines += _entry(_call(j["type"], j["arguments"]), j["help"], j["arguments"])
    lines.append("SIZE: bytes, with an optional k, M, G or T suffix (binary); N: a number")
    return "\n".join(lines) + "\n"


# ---- measure ----------------------------------------------------------------------


def measure_json(m: Measurement) -> str:
    """qemu-img measure's JSON (BlockMeasureInfo)."""
    return dumps_qemu(qdict_order(m.pairs()))


def measure_human(m: Measurement) -> str:
    return f"required size: {m.required}\nfully allocated size: {m.fully_allocated}"
