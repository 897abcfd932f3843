"""Run engine coroutines from synchronous code, cheaply.

The engine is asynchronous, but with a local file store most of its coroutines never
suspend: every syscall is made inline and an uncontended lock does not wait. Driving
such a coroutine through ``loop.run_until_complete`` costs ~13 us per call (a task, a
loop iteration, a selector poll), more than a 4 KiB read from the page cache. So
``run`` first steps the coroutine by hand with the thread's loop installed as the
running loop; if it finishes in that one step (the common case) the result is
returned at the cost of a function call. If it suspends, on a contended lock or a
network store, the half-run coroutine is handed to the loop by ``_Resume``, which
forwards what the coroutine yields and what the loop sends back, exactly like
``await`` would.

asyncio itself costs ~35 ms of start-up, a third of a short ``qed compare``. A
command that never needs a loop should not pay it, so ``run`` does not import
asyncio: when nothing has imported it yet, no loop can be running and the
coroutine is stepped with no loop installed. Engine code that needs the loop
(to create a future, on contention) asks ``running_loop()``, which then imports
asyncio and installs the thread's loop as the running loop for the rest of that
step; if the coroutine then suspends, ``run`` hands it to that loop as above.
Everything else that suspends (a store offloading to a thread) is only set up by
modules that import asyncio themselves, so their coroutines take the loop path.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import asyncio

T = TypeVar("T")

_local = threading.local()


def thread_loop() -> asyncio.AbstractEventLoop:
    """The event loop the synchronous API uses on this thread (created on demand)."""
    import asyncio

    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        _local.loop = loop
    return loop


def close_thread_loop() -> None:
    """Close this thread's loop, if any (worker threads call it before they end)."""
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    if loop is not None and not loop.is_closed():
        loop.close()
    _local.loop = None


class _Resume:
    """Awaitable that continues a coroutine which already yielded ``first``."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        value = self._first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # forwarded into the coroutine, like await
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _finish(resume: _Resume) -> Any:
    return await resume


def step(coro: Coroutine[Any, Any, T]) -> tuple[bool, Any]:
    """Advance ``coro`` by one step inside a running loop: ``(True, result)`` if it
    finished, else ``(False, awaitable)`` where the awaitable continues it (hand it
    to ``loop.create_task``). Lets a server answer the common request that never
    suspends without creating a task for it. Exceptions propagate."""
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, _finish(_Resume(coro, first))


def running_loop() -> asyncio.AbstractEventLoop:
    """The running event loop, for engine code that needs one (to create a future).
    Inside a loop-free step of ``run`` it installs the thread's loop first (importing
    asyncio); elsewhere without a running loop it raises RuntimeError, as
    ``asyncio.get_running_loop`` does."""
    import asyncio

    loop = asyncio.events._get_running_loop()
    if loop is None and getattr(_local, "loop_free", False):
        loop = thread_loop()
        asyncio.events._set_running_loop(loop)
        _local.loop_free = False
    if loop is None:
        raise RuntimeError("no running event loop")
    return loop


class LazyLock:
    """An ``asyncio.Lock`` that needs no asyncio until someone has to wait for it.

    Taken and released without contention (every synchronous command) it is a flag.
    The first task that finds it held creates the asyncio lock, takes it on behalf
    of the holder (at once: it is free) and then waits on it like any asyncio lock
    waiter; from then on the asyncio lock alone decides, with its fairness and
    cancellation. Not reentrant, as asyncio.Lock."""

    __slots__ = ("_held", "_lock")

    def __init__(self) -> None:
        self._held = False
        self._lock: asyncio.Lock | None = None

    def locked(self) -> bool:
        return self._lock.locked() if self._lock is not None else self._held

    async def acquire(self) -> bool:
        if self._lock is None:
            if not self._held:
                self._held = True
                return True
            import asyncio

            running_loop()  # in a loop-free step of run(): install the loop first
            self._lock = asyncio.Lock()
            await self._lock.acquire()  # free: taken for the holder, no wait
        return await self._lock.acquire()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
        elif self._held:
            self._held = False
        else:
            raise RuntimeError("Lock is not acquired.")

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


def _step_loop_free(coro: Coroutine[Any, Any, T]) -> tuple[bool, Any]:
    """First step of ``coro`` with no loop installed (asyncio not imported yet)."""
    _local.loop_free = True
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    finally:
        installed = not _local.loop_free  # running_loop() installed the loop
        _local.loop_free = False
        if installed:
            sys.modules["asyncio"].events._set_running_loop(None)
    if not installed:  # pragma: no cover - only loop-bound awaitables suspend
        coro.close()
        raise RuntimeError("an engine coroutine suspended without an event loop")
    return False, first


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code and return its result."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        done, value = _step_loop_free(coro)
        if done:
            return value  # type: ignore[no-any-return]
        loop = thread_loop()
        return loop.run_until_complete(_finish(_Resume(coro, value)))  # type: ignore[no-any-return]
    if asyncio.events._get_running_loop() is not None:
        coro.close()
        raise RuntimeError(
            "qedkit's synchronous API was called inside a running event loop; "
            "use the async API (qedkit.aio) there"
        )
    loop = thread_loop()
    asyncio.events._set_running_loop(loop)
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        asyncio.events._set_running_loop(None)
    return loop.run_until_complete(_finish(_Resume(coro, first)))  # type: ignore[no-any-return]
