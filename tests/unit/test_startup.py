"""What a short command pays before its work: ``qed compare`` and ``qed commit`` import
no asyncio (engine.sync steps coroutines loop-free), no checker and no qcow2 driver;
and the loop-free machinery behaves like the loop it avoids: a coroutine that needs
a loop gets one mid-step, and the allocation lock (engine.sync.LazyLock) becomes a
real asyncio lock when someone must wait for it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import qedkit
from qedkit.engine.sync import LazyLock

MiB = 1 << 20
HEAVY = ["asyncio", "qedkit.engine.check", "qedkit.format.qcow2", "qedkit.engine.qcow2"]


def _fresh_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``code`` in a new interpreter (this one has asyncio loaded already)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _loaded_after(words: list[str], cwd: Path) -> tuple[int, list[str]]:
    code = f"""
        import json, sys
        from qedkit.cli.main import main
        rc = main({words!r})
        sys.stdout.flush()
        print(json.dumps([rc, [m for m in {HEAVY!r} if m in sys.modules]]))
    """
    p = _fresh_python(code, cwd)
    assert p.returncode == 0, p.stderr
    rc, loaded = json.loads(p.stdout.splitlines()[-1])
    return rc, loaded


@pytest.fixture
def pair(tmp_path: Path) -> Path:
    for name in ("a.qed", "b.qed"):
        qedkit.create(str(tmp_path / name), 8 * MiB)
        with qedkit.open(str(tmp_path / name)) as img:
            img.write(MiB, b"\x11" * (3 * MiB))
            img.write_zeroes(5 * MiB, MiB)
    return tmp_path


def test_compare_imports_no_asyncio_checker_or_qcow2(pair: Path) -> None:
    assert _loaded_after(["compare", "a.qed", "b.qed"], pair) == (0, [])


def test_compare_of_differing_images_imports_no_asyncio_either(pair: Path) -> None:
    with qedkit.open(str(pair / "b.qed")) as img:
        img.write(4 * MiB - 1, b"\x12")
    assert _loaded_after(["compare", "-q", "a.qed", "b.qed"], pair) == (1, [])


def test_commit_imports_no_asyncio_or_checker(tmp_path: Path) -> None:
    qedkit.create(str(tmp_path / "base.qed"), 4 * MiB)
    qedkit.create(str(tmp_path / "top.qed"), 4 * MiB, backing_file="base.qed", backing_format="qed")
    with qedkit.open(str(tmp_path / "top.qed")) as img:
        img.write(0, b"\x33" * MiB)
    rc, loaded = _loaded_after(["commit", "-q", "top.qed"], tmp_path)
    assert (rc, loaded) == (0, [])
    with qedkit.open(str(tmp_path / "base.qed"), readonly=True) as base:
        assert base.read(0, MiB) == b"\x33" * MiB


def test_a_loop_free_step_gets_a_loop_when_the_coroutine_needs_one(tmp_path: Path) -> None:
    code = """
        import sys
        from qedkit.engine.sync import run, running_loop

        async def plain():
            return 7

        async def waits():
            loop = running_loop()  # installs the thread's loop mid-step
            fut = loop.create_future()
            loop.call_soon(fut.set_result, 5)
            return await fut

        before = "asyncio" in sys.modules
        first = run(plain())
        still_free = "asyncio" in sys.modules
        second = run(waits())
        import asyncio
        after_loop = asyncio.events._get_running_loop()
        third = run(waits())  # asyncio loaded now: the ordinary path
        print(before, first, still_free, second, after_loop, third)
    """
    p = _fresh_python(code, tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "7", "False", "5", "None", "5"]


def test_running_loop_outside_any_loop_raises_as_asyncio_does() -> None:
    from qedkit.engine.sync import running_loop

    with pytest.raises(RuntimeError, match="no running event loop"):
        running_loop()


def test_lazy_lock_uncontended_is_a_flag_and_refuses_a_stray_release() -> None:
    lock = LazyLock()

    async def go() -> list[bool]:
        seen = [lock.locked()]
        async with lock:
            seen.append(lock.locked())
        seen.append(lock.locked())
        return seen

    assert asyncio.run(go()) == [False, True, False]
    with pytest.raises(RuntimeError):
        lock.release()


def test_lazy_lock_under_contention_serializes_in_arrival_order() -> None:
    lock = LazyLock()
    order: list[str] = []

    async def worker(name: str, hold: float) -> None:
        async with lock:
            order.append(f"{name}+")
            await asyncio.sleep(hold)
            order.append(f"{name}-")

    async def go() -> None:
        first = asyncio.create_task(worker("a", 0.02))
        await asyncio.sleep(0)  # a holds the flag
        await asyncio.gather(first, worker("b", 0), worker("c", 0))
        assert not lock.locked()
        async with lock:  # still usable as a plain lock afterwards
            assert lock.locked()

    asyncio.run(go())
    assert order == ["a+", "a-", "b+", "b-", "c+", "c-"]


def test_lazy_lock_a_cancelled_waiter_does_not_take_the_lock() -> None:
    lock = LazyLock()

    async def go() -> bool:
        await lock.acquire()
        waiter = asyncio.create_task(lock.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        lock.release()
        return lock.locked()

    assert asyncio.run(go()) is False


def test_format_names_load_on_first_use(tmp_path: Path) -> None:
    code = """
        import sys
        import qedkit.format.geometry
        from qedkit.format import Header, probe_format, L2_ZERO_CLUSTER
        from qedkit.format import qcow2 as q
        print("qedkit.format.probe" in sys.modules, q.MAGIC == b"QFI\\xfb")
        import qedkit.format as f
        try:
            f.nothing
        except AttributeError:
            print("AttributeError")
    """
    p = _fresh_python(code, tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "True", "AttributeError"]
