"""Progress display for long operations: tqdm when it is installed, else a plain
percentage in qemu-img's style (with ``eta=True``, followed by the time left at the
speed so far, as tqdm shows it). Shown when stderr is a terminal or ``-p`` is given
(``shown``); commit, rebase, amend and compare show it only with ``-p``."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    def __init__(
        self, enabled: bool, description: str = "", unit: str = "B", *, eta: bool = False
    ) -> None:
        self.enabled = enabled
        self._eta = eta
        self._started = time.monotonic()
        self._unit = unit
        self._bar: Any = None
        self._description = description
        self._last = -1.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            try:
                from tqdm import tqdm  # type: ignore[import-untyped]
            except ImportError:
                self._bar = False
            else:
                in_bytes = self._unit == "B"
                self._bar = tqdm(
                    total=total,
                    unit=self._unit,
                    unit_scale=in_bytes,
                    unit_divisor=1024,
                    desc=self._description,
                    file=sys.stderr,
                    leave=True,
                )
        if self._bar is False:
            percent = 100.0 * done / total if total else 100.0
            if percent - self._last >= 1.0 or done == total:
                self._last = percent
                left = ""
                if self._eta:
                    left = f" ETA {format_eta(eta(done, total, time.monotonic() - self._started))}"
                sys.stderr.write(f"    ({percent:.2f}/100%){left}\r")
                sys.stderr.flush()
        else:
            self._bar.update(done - self._bar.n)

    async def checkpoint(self, done: int, total: int) -> None:
        """The ``checkpoint`` coroutine a job's ``run`` reports its progress to."""
        self(done, total)

    def close(self) -> None:
        if self._bar:
            self._bar.close()
        elif self._bar is False:
            sys.stderr.write("\n")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shown(progress: bool, quiet: bool) -> bool:
    """Whether a long verb shows progress: with ``-p``, or when stderr is a terminal
    and ``-q`` is not given."""
    return progress or (sys.stderr.isatty() and not quiet)


def eta(done: int, total: int, elapsed: float) -> float | None:
    """Seconds left at the speed so far; None before anything was done."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(0.0, (total - done) * elapsed / done)


def format_eta(seconds: float | None) -> str:
    """``H:MM:SS`` (``--:--:--`` when unknown)."""
    if seconds is None:
        return "--:--:--"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
