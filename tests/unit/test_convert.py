"""qed convert in-process: sparse output, round trips, no leaked loops or threads."""

from __future__ import annotations

import gc
import os
import threading
import warnings
from pathlib import Path

import qedkit
from qedkit.jobs.convert import convert


def make_raw(path: Path) -> bytes:
    data = bytearray(8 << 20)
    data[0:5000] = os.urandom(5000)  # partial first cluster
    data[1 << 20 : 3 << 20] = os.urandom(2 << 20)  # a data run
    data[5 << 20 : (5 << 20) + 65536] = b"\x01" * 65536
    path.write_bytes(bytes(data))
    return bytes(data)


def test_raw_to_qed_to_raw_round_trip_is_exact_and_sparse(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    expected = make_raw(src)
    threads_before = threading.active_count()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = convert(str(src), str(tmp_path / "a.qed"), dst_format="qed")
        convert(str(tmp_path / "a.qed"), str(tmp_path / "b.raw"), dst_format="raw")
        gc.collect()
    assert threading.active_count() == threads_before
    assert (tmp_path / "b.raw").read_bytes() == expected
    # only clusters holding non-zero bytes were written: 1 + 32 + 1 clusters
    assert stats.bytes_written == (1 + 32 + 1) * 65536
    with qedkit.open(str(tmp_path / "a.qed"), readonly=True) as img:
        assert img.check().allocated_clusters == 34
        data_entries = [e for e in img.map() if e.data]
        assert sum(e.length for e in data_entries) == 34 * 65536


def test_convert_keeps_a_chain_flattened(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * (1 << 20))
    qedkit.create(str(tmp_path / "top.qed"), 2 << 20, backing_file="base.raw", backing_format="raw")
    with qedkit.open(str(tmp_path / "top.qed")) as img:
        img.write(4096, b"T" * 100)
    convert(str(tmp_path / "top.qed"), str(tmp_path / "flat.qed"), dst_format="qed")
    with qedkit.open(str(tmp_path / "flat.qed"), readonly=True) as flat:
        assert flat.info().backing_filename is None
        assert flat.read(0, 4096) == b"B" * 4096
        assert flat.read(4096, 100) == b"T" * 100
        assert flat.read(1 << 20, 1 << 20) == bytes(1 << 20)
