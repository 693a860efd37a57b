"""Arrival order across awaits: concurrent handlers that each wait for something of their own first (a
signature check in the executor, a place in a feed, a gate) and must then take one step in the order
they arrived.

A handler takes its `Place` when it arrives, before any await; once ready it awaits `turn()` (the
place before it has passed), takes its step, and `passed()` in a `finally` (so a cancelled or failed
handler never holds up the ones after it). The step must not await: the next handler resumes a loop
iteration after `passed()` at the earliest, so a synchronous step is taken in order.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Place:
    _previous: asyncio.Future[None] | None
    _mine: asyncio.Future[None]

    async def turn(self) -> None:
        """Return once every place taken before this one has passed."""
        if self._previous is not None and not self._previous.done():
            # Shielded: a handler cancelled while it waits must not cancel the one before it.
            await asyncio.shield(self._previous)

    def passed(self) -> None:
        if not self._mine.done():
            self._mine.set_result(None)


class ArrivalOrder:
    """Hands out `Place`s in arrival order (see the module docstring)."""

    def __init__(self) -> None:
        self._last: asyncio.Future[None] | None = None

    def place(self) -> Place:
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        place = Place(self._last, mine)
        self._last = mine
        return place
