"""The outcome recorder: buffers what became of every Service Request and writes it in batches.

The outcome observer (gateway/observers.py) calls `record_decision` and `record_device_outcome`
synchronously: they only append to an in-memory buffer. A background task writes the buffer in
batches, one transaction per batch, to the outcome database (gateway/outcomes/database.py: a SQLite
file of the recorder's own, or the shared PostgreSQL store), so the routing hot path never waits on
it. The SQL, and all the Python work of building a batch's rows and counts, runs in one worker thread
that owns the connection (`gateway.outcomes.writes`); the event loop only hands batches over.

The buffer is bounded: while the database is unwritable (disk full, read-only, locked, unreachable)
batches are retried on a fresh connection, and once `max_buffered` records wait, each new one drops
the oldest, counted in `dropped` and `mp169_outcome_records_dropped_total`. Routing never stops for
reporting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Self, TypeVar

import structlog

from gateway.outcomes.schema import DeviceOutcome, split_request_id, to_ms
from gateway.outcomes.writes import Answer, Decision, Entry
from rules.domain import utc_now

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from datetime import datetime

    from gateway.metrics import Metrics
    from gateway.outcomes.database import OutcomeDatabase
    from gateway.outcomes.writes import OutcomeWriter

log = structlog.get_logger("mp169.outcomes")

_T = TypeVar("_T")

_PURGE_CHUNK = 20_000
_PURGE_EVERY = timedelta(hours=1)


class OutcomeRecorder:
    """Buffers outcome records and writes them in batched transactions from a background task."""

    def __init__(  # noqa: PLR0913 - the settings of one recorder
        self,
        database: OutcomeDatabase,
        *,
        batch_size: int = 500,
        flush_seconds: float = 0.5,
        max_buffered: int = 200_000,
        target_response_seconds: float = 30.0,
        retention_days: int | None = None,
        retry_seconds: float = 1.0,
        clock: Callable[[], datetime] = utc_now,
        metrics: Metrics | None = None,
    ) -> None:
        if max_buffered < batch_size:
            raise ValueError(f"max_buffered ({max_buffered}) must be at least batch_size ({batch_size})")
        self.database = database
        self._batch_size = batch_size
        self._flush_seconds = flush_seconds
        self._max_buffered = max_buffered
        self._target_ms = round(target_response_seconds * 1000)
        self._retention = None if retention_days is None else timedelta(days=retention_days)
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._metrics = metrics
        self._buffer: deque[Entry] = deque()
        self._executor: ThreadPoolExecutor | None = None
        # The worker thread's writer (its connection, the EUI ids cached); touched only in that thread.
        self._writer: OutcomeWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # One transaction at a time, in order: flushes, expiry and purge chunks interleave.
        self._lock = asyncio.Lock()
        self._closed = False
        # Since the last healthy moment: when writes began to fail, the last error, whether and from
        # which count records are being dropped (for one log line at each change, not one per record).
        self._failing_since: datetime | None = None
        self._last_error = ""
        self._dropping = False
        self._dropped_mark = 0
        self.flushed = 0
        """Records (decisions and device outcomes) written so far."""
        self.unmatched = 0
        """Device outcomes that found no forwarded request still waiting for one."""
        self.purged = 0
        """Rows deleted by retention so far."""
        self.dropped = 0
        """Records dropped, oldest first, because `max_buffered` were waiting."""
        self.write_failures = 0
        """Failed attempts to write a batch."""

    # -- the hot path: synchronous, memory only -----------------------------------------------

    def record_decision(  # noqa: PLR0913 - one argument per recorded fact
        self,
        *,
        request_id: str,
        originator: str,
        role: str | None,
        target: str,
        srv: str | None,
        category: str | None,
        command_variant: int | None,
        received_at: datetime,
        decision: str,
        response_code: str,
        reason: str,
        flagged: bool,
    ) -> None:
        counter = _checked_counter(request_id, originator, target)
        self._append(
            Decision(
                originator=originator,
                target=target,
                counter=counter,
                role=role,
                srv=srv,
                category=category,
                command_variant=command_variant,
                received_ms=to_ms(received_at),
                decision=decision,
                response_code=response_code,
                reason=reason,
                flagged=flagged,
            )
        )

    def record_device_outcome(self, request_id: str, outcome: str, code: str | None, at: datetime) -> None:
        """The device's final answer to a forwarded request (success, failure) or a timeout."""
        originator, target, counter = split_request_id(request_id)
        self._append(Answer(originator, target, counter, DeviceOutcome(outcome).value, code, to_ms(at)))

    def _append(self, entry: Entry) -> None:
        if self._closed:
            raise RuntimeError("outcome recorder is closed")
        if len(self._buffer) >= self._max_buffered:
            self._buffer.popleft()
            self._drop(1)
        self._buffer.append(entry)
        if len(self._buffer) >= self._batch_size:
            self._wake.set()

    def _drop(self, count: int) -> None:
        if not self._dropping:
            self._dropping = True
            log.error("outcome-buffer-full-dropping-oldest", max_buffered=self._max_buffered)
        self.dropped += count
        if self._metrics is not None:
            self._metrics.outcome_records_dropped.inc(count)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def failing(self) -> bool:
        """The last attempt to write failed (the database is unwritable); cleared by the next success."""
        return self._failing_since is not None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.database.migrate()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mp169-outcomes")
        try:
            await self._sql(lambda _writer: None)  # open the worker's connection now: fail at start
        except BaseException:
            self._executor.shutdown()
            self._executor = None
            raise
        self._task = asyncio.create_task(self._run(), name="mp169-outcomes")

    async def close(self) -> None:
        """Stop the background task and write everything still buffered.

        If that last write fails too, what is left is counted as dropped and logged: stopping the
        gateway must not wait for a database that may never come back.
        """
        self._closed = True
        if self._task is not None:
            # Not cancelled: a cancellation landing on a COMMIT could write a batch twice.
            self._wake.set()
            await self._task
            self._task = None
        if self._executor is None:
            return
        try:
            await self.flush()
        except Exception as exc:  # noqa: BLE001 - logged with the error; the records are counted
            lost = len(self._buffer)
            self._buffer.clear()
            self._drop(lost)
            log.error("outcome-records-lost-at-close", count=lost, **_error_fields(exc))  # noqa: TRY400
        finally:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._disconnect)
            self._executor.shutdown()
            self._executor = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _run(self) -> None:
        next_purge = self._clock()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._flush_seconds):
                    await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return  # close() writes what is left
            try:
                await self.flush()
                if self._retention is not None and self._clock() >= next_purge:
                    await self.purge(self._clock() - self._retention)
                    next_purge = self._clock() + _PURGE_EVERY
            except Exception as exc:  # noqa: BLE001 - logged by _failed; retried
                self._failed(exc)
                await asyncio.sleep(self._retry_seconds)
            else:
                self._recovered()
            finally:
                if self._metrics is not None:
                    self._metrics.outcome_records_buffered.set(len(self._buffer))

    def _failed(self, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if self._failing_since is None:
            self._failing_since = self._clock()
            log.error("outcome-write-failed", buffered=len(self._buffer), exc_info=exc, **_error_fields(exc))
        elif error != self._last_error:
            log.error("outcome-write-failed", buffered=len(self._buffer), **_error_fields(exc))
        self._last_error = error

    def _recovered(self) -> None:
        if self._failing_since is None and not self._dropping:
            return
        log.warning(
            "outcome-recording-recovered",
            failing_seconds=None
            if self._failing_since is None
            else round((self._clock() - self._failing_since).total_seconds(), 1),
            dropped=self.dropped - self._dropped_mark,
        )
        self._failing_since = None
        self._last_error = ""
        self._dropping = False
        self._dropped_mark = self.dropped

    # -- writing --------------------------------------------------------------------------------

    async def flush(self) -> int:
        """Write everything buffered, one transaction per batch; returns how many records."""
        # Shielded: a caller cancelled mid-batch must not leave a batch both committed and re-buffered.
        return await asyncio.shield(self._flush())

    async def _flush(self) -> int:
        written = 0
        async with self._lock:
            while self._buffer:
                batch = [self._buffer.popleft() for _ in range(min(self._batch_size, len(self._buffer)))]
                try:
                    unmatched = await self._sql_unlocked(
                        partial(_write_batch, batch=batch, target_ms=self._target_ms)
                    )
                except BaseException:
                    self.write_failures += 1
                    if self._metrics is not None:
                        self._metrics.outcome_write_failures.inc()
                    self._requeue(batch)
                    raise
                self.unmatched += unmatched
                written += len(batch)
                self.flushed += len(batch)
        return written

    def _requeue(self, batch: Sequence[Entry]) -> None:
        """Put a batch that was not committed back at the front, in order, within the bound."""
        lost = max(0, len(self._buffer) + len(batch) - self._max_buffered)
        if lost:
            self._drop(lost)
        self._buffer.extendleft(reversed(batch[lost:]))

    async def _sql(self, work: Callable[[OutcomeWriter], _T]) -> _T:
        async with self._lock:
            return await self._sql_unlocked(work)

    async def _sql_unlocked(self, work: Callable[[OutcomeWriter], _T]) -> _T:
        if self._executor is None:
            raise RuntimeError("outcome recorder is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._in_worker, work)

    def _in_worker(self, work: Callable[[OutcomeWriter], _T]) -> _T:
        if self._writer is None:
            self._writer = self.database.connect()
        try:
            return work(self._writer)
        except BaseException:
            # A fresh connection next time: the fault may have left this one unusable (or the file replaced).
            self._disconnect()
            raise

    def _disconnect(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):
                writer.close()

    async def expire_pending(self, now: datetime, target_response_seconds: float) -> int:
        """Mark forwarded requests older than the target response time and still unanswered as timed out.

        For requests whose gateway stopped before their answer or timeout was recorded (the router
        times out the others itself). Call it with a margin over the router's own timeout.
        """
        cutoff = to_ms(now) - round(target_response_seconds * 1000)
        await self.flush()
        expired, unmatched = await self._sql(
            lambda writer: writer.expire_pending(to_ms(now), cutoff, self._target_ms)
        )
        self.unmatched += unmatched
        if expired or unmatched:
            log.info("outcomes-expired", count=expired, unmatched_answers=unmatched)
        return expired

    async def purge(self, older_than: datetime) -> int:
        """Delete requests received before `older_than`, and the counts of hours and days ended by then.

        Deletes in chunks, each its own short transaction, so recording goes on meanwhile.
        """
        cutoff = to_ms(older_than)
        deleted = 0
        while True:
            count = await self._sql(lambda writer: writer.purge_rows(cutoff, _PURGE_CHUNK))
            deleted += count
            self.purged += count
            if count < _PURGE_CHUNK:
                break
        await self._sql(lambda writer: writer.purge_rollups(older_than))
        if deleted:
            log.info("outcomes-purged", count=deleted, older_than=older_than.isoformat())
        return deleted


def _checked_counter(request_id: str, originator: str, target: str) -> int:
    rid_originator, rid_target, counter = split_request_id(request_id)
    if (rid_originator, rid_target) != (originator, target):
        raise ValueError(f"RequestID {request_id} does not match originator {originator} and target {target}")
    return counter


def _write_batch(writer: OutcomeWriter, batch: Sequence[Entry], target_ms: int) -> int:
    return writer.write_batch(batch, target_ms)


def _error_fields(exc: BaseException) -> dict[str, str | None]:
    """The real error and the database's own name for it: SQLite's (SQLITE_FULL, SQLITE_READONLY, ...)
    or PostgreSQL's SQLSTATE (25006 read-only transaction, 40P01 deadlock, ...)."""
    return {
        "error": f"{type(exc).__name__}: {exc}",
        "sqlite_error": getattr(exc, "sqlite_errorname", None),
        "sqlstate": getattr(exc, "sqlstate", None),
    }
