"""Replaying a stream twice into one store: the second run is caught (E16901 throughout, nothing
checked: it fails), and --renumber's fresh counters make it a real run again."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

from gateway.pki import init_pki
from gateway.service import GatewayService
from gateway.store import SqliteStore
from gateway.transport import MemoryBroker, MemoryTransport
from rules.domain import Eui
from simulator import cli
from simulator.demo import demo_settings
from simulator.devices import DeviceConfig, DeviceSimulator
from simulator.estate import generate_estate
from simulator.recording import InventoryChange, PublishItem
from simulator.renumber import renumber, stale_requests
from simulator.replay import ReplayResult, Signatures, print_summary, replay
from simulator.traffic import Traffic, generate_traffic
from tests.gateway.messages import header

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    import pytest

    from simulator.recording import StreamItem

USER = Eui("90-B3-D5-1F-30-01-00-00")
METER = "00-DB-12-34-56-78-90-A0"


def item(counter: int, user: Eui = USER, topic_user: Eui = USER) -> PublishItem:
    payload = (
        b'<sr:Request xmlns:sr="http://www.dccinterface.co.uk/ServiceUserGateway"><sr:Header>'
        b"<sr:RequestID>" + f"{user}:{METER}:{counter}".encode() + b"</sr:RequestID></sr:Header></sr:Request>"
    )
    return PublishItem(float(counter), f"dsp/in/{topic_user}", payload)


def test_stale_requests_are_those_at_or_below_the_stored_counter() -> None:
    items = [item(1), item(2), item(3), InventoryChange(4.0, ())]
    assert stale_requests(items, {}) == 0
    assert stale_requests(items, {USER: 2}) == 2
    assert stale_requests(items, {Eui("90-B3-D5-1F-30-01-00-09"): 5}) == 0


def test_renumbering_raises_each_originator_above_the_store_keeping_order_and_repeats() -> None:
    other = Eui("90-B3-D5-1F-30-01-00-05")
    items: list[StreamItem] = [item(1), item(1), item(2, other), item(3), InventoryChange(5.0, ())]
    fresh, changed = renumber(items, {USER: 100})
    assert changed == 3
    counters = [header(i.payload)[0] for i in fresh if isinstance(i, PublishItem)]
    assert counters == [
        f"{USER}:{METER}:101",
        f"{USER}:{METER}:101",
        f"{other}:{METER}:2",
        f"{USER}:{METER}:103",
    ]
    assert fresh[-1] is items[-1]
    assert stale_requests(fresh, {USER: 100}) == 0


async def replay_into(database: Path, traffic: Traffic, items: Sequence[StreamItem]) -> ReplayResult:
    """A replay as `mp169 replay --pki` makes it, with alerts from the meters the stream flags."""
    estate = generate_estate(SEED, PREMISES)
    pki = init_pki(database.parent / "pki", [user.user_id for user in estate.users])
    settings = demo_settings(database, pki=pki)
    broker = MemoryBroker()
    service = await GatewayService.start(settings, MemoryTransport(broker, "gateway"))
    devices = DeviceSimulator(MemoryTransport(broker, "devices"), DeviceConfig(), devices=estate.devices)
    flagged = [device for device in estate.devices if device.device_id in traffic.flag_devices]
    await devices.start()

    async def alerts() -> None:
        await devices.emit_alerts(100, flagged)

    try:
        return await replay(
            items,
            MemoryTransport(broker, "replay"),
            window=50,
            topics=service.router.topics,
            before_wait=alerts,
            estate=generate_estate(SEED, PREMISES),
            settle_seconds=0.3,
            signatures=Signatures.from_pki(pki),
        )
    finally:
        await devices.stop()
        await service.stop()


PREMISES = 40
SEED = 3


async def test_a_second_replay_into_the_same_store_fails_and_a_renumbered_one_passes(tmp_path: Path) -> None:
    estate = generate_estate(SEED, PREMISES)
    traffic = generate_traffic(estate, SEED, 400)
    items = [i for i in traffic.items if isinstance(i, PublishItem)]
    database = tmp_path / "store.sqlite3"
    async with SqliteStore(database) as store:
        await store.upsert_devices(estate.devices)
        await store.upsert_users(estate.users)

    first = await replay_into(database, traffic, items)
    assert first.passed, [r for r in first.invariants if not r.passed or r.vacuous]

    async with SqliteStore(database) as store:
        counters = await store.load_request_counters()
    assert stale_requests(items, counters) > len(items) // 2

    again = await replay_into(database, traffic, items)
    assert not again.passed
    assert again.summary.first_codes.get("E16901", 0) > len(items) // 2
    vacuous = [r.name for r in again.invariants if r.vacuous]
    assert "no-consumption-to-flagged" in vacuous
    console = Console(width=200, record=True)
    print_summary(again, console)
    shown = console.export_text()
    assert "NOTHING CHECKED" in shown
    assert "mp169 replay --renumber" in shown

    fresh, changed = renumber(items, counters)
    assert changed > len(items) // 2
    renumbered = await replay_into(database, traffic, fresh)
    assert renumbered.passed, [r for r in renumbered.invariants if not r.passed or r.vacuous]
    assert "E16901" not in renumbered.summary.first_codes


def test_mp169_replay_warns_about_a_stream_the_store_has_seen_or_renumbers_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items: list[StreamItem] = [item(1), item(2), item(3)]
    store = tmp_path / "store.sqlite3"
    assert cli._fresh_items(items, {}, store, "dsp/in", renumbering=False) is items
    assert capsys.readouterr().err == ""
    assert cli._fresh_items(items, {USER: 2}, store, "dsp/in", renumbering=False) is items
    warning = capsys.readouterr().err
    assert (
        f"warning: 2 requests of this stream carry RequestID counters that {store} has already accepted"
        in warning
    )
    assert "--renumber gives them fresh counters" in warning
    fresh = cli._fresh_items(items, {USER: 2}, store, "dsp/in", renumbering=True)
    assert stale_requests(fresh, {USER: 2}) == 0
    assert f"renumbered 3 requests above the counters of {store}" in capsys.readouterr().err
