"""Shared fixtures. Keep this small and generic; topic-specific fixtures live next to their tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from simulator.mosquitto import Mosquitto, MosquittoError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started private Mosquitto (free port on 127.0.0.1, persistence in tmp_path), always stopped."""
    broker = Mosquitto(tmp_path / "mosquitto")
    try:
        broker.start()
    except MosquittoError as exc:
        pytest.fail(str(exc))
    try:
        yield broker
    finally:
        broker.stop()
