"""``qed compare`` against ``qemu-img compare`` on the same pairs: the exit code and
the printed lines are the same for equal, differing and size-mismatched pairs, with
and without ``-s``, across formats (QED, raw, qcow2) and backing chains; and the
comparison reads only what block status says may hold data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from qedoracle import qed_in_process

from qedkit.engine.chain import open_image
from qedkit.engine.sync import run
from qedkit.jobs.compare import Outcome, compare_images

MiB = 1 << 20

# name -> (format, size, qemu-io commands, backing (name, format) or None)
IMAGES: dict[str, tuple[str, str, list[str], tuple[str, str] | None]] = {
    "empty": ("qed", "4M", [], None),
    "empty2": ("qed", "4M", [], None),
    "empty-big": ("qed", "6M", [], None),
    "data": ("qed", "4M", ["write -P 0x11 64k 128k", "write -P 0x22 3M 4k"], None),
    "data-same": ("qed", "4M", ["write -P 0x11 64k 128k", "write -P 0x22 3M 4k"], None),
    "data-byte": (
        "qed",
        "4M",
        ["write -P 0x11 64k 128k", "write -P 0x22 3M 4k", "write -P 0x33 100001 1"],
        None,
    ),
    "zeros-written": ("qed", "4M", ["write -P 0 0 1M"], None),
    "zero-clusters": ("qed", "4M", ["write -z 0 1M"], None),
    "tail-data": (
        "qed",
        "6M",
        ["write -P 0x11 64k 128k", "write -P 0x22 3M 4k", "write -P 0x44 5000123 7"],
        None,
    ),
    "tail-zeros": (
        "qed",
        "6M",
        ["write -P 0x11 64k 128k", "write -P 0x22 3M 4k", "write -P 0 5M 64k"],
        None,
    ),
    "raw-data": ("raw", "4M", ["write -P 0x11 64k 128k", "write -P 0x22 3M 4k"], None),
    "qcow2-data": ("qcow2", "4M", ["write -P 0x11 64k 128k", "write -P 0x22 3M 4k"], None),
    "base": ("raw", "4M", ["write -P 0x11 64k 128k"], None),
    "overlay": ("qed", "4M", ["write -P 0x22 3M 4k"], ("base", "raw")),
    "overlay-zeroed": ("qed", "4M", ["write -z 64k 64k"], ("base", "raw")),
    # A 5 MiB data run: two whole 2 MiB compare chunks and a partial last one.
    "long-run": ("qed", "8M", ["write -P 0x55 1M 5M"], None),
    "long-run-same": ("qed", "8M", ["write -P 0x55 1M 5M"], None),
    "long-run-last": ("qed", "8M", ["write -P 0x55 1M 5M", "write -P 0x56 6291455 1"], None),
    "long-run-edge": ("qed", "8M", ["write -P 0x55 1M 5M", "write -P 0x57 5M 1"], None),
    # The same bytes with a zero cluster inside the run on one side only.
    "long-run-zeroed": ("qed", "8M", ["write -P 0x55 1M 5M", "write -z 3M 64k"], None),
    "long-run-raw": ("raw", "8M", ["write -P 0x55 1M 5M"], None),
}

PAIRS = [
    ("empty", "empty2"),
    ("empty", "empty-big"),
    ("empty-big", "empty"),
    ("data", "data-same"),
    ("data", "data-byte"),
    ("data-byte", "data"),
    ("empty", "zeros-written"),
    ("zeros-written", "zero-clusters"),
    ("empty", "zero-clusters"),
    ("data", "tail-data"),
    ("tail-data", "data"),
    ("data", "tail-zeros"),
    ("data", "raw-data"),
    ("raw-data", "qcow2-data"),
    ("data", "qcow2-data"),
    ("data", "overlay"),
    ("overlay", "data"),
    ("overlay", "overlay-zeroed"),
    ("base", "overlay-zeroed"),
    ("long-run", "long-run-same"),
    ("long-run", "long-run-last"),
    ("long-run-last", "long-run"),
    ("long-run", "long-run-edge"),
    ("long-run", "long-run-zeroed"),
    ("long-run-zeroed", "long-run-raw"),
    ("long-run-raw", "long-run-last"),
    ("empty-big", "long-run"),
    ("long-run", "empty-big"),
    ("data", "long-run"),
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, qemu: Any) -> Path:
    d = tmp_path_factory.mktemp("compare")
    for name, (fmt, size, cmds, backing) in IMAGES.items():
        path = d / f"{name}.{fmt}"
        if backing is None:
            qemu.img("create", "-f", fmt, path, size)
        else:
            bname, bfmt = backing
            qemu.img("create", "-f", fmt, "-b", f"{bname}.{bfmt}", "-F", bfmt, path, size)
        if cmds:
            args: list[str] = []
            for c in cmds:
                args += ["-c", c]
            qemu.io("-f", fmt, *args, path)
    return d


def _path(d: Path, name: str) -> Path:
    return d / f"{name}.{IMAGES[name][0]}"


@pytest.mark.parametrize("strict", [False, True], ids=["plain", "strict"])
@pytest.mark.parametrize(("a", "b"), PAIRS, ids=[f"{a}-vs-{b}" for a, b in PAIRS])
def test_exit_code_and_message_equal_qemu_img_s(
    images: Path, qemu: Any, a: str, b: str, strict: bool
) -> None:
    flags = ["-s"] if strict else []
    pa, pb = _path(images, a), _path(images, b)
    theirs = qemu.img("compare", *flags, pa, pb, check=False)
    ours = qed_in_process("compare", *flags, pa, pb)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), (
        ours.stderr,
        theirs.stderr,
    )


def test_explicit_formats_are_used_not_probed(images: Path, qemu: Any) -> None:
    pa, pb = _path(images, "data"), _path(images, "raw-data")
    for flags in (["-f", "qed", "-F", "raw"], ["-f", "raw", "-F", "raw"]):
        theirs = qemu.img("compare", *flags, pa, pb, check=False)
        ours = qed_in_process("compare", *flags, pa, pb)
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)


def test_a_missing_or_unreadable_image_is_exit_2_naming_the_file(
    images: Path, qemu: Any, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.qed"
    theirs = qemu.img("compare", _path(images, "data"), missing, check=False)
    ours = qed_in_process("compare", _path(images, "data"), missing)
    assert theirs.returncode == ours.returncode == 2
    assert str(missing) in ours.stderr and ours.stdout == ""
    wrong = qed_in_process("compare", "-f", "qcow2", _path(images, "data"), missing)
    assert wrong.returncode == 2 and str(_path(images, "data")) in wrong.stderr


def test_quiet_prints_nothing_and_keeps_the_exit_code(images: Path) -> None:
    ours = qed_in_process("compare", "-q", _path(images, "data"), _path(images, "data-byte"))
    assert (ours.returncode, ours.stdout) == (1, "")


def test_holes_and_zero_clusters_on_both_sides_are_never_read(tmp_path: Path, qemu: Any) -> None:
    a, b = tmp_path / "a.qed", tmp_path / "b.qed"
    qemu.img("create", "-f", "qed", a, "1G")
    qemu.img("create", "-f", "qed", b, "1G")
    qemu.io("-c", "write -P 7 512M 64k", "-c", "write -z 0 256M", a)
    qemu.io("-c", "write -P 7 512M 64k", b)

    async def go() -> Any:
        ia = await open_image(str(a), readonly=True)
        ib = await open_image(str(b), readonly=True)
        try:
            return await compare_images(ia, ib)
        finally:
            await ia.close()
            await ib.close()

    result = run(go())
    assert result.outcome is Outcome.IDENTICAL
    assert result.bytes_read == 2 * 64 * 1024  # the one data cluster, on both sides


def test_force_share_reads_through_the_buffers_and_says_the_same(images: Path) -> None:
    """Without -U both QED and raw files are compared in place over read-only mappings
    (our locks keep writers out); with -U they are not mapped but read. Both paths
    must report the same result and offset for every pair."""
    for a, b in PAIRS:
        pa, pb = _path(images, a), _path(images, b)
        mapped = qed_in_process("compare", pa, pb)
        read = qed_in_process("compare", "-U", pa, pb)
        assert (mapped.returncode, mapped.stdout) == (read.returncode, read.stdout), (a, b)


def test_only_a_fenced_read_only_file_is_mapped(images: Path) -> None:
    async def mapping(path: Path, **kw: Any) -> Any:
        img = await open_image(str(path), **kw)
        try:
            m = img.host_mapping()
            if m is not None:
                m.close()
            return m is not None
        finally:
            await img.close()

    for name in ("data", "raw-data"):
        path = _path(images, name)
        assert run(mapping(path, readonly=True))
        assert not run(mapping(path, readonly=True, force_share=True))
    assert not run(mapping(_path(images, "qcow2-data"), readonly=True))  # host offsets are not data


def test_a_writable_image_is_never_mapped(tmp_path: Path, qemu: Any) -> None:
    path = tmp_path / "w.qed"
    qemu.img("create", "-f", "qed", path, "4M")

    async def go() -> Any:
        img = await open_image(str(path))
        try:
            return img.host_mapping()
        finally:
            await img.close()

    assert run(go()) is None
