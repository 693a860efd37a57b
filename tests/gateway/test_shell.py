"""The shell around the router: ordering, acknowledgement, commits and reads over a real SQLite store.

The routing paths themselves are tested on the router (test_router.py); here `Shell.handle` is called
as the transport calls it, concurrently, and the store is a real SQLite file.
"""

from __future__ import annotations

import asyncio
import errno
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pytest
import structlog

from gateway.metrics import Metrics
from gateway.observers import LogObserver, MetricsObserver, OutcomeObserver
from gateway.outcomes.database import SqliteOutcomes
from gateway.outcomes.queries import open_reader, read_records
from gateway.outcomes.recorder import OutcomeRecorder
from gateway.router import Router, RouterSettings
from gateway.shell import Shell
from gateway.signing import Verification
from gateway.store import CommitBatch, CommitResult, SqliteStore
from gateway.topics import Topics
from gateway.transport import Message
from gateway.view import RoutingView
from rules.codes import ResponseCode
from rules.table import default_table
from tests.gateway.desk import Desk
from tests.gateway.messages import (
    AT,
    CONSUMPTION_SRV,
    DCC,
    SECURITY_SRV,
    flag_request,
    header,
    request,
    response_code,
)
from tests.gateway.test_inventory import IMPORT_SUPPLIER, METER, USERS, premise

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from concurrent.futures import Executor

    from gateway.observers import Observer
    from rules.domain import Eui

TOPICS = Topics()
GUARD_SECONDS = 20  # only turns a hang into a failure


async def seed(path: Path) -> None:
    """A store holding one premise (comms hub, ESME, GSME) and the users."""
    async with SqliteStore(path) as store:
        await store.upsert_devices(premise())
        await store.upsert_users(USERS)


@dataclass
class Running:
    store: SqliteStore
    shell: Shell
    metrics: Metrics
    published: list[tuple[str, bytes]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=lambda: [0.0])

    async def send(self, user: Eui, payload: bytes) -> list[tuple[str, bytes]]:
        start = len(self.published)
        await self.shell.handle(Message(f"{TOPICS.inbound}/{user}", payload))
        return self.published[start:]

    def answers_to(self, user: Eui, published: list[tuple[str, bytes]] | None = None) -> list[str]:
        return [response_code(p) for t, p in (published or self.published) if t == TOPICS.out(user)]


async def start(
    path: Path,
    *,
    store: SqliteStore | None = None,
    observers: tuple[Observer, ...] = (),
    verify: Callable[[bytes], Verification] | None = None,
    sign: Callable[[bytes], bytes] | None = None,
    executor: Executor | None = None,
) -> Running:
    store = store or SqliteStore(path)
    await store.open()
    published: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes) -> None:
        await asyncio.sleep(0)  # a real transport yields too
        published.append((topic, payload))

    router = Router(
        table=default_table(),
        view=await RoutingView.load(store),
        settings=RouterSettings(dcc_eui=DCC, target_response_seconds=30.0),
        counters=await store.load_request_counters(),
    )
    metrics = Metrics()
    seconds = [0.0]
    shell = Shell(
        router,
        store=store,
        publish=publish,
        observers=(MetricsObserver(metrics), *observers),
        metrics=metrics,
        clock=lambda: AT,
        monotonic=lambda: seconds[0],
        verify=verify,
        sign=sign,
        executor=executor,
    )
    shell.start()
    return Running(store, shell, metrics, published, seconds)


async def stop(running: Running) -> None:
    await running.shell.stop()
    await running.store.close()


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    await seed(tmp_path / "gw.sqlite3")
    gateway = await start(tmp_path / "gw.sqlite3")
    yield gateway
    await stop(gateway)


async def test_concurrent_handlers_are_decided_in_arrival_order_around_a_flag(running: Running) -> None:
    before = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1)
    flag = flag_request(IMPORT_SUPPLIER, 2, METER, set_flag=True)
    after = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 3)
    await asyncio.gather(
        running.send(IMPORT_SUPPLIER, before),
        running.send(IMPORT_SUPPLIER, flag),
        running.send(IMPORT_SUPPLIER, after),
    )
    assert [t for t, _ in running.published if t.endswith("/cmd")] == [TOPICS.command(METER)]
    assert running.answers_to(IMPORT_SUPPLIER) == [
        ResponseCode.ACKNOWLEDGED,
        ResponseCode.SUCCESS,
        ResponseCode.CONSUMER_CHOICE,
    ]
    topics = [t for t, _ in running.published]
    assert topics.index(TOPICS.command(METER)) < topics.index(TOPICS.out(IMPORT_SUPPLIER), 1)
    assert set(await running.store.load_flags()) == {METER}


# -- signatures ---------------------------------------------------------------------------------------


def verified(payload: bytes) -> Verification:
    return Verification("verified", "signed by the originator", IMPORT_SUPPLIER, 1)


async def test_signatures_are_checked_concurrently_and_requests_decided_in_arrival_order(
    tmp_path: Path,
) -> None:
    await seed(tmp_path / "gw.sqlite3")
    third_checked = threading.Event()

    def verify(payload: bytes) -> Verification:
        if b":1<" in payload:  # the first request's check finishes only after the third's
            assert third_checked.wait(GUARD_SECONDS)
        elif b":3<" in payload:
            third_checked.set()
        return verified(payload)

    with ThreadPoolExecutor(3) as executor:
        running = await start(tmp_path / "gw.sqlite3", verify=verify, executor=executor)
        try:
            await asyncio.gather(
                running.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1)),
                running.send(IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 2, METER, set_flag=True)),
                running.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 3)),
            )
        finally:
            await stop(running)
    # Decided as they arrived: the read before the flag forwarded, the one after refused.
    assert [t for t, _ in running.published if t.endswith("/cmd")] == [TOPICS.command(METER)]
    assert running.answers_to(IMPORT_SUPPLIER) == [
        ResponseCode.ACKNOWLEDGED,
        ResponseCode.SUCCESS,
        ResponseCode.CONSUMER_CHOICE,
    ]
    assert running.metrics.signature_checks.labels(result="verified")._value.get() == 3


async def test_a_request_failing_its_signature_check_is_answered_and_moves_nothing(tmp_path: Path) -> None:
    await seed(tmp_path / "gw.sqlite3")
    forged = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 5)

    def verify(payload: bytes) -> Verification:
        if payload == forged:
            return Verification("signer-not-originator", "signed by someone else", METER, 7)
        return verified(payload)

    with ThreadPoolExecutor(1) as executor:
        running = await start(tmp_path / "gw.sqlite3", verify=verify, executor=executor)
        try:
            assert running.answers_to(IMPORT_SUPPLIER, await running.send(IMPORT_SUPPLIER, forged)) == [
                ResponseCode.SIGNER_NOT_ORIGINATOR
            ]
            assert [t for t, _ in running.published if t.endswith("/cmd")] == []
            # Its RequestID counter was not taken: the genuine request with it is forwarded.
            genuine = forged.replace(b"</sr:Body>", b" </sr:Body>")
            out = await running.send(IMPORT_SUPPLIER, genuine)
            assert [t for t, _ in out if t.endswith("/cmd")] == [TOPICS.command(METER)]
            assert await running.store.load_request_counters() == {IMPORT_SUPPLIER: 5}
        finally:
            await stop(running)


async def test_documents_to_users_are_signed_and_published_in_order(tmp_path: Path) -> None:
    await seed(tmp_path / "gw.sqlite3")

    def sign(payload: bytes) -> bytes:
        return b"signed:" + payload

    with ThreadPoolExecutor(2) as executor:
        running = await start(tmp_path / "gw.sqlite3", verify=verified, sign=sign, executor=executor)
        try:
            out = await running.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1))
        finally:
            await stop(running)
    [(command_topic, command), (answer_topic, answer)] = out
    assert command_topic == TOPICS.command(METER)
    assert not command.startswith(b"signed:")  # the request goes to the device as the user signed it
    assert answer_topic == TOPICS.out(IMPORT_SUPPLIER)
    assert answer.startswith(b"signed:")
    assert response_code(answer.removeprefix(b"signed:")) == ResponseCode.ACKNOWLEDGED


class CountingExecutor(ThreadPoolExecutor):
    """A thread pool that counts the tasks it was given."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.tasks = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.tasks += 1
        return super().submit(fn, *args, **kwargs)


async def test_documents_of_one_loop_iteration_are_signed_in_chunks_and_published_in_order(
    tmp_path: Path,
) -> None:
    await seed(tmp_path / "gw.sqlite3")
    signed: list[bytes] = []

    def sign(payload: bytes) -> bytes:
        signed.append(payload)
        return b"signed:" + payload

    counters = range(1, 41)
    with CountingExecutor(2) as executor:
        running = await start(tmp_path / "gw.sqlite3", sign=sign, executor=executor)
        try:
            await asyncio.gather(
                *(
                    running.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, n))
                    for n in counters
                )
            )
        finally:
            await stop(running)
    answers = [payload for topic, payload in running.published if topic == TOPICS.out(IMPORT_SUPPLIER)]
    assert len(signed) == len(answers) == len(counters)
    assert all(answer.startswith(b"signed:") for answer in answers)
    # In decision order, each answer its own request's.
    request_ids = [header(answer.removeprefix(b"signed:"))[0] or "" for answer in answers]
    assert [int(request_id.rsplit(":", 1)[1]) for request_id in request_ids] == list(counters)
    assert executor.tasks < len(counters)  # several documents a task


class GatedStore(SqliteStore):
    """A store whose commits wait until the test opens the gate."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()

    async def commit(self, batch: CommitBatch) -> CommitResult:
        await self.gate.wait()
        return await super().commit(batch)


async def test_a_handler_returns_only_once_its_effects_are_durable_and_published(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite3"
    await seed(path)
    store = GatedStore(path)
    running = await start(path, store=store)
    try:
        payload = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 5)
        handler = asyncio.create_task(running.send(IMPORT_SUPPLIER, payload))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not handler.done()  # the transport must not acknowledge yet
        assert running.published == []  # nor may anything leave before the counter is durable
        store.gate.set()
        published = await handler
        assert (await store.load_request_counters())[IMPORT_SUPPLIER] == 5
    finally:
        await stop(running)
    assert [topic for topic, _ in published] == [TOPICS.command(METER), TOPICS.out(IMPORT_SUPPLIER)]
    assert running.metrics.inflight._value.get() == 0


async def test_a_stream_of_handlers_loses_nothing_and_duplicates_nothing(running: Running) -> None:
    handlers = []
    for counter in range(1, 201):
        if counter % 50 == 0:
            payload = flag_request(IMPORT_SUPPLIER, counter, METER, set_flag=counter % 100 == 0)
        else:
            payload = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, counter)
        handlers.append(asyncio.create_task(running.send(IMPORT_SUPPLIER, payload)))
        await asyncio.sleep(0)
    await asyncio.gather(*handlers)
    codes = running.answers_to(IMPORT_SUPPLIER)
    assert len(codes) == 200
    assert ResponseCode.DUPLICATE_REQUEST_ID not in codes
    assert codes.count(ResponseCode.CONSUMER_CHOICE) == len(range(101, 150))


class FailingStore(SqliteStore):
    """A store whose commits fail while `failing` is set (a full disk)."""

    failing = True

    async def commit(self, batch: CommitBatch) -> CommitResult:
        if self.failing:
            raise OSError(28, "No space left on device")
        return await super().commit(batch)


async def test_a_failed_commit_is_answered_and_the_retry_is_routed_once_the_store_recovers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gw.sqlite3"
    await seed(path)
    store = FailingStore(path)
    capture, logger = capturing_logger()
    running = await start(path, store=store, observers=(LogObserver(logger),))
    try:
        payload = request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1)
        failed = await running.send(IMPORT_SUPPLIER, payload)
        store.failing = False
        retried = await running.send(IMPORT_SUPPLIER, payload)
    finally:
        await stop(running)
    assert running.answers_to(IMPORT_SUPPLIER, failed) == [ResponseCode.STORE_FAILED]
    assert b"No space left on device" in failed[0][1]
    assert [t for t, _ in retried] == [TOPICS.command(METER), TOPICS.out(IMPORT_SUPPLIER)]
    assert running.metrics.commit_failures._value.get() == 1
    [failure] = [call.kwargs for call in capture.calls if call.kwargs.get("event") == "commit-failed"]
    assert "No space left on device" in failure["error"]
    assert failure["request_id"] == f"{IMPORT_SUPPLIER}:{METER}:1"


async def test_the_flag_and_the_counters_survive_a_restart_of_the_process(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite3"
    await seed(path)
    first = await start(path)
    await first.send(IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 5, METER, set_flag=True))
    await stop(first)
    second = await start(path)
    try:
        refused = await second.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 6))
        replayed = await second.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 5))
    finally:
        await stop(second)
    assert second.answers_to(IMPORT_SUPPLIER, refused) == [ResponseCode.CONSUMER_CHOICE]
    assert second.answers_to(IMPORT_SUPPLIER, replayed) == [ResponseCode.DUPLICATE_REQUEST_ID]


async def test_a_silent_device_is_timed_out_when_the_shell_ticks(running: Running) -> None:
    await running.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1))
    running.seconds[0] = 31.0
    running.shell.tick()
    await running.shell.stop()  # drains the publisher
    assert running.answers_to(IMPORT_SUPPLIER)[-1] == ResponseCode.DEVICE_TIMEOUT
    assert running.metrics.timeouts._value.get() == 1
    running.shell.start()  # the fixture stops it again


async def test_outcomes_are_recorded_for_every_decision_through_the_observer(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite3"
    await seed(path)
    recorder = OutcomeRecorder(SqliteOutcomes(path), clock=lambda: AT)
    await recorder.start()
    running = await start(path, observers=(OutcomeObserver(recorder),))
    try:
        await running.send(IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 1, METER, set_flag=True))
        await running.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 2))
        await running.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 2))
        await running.send(IMPORT_SUPPLIER, request(SECURITY_SRV, IMPORT_SUPPLIER, METER, 3))
        await recorder.flush()
    finally:
        await stop(running)
        await recorder.close()
    async with open_reader(path) as db:
        records = await read_records(db, AT.replace(hour=0), AT.replace(hour=23))
    assert [(r.srv, r.decision, r.response_code, r.flagged) for r in records] == [
        ("8.15.1", "handle-locally", "I0", False),
        (CONSUMPTION_SRV, "refuse", "E169", True),
        (CONSUMPTION_SRV, "reject", "E16901", False),
        (SECURITY_SRV, "forward", "I99", True),
    ]


def capturing_logger() -> tuple[structlog.testing.CapturingLogger, Any]:
    """A logger that records every event with the context bound (whatever logging config is active)."""
    capture = structlog.testing.CapturingLogger()
    return capture, structlog.wrap_logger(
        capture, processors=[structlog.contextvars.merge_contextvars], wrapper_class=structlog.BoundLogger
    )


async def test_log_lines_carry_the_request_id(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite3"
    await seed(path)
    capture, logger = capturing_logger()
    running = await start(path, observers=(LogObserver(logger),))
    try:
        await running.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 9))
        await running.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 9))
    finally:
        await stop(running)
    [rejected] = [call.kwargs for call in capture.calls if call.kwargs.get("event") == "rejected"]
    assert rejected["request_id"] == f"{IMPORT_SUPPLIER}:{METER}:9"
    assert rejected["reason"] == "duplicate-request-id"


def test_the_desk_and_the_shell_publish_the_same_for_the_same_stream() -> None:
    """The test harness drives the router as the shell does (so router tests speak for production)."""

    async def through_the_shell(path: Path) -> list[tuple[str, bytes]]:
        await seed(path)
        running = await start(path)
        try:
            for payload in stream:
                await running.send(IMPORT_SUPPLIER, payload)
        finally:
            await stop(running)
        return running.published

    stream = [
        request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1),
        flag_request(IMPORT_SUPPLIER, 2, METER, set_flag=True),
        request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 3),
        request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 3),
        b"<garbage",
        request(SECURITY_SRV, IMPORT_SUPPLIER, METER, 4),
    ]
    with tempfile.TemporaryDirectory() as folder:
        shell_published = asyncio.run(through_the_shell(Path(folder) / "gw.sqlite3"))
    desk = Desk()
    for payload in stream:
        desk.send(IMPORT_SUPPLIER, payload)
    assert [(p.topic, p.payload) for p in desk.published] == shell_published


# -- a full disk ------------------------------------------------------------------------------------

SMALL_FILESYSTEM_BYTES = 4 * 1024 * 1024


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs the test can fill (the tests run as root, here and in CI)."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(
        ["/bin/mount", "-t", "tmpfs", "-o", f"size={SMALL_FILESYSTEM_BYTES}", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["/bin/umount", "-l", str(mount)], check=True)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; removing it frees the space."""
    filler = directory / "filler"
    with filler.open("wb") as file, pytest.raises(OSError, match="No space left") as full:
        _write_until_full(file)
    assert full.value.errno == errno.ENOSPC
    return filler


def _write_until_full(file: BinaryIO) -> None:
    while True:
        file.write(b"\0" * 65536)
        file.flush()


async def test_a_full_disk_answers_e16920_and_never_leaves_memory_ahead_of_the_store(
    small_filesystem: Path,
) -> None:
    path = small_filesystem / "gw.sqlite3"
    await seed(path)
    running = await start(path)
    try:
        await running.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 1))
        filler = fill(small_filesystem)
        with structlog.testing.capture_logs() as logs:
            failed = [
                *await running.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 2)),
                *await running.send(IMPORT_SUPPLIER, flag_request(IMPORT_SUPPLIER, 3, METER, set_flag=True)),
            ]
        assert running.answers_to(IMPORT_SUPPLIER, failed) == [ResponseCode.STORE_FAILED] * 2
        assert not running.shell.router.view.is_flagged(METER)
        errors = [entry["error"] for entry in logs if entry["event"] == "store-commit-failed"]
        assert errors
        assert all("database or disk is full" in error for error in errors), errors
        filler.unlink()
        retried = await running.send(IMPORT_SUPPLIER, request(CONSUMPTION_SRV, IMPORT_SUPPLIER, METER, 2))
        assert [topic for topic, _ in retried] == [TOPICS.command(METER), TOPICS.out(IMPORT_SUPPLIER)]
    finally:
        await stop(running)
    async with SqliteStore(path) as store:
        assert await store.load_flags() == {}
        assert await store.load_request_counters() == {IMPORT_SUPPLIER: 2}
        assert [entry.request_id.counter for entry in await store.load_pending()] == [1, 2]
