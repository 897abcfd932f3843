"""Copy-on-read against QEMU's own (qemu-io -C): the same reads of two overlays of one
raw base, one by qemu-io -C and one by ``qed io -C``, copy the same clusters (as
``qemu-img map`` reports them at depth 0) with the same content; every cluster
QEMU makes a zero cluster is one for us too. QEMU tests a whole copy request for
zeros, qedkit each cluster, so a request mixing zero and data clusters gives
QEMU data clusters where qedkit has zero clusters (the guest reads the same).
Then each tool reads and checks the other's result, and ``qed stream`` finishes
the overlay QEMU started."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qedtest import qed

CS = 64 * 1024
SIZE = 40 * CS + 4096  # the overlay ends inside a cluster, past the base's end
READS = [
    (CS + 100, 5000),  # inside cluster 1
    (3 * CS - 10, 20),  # across 2 and 3
    (8 * CS, 3 * CS),  # 8-10: all zeros in the base (one request: zero clusters)
    (11 * CS + 5, 2 * CS),  # 11-13: a zero cluster (12) among data
    (30 * CS, SIZE - 30 * CS),  # past the base's end (at 36 clusters)
]


def make_base(path: Path) -> bytes:
    data = bytearray((i * 7 + 3) % 251 + 1 for i in range(36 * CS))
    data[8 * CS : 11 * CS] = bytes(3 * CS)
    data[12 * CS : 13 * CS] = bytes(CS)
    path.write_bytes(data)
    return bytes(data)


def depth0(qemu: Any, image: Path) -> dict[int, bool]:
    """Cluster -> zero flag, for the clusters the overlay holds itself."""
    out: dict[int, bool] = {}
    for e in json.loads(qemu.img("map", "--output=json", image).stdout):
        if e["depth"] == 0 and e["present"]:
            for c in range(e["start"] // CS, -(-(e["start"] + e["length"]) // CS)):
                out[c] = e["zero"]
    return out


def test_qemu_io_C_and_qed_io_C_copy_the_same_clusters(qemu: Any, tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw")
    theirs, ours = tmp_path / "theirs.qed", tmp_path / "ours.qed"
    for image in (theirs, ours):
        qemu.img("create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", image, str(SIZE))
    commands = [arg for offset, length in READS for arg in ("-c", f"read {offset} {length}")]
    qemu.io("-C", *commands, theirs)
    result = qed("io", "-C", *commands, ours)
    assert result.returncode == 0, result.stderr
    mine, qemus = depth0(qemu, ours), depth0(qemu, theirs)
    assert set(mine) == set(qemus)
    assert {c for c, z in qemus.items() if z} <= {c for c, z in mine.items() if z}
    assert mine[12] and not qemus[12]  # the zero cluster inside a mixed request
    assert "Images are identical." in qemu.img("compare", ours, theirs).stdout
    for image in (ours, theirs):
        assert "No errors" in qemu.img("check", image).stdout
        result = qed("check", image)
        assert result.returncode == 0, result.stdout + result.stderr
    # qed stream finishes the overlay QEMU began; QEMU reads it without a backing file
    result = qed("stream", "--output=json", theirs)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["done"] is True
    info = json.loads(qemu.img("info", "--output=json", theirs).stdout)
    assert "backing-filename" not in info
    assert "Images are identical." in qemu.img("compare", ours, theirs).stdout
    assert "No errors" in qemu.img("check", theirs).stdout
