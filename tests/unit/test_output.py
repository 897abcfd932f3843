"""qedkit.cli.output: byte-for-byte what qemu-img prints.

Expected strings are qemu-img 7.2 output (map, check, info) or QEMU's size_to_str
algorithm compiled in C, for the values below.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from qedkit.cli.output import (
    check_dict,
    check_json,
    info_dict,
    info_json,
    lost_found_human,
    map_human,
    map_json,
    notes_human,
    qdict_order,
    size_to_str,
)
from qedkit.engine.base import ImageInfo
from qedkit.engine.check import CheckReport
from qedkit.engine.lostfound import SavedRun
from qedkit.engine.mapping import MapEntry

# ---- size_to_str -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (5, "5 B"),
        (512, "512 B"),
        (999, "999 B"),
        (1000, "0.977 KiB"),
        (1023, "0.999 KiB"),
        (1024, "1 KiB"),
        (1025, "1 KiB"),
        (1536, "1.5 KiB"),
        (123456, "121 KiB"),
        (659456, "644 KiB"),
        (1048064, "1 MiB"),
        (1048575, "1 MiB"),
        (1048576, "1 MiB"),
        (10485760, "10 MiB"),
        (123457024, "118 MiB"),
        (1073741823, "1 GiB"),
        (1610612736, "1.5 GiB"),
        (64424509440, "60 GiB"),
        (1099511627776, "1 TiB"),
        (1125899906842624, "1 PiB"),
        (1152921504606846976, "1 EiB"),
        (2**63 - 1, "8 EiB"),
        (2**64 - 1, "16 EiB"),
    ],
)
def test_size_to_str_matches_qemu(value: int, text: str) -> None:
    assert size_to_str(value) == text


# ---- QDict key order ---------------------------------------------------------------


def test_qdict_order_of_check_keys_is_qemu_img_check_order() -> None:
    pairs = [
        ("filename", "f"),
        ("format", "qed"),
        ("check-errors", 0),
        ("corruptions", 1),
        ("leaks", 1),
        ("total-clusters", 64),
        ("allocated-clusters", 4),
        ("fragmented-clusters", 3),
    ]
    assert list(qdict_order(pairs)) == [
        "total-clusters",
        "corruptions",
        "check-errors",
        "leaks",
        "allocated-clusters",
        "filename",
        "format",
        "fragmented-clusters",
    ]


def test_qdict_order_of_info_keys_is_qemu_img_info_order() -> None:
    pairs = [
        ("filename", "f"),
        ("format", "qed"),
        ("dirty-flag", False),
        ("actual-size", 1),
        ("virtual-size", 2),
        ("cluster-size", 65536),
        ("backing-filename", "b"),
        ("full-backing-filename", "b"),
        ("backing-filename-format", "raw"),
    ]
    assert list(qdict_order(pairs)) == [
        "backing-filename-format",
        "virtual-size",
        "filename",
        "cluster-size",
        "format",
        "actual-size",
        "full-backing-filename",
        "backing-filename",
        "dirty-flag",
    ]


def test_qdict_order_does_not_depend_on_insertion_order_across_buckets() -> None:
    pairs = [("filename", 1), ("format", 2), ("total-clusters", 3)]
    assert list(qdict_order(pairs)) == list(qdict_order(pairs[::-1]))


def test_qdict_order_keeps_values() -> None:
    assert qdict_order([("a", 1), ("b", [2])]) == {"a": 1, "b": [2]}


def test_check_json_matches_qemu_img_check_with_corruption_and_leak() -> None:
    report = CheckReport(
        filename="c.qed",
        format="qed",
        total_clusters=64,
        allocated_clusters=4,
        fragmented_clusters=3,
        corruptions=1,
        leaks=1,
    )
    # `qemu-img check --output=json c.qed` on the same image (rc 2).
    assert check_json(report) == (
        "{\n"
        '    "total-clusters": 64,\n'
        '    "corruptions": 1,\n'
        '    "check-errors": 0,\n'
        '    "leaks": 1,\n'
        '    "allocated-clusters": 4,\n'
        '    "filename": "c.qed",\n'
        '    "format": "qed",\n'
        '    "fragmented-clusters": 3\n'
        "}"
    )


def test_check_json_after_repair_matches_qemu_img_check_r_all() -> None:
    report = CheckReport(
        filename="c2.qed",
        format="qed",
        total_clusters=64,
        allocated_clusters=3,
        fragmented_clusters=2,
        corruptions_fixed=1,
        leaks=1,
    )
    assert list(check_dict(report)) == [
        "total-clusters",
        "corruptions-fixed",
        "check-errors",
        "leaks",
        "allocated-clusters",
        "filename",
        "format",
        "fragmented-clusters",
    ]


def test_check_json_of_a_clean_empty_image() -> None:
    report = CheckReport(filename="a.qed", format="qed", total_clusters=16)
    assert json.loads(check_json(report)) == {
        "total-clusters": 16,
        "check-errors": 0,
        "filename": "a.qed",
        "format": "qed",
    }
    assert list(check_dict(report)) == ["total-clusters", "check-errors", "filename", "format"]


def test_check_json_names_the_lost_found_archive_and_the_notes_only_when_present() -> None:
    saved = SavedRun("c.qed.lost+found.tar", "20261202T131500Z", 2, 131072)
    report = CheckReport(
        filename="c.qed",
        format="qed",
        total_clusters=64,
        allocated_clusters=3,
        corruptions_fixed=1,
        leaks_fixed=2,
        lost_found=saved,
        notes=("a note",),
    )
    got = json.loads(check_json(report))
    assert got.pop("lost-and-found") == {
        "filename": "c.qed.lost+found.tar",
        "run": "20261202T131500Z",
        "clusters": 2,
        "bytes": 131072,
    }
    assert got.pop("notes") == ["a note"]
    plain = dataclasses.replace(report, lost_found=None, notes=())
    assert got == json.loads(check_json(plain))  # otherwise qemu-img's keys
    assert "lost" not in check_json(plain) and "notes" not in check_json(plain)
    assert lost_found_human(plain) == notes_human(plain) == ""
    assert lost_found_human(report) == (
        "Saved 2 leaked clusters (128 KiB) that may hold lost data to c.qed.lost+found.tar "
        "(run 20261202T131500Z) before reclaiming them.\n"
    )
    assert notes_human(report) == "qed: c.qed: a note\n"


def test_info_json_matches_qemu_img_info_with_raw_backing() -> None:
    info = ImageInfo(
        filename="ov2.qed",
        format="qed",
        virtual_size=1048576,
        actual_size=266240,
        cluster_size=65536,
        backing_filename="b.raw",
        full_backing_filename="b.raw",
        backing_format="raw",
        dirty=False,
    )
    assert info_json([info], backing_chain=False) == (
        "{\n"
        '    "backing-filename-format": "raw",\n'
        '    "virtual-size": 1048576,\n'
        '    "filename": "ov2.qed",\n'
        '    "cluster-size": 65536,\n'
        '    "format": "qed",\n'
        '    "actual-size": 266240,\n'
        '    "full-backing-filename": "b.raw",\n'
        '    "backing-filename": "b.raw",\n'
        '    "dirty-flag": false\n'
        "}"
    )


def test_info_dict_of_raw_image_has_no_cluster_size_or_backing_keys() -> None:
    info = ImageInfo(filename="r", format="raw", virtual_size=1, actual_size=0)
    assert list(info_dict(info)) == [
        "virtual-size",
        "filename",
        "format",
        "actual-size",
        "dirty-flag",
    ]


# ---- map ---------------------------------------------------------------------------


def entry(
    start: int,
    length: int,
    depth: int,
    present: bool,
    zero: bool,
    data: bool,
    offset: int | None,
    filename: str = "a.qed",
) -> MapEntry:
    return MapEntry(start, length, depth, present, zero, data, offset, filename)


SIMPLE = [
    entry(0, 65536, 0, True, False, True, 327680),
    entry(65536, 983040, 0, False, True, False, None),
]

# top.qed (1 MiB) over base.raw: data at 0 and 512k in top, zero clusters at 256k-384k,
# data at 128k in base.
CHAIN = [
    entry(0, 65536, 0, True, False, True, 327680, "top.qed"),
    entry(65536, 65536, 1, True, True, False, 65536, "base.raw"),
    entry(131072, 65536, 1, True, False, True, 131072, "base.raw"),
    entry(196608, 65536, 1, True, True, False, 196608, "base.raw"),
    entry(262144, 131072, 0, True, True, False, None, "top.qed"),
    entry(393216, 131072, 1, True, True, False, 393216, "base.raw"),
    entry(524288, 65536, 0, True, False, True, 655360, "top.qed"),
    entry(589824, 458752, 1, True, True, False, 589824, "base.raw"),
]


def test_map_json_matches_qemu_img_map() -> None:
    assert map_json(SIMPLE) == (
        '[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, '
        '"data": true, "offset": 327680},\n'
        '{ "start": 65536, "length": 983040, "depth": 0, "present": false, "zero": true, '
        '"data": false}]\n'
    )


def test_map_json_of_a_backing_chain_matches_qemu_img_map() -> None:
    assert map_json(CHAIN) == (
        '[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},\n'  # noqa: E501
        '{ "start": 65536, "length": 65536, "depth": 1, "present": true, "zero": true, "data": false, "offset": 65536},\n'  # noqa: E501
        '{ "start": 131072, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "offset": 131072},\n'  # noqa: E501
        '{ "start": 196608, "length": 65536, "depth": 1, "present": true, "zero": true, "data": false, "offset": 196608},\n'  # noqa: E501
        '{ "start": 262144, "length": 131072, "depth": 0, "present": true, "zero": true, "data": false},\n'  # noqa: E501
        '{ "start": 393216, "length": 131072, "depth": 1, "present": true, "zero": true, "data": false, "offset": 393216},\n'  # noqa: E501
        '{ "start": 524288, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 655360},\n'  # noqa: E501
        '{ "start": 589824, "length": 458752, "depth": 1, "present": true, "zero": true, "data": false, "offset": 589824}]\n'  # noqa: E501
    )


def test_map_json_parses_as_the_entries_qemu_dicts() -> None:
    parsed = json.loads(map_json(CHAIN))
    assert [e.as_qemu_dict() for e in CHAIN] == parsed


def test_map_json_of_an_empty_image_matches_qemu_img_map() -> None:
    # `qemu-img map --output=json` of a 0-byte QED image.
    assert map_json([]) == (
        '[{ "start": 0, "length": 0, "depth": 0, "present": false, "zero": false, "data": false}]\n'
    )


HEADER_LINE = "Offset          Length          Mapped to       File\n"


def test_map_human_header_is_qemus() -> None:
    assert map_human([]) == HEADER_LINE
    expected = f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"  # C's %-16s
    assert expected == HEADER_LINE


def test_map_human_matches_qemu_img_map() -> None:
    assert (
        map_human(SIMPLE) == HEADER_LINE + "0               0x10000         0x50000         a.qed\n"
    )


def test_map_human_of_a_backing_chain_lists_data_only() -> None:
    assert map_human(CHAIN) == (
        HEADER_LINE
        + "0               0x10000         0x50000         top.qed\n"
        + "0x20000         0x10000         0x20000         base.raw\n"
        + "0x80000         0x10000         0xa0000         top.qed\n"
    )


def test_map_human_uses_c_hash_x_where_zero_prints_as_0() -> None:
    out = map_human([entry(0, 0x10000, 0, True, False, True, 0x0, "r.raw")])
    assert out.splitlines()[1] == "0               0x10000         0               r.raw"


def test_map_human_does_not_truncate_wide_numbers() -> None:
    out = map_human([entry(2**62, 2**40, 0, True, False, True, 0x123456789ABCDEF0)])
    # C's %#-16x pads to 16 but never truncates, so wide values run together (as printf).
    assert out.splitlines()[1] == "0x40000000000000000x10000000000   0x123456789abcdef0a.qed"


def test_json_is_printed_like_qemu_with_empty_containers_broken_over_two_lines() -> None:
    from qedkit.cli.output import dumps_qemu

    value = {"a": [1, {"b": "x"}], "c": True, "d": None}
    assert dumps_qemu(value) == json.dumps(value, indent=4)
    assert dumps_qemu({"flags": [], "o": {}}) == ('{\n    "flags": [\n    ],\n    "o": {\n    }\n}')
