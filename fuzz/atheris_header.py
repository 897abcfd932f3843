"""Coverage-guided fuzzing of QED image parsing with atheris (libFuzzer).

Not a pytest test (pytest collects tests/ only); run it by hand for as long as you
like. atheris is not a dependency of qedkit: install it in a separate environment::

    python3 -m venv /tmp/atheris && /tmp/atheris/bin/pip install atheris
    PYTHONPATH=. /tmp/atheris/bin/python fuzz/atheris_header.py -max_len=65536 \\
        -runs=100000 fuzz/corpus      # corpus dir: created and seeded on first use

Each input is a whole image file (libFuzzer mutates the seed images written into the
corpus directory: header, L1 and L2 tables, data). The harness opens it read-only and
reads the guest head, maps it and reads its info, checks it, checks and repairs a
copy, converts it to raw, and asserts what tests/fuzz/test_fuzz_images.py asserts in
short: only QedError escapes, and the read-only steps leave the file unchanged. Any
other exception is a crash: libFuzzer saves the input as ``crash-<sha1>`` (an image
file: reproduce with ``qed map crash-...`` or by passing it to this script).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    import qedkit
    from qedkit.errors import QedError
    from qedkit.jobs.convert import convert

MiB = 1 << 20
WORK = tempfile.mkdtemp(prefix="qed-atheris-")
BACKING = os.path.join(WORK, "base.raw")


def _seed_images(corpus: str | None) -> None:
    """Write the backing file, and a few small valid images into ``corpus`` when it
    is empty."""
    with open(BACKING, "wb") as f:
        f.write(bytes(range(256)) * 4096)  # 1 MiB
    if corpus is None:
        return
    seeds = []
    path = os.path.join(WORK, "seed-data.qed")
    qedkit.create(path, 2 * MiB + 1536, cluster_size=4096, table_size=2)
    with qedkit.open(path) as img:
        img.write(0, b"\x11" * 8192)
        img.write_zeroes(64 * 1024, 8192)
        img.write(2 * MiB, b"\x22" * 1536)
    seeds.append(path)
    path = os.path.join(WORK, "seed-backing.qed")
    qedkit.create(
        path,
        2 * MiB,
        cluster_size=4096,
        table_size=2,
        backing_file="base.raw",
        backing_format="raw",
    )
    with qedkit.open(path) as img:
        img.write(1000, b"\x33" * 3000)
        img.write_zeroes(16 * 1024, 4096)
    seeds.append(path)
    os.makedirs(corpus, exist_ok=True)
    if not os.listdir(corpus):
        for seed in seeds:
            with (
                open(seed, "rb") as src,
                open(os.path.join(corpus, os.path.basename(seed)), "wb") as dst,
            ):
                dst.write(src.read())


def _quiet(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    try:
        return fn(*args, **kwargs)
    except QedError:
        return None


def _read_only(path: str) -> None:
    with qedkit.open(path, readonly=True, format="qed") as img:
        img.info()
        _quiet(img.map)
        _quiet(img.read, 0, min(img.size, 4 * MiB))
    with qedkit.open(
        path, readonly=True, format="qed", backing_chain=False, auto_repair=False
    ) as img:
        img.check()


def TestOneInput(data: bytes) -> None:  # atheris' name for the entry point
    path = os.path.join(WORK, "case.qed")
    copy = os.path.join(WORK, "case-rw.qed")
    target = os.path.join(WORK, "case.raw")
    for p in (path, copy):
        with open(p, "wb") as f:
            f.write(data)
    before = hashlib.sha256(data).digest()
    _quiet(_read_only, path)
    _quiet(convert, path, target, src_format="qed", dst_format="raw")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == before, "a read-only step changed the image"

    def repair() -> None:
        with qedkit.open(copy, format="qed", backing_chain=False, auto_repair=False) as img:
            img.check("all")

    _quiet(repair)
    for p in (target,):
        if os.path.exists(p):
            os.unlink(p)


def main() -> None:
    paths = [a for a in sys.argv[1:] if not a.startswith("-")]
    if not paths:
        paths = [os.path.join(WORK, "corpus")]
        sys.argv.append(paths[0])
    # Cases are written beside base.raw (the seeds name it relatively); an argument
    # that is a file is an input to replay, a directory (or a new path) a corpus.
    _seed_images(None)
    for p in paths:
        if not os.path.isfile(p):
            _seed_images(p)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
