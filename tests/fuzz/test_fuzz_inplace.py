"""Fuzzing ``qed convert --in-place`` with hostile qcow2 headers and tables.

The seeds and mutations are test_fuzz_qcow2's (qemu-made qcow2 images with data,
zero clusters, compression, extended L2, a backing file, a snapshot, 512-byte
clusters, bitmaps; header fields, bit flips, extensions, L1/L2 entries and
subcluster bitmaps overwritten, the file cut or extended). Each mutated image is
first read by qedkit's qcow2 reader (the first 4 MiB and what its map says holds
data, up to 16 MiB), then converted in place (``--discard-snapshots``, so the
snapshot and bitmap seeds get past the refusal), in a worker thread under a time
bound. Only QedError may come out, and:

* refused while planning (the header, an entry, a geometry): **no write at all**,
  the file's bytes and modification time unchanged;
* failed later (a compressed cluster that does not inflate, say): the file is
  byte for byte the original again (the append is cut away);
* converted: the file is QED, ``check_image`` finds no corruption and no leak, and
  every range the reader read before reads the same.

``QEDKIT_FUZZ_SCALE`` multiplies the case count (200 by default), ``QEDKIT_FUZZ_SEED``
draws random cases from a seed instead of the derandomized sequence.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import test_fuzz_qcow2 as qcow2_fuzz
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_qcow2 import (
    CASE_TIMEOUT,
    SEED_NAMES,
    Env,
    Mutation,
    fuzz_settings,
    mutated,
    mutations,
    read_mapped,
)

from qedkit.engine.chain import open_for_conversion, open_image
from qedkit.engine.check import check_image
from qedkit.engine.qcow2 import Qcow2Image
from qedkit.engine.qed import QedImage
from qedkit.errors import QedError
from qedkit.jobs.inplace import InPlaceConverter, reclaim

# The seeds (made by qemu-img, once per module) and the address-space cap, as there.
env = qcow2_fuzz.env
memory_cap = qcow2_fuzz.memory_cap

SCALE = max(1, round(float(os.environ.get("QEDKIT_FUZZ_SCALE") or 1)))
EXAMPLES = 200 * SCALE


async def _reference(path: Path) -> dict[int, bytes] | None:
    """What the qcow2 reader reads (None when it cannot open or read the image)."""
    try:
        img = await open_image(str(path), fmt="qcow2", readonly=True)
    except QedError:
        return None
    try:
        return await read_mapped(img)
    except QedError:
        return None
    finally:
        await img.close()


async def _convert(path: Path) -> tuple[str, list[str]]:
    """(outcome, violations): outcome 'refused', 'rolled-back' or 'converted'."""
    before = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    reads = await _reference(path)
    try:
        img = await open_for_conversion(str(path), fmt="qcow2")
    except QedError:
        return "refused", _unchanged(path, before, mtime, strict=True)
    assert isinstance(img, Qcow2Image)
    conv = InPlaceConverter(img, discard_snapshots=True)
    try:
        try:
            await conv.plan()
        except QedError:
            return "refused", _unchanged(path, before, mtime, strict=True)
        try:
            await conv.write_tables()
        except QedError:
            return "rolled-back", _unchanged(path, before, mtime, strict=False)
        qed = await conv.switch()
        await reclaim(qed)
        problems = []
        report = await check_image(qed)
        if report.corruptions or report.leaks or report.check_errors:
            problems.append(f"converted image: {report.corruptions} corrupt, {report.leaks} leaks")
        for pos, data in (reads or {}).items():
            if await qed.read(pos, len(data)) != data:
                problems.append(f"converted image reads other data at {pos}")
                break
        return "converted", problems
    finally:
        await conv.close()


def _unchanged(path: Path, before: bytes, mtime: int, *, strict: bool) -> list[str]:
    problems = []
    if path.read_bytes() != before:
        problems.append("the image changed although the conversion failed")
    if strict and path.stat().st_mtime_ns != mtime:
        problems.append("the image was written although the conversion was refused")
    return problems


def _case(path: Path) -> tuple[str, list[str]]:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_convert(path))
    finally:
        loop.close()


@fuzz_settings(EXAMPLES)
@given(
    seed_name=st.sampled_from(SEED_NAMES),
    muts=st.lists(mutations, min_size=0, max_size=3),
)
def test_hostile_qcow2_images_converted_in_place_give_qed_errors_and_no_writes(
    env: Env, fuzz_counter: Any, seed_name: str, muts: list[Mutation]
) -> None:
    fuzz_counter.hit("inplace")
    data = mutated(env.seeds[seed_name], muts)
    env.serial += 1
    path = env.workdir / f"inplace{env.serial}.qcow2"
    path.write_bytes(data)
    backing_sha = hashlib.sha256((env.workdir / "base.raw").read_bytes()).hexdigest()
    future = env.executor.submit(_case, path)
    try:
        outcome, problems = future.result(timeout=CASE_TIMEOUT)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"case hung (> {CASE_TIMEOUT} s): {path}")
    except Exception as exc:
        keep = env.workdir / "failures"
        keep.mkdir(exist_ok=True)
        original = keep / f"{path.name}.original"
        original.write_bytes(data)
        raise AssertionError(f"{type(exc).__name__} escaped on {original}") from exc
    if problems:
        keep = env.workdir / "failures"
        keep.mkdir(exist_ok=True)
        (keep / f"{path.name}.original").write_bytes(data)
        shutil.copy(path, keep / path.name)
    assert not problems, problems
    assert backing_sha == env.backing_sha, "the backing file changed"
    fuzz_counter.note(f"inplace {outcome}")
    path.unlink()


def test_unmutated_seeds_convert(env: Env) -> None:
    """Every seed converts (so the fuzzer starts from images that do)."""
    outcomes = {}
    for name, s in env.seeds.items():
        path = env.workdir / f"seed-{name}.qcow2"
        path.write_bytes(s.data)
        outcome, problems = _case(path)
        assert not problems, (name, problems)
        outcomes[name] = outcome
        if outcome == "converted":
            assert path.read_bytes()[:4] == b"QED\0"
            assert isinstance(QedImage, type)
    assert set(outcomes.values()) == {"converted"}, outcomes
