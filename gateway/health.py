"""Liveness and readiness of a running gateway, served beside the metrics (/healthz, /readyz).

- live: the event loop is turning: `beat()` runs on it every `HEARTBEAT_SECONDS` and /healthz fails
  once no beat came for `LIVENESS_SECONDS` (a thread-served endpoint alone would answer for a stuck
  loop);
- ready: live, the store is open, and the broker connection is up (/readyz answers 503 with the
  reason otherwise, e.g. while reconnecting).

The state is written on the loop and read by the HTTP thread: plain attribute reads of immutable
values, no lock needed.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from gateway.mqtt import ConnectionEvent

if TYPE_CHECKING:
    from collections.abc import Callable

HEARTBEAT_SECONDS = 1.0
LIVENESS_SECONDS = 10.0


class Health:
    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self.last_beat: float | None = None
        self.broker_connected = False
        self.store_open = False

    def beat(self) -> None:
        self.last_beat = self._monotonic()

    def connection_event(self, event: ConnectionEvent) -> None:
        """An MqttTransport `on_connection_event` hook."""
        self.broker_connected = event is not ConnectionEvent.LOST

    def live(self) -> bool:
        beat = self.last_beat
        return beat is not None and self._monotonic() - beat < LIVENESS_SECONDS

    def not_ready_because(self) -> str | None:
        """Why the gateway is not ready, or None when it is."""
        if not self.live():
            return "event loop not running"
        if not self.store_open:
            return "store not open"
        if not self.broker_connected:
            return "not connected to the broker"
        return None

    async def heartbeat(self) -> None:
        """Beat until cancelled (a task of the daemon)."""
        while True:
            self.beat()
            await asyncio.sleep(HEARTBEAT_SECONDS)
