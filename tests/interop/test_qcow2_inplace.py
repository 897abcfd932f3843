"""``qed convert --in-place``: qcow2 images made by qemu-img and qemu-io become QED in
the same file; QEMU judges the result.

Every image of test_qcow2_read's ``CASES`` that can be converted (v2 and v3, 512 B to
2 MiB clusters, zlib and zstd ``convert -c``, ``write -z`` zero clusters, extended L2
with partial subclusters, a raw and a qcow2 backing file, refcount orders 0 and 6,
preallocation) plus every power-of-two cluster size from 4 KiB to 2 MiB, a backing
name too long for the header sector and a qcow2 whose clusters 1.. hold data, is
converted on a copy of its directory. Then:

* ``qemu-img info`` says qed, ``qemu-img check`` exits 0 (no leak: the reclaim
  compacted the file), ``qemu-img compare`` against ``qemu-img convert -O raw`` of
  the original says identical, and qedkit reads the same bytes;
* the dry run reported the figures the real run reports, and the real run wrote
  nothing a dry run did not announce;
* the allocated size did not double (or, for images whose data must be inflated or
  copied, is no larger than ``qemu-img convert -O qed`` of the same image plus the
  tables);
* the figures (reused / copied) are printed for each case (``-s``) and checked where
  the case dictates them (compressed clusters are copied, plain data is reused).

Refusals: snapshots and bitmaps (then ``--discard-snapshots``), the dirty and corrupt
bits, encryption, external data files: exit 1 with the feature named and the file
byte for byte unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qedtest import Qemu
from test_qcow2_read import CASES, _create, _io

import qedkit
from qedkit.cli.main import main as qed_main

KiB = 1 << 10
MiB = 1 << 20

pytestmark = pytest.mark.qemu

REFUSED = {"dirty", "corrupt", "snapshot", "bitmaps"}  # refused without --discard-snapshots
COMPRESSED = {"zlib-64k", "zlib-4k", "zlib-512", "zlib-2m", "zstd-64k", "zstd-extl2"}


def _qed(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = qed_main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


# ==========================================================================================
# Images
# ==========================================================================================


def make_cluster_size(cs: int) -> Callable[[Qemu, Path], Path]:
    def make(qemu: Qemu, d: Path) -> Path:
        p = d / f"cs{cs}.qcow2"
        size = 4 * MiB + 12 * cs
        _create(qemu, p, str(size), f"cluster_size={cs}")
        _io(qemu, p, f"write -P 0x21 0 {3 * cs}", f"write -P 0x22 {cs + 100} 3000",
            f"write -z {8 * cs} {2 * cs}", f"write -P 0x23 2m {2 * cs + 512}",
            f"write -P 0x24 {size - 2 * cs} {2 * cs}")  # fmt: skip
        return p

    return make


def make_long_backing_name(qemu: Qemu, d: Path) -> Path:
    """A backing name of 600 bytes: it cannot go into the QED header sector, so the
    QED header points at the qcow2 name where it lies."""
    sub = d / ("d" * 200) / ("e" * 200) / ("f" * 180)
    sub.mkdir(parents=True, exist_ok=True)
    with open(sub / "base.raw", "wb") as f:
        f.truncate(2 * MiB)
        f.write(bytes(range(256)) * 1024)
    name = str((sub / "base.raw").relative_to(d))
    assert len(name) > 448
    p = d / "long-name.qcow2"
    _create(qemu, p, "2M", "", "-b", name, "-F", "raw")
    _io(qemu, p, "write -P 0x31 64k 64k", "write -z 512k 64k")
    return p


def make_data_low(qemu: Qemu, d: Path) -> Path:
    """qcow2 clusters 1..3 hold data (its refcount table and L1 moved past them), so
    the L1 table's move to cluster 1 has to evict data first."""
    src = d / "data-low.src.qcow2"
    _create(qemu, src, "4M", "cluster_size=4096")
    _io(qemu, src, "write -P 0x41 0 1m")
    p = d / "data-low.qcow2"
    # qemu-img convert with preallocation of the metadata writes the tables first;
    # amend to a bigger refcount width rewrites the refcount structures elsewhere and
    # frees clusters 1-2, which a later allocation takes.
    qemu.img("convert", "-O", "qcow2", "-o", "cluster_size=4096", src, p)
    src.unlink()
    qemu.img("amend", "-o", "refcount_bits=64", p)
    _io(qemu, p, "write -P 0x42 2m 64k")
    return p


EXTRA = {
    **{f"cs-{cs // KiB}k": make_cluster_size(cs) for cs in (4 * KiB, 8 * KiB, 32 * KiB)},
    **{f"cs-{cs // KiB}k": make_cluster_size(cs) for cs in (128 * KiB, 256 * KiB, 512 * KiB)},
    "cs-1m": make_cluster_size(1 * MiB),
    "cs-2m": make_cluster_size(2 * MiB),
    "long-name": make_long_backing_name,
    "data-low": make_data_low,
}

ALL = {**{k: c.make for k, c in CASES.items()}, **EXTRA}
CONVERTIBLE = sorted(set(ALL) - REFUSED)


@pytest.fixture(scope="session")
def originals(qemu: Qemu, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every image, each in a directory of its own (with its backing files), with
    ``expected.raw``: qemu-img convert -O raw of it."""
    root = tmp_path_factory.mktemp("inplace-originals")
    out = {}
    for name, make in ALL.items():
        d = root / name
        d.mkdir()
        path = make(qemu, d)
        qemu.img("convert", "-U", "-O", "raw", path, d / "expected.raw")
        out[name] = path
    return out


def _copy(originals: dict[str, Path], name: str, tmp_path: Path) -> Path:
    src = originals[name].parent
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst / originals[name].name


# ==========================================================================================
# Conversion
# ==========================================================================================


def _convert(path: Path, *extra: str) -> dict[str, Any]:
    code, out, err = _qed("convert", "--in-place", "--output=json", *extra, path)
    assert code == 0, err
    report: dict[str, Any] = json.loads(out)
    return report


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_in_place_conversion_equals_qemu_img_convert_and_checks_clean(
    name: str, originals: dict[str, Path], qemu: Qemu, tmp_path: Path
) -> None:
    path = _copy(originals, name, tmp_path)
    expected = path.parent / "expected.raw"
    allocated_before = _allocated(path)
    dry = _convert(path, "--dry-run")
    assert _sha(path) == _sha(originals[name]), "the dry run wrote"
    report = _convert(path)
    for key, value in dry.items():  # the dry run's figures are the real run's
        assert report[key] == value, key
    info = json.loads(qemu.img("info", "--output=json", path).stdout)
    assert info["format"] == "qed"
    assert info["cluster-size"] == report["cluster-size"]
    check = qemu.img("check", "-f", "qed", path, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    qemu.img("compare", "-f", "qed", "-F", "raw", path, expected)
    raw = expected.read_bytes()
    with qedkit.open(str(path), readonly=True) as img:
        assert img.format == "qed"
        assert img.read(0, img.size) == raw
        assert img.check().corruptions == 0

    # The disk space: no doubling, unless the data had to be inflated or copied, and
    # then no more than a converted copy with the same geometry.
    allocated_after = _allocated(path)
    copy = tmp_path / "copy.qed"
    geometry = f"cluster_size={report['cluster-size']},table_size={report['table-size']}"
    qemu.img("convert", "-O", "qed", "-o", geometry, originals[name], copy)
    tables = report["table-bytes"]
    assert allocated_after <= max(2 * allocated_before, _allocated(copy) + tables), (
        allocated_before,
        allocated_after,
        _allocated(copy),
    )
    cs = report["cluster-size"]
    print(
        f"\n{name}: qcow2 {report['qcow2-cluster-size']} -> QED {cs}/{report['table-size']}: "
        f"reused {report['reused-clusters']}, copied {report['copied-clusters']} "
        f"{report['copied-by-reason']}, zero {report['zero-clusters']}; allocated "
        f"{allocated_before} -> {allocated_after} (qemu-img convert -O qed: "
        f"{_allocated(copy)}); written {report['bytes-written']}, moved {report['bytes-moved']}"
    )
    assert report["bytes-written"] == report["bytes-to-write"]
    if name in COMPRESSED:
        assert report["copied-by-reason"].get("compressed", 0) > 0
    if name.startswith("cs-") or name in ("v2", "v3-4k", "v3-2m", "refcount-1", "over-raw"):
        assert report["copied-clusters"] == 0, report["copied-by-reason"]
        assert report["reused-clusters"] > 0
    if name in ("extl2", "extl2-over-raw", "extl2-16k"):
        assert report["copied-by-reason"].get("subclusters", 0) > 0
    if name == "extl2":
        assert report["reused-clusters"] > 0  # its fully allocated clusters
    if name in ("v3-512", "zlib-512"):
        assert report["qcow2-cluster-size"] == 512 and cs == 4096


def test_a_backing_name_longer_than_the_header_sector_stays_where_qcow2_put_it(
    originals: dict[str, Path], qemu: Qemu, tmp_path: Path
) -> None:
    path = _copy(originals, "long-name", tmp_path)
    name = qemu.img("info", "--output=json", path).stdout
    _convert(path)
    info = json.loads(qemu.img("info", "--output=json", path).stdout)
    assert info["backing-filename"] == json.loads(name)["backing-filename"]
    assert info["backing-filename-format"] == "raw"  # recorded as NO_PROBE
    header = path.read_bytes()[:64]
    offset = int.from_bytes(header[56:60], "little")
    assert offset > 64  # not at 64: the qcow2 name's own place


def test_in_place_conversion_is_refused_for_snapshots_then_done_with_discard_snapshots(
    originals: dict[str, Path], qemu: Qemu, tmp_path: Path
) -> None:
    for name, what in (("snapshot", "2 internal snapshots"), ("bitmaps", "2 persistent bitmaps")):
        path = _copy(originals, name, tmp_path)
        before = _sha(path)
        code, _, err = _qed("convert", "--in-place", path)
        assert code == 1
        assert err.startswith(f"qed: {path}: the image has {what}"), err
        assert "--discard-snapshots" in err
        assert _sha(path) == before
        report = _convert(path, "--discard-snapshots")
        assert report["snapshots-discarded" if name == "snapshot" else "bitmaps-discarded"] == 2
        assert qemu.img("check", "-f", "qed", path, check=False).returncode == 0
        qemu.img("compare", "-f", "qed", "-F", "raw", path, path.parent / "expected.raw")
        assert json.loads(qemu.img("info", "--output=json", path).stdout)["format"] == "qed"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("dirty", "the image has the dirty bit set"),
        ("corrupt", "the image has the corrupt bit set"),
    ],
)
def test_dirty_and_corrupt_images_are_refused_naming_the_bit(
    name: str, message: str, originals: dict[str, Path], tmp_path: Path
) -> None:
    path = _copy(originals, name, tmp_path)
    before = _sha(path)
    for extra in ((), ("--dry-run",), ("--discard-snapshots",)):
        code, _, err = _qed("convert", "--in-place", *extra, path)
        assert code == 1
        assert err.startswith(f"qed: {path}: {message}"), err
        assert _sha(path) == before


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("aes", "encrypted qcow2 images (AES) are not supported"),
        ("data-file", "qcow2 images with an external data file ('data.raw') are not supported"),
    ],
)
def test_encrypted_and_data_file_images_are_refused_unchanged(
    kind: str, message: str, qemu: Qemu, tmp_path: Path
) -> None:
    path = tmp_path / f"{kind}.qcow2"
    if kind == "aes":
        qemu.img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=abc",
                 "-o", "encrypt.format=aes,encrypt.key-secret=sec0", path, "1M")  # fmt: skip
    else:
        qemu.img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", path, "1M")
    before = _sha(path)
    code, _, err = _qed("convert", "--in-place", path)
    assert code == 1 and err.startswith(f"qed: {path}: ") and message in err, err
    assert _sha(path) == before


def test_punch_reclaim_moves_no_data_and_leaves_only_leaks(
    originals: dict[str, Path], qemu: Qemu, tmp_path: Path
) -> None:
    path = _copy(originals, "zlib-64k", tmp_path)
    report = _convert(path, "--reclaim=punch")
    assert report["reclaim"] == "punch" and report["clusters-moved"] == 0
    assert report["punched-bytes"] > 0
    check = qemu.img("check", "-f", "qed", "--output=json", path, check=False)
    assert check.returncode == 3  # the punched slots are leaks to every QED checker
    assert json.loads(check.stdout).get("corruptions", 0) == 0
    qemu.img("compare", "-f", "qed", "-F", "raw", path, path.parent / "expected.raw")
    # running it again finishes with a compaction: clean
    again = _convert(path)
    assert again["resumed"] is True
    assert qemu.img("check", "-f", "qed", path, check=False).returncode == 0
    qemu.img("compare", "-f", "qed", "-F", "raw", path, path.parent / "expected.raw")


def test_human_output_and_progress(originals: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(originals, "extl2", tmp_path)
    code, out, err = _qed("convert", "--in-place", "--dry-run", path)
    assert code == 0, err
    assert out.startswith(f"{path}: would convert qcow2 v3 (64 KiB clusters) to QED in place")
    assert "reused in place:" in out and "would write:" in out
    code, out, err = _qed("convert", "--in-place", "-p", path)
    assert code == 0, err
    assert out.startswith(f"{path}: converted qcow2 v3")
    assert "written:" in out and "file:" in out
    assert "100" in err  # the progress reached the end
    code, out, err = _qed("convert", "--in-place", "--dry-run", path)
    assert code == 0 and "already a QED image" in out


def test_in_place_flags_are_checked(tmp_path: Path) -> None:
    raw = tmp_path / "x.raw"
    raw.write_bytes(bytes(1 << 20))
    assert _qed("convert", "--in-place", raw, tmp_path / "y")[0] == 1
    code, _, err = _qed("convert", "--in-place", raw)
    assert code == 1 and "only qcow2 images convert in place" in err
    code, _, err = _qed("convert", "--dry-run", raw, tmp_path / "y")
    assert code == 1 and "--dry-run goes with --in-place" in err
    code, _, err = _qed("convert", raw)
    assert code == 1 and "a target DST is needed" in err
