"""Three gateway instances through an instance crash and a database restart, under simulator traffic.

Three `mp169 run` processes, each with its own config and client id, share one subscription group over
one private Mosquitto and one private PostgreSQL (`store.url`). The simulated SMETS2 devices answer
their commands (a few fail, a few never answer); the simulator replays a generated stream of signed
Service Requests flat out through a window: reads, firmware, schedules, malformed and spoofed input,
and flag sets (8.15.1) and clears (8.15.2) by the meters' responsible suppliers. A third of the way
through, one instance is SIGKILLed and started again with its client id (Mosquitto hands it its
session back); at three fifths the PostgreSQL server is stopped and started on its port and data.

The replay's observer, subscribed to dsp/out/+, every device's /cmd and /up and dsp/deadletter, is the
recorder, independent of the gateways. One run serves the module; each test checks one invariant of
issue 12 over what the recorder saw (simulator/invariants.py, where each check is tested to fail on a
log that breaks it). Waits are bounded by conditions; the timeouts only turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from gateway.mqtt import MqttTransport
from gateway.pki import PkiLayout, init_pki
from gateway.postgres import PostgresStore
from gateway.topics import Topics
from rules.table import default_table
from simulator.devices import DeviceConfig, DeviceSimulator
from simulator.estate import generate_estate
from simulator.invariants import (
    Analysis,
    InvariantResult,
    analyse,
    check_exactly_one_final,
    check_forwarded_once,
    check_malformed_handled,
    check_no_consumption_to_flagged,
    check_none_lost,
)
from simulator.mosquitto import Mosquitto
from simulator.replay import ReplaySummary, Signatures, replay
from simulator.traffic import TrafficMix, generate_traffic
from tests.gateway.test_daemon import Daemon, signing_settings
from tests.gateway.test_mqtt import GUARD_SECONDS, settings_for
from tests.servers import private_postgres, running

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from pathlib import Path

    from gateway.transport import Handler
    from simulator.postgres import Postgres

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SEED = 12
PREMISES = 40
REQUESTS = 1_500
# No Change of Supplier: its inventory changes would be written to the store while it restarts.
MIX = TrafficMix(change_of_supplier=0.0)
DEVICES = DeviceConfig(latency_seconds=0.005, failure_rate=0.02, timeout_rate=0.02, seed=SEED)
INSTANCES = ("gw-1", "gw-2", "gw-3")
VICTIM = "gw-2"
KILL_AT = REQUESTS // 3
DATABASE_RESTART_AT = REQUESTS * 3 // 5
WINDOW = 100
TARGET_RESPONSE_SECONDS = 3.0
LEASE_SECONDS = 5.0
# After the last publish: a request the killed instance forwarded is timed out by the target response
# time once its lease lapsed; GUARD_SECONDS on top turns a lost request into a failure, not a hang.
ANSWER_SECONDS = TARGET_RESPONSE_SECONDS + LEASE_SECONDS + GUARD_SECONDS
# Once everything is answered, long enough for a second final answer (an E21) to show if one is due.
SETTLE_SECONDS = TARGET_RESPONSE_SECONDS + 1.0
CHAOS_GUARD_SECONDS = 60.0
TABLE = default_table()


class Counted:
    """The replay's transport, counting the requests it published, so the chaos can wait for them."""

    def __init__(self, inner: MqttTransport) -> None:
        self.inner = inner
        self.published = 0
        self._changed = asyncio.Event()

    async def start(self, subscriptions: Sequence[str], handler: Handler) -> None:
        await self.inner.start(subscriptions, handler)

    async def publish(self, topic: str, payload: bytes) -> None:
        await self.inner.publish(topic, payload)
        self.published += 1
        self._changed.set()

    async def stop(self) -> None:
        await self.inner.stop()

    async def until_published(self, count: int) -> None:
        async with asyncio.timeout(CHAOS_GUARD_SECONDS):
            while self.published < count:
                self._changed.clear()
                await self._changed.wait()


@dataclass(frozen=True, slots=True)
class FailoverRun:
    analysis: Analysis = field(repr=False)
    summary: ReplaySummary
    alive: Mapping[str, bool]
    """Whether each instance was still running when the replay ended."""
    exits: Mapping[str, int]
    """Each instance's exit status on SIGTERM after the run."""


def instance_config(directory: Path, name: str, broker_url: str, store_url: str, pki: PkiLayout) -> Path:
    signing = "".join(f'{key} = "{value}"\n' for key, value in signing_settings(pki).items())
    config = directory / f"{name}.toml"
    config.write_text(
        f'[broker]\nurl = "{broker_url}"\nreconnect_min_seconds = 0.05\nreconnect_max_seconds = 0.5\n'
        f'[store]\nurl = "{store_url}"\nlease_seconds = {LEASE_SECONDS}\n'
        '[topics]\nshared_group = "gw"\n'
        f'[outcomes]\npath = "{directory / f"{name}-outcomes.sqlite3"}"\n'
        # Every request is forwarded: none is refused for the forward limit.
        f'[gateway]\nclient_id = "{name}"\nmetrics_port = 0\nmax_forwards_per_user = {REQUESTS}\n'
        f"target_response_seconds = {TARGET_RESPONSE_SECONDS}\n"
        f"[signing]\n{signing}"
    )
    return config


async def chaos(
    recorder: Counted, daemons: dict[str, Daemon], configs: Mapping[str, Path], database: Postgres
) -> None:
    await recorder.until_published(KILL_AT)
    assert await daemons[VICTIM].signal(signal.SIGKILL) == -signal.SIGKILL
    # As systemd's Restart=on-failure would: the same config, so the same client id and session.
    daemons[VICTIM] = Daemon(configs[VICTIM])
    await daemons[VICTIM].start()
    await recorder.until_published(DATABASE_RESTART_AT)
    await asyncio.to_thread(database.restart)


async def run_failover(directory: Path, broker: Mosquitto, database: Postgres) -> FailoverRun:
    estate = generate_estate(SEED, PREMISES)
    items = generate_traffic(estate, SEED, REQUESTS, MIX).items
    store_url = database.url()
    async with PostgresStore(store_url) as store:
        await store.upsert_devices(estate.devices)
        await store.upsert_users(estate.users)
    pki = init_pki(directory / "pki", [user.user_id for user in estate.users])
    configs = {name: instance_config(directory, name, broker.url, store_url, pki) for name in INSTANCES}
    daemons = {name: Daemon(config) for name, config in configs.items()}
    devices = DeviceSimulator(
        MqttTransport(settings_for(broker.url), "failover-devices"), DEVICES, devices=estate.devices
    )
    recorder = Counted(MqttTransport(settings_for(broker.url), "failover-recorder"))
    try:
        for daemon in daemons.values():
            await daemon.start()
        await devices.start()
        async with asyncio.TaskGroup() as group:
            replaying = group.create_task(
                replay(
                    items,
                    recorder,
                    window=WINDOW,
                    answer_timeout=ANSWER_SECONDS,
                    settle_seconds=SETTLE_SECONDS,
                    table=TABLE,
                    estate=estate,
                    signatures=Signatures.from_pki(pki),
                )
            )
            group.create_task(chaos(recorder, daemons, configs, database))
        result = replaying.result()
        alive = {
            name: daemon.process is not None and daemon.process.returncode is None
            for name, daemon in daemons.items()
        }
        exits = {name: await daemon.signal(signal.SIGTERM) for name, daemon in daemons.items() if alive[name]}
    finally:
        await devices.stop()
        for daemon in daemons.values():
            if daemon.process is not None and daemon.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    daemon.process.kill()
                await daemon.process.wait()
    return FailoverRun(analyse(result.events, Topics(), estate), result.summary, alive, exits)


@pytest.fixture(scope="module")
def failover(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FailoverRun]:
    """One failover run for the module's tests (its own broker and database, both removed after)."""
    directory = tmp_path_factory.mktemp("failover")
    with running(Mosquitto(directory / "mosquitto")) as broker, private_postgres() as database:
        yield asyncio.run(run_failover(directory, broker, database))


def explain(result: InvariantResult, run: FailoverRun) -> str:
    counts = ", ".join(f"{name} {count}" for name, count in sorted(result.counts.items()))
    examples = "\n".join(result.counterexamples)
    return (
        f"{result.name}: {result.violations} violation(s) of {result.checked} checked ({counts}); "
        f"{run.summary.requests} requests, {run.summary.commands} commands, "
        f"decisions {dict(run.summary.decisions)}\n{examples}"
    )


def holds(result: InvariantResult) -> bool:
    return result.passed and not result.vacuous


def test_a_no_consumption_command_reaches_a_meter_after_its_flag_set_was_acknowledged(
    failover: FailoverRun,
) -> None:
    intervals = [interval for found in failover.analysis.flag_intervals.values() for interval in found]
    assert intervals, "no flag-set was acknowledged: nothing to check"
    assert any(end is not None for _, end, _ in intervals), "no flag-clear was acknowledged after a set"
    result = check_no_consumption_to_flagged(failover.analysis, TABLE)
    assert holds(result), explain(result, failover)


def test_b_every_request_gets_exactly_one_final_answer(failover: FailoverRun) -> None:
    result = check_exactly_one_final(failover.analysis)
    assert holds(result), explain(result, failover)


def test_c_no_request_is_lost(failover: FailoverRun) -> None:
    result = check_none_lost(failover.analysis)
    assert holds(result), explain(result, failover)
    malformed = check_malformed_handled(failover.analysis)
    assert holds(malformed), explain(malformed, failover)


def test_d_no_request_id_reaches_a_device_twice(failover: FailoverRun) -> None:
    result = check_forwarded_once(failover.analysis)
    assert holds(result), explain(result, failover)


def test_every_instance_rides_out_the_database_restart(failover: FailoverRun) -> None:
    assert failover.alive == dict.fromkeys(INSTANCES, True)
    assert failover.exits == dict.fromkeys(INSTANCES, 0)
