"""One gateway instance's membership of a group over one PostgreSQL store (docs/multi-instance.md).

`ClusterMember` keeps the routing view's flags current with every instance's flag changes (LISTEN
on the flag channel, and a poll on every heartbeat in case a notification was lost), acknowledges
in its lease the flag epoch it has applied once every message it decided before applying it has
been published (`settled`, from the shell), and says whether its lease is confirmed. The shell
decides no message while it is not (fencing) and publishes no answer to a flag request before every
live instance has applied its epoch (`flag_applied`).

The lease is confirmed until `lease_seconds * (1 - _MARGIN)` after the renewal was *sent* (by this
process's monotonic clock); the database lets it lapse `lease_seconds` after it *received* it (by
its own clock). So this instance stops deciding before any other instance stops waiting for it,
as long as the two clocks' rates differ by less than the margin.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import TYPE_CHECKING

import structlog

from gateway.postgres import FLAGS_CHANNEL

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from gateway.postgres import PostgresStore
    from gateway.view import RoutingView

log = structlog.get_logger("mp169.cluster")

_MARGIN = 0.2
"""Share of the lease given up locally: covers clock-rate drift and the commit-to-publish delay."""
_BEATS_PER_LEASE = 3


class ClusterMember:
    """Lease, flag epochs and fencing of one instance; `start` after the view is loaded."""

    def __init__(
        self,
        store: PostgresStore,
        view: RoutingView,
        instance: str,
        *,
        lease_seconds: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.view = view
        self.instance = instance
        self.lease_seconds = lease_seconds
        self._monotonic = monotonic
        self._epoch = 0
        """The flag epoch applied to the view."""
        self._confirmed_until = -math.inf
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._settled: Callable[[], Awaitable[None]] = _nothing_to_settle
        self._on_confirmed: Callable[[], None] = _no_one_to_tell

    # -- what the shell asks -------------------------------------------------------------------

    @property
    def confirmed(self) -> bool:
        """Whether the lease is confirmed now: the instance may decide messages."""
        return self._monotonic() < self._confirmed_until

    @property
    def epoch(self) -> int:
        return self._epoch

    def attach(self, settled: Callable[[], Awaitable[None]], on_confirmed: Callable[[], None]) -> None:
        """`settled()` returns once every message decided so far is published; `on_confirmed()` is
        called whenever the lease becomes confirmed (the shell lets held messages through)."""
        self._settled = settled
        self._on_confirmed = on_confirmed

    async def flag_applied(self, epoch: int | None) -> None:
        """Return once every live instance has applied `epoch` (None: the epoch this instance has
        applied, for an answer that changed no flag but states one)."""
        await self.store.wait_applied(self._epoch if epoch is None else max(epoch, self._epoch))

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, loaded_epoch: int) -> None:
        """Join the group. `loaded_epoch`: the flag epoch read *before* the view loaded its flags."""
        self._epoch = loaded_epoch
        await self.store.listen(FLAGS_CHANNEL, lambda _epoch: self._wake.set())
        await self._join()
        self._task = asyncio.create_task(self._run(), name="mp169-cluster")

    async def stop(self) -> None:
        """Stop heartbeats and give the lease up: the others need not wait for it to lapse."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._confirmed_until = -math.inf
        try:
            await self.store.leave(self.instance)
        except Exception:  # the lease lapses on its own; stopping must not fail for it
            log.exception("cluster-leave-failed", instance=self.instance)

    # -- the heartbeat ---------------------------------------------------------------------------

    async def _run(self) -> None:
        interval = self.lease_seconds / _BEATS_PER_LEASE
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self._beat()
            except Exception:  # the lease lapses on its own; the next beat tries again
                log.exception("cluster-heartbeat-failed", instance=self.instance)

    async def _beat(self) -> None:
        await self.store.keep_listening()  # after a restart of the database
        if not self.confirmed:
            await self._join()
            return
        epoch = await self._catch_up()
        sent = self._monotonic()
        if await self.store.renew(self.instance, epoch, self.lease_seconds):
            self._confirm(sent)
        else:
            log.warning("cluster-lease-lost", instance=self.instance, epoch=epoch)
            self._confirmed_until = -math.inf
            await self._join()

    async def _join(self) -> None:
        """Catch up and take the lease; a flag change committed meanwhile means catching up again."""
        while True:
            epoch = await self._catch_up()
            sent = self._monotonic()
            if await self.store.join(self.instance, epoch, self.lease_seconds):
                self._confirm(sent)
                log.info("cluster-joined", instance=self.instance, epoch=epoch)
                return

    async def _catch_up(self) -> int:
        """Apply the flag changes since the applied epoch; returns the epoch that may be acknowledged:
        only once every message decided before they were applied has been published."""
        changes = await self.store.flag_changes_since(self._epoch)
        if changes.epoch == self._epoch:
            return self._epoch
        for device, flagged in changes.flagged.items():
            if flagged:
                self.view.set_flag(device)
            else:
                self.view.clear_flag(device)
        self._epoch = changes.epoch
        await self._settled()
        return changes.epoch

    def _confirm(self, sent: float) -> None:
        was_confirmed = self.confirmed
        self._confirmed_until = sent + self.lease_seconds * (1 - _MARGIN)
        if not was_confirmed:
            self._on_confirmed()


async def _nothing_to_settle() -> None:
    return None


def _no_one_to_tell() -> None:
    return None
