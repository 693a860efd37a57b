"""One running gateway: store, routing view, outcome recorder, router and shell, and a transport.

Used by `mp169 run` (MQTT) and `mp169 demo` (in memory) alike, so both run the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import os
import time
from concurrent import futures
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from gateway import signing
from gateway.cluster import ClusterMember
from gateway.inbound import FairFeed, OrderedGate
from gateway.metrics import Metrics
from gateway.observers import LogObserver, MetricsObserver, OutcomeObserver
from gateway.outcomes.recorder import OutcomeRecorder
from gateway.postgres import PostgresStore
from gateway.router import Router, RouterSettings
from gateway.shell import Clock, Shell
from gateway.signing import certificate_library, dsp_credentials
from gateway.storage import open_store, outcome_database
from gateway.store import SqliteStore
from gateway.topics import Topics
from gateway.view import RoutingView
from rules.domain import Eui, parse_eui, utc_now
from rules.table import RulesTable, TableError, default_table, load_table

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from gateway.budget import LatencyBudget
    from gateway.config import Settings
    from gateway.inbound import InboundSessions
    from gateway.signing import Verification
    from gateway.store import FlagStore
    from gateway.transport import Message, Transport

log = structlog.get_logger("mp169.service")

# How often forwarded requests are checked for a timeout, and the store for inventory upserts
# made by `mp169 inventory import` while the daemon runs (Change of Supplier, tariff changes).
_HOUSEKEEPING_SECONDS = 1.0
# How often the outcome records are swept for forwarded requests that no process will ever answer
# (forwarded before a restart: the pending request lived only in the old process's memory).
_ORPHAN_SWEEP_SECONDS = 60.0
# Recorded RequestIDs are kept this long at least: a redelivery can come as late as the broker keeps
# a session (broker.session_expiry_seconds), so they are kept twice that, and never less than a day.
_REQUEST_ID_MEMORY_MIN = timedelta(days=1)
# SQLite's own wait for a lock held by another process, per attempt; the shell retries beyond it
# (store.retry_seconds) and logs each retry, so a stall is visible.
_STORE_BUSY_WAIT_MS = 1000


@dataclass(frozen=True)
class Signatures:
    """What the shell signs and verifies with, from the [signing] settings (gateway/signing.py)."""

    verify: Callable[[bytes], Verification] | None
    """None: verification turned off (benchmarks only; warned at start, shown in the metrics)."""
    sign: Callable[[bytes], bytes]
    executor: Executor

    @classmethod
    def from_settings(cls, settings: Settings) -> Signatures:
        """Reads the certificate library and the DSP's key: a bad file stops the start, naming it."""
        key, certificate = dsp_credentials(settings.signing)
        max_bytes = settings.gateway.max_message_bytes
        verify: Callable[[bytes], Verification] | None = None
        if settings.signing.verify:
            library = certificate_library(settings.signing)
            verify = functools.partial(signing.verify, library=library, max_bytes=max_bytes)
            log.info("signature-verification", certificates=len(library), signer=str(certificate.eui))
        else:
            log.warning(
                "signature-verification-off",
                detail="signing.verify = false: inbound Service Requests are not verified (benchmarks only)",
            )
        processes = settings.signing.processes
        if processes:
            # Spawned, not forked: this process runs threads (the store's, the pool's) by then.
            pool = ProcessPoolExecutor(
                max_workers=processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=signing.start_worker,
                initargs=(settings.signing, max_bytes),
            )
            # Started now, each with its key and library loaded, not under the first requests.
            futures.wait([pool.submit(os.getpid) for _ in range(processes)])
            return cls(
                verify=None if verify is None else signing.verify_in_worker,
                sign=signing.sign_in_worker,
                executor=pool,
            )
        return cls(
            verify=verify,
            sign=functools.partial(signing.sign, key=key, certificate=certificate),
            executor=ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="mp169-xmldsig"),
        )


def load_rules(settings: Settings) -> RulesTable:
    path = settings.gateway.rules_path
    return load_table(Path(path)) if path else default_table()


@dataclass(frozen=True, slots=True)
class DeviceSession:
    """The session device responses and alerts arrive on, beside the one requests arrive on.

    `flushed` is the request session's confirmation (MqttTransport.flushed): a device message is
    acknowledged only once the answer relayed on the other session reached the broker. On one
    connection TCP order gives that for free; across two it does not."""

    transport: Transport
    flushed: Callable[[], Awaitable[None]]

    def handler(self, shell: Shell) -> Callable[[Message], Awaitable[None]]:
        async def handle(message: Message) -> None:
            await shell.handle(message)
            await self.flushed()

        return handle


@dataclass
class GatewayService:
    settings: Settings
    store: FlagStore
    view: RoutingView
    recorder: OutcomeRecorder
    router: Router
    shell: Shell
    transport: Transport
    signatures: Signatures
    devices: DeviceSession | None = None
    """The session device responses and alerts arrive on, when not `transport`'s."""
    _clock: Clock = utc_now
    member: ClusterMember | None = None
    inbound: InboundSessions | None = None
    """The sessions Users' requests arrive on, when not `transport`'s (`gateway.inbound_sessions`)."""
    _housekeeping: asyncio.Task[None] | None = None

    @classmethod
    async def start(  # noqa: PLR0913 - keyword-only collaborators with defaults
        cls,
        settings: Settings,
        transport: Transport,
        *,
        metrics: Metrics | None = None,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        devices: DeviceSession | None = None,
        inbound: InboundSessions | None = None,
        budget: LatencyBudget | None = None,
    ) -> GatewayService:
        """`devices`: a second session for device responses and alerts, so they never wait behind
        requests at the broker or in `transport`'s in-flight window (`mp169 run` uses one).
        `inbound`: the sessions Users' requests arrive on instead of `transport`, taken fairly (needs
        `devices`). `budget`: record where each message's time goes (benchmarks only)."""
        if inbound is not None and devices is None:
            raise ValueError("inbound sessions need a device session: device messages bypass the fair feed")
        table = load_rules(settings)
        # Before anything is opened: a bad key or certificate file stops the start, naming it.
        signatures = Signatures.from_settings(settings)
        store = open_store(settings.store)
        if isinstance(store, SqliteStore):
            store.busy_timeout_ms = _STORE_BUSY_WAIT_MS
            await store.open(check=True)
        else:
            await store.open()
        member = None
        # The epoch first: a flag changed while the view loads is applied again by the member.
        loaded_epoch = await store.flag_epoch() if isinstance(store, PostgresStore) else 0
        view = await RoutingView.load(store)
        metrics = metrics or Metrics()
        if isinstance(store, PostgresStore):
            member = ClusterMember(
                store, view, settings.gateway.client_id, lease_seconds=settings.store.lease_seconds
            )
            await member.start(loaded_epoch)
        recorder = OutcomeRecorder(
            outcome_database(settings),
            batch_size=settings.outcomes.batch_size,
            flush_seconds=settings.outcomes.flush_seconds,
            target_response_seconds=settings.gateway.target_response_seconds,
            retention_days=settings.outcomes.retention_days,
            clock=clock,
            metrics=metrics,
        )
        await recorder.start()
        topics = Topics.from_settings(settings.topics)
        router = Router(
            table=table,
            view=view,
            settings=RouterSettings(
                dcc_eui=parse_eui(settings.gateway.dcc_eui),
                topics=topics,
                max_message_bytes=settings.gateway.max_message_bytes,
                target_response_seconds=settings.gateway.target_response_seconds,
                max_forwards_per_user=settings.gateway.max_forwards_per_user,
                max_forwards=settings.gateway.max_forwards,
                # Over PostgreSQL another instance may hold a forward: it has its lease time to answer
                # it before this one's sweep does.
                overdue_grace_seconds=settings.store.lease_seconds if settings.store.postgres else 0.0,
            ),
            counters=await store.load_request_counters(),
            pending=await store.load_pending(settings.gateway.client_id if member is not None else ""),
        )
        metrics.signature_verification.set(1 if signatures.verify is not None else 0)
        shell = Shell(
            router,
            store=store,
            publish=transport.publish,
            observers=(MetricsObserver(metrics), LogObserver(), OutcomeObserver(recorder)),
            metrics=metrics,
            clock=clock,
            monotonic=monotonic,
            member=member,
            retry_seconds=settings.store.retry_seconds,
            budget=budget,
            verify=signatures.verify,
            sign=signatures.sign,
            executor=signatures.executor,
        )
        shell.start()
        service = cls(
            settings,
            store,
            view,
            recorder,
            router,
            shell,
            transport,
            signatures,
            devices,
            clock,
            member,
            inbound,
        )
        try:
            await service._subscribe(topics)
        except BaseException:
            # Cancelled by a signal, or the broker refused or stayed unreachable: close what was
            # opened, or the store's thread outlives the event loop ("Event loop is closed").
            if devices is not None:
                await devices.transport.stop()
            if inbound is not None:
                await inbound.stop()
            await shell.stop()
            if member is not None:
                await member.stop()
            signatures.executor.shutdown(wait=True)
            await recorder.close()
            await store.close()
            raise
        service._housekeeping = asyncio.create_task(service._housekeep(), name="mp169-housekeeping")
        log.info("gateway-started", client_id=settings.gateway.client_id, store=settings.store.name)
        return service

    async def _subscribe(self, topics: Topics) -> None:
        """Start the transports: from now on messages reach the shell."""
        group = self.settings.topics.shared_group
        shell, devices, inbound = self.shell, self.devices, self.inbound
        if devices is None:
            await self.transport.start(topics.subscriptions(group), shell.handle)
            return
        # The request session first (every answer leaves on it; a second instance with the same client
        # id is noticed on it as before), but no request is decided until the device session is
        # subscribed: no device answer finds it missing.
        subscribed = OrderedGate()  # in arrival order: a backlog delivered at connect keeps its order

        async def handle_request(message: Message) -> None:
            await subscribed.passed()
            await shell.handle(message)

        # The broker's Receive Maximum is not a bound Mosquitto 2.0.11 holds once acknowledgements flow
        # (bench/receive_maximum.py): requests are handled through a feed of the window's size, so
        # the work in progress is bounded whatever the broker delivers. Device messages are not held
        # back: each answers a forward (at most `max_forwards` wait) and must not wait for its E21.
        if inbound is None:
            window = self.settings.gateway.inflight_window
            requests = FairFeed(handle_request, sources=1, limit=window).source(0)
            await self.transport.start(topics.request_subscriptions(group), requests)
        else:
            await self.transport.start([], inbound.attach(handle_request))
        await devices.transport.start(topics.device_subscriptions(group), devices.handler(shell))
        if inbound is not None:
            await inbound.start(self.view.users)
        subscribed.open()

    def reload_rules(self) -> bool:
        """Swap in a freshly loaded rules table; a bad table leaves the running one in place."""
        try:
            table = load_rules(self.settings)
        except TableError as exc:
            log.error("rules-reload-failed", error=str(exc))  # noqa: TRY400 - the message is the whole story
            return False
        self.router.table = table
        log.info("rules-reloaded", srvs=len(table.srvs), alerts=len(table.alerts))
        return True

    async def refresh_inventory(self) -> int:
        """Apply inventory and user upserts committed by other processes since the last refresh."""
        return await self.view.refresh(self.store)

    async def _housekeep(self) -> None:
        target = self.settings.gateway.target_response_seconds
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + _ORPHAN_SWEEP_SECONDS
        while True:
            await asyncio.sleep(_HOUSEKEEPING_SECONDS)
            try:
                self.shell.tick()
                await self.refresh_inventory()
                if self.inbound is not None:
                    await self.inbound.add_users(self.view.users)
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + _ORPHAN_SWEEP_SECONDS
                    # Twice the target: a request this process still waits for is never swept.
                    await self.recorder.expire_pending(self._clock(), 2 * target)
                    await self.store.purge_request_ids(self._clock() - self._request_id_memory)
            except Exception:
                log.exception("housekeeping-failed")

    async def stop(self) -> None:
        """Drain: stop taking messages, finish in-flight ones, flush outcomes, close the store."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self.devices is not None:
            await self.devices.transport.stop()
        if self.inbound is not None:
            await self.inbound.stop()  # before `transport`: their handlers publish on it
        await self.transport.stop()
        await self.shell.stop()
        if self.member is not None:
            await self.member.stop()
        self.signatures.executor.shutdown(wait=True)
        await self.recorder.close()
        await self.store.close()
        log.info("gateway-stopped")

    @property
    def _request_id_memory(self) -> timedelta:
        expiry = timedelta(seconds=2 * self.settings.broker.session_expiry_seconds)
        return max(expiry, _REQUEST_ID_MEMORY_MIN)

    @property
    def dcc_eui(self) -> Eui:
        return parse_eui(self.settings.gateway.dcc_eui)
