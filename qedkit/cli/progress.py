"""Progress display for long operations: tqdm when it is installed, else a plain
percentage in qemu-img's style. Shown when stderr is a terminal or ``-p`` is given."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class Progress:
    def __init__(self, enabled: bool, description: str = "", unit: str = "B") -> None:
        self.enabled = enabled
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
                sys.stderr.write(f"    ({percent:.2f}/100%)\r")
                sys.stderr.flush()
        else:
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar:
            self._bar.close()
        elif self._bar is False:
            sys.stderr.write("\n")

    def __enter__(self) -> Callable[[int, int], None]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
