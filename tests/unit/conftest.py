"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import qedkit

MiB = 1 << 20


@pytest.fixture
def new_image(tmp_path: Path) -> Callable[..., Path]:
    """``new_image(name="img.qed", size=1 MiB, **create_kwargs)``: a fresh image made by
    qedkit.create in tmp_path (QEMU's layout: header cluster, then a zeroed L1)."""

    def make(name: str = "img.qed", size: int | None = MiB, **kwargs: object) -> Path:
        path = tmp_path / name
        qedkit.create(str(path), size, **kwargs)  # type: ignore[arg-type]
        return path

    return make
