"""A simulated clock for the in-memory demo, so that one seed always gives the same figures.

On the real clock a device answer that the event loop gets to later than the target response time
is a timeout (E21), so how many requests time out depended on how busy the machine was (28 against
18 in two runs of one seed). On this clock time moves only when the replay waits for the next item
of the stream, and before it moves past a tick everything in flight at the in-memory broker is
handled: every answer a device gives arrives within a tick of its command, so the only timeouts are
the commands the simulated devices never answer, as the seed decides.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.transport import MemoryBroker

TICK_SECONDS = 0.25
"""Far below the demo's target response time, so an answered request is never late."""


class SimulatedClock:
    def __init__(self, broker: MemoryBroker, start: datetime) -> None:
        self._broker = broker
        self._start = start
        self._now = 0.0

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> datetime:
        return self._start + timedelta(seconds=self._now)

    async def sleep(self, seconds: float) -> None:
        """Move time on by `seconds`, first letting the broker drain if that crosses a tick."""
        later = self._now + max(seconds, 0.0)
        if math.floor(later / TICK_SECONDS) > math.floor(self._now / TICK_SECONDS):
            await self._broker.drain()
        self._now = later
